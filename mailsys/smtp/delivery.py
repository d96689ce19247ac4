"""
The delivery policies behind the SMTP listeners.

L{LocalDelivery} is the inbound MX: mail for our users, stored in their
maildirs.  It answers the SMTP server's questions with the L{Router} (our
domains, users, aliases) and stores accepted messages with the one
durable-write path of L{MaildirStore}, off the reactor thread.  Its
C{deliver} fires only when every copy is fsync'ed in C{new/}, and fails
with nothing stored if any copy could not be, so the server's 250 always
means "on disk" and a 451 always means "nothing half-done".  A message
that an alias forwards to another domain goes through the durable queue
instead, whole, so it too is stored once before the 250.

L{SubmissionDelivery} is the submission port: authenticated users send to
anyone; everything goes through the queue (as in Postfix), which delivers
local recipients to their maildirs and the others to their domains' MX.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import IO

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailsys.addresses import MailAddress
from mailsys.maildir import MaildirStore
from mailsys.queue.bounce import is_looping
from mailsys.routing import AliasLoop, NotOurDomain, Route, Router, UnknownRecipient
from mailsys.smtp.interfaces import Envelope, ISMTPDelivery, Reply, Session

log = Logger(namespace="mailsys.delivery")

# What may appear of client-chosen text (the HELO name) in our headers.
_UNSAFE_HEADER_TEXT = re.compile(r"[^A-Za-z0-9.\-:\[\]_]")


def received_header(
    session: Session,
    envelope: Envelope,
    hostname: str,
    now: float,
    return_path: bool = True,
    hide_client: bool = False,
) -> bytes:
    """
    The C{Return-Path:} (at final delivery only) and C{Received:} lines
    prepended to a message we store (RFC 5321 4.4), LF-terminated like the
    stored message.

    The HELO name is reduced to safe characters: client text must never
    turn into extra header lines or comments.  With C{hide_client} the
    client's name and address are left out (a submission option: a user's
    home address is nobody's business).
    """
    if hide_client:
        origin = "from authenticated-user"
    else:
        helo = _UNSAFE_HEADER_TEXT.sub("?", session.helo or "unknown")
        client = _UNSAFE_HEADER_TEXT.sub("?", session.client_host)
        origin = f"from {helo} ([{client}])"
    recipients = envelope.recipients
    for_clause = f"\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
    sender = str(envelope.sender) if envelope.sender is not None else ""
    lines = (
        (f"Return-Path: <{sender}>\n" if return_path else "") + f"Received: {origin}\n"
        f"\tby {hostname} (mailsys) with {session.protocol_name}"
        f" id {envelope.queue_id}{for_clause};\n"
        f"\t{_date(now)}\n"
    )
    return lines.encode("utf-8")


def _date(now: float) -> str:
    return format_datetime(datetime.fromtimestamp(now, timezone.utc))


def header_block(message: IO[bytes], limit: int = 256 * 1024) -> bytes:
    """
    The header section of a stored message (up to the first empty line),
    read from the start of C{message}, which is left where it was.
    """
    start = message.tell()
    message.seek(0)
    block = bytearray()
    for line in message:
        if line in (b"\n", b"\r\n") or len(block) > limit:
            break
        block += line
    message.seek(start)
    return bytes(block)


def has_header(block: bytes, name: bytes) -> bool:
    """Whether the header section has a field called C{name}."""
    wanted = name.lower() + b":"
    return any(
        line[: len(wanted)].lower() == wanted
        for line in block.split(b"\n")
        if line[:1] not in (b" ", b"\t")
    )


def submission_headers(block: bytes, queue_id: str, hostname: str, now: float) -> bytes:
    """
    RFC 6409 8.2, 8.3: a submission server adds C{Message-ID:} and C{Date:}
    when the client left them out (smtplib scripts, some phones do).
    """
    added = b""
    if not has_header(block, b"Message-ID"):
        added += f"Message-ID: <{queue_id}.{int(now)}@{hostname}>\n".encode()
    if not has_header(block, b"Date"):
        added += f"Date: {_date(now)}\n".encode()
    return added


def local_mailboxes(envelope: Envelope) -> list[MailAddress]:
    """Every local mailbox of the transaction, once, in recipient order."""
    seen: dict[MailAddress, None] = {}
    for recipient in envelope.recipients:
        for mailbox in envelope.routes[recipient].local:
            seen.setdefault(mailbox, None)
    return list(seen)


def queue_recipients(envelope: Envelope) -> list[str]:
    """Every final destination of the transaction, once: local mailboxes
    and foreign addresses (forwarding targets, or submitted remote mail)."""
    seen: dict[str, None] = {}
    for recipient in envelope.recipients:
        route = envelope.routes[recipient]
        for target in route.local + route.remote:
            seen.setdefault(str(target), None)
    return list(seen)


def refuse_loops(envelope: Envelope, message: IO[bytes]) -> None:
    """
    Refuse a message that has gone round a loop (too many C{Received:}, or
    our own C{Delivered-To:} for one of its recipients) with 554 5.4.6
    (RFC 5321 6.3, RFC 3463), instead of delivering it once more.
    """
    ours = [str(r) for r in envelope.recipients] + queue_recipients(envelope)
    if is_looping(header_block(message), ours):
        raise Reply(554, "5.4.6", "Routing loop detected")


def delivered_to(envelope: Envelope) -> bytes:
    """
    C{Delivered-To:} lines for the recipients an alias forwards to another
    domain, as Postfix adds them: if the mail comes back, the loop shows.
    """
    return b"".join(
        f"Delivered-To: {recipient}\n".encode()
        for recipient in envelope.recipients
        if envelope.routes[recipient].remote
    )


@implementer(ISMTPDelivery)
class LocalDelivery:
    """
    Accepts mail for our users and aliases; refuses everything else (never
    an open relay: foreign domains, address literals and the C{%}-hack all
    end at L{Router.resolve}).

    @param queue: the outbound queue (a C{Spool} and its C{QueueRunner}),
        or C{None}: then aliases that forward to other domains are refused.
    """

    def __init__(
        self, router: Router, store: MaildirStore, hostname: str, reactor, queue=None
    ) -> None:
        self.router = router
        self.store = store
        self.hostname = hostname
        self.reactor = reactor
        self.queue = queue

    @property
    def default_domain(self) -> str:
        return sorted(self.router.domains)[0]

    def validateFrom(self, session: Session, envelope: Envelope) -> None:
        # Any sender may send to our users (SPF/DKIM checks come later).
        return None

    def validateTo(
        self, session: Session, envelope: Envelope, recipient: MailAddress
    ) -> Route:
        try:
            route = self.router.resolve(recipient)
        except NotOurDomain:
            raise Reply(550, "5.7.1", f"<{recipient}>: Relay access denied") from None
        except UnknownRecipient:
            raise Reply(550, "5.1.1", f"<{recipient}>: User unknown") from None
        except AliasLoop:
            raise Reply(550, "5.4.6", f"<{recipient}>: Alias loop") from None
        if route.remote and self.queue is None:
            # Forwarding to other domains goes through the outbound queue.
            raise Reply(
                550, "5.4.4", f"<{recipient}>: Forwarding is not enabled"
            ) from None
        return route

    def deliver(
        self, session: Session, envelope: Envelope, message: IO[bytes], size: int
    ) -> defer.Deferred:
        refuse_loops(envelope, message)
        if self.queue is not None and any(
            envelope.routes[r].remote for r in envelope.recipients
        ):
            prefix = received_header(
                session,
                envelope,
                self.hostname,
                self.reactor.seconds(),
                return_path=False,
            )
            prefix += delivered_to(envelope)
            return self.queue.enqueue(
                envelope, message, prefix, queue_recipients(envelope)
            )
        mailboxes = local_mailboxes(envelope)
        prefix = received_header(
            session, envelope, self.hostname, self.reactor.seconds()
        )
        d = self.store.deliver_deferred(
            self.reactor, [str(m) for m in mailboxes], message, prefix
        )

        def delivered(paths):
            for mailbox, path in zip(mailboxes, paths, strict=True):
                log.info(
                    "delivered queue={queue} to=<{rcpt}> size={size} file={file}",
                    queue=envelope.queue_id,
                    rcpt=mailbox,
                    size=size + len(prefix),
                    file=path.name,
                )
            return paths

        def failed(failure):
            log.error(
                "delivery failed queue={queue} to={rcpts}: {why}",
                queue=envelope.queue_id,
                rcpts=",".join(str(m) for m in mailboxes),
                why=failure.getErrorMessage(),
            )
            return failure

        d.addCallbacks(delivered, failed)
        return d


class OutboundQueue:
    """
    The durable queue as the SMTP side sees it: store the message (fsync'ed
    before the 250), then wake the runner so delivery starts at once.
    """

    def __init__(self, spool, runner, reactor) -> None:
        self.spool = spool
        self.runner = runner
        self.reactor = reactor

    def enqueue(
        self,
        envelope: Envelope,
        message: IO[bytes],
        prefix: bytes,
        recipients: list[str],
    ) -> defer.Deferred:
        sender = str(envelope.sender) if envelope.sender is not None else None
        d = self.spool.enqueue_deferred(
            self.reactor, envelope.queue_id, sender, recipients, message, prefix
        )

        def queued(entry):
            log.info(
                "queued queue={queue} from=<{sender}> to={rcpts}",
                queue=envelope.queue_id,
                sender=sender or "",
                rcpts=",".join(recipients),
            )
            self.runner.wake(envelope.queue_id)
            return entry

        return d.addCallback(queued)


@implementer(ISMTPDelivery)
class SubmissionDelivery:
    """
    The submission port's policy (RFC 6409): only authenticated users send;
    the envelope sender must be the user or one of the aliases that lead to
    them (unless configured otherwise); any recipient is accepted, ours
    checked against the users and aliases; and every message goes through
    the durable queue.
    """

    def __init__(
        self,
        router: Router,
        queue: OutboundQueue,
        hostname: str,
        reactor,
        hide_client_ip: bool = False,
        sender_must_match: bool = True,
    ) -> None:
        self.router = router
        self.queue = queue
        self.hostname = hostname
        self.reactor = reactor
        self.hide_client_ip = hide_client_ip
        self.sender_must_match = sender_must_match

    @property
    def default_domain(self) -> str:
        return sorted(self.router.domains)[0]

    def may_send_as(self, user: str, sender) -> bool:
        """Whether C{user} may use C{sender} as envelope sender: their own
        address, or an alias of ours that delivers to them."""
        if sender is None:
            return False
        if str(sender) == user:
            return True
        try:
            route = self.router.resolve(sender)
        except Exception:
            return False
        return user in {str(a) for a in route.local}

    def validateFrom(self, session: Session, envelope: Envelope) -> None:
        user = session.authenticated
        if user is None:
            raise Reply(530, "5.7.0", "Authentication required")
        if self.sender_must_match and not self.may_send_as(user, envelope.sender):
            raise Reply(
                553,
                "5.7.1",
                f"Sender address <{envelope.sender or ''}> not owned by {user}",
            )
        return None

    def validateTo(
        self, session: Session, envelope: Envelope, recipient: MailAddress
    ) -> Route:
        if recipient.is_literal or not self.router.is_local_domain(recipient.domain):
            return Route(remote=(recipient,))
        try:
            return self.router.resolve(recipient)
        except UnknownRecipient:
            raise Reply(550, "5.1.1", f"<{recipient}>: User unknown") from None
        except AliasLoop:
            raise Reply(550, "5.4.6", f"<{recipient}>: Alias loop") from None

    def deliver(
        self, session: Session, envelope: Envelope, message: IO[bytes], size: int
    ) -> defer.Deferred:
        refuse_loops(envelope, message)
        now = self.reactor.seconds()
        prefix = received_header(
            session,
            envelope,
            self.hostname,
            now,
            return_path=False,
            hide_client=self.hide_client_ip,
        )
        prefix += submission_headers(
            header_block(message), envelope.queue_id, self.hostname, now
        )
        return self.queue.enqueue(envelope, message, prefix, queue_recipients(envelope))

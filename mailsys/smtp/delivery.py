"""
The delivery policy of the inbound MX: mail for our users, stored in their
maildirs.

L{LocalDelivery} answers the SMTP server's questions with the L{Router}
(our domains, users, aliases) and stores accepted messages with the one
durable-write path of L{MaildirStore}, off the reactor thread.  Its
C{deliver} fires only when every copy is fsync'ed in C{new/}, and fails
with nothing stored if any copy could not be, so the server's 250 always
means "on disk" and a 451 always means "nothing half-done".
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
) -> bytes:
    """
    The C{Return-Path:} and C{Received:} lines prepended to a message we
    store (RFC 5321 4.4), LF-terminated like the stored message.

    The HELO name is reduced to safe characters: client text must never
    turn into extra header lines or comments.
    """
    helo = _UNSAFE_HEADER_TEXT.sub("?", session.helo or "unknown")
    client = _UNSAFE_HEADER_TEXT.sub("?", session.client_host)
    recipients = envelope.recipients
    for_clause = f"\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
    sender = str(envelope.sender) if envelope.sender is not None else ""
    lines = (
        f"Return-Path: <{sender}>\n"
        f"Received: from {helo} ([{client}])\n"
        f"\tby {hostname} (mailsys) with {session.protocol_name}"
        f" id {envelope.queue_id}{for_clause};\n"
        f"\t{format_datetime(datetime.fromtimestamp(now, timezone.utc))}\n"
    )
    return lines.encode("utf-8")


def local_mailboxes(envelope: Envelope) -> list[MailAddress]:
    """Every local mailbox of the transaction, once, in recipient order."""
    seen: dict[MailAddress, None] = {}
    for recipient in envelope.recipients:
        for mailbox in envelope.routes[recipient].local:
            seen.setdefault(mailbox, None)
    return list(seen)


@implementer(ISMTPDelivery)
class LocalDelivery:
    """
    Accepts mail for our users and aliases; refuses everything else (never
    an open relay: foreign domains, address literals and the C{%}-hack all
    end at L{Router.resolve}).
    """

    def __init__(
        self, router: Router, store: MaildirStore, hostname: str, reactor
    ) -> None:
        self.router = router
        self.store = store
        self.hostname = hostname
        self.reactor = reactor

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
            raise Reply(550, "5.7.1", f"<{recipient}>: Relay access denied")
        except UnknownRecipient:
            raise Reply(550, "5.1.1", f"<{recipient}>: User unknown")
        except AliasLoop:
            raise Reply(550, "5.4.6", f"<{recipient}>: Alias loop")
        if route.remote:
            # Forwarding to other domains goes through the outbound queue.
            raise Reply(550, "5.4.4", f"<{recipient}>: Forwarding is not enabled")
        return route

    def deliver(
        self, session: Session, envelope: Envelope, message: IO[bytes], size: int
    ) -> defer.Deferred:
        mailboxes = local_mailboxes(envelope)
        prefix = received_header(session, envelope, self.hostname, self.reactor.seconds())
        d = self.store.deliver_deferred(
            self.reactor, [str(m) for m in mailboxes], message, prefix
        )

        def delivered(paths):
            for mailbox, path in zip(mailboxes, paths):
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

"""
Delivery of queued mail to our own users: the last hop of the queue.

Submitted mail goes through the queue whatever its destination (as in
Postfix), so that a message to a local user and one to a remote user are
accepted, retried and bounced alike.  L{LocalTransport} is the
L{IOutboundTransport} that stores such a message with the maildir store's
one durable-write path, in a thread, and answers per recipient as a remote
server would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from mailsys.maildir import DeliveryError, MaildirStore
from mailsys.queue.bounce import LOCAL_HOP
from mailsys.queue.interfaces import IOutboundTransport, RecipientResult

_UNSAFE = "".join(chr(c) for c in range(0x20)) + "\x7f<>"


@implementer(IOutboundTransport)
class LocalTransport:
    """
    Stores queued messages in the maildirs of C{store}.

    Each recipient gets its own copy with a C{Return-Path:} (the envelope
    sender, RFC 5321 4.4: added at final delivery) and a C{Delivered-To:}
    (the address it was delivered to, which the loop check looks for when
    an alias or forward brings the message back).  A mailbox that cannot
    exist is a permanent failure; a disk that refuses is a temporary one,
    retried by the queue.

    @param threads: runs the blocking delivery, returning a Deferred; by
        default C{reactor}'s thread pool.
    """

    def __init__(
        self,
        store: MaildirStore,
        reactor,
        threads: Callable[..., Deferred] | None = None,
    ) -> None:
        self.store = store
        if threads is None:

            def threads(f, *args, **kwargs):
                pool = reactor.getThreadPool()
                return deferToThreadPool(reactor, pool, f, *args, **kwargs)

        self._threads = threads

    def send(
        self,
        queue_id: str,
        sender: str | None,
        recipients: Sequence[str],
        message_path: Path,
    ) -> Deferred[list[RecipientResult]]:
        recipients = list(recipients)
        return self._threads(self.deliver, queue_id, sender, recipients, message_path)

    def deliver(
        self,
        queue_id: str,
        sender: str | None,
        recipients: Sequence[str],
        message_path: Path,
    ) -> list[RecipientResult]:
        """L{send}, blocking: one durable maildir delivery per recipient."""
        results = []
        clean_sender = "".join("?" if c in _UNSAFE else c for c in sender or "")
        for address in recipients:
            try:
                self.store.path_for(address)
            except ValueError:
                text = "5.1.3 not a valid local mailbox name"
                results.append(RecipientResult(address, 550, text, LOCAL_HOP))
                continue
            prefix = (
                f"Return-Path: <{clean_sender}>\nDelivered-To: {address.lower()}\n"
            ).encode("utf-8")
            try:
                with open(message_path, "rb") as message:
                    self.store.deliver([address], message, prefix)
            except (DeliveryError, OSError) as e:
                reason = " ".join(str(e).split()) or type(e).__name__
                text = f"4.3.0 cannot store the message: {reason}"
                results.append(RecipientResult(address, 451, text, LOCAL_HOP))
            else:
                text = f"2.0.0 delivered to maildir ({queue_id})"
                results.append(RecipientResult(address, 250, text, LOCAL_HOP))
        return results

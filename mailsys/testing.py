"""
Fakes shipped with mailsys, so tests (ours and a user's) can drive the
protocols without sockets or disks: an in-memory L{ISMTPDelivery} and a
TLS-capable string transport.
"""

from __future__ import annotations

from typing import IO

from twisted.internet import defer
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mailsys.addresses import MailAddress
from mailsys.routing import NotOurDomain, Route, Router, UnknownRecipient
from mailsys.smtp.interfaces import Envelope, ISMTPDelivery, Reply, Session


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """
    A L{StringTransport} that accepts C{startTLS} and records it, so
    STARTTLS can be tested without a handshake.
    """

    tls_started_with = None

    def startTLS(self, contextFactory) -> None:
        self.tls_started_with = contextFactory


@implementer(ISMTPDelivery)
class MemoryDelivery:
    """
    Accepts mail for the users in C{users} of C{domains} and keeps what it
    is given in L{delivered}; C{deliver} returns the Deferred in
    L{pending} when C{hold} is set, so tests control when the "disk"
    finishes.
    """

    def __init__(
        self,
        users: tuple[str, ...] = ("alice@example.test", "bob@example.test"),
        domains: tuple[str, ...] = ("example.test",),
        aliases: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.users = set(users)
        self.router = Router(domains, lambda a: str(a) in self.users, aliases or {})
        self.delivered: list[tuple[Envelope, bytes]] = []
        self.hold = False
        self.fail_with: Exception | None = None
        self.pending: list[defer.Deferred] = []

    @property
    def default_domain(self) -> str:
        return sorted(self.router.domains)[0]

    def validateFrom(self, session: Session, envelope: Envelope) -> None:
        return None

    def validateTo(
        self, session: Session, envelope: Envelope, recipient: MailAddress
    ) -> Route:
        try:
            return self.router.resolve(recipient)
        except NotOurDomain:
            raise Reply(550, "5.7.1", f"<{recipient}>: Relay access denied")
        except UnknownRecipient:
            raise Reply(550, "5.1.1", f"<{recipient}>: User unknown")

    def deliver(
        self, session: Session, envelope: Envelope, message: IO[bytes], size: int
    ) -> defer.Deferred:
        data = message.read()
        if self.fail_with is not None:
            return defer.fail(self.fail_with)
        self.delivered.append((envelope, data))
        if self.hold:
            d: defer.Deferred = defer.Deferred()
            self.pending.append(d)
            return d
        return defer.succeed(None)

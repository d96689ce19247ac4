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

from mailsys.routing import Router
from mailsys.smtp.delivery import LocalDelivery
from mailsys.smtp.interfaces import Envelope, Session


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """
    A L{StringTransport} that accepts C{startTLS} and records it, so
    STARTTLS can be tested without a handshake.
    """

    tls_started_with = None

    def startTLS(self, contextFactory) -> None:
        self.tls_started_with = contextFactory


class MemoryDelivery(LocalDelivery):
    """
    The inbound policy of L{LocalDelivery} (same answers for users,
    aliases and foreign domains) over an in-memory user set, keeping what
    it is given in L{delivered} instead of writing maildirs; C{deliver}
    returns the Deferred in L{pending} when C{hold} is set, so tests control
    when the "disk" finishes.
    """

    def __init__(
        self,
        users: tuple[str, ...] = ("alice@example.test", "bob@example.test"),
        domains: tuple[str, ...] = ("example.test",),
        aliases: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.users = set(users)
        router = Router(domains, lambda a: str(a) in self.users, aliases or {})
        super().__init__(router, store=None, hostname="localhost", reactor=None)
        self.delivered: list[tuple[Envelope, bytes]] = []
        self.hold = False
        self.fail_with: Exception | None = None
        self.pending: list[defer.Deferred] = []

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

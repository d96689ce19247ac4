"""
Fakes shipped with mailsys, so tests (ours and a user's) can drive the
protocols without sockets or disks: an in-memory L{ISMTPDelivery} and a
TLS-capable string transport; and for tests that do use loopback sockets,
a ready configuration, start and settle helpers, and cheap password hashing.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import IO

from argon2 import PasswordHasher
from twisted.internet import defer, task
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mailsys.config import (
    Config,
    ListenSection,
    RelaySection,
    ServerSection,
    TLSSection,
)
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


# argon2 parameters that cost microseconds: tests need users, not the
# protection of the production parameters.
CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)

LOOPBACK_ANY_PORT = "tcp:0:interface=127.0.0.1"


def free_port() -> int:
    """A loopback port free now, for a server that must be told its port
    in advance (a subprocess, or two instances routing to each other)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_config(state: Path, *listeners: str, **sections) -> Config:
    """
    The configuration of a test or benchmark instance: state under
    C{state} (its certificate generated there), C{example.test}, each of
    C{listeners} on a loopback port chosen by the system, and a DNS
    resolver on loopback that nothing should ever ask (give foreign
    domains C{routes}).  C{sections} replace any L{Config} field.
    """
    fields = dict(
        path=None,
        server=ServerSection(hostname="mail.example.test", state_dir=state),
        tls=TLSSection(cert=state / "tls" / "cert.pem", key=state / "tls" / "key.pem"),
        listen=ListenSection(**{name: LOOPBACK_ANY_PORT for name in listeners}),
        domains=("example.test",),
        relay=RelaySection(resolver="127.0.0.1:53"),
    )
    fields.update(sections)
    return Config(**fields)


@defer.inlineCallbacks
def start(system, *names: str):
    """
    Start a L{mailsys.tap.MailSystem} and fire with the bound port number
    of each listener in C{names}, by name.
    """
    system.privilegedStartService()
    system.startService()
    ports = {}
    for name in names:
        port = yield system.getServiceNamed(name).bound()
        ports[name] = port.getHost().port
    return ports


@defer.inlineCallbacks
def settle(reactor, *systems, seconds: float = 10.0):
    """
    Wait until no listener of C{systems} has a connection open (a client
    closed its socket, or the queue said QUIT after its 250), so a test
    ends with a clean reactor.
    """
    for _ in range(int(seconds / 0.02)):
        if not any(
            service.factory.protocols
            for system in systems
            for service in system
            if hasattr(service, "bound")
        ):
            return
        yield task.deferLater(reactor, 0.02, lambda: None)


class RecordsSessionEnds:
    """
    Mixin for a server factory in tests: L{ended} holds one Deferred per
    session, fired once the session's C{connectionLost} has run, so a test
    can wait for the server's own clean-up before it ends.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ended: list[defer.Deferred] = []

    def buildProtocol(self, addr):
        proto = super().buildProtocol(addr)
        ended: defer.Deferred = defer.Deferred()
        self.ended.append(ended)
        lost = proto.connectionLost

        def connectionLost(reason=None):
            lost(reason)
            ended.callback(None)

        proto.connectionLost = connectionLost
        return proto

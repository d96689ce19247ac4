"""
Connection admission for every listener: a cap on concurrent connections in
total and per client address, and TCP_NODELAY on every accepted socket.

Twisted never sets TCP_NODELAY, so each small reply to a pipelining client
waits for the peer's delayed ACK (~40 ms on Linux).  And without a cap, one
client can open connections until we run out of file descriptors.  Both
belong to every protocol alike, so they live in one wrapping factory here
instead of in each protocol.
"""

from __future__ import annotations

import ipaddress
from collections import Counter

from OpenSSL import SSL
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from mailsys.metrics import SILENT

log = Logger(namespace="mailsys.connections")


class _Refusal(Protocol):
    """Says why the connection is refused (a protocol-specific line) and closes."""

    def __init__(self, message: bytes) -> None:
        self.message = message

    def connectionMade(self) -> None:
        if self.message:
            self.transport.write(self.message)
        self.transport.loseConnection()


class _Counted(ProtocolWrapper):
    def makeConnection(self, transport) -> None:
        set_no_delay(transport)
        super().makeConnection(transport)


def set_no_delay(transport) -> None:
    """Set TCP_NODELAY where the transport is TCP (directly or under TLS)."""
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        try:
            setter(True)
        except OSError:
            pass


def is_loopback(host: str) -> bool:
    """
    Whether C{host} (a client's address as text) is 127.0.0.0/8 or ::1,
    also as an IPv4-mapped address: the only clients that may send a
    password before TLS, and only when the configuration allows it.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def tls_failure(reason) -> str:
    """
    Why a connection ended, when it ended in a failed TLS handshake or a
    broken TLS record (a client speaking clear text to an implicit-TLS port,
    an old protocol version, a scanner); C{""} otherwise.  Protocols add it
    to their disconnect log line, so the operator sees why, not a traceback.
    """
    if reason is None or not reason.check(SSL.Error):
        return ""
    return " TLS failed: " + " ".join(str(reason.value).split())[:200]


def _client_host(addr) -> str:
    return getattr(addr, "host", str(addr))


class ConnectionLimits(WrappingFactory):
    """
    Wraps a listener's factory, refusing connections over the limits.

    @param refusal: what to send a refused client before closing, such as
        C{b"421 4.7.0 Too many connections\\r\\n"} for SMTP.  Empty for
        implicit-TLS listeners (there is no plain-text channel to speak on).
    """

    noisy = False  # our own connect/disconnect lines say more

    protocol = _Counted

    def __init__(
        self,
        wrappedFactory,
        max_connections: int,
        max_per_client: int,
        refusal: bytes = b"",
        service: str = "",
        metrics=SILENT,
    ) -> None:
        super().__init__(wrappedFactory)
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.refusal = refusal
        self.service = service
        self.metrics = metrics  # this listener's L{mailsys.metrics.ServiceMetrics}
        self.per_client: Counter[str] = Counter()

    def buildProtocol(self, addr):
        host = _client_host(addr)
        if len(self.protocols) >= self.max_connections:
            why = "total"
        elif self.per_client[host] >= self.max_per_client:
            why = "per client"
        else:
            self.per_client[host] += 1
            protocol = super().buildProtocol(addr)
            if protocol is None:
                self._release(host)
            else:
                self.metrics.connection_opened()
            return protocol
        log.warn(
            "{service}: refused connection from {client}: {why} connection limit",
            service=self.service,
            client=host,
            why=why,
        )
        self.metrics.connection_refused()
        return _Refusal(self.refusal)

    def unregisterProtocol(self, p) -> None:
        super().unregisterProtocol(p)
        self.metrics.connection_closed()
        self._release(_client_host(p.getPeer()))

    def _release(self, host: str) -> None:
        self.per_client[host] -= 1
        if self.per_client[host] <= 0:
            del self.per_client[host]

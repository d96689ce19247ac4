"""
Tests for L{mailsys.connections}: connection caps and TCP_NODELAY.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mailsys.connections import ConnectionLimits

REFUSAL = b"421 4.7.0 Too many connections, try again later\r\n"


class NoDelayTransport(StringTransport):
    nodelay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled


def addr(host: str, port: int = 1234) -> IPv4Address:
    return IPv4Address("TCP", host, port)


class ConnectionLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.limits = ConnectionLimits(
            Factory.forProtocol(Protocol), max_connections=3, max_per_client=2,
            refusal=REFUSAL, service="smtp",
        )
        self.limits.doStart()

    def connect(self, host: str):
        transport = NoDelayTransport(peerAddress=addr(host))
        protocol = self.limits.buildProtocol(addr(host))
        protocol.makeConnection(transport)
        return protocol, transport

    def test_nodelay(self):
        """Every accepted connection gets TCP_NODELAY, so pipelined replies
        are not held back by delayed ACKs."""
        _, transport = self.connect("192.0.2.1")
        self.assertTrue(transport.nodelay)

    def test_per_client_limit(self):
        """A client's third connection is told why and closed; another
        client still gets in; a slot frees when a connection ends."""
        first, _ = self.connect("192.0.2.1")
        self.connect("192.0.2.1")
        _, refused = self.connect("192.0.2.1")
        self.assertEqual(refused.value(), REFUSAL)
        self.assertTrue(refused.disconnecting)
        _, other = self.connect("192.0.2.2")
        self.assertFalse(other.disconnecting)
        first.connectionLost(None)
        _, again = self.connect("192.0.2.1")
        self.assertFalse(again.disconnecting)

    def test_total_limit(self):
        """Past the total cap, everyone is refused until a slot frees."""
        conns = [self.connect(f"192.0.2.{i}") for i in range(3)]
        _, refused = self.connect("192.0.2.99")
        self.assertEqual(refused.value(), REFUSAL)
        conns[0][0].connectionLost(None)
        _, ok = self.connect("192.0.2.99")
        self.assertFalse(ok.disconnecting)
        self.assertEqual(ok.value(), b"")

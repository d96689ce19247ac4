"""
The SMTP server against hostile clients: a table of named attacks, and
random byte streams that must never produce a traceback, a reply without a
code, or a delivery without a real end of data.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailsys.config import LimitsSection
from mailsys.smtp.server import ESMTPServerFactory
from mailsys.testing import MemoryDelivery, TLSStringTransport

CLIENT = IPv4Address("TCP", "192.0.2.66", 4444)
HEAD = b"EHLO evil\r\nMAIL FROM:<a@evil.example>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
REPLY = re.compile(rb"\A\d{3}[ -]")

# (name, what the client sends, what must hold afterwards)
ATTACKS = [
    (
        "CVE-2023-51764 smuggling with <LF>.<LF>",
        HEAD + b"a\n.\nMAIL FROM:<ceo@example.test>\r\n.\r\n",
        {"delivered": 1, "replies_after_data": 1},
    ),
    (
        "CVE-2023-51766 smuggling with <LF>.<CR><LF>",
        HEAD + b"a\n.\r\nMAIL FROM:<ceo@example.test>\r\n.\r\n",
        {"delivered": 1, "replies_after_data": 1},
    ),
    (
        "smuggling with <CR>.<CR> (bare CR)",
        HEAD + b"a\r.\rMAIL FROM:<ceo@example.test>\r\n.\r\n",
        {"delivered": 0, "replies_after_data": 1},
    ),
    (
        "CVE-2011-0411 STARTTLS command injection",
        b"EHLO evil\r\nSTARTTLS\r\nMAIL FROM:<a@evil.example>\r\n",
        {"delivered": 0, "last": b"220 2.0.0 Ready to start TLS"},
    ),
    (
        "header injection through HELO",
        b"EHLO evil\nReceived: forged\r\n",
        {"contains": b"500 5.5.2 Bare CR or LF in command, use CRLF", "helo": None},
    ),
    (
        "open relay through the %-hack",
        b"EHLO evil\r\nMAIL FROM:<>\r\nRCPT TO:<victim%elsewhere.example@example.test>\r\n",
        {"last_code": b"550"},
    ),
    (
        "open relay through a source route",
        b"EHLO evil\r\nMAIL FROM:<>\r\nRCPT TO:<@example.test:victim@elsewhere.example>\r\n",
        {"last": b"550 5.7.1 <victim@elsewhere.example>: Relay access denied"},
    ),
    (
        "directory traversal in the recipient",
        b"EHLO evil\r\nMAIL FROM:<>\r\nRCPT TO:<../../etc/passwd@example.test>\r\n",
        {"last_code": b"553"},
    ),
    (
        "NUL bytes in a command",
        b"EHLO evil\x00\r\nNOOP\r\n",
        {"last": b"250 2.0.0 OK"},
    ),
    (
        "memory exhaustion with an endless line",
        b"x" * 200000,
        {"buffered_below": 1024},
    ),
]


class HostileClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.delivery = MemoryDelivery()
        self.factory = ESMTPServerFactory(
            self.delivery, "mx.example.test", LimitsSection(), Clock(), tls=object()
        )

    def run_session(self, data: bytes):
        proto = self.factory.buildProtocol(CLIENT)
        transport = TLSStringTransport(peerAddress=CLIENT)
        proto.makeConnection(transport)
        proto.dataReceived(data)
        return proto, [line for line in transport.value().split(b"\r\n") if line]

    def test_attacks(self):
        """Each named attack in the table fails the way it should."""
        for name, data, expect in ATTACKS:
            self.delivery.delivered.clear()
            proto, lines = self.run_session(data)
            finals = [line for line in lines if line[3:4] == b" "]
            if "delivered" in expect:
                self.assertEqual(len(self.delivery.delivered), expect["delivered"], name)
            if "replies_after_data" in expect:
                codes = [line[:3] for line in finals]
                after = codes[codes.index(b"354") + 1 :]
                self.assertEqual(len(after), expect["replies_after_data"], name)
            if "last" in expect:
                self.assertEqual(finals[-1], expect["last"], name)
            if "contains" in expect:
                self.assertIn(expect["contains"], finals, name)
            if "helo" in expect:
                self.assertEqual(proto.session.helo, expect["helo"], name)
            if "last_code" in expect:
                self.assertEqual(finals[-1][:3], expect["last_code"], name)
            if "buffered_below" in expect:
                self.assertLess(proto._framer.buffered, expect["buffered_below"], name)


VOCABULARY = [
    b"EHLO x\r\n", b"HELO x\r\n", b"MAIL FROM:<a@b.example>\r\n", b"MAIL FROM:<>\r\n",
    b"RCPT TO:<alice@example.test>\r\n", b"RCPT TO:<x@y.example>\r\n", b"DATA\r\n",
    b".\r\n", b"\r\n", b"\n", b"\r", b".\n", b"RSET\r\n", b"NOOP\r\n", b"STARTTLS\r\n",
    b"AUTH PLAIN AHgAeQ==\r\n", b"VRFY x\r\n", b"BDAT 10\r\n", b"\x00", b"\xff",
    b"MAIL FROM:<a@b.example> SIZE=99999999999\r\n", b"line\r\n", b"..dot\r\n",
]


class FuzzTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.lists(st.one_of(st.sampled_from(VOCABULARY), st.binary(max_size=40)), max_size=40),
        st.integers(min_value=1, max_value=64),
    )
    def test_random_streams(self, pieces, chunk):
        """Any byte stream, in any chunking: no traceback, every reply line
        starts with a code, and a message is stored only after a
        <CRLF>.<CRLF> the client really sent."""
        delivery = MemoryDelivery()
        factory = ESMTPServerFactory(delivery, "mx.example.test", LimitsSection(), Clock(), tls=object())
        proto = factory.buildProtocol(CLIENT)
        transport = TLSStringTransport(peerAddress=CLIENT)
        proto.makeConnection(transport)
        data = b"".join(pieces)
        for i in range(0, len(data), chunk):
            proto.dataReceived(data[i : i + chunk])
        for line in transport.value().split(b"\r\n"):
            if line:
                self.assertRegex(line, REPLY)
        if delivery.delivered:
            self.assertIn(b"\r\n.\r\n", b"\r\n" + data)
        self.assertEqual(self.flushLoggedErrors(), [])

"""
Protocol units for the ESMTP server, on a string transport with a fake
clock and an in-memory delivery: every reply the issue names, and the same
conversations fed whole and split at every byte boundary.
"""

from __future__ import annotations

import re

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailsys.config import LimitsSection
from mailsys.smtp.interfaces import ISMTPDelivery
from mailsys.smtp.server import ESMTPServerFactory
from mailsys.testing import MemoryDelivery, TLSStringTransport

CLIENT = IPv4Address("TCP", "192.0.2.7", 40000)

# A whole session whose every reply is known.
TRANSACTION = (
    b"EHLO client.example\r\n"
    b"MAIL FROM:<sender@remote.example>\r\n"
    b"RCPT TO:<alice@example.test>\r\n"
    b"DATA\r\n"
    b"Subject: hi\r\n"
    b"\r\n"
    b"..leading dot\r\n"
    b"body\r\n"
    b".\r\n"
    b"QUIT\r\n"
)


def replies(data: bytes) -> list[bytes]:
    """The reply lines written to the client."""
    return [line for line in data.split(b"\r\n") if line]


def codes(data: bytes) -> list[bytes]:
    """The final line of every reply, reduced to its code."""
    return [line[:3] for line in replies(data) if line[3:4] == b" "]


class ServerTestMixin:
    """Builds a session on a fake transport with a fake clock."""

    limits = LimitsSection()
    tls = object()

    def setUp(self) -> None:
        self.clock = Clock()
        self.delivery = MemoryDelivery()
        self.factory = ESMTPServerFactory(
            self.delivery, "mx.example.test", self.limits, self.clock, tls=self.tls
        )

    def connect(self):
        proto = self.factory.buildProtocol(CLIENT)
        transport = TLSStringTransport(peerAddress=CLIENT)
        proto.makeConnection(transport)
        return proto, transport

    def converse(self, data: bytes, chunks: list[bytes] | None = None):
        """Feed C{data} (or C{chunks}) to a new session; return the output."""
        proto, transport = self.connect()
        for chunk in chunks if chunks is not None else [data]:
            proto.dataReceived(chunk)
        return transport.value(), proto, transport


class TransactionTests(ServerTestMixin, SynchronousTestCase):
    def test_delivery_interface(self):
        """The in-memory delivery used below honours the real interface."""
        self.assertTrue(verifyObject(ISMTPDelivery, self.delivery))

    def test_greeting(self):
        """The greeting names the host and says ESMTP."""
        out, _, _ = self.converse(b"")
        self.assertEqual(out, b"220 mx.example.test ESMTP mailsys\r\n")

    def test_ehlo_extensions(self):
        """EHLO advertises SIZE with the limit, PIPELINING, 8BITMIME,
        ENHANCEDSTATUSCODES and STARTTLS."""
        out, _, _ = self.converse(b"EHLO client.example\r\n")
        lines = replies(out)[1:]
        self.assertEqual(lines[0], b"250-mx.example.test Hello 192.0.2.7")
        self.assertEqual(
            [line[4:] for line in lines[1:]],
            [
                b"SIZE %d" % self.limits.max_message_size,
                b"PIPELINING",
                b"8BITMIME",
                b"ENHANCEDSTATUSCODES",
                b"STARTTLS",
            ],
        )
        self.assertTrue(lines[-1].startswith(b"250 "))

    def test_no_starttls_without_tls(self):
        """A listener without a certificate does not offer STARTTLS."""
        self.factory.tls = None
        out, _, _ = self.converse(b"EHLO c\r\nSTARTTLS\r\n")
        self.assertNotIn(b"250-STARTTLS", out)
        self.assertNotIn(b"250 STARTTLS", out)
        self.assertTrue(out.endswith(b"502 5.5.1 STARTTLS not available\r\n"))

    def test_transaction(self):
        """A message is accepted with 250 and the queue id, stored
        dot-unstuffed with LF line endings."""
        out, _, _ = self.converse(TRANSACTION)
        self.assertEqual(
            codes(out), [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]
        )
        [(envelope, data)] = self.delivery.delivered
        self.assertEqual(data, b"Subject: hi\n\n.leading dot\nbody\n")
        self.assertIn(
            b"250 2.0.0 Ok: queued as " + envelope.queue_id.encode(), out
        )
        self.assertEqual(str(envelope.sender), "sender@remote.example")
        self.assertEqual([str(r) for r in envelope.recipients], ["alice@example.test"])

    def test_every_reply_has_enhanced_code(self):
        """Every 2xx, 4xx and 5xx reply but the greeting and EHLO carries an
        RFC 3463 enhanced status code."""
        session = TRANSACTION.replace(
            b"QUIT\r\n",
            b"NOOP\r\nRSET\r\nVRFY alice\r\nEXPN list\r\nHELP\r\nFOO\r\n"
            b"MAIL FROM:<a@b.example> FOO=1\r\nRCPT TO:<x@example.test>\r\n"
            b"DATA\r\nMAIL FROM:<bad\r\nQUIT\r\n",
        )
        out, _, _ = self.converse(session)
        lines = replies(out)
        for line in lines:
            if line.startswith((b"220 ", b"354 ")) or line.startswith(b"250-"):
                continue
            if line.startswith(b"250 mx.example.test Hello") or line == b"250 STARTTLS":
                continue
            self.assertRegex(line, rb"^[245]\d\d [245]\.\d{1,3}\.\d{1,3} ")

    def test_helo_required_before_mail(self):
        """MAIL before HELO/EHLO is refused with 503 5.5.1."""
        out, _, _ = self.converse(b"MAIL FROM:<a@b.example>\r\n")
        self.assertTrue(out.endswith(b"503 5.5.1 Send EHLO/HELO first\r\n"))

    def test_helo_plain(self):
        """HELO gets a one-line 250 without extensions."""
        out, _, _ = self.converse(b"HELO client\r\n")
        self.assertEqual(replies(out)[1], b"250 mx.example.test Hello 192.0.2.7")

    def test_helo_argument_required(self):
        """EHLO without a name is a syntax error."""
        out, _, _ = self.converse(b"EHLO\r\n")
        self.assertIn(b"501 5.5.4", out)

    def test_rcpt_before_mail(self):
        """RCPT without MAIL is a bad sequence."""
        out, _, _ = self.converse(b"EHLO c\r\nRCPT TO:<alice@example.test>\r\n")
        self.assertTrue(out.endswith(b"503 5.5.1 Need MAIL before RCPT\r\n"))

    def test_data_without_recipients(self):
        """DATA after MAIL but without an accepted recipient is refused."""
        out, _, _ = self.converse(
            b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<nobody@example.test>\r\nDATA\r\n"
        )
        self.assertTrue(out.endswith(b"554 5.5.1 No valid recipients\r\n"))

    def test_nested_mail(self):
        """A second MAIL in one transaction is refused."""
        out, _, _ = self.converse(b"EHLO c\r\nMAIL FROM:<>\r\nMAIL FROM:<>\r\n")
        self.assertTrue(out.endswith(b"503 5.5.1 Nested MAIL command\r\n"))

    def test_null_sender(self):
        """The null reverse path (bounces) is accepted."""
        out, _, _ = self.converse(TRANSACTION.replace(b"<sender@remote.example>", b"<>"))
        self.assertIn(b"250 2.0.0 Ok: queued as", out)
        self.assertIsNone(self.delivery.delivered[0][0].sender)

    def test_rset_clears_transaction(self):
        """After RSET, RCPT needs a new MAIL."""
        out, _, _ = self.converse(
            b"EHLO c\r\nMAIL FROM:<>\r\nRSET\r\nRCPT TO:<alice@example.test>\r\n"
        )
        self.assertTrue(out.endswith(b"503 5.5.1 Need MAIL before RCPT\r\n"))

    def test_duplicate_recipient_delivered_once(self):
        """The same recipient twice is accepted and stored once."""
        out, _, _ = self.converse(
            TRANSACTION.replace(
                b"RCPT TO:<alice@example.test>\r\n",
                b"RCPT TO:<alice@example.test>\r\nRCPT TO:<ALICE@example.test>\r\n",
            )
        )
        self.assertEqual(len(self.delivery.delivered[0][0].recipients), 1)

    def test_postmaster_without_domain(self):
        """RCPT TO:<postmaster> means postmaster of our domain (RFC 5321 4.5.1)."""
        self.delivery.users.add("postmaster@example.test")
        out, _, _ = self.converse(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\n")
        self.assertTrue(out.endswith(b"250 2.1.5 Recipient OK\r\n"))

    def test_esmtp_parameters(self):
        """SIZE and BODY=8BITMIME are accepted; unknown parameters get 555."""
        out, _, _ = self.converse(
            b"EHLO c\r\nMAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME\r\n"
            b"RCPT TO:<alice@example.test> NOTIFY=NEVER\r\n"
        )
        self.assertEqual(codes(out)[-2:], [b"250", b"555"])
        out, _, _ = self.converse(b"EHLO c\r\nMAIL FROM:<a@b.example> BODY=BINARYMIME\r\n")
        self.assertTrue(out.endswith(b"501 5.5.4 Bad BODY parameter\r\n"))

    def test_mail_syntax(self):
        """MAIL without angle brackets or with junk after them is a syntax error."""
        for bad in (b"MAIL FROM:a@b.example", b"MAIL FROM<a@b.example>", b"MAIL TO:<a@b>"):
            out, _, _ = self.converse(b"EHLO c\r\n" + bad + b"\r\n")
            self.assertTrue(out.endswith(b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"), bad)

    def test_bad_sender_address(self):
        """A malformed sender address gets 553 5.1.7."""
        out, _, _ = self.converse(b"EHLO c\r\nMAIL FROM:<a@@b>\r\n")
        self.assertIn(b"553 5.1.7", out)

    def test_8bit_message_kept_exactly(self):
        """8-bit message bytes (and invalid UTF-8) are stored exactly."""
        body = "Grüße\r\n".encode() + b"\xff\xfe raw\r\n"
        self.converse(TRANSACTION.replace(b"body\r\n", body))
        self.assertIn("Grüße\n".encode() + b"\xff\xfe raw\n", self.delivery.delivered[0][1])


class RecipientPolicyTests(ServerTestMixin, SynchronousTestCase):
    """Never an open relay: only our users and aliases are recipients."""

    def rcpt(self, address: bytes) -> bytes:
        out, _, _ = self.converse(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:" + address + b"\r\n")
        return replies(out)[-1]

    def test_unknown_user(self):
        """An unknown user of our domain gets 550 5.1.1."""
        self.assertEqual(
            self.rcpt(b"<carol@example.test>"),
            b"550 5.1.1 <carol@example.test>: User unknown",
        )

    def test_foreign_domain(self):
        """A foreign domain gets 550 5.7.1: no relaying."""
        self.assertEqual(
            self.rcpt(b"<victim@elsewhere.example>"),
            b"550 5.7.1 <victim@elsewhere.example>: Relay access denied",
        )

    def test_relay_tricks(self):
        """The classic relay-test addresses are all refused."""
        tricks = [
            b"<victim%elsewhere.example@example.test>",  # %-hack
            b"<@example.test:victim@elsewhere.example>",  # source route
            b'<"victim@elsewhere.example"@example.test>',  # quoted local part
            b"<victim@[192.0.2.1]>",  # address literal
            b"<victim@[IPv6:2001:db8::1]>",
            b"<victim@elsewhere.example.>",
            b"<victim!elsewhere.example@example.test>",  # bang path
            b"<alice@example.test@elsewhere.example>",
        ]
        for trick in tricks:
            line = self.rcpt(trick)
            self.assertRegex(line, rb"^5\d\d 5\.", trick)

    def test_case_insensitive(self):
        """Addresses match users whatever their case."""
        self.assertEqual(self.rcpt(b"<Alice@EXAMPLE.test>"), b"250 2.1.5 Recipient OK")

    def test_alias(self):
        """An alias of our domain is a valid recipient."""
        self.delivery = MemoryDelivery(aliases={"info@example.test": ("alice@example.test",)})
        self.factory.delivery = self.delivery
        self.assertEqual(self.rcpt(b"<info@example.test>"), b"250 2.1.5 Recipient OK")

    def test_hundred_recipients_then_452(self):
        """100 recipients are accepted (RFC 5321 4.5.3.1.8), the 101st gets
        452 4.5.3."""
        self.delivery.users.update(f"u{i}@example.test" for i in range(101))
        session = b"EHLO c\r\nMAIL FROM:<>\r\n" + b"".join(
            b"RCPT TO:<u%d@example.test>\r\n" % i for i in range(101)
        )
        out, _, _ = self.converse(session)
        lines = replies(out)
        self.assertEqual(lines[-2], b"250 2.1.5 Recipient OK")
        self.assertEqual(lines[-1], b"452 4.5.3 Too many recipients")
        self.assertEqual(sum(1 for line in lines if line.startswith(b"250 2.1.5")), 100)


class LimitTests(ServerTestMixin, SynchronousTestCase):
    limits = LimitsSection(max_message_size=1000, max_errors=10)

    def test_size_at_mail_from(self):
        """SIZE= above the limit is refused at MAIL FROM with 552 5.3.4;
        at the limit it is accepted."""
        out, _, _ = self.converse(b"EHLO c\r\nMAIL FROM:<a@b.example> SIZE=1000\r\n")
        self.assertTrue(out.endswith(b"250 2.1.0 Sender OK\r\n"))
        out, _, _ = self.converse(b"EHLO c\r\nMAIL FROM:<a@b.example> SIZE=1001\r\n")
        self.assertTrue(
            out.endswith(b"552 5.3.4 Message size exceeds fixed limit of 1000\r\n")
        )

    def test_size_during_data(self):
        """A message growing past the limit gets 552 5.3.4 at the end of
        DATA, is not delivered, and is not kept in memory."""
        head = b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
        out, proto, _ = self.converse(head + b"x" * 600 + b"\r\n" + b"y" * 600 + b"\r\n")
        self.assertIsNone(proto.message._file)  # dropped as soon as it was too big
        proto.dataReceived(b".\r\n")
        out = proto.transport.value()
        self.assertTrue(out.endswith(b"552 5.3.4 Message exceeds the size limit of 1000\r\n"))
        self.assertEqual(self.delivery.delivered, [])

    def test_size_exactly_at_limit(self):
        """A message of exactly the limit (LF-counted) is accepted."""
        head = b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
        out, _, _ = self.converse(head + (b"x" * 99 + b"\r\n") * 10 + b".\r\n")
        self.assertIn(b"250 2.0.0", out)
        out, _, _ = self.converse(head + (b"x" * 99 + b"\r\n") * 10 + b"x\r\n.\r\n")
        self.assertIn(b"552 5.3.4", out)

    def test_command_line_512(self):
        """A command line of 512 octets with CRLF is read; 513 gets
        500 5.5.2 and the session continues (RFC 5321 4.5.3.1.4)."""
        ok = b"NOOP " + b"x" * (512 - 2 - 5) + b"\r\n"
        self.assertEqual(len(ok), 512)
        too_long = ok[:5] + b"x" + ok[5:]
        out, _, _ = self.converse(ok + too_long + b"NOOP\r\n")
        self.assertEqual(
            replies(out)[1:],
            [b"250 2.0.0 OK", b"500 5.5.2 Line too long", b"250 2.0.0 OK"],
        )

    def test_overlong_line_not_buffered(self):
        """A client that never sends a newline cannot make us buffer it."""
        proto, transport = self.connect()
        for _ in range(100):
            proto.dataReceived(b"x" * 10000)
        self.assertLess(proto._framer.buffered, 1024)
        proto.dataReceived(b"\r\nNOOP\r\n")
        self.assertEqual(replies(transport.value())[1:], [b"500 5.5.2 Line too long", b"250 2.0.0 OK"])

    def test_text_line_1000(self):
        """A text line of 1000 octets with CRLF is stored; 1001 makes the
        message refused with 554 5.6.0 (RFC 5321 4.5.3.1.6)."""
        self.limits = LimitsSection(max_message_size=10000)
        self.setUp()
        head = b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
        out, _, _ = self.converse(head + b"a" * 998 + b"\r\n.\r\n")
        self.assertIn(b"250 2.0.0", out)
        out, _, _ = self.converse(head + b"a" * 999 + b"\r\n.\r\n")
        self.assertTrue(out.endswith(b"554 5.6.0 Message has a line longer than 998 characters\r\n"))

    def test_garbage_and_nul(self):
        """Garbage and NUL bytes get 500 and the session continues."""
        out, _, _ = self.converse(b"\x00\x01\x02\r\nNO\x00OP\r\n\xff\xfe\r\nNOOP\r\n")
        self.assertEqual(
            codes(out), [b"220", b"500", b"500", b"500", b"250"]
        )

    def test_ten_errors_close(self):
        """After 10 errors the server says 421 and closes."""
        out, proto, transport = self.converse(b"BOGUS\r\n" * 12)
        lines = replies(out)
        self.assertEqual(lines.count(b"500 5.5.2 Command unrecognized"), 10)
        self.assertEqual(lines[-1], b"421 4.7.0 Too many errors, closing connection")
        self.assertTrue(transport.disconnecting)

    def test_command_timeout(self):
        """An idle client gets 421 4.4.2 after the command timeout."""
        proto, transport = self.connect()
        self.clock.advance(self.limits.command_timeout - 1)
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(b"NOOP\r\n")
        self.clock.advance(self.limits.command_timeout - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(transport.value().endswith(
            b"421 4.4.2 mx.example.test Timeout, closing connection\r\n"))
        self.assertTrue(transport.disconnecting)

    def test_partial_line_does_not_reset_timeout(self):
        """Dribbling bytes without a newline does not keep a session alive."""
        proto, transport = self.connect()
        for _ in range(10):
            self.clock.advance(self.limits.command_timeout / 5)
            if transport.disconnecting:
                break
            proto.dataReceived(b"N")
        self.assertTrue(transport.disconnecting)

    def test_data_timeout(self):
        """A client that stops sending in DATA gets 421 after the DATA timeout."""
        out, proto, transport = self.converse(
            b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\npart"
        )
        self.clock.advance(self.limits.data_timeout + 1)
        self.assertIn(b"421 4.4.2", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.delivery.delivered, [])


class OrderingTests(ServerTestMixin, SynchronousTestCase):
    def test_reply_waits_for_disk(self):
        """The 250 after DATA is sent only when the delivery has fired, and
        pipelined commands behind it wait their turn (RFC 2920)."""
        self.delivery.hold = True
        out, proto, transport = self.converse(TRANSACTION + b"NOOP\r\n")
        self.assertEqual(codes(out)[-1], b"354")
        self.assertFalse(transport.disconnecting)
        self.delivery.pending[0].callback(None)
        self.assertEqual(codes(transport.value())[-3:], [b"354", b"250", b"221"])

    def test_pipelined_quit_after_data(self):
        """QUIT pipelined behind the message does not close before the 250."""
        self.delivery.hold = True
        out, proto, transport = self.converse(TRANSACTION)
        self.assertFalse(transport.disconnecting)
        self.delivery.pending[0].callback(None)
        self.assertEqual(codes(transport.value())[-2:], [b"250", b"221"])
        self.assertTrue(transport.disconnecting)

    def test_delivery_failure_is_451(self):
        """A failed delivery is a 451 4.3.0, so the client keeps the message."""
        self.delivery.fail_with = OSError(28, "No space left on device")
        out, _, _ = self.converse(TRANSACTION)
        self.assertIn(b"451 4.3.0 Could not store the message, try again later", out)
        self.flushLoggedErrors()

    def test_pipelining_fed_in_every_split(self):
        """The whole transaction gives the same replies and stored message
        whether it arrives in one piece, split in two at every byte
        boundary, or one byte at a time."""
        expected, _, _ = self.converse(TRANSACTION)
        expected_data = self.delivery.delivered[-1][1]
        mask = re.compile(rb"queued as [A-Z0-9]+")

        def normal(out):
            return mask.sub(b"queued as X", out)

        for i in range(1, len(TRANSACTION)):
            out, _, _ = self.converse(
                b"", chunks=[TRANSACTION[:i], TRANSACTION[i:]]
            )
            self.assertEqual(normal(out), normal(expected), i)
            self.assertEqual(self.delivery.delivered[-1][1], expected_data)
        out, _, _ = self.converse(
            b"", chunks=[TRANSACTION[i : i + 1] for i in range(len(TRANSACTION))]
        )
        self.assertEqual(normal(out), normal(expected))


class TLSTests(ServerTestMixin, SynchronousTestCase):
    def test_starttls_starts_tls(self):
        """STARTTLS answers 220 2.0.0 and starts TLS with our context."""
        out, proto, transport = self.converse(b"EHLO c\r\nSTARTTLS\r\n")
        self.assertTrue(out.endswith(b"220 2.0.0 Ready to start TLS\r\n"))
        self.assertIs(transport.tls_started_with, self.tls)

    def test_starttls_needs_ehlo(self):
        """STARTTLS before EHLO is a bad sequence."""
        out, _, transport = self.converse(b"STARTTLS\r\n")
        self.assertIn(b"503 5.5.1", out)
        self.assertIsNone(transport.tls_started_with)

    def test_starttls_command_injection(self):
        """Commands pipelined behind STARTTLS in clear text are discarded,
        never run as if they came over TLS (CVE-2011-0411, RFC 3207 4.2)."""
        for split in (None, 0):
            proto, transport = self.connect()
            data = (
                b"EHLO c\r\nSTARTTLS\r\n"
                b"MAIL FROM:<attacker@evil.example>\r\nRCPT TO:<alice@example.test>\r\n"
            )
            proto.dataReceived(data)
            self.assertTrue(transport.value().endswith(b"220 2.0.0 Ready to start TLS\r\n"))
            transport.clear()
            # After the handshake, the session starts over: no EHLO, no MAIL.
            proto.dataReceived(b"RCPT TO:<alice@example.test>\r\n")
            self.assertEqual(transport.value(), b"503 5.5.1 Need MAIL before RCPT\r\n")
            transport.clear()
            proto.dataReceived(b"MAIL FROM:<a@b.example>\r\n")
            self.assertEqual(transport.value(), b"503 5.5.1 Send EHLO/HELO first\r\n")

    def test_starttls_resets_session(self):
        """After STARTTLS the EHLO reply no longer offers STARTTLS, and a
        second STARTTLS is refused."""
        out, proto, transport = self.converse(b"EHLO c\r\nSTARTTLS\r\n")
        transport.clear()
        proto.dataReceived(b"EHLO c\r\nSTARTTLS\r\n")
        out = transport.value()
        self.assertNotIn(b"250-STARTTLS", out)
        self.assertNotIn(b"250 STARTTLS", out)
        self.assertTrue(out.endswith(b"503 5.5.1 TLS already active\r\n"))
        self.assertEqual(proto.session.protocol_name, "ESMTPS")

    def test_starttls_with_parameter(self):
        """STARTTLS takes no parameters."""
        out, _, transport = self.converse(b"EHLO c\r\nSTARTTLS now\r\n")
        self.assertTrue(out.endswith(b"501 5.5.4 STARTTLS takes no parameters\r\n"))
        self.assertIsNone(transport.tls_started_with)


class SmugglingTests(ServerTestMixin, SynchronousTestCase):
    """Only <CRLF>.<CRLF> ends DATA (CVE-2023-51764/51766 class)."""

    head = b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
    smuggled = (
        b"MAIL FROM:<ceo@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nforged\r\n"
    )

    def test_fake_ends_of_data(self):
        """Each fake end-of-data sequence stays inside the message: one
        message is stored and nothing behind it runs as a command."""
        for fake in (b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n"):
            self.delivery.delivered.clear()
            out, _, _ = self.converse(
                self.head + b"Subject: real\r\n\r\nbody" + fake + self.smuggled + b".\r\n"
            )
            after_data = codes(out)[codes(out).index(b"354") + 1 :]
            self.assertEqual(len(after_data), 1, fake)
            self.assertIn(after_data[0], (b"250", b"550"), fake)
            if after_data[0] == b"250":
                [(_, stored)] = self.delivery.delivered
                self.assertIn(b"forged", stored)
            else:
                # A bare CR: refused whole, after the real end of data.
                self.assertIn(b"550 5.6.0 Message contains a bare CR", out)
                self.assertEqual(self.delivery.delivered, [])

    def test_bare_lf_normalized(self):
        """A bare LF line ending in DATA is read as a line end and stored as
        LF; the message is accepted."""
        out, _, _ = self.converse(self.head + b"Subject: x\n\nline one\nline two\r\n.\r\n")
        self.assertIn(b"250 2.0.0", out)
        self.assertEqual(self.delivery.delivered[0][1], b"Subject: x\n\nline one\nline two\n")

    def test_bare_lf_dot_is_content(self):
        """<LF>.<LF> is stored as a line holding a dot, not taken as the end."""
        out, _, _ = self.converse(self.head + b"a\n.\nb\r\n.\r\n")
        self.assertEqual(self.delivery.delivered[0][1], b"a\n\nb\n")

    def test_bare_cr_refused(self):
        """A bare CR in DATA makes the message refused with 550 5.6.0 after
        the real end of data; the session stays in step."""
        out, _, _ = self.converse(self.head + b"a\rb\r\n.\r\nNOOP\r\n")
        self.assertEqual(
            replies(out)[-2:], [b"550 5.6.0 Message contains a bare CR", b"250 2.0.0 OK"]
        )
        self.assertEqual(self.delivery.delivered, [])

    def test_bare_lf_in_command(self):
        """A command ending in a bare LF gets 500 5.5.2 and is not run."""
        out, _, _ = self.converse(b"EHLO c\nNOOP\r\n")
        self.assertEqual(
            replies(out)[1:], [b"500 5.5.2 Bare CR or LF in command, use CRLF", b"250 2.0.0 OK"]
        )

    def test_bare_cr_in_command(self):
        """A bare CR inside a command gets 500 5.5.2."""
        out, _, _ = self.converse(b"EHLO c\rX\r\n")
        self.assertEqual(replies(out)[-1], b"500 5.5.2 Bare CR or LF in command, use CRLF")

    def test_header_injection_through_helo(self):
        """CR/LF in HELO never reaches a header: the line is refused, and the
        HELO name in effect is the last valid one."""
        out, proto, _ = self.converse(
            b"EHLO good\r\nEHLO evil\nX-Injected: yes\r\n" + self.head[len(b"EHLO c\r\n"):]
        )
        self.assertEqual(proto.session.helo, "good")

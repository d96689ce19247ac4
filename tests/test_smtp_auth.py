"""
SMTP AUTH and the submission rules (RFC 4954, RFC 6409, RFC 8314) on the
protocol: what Thunderbird, Outlook and smtplib send, and what an attacker
tries before TLS.
"""

from __future__ import annotations

import base64
from pathlib import Path

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailsys.accounts import MailRealm
from mailsys.config import LimitsSection
from mailsys.smtp.server import ESMTPServerFactory
from mailsys.testing import MemoryDelivery, TLSStringTransport

REMOTE = IPv4Address("TCP", "192.0.2.7", 40000)
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


PLAIN = b64(b"\0alice@example.test\0secret")


class SubmissionTestMixin:
    implicit_tls = False
    allow_plaintext_auth = False

    def setUp(self) -> None:
        checker = InMemoryUsernamePasswordDatabaseDontUse()
        checker.addUser(b"alice@example.test", b"secret")
        self.portal = Portal(MailRealm(Path("mail")), [checker])
        self.delivery = MemoryDelivery()
        self.factory = ESMTPServerFactory(
            self.delivery,
            "mail.example.test",
            LimitsSection(),
            Clock(),
            tls=object(),
            portal=self.portal,
            require_auth=True,
            implicit_tls=self.implicit_tls,
            allow_plaintext_auth=self.allow_plaintext_auth,
        )

    def connect(self, peer=REMOTE, tls: bool = True):
        """A session; with C{tls}, STARTTLS is already done."""
        proto = self.factory.buildProtocol(peer)
        transport = TLSStringTransport(peerAddress=peer)
        proto.makeConnection(transport)
        if tls and not self.implicit_tls:
            proto.dataReceived(b"EHLO c\r\nSTARTTLS\r\n")
        transport.clear()
        return proto, transport

    def say(self, proto, transport, data: bytes) -> list[bytes]:
        transport.clear()
        proto.dataReceived(data)
        return [line for line in transport.value().split(b"\r\n") if line]


class AuthBeforeTLSTests(SubmissionTestMixin, SynchronousTestCase):
    def test_no_auth_offered_in_clear(self):
        """Before TLS, EHLO offers STARTTLS but not AUTH."""
        proto, transport = self.connect(tls=False)
        lines = self.say(proto, transport, b"EHLO c\r\n")
        self.assertEqual(lines[-1], b"250 STARTTLS")
        self.assertFalse(any(b"AUTH" in line for line in lines))

    def test_auth_refused_in_clear(self):
        """AUTH before TLS gets 538 5.7.11: no password crosses in clear."""
        proto, transport = self.connect(tls=False)
        lines = self.say(proto, transport, b"EHLO c\r\nAUTH PLAIN " + PLAIN + b"\r\n")
        self.assertEqual(
            lines[-1],
            b"538 5.7.11 Encryption required for requested authentication mechanism",
        )

    def test_mail_needs_auth(self):
        """MAIL before AUTH gets 530 5.7.0, even over TLS."""
        proto, transport = self.connect()
        lines = self.say(proto, transport, b"EHLO c\r\nMAIL FROM:<alice@example.test>\r\n")
        self.assertEqual(lines[-1], b"530 5.7.0 Authentication required")

    def test_starttls_forgets_authentication(self):
        """Authentication from before STARTTLS does not survive it."""
        self.factory.allow_plaintext_auth = True
        proto, transport = self.connect(peer=LOOPBACK, tls=False)
        self.say(proto, transport, b"EHLO c\r\nAUTH PLAIN " + PLAIN + b"\r\n")
        self.assertEqual(proto.session.authenticated, "alice@example.test")
        self.say(proto, transport, b"STARTTLS\r\n")
        self.assertIsNone(proto.session.authenticated)


class AuthTests(SubmissionTestMixin, SynchronousTestCase):
    def test_ehlo_advertises_auth(self):
        """After TLS, EHLO offers 'AUTH PLAIN LOGIN' (not only 'AUTH=')."""
        proto, transport = self.connect()
        lines = self.say(proto, transport, b"EHLO c\r\n")
        self.assertIn(b"250 AUTH PLAIN LOGIN", lines)
        self.assertNotIn(b"250-STARTTLS", lines)

    def test_plain_initial_response(self):
        """AUTH PLAIN with an initial response (smtplib, Thunderbird)."""
        proto, transport = self.connect()
        lines = self.say(
            proto, transport,
            b"EHLO c\r\nAUTH PLAIN " + PLAIN + b"\r\nMAIL FROM:<alice@example.test>\r\n",
        )
        self.assertEqual(lines[-2:], [b"235 2.7.0 Authentication successful", b"250 2.1.0 Sender OK"])
        self.assertEqual(proto.session.protocol_name, "ESMTPSA")

    def test_plain_challenge(self):
        """AUTH PLAIN without initial response gets an empty 334."""
        proto, transport = self.connect()
        lines = self.say(proto, transport, b"EHLO c\r\nAUTH PLAIN\r\n")
        self.assertEqual(lines[-1], b"334 ")
        lines = self.say(proto, transport, PLAIN + b"\r\n")
        self.assertEqual(lines, [b"235 2.7.0 Authentication successful"])

    def test_login_challenges(self):
        """AUTH LOGIN prompts with base64 'Username:' and 'Password:', the
        strings Thunderbird insists on."""
        proto, transport = self.connect()
        lines = self.say(proto, transport, b"EHLO c\r\nAUTH LOGIN\r\n")
        self.assertEqual(lines[-1], b"334 VXNlcm5hbWU6")
        self.assertEqual(base64.b64decode(lines[-1][4:]), b"Username:")
        lines = self.say(proto, transport, b64(b"alice@example.test") + b"\r\n")
        self.assertEqual(lines, [b"334 UGFzc3dvcmQ6"])
        self.assertEqual(base64.b64decode(lines[-1][4:]), b"Password:")
        lines = self.say(proto, transport, b64(b"secret") + b"\r\n")
        self.assertEqual(lines, [b"235 2.7.0 Authentication successful"])

    def test_login_initial_response(self):
        """AUTH LOGIN with the user name on the command line (Outlook)."""
        proto, transport = self.connect()
        lines = self.say(
            proto, transport, b"EHLO c\r\nAUTH LOGIN " + b64(b"alice@example.test") + b"\r\n"
        )
        self.assertEqual(lines[-1], b"334 UGFzc3dvcmQ6")
        lines = self.say(proto, transport, b64(b"secret") + b"\r\n")
        self.assertEqual(lines, [b"235 2.7.0 Authentication successful"])

    def test_wrong_password(self):
        """A wrong password gets a prompt 535 5.7.8 and no session."""
        proto, transport = self.connect()
        lines = self.say(
            proto, transport,
            b"EHLO c\r\nAUTH PLAIN " + b64(b"\0alice@example.test\0wrong") + b"\r\n",
        )
        self.assertEqual(lines[-1], b"535 5.7.8 Authentication credentials invalid")
        self.assertIsNone(proto.session.authenticated)

    def test_other_authzid_refused(self):
        """Acting for another user (a PLAIN authorization id) is refused."""
        proto, transport = self.connect()
        lines = self.say(
            proto, transport,
            b"EHLO c\r\nAUTH PLAIN " + b64(b"bob@example.test\0alice@example.test\0secret") + b"\r\n",
        )
        self.assertEqual(lines[-1], b"535 5.7.8 Authentication credentials invalid")

    def test_cancel_and_garbage(self):
        """'*' cancels (501 5.0.0), bad base64 gets 501 5.5.2, an unknown
        mechanism 504 5.5.4; the session goes on."""
        proto, transport = self.connect()
        self.say(proto, transport, b"EHLO c\r\n")
        self.assertEqual(self.say(proto, transport, b"AUTH LOGIN\r\n*\r\n")[-1],
                         b"501 5.0.0 Authentication aborted")
        self.assertEqual(self.say(proto, transport, b"AUTH PLAIN !!!\r\n")[-1],
                         b"501 5.5.2 Cannot decode response")
        self.assertEqual(self.say(proto, transport, b"AUTH CRAM-MD5\r\n")[-1],
                         b"504 5.5.4 Unrecognized authentication type")
        self.assertEqual(self.say(proto, transport, b"NOOP\r\n")[-1], b"250 2.0.0 OK")

    def test_twice(self):
        """A second AUTH is refused."""
        proto, transport = self.connect()
        lines = self.say(
            proto, transport,
            b"EHLO c\r\nAUTH PLAIN " + PLAIN + b"\r\nAUTH PLAIN " + PLAIN + b"\r\n",
        )
        self.assertEqual(lines[-1], b"503 5.5.1 Already authenticated")

    def test_long_auth_line(self):
        """An AUTH line may exceed 512 octets (RFC 4954 4), other commands may not."""
        proto, transport = self.connect()
        long_plain = b64(b"\0alice@example.test\0" + b"x" * 600)
        lines = self.say(proto, transport, b"EHLO c\r\nAUTH PLAIN " + long_plain + b"\r\n")
        self.assertEqual(lines[-1], b"535 5.7.8 Authentication credentials invalid")
        lines = self.say(proto, transport, b"NOOP " + b"x" * 600 + b"\r\n")
        self.assertEqual(lines[-1], b"500 5.5.2 Line too long")

    def test_mail_auth_parameter(self):
        """MAIL FROM's AUTH= parameter (RFC 4954 5) is accepted."""
        proto, transport = self.connect()
        lines = self.say(
            proto, transport,
            b"EHLO c\r\nAUTH PLAIN " + PLAIN + b"\r\nMAIL FROM:<alice@example.test> AUTH=<>\r\n",
        )
        self.assertEqual(lines[-1], b"250 2.1.0 Sender OK")

    def test_split_everywhere(self):
        """The AUTH LOGIN exchange and a mail gives the same replies fed
        whole or split at every byte boundary."""
        session = (
            b"EHLO c\r\nAUTH LOGIN\r\n" + b64(b"alice@example.test") + b"\r\n"
            + b64(b"secret") + b"\r\nMAIL FROM:<alice@example.test>\r\n"
            + b"RCPT TO:<bob@example.test>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n"
        )
        proto, transport = self.connect()
        proto.dataReceived(session)
        expected = [line[:3] for line in transport.value().split(b"\r\n") if line]
        for i in range(1, len(session)):
            proto, transport = self.connect()
            proto.dataReceived(session[:i])
            proto.dataReceived(session[i:])
            got = [line[:3] for line in transport.value().split(b"\r\n") if line]
            self.assertEqual(got, expected, i)


class ImplicitTLSTests(SubmissionTestMixin, SynchronousTestCase):
    implicit_tls = True

    def test_auth_offered_at_once(self):
        """On the implicit-TLS port AUTH is offered from the start and
        STARTTLS is not."""
        proto, transport = self.connect()
        lines = self.say(proto, transport, b"EHLO c\r\n")
        self.assertIn(b"250 AUTH PLAIN LOGIN", lines)
        self.assertFalse(any(b"STARTTLS" in line for line in lines))
        self.assertEqual(proto.session.protocol_name, "ESMTPS")


class LoopbackPlaintextTests(SubmissionTestMixin, SynchronousTestCase):
    allow_plaintext_auth = True

    def test_loopback_only(self):
        """With plaintext allowed, a loopback client may AUTH before TLS; a
        remote client still may not."""
        proto, transport = self.connect(peer=LOOPBACK, tls=False)
        lines = self.say(proto, transport, b"EHLO c\r\nAUTH PLAIN " + PLAIN + b"\r\n")
        self.assertEqual(lines[-1], b"235 2.7.0 Authentication successful")
        proto, transport = self.connect(peer=REMOTE, tls=False)
        lines = self.say(proto, transport, b"EHLO c\r\nAUTH PLAIN " + PLAIN + b"\r\n")
        self.assertTrue(lines[-1].startswith(b"538 5.7.11"))

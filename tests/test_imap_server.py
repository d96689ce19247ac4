"""
Protocol units for the IMAP server, on a TLS-capable string transport with
a fake clock, an in-memory password checker and the real maildir store in a
temporary directory (store calls run in line): what Thunderbird sends,
STARTTLS injection, literals and their caps, pipelining order, read-only
mode, hostile mailbox names, and a whole session fed whole and split at
every byte boundary.
"""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailsys.accounts import MailRealm, MailUser
from mailsys.connections import is_loopback
from mailsys.imap import IIMAPAccount, IMAPAccount, IMAPServerFactory, imap_avatar
from mailsys.imap import server as imap_server
from mailsys.imap.testing import MemoryMailbox
from mailsys.maildir import Mailbox, MaildirStore
from mailsys.testing import TLSStringTransport

CLIENT = IPv4Address("TCP", "192.0.2.7", 40000)
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)
ALICE = "alice@example.test"
TLS = object()  # stands for the context factory; recorded by startTLS
LOGIN = b"l LOGIN alice@example.test secret\r\n"

FIRST = (
    b"From: Bob <bob@remote.example>\nTo: alice@example.test\n"
    b"Subject: one\nDate: Mon, 07 Jul 2025 10:00:00 +0000\n"
    b"Message-ID: <one@remote.example>\n\nHello Alice.\n"
)
SECOND = (
    b"From: Carol <carol@remote.example>\nTo: alice@example.test\n"
    b"Cc: dave@remote.example\nSubject: two\n"
    b"Date: Tue, 08 Jul 2025 10:00:00 +0000\nMessage-ID: <two@remote.example>\n"
    b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"b1\"\n\n"
    b"preamble\n--b1\nContent-Type: text/plain; charset=utf-8\n\n"
    b"The body, with a needle.\n--b1\nContent-Type: application/pdf; name=x.pdf\n"
    b"Content-Disposition: attachment; filename=x.pdf\n"
    b"Content-Transfer-Encoding: base64\n\nJVBERi0=\n--b1--\n"
)
THIRD = b"Subject: three\nFrom: eve@remote.example\n\nno final newline"


def lines(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\r\n") if line]


def tagged(data: bytes, tag: bytes) -> bytes:
    """The tagged reply line for C{tag}."""
    for line in lines(data):
        if line.startswith(tag + b" "):
            return line
    raise AssertionError(f"no reply tagged {tag!r} in {data!r}")


class ServerTestMixin:
    """A factory over a real store in a temporary directory, run in line."""

    read_only = False

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).resolve()
        self.store = MaildirStore(self.root, "mail.example.test")
        self.clock = Clock()
        self.checker = InMemoryUsernamePasswordDatabaseDontUse()
        self.checker.addUser(ALICE.encode(), b"secret")
        self.realm = MailRealm(self.root, {IIMAPAccount: imap_avatar})
        self.portal = Portal(self.realm, [self.checker])
        self.factory = IMAPServerFactory(
            self.portal,
            "mail.example.test",
            self.clock,
            tls=TLS,
            implicit_tls=True,
            read_only=self.read_only,
        )

    def deliver(self, *messages: bytes) -> None:
        for message in messages:
            self.store.deliver([ALICE], io.BytesIO(message))

    def connect(self, peer=CLIENT):
        proto = self.factory.buildProtocol(peer)
        transport = TLSStringTransport(peerAddress=peer)
        proto.makeConnection(transport)
        return proto, transport

    def converse(self, data: bytes = b"", chunks=None, peer=CLIENT):
        """Feed C{data} (or C{chunks}) to a new session; return the output."""
        proto, transport = self.connect(peer)
        for chunk in chunks if chunks is not None else [data]:
            proto.dataReceived(chunk)
        return transport.value(), proto, transport

    def logged_in(self, select: bytes | None = b"INBOX"):
        """A session logged in as alice (and with INBOX selected); output cleared."""
        proto, transport = self.connect()
        proto.dataReceived(LOGIN)
        assert tagged(transport.value(), b"l").startswith(b"l OK"), transport.value()
        if select is not None:
            proto.dataReceived(b"s SELECT " + select + b"\r\n")
            assert tagged(transport.value(), b"s").startswith(b"s OK"), transport.value()
        transport.clear()
        return proto, transport

    def say(self, proto, transport, data: bytes) -> bytes:
        transport.clear()
        proto.dataReceived(data)
        return transport.value()

    def mailbox(self) -> Mailbox:
        return Mailbox(self.store, ALICE)


class GreetingAndLoginTests(ServerTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.factory.implicit_tls = False

    def test_avatar_interface(self):
        """The avatar the realm makes for IMAP honours IIMAPAccount and opens
        the user's own maildir."""
        account = imap_avatar(MailUser(ALICE, self.root / "example.test" / "alice"))
        self.assertTrue(verifyObject(IIMAPAccount, account))
        self.assertEqual(account.mailbox("h").root, self.root / "example.test" / "alice")

    def test_greeting_carries_capabilities(self):
        """The greeting lists the capabilities (Thunderbird then skips
        CAPABILITY): STARTTLS and LOGINDISABLED before TLS."""
        out, _, _ = self.converse()
        self.assertTrue(out.startswith(b"* OK [CAPABILITY IMAP4rev1 "), out)
        caps = out.split(b"[CAPABILITY ")[1].split(b"]")[0].split()
        for cap in (
            b"LITERAL+", b"SASL-IR", b"ID", b"ENABLE", b"IDLE", b"NAMESPACE",
            b"UNSELECT", b"CHILDREN", b"SPECIAL-USE", b"LIST-EXTENDED",
            b"UIDPLUS", b"MOVE", b"STARTTLS", b"LOGINDISABLED",
        ):
            self.assertIn(cap, caps)
        self.assertNotIn(b"AUTH=PLAIN", caps)
        self.assertNotIn(b"AUTH=LOGIN", caps)

    def test_capability_command(self):
        """CAPABILITY answers the same list and OK."""
        out, _, _ = self.converse(b"c1 CAPABILITY\r\n")
        self.assertIn(b"\r\n* CAPABILITY IMAP4rev1 ", out)
        self.assertIn(b"c1 OK CAPABILITY completed\r\n", out)

    def test_no_password_before_tls(self):
        """LOGIN and AUTHENTICATE (PLAIN or LOGIN) before TLS are refused
        with PRIVACYREQUIRED, and no password check happens."""
        out, _, _ = self.converse(
            b"a LOGIN alice@example.test secret\r\nb AUTHENTICATE PLAIN AGFsaWNlAHg=\r\n"
            b"c AUTHENTICATE LOGIN\r\nd AUTHENTICATE LOGIN YWxpY2U=\r\n"
        )
        self.assertIn(b"a NO [PRIVACYREQUIRED]", out)
        self.assertIn(b"b NO [PRIVACYREQUIRED]", out)
        self.assertIn(b"c NO [PRIVACYREQUIRED]", out)
        self.assertIn(b"d NO [PRIVACYREQUIRED]", out)
        self.assertNotIn(b"\r\n+ ", out)

    def test_starttls(self):
        """STARTTLS starts TLS with our context; afterwards AUTH=PLAIN is
        offered, STARTTLS no more, and LOGIN works."""
        out, proto, transport = self.converse(b"t STARTTLS\r\n")
        self.assertTrue(out.endswith(b"t OK Begin TLS negotiation now\r\n"))
        self.assertIs(transport.tls_started_with, TLS)
        out = self.say(proto, transport, b"c CAPABILITY\r\n" + LOGIN)
        self.assertIn(b"AUTH=PLAIN AUTH=LOGIN", out)
        self.assertNotIn(b"STARTTLS", out)
        self.assertNotIn(b"LOGINDISABLED", out)
        self.assertIn(b"l OK [CAPABILITY IMAP4rev1 ", out)

    def test_starttls_command_injection(self):
        """Commands pipelined behind STARTTLS in clear text are discarded,
        never run as if they came over TLS (CVE-2011-0411 class)."""
        out, proto, transport = self.converse(b"a STARTTLS\r\nb LOGIN x y\r\n")
        self.assertTrue(out.endswith(b"a OK Begin TLS negotiation now\r\n"), out)
        self.assertNotIn(b"b ", out)
        # The same with the injected command split over two reads.
        out, proto, transport = self.converse(
            chunks=[b"a STARTTLS\r\nb LOGIN alice@example.test", b" secret\r\n"]
        )
        self.assertNotIn(b"b OK", out)
        self.assertNotIn(b"b NO", out)
        self.assertIsNone(proto.user)

    def test_starttls_twice_and_unavailable(self):
        """A second STARTTLS is BAD; so is STARTTLS without a certificate."""
        out, proto, transport = self.converse(b"t STARTTLS\r\n")
        out = self.say(proto, transport, b"u STARTTLS\r\n")
        self.assertEqual(out, b"u BAD Syntax error: TLS is already active\r\n")
        self.factory.tls = None
        out, _, _ = self.converse(b"v STARTTLS\r\n")
        self.assertNotIn(b"STARTTLS LOGIN", out)
        self.assertIn(b"v BAD Syntax error: STARTTLS is not available", out)
        self.assertNotIn(b" STARTTLS ", out.split(b"\r\n")[0])

    def test_loopback_plaintext_when_allowed(self):
        """With allow_plaintext_on_loopback, a client on 127.0.0.1 or ::1 may
        log in without TLS; one elsewhere still may not."""
        self.factory.allow_plaintext_on_loopback = True
        for peer in (LOOPBACK, IPv6Address("TCP", "::1", 40000)):
            out, _, _ = self.converse(LOGIN, peer=peer)
            self.assertIn(b"AUTH=PLAIN AUTH=LOGIN", out.split(b"\r\n")[0])
            self.assertIn(b"l OK [CAPABILITY", out)
        out, _, _ = self.converse(LOGIN)
        self.assertIn(b"l NO [PRIVACYREQUIRED]", out)


class AuthenticationTests(ServerTestMixin, SynchronousTestCase):
    def test_login(self):
        """LOGIN answers OK with the post-login capabilities (no STARTTLS,
        no AUTH=)."""
        out, proto, _ = self.converse(LOGIN)
        line = tagged(out, b"l")
        self.assertTrue(line.startswith(b"l OK [CAPABILITY IMAP4rev1 "), line)
        self.assertNotIn(b"AUTH=", line)
        self.assertEqual(proto.user, ALICE)

    def test_login_quoted_and_literal(self):
        """User names and passwords may be quoted strings or literals."""
        out, _, _ = self.converse(b'l LOGIN "alice@example.test" {6}\r\nsecret\r\n')
        self.assertIn(b"+ Ready for literal data\r\n", out)
        self.assertIn(b"l OK [CAPABILITY", out)
        out, _, _ = self.converse(b'l LOGIN {18+}\r\nalice@example.test "secret"\r\n')
        self.assertNotIn(b"+ Ready", out)
        self.assertIn(b"l OK [CAPABILITY", out)

    def test_wrong_password(self):
        """A wrong password is NO [AUTHENTICATIONFAILED]; the third failure
        closes the connection."""
        out, _, transport = self.converse(b"a LOGIN alice@example.test nope\r\n")
        self.assertIn(b"a NO [AUTHENTICATIONFAILED] Authentication failed\r\n", out)
        self.assertFalse(transport.disconnecting)
        out, _, transport = self.converse(b"a LOGIN x y\r\nb LOGIN x y\r\nc LOGIN x y\r\n")
        self.assertIn(b"c NO [AUTHENTICATIONFAILED]", out)
        self.assertIn(b"* BYE Too many failed logins", out)
        self.assertTrue(transport.disconnecting)

    def test_authenticate_plain_continuation(self):
        """AUTHENTICATE PLAIN waits with "+ " for the response, as
        Thunderbird expects."""
        out, proto, transport = self.converse(b"a AUTHENTICATE PLAIN\r\n")
        self.assertTrue(out.endswith(b"+ \r\n"))
        response = base64.b64encode(b"\0alice@example.test\0secret")
        out = self.say(proto, transport, response + b"\r\n")
        self.assertTrue(out.startswith(b"a OK [CAPABILITY IMAP4rev1 "), out)

    def test_authenticate_plain_initial_response(self):
        """SASL-IR: the response may come with the command; an authzid equal
        to the user is fine, another one is not."""
        ir = base64.b64encode(b"alice@example.test\0alice@example.test\0secret")
        out, _, _ = self.converse(b"a AUTHENTICATE PLAIN " + ir + b"\r\n")
        self.assertIn(b"a OK [CAPABILITY", out)
        ir = base64.b64encode(b"bob@example.test\0alice@example.test\0secret")
        out, _, _ = self.converse(b"a AUTHENTICATE PLAIN " + ir + b"\r\n")
        self.assertIn(b"a NO [AUTHENTICATIONFAILED]", out)

    def test_authenticate_cancel_and_garbage(self):
        """"*" cancels with BAD; bad base64 is BAD; the session goes on."""
        out, proto, transport = self.converse(b"a AUTHENTICATE PLAIN\r\n*\r\n")
        self.assertIn(b"a BAD Authentication cancelled\r\n", out)
        out = self.say(proto, transport, b"b AUTHENTICATE PLAIN\r\n!!!\r\nc NOOP\r\n")
        self.assertIn(b"b BAD Invalid base64", out)
        self.assertIn(b"c OK NOOP completed", out)

    def test_authenticate_login(self):
        """AUTHENTICATE LOGIN (Thunderbird's fallback after PLAIN) asks
        "Username:" then "Password:" in base64 and logs in."""
        out, proto, transport = self.converse(b"a AUTHENTICATE LOGIN\r\n")
        self.assertTrue(out.endswith(b"\r\n+ VXNlcm5hbWU6\r\n"), out)
        out = self.say(proto, transport, base64.b64encode(ALICE.encode()) + b"\r\n")
        self.assertEqual(out, b"+ UGFzc3dvcmQ6\r\n")
        out = self.say(proto, transport, base64.b64encode(b"secret") + b"\r\n")
        self.assertTrue(out.startswith(b"a OK [CAPABILITY IMAP4rev1 "), out)
        self.assertEqual(proto.user, ALICE)

    def test_authenticate_login_every_split(self):
        """The LOGIN exchange pipelined with a NOOP gives the same replies
        however the bytes are split."""
        data = (
            b"a AUTHENTICATE LOGIN\r\n"
            + base64.b64encode(ALICE.encode()) + b"\r\n"
            + base64.b64encode(b"secret") + b"\r\nn NOOP\r\n"
        )
        expected, proto, _ = self.converse(data)
        self.assertIn(b"a OK [CAPABILITY", expected)
        self.assertIn(b"n OK NOOP completed", expected)
        for cut in range(1, len(data)):
            out, _, _ = self.converse(chunks=[data[:cut], data[cut:]])
            self.assertEqual(out, expected, cut)

    def test_authenticate_login_initial_response(self):
        """SASL-IR with LOGIN: the user name comes with the command, so
        only the password is asked for; "=" is an empty user name."""
        user = base64.b64encode(ALICE.encode())
        out, proto, transport = self.converse(b"a AUTHENTICATE LOGIN " + user + b"\r\n")
        self.assertTrue(out.endswith(b"\r\n+ UGFzc3dvcmQ6\r\n"), out)
        self.assertNotIn(b"VXNlcm5hbWU6", out)
        out = self.say(proto, transport, base64.b64encode(b"secret") + b"\r\n")
        self.assertIn(b"a OK [CAPABILITY", out)
        out, proto, transport = self.converse(b"a AUTHENTICATE LOGIN =\r\n")
        out = self.say(proto, transport, base64.b64encode(b"secret") + b"\r\n")
        self.assertIn(b"a NO [AUTHENTICATIONFAILED]", out)

    def test_authenticate_login_wrong_password(self):
        """A wrong password through LOGIN counts as a failed login."""
        out, _, _ = self.converse(
            b"a AUTHENTICATE LOGIN " + base64.b64encode(ALICE.encode()) + b"\r\n"
            + base64.b64encode(b"nope") + b"\r\n"
        )
        self.assertIn(b"a NO [AUTHENTICATIONFAILED] Authentication failed", out)

    def test_authenticate_login_cancel_and_garbage(self):
        """"*" cancels LOGIN at either step, bad base64 is BAD, and the
        session goes on unauthenticated."""
        out, proto, transport = self.converse(b"a AUTHENTICATE LOGIN\r\n*\r\n")
        self.assertIn(b"a BAD Authentication cancelled\r\n", out)
        out = self.say(
            proto, transport,
            b"b AUTHENTICATE LOGIN " + base64.b64encode(ALICE.encode()) + b"\r\n*\r\n",
        )
        self.assertIn(b"b BAD Authentication cancelled\r\n", out)
        out = self.say(proto, transport, b"c AUTHENTICATE LOGIN\r\n!!!\r\nd NOOP\r\n")
        self.assertIn(b"c BAD Invalid base64", out)
        self.assertIn(b"d OK NOOP completed", out)
        self.assertIsNone(proto.user)

    def test_authenticate_unknown_mechanism(self):
        """Only PLAIN and LOGIN are offered; others are refused."""
        out, _, _ = self.converse(b"a AUTHENTICATE CRAM-MD5\r\n")
        self.assertIn(b"a NO [CANNOT] Unsupported authentication mechanism", out)

    def test_commands_need_login(self):
        """Mailbox commands before login are BAD and the session continues."""
        out, _, _ = self.converse(b"a SELECT INBOX\r\nb LIST \"\" *\r\nc NOOP\r\n")
        self.assertIn(b"a BAD Syntax error: SELECT is not valid in the not authenticated state", out)
        self.assertIn(b"b BAD", out)
        self.assertIn(b"c OK NOOP completed", out)

    def test_login_pending_holds_pipelined_commands(self):
        """A SELECT pipelined behind a LOGIN whose password check has not
        finished waits for it, and the replies come in order."""
        pending: defer.Deferred = defer.Deferred()
        checker = self.checker

        class SlowChecker:
            credentialInterfaces = checker.credentialInterfaces

            def requestAvatarId(self, credentials):
                return pending.addCallback(lambda _: credentials.username)

        self.portal.registerChecker(SlowChecker())
        out, proto, transport = self.converse(LOGIN + b"s SELECT INBOX\r\nn NOOP\r\n")
        self.assertEqual([line[:2] for line in lines(out)], [b"* "])
        pending.callback(None)
        out = transport.value()
        self.assertLess(out.index(b"l OK"), out.index(b"s OK"))
        self.assertLess(out.index(b"s OK"), out.index(b"n OK"))

    def test_special_folders_on_first_login(self):
        """The first login creates Sent, Drafts, Trash and Junk, subscribed."""
        self.converse(LOGIN)
        mailbox = self.mailbox()
        self.assertEqual(mailbox.folders(), ["INBOX", "Drafts", "Junk", "Sent", "Trash"])
        self.assertEqual(set(mailbox.subscriptions()), {"Drafts", "Junk", "Sent", "Trash"})

    def test_id_and_namespace(self):
        """ID answers with our name whatever the client sends (NIL or a
        list); NAMESPACE gives one personal namespace with "/"."""
        proto, transport = self.logged_in(select=None)
        out = self.say(
            proto, transport,
            b'i ID ("name" "Thunderbird" "version" "128.0")\r\nj ID NIL\r\nn NAMESPACE\r\n',
        )
        self.assertEqual(out.count(b'* ID ("name" "mailsys" "vendor" "mailsys")'), 2)
        self.assertIn(b"i OK ID completed", out)
        self.assertIn(b"j OK ID completed", out)
        self.assertIn(b'* NAMESPACE (("" "/")) NIL NIL\r\nn OK', out)

    def test_enable(self):
        """ENABLE enables nothing (nothing we offer needs it) but answers."""
        proto, transport = self.logged_in(select=None)
        out = self.say(proto, transport, b"e ENABLE CONDSTORE UTF8=ACCEPT\r\n")
        self.assertEqual(out, b"* ENABLED\r\ne OK ENABLE completed\r\n")

    def test_logout(self):
        """LOGOUT says BYE, OK, and closes."""
        out, _, transport = self.converse(b"z LOGOUT\r\n")
        self.assertTrue(out.endswith(b"* BYE Logging out\r\nz OK LOGOUT completed\r\n"))
        self.assertTrue(transport.disconnecting)

    def test_disconnect_without_logout(self):
        """A client that closes the socket mid-IDLE (Thunderbird does) leaves
        no timers behind."""
        self.deliver(FIRST)
        proto, transport = self.logged_in()
        proto.dataReceived(b"i IDLE\r\n")
        proto.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ListTests(ServerTestMixin, SynchronousTestCase):
    def test_list_all(self):
        """LIST "" "*" gives INBOX first, the special folders with their
        SPECIAL-USE attributes and \\HasNoChildren."""
        proto, transport = self.logged_in(select=None)
        out = self.say(proto, transport, b'a LIST "" "*"\r\n')
        self.assertEqual(
            lines(out),
            [
                b'* LIST (\\HasNoChildren) "/" INBOX',
                b'* LIST (\\HasNoChildren \\Drafts) "/" Drafts',
                b'* LIST (\\HasNoChildren \\Junk) "/" Junk',
                b'* LIST (\\HasNoChildren \\Sent) "/" Sent',
                b'* LIST (\\HasNoChildren \\Trash) "/" Trash',
                b"a OK LIST completed",
            ],
        )

    def test_list_subscribed_return_special_use(self):
        """Thunderbird's `list (subscribed) "" "*" return (special-use)`:
        subscribed folders (INBOX always) with \\Subscribed and their
        special use; a subscribed name that does not exist is \\NonExistent."""
        self.mailbox().ensure_special_folders()
        self.mailbox().subscribe("Gone")
        proto, transport = self.logged_in(select=None)
        out = self.say(proto, transport, b'a list (subscribed) "" "*" return (special-use)\r\n')
        self.assertEqual(
            lines(out),
            [
                b'* LIST (\\HasNoChildren \\Subscribed) "/" INBOX',
                b'* LIST (\\HasNoChildren \\Drafts \\Subscribed) "/" Drafts',
                b'* LIST (\\NonExistent \\Subscribed) "/" Gone',
                b'* LIST (\\HasNoChildren \\Junk \\Subscribed) "/" Junk',
                b'* LIST (\\HasNoChildren \\Sent \\Subscribed) "/" Sent',
                b'* LIST (\\HasNoChildren \\Trash \\Subscribed) "/" Trash',
                b"a OK LIST completed",
            ],
        )

    def test_list_special_use_selection(self):
        """LIST (SPECIAL-USE) lists only the folders with a special use."""
        proto, transport = self.logged_in(select=None)
        out = self.say(proto, transport, b'a LIST (SPECIAL-USE) "" *\r\n')
        self.assertEqual(len(lines(out)), 5)
        self.assertNotIn(b"INBOX", out)

    def test_list_patterns(self):
        """%% stops at the delimiter, * does not; "inbox" matches INBOX; ""
        asks for the delimiter; several patterns in parentheses."""
        self.mailbox().create_folder("Archive/2024")
        proto, transport = self.logged_in(select=None)
        out = self.say(proto, transport, b'a LIST "" "%"\r\n')
        self.assertIn(b'* LIST (\\HasChildren) "/" Archive\r\n', out)
        self.assertNotIn(b"Archive/2024", out)
        out = self.say(proto, transport, b'a LIST "" "Archive/*"\r\n')
        self.assertEqual(lines(out)[0], b'* LIST (\\HasNoChildren) "/" Archive/2024')
        out = self.say(proto, transport, b'a list "" "inbox"\r\n')
        self.assertEqual(lines(out)[0], b'* LIST (\\HasNoChildren) "/" INBOX')
        out = self.say(proto, transport, b'a LIST "" ""\r\n')
        self.assertEqual(lines(out), [b'* LIST (\\Noselect) "/" ""', b"a OK LIST completed"])
        out = self.say(proto, transport, b'a LIST "" (INBOX Sent)\r\n')
        self.assertEqual(len(lines(out)), 3)
        out = self.say(proto, transport, b'a LIST "Archive/" "%"\r\n')
        self.assertEqual(lines(out)[0], b'* LIST (\\HasNoChildren) "/" Archive/2024')

    def test_lsub(self):
        """LSUB lists subscribed folders (and INBOX)."""
        proto, transport = self.logged_in(select=None)
        out = self.say(proto, transport, b'a LSUB "" "*"\r\n')
        self.assertEqual(
            lines(out)[:2], [b'* LSUB () "/" INBOX', b'* LSUB () "/" Drafts']
        )

    def test_list_bad_options(self):
        """Unknown selection or return options are BAD, not a crash."""
        proto, transport = self.logged_in(select=None)
        out = self.say(
            proto, transport,
            b'a LIST (FOO) "" *\r\nb LIST "" * RETURN (STATUS (MESSAGES))\r\n'
            b'c LIST (RECURSIVEMATCH) "" *\r\n',
        )
        self.assertIn(b"a BAD", out)
        self.assertIn(b"b BAD", out)
        self.assertIn(b"c BAD", out)

    def test_modified_utf7_names(self):
        """Names travel in modified UTF-7 and are stored as UTF-8 text."""
        proto, transport = self.logged_in(select=None)
        out = self.say(proto, transport, b'a CREATE "Entw&APw-rfe"\r\nb LIST "" "Entw*"\r\n')
        self.assertIn(b"a OK CREATE completed", out)
        self.assertIn(b'* LIST (\\HasNoChildren) "/" Entw&APw-rfe\r\n', out)
        self.assertIn("Entwürfe", self.mailbox().folders())

    def test_create_subscribe_delete_rename(self):
        """CREATE (with parents), SUBSCRIBE, RENAME and DELETE change the
        store; existing and missing names get the right response codes."""
        proto, transport = self.logged_in(select=None)
        out = self.say(
            proto, transport,
            b"a CREATE Projects/2025/\r\nb SUBSCRIBE Projects/2025\r\n"
            b"c CREATE Projects\r\nd RENAME Projects/2025 Projects/Old\r\n"
            b"e DELETE Projects\r\nf DELETE Projects/Old\r\ng DELETE Nothing\r\n"
            b"h CREATE INBOX\r\ni DELETE INBOX\r\nj UNSUBSCRIBE Projects/Old\r\n",
        )
        self.assertIn(b"a OK CREATE completed", out)
        self.assertIn(b"b OK SUBSCRIBE completed", out)
        self.assertIn(b"c NO [ALREADYEXISTS]", out)
        self.assertIn(b"d OK RENAME completed", out)
        self.assertIn(b"e NO [INUSE] Mailbox has children", out)
        self.assertIn(b"f OK DELETE completed", out)
        self.assertIn(b"g NO", out)
        self.assertIn(b"h NO [ALREADYEXISTS]", out)
        self.assertIn(b"i NO", out)
        self.assertIn(b"j OK", out)
        self.assertIn("Projects", self.mailbox().folders())
        self.assertNotIn("Projects/Old", self.mailbox().folders())

    def test_hostile_names(self):
        """Names that would escape the maildir or collide with its own
        directories are refused with NO, never created anywhere."""
        proto, transport = self.logged_in(select=None)
        before = sorted(os.listdir(self.root))
        hostile = [
            b'"../escape"', b'"/abs"', b'"a//b"', b'"~user"', b'"a/../../b"',
            b'"tmp"', b'"new"', b'"Cur"', b'"x/tmp"', b'"dot.name"', b'"back\\\\slash"',
            b'"&AAA-"', b'"&Jjo"', b"{3}\r\na\x01b", b'"a\xffb"', b"{3}\r\n/..",
        ]
        for index, name in enumerate(hostile):
            tag = b"h%d" % index
            out = self.say(proto, transport, tag + b" CREATE " + name + b"\r\n")
            line = tagged(out, tag)
            self.assertTrue(line.startswith(tag + b" NO"), (name, out))
            out = self.say(proto, transport, tag + b" SELECT " + name + b"\r\n")
            self.assertTrue(tagged(out, tag).startswith(tag + b" NO"), (name, out))
        self.assertEqual(sorted(os.listdir(self.root)), before)
        self.assertEqual(
            self.mailbox().folders(), ["INBOX", "Drafts", "Junk", "Sent", "Trash"]
        )

    def test_status(self):
        """STATUS answers the items asked for, in their order."""
        self.deliver(FIRST, SECOND)
        proto, transport = self.logged_in(select=None)
        folder = self.mailbox().folder("INBOX")
        out = self.say(
            proto, transport, b"a STATUS INBOX (UIDNEXT MESSAGES UNSEEN RECENT UIDVALIDITY)\r\n"
        )
        self.assertEqual(
            lines(out)[0],
            b"* STATUS INBOX (UIDNEXT 3 MESSAGES 2 UNSEEN 2 RECENT 2 UIDVALIDITY %d)"
            % folder.uidvalidity,
        )
        out = self.say(proto, transport, b"b STATUS Nowhere (MESSAGES)\r\nc STATUS INBOX (SIZE)\r\n")
        self.assertIn(b"b NO", out)
        self.assertIn(b"c BAD", out)


class SelectTests(ServerTestMixin, SynchronousTestCase):
    def test_select(self):
        """SELECT INBOX reports FLAGS, PERMANENTFLAGS, EXISTS, RECENT, UNSEEN,
        UIDVALIDITY and UIDNEXT, and moves new mail to cur/."""
        self.deliver(FIRST, SECOND)
        proto, transport = self.logged_in(select=None)
        out = self.say(proto, transport, b's select "INBOX"\r\n')
        validity = self.mailbox().folder("INBOX").uidvalidity
        self.assertEqual(
            lines(out),
            [
                b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)",
                b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)]"
                b" Flags permitted",
                b"* 2 EXISTS",
                b"* 2 RECENT",
                b"* OK [UNSEEN 1] First unseen",
                b"* OK [UIDVALIDITY %d] UIDs valid" % validity,
                b"* OK [UIDNEXT 3] Predicted next UID",
                b"s OK [READ-WRITE] SELECT completed",
            ],
        )
        inbox = self.root / "example.test" / "alice"
        self.assertEqual(os.listdir(inbox / "new"), [])
        self.assertEqual(len(os.listdir(inbox / "cur")), 2)

    def test_examine(self):
        """EXAMINE is read-only: no PERMANENTFLAGS, READ-ONLY, new/ left
        alone, and STORE refused."""
        self.deliver(FIRST)
        proto, transport = self.logged_in(select=None)
        out = self.say(proto, transport, b"e EXAMINE INBOX\r\nf STORE 1 +FLAGS (\\Seen)\r\n")
        self.assertIn(b"* OK [PERMANENTFLAGS ()]", out)
        self.assertIn(b"e OK [READ-ONLY] EXAMINE completed", out)
        self.assertIn(b"f NO [READ-ONLY]", out)
        self.assertEqual(len(os.listdir(self.root / "example.test" / "alice" / "new")), 1)

    def test_select_missing(self):
        """Selecting a folder that does not exist is NO [NONEXISTENT] and
        leaves nothing selected."""
        proto, transport = self.logged_in()
        out = self.say(proto, transport, b"a SELECT Nowhere\r\nb FETCH 1 FLAGS\r\n")
        self.assertIn(b"a NO [NONEXISTENT]", out)
        self.assertIn(b"b BAD", out)

    def test_unselect_and_close(self):
        """UNSELECT keeps \\Deleted messages; CLOSE expunges them silently."""
        self.deliver(FIRST, SECOND)
        proto, transport = self.logged_in()
        out = self.say(
            proto, transport,
            b"a STORE 1 +FLAGS.SILENT (\\Deleted)\r\nb UNSELECT\r\nc SELECT INBOX\r\n"
            b"d CLOSE\r\n",
        )
        self.assertIn(b"a OK", out)
        self.assertIn(b"b OK UNSELECT completed", out)
        self.assertIn(b"* 2 EXISTS", out)
        self.assertIn(b"d OK CLOSE completed", out)
        self.assertNotIn(b"EXPUNGE", out)
        self.assertEqual(len(self.mailbox().folder("INBOX").scan()), 1)


class FetchTests(ServerTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.deliver(FIRST, SECOND, THIRD)
        self.proto, self.transport = self.logged_in()

    def fetch(self, command: bytes) -> bytes:
        return self.say(self.proto, self.transport, command + b"\r\n")

    def literal_of(self, out: bytes, label: bytes) -> bytes:
        """The literal after C{label} in a FETCH response."""
        start = out.index(label + b" {") + len(label) + 2
        end = out.index(b"}\r\n", start)
        size = int(out[start:end])
        return out[end + 3 : end + 3 + size]

    def test_flags(self):
        """`UID fetch 1:* (FLAGS)` gives every message with its UID and flags."""
        out = self.fetch(b"a UID fetch 1:* (FLAGS)")
        self.assertEqual(
            lines(out),
            [
                b"* 1 FETCH (UID 1 FLAGS (\\Recent))",
                b"* 2 FETCH (UID 2 FLAGS (\\Recent))",
                b"* 3 FETCH (UID 3 FLAGS (\\Recent))",
                b"a OK FETCH completed",
            ],
        )

    def test_thunderbird_headers(self):
        """Thunderbird's header fetch returns the asked-for fields in message
        order and a blank line, with RFC822.SIZE and FLAGS."""
        out = self.fetch(
            b"a UID fetch 1:* (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS (From To Cc "
            b"Bcc Subject Date Message-ID Priority X-Priority References Newsgroups "
            b"In-Reply-To Content-Type Reply-To Received)])"
        )
        self.assertEqual(out.count(b" FETCH (UID "), 3)
        label = (
            b"BODY[HEADER.FIELDS (From To Cc Bcc Subject Date Message-ID Priority "
            b"X-Priority References Newsgroups In-Reply-To Content-Type Reply-To Received)]"
        )
        first = self.literal_of(out, label)
        self.assertEqual(
            first,
            b"From: Bob <bob@remote.example>\r\nTo: alice@example.test\r\n"
            b"Subject: one\r\nDate: Mon, 07 Jul 2025 10:00:00 +0000\r\n"
            b"Message-ID: <one@remote.example>\r\n\r\n",
        )
        self.assertIn(b"* 1 FETCH (UID 1 RFC822.SIZE %d FLAGS (\\Recent) " % (len(FIRST) + FIRST.count(b"\n")), out)
        # PEEK: nothing became \Seen.
        self.assertNotIn(b"\\Seen", self.fetch(b"b FETCH 1:* FLAGS"))

    def test_size_matches_body(self):
        """RFC822.SIZE equals the length of BODY[] with CRLF line endings,
        for each message (also one without a final newline)."""
        for seq, message in ((1, FIRST), (2, SECOND), (3, THIRD)):
            out = self.fetch(b"a FETCH %d (RFC822.SIZE BODY.PEEK[])" % seq)
            size = int(re.search(rb"RFC822.SIZE (\d+)", out).group(1))
            body = self.literal_of(out, b"BODY[]")
            self.assertEqual(size, len(body))
            self.assertEqual(body, message.replace(b"\n", b"\r\n"))

    def test_partial_sets_seen(self):
        """`BODY[]<0.65536>` in pieces: each piece is the right bytes, the
        origin is echoed, and \\Seen is set and reported."""
        out = self.fetch(b"a UID fetch 2 (UID RFC822.SIZE BODY[]<0.100>)")
        wire = SECOND.replace(b"\n", b"\r\n")
        self.assertEqual(self.literal_of(out, b"BODY[]<0>"), wire[:100])
        self.assertIn(b"FLAGS (\\Seen \\Recent)", out)
        out = self.fetch(b"b UID fetch 2 (UID BODY[]<100.100000>)")
        self.assertEqual(self.literal_of(out, b"BODY[]<100>"), wire[100:])
        out = self.fetch(b"c UID fetch 2 (BODY[]<100000.10>)")
        self.assertIn(b'BODY[]<100000> {0}\r\n', out)
        self.assertIn(
            "\\Seen", self.mailbox().folder("INBOX").scan()[1].flags
        )

    def test_peek_whole(self):
        """`UID fetch n (UID RFC822.SIZE BODY.PEEK[])` does not set \\Seen."""
        out = self.fetch(b"a UID fetch 1 (UID RFC822.SIZE BODY.PEEK[])")
        self.assertNotIn(b"FLAGS", out)
        self.assertNotIn("\\Seen", self.mailbox().folder("INBOX").scan()[0].flags)

    def test_sections(self):
        """HEADER, TEXT, HEADER.FIELDS.NOT, part numbers and MIME."""
        out = self.fetch(
            b"a FETCH 2 (BODY.PEEK[HEADER] BODY.PEEK[TEXT] BODY.PEEK[1] BODY.PEEK[1.MIME] "
            b"BODY.PEEK[2] BODY.PEEK[HEADER.FIELDS.NOT (Subject Date)] BODY.PEEK[3])"
        )
        wire = SECOND.replace(b"\n", b"\r\n")
        header, _, text = wire.partition(b"\r\n\r\n")
        self.assertEqual(self.literal_of(out, b"BODY[HEADER]"), header + b"\r\n\r\n")
        self.assertEqual(self.literal_of(out, b"BODY[TEXT]"), text)
        self.assertEqual(self.literal_of(out, b"BODY[1]"), b"The body, with a needle.")
        self.assertEqual(
            self.literal_of(out, b"BODY[1.MIME]"),
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n",
        )
        self.assertEqual(self.literal_of(out, b"BODY[2]"), b"JVBERi0=")
        rest = self.literal_of(out, b"BODY[HEADER.FIELDS.NOT (Subject Date)]")
        self.assertNotIn(b"Subject", rest)
        self.assertIn(b"Cc: dave@remote.example\r\n", rest)
        self.assertIn(b"BODY[3] {0}\r\n)", out)

    def test_rfc822_items(self):
        """RFC822.HEADER and RFC822 answer under their own names; RFC822
        sets \\Seen."""
        out = self.fetch(b"a FETCH 1 (RFC822.HEADER)")
        self.assertIn(b"RFC822.HEADER {", out)
        out = self.fetch(b"b FETCH 1 RFC822")
        self.assertEqual(self.literal_of(out, b"RFC822"), FIRST.replace(b"\n", b"\r\n"))
        self.assertIn(b"\\Seen", out)

    def test_envelope_bodystructure_internaldate(self):
        """ENVELOPE, BODYSTRUCTURE, BODY and INTERNALDATE for a multipart."""
        out = self.fetch(b"a FETCH 2 (ENVELOPE BODYSTRUCTURE BODY INTERNALDATE)")
        self.assertIn(
            b'ENVELOPE ("Tue, 08 Jul 2025 10:00:00 +0000" "two" '
            b'(("Carol" NIL "carol" "remote.example")) (("Carol" NIL "carol" "remote.example")) '
            b'(("Carol" NIL "carol" "remote.example")) ((NIL NIL "alice" "example.test")) '
            b'((NIL NIL "dave" "remote.example")) NIL NIL "<two@remote.example>")',
            out,
        )
        self.assertIn(
            b'BODYSTRUCTURE (("text" "plain" ("charset" "utf-8") NIL NIL "7BIT" 24 1 NIL NIL NIL NIL)'
            b'("application" "pdf" ("name" "x.pdf") NIL NIL "BASE64" 8 NIL '
            b'("attachment" ("filename" "x.pdf")) NIL NIL) "mixed" ("boundary" "b1") NIL NIL NIL)',
            out,
        )
        self.assertIn(
            b'BODY (("text" "plain" ("charset" "utf-8") NIL NIL "7BIT" 24 1)'
            b'("application" "pdf" ("name" "x.pdf") NIL NIL "BASE64" 8) "mixed")',
            out,
        )
        self.assertRegex(out, rb'INTERNALDATE "\d\d-[A-Z][a-z]{2}-\d{4} \d\d:\d\d:\d\d \+0000"')

    def test_macros(self):
        """FAST, ALL and FULL expand as RFC 3501 says."""
        out = self.fetch(b"a FETCH 1 FAST\r\nb FETCH 1 ALL\r\nc FETCH 1 FULL")
        self.assertIn(b"* 1 FETCH (FLAGS (\\Recent) INTERNALDATE ", out)
        self.assertIn(b" ENVELOPE (", out)
        self.assertIn(b" BODY (", out)
        self.assertIn(b"c OK", out)

    def test_bad_fetches(self):
        """Malformed FETCH commands are BAD and the session goes on."""
        out = self.fetch(
            b"a FETCH 0 FLAGS\r\nb FETCH 4 FLAGS\r\nc FETCH 1 (FLAGS\r\nd FETCH 1 BODY[FOO]\r\n"
            b"e FETCH 1 BODY[]<1.0>\r\nf FETCH 1 NOSUCH\r\ng FETCH x FLAGS\r\nh NOOP"
        )
        for tag in b"abcdefg":
            self.assertTrue(tagged(out, bytes([tag])).startswith(bytes([tag]) + b" BAD"), out)
        self.assertIn(b"h OK NOOP completed", out)

    def test_uid_fetch_of_missing_uids(self):
        """UIDs that do not exist are skipped; `n:*` beyond the last UID
        still gives the last message (RFC 3501 6.4.8)."""
        out = self.fetch(b"a UID FETCH 7:9 FLAGS\r\nb UID FETCH 9:* FLAGS")
        self.assertIn(b"a OK FETCH completed", out)
        self.assertIn(b"* 3 FETCH (UID 3 FLAGS", out)

    def test_message_expunged_elsewhere(self):
        """A message another session expunged is left out of a UID FETCH,
        and a FETCH by number says EXPUNGEISSUED, without a traceback."""
        folder = self.mailbox().folder("INBOX")
        folder.expunge([folder.scan()[0]])
        out = self.fetch(b"a UID FETCH 1:* (BODY.PEEK[])\r\nb FETCH 1 BODY.PEEK[]")
        self.assertIn(b"a OK FETCH completed", out)
        self.assertIn(b"b NO [EXPUNGEISSUED]", out)
        self.assertNotIn(b"* 1 FETCH", out)

    def test_fetch_waits_for_slow_reader(self):
        """A FETCH of many bodies writes a batch, then waits while the
        transport's buffer is full, instead of queueing the whole mailbox."""
        self.patch(imap_server, "FETCH_BATCH_MESSAGES", 1)
        transport = self.transport
        write = transport.write

        def write_and_fill(data):
            write(data)
            if transport.producer is not None:
                transport.producer.pauseProducing()

        transport.write = write_and_fill
        out = self.fetch(b"a FETCH 1:3 (BODY.PEEK[])")
        self.assertEqual(out.count(b" FETCH ("), 1)
        transport.producer.resumeProducing()
        transport.producer.resumeProducing()
        out = transport.value()
        self.assertEqual(out.count(b" FETCH ("), 3)
        self.assertTrue(out.endswith(b"a OK FETCH completed\r\n"))
        self.assertIsNone(transport.producer)

    def test_partial_fetches_parse_once(self):
        """Reading a message in pieces opens and parses it once per session."""
        opened = []
        view_folder = self.proto.view.folder
        original = view_folder.open

        def counting_open(info):
            opened.append(info.uid)
            return original(info)

        view_folder.open = counting_open
        for start in range(0, 400, 50):
            self.fetch(b"a UID FETCH 2 (BODY.PEEK[]<%d.50> BODY.PEEK[1])" % start)
        self.assertEqual(opened, [2])


class StoreSearchTests(ServerTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.deliver(FIRST, SECOND, THIRD)
        self.proto, self.transport = self.logged_in()

    def run_command(self, command: bytes) -> bytes:
        return self.say(self.proto, self.transport, command + b"\r\n")

    def test_store_variants(self):
        """+FLAGS, -FLAGS, FLAGS and .SILENT change the files' info letters
        and report the new flags (with UID for UID STORE); \\Recent and
        unknown \\ flags are ignored."""
        out = self.run_command(b"a uid store 1:2 +FLAGS (\\Seen)")
        self.assertIn(b"* 1 FETCH (UID 1 FLAGS (\\Seen \\Recent))", out)
        out = self.run_command(b"b STORE 1 +FLAGS (\\Flagged \\Answered \\Recent \\Foo)")
        self.assertIn(b"* 1 FETCH (FLAGS (\\Answered \\Flagged \\Seen \\Recent))", out)
        out = self.run_command(b"c STORE 1 -FLAGS.SILENT \\Answered")
        self.assertEqual(out, b"c OK STORE completed\r\n")
        out = self.run_command(b"d STORE 2 FLAGS (\\Draft)")
        self.assertIn(b"* 2 FETCH (FLAGS (\\Draft \\Recent))", out)
        infos = self.mailbox().folder("INBOX").scan()
        self.assertEqual(infos[0].flags, {"\\Seen", "\\Flagged"})
        self.assertEqual(infos[1].flags, {"\\Draft"})
        self.assertTrue(str(infos[0].path).endswith(":2,FS"))
        out = self.run_command(b"e STORE 1 FLAGZ (\\Seen)")
        self.assertIn(b"e BAD", out)

    def test_search(self):
        """SEARCH and UID SEARCH over flags, headers, body, sizes, dates,
        sets, NOT and OR."""
        self.run_command(
            b"s STORE 1 +FLAGS (\\Seen \\Flagged)\r\nt STORE 3 +FLAGS (\\Deleted)\r\n"
            b"u STORE 2 +FLAGS ($Forwarded)"
        )
        cases = {
            b"ALL": b"1 2 3",
            b"SEEN": b"1",
            b"UNSEEN": b"2 3",
            b"FLAGGED": b"1",
            b"DELETED": b"3",
            b"UNDELETED": b"1 2",
            b"ANSWERED": b"",
            b"NEW": b"2 3",
            b"OLD": b"",
            b"RECENT": b"1 2 3",
            b"FROM carol": b"2",
            b"FROM \"BOB <\"": b"1",
            b"TO alice@example.test": b"1 2",
            b"CC dave": b"2",
            b"SUBJECT TWO": b"2",
            b"HEADER Message-ID <one@remote.example>": b"1",
            b"HEADER MIME-Version \"\"": b"2",
            b"BODY needle": b"2",
            b"BODY JVBERi0": b"",
            b"TEXT eve": b"3",
            b"TEXT needle": b"2",
            b"LARGER 300": b"2",
            b"SMALLER 100": b"3",
            b"SENTON 8-Jul-2025": b"2",
            b"SENTBEFORE 8-Jul-2025": b"1",
            b"SENTSINCE \"08-Jul-2025\"": b"2",
            b"SINCE 1-Jan-2000": b"1 2 3",
            b"BEFORE 1-Jan-2000": b"",
            b"ON 1-Jan-2000": b"",
            b"2:*": b"2 3",
            b"UID 1,3": b"1 3",
            b"NOT SEEN": b"2 3",
            b"OR SEEN DELETED": b"1 3",
            b"(UNSEEN UNDELETED)": b"2",
            b"KEYWORD $Forwarded": b"2",
            b"KEYWORD $forwarded": b"2",
            b"UNKEYWORD $Forwarded": b"1 3",
            b"KEYWORD $Junk": b"",
            b"UNKEYWORD $Junk": b"1 2 3",
            b"OR KEYWORD $Forwarded SEEN": b"1 2",
            b"CHARSET UTF-8 SUBJECT {3+}\r\none": b"1",
            b"CHARSET UTF-8 TEXT {6+}\r\nAlic\xc3\xa9": b"",
        }
        for query, expected in cases.items():
            out = self.run_command(b"q SEARCH " + query)
            self.assertEqual(lines(out)[0], (b"* SEARCH " + expected).strip(), query)
            self.assertIn(b"q OK SEARCH completed", out)

    def test_uid_search_thunderbird(self):
        """Thunderbird's `uid SEARCH UNDELETED HEADER Message-ID <id>`
        answers UIDs."""
        self.run_command(b"a UID STORE 1 +FLAGS (\\Deleted)\r\nb EXPUNGE")
        out = self.run_command(b"c uid SEARCH UNDELETED HEADER Message-ID <two@remote.example>")
        self.assertEqual(lines(out)[0], b"* SEARCH 2")

    def test_search_errors(self):
        """An unknown charset is NO [BADCHARSET]; unknown keys and bad dates
        are BAD."""
        out = self.run_command(
            b"a SEARCH CHARSET KOI8-R ALL\r\nb SEARCH FOO\r\nc SEARCH SINCE 32-Foo-2020\r\n"
            b"d SEARCH\r\ne SEARCH NOT"
        )
        self.assertIn(b"a NO [BADCHARSET (UTF-8 US-ASCII)]", out)
        for tag in (b"b", b"c", b"d", b"e"):
            self.assertTrue(tagged(out, tag).startswith(tag + b" BAD"))

    def test_expunge(self):
        """EXPUNGE removes \\Deleted messages and reports each with the right
        sequence number (highest first)."""
        out = self.run_command(b"a STORE 1,3 +FLAGS.SILENT (\\Deleted)\r\nb EXPUNGE")
        self.assertEqual(lines(out)[1:], [b"* 3 EXPUNGE", b"* 1 EXPUNGE", b"b OK EXPUNGE completed"])
        self.assertEqual([i.uid for i in self.mailbox().folder("INBOX").scan()], [2])
        out = self.run_command(b"c FETCH 1 UID")
        self.assertIn(b"* 1 FETCH (UID 2)", out)

    def test_uid_expunge(self):
        """UID EXPUNGE removes only the named \\Deleted messages."""
        out = self.run_command(b"a STORE 1:3 +FLAGS.SILENT (\\Deleted)\r\nb UID EXPUNGE 2")
        self.assertEqual(lines(out)[1:], [b"* 2 EXPUNGE", b"b OK EXPUNGE completed"])

    def test_copy_and_delete(self):
        """UID COPY answers COPYUID; then +FLAGS (\\Deleted \\Seen) and
        EXPUNGE (Thunderbird without MOVE)."""
        trash = self.mailbox().folder("Trash")
        out = self.run_command(b'a uid copy 1:2 "Trash"')
        self.assertEqual(
            lines(out), [b"a OK [COPYUID %d 1,2 1,2] COPY completed" % trash.uidvalidity]
        )
        out = self.run_command(b"b uid store 1:2 +FLAGS (\\Deleted \\Seen)\r\nc EXPUNGE")
        self.assertIn(b"* 2 EXPUNGE\r\n* 1 EXPUNGE\r\nc OK", out)
        copies = trash.scan()
        self.assertEqual([c.uid for c in copies], [1, 2])
        with trash.open(copies[1]) as f:
            self.assertEqual(f.read(), SECOND)

    def test_move(self):
        """`uid move 2 "Trash"` answers COPYUID in an untagged OK, then
        EXPUNGE, then OK; the message is in Trash only."""
        trash = self.mailbox().folder("Trash")
        out = self.run_command(b'a uid move 2 "Trash"')
        self.assertEqual(
            lines(out),
            [
                b"* OK [COPYUID %d 2 1] Moved" % trash.uidvalidity,
                b"* 2 EXPUNGE",
                b"a OK MOVE completed",
            ],
        )
        self.assertEqual([i.uid for i in self.mailbox().folder("INBOX").scan()], [1, 3])
        self.assertEqual(len(trash.scan()), 1)

    def test_copy_to_missing_folder(self):
        """COPY and MOVE into a folder that does not exist say TRYCREATE."""
        out = self.run_command(b"a COPY 1 Nowhere\r\nb MOVE 1 Nowhere")
        self.assertIn(b"a NO [TRYCREATE]", out)
        self.assertIn(b"b NO [TRYCREATE]", out)

    def test_copy_into_selected_folder(self):
        """A COPY into the selected folder announces the new message."""
        out = self.run_command(b"a COPY 1 INBOX")
        self.assertIn(b"* 4 EXISTS\r\n", out)
        self.assertIn(b"a OK [COPYUID", out)


class AppendTests(ServerTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.proto, self.transport = self.logged_in(select=None)

    def test_append_literal_plus(self):
        """`append "Sent" (\\Seen) {n+}`: no continuation, stored with LF
        endings and \\Seen, APPENDUID in the OK."""
        message = b"Subject: sent\r\n\r\nHi.\r\n"
        out = self.say(
            self.proto, self.transport,
            b'a append "Sent" (\\Seen) {%d+}\r\n%s\r\n' % (len(message), message),
        )
        sent = self.mailbox().folder("Sent")
        self.assertEqual(out, b"a OK [APPENDUID %d 1] APPEND completed\r\n" % sent.uidvalidity)
        [info] = sent.scan()
        self.assertEqual(info.flags, {"\\Seen"})
        with sent.open(info) as f:
            self.assertEqual(f.read(), b"Subject: sent\n\nHi.\n")

    def test_append_synchronizing(self):
        """`{n}` gets "+" before the literal; date-time sets the internal date."""
        message = b"Subject: draft\r\n\r\nx"
        out = self.say(
            self.proto, self.transport,
            b'a APPEND Drafts (\\Draft) "07-Jul-2025 12:00:00 +0200" {%d}\r\n' % len(message),
        )
        self.assertEqual(out, b"+ Ready for literal data\r\n")
        out = self.say(self.proto, self.transport, message + b"\r\n")
        self.assertIn(b"a OK [APPENDUID", out)
        [info] = self.mailbox().folder("Drafts").scan()
        self.assertEqual(info.flags, {"\\Draft"})
        self.assertEqual(info.internal_date, 1751882400.0)

    def test_append_literal_counted_in_bytes(self):
        """A literal is counted in bytes, 8-bit and CRLF included, however
        the data is split."""
        message = "Subject: caf\u00e9\r\n\r\n\u00fcber\r\n".encode("utf-8")
        data = b"a APPEND INBOX {%d+}\r\n%s\r\nb NOOP\r\n" % (len(message), message)
        for cut in range(1, len(data)):
            self.say(self.proto, self.transport, data[:cut])
            out = self.say(self.proto, self.transport, data[cut:])
        self.assertIn(b"b OK NOOP completed", out)
        infos = self.mailbox().folder("INBOX").scan()
        self.assertEqual(len(infos), len(data) - 1)
        with self.mailbox().folder("INBOX").open(infos[-1]) as f:
            self.assertEqual(f.read(), message.replace(b"\r\n", b"\n"))

    def test_append_to_selected_announces(self):
        """APPEND into the selected folder announces EXISTS before the OK."""
        self.say(self.proto, self.transport, b"s SELECT INBOX\r\n")
        out = self.say(self.proto, self.transport, b"a APPEND INBOX {3+}\r\nx\r\n\r\n")
        self.assertIn(b"* 1 EXISTS\r\n", out)
        self.assertLess(out.index(b"EXISTS"), out.index(b"a OK [APPENDUID"))

    def test_append_errors(self):
        """A missing folder says TRYCREATE; an empty message, a bad date or
        flag list is refused; the session goes on."""
        out = self.say(
            self.proto, self.transport,
            b"a APPEND Nowhere {1+}\r\nx\r\nb APPEND INBOX {0+}\r\n\r\n"
            b'c APPEND INBOX "99-Foo-2025 00:00:00 +0000" {1+}\r\nx\r\n'
            b"d APPEND INBOX (\\Seen {1+}\r\nx\r\ne NOOP\r\n",
        )
        self.assertIn(b"a NO [TRYCREATE]", out)
        self.assertIn(b"b NO Cannot store an empty message", out)
        self.assertIn(b"c BAD", out)
        self.assertIn(b"d BAD", out)
        self.assertIn(b"e OK NOOP completed", out)
        self.assertEqual(self.mailbox().folder("INBOX").scan(), [])

    def test_append_too_big(self):
        """A literal over the size limit: `{n}` is refused before the client
        sends it, `{n+}` is refused and the connection closed."""
        self.factory.max_message_size = 100
        out = self.say(self.proto, self.transport, b"a APPEND INBOX {101}\r\nb NOOP\r\n")
        self.assertEqual(
            out, b"a NO [TOOBIG] Literal too big (limit 100 octets)\r\nb OK NOOP completed\r\n"
        )
        out = self.say(self.proto, self.transport, b"c APPEND INBOX {101+}\r\n" + b"x" * 101)
        self.assertIn(b"c BAD [TOOBIG]", out)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.mailbox().folder("INBOX").scan(), [])


class LimitTests(ServerTestMixin, SynchronousTestCase):
    def test_literal_small_before_login(self):
        """Before login a literal over 8 KiB is refused (no "+"), so an
        anonymous client cannot make us hold megabytes."""
        out, _, _ = self.converse(b"a LOGIN {9000}\r\n")
        self.assertIn(b"a NO [TOOBIG]", out)
        self.assertNotIn(b"+ Ready", out)
        out, _, transport = self.converse(b"a LOGIN {9000+}\r\n" + b"x" * 100)
        self.assertIn(b"a BAD [TOOBIG]", out)
        self.assertTrue(transport.disconnecting)

    def test_line_too_long(self):
        """A command line over the limit closes the connection with BYE;
        the rest is not buffered."""
        out, proto, transport = self.converse(b"a NOOP " + b"x" * 9000)
        self.assertIn(b"* BYE Command line too long", out)
        self.assertTrue(transport.disconnecting)
        out, _, _ = self.converse(b"a NOOP " + b"x" * 8000)
        self.assertNotIn(b"BYE", out)

    def test_garbage_gets_bad(self):
        """Unknown and malformed commands get BAD (tagged when there is a
        tag) and the session continues."""
        out, _, transport = self.converse(
            b"\r\n+++ NOOP\r\nx\r\nx FOO\r\nx UID FOO\r\nx noop extra\r\n"
            b"x LOGIN \"unterminated\r\n\x00\xff\r\ny NOOP\r\n"
        )
        self.assertIn(b"* BAD Invalid tag", out)
        self.assertIn(b"x BAD Syntax error: missing command", out)
        self.assertIn(b"x BAD Syntax error: unknown command FOO", out)
        self.assertIn(b"x BAD Syntax error: unknown UID command FOO", out)
        self.assertIn(b"y OK NOOP completed", out)
        self.assertFalse(transport.disconnecting)

    def test_too_many_bad_commands(self):
        """Twenty BAD commands in a row close the connection."""
        out, _, transport = self.converse(b"x FOO\r\n" * 25)
        self.assertEqual(out.count(b"x BAD"), 20)
        self.assertIn(b"* BYE Too many invalid commands", out)
        self.assertTrue(transport.disconnecting)

    def test_timeout_before_login(self):
        """An idle unauthenticated connection is closed after 60 s with BYE."""
        out, proto, transport = self.converse()
        self.clock.advance(59)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertIn(b"* BYE Autologout", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_timeout_after_login(self):
        """After login the autologout timer is 30 minutes (RFC 3501 5.4)."""
        proto, transport = self.logged_in(select=None)
        self.clock.advance(29 * 60)
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(b"n NOOP\r\n")
        self.clock.advance(29 * 60)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(61)
        self.assertTrue(transport.disconnecting)

    def test_pipelined_replies_in_order(self):
        """Many pipelined commands are answered in the order they came."""
        self.deliver(FIRST)
        proto, transport = self.logged_in()
        commands = b"".join(b"t%d NOOP\r\nu%d FETCH 1 FLAGS\r\n" % (i, i) for i in range(20))
        out = self.say(proto, transport, commands)
        tags = [line.split(b" ")[0] for line in lines(out) if not line.startswith(b"*")]
        self.assertEqual(tags, [t for i in range(20) for t in (b"t%d" % i, b"u%d" % i)])


class IdleTests(ServerTestMixin, SynchronousTestCase):
    def test_idle_reports_new_mail(self):
        """Mail delivered during IDLE is announced within a second (EXISTS
        and RECENT); DONE ends it with OK."""
        self.deliver(FIRST)
        proto, transport = self.logged_in()
        out = self.say(proto, transport, b"i IDLE\r\n")
        self.assertEqual(out, b"+ idling\r\n")
        self.deliver(SECOND)
        transport.clear()
        self.clock.advance(1)
        self.assertEqual(transport.value(), b"* 2 EXISTS\r\n* 2 RECENT\r\n")
        transport.clear()
        self.clock.advance(5)
        self.assertEqual(transport.value(), b"")
        out = self.say(proto, transport, b"DONE\r\nn NOOP\r\n")
        self.assertEqual(out, b"i OK IDLE terminated\r\nn OK NOOP completed\r\n")

    def test_idle_reports_expunge_and_flags(self):
        """Another session's expunge and flag changes reach an IDLE client."""
        self.deliver(FIRST, SECOND)
        proto, transport = self.logged_in()
        self.say(proto, transport, b"i IDLE\r\n")
        folder = self.mailbox().folder("INBOX")
        first, second = folder.scan()
        folder.expunge([first])
        folder.set_flags(second, {"\\Seen"})
        transport.clear()
        self.clock.advance(1)
        self.assertEqual(
            transport.value(), b"* 1 EXPUNGE\r\n* 1 FETCH (UID 2 FLAGS (\\Seen \\Recent))\r\n"
        )

    def test_idle_bad_continuation(self):
        """Anything but DONE during IDLE ends it with BAD; polling stops."""
        proto, transport = self.logged_in()
        out = self.say(proto, transport, b"i IDLE\r\nNOOP\r\n")
        self.assertIn(b"i BAD Expected DONE", out)
        self.assertEqual(
            [c for c in self.clock.getDelayedCalls() if c.func == proto._idle_check], []
        )

    def test_idle_polls_cheaply(self):
        """While the folder's directories do not change, IDLE polls do not
        rescan it; a delivery makes the next poll scan and report."""
        self.deliver(FIRST)
        proto, transport = self.logged_in()
        folder = proto.view.folder
        scans = []
        original = folder.scan

        def counting_scan(claim_new=False):
            scans.append(claim_new)
            return original(claim_new)

        folder.scan = counting_scan
        inbox = self.root / "example.test" / "alice"
        for sub in ("new", "cur"):
            os.utime(inbox / sub, (1_000_000_000, 1_000_000_000))
        self.say(proto, transport, b"i IDLE\r\n")
        for _ in range(5):
            self.clock.advance(1)
        self.assertEqual(len(scans), 1)
        self.deliver(SECOND)
        transport.clear()
        self.clock.advance(1)
        self.assertEqual(len(scans), 2)
        self.assertEqual(transport.value(), b"* 2 EXISTS\r\n* 2 RECENT\r\n")

    def test_noop_reports_new_mail(self):
        """NOOP (Thunderbird's poll) announces mail that arrived."""
        proto, transport = self.logged_in()
        self.deliver(FIRST)
        out = self.say(proto, transport, b"n noop\r\n")
        self.assertEqual(out, b"* 1 EXISTS\r\n* 1 RECENT\r\nn OK NOOP completed\r\n")


class ReadOnlyTests(ServerTestMixin, SynchronousTestCase):
    read_only = True

    def test_read_only_listener(self):
        """With read_only, SELECT is EXAMINE, nothing that changes the store
        is accepted, UIDPLUS and MOVE are not offered, and new/ stays."""
        self.deliver(FIRST)
        self.mailbox().ensure_special_folders()
        out, proto, transport = self.converse(LOGIN)
        self.assertNotIn(b"UIDPLUS", out)
        self.assertNotIn(b"MOVE", out)
        out = self.say(
            proto, transport,
            b"s SELECT INBOX\r\na STORE 1 +FLAGS (\\Seen)\r\nb EXPUNGE\r\nc COPY 1 Trash\r\n"
            b"d APPEND INBOX {1+}\r\nx\r\ne CREATE New\r\nf DELETE Junk\r\n"
            b"g RENAME Junk Spam\r\nh FETCH 1 BODY[]\r\ni MOVE 1 Trash\r\n"
            b"j SUBSCRIBE Junk\r\nk UID EXPUNGE 1\r\n",
        )
        self.assertIn(b"s OK [READ-ONLY]", out)
        self.assertIn(b"a NO [READ-ONLY]", out)
        self.assertIn(b"b NO [READ-ONLY]", out)
        for tag in b"cdefgj":
            self.assertIn(bytes([tag]) + b" NO [NOPERM] This server is read-only", out)
        self.assertIn(b"i NO", out)
        self.assertIn(b"k NO [READ-ONLY]", out)
        self.assertNotIn(b"FLAGS (\\Seen", out)
        self.assertEqual(len(os.listdir(self.root / "example.test" / "alice" / "new")), 1)
        self.assertEqual(self.mailbox().folder("Trash").scan(), [])

    def test_no_special_folders_created(self):
        """A read-only server does not create the special folders."""
        self.converse(LOGIN)
        self.assertEqual(self.mailbox().folders(), ["INBOX"])


# A whole Thunderbird-like session after implicit TLS, every reply known.
_SENT = b"From: alice@example.test\r\nSubject: sent\r\n\r\nHi Bob.\r\n"
_DRAFT = b"Subject: draft\r\n\r\nunfinished\r\n"
THUNDERBIRD = (
    b"1 capability\r\n"
    b"2 ID (\"name\" \"Thunderbird\" \"version\" \"128.3.1\")\r\n"
    b"3 authenticate PLAIN\r\n"
    + base64.b64encode(b"\0alice@example.test\0secret") + b"\r\n"
    b"4 namespace\r\n"
    b"5 list (subscribed) \"\" \"*\" return (special-use)\r\n"
    b"6 list \"\" \"INBOX\"\r\n"
    b"7 select \"INBOX\"\r\n"
    b"8 UID fetch 1:* (FLAGS)\r\n"
    b"9 UID fetch 1:* (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS (From To Cc Bcc "
    b"Subject Date Message-ID Priority X-Priority References Newsgroups In-Reply-To "
    b"Content-Type Reply-To)])\r\n"
    b"10 UID fetch 2 (UID RFC822.SIZE BODY[]<0.65536>)\r\n"
    b"11 UID fetch 1 (UID RFC822.SIZE BODY.PEEK[])\r\n"
    b"12 uid store 2 +FLAGS (\\Flagged)\r\n"
    b"13 append \"Sent\" (\\Seen) {%d+}\r\n%s\r\n" % (len(_SENT), _SENT)
    + b"14 append \"Drafts\" (\\Draft) {%d}\r\n%s\r\n" % (len(_DRAFT), _DRAFT)
    + b"15 IDLE\r\nDONE\r\n"
    b"16 uid move 1 \"Trash\"\r\n"
    b"17 uid copy 2 \"Trash\"\r\n"
    b"18 uid store 2 +FLAGS (\\Deleted \\Seen)\r\n"
    b"19 expunge\r\n"
    b"20 create \"Archive\"\r\n21 subscribe \"Archive\"\r\n"
    b"22 noop\r\n"
    b"23 logout\r\n"
)


class WholeSessionTests(ServerTestMixin, SynchronousTestCase):
    def check_session(self, out: bytes, transport) -> None:
        replies = [line for line in lines(out) if re.match(rb"\d+ ", line)]
        self.assertEqual([r.split(b" ")[0] for r in replies], [b"%d" % i for i in range(1, 24)])
        for reply in replies:
            self.assertEqual(reply.split(b" ")[1], b"OK", reply)
        self.assertIn(b"+ \r\n", out)
        self.assertIn(b"+ Ready for literal data\r\n", out)
        self.assertIn(b"+ idling\r\n", out)
        self.assertTrue(transport.disconnecting)

    def test_thunderbird_session(self):
        """Thunderbird's whole session fed in one piece against the real
        store: every command answered OK, in order, and the store changed
        as it should."""
        self.deliver(FIRST, SECOND)
        out, _, transport = self.converse(THUNDERBIRD)
        self.check_session(out, transport)
        mailbox = self.mailbox()
        self.assertEqual(mailbox.folder("INBOX").scan(), [])
        self.assertEqual(len(mailbox.folder("Trash").scan()), 2)
        self.assertEqual(len(mailbox.folder("Sent").scan()), 1)
        [draft] = mailbox.folder("Drafts").scan()
        self.assertEqual(draft.flags, {"\\Draft"})
        self.assertIn("Archive", mailbox.subscriptions())

    def test_thunderbird_session_every_split(self):
        """The same session split in two at every byte boundary, and one
        byte at a time, gives the same replies.  (Over the in-memory store:
        the store is not what is under test, and the real one would spend
        a minute creating directories.)"""
        mailboxes: list[MemoryMailbox] = []

        def fresh(user):
            mailbox = MemoryMailbox(user.address)
            mailbox.folder("INBOX").deliver(FIRST)
            mailbox.folder("INBOX").deliver(SECOND)
            mailboxes.append(mailbox)
            return IMAPAccount(user.address, open_mailbox=lambda hostname: mailbox)

        self.realm.avatars[IIMAPAccount] = fresh
        expected, _, transport = self.converse(THUNDERBIRD)
        self.check_session(expected, transport)
        self.assertEqual(len(mailboxes[-1].folder("Trash").scan()), 2)
        for cut in range(1, len(THUNDERBIRD)):
            out, _, _ = self.converse(chunks=[THUNDERBIRD[:cut], THUNDERBIRD[cut:]])
            self.assertEqual(out, expected, cut)
        out, _, _ = self.converse(
            chunks=[THUNDERBIRD[i : i + 1] for i in range(len(THUNDERBIRD))]
        )
        self.assertEqual(out, expected)


class InternalsTests(SynchronousTestCase):
    def test_loopback_detection(self):
        """127.0.0.0/8, ::1 and the IPv4-mapped loopback are loopback; a
        host name or another address is not."""
        for host in ("127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"):
            self.assertTrue(is_loopback(host), host)
        for host in ("192.0.2.1", "::2", "localhost", "?"):
            self.assertFalse(is_loopback(host), host)

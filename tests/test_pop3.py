"""
Protocol units for the POP3 server, on a string transport with a fake
clock, an in-memory folder and an in-memory password checker: every
command and response the issue names, STLS injection, the session lock,
deletions only at QUIT, and one whole session fed whole and split at every
byte boundary.
"""

from __future__ import annotations

import base64
import io
from dataclasses import replace
from pathlib import Path

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.mail.pop3 import IMailbox
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailsys.connections import is_loopback
from mailsys.maildir import MessageGone, MessageInfo
from mailsys.pop3 import (
    CHUNK_SIZE,
    LOCK_NAME,
    MailboxLocked,
    MessageSender,
    POP3Mailbox,
    POP3ServerFactory,
    _Transparency,
    uidl_for,
)
from mailsys.testing import TLSStringTransport

CLIENT = IPv4Address("TCP", "192.0.2.7", 40000)
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)
USER = b"alice@example.test"
PASSWORD = b"correct horse"
TLS = object()  # stands for the context factory; recorded by startTLS

FIRST = b"From: bob@remote.example\nSubject: one\n\nHello Alice.\n"
SECOND = (
    b"From: bob@remote.example\nSubject: two\n\n"
    b".leading dot\n..two dots\nline\n.\nend\n"
)
THIRD = b"Subject: three\n\nno final newline"


# -- an in-memory folder with the store's contract ----------------------------


class MemoryFolder:
    """
    The part of L{mailsys.maildir.Folder} POP3 uses, in memory; C{path} is
    a real directory (the session lock lives there).
    """

    name = "INBOX"
    uidvalidity = 1234

    def __init__(self, path: Path, messages=(FIRST, SECOND, THIRD)) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, bytes] = {}
        self.flags: dict[str, frozenset] = {}
        self.uids: dict[str, int] = {}
        self.new: set[str] = set()
        self.scans: list[bool] = []
        self.fail_scan: Exception | None = None
        self.fail_expunge: Exception | None = None
        for message in messages:
            self.add(message)

    def add(self, data: bytes, key: str | None = None) -> str:
        key = key or f"17000000{len(self.uids):02d}.M1P1Q{len(self.uids)}.host"
        self.files[key] = data
        self.flags[key] = frozenset()
        self.uids[key] = len(self.uids) + 1
        self.new.add(key)
        return key

    def _info(self, key: str) -> MessageInfo:
        data = self.files[key]
        return MessageInfo(
            uid=self.uids[key],
            key=key,
            path=self.path / ("new" if key in self.new else "cur") / key,
            flags=self.flags[key],
            size=len(data),
            crlf_size=len(data) + data.count(b"\n"),
            internal_date=0.0,
        )

    def scan(self, claim_new: bool = False) -> list[MessageInfo]:
        self.scans.append(claim_new)
        if self.fail_scan is not None:
            raise self.fail_scan
        if claim_new:
            self.new.clear()
        return sorted((self._info(k) for k in self.files), key=lambda i: i.uid)

    def open(self, info: MessageInfo):
        if info.key not in self.files:
            raise MessageGone(info.key)
        return io.BytesIO(self.files[info.key])

    def set_flags(self, info: MessageInfo, flags) -> MessageInfo:
        if info.key not in self.files:
            raise MessageGone(info.key)
        self.flags[info.key] = frozenset(flags)
        return replace(info, flags=frozenset(flags))

    def expunge(self, infos) -> None:
        if self.fail_expunge is not None:
            raise self.fail_expunge
        for info in infos:
            self.files.pop(info.key, None)


@implementer(IRealm)
class FolderRealm:
    """Gives every user a POP3 view of one folder, as MailRealm would."""

    def __init__(self, folder: MemoryFolder) -> None:
        self.folder = folder
        self.logouts = 0

    def requestAvatar(self, avatarId, mind, *interfaces):
        assert IMailbox in interfaces
        address = avatarId.decode() if isinstance(avatarId, bytes) else avatarId

        def logout():
            self.logouts += 1

        return IMailbox, POP3Mailbox(address, lambda: self.folder), logout


class HeldChecker:
    """A password checker whose answers the test releases by hand."""

    credentialInterfaces = InMemoryUsernamePasswordDatabaseDontUse.credentialInterfaces

    def __init__(self) -> None:
        self.pending: list[defer.Deferred] = []

    def requestAvatarId(self, credentials):
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return d


# -- helpers ------------------------------------------------------------------


def plain(
    user: bytes = USER, password: bytes = PASSWORD, authzid: bytes = b""
) -> bytes:
    """An AUTH PLAIN response (RFC 4616), base64-encoded."""
    return base64.b64encode(authzid + b"\0" + user + b"\0" + password)


def lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n")[:-1] if data.endswith(b"\r\n") else data.split(b"\r\n")


def statuses(data: bytes) -> list[bytes]:
    """The status lines (+OK, -ERR, +) of single-line responses, in order."""
    return [x for x in lines(data) if x.startswith((b"+", b"-ERR"))]


def wire(message: bytes) -> bytes:
    """The reference transformation: CRLF and dot-stuffing (RFC 1939 3)."""
    text = message if message.endswith(b"\n") else message + b"\n"
    out = []
    for line in text.split(b"\n")[:-1]:
        out.append((b"." + line if line.startswith(b".") else line) + b"\r\n")
    return b"".join(out)


def unstuff(body: bytes) -> bytes:
    return b"".join(
        line[1:] if line.startswith(b".") else line
        for line in body.splitlines(keepends=True)
    )


class SessionMixin:
    """A POP3 session on a fake transport with a fake clock and folder."""

    tls = TLS
    implicit_tls = False
    allow_plaintext_on_loopback = False

    def setUp(self) -> None:
        self.clock = Clock()
        self.folder = MemoryFolder(Path(self.mktemp()))
        self.realm = FolderRealm(self.folder)
        self.checker = InMemoryUsernamePasswordDatabaseDontUse()
        self.checker.addUser(USER, PASSWORD)
        self.portal = Portal(self.realm, [self.checker])
        self.factory = self.make_factory()

    def make_factory(self, **kw) -> POP3ServerFactory:
        options = dict(
            tls=self.tls,
            implicit_tls=self.implicit_tls,
            allow_plaintext_on_loopback=self.allow_plaintext_on_loopback,
            run_blocking=defer.maybeDeferred,
        )
        options.update(kw)
        return POP3ServerFactory(self.portal, "pop.example.test", self.clock, **options)

    def connect(self, peer=CLIENT, transport_class=TLSStringTransport, factory=None):
        proto = (factory or self.factory).buildProtocol(peer)
        transport = transport_class(peerAddress=peer)
        proto.makeConnection(transport)
        transport.clear()
        self.addCleanup(lambda: proto.mbox is not None and proto.mbox.close())
        return proto, transport

    def say(self, proto, transport, data: bytes) -> bytes:
        transport.clear()
        proto.dataReceived(data)
        return transport.value()

    def logged_in(self, **kw):
        """A session that is secure and logged in."""
        proto, transport = self.connect(**kw)
        proto.secure = True
        out = self.say(proto, transport, b"USER %s\r\nPASS %s\r\n" % (USER, PASSWORD))
        self.assertEqual(statuses(out), [b"+OK Send PASS", b"+OK Logged in"])
        transport.clear()
        return proto, transport

    def disconnect(self, proto, transport) -> None:
        transport.loseConnection()
        proto.connectionLost(None)


# -- the avatar ---------------------------------------------------------------


class MailboxTests(SessionMixin, SynchronousTestCase):
    def test_interface(self):
        """The avatar is a Twisted POP3 mailbox, usable by any IMailbox code."""
        mbox = POP3Mailbox(USER.decode(), lambda: self.folder)
        mbox.open()
        self.addCleanup(mbox.close)
        self.assertTrue(verifyObject(IMailbox, mbox))
        self.assertEqual(
            mbox.listMessages(),
            [len(m) + m.count(b"\n") for m in (FIRST, SECOND, THIRD)],
        )
        self.assertEqual(mbox.getMessage(0).read(), FIRST)
        mbox.deleteMessage(0)
        self.assertEqual(mbox.listMessages(0), 0)
        self.assertRaises(ValueError, mbox.getMessage, 0)
        self.assertRaises(ValueError, mbox.listMessages, 3)
        mbox.undeleteMessages()
        self.assertEqual(mbox.getUidl(0), self.folder.scan()[0].key)

    def test_open_claims_new(self):
        """Opening a session moves new mail to cur/, as Dovecot does."""
        mbox = POP3Mailbox(USER.decode(), lambda: self.folder)
        mbox.open()
        self.addCleanup(mbox.close)
        self.assertEqual(self.folder.scans, [True])
        self.assertEqual(self.folder.new, set())

    def test_lock_excludes_second_session(self):
        """A second opening of the same INBOX is refused until the first closes."""
        first = POP3Mailbox(USER.decode(), lambda: self.folder)
        second = POP3Mailbox(USER.decode(), lambda: self.folder)
        first.open()
        self.assertRaises(MailboxLocked, second.open)
        self.assertTrue((self.folder.path / LOCK_NAME).exists())
        first.close()
        second.open()
        second.close()

    def test_uidl_short_key_is_the_key(self):
        """A maildir key that is a valid RFC 1939 unique-id is used as is."""
        key = "1700000000.M1P2Q3.host,S=12,W=13"
        self.assertEqual(uidl_for(key), key)

    def test_uidl_long_key_is_hashed(self):
        """A key over 70 characters gets a stable 40-character unique-id."""
        key = "1700000000.M123456P12345Q1R0123456789abcdef.mail.example.test,S=1,W=2"
        key += "x" * (71 - len(key))
        self.assertEqual(len(uidl_for(key)), 40)
        self.assertEqual(uidl_for(key), uidl_for(key))
        self.assertNotEqual(uidl_for(key), uidl_for(key + "y"))

    def test_loopback(self):
        """Only 127.0.0.0/8 and ::1 count as loopback."""
        for host in ("127.0.0.1", "127.9.8.7", "::1", "::ffff:127.0.0.1"):
            self.assertTrue(is_loopback(host), host)
        for host in ("192.0.2.1", "::2", "localhost", "", "10.0.0.1"):
            self.assertFalse(is_loopback(host), host)


# -- greeting, CAPA, login policy ---------------------------------------------


class GreetingTests(SessionMixin, SynchronousTestCase):
    def test_greeting(self):
        """The greeting names the host and carries no APOP timestamp."""
        proto = self.factory.buildProtocol(CLIENT)
        transport = TLSStringTransport(peerAddress=CLIENT)
        proto.makeConnection(transport)
        self.assertEqual(transport.value(), b"+OK pop.example.test POP3 ready\r\n")

    def capa(self, proto, transport) -> list[bytes]:
        out = self.say(proto, transport, b"CAPA\r\n")
        got = lines(out)
        self.assertEqual(got[0], b"+OK Capability list follows")
        self.assertEqual(got[-1], b".")
        return got[1:-1]

    def test_capa_before_tls(self):
        """Before TLS CAPA offers STLS but no way to send a password."""
        caps = self.capa(*self.connect())
        for cap in (
            b"TOP",
            b"UIDL",
            b"RESP-CODES",
            b"AUTH-RESP-CODE",
            b"PIPELINING",
            b"EXPIRE NEVER",
            b"IMPLEMENTATION mailsys",
            b"STLS",
        ):
            self.assertIn(cap, caps)
        self.assertNotIn(b"USER", caps)
        self.assertFalse([c for c in caps if c.startswith(b"SASL")])

    def test_capa_after_stls(self):
        """After STLS, CAPA offers USER and SASL PLAIN LOGIN, and no STLS."""
        proto, transport = self.connect()
        self.say(proto, transport, b"STLS\r\n")
        caps = self.capa(proto, transport)
        self.assertIn(b"USER", caps)
        self.assertIn(b"SASL PLAIN LOGIN", caps)
        self.assertNotIn(b"STLS", caps)

    def test_capa_without_tls_configured(self):
        """With no certificate there is no STLS to offer."""
        self.factory = self.make_factory(tls=None)
        caps = self.capa(*self.connect())
        self.assertNotIn(b"STLS", caps)

    def test_capa_implicit_tls(self):
        """On POP3S the session is secure from the start: logins, no STLS."""
        self.factory = self.make_factory(implicit_tls=True)
        caps = self.capa(*self.connect())
        self.assertIn(b"USER", caps)
        self.assertNotIn(b"STLS", caps)

    def test_capa_after_login(self):
        """After login CAPA no longer lists login methods or STLS."""
        caps = self.capa(*self.logged_in())
        self.assertIn(b"TOP", caps)
        self.assertNotIn(b"USER", caps)
        self.assertNotIn(b"STLS", caps)
        self.assertFalse([c for c in caps if c.startswith(b"SASL")])

    def test_loopback_plaintext_allowed(self):
        """With the option on, a loopback client may log in without TLS."""
        self.factory = self.make_factory(allow_plaintext_on_loopback=True)
        proto, transport = self.connect(peer=LOOPBACK)
        self.assertIn(b"USER", self.capa(proto, transport))
        out = self.say(proto, transport, b"USER %s\r\nPASS %s\r\n" % (USER, PASSWORD))
        self.assertEqual(statuses(out), [b"+OK Send PASS", b"+OK Logged in"])

    def test_ipv6_loopback_plaintext_allowed(self):
        """::1 is loopback too."""
        self.factory = self.make_factory(allow_plaintext_on_loopback=True)
        peer = IPv6Address("TCP", "::1", 40000)
        proto, transport = self.connect(peer=peer)
        out = self.say(proto, transport, b"USER %s\r\n" % USER)
        self.assertEqual(statuses(out), [b"+OK Send PASS"])

    def test_loopback_needs_option(self):
        """Without the option, loopback clients need TLS like everyone else."""
        proto, transport = self.connect(peer=LOOPBACK)
        out = self.say(proto, transport, b"USER %s\r\n" % USER)
        self.assertTrue(out.startswith(b"-ERR [AUTH] Plaintext authentication"))

    def test_remote_never_plaintext(self):
        """The loopback option never opens plaintext logins to remote clients."""
        self.factory = self.make_factory(allow_plaintext_on_loopback=True)
        proto, transport = self.connect()
        attempts = b"USER a\r\nPASS b\r\nAUTH PLAIN\r\nAUTH LOGIN\r\n"
        out = self.say(proto, transport, attempts)
        self.assertEqual(len(statuses(out)), 4)
        for line in statuses(out):
            self.assertTrue(line.startswith(b"-ERR [AUTH] Plaintext"), line)
        self.assertEqual(self.folder.scans, [])

    def test_quit_before_login(self):
        """QUIT before login says goodbye and closes, touching nothing."""
        proto, transport = self.connect()
        out = self.say(proto, transport, b"QUIT\r\n")
        self.assertEqual(out, b"+OK Bye\r\n")
        self.assertTrue(transport.disconnecting)

    def test_transaction_commands_need_login(self):
        """STAT and the rest before login get a clear -ERR."""
        proto, transport = self.connect()
        for command in (b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"NOOP", b"RSET"):
            out = self.say(proto, transport, command + b"\r\n")
            self.assertEqual(out, b"-ERR Log in first\r\n", command)


# -- authentication -----------------------------------------------------------


class AuthenticationTests(SessionMixin, SynchronousTestCase):
    implicit_tls = True

    def test_user_pass(self):
        """USER and PASS log in and open the INBOX."""
        proto, transport = self.logged_in()
        self.assertEqual(proto.mbox.address, USER.decode())

    def test_wrong_password(self):
        """A wrong password gets the RFC 3206 [AUTH] code and another try."""
        proto, transport = self.connect()
        out = self.say(proto, transport, b"USER %s\r\nPASS wrong\r\n" % USER)
        self.assertEqual(
            statuses(out), [b"+OK Send PASS", b"-ERR [AUTH] Authentication failed"]
        )
        out = self.say(proto, transport, b"USER %s\r\nPASS %s\r\n" % (USER, PASSWORD))
        self.assertEqual(statuses(out)[-1], b"+OK Logged in")

    def test_unknown_user_same_reply(self):
        """USER accepts any name, and an unknown user fails like a bad password."""
        proto, transport = self.connect()
        out = self.say(proto, transport, b"USER nobody@example.test\r\nPASS x\r\n")
        self.assertEqual(
            statuses(out), [b"+OK Send PASS", b"-ERR [AUTH] Authentication failed"]
        )

    def test_password_with_spaces(self):
        """Spaces are part of the password (RFC 1939 7)."""
        self.checker.addUser(b"bob@example.test", b" two  spaces ")
        proto, transport = self.connect()
        out = self.say(
            proto, transport, b"USER bob@example.test\r\nPASS  two  spaces \r\n"
        )
        self.assertEqual(statuses(out)[-1], b"+OK Logged in")

    def test_pass_without_user(self):
        """PASS needs USER first."""
        proto, transport = self.connect()
        out = self.say(proto, transport, b"PASS %s\r\n" % PASSWORD)
        self.assertEqual(out, b"-ERR USER first\r\n")

    def test_user_syntax(self):
        """USER needs exactly one argument."""
        proto, transport = self.connect()
        self.assertEqual(
            self.say(proto, transport, b"USER\r\n"), b"-ERR Syntax: USER name\r\n"
        )
        self.assertEqual(
            self.say(proto, transport, b"USER a b\r\n"), b"-ERR Syntax: USER name\r\n"
        )

    def test_auth_plain_initial_response(self):
        """AUTH PLAIN with an initial response logs in in one line."""
        proto, transport = self.connect()
        out = self.say(proto, transport, b"AUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(out, b"+OK Logged in\r\n")

    def test_auth_plain_continuation(self):
        """AUTH PLAIN alone gets an empty challenge, then takes the response."""
        proto, transport = self.connect()
        self.assertEqual(self.say(proto, transport, b"AUTH PLAIN\r\n"), b"+ \r\n")
        self.assertEqual(
            self.say(proto, transport, plain() + b"\r\n"), b"+OK Logged in\r\n"
        )

    def test_auth_plain_authzid_same_user(self):
        """An authorization identity equal to the user is accepted."""
        proto, transport = self.connect()
        out = self.say(proto, transport, b"AUTH PLAIN " + plain(authzid=USER) + b"\r\n")
        self.assertEqual(out, b"+OK Logged in\r\n")

    def test_auth_plain_other_authzid(self):
        """Logging in as someone else (proxy authorization) is refused."""
        proto, transport = self.connect()
        response = plain(authzid=b"bob@example.test")
        out = self.say(proto, transport, b"AUTH PLAIN " + response + b"\r\n")
        self.assertTrue(out.startswith(b"-ERR [AUTH]"))
        self.assertIsNone(proto.mbox)

    def test_auth_plain_wrong_password(self):
        """A wrong PLAIN password is [AUTH] Authentication failed."""
        proto, transport = self.connect()
        response = plain(password=b"no")
        out = self.say(proto, transport, b"AUTH PLAIN " + response + b"\r\n")
        self.assertEqual(out, b"-ERR [AUTH] Authentication failed\r\n")

    def test_auth_cancel(self):
        """'*' cancels the exchange (RFC 5034 4) and the session goes on."""
        proto, transport = self.connect()
        self.say(proto, transport, b"AUTH PLAIN\r\n")
        self.assertEqual(
            self.say(proto, transport, b"*\r\n"), b"-ERR Authentication cancelled\r\n"
        )
        self.assertEqual(
            self.say(proto, transport, b"AUTH PLAIN " + plain() + b"\r\n"),
            b"+OK Logged in\r\n",
        )

    def test_auth_bad_base64(self):
        """Bad base64, in the initial response or after it, is refused clearly."""
        proto, transport = self.connect()
        out = self.say(proto, transport, b"AUTH PLAIN !!!\r\n")
        self.assertEqual(out, b"-ERR Invalid base64 in the initial response\r\n")
        self.say(proto, transport, b"AUTH PLAIN\r\n")
        out = self.say(proto, transport, b"a=b=\r\n")
        self.assertEqual(out, b"-ERR Invalid base64 in the response\r\n")

    def test_auth_plain_malformed(self):
        """A PLAIN response without its two NULs is refused."""
        proto, transport = self.connect()
        response = base64.b64encode(b"alice secret")
        out = self.say(proto, transport, b"AUTH PLAIN " + response + b"\r\n")
        self.assertEqual(out, b"-ERR [AUTH] Invalid PLAIN response\r\n")

    def test_auth_plain_empty_initial_response(self):
        """'=' is an empty initial response, which PLAIN cannot accept."""
        proto, transport = self.connect()
        out = self.say(proto, transport, b"AUTH PLAIN =\r\n")
        self.assertEqual(out, b"-ERR [AUTH] Invalid PLAIN response\r\n")

    def test_auth_login(self):
        """AUTH LOGIN asks for the user name, then the password."""
        proto, transport = self.connect()
        self.assertEqual(
            self.say(proto, transport, b"AUTH LOGIN\r\n"), b"+ VXNlcm5hbWU6\r\n"
        )
        self.assertEqual(
            self.say(proto, transport, base64.b64encode(USER) + b"\r\n"),
            b"+ UGFzc3dvcmQ6\r\n",
        )
        self.assertEqual(
            self.say(proto, transport, base64.b64encode(PASSWORD) + b"\r\n"),
            b"+OK Logged in\r\n",
        )

    def test_auth_login_initial_response(self):
        """AUTH LOGIN with the user name inline asks only for the password."""
        proto, transport = self.connect()
        line = b"AUTH LOGIN " + base64.b64encode(USER) + b"\r\n"
        out = self.say(proto, transport, line)
        self.assertEqual(out, b"+ UGFzc3dvcmQ6\r\n")
        out = self.say(proto, transport, base64.b64encode(b"bad") + b"\r\n")
        self.assertEqual(out, b"-ERR [AUTH] Authentication failed\r\n")

    def test_auth_list(self):
        """AUTH without a mechanism lists them, for RFC 1734 clients."""
        proto, transport = self.connect()
        out = self.say(proto, transport, b"AUTH\r\n")
        self.assertEqual(out, b"+OK Mechanisms follow\r\nPLAIN\r\nLOGIN\r\n.\r\n")

    def test_auth_unknown_mechanism(self):
        """A mechanism we do not offer is refused, not crashed on."""
        proto, transport = self.connect()
        out = self.say(proto, transport, b"AUTH CRAM-MD5\r\n")
        self.assertEqual(out, b"-ERR Unsupported authentication mechanism\r\n")

    def test_auth_long_response(self):
        """A SASL response up to 1 KB is read, longer than a command may be."""
        self.checker.addUser(USER, b"p" * 700)
        proto, transport = self.connect()
        self.say(proto, transport, b"AUTH PLAIN\r\n")
        response = plain(password=b"p" * 700)
        self.assertGreater(len(response), 255)
        self.assertEqual(
            self.say(proto, transport, response + b"\r\n"), b"+OK Logged in\r\n"
        )

    def test_login_twice(self):
        """USER after login is refused."""
        proto, transport = self.logged_in()
        out = self.say(proto, transport, b"USER %s\r\n" % USER)
        self.assertEqual(out, b"-ERR Command not valid after login\r\n")

    def test_login_logged(self):
        """Logins and failures are logged with the user and the client address."""
        with capturedLogs() as events:
            proto, transport = self.connect()
            self.say(proto, transport, b"USER %s\r\nPASS no\r\n" % USER)
            self.say(proto, transport, b"USER %s\r\nPASS %s\r\n" % (USER, PASSWORD))
        texts = [
            e["log_format"].format(**e)
            for e in events
            if e.get("log_namespace") == "mailsys.pop3"
        ]
        self.assertIn(
            "pop3 login failed for alice@example.test from 192.0.2.7 via USER", texts
        )
        self.assertIn(
            "pop3 login alice@example.test from 192.0.2.7 via USER: 3 messages", texts
        )

    def test_scan_failure(self):
        """A mailbox that cannot be read gets [SYS/TEMP], not a traceback."""
        self.folder.fail_scan = OSError("disk on fire")
        proto, transport = self.connect()
        out = self.say(proto, transport, b"AUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(
            out, b"-ERR [SYS/TEMP] Cannot open the mailbox, try again later\r\n"
        )
        self.assertIsNone(proto.mbox)
        self.assertEqual(self.realm.logouts, 1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


class LockTests(SessionMixin, SynchronousTestCase):
    implicit_tls = True

    def test_in_use(self):
        """A second session for the same mailbox gets [IN-USE] until the first ends."""
        first, first_transport = self.logged_in()
        second, transport = self.connect()
        out = self.say(second, transport, b"AUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(out, b"-ERR [IN-USE] Mailbox is locked by another session\r\n")
        self.assertIsNone(second.mbox)
        self.disconnect(first, first_transport)
        out = self.say(second, transport, b"AUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(out, b"+OK Logged in\r\n")

    def test_lock_released_after_quit(self):
        """After QUIT the next session may log in."""
        first, first_transport = self.logged_in()
        self.say(first, first_transport, b"QUIT\r\n")
        first.connectionLost(None)
        self.logged_in()

    def test_disconnect_during_login(self):
        """A client gone before the login finished leaves no lock behind."""
        held = HeldChecker()
        self.portal = Portal(self.realm, [held])
        self.factory = self.make_factory()
        proto, transport = self.connect()
        self.say(proto, transport, b"AUTH PLAIN " + plain() + b"\r\n")
        self.disconnect(proto, transport)
        held.pending[0].callback(USER)
        self.assertIsNone(proto.mbox)
        self.assertEqual(self.realm.logouts, 1)
        # The lock is free: a direct open succeeds.
        mbox = POP3Mailbox("x", lambda: self.folder)
        mbox.open()
        mbox.close()


# -- the TRANSACTION state ----------------------------------------------------


class TransactionTests(SessionMixin, SynchronousTestCase):
    implicit_tls = True

    def size(self, message: bytes) -> int:
        return len(message) + message.count(b"\n")

    def test_stat(self):
        """STAT counts the messages and their RFC 1939 octets (CRLF)."""
        proto, transport = self.logged_in()
        total = sum(self.size(m) for m in (FIRST, SECOND, THIRD))
        self.assertEqual(
            self.say(proto, transport, b"STAT\r\n"), b"+OK 3 %d\r\n" % total
        )

    def test_list(self):
        """LIST gives every message's size; LIST n one of them."""
        proto, transport = self.logged_in()
        out = self.say(proto, transport, b"LIST\r\n")
        sizes = [self.size(m) for m in (FIRST, SECOND, THIRD)]
        self.assertEqual(
            lines(out),
            [b"+OK 3 messages (%d octets)" % sum(sizes)]
            + [b"%d %d" % (i + 1, s) for i, s in enumerate(sizes)]
            + [b"."],
        )
        self.assertEqual(
            self.say(proto, transport, b"LIST 2\r\n"), b"+OK 2 %d\r\n" % sizes[1]
        )

    def test_bad_message_numbers(self):
        """Numbers out of range or not numbers get -ERR, never a traceback."""
        proto, transport = self.logged_in()
        for argument in (b"0", b"4", b"-1", b"x", b"1x", b"+1", b"99999999999", b"1 2"):
            for command in (b"LIST", b"UIDL", b"RETR", b"DELE", b"TOP"):
                line = command + b" " + argument + (b" 0" if command == b"TOP" else b"")
                out = self.say(proto, transport, line + b"\r\n")
                self.assertTrue(out.startswith(b"-ERR "), line)
                self.assertEqual(out.count(b"\r\n"), 1, line)
                proto.errors = 0  # this test is about the replies, not the limit
        self.assertEqual(self.say(proto, transport, b"LIST 4\r\n"),
                         b"-ERR No such message, only 3 in the maildrop\r\n")

    def test_uidl(self):
        """UIDL lists the maildir keys; UIDL n gives one."""
        proto, transport = self.logged_in()
        keys = [i.key for i in self.folder.scan()]
        out = self.say(proto, transport, b"UIDL\r\n")
        self.assertEqual(
            lines(out),
            [b"+OK Unique-id listing follows"]
            + [b"%d %s" % (i + 1, k.encode()) for i, k in enumerate(keys)]
            + [b"."],
        )
        self.assertEqual(
            self.say(proto, transport, b"UIDL 3\r\n"),
            b"+OK 3 %s\r\n" % keys[2].encode(),
        )

    def test_uidl_stable_across_flags(self):
        """A message keeps its unique-id when its flags change (the file is renamed)."""
        proto, transport = self.logged_in()
        before = self.say(proto, transport, b"UIDL\r\n")
        self.say(proto, transport, b"RETR 1\r\nQUIT\r\n")
        proto.connectionLost(None)
        self.assertIn("\\Seen", self.folder.flags[self.folder.scan()[0].key])
        proto, transport = self.logged_in()
        self.assertEqual(self.say(proto, transport, b"UIDL\r\n"), before)

    def test_retr(self):
        """RETR sends CRLF lines, dot-stuffed, ending with a lone dot."""
        proto, transport = self.logged_in()
        out = self.say(proto, transport, b"RETR 2\r\n")
        self.assertEqual(
            out, b"+OK %d octets\r\n" % self.size(SECOND) + wire(SECOND) + b".\r\n"
        )
        self.assertIn(b"\r\n..leading dot\r\n...two dots\r\n", out)
        self.assertIn(b"\r\n..\r\nend\r\n.\r\n", out)

    def test_list_size_is_retr_size(self):
        """The size LIST gives is exactly what RETR sends, before dot-stuffing."""
        proto, transport = self.logged_in()
        for n, message in ((1, FIRST), (2, SECOND)):
            listed = int(self.say(proto, transport, b"LIST %d\r\n" % n).split()[2])
            out = self.say(proto, transport, b"RETR %d\r\n" % n)
            body = out.split(b"\r\n", 1)[1][: -len(b".\r\n")]
            self.assertEqual(len(unstuff(body)), listed)
            self.assertEqual(unstuff(body).replace(b"\r\n", b"\n"), message)

    def test_retr_without_final_newline(self):
        """A message not ending in a newline still ends with CRLF . CRLF."""
        proto, transport = self.logged_in()
        out = self.say(proto, transport, b"RETR 3\r\n")
        self.assertTrue(out.endswith(b"no final newline\r\n.\r\n"))

    def test_top(self):
        """TOP n k sends the header, the blank line and k body lines."""
        proto, transport = self.logged_in()
        out = self.say(proto, transport, b"TOP 2 0\r\n")
        self.assertEqual(
            out,
            b"+OK Top of message follows\r\n"
            b"From: bob@remote.example\r\nSubject: two\r\n\r\n.\r\n",
        )
        out = self.say(proto, transport, b"TOP 2 2\r\n")
        self.assertTrue(out.endswith(b"\r\n\r\n..leading dot\r\n...two dots\r\n.\r\n"))
        out = self.say(proto, transport, b"TOP 2 100\r\n")
        self.assertTrue(out.endswith(wire(SECOND) + b".\r\n"))

    def test_top_does_not_mark_seen(self):
        """Only RETR marks a message seen; TOP is a peek."""
        proto, transport = self.logged_in()
        self.say(proto, transport, b"TOP 1 0\r\nQUIT\r\n")
        self.assertEqual(self.folder.flags[self.folder.scan()[0].key], frozenset())

    def test_top_syntax(self):
        """TOP needs a message and a line count."""
        proto, transport = self.logged_in()
        for line in (b"TOP 1", b"TOP 1 x", b"TOP 1 -1", b"TOP"):
            out = self.say(proto, transport, line + b"\r\n")
            self.assertTrue(out.startswith(b"-ERR "), line)

    def test_dele_only_at_quit(self):
        """DELE marks; the message disappears from the store only at QUIT."""
        proto, transport = self.logged_in()
        key = self.folder.scan()[0].key
        self.assertEqual(
            self.say(proto, transport, b"DELE 1\r\n"),
            b"+OK Message 1 marked to be deleted\r\n",
        )
        self.assertIn(key, self.folder.files)
        self.assertTrue(self.say(proto, transport, b"STAT\r\n").startswith(b"+OK 2 "))
        self.assertNotIn(b"\r\n1 ", self.say(proto, transport, b"LIST\r\n"))
        self.assertEqual(
            self.say(proto, transport, b"RETR 1\r\n"), b"-ERR Message 1 is deleted\r\n"
        )
        self.assertEqual(
            self.say(proto, transport, b"DELE 1\r\n"), b"-ERR Message 1 is deleted\r\n"
        )
        out = self.say(proto, transport, b"QUIT\r\n")
        self.assertEqual(out, b"+OK Logging out\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertNotIn(key, self.folder.files)
        self.assertEqual(len(self.folder.files), 2)

    def test_drop_deletes_nothing(self):
        """A connection lost without QUIT deletes nothing."""
        proto, transport = self.logged_in()
        self.say(proto, transport, b"DELE 1\r\nDELE 2\r\n")
        self.disconnect(proto, transport)
        self.assertEqual(len(self.folder.files), 3)

    def test_timeout_deletes_nothing(self):
        """The autologout timer closes without the UPDATE state (RFC 1939 3)."""
        proto, transport = self.logged_in()
        self.say(proto, transport, b"DELE 1\r\n")
        self.clock.advance(600)
        proto.connectionLost(None)
        self.assertEqual(len(self.folder.files), 3)

    def test_rset(self):
        """RSET unmarks every deleted message."""
        proto, transport = self.logged_in()
        self.say(proto, transport, b"DELE 1\r\nDELE 3\r\n")
        out = self.say(proto, transport, b"RSET\r\n")
        self.assertTrue(out.startswith(b"+OK 3 messages"))
        self.say(proto, transport, b"QUIT\r\n")
        self.assertEqual(len(self.folder.files), 3)

    def test_retrieved_marked_seen(self):
        """Messages retrieved get \\Seen at QUIT, so IMAP shows them read."""
        proto, transport = self.logged_in()
        self.say(proto, transport, b"RETR 2\r\n")
        keys = [i.key for i in self.folder.scan()]
        self.assertEqual(self.folder.flags[keys[1]], frozenset())
        self.say(proto, transport, b"QUIT\r\n")
        self.assertEqual(self.folder.flags[keys[1]], frozenset({"\\Seen"}))
        self.assertEqual(self.folder.flags[keys[0]], frozenset())

    def test_expunge_failure(self):
        """If the deletions fail, QUIT says so with [SYS/TEMP] and still closes."""
        self.folder.fail_expunge = OSError("read-only file system")
        proto, transport = self.logged_in()
        out = self.say(proto, transport, b"DELE 1\r\nQUIT\r\n")
        self.assertEqual(
            statuses(out)[-1], b"-ERR [SYS/TEMP] Some deleted messages were not removed"
        )
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_message_gone(self):
        """A message expunged by another session meanwhile is an -ERR."""
        proto, transport = self.logged_in()
        del self.folder.files[self.folder.scan()[0].key]
        out = self.say(proto, transport, b"RETR 1\r\n")
        self.assertEqual(out, b"-ERR Message was removed by another session\r\n")

    def test_quit_logged(self):
        """QUIT logs how many messages were retrieved and deleted."""
        proto, transport = self.logged_in()
        with capturedLogs() as events:
            self.say(proto, transport, b"RETR 1\r\nRETR 2\r\nDELE 1\r\nQUIT\r\n")
        texts = [
            e["log_format"].format(**e)
            for e in events
            if e.get("log_namespace") == "mailsys.pop3"
        ]
        self.assertIn(
            "pop3 logout alice@example.test from 192.0.2.7: retrieved 2 deleted 1",
            texts,
        )

    def test_lock_held_until_update_done(self):
        """A client gone while QUIT's deletions run keeps the mailbox locked
        until they finish, so no other session sees a half-updated list."""
        held: list[defer.Deferred] = []

        def run(f, *args):
            if getattr(f, "__name__", "") != "sync":
                return defer.maybeDeferred(f, *args)
            d: defer.Deferred = defer.Deferred()
            held.append(d)
            d.addCallback(lambda ignored: f(*args))
            return d

        self.factory = self.make_factory(run_blocking=run)
        proto, transport = self.logged_in()
        mbox = proto.mbox
        self.say(proto, transport, b"DELE 1\r\nQUIT\r\n")
        self.clock.advance(600)
        proto.connectionLost(None)
        self.assertIsNotNone(mbox._lock)
        other = POP3Mailbox("x", lambda: self.folder)
        self.assertRaises(MailboxLocked, other.open)
        held[0].callback(None)
        self.assertIsNone(mbox._lock)
        self.assertEqual(len(self.folder.files), 2)
        self.assertEqual(self.realm.logouts, 1)

    def test_noop(self):
        """NOOP answers +OK."""
        proto, transport = self.logged_in()
        self.assertEqual(self.say(proto, transport, b"NOOP\r\n"), b"+OK\r\n")

    def test_nothing_after_quit(self):
        """Commands pipelined after QUIT are not run."""
        proto, transport = self.logged_in()
        out = self.say(proto, transport, b"QUIT\r\nDELE 1\r\nNOOP\r\n")
        self.assertEqual(out, b"+OK Logging out\r\n")
        self.assertEqual(len(self.folder.files), 3)


# -- framing, limits, errors --------------------------------------------------


class InputTests(SessionMixin, SynchronousTestCase):
    def test_line_limit(self):
        """A 255-octet command is read; a longer one is -ERR and the session goes on."""
        proto, transport = self.logged_in()
        at_limit = b"NOOP " + b"x" * (255 - 7) + b"\r\n"
        self.assertEqual(len(at_limit), 255)
        self.assertEqual(self.say(proto, transport, at_limit), b"+OK\r\n")
        over = b"NOOP " + b"x" * (256 - 7) + b"\r\n"
        self.assertEqual(self.say(proto, transport, over), b"-ERR Line too long\r\n")
        self.assertEqual(self.say(proto, transport, b"NOOP\r\n"), b"+OK\r\n")

    def test_huge_line(self):
        """Megabytes without a newline are dropped, not buffered."""
        proto, transport = self.connect()
        out = self.say(proto, transport, b"x" * 1_000_000)
        self.assertEqual(out, b"-ERR Line too long\r\n")
        self.assertLess(proto._framer.buffered, 2048)
        out = self.say(proto, transport, b"y" * 10 + b"\r\nCAPA\r\n")
        self.assertTrue(out.startswith(b"+OK Capability"))

    def test_bare_lf(self):
        """A command ending in a bare LF is -ERR, and the next CRLF one works."""
        proto, transport = self.connect()
        out = self.say(proto, transport, b"CAPA\nQUIT\r\n")
        self.assertEqual(
            out, b"-ERR Bare CR or LF in command, use CRLF\r\n+OK Bye\r\n"
        )

    def test_bare_cr(self):
        """A CR inside a command is refused."""
        proto, transport = self.connect()
        out = self.say(proto, transport, b"CAPA\rQUIT\r\n")
        self.assertEqual(out, b"-ERR Bare CR or LF in command, use CRLF\r\n")

    def test_nul_and_garbage(self):
        """NUL, binary garbage and empty lines get -ERR, never a traceback."""
        proto, transport = self.logged_in()
        for line in (b"NO\0OP", b"\xff\xfe", b"", b"   ", b"LIST \xc3\xa9", b"123"):
            out = self.say(proto, transport, line + b"\r\n")
            self.assertTrue(out.startswith(b"-ERR "), line)
            self.assertEqual(out.count(b"\r\n"), 1, line)
            proto.errors = 0
        self.assertEqual(self.say(proto, transport, b"NOOP\r\n"), b"+OK\r\n")

    def test_unknown_command(self):
        """Commands we do not know, and APOP, are -ERR Unknown command."""
        proto, transport = self.connect()
        for line in (b"XYZZY", b"APOP alice 0123", b"LAST", b"RPOP x"):
            self.assertEqual(
                self.say(proto, transport, line + b"\r\n"), b"-ERR Unknown command\r\n"
            )

    def test_case_insensitive(self):
        """Command keywords are case-insensitive (RFC 1939 3)."""
        proto, transport = self.logged_in()
        self.assertEqual(self.say(proto, transport, b"noop\r\n"), b"+OK\r\n")
        self.assertTrue(self.say(proto, transport, b"sTaT\r\n").startswith(b"+OK 3 "))

    def test_too_many_errors(self):
        """After ten errors the server says so and closes."""
        proto, transport = self.connect()
        out = self.say(proto, transport, b"BAD\r\n" * 9)
        self.assertFalse(transport.disconnecting)
        out = self.say(proto, transport, b"BAD\r\nCAPA\r\n")
        self.assertEqual(
            out, b"-ERR Unknown command\r\n-ERR Too many errors, closing connection\r\n"
        )
        self.assertTrue(transport.disconnecting)

    def test_timeout(self):
        """Ten minutes of silence closes the session with an -ERR line."""
        proto, transport = self.connect()
        self.clock.advance(599)
        self.say(proto, transport, b"CAPA\r\n")
        self.clock.advance(599)
        self.assertFalse(transport.disconnecting)
        transport.clear()
        self.clock.advance(1)
        self.assertEqual(transport.value(), b"-ERR Disconnected for inactivity\r\n")
        self.assertTrue(transport.disconnecting)

    def test_timeout_configurable(self):
        """The timer is the factory's."""
        self.factory = self.make_factory(timeout=30)
        proto, transport = self.connect()
        self.clock.advance(30)
        self.assertTrue(transport.disconnecting)

    def test_pipelined_login_in_order(self):
        """Commands pipelined behind a pending login are answered after it, in order."""
        held = HeldChecker()
        self.portal = Portal(self.realm, [held])
        self.factory = self.make_factory(implicit_tls=True)
        proto, transport = self.connect()
        pipelined = b"USER %s\r\nPASS x\r\nSTAT\r\nNOOP\r\n" % USER
        out = self.say(proto, transport, pipelined)
        self.assertEqual(out, b"+OK Send PASS\r\n")
        transport.clear()
        held.pending[0].callback(USER)
        self.assertEqual(
            statuses(transport.value()), [b"+OK Logged in", b"+OK 3 %d" % sum(
                len(m) + m.count(b"\n") for m in (FIRST, SECOND, THIRD)), b"+OK"]
        )

    def test_pipelined_failure_in_order(self):
        """A failed pipelined login makes the next command's reply come after it."""
        held = HeldChecker()
        self.portal = Portal(self.realm, [held])
        self.factory = self.make_factory(implicit_tls=True)
        proto, transport = self.connect()
        self.say(proto, transport, b"AUTH PLAIN " + plain() + b"\r\nSTAT\r\n")
        held.pending[0].errback(UnauthorizedLogin())
        self.assertEqual(
            statuses(transport.value()),
            [b"-ERR [AUTH] Authentication failed", b"-ERR Log in first"],
        )

    def test_pause_while_waiting(self):
        """A client flooding while a reply is pending is paused, then resumed."""
        held = HeldChecker()
        self.portal = Portal(self.realm, [held])
        self.factory = self.make_factory(implicit_tls=True)
        proto, transport = self.connect()
        flood = b"AUTH PLAIN " + plain() + b"\r\n" + b"NOOP\r\n" * 20000
        self.say(proto, transport, flood)
        self.assertEqual(transport.producerState, "paused")
        held.pending[0].callback(USER)
        self.assertEqual(transport.producerState, "producing")


# -- STLS ---------------------------------------------------------------------


class STLSTests(SessionMixin, SynchronousTestCase):
    def test_stls(self):
        """STLS answers +OK and starts TLS with the configured context."""
        proto, transport = self.connect()
        out = self.say(proto, transport, b"STLS\r\n")
        self.assertEqual(out, b"+OK Begin TLS negotiation\r\n")
        self.assertIs(transport.tls_started_with, TLS)
        self.assertTrue(proto.secure)

    def test_stls_injection(self):
        """Commands pipelined in clear after STLS are dropped, never run
        (CVE-2011-0411 class)."""
        self.factory = self.make_factory(allow_plaintext_on_loopback=False)
        proto, transport = self.connect()
        out = self.say(proto, transport, b"STLS\r\nUSER x\r\nPASS y\r\n")
        self.assertEqual(out, b"+OK Begin TLS negotiation\r\n")
        # Had USER run, PASS would now log in or complain differently.
        out = self.say(proto, transport, b"PASS y\r\n")
        self.assertEqual(out, b"-ERR USER first\r\n")

    def test_stls_forgets_user(self):
        """A USER given before STLS is forgotten (RFC 2595 4)."""
        self.factory = self.make_factory(allow_plaintext_on_loopback=True)
        proto, transport = self.connect(peer=LOOPBACK)
        self.say(proto, transport, b"USER %s\r\n" % USER)
        self.say(proto, transport, b"STLS\r\n")
        out = self.say(proto, transport, b"PASS %s\r\n" % PASSWORD)
        self.assertEqual(out, b"-ERR USER first\r\n")

    def test_stls_twice(self):
        """STLS inside TLS is refused."""
        proto, transport = self.connect()
        self.say(proto, transport, b"STLS\r\n")
        self.assertEqual(
            self.say(proto, transport, b"STLS\r\n"), b"-ERR TLS is already active\r\n"
        )

    def test_stls_implicit(self):
        """STLS on POP3S is refused."""
        self.factory = self.make_factory(implicit_tls=True)
        proto, transport = self.connect()
        self.assertEqual(
            self.say(proto, transport, b"STLS\r\n"), b"-ERR TLS is already active\r\n"
        )

    def test_stls_after_login(self):
        """STLS after login is refused (RFC 2595 4: AUTHORIZATION state only)."""
        self.factory = self.make_factory(allow_plaintext_on_loopback=True)
        proto, transport = self.connect(peer=LOOPBACK)
        self.say(proto, transport, b"USER %s\r\nPASS %s\r\n" % (USER, PASSWORD))
        self.assertEqual(
            self.say(proto, transport, b"STLS\r\n"),
            b"-ERR Command not valid after login\r\n",
        )
        self.assertIsNone(transport.tls_started_with)

    def test_stls_not_configured(self):
        """Without a certificate, or on a transport that cannot, STLS is refused."""
        self.factory = self.make_factory(tls=None)
        proto, transport = self.connect()
        self.assertEqual(
            self.say(proto, transport, b"STLS\r\n"), b"-ERR STLS not available\r\n"
        )
        self.factory = self.make_factory()
        proto, transport = self.connect(transport_class=StringTransport)
        self.assertEqual(
            self.say(proto, transport, b"STLS\r\n"), b"-ERR STLS not available\r\n"
        )

    def test_stls_arguments(self):
        """STLS takes no arguments."""
        proto, transport = self.connect()
        self.assertEqual(
            self.say(proto, transport, b"STLS now\r\n"),
            b"-ERR STLS takes no arguments\r\n",
        )
        self.assertIsNone(transport.tls_started_with)


# -- whole sessions -----------------------------------------------------------

THUNDERBIRD = [
    b"CAPA\r\n",
    b"STLS\r\n",
    b"CAPA\r\n",
    b"AUTH PLAIN\r\n",
    plain() + b"\r\n",
    b"STAT\r\n",
    b"LIST\r\n",
    b"UIDL\r\n",
    b"RETR 2\r\n",
    b"DELE 2\r\n",
    b"QUIT\r\n",
]

# One session over implicit TLS using every command.
SESSION = (
    b"CAPA\r\n"
    b"AUTH PLAIN\r\n" + plain() + b"\r\n"
    b"STAT\r\nLIST\r\nLIST 2\r\nUIDL\r\nUIDL 1\r\nTOP 2 1\r\nRETR 2\r\nRETR 3\r\n"
    b"DELE 1\r\nRSET\r\nDELE 3\r\nNOOP\r\nQUIT\r\n"
)


class SessionTests(SessionMixin, SynchronousTestCase):
    def test_thunderbird(self):
        """Thunderbird's POP3 sequence over STLS works step by step."""
        proto, transport = self.connect()
        replies = []
        for command in THUNDERBIRD:
            replies.append(self.say(proto, transport, command))
        self.assertIn(b"\r\nSTLS\r\n", replies[0])
        self.assertEqual(replies[1], b"+OK Begin TLS negotiation\r\n")
        self.assertIn(b"\r\nSASL PLAIN LOGIN\r\n", replies[2])
        self.assertEqual(replies[3], b"+ \r\n")
        self.assertEqual(replies[4], b"+OK Logged in\r\n")
        self.assertTrue(replies[5].startswith(b"+OK 3 "))
        self.assertTrue(replies[6].endswith(b"\r\n3 %d\r\n.\r\n" % (len(THIRD) + 2)))
        self.assertEqual(len(lines(replies[7])), 5)
        self.assertTrue(replies[8].endswith(wire(SECOND) + b".\r\n"))
        self.assertEqual(replies[9], b"+OK Message 2 marked to be deleted\r\n")
        self.assertEqual(replies[10], b"+OK Logging out\r\n")
        self.assertEqual(len(self.folder.files), 2)

    def run_session(self, chunks: list[bytes]) -> bytes:
        self.folder = MemoryFolder(Path(self.mktemp()))
        self.realm.folder = self.folder
        factory = self.make_factory(implicit_tls=True)
        proto, transport = self.connect(factory=factory)
        for chunk in chunks:
            proto.dataReceived(chunk)
        proto.connectionLost(None)
        self.assertEqual(len(self.folder.files), 2)
        return transport.value()

    def test_session_whole(self):
        """A whole session in one write answers every command, in order."""
        out = self.run_session([SESSION])
        replies = [x for x in lines(out) if x.startswith((b"+OK", b"-ERR"))]
        self.assertEqual(len(replies), 15)
        self.assertNotIn(b"-ERR", out)
        self.assertTrue(out.endswith(b"+OK Logging out\r\n"))

    def test_session_split_everywhere(self):
        """The same session split at every byte boundary gives the same output."""
        whole = self.run_session([SESSION])
        for cut in range(1, len(SESSION)):
            self.assertEqual(
                self.run_session([SESSION[:cut], SESSION[cut:]]), whole, f"cut at {cut}"
            )

    def test_session_byte_by_byte(self):
        """The same session one byte at a time gives the same output."""
        whole = self.run_session([SESSION])
        self.assertEqual(
            self.run_session([SESSION[i : i + 1] for i in range(len(SESSION))]), whole
        )


# -- streaming ----------------------------------------------------------------


class TransparencyTests(SynchronousTestCase):
    def feed(self, message: bytes, size: int, body_lines=None) -> bytes:
        t = _Transparency(body_lines)
        out = []
        for i in range(0, len(message), size):
            out.append(t.feed(message[i : i + size]))
            if t.done:
                break
        return b"".join(out) + t.end()

    def test_every_chunk_size(self):
        """Dots and line ends are handled the same wherever the reads split them."""
        message = b".a\n..b\n\n.\nc.\n.d\r\n.e"
        expected = b"..a\r\n...b\r\n\r\n..\r\nc.\r\n..d\r\n..e\r\n"
        for size in range(1, len(message) + 1):
            self.assertEqual(self.feed(message, size), expected, size)

    def test_top_every_chunk_size(self):
        """TOP stops after the right line wherever the reads split the message."""
        message = b"A: 1\nB: 2\n\n.one\ntwo\nthree\n"
        for size in range(1, len(message) + 1):
            self.assertEqual(self.feed(message, size, 0), b"A: 1\r\nB: 2\r\n\r\n")
            self.assertEqual(
                self.feed(message, size, 2), b"A: 1\r\nB: 2\r\n\r\n..one\r\ntwo\r\n"
            )

    def test_long_line(self):
        """A line longer than a chunk is passed on in pieces, not held whole."""
        t = _Transparency()
        first = t.feed(b"." + b"x" * (2 * CHUNK_SIZE))
        self.assertEqual(len(first), 2 * CHUNK_SIZE + 2)
        self.assertTrue(first.startswith(b".."))
        self.assertEqual(t.feed(b".y\n.z\n"), b".y\r\n..z\r\n")

    def test_long_line_split_crlf(self):
        """A stored CRLF split between two reads of a long line stays one CRLF."""
        t = _Transparency()
        out = t.feed(b"x" * (CHUNK_SIZE + 5) + b"\r") + t.feed(b"\nnext\n") + t.end()
        self.assertEqual(out, b"x" * (CHUNK_SIZE + 5) + b"\r\nnext\r\n")


class SenderTests(SynchronousTestCase):
    def test_big_message_streamed(self):
        """A message of many chunks goes out in many writes, CRLF and dot-stuffed."""
        body = b"".join(b".line %d\n" % i for i in range(200_000))
        transport = StringTransport()
        sender = MessageSender(transport, io.BytesIO(body), defer.maybeDeferred)
        done = []
        sender.start().addCallback(done.append)
        self.assertEqual(done, [None])
        self.assertEqual(transport.value(), wire(body) + b".\r\n")
        self.assertIsNone(transport.producer)

    def test_pause_and_resume(self):
        """While the transport is full no chunk is read; resuming continues."""
        reads: list[defer.Deferred] = []

        def run(f, *args):
            d: defer.Deferred = defer.Deferred()
            reads.append((d, f, args))
            return d

        source = io.BytesIO(b"a\n" * CHUNK_SIZE)
        transport = StringTransport()
        sender = MessageSender(transport, source, run)
        sender.start()
        self.assertEqual(len(reads), 1)
        sender.pauseProducing()
        d, f, args = reads.pop()
        d.callback(f(*args))
        self.assertEqual(reads, [])
        sender.resumeProducing()
        self.assertEqual(len(reads), 1)
        for _ in range(3):
            if not reads:
                break
            d, f, args = reads.pop()
            d.callback(f(*args))
        self.assertEqual(transport.value(), b"a\r\n" * CHUNK_SIZE + b".\r\n")

    def test_stop(self):
        """A lost connection stops the reading and closes the file."""
        source = io.BytesIO(b"a\n")
        held: list[defer.Deferred] = []
        transport = StringTransport()
        sender = MessageSender(
            transport, source, lambda f, *a: held.append(defer.Deferred()) or held[-1]
        )
        failures = []
        sender.start().addErrback(failures.append)
        sender.stopProducing()
        self.assertEqual(len(failures), 1)
        # A read is still running in its thread: the file stays open for
        # it, and is closed when it returns; its data is dropped.
        self.assertFalse(source.closed)
        held[0].callback(b"a\n")
        self.assertTrue(source.closed)
        self.assertEqual(transport.value(), b"")

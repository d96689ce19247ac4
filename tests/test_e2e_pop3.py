"""
End to end: the POP3 listener on a loopback port, over STLS and over
implicit TLS with a generated certificate, the real password checker and
realm, and the real maildir store; spoken to with Python's poplib from a
thread, as fetchmail or Thunderbird would.
"""

from __future__ import annotations

import base64
import io
import poplib
import ssl
from pathlib import Path

from twisted.cred.portal import Portal
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.mail.pop3 import IMailbox
from twisted.trial.unittest import TestCase

from mailsys.accounts import MailRealm, MailUser, PasswordChecker, UserStore
from mailsys.maildir import MaildirStore
from mailsys.pop3 import POP3Mailbox, POP3ServerFactory, pop3_avatar, uidl_for
from mailsys.testing import CHEAP_HASHER, RecordsSessionEnds
from mailsys.tls import ServerTLS, ensure_certificate

ALICE = "alice@example.test"
SECRET = "s3cret pass"

FIRST = b"From: bob@remote.example\nSubject: first\n\nHello Alice.\n"
DOTTED = (
    b"From: bob@remote.example\nSubject: dots\n\n"
    b".starts with a dot\n..two\n.\nlast line\n"
)


class RecordingFactory(RecordsSessionEnds, POP3ServerFactory):
    """Remembers when each session has really ended, for a clean teardown."""


class POP3EndToEndTests(TestCase):
    """poplib against the real listener, store, checker and realm."""

    def setUp(self):
        state = Path(self.mktemp()).resolve()
        state.mkdir(parents=True)
        self.mail_dir = state / "mail"
        cert, key = state / "cert.pem", state / "key.pem"
        ensure_certificate(cert, key, "mail.example.test")
        tls = ServerTLS(cert, key)
        tls.load()
        self.context = ssl.create_default_context(cafile=str(cert))
        users = UserStore(state / "users.json", ["example.test"], hasher=CHEAP_HASHER)
        users.add(ALICE, SECRET)
        self.store = MaildirStore(self.mail_dir, "mail.example.test")
        portal = Portal(
            MailRealm(self.mail_dir, {IMailbox: pop3_avatar}),
            [PasswordChecker(users, reactor)],
        )
        self.factories = []
        starttls = RecordingFactory(
            portal, "mail.example.test", reactor, tls=tls.contextFactory()
        )
        implicit = RecordingFactory(
            portal, "mail.example.test", reactor, implicit_tls=True
        )
        self.port = self.listen(starttls)
        self.tls_port = self.listen(implicit, wrap=tls.wrap)

    def listen(self, factory, wrap=lambda f: f) -> int:
        self.factories.append(factory)
        port = reactor.listenTCP(0, wrap(factory), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def tearDown(self):
        # Every session has closed on the server side before the next test.
        return defer.DeferredList([d for f in self.factories for d in f.ended])

    def deliver(self, *messages: bytes) -> list[Path]:
        return [self.store.deliver([ALICE], io.BytesIO(m))[0] for m in messages]

    def inbox_files(self) -> list[Path]:
        root = self.store.path_for(ALICE)
        return sorted(p for sub in ("new", "cur") for p in (root / sub).iterdir())

    def stls_client(self) -> poplib.POP3:
        client = poplib.POP3("127.0.0.1", self.port, timeout=10)
        client.stls(self.context)
        client.user(ALICE)
        client.pass_(SECRET)
        return client

    @defer.inlineCallbacks
    def test_stls_retrieve(self):
        """Over STLS, RETR gives the stored bytes (LF on disk, CRLF on the
        wire, dots unstuffed by the client) and the octets LIST announced."""
        self.deliver(FIRST, DOTTED)

        def session():
            client = self.stls_client()
            try:
                count, total = client.stat()
                listing = client.list()[1]
                sizes = [int(x.split()[1]) for x in listing]
                retrieved = [client.retr(n) for n in (1, 2)]
                return count, total, sizes, retrieved, client.sock.version()
            finally:
                client.quit()

        count, total, sizes, retrieved, version = yield deferToThread(session)
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(count, 2)
        crlf = [len(FIRST) + FIRST.count(b"\n"), len(DOTTED) + DOTTED.count(b"\n")]
        self.assertEqual(sizes, crlf)
        self.assertEqual(total, sum(crlf))
        expected = zip(retrieved, (FIRST, DOTTED), crlf)
        for (response, lines, octets), message, size in expected:
            self.assertEqual(response, b"+OK %d octets" % size)
            self.assertEqual(b"\n".join(lines) + b"\n", message)
            self.assertEqual(octets, size)
        # Retrieved messages were claimed into cur/ and are \Seen now.
        files = self.inbox_files()
        self.assertEqual([p.parent.name for p in files], ["cur", "cur"])
        self.assertTrue(all(p.name.endswith(":2,S") for p in files), files)

    @defer.inlineCallbacks
    def test_wire_bytes(self):
        """The raw response to RETR is the message with CRLF, dot-stuffed, then '.'."""
        self.deliver(DOTTED)

        def session():
            client = self.stls_client()
            try:
                client._putcmd("RETR 1")
                raw = b""
                while not raw.endswith(b"\r\n.\r\n"):
                    raw += client.file.readline()
                return raw
            finally:
                client.quit()

        raw = yield deferToThread(session)
        first, body = raw.split(b"\r\n", 1)
        self.assertEqual(
            body,
            b"From: bob@remote.example\r\nSubject: dots\r\n\r\n"
            b"..starts with a dot\r\n...two\r\n..\r\nlast line\r\n.\r\n",
        )

    @defer.inlineCallbacks
    def test_uidl_stable(self):
        """UIDL is the same in two sessions, though the first moved the
        files to cur/ and flagged nothing."""
        self.deliver(FIRST, DOTTED)

        def uidl():
            client = self.stls_client()
            try:
                return client.uidl()[1]
            finally:
                client.quit()

        first = yield deferToThread(uidl)
        second = yield deferToThread(uidl)
        self.assertEqual(len(first), 2)
        self.assertEqual(first, second)
        # Derived from the maildir keys, which flag changes never alter.
        keys = [p.name.partition(":")[0] for p in self.inbox_files()]
        uids = [line.split()[1] for line in first]
        self.assertEqual(uids, [uidl_for(k).encode() for k in keys])
        for uid in uids:
            self.assertTrue(1 <= len(uid) <= 70, uid)

    @defer.inlineCallbacks
    def test_dele_quit_removes_file(self):
        """DELE then QUIT removes the file; the other message stays."""
        first, second = self.deliver(FIRST, DOTTED)

        def session():
            client = self.stls_client()
            client.dele(1)
            return client.quit()

        response = yield deferToThread(session)
        self.assertEqual(response, b"+OK Logging out")
        files = self.inbox_files()
        self.assertEqual(len(files), 1)
        self.assertEqual(files[0].name.partition(":")[0], second.name)

    @defer.inlineCallbacks
    def test_drop_keeps_messages(self):
        """DELE without QUIT (the connection dropped) removes nothing."""
        self.deliver(FIRST, DOTTED)

        def session():
            client = self.stls_client()
            client.dele(1)
            client.dele(2)
            client.close()

        yield deferToThread(session)
        yield defer.DeferredList([d for f in self.factories for d in f.ended])
        self.assertEqual(len(self.inbox_files()), 2)

    @defer.inlineCallbacks
    def test_implicit_tls(self):
        """POP3S: TLS first, then AUTH PLAIN, RETR, DELE, QUIT."""
        self.deliver(FIRST)

        def session():
            client = poplib.POP3_SSL(
                "127.0.0.1", self.tls_port, context=self.context, timeout=10
            )
            capabilities = client.capa()
            token = base64.b64encode(b"\0" + ALICE.encode() + b"\0" + SECRET.encode())
            client._shortcmd("AUTH PLAIN " + token.decode())
            message = client.retr(1)[1]
            client.dele(1)
            return capabilities, message, client.quit()

        capabilities, message, response = yield deferToThread(session)
        self.assertIn("USER", capabilities)
        self.assertNotIn("STLS", capabilities)
        self.assertEqual(b"\n".join(message) + b"\n", FIRST)
        self.assertEqual(response, b"+OK Logging out")
        self.assertEqual(self.inbox_files(), [])

    @defer.inlineCallbacks
    def test_thunderbird_sequence(self):
        """Thunderbird's steps: CAPA, STLS, CAPA, AUTH PLAIN (waiting for '+'),
        STAT, LIST, UIDL, RETR, DELE, QUIT."""
        self.deliver(FIRST, DOTTED)

        def session():
            client = poplib.POP3("127.0.0.1", self.port, timeout=10)
            before = client.capa()
            client.stls(self.context)  # sends CAPA, then STLS
            after = client.capa()
            challenge = client._shortcmd("AUTH PLAIN")
            token = base64.b64encode(b"\0" + ALICE.encode() + b"\0" + SECRET.encode())
            logged_in = client._shortcmd(token.decode())
            stat = client.stat()
            client.list()
            client.uidl()
            message = client.retr(2)[1]
            client.dele(2)
            return before, after, challenge, logged_in, stat, message, client.quit()

        results = yield deferToThread(session)
        before, after, challenge, logged_in, stat, message, bye = results
        self.assertIn("STLS", before)
        self.assertNotIn("USER", before)
        self.assertEqual(after["SASL"], ["PLAIN", "LOGIN"])
        self.assertEqual(challenge, b"+ ")
        self.assertEqual(logged_in, b"+OK Logged in")
        self.assertEqual(stat[0], 2)
        self.assertEqual(b"\n".join(message) + b"\n", DOTTED)
        self.assertEqual(bye, b"+OK Logging out")
        self.assertEqual(len(self.inbox_files()), 1)

    @defer.inlineCallbacks
    def test_login_refused_before_tls(self):
        """Without STLS the password is refused before it is even sent."""

        def session():
            client = poplib.POP3("127.0.0.1", self.port, timeout=10)
            try:
                client.user(ALICE)
            except poplib.error_proto as e:
                return e.args[0]
            finally:
                client.quit()

        error = yield deferToThread(session)
        self.assertTrue(error.startswith(b"-ERR [AUTH] Plaintext"), error)

    @defer.inlineCallbacks
    def test_wrong_password(self):
        """A wrong password is refused with [AUTH], checked off the reactor thread."""

        def session():
            client = poplib.POP3("127.0.0.1", self.port, timeout=10)
            client.stls(self.context)
            client.user(ALICE)
            try:
                client.pass_("wrong")
            except poplib.error_proto as e:
                return e.args[0]
            finally:
                client.quit()

        error = yield deferToThread(session)
        self.assertEqual(error, b"-ERR [AUTH] Authentication failed")

    @defer.inlineCallbacks
    def test_in_use(self):
        """A second session for the mailbox gets [IN-USE] while the first is open."""
        self.deliver(FIRST)

        def sessions():
            first = self.stls_client()
            try:
                second = poplib.POP3("127.0.0.1", self.port, timeout=10)
                second.stls(self.context)
                second.user(ALICE)
                try:
                    second.pass_(SECRET)
                except poplib.error_proto as e:
                    return e.args[0]
                finally:
                    second.quit()
            finally:
                first.quit()

        error = yield deferToThread(sessions)
        self.assertEqual(error, b"-ERR [IN-USE] Mailbox is locked by another session")

    @defer.inlineCallbacks
    def test_large_message(self):
        """A multi-megabyte message arrives whole, streamed in pieces."""
        big = b"Subject: big\n\n" + b"".join(
            b"%s line %d of a long message\n" % (b"." if i % 7 == 0 else b"", i)
            for i in range(150_000)
        )
        self.deliver(big)

        def session():
            client = self.stls_client()
            try:
                return client.list(1), client.retr(1)
            finally:
                client.quit()

        listed, (response, lines, octets) = yield deferToThread(session)
        self.assertEqual(b"\n".join(lines) + b"\n", big)
        self.assertEqual(octets, len(big) + big.count(b"\n"))
        self.assertEqual(listed, b"+OK 1 %d" % octets)


class AvatarTests(TestCase):
    """The avatar factory MailRealm calls, over the real store."""

    def test_pop3_avatar(self):
        """pop3_avatar opens the user's INBOX, creating it if mail never came."""
        mail_dir = Path(self.mktemp()).resolve()
        user = MailUser(ALICE, mail_dir / "example.test" / "alice")
        mbox = pop3_avatar(user)
        self.assertIsInstance(mbox, POP3Mailbox)
        self.assertFalse(user.maildir.exists())
        mbox.open()
        self.addCleanup(mbox.close)
        self.assertEqual(mbox.listMessages(), [])
        self.assertTrue((user.maildir / "new").is_dir())

    def test_claims_new(self):
        """A session moves delivered mail from new/ to cur/ when it opens."""
        mail_dir = Path(self.mktemp()).resolve()
        store = MaildirStore(mail_dir, "mail.example.test")
        [path] = store.deliver([ALICE], io.BytesIO(FIRST))
        mbox = pop3_avatar(MailUser(ALICE, store.path_for(ALICE)))
        mbox.open()
        self.addCleanup(mbox.close)
        self.assertFalse(path.exists())
        with mbox.getMessage(0) as stored:
            self.assertEqual(stored.read(), FIRST)
        self.assertEqual(mbox.listMessages(), [len(FIRST) + FIRST.count(b"\n")])

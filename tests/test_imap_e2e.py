"""
End to end: the IMAP listener on a loopback port, over STARTTLS and over
implicit TLS with a generated certificate, the real password checker and
realm, the real maildir store and the reactor's thread pool; spoken to with
Python's imaplib from a thread, the way Thunderbird talks (issue 4, items 5
and 6).
"""

from __future__ import annotations

import imaplib
import io
import re
import ssl
import time
from pathlib import Path

from twisted.cred.portal import Portal
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailsys.accounts import MailRealm, PasswordChecker, UserStore
from mailsys.imap import IIMAPAccount, IMAPServerFactory, imap_avatar
from mailsys.maildir import Mailbox, MaildirStore
from mailsys.testing import CHEAP_HASHER, RecordsSessionEnds
from mailsys.tls import ServerTLS, ensure_certificate

ALICE = "alice@example.test"
SECRET = "s3cret pass"

FIRST = (
    b"From: Bob <bob@remote.example>\nTo: alice@example.test\nSubject: first\n"
    b"Date: Mon, 07 Jul 2025 10:00:00 +0000\nMessage-ID: <first@remote.example>\n\n"
    b"Hello Alice.\n"
)
SECOND = (
    b"From: Carol <carol@remote.example>\nTo: alice@example.test\nSubject: second\n"
    b"Message-ID: <second@remote.example>\nContent-Type: text/plain; charset=utf-8\n"
    b"Content-Transfer-Encoding: 8bit\n\n" + "Grüße, ".encode() + b"x" * 70000 + b"\n"
)
THIRD = b"From: Dave <dave@remote.example>\nSubject: third\n\nArrived during IDLE.\n"
HEADER_FIELDS = (
    "BODY.PEEK[HEADER.FIELDS (From To Cc Bcc Subject Date Message-ID Priority "
    "X-Priority References Newsgroups In-Reply-To Content-Type Reply-To)]"
)


class RecordingFactory(RecordsSessionEnds, IMAPServerFactory):
    """Remembers when each session has really ended, for a clean teardown."""


def raw_command(client: imaplib.IMAP4, name: str, line: bytes) -> tuple[str, list]:
    """Send one command line as is (LITERAL+, which imaplib cannot), and
    wait for its tagged reply."""
    tag = client._new_tag()
    client.tagged_commands[tag] = None
    client.send(tag + b" " + line)
    return client._command_complete(name, tag)


def code(data: list) -> bytes:
    """The response code of a tagged reply, from imaplib's data."""
    text = data[-1] if isinstance(data[-1], bytes) else b""
    match = re.match(rb"\[([^\]]*)\]", text)
    return match.group(1) if match else b""


class IMAPEndToEndTests(TestCase):
    """imaplib against the real listener, store, checker and realm."""

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
            MailRealm(self.mail_dir, {IIMAPAccount: imap_avatar}),
            [PasswordChecker(users, reactor)],
        )
        self.factories: list[RecordingFactory] = []
        starttls = RecordingFactory(
            portal, "mail.example.test", reactor, tls=tls.contextFactory()
        )
        implicit = RecordingFactory(portal, "mail.example.test", reactor, implicit_tls=True)
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

    def deliver(self, *messages: bytes) -> None:
        for message in messages:
            self.store.deliver([ALICE], io.BytesIO(message))

    def mailbox(self) -> Mailbox:
        return Mailbox(self.store, ALICE)

    @defer.inlineCallbacks
    def test_thunderbird_session_over_starttls(self):
        """Thunderbird's session over STARTTLS: capabilities, ID, AUTHENTICATE
        PLAIN, NAMESPACE, the LISTs, SELECT, the header and body fetches,
        flags, APPEND to Sent both ways, IDLE seeing a delivery within a
        second, MOVE and COPY+EXPUNGE to Trash, CREATE+SUBSCRIBE, LOGOUT."""
        self.deliver(FIRST, SECOND)
        results: dict[str, object] = {}

        def session():
            client = imaplib.IMAP4("127.0.0.1", self.port, timeout=10)
            try:
                results["before"] = client.capabilities
                client.starttls(self.context)
                results["version"] = client.sock.version()
                typ, data = client.capability()
                results["after"] = data[0].split()
                results["id"] = client.xatom("ID", '("name" "Thunderbird" "version" "128")')
                results["id_data"] = client.untagged_responses.pop("ID", None)
                typ, data = client.authenticate(
                    "PLAIN", lambda _: b"\0" + ALICE.encode() + b"\0" + SECRET.encode()
                )
                results["auth"] = (typ, data)
                results["namespace"] = client.namespace()
                results["list"] = client.list()
                results["lsub"] = client.lsub()
                results["list_ext"] = client._simple_command(
                    "LIST", '(subscribed) "" "*" return (special-use)'
                ), client.untagged_responses.pop("LIST", None)
                results["select"] = client.select("INBOX")
                results["uidvalidity"] = client.untagged_responses.get("UIDVALIDITY")
                results["flags"] = client.uid("FETCH", "1:*", "(FLAGS)")
                results["headers"] = client.uid(
                    "FETCH", "1:*", f"(UID RFC822.SIZE FLAGS {HEADER_FIELDS})"
                )
                results["peek"] = client.uid("FETCH", "1", "(UID RFC822.SIZE BODY.PEEK[])")
                pieces = []
                for start in range(0, 80000, 65536):
                    typ, data = client.uid(
                        "FETCH", "2", f"(UID RFC822.SIZE BODY[]<{start}.65536>)"
                    )
                    pieces.append(data[0][1])
                results["pieces"] = pieces
                results["store"] = client.uid("STORE", "1", "+FLAGS", "(\\Flagged)")
                sent = b"From: alice@example.test\r\nSubject: sent\r\n\r\nHi Bob.\r\n"
                results["append_sync"] = client.append(
                    "Sent", "(\\Seen)", None, sent
                )
                results["append_plus"] = raw_command(
                    client, "APPEND",
                    b'append "Sent" (\\Seen) {%d+}\r\n%s\r\n' % (len(sent), sent),
                )
                tag = client._new_tag()
                client.send(tag + b" IDLE\r\n")
                results["idle_go"] = client.readline()
                self.deliver(THIRD)
                started = time.monotonic()
                results["idle_exists"] = client.readline()
                results["idle_delay"] = time.monotonic() - started
                client.tagged_commands[tag] = None
                client.send(b"DONE\r\n")
                results["idle_done"] = client._command_complete("IDLE", tag)
                results["move"] = client.uid("MOVE", "1", '"Trash"')
                results["move_untagged"] = (
                    client.untagged_responses.pop("OK", None),
                    client.untagged_responses.pop("EXPUNGE", None),
                )
                results["copy"] = client.uid("COPY", "2", '"Trash"')
                results["copyuid"] = client.untagged_responses.pop("COPYUID", None)
                results["delete"] = client.uid("STORE", "2", "+FLAGS", "(\\Deleted \\Seen)")
                results["expunge"] = client.expunge()
                results["create"] = client.create("Archive")
                results["subscribe"] = client.subscribe("Archive")
                results["logout"] = client.logout()
            finally:
                if client.state != "LOGOUT":
                    client.shutdown()

        yield deferToThread(session)
        self.assertIn("STARTTLS", results["before"])
        self.assertIn("LOGINDISABLED", results["before"])
        self.assertIn(results["version"], ("TLSv1.2", "TLSv1.3"))
        self.assertIn(b"AUTH=PLAIN", results["after"])
        self.assertNotIn(b"STARTTLS", results["after"])
        self.assertEqual(results["id"][0], "OK")
        self.assertEqual(results["id_data"], [b'("name" "mailsys" "vendor" "mailsys")'])
        self.assertEqual(results["auth"][0], "OK")
        self.assertEqual(results["namespace"], ("OK", [b'(("" "/")) NIL NIL']))
        self.assertEqual(results["list"][0], "OK")
        self.assertEqual(
            results["list"][1],
            [
                b'(\\HasNoChildren) "/" INBOX',
                b'(\\HasNoChildren \\Drafts) "/" Drafts',
                b'(\\HasNoChildren \\Junk) "/" Junk',
                b'(\\HasNoChildren \\Sent) "/" Sent',
                b'(\\HasNoChildren \\Trash) "/" Trash',
            ],
        )
        self.assertEqual(len(results["lsub"][1]), 5)
        (typ, _), listed = results["list_ext"]
        self.assertEqual(typ, "OK")
        self.assertIn(b'(\\HasNoChildren \\Sent \\Subscribed) "/" Sent', listed)
        self.assertEqual(results["select"], ("OK", [b"2"]))
        self.assertEqual(
            results["flags"][1], [b"1 (UID 1 FLAGS (\\Recent))", b"2 (UID 2 FLAGS (\\Recent))"]
        )
        typ, data = results["headers"]
        first_size = len(FIRST) + FIRST.count(b"\n")
        self.assertTrue(data[0][0].startswith(b"1 (UID 1 RFC822.SIZE %d FLAGS" % first_size))
        self.assertIn(b"Subject: first\r\n", data[0][1])
        self.assertTrue(data[0][1].endswith(b"\r\n\r\n"))
        typ, data = results["peek"]
        self.assertEqual(data[0][1], FIRST.replace(b"\n", b"\r\n"))
        self.assertIn(b"RFC822.SIZE %d" % len(data[0][1]), data[0][0])
        self.assertEqual(b"".join(results["pieces"]), SECOND.replace(b"\n", b"\r\n"))
        self.assertEqual(results["store"][1], [b"1 (UID 1 FLAGS (\\Flagged \\Recent))"])
        sent = self.mailbox().folder("Sent")
        self.assertEqual(
            code(results["append_sync"][1]), b"APPENDUID %d 1" % sent.uidvalidity
        )
        self.assertEqual(
            code(results["append_plus"][1]), b"APPENDUID %d 2" % sent.uidvalidity
        )
        self.assertEqual(results["idle_go"], b"+ idling\r\n")
        self.assertEqual(results["idle_exists"], b"* 3 EXISTS\r\n")
        self.assertLess(results["idle_delay"], 3.0)
        self.assertEqual(results["idle_done"][0], "OK")
        trash = self.mailbox().folder("Trash")
        self.assertEqual(results["move"][0], "OK")
        copyuid, expunged = results["move_untagged"]
        self.assertEqual(copyuid, [b"[COPYUID %d 1 1] Moved" % trash.uidvalidity])
        self.assertEqual(expunged, [b"1"])
        self.assertEqual(results["copy"][0], "OK")
        self.assertEqual(results["copyuid"][-1], b"%d 2 2" % trash.uidvalidity)
        self.assertEqual(results["expunge"], ("OK", [b"1"]))
        self.assertEqual(results["create"][0], "OK")
        self.assertEqual(results["subscribe"][0], "OK")
        self.assertEqual(results["logout"][0], "BYE")
        # The store as Thunderbird left it.
        mailbox = self.mailbox()
        [remaining] = mailbox.folder("INBOX").scan()
        with mailbox.folder("INBOX").open(remaining) as f:
            self.assertEqual(f.read(), THIRD)
        self.assertEqual(len(trash.scan()), 2)
        self.assertTrue(all(info.flags == {"\\Seen"} for info in sent.scan()))
        self.assertIn("Archive", mailbox.subscriptions())

    @defer.inlineCallbacks
    def test_implicit_tls_and_dropped_socket(self):
        """Over implicit TLS: LOGIN, SELECT, fetch and flag a message, then
        close the socket without LOGOUT, as Thunderbird does; the flag is
        on disk and the server session ends."""
        self.deliver(FIRST)

        def session():
            client = imaplib.IMAP4_SSL("127.0.0.1", self.tls_port, ssl_context=self.context, timeout=10)
            greeting_caps = client.capabilities
            login = client.login(ALICE, SECRET)
            select = client.select('"INBOX"')
            fetched = client.uid("FETCH", "1", "(UID RFC822.SIZE BODY[]<0.65536>)")
            stored = client.uid("STORE", "1", "+FLAGS", "(\\Seen)")
            search = client.uid("SEARCH", "UNDELETED", "HEADER", "Message-ID", "<first@remote.example>")
            client.shutdown()
            return greeting_caps, login, select, fetched, stored, search

        caps, login, select, fetched, stored, search = yield deferToThread(session)
        self.assertIn("AUTH=PLAIN", caps)
        self.assertNotIn("STARTTLS", caps)
        self.assertEqual(login[0], "OK")
        self.assertEqual(select, ("OK", [b"1"]))
        self.assertEqual(fetched[1][0][1], FIRST.replace(b"\n", b"\r\n"))
        self.assertEqual(stored[0], "OK")
        self.assertEqual(search, ("OK", [b"1"]))
        yield defer.DeferredList([d for f in self.factories for d in f.ended])
        [info] = self.mailbox().folder("INBOX").scan()
        self.assertEqual(info.flags, {"\\Seen"})

    @defer.inlineCallbacks
    def test_password_refused_before_starttls(self):
        """Before STARTTLS the server says LOGINDISABLED and refuses LOGIN,
        so a password never crosses the network in clear."""

        def session():
            client = imaplib.IMAP4("127.0.0.1", self.port, timeout=10)
            try:
                client.login(ALICE, SECRET)
            except imaplib.IMAP4.error as e:
                return client.capabilities, str(e)
            finally:
                client.shutdown()
            return client.capabilities, "logged in"

        capabilities, outcome = yield deferToThread(session)
        self.assertIn("LOGINDISABLED", capabilities)
        self.assertNotIn("AUTH=PLAIN", capabilities)
        self.assertIn("[PRIVACYREQUIRED]", outcome)

    @defer.inlineCallbacks
    def test_wrong_password(self):
        """A wrong password is refused with AUTHENTICATIONFAILED."""

        def session():
            client = imaplib.IMAP4_SSL("127.0.0.1", self.tls_port, ssl_context=self.context, timeout=10)
            try:
                client.authenticate("PLAIN", lambda _: b"\0" + ALICE.encode() + b"\0wrong")
            except imaplib.IMAP4.error as e:
                return str(e)
            finally:
                client.shutdown()
            return "logged in"

        outcome = yield deferToThread(session)
        self.assertIn("AUTHENTICATIONFAILED", outcome)


    @defer.inlineCallbacks
    def test_authenticate_login_and_keywords(self):
        """Over implicit TLS: AUTHENTICATE LOGIN (Thunderbird's fallback
        after PLAIN) answers "Username:" then "Password:"; Thunderbird's
        `uid store 1 +FLAGS ($Forwarded)` is kept, and a new connection
        sees the keyword in FLAGS and on the message."""
        self.deliver(FIRST)
        answers = {b"Username:": ALICE.encode(), b"Password:": SECRET.encode()}

        def connect():
            return imaplib.IMAP4_SSL(
                "127.0.0.1", self.tls_port, ssl_context=self.context, timeout=10
            )

        def session():
            challenges = []

            def respond(challenge):
                challenges.append(challenge)
                return answers[challenge]

            client = connect()
            try:
                caps = client.capabilities
                auth = client.authenticate("LOGIN", respond)
                client.select("INBOX")
                stored = client.uid("STORE", "1", "+FLAGS", "($Forwarded)")
                client.logout()
            finally:
                if client.state != "LOGOUT":
                    client.shutdown()
            client = connect()
            try:
                client.login(ALICE, SECRET)
                client.select("INBOX")
                flags = client.untagged_responses.get("FLAGS")
                fetched = client.uid("FETCH", "1", "(FLAGS)")
                client.logout()
            finally:
                if client.state != "LOGOUT":
                    client.shutdown()
            return caps, challenges, auth, stored, flags, fetched

        caps, challenges, auth, stored, flags, fetched = yield deferToThread(session)
        self.assertIn("AUTH=LOGIN", caps)
        self.assertEqual(challenges, [b"Username:", b"Password:"])
        self.assertEqual(auth[0], "OK")
        self.assertEqual(stored, ("OK", [b"1 (UID 1 FLAGS (\\Recent $Forwarded))"]))
        self.assertIn(b"$Forwarded", flags[-1])
        self.assertEqual(fetched, ("OK", [b"1 (UID 1 FLAGS ($Forwarded))"]))
        yield defer.DeferredList([d for f in self.factories for d in f.ended])
        [info] = self.mailbox().folder("INBOX").scan()
        self.assertEqual(info.flags, {"$Forwarded"})

"""
The per-listener read-only option, through the real service tree: the
same mailbox is writable on one IMAP listener and read-only on the other.
"""

from __future__ import annotations

import imaplib
import io
import ssl
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailsys.accounts import UserStore
from mailsys.config import AuthSection, IMAPSection
from mailsys.tap import build
from mailsys.testing import CHEAP_HASHER, loopback_config, settle, start


class ReadOnlyListenerTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        state = Path(self.mktemp()).resolve()
        state.mkdir(parents=True)
        cfg = loopback_config(
            state,
            "imap",
            "imaps",
            auth=AuthSection(allow_plaintext_on_loopback=True),
            imaps=IMAPSection(read_only=True),
        )
        UserStore(cfg.users_file, cfg.domains, hasher=CHEAP_HASHER).add(
            "alice@example.test", "pw"
        )
        self.system = build(cfg, reactor)
        self.addCleanup(self.system.stopService)
        self.ports = yield start(self.system, "imap", "imaps")
        self.system.store.deliver(["alice@example.test"], io.BytesIO(b"Subject: x\n\nbody\n"))
        self.cert = cfg.tls.cert

    @inlineCallbacks
    def test_read_only_listener(self):
        """On the read-only listener SELECT is read-only and STORE is
        refused; on the other the same STORE works."""
        context = ssl.create_default_context(cafile=str(self.cert))

        def session():
            with imaplib.IMAP4_SSL("127.0.0.1", self.ports["imaps"], ssl_context=context) as ro:
                ro.login("alice@example.test", "pw")
                try:
                    ro.select("INBOX")
                    selected = "read-write"
                except imaplib.IMAP4.readonly:
                    # imaplib's way of saying SELECT answered [READ-ONLY];
                    # tell it we know, so it lets us go on.
                    selected = "read-only"
                    ro.is_readonly = True
                store = ro._simple_command("STORE", "1", "+FLAGS", r"(\Flagged)")
            with imaplib.IMAP4("127.0.0.1", self.ports["imap"]) as rw:
                rw.login("alice@example.test", "pw")
                rw.select("INBOX")
                ok = rw.store("1", "+FLAGS", r"(\Flagged)")
            return selected, store, ok

        selected, store, ok = yield deferToThread(session)
        self.assertEqual(selected, "read-only")
        self.assertEqual(store[0], "NO")
        self.assertEqual(ok[0], "OK")
        # Let the server see both connections close before the test ends.
        yield settle(reactor, self.system)

"""
Clients we did not write, against the real listeners: fetchmail over POP3
with STLS and mbsync over IMAP with STARTTLS must retrieve exactly the bytes
that were delivered (apart from the trace header each adds).  They run where
the programs are installed (.ci/run installs them).
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from mailsys.accounts import UserStore
from mailsys.tap import build
from mailsys.testing import CHEAP_HASHER, loopback_config, start

BODY = (
    b"From: bob@remote.example\nTo: alice@example.test\nSubject: clients\n\n"
    b".a line starting with a dot\nGr\xc3\xbc\xc3\x9fe\n\nlast line\n"
)


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise SkipTest(f"{program} is not installed")
    return path


class ClientTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.state = Path(self.mktemp()).resolve()
        self.state.mkdir(parents=True)
        cfg = loopback_config(self.state, "pop3", "imap")
        UserStore(cfg.users_file, cfg.domains, hasher=CHEAP_HASHER).add(
            "alice@example.test", "pw 1"
        )
        self.system = build(cfg, reactor)
        self.addCleanup(self.system.stopService)
        self.ports = yield start(self.system, "pop3", "imap")
        [self.delivered] = self.system.store.deliver(
            ["alice@example.test"], io.BytesIO(BODY), b"Received: test\n"
        )
        self.stored = self.delivered.read_bytes()
        self.cert = cfg.tls.cert

    @inlineCallbacks
    def test_fetchmail_pop3_stls(self):
        """fetchmail (POP3, STLS, certificate checked) gets the stored bytes."""
        fetchmail = need("fetchmail")
        out = self.state / "fetched"
        rc = self.state / "fetchmailrc"
        rc.write_text(
            f'poll 127.0.0.1 protocol pop3 port {self.ports["pop3"]} auth password\n'
            f'  user "alice@example.test" password "pw 1"\n'
            f'  sslproto tls1.2+ sslcertck sslcertfile "{self.cert}" '
            f'sslcommonname "mail.example.test"\n'
            f'  mda "cat > {out}"\n'
        )
        rc.chmod(0o600)

        def run():
            return subprocess.run(
                [fetchmail, "-f", str(rc), "--nodetach", "--nosyslog",
                 "--pidfile", str(self.state / "fetchmail.pid")],
                capture_output=True, timeout=60,
                env={"HOME": str(self.state), "PATH": "/usr/bin:/bin"},
            )

        result = yield deferToThread(run)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        fetched = out.read_bytes()
        # fetchmail adds its own Received: (3 lines) before ours.
        lines = fetched.split(b"\n")
        self.assertTrue(lines[0].startswith(b"Received: from 127.0.0.1"), fetched)
        self.assertEqual(b"\n".join(lines[3:]), self.stored)
        # Deleted at QUIT (no "keep"): the maildir is empty now.
        self.assertFalse(self.delivered.exists())

    @inlineCallbacks
    def test_mbsync_imap_starttls(self):
        """mbsync (IMAP, STARTTLS, certificate checked) copies the stored
        bytes and sees the standard folders."""
        mbsync = need("mbsync")
        local = self.state / "local"
        local.mkdir()
        rc = self.state / "mbsyncrc"
        rc.write_text(
            "IMAPAccount dev\nHost 127.0.0.1\n"
            f'Port {self.ports["imap"]}\nUser alice@example.test\nPass "pw 1"\n'
            f"SSLType STARTTLS\nCertificateFile {self.cert}\n\n"
            "IMAPStore remote\nAccount dev\n\n"
            f"MaildirStore near\nPath {local}/\nInbox {local}/INBOX\nSubFolders Verbatim\n\n"
            "Channel dev\nFar :remote:\nNear :near:\nPatterns *\nCreate Near\nSync Pull\n"
        )

        def run():
            return subprocess.run(
                [mbsync, "-c", str(rc), "dev"], capture_output=True, timeout=60,
                env={"HOME": str(self.state), "PATH": "/usr/bin:/bin"},
            )

        result = yield deferToThread(run)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        [copy] = list((local / "INBOX" / "cur").iterdir()) + list((local / "INBOX" / "new").iterdir())
        data = copy.read_bytes()
        # mbsync adds one X-TUID: header at the end of the header block.
        head, _, body = data.partition(b"\n\n")
        head_lines = [line for line in head.split(b"\n") if not line.startswith(b"X-TUID: ")]
        self.assertEqual(b"\n".join(head_lines) + b"\n\n" + body, self.stored)
        for folder in ("Sent", "Drafts", "Trash", "Junk"):
            self.assertTrue((local / folder).is_dir(), folder)

"""
End to end: the real service tree on loopback port 0, spoken to with
Python's smtplib (and curl where it is installed), plain and over STARTTLS
with the generated certificate; and the real C{twistd -n mailsys} command
in a subprocess.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from mailsys.accounts import UserStore
from mailsys.config import Config
from mailsys.tap import build
from mailsys.testing import CHEAP_HASHER, free_port, loopback_config, start

PROJECT = Path(__file__).resolve().parent.parent
# twistd itself, run by the interpreter running the tests.
TWISTD = "from twisted.scripts.twistd import run; run()"
def make_config(state: Path) -> Config:
    return loopback_config(
        state,
        "smtp",
        path=state / "mailsys.toml",
        aliases={"postmaster@example.test": ("alice@example.test",)},
    )


def message(subject: str, body: str = "Hello Alice.\n") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "bob@remote.example"
    msg["To"] = "alice@example.test"
    msg["Subject"] = subject
    msg.set_content(body)
    return msg


class ServiceTests(TestCase):
    """The service tree that twistd runs, in-process on the test reactor."""

    @inlineCallbacks
    def setUp(self):
        self.state = Path(self.mktemp()).resolve()
        self.state.mkdir(parents=True)
        self.config = make_config(self.state)
        UserStore(self.config.users_file, self.config.domains, hasher=CHEAP_HASHER).add(
            "alice@example.test", "secret"
        )
        self.service = build(self.config, reactor)
        self.addCleanup(self.service.stopService)
        self.port = (yield start(self.service, "smtp"))["smtp"]

    def inbox(self) -> list[Path]:
        new = self.state / "mail" / "example.test" / "alice" / "new"
        return sorted(new.iterdir()) if new.exists() else []

    @inlineCallbacks
    def test_plain_delivery(self):
        """A message sent with smtplib lands as one file in the user's new/,
        body intact, with a Received: header carrying the queue id."""

        def send():
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
                client.ehlo("client.example")
                self.assertIn("size", client.esmtp_features)
                self.assertIn("starttls", client.esmtp_features)
                client.send_message(message("plain"))
                return client.noop()

        yield deferToThread(send)
        [path] = self.inbox()
        data = path.read_bytes()
        self.assertIn(b"Subject: plain\n", data)
        self.assertIn(b"\n\nHello Alice.\n", data)
        self.assertNotIn(b"\r\n", data)
        self.assertRegex(data, rb"Received: from client.example \(\[127.0.0.1\]\)\n\tby mail.example.test \(mailsys\) with ESMTP id [A-Z0-9]+\n")
        self.assertEqual(os.listdir(path.parent.parent / "tmp"), [])

    @inlineCallbacks
    def test_follow_by_queue_id(self):
        """The logs let an operator follow a message by its queue id: the
        MAIL, RCPT and delivered events all carry it, with the file name."""
        from twisted.logger import formatEvent, globalLogPublisher

        events: list[str] = []

        def observe(event):
            if event.get("log_namespace", "").startswith("mailsys"):
                events.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

        def send():
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
                client.ehlo("client.example")
                client.mail("bob@remote.example")
                client.rcpt("alice@example.test")
                client.rcpt("nobody@example.test")
                return client.data(bytes(message("traced")))

        code, reply = yield deferToThread(send)
        queue_id = reply.decode().rsplit(" ", 1)[-1]
        mine = [e for e in events if queue_id in e]
        self.assertTrue(any(e.startswith("MAIL from=<bob@remote.example>") for e in mine), events)
        self.assertTrue(any(e.startswith("RCPT to=<alice@example.test> accepted") for e in mine))
        self.assertTrue(any(e.startswith("RCPT to=<nobody@example.test> refused") for e in mine))
        [delivered] = [e for e in mine if e.startswith("delivered")]
        [path] = self.inbox()
        self.assertIn(f"file={path.name}", delivered)
        self.assertIn("to=<alice@example.test>", delivered)
        self.assertTrue(any(e.startswith("connect from 127.0.0.1") for e in events))
        self.assertTrue(any(e.startswith("EHLO client.example from 127.0.0.1") for e in events))

    @inlineCallbacks
    def test_starttls_delivery(self):
        """STARTTLS works with the generated certificate, verified against
        itself, and the Received: header says ESMTPS."""
        cert = self.config.tls.cert

        def send():
            context = ssl.create_default_context(cafile=str(cert))
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
                client.starttls(context=context)
                client.ehlo("client.example")
                self.assertNotIn("starttls", client.esmtp_features)
                client.send_message(message("secure"))
                return client.sock.version()

        version = yield deferToThread(send)
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        [path] = self.inbox()
        self.assertIn(b"with ESMTPS id", path.read_bytes())

    @inlineCallbacks
    def test_refusals(self):
        """Unknown users and foreign domains are refused at RCPT."""

        def send():
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
                client.ehlo("client.example")
                client.mail("bob@remote.example")
                unknown = client.rcpt("nobody@example.test")
                relay = client.rcpt("victim@elsewhere.example")
                postmaster = client.rcpt("postmaster@example.test")
                return unknown, relay, postmaster

        unknown, relay, postmaster = yield deferToThread(send)
        self.assertEqual(unknown[0], 550)
        self.assertTrue(unknown[1].startswith(b"5.1.1"))
        self.assertEqual(relay[0], 550)
        self.assertTrue(relay[1].startswith(b"5.7.1"))
        self.assertEqual(postmaster[0], 250)

    @inlineCallbacks
    def test_concurrent_clients(self):
        """Several clients at once each get their message stored once."""

        def send(n):
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
                for i in range(5):
                    client.send_message(message(f"c{n}-{i}"))

        from twisted.internet.defer import gatherResults

        yield gatherResults([deferToThread(send, n) for n in range(4)])
        self.assertEqual(len(self.inbox()), 20)

    @inlineCallbacks
    def test_curl(self):
        """curl, a client we did not write, delivers over STARTTLS."""
        curl = shutil.which("curl")
        if curl is None:
            raise SkipTest("curl is not installed")
        mail = self.state / "curl.eml"
        mail.write_bytes(bytes(message("via curl")))

        def send():
            return subprocess.run(
                [
                    curl, "--silent", "--show-error", "--ssl-reqd",
                    "--cacert", str(self.config.tls.cert),
                    "--url", f"smtp://127.0.0.1:{self.port}/client.example",
                    "--mail-from", "bob@remote.example",
                    "--mail-rcpt", "alice@example.test",
                    "--upload-file", str(mail),
                ],
                capture_output=True,
                timeout=30,
            )

        result = yield deferToThread(send)
        self.assertEqual(result.returncode, 0, result.stderr)
        [path] = self.inbox()
        self.assertIn(b"Subject: via curl", path.read_bytes())


class TwistdTests(SynchronousTestCase):
    """The start command of the contract: C{twistd -n mailsys --config FILE}."""

    def twistd(self, *args: str, cwd: Path) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(PROJECT))
        return subprocess.Popen(
            [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "mailsys", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def test_bad_config_exits_2(self):
        """A bad configuration file is one line naming the key, status 2."""
        cwd = Path(self.mktemp())
        cwd.mkdir()
        (cwd / "bad.toml").write_text('[limits]\nmax_message_size = "big"\n')
        proc = self.twistd("--config", "bad.toml", cwd=cwd)
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 2)
        lines = err.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertIn("limits.max_message_size", lines[0])
        self.assertNotIn("Traceback", err.decode())

    def test_start_and_deliver(self):
        """twistd starts the configured listener; a message sent to it lands
        in the maildir of the contract."""
        cwd = Path(self.mktemp()).resolve()
        cwd.mkdir()
        port = free_port()
        (cwd / "mailsys.toml").write_text(
            f'[server]\nhostname = "mail.example.test"\nstate_dir = "state"\n'
            f'[listen]\nsmtp = "tcp:{port}:interface=127.0.0.1"\n'
            f'[domains]\nnames = ["example.test"]\n'
        )
        UserStore(cwd / "state" / "users.json", ["example.test"], hasher=CHEAP_HASHER).add(
            "alice@example.test", "pw"
        )
        proc = self.twistd("--config", "mailsys.toml", cwd=cwd)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        self.fail(proc.communicate()[1].decode())
                    time.sleep(0.1)
            with client:
                client.send_message(message("from twistd"))
            new = cwd / "state" / "mail" / "example.test" / "alice" / "new"
            [path] = list(new.iterdir())
            self.assertIn(b"Subject: from twistd", path.read_bytes())
        finally:
            proc.terminate()
            out, err = proc.communicate(timeout=30)
        self.assertIn(b"smtp listening on", out + err)


class ReloadTests(SynchronousTestCase):
    """SIGHUP re-reads what may change under a running server."""

    def test_aliases_reload(self):
        """A new alias in the file works after a reload; a broken file keeps
        the old aliases instead of stopping mail."""
        from mailsys import config as configuration
        from mailsys.addresses import parse_address
        from mailsys.routing import UnknownRecipient

        state = Path(self.mktemp()).resolve()
        state.mkdir()
        path = state / "mailsys.toml"
        base = '[server]\nstate_dir = "."\n[domains]\nnames = ["example.test"]\n'
        path.write_text(base)
        UserStore(state / "users.json", ["example.test"], hasher=CHEAP_HASHER).add("alice@example.test", "pw")
        service = build(configuration.load(path), reactor)
        reload = service.getServiceNamed("reload").reload
        the_router = service.router
        info = parse_address("info@example.test")
        self.assertRaises(UnknownRecipient, the_router.resolve, info)
        path.write_text(base + '[aliases]\n"info@example.test" = ["alice@example.test"]\n')
        reload()
        self.assertEqual(the_router.resolve(info).local, (parse_address("alice@example.test"),))
        path.write_text(base + "[aliases]\nbroken")
        reload()
        self.assertEqual(the_router.resolve(info).local, (parse_address("alice@example.test"),))
        self.flushLoggedErrors()


class PortInUseTests(SynchronousTestCase):
    def test_port_in_use_exits_2(self):
        """A listener whose port is taken stops the start with one line
        naming the listener and exit status 2, not a traceback."""
        cwd = Path(self.mktemp()).resolve()
        cwd.mkdir()
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            (cwd / "mailsys.toml").write_text(
                f'[server]\nstate_dir = "state"\n'
                f'[listen]\nsmtp = "tcp:{port}:interface=127.0.0.1"\n'
            )
            env = dict(os.environ, PYTHONPATH=str(PROJECT))
            proc = subprocess.run(
                [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "mailsys",
                 "--config", "mailsys.toml"],
                cwd=cwd, env=env, capture_output=True, timeout=60,
            )
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertNotIn(b"Traceback", proc.stderr)
        last = proc.stderr.decode().strip().splitlines()[-1]
        self.assertTrue(last.startswith("mailsys: listen.smtp: cannot listen"), last)

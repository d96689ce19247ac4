"""
Nothing acknowledged is lost: a message submitted to the real
C{twistd mailsys} process just before it is killed with SIGKILL is
delivered, once, after a restart.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path

from twisted.internet import reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailsys.accounts import UserStore
from mailsys.config import LimitsSection
from mailsys.smtp.server import ESMTPServerFactory
from mailsys.testing import CHEAP_HASHER, MemoryDelivery, free_port

PROJECT = Path(__file__).resolve().parent.parent
TWISTD = "from twisted.scripts.twistd import run; run()"
def wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[1].decode())
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("mailsys did not start")


class KillTests(TestCase):
    timeout = 120

    def setUp(self):
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir()
        self.submission = free_port()
        self.sink_port = free_port()
        (self.work / "mailsys.toml").write_text(
            '[server]\nhostname = "mail.a.test"\nstate_dir = "state"\n'
            f'[listen]\nsubmission = "tcp:{self.submission}:interface=127.0.0.1"\n'
            '[domains]\nnames = ["a.test"]\n'
            '[auth]\nallow_plaintext_on_loopback = true\n'
            f'[relay]\nroutes = {{ "b.test" = "127.0.0.1:{self.sink_port}" }}\n'
            'resolver = "127.0.0.1:53"\nretry_initial = 1\nretry_max = 1\n'
        )
        UserStore(self.work / "state" / "users.json", ["a.test"], hasher=CHEAP_HASHER).add(
            "alice@a.test", "pw"
        )
        self.procs: list[subprocess.Popen] = []
        self.addCleanup(self.stop_all)

    def start(self) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "mailsys", "--config", "mailsys.toml"],
            cwd=self.work,
            env=dict(os.environ, PYTHONPATH=str(PROJECT)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)

    @inlineCallbacks
    def test_kill_after_250(self):
        """SIGKILL right after the 250: after a restart the message reaches
        the next hop exactly once."""
        proc = self.start()
        yield deferToThread(wait_for_port, self.submission, proc)

        def submit():
            msg = EmailMessage()
            msg["From"], msg["To"], msg["Subject"] = "alice@a.test", "bob@b.test", "survives"
            msg.set_content("Still here.\n")
            with smtplib.SMTP("127.0.0.1", self.submission, timeout=10) as client:
                client.login("alice@a.test", "pw")
                client.send_message(msg)
            os.kill(proc.pid, signal.SIGKILL)  # at once, next hop still down

        yield deferToThread(submit)
        yield deferToThread(proc.wait)

        sink = MemoryDelivery(users=("bob@b.test",), domains=("b.test",))
        factory = ESMTPServerFactory(sink, "mx.b.test", LimitsSection(), reactor)
        port = reactor.listenTCP(self.sink_port, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        restarted = self.start()
        for _ in range(400):
            if sink.delivered:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        # Give a duplicate the chance to show up before counting.
        yield task.deferLater(reactor, 1.5, lambda: None)
        self.assertEqual(len(sink.delivered), 1)
        envelope, data = sink.delivered[0]
        self.assertEqual([str(r) for r in envelope.recipients], ["bob@b.test"])
        self.assertIn(b"Subject: survives", data)
        restarted.terminate()
        yield deferToThread(restarted.wait)

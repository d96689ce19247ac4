"""
Broken TLS against the real listeners: garbage instead of a handshake after
STARTTLS, or on an implicit-TLS port, ends that connection quietly (no
traceback, no logged error — trial fails a test that logs one) and the
server goes on serving.
"""

from __future__ import annotations

import smtplib
import socket
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from mailsys.tap import build
from mailsys.testing import loopback_config, settle, start

LISTENERS = ("smtp", "submissions", "imap", "imaps", "pop3", "pop3s")
# What each plain-text listener needs before the client may start TLS.
STARTTLS = {
    "smtp": b"EHLO x\r\nSTARTTLS\r\n",
    "imap": b"a STARTTLS\r\n",
    "pop3": b"STLS\r\n",
}


class BrokenTLSTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        state = Path(self.mktemp()).resolve()
        state.mkdir(parents=True)
        cfg = loopback_config(state, *LISTENERS)
        self.system = build(cfg, reactor)
        self.addCleanup(self.system.stopService)
        self.ports = yield start(self.system, *LISTENERS)

    @inlineCallbacks
    def test_garbage_instead_of_handshake(self):
        """Every TLS listener drops a client that sends garbage where the
        handshake should be, and the SMTP listener still works after."""

        def attack(name: str) -> bytes:
            with socket.create_connection(("127.0.0.1", self.ports[name]), 10) as s:
                s.settimeout(10)
                if name in STARTTLS:
                    s.recv(4096)  # greeting
                    s.sendall(STARTTLS[name])
                    received = b""
                    while not received.endswith(b"\r\n") or (
                        name == "smtp" and b"220 2.0.0" not in received
                    ):
                        received += s.recv(4096)
                s.sendall(b"\x16\x03\x01\x00\x05garbage, not a ClientHello\r\n" * 3)
                rest = b""
                try:
                    while chunk := s.recv(4096):
                        rest += chunk
                except OSError:
                    pass
                return rest

        events: list[str] = []

        def observe(event):
            if "disconnect" in event.get("log_format", ""):
                events.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        for name in LISTENERS:
            yield deferToThread(attack, name)

        def still_serving():
            with smtplib.SMTP("127.0.0.1", self.ports["smtp"], timeout=10) as client:
                return client.noop()[0]

        self.assertEqual((yield deferToThread(still_serving)), 250)
        yield settle(reactor, self.system)
        # Each broken handshake is one disconnect line saying why.
        failed = [e for e in events if " TLS failed: " in e]
        self.assertEqual(len(failed), len(LISTENERS), events)

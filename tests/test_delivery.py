"""
Tests for L{mailsys.smtp.delivery}: the inbound policy and the durable
store behind the 250.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailsys.addresses import parse_address, parse_path
from mailsys.maildir import DeliveryError, MaildirStore
from mailsys.routing import Router
from mailsys.smtp.delivery import LocalDelivery, received_header
from mailsys.smtp.interfaces import Envelope, ISMTPDelivery, Reply, Session

USERS = {"alice@example.test", "bob@example.test"}


def make_delivery(root: Path, aliases=None, clock=None) -> LocalDelivery:
    router = Router(["example.test"], lambda a: str(a) in USERS, aliases or {})
    store = MaildirStore(root, "mx.example.test")
    return LocalDelivery(router, store, "mx.example.test", clock or reactor)


def envelope(*recipients: str, delivery: LocalDelivery) -> Envelope:
    env = Envelope(queue_id="QID123", sender=parse_path("<sender@remote.example>"))
    for r in recipients:
        address = parse_address(r)
        env.routes[address] = delivery.validateTo(SESSION, env, address)
        env.recipients.append(address)
    return env


SESSION = Session(client_host="192.0.2.7", helo="client.example", esmtp=True)


class PolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.delivery = make_delivery(Path(self.mktemp()))

    def test_interface(self):
        """LocalDelivery provides ISMTPDelivery."""
        self.assertTrue(verifyObject(ISMTPDelivery, self.delivery))

    def test_refusals(self):
        """Unknown users get 550 5.1.1, foreign domains 550 5.7.1."""
        env = Envelope(queue_id="Q", sender=None)
        for address, status in [
            ("nobody@example.test", "5.1.1"),
            ("x@elsewhere.example", "5.7.1"),
            ("x@[127.0.0.1]", "5.7.1"),
        ]:
            e = self.assertRaises(
                Reply, self.delivery.validateTo, SESSION, env, parse_address(address)
            )
            self.assertEqual((e.code, e.status), (550, status))

    def test_forwarding_refused_until_relay(self):
        """An alias to a foreign address is refused, not silently dropped."""
        delivery = make_delivery(
            Path(self.mktemp()), aliases={"fwd@example.test": ["x@elsewhere.example"]}
        )
        e = self.assertRaises(
            Reply,
            delivery.validateTo,
            SESSION,
            Envelope(queue_id="Q", sender=None),
            parse_address("fwd@example.test"),
        )
        self.assertEqual(e.code, 550)

    def test_received_header(self):
        """The trace lines name the client, the HELO, our host, the protocol
        and the queue id, and fit on header lines."""
        clock = Clock()
        clock.advance(1_800_000_000)
        d = make_delivery(Path(self.mktemp()), clock=clock)
        header = received_header(
            SESSION, envelope("alice@example.test", delivery=d), "mx.example.test", clock.seconds()
        )
        self.assertEqual(
            header,
            b"Return-Path: <sender@remote.example>\n"
            b"Received: from client.example ([192.0.2.7])\n"
            b"\tby mx.example.test (mailsys) with ESMTP id QID123\n"
            b"\tfor <alice@example.test>;\n"
            b"\tFri, 15 Jan 2027 08:00:00 +0000\n",
        )

    def test_received_header_hostile_helo(self):
        """Client-chosen HELO text cannot add header lines or comments."""
        session = Session(client_host="192.0.2.7", helo="a(b);\x00c", esmtp=True)
        d = self.delivery
        header = received_header(session, envelope("alice@example.test", delivery=d), "h", 0)
        self.assertIn(b"Received: from a?b???c ([192.0.2.7])\n", header)
        self.assertEqual(header.count(b"\n"), 5)


class StoreBehindTheReplyTests(TestCase):
    """The delivery fires only when every copy is in new/, fsync'ed."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.delivery = make_delivery(
            self.root,
            aliases={"team@example.test": ["alice@example.test", "bob@example.test"]},
        )

    def test_delivers_to_every_mailbox(self):
        """Each local mailbox gets one file in new/ with the trace headers
        and the exact body."""
        env = envelope("team@example.test", "alice@example.test", delivery=self.delivery)
        body = b"Subject: hi\n\nbody\n"
        d = self.delivery.deliver(SESSION, env, io.BytesIO(body), len(body))

        def check(paths):
            self.assertEqual(len(paths), 2)
            for user in ("alice", "bob"):
                [name] = os.listdir(self.root / "example.test" / user / "new")
                data = (self.root / "example.test" / user / "new" / name).read_bytes()
                self.assertTrue(data.startswith(b"Return-Path: <sender@remote.example>\nReceived: "))
                self.assertTrue(data.endswith(b" +0000\n" + body))
                self.assertEqual(os.listdir(self.root / "example.test" / user / "tmp"), [])

        return d.addCallback(check)

    def test_failure_leaves_nothing(self):
        """If one copy cannot be stored, delivery fails and no mailbox
        shows the message."""
        env = envelope("alice@example.test", "bob@example.test", delivery=self.delivery)
        real_rename = os.rename
        calls = []

        def failing_rename(src, dst):
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
            return real_rename(src, dst)

        self.patch(os, "rename", failing_rename)
        d = self.delivery.deliver(SESSION, env, io.BytesIO(b"x\n"), 2)
        self.assertFailure(d, DeliveryError)

        def check(ignored):
            for user in ("alice", "bob"):
                for sub in ("new", "tmp"):
                    self.assertEqual(os.listdir(self.root / "example.test" / user / sub), [])

        return d.addCallback(check)

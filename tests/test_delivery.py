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


class RecordingQueue:
    """Stands in for OutboundQueue: records what would be queued."""

    def __init__(self) -> None:
        self.queued: list[tuple[Envelope, bytes, list[str]]] = []

    def enqueue(self, envelope, message, prefix, recipients):
        from twisted.internet import defer

        self.queued.append((envelope, prefix + message.read(), recipients))
        return defer.succeed(None)


class SubmissionPolicyTests(SynchronousTestCase):
    """The submission port: who may send, as whom, to whom."""

    def setUp(self) -> None:
        from mailsys.smtp.delivery import SubmissionDelivery

        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.router = Router(
            ["example.test"],
            lambda a: str(a) in USERS,
            {"sales@example.test": ["alice@example.test"], "team@example.test": ["alice@example.test", "bob@example.test"]},
        )
        self.queue = RecordingQueue()
        self.delivery = SubmissionDelivery(self.router, self.queue, "mail.example.test", self.clock)
        self.session = Session(client_host="198.51.100.4", helo="laptop", esmtp=True, tls=True, authenticated="alice@example.test")

    def envelope(self, sender: str) -> Envelope:
        return Envelope(queue_id="QSUB", sender=parse_path(sender))

    def test_interface(self):
        """SubmissionDelivery provides ISMTPDelivery."""
        self.assertTrue(verifyObject(ISMTPDelivery, self.delivery))

    def test_sender_must_match(self):
        """The envelope sender must be the user or an alias leading to them;
        anything else gets 553 5.7.1."""
        for sender in ("<alice@example.test>", "<sales@example.test>", "<team@example.test>"):
            self.assertIsNone(self.delivery.validateFrom(self.session, self.envelope(sender)))
        for sender in ("<bob@example.test>", "<ceo@bank.example>", "<>"):
            e = self.assertRaises(Reply, self.delivery.validateFrom, self.session, self.envelope(sender))
            self.assertEqual((e.code, e.status), (553, "5.7.1"))

    def test_sender_check_can_be_off(self):
        """With sender_must_match off, any sender is accepted from a user."""
        self.delivery.sender_must_match = False
        self.assertIsNone(self.delivery.validateFrom(self.session, self.envelope("<x@y.example>")))

    def test_unauthenticated(self):
        """Without AUTH, nothing is sent."""
        self.session.authenticated = None
        e = self.assertRaises(Reply, self.delivery.validateFrom, self.session, self.envelope("<alice@example.test>"))
        self.assertEqual(e.code, 530)

    def test_recipients(self):
        """Foreign recipients are relayed; ours must exist."""
        env = self.envelope("<alice@example.test>")
        route = self.delivery.validateTo(self.session, env, parse_address("x@elsewhere.example"))
        self.assertEqual(route.remote, (parse_address("x@elsewhere.example"),))
        e = self.assertRaises(Reply, self.delivery.validateTo, self.session, env, parse_address("ghost@example.test"))
        self.assertEqual(e.status, "5.1.1")

    def test_queued_with_headers(self):
        """Submitted mail is queued for every destination with a Received:
        line and the Message-ID: and Date: the client left out."""
        env = self.envelope("<alice@example.test>")
        for r in ("x@elsewhere.example", "team@example.test"):
            a = parse_address(r)
            env.routes[a] = self.delivery.validateTo(self.session, env, a)
            env.recipients.append(a)
        body = b"Subject: hi\n\nbody\n"
        self.delivery.deliver(self.session, env, io.BytesIO(body), len(body))
        [(_, data, recipients)] = self.queue.queued
        self.assertEqual(recipients, ["x@elsewhere.example", "alice@example.test", "bob@example.test"])
        self.assertIn(b"Received: from laptop ([198.51.100.4])\n\tby mail.example.test (mailsys) with ESMTPSA id QSUB;", data)
        self.assertIn(b"Message-ID: <QSUB.1800000000@mail.example.test>\n", data)
        self.assertIn(b"Date: Fri, 15 Jan 2027 08:00:00 +0000\n", data)
        self.assertTrue(data.endswith(body))
        self.assertNotIn(b"Return-Path", data)

    def test_existing_headers_kept_and_ip_hidden(self):
        """A Message-ID and Date the client gave are kept, and with
        hide_client_ip the Received: line does not show the client."""
        self.delivery.hide_client_ip = True
        env = self.envelope("<alice@example.test>")
        a = parse_address("bob@example.test")
        env.routes[a] = self.delivery.validateTo(self.session, env, a)
        env.recipients.append(a)
        body = b"message-id: <x@y>\nDATE: Mon, 1 Jan 2024 00:00:00 +0000\n\nbody\n"
        self.delivery.deliver(self.session, env, io.BytesIO(body), len(body))
        [(_, data, _)] = self.queue.queued
        self.assertEqual(data.count(b"essage-ID:") + data.count(b"essage-id:"), 1)
        self.assertNotIn(b"\nDate:", data)
        self.assertNotIn(b"198.51.100.4", data)
        self.assertIn(b"Received: from authenticated-user\n", data)


class LoopTests(SynchronousTestCase):
    """Mail that has gone round a loop is refused, not delivered again."""

    def setUp(self) -> None:
        self.delivery = make_delivery(
            Path(self.mktemp()), aliases={"fwd@example.test": ["x@elsewhere.example"]}
        )
        self.delivery.queue = RecordingQueue()

    def deliver(self, body: bytes, *recipients: str):
        env = envelope(*recipients, delivery=self.delivery)
        return self.delivery.deliver(SESSION, env, io.BytesIO(body), len(body))

    def test_too_many_received(self):
        """More than 30 Received: headers: 554 5.4.6."""
        body = b"Received: from x\n" * 31 + b"Subject: loop\n\nbody\n"
        e = self.assertRaises(Reply, self.deliver, body, "alice@example.test")
        self.assertEqual((e.code, e.status), (554, "5.4.6"))
        body = b"Received: from x\n" * 30 + b"Subject: ok\n\nbody\n"
        self.successResultOf(self.deliver(body, "fwd@example.test"))

    def test_forward_comes_back(self):
        """A forwarded message carries Delivered-To: the alias; when the far
        side sends it back, it is refused."""
        self.successResultOf(self.deliver(b"Subject: fwd\n\nbody\n", "fwd@example.test"))
        [(_, queued, recipients)] = self.delivery.queue.queued
        self.assertEqual(recipients, ["x@elsewhere.example"])
        self.assertIn(b"Delivered-To: fwd@example.test\n", queued)
        e = self.assertRaises(Reply, self.deliver, queued, "fwd@example.test")
        self.assertEqual(e.status, "5.4.6")

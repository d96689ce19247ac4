"""
Tests for L{mailsys.queue.local}: queued mail for our own users lands in
their maildirs, durably, with the trace fields of final delivery.
"""

from __future__ import annotations

import threading
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailsys.maildir import DeliveryError, MaildirStore
from mailsys.queue.interfaces import IOutboundTransport
from mailsys.queue.local import LocalTransport
from mailsys.testing_queue import synchronously

MESSAGE = b"From: alice@a.test\nSubject: hi\n\nHello.\n"


class LocalTransportTests(SynchronousTestCase):
    """Delivering with L{LocalTransport}, in-line."""

    def setUp(self) -> None:
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        self.store = MaildirStore(base / "mail", "mail.a.test")
        self.message = base / "Q1.eml"
        self.message.write_bytes(MESSAGE)
        self.transport = LocalTransport(self.store, reactor, threads=synchronously)

    def send(self, recipients, sender="alice@a.test"):
        return self.successResultOf(
            self.transport.send("Q1", sender, recipients, self.message)
        )

    def test_interface(self) -> None:
        """It is an L{IOutboundTransport}."""
        self.assertTrue(verifyObject(IOutboundTransport, self.transport))

    def test_delivered(self) -> None:
        """
        Each recipient gets a copy in C{new/} starting with Return-Path (the
        envelope sender) and Delivered-To (that recipient), and a 250 result.
        """
        results = self.send(["bob@a.test", "Carol@A.test"])
        self.assertEqual([(r.recipient, r.code) for r in results],
                         [("bob@a.test", 250), ("Carol@A.test", 250)])
        self.assertTrue(all(r.delivered and r.next_hop == "local" for r in results))
        [bob] = self.store.messages("bob@a.test")
        self.assertEqual(bob.parent.name, "new")
        self.assertEqual(
            bob.read_bytes(),
            b"Return-Path: <alice@a.test>\nDelivered-To: bob@a.test\n" + MESSAGE,
        )
        [carol] = self.store.messages("carol@a.test")
        self.assertIn(b"Delivered-To: carol@a.test\n", carol.read_bytes())

    def test_nullSender(self) -> None:
        """A bounce (null sender) is stored with C{Return-Path: <>}."""
        self.send(["bob@a.test"], sender=None)
        [bob] = self.store.messages("bob@a.test")
        self.assertTrue(bob.read_bytes().startswith(b"Return-Path: <>\n"))

    def test_unsafeMailbox(self) -> None:
        """
        An address that cannot name a mailbox is a permanent failure for
        that recipient only.
        """
        results = self.send(["../etc@a.test", "bob@a.test"])
        self.assertEqual([r.code for r in results], [550, 250])
        self.assertTrue(results[0].permanent)

    def test_diskRefuses(self) -> None:
        """A store that fails is a temporary failure (the queue retries)."""

        def deliver(*args):
            raise DeliveryError("bob@a.test: No space left on device")

        self.patch(self.store, "deliver", deliver)
        [result] = self.send(["bob@a.test"])
        self.assertEqual(result.code, 451)
        self.assertIn("No space left on device", result.text)
        self.assertFalse(result.permanent)

    def test_messageGone(self) -> None:
        """A queue file deleted meanwhile is a temporary failure, not a crash."""
        self.message.unlink()
        [result] = self.send(["bob@a.test"])
        self.assertEqual(result.code, 451)


class LocalTransportThreadTests(TestCase):
    """The maildir write happens off the reactor thread."""

    def test_inThread(self) -> None:
        """By default delivery runs in the reactor's thread pool."""
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        store = MaildirStore(base / "mail", "mail.a.test")
        message = base / "Q1.eml"
        message.write_bytes(MESSAGE)
        threads = []
        real = store.deliver

        def deliver(*args):
            threads.append(threading.current_thread())
            return real(*args)

        store.deliver = deliver
        d = LocalTransport(store, reactor).send("Q1", None, ["bob@a.test"], message)

        def check(results) -> None:
            self.assertEqual([r.code for r in results], [250])
            self.assertEqual(len(threads), 1)
            self.assertIsNot(threads[0], threading.main_thread())

        return d.addCallback(check)

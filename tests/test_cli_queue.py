"""
Tests for C{mailsys queue}: what an operator sees and changes of the
outbound queue, and that a running server (a queue runner on the same
directory) picks the changes up without a restart.
"""

from __future__ import annotations

import io
import time

from twisted.internet.task import Clock

from mailsys.queue.runner import RESCAN_INTERVAL, QueueRunner, RetrySchedule
from mailsys.queue.spool import BOUNCED, DELIVERED, QueueEntry, Spool
from mailsys.testing_queue import ScriptedTransport, synchronously

from .test_cli import CommandTestCase

MESSAGE = b"From: alice@example.test\nSubject: Report\n\nSee attached.\n"
BUSY = (450, "4.2.1 mailbox busy")


class QueueCommandTests(CommandTestCase):
    """C{mailsys queue list|show|flush|delete|hold|release}."""

    def setUp(self) -> None:
        super().setUp()
        self.spool = Spool(self.state / "queue", "mail.example.test")

    def enqueue(
        self, queue_id="Q1", sender="alice@example.test", recipients=None, now=None
    ):
        return self.spool.enqueue(
            queue_id,
            sender,
            recipients or ["bob@b.test"],
            io.BytesIO(MESSAGE),
            now=time.time() if now is None else now,
        )

    def test_listEmpty(self) -> None:
        """An empty (or not yet created) queue says so."""
        self.assertEqual(self.command("queue", "list"), (0, "queue is empty\n", ""))

    def test_list(self) -> None:
        """
        Each entry shows its id, size, arrival, sender and flags, then each
        recipient's state, attempts, next attempt and last reply.
        """
        self.enqueue("Q1", now=1_700_000_000)
        recipients = ["carol@c.test", "dan@c.test"]
        self.enqueue("Q2", sender=None, recipients=recipients, now=1_700_000_060)

        def progress(entry: QueueEntry) -> None:
            entry.held = True
            carol, dan = entry.recipients
            carol.state, carol.code, carol.text = DELIVERED, 250, "2.0.0 ok"
            dan.attempts, dan.next_attempt = 2, 1_700_001_000
            dan.code, dan.text = BUSY
            dan.next_hop = "mx.c.test[192.0.2.3]:25"

        self.spool.modify("Q2", progress)
        status, out, err = self.command("queue", "list")
        self.assertEqual((status, err), (0, ""))
        size = len(MESSAGE)
        self.assertEqual(
            out.splitlines(),
            [
                f"Q1  {size}  2023-11-14 22:13:20Z  alice@example.test",
                "    bob@b.test  pending, 0 failed attempts, next 2023-11-14 22:13:20Z",
                f"Q2  {size}  2023-11-14 22:14:20Z  <>  [held]",
                "    carol@c.test  delivered: 250 2.0.0 ok",
                "    dan@c.test  pending, 2 failed attempts, next 2023-11-14 22:30:00Z:"
                " 450 4.2.1 mailbox busy (mx.c.test[192.0.2.3]:25)",
                "-- 2 entries, 1 held",
            ],
        )

    def test_show(self) -> None:
        """C{show} prints the envelope, every recipient and the message headers."""
        self.enqueue("Q1", now=1_700_000_000)
        status, out, err = self.command("queue", "show", "Q1")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("id: Q1\n", out)
        self.assertIn("sender: alice@example.test\n", out)
        self.assertIn("arrived: 2023-11-14 22:13:20Z\n", out)
        self.assertIn("held: no\n", out)
        self.assertIn("    bob@b.test  pending", out)
        self.assertTrue(
            out.endswith(
                "headers:\n    From: alice@example.test\n    Subject: Report\n"
            )
        )
        self.assertNotIn("See attached", out)

    def test_unknownOrInvalidId(self) -> None:
        """
        An id that is not queued, or could not be one, is one line and exit
        status 2 for every command that takes an id.
        """
        self.enqueue("Q1")
        for action in ("show", "delete", "hold", "release"):
            self.assertUserError(
                self.command("queue", action, "Q9"), "no such queue entry: Q9"
            )
            self.assertUserError(
                self.command("queue", action, "../users"),
                "not a valid queue id: '../users'",
            )

    def test_damagedEnvelope(self) -> None:
        """A damaged envelope is reported in one line, not a traceback."""
        self.enqueue("Q1")
        (self.state / "queue" / "Q1.json").write_text("{")
        status, out, err = self.command("queue", "show", "Q1")
        self.assertEqual(status, 2)
        self.assertTrue(err.startswith("mailsys: Q1: envelope is not valid JSON"), err)
        self.assertEqual(len(err.splitlines()), 1)
        status, out, err = self.command("queue", "list")
        self.assertEqual((status, out), (0, "queue is empty\n"))
        self.assertTrue(err.startswith("mailsys: Q1: envelope is not valid JSON"), err)

    def test_holdAndRelease(self) -> None:
        """
        C{hold} marks the entry held on disk; C{release} clears it and makes
        its pending recipients due now.
        """
        self.enqueue("Q1", now=1000)
        self.spool.modify("Q1", lambda e: setattr(e.recipients[0], "next_attempt", 5e9))
        self.assertEqual(self.command("queue", "hold", "Q1"), (0, "held Q1\n", ""))
        self.assertTrue(self.spool.load("Q1").held)
        status, out, err = self.command("queue", "release", "Q1")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(
            out, "released Q1; a running server tries it within 30 seconds\n"
        )
        entry = self.spool.load("Q1")
        self.assertFalse(entry.held)
        self.assertLess(entry.recipients[0].next_attempt, time.time() + 1)

    def test_flush(self) -> None:
        """
        C{flush} makes every pending recipient of every entry that is not
        held due now, leaving held entries and finished recipients alone.
        """
        for queue_id in ("Q1", "Q2", "Q3"):
            self.enqueue(queue_id, recipients=["bob@b.test", "carol@c.test"], now=1000)

        def later(entry: QueueEntry) -> None:
            for status in entry.recipients:
                status.next_attempt = 5e9
            entry.recipients[0].state = BOUNCED

        for queue_id in ("Q1", "Q2", "Q3"):
            self.spool.modify(queue_id, later)
        self.spool.modify("Q3", lambda e: setattr(e, "held", True))
        status, out, err = self.command("queue", "flush")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(
            out,
            "2 entries due now; a running server tries them within 30 seconds\n",
        )
        for queue_id, due in (("Q1", True), ("Q2", True), ("Q3", False)):
            bob, carol = self.spool.load(queue_id).recipients
            self.assertEqual(bob.next_attempt, 5e9)
            self.assertEqual(carol.next_attempt < 5e9, due, queue_id)

    def test_delete(self) -> None:
        """C{delete} removes the entry, message file and all."""
        self.enqueue("Q1")
        self.assertEqual(self.command("queue", "delete", "Q1"), (0, "deleted Q1\n", ""))
        self.assertEqual(self.spool.ids(), [])
        self.assertEqual(list((self.state / "queue").glob("Q1.*")), [])

    def test_usage(self) -> None:
        """A missing action or id is a usage error, status 2."""
        self.assertEqual(self.command("queue")[0], 2)
        self.assertEqual(self.command("queue", "hold")[0], 2)


class RunningServerTests(CommandTestCase):
    """The commands reach a queue runner already running on the same queue."""

    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        self.clock.advance(time.time())
        self.spool = Spool(self.state / "queue", "mail.example.test")
        self.transport = ScriptedTransport({"bob@b.test": [BUSY]})
        self.runner = QueueRunner(
            Spool(self.state / "queue", "mail.example.test"),
            self.transport,
            self.transport,
            lambda address: False,
            self.clock,
            RetrySchedule(),
            "mail.example.test",
            "",
            threads=synchronously,
        )
        self.runner.startService()
        self.addCleanup(self.runner.stopService)
        now = self.clock.seconds()
        message = io.BytesIO(MESSAGE)
        self.spool.enqueue("Q1", "alice@example.test", ["bob@b.test"], message, now=now)
        self.runner.wake("Q1")
        self.assertEqual(len(self.transport.attempts), 1)

    def test_flushReachesRunner(self) -> None:
        """A deferred message is retried within 30 s of C{mailsys queue flush}."""
        self.clock.advance(1)
        self.command("queue", "flush")
        self.clock.advance(RESCAN_INTERVAL)
        self.assertEqual(len(self.transport.attempts), 2)

    def test_holdReachesRunner(self) -> None:
        """A held message is not retried when its retry falls due; released, it is."""
        self.command("queue", "hold", "Q1")
        self.clock.advance(RESCAN_INTERVAL)
        self.clock.advance(3600)
        self.assertEqual(len(self.transport.attempts), 1)
        self.command("queue", "release", "Q1")
        self.clock.advance(RESCAN_INTERVAL)
        self.assertEqual(len(self.transport.attempts), 2)

    def test_deleteReachesRunner(self) -> None:
        """A deleted message is forgotten and never retried."""
        self.command("queue", "delete", "Q1")
        self.clock.advance(RESCAN_INTERVAL)
        self.assertEqual(self.runner.entries, {})
        self.clock.advance(3600)
        self.assertEqual(len(self.transport.attempts), 1)

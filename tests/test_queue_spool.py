"""
Tests for L{mailsys.queue.spool}: what is queued stays queued, across
crashes, and writers never undo each other's changes.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import threading
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailsys import maildir as maildir_module
from mailsys.queue import spool as spool_module
from mailsys.queue.spool import (
    BOUNCED,
    DELIVERED,
    DSN,
    PENDING,
    QueueEntry,
    Spool,
    SpoolError,
)

MESSAGE = b"From: alice@a.test\nSubject: hello\n\nHi Bob.\n"


class SpoolTestMixin:
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).absolute() / "queue"
        self.spool = Spool(self.directory, "mail.a.test")

    def enqueue(self, queue_id="Q1", sender="alice@a.test", recipients=None, **kw):
        recipients = recipients or ["bob@b.test"]
        return self.spool.enqueue(
            queue_id, sender, recipients, io.BytesIO(MESSAGE), now=1000.0, **kw
        )

    def lockIsHeld(self, name: str = "lock") -> str:
        """How a queue lock is held by someone else: "exclusive", "shared", ""."""
        fd = os.open(self.directory / name, os.O_RDWR | os.O_CREAT)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return "exclusive"
            fcntl.flock(fd, fcntl.LOCK_UN)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return "shared"
            return ""
        finally:
            os.close(fd)


class EnqueueTests(SpoolTestMixin, SynchronousTestCase):
    """Queueing a message."""

    def test_roundTrip(self) -> None:
        """
        An enqueued message is on disk as given (prefix, then the message
        from its current position), with an envelope listing every
        recipient once, pending and due at arrival; loading gives the same
        entry back.
        """
        message = io.BytesIO(b"ignored" + MESSAGE)
        message.seek(len(b"ignored"))
        entry = self.spool.enqueue(
            "Q1",
            "alice@a.test",
            ["bob@b.test", "carol@c.test", "bob@b.test"],
            message,
            prefix=b"Received: by mail.a.test\n",
            now=1234.5,
        )
        self.assertEqual(
            (self.directory / "Q1.eml").read_bytes(),
            b"Received: by mail.a.test\n" + MESSAGE,
        )
        self.assertEqual(entry.message_path, self.directory / "Q1.eml")
        addresses = [r.address for r in entry.recipients]
        self.assertEqual(addresses, ["bob@b.test", "carol@c.test"])
        self.assertEqual({r.state for r in entry.recipients}, {PENDING})
        self.assertEqual({r.next_attempt for r in entry.recipients}, {1234.5})
        self.assertEqual(entry.created, 1234.5)
        self.assertEqual(self.spool.load("Q1"), entry)
        self.assertEqual(self.spool.ids(), ["Q1"])

    def test_envelopeIsJSON(self) -> None:
        """The envelope is plain JSON an operator can read (never a pickle)."""
        self.enqueue(sender=None)
        data = json.loads((self.directory / "Q1.json").read_text("utf-8"))
        self.assertIsNone(data["sender"])
        self.assertEqual(data["recipients"][0]["address"], "bob@b.test")
        self.assertEqual(data["recipients"][0]["state"], "pending")

    def test_durableOrder(self) -> None:
        """
        Before enqueue returns, the message file is synced and renamed into
        place, then the envelope (which commits the entry), then the
        directory is synced once, making both names durable together.
        """
        events: list[tuple[str, str]] = []
        real_fsync, real_rename = os.fsync, os.rename

        def fsync(fd: int) -> None:
            events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def rename(source, destination) -> None:
            events.append(("rename", str(destination)))
            real_rename(source, destination)

        self.spool._prepare()
        self.patch(spool_module.os, "fsync", fsync)
        self.patch(spool_module.os, "rename", rename)
        for module in (spool_module, maildir_module):
            self.patch(
                module,
                "fsync_directory",
                lambda path: events.append(("fsync_directory", str(path))),
            )
        self.enqueue()
        tmp, queue = str(self.directory / "tmp"), str(self.directory)
        self.assertEqual(
            [(kind, os.path.dirname(path) if kind == "fsync" else path)
             for kind, path in events],
            [
                ("fsync", tmp),
                ("rename", f"{queue}/Q1.eml"),
                ("fsync", tmp),
                ("rename", f"{queue}/Q1.json"),
                ("fsync_directory", queue),
            ],
        )
        self.assertEqual(os.listdir(tmp), [])

    def test_failedWriteLeavesNothing(self) -> None:
        """
        When the disk refuses (here: fsync fails), enqueue raises and
        nothing is queued, not even a temporary file.
        """

        def fsync(fd: int) -> None:
            raise OSError(28, "No space left on device")

        self.spool._prepare()
        self.patch(spool_module.os, "fsync", fsync)
        self.assertRaises(OSError, self.enqueue)
        self.assertEqual(self.spool.ids(), [])
        self.assertEqual(os.listdir(self.directory / "tmp"), [])
        self.assertFalse((self.directory / "Q1.eml").exists())

    def test_enqueueHoldsSharedLock(self) -> None:
        """
        Enqueueing holds the enqueue lock shared, and not the envelope lock:
        enqueues run side by side and never wait for the runner, but
        recovery (exclusive) never mistakes a live one for debris.
        """
        seen = []
        real = Spool._write_envelope

        def write(spool, entry):
            seen.append((self.lockIsHeld("enqueue.lock"), self.lockIsHeld("lock")))
            real(spool, entry)

        self.patch(Spool, "_write_envelope", write)
        self.enqueue()
        self.assertEqual(seen, [("shared", "")])

    def test_badInput(self) -> None:
        """
        A queue id that is not a safe file name, a used id, or no
        recipients are refused with a one-line L{SpoolError}.
        """
        for bad in ["", "../x", ".hidden", "a/b", "a b", "x" * 129, "é"]:
            error = self.assertRaises(SpoolError, self.enqueue, bad)
            self.assertIn("not a valid queue id", str(error))
        self.enqueue("Q1")
        error = self.assertRaises(SpoolError, self.enqueue, "Q1")
        self.assertIn("already in use", str(error))
        self.assertRaises(SpoolError, self.spool.enqueue, "Q2", None, [], io.BytesIO())
        self.assertEqual(self.spool.ids(), ["Q1"])


class EnqueueDeferredTests(SpoolTestMixin, TestCase):
    """The reactor never waits for the disk."""

    def test_inThread(self) -> None:
        """
        C{enqueue_deferred} writes in the reactor's thread pool and fires
        with the entry, its arrival time taken from the reactor.
        """
        threads = []
        real = Spool.enqueue

        def enqueue(spool, *args, **kwargs):
            threads.append(threading.current_thread())
            return real(spool, *args, **kwargs)

        self.patch(Spool, "enqueue", enqueue)
        d = self.spool.enqueue_deferred(
            reactor, "Q1", "alice@a.test", ["bob@b.test"], io.BytesIO(MESSAGE)
        )

        def check(entry: QueueEntry) -> None:
            self.assertEqual(threads and threads[0] is threading.main_thread(), False)
            self.assertEqual(self.spool.load("Q1"), entry)
            self.assertLess(abs(entry.created - reactor.seconds()), 60)

        return d.addCallback(check)


class ChangeTests(SpoolTestMixin, SynchronousTestCase):
    """Changing and removing entries."""

    def test_modifyUnderLock(self) -> None:
        """
        C{modify} re-reads the entry under the exclusive lock, applies the
        change and writes it durably with a higher revision.
        """
        entry = self.enqueue()
        held = []

        def hold(e: QueueEntry) -> None:
            held.append(self.lockIsHeld())
            e.held = True

        changed = self.spool.modify("Q1", hold)
        self.assertEqual(held, ["exclusive"])
        self.assertTrue(changed.held)
        self.assertGreater(changed.revision, entry.revision)
        self.assertEqual(self.spool.load("Q1"), changed)
        self.assertIsNone(self.spool.modify("Q9", hold))

    def test_twoWritersKeepBothChanges(self) -> None:
        """
        Two writers working from stale copies (the runner recording a
        result, the operator holding the entry) both re-read under the lock,
        so each change survives the other.
        """
        self.enqueue(recipients=["bob@b.test", "carol@c.test"])

        def deliver(e: QueueEntry) -> None:
            e.recipient("bob@b.test").state = DELIVERED

        def hold(e: QueueEntry) -> None:
            e.held = True

        self.spool.modify("Q1", hold)
        self.spool.modify("Q1", deliver)
        entry = self.spool.load("Q1")
        self.assertTrue(entry.held)
        self.assertEqual(entry.recipient("bob@b.test").state, DELIVERED)
        self.assertEqual(entry.revision, 3)

    def test_remove(self) -> None:
        """
        Removal takes the envelope first (the entry no longer exists), then
        the message; removing again says there was nothing.
        """
        self.enqueue()
        order = []
        real = os.unlink
        def unlink(path) -> None:
            order.append(Path(path).name)
            real(path)

        self.patch(spool_module.os, "unlink", unlink)
        self.assertTrue(self.spool.remove("Q1"))
        self.assertEqual(order, ["Q1.json", "Q1.eml"])
        self.assertFalse(self.spool.remove("Q1"))
        self.assertEqual(self.spool.ids(), [])

    def test_transactionAddIsIdempotent(self) -> None:
        """
        Adding an entry whose id is already queued (a DSN made again after a
        crash) adds nothing and says so.
        """
        with self.spool.transaction() as txn:
            to = ["a@a.test"]
            first = txn.add("R1", None, to, io.BytesIO(b"x\n"), kind=DSN, now=5)
            again = txn.add("R1", None, to, io.BytesIO(b"y\n"), kind=DSN, now=6)
        self.assertEqual(first.kind, DSN)
        self.assertIsNone(again)
        self.assertEqual((self.directory / "R1.eml").read_bytes(), b"x\n")


class RecoveryTests(SpoolTestMixin, SynchronousTestCase):
    """Starting again after a crash at any point."""

    def test_restartKeepsState(self) -> None:
        """
        Every field of every entry is read back by a new spool object (a
        restarted server), recipients' states included.
        """
        self.enqueue("Q1", recipients=["a@b.test", "b@b.test", "c@b.test"])
        self.enqueue("Q2", sender=None)

        def change(e: QueueEntry) -> None:
            e.recipients[0].state = DELIVERED
            e.recipients[1].state = BOUNCED
            e.recipients[2].attempts = 3
            e.recipients[2].next_attempt = 9999.0
            e.recipients[2].text = "4.2.0 try later"
            e.recipients[2].next_hop = "mx.b.test[192.0.2.1]:25"
            e.warned = True

        before = self.spool.modify("Q1", change)
        entries, notes = Spool(self.directory, "mail.a.test").recover()
        self.assertEqual(notes, [])
        self.assertEqual(entries, [before, self.spool.load("Q2")])

    def test_messageWithoutEnvelope(self) -> None:
        """
        A message file without its envelope (an enqueue killed before it
        committed, so never acknowledged) is removed, with a note.
        """
        self.enqueue("Q1")
        (self.directory / "Q2.eml").write_bytes(MESSAGE)
        entries, notes = self.spool.recover()
        self.assertEqual([e.queue_id for e in entries], ["Q1"])
        self.assertFalse((self.directory / "Q2.eml").exists())
        self.assertEqual(len(notes), 1)
        self.assertIn("Q2: discarded a half-written entry", notes[0])

    def test_envelopeWithoutMessage(self) -> None:
        """
        An envelope whose message is missing cannot be sent: it is moved to
        C{corrupt/} for the operator, with a note, and not loaded.
        """
        self.enqueue("Q1")
        os.unlink(self.directory / "Q1.eml")
        entries, notes = self.spool.recover()
        self.assertEqual(entries, [])
        self.assertEqual(os.listdir(self.directory / "corrupt"), ["Q1.json"])
        self.assertEqual(
            notes, ["Q1: envelope without a message file; moved to corrupt/"]
        )

    def test_damagedEnvelope(self) -> None:
        """
        An envelope that is not valid JSON, or has a field of the wrong
        type, is set aside with its message and a note naming the problem.
        """
        self.enqueue("Q1")
        self.enqueue("Q2")
        (self.directory / "Q1.json").write_bytes(b"{not json")
        data = json.loads((self.directory / "Q2.json").read_bytes())
        data["recipients"][0]["attempts"] = "many"
        (self.directory / "Q2.json").write_text(json.dumps(data))
        entries, notes = self.spool.recover()
        self.assertEqual(entries, [])
        self.assertEqual(
            sorted(os.listdir(self.directory / "corrupt")),
            ["Q1.eml", "Q1.json", "Q2.eml", "Q2.json"],
        )
        self.assertIn("Q1: envelope is not valid JSON", notes[0])
        self.assertIn(
            "Q2: recipient field 'attempts' missing or of the wrong type", notes[1]
        )

    def test_leftoverTemporaryFiles(self) -> None:
        """Files left in C{tmp/} by a killed write are removed."""
        self.enqueue("Q1")
        (self.directory / "tmp" / "Q2.json.123.1").write_bytes(b"{")
        entries, notes = self.spool.recover()
        self.assertEqual([e.queue_id for e in entries], ["Q1"])
        self.assertEqual(os.listdir(self.directory / "tmp"), [])
        self.assertEqual(notes, ["removed unfinished write tmp/Q2.json.123.1"])

    def test_recoverHoldsExclusiveLocks(self) -> None:
        """Recovery holds both locks exclusively while it looks for debris."""
        self.enqueue("Q1")
        seen = []
        real = Spool.ids

        def ids(spool):
            seen.append((self.lockIsHeld("enqueue.lock"), self.lockIsHeld("lock")))
            return real(spool)

        self.patch(Spool, "ids", ids)
        self.spool.recover()
        self.assertIn(("exclusive", "exclusive"), seen)

    def test_emptyOrMissing(self) -> None:
        """A queue directory that does not exist yet is an empty queue."""
        self.assertEqual(self.spool.ids(), [])
        self.assertEqual(self.spool.load_all(), ([], {}))
        self.assertIsNone(self.spool.load("Q1"))
        self.assertEqual(self.spool.recover(), ([], []))

"""
Tests for L{mailsys.queue.runner}: what a sender and an operator see of the
queue, with time driven by a L{task.Clock} and transports that answer from
a script.
"""

from __future__ import annotations

import email
import email.policy
import io
import itertools
import os
from pathlib import Path

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailsys.queue.interfaces import IOutboundTransport, RecipientResult
from mailsys.queue.runner import RESCAN_INTERVAL, QueueRunner, RetrySchedule
from mailsys.queue.spool import (
    BOUNCED,
    DELIVERED,
    DSN,
    NOTICE,
    PENDING,
    QueueEntry,
    Spool,
)
from mailsys.testing_queue import ScriptedTransport, synchronously

T0 = 1_700_000_000.0
MINUTE = 60.0
HOUR = 3600.0
DAY = 24 * HOUR
MESSAGE = b"From: alice@a.test\nTo: bob@b.test\nSubject: hello\n\nHi Bob.\n"
BUSY = (450, "4.2.1 mailbox busy, try later")
UNKNOWN = (550, "5.1.1 no such user")
REFUSED = (421, "4.4.1 connection refused")


class TimedTransport(ScriptedTransport):
    """A scripted transport that notes the clock at each attempt."""

    def __init__(self, clock: Clock, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clock = clock
        self.times: list[float] = []

    def send(self, queue_id, sender, recipients, message_path):
        self.times.append(self.clock.seconds())
        return super().send(queue_id, sender, recipients, message_path)


class RunnerTestMixin:
    """A spool in a temporary directory, a clock at T0 and scripted transports."""

    postmaster = "postmaster@a.test"
    schedule = RetrySchedule()
    # Re-reading the spool every 30 s over simulated days is slow and
    # changes nothing unless a test edits the spool: only those that do use
    # the real interval.
    rescan_interval = DAY

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.directory = Path(self.mktemp()).absolute() / "queue"
        self.spool = Spool(self.directory, "mail.a.test")
        self.local = TimedTransport(self.clock, next_hop="local")
        self.remote = TimedTransport(self.clock)
        self.runner = self.makeRunner()
        self.runner.startService()
        self.addCleanup(self.stop)

    def makeRunner(self, **kwargs) -> QueueRunner:
        options = dict(
            max_concurrent=20,
            max_per_destination=4,
            rescan_interval=self.rescan_interval,
        )
        options.update(kwargs)
        return QueueRunner(
            self.spool,
            self.local,
            self.remote,
            lambda address: address.endswith("@a.test"),
            self.clock,
            self.schedule,
            "mail.a.test",
            self.postmaster,
            threads=synchronously,
            **options,
        )

    def stop(self) -> None:
        if self.runner.running:
            self.runner.stopService()

    def enqueue(self, queue_id="Q1", sender="alice@a.test", recipients=("bob@b.test",)):
        """Queue a message as the SMTP side does, and wake the runner."""
        message = io.BytesIO(MESSAGE)
        now = self.clock.seconds()
        entry = self.spool.enqueue(queue_id, sender, list(recipients), message, now=now)
        self.runner.wake(queue_id)
        return entry

    def queueWithoutWake(self) -> None:
        """Queue Q1 from alice to bob as another process would: no wake."""
        message = io.BytesIO(MESSAGE)
        self.spool.enqueue("Q1", "alice@a.test", ["bob@b.test"], message, now=T0)

    def runUntil(self, when: float) -> None:
        """Advance the clock to C{when}, each timer firing at its exact time."""
        while True:
            calls = [c.getTime() for c in self.clock.getDelayedCalls()]
            upcoming = [t for t in calls if t <= when]
            if not upcoming:
                break
            self.clock.advance(max(0.0, min(upcoming) - self.clock.seconds()))
        self.clock.advance(max(0.0, when - self.clock.seconds()))

    def reports(self, transport=None) -> list[email.message.EmailMessage]:
        """The DSNs that went out (through the local transport: sender is local)."""
        transport = transport or self.local
        return [
            email.message_from_bytes(a.message, policy=email.policy.default)
            for a in transport.attempts
            if a.sender is None
        ]

    def recipientFields(self, report) -> list[dict[str, str]]:
        status = list(report.iter_parts())[1]
        return [dict(block) for block in status.get_payload()[1:]]


class DeliveryTests(RunnerTestMixin, SynchronousTestCase):
    """The ordinary case: the next hop takes the message."""

    def test_transportsProvideInterface(self) -> None:
        """The shipped fake is a real L{IOutboundTransport}."""
        self.assertTrue(verifyObject(IOutboundTransport, ScriptedTransport()))

    def test_deliveredAndRemoved(self) -> None:
        """
        A message accepted by the next hop is sent once, as queued, and then
        gone from the queue, in memory and on disk.
        """
        self.enqueue(recipients=["bob@b.test", "carol@b.test"])
        self.assertEqual(len(self.remote.attempts), 1)
        attempt = self.remote.attempts[0]
        self.assertEqual(attempt.recipients, ("bob@b.test", "carol@b.test"))
        self.assertEqual((attempt.sender, attempt.message), ("alice@a.test", MESSAGE))
        self.assertEqual(self.runner.entries, {})
        self.assertEqual(self.spool.ids(), [])
        self.assertEqual(sorted(p.name for p in self.directory.glob("*.eml")), [])

    def test_groupedByDomain(self) -> None:
        """
        One attempt per destination domain; our own users' mail goes to the
        local transport.
        """
        self.enqueue(recipients=["bob@b.test", "eve@c.test", "dan@a.test", "bo@b.test"])
        self.assertEqual(
            sorted(a.recipients for a in self.remote.attempts),
            [("bob@b.test", "bo@b.test"), ("eve@c.test",)],
        )
        self.assertEqual([a.recipients for a in self.local.attempts], [("dan@a.test",)])

    def test_logLine(self) -> None:
        """
        Each attempt logs, per recipient, the queue id, the recipient, the
        next hop, the reply and what happens next.
        """
        self.remote.script("bob@b.test", BUSY)
        with capturedLogs() as events:
            self.enqueue()
        lines = [e for e in events if e.get("recipient") == "bob@b.test"]
        self.assertEqual(len(lines), 1)
        event = lines[0]
        self.assertEqual(event["queue_id"], "Q1")
        self.assertEqual(event["next_hop"], "mx.fake.test[192.0.2.25]:25")
        self.assertEqual((event["code"], event["text"]), BUSY)
        self.assertEqual(event["next_attempt"], T0 + 5 * MINUTE)
        self.assertIn("deferred, next attempt 2023-11-14T22:18:20", formatEvent(event))


class RetryTests(RunnerTestMixin, SynchronousTestCase):
    """Temporary failures: retried on schedule, warned about, then bounced."""

    def test_schedule(self) -> None:
        """
        A recipient that keeps failing temporarily is tried after 5, 10,
        20, 40 minutes and then every hour.
        """
        self.remote.script("bob@b.test", BUSY)
        self.enqueue()
        self.runUntil(T0 + 6 * HOUR)
        gaps = [b - a for a, b in itertools.pairwise(self.remote.times)]
        self.assertEqual(gaps[:7], [300, 600, 1200, 2400, 3600, 3600, 3600])
        entry = self.spool.load("Q1")
        self.assertEqual(entry.recipients[0].attempts, len(self.remote.times))

    def test_connectionFailureRetried(self) -> None:
        """
        A synthetic 421 (no connection) is retried, and a later 250 ends
        it: delivered, no bounce, no warning.
        """
        self.remote.script("bob@b.test", REFUSED, REFUSED, (250, "2.0.0 OK"))
        self.enqueue()
        self.runUntil(T0 + HOUR)
        self.assertEqual(self.remote.times, [T0, T0 + 300, T0 + 900])
        self.assertEqual(self.spool.ids(), [])
        self.assertEqual(self.reports(), [])

    def test_giveUpAfterFiveDays(self) -> None:
        """
        Five days after arrival, the last retry falls due exactly then and,
        failing, the recipient is bounced: one DSN to the sender saying
        "failed" with the last reply; the entry leaves the queue.
        """
        self.remote.script("bob@b.test", BUSY)
        self.enqueue()
        self.runUntil(T0 + 5 * DAY - 1)
        self.assertEqual(self.spool.ids(), ["Q1"])
        failed = [r for r in self.reports() if "Undelivered" in r["Subject"]]
        self.assertEqual(failed, [])
        self.runUntil(T0 + 5 * DAY)
        self.assertEqual(self.remote.times[-1], T0 + 5 * DAY)
        self.assertEqual(self.spool.ids(), [])
        self.assertEqual(self.runner.entries, {})
        failed = [r for r in self.reports() if "Undelivered" in r["Subject"]]
        self.assertEqual(len(failed), 1)
        [fields] = self.recipientFields(failed[0])
        self.assertEqual(fields["Action"], "failed")
        self.assertEqual(fields["Status"], "4.2.1")
        self.assertEqual(
            fields["Diagnostic-Code"], "smtp; 450 4.2.1 mailbox busy, try later"
        )
        self.runUntil(T0 + 10 * DAY)
        self.assertEqual(self.remote.times[-1], T0 + 5 * DAY)

    def test_delayWarningOnce(self) -> None:
        """
        The sender is warned once, at the first deferral after 4 hours,
        with Action "delayed" and when we will give up; never again.
        """
        self.remote.script("bob@b.test", BUSY)
        self.enqueue()
        self.runUntil(T0 + 4 * HOUR - 1)
        self.assertEqual(self.reports(), [])
        self.runUntil(T0 + 5 * DAY - 1)
        warnings = self.reports()
        self.assertEqual(len(warnings), 1)
        warning = warnings[0]
        self.assertEqual(warning["Subject"], "Delayed Mail (still being retried)")
        self.assertEqual(warning["To"], "alice@a.test")
        # The first attempt at or after 4 h: 0, 5, 15, 35, 75, 135, 195, 255 min.
        self.assertEqual(self.local.times[0], T0 + 255 * MINUTE)
        [fields] = self.recipientFields(warning)
        self.assertEqual(fields["Action"], "delayed")
        self.assertEqual(fields["Will-Retry-Until"], "Sun, 19 Nov 2023 22:13:20 +0000")
        self.assertTrue(self.spool.load("Q1").warned)

    def test_noWarningWhenOff(self) -> None:
        """With delay_warning_after 0 no warning is ever sent."""
        self.schedule = RetrySchedule(delay_warning_after=0)
        self.runner.stopService()
        self.runner = self.makeRunner()
        self.runner.startService()
        self.remote.script("bob@b.test", BUSY)
        self.enqueue()
        self.runUntil(T0 + 5 * DAY - 1)
        self.assertEqual(self.reports(), [])

    def test_customSchedule(self) -> None:
        """The schedule is configurable: start, ceiling and expiry."""
        self.schedule = RetrySchedule(retry_initial=10, retry_max=25, give_up_after=100)
        self.runner.stopService()
        self.runner = self.makeRunner()
        self.runner.startService()
        self.remote.script("bob@b.test", BUSY)
        self.enqueue()
        self.runUntil(T0 + 1000)
        self.assertEqual([t - T0 for t in self.remote.times], [0, 10, 30, 55, 80, 100])
        self.assertEqual(self.spool.ids(), [])


class BounceTests(RunnerTestMixin, SynchronousTestCase):
    """Permanent failures and who hears about them."""

    def test_mixedResults(self) -> None:
        """
        One attempt answered 250, 450 and 550 for three recipients: one is
        delivered, one retried, one bounced at once, and the sender gets
        one DSN naming only the bounced one.
        """
        self.remote.script("two@b.test", BUSY)
        self.remote.script("three@b.test", UNKNOWN)
        self.enqueue(recipients=["one@b.test", "two@b.test", "three@b.test"])
        entry = self.spool.load("Q1")
        states = {r.address: r.state for r in entry.recipients}
        self.assertEqual(
            states,
            {"one@b.test": DELIVERED, "two@b.test": PENDING, "three@b.test": BOUNCED},
        )
        self.assertEqual(entry.recipient("two@b.test").attempts, 1)
        self.assertTrue(entry.recipient("three@b.test").reported)
        [report] = self.reports()
        self.assertEqual(report["To"], "alice@a.test")
        self.assertEqual(
            report["From"], "Mail Delivery System <MAILER-DAEMON@mail.a.test>"
        )
        [fields] = self.recipientFields(report)
        self.assertEqual(fields["Final-Recipient"], "rfc822; three@b.test")
        self.assertEqual(fields["Status"], "5.1.1")
        self.assertEqual(fields["Remote-MTA"], "dns; mx.fake.test")
        self.assertEqual(self.local.attempts[0].recipients, ("alice@a.test",))
        self.runUntil(T0 + 5 * MINUTE)
        self.assertEqual(self.remote.attempts[-1].recipients, ("two@b.test",))

    def test_dsnQueuedLikeAnyMessage(self) -> None:
        """
        A DSN is itself a queue entry from C{<>} with its own id
        (C{<id>.R<n>}); here held at the next hop, it waits in the queue.
        """
        self.remote.script("bob@b.test", UNKNOWN)
        self.local.script("alice@a.test", BUSY)
        self.enqueue()
        self.assertEqual(self.spool.ids(), ["Q1.R0"])
        dsn = self.spool.load("Q1.R0")
        self.assertEqual((dsn.sender, dsn.kind), (None, DSN))
        self.assertEqual([r.address for r in dsn.recipients], ["alice@a.test"])

    def test_noBounceToNullSender(self) -> None:
        """
        A message from C{<>} that bounces produces no DSN to anyone when no
        postmaster is configured; it is dropped with a log line.
        """
        self.postmaster = ""
        self.runner.stopService()
        self.runner = self.makeRunner()
        self.runner.startService()
        self.remote.script("bob@b.test", UNKNOWN)
        with capturedLogs() as events:
            self.enqueue(sender=None)
        self.assertEqual(self.local.attempts, [])
        self.assertEqual(self.spool.ids(), [])
        notes = [e["note"] for e in events if "note" in e]
        self.assertEqual(
            notes, ["undeliverable mail with null sender to bob@b.test: dropped"]
        )

    def test_failedBounceCopiedToPostmaster(self) -> None:
        """
        A bounce that cannot be delivered is never bounced (it has no
        sender); it is copied to the postmaster, and if that copy fails too
        it is dropped: nothing loops.
        """
        self.remote.script("bob@b.test", UNKNOWN)
        self.local.script("alice@a.test", UNKNOWN)
        self.local.script("postmaster@a.test", UNKNOWN)
        self.enqueue()
        self.assertEqual(
            [(a.queue_id, a.recipients) for a in self.local.attempts],
            [("Q1.R0", ("alice@a.test",)), ("Q1.R0.R0", ("postmaster@a.test",))],
        )
        notice = self.reports()[1]
        self.assertEqual(
            notice["Subject"], "Undeliverable delivery status notification"
        )
        headers = list(notice.iter_parts())[2].get_content()
        self.assertIn("Subject: Undelivered Mail Returned to Sender", headers)
        self.assertEqual(self.spool.ids(), [])
        self.runUntil(T0 + 6 * DAY)
        self.assertEqual(len(self.local.attempts), 2)

    def test_noticeKind(self) -> None:
        """The copy to the postmaster is marked as a notice, which never bounces."""
        self.remote.script("bob@b.test", UNKNOWN)
        self.local.script("alice@a.test", UNKNOWN)
        self.local.script("postmaster@a.test", BUSY)
        self.enqueue()
        notice = self.spool.load("Q1.R0.R0")
        self.assertEqual((notice.sender, notice.kind), (None, NOTICE))


class LimitTests(RunnerTestMixin, SynchronousTestCase):
    """Concurrency limits."""

    def test_perDestinationAndTotal(self) -> None:
        """
        At most max_per_destination attempts to one domain and
        max_concurrent in all are in progress; the others wait their turn
        and go as soon as a slot frees.
        """
        self.runner.stopService()
        self.runner = self.makeRunner(max_concurrent=5, max_per_destination=2)
        self.runner.startService()
        self.remote.hold = True
        for n in range(4):
            self.enqueue(f"B{n}", recipients=[f"u{n}@b.test"])
        for n in range(4):
            self.enqueue(f"C{n}", recipients=[f"u{n}@c.test"])
        self.enqueue("D0", recipients=["u@d.test"])
        self.enqueue("E0", recipients=["u@e.test"])
        started = [a.queue_id for a in self.remote.attempts]
        self.assertEqual(started, ["B0", "B1", "C0", "C1", "D0"])
        first = self.remote.pending.pop(0)
        first[0].callback(first[1])
        self.assertEqual(self.remote.attempts[-1].queue_id, "B2")
        self.remote.release()
        self.remote.release()
        self.remote.release()
        self.assertEqual(
            sorted(a.queue_id for a in self.remote.attempts),
            ["B0", "B1", "B2", "B3", "C0", "C1", "C2", "C3", "D0", "E0"],
        )
        self.assertEqual(self.spool.ids(), [])


class OperatorTests(RunnerTestMixin, SynchronousTestCase):
    """
    Changes made with C{mailsys queue} (by rewriting envelopes under the
    spool lock) reach a running runner without a restart.
    """

    rescan_interval = RESCAN_INTERVAL

    def test_wake(self) -> None:
        """C{wake} attempts a deferred entry at once."""
        self.remote.script("bob@b.test", BUSY)
        self.enqueue()
        self.runner.wake("Q1")
        self.assertEqual(self.remote.times, [T0, T0])

    def test_flush(self) -> None:
        """C{flush} attempts every deferred entry at once, except held ones."""
        self.remote.script("bob@b.test", BUSY)
        self.enqueue("Q1")
        self.enqueue("Q2")
        self.spool.modify("Q2", lambda e: setattr(e, "held", True))
        self.runner.rescan()
        self.runner.flush()
        self.assertEqual([a.queue_id for a in self.remote.attempts], ["Q1", "Q2", "Q1"])

    def test_holdAndRelease(self) -> None:
        """
        A held entry is not attempted when its retry falls due (the runner
        notices within 30 s, and re-reads the entry before any attempt);
        released, it is attempted within 30 s.
        """
        self.remote.script("bob@b.test", BUSY)
        self.enqueue()
        self.spool.modify("Q1", lambda e: setattr(e, "held", True))
        self.runUntil(T0 + 2 * HOUR)
        self.assertEqual(len(self.remote.attempts), 1)

        def release(entry: QueueEntry) -> None:
            entry.held = False
            for status in entry.pending:
                status.next_attempt = self.clock.seconds()

        self.spool.modify("Q1", release)
        self.runUntil(self.clock.seconds() + RESCAN_INTERVAL)
        self.assertEqual(len(self.remote.attempts), 2)

    def test_heldBeforeRescan(self) -> None:
        """
        Even before the periodic re-read, an entry held on disk is not
        attempted: the runner re-reads it first.
        """
        self.remote.script("bob@b.test", BUSY)
        self.enqueue()
        self.runner._rescanner.stop()
        self.spool.modify("Q1", lambda e: setattr(e, "held", True))
        self.runUntil(T0 + HOUR)
        self.assertEqual(len(self.remote.attempts), 1)

    def test_flushFromOutside(self) -> None:
        """
        An entry made due by rewriting its envelope (C{mailsys queue flush})
        is attempted within 30 s, not at its scheduled retry.
        """
        self.remote.script("bob@b.test", BUSY)
        self.enqueue()
        self.clock.advance(10)

        def due(entry: QueueEntry) -> None:
            entry.recipients[0].next_attempt = self.clock.seconds()

        self.spool.modify("Q1", due)
        self.runUntil(T0 + 10 + RESCAN_INTERVAL)
        self.assertEqual(len(self.remote.attempts), 2)
        self.assertLess(self.remote.times[1], T0 + 5 * MINUTE)

    def test_deleteFromOutside(self) -> None:
        """A deleted entry is forgotten at the next re-read and never attempted."""
        self.remote.script("bob@b.test", BUSY)
        self.enqueue()
        self.spool.remove("Q1")
        self.runUntil(T0 + RESCAN_INTERVAL)
        self.assertEqual(self.runner.entries, {})
        self.runUntil(T0 + DAY)
        self.assertEqual(len(self.remote.attempts), 1)

    def test_newEntryFromOutside(self) -> None:
        """An entry queued without a wake is found by the periodic re-read."""
        self.queueWithoutWake()
        self.runUntil(T0 + RESCAN_INTERVAL)
        self.assertEqual(len(self.remote.attempts), 1)

    def test_holdDuringAttemptKept(self) -> None:
        """
        An operator holding an entry while an attempt is on the wire loses
        nothing: the result recorded afterwards keeps the hold, and the hold
        keeps the result.
        """
        self.remote.hold = True
        self.remote.script("bob@b.test", BUSY)
        self.enqueue()
        self.spool.modify("Q1", lambda e: setattr(e, "held", True))
        self.remote.release()
        entry = self.spool.load("Q1")
        self.assertTrue(entry.held)
        self.assertEqual(entry.recipients[0].attempts, 1)
        self.assertTrue(self.runner.entries["Q1"].held)

    def test_deletedDuringAttempt(self) -> None:
        """An entry deleted while on the wire is forgotten when the answer comes."""
        self.remote.hold = True
        self.enqueue()
        self.spool.remove("Q1")
        self.remote.release()
        self.assertEqual(self.runner.entries, {})
        self.assertEqual(self.spool.ids(), [])


class RestartTests(RunnerTestMixin, SynchronousTestCase):
    """A new runner on the same spool carries on where the last one stopped."""

    def restart(self) -> None:
        self.runner.stopService()
        self.runner = self.makeRunner()
        self.runner.startService()

    def test_scheduleKept(self) -> None:
        """
        After a restart, a deferred recipient is tried at its recorded time
        and the back-off goes on doubling from where it was.
        """
        self.remote.script("bob@b.test", BUSY)
        self.enqueue()
        self.runUntil(T0 + 5 * MINUTE)
        self.restart()
        self.assertEqual(len(self.remote.attempts), 2)
        self.runUntil(T0 + 15 * MINUTE)
        self.assertEqual(self.remote.times, [T0, T0 + 300, T0 + 900])

    def test_bounceNotYetReported(self) -> None:
        """
        A recipient recorded as bounced by a process that died before
        queueing the DSN gets its DSN at start, and the entry goes.
        """
        self.runner.stopService()
        self.queueWithoutWake()

        def bounced(entry: QueueEntry) -> None:
            entry.recipients[0].state = BOUNCED
            entry.recipients[0].code, entry.recipients[0].text = UNKNOWN

        self.spool.modify("Q1", bounced)
        self.runner = self.makeRunner()
        self.runner.startService()
        self.assertEqual(len(self.reports()), 1)
        self.assertEqual(self.spool.ids(), [])

    def test_reportAlreadyQueued(self) -> None:
        """
        If the DSN was queued but not yet marked as sent when the process
        died, the restart finds it queued and sends exactly one.
        """
        self.runner.stopService()
        self.queueWithoutWake()
        self.spool.modify("Q1", lambda e: setattr(e.recipients[0], "state", BOUNCED))
        self.spool.enqueue(
            "Q1.R0", None, ["alice@a.test"], io.BytesIO(b"S: x\n\n"), kind=DSN, now=T0
        )
        self.runner = self.makeRunner()
        self.runner.startService()
        self.clock.advance(0)
        self.assertEqual([a.queue_id for a in self.local.attempts], ["Q1.R0"])
        self.assertEqual(self.spool.ids(), [])


class FaultTests(RunnerTestMixin, SynchronousTestCase):
    """Transports that misbehave."""

    def test_transportRaises(self) -> None:
        """
        A transport that fails (a bug) counts as a temporary failure for
        every recipient: retried, never lost.
        """
        calls = []

        def broken(*args):
            calls.append(args)
            if len(calls) == 1:
                return defer.fail(RuntimeError("oops"))
            return defer.succeed([RecipientResult("bob@b.test", 250, "OK")])

        self.remote.send = broken
        with capturedLogs():
            self.enqueue()
        entry = self.spool.load("Q1")
        self.assertEqual(entry.recipients[0].code, 451)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.runUntil(T0 + 5 * MINUTE)
        self.assertEqual(self.spool.ids(), [])

    def test_missingResult(self) -> None:
        """A recipient the transport says nothing about is retried, not dropped."""
        self.remote.send = lambda *a: defer.succeed(
            [
                RecipientResult("bob@b.test", 250, "OK"),
                RecipientResult("x@y.test", 250, ""),
            ]
        )
        self.enqueue(recipients=["bob@b.test", "carol@b.test"])
        entry = self.spool.load("Q1")
        self.assertEqual(entry.recipient("bob@b.test").state, DELIVERED)
        carol = entry.recipient("carol@b.test")
        self.assertEqual((carol.state, carol.code), (PENDING, 451))

    def test_caseChangedByTransport(self) -> None:
        """
        A transport that answers for C{Bob@B.test} when asked about
        C{bob@b.test} is understood: the recipient is delivered, not retried.
        """
        self.remote.send = lambda *a: defer.succeed(
            [RecipientResult("Bob@B.test", 250, "OK")]
        )
        self.enqueue()
        self.assertEqual(self.spool.ids(), [])

    def test_recordFails(self) -> None:
        """
        When the disk refuses the record of an attempt, the recipient stays
        pending and is tried again later, not in a tight loop.
        """
        real = Spool._write_envelope
        calls = []

        def failing(spool, entry):
            calls.append(entry.queue_id)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
            return real(spool, entry)

        self.patch(Spool, "_write_envelope", failing)
        self.remote.script("bob@b.test", BUSY)
        self.enqueue()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(self.spool.load("Q1").recipients[0].attempts, 0)
        self.clock.advance(1)
        self.assertEqual(len(self.remote.attempts), 1)
        self.runUntil(T0 + 5 * MINUTE)
        self.assertEqual(len(self.remote.attempts), 2)


class BacklogTests(RunnerTestMixin, SynchronousTestCase):
    """
    A long queue for busy destinations: starting work costs only the work
    started, the waiting stay in order, and one busy destination holds up
    no other.
    """

    def restart(self, **limits) -> None:
        self.runner.stopService()
        self.runner = self.makeRunner(**limits)
        self.runner.startService()
        self.remote.hold = True

    def answer(self, index: int = 0) -> None:
        """The next hop answers one attempt on the wire, the oldest by default."""
        d, results = self.remote.pending.pop(index)
        d.callback(results)

    def test_backlogCostsLinearTime(self) -> None:
        """
        Draining 1,000 messages for one domain that takes 4 at a time looks
        at each message a few times, not once per message delivered before
        it: a freed slot does not walk the backlog (that made a relay under
        load spend its time in bookkeeping instead of sending).
        """
        self.restart(max_concurrent=20, max_per_destination=4)
        # Durability is tested elsewhere; 10,000 fsyncs would only make
        # this test slow.
        self.patch(os, "fsync", lambda fd: None)
        count = 1000
        looked = []
        pending = QueueEntry.pending

        def counted(entry):
            looked.append(entry.queue_id)
            return pending.fget(entry)

        self.patch(QueueEntry, "pending", property(counted))
        for n in range(count):
            self.enqueue(f"Q{n}", recipients=[f"u{n}@b.test"])
        self.assertEqual(len(self.remote.pending), 4)
        while self.remote.pending:
            self.assertLessEqual(len(self.remote.pending), 4)
            self.remote.release()
            self.clock.advance(0)
        self.assertEqual(len(self.remote.attempts), count)
        self.assertEqual(self.spool.ids(), [])
        # Loading, scheduling, starting and recording each look a fixed
        # number of times (about 7 in all); walking the backlog at each
        # freed slot looked about count * count / 2 times.
        self.assertLess(len(looked), 10 * count)

    def test_busyDomainHoldsUpNoOther(self) -> None:
        """
        While one domain has all its slots taken and a backlog behind them,
        a message for another domain goes at once; the backlog then goes
        in the order it arrived, one as each slot frees.
        """
        self.restart(max_concurrent=20, max_per_destination=2)
        for n in range(6):
            self.enqueue(f"B{n}", recipients=[f"u{n}@b.test"])
        self.enqueue("C0", recipients=["u@c.test"])
        self.assertEqual([a.queue_id for a in self.remote.attempts], ["B0", "B1", "C0"])
        self.answer(2)
        for expected in ["B2", "B3", "B4", "B5"]:
            self.answer()
            self.assertEqual(self.remote.attempts[-1].queue_id, expected)
        self.remote.release()
        self.remote.release()
        self.assertEqual(self.spool.ids(), [])

    def test_oldestGoesWhenTotalFrees(self) -> None:
        """
        When every slot in total is taken, the slot that frees goes to the
        message that has waited longest, even if it is for another domain
        than the attempt that finished.
        """
        self.restart(max_concurrent=2, max_per_destination=2)
        self.enqueue("B0", recipients=["u0@b.test"])
        self.enqueue("B1", recipients=["u1@b.test"])
        self.enqueue("C0", recipients=["u@c.test"])
        self.enqueue("B2", recipients=["u2@b.test"])
        self.assertEqual([a.queue_id for a in self.remote.attempts], ["B0", "B1"])
        self.answer()
        self.assertEqual(self.remote.attempts[-1].queue_id, "C0")
        self.answer()
        self.assertEqual(self.remote.attempts[-1].queue_id, "B2")

    def test_twoDomainsOneBusy(self) -> None:
        """
        A message for two domains, one with no free slot: the recipients in
        the other domain go at once, the rest as soon as a slot frees, each
        recipient exactly once.
        """
        self.restart(max_concurrent=20, max_per_destination=1)
        self.enqueue("B0", recipients=["u@b.test"])
        self.enqueue("M", recipients=["x@b.test", "y@c.test", "z@b.test"])
        self.assertEqual(
            [(a.queue_id, a.recipients) for a in self.remote.attempts],
            [("B0", ("u@b.test",)), ("M", ("y@c.test",))],
        )
        self.answer()
        self.assertEqual(
            (self.remote.attempts[-1].queue_id, self.remote.attempts[-1].recipients),
            ("M", ("x@b.test", "z@b.test")),
        )
        self.remote.release()
        self.assertEqual(len(self.remote.attempts), 3)
        self.assertEqual(self.spool.ids(), [])

    def test_retryWhileWaitingForBusyDomain(self) -> None:
        """
        A new message for two domains, one with no free slot, the other
        answering "try later": that recipient is retried at its retry time,
        not again at once (nor over and over while the rest waits), and not
        only once the busy domain frees.
        """
        self.restart(max_concurrent=20, max_per_destination=1)
        self.remote.script("y@c.test", BUSY, (250, "2.0.0 OK"))
        self.enqueue("B0", recipients=["u@b.test"])
        self.enqueue("M", recipients=["x@b.test", "y@c.test"])
        # Answer only M's attempt to c.test (BUSY); B0 stays on the wire.
        self.answer(1)
        self.assertEqual(len(self.remote.attempts), 2)
        self.runUntil(T0 + 5 * MINUTE)
        self.assertEqual(
            [(a.queue_id, a.recipients) for a in self.remote.attempts],
            [("B0", ("u@b.test",)), ("M", ("y@c.test",)), ("M", ("y@c.test",))],
        )
        self.assertEqual(self.remote.times[-1], T0 + 5 * MINUTE)
        self.remote.release()
        self.remote.release()
        self.assertEqual(self.spool.ids(), [])
        self.assertEqual(len(self.remote.attempts), 4)

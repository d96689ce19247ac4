"""
A mail server reduced to its queue, for tests/test_queue_crash.py to kill.

    python queue_crash_child.py QUEUE_DIR DELIVERIES [--enqueue N] [--kill-at POINT:K]

It recovers the spool at QUEUE_DIR, starts a L{QueueRunner} on the real
reactor, enqueues N messages (M0, M1, ...; each to one recipient at b.test
and one at c.test, so two deliveries) one after another, and exits 0 once
the queue is empty.  Its transport accepts everything and appends one line
per recipient, C{<queue id> <recipient>}, to DELIVERIES, fsync'ed before it
answers: that file is what the next hop has acknowledged.

On stdout it prints, flushed at once:

    ACK <id>                  enqueue returned: the message is acknowledged
    RECORDED <id> <rcpt>...   the runner has durably recorded these deliveries

With C{--kill-at POINT:K} it sends itself SIGKILL (kill -9) the K-th time
it reaches POINT:

    message-file   an enqueue has written the message file, not the envelope
    ack            ACK has been printed, before the runner is woken
    delivery       the next hop has acknowledged, before the result is recorded
    record         the result has been recorded
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogBeginner, textFileLogObserver
from zope.interface import implementer

from mailsys.queue.interfaces import IOutboundTransport, RecipientResult
from mailsys.queue.runner import QueueRunner, RetrySchedule
from mailsys.queue.spool import Spool

MESSAGE = b"From: alice@a.test\nSubject: crash test\n\nStill here?\n"

counts: dict[str, int] = {}
kill_point, kill_count = "", 0


def reached(point: str) -> None:
    """SIGKILL ourselves if this is the chosen point's K-th time."""
    counts[point] = counts.get(point, 0) + 1
    if point == kill_point and counts[point] == kill_count:
        os.kill(os.getpid(), signal.SIGKILL)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@implementer(IOutboundTransport)
class RecordingTransport:
    """The next hop: writes down what it accepted, durably, then says 250."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def send(self, queue_id, sender, recipients, message_path):
        with open(self.path, "a") as f:
            for recipient in recipients:
                f.write(f"{queue_id} {recipient}\n")
            f.flush()
            os.fsync(f.fileno())
        reached("delivery")
        hop = "next.hop[192.0.2.1]:25"
        return defer.succeed(
            [RecipientResult(r, 250, "2.0.0 OK", hop) for r in recipients]
        )


def main() -> None:
    global kill_point, kill_count
    parser = argparse.ArgumentParser()
    parser.add_argument("queue", type=Path)
    parser.add_argument("deliveries", type=Path)
    parser.add_argument("--enqueue", type=int, default=0)
    parser.add_argument("--kill-at", default="")
    args = parser.parse_args()
    if args.kill_at:
        kill_point, count = args.kill_at.split(":")
        kill_count = int(count)
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(sys.stderr)], redirectStandardIO=False
    )

    spool = Spool(args.queue, "mail.a.test")
    real_write_message = Spool._write_message

    def write_message(self, *a, **kw):
        real_write_message(self, *a, **kw)
        reached("message-file")

    Spool._write_message = write_message  # type: ignore[method-assign]

    real_record = QueueRunner._record

    def record(self, queue_id, results, now):
        outcome = real_record(self, queue_id, results, now)
        done = [r.recipient for r in results if r.delivered]
        say(f"RECORDED {queue_id} {' '.join(done)}")
        reached("record")
        return outcome

    QueueRunner._record = record  # type: ignore[method-assign]

    transport = RecordingTransport(args.deliveries)
    runner = QueueRunner(
        spool,
        transport,
        transport,
        lambda address: False,
        reactor,
        RetrySchedule(),
        "mail.a.test",
        "",
        max_per_destination=2,
    )
    runner.startService()

    async def enqueue_all() -> None:
        await runner.ready
        for n in range(args.enqueue):
            queue_id = f"M{n}"
            recipients = [f"r{n}@b.test", f"r{n}@c.test"]
            await spool.enqueue_deferred(
                reactor, queue_id, "alice@a.test", recipients, io.BytesIO(MESSAGE)
            )
            say(f"ACK {queue_id}")
            reached("ack")
            runner.wake(queue_id)

    finished = defer.Deferred.fromCoroutine(enqueue_all())

    def check_idle() -> None:
        started = finished.called and runner.ready.called
        if started and not runner.entries and not runner.busy:
            say("IDLE")
            reactor.stop()

    finished.addErrback(lambda f: (f.printTraceback(), reactor.stop()))
    task.LoopingCall(check_idle).start(0.02)
    reactor.run()


if __name__ == "__main__":
    main()

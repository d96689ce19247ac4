"""
Crash safety of the queue with a real process and a real kill -9: the
child (tests/queue_crash_child.py) queues and delivers messages and is
killed at chosen points, or at a random moment; a second run on the same
spool must then deliver every acknowledged message, and deliver nothing a
second time except what the next hop had acknowledged and the runner had
not yet recorded (the window between their "250" and our write, which no
protocol can close).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

CHILD = Path(__file__).resolve().parent / "queue_crash_child.py"
ROOT = CHILD.parent.parent
TIMEOUT = 30


class Run:
    """What one run of the child said and did."""

    def __init__(self, status: int, stdout: str, stderr: str) -> None:
        self.status = status
        self.stderr = stderr
        lines = [line.split() for line in stdout.splitlines()]
        self.acked = [words[1] for words in lines if words[:1] == ["ACK"]]
        self.recorded = {
            (words[1], recipient)
            for words in lines
            if words[:1] == ["RECORDED"]
            for recipient in words[2:]
        }
        self.idle = ["IDLE"] in lines


class CrashTests(SynchronousTestCase):
    """kill -9 at every step of queueing and delivery, then a restart."""

    def setUp(self) -> None:
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        self.queue = base / "queue"
        self.deliveries = base / "deliveries"
        self.deliveries.touch()

    def command(self, *options: str) -> list[str]:
        paths = [str(self.queue), str(self.deliveries)]
        return [sys.executable, "-b", str(CHILD), *paths, *options]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        paths = [str(ROOT), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
        return env

    def runChild(self, *options: str) -> Run:
        done = subprocess.run(
            self.command(*options),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=self.environment(),
        )
        return Run(done.returncode, done.stdout, done.stderr)

    def delivered(self) -> Counter[tuple[str, str]]:
        lines = self.deliveries.read_text().splitlines()
        return Counter(tuple(line.split()) for line in lines)

    def crashAndRestart(self, *options: str) -> tuple[Run, Run, Counter]:
        """
        Run the child until it is killed, then again until the queue is
        empty; check what must hold whatever the kill point.
        """
        crashed = self.runChild(*options)
        self.assertEqual(crashed.status, -signal.SIGKILL, crashed.stderr)
        before = self.delivered()
        self.lines_before = self.deliveries.read_text().splitlines()
        again = self.runChild()
        self.assertEqual(again.status, 0, again.stderr)
        self.assertTrue(again.idle)
        delivered = self.delivered()
        self.assertEqual(self.queue.joinpath("tmp").exists(), True)
        left = sorted(p.name for p in self.queue.iterdir() if p.is_file())
        self.assertEqual(left, ["enqueue.lock", "lock"])
        # Nothing acknowledged is lost.
        for queue_id in crashed.acked:
            n = queue_id[1:]
            for recipient in (f"r{n}@b.test", f"r{n}@c.test"):
                self.assertIn((queue_id, recipient), delivered)
        # Only the window between the next hop's 250 and our record repeats.
        twice = {key for key, count in delivered.items() if count > 1}
        self.assertEqual(max(delivered.values()), len(twice) and 2 or 1)
        self.assertEqual(twice & crashed.recorded, set())
        self.assertLessEqual(twice, set(before) - crashed.recorded)
        return crashed, again, delivered

    def test_killedAfterMessageFile(self) -> None:
        """
        Killed inside an enqueue, after the message file and before the
        envelope: that message was never acknowledged, the restart discards
        its file with a log line, and every acknowledged one is delivered.
        """
        crashed, again, delivered = self.crashAndRestart(
            "--enqueue", "5", "--kill-at", "message-file:3"
        )
        self.assertEqual(crashed.acked, ["M0", "M1"])
        self.assertIn("M2: discarded a half-written entry", again.stderr)
        self.assertNotIn("M2", {queue_id for queue_id, _ in delivered})

    def test_killedAfterAcknowledgement(self) -> None:
        """
        Killed right after a message is acknowledged, before the runner
        heard of it: the restart delivers it, once.
        """
        crashed, again, delivered = self.crashAndRestart(
            "--enqueue", "5", "--kill-at", "ack:2"
        )
        self.assertEqual(crashed.acked, ["M0", "M1"])
        self.assertEqual(delivered[("M1", "r1@b.test")], 1)
        self.assertEqual(delivered[("M1", "r1@c.test")], 1)

    def test_killedBetweenDeliveryAndRecord(self) -> None:
        """
        Killed after the next hop said 250 and before the runner recorded
        it: those recipients get the message again after the restart (the
        unavoidable window), and nobody else does.
        """
        crashed, again, delivered = self.crashAndRestart(
            "--enqueue", "4", "--kill-at", "delivery:3"
        )
        twice = {key for key, count in delivered.items() if count > 1}
        # The kill came right after the next hop wrote its last line.
        last = tuple(self.lines_before[-1].split())
        self.assertIn(last, twice)
        self.assertNotIn(last, crashed.recorded)

    def test_killedAfterRecord(self) -> None:
        """
        Killed just after a result was recorded: that delivery is never
        repeated.
        """
        crashed, again, delivered = self.crashAndRestart(
            "--enqueue", "4", "--kill-at", "record:2"
        )
        self.assertEqual(len(crashed.recorded), 2)
        for key in crashed.recorded:
            self.assertEqual(delivered[key], 1)

    def test_killedAtRandom(self) -> None:
        """
        Killed by another process at an arbitrary moment while messages are
        being queued and delivered: the same promises hold.
        """
        child = subprocess.Popen(
            self.command("--enqueue", "60"),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=self.environment(),
        )
        output = []
        try:
            for line in child.stdout:
                output.append(line)
                if sum(1 for seen in output if seen.startswith("ACK")) >= 8:
                    child.send_signal(signal.SIGKILL)
                    break
            output.extend(child.stdout.read().splitlines(keepends=True))
        finally:
            child.kill()
            child.wait(TIMEOUT)
            child.stdout.close()
        crashed = Run(child.returncode, "".join(output), "")
        self.assertEqual(crashed.status, -signal.SIGKILL)
        before = self.delivered()
        again = self.runChild()
        self.assertEqual(again.status, 0, again.stderr)
        delivered = self.delivered()
        for queue_id in crashed.acked:
            n = queue_id[1:]
            self.assertIn((queue_id, f"r{n}@b.test"), delivered)
            self.assertIn((queue_id, f"r{n}@c.test"), delivered)
        twice = {key for key, count in delivered.items() if count > 1}
        self.assertLessEqual(twice, set(before) - crashed.recorded)
        self.assertLessEqual(max(delivered.values()), 2)

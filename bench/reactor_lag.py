"""
How long the reactor thread is blocked while mailsys works hard: the real
service tree runs in this process, a 5 ms heartbeat records how late each
tick fires, and clients in another process (so that their own work does
not hold this process's GIL) deliver mail over SMTP, log in (argon2
hashing), and fetch every message over IMAP and POP3.  A mail server whose
reactor stalls delays every other client: fsync, hashing and big reads
must happen in threads.

    .venv/bin/python bench/reactor_lag.py [--messages 200] [--size 200000]

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import imaplib
import multiprocessing
import poplib
import smtplib
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import reactor, task, threads  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402

from mailsys.accounts import UserStore  # noqa: E402
from mailsys.config import AuthSection  # noqa: E402
from mailsys.tap import build  # noqa: E402
from mailsys.testing import loopback_config, start  # noqa: E402

TICK = 0.005


def clients(ports: dict[str, int], messages: int, size: int, report) -> None:
    """The load, in a child process: SMTP in, logins, IMAP and POP3 out;
    each phase is announced on C{report}."""
    body = b"Subject: lag\r\n\r\n" + (b"x" * 998 + b"\r\n") * (size // 1000)

    def send(n: int) -> None:
        with smtplib.SMTP("127.0.0.1", ports["smtp"]) as s:
            for _ in range(n):
                s.sendmail("b@remote.example", ["alice@example.test"], body)

    report.send("smtp")
    senders = [threading.Thread(target=send, args=(messages // 4,)) for _ in range(4)]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    report.send("login")
    for _ in range(4):  # argon2 with the production parameters
        imap = imaplib.IMAP4("127.0.0.1", ports["imap"])
        imap.login("alice@example.test", "pw")
        imap.logout()
    report.send("imap")
    imap = imaplib.IMAP4("127.0.0.1", ports["imap"])
    imap.login("alice@example.test", "pw")
    imap.select("INBOX")
    imap.uid("fetch", "1:*", "(BODY.PEEK[])")
    imap.logout()
    report.send("pop3")
    pop = poplib.POP3("127.0.0.1", ports["pop3"])
    pop.user("alice@example.test")
    pop.pass_("pw")
    count, _ = pop.stat()
    for i in range(1, count + 1):
        pop.retr(i)
    pop.quit()
    report.send("done")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--size", type=int, default=200_000, help="bytes per message")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="mailsys-lag-"))
    cfg = loopback_config(
        state,
        "smtp",
        "imap",
        "pop3",
        auth=AuthSection(allow_plaintext_on_loopback=True),
    )
    UserStore(cfg.users_file, cfg.domains).add("alice@example.test", "pw")
    system = build(cfg, reactor)
    lags: list[float] = []
    worst: dict[str, float] = {}
    phase = ["start"]
    last = [time.perf_counter()]

    def beat() -> None:
        now = time.perf_counter()
        lag = now - last[0] - TICK
        lags.append(lag)
        worst[phase[0]] = max(worst.get(phase[0], 0.0), lag)
        last[0] = now

    def load(ports: dict[str, int]) -> None:
        parent, child = multiprocessing.Pipe()
        worker = multiprocessing.Process(
            target=clients, args=(ports, args.messages, args.size, child)
        )
        worker.start()
        while (message := parent.recv()) != "done":
            phase[0] = message
        worker.join()

    async def run() -> None:
        ports = await start(system, "smtp", "imap", "pop3")
        heartbeat = task.LoopingCall(beat)
        heartbeat.start(TICK)
        started = time.perf_counter()
        await threads.deferToThread(load, ports)
        elapsed = time.perf_counter() - started
        heartbeat.stop()
        await system.stopService()
        lags.sort()

        def ms(q: float) -> float:
            return lags[min(len(lags) - 1, int(q * len(lags)))] * 1000

        print(
            f"{args.messages} messages of {args.size} bytes in, 4 logins, all fetched "
            f"over IMAP and POP3: {elapsed:.1f} s"
        )
        print(
            f"reactor lag over {len(lags)} ticks: median {ms(0.5):.1f} ms, "
            f"p99 {ms(0.99):.1f} ms, max {lags[-1] * 1000:.1f} ms"
        )
        print(
            "worst lag by phase: "
            + ", ".join(f"{name} {lag * 1000:.1f} ms" for name, lag in worst.items())
        )

    task.react(lambda _: Deferred.fromCoroutine(run()))


if __name__ == "__main__":
    main()

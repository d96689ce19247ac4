"""
Opening and reading a 10,000-message INBOX over IMAP, as Thunderbird does:
the real service tree in this process, imaplib in a child process, a
maildir filled with files written directly (as a long-lived mailbox would
be).  Times the first SELECT (which moves every message from new/ to cur/),
a second SELECT, the flags of all messages, Thunderbird's header fetch, and
every body.

    .venv/bin/python bench/imap_10k.py [--messages 10000]

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import imaplib
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import reactor, task, threads  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402

from mailsys.accounts import UserStore  # noqa: E402
from mailsys.config import AuthSection  # noqa: E402
from mailsys.maildir import unique_name  # noqa: E402
from mailsys.tap import build  # noqa: E402
from mailsys.testing import loopback_config, start  # noqa: E402

HEADERS = (
    "(UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS (From To Cc Bcc Subject Date "
    "Message-ID Priority X-Priority References Newsgroups In-Reply-To Content-Type "
    "Reply-To)])"
)


def fill(new: Path, count: int) -> None:
    new.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        body = (
            f"From: sender{i}@remote.example\nTo: alice@example.test\n"
            f"Subject: message {i}\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n"
            f"Message-ID: <{i}@remote.example>\n\n" + "line of text\n" * 300
        ).encode()
        crlf_size = len(body) + body.count(b"\n")
        name = unique_name("mail.example.test", len(body), crlf_size)
        (new / name).write_bytes(body)


def client(port: int, report) -> None:
    timings = []

    def timed(label, f):
        started = time.perf_counter()
        result = f()
        timings.append((label, time.perf_counter() - started))
        return result

    imap = imaplib.IMAP4("127.0.0.1", port)
    imap.login("alice@example.test", "pw")
    timed("first SELECT INBOX", lambda: imap.select("INBOX"))
    imap.close()
    timed("second SELECT INBOX", lambda: imap.select("INBOX"))
    timed("UID FETCH 1:* (FLAGS)", lambda: imap.uid("fetch", "1:*", "(FLAGS)"))
    timed("UID FETCH 1:* headers", lambda: imap.uid("fetch", "1:*", HEADERS))
    bodies = timed(
        "UID FETCH 1:* BODY.PEEK[]", lambda: imap.uid("fetch", "1:*", "(BODY.PEEK[])")
    )
    size = sum(len(part[1]) for part in bodies[1] if isinstance(part, tuple))
    imap.logout()
    report.send((timings, size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="mailsys-imap10k-"))
    cfg = loopback_config(
        state, "imap", auth=AuthSection(allow_plaintext_on_loopback=True)
    )
    UserStore(cfg.users_file, cfg.domains).add("alice@example.test", "pw")
    fill(cfg.mail_dir / "example.test" / "alice" / "new", args.messages)
    os.sync()
    system = build(cfg, reactor)

    def load(port: int):
        parent, child = multiprocessing.Pipe()
        worker = multiprocessing.Process(target=client, args=(port, child))
        worker.start()
        result = parent.recv()
        worker.join()
        return result

    async def run() -> None:
        port = (await start(system, "imap"))["imap"]
        timings, size = await threads.deferToThread(load, port)
        await system.stopService()
        print(f"{args.messages} messages, {size / 1e6:.1f} MB of bodies, loopback")
        for label, seconds in timings:
            print(f"  {label:28s} {seconds:6.2f} s")

    task.react(lambda _: Deferred.fromCoroutine(run()))


if __name__ == "__main__":
    main()

"""
How long C{mailsys mailbox ls} takes on a 10,000-message folder, as an
administrator runs it: a new process each time, output to a pipe.

The first run meets a folder no mailsys process has seen (no UID list, no
cache: files without sizes in their names are read once to measure them,
every header block is read); the second run finds C{mailsys-uidlist} and
C{mailsys-cache} and the files in the page cache.  C{--limit 20} and
C{--json} are timed too, and C{mailbox list} over the same mailbox.

Run by hand: C{python bench/mailbox_ls.py [COUNT]}.  It works in a
temporary directory that it removes afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADDRESS = "alice@example.test"
BODY = b"Hello,\n\n" + b"A line of a message body, long enough to be typical.\n" * 30


def build(state: Path, count: int) -> None:
    """
    Alice's INBOX with C{count} messages written straight into cur/: half
    named as mailsys and Dovecot name them (sizes in the name), half as
    mutt does; RFC 2047 subjects, a realistic header block.
    """
    maildir = state / "mail" / "example.test" / "alice"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    for n in range(count):
        when = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(1e9 + n * 60))
        header = (
            f"Return-Path: <sender{n}@example.org>\n"
            f"Received: from mx.example.org by mail.example.test; {when}\n"
            f"From: =?utf-8?q?J=C3=B6rg_{n}?= <sender{n}@example.org>\n"
            f"To: {ADDRESS}\n"
            f"Subject: =?utf-8?b?R3LDvMOfZQ==?= number {n}\n"
            f"Date: {when}\n"
            f"Message-ID: <{n}@example.org>\n"
            "MIME-Version: 1.0\n"
            "Content-Type: text/plain; charset=utf-8\n\n"
        ).encode()
        data = header + BODY
        if n % 2:
            wsize = len(data) + data.count(b"\n")
            name = f"{1_700_000_000 + n}.M{n:06d}P1.bench,S={len(data)},W={wsize}:2,S"
        else:
            name = f"{1_700_000_000 + n}.M{n:06d}P1.mutt:2,"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        fd = os.open(maildir / "cur" / name, flags, 0o600)
        os.write(fd, data)
        os.close(fd)


def timed(label: str, config: Path, *argv: str) -> None:
    """Run C{mailsys --config CONFIG ARGV...} in a new process and time it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "mailsys.cli", "--config", str(config), *argv]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, env=env, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr.decode(errors="replace"))
    lines = done.stdout.count(b"\n")
    print(f"{label:<40} {elapsed * 1000:8.0f} ms  ({lines} lines)")


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    with tempfile.TemporaryDirectory() as directory:
        base = Path(directory)
        config = base / "mailsys.toml"
        config.write_text(
            '[server]\nstate_dir = "var"\n[domains]\nnames = ["example.test"]\n'
        )
        start = time.perf_counter()
        build(base / "var", count)
        elapsed = time.perf_counter() - start
        label = "building the folder"
        print(f"{label:<40} {elapsed * 1000:8.0f} ms  ({count} messages)")
        timed("python -m mailsys.cli --help (startup)", config, "--help")
        timed("mailbox ls, first run (no cache)", config, "mailbox", "ls", ADDRESS)
        timed("mailbox ls, second run", config, "mailbox", "ls", ADDRESS)
        limited = ("mailbox", "ls", ADDRESS, "--limit", "20")
        timed("mailbox ls --limit 20", config, *limited)
        timed("mailbox ls --json", config, "mailbox", "ls", ADDRESS, "--json")
        timed("mailbox list", config, "mailbox", "list")
        search = ("mailbox", "search", ADDRESS, "--subject", "number 9999")
        timed("mailbox search --subject 'number 9999'", config, *search)


if __name__ == "__main__":
    main()

"""
How long scanning a 10,000-message folder takes: the first scan (every
file stat'ed, the ones without sizes in their names read), the second scan
by the same session (from memory and the directory listing only) and the
scan of a restarted server (from mailsys-uidlist and mailsys-cache).

Run by hand: C{python bench/mailstore_scan.py [COUNT]}.  It works in a
temporary directory that it removes afterwards.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailsys.maildir import Folder, Mailbox, MaildirStore  # noqa: E402

ADDRESS = "alice@example.test"


def build(root: Path, count: int) -> Folder:
    """
    A user's INBOX holding C{count} messages written straight into cur/:
    half named as mailsys and Dovecot name them (sizes in the name), half
    as mutt does (no sizes, so the first scan has to read them).
    """
    store = MaildirStore(root, "bench.example.test")
    store.create(ADDRESS)
    cur = store.path_for(ADDRESS) / "cur"
    for n in range(count):
        data = b"Subject: message %d\nFrom: bob@example.org\n\nHello.\n" % n
        if n % 2:
            wsize = len(data) + data.count(b"\n")
            name = f"{1_700_000_000 + n}.M{n:06d}P1.bench,S={len(data)},W={wsize}:2,S"
        else:
            name = f"{1_700_000_000 + n}.M{n:06d}P1.mutt:2,"
        fd = os.open(cur / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.close(fd)
    return Mailbox(store, ADDRESS).folder("INBOX")


def timed(label: str, scan) -> None:
    start = time.perf_counter()
    infos = scan()
    elapsed = time.perf_counter() - start
    print(f"{label:<34} {elapsed * 1000:8.1f} ms  ({len(infos)} messages)")


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        inbox = build(Path(directory) / "mail", count)
        elapsed = time.perf_counter() - start
        print(f"{'building the folder':<34} {elapsed * 1000:8.1f} ms")
        timed("first scan (cold, no cache)", inbox.scan)
        timed("second scan (same session)", inbox.scan)
        timed("third scan (same session)", inbox.scan)
        timed("scan after a restart", Folder(inbox.path, "INBOX", inbox.hostname).scan)
        timed("claim_new scan, nothing new", lambda: inbox.scan(claim_new=True))


if __name__ == "__main__":
    main()

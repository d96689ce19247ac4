"""
Submission -> queue -> remote delivery throughput: messages per second from
the first submission on instance a.test (587, AUTH, fsync'ed into the
queue) until the last one is stored by instance b.test (its MX, fsync'ed
into the maildir), both real ``twistd mailsys`` processes on loopback.

    .venv/bin/python bench/relay_throughput.py [--clients 4] [--messages 400]

Not part of the test suite.

With --clients 4 --messages 800 (a backlog for one destination taking 4
at a time), making the queue runner start waiting work from per-destination
lines instead of walking every due entry at each freed slot took the
runner's share of a.test's reactor thread from ~35% to under 1% (py-spy),
and end to end from ~44 to ~52 messages/s on a 2-CPU machine; what is left
is mostly fsync.
"""

from __future__ import annotations

import argparse
import os
import shutil
import smtplib
import sys
import tempfile
import threading
import time
from email.message import EmailMessage
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.smtp_delivery import twistd, wait_for  # noqa: E402
from mailsys.accounts import UserStore  # noqa: E402
from mailsys.testing import free_port  # noqa: E402


def instance(work: Path, domain: str, listen: str, extra: str = "") -> Path:
    work.mkdir(parents=True)
    (work / "mailsys.toml").write_text(
        f'[server]\nhostname = "mail.{domain}"\nstate_dir = "state"\n'
        f"[listen]\n{listen}\n"
        f'[domains]\nnames = ["{domain}"]\n'
        "[auth]\nallow_plaintext_on_loopback = true\n"
        "[limits]\nmax_connections_per_client = 1000\n"
        f"{extra}"
    )
    UserStore(work / "state" / "users.json", [domain]).add(f"user@{domain}", "pw")
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--messages", type=int, default=400)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mailsys-relay-"))
    mx, submission = free_port(), free_port()
    b = instance(root / "b", "b.test", f'smtp = "tcp:{mx}:interface=127.0.0.1"')
    a = instance(
        root / "a",
        "a.test",
        f'submission = "tcp:{submission}:interface=127.0.0.1"',
        f'[relay]\nroutes = {{ "b.test" = "127.0.0.1:{mx}" }}\n'
        'resolver = "127.0.0.1:53"\n',
    )
    procs = [twistd(["mailsys", "--config", "mailsys.toml"], b)]
    wait_for(mx, procs[0])
    procs.append(twistd(["mailsys", "--config", "mailsys.toml"], a))
    wait_for(submission, procs[1])
    inbox = b / "state" / "mail" / "b.test" / "user" / "new"

    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "user@a.test", "user@b.test", "relay bench"
    msg.set_content(("x" * 75 + "\n") * 50)
    per_client = args.messages // args.clients
    total = per_client * args.clients

    def client() -> None:
        with smtplib.SMTP("127.0.0.1", submission, timeout=60) as s:
            s.login("user@a.test", "pw")
            for _ in range(per_client):
                s.send_message(msg)

    try:
        start = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        submitted = time.perf_counter() - start
        while (len(os.listdir(inbox)) if inbox.exists() else 0) < total:
            if time.perf_counter() - start > 300:
                raise SystemExit("not all messages arrived within 300 s")
            time.sleep(0.02)
        delivered = time.perf_counter() - start
        print(f"{args.clients} clients, {total} messages of ~4 KB, loopback")
        print(
            f"submission accepted (queued, fsync):  {total / submitted:8.1f} messages/s"
        )
        print(
            f"end to end (stored at b.test, fsync): {total / delivered:8.1f} messages/s"
        )
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""
Inbound delivery rate: messages per second stored by mailsys (fsync on,
250 only after the file and directory are synced) next to Twisted's own
ESMTP server and maildir writer (no fsync; see bench/twisted_peer.py for why
not ``twistd mail`` itself) in the same run, each fed by the same
concurrent smtplib clients on loopback.

    .venv/bin/python bench/smtp_delivery.py [--clients 4] [--messages 250] [--size 4096]

Not part of the test suite: numbers depend on the disk and the machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from email.message import EmailMessage
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
TWISTD = "from twisted.scripts.twistd import run; run()"

sys.path.insert(0, str(PROJECT))
from mailsys.testing import free_port  # noqa: E402


def wait_for(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.communicate()[1].decode()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("server did not start")


def twistd(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(PROJECT))
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            TWISTD,
            "-n",
            "--pidfile=",
            "--logfile=twistd.log",
            *args,
        ],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def start_mailsys(work: Path) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    (work / "mailsys.toml").write_text(
        f'[server]\nhostname = "mail.example.test"\nstate_dir = "state"\n'
        f'[listen]\nsmtp = "tcp:{port}:interface=127.0.0.1"\n'
        f'[domains]\nnames = ["example.test"]\n'
        f"[limits]\nmax_connections_per_client = 1000\n"
    )
    from mailsys.accounts import UserStore

    UserStore(work / "state" / "users.json", ["example.test"]).add(
        "alice@example.test", "pw"
    )
    proc = twistd(["mailsys", "--config", "mailsys.toml"], work)
    wait_for(port, proc)
    return proc, port, work / "state" / "mail" / "example.test" / "alice" / "new"


def start_twisted_peer(work: Path) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    maildir = work / "example.test"
    maildir.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(PROJECT / "bench" / "twisted_peer.py"),
            str(port),
            str(maildir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wait_for(port, proc)
    return proc, port, maildir / "alice" / "new"


def send(port: int, clients: int, messages: int, size: int) -> float:
    msg = EmailMessage()
    msg["From"] = "bench@remote.example"
    msg["To"] = "alice@example.test"
    msg["Subject"] = "bench"
    msg.set_content(("x" * 75 + "\n") * max(1, size // 76))
    data = msg.as_bytes()
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
                s.ehlo("bench.example")
                for _ in range(n):
                    s.sendmail("bench@remote.example", ["alice@example.test"], data)
        except BaseException as e:  # reported below
            errors.append(e)

    per_client = messages // clients
    threads = [
        threading.Thread(target=client, args=(per_client,)) for _ in range(clients)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise SystemExit(f"client error: {errors[0]!r}")
    return per_client * clients / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    print(
        f"{args.clients} clients, {args.messages} messages "
        f"of ~{args.size} bytes, loopback"
    )
    for name, start in (
        ("mailsys (fsync)", start_mailsys),
        ("Twisted ESMTP+FileMessage (no fsync)", start_twisted_peer),
    ):
        work = Path(tempfile.mkdtemp(prefix="mailsys-bench-"))
        proc, port, new = start(work)
        try:
            rate = send(port, args.clients, args.messages, args.size)
            stored = len(os.listdir(new)) if new.exists() else 0
            print(f"{name:38s} {rate:8.1f} messages/s   stored {stored}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

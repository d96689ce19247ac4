"""
The C{mailsys} command: what an administrator runs next to the server.

C{mailsys [--config FILE] COMMAND ...} reads the same configuration as
C{twistd mailsys} (the development instance under C{./var} when no file is
given) and works on the same files, so a user added here can log in to a
running server at once.  Every mistake (a bad file, an unknown user, an
invalid address) is one line on stderr and exit status 2, never a
traceback.

New commands are one function each that adds a subparser and sets
C{run=}; append it to L{COMMANDS}.
"""

from __future__ import annotations

import argparse
import getpass
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from mailsys import config as configuration
from mailsys.accounts import AccountError, UserStore, maildir_path
from mailsys.addresses import MailAddress
from mailsys.cli_dns import add_dns_commands
from mailsys.cli_mailbox import add_mailbox_commands
from mailsys.config import Config, ConfigError
from mailsys.queue.bounce import original_headers
from mailsys.queue.runner import RESCAN_INTERVAL
from mailsys.queue.spool import PENDING, QueueEntry, Spool, SpoolError

if TYPE_CHECKING:
    _Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

# Exit statuses: 2 for anything the administrator can fix by changing the
# command or the files (argparse uses 2 for usage errors too), 1 for the
# system refusing (permissions, a full disk).
EXIT_USER_ERROR = 2
EXIT_SYSTEM_ERROR = 1


class CommandError(Exception):
    """A problem with how the command was used; C{str()} is one line."""


# --- user -------------------------------------------------------------------


def _user_store(cfg: Config) -> UserStore:
    """The user directory of C{cfg}, refusing new users in foreign domains."""
    return UserStore(cfg.users_file, cfg.domains)


def _read_new_password() -> str:
    """
    A new password: the first line of stdin when it is not a terminal (so
    scripts can pipe it in), otherwise typed twice without echo.
    """
    stdin = sys.stdin
    if stdin is not None and stdin.isatty():
        try:
            first = getpass.getpass("Password: ")
            second = getpass.getpass("Repeat password: ")
        except EOFError:  # Ctrl-D at the prompt
            raise CommandError("no password given") from None
        if first != second:
            raise CommandError("passwords do not match")
        return first
    try:
        line = stdin.readline() if stdin is not None else ""
    except UnicodeDecodeError:
        raise CommandError("password on standard input is not valid UTF-8") from None
    if not line:
        raise CommandError("no password on standard input")
    # Only the line ending goes: spaces may be part of the password.
    if line.endswith("\n"):
        line = line[:-1]
        if line.endswith("\r"):
            line = line[:-1]
    return line


def _create_maildir(mail_dir: Path, address: MailAddress) -> Path:
    """
    Create C{<mail_dir>/<domain>/<local>/{cur,new,tmp}}, private to the
    server's user, so that the mailbox exists before the first message.
    """
    path = maildir_path(mail_dir, address)
    mail_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for directory in (path.parent, path, path / "cur", path / "new", path / "tmp"):
        directory.mkdir(mode=0o700, exist_ok=True)
    return path


def _user_add(cfg: Config, args: argparse.Namespace) -> int:
    """Add a user (asking for the password only once the address is known good)."""
    store = _user_store(cfg)
    address = store.check_address(args.address)
    if store.exists(address):
        raise AccountError(f"user {address} already exists")
    store.add(str(address), _read_new_password())
    maildir = _create_maildir(cfg.mail_dir, address)
    print(f"added {address} (mailbox {maildir})")
    return 0


def _user_passwd(cfg: Config, args: argparse.Namespace) -> int:
    """Change a user's password (asking for it only if the user exists)."""
    store = _user_store(cfg)
    address = store.parse(args.address)
    if not store.exists(address):
        raise AccountError(f"no such user: {address}")
    store.set_password(str(address), _read_new_password())
    print(f"password changed for {address}")
    return 0


def _user_del(cfg: Config, args: argparse.Namespace) -> int:
    """Remove a user, leaving their mail where it is."""
    store = _user_store(cfg)
    address = store.parse(args.address)
    store.remove(str(address))
    maildir = maildir_path(cfg.mail_dir, address)
    print(f"removed {address}; their mail is left in {maildir}")
    return 0


def _user_list(cfg: Config, args: argparse.Namespace) -> int:
    """Print every user, one address a line."""
    for address in _user_store(cfg).addresses():
        print(address)
    return 0


def add_user_commands(commands: _Subparsers) -> None:
    """C{mailsys user add|passwd|del|list}."""
    user = commands.add_parser("user", help="add, change, remove and list users")
    actions = user.add_subparsers(dest="action", metavar="ACTION", required=True)
    password_note = (
        "The password is read from the first line of standard input when it is"
        " not a terminal, otherwise prompted for twice."
    )
    add = actions.add_parser(
        "add", help="add a user and create their mailbox", description=password_note
    )
    add.add_argument("address", help="local@domain, in one of our domains")
    add.set_defaults(run=_user_add)
    passwd = actions.add_parser(
        "passwd", help="change a user's password", description=password_note
    )
    passwd.add_argument("address")
    passwd.set_defaults(run=_user_passwd)
    delete = actions.add_parser("del", help="remove a user (their mail stays on disk)")
    delete.add_argument("address")
    delete.set_defaults(run=_user_del)
    listing = actions.add_parser("list", help="list users")
    listing.set_defaults(run=_user_list)


# --- check-config -------------------------------------------------------------


def _check_config(cfg: Config, args: argparse.Namespace) -> int:
    """Print the effective settings; loading them already validated them."""
    print(configuration.describe(cfg), end="")
    print(f"OK: {cfg.path if cfg.path is not None else 'development instance'}")
    return 0


def add_check_config_command(commands: _Subparsers) -> None:
    """C{mailsys check-config}."""
    check = commands.add_parser(
        "check-config", help="validate the configuration and print every setting"
    )
    check.set_defaults(run=_check_config)


# --- queue --------------------------------------------------------------------
#
# These commands change the envelopes of the queue directory under the same
# lock the running server writes them with (see mailsys.queue.spool), so
# neither loses the other's changes.  The server re-reads the queue every
# RESCAN_INTERVAL seconds and re-reads an entry before each attempt: a hold
# or delete takes effect at once, a flush or release within that interval.


def _spool(cfg: Config) -> Spool:
    return Spool(cfg.state_dir / "queue", cfg.server.hostname)


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    moment = datetime.fromtimestamp(seconds, timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def _size(path: Path) -> str:
    try:
        return str(path.stat().st_size)
    except OSError:
        return "?"


def _entry(spool: Spool, queue_id: str) -> QueueEntry:
    """The entry C{queue_id}, or a one-line error."""
    try:
        entry = spool.load(queue_id)
    except SpoolError as e:
        raise CommandError(str(e)) from None
    if entry is None:
        raise CommandError(f"no such queue entry: {queue_id}")
    return entry


def _change(
    cfg: Config, queue_id: str, change: Callable[[QueueEntry], object]
) -> QueueEntry:
    """Apply C{change} to C{queue_id} under the queue lock, or a one-line error."""
    spool = _spool(cfg)
    _entry(spool, queue_id)
    try:
        entry = spool.modify(queue_id, change)
    except SpoolError as e:
        raise CommandError(str(e)) from None
    if entry is None:
        raise CommandError(f"no such queue entry: {queue_id}")
    return entry


def _recipient_line(status) -> str:
    line = f"    {_one_line(status.address)}  {status.state}"
    if status.state == PENDING:
        next_attempt = _when(status.next_attempt)
        line += f", {status.attempts} failed attempts, next {next_attempt}"
    if status.code:
        reply = _one_line(f"{status.code} {status.text}")
        line += f": {reply}"
        if status.next_hop:
            line += f" ({_one_line(status.next_hop)})"
    return line


def _queue_list(cfg: Config, args: argparse.Namespace) -> int:
    """Every entry: id, size, arrival, sender, flags, then its recipients."""
    spool = _spool(cfg)
    entries, problems = spool.load_all()
    for problem in problems.values():
        print(f"mailsys: {_one_line(problem)}", file=sys.stderr)
    if not entries:
        print("queue is empty")
        return 0
    held = 0
    for entry in entries:
        flags = []
        if entry.held:
            flags.append("held")
            held += 1
        if entry.kind != "mail":
            flags.append(entry.kind)
        sender = _one_line(entry.sender) if entry.sender is not None else "<>"
        marks = f"  [{', '.join(flags)}]" if flags else ""
        size = _size(entry.message_path)
        print(f"{entry.queue_id}  {size}  {_when(entry.created)}  {sender}{marks}")
        for status in entry.recipients:
            print(_recipient_line(status))
    count = len(entries)
    print(f"-- {count} {'entry' if count == 1 else 'entries'}, {held} held")
    return 0


def _queue_show(cfg: Config, args: argparse.Namespace) -> int:
    """One entry in full: envelope, every recipient, and the message headers."""
    spool = _spool(cfg)
    entry = _entry(spool, args.id)
    sender = _one_line(entry.sender) if entry.sender is not None else "<>"
    print(f"id: {entry.queue_id}")
    print(f"kind: {entry.kind}")
    print(f"sender: {sender}")
    print(f"arrived: {_when(entry.created)}")
    print(f"size: {_size(entry.message_path)}")
    print(f"held: {'yes' if entry.held else 'no'}")
    print(f"delay warning sent: {'yes' if entry.warned else 'no'}")
    print(f"message file: {entry.message_path}")
    print("recipients:")
    for status in entry.recipients:
        print(_recipient_line(status))
    print("headers:")
    headers = original_headers(entry.message_path).decode("utf-8", errors="replace")
    for line in headers.splitlines():
        print(f"    {_one_line(line)}")
    return 0


def _queue_flush(cfg: Config, args: argparse.Namespace) -> int:
    """Make every pending recipient of every entry not held due now."""
    spool = _spool(cfg)
    now = time.time()
    count = 0

    def due(entry: QueueEntry) -> bool:
        if entry.held or not entry.pending:
            return False
        for status in entry.pending:
            status.next_attempt = now
        return True

    for queue_id in spool.ids():
        try:
            entry = spool.modify(queue_id, due)
        except SpoolError as e:
            print(f"mailsys: {_one_line(str(e))}", file=sys.stderr)
            continue
        if entry is not None and not entry.held and entry.pending:
            count += 1
    print(
        f"{count} {'entry' if count == 1 else 'entries'} due now; a running server"
        f" tries {'it' if count == 1 else 'them'} within {RESCAN_INTERVAL:g} seconds"
    )
    return 0


def _queue_delete(cfg: Config, args: argparse.Namespace) -> int:
    """Remove an entry without delivering it further and without a bounce."""
    spool = _spool(cfg)
    _entry(spool, args.id)
    if not spool.remove(args.id):
        raise CommandError(f"no such queue entry: {args.id}")
    print(f"deleted {args.id}")
    return 0


def _queue_hold(cfg: Config, args: argparse.Namespace) -> int:
    """Stop attempting an entry until it is released (it still expires later)."""
    _change(cfg, args.id, lambda entry: setattr(entry, "held", True))
    print(f"held {args.id}")
    return 0


def _queue_release(cfg: Config, args: argparse.Namespace) -> int:
    """Undo a hold, and make the entry due now."""
    now = time.time()

    def release(entry: QueueEntry) -> None:
        entry.held = False
        for status in entry.pending:
            status.next_attempt = now

    _change(cfg, args.id, release)
    print(
        f"released {args.id}; a running server tries it within"
        f" {RESCAN_INTERVAL:g} seconds"
    )
    return 0


def add_queue_commands(commands: _Subparsers) -> None:
    """C{mailsys queue list|show|flush|delete|hold|release}."""
    queue = commands.add_parser(
        "queue",
        help="inspect and change the outbound queue",
        description=(
            "Work on the outbound queue under <state_dir>/queue.  Changes reach a"
            f" running server within {RESCAN_INTERVAL:g} seconds, without a restart."
        ),
    )
    actions = queue.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list queued messages and recipients")
    listing.set_defaults(run=_queue_list)
    show = actions.add_parser("show", help="show one queued message in full")
    show.add_argument("id", help="queue id, as printed by 'queue list'")
    show.set_defaults(run=_queue_show)
    actions.add_parser(
        "flush", help="retry every queued message now (except held ones)"
    ).set_defaults(run=_queue_flush)
    delete = actions.add_parser(
        "delete", help="remove a message from the queue (no bounce is sent)"
    )
    delete.add_argument("id")
    delete.set_defaults(run=_queue_delete)
    hold = actions.add_parser("hold", help="stop trying a message until released")
    hold.add_argument("id")
    hold.set_defaults(run=_queue_hold)
    release = actions.add_parser(
        "release", help="release a held message and retry it now"
    )
    release.add_argument("id")
    release.set_defaults(run=_queue_release)


# --- main ---------------------------------------------------------------------

# Each adds one subparser whose C{run(config, args) -> int} does the work.
COMMANDS: list[Callable[[_Subparsers], None]] = [
    add_user_commands,
    add_check_config_command,
    add_queue_commands,
    add_dns_commands,
    add_mailbox_commands,
]


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: global options and one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="mailsys", description="Administer a mailsys mail system."
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        type=Path,
        help="configuration file (default: the development instance in ./var)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in COMMANDS:
        add_command(commands)
    return parser


def _one_line(message: str) -> str:
    """Control characters escaped, so an error is always exactly one line."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], message)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the exit status instead of exiting."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    try:
        if args.config is None:
            cfg = configuration.development(Path.cwd())
        else:
            cfg = configuration.load(args.config)
        return int(args.run(cfg, args))
    except (ConfigError, AccountError, CommandError) as e:
        print(f"mailsys: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"mailsys: {_one_line(f'{e.strerror or e}{where}')}", file=sys.stderr)
        return EXIT_SYSTEM_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

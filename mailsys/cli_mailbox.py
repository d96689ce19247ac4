"""
C{mailsys mailbox ...}: look into users' mail, and move it in and out.

The terminal edge of L{mailsys.inspection}: parsing, aligned tables or one
JSON document (C{--json}, stable keys, for scripts), progress on a
terminal.  Safe while the server runs: only C{import} writes.

Errors follow the C{mailsys} rules without importing L{mailsys.cli}
(which imports this module to register it): a missing mailbox, folder,
message or part, or a folder name the store refuses, is one line
C{mailsys: ...} on stderr and exit status 2; one damaged message is one
line on stderr and the rest is still shown.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import sys
import time
import unicodedata
from datetime import date, datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Sequence

from mailsys.accounts import AccountError, UserStore
from mailsys.config import Config
from mailsys.inspection import (
    InspectError,
    MailboxSummary,
    MessageSummary,
    MessageView,
    SearchCriteria,
    all_folders,
    canonical_address,
    domain_stats,
    export_mbox,
    find_message,
    import_messages,
    list_mailboxes,
    open_folder,
    open_mailbox,
    printable,
    read_bytes,
    read_message,
    read_part,
    search,
    summarize_messages,
)
from mailsys.maildir import (
    FLAG_LETTERS,
    DeliveryError,
    Folder,
    FolderError,
    Mailbox,
    MaildirStore,
)

if TYPE_CHECKING:
    _Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

# The statuses of mailsys.cli: 2 for what the administrator can fix in the
# command, 1 for the system refusing.
EXIT_USER_ERROR = 2
EXIT_SYSTEM_ERROR = 1

# Widest FROM and SUBJECT cells when the output is not a terminal.
FROM_WIDTH = 30
SUBJECT_WIDTH = 60
# At most this often, in seconds, the progress line is redrawn.
PROGRESS_INTERVAL = 0.1

_POSSIBLY_WIDE = re.compile("[\u1100-\u2025\u2027-\U0010ffff]")
_MAIN_HEADERS = ("From", "To", "Cc", "Date", "Subject", "Message-ID")


class Progress:
    """
    C{\\rDONE/TOTAL} on stderr while a long scan runs, only when stderr is
    a terminal (a script's log stays clean), and one-line problem reports
    that never land in the middle of it.
    """

    def __init__(
        self, stream: IO[str], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stream = stream
        self._clock = clock
        self._enabled = _isatty(stream)
        self._last = float("-inf")
        self._width = 0

    def __call__(self, done: int, total: int) -> None:
        if not self._enabled:
            return
        now = self._clock()
        if done < total and now - self._last < PROGRESS_INTERVAL:
            return
        self._last = now
        text = f"\r{done}/{total}"
        self._width = max(self._width, len(text) - 1)
        self._stream.write(text)
        self._stream.flush()

    def clear(self) -> None:
        """Remove the progress line, before other output."""
        if self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
            self._width = 0
            self._last = float("-inf")

    def report(self, problem: str) -> None:
        """One line on stderr for one damaged message or folder."""
        self.clear()
        self._stream.write(f"mailsys: {printable(problem)}\n")
        self._stream.flush()


def _isatty(stream: IO[str]) -> bool:
    """Whether C{stream} is a terminal (a closed or odd stream is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _guarded(run: Callable[[Config, argparse.Namespace], int]) -> Callable:
    """
    Turn the errors an administrator can fix into one line and status 2,
    and a store that cannot be written (import on a full disk) into one
    line and status 1.
    """

    @functools.wraps(run)
    def guarded(cfg: Config, args: argparse.Namespace) -> int:
        try:
            return run(cfg, args)
        except (InspectError, FolderError, AccountError) as e:
            print(f"mailsys: {printable(str(e))}", file=sys.stderr)
            return EXIT_USER_ERROR
        except DeliveryError as e:
            print(f"mailsys: {printable(str(e))}", file=sys.stderr)
            return EXIT_SYSTEM_ERROR
        except BrokenPipeError:
            # "mailsys mailbox ls ... | head": the reader has seen enough.
            _silence_stdout()
            return EXIT_SYSTEM_ERROR

    return guarded


def _silence_stdout() -> None:
    """After a broken pipe, so the interpreter's final flush fails quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


# --- output --------------------------------------------------------------------


def _narrow(text: str) -> bool:
    """
    Whether every character surely takes one column: nothing from U+1100
    on, where East Asian wide characters start, but our ellipsis.
    """
    return text.isascii() or _POSSIBLY_WIDE.search(text) is None


def _width(text: str) -> int:
    """Columns on a terminal: East Asian wide characters take two."""
    if _narrow(text):
        return len(text)
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _cut(text: str, limit: int | None) -> str:
    """C{text} on one line, at most C{limit} columns (ending in an ellipsis)."""
    text = printable(text)
    if limit is None or _width(text) <= limit:
        return text
    if _narrow(text):
        return text[: limit - 1] + "\u2026"
    out, used = [], 0
    for c in text:
        w = _width(c)
        if used + w > limit - 1:
            break
        out.append(c)
        used += w
    return "".join(out) + "\u2026"


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: frozenset[int] = frozenset(),
) -> list[str]:
    """
    Aligned lines: two spaces between columns, numbers (columns in
    C{right}) right-aligned, no trailing spaces.
    """
    widths = [_width(h) for h in headers]
    for row in rows:
        widths = [max(w, _width(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = []
    for row in [list(headers)] + [list(r) for r in rows]:
        cells = []
        for index, (cell, w) in enumerate(zip(row, widths, strict=True)):
            pad = " " * (w - _width(cell))
            cells.append(pad + cell if index in right else cell + pad)
        lines.append("  ".join(cells).rstrip())
    return lines


def human_size(size: int | None) -> str:
    """C{1.2K}, C{34M}: bytes in powers of 1024, as C{ls -h} shows them."""
    if size is None:
        return "-"
    value = float(size)
    if value < 1024:
        return str(size)
    for unit in "KMGT":
        value /= 1024
        if value < 1024 or unit == "T":
            break
    return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"


def _letters(flags: frozenset[str]) -> str:
    """Flags as the maildir info letters (D F R S T), as mutt users know them."""
    return "".join(sorted(FLAG_LETTERS[f] for f in flags if f in FLAG_LETTERS))


def _flag_names(flags: frozenset[str]) -> list[str]:
    """Flags for JSON: C{["flagged", "seen"]}."""
    return sorted(f.lstrip("\\").lower() for f in flags)


def _when(seconds: float, form: str = "%Y-%m-%d %H:%M") -> str:
    """A time in UTC; C{"?"} for one no calendar has (a file's odd mtime)."""
    try:
        return datetime.fromtimestamp(seconds, timezone.utc).strftime(form)
    except (ValueError, OverflowError, OSError):
        return "?"


def _iso(seconds: float) -> str:
    """A time for JSON: ISO 8601 in UTC."""
    return _when(seconds, "%Y-%m-%dT%H:%M:%SZ")


def _key_text(key: str) -> str:
    """A file name that may hold undecodable bytes, as valid text."""
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _dump(document: Any) -> None:
    """One JSON document on stdout, UTF-8 left readable."""
    json.dump(document, sys.stdout, ensure_ascii=False, indent=2)
    sys.stdout.write("\n")


def _message_json(summary: MessageSummary) -> dict[str, Any]:
    """A listed message for JSON; these keys are kept stable for scripts."""
    return {
        "folder": summary.folder,
        "uid": summary.uid,
        "key": _key_text(summary.key),
        "date": _iso(summary.date),
        "internal_date": _iso(summary.internal_date),
        "from": summary.sender,
        "subject": summary.subject,
        "size": summary.size,
        "flags": _flag_names(summary.flags),
    }


def _print_messages(summaries: Sequence[MessageSummary], with_folder: bool) -> None:
    """The C{ls} table: UID, date, from, subject, size, flags."""
    if sys.stdout.isatty():
        columns = shutil.get_terminal_size().columns
        # UID, DATE, FROM, SIZE, FLAGS and the gaps take about 70 columns.
        subject_width = max(20, columns - 70)
    else:
        subject_width = SUBJECT_WIDTH
    headers = ["UID"] + (["FOLDER"] if with_folder else [])
    headers += ["DATE", "FROM", "SUBJECT", "SIZE", "FLAGS"]
    rows = []
    for s in summaries:
        row = [str(s.uid)] + ([_cut(s.folder, 20)] if with_folder else [])
        row += [
            _when(s.date),
            _cut(s.sender, FROM_WIDTH),
            _cut(s.subject, subject_width),
            human_size(s.size),
            _letters(s.flags),
        ]
        rows.append(row)
    size_column = len(headers) - 2
    for line in table(headers, rows, frozenset({0, size_column})):
        print(line)
    count = len(summaries)
    print(f"-- {count} {'message' if count == 1 else 'messages'}")


# --- commands ---------------------------------------------------------------------


def _store(cfg: Config) -> MaildirStore:
    """The store the servers of C{cfg} deliver into."""
    return MaildirStore(cfg.mail_dir, cfg.server.hostname)


def _users(cfg: Config, progress: Progress) -> list[str]:
    """The user directory's addresses; a damaged file is reported, not fatal."""
    try:
        return UserStore(cfg.users_file).addresses()
    except AccountError as e:
        progress.report(f"{e}; listing the maildirs on disk only")
        return []


def _folder(cfg: Config, args: argparse.Namespace) -> tuple[Mailbox, Folder]:
    """The mailbox and folder named by C{args.address} and C{args.folder}."""
    mailbox = open_mailbox(_store(cfg), args.address)
    return mailbox, open_folder(mailbox, args.folder)


@_guarded
def _list(cfg: Config, args: argparse.Namespace) -> int:
    """Every user and maildir, with messages, unseen and size per folder."""
    progress = Progress(sys.stderr)
    users = _users(cfg, progress)
    mailboxes = list_mailboxes(_store(cfg), users, progress.report, progress)
    progress.clear()
    if args.json:
        _dump({"mailboxes": [_mailbox_json(m) for m in mailboxes]})
        return 0
    rows = []
    for m in mailboxes:
        note = "" if m.user else "no user"
        if not m.exists:
            rows.append([m.address, "-", "0", "0", "0", "no maildir"])
        for f in m.folders:
            size = human_size(f.size)
            rows.append([m.address, f.name, str(f.messages), str(f.unseen), size, note])
    headers = ["ADDRESS", "FOLDER", "MESSAGES", "UNSEEN", "SIZE", "NOTE"]
    rows = [[printable(cell) for cell in row] for row in rows]
    for line in table(headers, rows, frozenset({2, 3, 4})):
        print(line)
    messages = sum(m.messages for m in mailboxes)
    size = human_size(sum(m.size for m in mailboxes))
    count = len(mailboxes)
    print(
        f"-- {count} {'mailbox' if count == 1 else 'mailboxes'},"
        f" {messages} {'message' if messages == 1 else 'messages'}, {size}"
    )
    return 0


def _mailbox_json(m: MailboxSummary) -> dict[str, Any]:
    """A mailbox of C{list} for JSON; these keys are kept stable for scripts."""
    return {
        "address": m.address,
        "user": m.user,
        "maildir": m.exists,
        "messages": m.messages,
        "unseen": m.unseen,
        "size": m.size,
        "folders": [
            {"name": f.name, "messages": f.messages, "unseen": f.unseen, "size": f.size}
            for f in m.folders
        ],
    }


@_guarded
def _ls(cfg: Config, args: argparse.Namespace) -> int:
    """One folder's messages, newest last."""
    mailbox, folder = _folder(cfg, args)
    progress = Progress(sys.stderr)
    summaries = summarize_messages(folder, progress.report, progress)
    progress.clear()
    if args.limit is not None:
        summaries = summaries[-args.limit :] if args.limit else []
    if args.json:
        _dump(
            {
                "address": mailbox.address,
                "folder": folder.name,
                "messages": [_message_json(s) for s in summaries],
            }
        )
    else:
        _print_messages(summaries, with_folder=False)
    return 0


@_guarded
def _show(cfg: Config, args: argparse.Namespace) -> int:
    """One message: decoded for reading, all headers, raw, or one part."""
    mailbox, folder = _folder(cfg, args)
    if args.json and (args.raw or args.part is not None):
        raise InspectError(
            "--raw and --part write the message itself; leave out --json"
        )
    info = find_message(folder, args.id)
    if args.raw:
        _write_bytes(read_bytes(folder, info))
        return 0
    if args.part is not None:
        content = read_part(folder, info, args.part)
        if content.text is not None:
            sys.stdout.write(printable(content.text, keep_lines=True))
            return 0
        if sys.stdout.isatty():
            raise InspectError(
                f"part {content.part.number} is {content.part.content_type}:"
                " redirect the output to a file"
            )
        _write_bytes(content.data)
        return 0
    view = read_message(folder, info)
    for problem in view.problems:
        print(
            f"mailsys: {folder.name}: message {info.uid}: {printable(problem)}",
            file=sys.stderr,
        )
    if args.json:
        _dump(_view_json(mailbox, view))
    elif args.headers:
        for name, value in view.headers:
            print(f"{printable(name)}: {printable(value)}")
    else:
        _print_view(view)
    return 0


def _write_bytes(data: bytes) -> None:
    """Exact bytes to stdout, past the text layer."""
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        raise InspectError("standard output cannot take bytes")
    buffer.write(data)
    buffer.flush()


def _view_json(mailbox: Mailbox, view: MessageView) -> dict[str, Any]:
    """A shown message for JSON: the C{ls} keys, then headers, body, parts."""
    document = _message_json(view.summary)
    document["address"] = mailbox.address
    for name in _MAIN_HEADERS:
        document[name.lower().replace("-", "_") + "_header"] = view.header(name)
    document.update(
        {
            "headers": [{"name": n, "value": v} for n, v in view.headers],
            "body": view.body,
            "body_type": view.body_type,
            "parts": [
                {
                    "number": p.number,
                    "type": p.content_type,
                    "size": p.size,
                    "filename": p.filename,
                }
                for p in view.parts
            ],
            "problems": list(view.problems),
        }
    )
    return document


def _print_view(view: MessageView) -> None:
    """Main headers, a line about the file, the text, then the parts."""
    present = [(n, view.header(n)) for n in _MAIN_HEADERS]
    shown = [(n, v) for n, v in present if v is not None]
    width = max(len(n) for n in _MAIN_HEADERS) + 1
    for name, value in shown:
        print(f"{name + ':':<{width}} {printable(value or '')}")
    s = view.summary
    flags = _letters(s.flags) or "-"
    print(
        f"[uid {s.uid} in {printable(s.folder)}, {human_size(s.size)},"
        f" flags {flags}, received {_when(s.internal_date)}]"
    )
    print()
    if view.body_type is None:
        print("(no text part)")
    else:
        body = printable(view.body, keep_lines=True)
        if view.body_type == "text/html":
            print("(text/html, shown without markup)")
        sys.stdout.write(body if body.endswith("\n") or not body else body + "\n")
    print()
    rows = [
        [
            p.number,
            "  " * p.depth + p.content_type,
            human_size(p.size),
            printable(p.filename or ""),
        ]
        for p in view.parts
    ]
    for line in table(["PART", "TYPE", "SIZE", "FILENAME"], rows, frozenset({2})):
        print(line)


def _day(text: str) -> date:
    """An argparse type: C{YYYY-MM-DD}."""
    try:
        return datetime.strptime(text, "%Y-%m-%d").date()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


@_guarded
def _search(cfg: Config, args: argparse.Namespace) -> int:
    """Messages matching every criterion given, in one folder or all."""
    mailbox = open_mailbox(_store(cfg), args.address)
    if args.all_folders:
        folders = all_folders(mailbox)
    else:
        folders = [open_folder(mailbox, args.folder or "INBOX")]
    criteria = SearchCriteria(
        sender=args.sender,
        subject=args.subject,
        since=args.since,
        before=args.before,
        text=args.text,
    )
    progress = Progress(sys.stderr)
    found = search(folders, criteria, progress.report, progress)
    progress.clear()
    if args.json:
        _dump(
            {
                "address": mailbox.address,
                "folders": [f.name for f in folders],
                "messages": [_message_json(s) for s in found],
            }
        )
    else:
        _print_messages(found, with_folder=args.all_folders)
    return 0


@_guarded
def _stats(cfg: Config, args: argparse.Namespace) -> int:
    """Per domain: users, mailboxes, messages and size; then the totals."""
    progress = Progress(sys.stderr)
    users = _users(cfg, progress)
    mailboxes = list_mailboxes(_store(cfg), users, progress.report, progress)
    progress.clear()
    stats = domain_stats(mailboxes, cfg.domains)
    total = {
        "users": sum(s.users for s in stats),
        "mailboxes": sum(s.mailboxes for s in stats),
        "messages": sum(s.messages for s in stats),
        "size": sum(s.size for s in stats),
    }
    if args.json:
        domains = [
            {
                "domain": s.domain,
                "users": s.users,
                "mailboxes": s.mailboxes,
                "messages": s.messages,
                "size": s.size,
            }
            for s in stats
        ]
        _dump({"domains": domains, "total": total})
        return 0
    rows = [
        [s.domain, str(s.users), str(s.mailboxes), str(s.messages), human_size(s.size)]
        for s in stats
    ]
    rows.append(
        ["total"]
        + [str(total[k]) for k in ("users", "mailboxes", "messages")]
        + [human_size(total["size"])]
    )
    headers = ["DOMAIN", "USERS", "MAILBOXES", "MESSAGES", "SIZE"]
    for line in table(headers, rows, frozenset({1, 2, 3, 4})):
        print(line)
    return 0


@_guarded
def _import(cfg: Config, args: argparse.Namespace) -> int:
    """Append the messages of an mbox file or a maildir, durably."""
    store = _store(cfg)
    address = canonical_address(store, args.address)
    if not (store.path_for(address) / "cur").is_dir():
        # A user whose maildir was never made, or was removed, gets one.
        if not UserStore(cfg.users_file).exists(address):
            raise InspectError(f"no such mailbox: {address}")
        store.create(address)
    mailbox = open_mailbox(store, address)
    try:
        folder = open_folder(mailbox, args.folder)
    except InspectError:
        if not args.create:
            raise InspectError(
                f"{mailbox.address}: no such folder: {args.folder!r}"
                " (add --create to make it)"
            ) from None
        folder = mailbox.create_folder(args.folder)
    progress = Progress(sys.stderr)
    try:
        done = import_messages(folder, Path(args.source), progress.report, progress)
    finally:
        progress.clear()
    if args.json:
        _dump(
            {
                "address": mailbox.address,
                "folder": folder.name,
                "imported": done.count,
                "skipped": done.skipped,
            }
        )
    else:
        skipped = f" ({done.skipped} skipped)" if done.skipped else ""
        print(
            f"imported {done.count} {'message' if done.count == 1 else 'messages'}"
            f" into {mailbox.address} {printable(folder.name)}{skipped}"
        )
    return 0


@_guarded
def _export(cfg: Config, args: argparse.Namespace) -> int:
    """Write one folder as an mboxrd file, atomically."""
    mailbox, folder = _folder(cfg, args)
    progress = Progress(sys.stderr)
    try:
        done = export_mbox(folder, Path(args.mbox), progress.report, progress)
    finally:
        progress.clear()
    if args.json:
        _dump(
            {
                "address": mailbox.address,
                "folder": folder.name,
                "file": str(args.mbox),
                "exported": done.count,
                "skipped": done.skipped,
            }
        )
    else:
        skipped = f" ({done.skipped} skipped)" if done.skipped else ""
        print(
            f"exported {done.count} {'message' if done.count == 1 else 'messages'}"
            f" from {mailbox.address} {printable(folder.name)} to {args.mbox}{skipped}"
        )
    return 0


def _limit(text: str) -> int:
    """An argparse type: a number of messages, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a number of messages: {text!r}")
    return value


def add_mailbox_commands(commands: _Subparsers) -> None:
    """C{mailsys mailbox list|ls|show|search|stats|import|export}."""
    mailbox = commands.add_parser(
        "mailbox",
        help="look into users' mail; import and export mbox",
        description=(
            "Read users' maildirs through the server's own store code.  Safe while"
            " the server runs: nothing is moved or changed, except by import."
        ),
    )
    actions = mailbox.add_subparsers(dest="action", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", help="print one JSON document instead"
    )
    folder = argparse.ArgumentParser(add_help=False)
    folder.add_argument(
        "--folder", default="INBOX", metavar="F", help="folder, as 'Archive/2024'"
    )

    listing = actions.add_parser(
        "list", parents=[common], help="users and maildirs, with their folders"
    )
    listing.set_defaults(run=_list)

    ls = actions.add_parser(
        "ls",
        parents=[common, folder],
        help="list a folder's messages, newest last",
        description="Flags are the maildir letters: D draft, F flagged,"
        " R replied, S seen, T deleted.",
    )
    ls.add_argument("address")
    ls.add_argument("--limit", type=_limit, metavar="N", help="only the N newest")
    ls.set_defaults(run=_ls)

    show = actions.add_parser(
        "show", parents=[common, folder], help="show one message, decoded"
    )
    show.add_argument("address")
    show.add_argument("id", help="the UID, as 'ls' shows it, or the file name")
    how = show.add_mutually_exclusive_group()
    how.add_argument("--headers", action="store_true", help="every header, decoded")
    how.add_argument("--raw", action="store_true", help="the exact stored bytes")
    how.add_argument("--part", metavar="N", help="part N (as listed), decoded")
    show.set_defaults(run=_show)

    finder = actions.add_parser(
        "search", parents=[common], help="find messages by sender, subject, date, text"
    )
    finder.add_argument("address")
    where = finder.add_mutually_exclusive_group()
    where.add_argument("--folder", metavar="F", help="folder (default INBOX)")
    where.add_argument("--all-folders", action="store_true", help="every folder")
    finder.add_argument("--from", dest="sender", metavar="S", help="in From")
    finder.add_argument("--subject", metavar="S", help="in Subject")
    finder.add_argument("--since", type=_day, metavar="YYYY-MM-DD", help="on or after")
    finder.add_argument("--before", type=_day, metavar="YYYY-MM-DD", help="before")
    finder.add_argument("--text", metavar="S", help="in the headers or text parts")
    finder.set_defaults(run=_search)

    stats = actions.add_parser(
        "stats", parents=[common], help="users, messages and sizes per domain"
    )
    stats.set_defaults(run=_stats)

    importer = actions.add_parser(
        "import",
        parents=[common, folder],
        help="append the messages of an mbox file or a maildir",
        description="Each message is on disk (fsync'ed) before the next is read;"
        " flags and dates are kept.  A message that is not mail is reported and"
        " skipped.",
    )
    importer.add_argument("address")
    importer.add_argument("source", metavar="FILE.mbox|MAILDIR")
    importer.add_argument(
        "--create", action="store_true", help="create the folder if it is missing"
    )
    importer.set_defaults(run=_import)

    exporter = actions.add_parser(
        "export",
        parents=[common, folder],
        help="write a folder as an mbox file (mboxrd)",
    )
    exporter.add_argument("address")
    exporter.add_argument("--mbox", required=True, metavar="FILE", type=Path)
    exporter.set_defaults(run=_export)

"""
The durable outbound queue: what we promised to carry, written down before
we say so.

Layout of the queue directory (C{<state_dir>/queue/}):

    <id>.eml    the message, LF line endings, trace headers included
    <id>.json   its envelope: sender, per-recipient state, flags (JSON)
    tmp/        files being written; never read, emptied on recovery
    corrupt/    entries set aside on recovery because they cannot be sent
    lock        flock(2)ed by every change of an envelope (see below)
    enqueue.lock  flock(2)ed by every enqueue, shared (see below)

Every file is written the same way as a maildir delivery: under C{tmp/},
C{fsync}, rename into place, C{fsync} the directory.  The message file is
written first and the envelope second, and one directory sync after the
envelope's rename makes both names durable (a directory sync costs as much
as the rest of an enqueue); the envelope's existence commits the entry, so
a crash at any earlier point leaves a message file without an envelope,
which recovery removes, or (on a file system that reorders renames) an
envelope without its message, which recovery sets aside: nobody was told
either was accepted.
Removal goes the other way: envelope first, then message.

Every change of state is a read-modify-write of the envelope under an
exclusive C{flock} of C{lock}: the runner recording results and the
C{mailsys queue} command holding, releasing or flushing an entry both
re-read the file inside the lock, change only their own fields and write it
back, so neither can overwrite what the other just wrote.  Each write bumps
the envelope's C{revision}; the runner adopts a copy from disk only when its
revision is higher than the one it holds.  Enqueueing creates a new entry
and needs no such lock; it holds C{enqueue.lock} I{shared}, so enqueues run
in parallel and never wait for the runner, while recovery, which takes both
locks exclusively, never sees the half-written entry of a live enqueue and
mistakes it for crash debris.

Every method here blocks on the disk; the reactor calls them in a thread.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from mailsys.maildir import CHUNK_SIZE, fsync_directory, replace_durably

# Recipient states.  A recipient is pending until the next hop takes it
# (delivered) or we give up on it (bounced).
PENDING = "pending"
DELIVERED = "delivered"
BOUNCED = "bounced"
STATES = (PENDING, DELIVERED, BOUNCED)

# What an entry is, which decides who hears about its failures: ordinary
# mail bounces to its sender; a delivery status notification (DSN) never
# bounces (RFC 3464 / RFC 5321 6.1: no bounce to the null sender) but may be
# copied to the postmaster; a notice to the postmaster is dropped if it
# fails, so nothing can loop.
MAIL = "mail"
DSN = "dsn"
NOTICE = "notice"
KINDS = (MAIL, DSN, NOTICE)

LOCK = "lock"
ENQUEUE_LOCK = "enqueue.lock"
MESSAGE_SUFFIX = ".eml"
ENVELOPE_SUFFIX = ".json"
FORMAT_VERSION = 1

# Queue ids become file names: a safe set, no leading dot, bounded length.
_QUEUE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


class SpoolError(Exception):
    """A queue entry cannot be read, written or found; one line."""


def check_queue_id(queue_id: str) -> str:
    """
    C{queue_id}, if it is safe as a file name (letters, digits, C{._-}, not
    starting with a dot, at most 128 characters).

    @raise SpoolError: otherwise.
    """
    if not isinstance(queue_id, str) or not _QUEUE_ID.match(queue_id):
        raise SpoolError(f"not a valid queue id: {queue_id!r}")
    return queue_id


@dataclass
class RecipientStatus:
    """
    Where one recipient of a queue entry stands.

    @ivar attempts: delivery attempts that got a temporary failure so far
        (the back-off doubles with each).
    @ivar next_attempt: when to try again (seconds since the epoch).
    @ivar last_attempt: when the last attempt ended, or C{None}.
    @ivar code: the last reply code (0 before any attempt).
    @ivar text: the last reply text, or why the attempt failed.
    @ivar next_hop: the host that gave the last reply, for logs and DSNs.
    @ivar reported: for a bounced recipient, whether its DSN (or the log
        line saying none is due) has been written.
    """

    address: str
    state: str = PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    last_attempt: float | None = None
    code: int = 0
    text: str = ""
    next_hop: str = ""
    reported: bool = False


@dataclass
class QueueEntry:
    """
    One queued message and its envelope, as on disk.

    @ivar sender: the envelope sender, C{None} for the null reverse path
        C{<>} (bounces).
    @ivar created: when it was accepted (seconds since the epoch).
    @ivar held: C{mailsys queue hold}: never attempted until released.
    @ivar warned: a delay warning has been sent.
    @ivar reports: DSNs made for this entry so far; numbers the next one,
        whose queue id is C{<id>.R<reports>}, so that making it again after a
        crash finds it already queued instead of sending it twice.
    @ivar revision: bumped by every write; a copy with a higher revision is
        newer.
    """

    queue_id: str
    sender: str | None
    recipients: list[RecipientStatus]
    created: float
    kind: str = MAIL
    held: bool = False
    warned: bool = False
    reports: int = 0
    revision: int = 0
    message_path: Path = field(default=Path(), compare=False)

    def recipient(self, address: str) -> RecipientStatus | None:
        """The status of C{address}, if it is one of ours."""
        for status in self.recipients:
            if status.address == address:
                return status
        return None

    @property
    def pending(self) -> list[RecipientStatus]:
        return [r for r in self.recipients if r.state == PENDING]

    @property
    def unreported(self) -> list[RecipientStatus]:
        """Bounced recipients nobody has been told about yet."""
        return [r for r in self.recipients if r.state == BOUNCED and not r.reported]

    @property
    def finished(self) -> bool:
        """Nothing left to deliver or report: the entry can go."""
        return not self.pending and not self.unreported

    def next_report_id(self) -> str:
        return f"{self.queue_id}.R{self.reports}"

    def to_json(self) -> dict:
        return {
            "version": FORMAT_VERSION,
            "id": self.queue_id,
            "sender": self.sender,
            "created": self.created,
            "kind": self.kind,
            "held": self.held,
            "warned": self.warned,
            "reports": self.reports,
            "revision": self.revision,
            "recipients": [
                {
                    "address": r.address,
                    "state": r.state,
                    "attempts": r.attempts,
                    "next_attempt": r.next_attempt,
                    "last_attempt": r.last_attempt,
                    "code": r.code,
                    "text": r.text,
                    "next_hop": r.next_hop,
                    "reported": r.reported,
                }
                for r in self.recipients
            ],
        }

    @classmethod
    def from_json(cls, data: object, message_path: Path) -> QueueEntry:
        """
        Rebuild an entry, checking every field: a damaged file is refused
        with a L{SpoolError} naming the field, never half-understood.
        """
        fields = _Fields(data, "envelope")
        if fields.get("version", int) != FORMAT_VERSION:
            raise SpoolError("unknown envelope version")
        entry = cls(
            queue_id=check_queue_id(fields.get("id", str)),
            sender=fields.get("sender", (str, type(None))),
            recipients=[],
            created=fields.number("created"),
            kind=fields.choice("kind", KINDS),
            held=fields.get("held", bool),
            warned=fields.get("warned", bool),
            reports=fields.get("reports", int),
            revision=fields.get("revision", int),
            message_path=message_path,
        )
        recipients = fields.get("recipients", list)
        if not recipients:
            raise SpoolError("envelope has no recipients")
        for item in recipients:
            r = _Fields(item, "recipient")
            last = r.get("last_attempt", (int, float, type(None)))
            entry.recipients.append(
                RecipientStatus(
                    address=r.get("address", str),
                    state=r.choice("state", STATES),
                    attempts=r.get("attempts", int),
                    next_attempt=r.number("next_attempt"),
                    last_attempt=None if last is None else float(last),
                    code=r.get("code", int),
                    text=r.get("text", str),
                    next_hop=r.get("next_hop", str),
                    reported=r.get("reported", bool),
                )
            )
        return entry


class _Fields:
    """Typed access to one JSON object, each mistake a L{SpoolError}."""

    def __init__(self, data: object, what: str) -> None:
        if not isinstance(data, dict):
            raise SpoolError(f"{what} is not a JSON object")
        self.data = data
        self.what = what

    def get(self, name: str, kind):
        value = self.data.get(name)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # JSON true is not the number 1.
        bad_bool = isinstance(value, bool) and bool not in kinds
        if name not in self.data or not isinstance(value, kinds) or bad_bool:
            raise SpoolError(f"{self.what} field {name!r} missing or of the wrong type")
        return value

    def number(self, name: str) -> float:
        return float(self.get(name, (int, float)))

    def choice(self, name: str, allowed: tuple[str, ...]) -> str:
        value = self.get(name, str)
        if value not in allowed:
            raise SpoolError(f"{self.what} field {name!r} has unknown value {value!r}")
        return value


class Spool:
    """
    The queue directory.  Every method blocks on the disk (see
    L{enqueue_deferred} for the one the SMTP side calls from the reactor).

    @ivar directory: C{<state_dir>/queue}.
    @ivar hostname: ours, for the DSNs made from entries.
    """

    def __init__(self, directory: Path, hostname: str) -> None:
        self.directory = Path(directory)
        self.hostname = hostname
        self.tmp = self.directory / "tmp"
        self.corrupt = self.directory / "corrupt"
        self._ready = False

    # --- paths ---------------------------------------------------------

    def message_path(self, queue_id: str) -> Path:
        return self.directory / (check_queue_id(queue_id) + MESSAGE_SUFFIX)

    def envelope_path(self, queue_id: str) -> Path:
        return self.directory / (check_queue_id(queue_id) + ENVELOPE_SUFFIX)

    def _prepare(self) -> None:
        """Create the queue directories (mode 0700), durably, once."""
        if self._ready:
            return
        for directory in (self.directory, self.tmp, self.corrupt):
            if not directory.is_dir():
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                fsync_directory(directory.parent)
        self._ready = True

    @contextmanager
    def _locked(self, name: str, exclusive: bool) -> Iterator[None]:
        """
        Hold C{flock} on the lock file C{name} (shared or exclusive) for the
        block.  A new open file each time, so that threads of one process
        exclude each other as separate processes do; the kernel drops it if
        the process dies.
        """
        self._prepare()
        fd = os.open(self.directory / name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    # --- durable writes --------------------------------------------------

    def _durable_file(
        self,
        name: str,
        prefix: bytes,
        message: BinaryIO,
        sync_directory: bool = True,
    ) -> None:
        """
        Make C{<directory>/<name>} hold C{prefix} and the rest of
        C{message}, or leave it as it was: the one durable-write path of
        L{mailsys.maildir.replace_durably} (a new file under C{tmp/}, synced,
        renamed over C{name}, the directory synced).
        """
        start = message.tell()
        size = len(prefix)
        while chunk := message.read(CHUNK_SIZE):
            size += len(chunk)
        message.seek(start)
        replace_durably(
            self.directory / name,
            prefix,
            message,
            size,
            self.tmp,
            sync_directory=sync_directory,
        )

    def _write_envelope(self, entry: QueueEntry) -> None:
        """Write C{entry}'s envelope durably, bumping its revision."""
        entry.revision += 1
        data = json.dumps(entry.to_json(), indent=1).encode("utf-8") + b"\n"
        self._durable_file(entry.queue_id + ENVELOPE_SUFFIX, data, io.BytesIO())

    def _write_message(self, queue_id: str, message: BinaryIO, prefix: bytes) -> None:
        """
        The message file, synced but its directory not yet: the envelope
        written next syncs the directory, which makes both names durable
        at once.  A crash in between leaves at worst an envelope without
        its message or a message without an envelope, which recovery
        discards: nothing was acknowledged yet.
        """
        self._durable_file(queue_id + MESSAGE_SUFFIX, prefix, message, False)

    # --- enqueue -----------------------------------------------------------

    def enqueue(
        self,
        queue_id: str,
        sender: str | None,
        recipients: Sequence[str],
        message: BinaryIO,
        prefix: bytes = b"",
        *,
        kind: str = MAIL,
        now: float | None = None,
    ) -> QueueEntry:
        """
        Queue C{prefix} plus C{message} (from its current position, LF line
        endings as given) for C{recipients}, durably: when this returns the
        entry survives a crash, and it may be acknowledged.  Every recipient
        is due at once.

        @param sender: the envelope sender, C{None} for C{<>}.
        @param now: the arrival time (default: the system clock); the
            runner's clock must use the same time base.
        @raise SpoolError: for a bad or used queue id or no recipients.
        @raise OSError: when the disk refuses; nothing is queued then.
        """
        entry = self._new_entry(queue_id, sender, recipients, kind, now)
        with self._locked(ENQUEUE_LOCK, exclusive=False):
            return self._add(entry, message, prefix)

    def enqueue_deferred(
        self,
        reactor,
        queue_id: str,
        sender: str | None,
        recipients: Sequence[str],
        message: BinaryIO,
        prefix: bytes = b"",
        *,
        kind: str = MAIL,
    ) -> Deferred[QueueEntry]:
        """
        L{enqueue} in C{reactor}'s thread pool, arrival time from
        C{reactor.seconds()}.  Reply 250 only when it fires.
        """
        return deferToThreadPool(
            reactor,
            reactor.getThreadPool(),
            self.enqueue,
            queue_id,
            sender,
            recipients,
            message,
            prefix,
            kind=kind,
            now=reactor.seconds(),
        )

    def _new_entry(
        self,
        queue_id: str,
        sender: str | None,
        recipients: Sequence[str],
        kind: str,
        now: float | None,
    ) -> QueueEntry:
        check_queue_id(queue_id)
        if kind not in KINDS:
            raise SpoolError(f"unknown entry kind {kind!r}")
        unique = list(dict.fromkeys(recipients))
        if not unique or not all(isinstance(r, str) and r for r in unique):
            raise SpoolError(f"{queue_id}: no recipients")
        created = time.time() if now is None else float(now)
        return QueueEntry(
            queue_id=queue_id,
            sender=sender or None,
            recipients=[RecipientStatus(r, next_attempt=created) for r in unique],
            created=created,
            kind=kind,
            message_path=self.message_path(queue_id),
        )

    def _add(self, entry: QueueEntry, message: BinaryIO, prefix: bytes) -> QueueEntry:
        """Message file, then the envelope that commits it (lock held)."""
        if self.envelope_path(entry.queue_id).exists():
            raise SpoolError(f"queue id {entry.queue_id} is already in use")
        self._write_message(entry.queue_id, message, prefix)
        self._write_envelope(entry)
        return entry

    # --- reading -------------------------------------------------------------

    def load(self, queue_id: str) -> QueueEntry | None:
        """
        The entry as on disk now, or C{None} if there is none (never queued,
        finished, or deleted).  Envelopes are replaced by rename, so reading
        needs no lock.

        @raise SpoolError: if the envelope is damaged.
        """
        path = self.envelope_path(queue_id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise SpoolError(f"{queue_id}: envelope is not valid JSON ({e})") from None
        try:
            entry = QueueEntry.from_json(data, self.message_path(queue_id))
        except SpoolError as e:
            raise SpoolError(f"{queue_id}: {e}") from None
        if entry.queue_id != queue_id:
            raise SpoolError(f"{queue_id}: envelope names another entry")
        return entry

    def ids(self) -> list[str]:
        """The ids of every committed entry (those with an envelope), sorted."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(
            name[: -len(ENVELOPE_SUFFIX)]
            for name in names
            if name.endswith(ENVELOPE_SUFFIX) and _QUEUE_ID.match(name)
        )

    def load_all(self) -> tuple[list[QueueEntry], dict[str, str]]:
        """
        Every entry on disk, and a problem line by queue id for each
        envelope that could not be read (left where it is; L{recover} sets
        such files aside).
        """
        entries: list[QueueEntry] = []
        problems: dict[str, str] = {}
        for queue_id in self.ids():
            try:
                entry = self.load(queue_id)
            except SpoolError as e:
                problems[queue_id] = str(e)
                continue
            if entry is not None:
                entries.append(entry)
        return entries, problems

    # --- recovery ------------------------------------------------------------

    def recover(self) -> tuple[list[QueueEntry], list[str]]:
        """
        Make the directory consistent after a crash, then load it: files in
        C{tmp/} are removed (never committed); a message without an envelope
        is removed (an enqueue that died before committing, so never
        acknowledged, or a removal that died half-way); an envelope without
        its message, or one that cannot be read, is moved to C{corrupt/}
        with its message (it cannot be sent; the operator can look).  Holds
        both locks exclusively, so no live write is mistaken for debris.

        @return: the entries, and one line for each thing done, to log.
        """
        notes: list[str] = []
        with self._locked(ENQUEUE_LOCK, True), self._locked(LOCK, True):
            for name in os.listdir(self.tmp):
                os.unlink(self.tmp / name)
                notes.append(f"removed unfinished write tmp/{name}")
            names = set(os.listdir(self.directory))
            changed = False
            for name in sorted(names):
                stem, suffix = os.path.splitext(name)
                if suffix != MESSAGE_SUFFIX or not _QUEUE_ID.match(stem):
                    continue
                if stem + ENVELOPE_SUFFIX not in names:
                    os.unlink(self.directory / name)
                    changed = True
                    notes.append(
                        f"{stem}: discarded a half-written entry (message without"
                        " envelope: it was never acknowledged)"
                    )
            for queue_id in self.ids():
                problem = None
                try:
                    self.load(queue_id)
                except SpoolError as e:
                    problem = str(e)
                if problem is None and not self.message_path(queue_id).exists():
                    problem = f"{queue_id}: envelope without a message file"
                if problem is not None:
                    self._set_aside(queue_id)
                    changed = True
                    notes.append(f"{problem}; moved to corrupt/")
            if changed:
                fsync_directory(self.directory)
        entries, problems = self.load_all()
        return entries, notes + list(problems.values())

    def _set_aside(self, queue_id: str) -> None:
        for path in (self.envelope_path(queue_id), self.message_path(queue_id)):
            if path.exists():
                os.rename(path, self.corrupt / path.name)
        fsync_directory(self.corrupt)

    # --- changes -------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """
        Hold the exclusive lock for a read-modify-write of one or more
        entries (see L{Transaction}).
        """
        with self._locked(LOCK, exclusive=True):
            yield Transaction(self)

    def modify(
        self, queue_id: str, change: Callable[[QueueEntry], object]
    ) -> QueueEntry | None:
        """
        Read C{queue_id}, let C{change} alter it, write it back durably, all
        under the lock.  C{change} may return C{False} to write nothing.

        @return: the entry as written, or C{None} if there is none.
        """
        with self.transaction() as txn:
            entry = txn.read(queue_id)
            if entry is None:
                return None
            if change(entry) is not False:
                txn.save(entry)
            return entry

    def remove(self, queue_id: str) -> bool:
        """Remove an entry for good (C{mailsys queue delete}); whether it existed."""
        with self.transaction() as txn:
            entry = txn.read(queue_id)
            if entry is None:
                return False
            txn.remove(entry)
            return True


class Transaction:
    """
    What may be done while the spool's exclusive lock is held.  Only the
    spool makes these (L{Spool.transaction}).
    """

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def read(self, queue_id: str) -> QueueEntry | None:
        return self.spool.load(queue_id)

    def save(self, entry: QueueEntry) -> None:
        """Write C{entry}'s envelope durably (bumping its revision)."""
        self.spool._write_envelope(entry)

    def remove(self, entry: QueueEntry) -> None:
        """
        Remove C{entry} durably: the envelope first (this is the moment it
        stops existing), then its message.
        """
        spool = self.spool
        try:
            os.unlink(spool.envelope_path(entry.queue_id))
        except FileNotFoundError:
            pass
        fsync_directory(spool.directory)
        try:
            os.unlink(spool.message_path(entry.queue_id))
        except FileNotFoundError:
            pass
        fsync_directory(spool.directory)

    def add(
        self,
        queue_id: str,
        sender: str | None,
        recipients: Sequence[str],
        message: BinaryIO,
        *,
        kind: str,
        now: float,
    ) -> QueueEntry | None:
        """
        Enqueue a new entry unless C{queue_id} is already queued (made
        before a crash): returns it, or C{None} if it existed.
        """
        if self.spool.envelope_path(queue_id).exists():
            return None
        entry = self.spool._new_entry(queue_id, sender, recipients, kind, now)
        return self.spool._add(entry, message, b"")

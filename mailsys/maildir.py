"""
The mail store: one maildir per user, shared by every protocol.

SMTP delivers into it now; POP3, IMAP and the command-line tools read and
change the same files later, so the layout is the contract:
C{<root>/<domain>/<localpart>/} holding C{cur/ new/ tmp/}, file names as in
U{https://cr.yp.to/proto/maildir.html} with Dovecot's C{,S=} and C{,W=}
size fields, so that Dovecot or mutt pointed at the same directory read it.

The promise behind "250 OK" lives here.  L{MaildirStore.deliver} is the one
durable-write path: write under C{tmp/}, C{fsync} the file, rename it into
C{new/}, C{fsync} C{new/}.  Only when it returns may a server say the
message is accepted; a crash at any earlier point leaves at most a file in
C{tmp/}, which no reader ever shows.  It blocks on the disk, so the reactor
calls it through L{MaildirStore.deliver_deferred}, in a thread.

POP3, IMAP and the command-line tools see the same files through
L{Mailbox} (a user's folders, Maildir++ as Dovecot and Courier lay them
out) and L{Folder} (one maildir: messages with flags in the C{:2,} info,
keywords named in Dovecot's C{dovecot-keywords}, persistent UIDs, a cache
of sizes and header lengths).  Other programs may change the files at any
moment, so the disk is the truth: what a L{Folder} keeps in memory is only
a hint, and UIDs and keywords change only under a C{flock} shared with
every other process.  L{Folder.append} and L{Folder.copy_to}
write through the same durable path as delivery.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import io
import itertools
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import (
    BinaryIO,
    Callable,
    ContextManager,
    Generator,
    Iterable,
    Iterator,
    NamedTuple,
    Sequence,
)

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mailsys import limits

log = Logger(namespace="mailsys.maildir")

# Read and write messages in pieces this big, so a 25 MiB message never has
# to sit in memory once per recipient.
CHUNK_SIZE = 64 * 1024

# The three directories of a maildir, in the order they are created.
SUBDIRECTORIES = ("cur", "new", "tmp")

# Mail local parts we store, already lower-cased: a deliberately narrow set
# so that a local part is always a safe single directory name.
_LOCAL_PART = re.compile(r"[a-z0-9._+-]+\Z")
# One DNS label: letters, digits and hyphens, no hyphen at either end.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")

# Part of every unique name: distinguishes deliveries made by threads of this
# process in the same microsecond.
_counter = itertools.count(1)
_counter_lock = threading.Lock()


class DeliveryError(Exception):
    """
    A message could not be stored in every mailbox; none of them holds it.
    C{str(error)} is one line, fit to log and to follow a 451 reply.
    """


def fsync_directory(path: Path | str) -> None:
    """
    Make the entries of directory C{path} (names created, renamed or removed
    in it) durable.  A renamed file survives a crash only once the directory
    holding its new name has been synced; the file's own C{fsync} is not
    enough.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unique_name(hostname: str, size: int, wsize: int) -> str:
    """
    A maildir file name no other delivery, in this process or any other,
    will produce: C{<secs>.M<usecs>P<pid>Q<counter>R<random>.<host>} as the
    maildir specification recommends, followed by Dovecot's C{,S=<size>}
    (bytes on disk) and C{,W=<wsize>} (bytes with CRLF line endings, what
    POP3 and IMAP report), which spare readers a C{stat} or a full read.

    C{/} and C{:} in the host name are written as C{\\057} and C{\\072}, as
    the specification says: one would make a path, the other starts the
    C{:2,} info.  The microseconds are zero-padded to six digits, so that
    names sort in arrival order.
    """
    now = time.time_ns()
    seconds, nanoseconds = divmod(now, 1_000_000_000)
    with _counter_lock:
        counter = next(_counter)
    host = hostname.replace("/", "\\057").replace(":", "\\072")
    return (
        f"{seconds}.M{nanoseconds // 1000:06d}P{os.getpid()}Q{counter}"
        f"R{os.urandom(8).hex()}.{host},S={size},W={wsize}"
    )


def _split_address(address: str) -> tuple[str, str]:
    """
    The C{(domain, localpart)} directory names for C{address}, lower-cased.

    Only a narrow ASCII set is accepted, so that neither part can name
    another directory (C{..}, C{/}, NUL) or a hidden Maildir++ folder
    (leading dot).

    @raise ValueError: if either part is not a safe mailbox name.
    """
    if not isinstance(address, str) or not address.isascii():
        raise ValueError(f"unsafe mailbox address: {address!r}")
    local, at, domain = address.lower().partition("@")
    if (
        not at
        # RFC 5321 4.5.3.1.1: a local part is at most 64 octets.
        or not 1 <= len(local) <= limits.LOCAL_PART
        or not _LOCAL_PART.match(local)
        or local.startswith(".")
        or ".." in local
    ):
        raise ValueError(f"unsafe mailbox address: {address!r}")
    # RFC 5321 4.5.3.1.2: a domain is at most 255 octets.
    if not 1 <= len(domain) <= limits.DOMAIN or not all(
        _LABEL.match(label) for label in domain.split(".")
    ):
        raise ValueError(f"unsafe mailbox address: {address!r}")
    return domain, local


def _make_directory(path: Path) -> bool:
    """
    Create directory C{path} (mode 0700) unless it exists.  Another thread
    or process creating it at the same moment is not an error.

    @return: whether this call created it.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not path.is_dir():
            raise
        return False
    return True


def _measure(message: BinaryIO, prefix: bytes) -> tuple[int, int]:
    """
    The size of C{prefix} plus the rest of C{message}, and that size with
    every LF counted as CRLF; C{message} is left where it was.
    """
    start = message.tell()
    size = len(prefix)
    newlines = prefix.count(b"\n")
    while chunk := message.read(CHUNK_SIZE):
        size += len(chunk)
        newlines += chunk.count(b"\n")
    message.seek(start)
    return size, size + newlines


def _one_line(error: BaseException) -> str:
    """A short reason for C{error}, without the line breaks of a traceback."""
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:
        reason = str(error) or type(error).__name__
    return " ".join(reason.split())


class MaildirStore:
    """
    All mailboxes under one root directory, as maildirs.

    @ivar root: the directory holding C{<domain>/<localpart>/}.
    @ivar hostname: this server's name, part of every file name delivered.
    """

    def __init__(self, root: Path, hostname: str) -> None:
        self.root = Path(root)
        self.hostname = hostname
        # Mailboxes whose directories, and the entries naming them, are
        # known to be on disk: their parents need no more fsyncs.
        self._durable: set[Path] = set()

    def path_for(self, address: str) -> Path:
        """
        The maildir of C{address} (C{local@domain}), whether or not it
        exists yet.  Case is folded: C{Alice@Example.TEST} and
        C{alice@example.test} share one mailbox.

        @raise ValueError: if the address could name anything but a
            directory two levels below the root.
        """
        domain, local = _split_address(address)
        return self.root / domain / local

    def create(self, address: str) -> Path:
        """
        Make sure the maildir of C{address} exists with C{cur/ new/ tmp/},
        each mode 0700, and that the directory entries leading to it are on
        disk (a message renamed into a C{new/} that a crash then forgets
        would be lost).  Safe to call again, and from several threads or
        processes at once.

        @return: the maildir.
        @raise ValueError: for an unsafe address (see L{path_for}).
        """
        mailbox = self.path_for(address)
        if mailbox in self._durable and (mailbox / "tmp").is_dir():
            return mailbox
        if not self.root.is_dir():
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            fsync_directory(self.root.parent)
        _make_directory(mailbox.parent)
        _make_directory(mailbox)
        for name in SUBDIRECTORIES:
            _make_directory(mailbox / name)
        # Synced even when another thread made the directories: it may not
        # have synced them yet, and this caller is about to rely on them.
        for directory in (mailbox, mailbox.parent, self.root):
            fsync_directory(directory)
        self._durable.add(mailbox)
        return mailbox

    def deliver(
        self,
        addresses: Sequence[str],
        message: BinaryIO,
        prefix: bytes = b"",
    ) -> list[Path]:
        """
        Store one message in the mailboxes of C{addresses}, all or nothing:
        when this returns every copy is on disk, and when it raises no
        mailbox shows any.  It blocks on the disk: call it in a thread (see
        L{deliver_deferred}).

        Each file holds C{prefix} (the trace headers, say) then C{message}
        from its current position to its end; the content is stored as
        given, LF line endings expected.  Mailboxes are created on demand;
        an address repeated (in any case) gets one copy.

        First every copy is written under C{tmp/} and synced, then every
        copy is renamed into C{new/} and each C{new/} is synced.  On any
        failure, the files of this call are removed from C{tmp/} and
        C{new/} alike.

        @return: the delivered files, one per address, in the same order.
        @raise DeliveryError: with a one-line reason naming the mailbox, for
            an unsafe address, a full disk, an I/O or permission error.
        """
        mailboxes: dict[Path, str] = {}
        for address in addresses:
            try:
                mailbox = self.path_for(address)
            except ValueError as e:
                raise DeliveryError(str(e)) from None
            mailboxes.setdefault(mailbox, address)

        written: list[Path] = []
        delivered: dict[Path, Path] = {}
        address = ""
        try:
            start = message.tell()
            size, wsize = _measure(message, prefix)
            staged: list[tuple[Path, Path]] = []
            # Phase 1: a synced copy in each tmp/.
            for mailbox, address in mailboxes.items():
                self.create(address)
                name = unique_name(self.hostname, size, wsize)
                temporary = mailbox / "tmp" / name
                message.seek(start)
                written.append(temporary)
                self._write(temporary, prefix, message, size)
                staged.append((mailbox, temporary))
            # Phase 2: rename them all into new/, then sync each new/.
            for mailbox, temporary in staged:
                address = mailboxes[mailbox]
                final = mailbox / "new" / temporary.name
                os.rename(temporary, final)
                written.remove(temporary)
                delivered[mailbox] = final
            for mailbox in delivered:
                address = mailboxes[mailbox]
                fsync_directory(mailbox / "new")
        except BaseException as e:
            for path in written + list(delivered.values()):
                try:
                    os.unlink(path)
                except OSError:
                    pass
            if not isinstance(e, Exception):
                raise
            where = f"{address}: " if address else ""
            raise DeliveryError(f"{where}{_one_line(e)}") from e
        return [delivered[self.path_for(address)] for address in addresses]

    @staticmethod
    def _write(
        path: Path,
        prefix: bytes,
        message: BinaryIO,
        size: int,
        mtime: float | None = None,
    ) -> None:
        """
        Write C{prefix} and the rest of C{message} to the new file C{path}
        (mode 0600) and sync it.

        @param mtime: when given, the file's modification time, set before
            the sync so that it is as durable as the content (an IMAP
            APPEND's internal date lives there, as in Dovecot).
        @raise OSError: if the file exists, cannot be written, or ends up
            another size than C{size} (the message changed under us).
        """
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(prefix)
            while chunk := message.read(CHUNK_SIZE):
                out.write(chunk)
            out.flush()
            if out.tell() != size:
                raise OSError(f"message changed while it was written: {path}")
            if mtime is not None:
                os.utime(out.fileno(), (mtime, mtime))
            os.fsync(out.fileno())

    def deliver_deferred(
        self,
        reactor,
        addresses: Sequence[str],
        message: BinaryIO,
        prefix: bytes = b"",
    ) -> Deferred[list[Path]]:
        """
        L{deliver} in C{reactor}'s thread pool, so the reactor never waits
        for the disk.  Fires with the delivered files, or fails with
        L{DeliveryError}; reply "250" only when it fires.
        """
        return deferToThreadPool(
            reactor, reactor.getThreadPool(), self.deliver, addresses, message, prefix
        )

    def messages(self, address: str) -> list[Path]:
        """
        The messages in the mailbox of C{address}: the files of C{new/} and
        C{cur/}, sorted by file name (for names this store made, arrival
        order to the microsecond).  Files still in C{tmp/}, from a delivery
        in progress or one that crashed, are never listed; nor are names
        starting with a dot.  A mailbox that does not exist yet is empty.

        @raise ValueError: for an unsafe address (see L{path_for}).
        """
        mailbox = self.path_for(address)
        found: list[Path] = []
        for name in ("new", "cur"):
            try:
                entries = list(os.scandir(mailbox / name))
            except FileNotFoundError:
                continue
            found.extend(
                Path(entry.path)
                for entry in entries
                if not entry.name.startswith(".")
                and entry.is_file(follow_symlinks=False)
            )
        return sorted(found, key=lambda path: path.name)


# --- folders, flags and UIDs: one store, many views ---------------------------
#
# POP3, IMAP and the command-line tools all read a user's mail through
# Mailbox and Folder below, so that a flag set over IMAP is the flag POP3
# and mutt see, and a message has one UID however many sessions look at it.

# IMAP system flags <-> maildir info letters
# (https://cr.yp.to/proto/maildir.html, sorted ASCII in the file name).
FLAG_LETTERS = {
    "\\Seen": "S",
    "\\Answered": "R",
    "\\Flagged": "F",
    "\\Deleted": "T",
    "\\Draft": "D",
}
# Maildir++ folders .Sent .Drafts .Trash .Junk and their RFC 6154 attribute.
SPECIAL_USE = {
    "Sent": "\\Sent",
    "Drafts": "\\Drafts",
    "Trash": "\\Trash",
    "Junk": "\\Junk",
}

# IMAP flag names are case-insensitive (RFC 3501 2.3.2).
_FLAG_BY_NAME = {flag.lower(): letter for flag, letter in FLAG_LETTERS.items()}
_FLAG_BY_LETTER = {letter: flag for flag, letter in FLAG_LETTERS.items()}

# Per-folder state files.  Their names start with "mailsys-" and hold no
# dot prefix, so Dovecot and mutt take them for neither mail nor folders.
UIDLIST = "mailsys-uidlist"
UIDLIST_LOCK = "mailsys-uidlist.lock"
CACHE = "mailsys-cache"
# In the user's root: the last UIDVALIDITY handed out, so that a folder
# deleted and created again within one second still gets a new one.
UIDVALIDITY = "mailsys-uidvalidity"
SUBSCRIPTIONS = "subscriptions"
SUBSCRIPTIONS_LOCK = "mailsys-subscriptions.lock"
# Dovecot's per-folder keyword list: C{<index> <keyword>} lines, index 0 to
# 25 being info letters C{a} to C{z}.  Kept in Dovecot's own file and
# format, so that a keyword set here is the keyword Dovecot shows, and the
# other way round.
KEYWORDS = "dovecot-keywords"
# Lower-case info letters a-z: at most 26 keywords per folder.
MAX_KEYWORDS = 26

_UIDLIST_VERSION = "1"
_CACHE_HEADER = b"mailsys-cache 1\n"
_CACHE_END = b"end\n"

# A level of a folder name may not hold: controls (C0, DEL, C1), the
# Maildir++ separator ".", "\\" and "~" (path tricks elsewhere), nor the
# IMAP LIST wildcards "*" and "%" (RFC 3501 6.3.8), which would make the
# folder impossible to list by its own name.
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f.\\~*%]")
# The maildir's own directories: a level may not look like one of them.
_RESERVED = frozenset(SUBDIRECTORIES)
# NAME_MAX of Linux and the BSDs: the longest directory name.
_NAME_MAX = 255

# Header blocks kept in memory per folder, at most this many bytes, so that
# an IMAP client fetching ENVELOPE twice reads each file once.
_HEADER_CACHE_BYTES = 4 * 1024 * 1024
# A header block longer than this is not searched for while measuring.
_HEADER_SEARCH_LIMIT = 1024 * 1024


class FolderError(Exception):
    """
    A folder cannot be used as asked: a bad or hostile name, a folder that
    does not exist or exists already.  C{str(error)} is one line, fit for
    an IMAP C{NO} reply.
    """


class KeywordLimit(FolderError):
    """
    A new keyword cannot be stored: the folder has 26 already, all the
    info letters C{a}-C{z} there are (Dovecot has the same limit).
    """


class MessageGone(Exception):
    """
    The message's file disappeared: another session expunged it.
    """


@dataclass(frozen=True)
class MessageInfo:
    """
    What a session knows about one message without opening it.

    @ivar uid: persistent per folder; never given to another message.
    @ivar key: the maildir unique name, the file name without the C{:2,}
        info; stays the same when flags change.
    @ivar path: where the file was when this was made (C{new/} or
        C{cur/}); L{Folder.open} follows later renames.
    @ivar flags: IMAP system flags (C{"\\\\Seen"}, ...) and keywords
        (C{"$Forwarded"}, spelt as the folder's C{dovecot-keywords} spells
        them).  Other info letters (C{P}, a keyword letter the file does
        not name) stay in the file name but are not reported.
    @ivar size: bytes on disk (LF line endings).
    @ivar crlf_size: the size a client sees with CRLF line endings (IMAP
        RFC822.SIZE, POP3 LIST): the size plus one byte per bare LF.
    @ivar internal_date: POSIX time, the file's mtime (Dovecot's
        convention).
    """

    uid: int
    key: str
    path: Path
    flags: frozenset[str]
    size: int
    crlf_size: int
    internal_date: float


class _Entry(NamedTuple):
    """What the cache remembers of one message file (its content never
    changes while its key exists)."""

    size: int
    crlf_size: int
    mtime: float
    header_length: int  # -1: not known yet


class _KeywordTable(NamedTuple):
    """
    The parsed C{dovecot-keywords}: C{names[i]} is the keyword of info
    letter C{chr(ord("a") + i)}, or C{None}; C{signature} identifies the
    file version it was read from (C{None}: no file).
    """

    names: tuple[str | None, ...]
    signature: tuple[int, int, int] | None

    def letter(self, keyword: str) -> str | None:
        """The info letter of C{keyword} (any case), if it has one."""
        folded = keyword.lower()
        for index, name in enumerate(self.names):
            if name is not None and name.lower() == folded:
                return chr(ord("a") + index)
        return None

    def keywords(self) -> list[str]:
        """The keywords IMAP can show (valid atoms), in letter order, once each."""
        shown: list[str] = []
        for name in self.names:
            if name is not None and _is_keyword(name) and name not in shown:
                shown.append(name)
        return shown


_NO_KEYWORDS = _KeywordTable((None,) * MAX_KEYWORDS, None)


class _UidList(NamedTuple):
    """
    The parsed C{mailsys-uidlist}: C{uids} maps keys to UIDs in UID order;
    C{signature} identifies the file version it was read from.
    """

    uidvalidity: int
    uidnext: int
    uids: dict[str, int]
    signature: tuple[int, int, int]


def folder_levels(name: str | bytes) -> tuple[str, ...]:
    """
    The levels of folder C{name} (C{"Archive/2024"} -> C{("Archive",
    "2024")}), checked so that it maps to exactly one directory directly
    in the user's maildir and nowhere else.  C{"INBOX"} as the first level
    is case-insensitive and returned upper-case.

    @param name: C{"/"}-separated; bytes must be UTF-8.
    @raise FolderError: naming the rule broken: no empty level (so no
        leading, trailing or doubled C{/}), no control characters, no
        C{.} (the separator on disk; also keeps out C{..} and hidden
        names), C{\\}, C{~}, C{*} or C{%}, no level called C{tmp}, C{new}
        or C{cur} in any case, valid UTF-8, at most 255 bytes on disk.
    """
    not_utf8 = f"folder name is not valid UTF-8: {_show(name)}"
    if isinstance(name, bytes):
        try:
            name = name.decode("utf-8")
        except UnicodeDecodeError:
            raise FolderError(not_utf8) from None
    if not isinstance(name, str):
        raise FolderError(f"folder name must be a string, not {type(name).__name__}")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise FolderError(not_utf8) from None
    if not name:
        raise FolderError("empty folder name")
    levels = name.split("/")
    if levels[0].isascii() and levels[0].upper() == "INBOX":
        levels[0] = "INBOX"
    for level in levels:
        if not level:
            raise FolderError(
                f"folder name {_show(name)} has an empty level"
                " (a leading, trailing or doubled '/')"
            )
        forbidden = _FORBIDDEN.search(level)
        if forbidden:
            raise FolderError(
                f"folder name {_show(name)} contains {forbidden.group()!r}"
            )
        if level.lower() in _RESERVED:
            raise FolderError(
                f"folder name {_show(name)} uses the reserved name {level!r}"
            )
    # On disk: "." + levels joined by "." -- one directory name.
    if len(encoded) + 1 > _NAME_MAX:
        raise FolderError(
            f"folder name {_show(name)} is longer than {_NAME_MAX - 1} bytes"
        )
    return tuple(levels)


def _show(value: str | bytes) -> str:
    """C{value} for an error message: quoted, escaped, short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _split_name(name: str) -> tuple[str, str]:
    """
    A message file name's key and info letters:
    C{"123.M4P5.host,S=9:2,FS"} -> C{("123.M4P5.host,S=9", "FS")}.  Info
    of another version than C{2,} has no letters we understand.
    """
    key, _, info = name.partition(":")
    return key, info[2:] if info.startswith("2,") else ""


def _where(path: Path) -> str:
    """C{"cur/NAME"} for a message file C{path} (see L{Folder._list})."""
    return f"{path.parent.name}/{path.name}"


@functools.lru_cache(maxsize=512)
def _flags(letters: str) -> frozenset[str]:
    """The IMAP system flags of info C{letters} (a few combinations recur)."""
    return frozenset(_FLAG_BY_LETTER[c] for c in letters if c in _FLAG_BY_LETTER)


def _letters(flags: Iterable[str]) -> str:
    """
    The info letters of IMAP system C{flags}, sorted.  Other flags
    (keywords, C{\\Recent}) are left out: see L{Folder._info_letters}.
    """
    if isinstance(flags, str):
        flags = (flags,)
    found = {_FLAG_BY_NAME.get(flag.lower(), "") for flag in flags}
    return "".join(sorted(found - {""}))


# RFC 3501 9: a keyword is an atom: printable ASCII but for the
# atom-specials ( ) { SP CTL % * " \ ].  Dovecot's file is line-based and
# space-separated, which an atom also fits.
_KEYWORD = re.compile(r'[^\x00-\x20\x7f-\U0010ffff(){%*"\\\]]+\Z')
# Longer keywords are refused: no client needs them, and every one is
# repeated in each FLAGS response.
_KEYWORD_LENGTH = 128


def _is_keyword(flag: str) -> bool:
    """Whether C{flag} is a keyword (not a C{\\} flag) IMAP can carry."""
    return len(flag) <= _KEYWORD_LENGTH and bool(_KEYWORD.match(flag))


@functools.lru_cache(maxsize=1024)
def _info_flags(letters: str, names: tuple[str | None, ...]) -> frozenset[str]:
    """The system flags and keywords of info C{letters} with keyword C{names}."""
    flags = set(_flags(letters))
    for letter in letters:
        if "a" <= letter <= "z":
            name = names[ord(letter) - ord("a")]
            if name is not None and _is_keyword(name):
                flags.add(name)
    return frozenset(flags)


def _keywords_among(flags: Iterable[str]) -> list[str]:
    """
    The keywords among C{flags} (those not starting with C{\\}), once
    each whatever their case, in the order given.

    @raise FolderError: for one that is not an IMAP atom.
    """
    found: dict[str, str] = {}
    for flag in flags:
        if flag.startswith("\\"):
            continue
        if not _is_keyword(flag):
            raise FolderError(f"not a valid keyword: {_show(flag)}")
        found.setdefault(flag.lower(), flag)
    return list(found.values())


def _names_keyword(letter: str, table: _KeywordTable) -> bool:
    """Whether info C{letter} stands for a keyword IMAP shows (and sets)."""
    if not "a" <= letter <= "z":
        return False
    name = table.names[ord(letter) - ord("a")]
    return name is not None and _is_keyword(name)


def _parse_keywords(data: bytes, signature: tuple[int, int, int]) -> _KeywordTable:
    """
    Parse C{dovecot-keywords} as Dovecot does: C{<index> <name>} lines;
    lines without a space, with an index out of 0-25 or an empty name are
    skipped.  A name IMAP could not show still holds its letter.
    """
    names: list[str | None] = [None] * MAX_KEYWORDS
    for line in data.decode("utf-8", "surrogateescape").split("\n"):
        index, space, name = line.rstrip("\r").partition(" ")
        if not space or not name or not (index.isascii() and index.isdigit()):
            continue
        if int(index) < MAX_KEYWORDS:
            names[int(index)] = name
    return _KeywordTable(tuple(names), signature)


def _size_fields(key: str) -> tuple[int | None, int | None]:
    """The C{,S=} and C{,W=} values of a key, when present (Dovecot's)."""
    size = wsize = None
    for field in key.split(",")[1:]:
        tag, _, value = field.partition("=")
        if value.isdigit() and value.isascii():
            if tag == "S":
                size = int(value)
            elif tag == "W":
                wsize = int(value)
    return size, wsize


def _header_end(data: bytes, start: int = 0) -> int | None:
    """
    The length of the header block at the start of C{data}, up to and
    including the blank line that ends it (LF or CRLF), or C{None} if
    C{data} holds no blank line yet.  C{data[:start]} is known to hold
    none, so a growing buffer is searched once, not again and again.
    """
    if data.startswith(b"\n"):
        return 1
    if data.startswith(b"\r\n"):
        return 2
    # Search from a little before start: the blank line may straddle it.
    start = max(0, start - 2)
    ends = [i + 2 for i in (data.find(b"\n\n", start),) if i >= 0]
    ends += [i + 3 for i in (data.find(b"\n\r\n", start),) if i >= 0]
    return min(ends) if ends else None


def _measure_file(source: BinaryIO) -> tuple[int, int, int]:
    """
    Read C{source} once: its size, its size with every bare LF sent as
    CRLF (what a client is shown), and the length of its header block
    (-1 if it did not end within the first megabyte).  A CRLF already in
    the file counts once: files written by others may hold them.
    """
    size = bare = 0
    previous = b""
    head = b""
    header_length = -1
    while chunk := source.read(CHUNK_SIZE):
        size += len(chunk)
        bare += chunk.count(b"\n") - chunk.count(b"\r\n")
        if previous.endswith(b"\r") and chunk.startswith(b"\n"):
            bare -= 1
        previous = chunk
        if header_length < 0 and len(head) < _HEADER_SEARCH_LIMIT:
            start = len(head)
            head += chunk
            end = _header_end(head, start)
            if end is not None:
                header_length = end
    if header_length < 0 and len(head) == size:
        header_length = size  # all header, no body
    return size, size + bare, header_length


def _lf_endings(message: BinaryIO | bytes) -> BinaryIO:
    """
    C{message} with CRLF line endings turned into LF (IMAP clients send
    CRLF; maildir files hold LF), as a file positioned at its start.  A
    stream is converted piece by piece into a spooled temporary file, so a
    large APPEND never sits in memory whole.
    """
    if isinstance(message, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(message).replace(b"\r\n", b"\n"))
    out = tempfile.SpooledTemporaryFile(max_size=CHUNK_SIZE * 16)
    carry = b""
    while chunk := message.read(CHUNK_SIZE):
        chunk = carry + chunk
        # A CR at the end may start a CRLF split across two reads.
        carry = b"\r" if chunk.endswith(b"\r") else b""
        if carry:
            chunk = chunk[:-1]
        out.write(chunk.replace(b"\r\n", b"\n"))
    out.write(carry)
    out.seek(0)
    return out  # type: ignore[return-value]


def _measure_lf(body: BinaryIO) -> tuple[int, int]:
    """The size and CRLF size of C{body}; it is left at its start."""
    size, crlf_size, _ = _measure_file(body)
    body.seek(0)
    return size, crlf_size


@contextmanager
def _flocked(path: Path) -> Iterator[None]:
    """
    Hold an exclusive C{flock} on the lock file C{path} (created if
    missing).  C{flock} locks belong to an open file, so two threads of one
    process exclude each other as two processes do.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _temporary_name(name: str) -> str:
    """A name under C{tmp/} for a new version of the state file C{name}."""
    return f"{name}.P{os.getpid()}R{os.urandom(8).hex()}"


def replace_durably(
    target: Path,
    prefix: bytes,
    message: BinaryIO,
    size: int,
    scratch: Path,
    mtime: float | None = None,
    sync_directory: bool = True,
) -> None:
    """
    The durable-write contract for one file, whole: C{prefix} and the rest
    of C{message} (C{size} bytes in all) written to a new file in
    C{scratch}, synced, renamed over C{target}, and C{target}'s directory
    synced.  When it returns the file is on disk under its name; when it
    raises, C{target} is as it was and no temporary file is left.  Blocking:
    call it in a thread.  Used for every state file that must survive a
    crash (queue entries, UID lists); mail itself is delivered with
    L{MaildirStore.deliver}, the same steps for several mailboxes at once.

    @param mtime: the new file's modification time, when it matters.
    @param sync_directory: C{False} only when the caller writes another
        file in the same directory next and syncs the directory then, which
        makes both renames durable with one sync (the queue: message file,
        then the envelope that commits it).
    """
    temporary = scratch / _temporary_name(target.name)
    try:
        MaildirStore._write(temporary, prefix, message, size, mtime)
        os.rename(temporary, target)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    if sync_directory:
        fsync_directory(target.parent)


def _replace_file(target: Path, data: bytes, durable: bool = True) -> None:
    """
    Replace C{target} with C{data} atomically: readers see the old file or
    the new one, never a mix.  The new version is written in the C{tmp/}
    beside C{target} (the maildir's place for unfinished files, which
    Dovecot cleans) and renamed over it.  C{durable} adds the file and
    directory syncs, through the same L{MaildirStore._write} as mail.
    """
    scratch = target.parent / "tmp"
    if not scratch.is_dir():
        _make_directory(scratch)
    if durable:
        replace_durably(target, data, io.BytesIO(), len(data), scratch)
        return
    temporary = scratch / _temporary_name(target.name)
    try:
        with open(temporary, "xb") as out:
            out.write(data)
        os.rename(temporary, target)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def _allocate_uidvalidity(root: Path) -> int:
    """
    A UIDVALIDITY for a new folder of the user whose maildir is C{root}:
    the current time (Dovecot's convention), but always above every value
    given out before in this maildir, so a folder deleted and made again
    in the same second cannot reuse one (RFC 3501 2.3.1.1).
    """
    with _flocked(root / (UIDVALIDITY + ".lock")):
        path = root / UIDVALIDITY
        try:
            last = int(path.read_bytes().strip() or b"0")
        except (OSError, ValueError):
            last = 0
        value = max(int(time.time()), last + 1)
        _replace_file(path, b"%d\n" % value)
    return value


def _is_maildir(path: Path) -> bool:
    """Whether C{path} is a maildir (has C{cur/}): half-made dirs are not."""
    return (path / "cur").is_dir()


class Folder:
    """
    One maildir (INBOX or a Maildir++ subfolder).  All methods are blocking
    file-system code, safe to call from a thread; servers call them with
    deferToThread for anything that can be slow (scan of a big folder,
    append, copy).

    UIDs live in C{mailsys-uidlist}, changed only under an exclusive
    C{flock} on C{mailsys-uidlist.lock} and rewritten atomically, so that
    every process and thread agrees on them.  Sizes, dates and header
    lengths live in C{mailsys-cache}, so that neither a second scan nor a
    restarted server opens the message files again.  Everything kept in
    memory is a hint checked against the disk: another process may change
    the folder at any time.

    @ivar name: C{"INBOX"}, C{"Sent"}, C{"Archive/2024"}.
    @ivar path: the maildir (C{.Archive.2024} on disk for subfolders).
    @ivar hostname: put in the names of the files this folder writes.
    """

    def __init__(
        self,
        path: Path,
        name: str = "INBOX",
        hostname: str | None = None,
        root: Path | None = None,
    ) -> None:
        """
        @param root: the user's maildir (INBOX), where UIDVALIDITY values
            are allocated; by default C{path} itself for INBOX and its
            parent for a subfolder.
        """
        self.path = Path(path)
        self.name = name
        self.hostname = hostname or socket.gethostname()
        if root is None:
            root = self.path if name == "INBOX" else self.path.parent
        self._root = Path(root)
        # Guards the dictionaries below, which threads share; held briefly.
        self._lock = threading.RLock()
        # One scan at a time per Folder: a second would only repeat it.
        self._scan_lock = threading.Lock()
        self._uidlist: _UidList | None = None
        self._entries: dict[str, _Entry] | None = None  # None: cache not read yet
        self._entries_dirty = False
        self._infos: dict[str, MessageInfo] = {}  # last known, by key
        self._where: dict[str, str] = {}  # and where the last scan saw them
        self._headers: OrderedDict[str, bytes] = OrderedDict()
        self._header_bytes = 0
        self._recent: set[str] = set()
        self._keyword_table: _KeywordTable | None = None
        # The keyword names the descriptions in _infos were made with.
        self._infos_keywords: tuple[str | None, ...] = _NO_KEYWORDS.names

    def __repr__(self) -> str:
        return f"<Folder {self.name!r} at {str(self.path)!r}>"

    # --- UIDs ---------------------------------------------------------------

    @property
    def uidvalidity(self) -> int:
        """The folder's UIDVALIDITY, fixed when the folder was first seen."""
        return self._current_uidlist().uidvalidity

    @property
    def uidnext(self) -> int:
        """The UID the next new message will get."""
        return self._current_uidlist().uidnext

    def _locked(self) -> ContextManager[None]:
        """The exclusive lock on this folder's UID list."""
        return _flocked(self.path / UIDLIST_LOCK)

    def _current_uidlist(self, locked: bool = False) -> _UidList:
        """
        The UID list as it is on disk now, read again only if the file
        changed; created (with a new UIDVALIDITY) when missing or unreadable.

        @param locked: the caller holds L{_locked} already.
        """
        uidlist = self._read_uidlist(force=locked)
        if uidlist is None:
            if locked:
                return self._create_uidlist()
            with self._locked():
                return self._read_uidlist(force=True) or self._create_uidlist()
        return uidlist

    def _read_uidlist(self, force: bool = False) -> _UidList | None:
        """
        The UID list on disk, or C{None} if missing or damaged.  Unless
        C{force}, the copy in memory is used when the file's inode, mtime
        and size are unchanged.  That is only a shortcut for readers: a
        quickly reused inode with a coarse mtime could fool it, so whoever
        is about to change the list (under the lock) reads it for real.
        """
        try:
            source = open(self.path / UIDLIST, "rb")
        except FileNotFoundError:
            if not self.path.is_dir():
                raise FolderError(f"folder {self.name!r} no longer exists") from None
            return None
        with source:
            status = os.fstat(source.fileno())
            signature = (status.st_ino, status.st_mtime_ns, status.st_size)
            with self._lock:
                cached = self._uidlist
            if not force and cached is not None and cached.signature == signature:
                return cached
            uidlist = _parse_uidlist(source.read(), signature)
        if uidlist is not None:
            with self._lock:
                self._uidlist = uidlist
        return uidlist

    def _create_uidlist(self) -> _UidList:
        """A new, empty UID list on disk.  Call under L{_locked}."""
        return self._save_uidlist(_allocate_uidvalidity(self._root), 1, {})

    def _save_uidlist(
        self, uidvalidity: int, uidnext: int, uids: dict[str, int]
    ) -> _UidList:
        """Write the UID list atomically and durably.  Call under L{_locked}."""
        lines = [f"{_UIDLIST_VERSION} V{uidvalidity} N{uidnext}\n"]
        lines.extend(f"{uid} {key}\n" for key, uid in uids.items())
        target = self.path / UIDLIST
        _replace_file(target, "".join(lines).encode("utf-8", "surrogateescape"))
        status = os.stat(target)
        signature = (status.st_ino, status.st_mtime_ns, status.st_size)
        uidlist = _UidList(uidvalidity, uidnext, uids, signature)
        with self._lock:
            self._uidlist = uidlist
        return uidlist

    # --- keywords ------------------------------------------------------------

    def keywords(self) -> list[str]:
        """
        The keywords defined in this folder (by us or by Dovecot), in
        letter order: what IMAP lists in FLAGS and PERMANENTFLAGS.
        """
        return self._keywords().keywords()

    def define_keywords(
        self, keywords: Iterable[str], partial: bool = False
    ) -> list[str]:
        """
        Give each of C{keywords} an info letter in this folder: names are
        compared case-insensitively, a new one takes the first free letter
        and is written to C{dovecot-keywords}, under the folder's lock.

        @param partial: leave out new keywords that find no free letter,
            instead of raising.
        @return: those of C{keywords} that have a letter now, spelt as the
            folder spells them, in the order given.
        @raise KeywordLimit: when a new keyword finds no free letter
            (unless C{partial}); then none is defined.
        @raise FolderError: for a name that is not an IMAP keyword.
        """
        wanted = _keywords_among(keywords)
        table = self._ensure_keywords(wanted, partial)
        defined = []
        for keyword in wanted:
            letter = table.letter(keyword)
            if letter is not None:
                defined.append(table.names[ord(letter) - ord("a")] or keyword)
        return defined

    def _keywords(self, force: bool = False) -> _KeywordTable:
        """
        The keyword table as it is on disk now, read again only if the file
        changed (by its inode, mtime and size; C{force}: always).
        """
        path = self.path / KEYWORDS
        with self._lock:
            cached = self._keyword_table
        if not force and cached is not None:
            try:
                status = os.stat(path)
            except FileNotFoundError:
                return _NO_KEYWORDS
            signature = (status.st_ino, status.st_mtime_ns, status.st_size)
            if cached.signature == signature:
                return cached
        try:
            source = open(path, "rb")
        except FileNotFoundError:
            return _NO_KEYWORDS
        with source:
            status = os.fstat(source.fileno())
            signature = (status.st_ino, status.st_mtime_ns, status.st_size)
            table = _parse_keywords(source.read(), signature)
        with self._lock:
            self._keyword_table = table
        return table

    def _ensure_keywords(
        self, keywords: list[str], partial: bool, locked: bool = False
    ) -> _KeywordTable:
        """
        The keyword table once every one of C{keywords} (checked already)
        has a letter, if it can.  Letters are taken only under the folder's
        lock, after reading the file again: two sessions (or processes)
        defining keywords at once never give one letter two names.

        @param locked: the caller holds L{_locked} already.
        """
        table = self._keywords()
        if all(table.letter(keyword) for keyword in keywords):
            return table
        if not locked:
            with self._locked():
                return self._ensure_keywords(keywords, partial, locked=True)
        table = self._keywords(force=True)
        names = list(table.names)
        missing = [k for k in keywords if table.letter(k) is None]
        free = [index for index, name in enumerate(names) if name is None]
        if len(missing) > len(free) and not partial:
            refused = ", ".join(missing[len(free) :])
            raise KeywordLimit(
                f"cannot add keyword {refused}: folder {self.name!r} holds"
                f" {MAX_KEYWORDS} keywords already, all a maildir file name can carry"
            )
        if not free:
            return table
        for keyword, index in zip(missing, free, strict=False):
            names[index] = keyword
        return self._save_keywords(names, table)

    def _save_keywords(
        self, names: list[str | None], previous: _KeywordTable
    ) -> _KeywordTable:
        """
        Write C{dovecot-keywords} as Dovecot does (C{<index> <name>} lines),
        atomically and durably.  Call under L{_locked}.
        """
        data = "".join(
            f"{index} {name}\n" for index, name in enumerate(names) if name is not None
        ).encode("utf-8", "surrogateescape")
        target = self.path / KEYWORDS
        # Dovecot reads the file again only when its mtime, in whole
        # seconds, has grown; make sure it has, as Dovecot itself does.
        mtime = time.time()
        if previous.signature is not None:
            mtime = max(mtime, previous.signature[1] // 1_000_000_000 + 1)
        replace_durably(target, data, io.BytesIO(), len(data), self.path / "tmp", mtime)
        status = os.stat(target)
        signature = (status.st_ino, status.st_mtime_ns, status.st_size)
        table = _KeywordTable(tuple(names), signature)
        with self._lock:
            self._keyword_table = table
        return table

    @staticmethod
    def _info_letters(flags: Iterable[str], table: _KeywordTable) -> str:
        """The sorted info letters of C{flags}: system flags and the keywords
        C{table} has letters for."""
        letters = set(_letters(flags))
        for flag in flags:
            if not flag.startswith("\\"):
                letter = table.letter(flag)
                if letter is not None:
                    letters.add(letter)
        return "".join(sorted(letters))

    # --- scanning ----------------------------------------------------------

    def _list(self) -> dict[str, str]:
        """
        The message files now in C{new/} then C{cur/}: key -> C{"new/NAME"}
        or C{"cur/NAME"} (strings: 10,000 Path objects cost more than the
        directory reads).  C{new/} is read first, so a message moved to
        C{cur/} meanwhile is seen at least once; seen twice, the C{cur/}
        name wins.  Dot files, and names with line breaks (the UID list is
        line-based), are not mail.
        """
        found: dict[str, str] = {}
        missing = 0
        for sub in ("new/", "cur/"):
            try:
                entries = list(os.scandir(self.path / sub))
            except FileNotFoundError:
                missing += 1
                continue
            for entry in entries:
                name = entry.name
                if (
                    name.startswith(".")
                    or "\n" in name
                    or "\r" in name
                    or not entry.is_file(follow_symlinks=False)
                ):
                    continue
                found[name.partition(":")[0]] = sub + name
        if missing == 2 and not self.path.is_dir():
            raise FolderError(f"folder {self.name!r} no longer exists")
        return found

    def scan(self, claim_new: bool = False) -> list[MessageInfo]:
        """
        All messages, ordered by UID.  New files (from SMTP delivery,
        Dovecot, mutt, an APPEND by another process) get the next UIDs,
        assigned under an exclusive fcntl lock on the folder's uid list so
        two processes never give two messages one UID.  With
        C{claim_new=True} messages in C{new/} are moved to C{cur/} (adding
        C{:2,}) -- what an IMAP SELECT or a POP3 session does; they count
        as recent for this Folder.  Uses the cache so a 10,000-message
        folder scans in well under a second the second time.

        A message whose file vanished disappears from the result; its UID
        is never given again.

        @raise FolderError: if the folder was deleted.
        """
        with self._scan_lock:
            try:
                listing = self._list()
                uidlist = self._current_uidlist()
                if listing.keys() != uidlist.uids.keys():
                    uidlist = self._assign(listing)
                if claim_new:
                    self._claim(listing)
                return self._describe(listing, uidlist)
            except FileNotFoundError:
                if self.path.is_dir():
                    raise
                raise FolderError(f"folder {self.name!r} no longer exists") from None

    def _assign(self, listing: dict[str, str]) -> _UidList:
        """
        Under the lock: UIDs for the unknown keys of C{listing}, in name
        order (arrival order for standard names), and forget the keys whose
        files are gone.  A key is taken for gone only if a second listing,
        made under the lock, misses it too: a rename by another session can
        hide a file from one directory read.  C{listing} is updated.
        """
        with self._locked():
            uidlist = self._current_uidlist(locked=True)
            known = uidlist.uids
            if known.keys() - listing.keys():
                listing.update(self._list())
            gone = known.keys() - listing.keys()
            unknown = sorted(listing.keys() - known.keys())
            if not gone and not unknown:
                return uidlist
            uids = {key: uid for key, uid in known.items() if key not in gone}
            uidnext = uidlist.uidnext
            for key in unknown:
                uids[key] = uidnext
                uidnext += 1
            return self._save_uidlist(uidlist.uidvalidity, uidnext, uids)

    def _claim(self, listing: dict[str, str]) -> None:
        """
        Move the messages of C{listing} that are in C{new/} to C{cur/} with
        C{:2,} info, as a mail reader does once it has shown them.  One
        claimed by another session at the same moment is found in C{cur/}.
        """
        for key, where in list(listing.items()):
            if not where.startswith("new/"):
                continue
            path = self.path / where
            target = self.path / "cur" / f"{key}:2,{_split_name(path.name)[1]}"
            try:
                os.rename(path, target)
            except FileNotFoundError:
                located = self._locate(key, path)
                if located is None:
                    del listing[key]
                    continue
                target = located
            else:
                with self._lock:
                    self._recent.add(key)
            listing[key] = _where(target)

    def _describe(
        self, listing: dict[str, str], uidlist: _UidList
    ) -> list[MessageInfo]:
        """
        The L{MessageInfo}s of the files in C{listing}, by UID, from the
        cache where possible; files not in the cache are measured once.
        The descriptions of the previous scan are reused where the file has
        not moved.
        """
        entries = self._cached_entries()
        measured: dict[str, _Entry] = {}
        keywords = self._keywords().names
        with self._lock:
            previous, previous_where = self._infos, self._where
            if self._infos_keywords != keywords:
                previous = {}  # flags must be read again with the new names
        infos: dict[str, MessageInfo] = {}
        where: dict[str, str] = {}
        for key, uid in uidlist.uids.items():
            location = listing.get(key)
            if location is None:
                continue
            info = previous.get(key)
            if (
                info is not None
                and info.uid == uid
                and previous_where.get(key) == location
                and key in entries
            ):
                infos[key] = info
                where[key] = location
                continue
            path = self.path / location
            entry = entries.get(key)
            if entry is None:
                found = self._measure(key, path)
                if found is None:
                    continue
                path, entry = found
                measured[key] = entry
                location = _where(path)
            infos[key] = MessageInfo(
                uid=uid,
                key=key,
                path=path,
                flags=_info_flags(_split_name(path.name)[1], keywords),
                size=entry.size,
                crlf_size=entry.crlf_size,
                internal_date=entry.mtime,
            )
            where[key] = location
        with self._lock:
            self._infos, self._where = infos, where
            self._infos_keywords = keywords
            self._recent &= infos.keys()
            assert self._entries is not None
            self._entries.update(measured)
            stale = self._entries.keys() - infos.keys()
            for key in stale:
                del self._entries[key]
            if measured or stale:
                self._entries_dirty = True
        self._save_cache()
        return list(infos.values())

    def _measure(self, key: str, path: Path) -> tuple[Path, _Entry] | None:
        """
        The cache entry of a message not seen before: its mtime and size
        from C{stat}, its CRLF size from C{,W=} in the name when C{,S=}
        matches the file, otherwise (and for the header length) by reading
        it once.  C{None} if the file is gone.
        """
        for _ in range(3):
            try:
                status = os.stat(path)
                named_size, named_crlf = _size_fields(key)
                if named_crlf is not None and named_size == status.st_size:
                    return path, _Entry(status.st_size, named_crlf, status.st_mtime, -1)
                with open(path, "rb") as source:
                    size, crlf_size, header_length = _measure_file(source)
                return path, _Entry(size, crlf_size, status.st_mtime, header_length)
            except FileNotFoundError:
                located = self._locate(key, path)
                if located is None:
                    return None
                path = located
            except OSError as e:
                # One unreadable file (permissions, a bad sector) must not
                # hide the whole folder: skip it, say so, try again next scan.
                log.warn(
                    "skipping unreadable message {path}: {error}",
                    path=str(path),
                    error=_one_line(e),
                )
                return None
        return None

    def _cached_entries(self) -> dict[str, _Entry]:
        """
        A copy of the cache entries, read from C{mailsys-cache} the first
        time.  A missing, damaged or truncated cache is ignored: it only
        costs the files being measured again.
        """
        with self._lock:
            if self._entries is not None:
                return dict(self._entries)
        entries: dict[str, _Entry] = {}
        try:
            data = (self.path / CACHE).read_bytes()
        except OSError:
            data = b""
        if data.startswith(_CACHE_HEADER) and data.endswith(_CACHE_END):
            body = data[len(_CACHE_HEADER) : -len(_CACHE_END)]
            for line in body.decode("utf-8", "surrogateescape").split("\n"):
                fields = line.split(" ", 4)
                if len(fields) != 5:
                    continue
                size, crlf_size, mtime, header_length, key = fields
                try:
                    entries[key] = _Entry(
                        int(size), int(crlf_size), float(mtime), int(header_length)
                    )
                except ValueError:
                    continue
        with self._lock:
            if self._entries is None:
                self._entries = entries
            return dict(self._entries)

    def _save_cache(self) -> None:
        """Write C{mailsys-cache} if it changed; not synced: it is a hint."""
        with self._lock:
            if not self._entries_dirty or self._entries is None:
                return
            lines = [
                f"{e.size} {e.crlf_size} {e.mtime!r} {e.header_length} {key}\n"
                for key, e in self._entries.items()
            ]
            self._entries_dirty = False
        data = _CACHE_HEADER + "".join(lines).encode("utf-8", "surrogateescape")
        try:
            _replace_file(self.path / CACHE, data + _CACHE_END, durable=False)
        except OSError:
            pass  # a cache that cannot be written is only slower

    def recent_count(self) -> int:
        """How many messages this Folder moved out of C{new/} (IMAP \\Recent)."""
        with self._lock:
            return len(self._recent)

    def is_recent(self, info: MessageInfo) -> bool:
        """Whether this Folder moved C{info} out of C{new/}."""
        with self._lock:
            return info.key in self._recent

    # --- one message -------------------------------------------------------

    def _locate(self, key: str, stale: Path | None = None) -> Path | None:
        """
        Where the message C{key} is now, after another session renamed it
        (flags changed, claimed from C{new/}); C{None} if it is gone.
        """
        with self._lock:
            hint = self._infos.get(key)
        if hint is not None and hint.path != stale and os.path.lexists(hint.path):
            return hint.path
        for sub in ("new", "cur"):
            try:
                names = os.listdir(self.path / sub)
            except FileNotFoundError:
                continue
            for name in names:
                if name.partition(":")[0] == key:
                    return self.path / sub / name
        return None

    def open(self, info: MessageInfo) -> BinaryIO:
        """
        The stored bytes of the message (LF endings), as a file to close.
        Follows a rename by another session.

        @raise MessageGone: if the message was expunged.
        """
        path: Path | None = info.path
        for _ in range(3):
            assert path is not None
            try:
                return open(path, "rb")
            except FileNotFoundError:
                path = self._locate(info.key, path)
                if path is None:
                    break
        raise MessageGone(f"message {info.uid} in {self.name!r} is gone")

    def headers(self, info: MessageInfo) -> bytes:
        """
        The header block of the message, up to and including the blank line
        that ends it (the whole message if it has no body).  Kept in memory,
        and its length in the cache, so repeated fetches read little.

        @raise MessageGone: if the message was expunged.
        """
        with self._lock:
            block = self._headers.get(info.key)
            if block is not None:
                self._headers.move_to_end(info.key)
                return block
            entry = (self._entries or {}).get(info.key)
        with self.open(info) as source:
            if entry is not None and entry.header_length >= 0:
                block = source.read(entry.header_length)
            else:
                block = b""
                while chunk := source.read(CHUNK_SIZE):
                    start = len(block)
                    block += chunk
                    end = _header_end(block, start)
                    if end is not None:
                        block = block[:end]
                        break
        with self._lock:
            learned = entry is not None and entry.header_length < 0
            if learned and entry is not None and self._entries is not None:
                self._entries[info.key] = entry._replace(header_length=len(block))
                self._entries_dirty = True
            self._headers[info.key] = block
            self._header_bytes += len(block)
            while self._header_bytes > _HEADER_CACHE_BYTES and len(self._headers) > 1:
                _, dropped = self._headers.popitem(last=False)
                self._header_bytes -= len(dropped)
        return block

    def set_flags(self, info: MessageInfo, flags: Iterable[str]) -> MessageInfo:
        """
        Give the message exactly the IMAP system flags and keywords of
        C{flags}, renaming it atomically with the new C{:2,} info (moving it
        from C{new/} to C{cur/} if needed).  A keyword new to the folder is
        defined first (L{define_keywords}).  Info letters that are neither
        (C{P}, a keyword letter the folder does not name) are kept;
        C{\\Recent} and other C{\\} flags are ignored.  The key, and so
        the UID, stays.

        @return: the message as it is now.
        @raise MessageGone: if the message was expunged.
        @raise KeywordLimit: if a new keyword finds no free letter; the
            message is left as it was.
        @raise FolderError: for a keyword that is not an IMAP atom.
        """
        flags = [flags] if isinstance(flags, str) else list(flags)
        table = self._ensure_keywords(_keywords_among(flags), partial=False)
        wanted = set(self._info_letters(flags, table))
        path: Path | None = info.path
        for _ in range(3):
            assert path is not None
            key, letters = _split_name(path.name)
            kept = {
                c
                for c in letters
                if c not in _FLAG_BY_LETTER and not _names_keyword(c, table)
            }
            new_letters = "".join(sorted(kept | wanted))
            target = self.path / "cur" / f"{key}:2,{new_letters}"
            try:
                if target != path:
                    os.rename(path, target)
                elif not os.path.lexists(path):
                    raise FileNotFoundError(errno.ENOENT, "gone", str(path))
            except FileNotFoundError:
                path = self._locate(info.key, path)
                if path is None:
                    break
                continue
            changed = replace(
                info, path=target, flags=_info_flags(new_letters, table.names)
            )
            with self._lock:
                if path.parent.name == "new":
                    self._recent.add(key)
                self._infos[key] = changed
                self._where[key] = _where(target)
            return changed
        raise MessageGone(f"message {info.uid} in {self.name!r} is gone")

    def expunge(self, infos: Sequence[MessageInfo]) -> None:
        """
        Delete the messages for good; ones already gone are ignored.  Their
        UIDs are dropped from the UID list at the next scan, never reused.
        """
        for info in infos:
            path: Path | None = info.path
            for _ in range(3):
                assert path is not None
                try:
                    os.unlink(path)
                    break
                except FileNotFoundError:
                    path = self._locate(info.key, path)
                    if path is None:
                        break
            with self._lock:
                self._infos.pop(info.key, None)
                self._where.pop(info.key, None)
                self._recent.discard(info.key)
                block = self._headers.pop(info.key, None)
                if block is not None:
                    self._header_bytes -= len(block)

    # --- storing -----------------------------------------------------------

    def append(
        self,
        message: BinaryIO | bytes,
        flags: Iterable[str] = (),
        internal_date: float | None = None,
    ) -> MessageInfo:
        """
        Store a message durably: the same tmp/fsync/rename/dir-fsync path as
        deliver, into C{cur/} with C{flags}; CRLF becomes LF (IMAP clients
        send CRLF).  C{internal_date} becomes the file's mtime.

        Keywords among C{flags} are defined as L{set_flags} does; those
        that find no free letter are left out (see L{define_keywords} with
        C{partial} to know which beforehand).

        @return: the new message with its UID (for APPENDUID).
        @raise DeliveryError: with a one-line reason (disk full, ...);
            nothing is stored then.
        @raise FolderError: for a keyword that is not an IMAP atom.
        """
        flags = frozenset([flags] if isinstance(flags, str) else flags)
        _keywords_among(flags)
        body = _lf_endings(message)
        try:
            size, crlf_size = _measure_lf(body)
            item = (body, size, crlf_size, flags, internal_date)
            [info] = self._store([item])
        finally:
            body.close()
        return info

    def copy_to(
        self, infos: Sequence[MessageInfo], target: Folder
    ) -> list[MessageInfo]:
        """
        Durable copies of the messages in C{target}, with their flags and
        internal dates, all or nothing (RFC 3501 6.4.7).  Keywords are
        defined in C{target} as needed; those that find no free letter
        there are left out.

        @return: the new messages, in the order of C{infos} (for COPYUID).
        @raise MessageGone: if one of them was expunged; nothing is copied.
        @raise DeliveryError: if the copies cannot be written.
        """
        sources = self._sources(infos)
        try:
            return target._store(sources)
        finally:
            sources.close()

    def _sources(
        self, infos: Sequence[MessageInfo]
    ) -> Generator[tuple[BinaryIO, int, int, frozenset[str], float | None], None, None]:
        """The messages to copy, opened one at a time (never 10,000 at once)."""
        for info in infos:
            with self.open(info) as source:
                size = os.fstat(source.fileno()).st_size
                if size == info.size:
                    crlf_size = info.crlf_size
                else:
                    crlf_size = _measure_lf(source)[1]
                yield source, size, crlf_size, info.flags, info.internal_date

    def _store(
        self, items: Iterable[tuple[BinaryIO, int, int, frozenset[str], float | None]]
    ) -> list[MessageInfo]:
        """
        Write each C{(body, size, crlf_size, flags, mtime)} under C{tmp/}
        with L{MaildirStore._write} (file synced), then, holding the UID
        lock, define their keywords, rename them all into C{cur/} with
        their info letters, sync C{cur/} and give them the next UIDs: a
        scan by another process never sees them without UIDs in order.
        All or nothing.
        """
        # Files to remove if anything fails: every name under tmp/ (gone
        # once renamed; unique, so no one else's) and every one in cur/.
        written: list[Path] = []
        staged: list[tuple[Path, str, int, int, frozenset[str]]] = []
        moved: list[Path] = []
        letters_of: list[str] = []
        table = _NO_KEYWORDS
        try:
            for body, size, crlf_size, flags, mtime in items:
                name = unique_name(self.hostname, size, crlf_size)
                temporary = self.path / "tmp" / name
                written.append(temporary)
                MaildirStore._write(temporary, b"", body, size, mtime)
                staged.append((temporary, name, size, crlf_size, flags))
            if not staged:
                return []
            with self._locked():
                keywords = _keywords_among(f for item in staged for f in item[4])
                table = self._ensure_keywords(keywords, partial=True, locked=True)
                for temporary, name, _, _, flags in staged:
                    letters = self._info_letters(flags, table)
                    letters_of.append(letters)
                    final = self.path / "cur" / f"{name}:2,{letters}"
                    os.rename(temporary, final)
                    moved.append(final)
                fsync_directory(self.path / "cur")
                uidlist = self._current_uidlist(locked=True)
                uids = dict(uidlist.uids)
                uidnext = uidlist.uidnext
                for _, name, _, _, _ in staged:
                    if name not in uids:
                        uids[name] = uidnext
                        uidnext += 1
                self._save_uidlist(uidlist.uidvalidity, uidnext, uids)
        except BaseException as e:
            for path in written + moved:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            if isinstance(e, (MessageGone, FolderError)):
                raise
            if not isinstance(e, Exception):
                raise
            if isinstance(e, FileNotFoundError) and not self.path.is_dir():
                raise FolderError(f"folder {self.name!r} no longer exists") from None
            raise DeliveryError(f"{self.name}: {_one_line(e)}") from e
        stored = []
        for (_, name, size, crlf_size, _), letters, path in zip(
            staged, letters_of, moved, strict=True
        ):
            try:
                mtime = os.stat(path).st_mtime
            except FileNotFoundError:  # expunged already by another session
                mtime = time.time()
            info = MessageInfo(
                uid=uids[name],
                key=name,
                path=path,
                flags=_info_flags(letters, table.names),
                size=size,
                crlf_size=crlf_size,
                internal_date=mtime,
            )
            stored.append(info)
        with self._lock:
            if self._entries is not None:
                for info in stored:
                    self._entries[info.key] = _Entry(
                        info.size, info.crlf_size, info.internal_date, -1
                    )
                self._entries_dirty = True
            for info in stored:
                self._infos[info.key] = info
                self._where[info.key] = _where(info.path)
        return stored


def _parse_uidlist(data: bytes, signature: tuple[int, int, int]) -> _UidList | None:
    """
    Parse C{mailsys-uidlist}: C{1 V<uidvalidity> N<uidnext>}, then
    C{<uid> <key>} lines in UID order.  A damaged header makes the whole
    list unusable (C{None}: UIDVALIDITY must change); a damaged line only
    loses that message's UID (it gets a new one, never an old one).
    """
    text = data.decode("utf-8", "surrogateescape")
    header, _, rest = text.partition("\n")
    fields = header.split()
    if (
        len(fields) != 3
        or fields[0] != _UIDLIST_VERSION
        or not fields[1].startswith("V")
        or not fields[2].startswith("N")
    ):
        return None
    try:
        uidvalidity, uidnext = int(fields[1][1:]), int(fields[2][1:])
    except ValueError:
        return None
    if uidvalidity <= 0 or uidnext <= 0:
        return None
    uids: dict[str, int] = {}
    for line in rest.split("\n"):
        number, _, key = line.partition(" ")
        if not key or not (number.isascii() and number.isdigit()) or key in uids:
            continue
        uid = int(number)
        if 0 < uid < uidnext:
            uids[key] = uid
    if list(uids.values()) != sorted(uids.values()):
        uids = dict(sorted(uids.items(), key=lambda item: item[1]))
    return _UidList(uidvalidity, uidnext, uids, signature)


class Mailbox:
    """
    All folders of one user: C{<root>/<domain>/<local>/} is INBOX, C{.Name}
    subfolders (Maildir++, as Dovecot and Courier lay them out: folder
    C{"A/B"} is the directory C{.A.B} with its own C{cur/ new/ tmp/} and an
    empty C{maildirfolder} file).  Names are stored in UTF-8 as they are;
    IMAP converts modified UTF-7 at the protocol edge.

    @ivar address: the user's address.
    @ivar root: the user's maildir, INBOX.
    """

    def __init__(self, store: MaildirStore, address: str) -> None:
        """
        @raise FolderError: for an address that is not a safe mailbox name.
        """
        try:
            self.root = store.path_for(address)
        except ValueError as e:
            raise FolderError(str(e)) from None
        self.store = store
        self.address = address

    def __repr__(self) -> str:
        return f"<Mailbox {self.address!r}>"

    def _path(self, levels: tuple[str, ...]) -> Path:
        """The maildir of the folder with C{levels}."""
        if levels == ("INBOX",):
            return self.root
        return self.root / ("." + ".".join(levels))

    def folder(self, name: str) -> Folder:
        """
        The folder C{name} (C{"INBOX"} in any case).

        @raise FolderError: if the name is hostile or the folder missing.
        """
        levels = folder_levels(name)
        if levels == ("INBOX",):
            self.store.create(self.address)
        path = self._path(levels)
        if not _is_maildir(path):
            raise FolderError(f"no such folder: {_show('/'.join(levels))}")
        return Folder(path, "/".join(levels), self.store.hostname, self.root)

    def folders(self) -> list[str]:
        """
        The folders that exist: C{"INBOX"} first, then the others sorted,
        with C{"/"} separators.  Directories whose names we would refuse to
        create (made by other programs) are left out.
        """
        names = []
        for entry, levels in self._subfolders():
            if _is_maildir(Path(entry)):
                names.append("/".join(levels))
        return ["INBOX"] + sorted(names)

    def _subfolders(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        """The C{(path, levels)} of every valid Maildir++ directory name."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for entry in entries:
            disk = entry.name
            if not disk.startswith(".") or disk in (".", ".."):
                continue
            try:
                levels = folder_levels(disk[1:].replace(".", "/"))
            except FolderError:
                continue
            # Only names that map back to this directory: ".inbox.x" would
            # be shown as INBOX/x, whose directory is ".INBOX.x".
            if levels != ("INBOX",) and "." + ".".join(levels) == disk:
                yield entry.path, levels

    def create_folder(self, name: str) -> Folder:
        """
        Make a new, empty folder, and the folders above it that are missing
        (RFC 3501 6.3.3).  A folder appears whole or not at all: it is
        built under C{tmp/} and renamed into place.

        @raise FolderError: if the name is hostile or the folder exists.
        """
        levels = folder_levels(name)
        shown = _show("/".join(levels))
        if levels == ("INBOX",):
            raise FolderError("INBOX already exists")
        self.store.create(self.address)
        if _is_maildir(self._path(levels)):
            raise FolderError(f"folder already exists: {shown}")
        for depth in range(1, len(levels)):
            parent = levels[:depth]
            if parent != ("INBOX",) and not _is_maildir(self._path(parent)):
                self._make_folder(parent, exist_ok=True)
        self._make_folder(levels, exist_ok=False)
        return self.folder("/".join(levels))

    def _make_folder(self, levels: tuple[str, ...], exist_ok: bool) -> None:
        """Build the maildir of C{levels} under C{tmp/}, then rename it in."""
        target = self._path(levels)
        shown = _show("/".join(levels))
        staging = self.root / "tmp" / _temporary_name("mailsys-folder")
        try:
            os.mkdir(staging, 0o700)
            for sub in SUBDIRECTORIES:
                os.mkdir(staging / sub, 0o700)
            # Courier's marker of a Maildir++ subfolder, read by Dovecot.
            marker = os.open(staging / "maildirfolder", os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(marker)
            uidvalidity = _allocate_uidvalidity(self.root)
            header = f"{_UIDLIST_VERSION} V{uidvalidity} N1\n"
            _replace_file(staging / UIDLIST, header.encode("ascii"))
            try:
                os.rename(staging, target)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                if not exist_ok:
                    raise FolderError(f"folder already exists: {shown}") from None
            fsync_directory(self.root)
        except OSError as e:
            raise FolderError(f"cannot create folder {shown}: {_one_line(e)}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def delete_folder(self, name: str) -> None:
        """
        Delete the folder and its messages.  Folders below it stay (RFC
        3501 6.3.4).  It vanishes at once (renamed under C{tmp/}) and is
        removed from there.

        @raise FolderError: for INBOX, a hostile name or a missing folder.
        """
        levels = folder_levels(name)
        if levels == ("INBOX",):
            raise FolderError("INBOX cannot be deleted")
        path = self._path(levels)
        shown = _show("/".join(levels))
        if not _is_maildir(path):
            raise FolderError(f"no such folder: {shown}")
        doomed = self.root / "tmp" / _temporary_name("mailsys-deleted")
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            raise FolderError(f"no such folder: {shown}") from None
        except OSError as e:
            raise FolderError(f"cannot delete {shown}: {_one_line(e)}") from None
        fsync_directory(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def rename_folder(self, old: str, new: str) -> None:
        """
        Rename folder C{old} and the folders below it to C{new} (RFC 3501
        6.3.5); messages keep their UIDs and the folders their UIDVALIDITY.
        Subscriptions follow.  Folders missing above C{new} are created.

        @raise FolderError: renaming INBOX, a hostile name, a missing
            C{old}, an existing C{new}, or C{new} inside C{old}.
        """
        source = folder_levels(old)
        target = folder_levels(new)
        if source == ("INBOX",):
            raise FolderError("renaming INBOX is not supported")
        if target == ("INBOX",) or target == source:
            raise FolderError(f"folder already exists: {_show('/'.join(target))}")
        if target[: len(source)] == source:
            raise FolderError("a folder cannot be moved inside itself")
        if not _is_maildir(self._path(source)):
            raise FolderError(f"no such folder: {_show('/'.join(source))}")
        prefix = "." + ".".join(source)
        moves = []
        for disk in os.listdir(self.root):
            if disk == prefix or disk.startswith(prefix + "."):
                renamed = "." + ".".join(target) + disk[len(prefix) :]
                if len(renamed.encode("utf-8", "surrogateescape")) > _NAME_MAX:
                    raise FolderError(f"folder name too long: {_show(renamed[1:])}")
                if os.path.lexists(self.root / renamed):
                    shown = _show(renamed[1:].replace(".", "/"))
                    raise FolderError(f"folder already exists: {shown}")
                moves.append((disk, renamed))
        for depth in range(1, len(target)):
            parent = target[:depth]
            if parent != ("INBOX",) and not _is_maildir(self._path(parent)):
                self._make_folder(parent, exist_ok=True)
        try:
            for disk, renamed in sorted(moves):
                os.rename(self.root / disk, self.root / renamed)
        except OSError as e:
            raise FolderError(f"cannot rename {_show(old)}: {_one_line(e)}") from None
        finally:
            fsync_directory(self.root)
        old_name, new_name = "/".join(source), "/".join(target)

        def renamed_name(name: str) -> str:
            if name == old_name or name.startswith(old_name + "/"):
                return new_name + name[len(old_name) :]
            return name

        self._change_subscriptions(lambda names: [renamed_name(n) for n in names])

    def ensure_special_folders(self) -> None:
        """
        Create C{Sent}, C{Drafts}, C{Trash} and C{Junk} if missing and
        subscribe them, so that a new user's mail client finds them.
        """
        self.store.create(self.address)
        for name in SPECIAL_USE:
            if not _is_maildir(self._path((name,))):
                self._make_folder((name,), exist_ok=True)
        self._change_subscriptions(
            lambda names: names + [n for n in SPECIAL_USE if n not in names]
        )

    def special_use(self, name: str) -> str | None:
        """The RFC 6154 attribute of folder C{name} (C{"\\\\Sent"}), if any."""
        return SPECIAL_USE.get("/".join(folder_levels(name)))

    def has_children(self, name: str) -> bool:
        """Whether any folder exists below C{name}."""
        levels = folder_levels(name)
        return any(
            len(found) > len(levels)
            and found[: len(levels)] == levels
            and _is_maildir(Path(path))
            for path, found in self._subfolders()
        )

    # --- subscriptions -------------------------------------------------------

    def subscriptions(self) -> list[str]:
        """
        The subscribed names: C{"INBOX"} first if subscribed, then sorted.
        They need not exist (RFC 3501 6.3.6).
        """
        names = self._read_subscriptions()
        inbox = ["INBOX"] if "INBOX" in names else []
        return inbox + sorted(n for n in names if n != "INBOX")

    def subscribe(self, name: str) -> None:
        """Add C{name} to the subscriptions (kept if already there)."""
        canonical = "/".join(folder_levels(name))
        self._change_subscriptions(
            lambda names: names if canonical in names else names + [canonical]
        )

    def unsubscribe(self, name: str) -> None:
        """Remove C{name} from the subscriptions; not subscribed is fine."""
        canonical = "/".join(folder_levels(name))
        self._change_subscriptions(lambda names: [n for n in names if n != canonical])

    def _read_subscriptions(self) -> list[str]:
        """
        The C{subscriptions} file: one name per line, as Dovecot writes
        it (its version-2 form, a C{V\\t2} line and tab-separated levels, is
        read too).  Lines that are not valid names are skipped.
        """
        try:
            lines = (self.root / SUBSCRIPTIONS).read_bytes().split(b"\n")
        except FileNotFoundError:
            return []
        if lines and lines[0] == b"V\t2":
            lines = [line.replace(b"\t", b"/") for line in lines[1:]]
        names: list[str] = []
        for line in lines:
            try:
                name = "/".join(folder_levels(line.rstrip(b"\r")))
            except FolderError:
                continue
            if name not in names:
                names.append(name)
        return names

    def _change_subscriptions(self, change: Callable[[list[str]], list[str]]) -> None:
        """A locked read-modify-write of the C{subscriptions} file."""
        self.store.create(self.address)
        with _flocked(self.root / SUBSCRIPTIONS_LOCK):
            names = self._read_subscriptions()
            changed = change(list(names))
            if changed != names:
                data = "".join(n + "\n" for n in changed).encode("utf-8")
                _replace_file(self.root / SUBSCRIPTIONS, data)

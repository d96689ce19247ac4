"""
Users' mail as the people who run the server see it: what arrived, in which
folder, how big; one message decoded; and mail moved in and out as mbox or
maildir.

Everything is read through the store's own L{Mailbox} and L{Folder}, the
code POP3 and IMAP use, so what this shows is what clients see, and it is
safe next to a running server: folders are scanned without claiming new
mail (nothing moves from C{new/} to C{cur/}, no flag changes), and the UIDs
a scan hands out are assigned under the lock the servers use.  Only import
writes, through L{Folder.append}, the durable path.

Mail is hostile input: 8-bit headers, unknown charsets, broken MIME, files
truncated or unreadable, escape sequences in subjects.  Nothing here raises
for one bad message: it is described in one line to a C{report} callback
and skipped, and the rest is shown.  Long scans call a C{progress(done,
total)} callback.  There is no printing or argument parsing here: that is
L{mailsys.cli_mailbox}, the terminal edge.
"""

from __future__ import annotations

import binascii
import calendar
import email
import email.errors
import email.utils
import html.parser
import mailbox as stdlib_mailbox
import os
import re
import time
from dataclasses import dataclass, field
from datetime import date
from email.message import Message
from email.policy import compat32
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Sequence

from mailsys.maildir import (
    FLAG_LETTERS,
    DeliveryError,
    Folder,
    FolderError,
    Mailbox,
    MaildirStore,
    MessageGone,
    MessageInfo,
    folder_levels,
    fsync_directory,
)

Report = Callable[[str], None]
Progress = Callable[[int, int], None]

SEEN = "\\Seen"
# Nesting deeper than this is not listed (never legitimate; keeps recursion
# bounded on hostile mail).
MAX_DEPTH = 40


def _ignore(*args: object) -> None:
    """The default report and progress: say nothing."""


class InspectError(Exception):
    """
    What was asked for does not exist or cannot be done: an unknown
    mailbox, folder, message or part, a file that is not an mbox.
    C{str(error)} is one line for the administrator.
    """


# --- mailboxes and folders ------------------------------------------------------


@dataclass(frozen=True)
class FolderSummary:
    """One folder's totals: what C{mailbox list} shows per folder."""

    name: str
    messages: int
    unseen: int
    size: int


@dataclass(frozen=True)
class MailboxSummary:
    """
    One address's folders.

    @ivar user: whether the address is in the user directory (a maildir
        without a user is mail for an alias target such as postmaster, or
        left behind by C{user del}).
    @ivar exists: whether its maildir exists on disk.
    """

    address: str
    user: bool
    exists: bool
    folders: tuple[FolderSummary, ...]

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]

    @property
    def messages(self) -> int:
        return sum(f.messages for f in self.folders)

    @property
    def unseen(self) -> int:
        return sum(f.unseen for f in self.folders)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.folders)


@dataclass(frozen=True)
class DomainStats:
    """One domain's totals: what C{mailbox stats} shows."""

    domain: str
    users: int
    mailboxes: int
    messages: int
    size: int


def canonical_address(store: MaildirStore, address: str) -> str:
    """
    C{address} as the store files it (lower case).

    @raise InspectError: if it could not name a mailbox.
    """
    try:
        path = store.path_for(address.strip())
    except ValueError:
        raise InspectError(f"not a mailbox address: {address!r}") from None
    return f"{path.name}@{path.parent.name}"


def _is_maildir(path: Path) -> bool:
    """Whether C{path} is a maildir: half-made directories are not."""
    return (path / "cur").is_dir()


def open_mailbox(store: MaildirStore, address: str) -> Mailbox:
    """
    The mailbox of C{address}, which must exist on disk.  Nothing is
    created: a typing mistake must not leave an empty maildir behind.

    @raise InspectError: for an invalid address or a missing mailbox.
    """
    mailbox = Mailbox(store, canonical_address(store, address))
    if not _is_maildir(mailbox.root):
        raise InspectError(f"no such mailbox: {mailbox.address}")
    return mailbox


def open_folder(mailbox: Mailbox, name: str = "INBOX") -> Folder:
    """
    The folder C{name} of C{mailbox}.  INBOX is opened directly rather
    than through L{Mailbox.folder}, which would create and sync the
    maildir's directories: reading must not write.

    @raise FolderError: for a name the store refuses (hostile, reserved).
    @raise InspectError: for a folder that does not exist.
    """
    levels = folder_levels(name)
    if levels == ("INBOX",):
        hostname = mailbox.store.hostname
        return Folder(mailbox.root, "INBOX", hostname, mailbox.root)
    try:
        return mailbox.folder(name)
    except FolderError as e:
        raise InspectError(f"{mailbox.address}: {e}") from None


def all_folders(mailbox: Mailbox) -> list[Folder]:
    """Every folder of C{mailbox}, INBOX first."""
    return [open_folder(mailbox, name) for name in mailbox.folders()]


def known_addresses(store: MaildirStore, users: Iterable[str]) -> dict[str, bool]:
    """
    Every address with a user or a maildir: address -> whether it is a
    user, sorted by domain then local part.  Directories under the store's
    root that could not be a mailbox (a hostile or foreign name, no
    C{cur/}) are left out.
    """
    found: dict[str, bool] = {}
    for user in users:
        try:
            found[canonical_address(store, user)] = True
        except InspectError:
            continue
    for domain in _subdirectories(store.root):
        for local in _subdirectories(store.root / domain):
            address = f"{local}@{domain}"
            try:
                if store.path_for(address) != store.root / domain / local:
                    continue
            except ValueError:
                continue
            if _is_maildir(store.root / domain / local):
                found.setdefault(address, False)
    ordered = sorted(found, key=lambda a: tuple(reversed(a.rpartition("@")[::2])))
    return {address: found[address] for address in ordered}


def _subdirectories(path: Path) -> list[str]:
    """The names of the directories in C{path}, sorted; none if it is missing."""
    try:
        return sorted(
            entry.name
            for entry in os.scandir(path)
            if entry.is_dir(follow_symlinks=False)
        )
    except (FileNotFoundError, NotADirectoryError):
        return []


def summarize_folder(folder: Folder) -> FolderSummary:
    """Count a folder's messages (sizes come from the store's cache)."""
    infos = folder.scan()
    return FolderSummary(
        name=folder.name,
        messages=len(infos),
        unseen=sum(1 for info in infos if SEEN not in info.flags),
        size=sum(info.size for info in infos),
    )


def summarize_mailbox(
    store: MaildirStore, address: str, user: bool, report: Report = _ignore
) -> MailboxSummary:
    """
    The folders of one address; a folder that cannot be scanned (deleted
    meanwhile, unreadable) is reported and left out.
    """
    address = canonical_address(store, address)
    mailbox = Mailbox(store, address)
    if not _is_maildir(mailbox.root):
        return MailboxSummary(address, user, False, ())
    summaries = []
    for name in mailbox.folders():
        try:
            summaries.append(summarize_folder(open_folder(mailbox, name)))
        except (FolderError, InspectError, OSError) as e:
            report(f"{address} {name}: {_reason(e)}; skipped")
    return MailboxSummary(address, user, True, tuple(summaries))


def list_mailboxes(
    store: MaildirStore,
    users: Iterable[str],
    report: Report = _ignore,
    progress: Progress = _ignore,
) -> list[MailboxSummary]:
    """Every user and every maildir on disk, with their folders."""
    addresses = known_addresses(store, users)
    summaries = []
    for done, (address, user) in enumerate(addresses.items(), 1):
        summaries.append(summarize_mailbox(store, address, user, report))
        progress(done, len(addresses))
    return summaries


def domain_stats(
    mailboxes: Sequence[MailboxSummary], domains: Iterable[str] = ()
) -> list[DomainStats]:
    """
    Per domain: users, mailboxes on disk, messages and bytes; C{domains}
    (the configured ones) are listed even when they have no mail yet.
    """
    names = sorted(set(domains) | {m.domain for m in mailboxes})
    stats = []
    for domain in names:
        own = [m for m in mailboxes if m.domain == domain]
        stats.append(
            DomainStats(
                domain=domain,
                users=sum(1 for m in own if m.user),
                mailboxes=sum(1 for m in own if m.exists),
                messages=sum(m.messages for m in own),
                size=sum(m.size for m in own),
            )
        )
    return stats


# --- header fields ----------------------------------------------------------------

_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
# RFC 2047 2: =?charset?encoding?encoded-text?=
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([qQbB])\?([^?\s]*)\?=")
# Shown to a terminal, these would move the cursor, change colours or
# reverse the text: C0 and C1 controls, DEL, bidirectional overrides.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def header_fields(data: bytes) -> list[tuple[str, bytes]]:
    """
    The fields of the header block at the start of C{data}: C{(name as
    written, raw value)}, folding removed, in order.  Stops at the first
    blank line without reading further (C{data} may be a whole message).
    A line that is neither a field nor a continuation is kept with the
    field before it, as a lenient reader would.
    """
    fields: list[tuple[str, list[bytes]]] = []
    end = min(
        (i for i in (data.find(b"\n\n"), data.find(b"\n\r\n")) if i >= 0),
        default=len(data),
    )
    for line in data[:end].split(b"\n"):
        line = line.rstrip(b"\r")
        if not line:
            break
        match = _FIELD_NAME.match(line)
        if line[:1] in (b" ", b"\t") or match is None:
            if fields:
                fields[-1][1].append(line)
            continue
        name = match.group(1).decode("ascii")
        fields.append((name, [line[match.end() :]]))
    return [(name, b"".join(value).strip(b" \t")) for name, value in fields]


def starts_with_header(data: bytes) -> bool:
    """Whether C{data} begins with a header field, as every message must."""
    return _FIELD_NAME.match(data) is not None


def field_value(fields: Sequence[tuple[str, bytes]], name: str) -> bytes | None:
    """The raw value of the first field called C{name} (any case)."""
    name = name.lower()
    for found, value in fields:
        if found.lower() == name:
            return value
    return None


def decode_text(data: bytes, charset: str | None = None) -> str:
    """
    Bytes as text: in C{charset} when it is a known text encoding (bad
    bytes replaced), otherwise UTF-8 if they are valid UTF-8, otherwise
    Windows-1252, what mail calling itself latin-1 or nothing at all
    usually is.  Never raises.
    """
    if charset:
        name = charset.strip().strip('"').lower().partition("*")[0]
        if name not in ("us-ascii", "ascii", "unknown-8bit", "x-unknown"):
            try:
                return data.decode(name, "replace")
            except (LookupError, ValueError):
                pass  # unknown or not a text encoding ("base64")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


def decode_header(raw: bytes | None) -> str:
    """
    A header value for people: raw 8-bit bytes decoded (see
    L{decode_text}), RFC 2047 encoded words decoded, whitespace between
    adjacent encoded words dropped (RFC 2047 6.2), line folding and runs of
    white space made one space.  C{None} gives C{""}.
    """
    if raw is None:
        return ""
    text = decode_text(raw)
    if "=?" in text:
        text = _decode_words(text)
    return " ".join(text.split())


def _decode_words(text: str) -> str:
    """Decode the encoded words of C{text}; invalid ones stay as written."""
    out: list[str] = []
    pending: list[tuple[str, bytes]] = []  # adjacent encoded words

    def flush() -> None:
        # Words of one charset are joined before decoding: some mailers
        # split a UTF-8 character across two words.
        while pending:
            charset, data = pending.pop(0)
            while pending and pending[0][0] == charset:
                data += pending.pop(0)[1]
            out.append(decode_text(data, charset))

    position = 0
    for match in _ENCODED_WORD.finditer(text):
        between = text[position : match.start()]
        if not (pending and not between.strip()):
            flush()
            out.append(between)
        charset, encoding, payload = match.groups()
        data = _word_bytes(encoding, payload)
        if data is None:
            flush()
            out.append(match.group())
        else:
            pending.append((charset.lower().partition("*")[0], data))
        position = match.end()
    flush()
    out.append(text[position:])
    return "".join(out)


def _word_bytes(encoding: str, payload: str) -> bytes | None:
    """The bytes of one encoded word's text, or C{None} if it is invalid."""
    try:
        encoded = payload.encode("ascii")
    except UnicodeEncodeError:
        return None
    try:
        if encoding in "bB":
            padded = encoded + b"=" * (-len(encoded) % 4)
            return binascii.a2b_base64(padded, strict_mode=True)
        return binascii.a2b_qp(encoded, header=True)
    except (binascii.Error, ValueError):
        return None


def printable(text: str, keep_lines: bool = False) -> str:
    """
    C{text} safe to show on a terminal: control characters and
    bidirectional overrides replaced by U+FFFD; line breaks and tabs too
    unless C{keep_lines}.
    """
    if keep_lines:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        return _UNPRINTABLE.sub("\ufffd", text)
    text = _UNPRINTABLE.sub("\ufffd", text)
    return text.replace("\t", " ").replace("\r", "\ufffd").replace("\n", "\ufffd")


_YEAR_10000 = 253402300800


def header_date(raw: bytes | None) -> float | None:
    """The POSIX time of a C{Date:} value, or C{None} if it does not parse."""
    if raw is None:
        return None
    try:
        parsed = email.utils.parsedate_tz(raw.decode("ascii", "replace"))
        when = None if parsed is None else float(email.utils.mktime_tz(parsed))
    except (ValueError, OverflowError, TypeError, IndexError):
        return None
    # From 1970 to 9999: what a date can be shown as, and sorted with.
    if when is None or not 0 <= when < _YEAR_10000:
        return None
    return when


# --- messages -----------------------------------------------------------------------


@dataclass(frozen=True)
class MessageSummary:
    """
    One line of C{mailbox ls}.

    @ivar date: POSIX time of the C{Date:} header, or of the internal date
        when there is none or it does not parse.
    """

    folder: str
    uid: int
    key: str
    date: float
    internal_date: float
    sender: str
    subject: str
    size: int
    flags: frozenset[str]
    info: MessageInfo = field(repr=False, compare=False)


def _size_in_name(key: str) -> int | None:
    """The C{,S=} size in a maildir key (Dovecot's; mailsys writes it too)."""
    match = re.search(r",S=(\d+)(?:,|$)", key)
    return int(match.group(1)) if match else None


def _reason(error: BaseException) -> str:
    """A short reason for C{error}, on one line."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return " ".join((str(error) or type(error).__name__).split())


def _damage(info: MessageInfo, data: bytes, whole: bool) -> str | None:
    """
    Why the message cannot be shown, or C{None}: an empty file, fewer bytes
    than its name says it was written with, no header at the start.
    C{data} is its header block, or the whole file when C{whole}.
    """
    if info.size == 0 or (whole and not data):
        return "empty file"
    expected = _size_in_name(info.key)
    actual = len(data) if whole else info.size
    if expected is not None and actual < expected:
        return f"truncated: {actual} of {expected} bytes"
    if not starts_with_header(data):
        return "not a mail message: no header fields"
    return None


def _damaged(folder: Folder, info: MessageInfo, reason: str) -> str:
    """The one line that reports a damaged message, naming its UID and file."""
    return f"{folder.name}: message {info.uid} ({info.key}): {reason}; skipped"


# The three fields a listing shows, found in one pass of a header block: a
# field starts a line, its continuation lines start with white space.
_LISTED = re.compile(
    rb"^(from|subject|date)[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)",
    re.IGNORECASE | re.MULTILINE,
)


def _listed_fields(data: bytes) -> dict[bytes, bytes]:
    """
    The first From, Subject and Date of the header block at the start of
    C{data} (raw, still folded): what L{header_fields} would give for
    them, several times faster, for listing 10,000 messages.
    """
    ends = [i for i in (data.find(b"\n\n"), data.find(b"\n\r\n")) if i >= 0]
    block = data[: min(ends) + 1] if ends else data
    found: dict[bytes, bytes] = {}
    for match in _LISTED.finditer(block):
        found.setdefault(match.group(1).lower(), match.group(2))
    return found


def _summary(folder: Folder, info: MessageInfo, block: bytes) -> MessageSummary:
    """The listing line of a message from its header block."""
    fields = _listed_fields(block)
    written = header_date(fields.get(b"date"))
    return MessageSummary(
        folder=folder.name,
        uid=info.uid,
        key=info.key,
        date=info.internal_date if written is None else written,
        internal_date=info.internal_date,
        sender=decode_header(fields.get(b"from")),
        subject=decode_header(fields.get(b"subject")),
        size=info.size,
        flags=info.flags,
        info=info,
    )


def summarize_messages(
    folder: Folder,
    report: Report = _ignore,
    progress: Progress = _ignore,
    infos: Sequence[MessageInfo] | None = None,
) -> list[MessageSummary]:
    """
    The messages of C{folder} (or just C{infos} of it), newest last: by
    date, then UID.  Only header blocks are read, through the store's
    cache.  A message that vanishes meanwhile (expunged by a client) is
    left out; a damaged one is reported and left out.
    """
    if infos is None:
        infos = folder.scan()
    summaries = []
    for done, info in enumerate(infos, 1):
        progress(done, len(infos))
        try:
            block = folder.headers(info)
        except MessageGone:
            continue
        except OSError as e:
            report(_damaged(folder, info, f"cannot read: {_reason(e)}"))
            continue
        problem = _damage(info, block, whole=False)
        if problem is not None:
            report(_damaged(folder, info, problem))
            continue
        summaries.append(_summary(folder, info, block))
    summaries.sort(key=lambda s: (s.date, s.uid))
    return summaries


def find_message(folder: Folder, ident: str) -> MessageInfo:
    """
    The message with UID C{ident}, or maildir key C{ident} (a file name,
    with or without its directory and C{:2,} info, is accepted).

    @raise InspectError: if there is none.
    """
    wanted = ident.strip()
    infos = folder.scan()
    if wanted.isascii() and wanted.isdigit():
        for info in infos:
            if info.uid == int(wanted):
                return info
    else:
        key = os.path.basename(wanted).partition(":")[0]
        for info in infos:
            if info.key == key:
                return info
    raise InspectError(f"no message {ident!r} in {folder.name}")


def read_bytes(folder: Folder, info: MessageInfo) -> bytes:
    """
    The stored bytes of a message, exactly.

    @raise InspectError: if it was expunged meanwhile.
    @raise OSError: if it cannot be read.
    """
    try:
        with folder.open(info) as source:
            return source.read()
    except MessageGone:
        raise InspectError(f"message {info.uid} in {folder.name} is gone") from None


@dataclass(frozen=True)
class MessagePart:
    """
    One MIME entity, numbered as IMAP numbers sections (RFC 3501 6.4.5):
    C{"1"}, C{"2"}, C{"2.1"}; a single-part message's body is C{"1"}.

    @ivar size: decoded bytes of a leaf; C{None} for a container
        (multipart, message/rfc822).
    @ivar depth: nesting, for indentation.
    """

    number: str
    content_type: str
    size: int | None
    filename: str | None
    depth: int


@dataclass(frozen=True)
class MessageView:
    """
    A message decoded for reading: every header field (values decoded),
    the text body, the list of parts, and what is wrong with it.

    @ivar body_type: C{"text/plain"}, C{"text/html"} (shown stripped of
        tags) or C{None} when the message has no text part.
    @ivar problems: one line each: truncated, broken MIME; the rest is
        shown as well as it can be.
    """

    summary: MessageSummary
    headers: tuple[tuple[str, str], ...]
    body: str
    body_type: str | None
    parts: tuple[MessagePart, ...]
    problems: tuple[str, ...]

    def header(self, name: str) -> str | None:
        """The first field called C{name} (any case), decoded."""
        name = name.lower()
        for found, value in self.headers:
            if found.lower() == name:
                return value
        return None


_STRUCTURE_DEFECTS = {
    email.errors.NoBoundaryInMultipartDefect: "multipart without a boundary",
    email.errors.StartBoundaryNotFoundDefect: "multipart boundary never found",
    email.errors.CloseBoundaryNotFoundDefect: "multipart never closed",
    email.errors.MultipartInvariantViolationDefect: "multipart without parts",
}


def _entities(message: Message) -> Iterator[tuple[str, Message, int]]:
    """C{(number, entity, depth)} for every MIME entity, in order."""

    def children(entity: Message) -> list[Message]:
        if not entity.is_multipart():
            return []
        payload = entity.get_payload()
        if not isinstance(payload, list):
            return []
        if entity.get_content_type() == "message/rfc822" and payload:
            inner = payload[0]
            return children(inner) if inner.is_multipart() else [inner]
        return payload

    def walk(
        entity: Message, prefix: str, depth: int
    ) -> Iterator[tuple[str, Message, int]]:
        if depth > MAX_DEPTH:
            return
        for index, child in enumerate(children(entity), 1):
            number = f"{prefix}{index}"
            yield number, child, depth
            yield from walk(child, number + ".", depth + 1)

    if children(message):
        yield from walk(message, "", 0)
    else:
        yield "1", message, 0


def _filename(entity: Message) -> str | None:
    """The decoded file name of a part, if it has one."""
    try:
        name = entity.get_filename()
    except Exception:  # the stdlib's RFC 2231 code on hostile parameters
        return None
    if name is None:
        return None
    # Thunderbird and others still send RFC 2047 words in file names.
    return decode_header(name.encode("utf-8", "surrogateescape")) or None


def _is_container(entity: Message) -> bool:
    """Whether the entity holds other entities (multipart, message/rfc822)."""
    return entity.is_multipart()


def _decoded(entity: Message) -> bytes:
    """A leaf's content, its transfer encoding undone (never raises)."""
    try:
        payload = entity.get_payload(decode=True)
    except Exception:
        payload = None
    return payload if isinstance(payload, bytes) else b""


def _text(entity: Message) -> str:
    """A text leaf's content as text, from its charset."""
    try:
        charset = entity.get_content_charset()
    except Exception:
        charset = None
    text = decode_text(_decoded(entity), charset)
    return text.replace("\r\n", "\n")


def _content_type(entity: Message) -> str:
    """
    The entity's type; a multipart whose boundary never came is read as
    the text it is (as Dovecot does), rather than hidden.
    """
    try:
        kind = entity.get_content_type()
    except Exception:
        return "text/plain"
    if kind.startswith("multipart/") and not entity.is_multipart():
        return "text/plain"
    return kind


def _defects(message: Message) -> list[str]:
    """The structural MIME problems of C{message}, described once each."""
    found: list[str] = []
    for entity in message.walk():
        for defect in entity.defects:
            for kind, text in _STRUCTURE_DEFECTS.items():
                if isinstance(defect, kind) and text not in found:
                    found.append(text)
    return found


class _HTMLText(html.parser.HTMLParser):
    """Collects the text of an HTML body, one line per block."""

    _BLOCKS = frozenset(
        "p div tr li ul ol table blockquote pre h1 h2 h3 h4 h5 h6 hr".split()
    )
    _HIDDEN = frozenset(("script", "style", "head", "title"))

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.pieces: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: object) -> None:
        if tag in self._HIDDEN:
            self._hidden += 1
        elif tag in self._BLOCKS or tag == "br":
            self.pieces.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in self._BLOCKS:
            self.pieces.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.pieces.append(data)


def html_to_text(markup: str) -> str:
    """The readable text of an HTML body: tags gone, entities decoded."""
    parser = _HTMLText()
    try:
        parser.feed(markup)
        parser.close()
    except Exception:  # html.parser is lenient; this is only a safety net
        pass
    lines = [" ".join(line.split()) for line in "".join(parser.pieces).split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return text.strip("\n") + "\n" if text.strip() else ""


def _parse(data: bytes) -> Message:
    """The MIME tree of a message; the stdlib parser never raises on bad mail."""
    return email.message_from_bytes(data, policy=compat32)


def _leaves(message: Message) -> list[tuple[str, Message]]:
    """The numbered entities that hold content rather than other entities."""
    return [(n, e) for n, e, _ in _entities(message) if not _is_container(e)]


def _body(message: Message) -> tuple[str, str | None]:
    """The text to show: the first inline text/plain, else text/html as text."""
    leaves = _leaves(message)
    for wanted in ("text/plain", "text/html"):
        for _, entity in leaves:
            if (
                _content_type(entity) == wanted
                and entity.get_content_disposition() != "attachment"
            ):
                text = _text(entity)
                return (html_to_text(text) if wanted == "text/html" else text), wanted
    return "", None


def read_message(folder: Folder, info: MessageInfo) -> MessageView:
    """
    The message decoded for reading.  A truncated file or broken MIME is
    described in L{MessageView.problems} and shown as well as it can be.

    @raise InspectError: if it was expunged meanwhile.
    @raise OSError: if it cannot be read.
    """
    data = read_bytes(folder, info)
    problems = []
    if not data:
        problems.append("empty file")
    else:
        damage = _damage(info, data, whole=True)
        if damage is not None:
            problems.append(damage)
    message = _parse(data)
    defects = _defects(message)
    if defects:
        problems.append("broken MIME: " + ", ".join(defects))
    parts = []
    for number, entity, depth in _entities(message):
        container = _is_container(entity)
        parts.append(
            MessagePart(
                number=number,
                content_type=_content_type(entity),
                size=None if container else len(_decoded(entity)),
                filename=_filename(entity),
                depth=depth,
            )
        )
    body, body_type = _body(message)
    fields = header_fields(data)
    return MessageView(
        summary=_summary(folder, info, data),
        headers=tuple((name, decode_header(value)) for name, value in fields),
        body=body,
        body_type=body_type,
        parts=tuple(parts),
        problems=tuple(problems),
    )


@dataclass(frozen=True)
class PartContent:
    """
    One part taken out of a message: C{text} for a text part (decoded
    from its charset), otherwise C{data}, the decoded bytes (an attached
    message: the message itself).
    """

    part: MessagePart
    data: bytes
    text: str | None


def read_part(folder: Folder, info: MessageInfo, number: str) -> PartContent:
    """
    Part C{number} of the message, decoded from its transfer encoding.

    @raise InspectError: if there is no such part, or it is a multipart
        (whose parts are to be taken one at a time).
    """
    message = _parse(read_bytes(folder, info))
    entities = list(_entities(message))
    for found, entity, depth in entities:
        if found != number.strip():
            continue
        kind = _content_type(entity)
        part = MessagePart(found, kind, None, _filename(entity), depth)
        if kind == "message/rfc822" and _is_container(entity):
            try:
                inner = entity.get_payload(0).as_bytes()
            except Exception as e:
                raise InspectError(
                    f"part {found} cannot be rebuilt: {_reason(e)}"
                ) from e
            return PartContent(part, inner, None)
        if _is_container(entity):
            inside = ", ".join(n for n, _, _ in entities if n.startswith(found + "."))
            raise InspectError(f"part {found} is {kind}; take its parts: {inside}")
        data = _decoded(entity)
        part = MessagePart(found, kind, len(data), part.filename, depth)
        if kind.startswith("text/"):
            return PartContent(part, data, _text(entity))
        return PartContent(part, data, None)
    numbers = ", ".join(n for n, _, _ in entities)
    raise InspectError(f"message {info.uid} has no part {number!r} (parts: {numbers})")


# --- search ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchCriteria:
    """
    What C{mailbox search} looks for; all given criteria must match.
    Strings match case-insensitively anywhere in the decoded text; dates
    are days in UTC, C{since} inclusive, C{before} exclusive, compared with
    the date C{ls} shows.
    """

    sender: str | None = None
    subject: str | None = None
    since: date | None = None
    before: date | None = None
    text: str | None = None

    def _headers_match(self, summary: MessageSummary) -> bool:
        """Whether the criteria that need only the header block match."""
        if self.sender and self.sender.casefold() not in summary.sender.casefold():
            return False
        if self.subject and self.subject.casefold() not in summary.subject.casefold():
            return False
        if self.since and summary.date < calendar.timegm(self.since.timetuple()):
            return False
        if self.before and summary.date >= calendar.timegm(self.before.timetuple()):
            return False
        return True


def _searchable_text(data: bytes) -> str:
    """Decoded header values and every text part, for C{--text}."""
    message = _parse(data)
    pieces = [decode_header(value) for _, value in header_fields(data)]
    for _, entity in _leaves(message):
        kind = _content_type(entity)
        if kind == "text/html":
            pieces.append(html_to_text(_text(entity)))
        elif kind.startswith("text/"):
            pieces.append(_text(entity))
    return "\n".join(pieces).casefold()


def search(
    folders: Sequence[Folder],
    criteria: SearchCriteria,
    report: Report = _ignore,
    progress: Progress = _ignore,
) -> list[MessageSummary]:
    """
    The messages of C{folders} that match, newest last.  With C{text},
    each candidate is read whole; one damaged (unreadable, truncated,
    broken MIME) is reported and skipped.
    """
    scanned = []
    for folder in folders:
        try:
            scanned.append((folder, folder.scan()))
        except (FolderError, OSError) as e:
            report(f"{folder.name}: {_reason(e)}; skipped")
    total = sum(len(infos) for _, infos in scanned)
    done = 0
    found = []
    for folder, infos in scanned:
        offset = done

        def step(n: int, _: int, offset: int = offset) -> None:
            progress(offset + n, total)

        for summary in summarize_messages(folder, report, step, infos):
            if not criteria._headers_match(summary):
                continue
            if criteria.text and not _text_matches(folder, summary, criteria, report):
                continue
            found.append(summary)
        done += len(infos)
    found.sort(key=lambda s: (s.date, s.folder, s.uid))
    return found


def _text_matches(
    folder: Folder, summary: MessageSummary, criteria: SearchCriteria, report: Report
) -> bool:
    """Whether the whole message holds C{criteria.text}; damaged: reported, no."""
    info = summary.info
    try:
        data = read_bytes(folder, info)
    except InspectError:
        return False
    except OSError as e:
        report(_damaged(folder, info, f"cannot read: {_reason(e)}"))
        return False
    problem = _damage(info, data, whole=True)
    defects = _defects(_parse(data))
    if problem is None and defects:
        problem = "broken MIME: " + ", ".join(defects)
    if problem is not None:
        report(_damaged(folder, info, problem))
        return False
    assert criteria.text is not None
    return criteria.text.casefold() in _searchable_text(data)


# --- import and export --------------------------------------------------------------


@dataclass(frozen=True)
class Transfer:
    """How many messages an import or export moved, and how many it skipped."""

    count: int
    skipped: int


# maildir info letter -> IMAP flag (the store's own table, inverted).
_FLAG_OF_LETTER = {letter: flag for flag, letter in FLAG_LETTERS.items()}
# mbox Status/X-Status letters (mutt, Thunderbird, the stdlib's mboxMessage).
_FLAG_OF_STATUS = {
    "R": "\\Seen",
    "A": "\\Answered",
    "F": "\\Flagged",
    "D": "\\Deleted",
}
# mboxrd (and mboxo, the best reading of it): a "From " line in the text was
# written with one more ">" in front.
_QUOTED_FROM = re.compile(rb"^>(>*From )", re.MULTILINE)
_FROM = re.compile(rb"^(>*From )", re.MULTILINE)


def import_messages(
    folder: Folder,
    source: Path,
    report: Report = _ignore,
    progress: Progress = _ignore,
) -> Transfer:
    """
    Append every message of the mbox file or maildir C{source} to C{folder},
    each durably (L{Folder.append} syncs before it returns), keeping flags
    and dates.  A message that is not mail (empty, no header) or cannot be
    read is reported and skipped.

    @raise InspectError: if C{source} is neither an mbox file nor a maildir.
    @raise DeliveryError: if the folder cannot be written (disk full): the
        messages appended before it stay.
    """
    source = Path(source)
    if source.is_dir():
        if not _is_maildir(source):
            raise InspectError(f"{source}: not a maildir (no cur/ directory)")
        if source.resolve() == folder.path.resolve():
            raise InspectError(f"{source}: is the folder being imported into")
        return _import_maildir(folder, source, report, progress)
    if not source.is_file():
        raise InspectError(f"{source}: no such mbox file or maildir")
    with open(source, "rb") as probe:
        start = probe.read(5)
    if start and start != b"From ":
        raise InspectError(f"{source}: not an mbox file (it must start with 'From ')")
    return _import_mbox(folder, source, report, progress)


def _import_mbox(
    folder: Folder, source: Path, report: Report, progress: Progress
) -> Transfer:
    """Append the messages of the mbox file C{source} (see L{import_messages})."""
    box = stdlib_mailbox.mbox(str(source), create=False)
    count = skipped = 0
    try:
        keys = box.keys()
        for done, key in enumerate(keys, 1):
            progress(done, len(keys))
            raw = box.get_bytes(key, from_=True)
            from_line, _, data = raw.partition(b"\n")
            if data.endswith(b"\r\n\r\n"):
                data = data[:-2]  # a CRLF mbox's separating blank line
            data = _QUOTED_FROM.sub(rb"\1", data)
            if not starts_with_header(data):
                report(
                    f"mbox message {done}: not a mail message: no header fields;"
                    " skipped"
                )
                skipped += 1
                continue
            fields = header_fields(data)
            status = decode_header(field_value(fields, "status")) + decode_header(
                field_value(fields, "x-status")
            )
            flags = {_FLAG_OF_STATUS[c] for c in status if c in _FLAG_OF_STATUS}
            when = _from_line_date(from_line)
            if when is None:
                when = header_date(field_value(fields, "date"))
            _append(folder, data, flags, when, count)
            count += 1
    finally:
        box.close()
    return Transfer(count, skipped)


def _append(
    folder: Folder, data: bytes, flags: Iterable[str], when: float | None, done: int
) -> None:
    """
    L{Folder.append}, durable; when the folder cannot take it (disk full),
    the error says how many messages are in already, so the administrator
    knows where to resume.
    """
    try:
        folder.append(data, flags, when)
    except DeliveryError as e:
        raise DeliveryError(f"{e}; stopped after {done} messages") from e


def _from_line_date(line: bytes) -> float | None:
    """The date of an mbox C{From } line (asctime, taken as UTC)."""
    words = line.decode("ascii", "replace").split()
    for candidate in (words[-5:], words[2:7]):
        try:
            parsed = time.strptime(" ".join(candidate), "%a %b %d %H:%M:%S %Y")
        except ValueError:
            continue
        return float(calendar.timegm(parsed))
    return None


class _StoredMessage(stdlib_mailbox.MaildirMessage):
    """
    A message of a foreign maildir as the stdlib reads it (flags from the
    C{:2,} info, the file's mtime), but with its bytes kept exactly instead
    of parsed.
    """

    def __init__(self, source: BinaryIO) -> None:
        super().__init__()
        self.data = source.read()


def _import_maildir(
    folder: Folder, source: Path, report: Report, progress: Progress
) -> Transfer:
    """Append the messages of the maildir C{source} (see L{import_messages})."""
    box = stdlib_mailbox.Maildir(str(source), factory=_StoredMessage, create=False)
    # Sorted names are arrival order for standard maildir names.
    keys = sorted(key for key in box.keys() if not key.startswith("."))
    count = skipped = 0
    for done, key in enumerate(keys, 1):
        progress(done, len(keys))
        try:
            message = box.get_message(key)
        except KeyError:
            continue  # removed since the directory was read
        except OSError as e:
            report(f"{key}: cannot read: {_reason(e)}; skipped")
            skipped += 1
            continue
        assert isinstance(message, _StoredMessage)
        if not starts_with_header(message.data):
            report(f"{key}: not a mail message: no header fields; skipped")
            skipped += 1
            continue
        letters = message.get_flags()
        flags = {_FLAG_OF_LETTER[c] for c in letters if c in _FLAG_OF_LETTER}
        _append(folder, message.data, flags, message.get_date(), count)
        count += 1
    return Transfer(count, skipped)


def _envelope_sender(data: bytes) -> str:
    """
    The sender for the C{From } line: the address in C{Return-Path:} (set
    at delivery), or C{MAILER-DAEMON} for none, C{<>} or anything that
    would not be one word.
    """
    raw = field_value(header_fields(data), "return-path")
    if raw is None:
        return "MAILER-DAEMON"
    address = raw.decode("ascii", "replace").strip().strip("<>").strip()
    if not address or any(c.isspace() or not c.isprintable() for c in address):
        return "MAILER-DAEMON"
    return address


def mbox_entry(data: bytes, internal_date: float) -> bytes:
    """
    One message as mboxrd: the C{From } line, the message with every
    C{From } line of it quoted with one more C{>}, a line ending if it
    lacked one, and the blank line that ends it.
    """
    try:
        when = time.asctime(time.gmtime(internal_date))
    except (OverflowError, OSError, ValueError):  # an mtime no calendar has
        when = time.asctime(time.gmtime(0))
    line = f"From {_envelope_sender(data)} {when}\n".encode("ascii", "replace")
    body = _FROM.sub(rb">\1", data)
    if not body.endswith(b"\n"):
        body += b"\n"
    return line + body + b"\n"


def export_mbox(
    folder: Folder,
    target: Path,
    report: Report = _ignore,
    progress: Progress = _ignore,
) -> Transfer:
    """
    Write every message of C{folder}, in UID order, to the mboxrd file
    C{target}: first to C{target.tmp}, synced, then renamed, so C{target}
    is either the old file or the whole new one.  A message that cannot be
    read is reported and skipped.

    @raise InspectError: if C{target} cannot be a file (its directory is
        missing, it is a directory).
    """
    target = Path(target)
    if not target.parent.is_dir():
        raise InspectError(f"{target}: no such directory: {target.parent}")
    if target.is_dir():
        raise InspectError(f"{target}: is a directory")
    temporary = target.with_name(target.name + ".tmp")
    infos = folder.scan()
    count = skipped = 0
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            for done, info in enumerate(infos, 1):
                progress(done, len(infos))
                try:
                    data = read_bytes(folder, info)
                except InspectError:
                    continue  # expunged by a client meanwhile
                except OSError as e:
                    report(_damaged(folder, info, f"cannot read: {_reason(e)}"))
                    skipped += 1
                    continue
                out.write(mbox_entry(data, info.internal_date))
                count += 1
            out.flush()
            os.fsync(out.fileno())
        os.rename(temporary, target)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    fsync_directory(target.parent)
    return Transfer(count, skipped)

"""
SEARCH (RFC 3501 6.4.4): the search keys parsed into a small tree, and
evaluated message by message in the thread pool.

Each message is read only as far as the keys need: flags, sizes, dates and
UIDs come from the scan, header keys from the store's cached header block,
and only BODY and TEXT read the whole message.  Matching is a
case-insensitive substring test on decoded text (RFC 2047 words in headers,
base64 and quoted-printable in bodies), which is what users expect of
"search for".
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email.header
import email.utils
import quopri
import time
from dataclasses import dataclass
from typing import Any, Callable

from mailsys.imap.message import (
    ParsedMessage,
    Part,
    header_value,
    split_header,
    to_crlf,
)
from mailsys.imap.syntax import Arguments, BadCommand, parse_date

# Nesting deeper than this in one query is refused (it is never needed).
MAX_DEPTH = 50
CHARSETS = ("UTF-8", "US-ASCII")

_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True),
    "DELETED": ("\\Deleted", True),
    "DRAFT": ("\\Draft", True),
    "FLAGGED": ("\\Flagged", True),
    "SEEN": ("\\Seen", True),
    "UNANSWERED": ("\\Answered", False),
    "UNDELETED": ("\\Deleted", False),
    "UNDRAFT": ("\\Draft", False),
    "UNFLAGGED": ("\\Flagged", False),
    "UNSEEN": ("\\Seen", False),
}
_ADDRESS_KEYS = {"BCC", "CC", "FROM", "SUBJECT", "TO"}
_DATE_KEYS = {"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"}


class BadCharset(Exception):
    """A CHARSET we do not search in (RFC 3501 6.4.4: NO [BADCHARSET])."""


@dataclass(frozen=True)
class Key:
    """One search key: C{op} and its arguments (sub-keys for AND/OR/NOT)."""

    op: str
    args: tuple[Any, ...] = ()


def parse_search(args: Arguments) -> Key:
    """
    RFC 3501 9 search: C{[CHARSET x] key *(SP key)}, as one AND key.

    @raise BadCharset: for a charset other than UTF-8 and US-ASCII.
    """
    if args.take(b"CHARSET "):
        charset = args.astring("a charset").decode("ascii", "replace").upper()
        if charset not in CHARSETS:
            raise BadCharset(charset)
        args.space()
    keys = [_key(args, 0)]
    while not args.at_end():
        args.space()
        keys.append(_key(args, 0))
    return Key("AND", tuple(keys))


def _text(args: Arguments) -> str:
    value = args.astring("a search string")
    try:
        return value.decode("utf-8").casefold()
    except UnicodeDecodeError:
        raise BadCommand("search string is not UTF-8") from None


def _date(args: Arguments) -> tuple[int, int, int]:
    if args.peek() == ord('"'):
        return parse_date(args.quoted())
    return parse_date(args.atom("a date"))


def _key(args: Arguments, depth: int) -> Key:
    if depth > MAX_DEPTH:
        raise BadCommand("search keys nested too deep")
    if args.take(b"("):
        keys = [_key(args, depth + 1)]
        while not args.take(b")"):
            args.space()
            keys.append(_key(args, depth + 1))
        return Key("AND", tuple(keys))
    following = args.peek()
    if (
        following is not None
        and following > 0
        and (chr(following).isdigit() or following == ord("*"))
    ):
        return Key("SEQ", (args.sequence_set(),))
    name = args.keyword("a search key")
    if name == "ALL":
        return Key("ALL")
    if name in _FLAG_KEYS:
        flag, present = _FLAG_KEYS[name]
        return Key("FLAG", (flag, present))
    if name in ("NEW", "OLD", "RECENT"):
        return Key(name)
    if name in ("KEYWORD", "UNKEYWORD"):
        args.space()
        # Keywords are case-insensitive, like all flags (RFC 3501 2.3.2).
        return Key("KEYWORD", (args.flag().lower(), name == "KEYWORD"))
    if name in _ADDRESS_KEYS:
        args.space()
        return Key("HEADER", (name.lower(), _text(args)))
    if name == "HEADER":
        args.space()
        field = args.astring("a header field name").decode("ascii", "replace").lower()
        args.space()
        return Key("HEADER", (field, _text(args)))
    if name in ("BODY", "TEXT"):
        args.space()
        return Key(name, (_text(args),))
    if name in _DATE_KEYS:
        args.space()
        return Key(name, (_date(args),))
    if name in ("LARGER", "SMALLER"):
        args.space()
        return Key(name, (args.number("a size"),))
    if name == "UID":
        args.space()
        return Key("UID", (args.sequence_set(),))
    if name == "NOT":
        args.space()
        return Key("NOT", (_key(args, depth + 1),))
    if name == "OR":
        args.space()
        first = _key(args, depth + 1)
        args.space()
        return Key("OR", (first, _key(args, depth + 1)))
    raise BadCommand(f"unknown search key {name[:40]}")


class _Candidate:
    """One message under test, reading headers and body only when asked."""

    def __init__(self, folder: Any, info: Any, seq: int, recent: bool) -> None:
        self.folder = folder
        self.info = info
        self.seq = seq
        self.recent = recent
        self._fields: list[Any] | None = None
        self._decoded: dict[str, list[str]] = {}
        self._body: str | None = None

    def fields(self) -> list[Any]:
        if self._fields is None:
            self._fields = split_header(to_crlf(self.folder.headers(self.info)))
        return self._fields

    def header(self, name: str) -> list[str]:
        """Every value of header C{name}, decoded and case-folded."""
        if name not in self._decoded:
            wanted = name.encode("ascii", "replace")
            values = [f.value for f in self.fields() if f.name.lower() == wanted]
            self._decoded[name] = [_decode_header(v).casefold() for v in values]
        return self._decoded[name]

    def all_headers(self) -> str:
        return "\n".join(
            f.name.decode("ascii", "replace") + ": " + _decode_header(f.value)
            for f in self.fields()
        ).casefold()

    def body(self) -> str:
        if self._body is None:
            with self.folder.open(self.info) as source:
                parsed = ParsedMessage(to_crlf(source.read()))
            texts: list[str] = []
            _collect_text(parsed, parsed.root, texts)
            self._body = "\n".join(texts).casefold()
        return self._body

    def sent_date(self) -> tuple[int, int, int] | None:
        value = header_value(self.fields(), b"date")
        if value is None:
            return None
        try:
            parsed = email.utils.parsedate_tz(value.decode("ascii", "replace"))
        except Exception:
            return None
        if parsed is None:
            return None
        return (parsed[0], parsed[1], parsed[2])


def _decode_header(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except Exception:
        return text


def _decode_body(data: bytes, encoding: str, charset: str) -> str:
    try:
        if encoding == "BASE64":
            data = base64.b64decode(b"".join(data.split()), validate=False)
        elif encoding == "QUOTED-PRINTABLE":
            data = quopri.decodestring(data)
    except (binascii.Error, ValueError):
        pass
    try:
        codecs.lookup(charset)
    except LookupError:
        charset = "utf-8"
    return data.decode(charset, "replace")


def _collect_text(
    parsed: ParsedMessage, part: Part, out: list[str], depth: int = 0
) -> None:
    if depth > 60:
        return
    if part.children:
        for child in part.children:
            _collect_text(parsed, child, out, depth + 1)
        return
    if part.encapsulated is not None:
        _collect_text(parsed, part.encapsulated, out, depth + 1)
        return
    maintype, _ = part.content_type
    if maintype != "text" and part is not parsed.root:
        return
    try:
        charset = part.header.get_content_charset() or "utf-8"
    except Exception:
        charset = "utf-8"
    encoding = (part.header.get("content-transfer-encoding") or "7bit").strip().upper()
    body = parsed.data[part.body : part.end]
    out.append(_decode_body(body, str(encoding), str(charset)))


def _utc_date(timestamp: float) -> tuple[int, int, int]:
    t = time.gmtime(timestamp)
    return (t.tm_year, t.tm_mon, t.tm_mday)


def _compare(
    op: str, date: tuple[int, int, int] | None, wanted: tuple[int, int, int]
) -> bool:
    if date is None:
        return False
    if op.endswith("BEFORE"):
        return date < wanted
    if op.endswith("ON"):
        return date == wanted
    return date >= wanted


def _matches(key: Key, message: _Candidate, largest_uid: int, count: int) -> bool:
    op = key.op
    info = message.info
    if op == "ALL":
        return True
    if op == "NONE":
        return False
    if op == "AND":
        return all(_matches(k, message, largest_uid, count) for k in key.args)
    if op == "OR":
        return any(_matches(k, message, largest_uid, count) for k in key.args)
    if op == "NOT":
        return not _matches(key.args[0], message, largest_uid, count)
    if op == "FLAG":
        flag, present = key.args
        return (flag in info.flags) == present
    if op == "KEYWORD":
        keyword, present = key.args
        found = any(f.lower() == keyword for f in info.flags if not f.startswith("\\"))
        return found == present
    if op == "RECENT":
        return message.recent
    if op == "NEW":
        return message.recent and "\\Seen" not in info.flags
    if op == "OLD":
        return not message.recent
    if op == "SEQ":
        return key.args[0].contains(message.seq, count)
    if op == "UID":
        return key.args[0].contains(info.uid, largest_uid)
    if op == "LARGER":
        return info.crlf_size > key.args[0]
    if op == "SMALLER":
        return info.crlf_size < key.args[0]
    if op in ("BEFORE", "ON", "SINCE"):
        return _compare(op, _utc_date(info.internal_date), key.args[0])
    if op in ("SENTBEFORE", "SENTON", "SENTSINCE"):
        return _compare(op, message.sent_date(), key.args[0])
    if op == "HEADER":
        name, text = key.args
        # An empty string matches every message that has the field.
        return any(text in value for value in message.header(name))
    if op == "BODY":
        return key.args[0] in message.body()
    if op == "TEXT":
        text = key.args[0]
        return text in message.all_headers() or text in message.body()
    raise AssertionError(op)


def search(
    folder: Any,
    entries: list[tuple[int, Any, bool]],
    key: Key,
    gone: Callable[[BaseException], bool],
) -> list[tuple[int, int]]:
    """
    Blocking.  The C{(seq, uid)} of the messages of C{entries}
    (C{(seq, info, recent)} in sequence order) that match C{key}.  A
    message expunged meanwhile (C{gone(error)} is true) does not match.
    """
    largest_uid = entries[-1][1].uid if entries else 0
    count = len(entries)
    found = []
    for seq, info, recent in entries:
        candidate = _Candidate(folder, info, seq, recent)
        try:
            if _matches(key, candidate, largest_uid, count):
                found.append((seq, info.uid))
        except Exception as e:
            if not gone(e):
                raise
    return found


__all__ = ["BadCharset", "Key", "parse_search", "search"]

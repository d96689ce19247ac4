"""
IMAP data in both directions (RFC 3501 4 and 9): reading the arguments of a
command that has already been cut out of the byte stream (with its literals)
and writing strings, lists and dates into responses.

Reading is strict in what it takes and says what is wrong in one line, so
the protocol can answer C{BAD} and carry on: a malformed command never costs
the session.
"""

from __future__ import annotations

import calendar
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

# Literals up to this size stay in memory; bigger ones (APPEND) are spooled
# to a temporary file.
LITERAL_IN_MEMORY = 256 * 1024

# RFC 3501 9: atom-specials are ( ) { SP CTL % * " \ ].
_ATOM = frozenset(b for b in range(0x21, 0x7F) if bytes([b]) not in b'(){%*"\\]')
# ASTRING-CHAR is ATOM-CHAR or "]".
_ASTRING = _ATOM | {ord("]")}
# A list-mailbox may also hold the wildcards.
_LIST_CHARS = _ASTRING | {ord("%"), ord("*")}
_SEQUENCE_CHARS = frozenset(b"0123456789:*,")


_LITERAL_END = re.compile(rb"\{(\d{1,10})(\+?)\}\Z")


def literal_announcement(line: bytes) -> tuple[bytes, int, bool] | None:
    """
    For a line ending in C{{n}} or C{{n+}} (RFC 3501 4.3, RFC 7888): the
    text before it, n, and whether the client waits for "+" (synchronizing).
    """
    match = _LITERAL_END.search(line)
    if match is None:
        return None
    return line[: match.start()], int(match.group(1)), not match.group(2)


class BadCommand(Exception):
    """A command that does not parse; C{str()} is the one-line reason sent with BAD."""


class Literal:
    """
    The bytes of one literal (C{{n}} or C{{n+}} then n octets), spooled to a
    temporary file past L{LITERAL_IN_MEMORY} so a large APPEND never sits
    whole in memory.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.file = tempfile.SpooledTemporaryFile(max_size=LITERAL_IN_MEMORY)

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def value(self) -> bytes:
        """All of it, for the small literals (names, passwords, search strings)."""
        self.file.seek(0)
        return self.file.read()

    def close(self) -> None:
        self.file.close()


class Arguments:
    """
    A cursor over one command's text and literals.  Each reader method
    consumes what it returns or raises L{BadCommand}.

    @param parts: the command as received: text (bytes, without line
        endings or literal announcements) and L{Literal}s, alternating,
        starting and ending with text.
    """

    def __init__(self, parts: Sequence[bytes | Literal]) -> None:
        self._parts = list(parts)
        self._index = 0
        self._pos = 0

    # -- low level ----------------------------------------------------------

    def _text(self) -> bytes | None:
        """The text part under the cursor, or C{None} at a literal."""
        if self._index >= len(self._parts):
            return b""
        part = self._parts[self._index]
        return part if isinstance(part, bytes) else None

    def _normalize(self) -> None:
        # Step over an exhausted text part onto the literal after it.
        while self._index < len(self._parts) - 1:
            part = self._parts[self._index]
            if isinstance(part, bytes) and self._pos >= len(part):
                self._index += 1
                self._pos = 0
            else:
                break

    def peek(self) -> int | None:
        """The next byte, C{None} at the end, or C{-1} when a literal is next."""
        self._normalize()
        text = self._text()
        if text is None:
            return -1
        if self._pos >= len(text):
            return None
        return text[self._pos]

    def at_end(self) -> bool:
        return self.peek() is None

    def end(self) -> None:
        if not self.at_end():
            raise BadCommand("unexpected extra arguments")

    def take(self, token: bytes) -> bool:
        """Consume C{token} (ASCII case-insensitive) if it is next."""
        self._normalize()
        text = self._text()
        if text is None:
            return False
        candidate = text[self._pos : self._pos + len(token)]
        if candidate.upper() == token.upper():
            self._pos += len(token)
            return True
        return False

    def expect(self, token: bytes, what: str | None = None) -> None:
        if not self.take(token):
            raise BadCommand(f"expected {what or token.decode('ascii')!s}")

    def space(self) -> None:
        self.expect(b" ", "a space")

    def run(self, allowed: frozenset[int]) -> bytes:
        self._normalize()
        text = self._text()
        if text is None:
            return b""
        start = self._pos
        end = start
        while end < len(text) and text[end] in allowed:
            end += 1
        self._pos = end
        return text[start:end]

    # -- IMAP data ----------------------------------------------------------

    def atom(self, what: str = "an atom") -> bytes:
        value = self.run(_ATOM)
        if not value:
            raise BadCommand(f"expected {what}")
        return value

    def keyword(self, what: str = "a keyword") -> str:
        """An atom, upper-cased, as text (command and item names)."""
        return self.atom(what).decode("ascii").upper()

    def number(self, what: str = "a number") -> int:
        value = self.run(frozenset(b"0123456789"))
        if not value or len(value) > 10:
            raise BadCommand(f"expected {what}")
        number = int(value)
        # RFC 3501 9: number is an unsigned 32-bit integer.
        if number >= 2**32:
            raise BadCommand(f"{what} out of range")
        return number

    def quoted(self) -> bytes:
        self.expect(b'"', "a quoted string")
        text = self._text()
        assert text is not None
        out = bytearray()
        pos = self._pos
        while pos < len(text):
            byte = text[pos]
            if byte == ord('"'):
                self._pos = pos + 1
                return bytes(out)
            if byte == ord("\\"):
                pos += 1
                if pos >= len(text) or text[pos] not in b'"\\':
                    raise BadCommand("bad escape in quoted string")
                byte = text[pos]
            elif byte in (0, 10, 13):
                raise BadCommand("control character in quoted string")
            out.append(byte)
            pos += 1
        raise BadCommand("unterminated quoted string")

    def literal(self) -> Literal:
        if self.peek() != -1:
            raise BadCommand("expected a literal")
        literal = self._parts[self._index]
        assert isinstance(literal, Literal)
        self._index += 1
        self._pos = 0
        return literal

    def string(self, what: str = "a string") -> bytes:
        following = self.peek()
        if following == -1:
            return self.literal().value()
        if following == ord('"'):
            return self.quoted()
        raise BadCommand(f"expected {what}")

    def astring(self, what: str = "a string") -> bytes:
        following = self.peek()
        if following == -1 or following == ord('"'):
            return self.string(what)
        value = self.run(_ASTRING)
        if not value:
            raise BadCommand(f"expected {what}")
        return value

    def nstring(self, what: str = "a string") -> bytes | None:
        if self._nil():
            return None
        return self.string(what)

    def nil(self) -> bool:
        """Consume C{NIL} if it is next."""
        return self._nil()

    def _nil(self) -> bool:
        self._normalize()
        text = self._text()
        if text is None:
            return False
        word = text[self._pos : self._pos + 3]
        after = text[self._pos + 3 : self._pos + 4]
        if word.upper() == b"NIL" and after in (b"", b" ", b")"):
            self._pos += 3
            return True
        return False

    def list_mailbox(self) -> bytes:
        """A LIST pattern: an astring that may hold C{%} and C{*} unquoted."""
        following = self.peek()
        if following == -1 or following == ord('"'):
            return self.string("a mailbox pattern")
        value = self.run(_LIST_CHARS)
        if not value:
            raise BadCommand("expected a mailbox pattern")
        return value

    def sequence_set(self) -> "SequenceSet":
        return SequenceSet.parse(self.run(_SEQUENCE_CHARS))

    def flag(self) -> str:
        """C{\\Seen}, C{$Forwarded}, ...: a flag as text."""
        if self.take(b"\\"):
            if self.take(b"*"):
                return "\\*"
            return "\\" + self.atom("a flag").decode("ascii")
        return self.atom("a flag").decode("ascii")

    def flag_list(self, parenthesised_only: bool = True) -> list[str]:
        """C{(\\Seen \\Flagged)}; STORE also takes the flags without parentheses."""
        if not self.take(b"("):
            if parenthesised_only:
                raise BadCommand("expected a flag list")
            flags = [self.flag()]
            while self.take(b" "):
                flags.append(self.flag())
            return flags
        flags = []
        if self.take(b")"):
            return flags
        while True:
            flags.append(self.flag())
            if self.take(b")"):
                return flags
            self.space()

    def string_list(self) -> list[bytes]:
        """C{(astring SP astring ...)}, for HEADER.FIELDS."""
        self.expect(b"(")
        values = [self.astring("a header field name")]
        while not self.take(b")"):
            self.space()
            values.append(self.astring("a header field name"))
        return values


@dataclass(frozen=True)
class SequenceSet:
    """
    RFC 3501 9 sequence-set: ranges of message numbers or UIDs, C{None}
    standing for C{*} (the largest in use).
    """

    ranges: tuple[tuple[int | None, int | None], ...]

    @classmethod
    def parse(cls, text: bytes) -> "SequenceSet":
        if not text:
            raise BadCommand("expected a sequence set")
        ranges = []
        for item in text.split(b","):
            low, colon, high = item.partition(b":")
            first = cls._number(low)
            last = cls._number(high) if colon else first
            ranges.append((first, last))
        return cls(tuple(ranges))

    @staticmethod
    def _number(text: bytes) -> int | None:
        if text == b"*":
            return None
        if not text.isdigit() or len(text) > 10 or text.startswith(b"0"):
            raise BadCommand("invalid sequence set")
        value = int(text)
        if value >= 2**32:
            raise BadCommand("invalid sequence set")
        return value

    def bounds(self, largest: int) -> Iterator[tuple[int, int]]:
        """The ranges as C{(low, high)} with C{*} replaced by C{largest}."""
        for first, last in self.ranges:
            low = largest if first is None else first
            high = largest if last is None else last
            if low > high:
                low, high = high, low
            yield low, high

    def contains(self, value: int, largest: int) -> bool:
        return any(low <= value <= high for low, high in self.bounds(largest))

    def highest(self, largest: int) -> int:
        return max(high for _, high in self.bounds(largest))


def format_set(values: Sequence[int]) -> bytes:
    """C{1,3:5,9} for the (ascending) numbers C{values}, as in COPYUID."""
    out: list[str] = []
    index = 0
    while index < len(values):
        start = index
        while index + 1 < len(values) and values[index + 1] == values[index] + 1:
            index += 1
        if start == index:
            out.append(str(values[start]))
        else:
            out.append(f"{values[start]}:{values[index]}")
        index += 1
    return ",".join(out).encode("ascii")


def format_list_set(values: Sequence[int]) -> bytes:
    """Like L{format_set} but in the order given (COPYUID pairs UIDs by position)."""
    return ",".join(str(value) for value in values).encode("ascii")


_QUOTABLE = re.compile(rb"[\x20-\x7e]*\Z")


def string(value: bytes | str) -> bytes:
    """
    C{value} as an IMAP string: quoted when it is printable 7-bit text,
    a literal otherwise (8-bit header values, line breaks), so that
    nothing a message contains can break a response's syntax.
    """
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    if _QUOTABLE.match(value):
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n%s" % (len(value), value)


def nstring(value: bytes | str | None) -> bytes:
    return b"NIL" if value is None else string(value)


def astring(value: bytes) -> bytes:
    """An atom when C{value} is one (mailbox names in LIST), else a string."""
    if value and all(byte in _ASTRING for byte in value) and value.upper() != b"NIL":
        return value
    return string(value)


def flag_list(flags: Sequence[str] | frozenset[str]) -> bytes:
    order = ["\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\Recent"]
    ranked = sorted(
        flags, key=lambda f: (order.index(f) if f in order else len(order), f)
    )
    return b"(" + " ".join(ranked).encode("ascii") + b")"


_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
_DATE_TIME = re.compile(
    rb" ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)\Z"
)
_DATE = re.compile(rb"(\d{1,2})-([A-Za-z]{3})-(\d{4})\Z")


def format_date_time(timestamp: float) -> bytes:
    """RFC 3501 date-time (INTERNALDATE), in UTC: C{"17-Jul-1996 09:44:25 +0000"}."""
    t = time.gmtime(timestamp)
    return (
        f'"{t.tm_mday:02d}-{_MONTHS[t.tm_mon - 1]}-{t.tm_year:04d} '
        f'{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"'
    ).encode("ascii")


def _month(name: bytes) -> int:
    try:
        return _MONTHS.index(name.decode("ascii").capitalize()) + 1
    except ValueError:
        raise BadCommand("invalid month in date") from None


def parse_date_time(value: bytes) -> float:
    """RFC 3501 date-time (APPEND) as a POSIX time."""
    match = _DATE_TIME.match(value)
    if not match:
        raise BadCommand("invalid date-time")
    day, month, year, hour, minute, second, sign, zh, zm = match.groups()
    try:
        stamp = calendar.timegm(
            (int(year), _month(month), int(day), int(hour), int(minute), int(second))
        )
        time.gmtime(stamp)
    except (ValueError, OverflowError):
        raise BadCommand("invalid date-time") from None
    if not (
        1 <= int(day) <= 31 and int(hour) < 24 and int(minute) < 60 and int(second) < 61
    ):
        raise BadCommand("invalid date-time")
    offset = (int(zh) * 60 + int(zm)) * 60
    return stamp - offset if sign == b"+" else stamp + offset


def parse_date(value: bytes) -> tuple[int, int, int]:
    """RFC 3501 date (SEARCH SINCE ...) as C{(year, month, day)}."""
    match = _DATE.match(value)
    if not match:
        raise BadCommand("invalid date")
    day, month, year = match.groups()
    result = (int(year), _month(month), int(day))
    if not 1 <= result[2] <= 31:
        raise BadCommand("invalid date")
    return result

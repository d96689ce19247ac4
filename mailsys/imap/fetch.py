"""
FETCH (RFC 3501 6.4.5, 7.4.2): parsing the data items a client asks for,
and building the response for one message from the store.

Building is blocking (it reads message files) and runs in the thread pool,
a batch of messages at a time.  Each item is served from the cheapest
source that answers it: FLAGS, UID, RFC822.SIZE and INTERNALDATE from the
folder's scan, header items and ENVELOPE from the store's cached header
block, and only BODY[...], BODYSTRUCTURE and friends from the whole
message, which the session keeps parsed (L{MessageCache}) for the next
partial fetch.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from mailsys.imap import syntax
from mailsys.imap.message import ParsedMessage, envelope, header_fields, to_crlf
from mailsys.imap.syntax import Arguments, BadCommand

_NAME_CHARS = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789."
)
_SECTION_CHARS = _NAME_CHARS
_SECTION_TEXTS = ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME")

# What an item needs from the store.
FLAGS, HEADERS, MESSAGE = 0, 1, 2


@dataclass(frozen=True)
class FetchItem:
    """
    One data item.  For C{BODY[...]} items, C{numbers} / C{text} / C{fields}
    are the section and C{partial} the C{<origin.length>}.
    """

    name: str
    peek: bool = True
    numbers: tuple[int, ...] = ()
    text: str = ""
    fields: tuple[bytes, ...] = ()
    partial: tuple[int, int] | None = None
    section: bool = False

    @property
    def sets_seen(self) -> bool:
        """RFC 3501 6.4.5: BODY[...] (not .PEEK), RFC822 and RFC822.TEXT set \\Seen."""
        return not self.peek

    @property
    def needs(self) -> int:
        if self.name in ("FLAGS", "UID", "RFC822.SIZE", "INTERNALDATE"):
            return FLAGS
        if self.name in ("ENVELOPE", "RFC822.HEADER"):
            return HEADERS
        if self.section and not self.numbers and self.text.startswith("HEADER"):
            return HEADERS
        return MESSAGE

    def label(self) -> bytes:
        """How the item is named in the response."""
        if not self.section:
            return self.name.encode("ascii")
        spec = ".".join(str(n) for n in self.numbers)
        if self.text:
            spec = f"{spec}.{self.text}" if spec else self.text
        label = b"BODY[" + spec.encode("ascii")
        if self.fields:
            label += b" (" + b" ".join(syntax.astring(f) for f in self.fields) + b")"
        label += b"]"
        if self.partial is not None:
            label += b"<%d>" % self.partial[0]
        return label


_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_SIMPLE = {
    "FLAGS",
    "UID",
    "RFC822.SIZE",
    "INTERNALDATE",
    "ENVELOPE",
    "BODYSTRUCTURE",
    "BODY",
    "RFC822",
    "RFC822.HEADER",
    "RFC822.TEXT",
}


def parse_items(args: Arguments) -> list[FetchItem]:
    """RFC 3501 9 fetch: a macro, one item, or a parenthesised list of items."""
    if args.take(b"("):
        items = [_item(args)]
        while not args.take(b")"):
            args.space()
            items.append(_item(args))
    else:
        name = args.run(_NAME_CHARS).decode("ascii").upper()
        if name in _MACROS:
            return [FetchItem(n) for n in _MACROS[name]]
        items = [_item(args, name)]
    return items


def _item(args: Arguments, name: str | None = None) -> FetchItem:
    if name is None:
        name = args.run(_NAME_CHARS).decode("ascii").upper()
    if not name:
        raise BadCommand("expected a fetch item")
    if name in ("BODY", "BODY.PEEK") and args.take(b"["):
        return _section(args, peek=name == "BODY.PEEK")
    if name in _SIMPLE:
        return FetchItem(name, peek=name not in ("RFC822", "RFC822.TEXT"))
    raise BadCommand(f"unknown fetch item {name[:40]}")


def _section(args: Arguments, peek: bool) -> FetchItem:
    spec = args.run(_SECTION_CHARS).decode("ascii").upper()
    numbers: list[int] = []
    words = spec.split(".") if spec else []
    while words and words[0].isdigit():
        number = words.pop(0)
        if number.startswith("0") or len(number) > 9:
            raise BadCommand("invalid section part number")
        numbers.append(int(number))
    text = ".".join(words)
    if text and text not in _SECTION_TEXTS:
        raise BadCommand("invalid section")
    if text == "MIME" and not numbers:
        raise BadCommand("MIME needs a part number")
    if spec.endswith(".") or (spec and not text and not numbers):
        raise BadCommand("invalid section")
    fields: list[bytes] = []
    if text.startswith("HEADER.FIELDS"):
        args.space()
        fields = args.string_list()
    args.expect(b"]")
    partial = None
    if args.take(b"<"):
        origin = args.number("a partial origin")
        args.expect(b".")
        length = args.number("a partial length")
        args.expect(b">")
        if length == 0:
            raise BadCommand("partial length must not be zero")
        partial = (origin, length)
    return FetchItem(
        "BODY",
        peek=peek,
        numbers=tuple(numbers),
        text=text,
        fields=tuple(fields),
        partial=partial,
        section=True,
    )


class MessageCache:
    """
    The last few messages a session read whole, parsed: a client reading a
    large message in pieces (Thunderbird's C{BODY[]<0.65536>}, then the next
    64 KiB...) costs one read and one parse, not one per piece.
    """

    def __init__(self, size: int = 2) -> None:
        self._size = size
        self._messages: OrderedDict[tuple[Any, ...], ParsedMessage] = OrderedDict()

    def get(self, folder: Any, info: Any) -> ParsedMessage:
        """The parsed message; raises C{MessageGone} like the store."""
        key = (str(folder.path), folder.uidvalidity, info.uid, info.key)
        parsed = self._messages.get(key)
        if parsed is not None:
            self._messages.move_to_end(key)
            return parsed
        with folder.open(info) as source:
            data = to_crlf(source.read())
        parsed = ParsedMessage(data)
        self._messages[key] = parsed
        while len(self._messages) > self._size:
            self._messages.popitem(last=False)
        return parsed

    def clear(self) -> None:
        self._messages.clear()


def _header_block(folder: Any, info: Any) -> bytes:
    block = to_crlf(folder.headers(info))
    if not block.endswith(b"\r\n"):
        block += b"\r\n"
    if not block.endswith(b"\r\n\r\n") and block != b"\r\n":
        block += b"\r\n"
    return block


def _partial(data: bytes, partial: tuple[int, int] | None) -> bytes:
    if partial is None:
        return data
    origin, length = partial
    return data[origin : origin + length]


def _literal(data: bytes) -> bytes:
    return b"{%d}\r\n%s" % (len(data), data)


def fetch_one(
    folder: Any,
    info: Any,
    flags: frozenset[str],
    items: list[FetchItem],
    cache: MessageCache,
) -> bytes:
    """
    Blocking.  The parenthesised data of one FETCH response (without
    C{* n FETCH}), in the order the items were asked for.

    @param flags: the flags to report, \\Recent included.
    @raise MessageGone: if the message was expunged by another session.
    """
    out: list[bytes] = []
    header_block: bytes | None = None
    parsed: ParsedMessage | None = None
    for item in items:
        label = item.label()
        if item.name == "UID":
            value = b"%d" % info.uid
        elif item.name == "FLAGS":
            value = syntax.flag_list(flags)
        elif item.name == "RFC822.SIZE":
            value = b"%d" % info.crlf_size
        elif item.name == "INTERNALDATE":
            value = syntax.format_date_time(info.internal_date)
        elif item.needs == HEADERS:
            if header_block is None:
                header_block = _header_block(folder, info)
            if item.name == "ENVELOPE":
                value = envelope(header_block)
            elif item.name == "RFC822.HEADER":
                value = _literal(header_block)
            elif item.text == "HEADER":
                value = _literal(_partial(header_block, item.partial))
            else:
                exclude = item.text == "HEADER.FIELDS.NOT"
                selected = header_fields(header_block, list(item.fields), exclude)
                value = _literal(_partial(selected, item.partial))
        else:
            if parsed is None:
                parsed = cache.get(folder, info)
            if item.name == "BODYSTRUCTURE":
                value = parsed.bodystructure(extended=True)
            elif item.name == "BODY" and not item.section:
                value = parsed.bodystructure(extended=False)
            elif item.name == "RFC822":
                value = _literal(parsed.data)
            elif item.name == "RFC822.TEXT":
                value = _literal(parsed.section([], "TEXT"))
            else:
                data = parsed.section(list(item.numbers), item.text, list(item.fields))
                value = _literal(_partial(data, item.partial))
        out.append(label + b" " + value)
    return b"(" + b" ".join(out) + b")"

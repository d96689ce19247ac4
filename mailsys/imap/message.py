"""
One message as IMAP sees it: its bytes with CRLF line endings, its MIME
tree with the offset of every part, and from those the FETCH answers that
need structure: BODY[section], ENVELOPE and BODYSTRUCTURE.

The MIME tree is cut by hand on the bytes (boundaries, the blank line after
each header) so that every section is an exact slice of what BODY[] sends;
the stdlib C{email} package parses the header fields (content types and
their parameters, RFC 2231, addresses).  Mail is hostile input: 8-bit
headers, missing or lying boundaries, a content type without a subtype,
parts nested thousands deep.  Nothing here raises on such a message: it
answers with what can be told (Dovecot's habit) and falls back to
C{text/plain}.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

from mailsys.imap import syntax

# Deeper nesting than this is served as an opaque leaf (it is never
# legitimate, and recursion must stay bounded).
MAX_DEPTH = 40
# More parts than this in one message are not split further.
MAX_PARTS = 5000

_header_parser = BytesHeaderParser(policy=compat32)
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")


def to_crlf(data: bytes) -> bytes:
    """
    The wire form of a stored message: every bare LF as CRLF, a CRLF
    already in the file (written by another program) kept as it is.  The
    store counts C{crlf_size} the same way, so RFC822.SIZE equals the length
    of BODY[].
    """
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@dataclass
class HeaderField:
    """One header field as it was written: name, and the raw lines (folded)."""

    name: bytes
    raw: bytes  # the whole field including its CRLFs

    @property
    def value(self) -> bytes:
        """The unfolded value, without the name, surrounding space or line ends."""
        _, _, value = self.raw.partition(b":")
        return re.sub(rb"\r?\n(?=[ \t])", b"", value).strip(b" \t\r\n")


def split_header(block: bytes) -> list[HeaderField]:
    """
    The fields of a header block (CRLF endings).  A line that is neither a
    field nor a continuation (broken mail) is kept with the field before
    it, so HEADER.FIELDS.NOT never loses or invents bytes.
    """
    fields: list[HeaderField] = []
    for line in block.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") or b":" not in line:
            if fields:
                fields[-1].raw += line
            continue
        name = line.split(b":", 1)[0].rstrip(b" \t")
        fields.append(HeaderField(name, line))
    return fields


def header_fields(block: bytes, names: list[bytes], exclude: bool) -> bytes:
    """RFC 3501 6.4.5 HEADER.FIELDS (or .NOT): the chosen fields then a blank line."""
    wanted = {name.lower() for name in names}
    chosen = [
        f.raw if f.raw.endswith(b"\n") else f.raw + b"\r\n"
        for f in split_header(block)
        if (f.name.lower() in wanted) != exclude
    ]
    return b"".join(chosen) + b"\r\n"


def header_value(fields: list[HeaderField], name: bytes) -> bytes | None:
    for f in fields:
        if f.name.lower() == name:
            return f.value
    return None


@dataclass
class Part:
    """
    One MIME entity of a message in its CRLF bytes: C{data[start:body]} is
    its header (with the blank line), C{data[body:end]} its body.
    """

    start: int
    body: int
    end: int
    header: Message
    children: list["Part"] = field(default_factory=list)
    encapsulated: "Part | None" = None  # the message inside a message/rfc822

    @property
    def content_type(self) -> tuple[str, str]:
        try:
            full = self.header.get_content_type()
        except Exception:
            full = "text/plain"
        maintype, _, subtype = full.partition("/")
        if not maintype or not subtype:
            return ("text", "plain")
        return maintype, subtype


class ParsedMessage:
    """
    A message's wire bytes and MIME tree, parsed once and kept by the
    session (see L{MessageCache}) so that a client reading a large message
    in 64 KiB pieces does not make us parse it again for each piece.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._parts = 0
        self._root: Part | None = None

    @property
    def root(self) -> Part:
        """The MIME tree, parsed on first use (BODY[] alone never needs it)."""
        if self._root is None:
            self._root = self._parse(0, len(self.data), 0, "text/plain")
        return self._root

    # -- parsing ------------------------------------------------------------

    def _parse(self, start: int, end: int, depth: int, default_type: str) -> Part:
        data = self.data
        self._parts += 1
        if data.startswith(b"\r\n", start) or start >= end:
            header_end = min(start + 2, end) if start < end else start
            header_bytes = b""
        else:
            blank = data.find(b"\r\n\r\n", start, end)
            header_end = end if blank < 0 else blank + 4
            header_bytes = data[start:header_end]
        try:
            header = _header_parser.parsebytes(header_bytes)
        except Exception:
            header = Message()
        if default_type != "text/plain":
            header.set_default_type(default_type)
        part = Part(start, header_end, end, header)
        if depth >= MAX_DEPTH or self._parts >= MAX_PARTS:
            return part
        maintype, subtype = part.content_type
        if maintype == "multipart":
            boundary = _boundary(header)
            if boundary:
                child_type = "message/rfc822" if subtype == "digest" else "text/plain"
                for child_start, child_end in self._split(boundary, header_end, end):
                    part.children.append(
                        self._parse(child_start, child_end, depth + 1, child_type)
                    )
                    if self._parts >= MAX_PARTS:
                        break
        elif (maintype, subtype) in (("message", "rfc822"), ("message", "global")):
            encoding = _encoding(header)
            if encoding in ("7BIT", "8BIT", "BINARY"):
                part.encapsulated = self._parse(
                    header_end, end, depth + 1, "text/plain"
                )
        return part

    def _split(self, boundary: bytes, start: int, end: int) -> list[tuple[int, int]]:
        """RFC 2046 5.1.1: the body parts between C{--boundary} lines."""
        data = self.data
        delimiter = b"--" + boundary
        bounds: list[tuple[int, int]] = []
        current: int | None = None
        pos = start
        while pos < end:
            found = data.find(delimiter, pos, end)
            if found < 0:
                break
            line_end = data.find(b"\r\n", found, end)
            if line_end < 0:
                line_end = end
            pos = line_end + 2
            if found != start and data[found - 2 : found] != b"\r\n":
                continue  # not at the start of a line
            rest = data[found + len(delimiter) : line_end]
            closing = rest.startswith(b"--")
            if closing:
                rest = rest[2:]
            if rest.strip(b" \t"):
                continue  # a longer boundary that starts like ours
            # The CRLF before a delimiter belongs to the delimiter.
            content_end = found - 2 if found - 2 >= start else found
            if current is not None:
                bounds.append((current, max(content_end, current)))
            if closing:
                return bounds
            current = min(line_end + 2, end)
        if current is not None:
            bounds.append((current, end))
        return bounds

    # -- sections -----------------------------------------------------------

    def part(self, numbers: list[int]) -> Part | None:
        """
        RFC 3501 6.4.5 part addressing: C{[2, 1]} is the first part of the
        second part; the body of a single-part message is part 1; the parts
        of an encapsulated message/rfc822 are numbered under it.
        """
        context = self.root
        for position, number in enumerate(numbers):
            if context.children:
                if not 1 <= number <= len(context.children):
                    return None
                chosen = context.children[number - 1]
            elif number == 1:
                chosen = context
            else:
                return None
            if position == len(numbers) - 1:
                return chosen
            if chosen.encapsulated is not None:
                context = chosen.encapsulated
            elif chosen.children and chosen is not context:
                context = chosen
            else:
                return None
        return context

    def header_block(self, part: Part) -> bytes:
        """The header of C{part} ending in its blank line, added if missing."""
        block = self.data[part.start : part.body]
        if not block.endswith(b"\r\n"):
            block += b"\r\n"
        if not block.endswith(b"\r\n\r\n") and block != b"\r\n":
            block += b"\r\n"
        return block

    def section(
        self, numbers: list[int], text: str, fields: list[bytes] | None = None
    ) -> bytes:
        """
        The bytes of BODY[<numbers>.<text>]: C{text} is C{""}, C{HEADER},
        C{HEADER.FIELDS}, C{HEADER.FIELDS.NOT}, C{TEXT} or C{MIME}.  A
        section that does not exist is empty.
        """
        if not numbers and not text:
            return self.data
        target = self.root if not numbers else self.part(numbers)
        if target is None:
            return b""
        if text == "MIME":
            if not numbers:
                return b""
            return self.header_block(target)
        if numbers and text:
            # HEADER and TEXT of a part apply to the message it encapsulates.
            if target.encapsulated is None:
                return b""
            target = target.encapsulated
        if text == "":
            return self.data[target.body : target.end]
        if text == "TEXT":
            return self.data[target.body : target.end]
        block = self.header_block(target)
        if text == "HEADER":
            return block
        return header_fields(block, fields or [], exclude=text == "HEADER.FIELDS.NOT")

    # -- structure ----------------------------------------------------------

    def envelope(self) -> bytes:
        return envelope(self.header_block(self.root))

    def bodystructure(self, extended: bool) -> bytes:
        return self._structure(self.root, extended)

    def _structure(self, part: Part, extended: bool) -> bytes:
        header = part.header
        maintype, subtype = part.content_type
        if maintype == "multipart" and part.children:
            out = b"(" + b"".join(self._structure(c, extended) for c in part.children)
            out += b" " + syntax.string(subtype)
            if extended:
                out += b" " + _params(header, maintype)
                out += b" " + _disposition(header)
                out += b" " + _language(header)
                out += b" " + syntax.nstring(_raw(header, "content-location"))
            return out + b")"
        if maintype == "multipart":
            # A multipart without usable boundaries: served as one text part.
            maintype, subtype = "text", "plain"
        body = self.data[part.body : part.end]
        fields = [
            syntax.string(maintype),
            syntax.string(subtype),
            _params(header, maintype),
            syntax.nstring(_raw(header, "content-id")),
            syntax.nstring(_raw(header, "content-description")),
            syntax.string(_encoding(header)),
            b"%d" % len(body),
        ]
        if part.encapsulated is not None:
            inner = part.encapsulated
            fields.append(envelope(self.header_block(inner)))
            fields.append(self._structure(inner, extended))
            fields.append(b"%d" % _lines(body))
        elif maintype == "text":
            fields.append(b"%d" % _lines(body))
        if extended:
            fields.append(syntax.nstring(_raw(header, "content-md5")))
            fields.append(_disposition(header))
            fields.append(_language(header))
            fields.append(syntax.nstring(_raw(header, "content-location")))
        return b"(" + b" ".join(fields) + b")"


def _lines(body: bytes) -> int:
    """RFC 3501 body-fld-lines: a last line without its CRLF (the CRLF
    before a boundary belongs to the boundary) still counts."""
    return body.count(b"\n") + (1 if body and not body.endswith(b"\n") else 0)


def _raw(header: Message, name: str) -> bytes | None:
    """A header value as the bytes that were sent (8-bit kept), unfolded."""
    try:
        value = header.get(name)
    except Exception:
        return None
    if value is None:
        return None
    text = str(value)
    text = re.sub(r"\r?\n(?=[ \t])", "", text).strip()
    return text.encode("utf-8", "surrogateescape")


def _encoding(header: Message) -> str:
    value = _raw(header, "content-transfer-encoding")
    if not value:
        return "7BIT"
    token = value.split(b";")[0].strip().decode("ascii", "replace").upper()
    return token or "7BIT"


def _boundary(header: Message) -> bytes | None:
    try:
        value = header.get_param("boundary")
    except Exception:
        return None
    if value is None:
        return None
    value = email.utils.collapse_rfc2231_value(value)
    if isinstance(value, str):
        value = email.utils.unquote(value)
    raw = str(value).encode("utf-8", "surrogateescape")
    if not 0 < len(raw) <= 200 or b"\r" in raw or b"\n" in raw:
        return None
    return raw


def _param_pairs(header: Message, name: str) -> list[tuple[str, str]] | None:
    """The C{name=value} parameters of header C{name}, RFC 2231 collapsed."""
    try:
        if name not in header:
            return None
        params = header.get_params(header=name)
    except Exception:
        return []
    if not params:
        return []
    pairs = []
    for key, value in params[1:]:
        if not key:
            continue
        try:
            value = email.utils.collapse_rfc2231_value(value)
        except Exception:
            value = ""
        pairs.append((key.lower(), str(value)))
    return pairs


def _plist(pairs: list[tuple[str, str]]) -> bytes:
    if not pairs:
        return b"NIL"
    items = []
    for key, value in pairs:
        items.append(syntax.string(key))
        items.append(syntax.string(value))
    return b"(" + b" ".join(items) + b")"


def _params(header: Message, maintype: str) -> bytes:
    pairs = _param_pairs(header, "content-type") or []
    if maintype == "text" and not any(key == "charset" for key, _ in pairs):
        pairs = [("charset", "us-ascii")] + pairs
    return _plist(pairs)


def _disposition(header: Message) -> bytes:
    value = _raw(header, "content-disposition")
    if not value:
        return b"NIL"
    kind = value.split(b";")[0].strip()
    if not kind:
        return b"NIL"
    return (
        b"("
        + syntax.string(kind)
        + b" "
        + _plist(_param_pairs(header, "content-disposition") or [])
        + b")"
    )


def _language(header: Message) -> bytes:
    value = _raw(header, "content-language")
    if not value:
        return b"NIL"
    tags = [t.strip() for t in value.split(b",") if t.strip()]
    if not tags:
        return b"NIL"
    if len(tags) == 1:
        return syntax.string(tags[0])
    return b"(" + b" ".join(syntax.string(t) for t in tags) + b")"


# -- ENVELOPE -----------------------------------------------------------------


def envelope(header_block: bytes) -> bytes:
    """
    RFC 3501 7.4.2 ENVELOPE from a header block: values as sent (still
    RFC 2047-encoded, 8-bit passed through as literals), Sender and
    Reply-To defaulting to From.
    """
    fields = split_header(header_block)

    def value(name: bytes) -> bytes | None:
        return header_value(fields, name)

    sender_from = _addresses(value(b"from"))
    sender = _addresses(value(b"sender")) or sender_from
    reply_to = _addresses(value(b"reply-to")) or sender_from
    items = [
        syntax.nstring(value(b"date")),
        syntax.nstring(value(b"subject")),
        _address_list(sender_from),
        _address_list(sender),
        _address_list(reply_to),
        _address_list(_addresses(value(b"to"))),
        _address_list(_addresses(value(b"cc"))),
        _address_list(_addresses(value(b"bcc"))),
        syntax.nstring(value(b"in-reply-to")),
        syntax.nstring(value(b"message-id")),
    ]
    return b"(" + b" ".join(items) + b")"


def _addresses(raw: bytes | None) -> list[tuple[bytes, bytes, bytes]]:
    """C{(name, mailbox, host)} for each address in a header value."""
    if not raw:
        return []
    text = raw.decode("utf-8", "surrogateescape")
    try:
        pairs = email.utils.getaddresses([text])
    except Exception:
        return []
    found = []
    for name, address in pairs:
        if not name and not address:
            continue
        mailbox, at, host = address.rpartition("@")
        if not at:
            mailbox, host = address, ""
        found.append(
            tuple(s.encode("utf-8", "surrogateescape") for s in (name, mailbox, host))
        )
    return found  # type: ignore[return-value]


def _address_list(addresses: list[tuple[bytes, bytes, bytes]]) -> bytes:
    if not addresses:
        return b"NIL"
    return (
        b"("
        + b"".join(
            b"("
            + b" ".join(
                [
                    syntax.nstring(name or None),
                    b"NIL",
                    syntax.nstring(mailbox),
                    syntax.nstring(host or None),
                ]
            )
            + b")"
            for name, mailbox, host in addresses
        )
        + b")"
    )

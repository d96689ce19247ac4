"""
Modified UTF-7 (RFC 3501 5.1.3), the encoding of mailbox names on the wire.

The store keeps folder names as UTF-8 text (as Dovecot's UTF-8 layout
does); clients that have not enabled UTF8=ACCEPT send and expect modified
UTF-7.  The conversion happens only at the protocol edge, here.

Twisted ships a codec for this, but it accepts anything (an unterminated
C{&}, raw 8-bit bytes, base64 of plain ASCII), so a hostile or confused
client could make two different wire names mean one folder.  This decoder
is strict and says what is wrong in one line.
"""

from __future__ import annotations

import base64
import binascii


class NameEncodingError(ValueError):
    """A mailbox name that is not valid modified UTF-7."""


def _printable(char: str) -> bool:
    return 0x20 <= ord(char) <= 0x7E


def encode(name: str) -> bytes:
    """C{name} in modified UTF-7: printable ASCII as is, C{&} as C{&-},
    everything else as C{&<modified base64 of UTF-16BE>-}."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be", "surrogatepass")
            encoded = base64.b64encode(raw).decode("ascii").rstrip("=")
            out.append("&" + encoded.replace("/", ",") + "-")
            pending.clear()

    for char in name:
        if _printable(char):
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out).encode("ascii")


def decode(name: bytes) -> str:
    """
    The text of wire name C{name}.

    @raise NameEncodingError: for 8-bit or control bytes, an unterminated
        or malformed C{&...-} sequence, or one that encodes printable
        ASCII (which must be sent as itself).
    """
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        raise NameEncodingError(
            "mailbox name is not 7-bit (use modified UTF-7)"
        ) from None
    out: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if not _printable(char):
            raise NameEncodingError("control character in mailbox name")
        if char != "&":
            out.append(char)
            index += 1
            continue
        end = text.find("-", index + 1)
        if end < 0:
            raise NameEncodingError("unterminated &-sequence in mailbox name")
        chunk = text[index + 1 : end]
        index = end + 1
        if not chunk:
            out.append("&")
            continue
        if "=" in chunk or "/" in chunk:
            raise NameEncodingError("malformed &-sequence in mailbox name")
        padded = chunk.replace(",", "/") + "=" * (-len(chunk) % 4)
        try:
            raw = base64.b64decode(padded, validate=True)
            decoded = raw.decode("utf-16-be")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise NameEncodingError("malformed &-sequence in mailbox name") from None
        if not decoded or any(_printable(c) for c in decoded):
            raise NameEncodingError("&-sequence encodes plain ASCII in mailbox name")
        out.append(decoded)
    return "".join(out)

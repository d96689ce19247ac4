"""
Mail addresses: parsing SMTP paths and configured addresses into one
normalised form.

Every address that reaches the core (an SMTP MAIL FROM or RCPT TO, a user
name from the command line, an alias from the configuration) goes through
this module, so that the rest of the system compares addresses as plain,
already-validated values and never builds a file name from raw input.

Local parts are compared case-insensitively (as Postfix local delivery
does) and domains are lower-case ASCII (IDNA A-labels).  Arbitrary RFC 5321
local parts, quoted ones included, are I{parsed}; only the small set that
L{is_safe_mailbox_name} accepts can ever name a user's maildir.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import idna

from mailsys import limits


class AddressError(ValueError):
    """
    An address that cannot be used.  C{str(error)} is a short reason such as
    C{"local part too long"}, safe to put in an SMTP reply: it never echoes
    the hostile input.
    """


# RFC 5321 4.1.2: Dot-string = Atom *("." Atom), Atom = 1*atext (RFC 5322 3.2.3).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*", re.ASCII)

# RFC 5321 4.1.2: sub-domain = Let-dig [Ldh-str].
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?", re.ASCII)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# RFC 1035 2.3.4: a label is at most 63 octets.
_LABEL_LENGTH = 63

# Only these local parts can be directory names under <mail_dir>/<domain>/.
_SAFE_MAILBOX_NAME = re.compile(r"[a-z0-9._+-]{1,%d}" % limits.LOCAL_PART, re.ASCII)


@dataclass(frozen=True, order=True)
class MailAddress:
    """
    A validated, normalised address.

    @ivar local: the local part, unquoted and lower-cased.
    @ivar domain: a lower-case ASCII domain (IDNA A-labels), or an address
        literal such as C{"[192.0.2.1]"} kept as given.
    """

    local: str
    domain: str

    def __str__(self) -> str:
        """The address as it goes on the wire, re-quoted when it must be."""
        return f"{_quote_local(self.local)}@{self.domain}"

    @property
    def is_literal(self) -> bool:
        """Whether the domain is an address literal such as C{[192.0.2.1]}."""
        return self.domain.startswith("[")


def parse_path(text: str | bytes) -> MailAddress | None:
    """
    Parse what a client put in C{MAIL FROM:<...>} or C{RCPT TO:<...>}.

    The angle brackets may be included or already removed.  The null
    reverse path (C{""} or C{"<>"}) gives C{None}.  A source route
    (C{"@a,@b:user@dom"}) is accepted and discarded (RFC 5321 4.1.1.3 and
    appendix C).  A quoted local part is unquoted, so C{'"bob@evil"@ours'}
    has the local part C{bob@evil}, which can never be a user.

    @raise AddressError: for anything that is not a valid path.
    """
    text = _as_text(text)
    _check_characters(text)
    if text.startswith("<") or text.endswith(">"):
        if not (len(text) >= 2 and text.startswith("<") and text.endswith(">")):
            raise AddressError("unbalanced angle brackets")
        text = text[1:-1]
    if text == "":
        return None
    _check_length(text)
    if text.startswith("@") and ":" in text:
        text = _strip_source_route(text)
    return _parse_mailbox(text)


def parse_address(text: str | bytes) -> MailAddress:
    """
    Parse a plain C{local@domain} from the configuration or the command
    line, with the same rules as L{parse_path} but no brackets, source
    routes or null path.

    @raise AddressError: for anything that is not a valid address.
    """
    text = _as_text(text)
    if text == "":
        raise AddressError("empty address")
    _check_characters(text)
    _check_length(text)
    return _parse_mailbox(text)


def is_safe_mailbox_name(local: str) -> bool:
    """
    Whether C{local} may be a user's name, and so the name of a directory
    under C{<mail_dir>/<domain>/}: only C{[a-z0-9._+-]}, 1 to 64 characters,
    not starting with C{.} (Maildir++ folders and C{..} start that way) and
    without C{..}.  Everything else parses but can never match a user,
    which keeps C{../}, C{%}-hacks and quoted tricks out of the file system.
    """
    return (
        _SAFE_MAILBOX_NAME.fullmatch(local) is not None
        and not local.startswith(".")
        and ".." not in local
    )


def normalize_domain(domain: str) -> str:
    """
    The canonical form of a domain: lower-case, IDNA A-labels, without one
    trailing dot.  An address literal is validated and returned as given.

    @raise AddressError: when it is not a valid domain.
    """
    if domain.startswith("["):
        return _check_address_literal(domain)
    if domain.endswith("."):
        domain = domain[:-1]
    if domain == "":
        raise AddressError("empty domain")
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except UnicodeError:  # idna.IDNAError is a UnicodeError
            raise AddressError("invalid international domain name") from None
    domain = domain.lower()
    if len(domain) > limits.DOMAIN:  # RFC 5321 4.5.3.1.2
        raise AddressError("domain too long")
    labels = domain.split(".")
    for label in labels:
        if label == "":
            raise AddressError("empty label in domain")
        if len(label) > _LABEL_LENGTH:
            raise AddressError("domain label too long")
        if _LABEL.fullmatch(label) is None:
            raise AddressError("invalid domain")
    if labels[-1].isdigit():
        raise AddressError("numeric domain: write an address literal like [192.0.2.1]")
    return domain


def _as_text(text: str | bytes) -> str:
    """Decode bytes as UTF-8; refuse text that could not have come from UTF-8."""
    if isinstance(text, bytes):
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError:
            raise AddressError("address is not valid UTF-8") from None
    if not isinstance(text, str):
        raise AddressError("address is not text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from surrogateescape
        raise AddressError("address is not valid UTF-8") from None
    return text


def _check_characters(text: str) -> None:
    """
    Refuse control characters anywhere: RFC 5321 4.1.2 allows them neither
    in atext nor in qtextSMTP, and CR or LF would let a client inject lines.
    """
    if _CONTROL.search(text):
        raise AddressError("control character in address")


def _check_length(mailbox: str) -> None:
    """
    RFC 5321 4.5.3.1.3: a path is at most 256 octets including C{<} and
    C{>}.  Checked before parsing, so a huge input costs nothing more.
    """
    if len(mailbox.encode("utf-8")) + 2 > limits.PATH:
        raise AddressError("address too long")


def _strip_source_route(text: str) -> str:
    """
    Remove an A-d-l (C{"@a,@b:"}) in front of a mailbox: RFC 5321 4.1.1.3
    says servers SHOULD accept and ignore it (appendix C).
    """
    i = 0
    while True:
        if text[i : i + 1] != "@":
            raise AddressError("invalid source route")
        i += 1
        if text[i : i + 1] == "[":
            end = text.find("]", i) + 1
            if end == 0:
                raise AddressError("invalid source route")
        else:
            end = i
            while end < len(text) and text[end] not in ",:":
                end += 1
        try:
            normalize_domain(text[i:end])
        except AddressError:
            raise AddressError("invalid source route") from None
        i = end
        separator = text[i : i + 1]
        i += 1
        if separator == ":":
            return text[i:]
        if separator != ",":
            raise AddressError("invalid source route")


def _parse_mailbox(text: str) -> MailAddress:
    """Parse C{Local-part "@" ( Domain / address-literal )} (RFC 5321 4.1.2)."""
    if text.startswith('"'):
        raw_local, local, domain = _split_quoted(text)
    else:
        raw_local, at, domain = text.partition("@")
        if not at:
            raise AddressError("missing '@'")
        if raw_local == "":
            raise AddressError("empty local part")
        if " " in raw_local:
            raise AddressError("space in address")
        if not raw_local.isascii():
            raise AddressError("non-ASCII local part (SMTPUTF8 is not supported)")
        if _DOT_STRING.fullmatch(raw_local) is None:
            raise AddressError("invalid local part")
        local = raw_local
    if local == "":
        raise AddressError("empty local part")
    # RFC 5321 4.5.3.1.1: the local part is at most 64 octets.
    if len(raw_local.encode("utf-8")) > limits.LOCAL_PART:
        raise AddressError("local part too long")
    if domain == "":
        raise AddressError("empty domain")
    if " " in domain:
        raise AddressError("space in address")
    address = MailAddress(local.lower(), normalize_domain(domain))
    _check_length(str(address))  # IDNA can make the domain longer
    return address


def _split_quoted(text: str) -> tuple[str, str, str]:
    """
    Split C{'"quoted local"@domain'} into the raw local part (with its
    quotes), the unquoted local part and the domain.
    """
    chars = []
    i = 1
    while True:
        if i >= len(text):
            raise AddressError("unterminated quoted local part")
        c = text[i]
        if c == "\\":  # RFC 5321 4.1.2: quoted-pairSMTP = %d92 %d32-126
            if i + 1 >= len(text):
                raise AddressError("unterminated quoted local part")
            c = text[i + 1]
            i += 2
        elif c == '"':
            i += 1
            break
        else:
            i += 1
        if not c.isascii():
            raise AddressError("non-ASCII local part (SMTPUTF8 is not supported)")
        chars.append(c)
    if text[i : i + 1] != "@":
        raise AddressError("missing '@' after quoted local part")
    return text[:i], "".join(chars), text[i + 1 :]


def _quote_local(local: str) -> str:
    """The local part as a Dot-string, or a Quoted-string when it is not one."""
    if _DOT_STRING.fullmatch(local) is not None:
        return local
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _check_address_literal(literal: str) -> str:
    """
    Validate an RFC 5321 4.1.3 address literal: C{[IPv4]} or C{[IPv6:...]};
    general (tagged) literals are not supported.
    """
    if not (literal.startswith("[") and literal.endswith("]")):
        raise AddressError("invalid address literal")
    inner = literal[1:-1]
    if inner[:5].lower() != "ipv6:" and ":" in inner:
        raise AddressError("unsupported address literal")
    try:
        if inner[:5].lower() == "ipv6:":
            if "%" in inner:  # a zone id is local to one host, not an address
                raise ValueError(inner)
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        raise AddressError("invalid address literal") from None
    return literal

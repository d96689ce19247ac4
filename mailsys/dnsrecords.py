"""
The DNS records a mail domain needs, and whether DNS already answers them.

A new domain works only once its zone says where its mail goes (MX), who
may send it (SPF, DMARC) and where its users' mail clients connect (the
SRV records of RFC 6186, the autoconfig names).  Getting one of them wrong
fails quietly: mail bounces elsewhere, lands in spam, or the account wizard
guesses.  So the records are derived here from the configuration the server
actually runs (its hostname and listeners), printed by C{mailsys
dns-records}, and compared with what DNS answers by C{mailsys check-dns}.

This module only computes and compares; the commands in
L{mailsys.cli_dns} print.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import idna
from twisted.internet import defer
from twisted.names import dns
from twisted.names.error import (
    AuthoritativeDomainError,
    DNSNameError,
    DNSQueryRefusedError,
    DNSQueryTimeoutError,
    DNSServerError,
    DomainError,
)
from twisted.python.failure import Failure

from mailsys.config import Config

# How long one lookup may take, in seconds per try (Twisted's resolver
# retries with each timeout in turn).  Its default waits a minute in all;
# a command should answer sooner.
LOOKUP_TIMEOUT = (1, 3, 5)

# Statuses of a checked record.
OK = "ok"
MISSING = "missing"
DIFFERENT = "different"
ERROR = "error"

# The client services of RFC 6186 (and RFC 8314 for submissions), in the
# order they are printed: listener name, SRV label, standard port, and
# priority.  A lower priority is tried first: implicit TLS before STARTTLS
# (RFC 8314 recommends it), IMAP before POP3 (RFC 6186 has clients compare
# priorities across the two).
_SERVICES = (
    ("submission", "_submission._tcp", 587, 10),
    ("submissions", "_submissions._tcp", 465, 0),
    ("imap", "_imap._tcp", 143, 10),
    ("imaps", "_imaps._tcp", 993, 0),
    ("pop3", "_pop3._tcp", 110, 30),
    ("pop3s", "_pop3s._tcp", 995, 20),
)

# Raised as such (not as a subclass) by resolvers that answer from their
# own tables (/etc/hosts, an authority) for a name they do not know.
_NO_SUCH_NAME = (DomainError, AuthoritativeDomainError)

_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Record:
    """
    One record a domain should publish.

    @ivar name: the owner name, absolute (C{"_dmarc.example.org."}).
    @ivar type: C{"MX"}, C{"TXT"}, C{"SRV"} or C{"CNAME"}.
    @ivar value: the RDATA as a zone file writes it (TXT quoted).
    """

    name: str
    type: str
    value: str

    def zone_line(self, width: int = 0) -> str:
        """The record as one zone-file line, the name padded to C{width}."""
        return f"{self.name:<{width}} IN {self.type:<5} {self.value}"


@dataclass(frozen=True)
class DomainRecords:
    """
    Everything to publish for one domain, with the comments that explain it.

    @ivar items: in zone-file order, each either a L{Record} or a comment
        line (C{str}, without the C{;}), or C{""} for a blank line.
    """

    domain: str
    hostname: str
    items: tuple[Record | str, ...]

    @property
    def records(self) -> list[Record]:
        return [item for item in self.items if isinstance(item, Record)]

    def width(self) -> int:
        """The width of the name column, so the records line up."""
        return max(len(record.name) for record in self.records)

    def zone_lines(self) -> list[str]:
        """The zone-file text, one line each, comments starting with C{;}."""
        width = self.width()
        lines = []
        for item in self.items:
            if isinstance(item, Record):
                lines.append(item.zone_line(width))
            else:
                lines.append(f"; {item}" if item else "")
        return lines

    def as_json(self) -> dict[str, Any]:
        """The records alone, for scripts."""
        return {
            "domain": self.domain,
            "hostname": self.hostname,
            "records": [
                {"name": r.name, "type": r.type, "value": r.value} for r in self.records
            ],
        }


def domain_name(text: str) -> str:
    """
    C{text} as the lower-case ASCII name the configuration stores
    (IDNA for non-ASCII names), without a trailing dot.

    @raise ValueError: with the reason, when it is not a domain name.
    """
    try:
        return idna.encode(text.strip().rstrip("."), uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError) as e:
        raise ValueError(f"not a valid domain name: {text!r} ({e})") from None


def _listener_port(endpoint: str) -> int | None:
    """
    The TCP port of a listener's endpoint string, or C{None} when it has
    none that can be read here (C{systemd:}, C{unix:}).
    """
    parts = re.split(r"(?<!\\):", endpoint)
    if parts[0] not in ("tcp", "tcp6", "ssl"):
        return None
    for part in parts[1:]:
        key, _, value = part.rpartition("=")
        if key in ("", "port") and value.isdigit():
            return int(value)
    return None


def _public_port(cfg: Config, name: str, standard: int) -> tuple[int, str]:
    """
    The port clients should be told for listener C{name}, and a comment
    when it is not the listener's own.  A privileged port (below 1024) is
    taken as the public one; anything else (the development ports, a
    systemd socket) is assumed to be forwarded from the standard port.
    """
    port = _listener_port(getattr(cfg.listen, name))
    if port is not None and (port == standard or port < 1024):
        return port, ""
    if port is None:
        return standard, f"listen.{name} names no TCP port: {standard} is assumed"
    return standard, f"listen.{name} is on port {port}: forward {standard} to it"


def domain_records(cfg: Config, domain: str) -> DomainRecords:
    """
    The records C{domain} needs for mail served by this configuration:
    MX, SPF and DMARC, the SRV records of RFC 6186 for the listeners that
    are on (C{0 0 0 .} for those that are off), the autoconfig names, and
    comments on what cannot be derived (the host's addresses, PTR, DKIM).
    """
    host = cfg.server.hostname + "."
    origin = domain + "."
    items: list[Record | str] = [
        f"DNS records for {domain}, mail served by {cfg.server.hostname}.",
        f"Check them with: mailsys check-dns {domain}",
        "",
        "Inbound mail: other servers deliver to the MX host on port 25.",
    ]
    if not cfg.listen.smtp:
        items.append("listen.smtp is off: no mail from other servers is received")
    else:
        port = _listener_port(cfg.listen.smtp)
        if port is not None and port != 25:
            items.append(f"listen.smtp is on port {port}: forward port 25 to it")
    items.append(Record(origin, "MX", f"10 {host}"))
    # RFC 7208: "mx" allows the addresses of the MX hosts, which is this
    # server; "-all" refuses every other sender.
    items.append("SPF (RFC 7208): only the MX host sends mail from this domain.")
    if cfg.relay.smarthost:
        items += [
            f"relay.smarthost is set: mail leaves through {cfg.relay.smarthost},",
            "so add what its provider asks for (include:...) before -all.",
        ]
    items.append(Record(origin, "TXT", '"v=spf1 mx -all"'))
    items += [
        "DMARC (RFC 7489): what receivers do with mail failing SPF, with",
        "reports to postmaster.  p=none (reports only) is the cautious start;",
        "p=quarantine sends failing mail to spam.",
        Record(
            f"_dmarc.{origin}",
            "TXT",
            f'"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}"',
        ),
        "DKIM: signing is not implemented yet, so there is no DKIM record.",
        "",
        "Mail clients (RFC 6186, RFC 8314): the lowest priority is tried first;",
        '"0 0 0 ." says the service is not offered (RFC 6186 3.4).',
    ]
    for name, label, standard, priority in _SERVICES:
        if not getattr(cfg.listen, name):
            items.append(Record(f"{label}.{origin}", "SRV", "0 0 0 ."))
            continue
        port, note = _public_port(cfg, name, standard)
        if note:
            items.append(note)
        items.append(Record(f"{label}.{origin}", "SRV", f"{priority} 1 {port} {host}"))
    items.append("Client autoconfiguration (Thunderbird, Outlook), on listen.http.")
    if not cfg.listen.http:
        items.append("listen.http is off: nothing answers at these names yet.")
    items += [
        Record(f"autoconfig.{origin}", "CNAME", host),
        Record(f"autodiscover.{origin}", "CNAME", host),
        "",
        f"Also: {host} needs A (and AAAA) records with this server's public",
        "addresses, and the reverse DNS (PTR) of each address should be",
        f"{host} (receivers check it; the owner of the address sets it).",
    ]
    return DomainRecords(domain, cfg.server.hostname, tuple(items))


# --- checking ---------------------------------------------------------------


@dataclass(frozen=True)
class RecordCheck:
    """
    What DNS answered for one expected record.

    @ivar status: L{OK}, L{MISSING}, L{DIFFERENT} or L{ERROR}.
    @ivar found: the records of that name and type DNS gave, as zone-file
        RDATA (for TXT, only those of the same kind: SPF or DMARC).
    @ivar reason: why the lookup failed, for L{ERROR}.
    """

    record: Record
    status: str
    found: tuple[str, ...] = field(default=())
    reason: str = ""

    def describe(self) -> str:
        """C{ok}, C{missing}, C{different (found: ...)} or C{error (...)}."""
        if self.status == DIFFERENT:
            return f"different (found: {', '.join(self.found) or 'nothing'})"
        if self.status == ERROR:
            return f"error ({self.reason})"
        return self.status


def _bare(name: str) -> str:
    return name.lower().rstrip(".")


def _printable(text: str) -> str:
    """Text from the network made safe for one terminal line."""
    return _UNPRINTABLE.sub("?", text)[:300]


def _txt(payload: dns.Record_TXT) -> str:
    # RFC 7208 3.3: the strings of one TXT record are joined without spaces.
    text = b"".join(payload.data).decode("utf-8", errors="replace")
    return _printable(text)


def _found(record: Record, answers: Sequence[dns.RRHeader]) -> list[Any]:
    """The answers of the record's type, as values to compare."""
    kind = getattr(dns, record.type)
    payloads = [rr.payload for rr in answers if rr.type == kind]
    if record.type == "MX":
        return [(p.preference, _bare(str(p.name))) for p in payloads]
    if record.type == "SRV":
        return [(p.priority, p.weight, p.port, _bare(str(p.target))) for p in payloads]
    if record.type == "CNAME":
        return [_bare(str(p.name)) for p in payloads]
    return [_txt(p) for p in payloads]


def _txt_kind(text: str) -> str:
    """C{"v=spf1"} or C{"v=dmarc1"}: the version tag a TXT record starts with."""
    words = text.strip().strip('"').split(";")[0].split()
    return words[0].lower() if words else ""


def _normal_txt(text: str) -> str:
    """SPF and DMARC text compared regardless of spacing and tag case."""
    text = text.strip().strip('"')
    if text.lower().startswith("v=dmarc1"):
        tags = [tag.strip() for tag in text.split(";") if tag.strip()]
        return "; ".join(
            f"{k.strip().lower()}={v.strip()}"
            for k, _, v in (t.partition("=") for t in tags)
        )
    return " ".join(text.lower().split())


def compare(record: Record, answers: Sequence[dns.RRHeader]) -> RecordCheck:
    """
    Judge the DNS C{answers} to a lookup of C{record}'s name and type.

    MX, SRV and CNAME are right when one answer names this server (and, for
    SRV, the port); priorities and preferences are the operator's choice.
    SPF and DMARC must be the one record of their kind (RFC 7208 4.5 and
    RFC 7489 6.6.3 ignore a domain with several) and say the same thing.
    """
    found = _found(record, answers)
    if record.type == "MX":
        host = _bare(record.value.split()[1])
        shown = tuple(f"{p} {name}." for p, name in found)  # "0 ." is null MX
        ok = any(name == host for _, name in found)
    elif record.type == "SRV":
        _, _, port, target = record.value.split()
        shown = tuple(f"{p} {w} {o} {t}." for p, w, o, t in found)
        if _bare(target):
            ok = any((o, t) == (int(port), _bare(target)) for _, _, o, t in found)
        else:  # not offered: only the target "." matters (RFC 2782)
            ok = bool(found) and all(not t for _, _, _, t in found)
    elif record.type == "CNAME":
        shown = tuple(f"{name}." for name in found)
        ok = _bare(record.value) in found
    else:
        # Other TXT records (site verifications...) share the name: skip them.
        found = [t for t in found if _txt_kind(t) == _txt_kind(record.value)]
        shown = tuple(f'"{t}"' for t in found)
        ok = len(found) == 1 and _normal_txt(found[0]) == _normal_txt(record.value)
    if not found:
        return RecordCheck(record, MISSING)
    return RecordCheck(record, OK if ok else DIFFERENT, shown)


def _lookup(resolver, record: Record, timeout: Sequence[int]) -> defer.Deferred:
    name = record.name.rstrip(".")
    method = {
        "MX": resolver.lookupMailExchange,
        "TXT": resolver.lookupText,
        "SRV": resolver.lookupService,
        "CNAME": resolver.lookupCanonicalName,
    }[record.type]
    return method(name, timeout=tuple(timeout))


def _reason(failure: Failure) -> str:
    """A DNS failure in words an operator can act on."""
    if failure.check(DNSServerError):
        return "the DNS server failed (SERVFAIL)"
    if failure.check(DNSQueryRefusedError):
        return "the DNS server refused to answer"
    if failure.check(DNSQueryTimeoutError):
        return "no answer from the DNS server"
    return _printable(str(failure.value) or failure.type.__name__)[:200]


async def check_record(
    resolver, record: Record, timeout: Sequence[int] = LOOKUP_TIMEOUT
) -> RecordCheck:
    """Look C{record} up with C{resolver} (an C{IResolver}) and judge it."""
    try:
        answers, _, _ = await _lookup(resolver, record, timeout)
    except Exception as e:
        # NXDOMAIN: the name has nothing at all.  The other DNS errors are
        # subclasses of DomainError too, but say nothing about the record.
        if isinstance(e, DNSNameError) or type(e) in _NO_SUCH_NAME:
            return RecordCheck(record, MISSING)
        return RecordCheck(record, ERROR, reason=_reason(Failure()))
    return compare(record, answers)


async def check_records(
    resolver, records: Sequence[Record], timeout: Sequence[int] = LOOKUP_TIMEOUT
) -> list[RecordCheck]:
    """
    Check every record at once (so that a slow server costs one timeout,
    not one per record); the results in the order of C{records}.
    """
    lookups = [
        defer.ensureDeferred(check_record(resolver, r, timeout)) for r in records
    ]
    return list(await defer.gatherResults(lookups))

"""
Outbound SMTP: carry one queued message to the next hop of its recipients'
domain, and say what became of each recipient.

The next hop is, in this order: the C{[relay] routes} entry for the domain,
the C{[relay] smarthost}, or the domain's MX hosts by preference (RFC 5321
5.1), falling back to the domain's own A/AAAA records when it has no MX.  A
null MX (C{MX 0 .}, RFC 7505) and a domain that does not exist are
permanent failures; any other DNS trouble is temporary.

TLS follows Postfix: opportunistic to MX hosts and routes (STARTTLS when
offered, certificate not checked, plain text when not offered; a failed
handshake is retried once on a new connection without TLS, which gives a
passive eavesdropper nothing it would not get from a server that never
offered STARTTLS, and an active attacker could strip the offer anyway);
required and verified for the smarthost, against C{smarthost_cafile} or the
system's CAs and the smarthost's name, with AUTH PLAIN or LOGIN only over
that verified TLS.

Why a small client protocol of our own rather than Twisted's
C{SMTPClient}/C{ESMTPClient}: their dot-stuffing works on 16 KiB chunks of
the file, so a C{.} at the start of the message or of a chunk goes out
unstuffed (and can end the message early) and a stray CR goes out bare;
C{ESMTPClient} cannot fall back to plain text after a failed opportunistic
handshake nor tell that failure from a lost connection; there is no SIZE or
BODY=8BITMIME; a 421 to one RCPT is taken as that recipient's reply only;
its single idle timeout runs on the global reactor instead of RFC 5321
4.5.3.2's per-stage timeouts; and its session log keeps the AUTH exchange.
Here the dialogue is one coroutine (L{_Session._converse}) reading top to
bottom in protocol order, over a queue of parsed replies.
"""

from __future__ import annotations

import base64
import random
import re
import socket
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Mapping, Sequence

import idna
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectionRefusedError, TimeoutError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.names import client, dns, hosts
from twisted.names.error import DNSNameError
from twisted.names.resolve import ResolverChain
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsys.queue.interfaces import IOutboundTransport, RecipientResult

log = Logger(namespace="mailsys.queue.client")


@dataclass(frozen=True)
class Timeouts:
    """
    How long to wait at each stage, in seconds.  The defaults are RFC 5321
    4.5.3.2's minimums; C{connect} is Postfix's C{smtp_connect_timeout}.
    """

    connect: float = 30.0
    greeting: float = 300.0  # RFC 5321 4.5.3.2.1
    command: float = 300.0  # 4.5.3.2.2 MAIL, 4.5.3.2.3 RCPT; also EHLO, STARTTLS, AUTH
    data_init: float = 120.0  # 4.5.3.2.4
    data_block: float = 180.0  # 4.5.3.2.5
    data_final: float = 600.0  # 4.5.3.2.6
    # Only keeps a connection (and its per-host slot) open: the results are
    # known before QUIT is sent.
    quit: float = 30.0


DEFAULT_TIMEOUTS = Timeouts()

# RFC 5321 4.5.3.1.5 allows 512 octets per reply line; be liberal but bounded.
_MAX_REPLY_LINE = 4096
_MAX_REPLY_LINES = 100
_MAX_TEXT = 1000

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]?)(.*)\Z", re.S)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")
# What could end a command early or smuggle another one after it.
_UNSAFE_PATH = re.compile(r"[\x00-\x1f\x7f<>]")

# TLS policies of a next hop.
_TLS_OFF = "off"  # after a failed opportunistic handshake
_TLS_MAY = "may"  # STARTTLS when offered, certificate not checked
_TLS_VERIFY = "verify"  # TLS required, certificate and name verified


class _HopFailure(Exception):
    """
    Something that happened to the whole attempt (DNS, connection, TLS, a
    refusal before any recipient): every recipient still undecided gets
    this code and text.

    @ivar tls: a TLS handshake failed (an opportunistic hop may be retried
        without TLS).
    """

    def __init__(self, code: int, text: str, next_hop: str = "", tls: bool = False):
        super().__init__(code, text)
        self.code = code
        self.text = text
        self.next_hop = next_hop
        self.tls = tls


@dataclass(frozen=True)
class _Reply:
    """One SMTP reply: its code and its lines of text (without the code)."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(line for line in self.lines if line)[:_MAX_TEXT]

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()


@dataclass(frozen=True)
class _Hop:
    """
    A host to try, before its addresses are known.

    @ivar implicit_mx: the domain itself, for want of MX records (RFC 5321
        5.1): having no address is then permanent.
    """

    name: str
    port: int
    tls: str
    implicit_mx: bool = False


@dataclass
class _Job:
    """One message on its way: the envelope and the open message file."""

    queue_id: str
    sender: str | None
    recipients: Sequence[str]
    file: IO[bytes]
    size: int  # as sent: every LF counted as CRLF
    eight_bit: bool


class _WireEncoder:
    """
    Turns the stored message (LF line endings) into DATA on the wire: every
    line ending becomes CRLF, and a line starting with C{.} gets another
    one (RFC 5321 4.5.2), whatever the chunk boundaries.  A stray CR (the
    server refuses bare CRs, so it should never be stored) is taken as a
    line ending too, as is a stored CRLF: nothing bare ever leaves.
    """

    _LINE_END = re.compile(rb"\r\n|\r|\n")

    def __init__(self) -> None:
        self._line_start = True
        self._held_cr = False

    def encode(self, chunk: bytes) -> bytes:
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            # It may be the first half of a CRLF split across chunks.
            chunk = chunk[:-1]
            self._held_cr = True
        pieces = self._LINE_END.split(chunk)
        out = []
        for piece in pieces[:-1]:
            if self._line_start and piece[:1] == b".":
                out.append(b".")
            out.append(piece)
            out.append(b"\r\n")
            self._line_start = True
        last = pieces[-1]
        if last:
            if self._line_start and last[:1] == b".":
                out.append(b".")
            out.append(last)
            self._line_start = False
        return b"".join(out)

    def finish(self) -> bytes:
        """The end of the message: a final CRLF if missing, then C{.CRLF}."""
        ending = b"\r\n" if self._held_cr or not self._line_start else b""
        self._held_cr, self._line_start = False, True
        return ending + b".\r\n"


def _inspect(path: Path) -> tuple[IO[bytes], int, bool]:
    """
    Open the message and measure it (in a thread: it reads the whole file):
    its size on the wire for SIZE=, and whether it has 8-bit bytes for
    BODY=8BITMIME.
    """
    f = open(path, "rb")
    try:
        size = 0
        eight_bit = False
        while chunk := f.read(1 << 20):
            size += len(chunk) + chunk.count(b"\n")
            eight_bit = eight_bit or not chunk.isascii()
        f.seek(0)
    except BaseException:
        f.close()
        raise
    return f, size, eight_bit


def _split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """
    C{"host:port"}, C{"[v6]:port"} (or just the host, given a default port)
    as C{(host, port)}, the host without brackets.

    @raise ValueError: naming the text, when it is not of that form.
    """
    match = re.fullmatch(
        r"(?:\[([^\]]+)\]|([^:\[\]]+))(?::([0-9]{1,5}))?", text.strip()
    )
    if not match or (match[3] is None and default_port is None):
        raise ValueError(f"expected host:port, got {text!r}")
    port = int(match[3]) if match[3] is not None else default_port
    assert port is not None
    if not 0 < port < 65536:
        raise ValueError(f"invalid port in {text!r}")
    return (match[1] or match[2]).lower(), port


def _is_ip(host: str) -> bool:
    return isIPAddress(host) or isIPv6Address(host)


class _SystemResolver(client.Resolver):
    """
    Twisted's resolver for the servers in C{/etc/resolv.conf}, read once at
    start.  Twisted's own re-reads the file every minute from a timer that
    nothing ever cancels, so a stopped mail system would leave it behind
    (and it formats the path as bytes, a BytesWarning under C{python -b}).
    """

    def maybeParseConfig(self) -> None:
        try:
            with open(self.resolv, "rb") as conf:
                self.parseConfig(conf)
        except OSError:
            self.parseConfig(())  # as Twisted: no file means 127.0.0.1


def make_resolver(reactor, server: str = ""):
    """
    The DNS resolver for MX and address lookups.

    @param server: C{""} for the system's (C{/etc/hosts}, then the servers in
        C{/etc/resolv.conf}, read at start); or C{"IP"} or
        C{"IP:port"} (C{"[IPv6]:port"}) to ask that one server only, as tests
        do with a loopback C{twisted.names} server.
    @raise ValueError: when C{server} is not an IP address with an optional
        port (a resolver cannot be found by name).
    """
    if not server:
        system = _SystemResolver(resolv="/etc/resolv.conf", reactor=reactor)
        return ResolverChain([hosts.Resolver(), system])
    try:
        host, port = _split_host_port(server, 53)
    except ValueError as e:
        raise ValueError(f"resolver: {e}") from None
    if not _is_ip(host):
        raise ValueError(f"resolver: expected an IP address, got {server!r}")
    return client.Resolver(servers=[(host, port)], reactor=reactor)


def _describe(failure: Failure | BaseException) -> str:
    """A short, one-line reason for a log line or a result text."""
    value = failure.value if isinstance(failure, Failure) else failure
    text = _UNPRINTABLE.sub(" ", str(value) or type(value).__name__)
    return text[:200]


def _load_trust_root(cafile: Path):
    """
    The certificates in C{cafile} as a trust root.

    @raise ValueError: naming the file, when it cannot be read or holds no
        PEM certificate.
    """
    try:
        data = Path(cafile).read_bytes()
    except OSError as e:
        problem = f"cannot read {str(cafile)!r}: {e.strerror}"
        raise ValueError(f"smarthost_cafile: {problem}") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        problem = f"{str(cafile)!r} holds no PEM certificate"
        raise ValueError(f"smarthost_cafile: {problem}") from None
    return trustRootFromCertificates(
        [
            Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
            for c in certificates
        ]
    )


@implementer(IOutboundTransport)
class SMTPTransport:
    """
    Delivers queued mail over SMTP to the next hop of each domain.

    @param resolver: an C{IResolver} (see L{make_resolver}); C{None} for the
        system's, made when first needed.
    @param routes: domain -> C{"host:port"}, a static next hop.
    @param smarthost: C{"host:port"} that all other mail goes through, with
        TLS required and, given C{smarthost_username}, AUTH.
    @param smarthost_cafile: PEM file of the CAs that may sign the
        smarthost's certificate; C{None} for the system's.
    @param mx_port: the port of MX hosts (25; tests point it at a loopback
        server).
    @param max_connections_per_host: connections open at once to one
        address and port.
    @param timeouts: per-stage timeouts (L{Timeouts}), run on C{reactor}'s
        clock.
    @raise ValueError: for a malformed route, smarthost or CA file.
    """

    def __init__(
        self,
        reactor,
        hostname: str,
        resolver=None,
        routes: Mapping[str, str] = {},
        smarthost: str = "",
        smarthost_username: str = "",
        smarthost_password: str = "",
        smarthost_cafile: Path | None = None,
        mx_port: int = 25,
        max_connections_per_host: int = 4,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        self.reactor = reactor
        self.hostname = hostname
        self._resolver = resolver
        self.routes = {
            domain.lower(): _split_host_port(hop) for domain, hop in routes.items()
        }
        self.smarthost = _split_host_port(smarthost) if smarthost else None
        self._credentials = (
            (smarthost_username.encode("utf-8"), smarthost_password.encode("utf-8"))
            if smarthost_username
            else None
        )
        self.mx_port = mx_port
        self.max_connections_per_host = max_connections_per_host
        self.timeouts = timeouts
        self._random = random.Random()
        self._slots: dict[tuple[str, int], DeferredSemaphore] = {}
        # Opportunistic: any certificate will do (Postfix "may").
        self._may_context = CertificateOptions()
        self._verify_context = None
        if self.smarthost is not None:
            trust = (
                _load_trust_root(smarthost_cafile)
                if smarthost_cafile is not None
                else platformTrust()
            )
            self._verify_context = optionsForClientTLS(
                self.smarthost[0],
                trustRoot=trust,
                # RFC 8996 retires TLS 1.0 and 1.1.
                extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
            )

    @property
    def resolver(self):
        if self._resolver is None:
            self._resolver = make_resolver(self.reactor)
        return self._resolver

    def send(
        self,
        queue_id: str,
        sender: str | None,
        recipients: Sequence[str],
        message_path: Path,
    ) -> Deferred[list[RecipientResult]]:
        """
        Deliver the message at C{message_path} to C{recipients} (one domain).
        Fires with one L{RecipientResult} per recipient, in order; never
        fails.
        """
        if not recipients:
            return defer.succeed([])
        d = Deferred.fromCoroutine(
            self._deliver(queue_id, sender, list(recipients), Path(message_path))
        )

        def unexpected(failure: Failure) -> list[RecipientResult]:
            log.failure("{queue_id}: delivery failed", failure, queue_id=queue_id)
            text = "4.3.0 internal error in the SMTP client"
            return [RecipientResult(r, 451, text) for r in recipients]

        return d.addErrback(unexpected)

    async def _deliver(
        self, queue_id: str, sender: str | None, recipients: list[str], path: Path
    ) -> list[RecipientResult]:
        try:
            opened = await deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), _inspect, path
            )
        except OSError as e:
            failure = _HopFailure(
                451, f"4.3.0 cannot read the queued message: {e.strerror or e}"
            )
            return _everyone(recipients, failure)
        job = _Job(queue_id, sender, recipients, *opened)
        try:
            return await self._deliver_job(job)
        finally:
            job.file.close()

    async def _deliver_job(self, job: _Job) -> list[RecipientResult]:
        domain = job.recipients[0].rpartition("@")[2].lower()
        try:
            hops = await self._next_hops(domain)
        except _HopFailure as failure:
            log.info(
                "{queue_id}: {domain}: {text}",
                queue_id=job.queue_id,
                domain=domain,
                text=failure.text,
            )
            return _everyone(job.recipients, failure)
        last: _HopFailure | None = None
        for hop in hops:
            try:
                addresses = await self._addresses(hop)
            except _HopFailure as failure:
                last = failure
                continue
            for address in addresses:
                outcome = await self._attempt(job, hop, address, hop.tls)
                failed = isinstance(outcome, _HopFailure)
                if failed and outcome.tls and hop.tls == _TLS_MAY:
                    log.info(
                        "{queue_id}: {text}; trying again without TLS",
                        queue_id=job.queue_id,
                        text=outcome.text,
                    )
                    outcome = await self._attempt(job, hop, address, _TLS_OFF)
                if not isinstance(outcome, _HopFailure):
                    return outcome
                log.info("{queue_id}: {text}", queue_id=job.queue_id, text=outcome.text)
                last = outcome
        assert last is not None
        return _everyone(job.recipients, last)

    async def _next_hops(self, domain: str) -> list[_Hop]:
        """The hosts to try for C{domain}, best first."""
        if domain in self.routes:
            host, port = self.routes[domain]
            return [_Hop(host, port, _TLS_MAY)]
        if self.smarthost is not None:
            host, port = self.smarthost
            return [_Hop(host, port, _TLS_VERIFY)]
        try:
            ascii_domain = idna.encode(domain, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            raise _HopFailure(
                550, f"5.1.2 {domain!r} is not a valid domain name"
            ) from None
        try:
            answers, _, _ = await self.resolver.lookupMailExchange(ascii_domain)
        except DNSNameError:
            raise _HopFailure(
                550, f"5.1.2 domain {domain} does not exist (DNS)"
            ) from None
        except Exception as e:
            text = f"4.4.3 MX lookup for {domain} failed: {_describe(e)}"
            raise _HopFailure(451, text) from e
        exchanges = [
            (rr.payload.preference, str(rr.payload.name).lower().rstrip("."))
            for rr in answers
            if rr.type == dns.MX
        ]
        if not exchanges:
            # RFC 5321 5.1: no MX, so the domain itself is the mail host.
            return [_Hop(ascii_domain, self.mx_port, _TLS_MAY, implicit_mx=True)]
        hosts_ = [(preference, name) for preference, name in exchanges if name]
        if not hosts_:
            # RFC 7505 3: "MX 0 ." says the domain accepts no mail.
            raise _HopFailure(556, f"5.1.10 {domain} accepts no mail (null MX)")
        # RFC 5321 5.1: lowest preference first, equal ones in random order.
        hosts_.sort(key=lambda mx: (mx[0], self._random.random()))
        return [_Hop(name, self.mx_port, _TLS_MAY) for _, name in hosts_]

    async def _addresses(self, hop: _Hop) -> list[str]:
        """
        The IP addresses of C{hop}: IPv4 first (a host without IPv6
        connectivity then loses no time), then IPv6.
        """
        if _is_ip(hop.name):
            return [hop.name]
        lookups = [
            self.resolver.lookupAddress(hop.name),
            self.resolver.lookupIPV6Address(hop.name),
        ]
        results = await defer.DeferredList(lookups, consumeErrors=True)
        addresses: list[str] = []
        errors: list[Failure] = []
        nonexistent = 0
        for ok, value in results:
            if not ok:
                if value.check(DNSNameError):
                    nonexistent += 1
                else:
                    errors.append(value)
                continue
            for rr in value[0]:
                if rr.type == dns.A:
                    addresses.append(rr.payload.dottedQuad())
                elif rr.type == dns.AAAA:
                    address = socket.inet_ntop(socket.AF_INET6, rr.payload.address)
                    addresses.append(address)
        if addresses:
            return addresses
        if errors:
            reason = _describe(errors[0])
            text = f"4.4.3 address lookup for {hop.name} failed: {reason}"
            raise _HopFailure(451, text)
        if hop.implicit_mx and nonexistent == 2:
            raise _HopFailure(550, f"5.1.2 domain {hop.name} does not exist (DNS)")
        if hop.implicit_mx:
            # RFC 5321 5.1: no MX and no address: nowhere to deliver.
            raise _HopFailure(550, f"5.4.4 {hop.name} has no MX and no address records")
        raise _HopFailure(451, f"4.4.3 mail host {hop.name} has no address (DNS)")

    def _slot(self, address: str, port: int) -> DeferredSemaphore:
        key = (address, port)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = DeferredSemaphore(self.max_connections_per_host)
        return slot

    def _release(self, address: str, port: int) -> None:
        slot = self._slots[(address, port)]
        slot.release()
        if slot.tokens == slot.limit and not slot.waiting:
            del self._slots[(address, port)]

    async def _attempt(
        self, job: _Job, hop: _Hop, address: str, tls: str
    ) -> list[RecipientResult] | _HopFailure:
        """
        One connection to one address of C{hop}: the recipients' results,
        or a L{_HopFailure} that leaves them all undecided (try elsewhere).
        """
        shown = f"[{address}]" if hop.name == address else f"{hop.name}[{address}]"
        next_hop = f"{shown}:{hop.port}"
        await self._slot(address, hop.port).acquire()
        endpoint_type = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        endpoint = endpoint_type(
            self.reactor, address, hop.port, timeout=self.timeouts.connect
        )
        session = _Session(
            clock=self.reactor,
            helo=self.hostname,
            job=job,
            next_hop=next_hop,
            tls=tls,
            context=self._verify_context if tls == _TLS_VERIFY else self._may_context,
            credentials=self._credentials if tls == _TLS_VERIFY else None,
            timeouts=self.timeouts,
        )
        factory = Factory.forProtocol(lambda: session)
        factory.noisy = False
        try:
            await endpoint.connect(factory)
        except Exception as e:
            self._release(address, hop.port)
            if isinstance(e, ConnectionRefusedError):
                text = f"4.4.1 connection refused by {next_hop}"
            elif isinstance(e, TimeoutError):
                text = f"4.4.1 connection to {next_hop} timed out"
            else:
                text = f"4.4.1 cannot connect to {next_hop}: {_describe(e)}"
            return _HopFailure(451, text, next_hop)
        session.closed.addBoth(lambda _: self._release(address, hop.port))
        return await session.finished


def _everyone(recipients: Sequence[str], failure: _HopFailure) -> list[RecipientResult]:
    return [
        RecipientResult(r, failure.code, failure.text, failure.next_hop)
        for r in recipients
    ]


def _extensions(lines: Sequence[str]) -> dict[str, str]:
    """
    The EHLO keywords (upper case) and their parameters.  The old
    C{AUTH=PLAIN LOGIN} form some servers still send counts as C{AUTH}.
    """
    result: dict[str, str] = {}
    for line in lines:
        keyword, _, parameters = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):
            parameters = f"{keyword[5:]} {parameters}"
            keyword = "AUTH"
        if keyword in result and parameters:
            parameters = f"{result[keyword]} {parameters}"
        result[keyword] = parameters.strip()
    return result


class _Session(Protocol):
    """
    One SMTP conversation with one next-hop address, for one message.

    @ivar finished: fires with the list of results once they are known
        (before QUIT), or with a L{_HopFailure} when the conversation ended
        before any recipient was tried (the caller may try another host).
    @ivar closed: fires when the connection is gone.
    """

    def __init__(
        self,
        clock,
        helo: str,
        job: _Job,
        next_hop: str,
        tls: str,
        context,
        credentials: tuple[bytes, bytes] | None,
        timeouts: Timeouts,
    ) -> None:
        self.clock = clock
        self.helo = helo.encode("idna")
        self.job = job
        self.next_hop = next_hop
        self.tls = tls
        self.context = context
        self.credentials = credentials
        self.timeouts = timeouts
        self.finished: Deferred = Deferred()
        self.closed: Deferred = Deferred()
        self._buffer = b""
        self._lines: list[str] = []
        self._replies: deque[_Reply] = deque()
        self._waiter: Deferred | None = None
        self._timer = None
        self._what = "the greeting"
        self._ended: _HopFailure | None = None
        self._connected = False
        self._secure = False
        self._handshaking = False
        self._mail_accepted = False
        self._results: dict[int, RecipientResult] = {}

    # -- the connection ------------------------------------------------------

    def connectionMade(self) -> None:
        self._connected = True
        d = Deferred.fromCoroutine(self._converse())
        d.addBoth(self._settle)

    def dataReceived(self, data: bytes) -> None:
        if self._ended is not None:
            return
        self._buffer += data
        while self._ended is None:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > _MAX_REPLY_LINE:
                    self._protocol_error("a reply line too long")
                return
            line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
            self._reply_line(line.rstrip(b"\r"))

    def _reply_line(self, line: bytes) -> None:
        match = _REPLY_LINE.match(line)
        if match is None or len(self._lines) >= _MAX_REPLY_LINES:
            self._protocol_error(f"a malformed reply {line[:60]!r}")
            return
        text = _UNPRINTABLE.sub(" ", match[3].decode("utf-8", "replace")).strip()
        self._lines.append(text)
        if match[2] == b"-":
            return
        reply = _Reply(int(match[1]), tuple(self._lines))
        self._lines = []
        # The first reply after STARTTLS proves the handshake worked.
        self._handshaking = False
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            self._disarm()
            waiter.callback(reply)
        else:
            self._replies.append(reply)

    def _protocol_error(self, what: str) -> None:
        text = f"4.5.0 {self.next_hop} sent {what} while we waited for {self._what}"
        self._end(_HopFailure(451, text, self.next_hop))
        self.transport.abortConnection()

    def connectionLost(self, reason=None) -> None:
        self._connected = False
        if self._handshaking:
            why = _describe(reason)
            text = f"4.7.5 TLS handshake with {self.next_hop} failed: {why}"
            self._end(_HopFailure(451, text, self.next_hop, tls=True))
        else:
            text = (
                f"4.4.2 connection lost with {self.next_hop} "
                f"while waiting for {self._what}"
            )
            self._end(_HopFailure(451, text, self.next_hop))
        self.closed.callback(None)

    def _end(self, failure: _HopFailure) -> None:
        """The conversation is over: whoever waits for a reply gets C{failure}."""
        if self._ended is None:
            self._ended = failure
        self._disarm()
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.errback(self._ended)

    # -- waiting -------------------------------------------------------------

    def _arm(self, timeout: float, what: str) -> None:
        self._disarm()
        self._what = what
        self._timer = self.clock.callLater(timeout, self._time_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _time_out(self) -> None:
        self._timer = None
        text = f"4.4.2 timeout waiting for {self._what} from {self.next_hop}"
        self._end(_HopFailure(451, text, self.next_hop))
        self.transport.abortConnection()

    def _reply(self, what: str, timeout: float) -> Deferred[_Reply]:
        """The next reply, waiting at most C{timeout} seconds."""
        self._what = what
        if self._replies:
            return defer.succeed(self._replies.popleft())
        if self._ended is not None:
            return defer.fail(self._ended)
        self._waiter = Deferred()
        self._arm(timeout, what)
        return self._waiter

    def _command(self, line: bytes, what: str, timeout: float) -> Deferred[_Reply]:
        if self._ended is not None:
            return defer.fail(self._ended)
        self.transport.write(line + b"\r\n")
        return self._reply(what, timeout)

    # -- the conversation ----------------------------------------------------

    async def _converse(self) -> list[RecipientResult]:
        t = self.timeouts
        greeting = await self._reply("the greeting", t.greeting)
        if greeting.code != 220:
            # RFC 5321 3.1: 554 (or 421) instead of 220 means "not here".
            raise self._refused(greeting)
        extensions = await self._hello()
        if self.tls != _TLS_OFF and not self._secure:
            extensions = await self._start_tls(extensions)
        if self.credentials is not None:
            await self._authenticate(extensions)
        return await self._transaction(extensions)

    def _refused(self, reply: _Reply) -> _HopFailure:
        if reply.code < 400:
            text = f"4.5.0 unexpected {self._what} from {self.next_hop}: {reply}"
            return _HopFailure(451, text, self.next_hop)
        return _HopFailure(reply.code, reply.text, self.next_hop)

    async def _hello(self) -> dict[str, str]:
        command = self.timeouts.command
        reply = await self._command(b"EHLO " + self.helo, "the reply to EHLO", command)
        if reply.code == 250:
            return _extensions(reply.lines[1:])
        if 500 <= reply.code < 600:
            # RFC 5321 3.2: a server that does not know EHLO; try HELO.
            helo = b"HELO " + self.helo
            reply = await self._command(helo, "the reply to HELO", command)
            if reply.code == 250:
                return {}
        raise self._refused(reply)

    async def _start_tls(self, extensions: dict[str, str]) -> dict[str, str]:
        """STARTTLS (RFC 3207) if offered; required for a verified hop."""
        required = self.tls == _TLS_VERIFY
        if "STARTTLS" not in extensions:
            if required:
                text = (
                    f"4.7.4 TLS is required, but {self.next_hop} "
                    "does not offer STARTTLS"
                )
                raise _HopFailure(451, text, self.next_hop)
            return extensions
        command = self.timeouts.command
        reply = await self._command(b"STARTTLS", "the reply to STARTTLS", command)
        if reply.code != 220:
            if required or reply.code == 421:
                text = f"4.7.4 {self.next_hop} refused STARTTLS: {reply}"
                code = 421 if reply.code == 421 else 451
                raise _HopFailure(code, text, self.next_hop)
            return extensions
        # Anything the server sent after its 220 came before the handshake:
        # never take it for a reply from the encrypted session (the client
        # side of CVE-2011-0411).
        self._buffer = b""
        self._lines = []
        self._replies.clear()
        self._handshaking = True
        self._secure = True
        self.transport.startTLS(self.context)
        # RFC 3207 4.2: forget what was said before TLS and ask again.
        return await self._hello()

    async def _authenticate(self, extensions: dict[str, str]) -> None:
        """
        AUTH PLAIN (RFC 4616) or LOGIN, only ever over TLS that verified the
        server.  A refusal is temporary, as with Postfix: the credentials
        may be fixed before the message expires.
        """
        assert self.credentials is not None
        if not self._secure:
            text = "4.7.0 not sending credentials without TLS"
            raise _HopFailure(451, text, self.next_hop)
        username, password = self.credentials
        mechanisms = extensions.get("AUTH", "").upper().split()
        command = self.timeouts.command
        what = "the reply to AUTH"
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + username + b"\0" + password)
            reply = await self._command(b"AUTH PLAIN " + token, what, command)
            if reply.code == 334:
                # A server that wants the response on its own line.
                reply = await self._command(token, what, command)
        elif "LOGIN" in mechanisms:
            reply = await self._command(b"AUTH LOGIN", what, command)
            if reply.code == 334:
                reply = await self._command(base64.b64encode(username), what, command)
            if reply.code == 334:
                reply = await self._command(base64.b64encode(password), what, command)
        else:
            offered = " ".join(mechanisms) or "none"
            text = (
                f"4.7.0 {self.next_hop} offers no AUTH mechanism we use "
                f"(PLAIN, LOGIN; offered: {offered})"
            )
            raise _HopFailure(451, text, self.next_hop)
        if reply.code == 334:
            # A challenge we do not understand: abort the exchange (RFC 4954 4).
            reply = await self._command(b"*", what, command)
        if reply.code != 235:
            code = 421 if reply.code == 421 else 451
            text = f"4.7.8 authentication to {self.next_hop} failed: {reply}"
            raise _HopFailure(code, text, self.next_hop)

    def _result(self, index: int, reply: _Reply, what: str) -> None:
        """Record the next hop's C{reply} as recipient C{index}'s result."""
        recipient = self.job.recipients[index]
        if reply.code // 100 in (2, 4, 5):
            result = RecipientResult(recipient, reply.code, reply.text, self.next_hop)
        else:
            text = f"4.5.0 unexpected reply from {self.next_hop} to {what}: {reply}"
            result = RecipientResult(recipient, 451, text, self.next_hop)
        self._results[index] = result

    def _all_results(
        self, reply: _Reply | _HopFailure, what: str = ""
    ) -> list[RecipientResult]:
        """
        Every recipient not yet decided gets C{reply}; all the results, in
        recipient order.
        """
        for index, recipient in enumerate(self.job.recipients):
            if index in self._results:
                continue
            if isinstance(reply, _Reply):
                self._result(index, reply, what)
            else:
                self._results[index] = RecipientResult(
                    recipient, reply.code, reply.text, self.next_hop
                )
        return [self._results[i] for i in range(len(self.job.recipients))]

    async def _transaction(self, extensions: dict[str, str]) -> list[RecipientResult]:
        t = self.timeouts
        job = self.job
        addresses = [job.sender or ""] + list(job.recipients)
        if _UNSAFE_PATH.search(job.sender or ""):
            self._quit()
            failure = _HopFailure(553, "5.1.7 malformed sender address", self.next_hop)
            return self._all_results(failure)
        if not all(a.isascii() for a in addresses) and "SMTPUTF8" not in extensions:
            self._quit()
            text = (
                f"5.6.7 non-ASCII address, and {self.next_hop} does not offer "
                "SMTPUTF8 (RFC 6531)"
            )
            return self._all_results(_HopFailure(553, text, self.next_hop))
        limit = extensions.get("SIZE", "")
        if limit.isdigit() and 0 < int(limit) < job.size:
            # RFC 1870 6.1: do not send what the server said it would refuse.
            self._quit()
            text = (
                f"5.3.4 message size {job.size} exceeds the limit {limit} "
                f"of {self.next_hop}"
            )
            return self._all_results(_HopFailure(552, text, self.next_hop))

        mail = b"MAIL FROM:<" + (job.sender or "").encode("utf-8") + b">"
        if "SIZE" in extensions:
            mail += b" SIZE=%d" % job.size  # RFC 1870
        if job.eight_bit and "8BITMIME" in extensions:
            mail += b" BODY=8BITMIME"  # RFC 6152
        if not all(a.isascii() for a in addresses):
            mail += b" SMTPUTF8"  # RFC 6531 3.4
        reply = await self._command(mail, "the reply to MAIL FROM", t.command)
        if reply.code // 100 != 2:
            if reply.code // 100 == 5:
                self._quit()
                return self._all_results(reply, "MAIL FROM")
            raise self._refused(reply)
        self._mail_accepted = True

        accepted: list[int] = []
        for index, recipient in enumerate(job.recipients):
            if _UNSAFE_PATH.search(recipient):
                text = "5.1.3 malformed recipient address"
                result = RecipientResult(recipient, 553, text, self.next_hop)
                self._results[index] = result
                continue
            line = b"RCPT TO:<" + recipient.encode("utf-8") + b">"
            reply = await self._command(line, "the reply to RCPT TO", t.command)
            if reply.code == 421:
                # The server is closing: nobody left (nor anyone accepted so
                # far) gets through this time.
                self._close()
                return self._all_results(reply)
            if reply.code // 100 == 2:
                # Not a result yet: only the reply after DATA is.
                accepted.append(index)
            else:
                self._result(index, reply, "RCPT TO")
        if not accepted:
            # Every recipient has its refusal: no DATA.
            self._quit()
            return self._all_results(reply)

        reply = await self._command(b"DATA", "the reply to DATA", t.data_init)
        if reply.code != 354:
            if reply.code == 421:
                self._close()
            else:
                self._quit()
            if reply.code // 100 not in (4, 5):
                text = f"4.5.0 unexpected reply from {self.next_hop} to DATA: {reply}"
                return self._all_results(_HopFailure(451, text, self.next_hop))
            return self._all_results(reply, "DATA")
        await self._send_body()
        reply = await self._reply("the reply to the end of the message", t.data_final)
        self._quit()
        return self._all_results(reply, "the end of the message")

    async def _send_body(self) -> None:
        """
        Stream the message file, encoded for the wire, at the pace the
        connection takes it; each block has C{data_block} seconds to go.
        """
        encoder = _WireEncoder()
        self.job.file.seek(0)
        waiter = self._waiter = Deferred()
        self._arm(self.timeouts.data_block, "the server to take the message")

        def chunk(data: bytes) -> bytes:
            self._arm(self.timeouts.data_block, "the server to take the message")
            return encoder.encode(data)

        def sent(ignored) -> None:
            if self._waiter is waiter:
                self._waiter = None
                self._disarm()
                waiter.callback(None)

        transfer = FileSender().beginFileTransfer(self.job.file, self.transport, chunk)
        # A stopped transfer means a lost connection, reported by _end.
        transfer.addCallbacks(sent, lambda failure: None)
        await waiter
        self.transport.write(encoder.finish())

    # -- the end -------------------------------------------------------------

    def _settle(self, outcome) -> None:
        """Fire L{finished} with the results, or the failure before any."""
        if isinstance(outcome, Failure):
            if outcome.check(_HopFailure):
                failure = outcome.value
            else:
                log.failure(
                    "{queue_id}: SMTP client error with {next_hop}",
                    outcome,
                    queue_id=self.job.queue_id,
                    next_hop=self.next_hop,
                )
                failure = _HopFailure(451, "4.3.0 internal error in the SMTP client")
                self._end(failure)
                if self._connected:
                    self.transport.abortConnection()
            if self._connected and self._ended is None:
                if failure.code == 421:
                    self._close()
                else:
                    self._quit()
            if self._mail_accepted:
                outcome = self._all_results(failure)
            else:
                failure.next_hop = failure.next_hop or self.next_hop
                outcome = failure
        self.finished.callback(outcome)

    def _close(self) -> None:
        """Hang up at once (after a 421 the server is closing anyway)."""
        self._end(_HopFailure(451, f"4.4.2 closed the connection to {self.next_hop}"))
        if self._connected:
            self.transport.loseConnection()

    def _quit(self) -> None:
        """Say QUIT and hang up after the reply (or a short wait)."""
        if self._ended is not None or not self._connected:
            return

        async def quit() -> None:
            try:
                await self._command(b"QUIT", "the reply to QUIT", self.timeouts.quit)
            except _HopFailure:
                pass
            if self._connected:
                self.transport.loseConnection()

        Deferred.fromCoroutine(quit())

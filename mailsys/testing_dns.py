"""
A loopback DNS server for tests, so that MX routing and C{mailsys
check-dns} can be exercised with the real resolver code
(C{twisted.names.client}) and no network.

    port, stop = start_dns(reactor, {
        "b.test": {"MX": [(10, "mx1.b.test"), (20, "mx2.b.test")]},
        "mx1.b.test": {"A": ["127.0.0.1"]},
        "mx2.b.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
        "nomail.test": {"MX": [(0, ".")]},        # null MX, RFC 7505
        "broken.test": "SERVFAIL",
        "c.test": {"TXT": ["v=spf1 mx -all", ("two ", "strings")]},
        "_imaps._tcp.c.test": {"SRV": [(0, 1, 993, "mail.c.test")]},
        "autoconfig.c.test": {"CNAME": ["mail.c.test"]},
    })
    resolver = make_resolver(reactor, f"127.0.0.1:{port}")
    ...
    await stop()

A name that is not in the table does not exist (NXDOMAIN); a name that is
there without records of the type asked answers with none (NODATA); a name
mapped to C{"SERVFAIL"} fails every query with SERVFAIL.  The server
listens on UDP only: the answers are small enough never to need TCP.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from twisted.internet import defer
from twisted.names import common, dns, error, server

SERVFAIL = "SERVFAIL"


class _ServerFailure(Exception):
    """Answer SERVFAIL (without logging an error, as an unexpected failure would)."""


class _Zone(common.ResolverBase):
    """Answers from the table given to L{start_dns}, authoritatively."""

    def __init__(self, records: Mapping[str, Any]) -> None:
        super().__init__()
        self.records = {name.lower().rstrip("."): v for name, v in records.items()}

    def _lookup(self, name, cls, type, timeout):
        key = (name.decode("ascii") if isinstance(name, bytes) else name).lower()
        key = key.rstrip(".")
        if key not in self.records:
            return defer.fail(error.DomainError(key))
        entry = self.records[key]
        if entry == SERVFAIL:
            return defer.fail(_ServerFailure(key))
        answers = [
            dns.RRHeader(name=key, type=type, ttl=60, payload=payload, auth=True)
            for payload in _payloads(entry, type)
        ]
        return defer.succeed((answers, [], []))


def _payloads(entry: Mapping[str, Any], type: int) -> list:
    if type == dns.TXT:
        # A string is one TXT record of one string; a tuple, one record of
        # several strings (RFC 1035 3.3.14).
        return [
            dns.Record_TXT(*[part.encode("utf-8") for part in _strings(text)], ttl=60)
            for text in entry.get("TXT", [])
        ]
    if type == dns.SRV:
        return [
            # The target "." (the root) says "not offered" (RFC 2782).
            dns.Record_SRV(
                priority, weight, port, target.rstrip(".").encode("ascii"), ttl=60
            )
            for priority, weight, port, target in entry.get("SRV", [])
        ]
    if type == dns.CNAME:
        return [
            dns.Record_CNAME(target.rstrip(".").encode("ascii"), ttl=60)
            for target in entry.get("CNAME", [])
        ]
    if type == dns.MX:
        return [
            # "." (the root, an empty name) is the null MX of RFC 7505.
            dns.Record_MX(preference, host.rstrip(".").encode("ascii"), ttl=60)
            for preference, host in entry.get("MX", [])
        ]
    if type == dns.A:
        return [dns.Record_A(address, ttl=60) for address in entry.get("A", [])]
    if type == dns.AAAA:
        return [dns.Record_AAAA(address, ttl=60) for address in entry.get("AAAA", [])]
    return []


def _strings(text: str | tuple[str, ...]) -> tuple[str, ...]:
    return (text,) if isinstance(text, str) else tuple(text)


class _ServerFactory(server.DNSServerFactory):
    noisy = False

    def gotResolverError(self, failure, protocol, message, address):
        if failure.check(_ServerFailure):
            response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
            self.sendReply(protocol, response, address)
            return None
        return super().gotResolverError(failure, protocol, message, address)


def start_dns(
    reactor, records: Mapping[str, Any]
) -> tuple[int, Callable[[], defer.Deferred]]:
    """
    Serve C{records} on C{127.0.0.1}, on a free UDP port.

    @param records: name -> C{{"MX": [(preference, host), ...], "A": [...],
        "AAAA": [...], "TXT": [text or (string, ...), ...], "SRV":
        [(priority, weight, port, target), ...], "CNAME": [target]}}, or
        name -> C{"SERVFAIL"}; see the module docstring.
    @return: C{(port, stop)}; C{stop()} closes the port and returns a
        L{Deferred} that fires once it is closed.
    """
    factory = _ServerFactory(authorities=[_Zone(records)])
    protocol = dns.DNSDatagramProtocol(factory, reactor=reactor)
    protocol.noisy = False
    listening = reactor.listenUDP(0, protocol, interface="127.0.0.1")

    def stop() -> defer.Deferred:
        return defer.maybeDeferred(listening.stopListening)

    return listening.getHost().port, stop

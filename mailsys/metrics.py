"""
Every metric of the mail system, in one place, for C{/metrics}.

Why one module: an operator reading a dashboard should find each number's
meaning and its exact point of measurement here, not scattered over the
protocols.  The protocols only call small methods (C{auth_failed()},
C{message_accepted()}) on what they were given; by default they are given
L{SILENT}, which does nothing, so protocol code and its tests need no
metrics at all.

Each running system owns its L{MailMetrics} and its own
C{prometheus_client.CollectorRegistry}, never the library's global
registry: two instances in one process (the tests) would otherwise share,
or refuse to register, the same counters.

Labels are bounded: C{service} is a listener name from
L{mailsys.config.LISTENERS}; refusal reasons are the RFC 3463 subject
classes below, never reply text (which holds addresses).
"""

from __future__ import annotations

import re
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

# RFC 3463 3.1-3.9: the second number of an enhanced status code is the
# subject of the problem.  A refusal is counted under its subject, so that
# "unknown users" (x.1.x) and "relay denied" (x.7.x) are separate lines.
REFUSAL_REASONS = {
    "0": "other",
    "1": "address",
    "2": "mailbox",
    "3": "system",
    "4": "routing",
    "5": "protocol",
    "6": "content",
    "7": "policy",
}

_STATUS = re.compile(rb"\s*[245]\.(\d{1,3})\.\d{1,3}(?:\s|$)")

# Delivery latency, arrival to delivered: local delivery takes milliseconds,
# a remote one seconds, a retried one minutes to days (give_up_after is 5
# days by default).
LATENCY_BUCKETS = (
    0.05,
    0.25,
    1.0,
    5.0,
    15.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4 * 3600.0,
    24 * 3600.0,
    5 * 24 * 3600.0,
    float("inf"),
)

# Listeners that take messages over SMTP, and those that take passwords.
_SMTP_LISTENERS = {"smtp", "submission", "submissions"}
_LOGIN_LISTENERS = {"submission", "submissions", "imap", "imaps", "pop3", "pop3s"}

# The outcomes of one recipient's delivery attempt, as the queue records it.
QUEUE_RESULTS = ("delivered", "deferred", "bounced")


def refusal_reason(reply: bytes | str) -> str:
    """
    The reason class of an SMTP reply text such as
    C{b"5.7.1 <x@y>: Relay access denied"}: C{"policy"}; C{"other"} when it
    carries no enhanced status code.
    """
    if isinstance(reply, str):
        reply = reply.encode("utf-8", "replace")
    match = _STATUS.match(reply)
    if match is None:
        return "other"
    return REFUSAL_REASONS.get(match.group(1).decode("ascii"), "other")


class _Silent:
    """
    The metrics of a component nobody measures: every call does nothing.
    The default of every factory and of the queue runner.
    """

    def service(self, name: str) -> _Silent:
        return self

    def connection_opened(self) -> None:
        pass

    def connection_closed(self) -> None:
        pass

    def connection_refused(self) -> None:
        pass

    def message_accepted(self) -> None:
        pass

    def message_refused(self, stage: str, reply: bytes | str) -> None:
        pass

    def auth_failed(self) -> None:
        pass

    def queue_result(self, result: str, latency: float | None = None) -> None:
        pass


SILENT = _Silent()


class ServiceMetrics:
    """
    The metrics of one listener (C{smtp}, C{submission}, C{imaps}, ...),
    given to its factory: the protocols call these methods without knowing
    which listener they serve.
    """

    def __init__(self, metrics: MailMetrics, service: str) -> None:
        self._metrics = metrics
        self.name = service
        self._connections = metrics.connections.labels(service=service)
        self._open = metrics.connections_open.labels(service=service)
        self._refused_connections = metrics.connections_refused.labels(service=service)
        # Shown as 0 from the start where they can happen, absent elsewhere.
        if service in _SMTP_LISTENERS:
            metrics.messages_accepted.labels(service=service)
        if service in _LOGIN_LISTENERS:
            metrics.auth_failures.labels(service=service)

    def connection_opened(self) -> None:
        """A connection was accepted (counted in total and as open)."""
        self._connections.inc()
        self._open.inc()

    def connection_closed(self) -> None:
        """An accepted connection ended."""
        self._open.dec()

    def connection_refused(self) -> None:
        """A connection was turned away by the connection limits."""
        self._refused_connections.inc()

    def message_accepted(self) -> None:
        """SMTP: a message got its 250 after DATA (it is on disk)."""
        self._metrics.messages_accepted.labels(service=self.name).inc()

    def message_refused(self, stage: str, reply: bytes | str) -> None:
        """
        SMTP: a refusal at C{stage} (C{"mail"}, C{"rcpt"} or C{"data"});
        C{reply} is the reply text after the code, whose enhanced status
        code gives the reason class.  A refused recipient counts once.
        """
        self._metrics.messages_refused.labels(
            service=self.name, stage=stage, reason=refusal_reason(reply)
        ).inc()

    def auth_failed(self) -> None:
        """A login with a wrong user name or password (SMTP AUTH, POP3, IMAP)."""
        self._metrics.auth_failures.labels(service=self.name).inc()


class _QueueCollector:
    """
    Queue size and the age of its oldest entry, computed at each scrape
    from the runner's entries, so they are never stale.

    A scrape runs in a thread (C{/metrics} is a WSGI application): the
    entries are copied with one C{dict.copy()}, which the GIL makes atomic,
    and only immutable values of the copy are read.
    """

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    def describe(self) -> list[Metric]:
        return list(self._families(0, None))

    def collect(self) -> Iterator[Metric]:
        entries = self.runner.entries.copy()
        oldest = min((entry.created for entry in entries.values()), default=None)
        return self._families(len(entries), oldest)

    def _families(self, size: int, oldest: float | None) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "mailsys_queue_entries",
            "Messages in the outbound queue (held ones included)",
            value=size,
        )
        age = 0.0 if oldest is None else max(0.0, self.runner.clock.seconds() - oldest)
        yield GaugeMetricFamily(
            "mailsys_queue_oldest_age_seconds",
            "Age of the oldest message in the outbound queue; 0 when empty",
            value=age,
        )


class MailMetrics:
    """
    The metrics of one running mail system, in its own registry.

    @ivar registry: what C{/metrics} exposes.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.connections = Counter(
            "mailsys_connections",
            "Connections accepted, by listener",
            ["service"],
            registry=registry,
        )
        self.connections_open = Gauge(
            "mailsys_connections_open",
            "Connections open now, by listener",
            ["service"],
            registry=registry,
        )
        self.connections_refused = Counter(
            "mailsys_connections_refused",
            "Connections turned away by the connection limits, by listener",
            ["service"],
            registry=registry,
        )
        self.messages_accepted = Counter(
            "mailsys_smtp_messages_accepted",
            "Messages accepted (250 after DATA), by listener",
            ["service"],
            registry=registry,
        )
        self.messages_refused = Counter(
            "mailsys_smtp_messages_refused",
            "SMTP refusals at MAIL, RCPT (per recipient) or end of DATA,"
            " by listener, stage and RFC 3463 reason class",
            ["service", "stage", "reason"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "mailsys_auth_failures",
            "Logins refused for a wrong user name or password, by listener",
            ["service"],
            registry=registry,
        )
        self.queue_results = Counter(
            "mailsys_queue_deliveries",
            "Outbound queue: recipients delivered, deferred or bounced",
            ["result"],
            registry=registry,
        )
        self.delivery_latency = Histogram(
            "mailsys_queue_delivery_latency_seconds",
            "Outbound queue: time from arrival to delivery, per recipient",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        for result in QUEUE_RESULTS:
            self.queue_results.labels(result=result)  # present from the start
        self._services: dict[str, ServiceMetrics] = {}

    def service(self, name: str) -> ServiceMetrics:
        """The metrics of the listener called C{name}."""
        if name not in self._services:
            self._services[name] = ServiceMetrics(self, name)
        return self._services[name]

    def queue_result(self, result: str, latency: float | None = None) -> None:
        """
        The queue recorded C{result} (one of L{QUEUE_RESULTS}) for one
        recipient; C{latency} is the time since arrival, for a delivery.
        """
        self.queue_results.labels(result=result).inc()
        if result == "delivered" and latency is not None:
            self.delivery_latency.observe(max(0.0, latency))

    def watch_queue(self, runner: Any) -> None:
        """Expose the size and oldest age of C{runner}'s queue."""
        self.registry.register(_QueueCollector(runner))

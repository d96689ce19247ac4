"""
Tests for L{mailsys.metrics} and C{/metrics}: the counters count what
happened on the wire, as an operator's Prometheus would read them.

The end-to-end test sends real traffic (smtplib, imaplib, poplib) to a real
instance built by L{mailsys.tap.build} on loopback port 0, scrapes
C{/metrics} over HTTP and parses it with C{prometheus_client}'s own parser.
"""

from __future__ import annotations

import base64
import dataclasses
import imaplib
import poplib
import smtplib
import urllib.request
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailsys.accounts import UserStore
from mailsys.metrics import MailMetrics, refusal_reason
from mailsys.testing import CHEAP_HASHER
from tests.test_web import RunningInstance, instance_config

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of a scrape by (name, sorted labels), via prometheus_client's parser."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def sample(found: Samples, name: str, **labels: str) -> float:
    """One sample, which must be present."""
    return found[(name, tuple(sorted(labels.items())))]


class RefusalReasonTests(SynchronousTestCase):
    """Refusals are counted by the subject of their RFC 3463 status code."""

    def test_reasons(self):
        """Unknown users, relay denials, size, content, loops and local
        errors land in separate classes; replies without an enhanced code
        in "other", never in a label made from client text."""
        table = {
            "5.1.1 <nobody@example.test>: User unknown": "address",
            b"5.7.1 <a@elsewhere.example>: Relay access denied": "policy",
            "5.2.2 Mailbox full": "mailbox",
            "5.3.4 Message exceeds the size limit": "system",
            "5.4.6 Routing loop detected": "routing",
            "5.5.4 Bad SIZE parameter": "protocol",
            "5.6.0 Message contains a bare CR": "content",
            "4.3.0": "system",
            "Requested action not taken": "other",
            "5.9.1 no such subject": "other",
            "": "other",
        }
        for reply, reason in table.items():
            self.assertEqual(refusal_reason(reply), reason, reply)


@dataclass
class Entry:
    created: float


class FakeRunner:
    """What the queue gauges read of a QueueRunner: its entries and clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.entries: dict[str, Entry] = {}


class MailMetricsTests(SynchronousTestCase):
    """The registry of one running system."""

    def scrape(self, metrics: MailMetrics) -> Samples:
        return samples(generate_latest(metrics.registry).decode())

    def test_queue_gauges(self):
        """Queue size and the oldest entry's age are read at each scrape:
        0 and 0 when empty, then the current values, never stale ones."""
        clock = Clock()
        runner = FakeRunner(clock)
        metrics = MailMetrics()
        metrics.watch_queue(runner)
        found = self.scrape(metrics)
        self.assertEqual(sample(found, "mailsys_queue_entries"), 0)
        self.assertEqual(sample(found, "mailsys_queue_oldest_age_seconds"), 0)
        clock.advance(1000)
        runner.entries = {"A": Entry(940.0), "B": Entry(970.0)}
        found = self.scrape(metrics)
        self.assertEqual(sample(found, "mailsys_queue_entries"), 2)
        self.assertEqual(sample(found, "mailsys_queue_oldest_age_seconds"), 60)
        clock.advance(30)
        found = self.scrape(metrics)
        self.assertEqual(sample(found, "mailsys_queue_oldest_age_seconds"), 90)

    def test_queue_results(self):
        """Delivered, deferred and bounced are counted (0 from the start),
        and each delivery's time since arrival goes into the histogram."""
        metrics = MailMetrics()
        found = self.scrape(metrics)
        for result in ("delivered", "deferred", "bounced"):
            self.assertEqual(sample(found, "mailsys_queue_deliveries_total", result=result), 0)
        metrics.queue_result("deferred")
        metrics.queue_result("delivered", 2.0)
        metrics.queue_result("delivered", 400.0)
        metrics.queue_result("bounced")
        found = self.scrape(metrics)
        self.assertEqual(sample(found, "mailsys_queue_deliveries_total", result="delivered"), 2)
        self.assertEqual(sample(found, "mailsys_queue_deliveries_total", result="deferred"), 1)
        self.assertEqual(sample(found, "mailsys_queue_deliveries_total", result="bounced"), 1)
        latency = "mailsys_queue_delivery_latency_seconds"
        self.assertEqual(sample(found, latency + "_count"), 2)
        self.assertEqual(sample(found, latency + "_sum"), 402.0)
        self.assertEqual(sample(found, latency + "_bucket", le="5.0"), 1)
        self.assertEqual(sample(found, latency + "_bucket", le="900.0"), 2)

    def test_instances_are_separate(self):
        """Two systems in one process count separately, and neither writes
        to prometheus_client's global registry."""
        first, second = MailMetrics(), MailMetrics()
        first.service("smtp").auth_failed()
        first.service("smtp").auth_failed()
        second.service("smtp").auth_failed()
        name = "mailsys_auth_failures_total"
        self.assertEqual(sample(self.scrape(first), name, service="smtp"), 2)
        self.assertEqual(sample(self.scrape(second), name, service="smtp"), 1)
        self.assertIsNone(REGISTRY.get_sample_value(name, {"service": "smtp"}))

    def test_connections(self):
        """Connections are counted when opened, and the open gauge goes
        back down when they close; refusals have their own counter."""
        metrics = MailMetrics()
        imap = metrics.service("imap")
        imap.connection_opened()
        imap.connection_opened()
        imap.connection_closed()
        imap.connection_refused()
        found = self.scrape(metrics)
        self.assertEqual(sample(found, "mailsys_connections_total", service="imap"), 2)
        self.assertEqual(sample(found, "mailsys_connections_open", service="imap"), 1)
        self.assertEqual(sample(found, "mailsys_connections_refused_total", service="imap"), 1)


def message(sender: str, subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "alice@example.test"
    msg["Subject"] = subject
    msg.set_content("Counted.\n")
    return bytes(msg)


class ScrapeAfterTrafficTests(TestCase):
    """C{/metrics} of a real instance after real SMTP, IMAP and POP3 traffic."""

    @inlineCallbacks
    def setUp(self):
        self.state = Path(self.mktemp()).resolve()
        self.state.mkdir(parents=True)
        config = instance_config(self.state)
        plain_pop3 = dataclasses.replace(config.listen, pop3="tcp:0:interface=127.0.0.1")
        config = dataclasses.replace(config, listen=plain_pop3)
        UserStore(config.users_file, config.domains, hasher=CHEAP_HASHER).add(
            "alice@example.test", "secret"
        )
        self.system, self.ports = yield RunningInstance().start(self, config)

    def delivered(self) -> Deferred:
        """Fires once the queue records a delivery (after the runner's own
        bookkeeping for it is done)."""
        d: Deferred = Deferred()
        metrics = self.system.metrics
        original = metrics.queue_result

        def observe(result: str, latency: float | None = None) -> None:
            original(result, latency)
            if result == "delivered" and not d.called:
                reactor.callLater(0, d.callback, None)

        metrics.queue_result = observe
        return d

    def inbound(self) -> None:
        """On the MX port: one message to a user of ours, with one unknown
        recipient and one foreign one refused."""
        with smtplib.SMTP("127.0.0.1", self.ports["smtp"], timeout=10) as client:
            client.ehlo("client.example")
            client.mail("bob@remote.example")
            self.assertEqual(client.rcpt("alice@example.test")[0], 250)
            self.assertEqual(client.rcpt("nobody@example.test")[0], 550)
            self.assertEqual(client.rcpt("carol@elsewhere.example")[0], 550)
            self.assertEqual(client.data(message("bob@remote.example", "inbound"))[0], 250)

    def submission(self) -> None:
        """On the submission port: one wrong password, then a message."""
        with smtplib.SMTP("127.0.0.1", self.ports["submission"], timeout=10) as client:
            client.ehlo("client.example")
            wrong = base64.b64encode(b"\0alice@example.test\0wrong").decode()
            self.assertEqual(client.docmd("AUTH", "PLAIN " + wrong)[0], 535)
            client.login("alice@example.test", "secret")
            client.sendmail(
                "alice@example.test",
                ["alice@example.test"],
                message("alice@example.test", "submitted"),
            )

    def wrong_logins(self) -> None:
        """One wrong IMAP login and one wrong POP3 login."""
        imap = imaplib.IMAP4("127.0.0.1", self.ports["imap"], timeout=10)
        with self.assertRaises(imaplib.IMAP4.error):
            imap.login("alice@example.test", "wrong")
        imap.logout()
        pop = poplib.POP3("127.0.0.1", self.ports["pop3"], timeout=10)
        pop.user("alice@example.test")
        with self.assertRaises(poplib.error_proto):
            pop.pass_("wrong")
        pop.quit()

    def scrape(self) -> tuple[int, str, bytes]:
        """GET /metrics as Prometheus does, with a client outside Twisted."""
        url = f"http://127.0.0.1:{self.ports['http']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["content-type"], response.read()

    @inlineCallbacks
    def test_scrape(self):
        """After the traffic, one scrape shows it all: connections per
        listener, the accepted messages, the refusals by reason class, the
        failed logins per service, the queued delivery with its latency,
        and an empty queue."""
        delivered = self.delivered()
        yield deferToThread(self.inbound)
        yield deferToThread(self.submission)
        yield deferToThread(self.wrong_logins)
        yield delivered

        code, content_type, body = yield deferToThread(self.scrape)
        self.assertEqual(code, 200)
        self.assertTrue(content_type.startswith("text/plain; version=0.0.4"), content_type)
        found = samples(body.decode("utf-8"))

        for service in ("smtp", "submission", "imap", "pop3", "http"):
            self.assertEqual(sample(found, "mailsys_connections_total", service=service), 1, service)
        # The scrape's own connection is open while it is answered.
        self.assertEqual(sample(found, "mailsys_connections_open", service="http"), 1)

        accepted = "mailsys_smtp_messages_accepted_total"
        self.assertEqual(sample(found, accepted, service="smtp"), 1)
        self.assertEqual(sample(found, accepted, service="submission"), 1)
        refused = "mailsys_smtp_messages_refused_total"
        self.assertEqual(
            sample(found, refused, service="smtp", stage="rcpt", reason="address"), 1
        )
        self.assertEqual(
            sample(found, refused, service="smtp", stage="rcpt", reason="policy"), 1
        )
        self.assertEqual(
            sorted(labels for name, labels in found if name == refused),
            sorted(
                (("reason", reason), ("service", "smtp"), ("stage", "rcpt"))
                for reason in ("address", "policy")
            ),
        )

        failures = "mailsys_auth_failures_total"
        for service in ("submission", "imap", "pop3"):
            self.assertEqual(sample(found, failures, service=service), 1, service)
        self.assertNotIn((failures, (("service", "smtp"),)), found)

        deliveries = "mailsys_queue_deliveries_total"
        self.assertEqual(sample(found, deliveries, result="delivered"), 1)
        self.assertEqual(sample(found, deliveries, result="deferred"), 0)
        self.assertEqual(sample(found, deliveries, result="bounced"), 0)
        latency = "mailsys_queue_delivery_latency_seconds"
        self.assertEqual(sample(found, latency + "_count"), 1)
        self.assertGreaterEqual(sample(found, latency + "_sum"), 0)
        self.assertEqual(sample(found, "mailsys_queue_entries"), 0)
        self.assertEqual(sample(found, "mailsys_queue_oldest_age_seconds"), 0)

"""
End to end: submission with AUTH over STARTTLS (587) and implicit TLS
(465), through the durable queue, to a local maildir and to a second
mailsys instance for another domain, as two servers on one machine would
exchange mail.
"""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from pathlib import Path

from twisted.internet import reactor, task
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailsys.accounts import UserStore
from mailsys.config import Config, ListenSection, RelaySection, ServerSection
from mailsys.tap import build
from mailsys.testing import (
    CHEAP_HASHER,
    LOOPBACK_ANY_PORT,
    free_port,
    loopback_config,
    settle,
    start,
)


def instance(state: Path, domain: str, smtp_port: int, routes: dict[str, str]) -> Config:
    state.mkdir(parents=True)
    return loopback_config(
        state,
        server=ServerSection(hostname=f"mail.{domain}", state_dir=state),
        listen=ListenSection(
            smtp=f"tcp:{smtp_port}:interface=127.0.0.1",
            submission=LOOPBACK_ANY_PORT,
            submissions=LOOPBACK_ANY_PORT,
        ),
        domains=(domain,),
        aliases={f"sales@{domain}": (f"alice@{domain}",)},
        # Routes cover every foreign domain here; the resolver is never asked.
        relay=RelaySection(routes=routes, resolver="127.0.0.1:53"),
    )


def message(sender: str, to: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content("Hello from the other side.\n")
    return msg


class TwoInstancesTests(TestCase):
    """a.test and b.test, each routing the other's domain to its MX port."""

    @inlineCallbacks
    def setUp(self):
        root = Path(self.mktemp()).resolve()
        port_a, port_b = free_port(), free_port()
        self.systems = {}
        self.ports = {}
        for domain, mine, theirs, other in (
            ("a.test", port_a, port_b, "b.test"),
            ("b.test", port_b, port_a, "a.test"),
        ):
            cfg = instance(root / domain, domain, mine, {other: f"127.0.0.1:{theirs}"})
            users = UserStore(cfg.users_file, cfg.domains, hasher=CHEAP_HASHER)
            users.add(f"alice@{domain}", "alice-pw")
            users.add(f"bob@{domain}", "bob-pw")
            system = build(cfg, reactor)
            self.addCleanup(system.stopService)
            self.systems[domain] = system
            ports = yield start(system, "submission", "submissions")
            for name, port in ports.items():
                self.ports[domain, name] = port
        yield gatherResults([s.getServiceNamed("queue").ready for s in self.systems.values()])

    def inbox(self, domain: str, user: str) -> list[Path]:
        new = self.systems[domain].config.mail_dir / domain / user / "new"
        return sorted(new.iterdir()) if new.exists() else []

    @inlineCallbacks
    def wait_for_mail(self, domain: str, user: str, count: int = 1):
        """Wait for the mail to land, then for every connection to close
        (the queue says QUIT after the 250), so the test ends clean."""
        for _ in range(200):
            found = self.inbox(domain, user)
            if len(found) >= count:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        else:
            self.fail(f"no mail for {user}@{domain}")
        yield settle(reactor, *self.systems.values())
        return found

    def context(self, domain: str) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.systems[domain].config.tls.cert))

    @inlineCallbacks
    def test_submission_starttls_to_other_instance(self):
        """alice@a.test submits over 587 with STARTTLS and AUTH to
        bob@b.test; the queue carries it to b.test's MX and b.test stores it."""
        port = self.ports["a.test", "submission"]
        context = self.context("a.test")

        def send():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.starttls(context=context)
                client.ehlo()
                self.assertIn("auth", client.esmtp_features)
                client.login("alice@a.test", "alice-pw")
                client.send_message(message("alice@a.test", "bob@b.test", "a to b"))

        yield deferToThread(send)
        [path] = yield self.wait_for_mail("b.test", "bob")
        data = path.read_bytes()
        self.assertIn(b"Subject: a to b", data)
        self.assertIn(b"with ESMTPSA id", data)  # a.test's submission
        self.assertIn(b"Return-Path: <alice@a.test>", data)
        self.assertIn(b"Message-ID:", data)

    @inlineCallbacks
    def test_implicit_tls_both_directions(self):
        """Over 465 (implicit TLS) mail goes from b.test to a.test and back,
        and an alias on the receiving side delivers to its user."""
        def send(domain, user, password, to, subject):
            port = self.ports[domain, "submissions"]
            with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=self.context(domain)) as client:
                client.login(user, password)
                client.send_message(message(user, to, subject))

        yield deferToThread(send, "b.test", "bob@b.test", "bob-pw", "sales@a.test", "b to a")
        yield deferToThread(send, "a.test", "alice@a.test", "alice-pw", "alice@b.test", "a to b")
        [to_a] = yield self.wait_for_mail("a.test", "alice")
        [to_b] = yield self.wait_for_mail("b.test", "alice")
        self.assertIn(b"Subject: b to a", to_a.read_bytes())
        self.assertIn(b"Subject: a to b", to_b.read_bytes())

    @inlineCallbacks
    def test_local_submission(self):
        """Mail from alice@a.test to bob@a.test goes through the queue into
        bob's maildir."""
        port = self.ports["a.test", "submission"]
        context = self.context("a.test")

        def send():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.starttls(context=context)
                client.login("alice@a.test", "alice-pw")
                client.send_message(message("alice@a.test", "bob@a.test", "local"))

        yield deferToThread(send)
        [path] = yield self.wait_for_mail("a.test", "bob")
        self.assertIn(b"Subject: local", path.read_bytes())

    @inlineCallbacks
    def test_refusals(self):
        """A wrong password gets 535; sending as someone else gets 553;
        MAIL without AUTH gets 530; the MX port never relays."""
        sub = self.ports["a.test", "submission"]
        context = self.context("a.test")
        mx = self.systems["a.test"].config.listen.smtp.split(":")[1]

        def attempts():
            results = {}
            with smtplib.SMTP("127.0.0.1", sub, timeout=10) as client:
                client.starttls(context=context)
                client.ehlo()
                results["noauth"] = client.mail("alice@a.test")
                try:
                    client.login("alice@a.test", "wrong")
                except smtplib.SMTPAuthenticationError as e:
                    results["wrong"] = (e.smtp_code, e.smtp_error)
                client.rset()
                client.login("alice@a.test", "alice-pw")
                results["spoof"] = client.mail("bob@a.test")
            with smtplib.SMTP("127.0.0.1", int(mx), timeout=10) as client:
                client.ehlo()
                client.mail("alice@a.test")
                results["relay"] = client.rcpt("someone@b.test")
            return results

        results = yield deferToThread(attempts)
        self.assertEqual(results["noauth"][0], 530)
        self.assertEqual(results["wrong"][0], 535)
        self.assertTrue(results["wrong"][1].startswith(b"5.7.8"))
        self.assertEqual(results["spoof"][0], 553)
        self.assertEqual(results["relay"][0], 550)

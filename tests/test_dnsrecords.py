"""
Tests for L{mailsys.dnsrecords} and the commands of L{mailsys.cli_dns}:
the records an administrator is told to publish, and what C{check-dns}
says about a zone served by a loopback C{twisted.names} server.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.names import dns
from twisted.names.error import DNSQueryTimeoutError
from twisted.trial.unittest import SynchronousTestCase, TestCase

import mailsys
from mailsys import config as configuration
from mailsys.dnsrecords import (
    DIFFERENT,
    ERROR,
    MISSING,
    OK,
    Record,
    check_records,
    compare,
    domain_records,
)
from mailsys.queue.client import make_resolver
from mailsys.testing_dns import SERVFAIL, start_dns

from .test_cli import CommandTestCase

PROJECT = Path(mailsys.__file__).resolve().parent.parent

# Some listeners off (imap, pop3, http), one on a development port, one a
# systemd socket.
CONFIG = """\
[server]
hostname = "mail.example.org"
state_dir = "var"

[listen]
smtp = "tcp:25"
submission = "tcp:587"
submissions = "tcp:2465:interface=127.0.0.1"
imaps = "systemd:domain=INET:index=0"
pop3s = "tcp6:995"

[domains]
names = ["example.org", "example.net"]
"""

EXAMPLE_ORG = [
    "; DNS records for example.org, mail served by mail.example.org.",
    "; Check them with: mailsys check-dns example.org",
    "",
    "; Inbound mail: other servers deliver to the MX host on port 25.",
    "example.org.                   IN MX    10 mail.example.org.",
    "; SPF (RFC 7208): only the MX host sends mail from this domain.",
    'example.org.                   IN TXT   "v=spf1 mx -all"',
    "; DMARC (RFC 7489): what receivers do with mail failing SPF, with",
    "; reports to postmaster.  p=none (reports only) is the cautious start;",
    "; p=quarantine sends failing mail to spam.",
    "_dmarc.example.org.            IN TXT  "
    ' "v=DMARC1; p=quarantine; rua=mailto:postmaster@example.org"',
    "; DKIM: signing is not implemented yet, so there is no DKIM record.",
    "",
    "; Mail clients (RFC 6186, RFC 8314): the lowest priority is tried first;",
    '; "0 0 0 ." says the service is not offered (RFC 6186 3.4).',
    "_submission._tcp.example.org.  IN SRV   10 1 587 mail.example.org.",
    "; listen.submissions is on port 2465: forward 465 to it",
    "_submissions._tcp.example.org. IN SRV   0 1 465 mail.example.org.",
    "_imap._tcp.example.org.        IN SRV   0 0 0 .",
    "; listen.imaps names no TCP port: 993 is assumed",
    "_imaps._tcp.example.org.       IN SRV   0 1 993 mail.example.org.",
    "_pop3._tcp.example.org.        IN SRV   0 0 0 .",
    "_pop3s._tcp.example.org.       IN SRV   20 1 995 mail.example.org.",
    "; Client autoconfiguration (Thunderbird, Outlook), on listen.http.",
    "; listen.http is off: nothing answers at these names yet.",
    "autoconfig.example.org.        IN CNAME mail.example.org.",
    "autodiscover.example.org.      IN CNAME mail.example.org.",
    "",
    "; Also: mail.example.org. needs A (and AAAA) records with this server's"
    " public",
    "; addresses, and the reverse DNS (PTR) of each address should be",
    "; mail.example.org. (receivers check it; the owner of the address sets it).",
]

# The zone of example.org as the records above want it.
RIGHT_ZONE = {
    "example.org": {
        "MX": [(10, "mail.example.org")],
        "TXT": ["google-site-verification=abc", ("v=spf1 ", "mx -all")],
    },
    "_dmarc.example.org": {
        "TXT": ["v=DMARC1;p=quarantine;  rua=mailto:postmaster@example.org"]
    },
    "_submission._tcp.example.org": {"SRV": [(10, 1, 587, "mail.example.org")]},
    "_submissions._tcp.example.org": {"SRV": [(0, 1, 465, "mail.example.org")]},
    "_imap._tcp.example.org": {"SRV": [(0, 0, 0, ".")]},
    "_imaps._tcp.example.org": {"SRV": [(5, 0, 993, "MAIL.example.org.")]},
    "_pop3._tcp.example.org": {"SRV": [(0, 0, 0, ".")]},
    "_pop3s._tcp.example.org": {"SRV": [(20, 1, 995, "mail.example.org")]},
    "autoconfig.example.org": {"CNAME": ["mail.example.org"]},
    "autodiscover.example.org": {"CNAME": ["mail.example.org"]},
}


class DNSRecordsCommandTests(CommandTestCase):
    """C{mailsys dns-records [DOMAIN] [--json]}."""

    def setUp(self) -> None:
        super().setUp()
        self.config.write_text(CONFIG)

    def test_oneDomain(self) -> None:
        """
        The zone-file lines for one domain: MX, SPF, DMARC, the RFC 6186
        SRV records with the ports of the listeners ("0 0 0 ." for those
        that are off), the autoconfig names, and comments where something
        needs the administrator (a port to forward, DKIM, PTR).
        """
        status, out, err = self.command("dns-records", "example.org")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out.splitlines(), EXAMPLE_ORG)

    def test_everyDomain(self) -> None:
        """Without a domain, every configured domain gets its block, in order."""
        status, out, err = self.command("dns-records")
        self.assertEqual((status, err), (0, ""))
        first, second = out.split("\n\n; DNS records for ")
        self.assertEqual(first.splitlines(), EXAMPLE_ORG)
        self.assertTrue(second.startswith("example.net, mail served by"))
        self.assertIn("example.net.                   IN MX    10 mail.example.org.", second)

    def test_caseAndTrailingDot(self) -> None:
        """A domain typed in capitals or with a trailing dot is still ours."""
        status, out, err = self.command("dns-records", "Example.ORG.")
        self.assertEqual((status, out.splitlines(), err), (0, EXAMPLE_ORG, ""))

    def test_json(self) -> None:
        """--json gives scripts the records alone, as name, type and value."""
        status, out, err = self.command("dns-records", "--json", "example.net")
        self.assertEqual((status, err), (0, ""))
        [document] = json.loads(out)
        self.assertEqual(document["domain"], "example.net")
        self.assertEqual(document["hostname"], "mail.example.org")
        records = document["records"]
        self.assertEqual(len(records), 11)
        self.assertEqual(
            records[0], {"name": "example.net.", "type": "MX", "value": "10 mail.example.org."}
        )
        self.assertIn(
            {"name": "_pop3._tcp.example.net.", "type": "SRV", "value": "0 0 0 ."},
            records,
        )

    def test_unknownDomain(self) -> None:
        """A domain that is not configured is refused in one line, naming ours."""
        self.assertUserError(
            self.command("dns-records", "example.com"),
            "example.com is not one of our domains (example.org, example.net);"
            " add it to domains.names",
        )

    def test_invalidDomain(self) -> None:
        """A malformed name is refused in one line, without a traceback."""
        status, out, err = self.command("dns-records", "exa mple..org")
        self.assertEqual((status, out), (2, ""))
        self.assertTrue(err.startswith("mailsys: not a valid domain name: "))
        self.assertEqual(err.count("\n"), 1)

    def test_smarthost(self) -> None:
        """
        With a smarthost, mail leaves through someone else's server: the
        SPF comment says to add what that provider asks for.
        """
        self.config.write_text(CONFIG + '\n[relay]\nsmarthost = "smtp.provider.test:587"\n')
        status, out, err = self.command("dns-records", "example.org")
        self.assertEqual(status, 0)
        self.assertIn(
            "; relay.smarthost is set: mail leaves through smtp.provider.test:587,\n"
            "; so add what its provider asks for (include:...) before -all.\n"
            'example.org.                   IN TXT   "v=spf1 mx -all"\n',
            out,
        )

    def test_smtpOff(self) -> None:
        """Without an smtp listener, the MX comment says no mail comes in."""
        self.config.write_text(CONFIG.replace('smtp = "tcp:25"', 'smtp = ""'))
        status, out, err = self.command("dns-records", "example.org")
        self.assertIn(
            "; listen.smtp is off: no mail from other servers is received\n"
            "example.org.                   IN MX    10 mail.example.org.\n",
            out,
        )

    def test_developmentInstance(self) -> None:
        """
        The development instance's ports are not what clients on the
        Internet use: the records give the standard ports, and a comment
        names the listener's own.
        """
        status, out, err = self.command("dns-records", config=False)
        self.assertEqual((status, err), (0, ""))
        self.assertIn(
            "; listen.smtp is on port 2525: forward port 25 to it\n"
            "example.test.                   IN MX    10 mail.example.test.\n",
            out,
        )
        self.assertIn(
            "; listen.imaps is on port 2993: forward 993 to it\n"
            "_imaps._tcp.example.test.       IN SRV   0 1 993 mail.example.test.\n",
            out,
        )


class CompareTests(SynchronousTestCase):
    """L{compare}: how an answer is judged against an expected record."""

    def answers(self, name: str, *payloads) -> list[dns.RRHeader]:
        return [
            dns.RRHeader(name=name, type=p.TYPE, payload=p, auth=True) for p in payloads
        ]

    def test_mxAmongOthers(self) -> None:
        """Our MX host among backups is right, whatever its preference."""
        record = Record("example.org.", "MX", "10 mail.example.org.")
        answers = self.answers(
            "example.org",
            dns.Record_MX(5, b"backup.example.net"),
            dns.Record_MX(20, b"Mail.Example.org"),
        )
        self.assertEqual(compare(record, answers).status, OK)

    def test_nullMX(self) -> None:
        """A null MX (RFC 7505) says the domain takes no mail: different."""
        record = Record("example.org.", "MX", "10 mail.example.org.")
        check = compare(record, self.answers("example.org", dns.Record_MX(0, b"")))
        self.assertEqual(check.describe(), "different (found: 0 .)")

    def test_twoSPFRecords(self) -> None:
        """
        Two SPF records make SPF fail (RFC 7208 4.5) even if one is right:
        different, listing both.
        """
        record = Record("example.org.", "TXT", '"v=spf1 mx -all"')
        answers = self.answers(
            "example.org",
            dns.Record_TXT(b"v=spf1 mx -all"),
            dns.Record_TXT(b"v=spf1 a -all"),
        )
        self.assertEqual(
            compare(record, answers).describe(),
            'different (found: "v=spf1 mx -all", "v=spf1 a -all")',
        )

    def test_otherTXTOnly(self) -> None:
        """TXT records of another kind do not count as the SPF record: missing."""
        record = Record("example.org.", "TXT", '"v=spf1 mx -all"')
        answers = self.answers("example.org", dns.Record_TXT(b"verification=1"))
        self.assertEqual(compare(record, answers).status, MISSING)

    def test_dmarcPolicyDiffers(self) -> None:
        """A cautious p=none is reported as different, showing what is there."""
        record = Record(
            "_dmarc.example.org.",
            "TXT",
            '"v=DMARC1; p=quarantine; rua=mailto:postmaster@example.org"',
        )
        answers = self.answers("_dmarc.example.org", dns.Record_TXT(b"v=DMARC1; p=none"))
        check = compare(record, answers)
        self.assertEqual(
            (check.status, check.found), (DIFFERENT, ('"v=DMARC1; p=none"',))
        )

    def test_srvPort(self) -> None:
        """An SRV record with our host on another port is different."""
        record = Record("_imaps._tcp.example.org.", "SRV", "0 1 993 mail.example.org.")
        answers = self.answers(
            "_imaps._tcp.example.org", dns.Record_SRV(0, 1, 9993, b"mail.example.org")
        )
        self.assertEqual(
            compare(record, answers).describe(),
            "different (found: 0 1 9993 mail.example.org.)",
        )

    def test_srvOfferedWhereNotExpected(self) -> None:
        """A service we do not offer, published as offered, is different."""
        record = Record("_pop3._tcp.example.org.", "SRV", "0 0 0 .")
        answers = self.answers(
            "_pop3._tcp.example.org", dns.Record_SRV(0, 1, 110, b"mail.example.org")
        )
        self.assertEqual(compare(record, answers).status, DIFFERENT)

    def test_controlCharactersInAnswer(self) -> None:
        """Text from DNS cannot break the one-line report."""
        record = Record("example.org.", "TXT", '"v=spf1 mx -all"')
        answers = self.answers("example.org", dns.Record_TXT(b"v=spf1 a\r\nX -all"))
        self.assertEqual(
            compare(record, answers).describe(), 'different (found: "v=spf1 a??X -all")'
        )


class _SilentResolver:
    """A resolver whose every lookup times out (a firewall eating UDP)."""

    def __getattr__(self, name: str):
        def lookup(name: str, timeout=None) -> defer.Deferred:
            return defer.fail(DNSQueryTimeoutError(name))

        return lookup


class CheckRecordsTests(TestCase):
    """L{check_records} against a loopback DNS server, in this process."""

    def records(self) -> list[Record]:
        """The records of example.org for L{CONFIG}."""
        path = Path(self.mktemp())
        path.write_text(CONFIG)
        return domain_records(configuration.load(path), "example.org").records

    def resolver(self, records: dict):
        port, stop = start_dns(reactor, records)
        self.addCleanup(stop)
        return make_resolver(reactor, f"127.0.0.1:{port}")

    async def test_failures(self) -> None:
        """
        A name that does not exist is missing; a server failure or a
        timeout is an error with its reason, for that record alone.
        """
        records = self.records()
        zone = dict(RIGHT_ZONE, **{"autoconfig.example.org": SERVFAIL})
        del zone["_dmarc.example.org"]
        checks = await check_records(self.resolver(zone), records)
        statuses = {check.record.name: check.describe() for check in checks}
        self.assertEqual(statuses["_dmarc.example.org."], "missing")
        self.assertEqual(
            statuses["autoconfig.example.org."],
            "error (the DNS server failed (SERVFAIL))",
        )
        self.assertEqual(
            [check.status for check in checks].count(OK), len(records) - 2
        )

    async def test_timeout(self) -> None:
        """A DNS server that never answers gives an error line per record."""
        records = self.records()[:2]
        checks = await check_records(_SilentResolver(), records)
        self.assertEqual(
            [(c.status, c.describe()) for c in checks],
            [(ERROR, "error (no answer from the DNS server)")] * 2,
        )


class CheckDNSCommandTests(TestCase):
    """
    C{mailsys check-dns} as a real process (it runs a reactor of its own),
    asking a loopback DNS server run by the test.
    """

    def setUp(self) -> None:
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        self.config = base / "mailsys.toml"
        self.config.write_text(CONFIG)

    async def check_dns(self, zone: dict, *argv: str) -> tuple[int, list[str], str]:
        port, stop = start_dns(reactor, zone)
        self.addCleanup(stop)
        env = dict(os.environ, PYTHONPATH=str(PROJECT))
        args = ["-b", "-m", "mailsys.cli", "--config", str(self.config)]
        args += ["check-dns", *argv, "--resolver", f"127.0.0.1:{port}"]
        out, err, status = await getProcessOutputAndValue(
            sys.executable, args, env=env, reactor=reactor
        )
        return status, out.decode().splitlines(), err.decode()

    async def test_someWrong(self) -> None:
        """
        One line per record, the zone-file line then ok, missing or
        different with what was found; exit status 1.
        """
        zone = dict(RIGHT_ZONE)
        del zone["_dmarc.example.org"]
        zone["_submissions._tcp.example.org"] = {
            "SRV": [(0, 1, 465, "other.example.net")]
        }
        status, lines, err = await self.check_dns(zone, "example.org")
        self.assertEqual((status, err), (1, ""))
        self.assertEqual(
            lines,
            [
                f"{line:<101}{result}"  # the statuses line up after the longest
                for line, result in zip(
                    [line for line in EXAMPLE_ORG if line and line[0] != ";"],
                    [
                        "ok",
                        "ok",
                        "missing",
                        "ok",
                        "different (found: 0 1 465 other.example.net.)",
                        "ok",
                        "ok",
                        "ok",
                        "ok",
                        "ok",
                        "ok",
                    ],
                    strict=True,
                )
            ]
            + ["-- 2 of 11 records need attention"],
        )
        self.assertEqual(
            lines[2],
            "_dmarc.example.org.            IN TXT  "
            ' "v=DMARC1; p=quarantine; rua=mailto:postmaster@example.org"  missing',
        )

    async def test_allRight(self) -> None:
        """A zone with every record right: all ok, exit status 0."""
        status, lines, err = await self.check_dns(RIGHT_ZONE, "example.org")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual([line.rsplit(" ", 1)[1] for line in lines[:-1]], ["ok"] * 11)
        self.assertEqual(lines[-1], "-- all 11 records ok")


class CheckDNSUsageTests(CommandTestCase):
    """Mistakes in a C{check-dns} command, refused before any lookup."""

    def setUp(self) -> None:
        super().setUp()
        self.config.write_text(CONFIG)

    def test_badResolver(self) -> None:
        """A resolver that is not an IP address is one line, status 2."""
        self.assertUserError(
            self.command("check-dns", "example.org", "--resolver", "dns.example:53"),
            "resolver: expected an IP address, got 'dns.example:53'",
        )

    def test_unknownDomain(self) -> None:
        """A domain that is not ours is refused as by dns-records."""
        self.assertUserError(
            self.command("check-dns", "example.com"),
            "example.com is not one of our domains (example.org, example.net);"
            " add it to domains.names",
        )


class ProductionConfigTests(SynchronousTestCase):
    """C{etc/mailsys-production.toml}, the example for a real server."""

    def load(self) -> configuration.Config:
        """
        Load the shipped file.  Its TLS files are certbot's; whether this
        machine has them (and may read them) must not decide the test, so
        the file check records the paths instead of opening them.
        """
        self.tls_checked: list[configuration.TLSSection] = []
        self.patch(configuration, "_check_tls_files", self.tls_checked.append)
        return configuration.load(PROJECT / "etc" / "mailsys-production.toml")

    def test_loads(self) -> None:
        """
        The production example is valid: standard ports on every
        interface, state in /var/lib/mailsys, certbot's certificate, and
        no plaintext passwords even from loopback.
        """
        cfg = self.load()
        self.assertEqual(
            cfg.listen.enabled(),
            {
                "smtp": "tcp:25",
                "submission": "tcp:587",
                "submissions": "tcp:465",
                "imap": "tcp:143",
                "imaps": "tcp:993",
                "pop3": "tcp:110",
                "pop3s": "tcp:995",
                "http": "tcp:8080:interface=127.0.0.1",
            },
        )
        self.assertEqual(cfg.state_dir, Path("/var/lib/mailsys"))
        live = Path("/etc/letsencrypt/live/mail.example.org")
        self.assertEqual(
            self.tls_checked,
            [configuration.TLSSection(live / "fullchain.pem", live / "privkey.pem")],
        )
        self.assertFalse(cfg.auth.allow_plaintext_on_loopback)

    def test_dnsRecordsNeedNoForwarding(self) -> None:
        """On the standard ports, dns-records has no port to forward."""
        lines = domain_records(self.load(), "example.org").zone_lines()
        self.assertFalse([line for line in lines if "forward" in line])
        self.assertIn(
            "_imap._tcp.example.org.        IN SRV   10 1 143 mail.example.org.", lines
        )

"""
Tests for L{mailsys.config}: what an administrator sees when the
configuration is right (the effective values) and when it is wrong (one
line naming the file and the key).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tomllib
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailsys import limits
from mailsys.config import (
    LISTENERS,
    AuthSection,
    Config,
    ConfigError,
    LimitsSection,
    ListenSection,
    RelaySection,
    ServerSection,
    SubmissionSection,
    TLSSection,
    describe,
    development,
    load,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "mailsys.toml"

# (what is wrong, the TOML text, the key the error must name, words the
# problem must contain).  One row per mistake an administrator can make.
BAD_CONFIGS = [
    ("unknown section", "[colour]\nx = 1\n", "colour", "unknown section"),
    ("section not a table", "server = 1\n", "server", "expected a table, got 1"),
    ("unknown key", '[server]\ncolour = "red"\n', "server.colour", "unknown key"),
    ("hostname not a string", "[server]\nhostname = 5\n", "server.hostname",
     "expected a string, got 5"),
    ("hostname with underscore", '[server]\nhostname = "mail_1.example"\n',
     "server.hostname", "not a valid hostname: 'mail_1.example'"),
    ("hostname with space", '[server]\nhostname = "mail example"\n',
     "server.hostname", "not a valid hostname"),
    ("hostname leading hyphen", '[server]\nhostname = "-mail.example"\n',
     "server.hostname", "not a valid hostname"),
    ("hostname empty label", '[server]\nhostname = "mail..example"\n',
     "server.hostname", "not a valid hostname"),
    ("hostname is an IP", '[server]\nhostname = "192.0.2.1"\n', "server.hostname",
     "an IP address"),
    ("hostname too long", '[server]\nhostname = "%s"\n' % ".".join(["a" * 63] * 5),
     "server.hostname", "longer than 255 octets"),
    ("state_dir empty", '[server]\nstate_dir = ""\n', "server.state_dir",
     "not a valid path"),
    ("state_dir with NUL", '[server]\nstate_dir = "a\\u0000b"\n', "server.state_dir",
     "not a valid path"),
    ("cert not a string", "[tls]\ncert = []\n", "tls.cert", "expected a string"),
    ("tls unknown key", '[tls]\nchain = "x"\n', "tls.chain", "unknown key"),
    ("auth not a bool", "[auth]\nallow_plaintext_on_loopback = 1\n",
     "auth.allow_plaintext_on_loopback", "expected true or false, got 1"),
    ("auth unknown key", "[auth]\nrequire_tls = true\n", "auth.require_tls",
     "unknown key"),
    ("endpoint port not a number", '[listen]\nsmtp = "tcp:abc"\n', "listen.smtp",
     "not a valid endpoint: 'tcp:abc' (invalid port)"),
    ("endpoint port too large", '[listen]\nimap = "tcp:65536"\n', "listen.imap",
     "(invalid port)"),
    ("endpoint port missing", '[listen]\npop3 = "tcp:"\n', "listen.pop3",
     "(invalid port)"),
    ("endpoint without type", '[listen]\nsmtp = "2525"\n', "listen.smtp",
     "unsupported type '2525'"),
    ("endpoint unknown type", '[listen]\nhttp = "le:/x:tcp:443"\n', "listen.http",
     "unsupported type 'le'"),
    ("endpoint unknown option", '[listen]\nsmtp = "tcp:25:colour=red"\n',
     "listen.smtp", "unknown option 'colour'"),
    ("endpoint control character", '[listen]\nsmtp = "tcp:25:interface=\\n"\n',
     "listen.smtp", "control character"),
    ("endpoint not a string", "[listen]\nsmtp = 2525\n", "listen.smtp",
     "expected a string, got 2525"),
    ("systemd without domain", '[listen]\nsmtp = "systemd:index=0"\n', "listen.smtp",
     "domain="),
    ("systemd with index and name", '[listen]\nsmtp = '
     '"systemd:domain=INET:index=0:name=smtp"\n', "listen.smtp", "exactly one"),
    ("two listeners on one port", '[listen]\nsmtp = "tcp:2525"\nimap = "tcp:2525"\n',
     "listen.imap", "same address as listen.smtp"),
    ("unknown listener", '[listen]\nsmtps = "tcp:465"\n', "listen.smtps",
     "unknown key"),
    ("domains empty", "[domains]\nnames = []\n", "domains.names",
     "at least one domain"),
    ("domains a string", '[domains]\nnames = "example.test"\n', "domains.names",
     "expected a list of domain names"),
    ("domain not a string", "[domains]\nnames = [1]\n", "domains.names",
     "expected a domain name (a string), got 1"),
    ("domain invalid", '[domains]\nnames = ["exa mple.test"]\n', "domains.names",
     "not a valid domain: 'exa mple.test'"),
    ("domain invalid IDNA", '[domains]\nnames = ["a\\u200db.example"]\n',
     "domains.names", "not valid IDNA"),
    ("domain listed twice", '[domains]\nnames = ["example.test", "EXAMPLE.test"]\n',
     "domains.names", "listed twice"),
    ("alias without domain", '[aliases]\npostmaster = ["a@example.test"]\n',
     "aliases.postmaster", "expected local@domain"),
    ("alias outside our domains", '[aliases]\n"a@example.org" = "b@example.test"\n',
     'aliases."a@example.org"', "not one of domains.names"),
    ("alias with slash", '[aliases]\n"a/b@example.test" = "b@example.test"\n',
     'aliases."a/b@example.test"', "a slash"),
    ("alias with dot-dot", '[aliases]\n"..@example.test" = "b@example.test"\n',
     'aliases."..@example.test"', "not a valid local part"),
    ("alias with control character",
     '[aliases]\n"a\\u0001@example.test" = "b@x.test"\n',
     'aliases."a\\u0001@example.test"', "control character"),
    ("alias target with space", '[aliases]\n"a@example.test" = ["b c@example.test"]\n',
     'aliases."a@example.test"', "not a valid address: 'b c@example.test'"),
    ("alias target with bad domain", '[aliases]\n"a@example.test" = ["b@-x.test"]\n',
     'aliases."a@example.test"', "bad domain"),
    ("alias target not a string", '[aliases]\n"a@example.test" = [1]\n',
     'aliases."a@example.test"', "expected an address (a string), got 1"),
    ("alias without targets", '[aliases]\n"a@example.test" = []\n',
     'aliases."a@example.test"', "at least one address"),
    ("alias target a table", '[aliases]\n"a@example.test" = {x = 1}\n',
     'aliases."a@example.test"', "expected a list of addresses"),
    ("alias twice in two cases",
     '[aliases]\n"a@example.test" = "b@x.test"\n"A@example.test" = "c@x.test"\n',
     'aliases."A@example.test"', "differ only in case"),
    ("local part too long", '[aliases]\n"%s@example.test" = "b@x.test"\n' % ("a" * 65),
     'aliases."%s@example.test"' % ("a" * 65), "longer than 64 octets"),
    ("smarthost without port", '[relay]\nsmarthost = "smtp.example.net"\n',
     "relay.smarthost", "expected host:port"),
    ("smarthost port zero", '[relay]\nsmarthost = "smtp.example.net:0"\n',
     "relay.smarthost", "invalid port"),
    ("smarthost bad host", '[relay]\nsmarthost = "smtp_1.example.net:25"\n',
     "relay.smarthost", "invalid host"),
    ("smarthost bad IPv6", '[relay]\nsmarthost = "[2001:db8::zz]:25"\n',
     "relay.smarthost", "invalid host"),
    ("smarthost not a string", "[relay]\nsmarthost = 25\n", "relay.smarthost",
     "expected a string"),
    ("routes not a table", '[relay]\nroutes = "x"\n', "relay.routes",
     "expected a table"),
    ("route for our own domain", '[relay.routes]\n"example.test" = "mx.test:25"\n',
     'relay.routes."example.test"', "delivered here"),
    ("route with bad domain", '[relay.routes]\n"exa mple.org" = "mx.test:25"\n',
     'relay.routes."exa mple.org"', "not a valid domain"),
    ("route with bad next hop", '[relay.routes]\n"example.org" = "mx.test"\n',
     'relay.routes."example.org"', "expected host:port"),
    ("route next hop not a string", '[relay.routes]\n"example.org" = 25\n',
     'relay.routes."example.org"', "expected a string host:port"),
    ("smarthost username without password",
     '[relay]\nsmarthost = "smtp.example.net:587"\nsmarthost_username = "me"\n',
     "relay.smarthost_password", "give both, or neither"),
    ("smarthost password without username",
     '[relay]\nsmarthost = "smtp.example.net:587"\nsmarthost_password = "pw"\n',
     "relay.smarthost_username", "give both, or neither"),
    ("smarthost credentials without smarthost",
     '[relay]\nsmarthost_username = "me"\nsmarthost_password = "pw"\n',
     "relay.smarthost_username", "relay.smarthost, which is not set"),
    ("smarthost password with NUL",
     '[relay]\nsmarthost = "s.example.net:587"\nsmarthost_username = "me"\n'
     'smarthost_password = "a\\u0000b"\n', "relay.smarthost_password", "NUL"),
    ("smarthost password not a string",
     '[relay]\nsmarthost = "s.example.net:587"\nsmarthost_username = "me"\n'
     "smarthost_password = 1234\n", "relay.smarthost_password",
     "expected a string, got 1234"),
    ("smarthost cafile missing", '[relay]\nsmarthost_cafile = "no-such-ca.pem"\n',
     "relay.smarthost_cafile", "cannot read"),
    ("resolver without port", '[relay]\nresolver = "127.0.0.1"\n', "relay.resolver",
     "expected host:port"),
    ("resolver a host name", '[relay]\nresolver = "dns.example.net:53"\n',
     "relay.resolver", "expected IP:port of a DNS server"),
    ("mx_port zero", "[relay]\nmx_port = 0\n", "relay.mx_port",
     "must be between 1 and 65535, got 0"),
    ("mx_port too large", "[relay]\nmx_port = 65536\n", "relay.mx_port",
     "must be between 1 and 65535"),
    ("mx_port a string", '[relay]\nmx_port = "25"\n', "relay.mx_port",
     "expected an integer, got '25'"),
    ("retry_initial zero", "[relay]\nretry_initial = 0\n", "relay.retry_initial",
     "must be a positive number of seconds, got 0"),
    ("retry_max below retry_initial", "[relay]\nretry_initial = 600\nretry_max = 60\n",
     "relay.retry_max", "must be at least relay.retry_initial (600.0)"),
    ("give_up_after a duration string", '[relay]\ngive_up_after = "5d"\n',
     "relay.give_up_after", "expected a number of seconds, got '5d'"),
    ("give_up_after infinite", "[relay]\ngive_up_after = inf\n",
     "relay.give_up_after", "must be a positive number of seconds"),
    ("delay_warning_after negative", "[relay]\ndelay_warning_after = -1\n",
     "relay.delay_warning_after", "must be a zero or positive number of seconds"),
    ("delay_warning_after a bool", "[relay]\ndelay_warning_after = false\n",
     "relay.delay_warning_after", "expected a number of seconds, got false"),
    ("max_concurrent zero", "[relay]\nmax_concurrent = 0\n", "relay.max_concurrent",
     "must be at least 1, got 0"),
    ("max_per_destination a float", "[relay]\nmax_per_destination = 2.5\n",
     "relay.max_per_destination", "expected an integer, got 2.5"),
    ("unknown relay key", "[relay]\nretries = 3\n", "relay.retries", "unknown key"),
    ("submission not a bool", '[submission]\nhide_client_ip = "yes"\n',
     "submission.hide_client_ip", "expected true or false, got 'yes'"),
    ("submission unknown key", "[submission]\nrequire_auth = true\n",
     "submission.require_auth", "unknown key"),
    ("limit not a number", '[limits]\nmax_message_size = "big"\n',
     "limits.max_message_size", "expected an integer, got 'big'"),
    ("limit true for an integer", "[limits]\nmax_recipients = true\n",
     "limits.max_recipients", "expected an integer, got true"),
    ("limit float for an integer", "[limits]\nmax_errors = 1.5\n",
     "limits.max_errors", "expected an integer, got 1.5"),
    ("limit zero", "[limits]\nmax_recipients = 0\n", "limits.max_recipients",
     "must be at least 1, got 0"),
    ("limit negative", "[limits]\nmax_connections = -5\n", "limits.max_connections",
     "must be at least 1, got -5"),
    ("timeout zero", "[limits]\ncommand_timeout = 0\n", "limits.command_timeout",
     "must be a positive number, got 0"),
    ("timeout infinite", "[limits]\ndata_timeout = inf\n", "limits.data_timeout",
     "must be a positive number, got inf"),
    ("timeout not a number", '[limits]\ndata_timeout = "5m"\n', "limits.data_timeout",
     "expected a number, got '5m'"),
    ("timeout a bool", "[limits]\ncommand_timeout = false\n", "limits.command_timeout",
     "expected a number, got false"),
    ("unknown limit", "[limits]\nmax_size = 1\n", "limits.max_size", "unknown key"),
]


class ConfigTestMixin:
    """Write configuration files into a fresh directory per test."""

    def write(self, text: str | bytes, name: str = "mailsys.toml") -> Path:
        """Write C{text} to C{name} in a new directory and return its path."""
        directory = Path(self.mktemp())
        path = directory / name
        path.parent.mkdir(parents=True)
        path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
        return path

    def loadError(self, path: Path | str) -> ConfigError:
        """Load C{path}, which must fail; check the message is one line."""
        error = self.assertRaises(ConfigError, load, path)
        self.assertNotIn("\n", str(error))
        self.assertNotIn("\r", str(error))
        self.assertTrue(str(error).startswith(f"{path}: "), str(error))
        return error


class BadConfigTests(ConfigTestMixin, SynchronousTestCase):
    """
    Every mistake is reported as C{FILE: KEY: PROBLEM} on one line, naming
    the key the administrator has to fix.
    """

    def test_table(self) -> None:
        """
        Each bad configuration in L{BAD_CONFIGS} names its key and problem.
        """
        failures = []
        for what, text, key, words in BAD_CONFIGS:
            path = self.write(text)
            try:
                load(path)
            except ConfigError as error:
                message = str(error)
                if (
                    error.key != key
                    or not message.startswith(f"{path}: {key}: ")
                    or words not in message
                    or "\n" in message
                ):
                    failures.append(f"{what}: {message!r} (key {error.key!r})")
            else:
                failures.append(f"{what}: loaded without error")
        self.assertEqual(failures, [])

    def test_missingFile(self) -> None:
        """A file that is not there is reported as unreadable, by name."""
        path = os.path.join(self.mktemp(), "nowhere.toml")
        error = self.loadError(path)
        self.assertEqual(str(error), f"{path}: cannot read: No such file or directory")
        self.assertIsNone(error.key)

    def test_directoryInsteadOfFile(self) -> None:
        """A directory given as the configuration file is unreadable."""
        path = self.mktemp()
        os.mkdir(path)
        self.assertIn("cannot read", str(self.loadError(path)))

    def test_syntaxError(self) -> None:
        """A TOML syntax error keeps TOML's line and column."""
        path = self.write('[server]\nhostname = "a"\nstate_dir =\n')
        error = self.loadError(path)
        self.assertIn("not valid TOML", str(error))
        self.assertIn("line 3, column", str(error))

    def test_duplicateKey(self) -> None:
        """A key given twice is a TOML error, not a silent override."""
        path = self.write('[server]\nhostname = "a.test"\nhostname = "b.test"\n')
        self.assertIn("not valid TOML", str(self.loadError(path)))

    def test_notUTF8(self) -> None:
        """A file in another encoding is refused with the byte offset."""
        path = self.write(b'[server]\nhostname = "caf\xe9"\n')
        self.assertIn("not valid UTF-8", str(self.loadError(path)))

    def test_fileNameWithNewline(self) -> None:
        """Even a file name with a newline in it gives a one-line error."""
        path = self.write("[colour]\n", name="bad\nname.toml")
        error = self.assertRaises(ConfigError, load, path)
        self.assertNotIn("\n", str(error))
        self.assertIn("bad\\nname.toml: colour: unknown section", str(error))

    def test_onlyCertificate(self) -> None:
        """
        A certificate without its key is refused, naming the missing key
        (generating a new pair would overwrite the operator's certificate).
        """
        path = self.write('[tls]\ncert = "cert.pem"\nkey = "key.pem"\n')
        (path.parent / "cert.pem").write_text("x")
        error = self.loadError(path)
        self.assertEqual(error.key, "tls.key")
        self.assertIn(str(path.parent / "key.pem"), str(error))
        self.assertIn("does not exist but tls.cert does", str(error))

    def test_onlyKey(self) -> None:
        """A key without its certificate is refused, naming the certificate."""
        path = self.write("[server]\nstate_dir = \"state\"\n")
        (path.parent / "state" / "tls").mkdir(parents=True)
        (path.parent / "state" / "tls" / "key.pem").write_text("x")
        error = self.loadError(path)
        self.assertEqual(error.key, "tls.cert")
        self.assertIn("does not exist but tls.key does", str(error))

    def test_unreadableKey(self) -> None:
        """A key that exists but cannot be opened is refused by name."""
        path = self.write('[tls]\ncert = "cert.pem"\nkey = "key.pem"\n')
        (path.parent / "cert.pem").write_text("x")
        (path.parent / "key.pem").mkdir()
        error = self.loadError(path)
        self.assertEqual(error.key, "tls.key")
        self.assertIn("cannot read", str(error))

    def test_danglingSymlinkCertificate(self) -> None:
        """
        A certificate that is a broken symbolic link counts as present (and
        unreadable), so a new pair is never generated through the link.
        """
        path = self.write('[tls]\ncert = "cert.pem"\nkey = "key.pem"\n')
        (path.parent / "cert.pem").symlink_to(path.parent / "gone.pem")
        (path.parent / "key.pem").write_text("x")
        error = self.loadError(path)
        self.assertEqual(error.key, "tls.cert")
        self.assertIn("cannot read", str(error))


class GoodConfigTests(ConfigTestMixin, SynchronousTestCase):
    """What a valid file turns into."""

    def test_emptyFileDefaults(self) -> None:
        """
        An empty file is a working configuration: the documented defaults,
        with state in C{var} next to the file and nothing listening.
        """
        path = self.write("")
        config = load(path)
        base = path.parent.absolute()
        self.assertEqual(config.path, path.absolute())
        state = base / "var"
        self.assertEqual(config.server, ServerSection("mail.example.test", state))
        tls = state / "tls"
        self.assertEqual(config.tls, TLSSection(tls / "cert.pem", tls / "key.pem"))
        self.assertEqual(config.listen, ListenSection())
        self.assertEqual(config.listen.enabled(), {})
        self.assertEqual(config.domains, ("example.test",))
        self.assertEqual(config.aliases, {})
        self.assertEqual(config.relay, RelaySection())
        self.assertEqual(config.submission, SubmissionSection())
        self.assertEqual(config.limits, LimitsSection())
        self.assertEqual(config.auth, AuthSection(allow_plaintext_on_loopback=False))
        self.assertEqual(config.mail_dir, base / "var" / "mail")
        self.assertEqual(config.users_file, base / "var" / "users.json")

    def test_relativePaths(self) -> None:
        """
        Relative paths are relative to the configuration file, not to the
        directory the server is started from, and are stored absolute.
        """
        path = self.write(
            '[server]\nstate_dir = "../data"\n'
            '[tls]\ncert = "certs/mail.pem"\nkey = "/srv/keys/mail.key"\n'
        )
        config = load(os.path.relpath(path))
        top = path.parent.parent.absolute()
        self.assertEqual(config.state_dir, top / "data")
        self.assertEqual(config.tls.cert, path.parent.absolute() / "certs" / "mail.pem")
        self.assertEqual(config.tls.key, Path("/srv/keys/mail.key"))
        self.assertTrue(config.path is not None and config.path.is_absolute())

    def test_tlsDefaultsFollowStateDir(self) -> None:
        """
        Without C{[tls]} the certificate and key are under the configured
        state directory; a C{[tls]} with one key keeps the other default.
        """
        path = self.write('[server]\nstate_dir = "/srv/mail"\n[tls]\ncert = "c.pem"\n')
        config = load(path)
        self.assertEqual(config.tls.key, Path("/srv/mail/tls/key.pem"))
        self.assertEqual(config.tls.cert, path.parent.absolute() / "c.pem")

    def test_existingCertificateAndKey(self) -> None:
        """A readable certificate and key are accepted."""
        path = self.write('[tls]\ncert = "cert.pem"\nkey = "key.pem"\n')
        (path.parent / "cert.pem").write_text("x")
        (path.parent / "key.pem").write_text("y")
        self.assertEqual(load(path).tls.key, path.parent.absolute() / "key.pem")

    def test_domainsNormalised(self) -> None:
        """
        Domains are stored lower-case, in file order, and non-ASCII names
        in their IDNA (xn--) form, as they appear in SMTP.
        """
        path = self.write(
            '[domains]\nnames = ["Example.TEST", "Bücher.example", "localhost"]\n'
        )
        self.assertEqual(
            load(path).domains, ("example.test", "xn--bcher-kva.example", "localhost")
        )

    def test_hostnameNormalised(self) -> None:
        """The hostname is lower-cased and IDNA-encoded like the domains."""
        path = self.write('[server]\nhostname = "Mail.Bücher.example"\n')
        self.assertEqual(load(path).server.hostname, "mail.xn--bcher-kva.example")

    def test_aliasesNormalised(self) -> None:
        """
        Alias keys and targets are lower-cased, a single target string is
        a one-element tuple, and non-ASCII target domains are IDNA-encoded.
        """
        path = self.write(
            '[domains]\nnames = ["example.test", "Bücher.example"]\n'
            "[aliases]\n"
            '"PostMaster@Example.Test" = "Alice@Example.TEST"\n'
            '"team@bücher.example" = ["bob@example.test", "Carol@Bücher.example",'
            ' "dave@elsewhere.example"]\n'
            '"o\'brien+x@example.test" = "a@b"\n'
        )
        self.assertEqual(
            load(path).aliases,
            {
                "postmaster@example.test": ("alice@example.test",),
                "team@xn--bcher-kva.example": (
                    "bob@example.test",
                    "carol@xn--bcher-kva.example",
                    "dave@elsewhere.example",
                ),
                "o'brien+x@example.test": ("a@b",),
            },
        )

    def test_limits(self) -> None:
        """
        Limits are read as given; whole-number timeouts become floats and
        C{max_recipients} may go below RFC 5321's 100 (useful in tests).
        """
        path = self.write(
            "[limits]\nmax_message_size = 1048576\nmax_recipients = 1\n"
            "command_timeout = 30\ndata_timeout = 2.5\nmax_connections = 7\n"
            "max_connections_per_client = 3\nmax_errors = 4\n"
        )
        self.assertEqual(
            load(path).limits, LimitsSection(1048576, 1, 30.0, 2.5, 7, 3, 4)
        )
        self.assertIsInstance(load(path).limits.command_timeout, float)

    def test_limitsDefaults(self) -> None:
        """Limits left out take the values in L{mailsys.limits}."""
        limit = load(self.write("[limits]\nmax_errors = 3\n")).limits
        self.assertEqual(limit.max_errors, 3)
        self.assertEqual(limit.max_message_size, limits.SMTP_MAX_MESSAGE_SIZE)
        self.assertEqual(limit.max_recipients, limits.SMTP_MAX_RECIPIENTS)

    def test_relay(self) -> None:
        """
        The smarthost and routes are normalised: host names lower-case,
        IPv6 literals in brackets, route domains lower-case.
        """
        path = self.write(
            '[relay]\nsmarthost = "SMTP.Example.NET:587"\n'
            '[relay.routes]\n"Example.ORG" = "[2001:DB8::25]:25"\n'
            '"example.net" = "192.0.2.25:2525"\n'
        )
        relay = load(path).relay
        self.assertEqual(relay.smarthost, "smtp.example.net:587")
        self.assertEqual(
            relay.routes,
            {"example.org": "[2001:db8::25]:25", "example.net": "192.0.2.25:2525"},
        )

    def test_relayQueueDefaults(self) -> None:
        """
        Left out, the queue retries like Postfix: after 5 minutes doubling
        to an hour, gives up after 5 days, warns of a delay after 4 hours,
        20 deliveries at once and 4 per domain; MX hosts on port 25, the
        system's resolver and CAs, no smarthost AUTH; submission keeps the
        client's IP and requires the sender to match the user.
        """
        config = load(self.write(""))
        relay = config.relay
        self.assertEqual(
            (relay.retry_initial, relay.retry_max, relay.give_up_after),
            (300.0, 3600.0, 432000.0),
        )
        self.assertEqual(relay.delay_warning_after, 14400.0)
        self.assertEqual((relay.max_concurrent, relay.max_per_destination), (20, 4))
        self.assertEqual((relay.mx_port, relay.resolver), (25, ""))
        self.assertIsNone(relay.smarthost_cafile)
        self.assertEqual((relay.smarthost_username, relay.smarthost_password), ("", ""))
        self.assertEqual(config.submission, SubmissionSection(False, True))

    def test_relayQueueSettings(self) -> None:
        """
        Every C{[relay]} queue and smarthost key is read; times accept
        integers and are kept as floats; the CA file is relative to the
        configuration file; an IPv6 resolver is normalised.
        """
        path = self.write(
            '[relay]\nsmarthost = "smtp.example.net:587"\n'
            'smarthost_username = "me@example.net"\nsmarthost_password = "p w"\n'
            'smarthost_cafile = "ca.pem"\nresolver = "[::1]:5353"\nmx_port = 2525\n'
            "retry_initial = 1\nretry_max = 8.5\ngive_up_after = 100\n"
            "delay_warning_after = 0\nmax_concurrent = 3\nmax_per_destination = 1\n"
            "[submission]\nhide_client_ip = true\nsender_must_match = false\n"
        )
        (path.parent / "ca.pem").write_text("not checked here\n")
        config = load(path)
        self.assertEqual(
            config.relay,
            RelaySection(
                smarthost="smtp.example.net:587",
                smarthost_username="me@example.net",
                smarthost_password="p w",
                smarthost_cafile=path.parent.absolute() / "ca.pem",
                resolver="[::1]:5353",
                mx_port=2525,
                retry_initial=1.0,
                retry_max=8.5,
                give_up_after=100.0,
                delay_warning_after=0.0,
                max_concurrent=3,
                max_per_destination=1,
            ),
        )
        self.assertIsInstance(config.relay.retry_initial, float)
        self.assertEqual(config.submission, SubmissionSection(True, False))

    def test_listeners(self) -> None:
        """
        Empty listeners are off; tcp, tcp6, unix and systemd endpoints are
        accepted; several listeners on port 0 (a free port each) are fine.
        """
        path = self.write(
            '[listen]\nsmtp = "tcp:0:interface=127.0.0.1"\n'
            'submission = "tcp:0:interface=127.0.0.1"\nsubmissions = ""\n'
            'imap = "tcp6:143:interface=\\\\:\\\\:1"\npop3 = "unix:pop3.sock"\n'
            'http = "systemd:domain=INET:name=http"\n'
        )
        listen = load(path).listen
        self.assertEqual(
            list(listen.enabled()), ["smtp", "submission", "imap", "pop3", "http"]
        )
        self.assertEqual(listen.imap, "tcp6:143:interface=\\:\\:1")

    def test_plaintextOnLoopback(self) -> None:
        """C{[auth] allow_plaintext_on_loopback} can be turned on."""
        path = self.write("[auth]\nallow_plaintext_on_loopback = true\n")
        self.assertTrue(load(path).auth.allow_plaintext_on_loopback)


class ExampleFileTests(ConfigTestMixin, SynchronousTestCase):
    """The shipped example, C{etc/mailsys.toml}, stays valid and complete."""

    def copyExample(self) -> Path:
        """
        Copy the example into C{<tmp>/etc/} so that its state (C{../var})
        lands in C{<tmp>/var}, whatever the checkout's own C{var} holds.
        """
        path = Path(self.mktemp()) / "etc" / "mailsys.toml"
        path.parent.mkdir(parents=True)
        shutil.copy(EXAMPLE, path)
        return path

    def test_loads(self) -> None:
        """
        The example loads and describes the development instance's state
        directory and loopback ports, with a postmaster alias.
        """
        path = self.copyExample()
        config = load(path)
        dev = development(path.parent.parent)
        self.assertEqual(config.server, dev.server)
        self.assertEqual(config.tls, dev.tls)
        self.assertEqual(config.listen, dev.listen)
        self.assertEqual(
            config.aliases, {"postmaster@example.test": ("alice@example.test",)}
        )
        self.assertFalse(config.auth.allow_plaintext_on_loopback)

    def test_documentsEveryKey(self) -> None:
        """
        Every section and key the server understands appears in the example
        (so a new setting cannot be added without documenting it).
        """
        example = tomllib.loads(EXAMPLE.read_text("utf-8"))
        effective = tomllib.loads(describe(development(".")))
        for section, keys in effective.items():
            self.assertIn(section, example)
            if section != "aliases":
                self.assertEqual(set(keys), set(example[section]), section)


class DescribeTests(ConfigTestMixin, SynchronousTestCase):
    """
    C{describe} prints the effective configuration as TOML that loads back
    into the same configuration.
    """

    def roundTrip(self, config: Config) -> Config:
        """Write C{describe(config)} to a file and load it."""
        return load(self.write(describe(config)))

    def test_everyKey(self) -> None:
        """Defaults are printed too: every section and key, paths absolute."""
        text = describe(load(self.write("")))
        described = tomllib.loads(text)
        self.assertEqual(
            list(described),
            ["server", "tls", "auth", "listen", "domains", "aliases", "relay",
             "submission", "limits", "imap", "imaps"],
        )
        self.assertEqual(described["imap"], {"read_only": False})
        self.assertEqual(described["imaps"], {"read_only": False})
        self.assertEqual(set(described["listen"]), set(LISTENERS))
        limit_names = {f.name for f in dataclasses.fields(LimitsSection)}
        self.assertEqual(set(described["limits"]), limit_names)
        self.assertTrue(Path(described["server"]["state_dir"]).is_absolute())
        relay_names = {f.name for f in dataclasses.fields(RelaySection)}
        self.assertEqual(set(described["relay"]), relay_names)
        self.assertEqual(described["relay"]["routes"], {})
        self.assertEqual(described["relay"]["smarthost_cafile"], "")
        self.assertEqual(
            described["submission"],
            {"hide_client_ip": False, "sender_must_match": True},
        )

    def test_roundTrip(self) -> None:
        """
        A configuration with every kind of value survives C{describe} and
        C{load}, including quotes, backslashes and non-ASCII in paths.
        """
        path = self.write(
            '[server]\nhostname = "mx.example.test"\n'
            "state_dir = '/srv/ma\"il\\ dé'\n"
            '[tls]\ncert = "c.pem"\nkey = "k.pem"\n'
            "[auth]\nallow_plaintext_on_loopback = true\n"
            '[listen]\nsmtp = "tcp:25"\nimaps = "tcp6:993:interface=\\\\:\\\\:"\n'
            '[domains]\nnames = ["example.test", "example.net"]\n'
            '[aliases]\n'
            '"postmaster@example.test" = ["a@example.test", "b@example.org"]\n'
            '"abuse@example.net" = "postmaster@example.test"\n'
            '[relay]\nsmarthost = "[2001:db8::1]:587"\n'
            'smarthost_username = "u"\nsmarthost_password = "p\\"w"\n'
            'smarthost_cafile = "ca.pem"\nresolver = "192.0.2.53:53"\n'
            "mx_port = 26\nretry_initial = 60\nretry_max = 90.5\n"
            "give_up_after = 1e6\ndelay_warning_after = 0\nmax_concurrent = 9\n"
            '[relay.routes]\n"example.org" = "mx.example.org:25"\n'
            "[submission]\nhide_client_ip = true\nsender_must_match = false\n"
            "[limits]\ncommand_timeout = 12.5\nmax_recipients = 1000\n"
        )
        (path.parent / "ca.pem").write_text("")
        config = load(path)
        self.assertEqual(config.state_dir, Path('/srv/ma"il\\ dé'))
        again = self.roundTrip(config)
        self.assertEqual(dataclasses.replace(again, path=config.path), config)

    def test_developmentRoundTrip(self) -> None:
        """The development configuration can be saved with C{describe}."""
        config = development(self.mktemp())
        self.assertEqual(dataclasses.replace(self.roundTrip(config), path=None), config)

    def test_controlCharactersEscaped(self) -> None:
        """
        Values with control characters (possible in a hand-made Config) are
        escaped, so the output is still valid TOML with the same value.
        """
        config = Config(server=ServerSection(state_dir=Path("/srv/a\x01\tb\n")))
        described = tomllib.loads(describe(config))
        self.assertEqual(described["server"]["state_dir"], "/srv/a\x01\tb\n")


class DevelopmentTests(SynchronousTestCase):
    """The instance a newcomer gets with no configuration file."""

    def test_development(self) -> None:
        """
        It serves C{example.test} from C{<base>/var} on the documented
        unprivileged loopback ports, allowing plaintext passwords from
        loopback only, with no aliases.
        """
        base = self.mktemp()
        config = development(base)
        state = Path(os.path.abspath(base)) / "var"
        self.assertIsNone(config.path)
        self.assertEqual(config.server, ServerSection("mail.example.test", state))
        self.assertTrue(config.state_dir.is_absolute())
        self.assertEqual(
            config.tls,
            TLSSection(state / "tls" / "cert.pem", state / "tls" / "key.pem"),
        )
        self.assertEqual(config.domains, ("example.test",))
        self.assertEqual(config.aliases, {})
        self.assertEqual(config.relay, RelaySection())
        self.assertEqual(config.limits, LimitsSection())
        self.assertEqual(config.auth, AuthSection(allow_plaintext_on_loopback=True))
        self.assertEqual(
            config.listen.enabled(),
            {
                "smtp": "tcp:2525:interface=127.0.0.1",
                "submission": "tcp:2587:interface=127.0.0.1",
                "submissions": "tcp:2465:interface=127.0.0.1",
                "imap": "tcp:2143:interface=127.0.0.1",
                "imaps": "tcp:2993:interface=127.0.0.1",
                "pop3": "tcp:2110:interface=127.0.0.1",
                "pop3s": "tcp:2995:interface=127.0.0.1",
                "http": "tcp:2080:interface=127.0.0.1",
            },
        )

    def test_relativeBase(self) -> None:
        """A relative base directory is made absolute at once."""
        self.assertEqual(
            development("here").state_dir, Path(os.getcwd()) / "here" / "var"
        )


class CatchAllConfigTests(SynchronousTestCase):
    def test_catch_all_key(self):
        """'@domain' is accepted as a catch-all alias of one of our domains,
        and refused for another domain."""
        from pathlib import Path

        path = Path(self.mktemp())
        path.write_text(
            '[domains]\nnames = ["example.test"]\n[aliases]\n"@Example.TEST" = ["bob@example.test"]\n'
        )
        cfg = load(path)
        self.assertEqual(cfg.aliases, {"@example.test": ("bob@example.test",)})
        again = Path(self.mktemp())
        again.write_text(describe(cfg))
        self.assertEqual(load(again).aliases, cfg.aliases)
        path.write_text('[domains]\nnames = ["example.test"]\n[aliases]\n"@other.test" = ["bob@example.test"]\n')
        e = self.assertRaises(ConfigError, load, path)
        self.assertIn('aliases."@other.test"', str(e))


class IMAPSectionTests(SynchronousTestCase):
    def test_read_only_per_listener(self):
        """[imap] and [imaps] each take read_only; it must be a boolean."""
        path = Path(self.mktemp())
        path.write_text("[imaps]\nread_only = true\n")
        cfg = load(path)
        self.assertFalse(cfg.imap.read_only)
        self.assertTrue(cfg.imaps.read_only)
        again = Path(self.mktemp())
        again.write_text(describe(cfg))
        self.assertTrue(load(again).imaps.read_only)
        path.write_text('[imap]\nread_only = "yes"\n')
        e = self.assertRaises(ConfigError, load, path)
        self.assertIn("imap.read_only", str(e))
        path.write_text("[imap]\nreadonly = true\n")
        e = self.assertRaises(ConfigError, load, path)
        self.assertIn("imap.readonly: unknown key", str(e))

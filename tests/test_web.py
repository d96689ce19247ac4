"""
Tests for L{mailsys.web}: client autoconfiguration and C{/healthz}.

The documents are parsed back and checked against the formats the clients
read, written from their published definitions, not from our output:

  - Thunderbird: clientConfig 1.1 (wiki.mozilla.org,
    "Thunderbird:Autoconfiguration:ConfigFileFormat", and its examples);
  - Outlook: POX Autodiscover request and response (Microsoft's
    "Autodiscover (POX)" reference: request schema
    .../outlook/requestschema/2006, response .../responseschema/2006 with
    a Response in .../outlook/responseschema/2006a);
  - Apple: a configuration profile (PayloadType C{Configuration}) with a
    C{com.apple.mail.managed} payload (Apple's Device Management "Mail").

The HTTP tests run a real instance (L{mailsys.tap.build}, listeners on
loopback port 0) and speak to it with Twisted's HTTP client.
"""

from __future__ import annotations

import json
import os
import plistlib
import uuid
from io import BytesIO
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from mailsys import limits, web
from mailsys.addresses import parse_address
from mailsys.config import AuthSection, Config, ListenSection, ServerSection
from mailsys.tap import build
from mailsys.testing import loopback_config, start

HOST = "mail.example.test"
ALL_ON = ListenSection(
    smtp="tcp:25",
    submission="tcp:587",
    submissions="tcp:465",
    imap="tcp:143",
    imaps="tcp:993",
    pop3="tcp:110",
    pop3s="tcp:995",
    http="tcp:80",
)
# An address a hostile client might send: quotes, <, & and ' in a quoted
# local part (valid RFC 5321 syntax).
HOSTILE = '"a<b&c\'d"@example.test'


def not_bound(name: str) -> None:
    return None


# --- Thunderbird's format ------------------------------------------------

# clientConfig 1.1: the values a client understands.
SOCKET_TYPES = {"plain", "SSL", "STARTTLS"}
AUTHENTICATIONS = {
    "password-cleartext",
    "password-encrypted",
    "NTLM",
    "GSSAPI",
    "client-IP-address",
    "TLS-client-cert",
    "OAuth2",
    "none",
}
SERVER_FIELDS = ("hostname", "port", "socketType", "username", "authentication")


def client_config(case: SynchronousTestCase, document: bytes) -> list[tuple[str, ...]]:
    """
    Check C{document} against the clientConfig 1.1 format and return its
    servers in document order as C{(element, type, hostname, port,
    socketType, username, authentication)}.
    """
    root = ElementTree.fromstring(document)
    case.assertEqual(root.tag, "clientConfig")
    case.assertEqual(root.get("version"), "1.1")
    [provider] = root.findall("emailProvider")
    case.assertTrue(provider.get("id"))
    case.assertTrue([d.text for d in provider.findall("domain")])
    servers = []
    for server in provider:
        if server.tag not in ("incomingServer", "outgoingServer"):
            continue
        if server.tag == "incomingServer":
            case.assertIn(server.get("type"), ("imap", "pop3"))
        else:
            case.assertEqual(server.get("type"), "smtp")
        values = []
        for field in SERVER_FIELDS:
            [element] = server.findall(field)
            case.assertTrue(element.text, field)
            values.append(element.text)
        hostname, port, socket_type, username, authentication = values
        case.assertTrue(port.isdigit() and 0 < int(port) < 65536, port)
        case.assertIn(socket_type, SOCKET_TYPES)
        case.assertIn(authentication, AUTHENTICATIONS)
        servers.append((server.tag, server.get("type"), *values))
    case.assertTrue(any(s[0] == "incomingServer" for s in servers))
    case.assertTrue(any(s[0] == "outgoingServer" for s in servers))
    return servers


def incoming(kind: str, port: int, socket: str) -> tuple[str, ...]:
    return ("incomingServer", kind, HOST, str(port), socket, "%EMAILADDRESS%", "password-cleartext")


def outgoing(port: int, socket: str) -> tuple[str, ...]:
    return ("outgoingServer", "smtp", HOST, str(port), socket, "%EMAILADDRESS%", "password-cleartext")


class ThunderbirdDocumentTests(SynchronousTestCase):
    """config-v1.1.xml as Thunderbird's account wizard reads it."""

    def document(self, listen: ListenSection, bound=not_bound, address="alice@example.test"):
        services = web.client_services(listen, bound)
        return web.thunderbird_config(parse_address(address), HOST, services)

    def test_every_client_listener(self):
        """With every listener on, Thunderbird is offered IMAP on 993 (SSL)
        first, then 143 (STARTTLS), POP3 on 995 and 110, and submission on
        465 and 587, all on the server's host name with the full address
        as user name; the MX port 25 is not offered."""
        document = self.document(ALL_ON)
        self.assertEqual(
            client_config(self, document),
            [
                incoming("imap", 993, "SSL"),
                incoming("imap", 143, "STARTTLS"),
                incoming("pop3", 995, "SSL"),
                incoming("pop3", 110, "STARTTLS"),
                outgoing(465, "SSL"),
                outgoing(587, "STARTTLS"),
            ],
        )
        provider = ElementTree.fromstring(document).find("emailProvider")
        self.assertEqual(provider.get("id"), "example.test")
        self.assertEqual([d.text for d in provider.findall("domain")], ["example.test"])

    def test_listener_off_is_not_offered(self):
        """A listener that is off is not in the document: with only IMAPS
        and submission on, Thunderbird sees exactly those two."""
        listen = ListenSection(imaps="tcp:993:interface=192.0.2.1", submission="tcp:587")
        self.assertEqual(
            client_config(self, self.document(listen)),
            [incoming("imap", 993, "SSL"), outgoing(587, "STARTTLS")],
        )

    def test_port_of_bound_listener(self):
        """A listener on port 0 or a systemd socket is advertised with the
        port it is bound to; one whose port is unknown is left out rather
        than advertised wrong."""
        listen = ListenSection(
            imaps="tcp:0:interface=127.0.0.1",
            pop3s="systemd:domain=INET:index=0",
            submissions="tcp:0",
        )
        bound = {"imaps": 40993, "pop3s": 995, "submissions": 40465}
        self.assertEqual(
            client_config(self, self.document(listen, bound.get)),
            [incoming("imap", 40993, "SSL"), incoming("pop3", 995, "SSL"), outgoing(40465, "SSL")],
        )
        del bound["submissions"]  # not bound (yet, or any more)
        services = web.client_services(listen, bound.get)
        self.assertEqual(
            services,
            [web.ClientService("imap", 40993, "SSL"), web.ClientService("pop3", 995, "SSL")],
        )

    def test_endpoint_ports(self):
        """The advertised port is the one written in the endpoint string,
        in each form Twisted accepts."""
        table = {
            "tcp:993": 993,
            "tcp:993:interface=127.0.0.1": 993,
            "tcp:port=465:interface=0.0.0.0": 465,
            "tcp6:993:interface=\\:\\:1": 993,
            "ssl:995:privateKey=key.pem": 995,
            "tcp:0:interface=127.0.0.1": None,
            "systemd:domain=INET:index=0": None,
            "unix:/run/mailsys.sock": None,
        }
        for endpoint, port in table.items():
            self.assertEqual(web.endpoint_port(endpoint), port, endpoint)


# --- Outlook's Autodiscover ---------------------------------------------

REQUEST_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
RESPONSE_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
OUTLOOK_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"


def autodiscover_request(address: str, schema: str = OUTLOOK_NS) -> bytes:
    """A request as Outlook sends it (Microsoft's published example)."""
    escaped = address.replace("&", "&amp;").replace("<", "&lt;")
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<Autodiscover xmlns="{REQUEST_NS}">\n'
        "  <Request>\n"
        f"    <EMailAddress>{escaped}</EMailAddress>\n"
        f"    <AcceptableResponseSchema>{schema}</AcceptableResponseSchema>\n"
        "  </Request>\n"
        "</Autodiscover>\n"
    ).encode()


def autodiscover_protocols(case: SynchronousTestCase, document: bytes) -> dict[str, dict[str, str]]:
    """The Protocol blocks of a POX response, by Type, after checking its frame."""
    root = ElementTree.fromstring(document)
    case.assertEqual(root.tag, f"{{{RESPONSE_NS}}}Autodiscover")
    [response] = root.findall(f"{{{OUTLOOK_NS}}}Response")
    [account] = response.findall(f"{{{OUTLOOK_NS}}}Account")
    case.assertEqual(account.findtext(f"{{{OUTLOOK_NS}}}AccountType"), "email")
    case.assertEqual(account.findtext(f"{{{OUTLOOK_NS}}}Action"), "settings")
    protocols: dict[str, dict[str, str]] = {}
    for protocol in account.findall(f"{{{OUTLOOK_NS}}}Protocol"):
        fields = {child.tag.split("}")[1]: child.text or "" for child in protocol}
        case.assertNotIn(fields["Type"], protocols, "one block per type")
        case.assertIn(fields.get("SSL", "on"), ("on", "off"))
        case.assertIn(fields.get("Encryption", "Auto"), ("None", "SSL", "TLS", "Auto"))
        protocols[fields["Type"]] = fields
    return protocols


class AutodiscoverTests(SynchronousTestCase):
    """POX Autodiscover as Outlook sends and reads it."""

    def test_request(self):
        """The address is read from Outlook's request."""
        self.assertEqual(
            web.autodiscover_request(autodiscover_request("alice@example.test")),
            "alice@example.test",
        )

    def test_response(self):
        """The answer names, for IMAP, POP3 and SMTP, the host, the
        implicit-TLS port, SSL on and the address as login name."""
        services = web.client_services(ALL_ON, not_bound)
        document = web.autodiscover_response(parse_address("alice@example.test"), HOST, services)
        protocols = autodiscover_protocols(self, document)
        self.assertEqual(sorted(protocols), ["IMAP", "POP3", "SMTP"])
        for kind, port in (("IMAP", "993"), ("POP3", "995"), ("SMTP", "465")):
            fields = protocols[kind]
            self.assertEqual(fields["Server"], HOST)
            self.assertEqual(fields["Port"], port)
            self.assertEqual(fields["SSL"], "on")
            self.assertEqual(fields["Encryption"], "SSL")
            self.assertEqual(fields["LoginName"], "alice@example.test")
            self.assertEqual(fields["AuthRequired"], "on")
            self.assertEqual(fields["SPA"], "off")

    def test_starttls_only(self):
        """With only the STARTTLS listeners on, Outlook is told
        Encryption TLS on 143, 110 and 587."""
        listen = ListenSection(imap="tcp:143", pop3="tcp:110", submission="tcp:587")
        services = web.client_services(listen, not_bound)
        document = web.autodiscover_response(parse_address("bob@example.test"), HOST, services)
        protocols = autodiscover_protocols(self, document)
        self.assertEqual(
            {kind: (f["Port"], f["Encryption"]) for kind, f in protocols.items()},
            {"IMAP": ("143", "TLS"), "POP3": ("110", "TLS"), "SMTP": ("587", "TLS")},
        )

    def test_round_trip_hostile_address(self):
        """An address with quotes, < and & goes in and comes back as the
        same text: escaped on the wire, never markup."""
        text = web.autodiscover_request(autodiscover_request(HOSTILE))
        self.assertEqual(text, HOSTILE)
        services = web.client_services(ALL_ON, not_bound)
        document = web.autodiscover_response(parse_address(text), HOST, services)
        protocols = autodiscover_protocols(self, document)
        self.assertEqual(protocols["IMAP"]["LoginName"], HOSTILE)

    def test_refused_requests(self):
        """Requests that are not plain Outlook requests get a clear error,
        never a traceback: external entities (XXE), entity expansion,
        broken XML, other documents, the ActiveSync schema, no address."""
        request = b"<Request><EMailAddress>alice@example.test</EMailAddress></Request>"
        dtd = "document type declarations are not accepted"
        table = {
            "xxe": (
                b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                b"<Autodiscover><Request><EMailAddress>&x;</EMailAddress></Request></Autodiscover>",
                dtd,
            ),
            "billion laughs": (
                b'<!DOCTYPE a [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;">]>'
                b"<Autodiscover><Request><EMailAddress>&b;</EMailAddress></Request></Autodiscover>",
                dtd,
            ),
            "bare doctype": (b"<!DOCTYPE Autodiscover><Autodiscover>" + request + b"</Autodiscover>", dtd),
            "undeclared entity": (b"<Autodiscover><Request><EMailAddress>&x;</EMailAddress></Request></Autodiscover>", "not well-formed"),
            "broken": (b"<Autodiscover><Request>", "not well-formed"),
            "empty": (b"", "not well-formed"),
            "not xml": (b"emailaddress=alice@example.test", "not well-formed"),
            "other root": (b"<Discover>" + request + b"</Discover>", "expected an Autodiscover"),
            "no request": (b"<Autodiscover/>", "expected one Request"),
            "no address": (
                b"<Autodiscover><Request><EMailAddress> </EMailAddress></Request></Autodiscover>",
                "no EMailAddress",
            ),
            "activesync": (
                autodiscover_request(
                    "alice@example.test",
                    "http://schemas.microsoft.com/exchange/autodiscover/mobilesync/responseschema/2006",
                ),
                "only the Outlook response schema",
            ),
            "too large": (
                b"<Autodiscover>" + b" " * web.AUTODISCOVER_MAX_REQUEST + request + b"</Autodiscover>",
                "too large",
            ),
        }
        for name, (body, reason) in table.items():
            with self.assertRaises(web.BadRequest, msg=name) as raised:
                web.autodiscover_request(body)
            self.assertIn(reason, str(raised.exception), name)


# --- Apple's configuration profile --------------------------------------


class MobileconfigTests(SynchronousTestCase):
    """The .mobileconfig profile as iOS and macOS load it."""

    def profile(self, listen: ListenSection = ALL_ON, address: str = "alice@example.test"):
        services = web.client_services(listen, not_bound)
        data = web.mobileconfig(parse_address(address), HOST, services)
        return None if data is None else plistlib.loads(data)

    def test_profile(self):
        """One unsigned Configuration profile with one Mail payload: IMAP
        on 993 and SMTP on 465 with SSL, user name and address the full
        address, password asked at install (not in the profile)."""
        profile = self.profile()
        self.assertEqual(profile["PayloadType"], "Configuration")
        self.assertEqual(profile["PayloadVersion"], 1)
        uuid.UUID(profile["PayloadUUID"])
        self.assertTrue(profile["PayloadIdentifier"])
        [mail] = profile["PayloadContent"]
        self.assertEqual(mail["PayloadType"], "com.apple.mail.managed")
        self.assertEqual(mail["PayloadVersion"], 1)
        uuid.UUID(mail["PayloadUUID"])
        self.assertNotEqual(mail["PayloadUUID"], profile["PayloadUUID"])
        self.assertNotEqual(mail["PayloadIdentifier"], profile["PayloadIdentifier"])
        expected = {
            "EmailAccountType": "EmailTypeIMAP",
            "EmailAddress": "alice@example.test",
            "IncomingMailServerHostName": HOST,
            "IncomingMailServerPortNumber": 993,
            "IncomingMailServerUseSSL": True,
            "IncomingMailServerUsername": "alice@example.test",
            "IncomingMailServerAuthentication": "EmailAuthPassword",
            "OutgoingMailServerHostName": HOST,
            "OutgoingMailServerPortNumber": 465,
            "OutgoingMailServerUseSSL": True,
            "OutgoingMailServerUsername": "alice@example.test",
            "OutgoingMailServerAuthentication": "EmailAuthPassword",
        }
        self.assertEqual({key: mail[key] for key in expected}, expected)
        self.assertNotIn("IncomingPassword", mail)
        self.assertNotIn("OutgoingPassword", mail)

    def test_stable_identity(self):
        """The same address gets the same UUIDs (a new profile replaces the
        old one on the device); another address gets others."""
        first, again, other = self.profile(), self.profile(), self.profile(address="bob@example.test")
        self.assertEqual(first["PayloadUUID"], again["PayloadUUID"])
        self.assertNotEqual(first["PayloadUUID"], other["PayloadUUID"])

    def test_starttls_and_pop3(self):
        """Without IMAP the profile is for POP3; without implicit TLS it
        names the STARTTLS ports, still with SSL required."""
        profile = self.profile(ListenSection(pop3="tcp:110", submission="tcp:587"))
        [mail] = profile["PayloadContent"]
        self.assertEqual(mail["EmailAccountType"], "EmailTypePOP")
        self.assertEqual(mail["IncomingMailServerPortNumber"], 110)
        self.assertEqual(mail["OutgoingMailServerPortNumber"], 587)
        self.assertIs(mail["OutgoingMailServerUseSSL"], True)

    def test_nothing_to_offer(self):
        """No submission listener: no profile (it could not send)."""
        self.assertIsNone(self.profile(ListenSection(imaps="tcp:993")))

    def test_hostile_address(self):
        """Quotes, < and & in the address come back from the plist intact."""
        [mail] = self.profile(address=HOSTILE)["PayloadContent"]
        self.assertEqual(mail["EmailAddress"], HOSTILE)


# --- /healthz, without sockets ------------------------------------------


class HealthCheckTests(SynchronousTestCase):
    """The checks behind /healthz, on a temporary state directory."""

    def setUp(self):
        self.state = Path(self.mktemp())
        (self.state / "queue").mkdir(parents=True)
        (self.state / "mail").mkdir()
        self.space = web.DiskSpace(free=50 * 2**30, total=100 * 2**30)
        self.up = {"smtp": True, "http": True}

    def checks(self, **kwargs: Any) -> dict[str, dict[str, Any]]:
        health = web.Health(
            lambda: dict(self.up),
            self.state / "queue",
            self.state,
            self.state / "mail",
            maybeDeferred,
            space=lambda path: self.space,
            **kwargs,
        )
        return self.successResultOf(health.checks())

    def failing(self, checks: dict[str, dict[str, Any]]) -> list[str]:
        return sorted(name for name, check in checks.items() if not check["ok"])

    def test_healthy(self):
        """Listeners up, queue readable, space free, maildir writable: every
        check passes, and the maildir probe leaves nothing behind."""
        checks = self.checks()
        self.assertEqual(
            sorted(checks), ["disk", "listen.http", "listen.smtp", "maildir", "queue"]
        )
        self.assertEqual(self.failing(checks), [])
        self.assertEqual(os.listdir(self.state / "mail"), [])

    def test_listener_down(self):
        """A listener that is not listening fails its own check."""
        self.up["smtp"] = False
        checks = self.checks()
        self.assertEqual(self.failing(checks), ["listen.smtp"])
        self.assertEqual(checks["listen.smtp"]["detail"], "not listening")

    def test_queue_unreadable(self):
        """A queue directory that cannot be listed (here: replaced by a
        file, which stops root too) fails the queue check."""
        (self.state / "queue").rmdir()
        (self.state / "queue").write_bytes(b"")
        checks = self.checks()
        self.assertEqual(self.failing(checks), ["queue"])
        self.assertIn("cannot read the queue directory", checks["queue"]["detail"])

    def test_disk_threshold(self):
        """The disk check passes with exactly the minimum free and fails one
        byte below it; the minimum is the larger of 100 MiB and 1%."""
        small = 2 * 2**30  # 1% is 20 MiB: 100 MiB applies
        self.space = web.DiskSpace(free=limits.HEALTH_MIN_FREE_BYTES, total=small)
        self.assertEqual(self.failing(self.checks()), [])
        self.space = web.DiskSpace(free=limits.HEALTH_MIN_FREE_BYTES - 1, total=small)
        self.assertEqual(self.failing(self.checks()), ["disk"])
        large = 100 * 2**40  # 1% is 1 TiB
        self.space = web.DiskSpace(free=2**40, total=large)
        self.assertEqual(self.failing(self.checks()), [])
        self.space = web.DiskSpace(free=2**40 - 1, total=large)
        checks = self.checks()
        self.assertEqual(self.failing(checks), ["disk"])
        self.assertIn("MiB free of", checks["disk"]["detail"])

    def test_disk_unreadable(self):
        """A state directory that cannot be examined fails the disk check."""

        def broken(path):
            raise PermissionError(13, "Permission denied")

        health = web.Health(
            dict, self.state / "queue", self.state, self.state / "mail", maybeDeferred,
            space=broken,
        )
        checks = self.successResultOf(health.checks())
        self.assertEqual(self.failing(checks), ["disk"])

    def test_maildir_not_writable(self):
        """A maildir root where no file can be created fails its check."""
        (self.state / "mail").rmdir()
        (self.state / "mail").write_bytes(b"")
        checks = self.checks()
        self.assertEqual(self.failing(checks), ["maildir"])

    def test_before_first_delivery(self):
        """Before any mail arrived the maildir root does not exist: the
        check probes the state directory it will be made in."""
        (self.state / "mail").rmdir()
        self.assertEqual(self.failing(self.checks()), [])
        self.assertFalse((self.state / "mail").exists())


# --- over HTTP, on a real instance --------------------------------------


@inlineCallbacks
def fetch(url: str, method: bytes = b"GET", body: bytes | None = None):
    """C{(code, headers, body)} of one HTTP request, on a fresh connection."""
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    producer = FileBodyProducer(BytesIO(body)) if body is not None else None
    headers = Headers({b"content-type": [b"text/xml"]} if body is not None else {})
    response = yield agent.request(method, url.encode("ascii"), headers, producer)
    content = yield readBody(response)
    return response.code, response.headers, content


def instance_config(state: Path) -> Config:
    """Every listener but plain POP3 on loopback port 0, and http."""
    return loopback_config(
        state,
        "smtp",
        "submission",
        "submissions",
        "imap",
        "imaps",
        "pop3s",
        "http",
        path=state / "mailsys.toml",
        server=ServerSection(hostname=HOST, state_dir=state),
        domains=("example.test", "example.org"),
        auth=AuthSection(allow_plaintext_on_loopback=True),
    )


class RunningInstance:
    """Start L{build}'s service tree for a test and find its ports."""

    @inlineCallbacks
    def start(self, case: TestCase, config: Config):
        system = build(config, reactor)
        case.addCleanup(system.stopService)
        ports = yield start(system, *config.listen.enabled())
        return system, ports


class AutoconfigOverHTTPTests(TestCase):
    """What a client gets from the http listener of a running server."""

    @inlineCallbacks
    def setUp(self):
        self.state = Path(self.mktemp()).resolve()
        self.state.mkdir(parents=True)
        self.config = instance_config(self.state)
        self.system, self.ports = yield RunningInstance().start(self, self.config)
        self.base = f"http://127.0.0.1:{self.ports['http']}"

    @inlineCallbacks
    def test_thunderbird(self):
        """Both of Thunderbird's URLs give the same document, naming the
        server's host and the ports the listeners are really bound to;
        POP3 without TLS, which is off, is not offered."""
        query = "?emailaddress=alice%40example.test"
        code, headers, body = yield fetch(self.base + "/mail/config-v1.1.xml" + query)
        self.assertEqual(code, 200)
        self.assertEqual(
            headers.getRawHeaders(b"content-type"), [b"application/xml; charset=utf-8"]
        )
        p = self.ports
        self.assertEqual(
            client_config(self, body),
            [
                incoming("imap", p["imaps"], "SSL"),
                incoming("imap", p["imap"], "STARTTLS"),
                incoming("pop3", p["pop3s"], "SSL"),
                outgoing(p["submissions"], "SSL"),
                outgoing(p["submission"], "STARTTLS"),
            ],
        )
        code, _, again = yield fetch(
            self.base + "/.well-known/autoconfig/mail/config-v1.1.xml" + query
        )
        self.assertEqual((code, again), (200, body))
        code, _, other = yield fetch(
            self.base + "/mail/config-v1.1.xml?emailaddress=bob%40Example.ORG"
        )
        self.assertEqual(code, 200)
        self.assertEqual(ElementTree.fromstring(other).find("emailProvider").get("id"), "example.org")

    @inlineCallbacks
    def test_refused_addresses(self):
        """Only addresses of our domains are answered (404 otherwise, an
        address literal included); a missing or invalid address is a 400
        with a one-line reason, CRLF and bad UTF-8 included."""
        url = self.base + "/mail/config-v1.1.xml"
        table = {
            "?emailaddress=alice%40elsewhere.example": 404,
            "?emailaddress=alice%40%5B127.0.0.1%5D": 404,
            "": 400,
            "?emailaddress=": 400,
            "?emailaddress=alice": 400,
            "?emailaddress=al%0D%0Aice%40example.test": 400,
            "?emailaddress=%FF%40example.test": 400,
            "?emailaddress=%3Cscript%3E%40example.test": 400,
        }
        for query, expected in table.items():
            code, headers, body = yield fetch(url + query)
            self.assertEqual(code, expected, query)
            self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"])
            self.assertEqual(body.count(b"\n"), 1, query)
            self.assertNotIn(b"Traceback", body)

    @inlineCallbacks
    def test_hostile_address(self):
        """A quoted local part with quotes, < and & is a valid address of
        ours: every document stays well-formed and carries it intact."""
        quoted = "%22a%3Cb%26c'd%22%40example.test"
        code, _, body = yield fetch(self.base + "/mail/config-v1.1.xml?emailaddress=" + quoted)
        self.assertEqual(code, 200)
        client_config(self, body)
        code, _, body = yield fetch(self.base + "/apple/mobileconfig?emailaddress=" + quoted)
        self.assertEqual(code, 200)
        self.assertEqual(plistlib.loads(body)["PayloadContent"][0]["EmailAddress"], HOSTILE)
        code, _, body = yield fetch(
            self.base + "/autodiscover/autodiscover.xml", b"POST", autodiscover_request(HOSTILE)
        )
        self.assertEqual(code, 200)
        self.assertEqual(autodiscover_protocols(self, body)["IMAP"]["LoginName"], HOSTILE)

    @inlineCallbacks
    def test_autodiscover(self):
        """Outlook's POST, on either spelling of the path, gets the settings
        with the real ports; a foreign domain gets 404, an entity attack
        400, and GET is not allowed."""
        for path in ("/autodiscover/autodiscover.xml", "/Autodiscover/Autodiscover.xml"):
            code, headers, body = yield fetch(
                self.base + path, b"POST", autodiscover_request("alice@example.test")
            )
            self.assertEqual(code, 200, path)
            protocols = autodiscover_protocols(self, body)
            self.assertEqual(protocols["IMAP"]["Port"], str(self.ports["imaps"]))
            self.assertEqual(protocols["POP3"]["Port"], str(self.ports["pop3s"]))
            self.assertEqual(protocols["SMTP"]["Port"], str(self.ports["submissions"]))
        url = self.base + "/autodiscover/autodiscover.xml"
        code, _, _ = yield fetch(url, b"POST", autodiscover_request("alice@elsewhere.example"))
        self.assertEqual(code, 404)
        xxe = (
            b'<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            b"<Autodiscover><Request><EMailAddress>&x;</EMailAddress></Request></Autodiscover>"
        )
        code, _, body = yield fetch(url, b"POST", xxe)
        self.assertEqual(code, 400)
        self.assertNotIn(b"root:", body)
        code, _, _ = yield fetch(url)
        self.assertEqual(code, 405)

    @inlineCallbacks
    def test_mobileconfig(self):
        """The Apple profile downloads as a .mobileconfig attachment and
        loads with the real IMAPS and submissions ports."""
        code, headers, body = yield fetch(
            self.base + "/apple/mobileconfig?emailaddress=alice%40example.test"
        )
        self.assertEqual(code, 200)
        self.assertEqual(
            headers.getRawHeaders(b"content-type"), [b"application/x-apple-aspen-config"]
        )
        self.assertEqual(
            headers.getRawHeaders(b"content-disposition"),
            [b'attachment; filename="example.test.mobileconfig"'],
        )
        [mail] = plistlib.loads(body)["PayloadContent"]
        self.assertEqual(mail["IncomingMailServerPortNumber"], self.ports["imaps"])
        self.assertEqual(mail["OutgoingMailServerPortNumber"], self.ports["submissions"])
        code, headers, _ = yield fetch(
            self.base + "/apple/mobileconfig?emailaddress=alice%40elsewhere.example"
        )
        self.assertEqual(code, 404)
        self.assertIsNone(headers.getRawHeaders(b"content-disposition"))

    @inlineCallbacks
    def test_health(self):
        """/healthz is 200 "ok" with a passing check for every listener,
        the queue, the disk and the maildir; once a listener stops it is
        503 "fail", naming that listener."""
        health = self.system.getServiceNamed("http").factory.wrappedFactory.resource
        # The disk of the machine running the tests is not under test.
        health.children[b"healthz"].space = lambda path: web.DiskSpace(2**40, 2**41)
        code, headers, body = yield fetch(self.base + "/healthz")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        report = json.loads(body)
        self.assertEqual(report["status"], "ok")
        expected = {f"listen.{name}" for name in self.config.listen.enabled()}
        expected |= {"queue", "disk", "maildir"}
        self.assertEqual(set(report["checks"]), expected)
        self.assertTrue(all(check["ok"] for check in report["checks"].values()))

        yield self.system.getServiceNamed("imap").stopService()
        code, _, body = yield fetch(self.base + "/healthz")
        self.assertEqual(code, 503)
        report = json.loads(body)
        self.assertEqual(report["status"], "fail")
        failing = [name for name, check in report["checks"].items() if not check["ok"]]
        self.assertEqual(failing, ["listen.imap"])

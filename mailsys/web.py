"""
The C{http} listener: client autoconfiguration, health and metrics.

Setting up a mail client should take an address and a password.  Three
families of clients ask a web server for the rest, each in its own format:

    /mail/config-v1.1.xml?emailaddress=A             Thunderbird (and Evolution,
    /.well-known/autoconfig/mail/config-v1.1.xml?... KMail, K-9): clientConfig 1.1
    POST /autodiscover/autodiscover.xml              Outlook: POX Autodiscover
    /apple/mobileconfig?emailaddress=A               iOS and macOS: a profile

Every document names the real host (C{server.hostname}) and the ports of
the listeners that are on: a listener's advertised port is the port in its
endpoint string, or the port it is bound to when the string has none (port
0, C{systemd:} sockets); a listener that is off is not advertised.  Only
addresses of our domains are answered, others get 404; every document is
built with an XML or plist serializer, so nothing a client sends can
change its structure.

For the people who run the server:

    /healthz     JSON, 200 when every check passes, 503 otherwise
    /metrics     Prometheus text format (see L{mailsys.metrics})
"""

from __future__ import annotations

import json
import os
import plistlib
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable
from xml.etree import ElementTree
from xml.parsers import expat

from prometheus_client.exposition import make_wsgi_app
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.wsgi import WSGIResource

from mailsys import limits
from mailsys.addresses import AddressError, MailAddress, parse_address
from mailsys.config import Config, ListenSection, endpoint_parts

log = Logger(namespace="mailsys.web")

# Thunderbird's socketType words: "SSL" is TLS from the first byte
# (implicit TLS, RFC 8314), "STARTTLS" an upgrade on the plain port.
SSL = "SSL"
STARTTLS = "STARTTLS"

# The listeners a mail client uses, in the order they are offered (the
# first of each kind is the client's default): implicit TLS first, as
# RFC 8314 4.1 recommends.  The MX listener (smtp, port 25) is not for
# clients.
CLIENT_LISTENERS = (
    ("imaps", "imap", SSL),
    ("imap", "imap", STARTTLS),
    ("pop3s", "pop3", SSL),
    ("pop3", "pop3", STARTTLS),
    ("submissions", "smtp", SSL),
    ("submission", "smtp", STARTTLS),
)

# POX Autodiscover namespaces (Microsoft's "Autodiscover (POX)" reference).
AUTODISCOVER_REQUEST = (
    "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
)
AUTODISCOVER_RESPONSE = (
    "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
)
AUTODISCOVER_OUTLOOK = (
    "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
)

# An Autodiscover request is a few hundred bytes; refuse anything large
# before parsing it.
AUTODISCOVER_MAX_REQUEST = 64 * 1024

# Seconds an idle HTTP connection is kept (Twisted's default is 12 hours).
HTTP_IDLE_TIMEOUT = 60.0

_TEXT = b"text/plain; charset=utf-8"


class BadRequest(ValueError):
    """A request we cannot answer: C{str(error)} says why, for the client."""


@dataclass(frozen=True)
class ClientService:
    """
    One way for a mail client to connect, as advertised.

    @ivar protocol: C{"imap"}, C{"pop3"} or C{"smtp"} (submission).
    @ivar tls: L{SSL} (implicit TLS) or L{STARTTLS}.
    """

    protocol: str
    port: int
    tls: str


def endpoint_port(endpoint: str) -> int | None:
    """
    The port written in a TCP or TLS endpoint string
    (C{"tcp:993:interface=::1"}, C{"ssl:port=993:..."}), or C{None} when it
    has none: port 0, C{systemd:} and C{unix:} endpoints.
    """
    args, kwargs = endpoint_parts(endpoint)
    if not args or args[0] not in ("tcp", "tcp6", "ssl"):
        return None
    text = kwargs.get("port", args[1] if len(args) > 1 else "")
    return int(text) if text.isdigit() and int(text) > 0 else None


def client_services(
    listen: ListenSection, bound_port: Callable[[str], int | None]
) -> list[ClientService]:
    """
    What a client may use, in order of preference: every client listener
    that is on and whose port is known (from its endpoint string, else
    C{bound_port(name)}).
    """
    services = []
    for name, protocol, tls in CLIENT_LISTENERS:
        endpoint = getattr(listen, name)
        if not endpoint:
            continue
        port = endpoint_port(endpoint) or bound_port(name)
        if port:
            services.append(ClientService(protocol, port, tls))
    return services


# --- the documents -------------------------------------------------------


def _xml(root: ElementTree.Element) -> bytes:
    ElementTree.indent(root)  # for the people who read it with curl
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def _text(parent: ElementTree.Element, tag: str, text: str) -> None:
    ElementTree.SubElement(parent, tag).text = text


def thunderbird_config(
    address: MailAddress, hostname: str, services: Iterable[ClientService]
) -> bytes:
    """
    Thunderbird's C{config-v1.1.xml} (clientConfig version 1.1, as defined
    on wiki.mozilla.org "Thunderbird:Autoconfiguration:ConfigFileFormat"):
    one C{incomingServer} per IMAP and POP3 listener and one
    C{outgoingServer} per submission listener, the user name being the
    whole address (C{%EMAILADDRESS%}), the password sent inside TLS.
    """
    root = ElementTree.Element("clientConfig", version="1.1")
    provider = ElementTree.SubElement(root, "emailProvider", id=address.domain)
    _text(provider, "domain", address.domain)
    _text(provider, "displayName", f"Mail for {address.domain}")
    _text(provider, "displayShortName", address.domain)
    for service in services:
        if service.protocol == "smtp":
            server = ElementTree.SubElement(provider, "outgoingServer", type="smtp")
        else:
            server = ElementTree.SubElement(
                provider, "incomingServer", type=service.protocol
            )
        _text(server, "hostname", hostname)
        _text(server, "port", str(service.port))
        _text(server, "socketType", service.tls)
        _text(server, "username", "%EMAILADDRESS%")
        _text(server, "authentication", "password-cleartext")
    return _xml(root)


def _local_name(tag: str) -> str:
    return tag.rpartition("}")[2]


def _refuse_dtd(body: bytes) -> None:
    """
    Check that C{body} is well-formed XML without a document type
    declaration.  No DTD means no entities but XML's five, so neither
    external entities (XXE) nor entity expansion (billion laughs) can
    reach the parser that builds the tree.
    """

    class _Declared(Exception):
        pass

    def refuse(*args: object) -> None:
        raise _Declared()

    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = refuse  # before any declaration in it
    try:
        parser.Parse(body, True)
    except _Declared:
        raise BadRequest("document type declarations are not accepted") from None
    except expat.ExpatError as e:
        raise BadRequest(f"not well-formed XML: {expat.ErrorString(e.code)}") from None


def autodiscover_request(body: bytes) -> str:
    """
    The C{EMailAddress} of a POX Autodiscover request::

        <Autodiscover xmlns="...outlook/requestschema/2006">
          <Request>
            <EMailAddress>user@example.test</EMailAddress>
            <AcceptableResponseSchema>...outlook/responseschema/2006a</...>
          </Request>
        </Autodiscover>

    @raise BadRequest: for anything else, including a request for another
        response schema (the ActiveSync one: we have nothing to say in it).
    """
    if len(body) > AUTODISCOVER_MAX_REQUEST:
        raise BadRequest("request too large")
    _refuse_dtd(body)
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        raise BadRequest("not well-formed XML") from None
    if _local_name(root.tag) != "Autodiscover":
        raise BadRequest("expected an Autodiscover document")
    requests = [child for child in root if _local_name(child.tag) == "Request"]
    if len(requests) != 1:
        raise BadRequest("expected one Request element")
    fields = {
        _local_name(child.tag): (child.text or "").strip() for child in requests[0]
    }
    schema = fields.get("AcceptableResponseSchema")
    if schema and schema != AUTODISCOVER_OUTLOOK:
        raise BadRequest("only the Outlook response schema (2006a) is served")
    if not fields.get("EMailAddress"):
        raise BadRequest("the request has no EMailAddress")
    return fields["EMailAddress"]


def autodiscover_response(
    address: MailAddress, hostname: str, services: Iterable[ClientService]
) -> bytes:
    """
    The POX Autodiscover answer in the Outlook response schema (2006a):
    one C{Protocol} block each for IMAP, POP3 and SMTP (the first, so the
    preferred, listener of each), the login name being the address.

    C{SSL on} with C{Encryption SSL} is implicit TLS; C{Encryption TLS} is
    STARTTLS (the C{Encryption} element overrides C{SSL} in Outlook 2010
    and later).  A password never goes unencrypted: C{SSL} is C{on} even
    for STARTTLS, so an older Outlook fails rather than send it in clear.
    """
    root = ElementTree.Element("Autodiscover", xmlns=AUTODISCOVER_RESPONSE)
    response = ElementTree.SubElement(root, "Response", xmlns=AUTODISCOVER_OUTLOOK)
    account = ElementTree.SubElement(response, "Account")
    _text(account, "AccountType", "email")
    _text(account, "Action", "settings")
    seen: set[str] = set()
    for service in services:
        if service.protocol in seen:
            continue  # Outlook takes one block per type
        seen.add(service.protocol)
        protocol = ElementTree.SubElement(account, "Protocol")
        _text(protocol, "Type", service.protocol.upper())
        _text(protocol, "Server", hostname)
        _text(protocol, "Port", str(service.port))
        _text(protocol, "LoginName", str(address))
        _text(protocol, "DomainRequired", "off")
        _text(protocol, "SPA", "off")
        _text(protocol, "SSL", "on")
        _text(protocol, "Encryption", "SSL" if service.tls == SSL else "TLS")
        _text(protocol, "AuthRequired", "on")
        if service.protocol == "smtp":
            _text(protocol, "UsePOPAuth", "off")
            _text(protocol, "SMTPLast", "off")
    return _xml(root)


def mobileconfig(
    address: MailAddress, hostname: str, services: Iterable[ClientService]
) -> bytes | None:
    """
    An Apple configuration profile (unsigned) with one
    C{com.apple.mail.managed} payload: IMAP (POP3 if IMAP is off) and SMTP
    submission, both with SSL, the user name being the address; the
    password is asked for on install.  C{None} when there is no incoming
    or no outgoing listener to offer.

    The UUIDs are derived from host and address, so installing a new
    profile for the same address replaces the old one.
    """
    services = list(services)
    incoming = next((s for s in services if s.protocol == "imap"), None)
    incoming = incoming or next((s for s in services if s.protocol == "pop3"), None)
    outgoing = next((s for s in services if s.protocol == "smtp"), None)
    if incoming is None or outgoing is None:
        return None
    identifier = ".".join(reversed(hostname.split("."))) + ".mailsys"
    profile_uuid = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{address}.profile.{hostname}"))
    mail_uuid = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{address}.mail.{hostname}"))
    mail = {
        "PayloadType": "com.apple.mail.managed",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{identifier}.mail.{mail_uuid}",
        "PayloadUUID": mail_uuid,
        "PayloadDisplayName": f"Mail for {address}",
        "EmailAccountDescription": str(address),
        "EmailAccountType": "EmailTypeIMAP"
        if incoming.protocol == "imap"
        else "EmailTypePOP",
        "EmailAddress": str(address),
        "IncomingMailServerHostName": hostname,
        "IncomingMailServerPortNumber": incoming.port,
        "IncomingMailServerUseSSL": True,
        "IncomingMailServerUsername": str(address),
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingMailServerHostName": hostname,
        "OutgoingMailServerPortNumber": outgoing.port,
        "OutgoingMailServerUseSSL": True,
        "OutgoingMailServerUsername": str(address),
        "OutgoingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingPasswordSameAsIncomingPassword": True,
    }
    profile = {
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{identifier}.{profile_uuid}",
        "PayloadUUID": profile_uuid,
        "PayloadDisplayName": f"Mail for {address}",
        "PayloadDescription": f"The mail account {address} on {hostname}",
        "PayloadRemovalDisallowed": False,
        "PayloadContent": [mail],
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML)


# --- resources -----------------------------------------------------------


def _plain(request: Request, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", _TEXT)
    return text.encode("utf-8") + b"\n"


class _AccountDocument(Resource):
    """
    The common part of the autoconfiguration resources: the address a
    client asks about, validated, and only for our domains.
    """

    isLeaf = True

    def __init__(
        self,
        domains: Iterable[str],
        hostname: str,
        services: Callable[[], list[ClientService]],
    ) -> None:
        super().__init__()
        self.domains = frozenset(domains)
        self.hostname = hostname
        self.services = services

    def address(self, text: bytes | str | None) -> MailAddress:
        """
        @raise BadRequest: missing or not an address.
        @raise LookupError: an address, but not of our domains.
        """
        if not text:
            raise BadRequest("give the address as emailaddress=")
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest("the address is not UTF-8") from None
        try:
            address = parse_address(text.strip())
        except AddressError as e:
            raise BadRequest(f"not a valid address: {e}") from None
        if address.is_literal or address.domain not in self.domains:
            raise LookupError(address.domain)
        return address

    def answer(self, request: Request, text: bytes | str | None) -> bytes:
        try:
            address = self.address(text)
        except BadRequest as e:
            return _plain(request, 400, str(e))
        except LookupError:
            return _plain(request, 404, "not a domain of this server")
        body = self.document(request, address, self.services())
        if body is None:
            return _plain(request, 404, "no listener to offer for this kind of client")
        return body

    def query(self, request: Request) -> bytes | None:
        values = request.args.get(b"emailaddress") or [None]
        return values[0]

    def document(
        self, request: Request, address: MailAddress, services: list[ClientService]
    ) -> bytes | None:
        """The document for C{address}, its headers set on C{request};
        C{None} if there is nothing to offer."""
        raise NotImplementedError


class ThunderbirdAutoconfig(_AccountDocument):
    """C{GET .../config-v1.1.xml?emailaddress=ADDRESS}."""

    def render_GET(self, request: Request) -> bytes:
        return self.answer(request, self.query(request))

    def document(self, request, address, services):
        request.setHeader(b"content-type", b"application/xml; charset=utf-8")
        return thunderbird_config(address, self.hostname, services)


class Autodiscover(_AccountDocument):
    """C{POST /autodiscover/autodiscover.xml} with a POX request body."""

    def render_POST(self, request: Request) -> bytes:
        body = request.content.read(AUTODISCOVER_MAX_REQUEST + 1)
        try:
            text = autodiscover_request(body)
        except BadRequest as e:
            return _plain(request, 400, str(e))
        return self.answer(request, text)

    def document(self, request, address, services):
        request.setHeader(b"content-type", b"application/xml; charset=utf-8")
        return autodiscover_response(address, self.hostname, services)


class AppleMobileconfig(_AccountDocument):
    """C{GET /apple/mobileconfig?emailaddress=ADDRESS}: a profile to install."""

    def render_GET(self, request: Request) -> bytes:
        return self.answer(request, self.query(request))

    def document(self, request, address, services):
        body = mobileconfig(address, self.hostname, services)
        if body is not None:
            request.setHeader(b"content-type", b"application/x-apple-aspen-config")
            # The domain is validated (lower-case ASCII): safe in a header.
            disposition = f'attachment; filename="{address.domain}.mobileconfig"'
            request.setHeader(b"content-disposition", disposition.encode("ascii"))
        return body


@dataclass(frozen=True)
class DiskSpace:
    """What C{os.statvfs} says of a file system, in bytes."""

    free: int
    total: int


def disk_space(path: Path) -> DiskSpace:
    """Free space for unprivileged users, and the size, of C{path}'s file system."""
    stat = os.statvfs(path)
    return DiskSpace(
        free=stat.f_bavail * stat.f_frsize, total=stat.f_blocks * stat.f_frsize
    )


def _check(ok: bool, detail: str) -> dict[str, Any]:
    return {"ok": ok, "detail": detail}


class Health(Resource):
    """
    C{GET /healthz}: C{{"status": "ok"|"fail", "checks": {...}}}, 200 or
    503, for load balancers, monitors and C{systemctl}-side scripts.

    The checks: each configured listener is listening (C{listen.NAME});
    the queue directory can be listed (C{queue}); the file system of
    C{state_dir} has at least L{limits.HEALTH_MIN_FREE_BYTES} and
    L{limits.HEALTH_MIN_FREE_FRACTION} of its size free (C{disk}); a file
    can be created in the maildir root (C{maildir}).  The disk checks run
    in a thread (a dying disk can block).

    @param listening: listener name -> whether it is listening now; called
        in the reactor thread.
    @param run_blocking: C{f(callable) -> Deferred}, running it off the
        reactor thread.
    @param space: C{f(path) -> DiskSpace}; L{disk_space} by default.
    """

    isLeaf = True

    def __init__(
        self,
        listening: Callable[[], dict[str, bool]],
        queue_dir: Path,
        state_dir: Path,
        mail_dir: Path,
        run_blocking: Callable[..., defer.Deferred],
        space: Callable[[Path], DiskSpace] = disk_space,
        min_free_bytes: int = limits.HEALTH_MIN_FREE_BYTES,
        min_free_fraction: float = limits.HEALTH_MIN_FREE_FRACTION,
    ) -> None:
        super().__init__()
        self.listening = listening
        self.queue_dir = queue_dir
        self.state_dir = state_dir
        self.mail_dir = mail_dir
        self.run_blocking = run_blocking
        self.space = space
        self.min_free_bytes = min_free_bytes
        self.min_free_fraction = min_free_fraction

    def checks(self) -> defer.Deferred:
        """Every check by name, each C{{"ok": bool, "detail": str}}."""
        results = {
            f"listen.{name}": _check(up, "listening" if up else "not listening")
            for name, up in self.listening().items()
        }
        d = self.run_blocking(self._disk_checks)

        def combine(disk: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
            results.update(disk)
            return results

        return d.addCallback(combine)

    def _disk_checks(self) -> dict[str, dict[str, Any]]:
        return {
            "queue": self._queue(),
            "disk": self._disk(),
            "maildir": self._maildir(),
        }

    def _queue(self) -> dict[str, Any]:
        try:
            os.listdir(self.queue_dir)
        except OSError as e:
            return _check(False, f"cannot read the queue directory: {e.strerror or e}")
        return _check(True, "readable")

    def _disk(self) -> dict[str, Any]:
        try:
            space = self.space(self.state_dir)
        except OSError as e:
            return _check(False, f"cannot stat the state directory: {e.strerror or e}")
        needed = max(self.min_free_bytes, int(space.total * self.min_free_fraction))
        detail = f"{space.free // 2**20} MiB free of {space.total // 2**20} MiB"
        if space.free < needed:
            return _check(False, f"{detail}, less than {needed // 2**20} MiB")
        return _check(True, detail)

    def _maildir(self) -> dict[str, Any]:
        # Where new maildirs are made: the root, or before the first
        # delivery the state directory it will be made in.
        where = self.mail_dir if os.path.lexists(self.mail_dir) else self.state_dir
        try:
            handle, name = tempfile.mkstemp(prefix=".healthz-", dir=where)
            os.close(handle)
            os.unlink(name)
        except OSError as e:
            return _check(
                False, f"cannot create a file in {where.name}: {e.strerror or e}"
            )
        return _check(True, "writable")

    def render_GET(self, request: Request) -> int:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda failure: gone.append(True))

        def failed(failure):
            log.failure("health check failed", failure)
            return {"health": _check(False, "the health check itself failed")}

        def respond(checks: dict[str, dict[str, Any]]) -> None:
            if gone:
                return
            ok = all(check["ok"] for check in checks.values())
            request.setResponseCode(200 if ok else 503)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            report = {"status": "ok" if ok else "fail", "checks": checks}
            body = json.dumps(report, indent=2, sort_keys=True).encode() + b"\n"
            # A length, not chunked: Twisted's chunked path names a header
            # with str, which trips python -b next to bytes names.
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()

        d = defer.maybeDeferred(self.checks)
        d.addErrback(failed)
        d.addCallback(respond)
        return NOT_DONE_YET


def metrics_resource(registry: Any, reactor: Any) -> Resource:
    """
    C{/metrics}: C{registry} in Prometheus text format, by
    C{prometheus_client}'s WSGI application in the reactor's thread pool.

    This is what C{prometheus_client.twisted.MetricsResource} builds, but
    with the injected reactor: that module binds the global reactor when
    it is imported, which would install the default reactor as a side
    effect of importing this module.
    """
    app = _with_length(make_wsgi_app(registry))
    return WSGIResource(reactor, reactor.getThreadPool(), app)


def _with_length(app: Callable[..., Iterable[bytes]]) -> Callable[..., list[bytes]]:
    """
    C{app} with a Content-Length on its answers.  A scrape is small, and
    without a length Twisted sends it chunked through a path that names a
    header with str, which trips C{python -b} next to bytes names.
    """

    def sized(
        environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> list[bytes]:
        answer: list[Any] = []

        def start(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> None:
            answer[:] = [status, headers]

        body = b"".join(app(environ, start))
        status, headers = answer
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [body]

    return sized


class QuietSite(Site):
    """A Site that leaves scrapes of C{/metrics} and C{/healthz} out of the
    access log (a monitor polling every few seconds would fill it)."""

    def log(self, request: Request) -> None:
        if request.path not in (b"/metrics", b"/healthz"):
            super().log(request)


def _thread_runner(reactor: Any) -> Callable[..., defer.Deferred]:
    def run(f, *args):
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run


def root(cfg: Config, system: Any, reactor: Any) -> Resource:
    """
    The resource tree of the C{http} listener of C{system} (a
    L{mailsys.tap.MailSystem}: its listeners, queue and metrics).
    """

    def bound_port(name: str) -> int | None:
        port = getattr(_listener(system, name), "port", None)
        return port.getHost().port if port is not None else None

    def listening() -> dict[str, bool]:
        return {
            name: getattr(_listener(system, name), "port", None) is not None
            for name in cfg.listen.enabled()
        }

    def services() -> list[ClientService]:
        return client_services(cfg.listen, bound_port)

    hostname = cfg.server.hostname
    top = Resource()
    thunderbird = ThunderbirdAutoconfig(cfg.domains, hostname, services)
    mail = Resource()
    mail.putChild(b"config-v1.1.xml", thunderbird)
    top.putChild(b"mail", mail)
    well_known, autoconfig, autoconfig_mail = Resource(), Resource(), Resource()
    autoconfig_mail.putChild(b"config-v1.1.xml", thunderbird)
    autoconfig.putChild(b"mail", autoconfig_mail)
    well_known.putChild(b"autoconfig", autoconfig)
    top.putChild(b".well-known", well_known)
    autodiscover = Autodiscover(cfg.domains, hostname, services)
    for directory, name in (
        (b"autodiscover", b"autodiscover.xml"),
        (b"Autodiscover", b"Autodiscover.xml"),
    ):
        folder = Resource()
        folder.putChild(name, autodiscover)
        top.putChild(directory, folder)
    apple = Resource()
    apple.putChild(b"mobileconfig", AppleMobileconfig(cfg.domains, hostname, services))
    top.putChild(b"apple", apple)
    top.putChild(
        b"healthz",
        Health(
            listening,
            system.queue.spool.directory,
            cfg.state_dir,
            cfg.mail_dir,
            _thread_runner(reactor),
        ),
    )
    top.putChild(b"metrics", metrics_resource(system.metrics.registry, reactor))
    return top


def _listener(system: Any, name: str) -> Any:
    try:
        return system.getServiceNamed(name)
    except KeyError:
        return None


def site(cfg: Config, system: Any, reactor: Any) -> Site:
    """The protocol factory of the C{http} listener."""
    factory = QuietSite(root(cfg, system, reactor), reactor=reactor)
    factory.displayTracebacks = False  # an error is a 500, never a traceback
    factory.timeOut = HTTP_IDLE_TIMEOUT
    factory.noisy = False
    return factory

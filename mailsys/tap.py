"""
The twistd entry point: C{twistd -n mailsys [--config FILE]}.

L{Options} reads and validates the configuration (a bad file is one line on
stderr and exit status 2, before anything starts); L{makeService} builds the
service tree: one endpoint service per enabled listener, all sharing one
user store, one maildir store and one TLS context.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.mail.pop3 import IMailbox
from twisted.python import usage
from twisted.python.failure import Failure

from mailsys import config as configuration
from mailsys import web
from mailsys.accounts import MailRealm, PasswordChecker, UserStore
from mailsys.connections import ConnectionLimits
from mailsys.imap import IIMAPAccount, IMAPServerFactory, imap_avatar
from mailsys.maildir import MaildirStore
from mailsys.metrics import MailMetrics
from mailsys.pop3 import POP3ServerFactory, pop3_avatar
from mailsys.queue.client import SMTPTransport, make_resolver
from mailsys.queue.local import LocalTransport
from mailsys.queue.runner import QueueRunner, RetrySchedule
from mailsys.queue.spool import Spool
from mailsys.routing import Router
from mailsys.smtp.delivery import LocalDelivery, OutboundQueue, SubmissionDelivery
from mailsys.smtp.server import ESMTPServerFactory
from mailsys.tls import ServerTLS, TLSError, ensure_certificate

log = Logger(namespace="mailsys")


def _fail(message: str) -> None:
    """One line for the administrator, exit status 2, no traceback."""
    # twistd may have put its log in place of sys.stderr by now.
    sys.__stderr__.write(f"mailsys: {message}\n")
    sys.__stderr__.flush()
    raise SystemExit(2)


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the mailsys mail system.  Without --config, run the development "
        "instance for example.test with state under ./var on loopback ports."
    )
    optParameters = [
        ["config", "c", None, "The TOML configuration file."],
    ]

    def postOptions(self) -> None:
        try:
            if self["config"]:
                self.mailconfig = configuration.load(self["config"])
            else:
                self.mailconfig = configuration.development(Path.cwd())
        except configuration.ConfigError as e:
            _fail(str(e))


class Listener(StreamServerEndpointService):
    """
    One listener.  A failure to listen (port in use, no permission) stops
    the start-up instead of being logged and ignored, and L{bound}
    gives the bound port to those who asked for port 0 (the tests).

    @ivar port: the IListeningPort while listening, else C{None}
        (C{/healthz} and autoconfiguration read it).
    """

    port = None

    def __init__(self, endpoint, factory) -> None:
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            # Port in use, or no permission: one line, exit status 2.
            _fail(f"listen.{self.name}: cannot listen: {e.socketError}")
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port):
        self.port = port
        return port

    def stopService(self):
        self.port = None
        return super().stopService()

    def bound(self) -> Deferred:
        """A new Deferred firing with the IListeningPort once bound."""
        d: Deferred = Deferred()

        def tell(result):
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
            return result  # leave the service's own chain unchanged

        self._waitingForPort.addBoth(tell)
        return d


class _SignalReload(Service):
    """Reloads what can change under a running server on SIGHUP."""

    def __init__(self, reactor, reloaders) -> None:
        self.reactor = reactor
        self.reloaders = reloaders
        self._previous = None

    def startService(self) -> None:
        super().startService()
        if hasattr(signal, "SIGHUP"):
            self._previous = signal.signal(signal.SIGHUP, self._received)

    def stopService(self):
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
        return super().stopService()

    def _received(self, signum, frame) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        log.info("SIGHUP: reloading")
        for reload in self.reloaders:
            reload()


class MailSystem(MultiService):
    """
    The running mail system: its listeners as child services, and the
    shared pieces they use (one user store, one maildir store, one router,
    one TLS context), kept as attributes for operations and tests.
    """

    def __init__(self, cfg: configuration.Config) -> None:
        super().__init__()
        self.setName("mailsys")
        self.config = cfg


def alias_reloader(cfg: configuration.Config, router: Router):
    """
    Re-read the aliases from the configuration file (SIGHUP), keeping the
    old ones if the file is now broken: a typo must not stop mail.
    """

    def reload() -> None:
        if cfg.path is None:
            return
        try:
            fresh = configuration.load(cfg.path)
        except configuration.ConfigError as e:
            log.error("reload: keeping the old aliases: {error}", error=str(e))
            return
        router.set_aliases(fresh.aliases)
        log.info("reload: {n} aliases", n=len(fresh.aliases))

    return reload


def makeService(options, reactor=None) -> MailSystem:
    """Build every enabled listener from the validated configuration."""
    if reactor is None:
        from twisted.internet import reactor  # noqa: F811
    cfg = options.mailconfig if hasattr(options, "mailconfig") else options
    return build(cfg, reactor)


def build(cfg: configuration.Config, reactor) -> MailSystem:
    """The service tree for C{cfg}; listening starts with C{startService}."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    incoming = cfg.state_dir / "tmp"
    incoming.mkdir(exist_ok=True, mode=0o700)
    try:
        if ensure_certificate(cfg.tls.cert, cfg.tls.key, cfg.server.hostname):
            log.info(
                "generated a self-signed certificate {cert}", cert=str(cfg.tls.cert)
            )
        tls = ServerTLS(cfg.tls.cert, cfg.tls.key)
        tls.load()
    except TLSError as e:
        _fail(str(e))

    top = MailSystem(cfg)
    top.tls = tls
    top.users = UserStore(cfg.users_file, cfg.domains)
    top.store = MaildirStore(cfg.mail_dir, cfg.server.hostname)
    top.router = Router(cfg.domains, top.users.exists, cfg.aliases)
    top.portal = Portal(
        MailRealm(cfg.mail_dir, {IMailbox: pop3_avatar, IIMAPAccount: imap_avatar}),
        [PasswordChecker(top.users, reactor)],
    )
    top.metrics = MailMetrics()
    top.queue = _build_queue(cfg, top, reactor)

    reloader = _SignalReload(
        reactor,
        [tls.reload, alias_reloader(cfg, top.router), top.queue.runner.rescan],
    )
    reloader.setName("reload")
    reloader.setServiceParent(top)

    for name, description in cfg.listen.enabled().items():
        made = _listener_factory(name, cfg, top, reactor, incoming)
        if made is None:
            log.warn("listener {name} is not available in this version", name=name)
            continue
        factory, refusal = made
        limited = ConnectionLimits(
            factory,
            cfg.limits.max_connections,
            cfg.limits.max_connections_per_client,
            refusal=refusal,
            service=name,
            metrics=top.metrics.service(name),
        )
        service = Listener(serverFromString(reactor, description), limited)
        service.setName(name)
        service.setServiceParent(top)
        log.info("{name} listening on {endpoint}", name=name, endpoint=description)

    if cfg.path is None:
        log.info(
            "development instance for {domains}: state in {state}; add a user with "
            "'mailsys user add alice@example.test', then send mail to port 2525 "
            "(or submit on 2587/2465 with AUTH) and read it with IMAP on 2143/2993 "
            "or POP3 on 2110/2995; client autoconfiguration, /healthz and /metrics "
            "are on http://127.0.0.1:2080/",
            domains=", ".join(cfg.domains),
            state=str(cfg.state_dir),
        )
    return top


def _build_queue(cfg: configuration.Config, top: MailSystem, reactor) -> OutboundQueue:
    """The durable queue and its runner (a child service)."""
    spool = Spool(cfg.state_dir / "queue", cfg.server.hostname)
    relay = cfg.relay
    remote = SMTPTransport(
        reactor,
        cfg.server.hostname,
        resolver=make_resolver(reactor, relay.resolver),
        routes=relay.routes,
        smarthost=relay.smarthost,
        smarthost_username=relay.smarthost_username,
        smarthost_password=relay.smarthost_password,
        smarthost_cafile=relay.smarthost_cafile,
        mx_port=relay.mx_port,
        max_connections_per_host=relay.max_per_destination,
    )
    runner = QueueRunner(
        spool,
        LocalTransport(top.store, reactor),
        remote,
        lambda address: top.router.is_local_domain(address.rpartition("@")[2]),
        reactor,
        RetrySchedule.from_config(relay),
        cfg.server.hostname,
        postmaster=f"postmaster@{cfg.domains[0]}",
        max_concurrent=relay.max_concurrent,
        max_per_destination=relay.max_per_destination,
        metrics=top.metrics,
    )
    top.metrics.watch_queue(runner)
    runner.setName("queue")
    runner.setServiceParent(top)
    return OutboundQueue(spool, runner, reactor)


_SMTP_REFUSAL = b"421 4.7.0 Too many connections, try again later\r\n"
_POP3_REFUSAL = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
_IMAP_REFUSAL = b"* BYE Too many connections, try again later\r\n"
_HTTP_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
    b"Connection: close\r\n\r\n"
)


# Listeners that speak TLS from the first byte (RFC 8314).
_IMPLICIT_TLS = ("submissions", "imaps", "pop3s")


def _listener_factory(
    name: str, cfg: configuration.Config, top: MailSystem, reactor, incoming
):
    """The protocol factory of listener C{name} and what it says when full,
    or C{None} for a listener this version does not serve."""
    hostname = cfg.server.hostname
    metrics = top.metrics.service(name)
    implicit = name in _IMPLICIT_TLS
    starttls = None if implicit else top.tls.contextFactory()
    plaintext = cfg.auth.allow_plaintext_on_loopback
    if name == "http":
        return web.site(cfg, top, reactor), _HTTP_REFUSAL
    if name in ("smtp", "submission", "submissions"):
        if name == "smtp":
            delivery = LocalDelivery(
                top.router, top.store, hostname, reactor, queue=top.queue
            )
            auth = {}
        else:
            delivery = SubmissionDelivery(
                top.router,
                top.queue,
                hostname,
                reactor,
                hide_client_ip=cfg.submission.hide_client_ip,
                sender_must_match=cfg.submission.sender_must_match,
            )
            auth = dict(
                portal=top.portal,
                require_auth=True,
                implicit_tls=implicit,
                allow_plaintext_auth=plaintext,
            )
        factory = ESMTPServerFactory(
            delivery,
            hostname,
            cfg.limits,
            reactor,
            tls=starttls,
            spool_dir=incoming,
            metrics=metrics,
            **auth,
        )
        refusal = _SMTP_REFUSAL
    elif name in ("pop3", "pop3s"):
        factory = POP3ServerFactory(
            top.portal,
            hostname,
            reactor,
            tls=starttls,
            implicit_tls=implicit,
            allow_plaintext_on_loopback=plaintext,
            metrics=metrics,
        )
        refusal = _POP3_REFUSAL
    elif name in ("imap", "imaps"):
        factory = IMAPServerFactory(
            top.portal,
            hostname,
            reactor,
            tls=starttls,
            implicit_tls=implicit,
            allow_plaintext_on_loopback=plaintext,
            max_message_size=cfg.limits.max_message_size,
            read_only=getattr(cfg, name).read_only,
            metrics=metrics,
        )
        refusal = _IMAP_REFUSAL
    else:
        return None
    if implicit:
        # No plain-text channel to say "too many" on: just close.
        return top.tls.wrap(factory), b""
    return factory, refusal

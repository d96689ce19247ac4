"""
Tests for L{mailsys.queue.client}: outbound SMTP to a scripted sink on
loopback, reached through C{routes}, through MX records served by a loopback
C{twisted.names} server, and as a smarthost with verified STARTTLS and AUTH;
per-recipient results; CRLF and dot-stuffing on the wire; and the RFC 5321
timeouts on a L{Clock}.
"""

from __future__ import annotations

import base64
import io
import re
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.error import TimeoutError as ConnectingTimeoutError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.names.client import Resolver as DNSClientResolver
from twisted.names.hosts import Resolver as HostsResolver
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailsys.config import LimitsSection
from mailsys.queue.client import (
    _TLS_MAY,
    _TLS_OFF,
    SMTPTransport,
    Timeouts,
    _Hop,
    _Job,
    _Session,
    _WireEncoder,
    make_resolver,
)
from mailsys.queue.interfaces import IOutboundTransport, RecipientResult
from mailsys.smtp.server import ESMTPServerFactory
from mailsys.testing import MemoryDelivery, TLSStringTransport
from mailsys.testing_dns import start_dns
from mailsys.tls import ServerTLS, ensure_certificate

# A message as the queue stores it (LF endings), with the lines that
# dot-stuffing exists for.
MESSAGE = (
    b"From: alice@a.test\n"
    b"To: bob@b.test\n"
    b"Subject: dots\n"
    b"\n"
    b".hidden line\n"
    b"..two dots\n"
    b".\n"
    b"last line\n"
)
ON_THE_WIRE = (
    b"From: alice@a.test\r\n"
    b"To: bob@b.test\r\n"
    b"Subject: dots\r\n"
    b"\r\n"
    b"..hidden line\r\n"
    b"...two dots\r\n"
    b"..\r\n"
    b"last line\r\n"
    b".\r\n"
)

_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


# --- certificates, made once for the module -------------------------------

_certificates: dict[str, tuple[Path, Path]] = {}
_certificate_dir = tempfile.TemporaryDirectory(prefix="mailsys-client-tests-")


def certificate(name: str) -> tuple[Path, Path]:
    """A self-signed certificate and key for C{name} (also localhost, 127.0.0.1)."""
    if name not in _certificates:
        directory = Path(_certificate_dir.name) / name
        cert, key = directory / "cert.pem", directory / "key.pem"
        ensure_certificate(cert, key, name)
        _certificates[name] = (cert, key)
    return _certificates[name]


def server_tls(name: str) -> ServerTLS:
    tls = ServerTLS(*certificate(name))
    tls.load()
    return tls


# --- the sink ---------------------------------------------------------------


@dataclass
class Transaction:
    """One message as the sink received it."""

    mail: str
    recipients: list[str]
    data: bytes  # dot-unstuffed, CRLF line endings, as the sink's SMTP sees it
    raw: bytes  # as on the wire, dot-stuffed, up to and including ".\r\n"
    tls: bool
    user: str | None


@dataclass
class Sink:
    """
    A scripted ESMTP receiver for tests: replies as told (per recipient,
    to DATA, at the greeting), offers STARTTLS and AUTH when given a
    certificate and users, and records every command and message.

    Written for these tests rather than reusing Twisted's C{ESMTP} server,
    which would need a portal, a realm and a delivery object to script the
    same replies, and would hide the wire; one test delivers to mailsys's
    own inbound server instead.
    """

    greeting: str = "220 sink.test ESMTP"
    extensions: list[str] = field(default_factory=lambda: ["8BITMIME", "SIZE 1000000"])
    tls: ServerTLS | None = None
    broken_tls: bool = False  # says 220 to STARTTLS, then answers in clear
    esmtp: bool = True  # False: refuses EHLO, like an old SMTP server
    users: dict[str, str] | None = None  # AUTH PLAIN LOGIN, after TLS only
    auth_mechanisms: str = "PLAIN LOGIN"
    mail_reply: str = "250 2.1.0 Ok"
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str = "250 2.0.0 Ok: queued"
    transactions: list[Transaction] = field(default_factory=list)
    commands: list[tuple[str, bool]] = field(default_factory=list)  # (line, tls)
    wire: bytearray = field(default_factory=bytearray)
    connections: int = 0
    open: set = field(default_factory=set)
    most_open: int = 0  # connections open at once, at most
    port: int = 0

    def listen(
        self, case: TestCase, interface: str = "127.0.0.1", port: int = 0
    ) -> int:
        factory = Factory.forProtocol(lambda: SinkSession(self))
        factory.noisy = False
        listening = reactor.listenTCP(port, factory, interface=interface)
        case.addCleanup(self.closed)
        case.addCleanup(listening.stopListening)
        self.port = listening.getHost().port
        return self.port

    def closed(self) -> defer.Deferred:
        """Fires when every connection to the sink is closed."""
        return defer.gatherResults([s.gone for s in list(self.open)])

    def verbs(self) -> list[str]:
        return [line.split(" ", 1)[0].upper() for line, _ in self.commands]

    async def conversation(self) -> list[str]:
        """
        The command verbs, once the client has hung up (results are known,
        and returned, before the client says QUIT).
        """
        await self.closed()
        return self.verbs()


class SinkSession(Protocol):
    """One client connection to a L{Sink}."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.buffer = b""
        self.mode = "command"
        self.tls = False
        self.user: str | None = None
        self.login_user: str | None = None
        self.mail: str | None = None
        self.recipients: list[str] = []
        self.lines: list[bytes] = []
        self.raw = bytearray()
        self.gone: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.sink.connections += 1
        self.sink.open.add(self)
        self.sink.most_open = max(self.sink.most_open, len(self.sink.open))
        self.send(self.sink.greeting)
        if self.sink.greeting.startswith("421"):
            self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.sink.open.discard(self)
        self.gone.callback(None)

    def send(self, *lines: str) -> None:
        self.transport.write("".join(line + "\r\n" for line in lines).encode())

    def dataReceived(self, data: bytes) -> None:
        if self.mode == "broken":
            self.transport.write(b"this is not a TLS handshake\r\n")
            self.transport.loseConnection()
            return
        self.sink.wire += data
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.lineReceived(line + b"\n")

    def lineReceived(self, line: bytes) -> None:
        if self.mode == "data":
            self.raw += line
            line = line.rstrip(b"\r\n")
            if line == b".":
                self.endOfData()
            else:
                self.lines.append(line[1:] if line.startswith(b".") else line)
            return
        text = line.rstrip(b"\r\n").decode()
        if self.mode.startswith("login"):
            self.login(text)
            return
        self.sink.commands.append((text, self.tls))
        verb, _, argument = text.partition(" ")
        getattr(self, "do_" + verb.upper(), self.unknown)(argument)

    def unknown(self, argument: str) -> None:
        self.send("502 5.5.2 unknown command")

    def do_EHLO(self, argument: str) -> None:
        if not self.sink.esmtp:
            self.send("500 5.5.1 command unrecognized")
            return
        extensions = list(self.sink.extensions)
        if self.sink.tls is not None and not self.tls:
            extensions.append("STARTTLS")
        if self.sink.users is not None and self.tls:
            extensions.append("AUTH " + self.sink.auth_mechanisms)
        lines = ["sink.test"] + extensions
        self.send(*[f"250-{x}" for x in lines[:-1]], f"250 {lines[-1]}")

    def do_HELO(self, argument: str) -> None:
        self.send("250 sink.test")

    def do_STARTTLS(self, argument: str) -> None:
        self.send("220 2.0.0 go ahead")
        if self.sink.broken_tls:
            self.mode = "broken"
            self.buffer = b""
            return
        assert self.sink.tls is not None
        self.transport.startTLS(self.sink.tls.contextFactory())
        self.tls = True
        self.buffer = b""

    def do_AUTH(self, argument: str) -> None:
        mechanism, _, initial = argument.partition(" ")
        if self.sink.users is None or not self.tls:
            self.send("503 5.5.1 AUTH not available")
        elif mechanism.upper() == "PLAIN" and initial:
            _, user, password = base64.b64decode(initial).decode().split("\0")
            self.check(user, password)
        elif mechanism.upper() == "LOGIN":
            self.mode = "login-user"
            self.send("334 VXNlcm5hbWU6")
        else:
            self.send("504 5.5.4 unsupported")

    def login(self, text: str) -> None:
        if self.mode == "login-user":
            self.login_user = base64.b64decode(text).decode()
            self.mode = "login-password"
            self.send("334 UGFzc3dvcmQ6")
        else:
            self.mode = "command"
            self.check(self.login_user or "", base64.b64decode(text).decode())

    def check(self, user: str, password: str) -> None:
        assert self.sink.users is not None
        if self.sink.users.get(user) == password:
            self.user = user
            self.send("235 2.7.0 Authentication successful")
        else:
            self.send("535 5.7.8 Authentication credentials invalid")

    def do_MAIL(self, argument: str) -> None:
        if self.sink.users is not None and self.user is None:
            self.send("530 5.7.0 Authentication required")
            return
        self.mail = argument
        self.recipients = []
        self.send(self.sink.mail_reply)

    def do_RCPT(self, argument: str) -> None:
        address = argument.split(":", 1)[1].strip("<>")
        reply = self.sink.rcpt_replies.get(address, "250 2.1.5 Ok")
        if reply.startswith("2"):
            self.recipients.append(address)
        self.send(reply)
        if reply.startswith("421"):
            self.transport.loseConnection()

    def do_DATA(self, argument: str) -> None:
        self.mode = "data"
        self.lines = []
        self.raw = bytearray()
        self.send("354 End data with <CR><LF>.<CR><LF>")

    def endOfData(self) -> None:
        self.mode = "command"
        data = b"".join(line + b"\r\n" for line in self.lines)
        assert self.mail is not None
        self.sink.transactions.append(
            Transaction(
                self.mail, self.recipients, data, bytes(self.raw), self.tls, self.user
            )
        )
        self.send(self.sink.data_reply)

    def do_RSET(self, argument: str) -> None:
        self.send("250 2.0.0 Ok")

    def do_QUIT(self, argument: str) -> None:
        self.send("221 2.0.0 Bye")
        self.transport.loseConnection()


class TrackingFactory(WrappingFactory):
    """Wraps a server factory to tell when all its connections are closed."""

    def __init__(self, wrapped) -> None:
        super().__init__(wrapped)
        self._idle: list[defer.Deferred] = []

    def unregisterProtocol(self, p) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def closed(self) -> defer.Deferred:
        if not self.protocols:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._idle.append(d)
        return d


def closed_port() -> int:
    """A loopback port with nothing listening on it (connections are refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class ClientTestCase(TestCase):
    """Helpers: a message file, a transport, a DNS server."""

    def message(self, content: bytes = MESSAGE) -> Path:
        path = Path(self.mktemp())
        path.write_bytes(content)
        return path

    def dns(self, records: dict) -> str:
        port, stop = start_dns(reactor, records)
        self.addCleanup(stop)
        return f"127.0.0.1:{port}"

    def transport(self, **kwargs) -> SMTPTransport:
        if "resolver" in kwargs and isinstance(kwargs["resolver"], str):
            kwargs["resolver"] = make_resolver(reactor, kwargs["resolver"])
        return SMTPTransport(reactor, "mail.a.test", **kwargs)

    async def send(
        self,
        transport: SMTPTransport,
        recipients: list[str],
        content: bytes = MESSAGE,
        sender: str | None = "alice@a.test",
    ) -> list[RecipientResult]:
        return await transport.send("Q1", sender, recipients, self.message(content))


class RouteTests(ClientTestCase):
    """Delivery to a static next hop from C{[relay] routes}."""

    def setUp(self) -> None:
        self.sink = Sink()
        port = self.sink.listen(self)
        self.client = self.transport(routes={"b.test": f"127.0.0.1:{port}"})
        self.hop = f"[127.0.0.1]:{port}"

    def test_interface(self) -> None:
        """The SMTP transport is a transport the queue runner can use."""
        self.assertTrue(verifyObject(IOutboundTransport, self.client))

    async def test_message_arrives_exactly(self) -> None:
        """
        The next hop receives the message with CRLF line endings, every
        line starting with a dot doubled on the wire, and gets back exactly
        what was queued; the result says delivered and names the next hop.
        """
        results = await self.send(self.client, ["bob@b.test"])
        self.assertEqual(
            results, [RecipientResult("bob@b.test", 250, "2.0.0 Ok: queued", self.hop)]
        )
        [transaction] = self.sink.transactions
        self.assertEqual(transaction.raw, ON_THE_WIRE)
        self.assertEqual(transaction.data, MESSAGE.replace(b"\n", b"\r\n"))
        size = len(MESSAGE) + MESSAGE.count(b"\n")
        self.assertEqual(transaction.mail, f"FROM:<alice@a.test> SIZE={size}")
        self.assertEqual(transaction.recipients, ["bob@b.test"])
        self.assertIsNone(_BARE.search(bytes(self.sink.wire)))
        self.assertEqual(
            await self.sink.conversation(), ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
        )
        self.assertEqual(self.sink.commands[0][0], "EHLO mail.a.test")

    async def test_bare_cr_and_missing_newline(self) -> None:
        """
        A stray CR in a stored message, a stored CRLF and a last line
        without a newline all leave as proper CRLF lines: nothing bare
        reaches the wire.
        """
        await self.send(self.client, ["bob@b.test"], b"Subject: x\n\na\rb\r\nc\n.d")
        [transaction] = self.sink.transactions
        self.assertEqual(
            transaction.raw, b"Subject: x\r\n\r\na\r\nb\r\nc\r\n..d\r\n.\r\n"
        )
        self.assertIsNone(_BARE.search(bytes(self.sink.wire)))

    async def test_large_message_dot_stuffed_across_chunks(self) -> None:
        """
        A message larger than one read of the file, with dot lines at
        every position, arrives intact.
        """
        content = b"".join(b".%d %s\n" % (i, b"x" * (i % 97)) for i in range(3000))
        results = await self.send(self.client, ["bob@b.test"], content)
        self.assertTrue(results[0].delivered)
        [transaction] = self.sink.transactions
        self.assertEqual(transaction.data, content.replace(b"\n", b"\r\n"))
        self.assertIsNone(_BARE.search(bytes(self.sink.wire)))

    async def test_null_sender_and_eight_bit(self) -> None:
        """
        A bounce goes out with C{MAIL FROM:<>}; an 8-bit message is
        declared C{BODY=8BITMIME} to a server that offers it.
        """
        content = "Subject: caf\u00e9\n\nd\u00e9j\u00e0 vu\n".encode()
        await self.send(self.client, ["bob@b.test"], content, sender=None)
        [transaction] = self.sink.transactions
        size = len(content) + content.count(b"\n")
        self.assertEqual(transaction.mail, f"FROM:<> SIZE={size} BODY=8BITMIME")
        self.assertEqual(transaction.data, content.replace(b"\n", b"\r\n"))

    async def test_mixed_recipient_replies(self) -> None:
        """
        Each recipient gets its own server's verdict: accepted ones the
        reply after DATA, refused ones their RCPT reply, temporary (450) or
        permanent (550); only the accepted one is in the message's envelope.
        """
        self.sink.rcpt_replies = {
            "later@b.test": "450 4.2.1 Mailbox busy",
            "gone@b.test": "550 5.1.1 No such user",
        }
        results = await self.send(
            self.client, ["later@b.test", "bob@b.test", "gone@b.test"]
        )
        self.assertEqual(
            [(r.recipient, r.code, r.text) for r in results],
            [
                ("later@b.test", 450, "4.2.1 Mailbox busy"),
                ("bob@b.test", 250, "2.0.0 Ok: queued"),
                ("gone@b.test", 550, "5.1.1 No such user"),
            ],
        )
        self.assertEqual([r.permanent for r in results], [False, False, True])
        self.assertEqual(self.sink.transactions[0].recipients, ["bob@b.test"])

    async def test_no_recipient_accepted(self) -> None:
        """When every recipient is refused the client says QUIT without DATA."""
        self.sink.rcpt_replies = {"gone@b.test": "550 5.1.1 No such user"}
        results = await self.send(self.client, ["gone@b.test"])
        self.assertEqual([(r.code, r.permanent) for r in results], [(550, True)])
        self.assertEqual(
            await self.sink.conversation(), ["EHLO", "MAIL", "RCPT", "QUIT"]
        )

    async def test_reply_after_data_applies_to_accepted(self) -> None:
        """
        A refusal after the message (here 554) is the result of every
        recipient that was accepted; a recipient refused earlier keeps its
        own reply.
        """
        self.sink.data_reply = "554 5.7.1 Message rejected as spam"
        self.sink.rcpt_replies = {"later@b.test": "452 4.2.2 Over quota"}
        results = await self.send(
            self.client, ["bob@b.test", "later@b.test", "carol@b.test"]
        )
        self.assertEqual([r.code for r in results], [554, 452, 554])
        self.assertEqual(results[0].text, "5.7.1 Message rejected as spam")

    async def test_connections_per_host(self) -> None:
        """
        Messages sent at the same time to one host share at most
        C{max_connections_per_host} connections, and all get through.
        """
        client = self.transport(
            routes={"b.test": f"127.0.0.1:{self.sink.port}"}, max_connections_per_host=2
        )
        sending = [self.send(client, ["bob@b.test"]) for _ in range(5)]
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(s) for s in sending]
        )
        self.assertEqual([r[0].code for r in results], [250] * 5)
        self.assertLessEqual(self.sink.most_open, 2)

    async def test_sender_refused(self) -> None:
        """
        A sender the next hop refuses for good (5xx to MAIL FROM) bounces
        every recipient, and no recipient is even asked.
        """
        self.sink.mail_reply = "553 5.7.1 Sender address rejected"
        results = await self.send(self.client, ["bob@b.test", "carol@b.test"])
        self.assertEqual(
            [(r.code, r.text) for r in results],
            [(553, "5.7.1 Sender address rejected")] * 2,
        )
        self.assertEqual(await self.sink.conversation(), ["EHLO", "MAIL", "QUIT"])

    async def test_sender_deferred(self) -> None:
        """A 4xx to MAIL FROM leaves every recipient for a retry."""
        self.sink.mail_reply = "451 4.3.0 Try again later"
        results = await self.send(self.client, ["bob@b.test"])
        expected = RecipientResult("bob@b.test", 451, "4.3.0 Try again later", self.hop)
        self.assertEqual(results, [expected])
        self.assertEqual(await self.sink.conversation(), ["EHLO", "MAIL", "QUIT"])

    async def test_421_greeting(self) -> None:
        """A server that greets with 421 leaves every recipient for a retry."""
        self.sink.greeting = "421 4.3.2 Too busy, try later"
        results = await self.send(self.client, ["bob@b.test", "carol@b.test"])
        self.assertEqual(
            results,
            [
                RecipientResult(r, 421, "4.3.2 Too busy, try later", self.hop)
                for r in ["bob@b.test", "carol@b.test"]
            ],
        )
        self.assertEqual(self.sink.commands, [])

    async def test_421_during_recipients(self) -> None:
        """
        A 421 to one RCPT means the server is closing: that recipient, those
        not yet asked, and those accepted before it are all retried later;
        no message is sent.
        """
        self.sink.rcpt_replies = {
            "gone@b.test": "550 5.1.1 No such user",
            "carol@b.test": "421 4.7.0 Closing, too many errors",
        }
        results = await self.send(
            self.client, ["bob@b.test", "gone@b.test", "carol@b.test", "dave@b.test"]
        )
        self.assertEqual([r.code for r in results], [421, 550, 421, 421])
        self.assertFalse(any(r.permanent for r in results if r.code == 421))
        self.assertEqual(self.sink.transactions, [])
        self.assertNotIn("DATA", await self.sink.conversation())

    async def test_connection_refused(self) -> None:
        """A next hop that refuses the connection gives a temporary result naming it."""
        port = closed_port()
        client = self.transport(routes={"b.test": f"127.0.0.1:{port}"})
        results = await self.send(client, ["bob@b.test"])
        self.assertEqual(
            results,
            [
                RecipientResult(
                    "bob@b.test",
                    451,
                    f"4.4.1 connection refused by [127.0.0.1]:{port}",
                    f"[127.0.0.1]:{port}",
                )
            ],
        )

    async def test_message_over_the_servers_size_limit(self) -> None:
        """
        A message bigger than the SIZE the server advertises bounces at once
        (552), without being sent.
        """
        self.sink.extensions = ["SIZE 100"]
        results = await self.send(self.client, ["bob@b.test"], b"x" * 200 + b"\n")
        self.assertEqual((results[0].code, results[0].permanent), (552, True))
        self.assertIn("5.3.4", results[0].text)
        self.assertEqual(await self.sink.conversation(), ["EHLO", "QUIT"])

    async def test_plain_smtp_server(self) -> None:
        """
        A server without ESMTP (EHLO refused) gets HELO and neither SIZE nor
        BODY parameters.
        """
        sink = Sink(esmtp=False)
        sink.listen(self)
        client = self.transport(routes={"b.test": f"127.0.0.1:{sink.port}"})
        results = await self.send(client, ["bob@b.test"], "caf\u00e9\n".encode())
        self.assertTrue(results[0].delivered)
        self.assertEqual((await sink.conversation())[:3], ["EHLO", "HELO", "MAIL"])
        self.assertEqual(sink.transactions[0].mail, "FROM:<alice@a.test>")

    async def test_opportunistic_starttls(self) -> None:
        """A next hop that offers STARTTLS gets the message encrypted."""
        self.sink.tls = server_tls("mx.b.test")
        results = await self.send(self.client, ["bob@b.test"])
        self.assertTrue(results[0].delivered)
        self.assertEqual(
            await self.sink.conversation(),
            ["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA", "QUIT"],
        )
        self.assertTrue(self.sink.transactions[0].tls)
        self.assertEqual(self.sink.transactions[0].raw, ON_THE_WIRE)

    async def test_failed_opportunistic_handshake_falls_back(self) -> None:
        """
        When an MX offers STARTTLS but the handshake fails, the message is
        sent again over a new, plain connection, as Postfix does.
        """
        self.sink.tls = server_tls("mx.b.test")
        self.sink.broken_tls = True
        results = await self.send(self.client, ["bob@b.test"])
        self.assertTrue(results[0].delivered)
        self.assertEqual(self.sink.connections, 2)
        self.assertFalse(self.sink.transactions[0].tls)
        self.assertEqual(self.sink.transactions[0].raw, ON_THE_WIRE)

    async def test_non_ascii_address_needs_smtputf8(self) -> None:
        """
        A non-ASCII address is not sent to a server without SMTPUTF8: it
        bounces (553 5.6.7) rather than going out mangled.
        """
        results = await self.send(self.client, ["j\u00f6rg@b.test"])
        self.assertEqual((results[0].code, results[0].permanent), (553, True))
        self.assertIn("5.6.7", results[0].text)
        self.assertNotIn("MAIL", await self.sink.conversation())

    async def test_to_a_mailsys_server(self) -> None:
        """
        Another mailsys instance's inbound server (with STARTTLS) accepts
        the message, and stores exactly what was queued.
        """
        delivery = MemoryDelivery(users=("bob@b.test",), domains=("b.test",))
        tls = server_tls("mx.b.test").contextFactory()
        server = ESMTPServerFactory(
            delivery, "mx.b.test", LimitsSection(), reactor, tls=tls
        )
        factory = TrackingFactory(server)
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(factory.closed)
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        client = self.transport(routes={"b.test": f"127.0.0.1:{port}"})
        results = await self.send(client, ["bob@b.test", "nobody@b.test"])
        self.assertEqual([r.code for r in results], [250, 550])
        self.assertTrue(results[0].text.startswith("2.0.0 "), results[0].text)
        [(envelope, data)] = delivery.delivered
        self.assertEqual(data, MESSAGE)
        self.assertEqual([str(r) for r in envelope.recipients], ["bob@b.test"])


class MXTests(ClientTestCase):
    """Delivery by MX records, from a loopback C{twisted.names} server."""

    def setUp(self) -> None:
        self.sink = Sink()
        self.port = self.sink.listen(self)

    def mx_client(self, records: dict) -> SMTPTransport:
        return self.transport(resolver=self.dns(records), mx_port=self.port)

    async def test_preference_order(self) -> None:
        """
        The MX with the lowest preference value gets the mail, however the
        records are listed.
        """
        other = Sink()
        other.listen(self, interface="127.0.0.2", port=self.port)
        client = self.mx_client(
            {
                "b.test": {"MX": [(20, "backup.b.test"), (10, "primary.b.test")]},
                "backup.b.test": {"A": ["127.0.0.1"]},
                "primary.b.test": {"A": ["127.0.0.2"]},
            }
        )
        results = await self.send(client, ["bob@b.test"])
        self.assertEqual(results[0].next_hop, f"primary.b.test[127.0.0.2]:{self.port}")
        self.assertEqual(len(other.transactions), 1)
        self.assertEqual(self.sink.connections, 0)

    async def test_next_mx_when_first_refuses(self) -> None:
        """When the preferred MX refuses connections, the next one gets the mail."""
        client = self.mx_client(
            {
                "b.test": {"MX": [(10, "primary.b.test"), (20, "backup.b.test")]},
                "primary.b.test": {"A": ["127.0.0.3"]},
                "backup.b.test": {"A": ["127.0.0.1"]},
            }
        )
        results = await self.send(client, ["bob@b.test"])
        self.assertEqual(
            results,
            [
                RecipientResult(
                    "bob@b.test",
                    250,
                    "2.0.0 Ok: queued",
                    f"backup.b.test[127.0.0.1]:{self.port}",
                )
            ],
        )
        self.assertEqual(self.sink.transactions[0].raw, ON_THE_WIRE)

    async def test_all_mx_unreachable(self) -> None:
        """
        When no MX can be reached the result is temporary and names the
        last one tried.
        """
        client = self.mx_client(
            {
                "b.test": {"MX": [(10, "primary.b.test"), (20, "backup.b.test")]},
                "primary.b.test": {"A": ["127.0.0.3"]},
                "backup.b.test": {"A": ["127.0.0.4"]},
            }
        )
        [result] = await self.send(client, ["bob@b.test"])
        self.assertEqual(result.code, 451)
        hop = f"backup.b.test[127.0.0.4]:{self.port}"
        self.assertEqual(result.text, f"4.4.1 connection refused by {hop}")

    async def test_address_fallback_without_mx(self) -> None:
        """
        A domain with no MX records gets its mail at its own address (RFC
        5321 5.1).
        """
        client = self.mx_client({"b.test": {"A": ["127.0.0.1"]}})
        results = await self.send(client, ["bob@b.test"])
        self.assertEqual(results[0].code, 250)
        self.assertEqual(results[0].next_hop, f"b.test[127.0.0.1]:{self.port}")

    async def test_ipv6_address(self) -> None:
        """An MX host with only an IPv6 address is reached over IPv6."""
        sink6 = Sink()
        sink6.listen(self, interface="::1", port=self.port)
        client = self.mx_client(
            {"b.test": {"MX": [(10, "mx.b.test")]}, "mx.b.test": {"AAAA": ["::1"]}}
        )
        results = await self.send(client, ["bob@b.test"])
        self.assertEqual(results[0].next_hop, f"mx.b.test[::1]:{self.port}")
        self.assertEqual(len(sink6.transactions), 1)

    async def test_null_mx(self) -> None:
        """
        A domain that declares it takes no mail (null MX) bounces at once
        with 556 5.1.10.
        """
        client = self.mx_client({"b.test": {"MX": [(0, ".")]}})
        [result] = await self.send(client, ["bob@b.test"])
        self.assertEqual((result.code, result.permanent), (556, True))
        self.assertTrue(result.text.startswith("5.1.10 "), result.text)
        self.assertEqual(self.sink.connections, 0)

    async def test_nonexistent_domain(self) -> None:
        """Mail to a domain that does not exist bounces at once (550 5.1.2)."""
        client = self.mx_client({})
        [result] = await self.send(client, ["bob@b.test"])
        self.assertEqual((result.code, result.permanent), (550, True))
        self.assertTrue(result.text.startswith("5.1.2 "), result.text)

    async def test_dns_failure_is_temporary(self) -> None:
        """A DNS server failure (SERVFAIL) leaves the mail for a retry (451 4.4.3)."""
        client = self.mx_client({"b.test": "SERVFAIL"})
        [result] = await self.send(client, ["bob@b.test"])
        self.assertEqual((result.code, result.permanent), (451, False))
        self.assertTrue(result.text.startswith("4.4.3 "), result.text)

    async def test_no_mx_and_no_address(self) -> None:
        """A domain with neither MX nor address records bounces (550 5.4.4)."""
        client = self.mx_client({"b.test": {}})
        [result] = await self.send(client, ["bob@b.test"])
        self.assertEqual((result.code, result.permanent), (550, True))
        self.assertTrue(result.text.startswith("5.4.4 "), result.text)

    async def test_mx_host_without_address(self) -> None:
        """An MX host whose name does not resolve is a temporary failure (451 4.4.3)."""
        client = self.mx_client({"b.test": {"MX": [(10, "mx.b.test")]}})
        [result] = await self.send(client, ["bob@b.test"])
        self.assertEqual((result.code, result.permanent), (451, False))
        self.assertTrue(result.text.startswith("4.4.3 "), result.text)


class SmarthostTests(ClientTestCase):
    """All mail through a smarthost: STARTTLS required and verified, then AUTH."""

    def setUp(self) -> None:
        self.sink = Sink(
            tls=server_tls("smarthost.test"), users={"alice": "s3cret pass"}
        )
        self.port = self.sink.listen(self)
        self.resolver = self.dns(
            {"smarthost.test": {"A": ["127.0.0.1"]}, "other.test": {"A": ["127.0.0.1"]}}
        )

    def smarthost(
        self, name: str = "smarthost.test", cafile: str = "smarthost.test", **kwargs
    ) -> SMTPTransport:
        options = dict(
            resolver=self.resolver,
            smarthost=f"{name}:{self.port}",
            smarthost_username="alice",
            smarthost_password="s3cret pass",
            smarthost_cafile=certificate(cafile)[0],
        )
        options.update(kwargs)
        return self.transport(**options)

    async def test_auth_plain_over_verified_tls(self) -> None:
        """
        Mail for any domain goes to the smarthost, over TLS with its
        certificate verified, authenticated with AUTH PLAIN; nothing but
        EHLO and STARTTLS is said before TLS.
        """
        results = await self.send(self.smarthost(), ["bob@b.test", "carol@c.test"])
        self.assertEqual([r.code for r in results], [250, 250])
        self.assertEqual(results[0].next_hop, f"smarthost.test[127.0.0.1]:{self.port}")
        [transaction] = self.sink.transactions
        self.assertEqual((transaction.tls, transaction.user), (True, "alice"))
        self.assertEqual(transaction.raw, ON_THE_WIRE)
        in_clear = [line for line, tls in self.sink.commands if not tls]
        self.assertEqual(in_clear, ["EHLO mail.a.test", "STARTTLS"])
        self.assertIn("AUTH PLAIN", [line[:10] for line, tls in self.sink.commands])

    async def test_auth_login(self) -> None:
        """A smarthost that offers only AUTH LOGIN gets LOGIN."""
        self.sink.auth_mechanisms = "LOGIN"
        results = await self.send(self.smarthost(), ["bob@b.test"])
        self.assertTrue(results[0].delivered)
        self.assertEqual(self.sink.transactions[0].user, "alice")
        self.assertIn("AUTH LOGIN", [line for line, tls in self.sink.commands])

    async def test_wrong_password(self) -> None:
        """
        A refused password is a temporary failure (the setting can be
        fixed), and no mail is sent.
        """
        client = self.smarthost(smarthost_password="wrong")
        [result] = await self.send(client, ["bob@b.test"])
        self.assertEqual((result.code, result.permanent), (451, False))
        self.assertIn("4.7.8", result.text)
        self.assertIn("535 5.7.8", result.text)
        self.assertNotIn("wrong", result.text)
        self.assertNotIn("MAIL", await self.sink.conversation())

    async def test_untrusted_certificate(self) -> None:
        """
        A smarthost whose certificate is not signed by a trusted CA gets
        neither the password nor the mail; the result is temporary.
        """
        client = self.smarthost(cafile="someone-else.test")
        [result] = await self.send(client, ["bob@b.test"])
        self.assertEqual((result.code, result.permanent), (451, False))
        expected = "4.7.5 TLS handshake with smarthost.test"
        self.assertTrue(result.text.startswith(expected), result.text)
        self.assertEqual(await self.sink.conversation(), ["EHLO", "STARTTLS"])
        self.assertEqual(self.sink.connections, 1)

    async def test_certificate_for_another_name(self) -> None:
        """A trusted certificate for another host name is refused too."""
        [result] = await self.send(self.smarthost(name="other.test"), ["bob@b.test"])
        self.assertEqual((result.code, result.permanent), (451, False))
        self.assertIn("4.7.5", result.text)
        self.assertEqual(await self.sink.conversation(), ["EHLO", "STARTTLS"])

    async def test_starttls_not_offered(self) -> None:
        """A smarthost without STARTTLS gets no password and no mail: 451 4.7.4."""
        self.sink.tls = None
        [result] = await self.send(self.smarthost(), ["bob@b.test"])
        self.assertEqual((result.code, result.permanent), (451, False))
        self.assertTrue(result.text.startswith("4.7.4 TLS is required"), result.text)
        self.assertEqual(await self.sink.conversation(), ["EHLO", "QUIT"])

    async def test_routes_come_first(self) -> None:
        """A domain with a static route goes there, not to the smarthost."""
        other = Sink()
        other.listen(self)
        client = self.smarthost(routes={"b.test": f"127.0.0.1:{other.port}"})
        results = await self.send(client, ["bob@b.test"])
        self.assertTrue(results[0].delivered)
        self.assertEqual(len(other.transactions), 1)
        self.assertEqual(self.sink.connections, 0)


# --- units: the wire encoding, and timeouts on a Clock ----------------------


class WireEncoderTests(SynchronousTestCase):
    """L{_WireEncoder}: CRLF and dot-stuffing whatever the chunk boundaries."""

    def encode(self, chunks: list[bytes]) -> bytes:
        encoder = _WireEncoder()
        return b"".join(encoder.encode(c) for c in chunks) + encoder.finish()

    def test_every_split(self) -> None:
        """
        Split anywhere (between CR and LF, before a dot), the stored message
        goes out the same: CRLF lines, dots doubled, a stray CR made a line
        end, a missing final newline added.
        """
        stored = b".a\n.\nb\r\n..c\rd\n\n.e"
        wire = b"..a\r\n..\r\nb\r\n...c\r\nd\r\n\r\n..e\r\n.\r\n"
        self.assertEqual(self.encode([stored]), wire)
        for i in range(len(stored) + 1):
            for j in range(i, len(stored) + 1):
                chunks = [stored[:i], stored[i:j], stored[j:]]
                self.assertEqual(self.encode(chunks), wire, chunks)

    def test_empty_message(self) -> None:
        """An empty message is just the terminating dot."""
        self.assertEqual(self.encode([]), b".\r\n")
        self.assertEqual(self.encode([b"\n"]), b"\r\n.\r\n")


class SessionTests(SynchronousTestCase):
    """The conversation on a L{StringTransport}, timed by a L{Clock}."""

    HOP = "mx.b.test[192.0.2.1]:25"

    def session(
        self, recipients=("bob@b.test",), content: bytes = b"Hi\n", tls=_TLS_OFF
    ) -> tuple[_Session, StringTransport, Clock]:
        """A session on a (TLS-capable) string transport, timed by a Clock."""
        clock = Clock()
        file = io.BytesIO(content)
        job = _Job("Q1", "alice@a.test", list(recipients), file, len(content), False)
        context = object()
        session = _Session(
            clock, "mail.a.test", job, self.HOP, tls, context, None, Timeouts()
        )
        transport = TLSStringTransport()
        session.makeConnection(transport)
        return session, transport, clock

    def pump(self, transport: StringTransport) -> None:
        """Let the message file flow into the transport."""
        while transport.producer is not None:
            transport.producer.resumeProducing()

    def outcome(self, session: _Session):
        return self.successResultOf(session.finished)

    def test_greeting_timeout(self) -> None:
        """
        A server that never greets is given up on after 5 minutes (RFC 5321
        4.5.3.2.1), not before; the connection is dropped and the failure
        names the host.
        """
        session, transport, clock = self.session()
        clock.advance(299.9)
        self.assertNoResult(session.finished)
        clock.advance(0.1)
        failure = self.outcome(session)
        self.assertEqual(failure.code, 451)
        self.assertEqual(
            failure.text, f"4.4.2 timeout waiting for the greeting from {self.HOP}"
        )
        self.assertTrue(transport.disconnecting)

    def converse(self, session, transport, replies: list[bytes]) -> None:
        """Feed each reply once the client has said something new."""
        for reply in replies:
            for i in range(len(reply)):
                session.dataReceived(reply[i : i + 1])
            self.pump(transport)

    def test_final_reply_timeout(self) -> None:
        """
        After the message is sent the client waits 10 minutes for the reply
        (RFC 5321 4.5.3.2.6); then the accepted recipients are retried later
        and a refused one keeps its own reply.
        """
        session, transport, clock = self.session(["gone@b.test", "bob@b.test"])
        self.converse(
            session,
            transport,
            [
                b"220 hi\r\n",
                b"250 hi\r\n",
                b"250 ok\r\n",
                b"550 5.1.1 no\r\n",
                b"250 ok\r\n",
                b"354 go\r\n",
            ],
        )
        self.assertTrue(transport.value().endswith(b"DATA\r\nHi\r\n.\r\n"))
        clock.advance(599)
        self.assertNoResult(session.finished)
        clock.advance(1)
        results = self.outcome(session)
        self.assertEqual(
            [(r.code, r.text) for r in results],
            [
                (550, "5.1.1 no"),
                (
                    451,
                    "4.4.2 timeout waiting for the reply to the end of the message"
                    f" from {self.HOP}",
                ),
            ],
        )

    def test_replies_split_at_every_byte(self) -> None:
        """
        Replies arriving a byte at a time, multi-line EHLO included, give
        the same conversation and results as whole ones.
        """
        session, transport, clock = self.session()
        self.converse(
            session,
            transport,
            [
                b"220 mx.b.test ESMTP\r\n",
                b"250-mx.b.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
                b"250 2.1.0 ok\r\n",
                b"250 2.1.5 ok\r\n",
                b"354 go\r\n",
                b"250 2.0.0 queued as X\r\n",
            ],
        )
        self.assertEqual(
            self.outcome(session),
            [RecipientResult("bob@b.test", 250, "2.0.0 queued as X", self.HOP)],
        )
        self.assertEqual(
            transport.value(),
            b"EHLO mail.a.test\r\nMAIL FROM:<alice@a.test>\r\nRCPT TO:<bob@b.test>\r\n"
            b"DATA\r\nHi\r\n.\r\nQUIT\r\n",
        )

    def test_replies_smuggled_before_tls_are_ignored(self) -> None:
        """
        Replies sent in clear right after the 220 to STARTTLS (an attacker
        injecting "250" answers for the encrypted session, CVE-2011-0411's
        client side) are thrown away: the client waits for the real EHLO
        reply over TLS before it says MAIL.
        """
        session, transport, clock = self.session(tls=_TLS_MAY)
        session.dataReceived(b"220 hi\r\n")
        session.dataReceived(b"250-hi\r\n250 STARTTLS\r\n")
        session.dataReceived(b"220 go ahead\r\n250 injected\r\n250 2.1.0 injected\r\n")
        self.assertIs(transport.tls_started_with, session.context)
        self.assertEqual(
            transport.value(), b"EHLO mail.a.test\r\nSTARTTLS\r\nEHLO mail.a.test\r\n"
        )
        session.dataReceived(b"250 hi again\r\n")
        self.assertTrue(
            transport.value().endswith(
                b"EHLO mail.a.test\r\nMAIL FROM:<alice@a.test>\r\n"
            )
        )

    def test_malformed_reply(self) -> None:
        """A server that answers garbage is a temporary failure naming it."""
        session, transport, clock = self.session()
        session.dataReceived(b"hello there\r\n")
        failure = self.outcome(session)
        self.assertEqual(failure.code, 451)
        expected = f"4.5.0 {self.HOP} sent a malformed reply"
        self.assertTrue(failure.text.startswith(expected), failure.text)
        self.assertTrue(transport.disconnecting)

    def test_connection_lost_mid_message(self) -> None:
        """
        A connection lost while the message is being sent leaves the
        accepted recipients for a retry.
        """
        session, transport, clock = self.session(content=b"x\n" * 100000)
        replies = [b"220 hi\r\n", b"250 hi\r\n", b"250 ok\r\n", b"250 ok\r\n"]
        self.converse(session, transport, replies)
        session.dataReceived(b"354 go\r\n")
        transport.producer.resumeProducing()
        session.connectionLost(None)
        [result] = self.outcome(session)
        self.assertEqual((result.code, result.permanent), (451, False))
        self.assertIn("connection lost", result.text)


class ConnectTests(SynchronousTestCase):
    """Connecting to a next hop, on a memory reactor."""

    def test_connect_timeout(self) -> None:
        """
        A host that does not answer the connection within 30 seconds is a
        temporary failure naming it, so the next MX (or a retry) gets a turn.
        """
        memory = MemoryReactorClock()
        transport = SMTPTransport(memory, "mail.a.test")
        job = _Job("Q1", "alice@a.test", ["bob@b.test"], io.BytesIO(b"Hi\n"), 3, False)
        hop = _Hop("mx.b.test", 25, _TLS_MAY)
        attempt = defer.Deferred.fromCoroutine(
            transport._attempt(job, hop, "192.0.2.1", _TLS_MAY)
        )
        [(host, port, factory, timeout, _)] = memory.tcpClients
        self.assertEqual((host, port, timeout), ("192.0.2.1", 25, 30.0))
        factory.clientConnectionFailed(None, Failure(ConnectingTimeoutError()))
        failure = self.successResultOf(attempt)
        self.assertEqual(failure.code, 451)
        self.assertEqual(
            failure.text, "4.4.1 connection to mx.b.test[192.0.2.1]:25 timed out"
        )


class ResolverTests(SynchronousTestCase):
    """L{make_resolver}: which DNS server to ask."""

    def test_bad_server(self) -> None:
        """A resolver setting that is not an IP address (and port) is a clear error."""
        for bad in ["dns.example.test:53", "127.0.0.1:99999", "127.0.0.1:x"]:
            with self.assertRaises(ValueError) as caught:
                make_resolver(Clock(), bad)
            self.assertIn("resolver", str(caught.exception))

    def test_system(self) -> None:
        """
        By default names are looked up as the system does: C{/etc/hosts}
        first, then the servers of C{/etc/resolv.conf}.
        """
        clock = Clock()
        resolver = make_resolver(clock)
        self.assertEqual([type(r) for r in resolver.resolvers][0], HostsResolver)
        self.assertIsInstance(resolver.resolvers[1], DNSClientResolver)
        self.assertEqual(resolver.resolvers[1].resolv, "/etc/resolv.conf")
        # Read once: nothing left scheduled to re-read it.
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_server(self) -> None:
        """An IP address and port means that server only; the port defaults to 53."""
        resolver = make_resolver(Clock(), "127.0.0.1:5353")
        self.assertEqual(resolver.servers, [("127.0.0.1", 5353)])
        self.assertEqual(make_resolver(Clock(), "[::1]").servers, [("::1", 53)])

"""
The IMAP4rev1 server (RFC 3501) with the extensions Thunderbird and phones
use: LITERAL+, SASL-IR, ID, NAMESPACE, IDLE, UIDPLUS, MOVE, UNSELECT,
CHILDREN, SPECIAL-USE, LIST-EXTENDED, ENABLE.

Why not Twisted's C{IMAP4Server}: its weak points are the ones a client
meets first.  Its dispatch runs a pipelined command while the previous
one's Deferred is still pending (LOGIN against a threaded password check,
then SELECT, gets "BAD" or replies out of order); it keeps bytes pipelined
behind STARTTLS; it has no LITERAL+ and no cap on literals before login;
its argument parsers split quoted strings on the first quote and do not
nest lists; and its mailbox interfaces (C{IMailbox}, C{IMessage}) would
need an adapter larger than the commands themselves, while FETCH, SEARCH,
SELECT, LIST, LOGIN, AUTHENTICATE and STARTTLS would all have to be
overridden anyway.  Subclassing would keep only the broken parts, so this
is a small protocol of its own: one command at a time off an input buffer
(replies stay in order, and nothing is read ahead of STARTTLS or of a
pending LOGIN), literals counted in bytes and capped, and every store call
made through L{mailsys.maildir} in the thread pool.

The state machine (RFC 3501 3)::

    NOT_AUTHENTICATED --LOGIN/AUTHENTICATE--> AUTHENTICATED
    AUTHENTICATED --SELECT/EXAMINE--> SELECTED --CLOSE/UNSELECT--> AUTHENTICATED
    any --LOGOUT--> LOGOUT;  STARTTLS only before login, and it forgets
    everything pipelined behind it (RFC 3501 6.2.1, CVE-2011-0411 class).
"""

from __future__ import annotations

import base64
import binascii
import enum
from typing import Any, Callable

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import (
    IPushProducer,
    IReactorFDSet,
    IReactorThreads,
    ISSLTransport,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsys import limits
from mailsys.connections import is_loopback, tls_failure
from mailsys.imap import syntax, utf7
from mailsys.imap.fetch import MESSAGE, FetchItem, MessageCache, fetch_one, parse_items
from mailsys.imap.mailbox import (
    HIERARCHY,
    MAX_KEYWORDS,
    SYSTEM_FLAGS,
    FolderScan,
    FolderView,
    IIMAPAccount,
    list_folders,
    poll_folder,
    scan_folder,
)
from mailsys.imap.search import BadCharset, parse_search, search
from mailsys.imap.syntax import Arguments, BadCommand, Literal
from mailsys.imap.watch import FolderWatch, FolderWatcher
from mailsys.metrics import SILENT

log = Logger(namespace="mailsys.imap")

# RFC 3501 5.4: the autologout timer is at least 30 minutes once logged in;
# before login a short one keeps idle unauthenticated sockets from piling up.
TIMEOUT_BEFORE_LOGIN = 60.0
TIMEOUT_AFTER_LOGIN = 30 * 60.0
# RFC 7162 4 asks servers to take command lines of at least 8192 octets;
# Thunderbird's UID sets grow long.  Before login nothing needs more than 8 KiB.
LINE_BEFORE_LOGIN = 8 * 1024
LINE_AFTER_LOGIN = 64 * 1024
# RFC 7888 4: literals are capped (TOOBIG).  Before login only user names and
# passwords travel in them.  After login the cap is the message size limit.
LITERAL_BEFORE_LOGIN = 8 * 1024
LITERALS_PER_COMMAND = 64
# RFC 2177: how often an IDLE session looks for new mail when the kernel
# cannot tell it (no inotify) ...
IDLE_POLL = 1.0
# ... and, as a safety net for lost events, when it can.
IDLE_SAFETY_POLL = 30.0
# After an inotify event, wait this long for the rest of the burst (a
# delivery to many folders, a MOVE of 500 messages): one rescan for all.
IDLE_SETTLE = 0.05
# Failed logins before the connection is closed.
MAX_AUTH_FAILURES = 3
# Consecutive BAD commands before the connection is closed (Dovecot: 20).
MAX_BAD_COMMANDS = 20
# Stop reading from a client that keeps pipelining while a command is pending.
PIPELINE_BUFFER = 64 * 1024
# FETCH works a batch at a time in the thread pool.
FETCH_BATCH_MESSAGES = 500
FETCH_BATCH_BYTES = 1024 * 1024

_TAG_CHARS = frozenset(b for b in range(0x21, 0x7F) if bytes([b]) not in b'(){%*"\\+')
_UID_COMMANDS = ("FETCH", "STORE", "COPY", "MOVE", "SEARCH", "EXPUNGE")
_STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN")
_FLAG_NAMES = {flag.lower(): flag for flag in SYSTEM_FLAGS}
# SASL LOGIN's challenges, "Username:" and "Password:" in base64 (the
# draft-murchison-sasl-login texts, which some clients compare).
_USERNAME_CHALLENGE = b"+ VXNlcm5hbWU6"
_PASSWORD_CHALLENGE = b"+ UGFzc3dvcmQ6"
# RFC 5530: a message another session expunged could not be served.
_EXPUNGED = "[EXPUNGEISSUED] Some messages were expunged meanwhile"


class State(enum.Enum):
    """RFC 3501 3: where a session is; it decides which commands are valid."""

    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


# Which commands each state takes (RFC 3501 6.1-6.4).
_ANY = {"CAPABILITY", "NOOP", "LOGOUT", "ID"}
_COMMANDS = {
    State.NOT_AUTHENTICATED: _ANY | {"STARTTLS", "LOGIN", "AUTHENTICATE"},
    State.AUTHENTICATED: _ANY
    | {
        "SELECT",
        "EXAMINE",
        "CREATE",
        "DELETE",
        "RENAME",
        "SUBSCRIBE",
        "UNSUBSCRIBE",
        "LIST",
        "LSUB",
        "STATUS",
        "APPEND",
        "NAMESPACE",
        "IDLE",
        "ENABLE",
    },
}
_COMMANDS[State.SELECTED] = _COMMANDS[State.AUTHENTICATED] | {
    "CHECK",
    "CLOSE",
    "UNSELECT",
    "EXPUNGE",
    "SEARCH",
    "FETCH",
    "STORE",
    "COPY",
    "MOVE",
}
_COMMANDS[State.LOGOUT] = set()


class Refusal(Exception):
    """
    A command that parses but cannot be done: answered C{NO [code] text}.
    Raised by command code and by the blocking store calls alike.
    """

    def __init__(self, text: str, code: str = "") -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class _TooLong(Exception):
    pass


class _Input:
    """
    Received bytes, handed out as lines (LF or CRLF) and as literal octets,
    one piece at a time, so the protocol can stop taking input while a
    command is pending and throw the rest away at STARTTLS.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def discard(self) -> bytes:
        dropped = bytes(self._buffer)
        self._buffer.clear()
        return dropped

    def __len__(self) -> int:
        return len(self._buffer)

    def line(self, limit: int) -> bytes | None:
        """
        The next line without its ending, or C{None} until one is complete.

        @raise _TooLong: if no line ends within C{limit} octets.
        """
        end = self._buffer.find(b"\n", 0, limit)
        if end < 0:
            if len(self._buffer) >= limit:
                raise _TooLong()
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line[:-1] if line.endswith(b"\r") else line

    def take(self, size: int) -> bytes:
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        return chunk


@implementer(IPushProducer)
class _WriteFlow:
    """
    Registered with the transport while FETCH writes message bodies, so a
    client reading slowly pauses the FETCH instead of letting the whole
    mailbox pile up in our send buffer.
    """

    def __init__(self) -> None:
        self.paused = False
        self._waiting: list[defer.Deferred[None]] = []

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()

    def drained(self) -> defer.Deferred[None]:
        """Fires once the transport wants more data."""
        if not self.paused:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        return d


class IMAPServer(Protocol, TimeoutMixin):
    """
    One IMAP session.  Input is taken one command at a time (with its
    literals); a command that waits for the disk or the password check
    holds the next one back, so replies to pipelined commands stay in order.
    Each C{do_*} method parses its arguments from an L{Arguments}, answers,
    and returns C{None} or a Deferred that fires when it has answered.
    """

    def __init__(self, factory: "IMAPServerFactory") -> None:
        self.factory = factory
        self.state = State.NOT_AUTHENTICATED
        self.client = "?"
        self.user: str | None = None
        self.account: Any = None
        self.mailbox: Any = None
        self.view: FolderView | None = None
        self._input = _Input()
        self._parts: list[bytes | Literal] = []
        self._literal: Literal | None = None
        self._literal_left = 0
        self._literal_total = 0
        self._busy = False
        self._paused = False
        self._closed = False
        self._continuation: Callable[[bytes], Any] | None = None
        self._tls = False
        self._logout: Callable[[], None] | None = None
        self._cache = MessageCache()
        self._auth_failures = 0
        self._bad_commands = 0
        self._idle_tag: bytes | None = None
        self._idle_call: Any = None
        self._idle_poll: defer.Deferred[None] | None = None
        self._idle_watch: FolderWatch | None = None
        # The pending check was asked for by an inotify event (not a poll).
        self._idle_soon = False
        # An event came while a check was under way: look once more after it.
        self._idle_again = False

    # -- connection ---------------------------------------------------------

    def callLater(self, period: float, func: Callable[[], None]) -> Any:
        """Timeouts and IDLE polls run on the injected clock."""
        return self.factory.clock.callLater(period, func)

    def connectionMade(self) -> None:
        """Greet with the capabilities and start the short pre-login timer."""
        peer = self.transport.getPeer()
        self.client = str(getattr(peer, "host", peer))
        self._tls = self.factory.implicit_tls or ISSLTransport.providedBy(
            self.transport
        )
        self.setTimeout(TIMEOUT_BEFORE_LOGIN)
        log.info(
            "imap connect from {client} tls={tls}", client=self.client, tls=self._tls
        )
        # RFC 3501 7.1.1: the greeting carries the capabilities, so a
        # client need not ask (Thunderbird does not).
        self._send(
            b"* OK [CAPABILITY "
            + self._capabilities()
            + b"] "
            + self.factory.hostname.encode("ascii", "replace")
            + b" IMAP4rev1 mailsys ready"
        )

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Clean up after LOGOUT or a dropped socket (Thunderbird just closes)."""
        self._closed = True
        self.setTimeout(None)
        self._stop_idle()
        self._release(self._parts)
        self._parts = []
        if self._literal is not None:
            self._literal.close()
            self._literal = None
        self._cache.clear()
        if self._logout is not None:
            logout, self._logout = self._logout, None
            logout()
        log.info(
            "imap disconnect {client} user={user}{why}",
            client=self.client,
            user=self.user,
            why=tls_failure(reason),
        )

    def timeoutConnection(self) -> None:
        # RFC 3501 7.1.5: BYE before closing.
        self._send(b"* BYE Autologout; idle for too long")
        self.transport.loseConnection()

    # -- output -------------------------------------------------------------

    def _send(self, line: bytes) -> None:
        if not self._closed:
            self.transport.write(line + b"\r\n")

    def _tagged(self, tag: bytes, status: bytes, text: str | bytes) -> None:
        if isinstance(text, str):
            text = text.encode("utf-8", "replace")
        if status == b"BAD":
            self._bad_commands += 1
        else:
            self._bad_commands = 0
        self._send(tag + b" " + status + b" " + text)
        if self._bad_commands >= MAX_BAD_COMMANDS:
            self._send(b"* BYE Too many invalid commands")
            self.transport.loseConnection()

    def _capabilities(self) -> bytes:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE"]
        caps += ["UNSELECT", "CHILDREN", "SPECIAL-USE", "LIST-EXTENDED"]
        if not self.factory.read_only:
            caps += ["UIDPLUS", "MOVE"]
        caps.append(f"APPENDLIMIT={self.factory.max_message_size}")
        if self.state is State.NOT_AUTHENTICATED:
            if self._can_starttls():
                caps.append("STARTTLS")
            # RFC 3501 6.2.3 and RFC 2595 3.2: no passwords in clear.
            if self._passwords_allowed():
                caps += ["AUTH=PLAIN", "AUTH=LOGIN"]
            else:
                caps.append("LOGINDISABLED")
        return " ".join(caps).encode("ascii")

    def _can_starttls(self) -> bool:
        return (
            not self._tls
            and self.factory.tls is not None
            and ITLSTransport.providedBy(self.transport)
        )

    def _passwords_allowed(self) -> bool:
        return self._tls or (
            self.factory.allow_plaintext_on_loopback and is_loopback(self.client)
        )

    # -- input --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Buffer, then take commands while none is pending."""
        self._input.feed(data)
        self._process()

    def _line_limit(self) -> int:
        if self.state is State.NOT_AUTHENTICATED:
            return LINE_BEFORE_LOGIN
        return LINE_AFTER_LOGIN

    def _literal_limit(self) -> int:
        if self.state is State.NOT_AUTHENTICATED:
            return LITERAL_BEFORE_LOGIN
        return self.factory.max_message_size

    def _process(self) -> None:
        while not self._busy and not self._closed and not self.transport.disconnecting:
            if self._literal is not None:
                chunk = self._input.take(self._literal_left)
                if not chunk:
                    break
                self.resetTimeout()
                self._literal.write(chunk)
                self._literal_left -= len(chunk)
                if self._literal_left == 0:
                    self._parts.append(self._literal)
                    self._literal = None
                continue
            try:
                line = self._input.line(self._line_limit())
            except _TooLong:
                self._send(b"* BYE Command line too long")
                self.transport.loseConnection()
                return
            if line is None:
                break
            self.resetTimeout()
            if self._continuation is not None:
                handler = self._continuation
                self._continuation = None
                result = handler(line)
                if isinstance(result, defer.Deferred):
                    self._wait(result)
                continue
            self._line(line)
        if self._busy and not self._paused and len(self._input) > PIPELINE_BUFFER:
            self._paused = True
            self.transport.pauseProducing()

    def _line(self, line: bytes) -> None:
        """A command line, or the part of one that ends with a literal."""
        announced = syntax.literal_announcement(line)
        if announced is None:
            self._parts.append(line)
            parts, self._parts = self._parts, []
            self._literal_total = 0
            self._command(parts)
            return
        text, size, synchronizing = announced
        self._parts.append(text)
        self._literal_total += size
        if (
            self._literal_total > self._literal_limit()
            or len(self._parts) > 2 * LITERALS_PER_COMMAND
        ):
            tag = self._tag_of(self._parts)
            self._release(self._parts)
            self._parts = []
            self._literal_total = 0
            why = f"[TOOBIG] Literal too big (limit {self._literal_limit()} octets)"
            if synchronizing:
                # The client waits for "+" and will not send the literal.
                self._tagged(tag, b"NO", why)
            else:
                # RFC 7888 4: the octets are on their way; we cannot find
                # the next command in them, so say why and close.
                self._tagged(tag, b"BAD", why)
                self._send(b"* BYE Literal too big")
                self.transport.loseConnection()
            return
        literal = Literal(size)
        if size == 0:
            self._parts.append(literal)
        else:
            self._literal = literal
            self._literal_left = size
        if synchronizing:
            self._send(b"+ Ready for literal data")

    @staticmethod
    def _tag_of(parts: list[bytes | Literal]) -> bytes:
        first = parts[0] if parts and isinstance(parts[0], bytes) else b""
        tag = first.split(b" ", 1)[0]
        return tag if tag and all(b in _TAG_CHARS for b in tag) else b"*"

    @staticmethod
    def _release(parts: list[bytes | Literal]) -> None:
        for part in parts:
            if isinstance(part, Literal):
                part.close()

    def _wait(self, d: defer.Deferred[Any], tag: bytes | None = None) -> None:
        """
        Hold further input until C{d} has fired; turn its failure into a
        NO (or a logged internal error) for C{tag}.
        """
        if tag is not None:
            d.addErrback(self._failed, tag)
        fired: list[bool] = []
        d.addBoth(lambda result: fired.append(True))
        if fired:
            return
        self._busy = True

        def resume(ignored: object) -> None:
            self._busy = False
            if self._paused:
                self._paused = False
                self.transport.resumeProducing()
            if not self._closed:
                self.resetTimeout()
                self._process()

        d.addBoth(resume)

    def _failed(self, failure: Failure, tag: bytes) -> None:
        from mailsys.maildir import DeliveryError, FolderError, MessageGone

        if failure.check(Refusal):
            error = failure.value
            code = f"[{error.code}] " if error.code else ""
            self._tagged(tag, b"NO", code + error.text)
        elif failure.check(FolderError):
            self._tagged(tag, b"NO", str(failure.value))
        elif failure.check(MessageGone):
            self._tagged(tag, b"NO", _EXPUNGED)
        elif failure.check(DeliveryError):
            log.warn(
                "imap store failure for {user}: {why}",
                user=self.user,
                why=str(failure.value),
            )
            self._tagged(tag, b"NO", "[UNAVAILABLE] Cannot store now, try again later")
        else:
            log.failure("imap command failed for {user}", failure, user=self.user)
            self._tagged(tag, b"NO", "[SERVERBUG] Internal error, try again later")

    def _command(self, parts: list[bytes | Literal]) -> None:
        first = parts[0]
        assert isinstance(first, bytes)
        tag, space, rest = first.partition(b" ")
        if not tag or not all(b in _TAG_CHARS for b in tag):
            self._release(parts)
            self._tagged(b"*", b"BAD", "Invalid tag")
            return
        args = Arguments([rest] + parts[1:])
        result = None
        try:
            if not space:
                raise BadCommand("missing command")
            name = args.keyword("a command")
            uid = False
            if name == "UID":
                args.space()
                name = args.keyword("a UID command")
                if name not in _UID_COMMANDS:
                    raise BadCommand(f"unknown UID command {name[:20]}")
                uid = True
            method = getattr(self, "do_" + name, None)
            if method is None:
                raise BadCommand(f"unknown command {name[:20]}")
            if name not in _COMMANDS[self.state]:
                raise BadCommand(f"{name} is not valid in the {self.state.value} state")
            if name in _UID_COMMANDS:
                result = method(tag, args, uid)
            else:
                result = method(tag, args)
        except BadCommand as e:
            self._tagged(tag, b"BAD", f"Syntax error: {e}")
        except Refusal as e:
            self._failed(Failure(e), tag)
        except Exception:
            self._failed(Failure(), tag)
        if isinstance(result, defer.Deferred):
            result.addBoth(lambda r: (self._release(parts), r)[1])
            self._wait(result, tag)
        else:
            self._release(parts)

    def _blocking(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return self.factory.blocking(f, *args)

    # -- any state ------------------------------------------------------------

    def do_CAPABILITY(self, tag: bytes, args: Arguments) -> None:
        """RFC 3501 6.1.1."""
        args.end()
        self._send(b"* CAPABILITY " + self._capabilities())
        self._tagged(tag, b"OK", "CAPABILITY completed")

    def do_NOOP(self, tag: bytes, args: Arguments) -> defer.Deferred[None] | None:
        """RFC 3501 6.1.2: Thunderbird's poll; reports what changed meanwhile."""
        args.end()
        return self._sync(tag, "NOOP")

    def do_CHECK(self, tag: bytes, args: Arguments) -> defer.Deferred[None] | None:
        """RFC 3501 6.4.1: every change is already on disk, so only report news."""
        args.end()
        return self._sync(tag, "CHECK")

    def _sync(self, tag: bytes, name: str) -> defer.Deferred[None] | None:
        if self.view is None:
            self._tagged(tag, b"OK", f"{name} completed")
            return None
        d = self._refresh()
        d.addCallback(lambda _: self._tagged(tag, b"OK", f"{name} completed"))
        return d

    def do_LOGOUT(self, tag: bytes, args: Arguments) -> None:
        """RFC 3501 6.1.3."""
        args.end()
        self.state = State.LOGOUT
        self._send(b"* BYE Logging out")
        self._tagged(tag, b"OK", "LOGOUT completed")
        self.transport.loseConnection()

    def do_ID(self, tag: bytes, args: Arguments) -> None:
        """RFC 2971: note who the client is, say who we are."""
        args.space()
        client: list[bytes | None] = []
        if not args.nil():
            args.expect(b"(")
            while not args.take(b")"):
                if client:
                    args.space()
                client.append(args.string("an ID field"))
                args.space()
                client.append(args.nstring("an ID value"))
                if len(client) > 60:
                    raise BadCommand("too many ID fields")
        args.end()
        text = [(value or b"").decode("utf-8", "replace") for value in client]
        fields = dict(zip(text[::2], text[1::2], strict=False))
        log.info("imap client {client} id {id}", client=self.client, id=fields)
        self._send(b'* ID ("name" "mailsys" "vendor" "mailsys")')
        self._tagged(tag, b"OK", "ID completed")

    # -- not authenticated ----------------------------------------------------

    def do_STARTTLS(self, tag: bytes, args: Arguments) -> None:
        """RFC 3501 6.2.1: TLS, then a session that forgets everything before it."""
        args.end()
        if self._tls:
            raise BadCommand("TLS is already active")
        if not self._can_starttls():
            raise BadCommand("STARTTLS is not available")
        self._tagged(tag, b"OK", "Begin TLS negotiation now")
        # RFC 3501 6.2.1 / RFC 2595 3.1: whatever the client pipelined
        # behind STARTTLS came in clear text; never run it as if it came
        # over TLS (CVE-2011-0411 class).
        dropped = self._input.discard()
        if dropped:
            log.warn(
                "imap discarded {n} bytes pipelined after STARTTLS from {client}",
                n=len(dropped),
                client=self.client,
            )
        self.transport.startTLS(self.factory.tls)
        self._tls = True

    def do_LOGIN(self, tag: bytes, args: Arguments) -> defer.Deferred[None] | None:
        """RFC 3501 6.2.3; refused before TLS unless allowed on loopback."""
        args.space()
        user = args.astring("a user name")
        args.space()
        password = args.astring("a password")
        args.end()
        if not self._passwords_allowed():
            raise Refusal("Use STARTTLS before sending a password", "PRIVACYREQUIRED")
        return self._login(tag, user, password)

    def do_AUTHENTICATE(
        self, tag: bytes, args: Arguments
    ) -> defer.Deferred[None] | None:
        """
        RFC 3501 6.2.2 with RFC 4959 SASL-IR: PLAIN, Thunderbird's first
        choice, and LOGIN, what it tries next (and what Outlook and older
        phones use).
        """
        args.space()
        mechanism = args.atom("a SASL mechanism").upper()
        initial = None
        if args.take(b" "):
            # RFC 4959 SASL-IR.
            initial = args.atom("an initial response")
        args.end()
        if mechanism not in (b"PLAIN", b"LOGIN"):
            raise Refusal("Unsupported authentication mechanism", "CANNOT")
        if not self._passwords_allowed():
            raise Refusal("Use STARTTLS before sending a password", "PRIVACYREQUIRED")
        if mechanism == b"LOGIN":
            if initial is not None:
                # RFC 4959 3: LOGIN's initial response is the user name.
                return self._login_user(tag, initial)
            self._send(_USERNAME_CHALLENGE)
            self._continuation = lambda line: self._login_user(tag, line)
            return None
        if initial is not None:
            return self._plain(tag, initial)
        self._send(b"+ ")
        self._continuation = lambda line: self._plain(tag, line)
        return None

    def _sasl_response(self, tag: bytes, response: bytes) -> bytes | None:
        """
        One decoded SASL response; C{None}, with the command answered BAD,
        when the client cancelled (RFC 3501 6.2.2: C{*}) or sent bad base64.
        """
        if response == b"*":
            self._tagged(tag, b"BAD", "Authentication cancelled")
            return None
        if response == b"=":
            # RFC 4959 3: an empty initial response.
            return b""
        try:
            return base64.b64decode(response, validate=True)
        except (binascii.Error, ValueError):
            self._tagged(tag, b"BAD", "Invalid base64 in authentication response")
            return None

    def _plain(self, tag: bytes, response: bytes) -> None:
        """RFC 4616 PLAIN: C{authzid NUL authcid NUL password}, base64."""
        decoded = self._sasl_response(tag, response)
        if decoded is None:
            return
        fields = decoded.split(b"\0")
        if len(fields) != 3 or (fields[0] and fields[0] != fields[1]):
            d: defer.Deferred[None] = defer.fail(UnauthorizedLogin("bad PLAIN"))
            d.addErrback(self._login_failed, tag)
        else:
            d = self._login(tag, fields[1], fields[2])
        self._wait(d, tag)

    def _login_user(self, tag: bytes, response: bytes) -> None:
        """
        SASL LOGIN (draft-murchison-sasl-login), first step: the user name;
        ask for the password.
        """
        user = self._sasl_response(tag, response)
        if user is None:
            return
        self._send(_PASSWORD_CHALLENGE)
        self._continuation = lambda line: self._login_password(tag, user, line)

    def _login_password(self, tag: bytes, user: bytes, response: bytes) -> None:
        """SASL LOGIN, second step: the password; check both."""
        password = self._sasl_response(tag, response)
        if password is not None:
            self._wait(self._login(tag, user, password), tag)

    def _login(self, tag: bytes, user: bytes, password: bytes) -> defer.Deferred[None]:
        credentials = UsernamePassword(user, password)
        d = self.factory.portal.login(credentials, None, IIMAPAccount)
        d.addCallback(self._logged_in, tag)
        d.addErrback(self._login_failed, tag)
        return d

    def _logged_in(self, result: tuple[Any, Any, Callable[[], None]], tag: bytes):
        _, account, logout = result
        if self._closed:
            logout()
            return None
        self.account = account
        self.user = account.address
        self._logout = logout
        self.mailbox = account.mailbox(self.factory.hostname)
        self.state = State.AUTHENTICATED
        self.setTimeout(TIMEOUT_AFTER_LOGIN)
        log.info("imap login {user} from {client}", user=self.user, client=self.client)
        if self.factory.read_only:
            d: defer.Deferred[None] = defer.succeed(None)
        else:
            # Sent, Drafts, Trash, Junk exist from the first login on.
            d = self._blocking(self.mailbox.ensure_special_folders)
            d.addErrback(
                lambda f: log.failure(
                    "imap: special folders for {user}", f, user=self.user
                )
            )

        def done(_: object) -> None:
            # RFC 3501 7.1: the capabilities change at login; say them
            # now so the client need not ask.
            capabilities = b"[CAPABILITY " + self._capabilities() + b"]"
            self._tagged(tag, b"OK", capabilities + b" Logged in")

        return d.addCallback(done)

    def _login_failed(self, failure: Failure, tag: bytes) -> None:
        if not failure.check(UnauthorizedLogin):
            log.failure("imap login failed for {client}", failure, client=self.client)
            self._tagged(tag, b"NO", "[UNAVAILABLE] Cannot check passwords, try later")
            return
        self._auth_failures += 1
        self.factory.metrics.auth_failed()
        log.info("imap failed login from {client}", client=self.client)
        self._tagged(tag, b"NO", "[AUTHENTICATIONFAILED] Authentication failed")
        if self._auth_failures >= MAX_AUTH_FAILURES:
            self._send(b"* BYE Too many failed logins")
            self.transport.loseConnection()

    # -- authenticated --------------------------------------------------------

    def _name(self, args: Arguments) -> str:
        """A mailbox name argument: modified UTF-7 on the wire, text here."""
        raw = args.astring("a mailbox name")
        try:
            name = utf7.decode(raw)
        except utf7.NameEncodingError as e:
            raise Refusal(f"Invalid mailbox name: {e}", "CANNOT") from None
        return "INBOX" if name.upper() == "INBOX" else name

    @staticmethod
    def _show(name: str) -> bytes:
        return syntax.astring(utf7.encode(name))

    def _read_only_listener(self) -> None:
        if self.factory.read_only:
            raise Refusal("This server is read-only", "NOPERM")

    def do_NAMESPACE(self, tag: bytes, args: Arguments) -> None:
        """RFC 2342."""
        args.end()
        # RFC 2342: one personal namespace, no prefix, "/" as separator.
        self._send(b'* NAMESPACE (("" "/")) NIL NIL')
        self._tagged(tag, b"OK", "NAMESPACE completed")

    def do_ENABLE(self, tag: bytes, args: Arguments) -> None:
        """RFC 5161."""
        # RFC 5161: nothing we offer needs enabling, so nothing is enabled.
        args.space()
        args.atom("a capability")
        while args.take(b" "):
            args.atom("a capability")
        args.end()
        self._send(b"* ENABLED")
        self._tagged(tag, b"OK", "ENABLE completed")

    def do_SELECT(self, tag: bytes, args: Arguments, examine: bool = False):
        """RFC 3501 6.3.1 (and 6.3.2 EXAMINE): open a folder and say what is in it."""
        args.space()
        name = self._name(args)
        args.end()
        read_only = examine or self.factory.read_only
        self._deselect()
        mailbox = self.mailbox

        def open_folder() -> tuple[Any, FolderScan, int, int]:
            folder = mailbox.folder(name)
            scan = scan_folder(folder, claim=not read_only)
            return folder, scan, folder.uidvalidity, folder.uidnext

        def opened(result: tuple[Any, FolderScan, int, int]) -> None:
            folder, scan, uidvalidity, uidnext = result
            view = FolderView(
                folder.name,
                folder,
                read_only,
                scan.infos,
                scan.recent,
                uidvalidity,
                keywords=scan.keywords,
            )
            self.view = view
            self.state = State.SELECTED
            lines = view.flag_lines() + [
                b"* %d EXISTS" % len(view),
                b"* %d RECENT" % len(view.recent),
            ]
            unseen = view.first_unseen()
            if unseen is not None:
                lines.append(b"* OK [UNSEEN %d] First unseen" % unseen)
            lines.append(b"* OK [UIDVALIDITY %d] UIDs valid" % uidvalidity)
            lines.append(b"* OK [UIDNEXT %d] Predicted next UID" % uidnext)
            for line in lines:
                self._send(line)
            mode = "[READ-ONLY]" if read_only else "[READ-WRITE]"
            verb = "EXAMINE" if examine else "SELECT"
            self._tagged(tag, b"OK", f"{mode} {verb} completed")

        def missing(failure: Failure) -> None:
            from mailsys.maildir import FolderError

            failure.trap(FolderError)
            raise Refusal(str(failure.value), "NONEXISTENT")

        d = self._blocking(open_folder)
        d.addCallbacks(opened, missing)
        return d

    def do_EXAMINE(self, tag: bytes, args: Arguments):
        """RFC 3501 6.3.2: SELECT, read-only."""
        return self.do_SELECT(tag, args, examine=True)

    def _deselect(self) -> None:
        self._stop_idle()
        self.view = None
        self._cache.clear()
        if self.state is State.SELECTED:
            self.state = State.AUTHENTICATED

    def do_CREATE(self, tag: bytes, args: Arguments):
        """RFC 3501 6.3.3; missing parents are created too."""
        args.space()
        name = self._name(args)
        args.end()
        self._read_only_listener()
        # RFC 3501 6.3.3: a trailing separator only says children will come.
        if name.endswith(HIERARCHY) and name != HIERARCHY:
            name = name[: -len(HIERARCHY)]
        mailbox = self.mailbox

        def create() -> None:
            from mailsys.maildir import FolderError

            try:
                mailbox.folder(name)
            except FolderError:
                mailbox.create_folder(name)
            else:
                raise Refusal("Mailbox already exists", "ALREADYEXISTS")

        d = self._blocking(create)
        d.addCallback(lambda _: self._tagged(tag, b"OK", "CREATE completed"))
        return d

    def do_DELETE(self, tag: bytes, args: Arguments):
        """RFC 3501 6.3.4; as Dovecot with Maildir++, not a folder that has children."""
        args.space()
        name = self._name(args)
        args.end()
        self._read_only_listener()
        if self.view is not None and self.view.name == name:
            raise Refusal("Cannot delete the selected mailbox", "INUSE")
        mailbox = self.mailbox

        def delete() -> None:
            if name != "INBOX" and mailbox.has_children(name):
                raise Refusal("Mailbox has children, delete them first", "INUSE")
            mailbox.delete_folder(name)
            mailbox.unsubscribe(name)

        d = self._blocking(delete)
        d.addCallback(lambda _: self._tagged(tag, b"OK", "DELETE completed"))
        return d

    def do_RENAME(self, tag: bytes, args: Arguments):
        """RFC 3501 6.3.5; the folders below move along."""
        args.space()
        old = self._name(args)
        args.space()
        new = self._name(args)
        args.end()
        self._read_only_listener()
        mailbox = self.mailbox

        def rename() -> None:
            from mailsys.maildir import FolderError

            try:
                mailbox.folder(new)
            except FolderError:
                pass
            else:
                raise Refusal("Target mailbox already exists", "ALREADYEXISTS")
            mailbox.rename_folder(old, new)

        d = self._blocking(rename)
        d.addCallback(lambda _: self._tagged(tag, b"OK", "RENAME completed"))
        return d

    def do_SUBSCRIBE(self, tag: bytes, args: Arguments, subscribe: bool = True):
        """RFC 3501 6.3.6 (and 6.3.7 UNSUBSCRIBE)."""
        args.space()
        name = self._name(args)
        args.end()
        self._read_only_listener()
        change = self.mailbox.subscribe if subscribe else self.mailbox.unsubscribe
        d = self._blocking(change, name)
        verb = "SUBSCRIBE" if subscribe else "UNSUBSCRIBE"
        d.addCallback(lambda _: self._tagged(tag, b"OK", f"{verb} completed"))
        return d

    def do_UNSUBSCRIBE(self, tag: bytes, args: Arguments):
        """RFC 3501 6.3.7."""
        return self.do_SUBSCRIBE(tag, args, subscribe=False)

    def _options(self, args: Arguments) -> list[str]:
        args.expect(b"(")
        options: list[str] = []
        while not args.take(b")"):
            if options:
                args.space()
            options.append(args.keyword("an option"))
        return options

    def _pattern(self, reference: str, args: Arguments) -> str:
        raw = args.list_mailbox()
        try:
            return reference + utf7.decode(raw)
        except utf7.NameEncodingError as e:
            raise BadCommand(f"invalid mailbox pattern: {e}") from None

    def do_LIST(self, tag: bytes, args: Arguments, lsub: bool = False):
        """RFC 3501 6.3.8 and RFC 5258 LIST-EXTENDED, RFC 6154 SPECIAL-USE."""
        args.space()
        selection: list[str] = []
        if not lsub and args.peek() == ord("("):
            selection = self._options(args)
            args.space()
        try:
            reference = utf7.decode(args.astring("a reference name"))
        except utf7.NameEncodingError as e:
            raise BadCommand(f"invalid reference: {e}") from None
        args.space()
        if not lsub and args.take(b"("):
            patterns = [self._pattern(reference, args)]
            while not args.take(b")"):
                args.space()
                patterns.append(self._pattern(reference, args))
        else:
            patterns = [self._pattern(reference, args)]
        returns: list[str] = []
        if not lsub and args.take(b" "):
            args.expect(b"RETURN ", "RETURN")
            returns = self._options(args)
        args.end()
        if set(selection) - {"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"}:
            raise BadCommand("unknown LIST selection option")
        others = set(selection) & {"SUBSCRIBED", "SPECIAL-USE"}
        if "RECURSIVEMATCH" in selection and not others:
            raise BadCommand("RECURSIVEMATCH needs another selection option")
        if set(returns) - {"SUBSCRIBED", "CHILDREN", "SPECIAL-USE"}:
            raise BadCommand("unknown LIST return option")
        word = b"LSUB" if lsub else b"LIST"
        if patterns == [reference] and not selection and reference == "" and not lsub:
            # RFC 3501 6.3.8: an empty name asks for the delimiter.
            self._send(b'* LIST (\\Noselect) "/" ""')
            self._tagged(tag, b"OK", "LIST completed")
            return None
        subscribed_only = lsub or "SUBSCRIBED" in selection
        d = self._blocking(
            list_folders,
            self.mailbox,
            patterns,
            subscribed_only,
            "SPECIAL-USE" in selection,
            "SUBSCRIBED" in selection or "SUBSCRIBED" in returns,
            "RECURSIVEMATCH" in selection,
        )

        def listed(folders: list[Any]) -> None:
            for folder in folders:
                if lsub:
                    missing = "\\NonExistent" in folder.attributes
                    attributes = "\\Noselect" if missing else ""
                else:
                    attributes = " ".join(folder.attributes)
                line = b"* " + word + b" (" + attributes.encode("ascii") + b') "/" '
                line += self._show(folder.name)
                if folder.child_subscribed:
                    line += b' ("CHILDINFO" ("SUBSCRIBED"))'
                self._send(line)
            self._tagged(tag, b"OK", f"{word.decode()} completed")

        return d.addCallback(listed)

    def do_LSUB(self, tag: bytes, args: Arguments):
        """RFC 3501 6.3.9: the subscribed folders matching a pattern."""
        return self.do_LIST(tag, args, lsub=True)

    def do_STATUS(self, tag: bytes, args: Arguments):
        """RFC 3501 6.3.10: counts for a folder without selecting it."""
        args.space()
        name = self._name(args)
        args.space()
        items = self._options(args)
        args.end()
        if not items or set(items) - set(_STATUS_ITEMS):
            raise BadCommand("unknown STATUS item")
        mailbox = self.mailbox
        view = self.view

        def status() -> dict[str, int]:
            folder = mailbox.folder(name)
            infos = folder.scan()
            recent = sum(1 for info in infos if info.path.parent.name == "new")
            return {
                "MESSAGES": len(infos),
                "RECENT": recent,
                "UIDNEXT": folder.uidnext,
                "UIDVALIDITY": folder.uidvalidity,
                "UNSEEN": sum(1 for info in infos if "\\Seen" not in info.flags),
            }

        def answer(values: dict[str, int]) -> None:
            if view is not None and view is self.view and view.name == name:
                values["RECENT"] = len(view.recent)
            pairs = " ".join(f"{item} {values[item]}" for item in items)
            self._send(b"* STATUS " + self._show(name) + b" (" + pairs.encode() + b")")
            self._tagged(tag, b"OK", "STATUS completed")

        return self._blocking(status).addCallback(answer)

    def do_APPEND(self, tag: bytes, args: Arguments):
        """RFC 3501 6.3.11: store a message (sent mail); OK only once it is on disk."""
        args.space()
        name = self._name(args)
        args.space()
        flags: list[str] = []
        if args.peek() == ord("("):
            flags = args.flag_list()
            args.space()
        date = None
        if args.peek() == ord('"'):
            date = syntax.parse_date_time(args.quoted())
            args.space()
        message = args.literal()
        args.end()
        self._read_only_listener()
        if message.size == 0:
            raise Refusal("Cannot store an empty message")
        wanted = _stored_flags(flags)
        mailbox = self.mailbox

        def append() -> tuple[Any, int, int, str]:
            from mailsys.maildir import FolderError

            try:
                folder = mailbox.folder(name)
            except FolderError as e:
                raise Refusal(str(e), "TRYCREATE") from None
            dropped = _define_keywords(folder, wanted)
            message.file.seek(0)
            info = folder.append(message.file, wanted, date)
            return folder, folder.uidvalidity, info.uid, dropped

        def appended(result: tuple[Any, int, int, str]):
            folder, uidvalidity, uid, dropped = result
            d: defer.Deferred[None] = defer.succeed(None)
            if self.view is not None and self.view.folder.path == folder.path:
                d = self._refresh()
            # RFC 4315 APPENDUID.
            text = b"[APPENDUID %d %d] APPEND completed" % (uidvalidity, uid)
            text += dropped.encode("ascii")
            return d.addCallback(lambda _: self._tagged(tag, b"OK", text))

        return self._blocking(append).addCallback(appended)

    def do_IDLE(self, tag: bytes, args: Arguments) -> None:
        """
        RFC 2177: report changes as they happen until the client says DONE.
        Where inotify works, the folder is watched while the session idles,
        and only then: outside IDLE changes are reported when a command
        completes, which rescans anyway, so a watch would only hold a
        kernel resource.  Otherwise the folder is polled every second.
        """
        args.end()
        self._idle_tag = tag
        self._send(b"+ idling")
        self._continuation = self._idle_line
        if self.view is None:
            return
        self._idle_watch_folder()
        if self._idle_watch is not None:
            # Mail may have come between the last scan and the watch.
            self._idle_changed()
        else:
            self._idle_next(self.factory.idle_poll)

    def _idle_watch_folder(self) -> None:
        """Watch the selected folder, if the listener has inotify."""
        watcher = self.factory.watcher
        if self._idle_watch is not None and self._idle_watch.active:
            return
        self._idle_watch = None
        if watcher is not None and self.view is not None:
            self._idle_watch = watcher.watch(self.view.folder.path, self._idle_changed)

    def _idle_next(self, delay: float) -> None:
        """(Re)schedule the next check of the folder in C{delay} seconds."""
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = self.callLater(delay, self._idle_check)

    def _idle_changed(self) -> None:
        """
        Something moved in C{new/} or C{cur/}: check soon, once the burst
        has settled; if a check is under way it may have missed this, so
        another follows it.
        """
        if self._idle_tag is None or self._closed:
            return
        if self._idle_poll is not None:
            self._idle_again = True
        elif not self._idle_soon:
            self._idle_soon = True
            self._idle_next(self.factory.idle_settle)

    def _idle_check(self) -> None:
        self._idle_call = None
        if self._idle_tag is None or self.view is None or self._closed:
            return
        # A timer poll first looks at the directories' mtimes; an event
        # says for certain that something changed.
        poll = not self._idle_soon
        self._idle_soon = self._idle_again = False
        d = self._refresh(poll=poll)

        def again(result: object) -> None:
            self._idle_poll = None
            if isinstance(result, Failure):
                log.failure("imap IDLE check failed for {user}", result, user=self.user)
            idling = self._idle_tag is not None and self.view is not None
            if not idling or self._closed:
                return
            # The watcher may have lost its descriptor meanwhile.
            self._idle_watch_folder()
            if self._idle_again:
                self._idle_again = False
                self._idle_changed()
            elif self._idle_watch is not None:
                self._idle_next(self.factory.idle_safety_poll)
            else:
                self._idle_next(self.factory.idle_poll)

        self._idle_poll = d
        d.addBoth(again)

    def _idle_line(self, line: bytes) -> defer.Deferred[None] | None:
        tag = self._idle_tag
        assert tag is not None
        pending = self._idle_poll
        self._stop_idle()

        def finish(_: object = None) -> None:
            if line.strip().upper() == b"DONE":
                self._tagged(tag, b"OK", "IDLE terminated")
            else:
                self._tagged(tag, b"BAD", "Expected DONE")

        if pending is not None:
            # Let the check under way report what it found first.
            d: defer.Deferred[None] = defer.Deferred()
            pending.addBoth(lambda _: d.callback(None))
            return d.addCallback(finish)
        finish()
        return None

    def _stop_idle(self) -> None:
        """End IDLE: no timer and no inotify watch is left behind."""
        self._idle_tag = None
        self._idle_poll = None
        self._idle_soon = self._idle_again = False
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        if self._idle_watch is not None:
            self._idle_watch.cancel()
            self._idle_watch = None
        if self._continuation == self._idle_line:
            self._continuation = None

    def _refresh(self, poll: bool = False) -> defer.Deferred[None]:
        """
        Scan the selected folder and tell the client what changed.  An
        IDLE C{poll} skips the scan when the folder's directories show no
        change.
        """
        view = self.view
        assert view is not None
        if poll:
            d = self._blocking(poll_folder, view.folder, not view.read_only, view.watch)
        else:
            d = self._blocking(scan_folder, view.folder, not view.read_only)

        def scanned(result: FolderScan | None) -> None:
            if result is None or self.view is not view or self._closed:
                return
            lines = view.learn_keywords(result.keywords)
            for line in lines + view.apply_scan(result.infos, result.recent):
                self._send(line)

        def vanished(failure: Failure) -> None:
            from mailsys.maildir import FolderError

            failure.trap(FolderError)
            # The folder was deleted under us: nothing sane to continue with.
            self._send(b"* BYE The selected mailbox was deleted")
            self.transport.loseConnection()

        return d.addCallbacks(scanned, vanished)

    # -- selected -------------------------------------------------------------

    def do_CLOSE(self, tag: bytes, args: Arguments):
        """RFC 3501 6.4.2."""
        args.end()
        view = self.view
        assert view is not None
        self._deselect()
        if view.read_only:
            self._tagged(tag, b"OK", "CLOSE completed")
            return None
        # RFC 3501 6.4.2: expunge silently.
        known = {info.uid for info in view.messages}
        d = self._blocking(_expunge, view.folder, known, None, 0)
        return d.addCallback(lambda _: self._tagged(tag, b"OK", "CLOSE completed"))

    def do_UNSELECT(self, tag: bytes, args: Arguments) -> None:
        """RFC 3691: leave the folder without expunging."""
        args.end()
        self._deselect()
        self._tagged(tag, b"OK", "UNSELECT completed")

    def _writable(self) -> FolderView:
        view = self.view
        assert view is not None
        if view.read_only:
            raise Refusal("The mailbox is read-only", "READ-ONLY")
        return view

    def do_EXPUNGE(self, tag: bytes, args: Arguments, uid: bool):
        """RFC 3501 6.4.3, and RFC 4315 UID EXPUNGE."""
        messages = None
        if uid:
            # RFC 4315 UID EXPUNGE.
            args.space()
            messages = args.sequence_set()
        args.end()
        view = self._writable()
        largest = view.messages[-1].uid if view.messages else 0
        known = {info.uid for info in view.messages}
        d = self._blocking(_expunge, view.folder, known, messages, largest)

        def expunged(uids: list[int]) -> None:
            if self.view is view:
                for line in view.remove(uids):
                    self._send(line)
            self._tagged(tag, b"OK", "EXPUNGE completed")

        return d.addCallback(expunged)

    def do_SEARCH(self, tag: bytes, args: Arguments, uid: bool):
        """RFC 3501 6.4.4 SEARCH and UID SEARCH."""
        args.space()
        try:
            key = parse_search(args)
        except BadCharset:
            raise Refusal(
                "Unsupported charset", "BADCHARSET (UTF-8 US-ASCII)"
            ) from None
        view = self.view
        assert view is not None
        entries = [
            (seq, info, info.uid in view.recent)
            for seq, info in enumerate(view.messages, 1)
        ]
        from mailsys.maildir import MessageGone

        d = self._blocking(
            search, view.folder, entries, key, lambda e: isinstance(e, MessageGone)
        )

        def found(matches: list[tuple[int, int]]) -> None:
            numbers = [match[1] if uid else match[0] for match in matches]
            line = b"* SEARCH"
            if numbers:
                line += b" " + b" ".join(b"%d" % n for n in numbers)
            self._send(line)
            self._tagged(tag, b"OK", "SEARCH completed")

        return d.addCallback(found)

    def do_FETCH(self, tag: bytes, args: Arguments, uid: bool):
        """RFC 3501 6.4.5 FETCH and UID FETCH."""
        args.space()
        messages = args.sequence_set()
        args.space()
        items = parse_items(args)
        args.end()
        view = self.view
        assert view is not None
        if uid and not any(item.name == "UID" for item in items):
            # RFC 3501 6.4.8: UID FETCH always reports the UID.
            items = [FetchItem("UID")] + items
        set_seen = not view.read_only and any(item.sets_seen for item in items)
        if set_seen and not any(item.name == "FLAGS" for item in items):
            # RFC 3501 6.4.5: the \Seen just set is reported in the same response.
            items = items + [FetchItem("FLAGS")]
        entries = view.select(messages, uid)
        return self._fetch(tag, view, entries, items, set_seen, uid)

    @defer.inlineCallbacks
    def _fetch(
        self,
        tag: bytes,
        view: FolderView,
        entries: list[Any],
        items: list[FetchItem],
        set_seen: bool,
        uid: bool,
    ) -> Any:
        """Answer a FETCH a batch at a time, each read in the thread pool."""
        flow = _WriteFlow()
        self.transport.registerProducer(flow, True)
        gone = 0
        try:
            whole = any(item.needs == MESSAGE for item in items)
            for number, batch in enumerate(_batches(entries, whole)):
                if number:
                    # Read the next batch only once the client has taken
                    # the last one.
                    yield flow.drained()
                    if self._closed or self.view is not view:
                        return
                work = [(e.seq, e.info, e.info.uid in view.recent) for e in batch]
                results = yield self._blocking(
                    _fetch_batch, view.folder, work, items, set_seen, self._cache
                )
                if self._closed or self.view is not view:
                    return
                out = []
                for seq, data, changed in results:
                    if data is None:
                        gone += 1
                        continue
                    if changed is not None:
                        view.update(changed)
                    out.append(b"* %d FETCH %s\r\n" % (seq, data))
                self.transport.write(b"".join(out))
        finally:
            self.transport.unregisterProducer()
        if gone and not uid:
            self._tagged(tag, b"NO", _EXPUNGED)
        else:
            self._tagged(tag, b"OK", "FETCH completed")

    def do_STORE(self, tag: bytes, args: Arguments, uid: bool):
        """RFC 3501 6.4.6 STORE and UID STORE."""
        args.space()
        messages = args.sequence_set()
        args.space()
        action = args.atom("FLAGS, +FLAGS or -FLAGS").decode("ascii").upper()
        mode, _, suffix = action.partition(".")
        if mode not in ("FLAGS", "+FLAGS", "-FLAGS") or suffix not in ("", "SILENT"):
            raise BadCommand("expected FLAGS, +FLAGS or -FLAGS")
        args.space()
        flags = _stored_flags(args.flag_list(parenthesised_only=False))
        args.end()
        view = self._writable()
        entries = view.select(messages, uid)
        work = [(e.seq, e.info) for e in entries]
        d = self._blocking(_store, view.folder, work, mode, flags)

        def stored(answer: tuple[list[tuple[int, Any]], list[str]]) -> None:
            results, keywords = answer
            if self.view is view:
                # RFC 3501 7.2.6: a new keyword is announced before use.
                for line in view.learn_keywords(keywords):
                    self._send(line)
            gone = 0
            for seq, info in results:
                if info is None:
                    gone += 1
                    continue
                view.update(info)
                if not suffix:
                    uid_item = b"UID %d " % info.uid if uid else b""
                    flags = syntax.flag_list(view.flags(info))
                    self._send(b"* %d FETCH (%sFLAGS %s)" % (seq, uid_item, flags))
            if gone and not uid:
                self._tagged(tag, b"NO", _EXPUNGED)
            else:
                self._tagged(tag, b"OK", "STORE completed")

        return d.addCallback(stored)

    def do_COPY(self, tag: bytes, args: Arguments, uid: bool, move: bool = False):
        """RFC 3501 6.4.7 COPY, with RFC 4315 COPYUID; also the copy half of MOVE."""
        args.space()
        messages = args.sequence_set()
        args.space()
        name = self._name(args)
        args.end()
        self._read_only_listener()
        view = self._writable() if move else self.view
        assert view is not None
        entries = view.select(messages, uid)
        verb = "MOVE" if move else "COPY"
        if not entries:
            self._tagged(tag, b"OK", f"{verb} completed, no messages")
            return None
        infos = [e.info for e in entries]
        mailbox = self.mailbox

        def copy() -> tuple[Any, int, list[int], str]:
            from mailsys.maildir import FolderError

            try:
                target = mailbox.folder(name)
            except FolderError as e:
                raise Refusal(str(e), "TRYCREATE") from None
            dropped = _define_keywords(target, {f for i in infos for f in i.flags})
            copies = view.folder.copy_to(infos, target)
            if move:
                view.folder.expunge(infos)
            return target, target.uidvalidity, [c.uid for c in copies], dropped

        def copied(result: tuple[Any, int, list[int], str]):
            target, uidvalidity, new_uids, dropped = result
            # RFC 4315 COPYUID; the source set in UID order, matched in order.
            code = b"COPYUID %d %s %s" % (
                uidvalidity,
                syntax.format_list_set([info.uid for info in infos]),
                syntax.format_list_set(new_uids),
            )
            d: defer.Deferred[None] = defer.succeed(None)
            if move:
                # RFC 6851 3.3: COPYUID in an untagged OK, then the EXPUNGEs.
                self._send(b"* OK [" + code + b"] Moved")
                if self.view is view:
                    for line in view.remove(info.uid for info in infos):
                        self._send(line)
            if self.view is view and view.folder.path == target.path:
                d = self._refresh()
            note = dropped.encode("ascii")
            if move:
                return d.addCallback(
                    lambda _: self._tagged(tag, b"OK", b"MOVE completed" + note)
                )
            return d.addCallback(
                lambda _: self._tagged(
                    tag, b"OK", b"[" + code + b"] COPY completed" + note
                )
            )

        return self._blocking(copy).addCallback(copied)

    def do_MOVE(self, tag: bytes, args: Arguments, uid: bool):
        """RFC 6851 MOVE: COPY then EXPUNGE of the sources, in one command."""
        return self.do_COPY(tag, args, uid, move=True)


def _stored_flags(flags: list[str]) -> set[str]:
    """
    The flags of C{flags} that can be stored: the system flags, canonically
    spelt, and keywords, once each whatever their case.  \\Recent is the
    server's, and other C{\\} flags are not ours to invent: both are
    ignored, as RFC 3501 2.3.2 allows for flags that are not permanent.
    """
    stored = {_FLAG_NAMES[f.lower()] for f in flags if f.lower() in _FLAG_NAMES}
    keywords: dict[str, str] = {}
    for flag in flags:
        if not flag.startswith("\\"):
            keywords.setdefault(flag.lower(), flag)
    return stored | set(keywords.values())


def _define_keywords(folder: Any, flags: set[str] | frozenset[str]) -> str:
    """
    Blocking.  Define the keywords among C{flags} in C{folder} where there
    is room; the text to add to the tagged OK naming those left out (a
    folder holds at most 26), or C{""}.
    """
    keywords = sorted(f for f in flags if not f.startswith("\\"))
    if not keywords:
        return ""
    kept = {k.lower() for k in folder.define_keywords(keywords, partial=True)}
    dropped = [k for k in keywords if k.lower() not in kept]
    if not dropped:
        return ""
    return (
        f" (keywords not stored, the folder holds {MAX_KEYWORDS} already:"
        f" {' '.join(dropped)})"
    )


def _batches(entries: list[Any], whole: bool) -> list[list[Any]]:
    """FETCH work split so that one batch reads about a megabyte at most."""
    batches: list[list[Any]] = []
    current: list[Any] = []
    size = 0
    for entry in entries:
        current.append(entry)
        size += entry.info.crlf_size if whole else 0
        if len(current) >= FETCH_BATCH_MESSAGES or size >= FETCH_BATCH_BYTES:
            batches.append(current)
            current, size = [], 0
    if current:
        batches.append(current)
    return batches


def _fetch_batch(
    folder: Any,
    work: list[tuple[int, Any, bool]],
    items: list[FetchItem],
    set_seen: bool,
    cache: MessageCache,
) -> list[tuple[int, bytes | None, Any]]:
    """Blocking: C{(seq, response data or None if gone, changed info or None)}."""
    from mailsys.maildir import MessageGone

    results: list[tuple[int, bytes | None, Any]] = []
    for seq, info, recent in work:
        changed = None
        try:
            if set_seen and "\\Seen" not in info.flags:
                info = changed = folder.set_flags(info, set(info.flags) | {"\\Seen"})
            flags = frozenset(info.flags) | ({"\\Recent"} if recent else frozenset())
            results.append((seq, fetch_one(folder, info, flags, items, cache), changed))
        except MessageGone:
            results.append((seq, None, None))
    return results


def _store(
    folder: Any, work: list[tuple[int, Any]], mode: str, flags: set[str]
) -> tuple[list[tuple[int, Any]], list[str]]:
    """
    Blocking: set, add or remove C{flags}; C{(seq, new info or None if
    gone)} for each message, and the folder's keywords afterwards.  New
    keywords are defined first, all or none: past the 26th the STORE is
    refused and nothing changes.
    """
    from mailsys.maildir import KeywordLimit, MessageGone

    keywords = [f for f in flags if not f.startswith("\\")]
    if keywords:
        if mode == "-FLAGS":
            known = {k.lower(): k for k in folder.keywords()}
            spelt = [known[k.lower()] for k in keywords if k.lower() in known]
        else:
            try:
                spelt = folder.define_keywords(keywords)
            except KeywordLimit as e:
                raise Refusal(str(e), "LIMIT") from None
        # The folder's spelling, so that they compare equal to the stored ones.
        flags = {f for f in flags if f.startswith("\\")} | set(spelt)
    results: list[tuple[int, Any]] = []
    for seq, info in work:
        current = set(info.flags)
        if mode == "FLAGS":
            wanted = set(flags)
        elif mode == "+FLAGS":
            wanted = current | flags
        else:
            wanted = current - flags
        try:
            if wanted != current:
                info = folder.set_flags(info, wanted)
            results.append((seq, info))
        except MessageGone:
            results.append((seq, None))
    return results, folder.keywords()


def _expunge(
    folder: Any, known: set[int], messages: syntax.SequenceSet | None, largest: int
) -> list[int]:
    """
    Blocking: remove the messages this session knows of that carry
    \\Deleted now (another session may have set it), limited to
    C{messages} for UID EXPUNGE.  Returns their UIDs.
    """
    doomed = [
        info
        for info in folder.scan()
        if "\\Deleted" in info.flags
        and info.uid in known
        and (messages is None or messages.contains(info.uid, largest))
    ]
    folder.expunge(doomed)
    return [info.uid for info in doomed]


def _run_in_thread_pool(reactor: Any) -> Callable[..., defer.Deferred[Any]]:
    def run(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run


def _run_here(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args)


class IMAPServerFactory(ServerFactory):
    """
    Builds L{IMAPServer} sessions for one listener (C{imap} with STARTTLS,
    or C{imaps} wrapped in TLS with C{implicit_tls=True}).

    @param portal: logs users in; asked for L{IIMAPAccount} avatars.
    @param clock: timeouts and IDLE polls; the reactor in production.
    @param tls: the context factory for STARTTLS (C{ServerTLS.contextFactory()}).
    @param allow_plaintext_on_loopback: accept passwords before TLS from
        127.0.0.0/8 and ::1 (C{Config.auth.allow_plaintext_on_loopback}).
    @param read_only: the read-only mode: every SELECT is an EXAMINE, and
        nothing that changes the store is accepted.
    @param max_message_size: the APPEND limit (and APPENDLIMIT).
    @param blocking: runs blocking store calls, returning a Deferred; the
        clock's thread pool when the clock is a reactor, else in line (a
        C{task.Clock} in tests).
    @param metrics: this listener's L{mailsys.metrics.ServiceMetrics}.
    @param watcher: tells IDLE sessions when their folder changes; by
        default inotify on the clock when the clock is a reactor, none (IDLE
        polls) with a C{task.Clock}.
    @param idle_poll: seconds between IDLE polls without inotify.
    @param idle_safety_poll: seconds between IDLE polls with inotify, in
        case an event was lost.
    @param idle_settle: seconds to wait after an inotify event for the
        rest of a burst, so that it costs one rescan.
    """

    protocol = IMAPServer

    def __init__(
        self,
        portal: Any,
        hostname: str,
        clock: Any,
        tls: Any = None,
        implicit_tls: bool = False,
        allow_plaintext_on_loopback: bool = False,
        read_only: bool = False,
        max_message_size: int = limits.SMTP_MAX_MESSAGE_SIZE,
        blocking: Callable[..., defer.Deferred[Any]] | None = None,
        metrics: Any = SILENT,
        watcher: FolderWatcher | None = None,
        idle_poll: float = IDLE_POLL,
        idle_safety_poll: float = IDLE_SAFETY_POLL,
        idle_settle: float = IDLE_SETTLE,
    ) -> None:
        self.portal = portal
        self.metrics = metrics
        self.hostname = hostname
        self.clock = clock
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.allow_plaintext_on_loopback = allow_plaintext_on_loopback
        self.read_only = read_only
        self.max_message_size = max_message_size
        if blocking is None:
            if IReactorThreads.providedBy(clock):
                blocking = _run_in_thread_pool(clock)
            else:
                blocking = _run_here
        self.blocking = blocking
        if watcher is None and IReactorFDSet.providedBy(clock):
            watcher = FolderWatcher(clock)
        self.watcher = watcher
        self.idle_poll = idle_poll
        self.idle_safety_poll = idle_safety_poll
        self.idle_settle = idle_settle

    def buildProtocol(self, addr: Any) -> IMAPServer:
        """One session per connection, sharing this listener's settings."""
        return self.protocol(self)

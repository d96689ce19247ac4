"""
The ESMTP server: Twisted's C{ESMTP} protocol class, hardened.

Twisted's server is a good skeleton (command dispatch, TLS and cred
plumbing, timeouts) with weaknesses a public MX cannot have: it accepts a
bare LF as a line ending everywhere (SMTP smuggling), keeps bytes pipelined
behind STARTTLS (CVE-2011-0411 class), has no size, recipient or error
limits, replies without enhanced status codes, holds whole lines of any
length, and can answer pipelined commands out of order while a delivery is
pending.  L{ESMTPServer} subclasses it and replaces the input path and the
command handlers; everything it must decide is asked of an
L{ISMTPDelivery} provider.

Bare LF and bare CR in DATA (our choice, modelled on Postfix 3.9's
C{smtpd_forbid_bare_newline = normalize}): a line ending in a bare LF is
accepted as a line ending (many legitimate clients still send them), but a
C{.} line ends DATA only when it is C{<CRLF>.<CRLF>}; a bare CR inside a
line makes the message refused with 550 5.6.0 at the end of DATA.  Mail is
stored with LF line endings, so neither can travel onward: the outbound
client writes every line with CRLF and dot-stuffing.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
import tempfile
from pathlib import Path
from typing import IO, Callable

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from mailsys import limits
from mailsys.accounts import IMailUser
from mailsys.addresses import AddressError, parse_path
from mailsys.config import LimitsSection
from mailsys.connections import is_loopback, tls_failure
from mailsys.lines import Line, LineFramer, OrderedInput
from mailsys.metrics import SILENT
from mailsys.smtp.interfaces import (
    Envelope,
    ISMTPDelivery,
    Reply,
    Session,
    new_queue_id,
)

log = Logger(namespace="mailsys.smtp")

# Keep messages in memory up to this size, then spill to a file.
_SPOOL_IN_MEMORY = 1024 * 1024

_VERB = re.compile(rb"[A-Za-z]{1,16}\Z")
# RFC 5321 4.1.1.1: a domain or an address literal; we are liberal (any
# printable ASCII without spaces), since only its presence matters to us.
_HELO_ARGUMENT = re.compile(r"[!-~]{1,255}\Z")
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_ENHANCED = re.compile(rb"[245]\.\d{1,3}\.\d{1,3} ")

# RFC 4954 4: an AUTH command line, with its initial response, may be up to
# 12288 octets; every other command stays within RFC 5321's 512.
_AUTH_LINE = 12288

# RFC 4954 4 and the LOGIN draft: the prompts Thunderbird and Outlook
# expect, base64 of "Username:" and "Password:" (Twisted's default
# "User Name\0" makes Thunderbird give up).
_LOGIN_USERNAME = b"VXNlcm5hbWU6"
_LOGIN_PASSWORD = b"UGFzc3dvcmQ6"


class State(enum.Enum):
    """
    Where a session is.  The transitions::

        GREETED --HELO/EHLO--> READY --MAIL--> MAIL --RCPT--> RCPT --DATA--> DATA
        DATA --<CRLF>.<CRLF>--> READY       RSET, HELO/EHLO: any but DATA -> READY
        STARTTLS: READY -> GREETED (RFC 3207 4.2: forget everything)
    """

    GREETED = "greeted"
    READY = "ready"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


class IncomingMessage:
    """
    The message body as it arrives in DATA: dot-unstuffed, stored with LF
    line endings, spilled to a temporary file when large, and stopped (but
    still read to the end) once it is over the size limit or broken, so an
    oversized message is never held whole.
    """

    def __init__(self, max_size: int, spool_dir: Path | None) -> None:
        self.max_size = max_size
        self.size = 0
        self.refusal: Reply | None = None
        self.normalized_lf = False
        self._file: IO[bytes] | None = tempfile.SpooledTemporaryFile(
            max_size=_SPOOL_IN_MEMORY, dir=spool_dir
        )

    def line(self, line: Line) -> None:
        if self.refusal is not None:
            return
        if line.too_long:
            # RFC 5321 4.5.3.1.6: 1000 octets including the CRLF.
            self.refuse(
                Reply(
                    554,
                    "5.6.0",
                    "Message has a line longer than "
                    f"{limits.SMTP_TEXT_LINE - 2} characters",
                )
            )
            return
        if line.bare_cr:
            # A bare CR is never a line ending (SMTP smuggling); refuse.
            self.refuse(Reply(550, "5.6.0", "Message contains a bare CR"))
            return
        if not line.crlf:
            self.normalized_lf = True
        content = line.content
        if content.startswith(b"."):
            content = content[1:]  # RFC 5321 4.5.2 transparency
        self.size += len(content) + 1
        if self.size > self.max_size:
            # RFC 1870 6.1: 552 once the limit is passed; stop storing.
            self.refuse(
                Reply(
                    552, "5.3.4", f"Message exceeds the size limit of {self.max_size}"
                )
            )
            return
        assert self._file is not None
        self._file.write(content)
        self._file.write(b"\n")

    def refuse(self, reply: Reply) -> None:
        self.refusal = reply
        self.discard()

    def body(self) -> IO[bytes]:
        """The stored message, rewound; the caller must L{discard} it."""
        assert self._file is not None
        self._file.seek(0)
        return self._file

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class ESMTPServer(OrderedInput, smtp.ESMTP):
    """
    One SMTP session.

    The input path: bytes go into a L{LineFramer}; L{_processInput} takes
    one line at a time while no reply is pending, so replies to pipelined
    commands stay in order (RFC 2920) and nothing is read ahead of a
    STARTTLS.  Each command handler sends exactly one reply, in one write.
    """

    # Set by L{ESMTPServerFactory.buildProtocol}.
    hostname: bytes = b"localhost"
    limits: LimitsSection = LimitsSection()
    delivery: ISMTPDelivery | None = None  # type: ignore[assignment]
    clock = None
    spool_dir: Path | None = None
    portal = None  # twisted.cred Portal for AUTH, or None: no AUTH offered
    require_auth = False  # submission: MAIL needs AUTH first (RFC 6409 4.3)
    implicit_tls = False  # submissions: TLS from the first byte (RFC 8314)
    allow_plaintext_auth = False  # AUTH before TLS, loopback clients only
    metrics = SILENT  # this listener's ServiceMetrics

    state: State = State.GREETED
    session: Session
    envelope: Envelope | None = None
    message: IncomingMessage | None = None
    errors = 0

    def __init__(self, contextFactory=None) -> None:
        smtp.ESMTP.__init__(self, chal={}, contextFactory=contextFactory)
        self._framer = LineFramer()
        self._previous_crlf = True
        # While a SASL exchange runs, client lines are answers, not commands.
        self._sasl: Callable[[str], None] | None = None

    # -- connection ---------------------------------------------------------

    def callLater(self, period, func):
        """Timeouts run on the injected clock (a C{task.Clock} in tests)."""
        return self.clock.callLater(period, func)

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.session = Session(client_host=getattr(peer, "host", str(peer)))
        self.host = self.hostname
        self.startedTLS = self.implicit_tls
        self.canStartTLS = (
            not self.implicit_tls
            and ITLSTransport.providedBy(self.transport)
            and self.ctx is not None
        )
        self.session.tls = self.startedTLS
        log.info(
            "connect from {client} session={session}",
            client=self.session.client_host,
            session=self.session.session_id,
        )
        self.timeout = self.limits.command_timeout
        self.setTimeout(self.limits.command_timeout)
        # RFC 5321 4.2: the greeting has no enhanced status code.
        self._write(220, self.hostname + b" ESMTP mailsys")

    def connectionLost(self, reason=None) -> None:
        if self.message is not None:
            self.message.discard()
            self.message = None
        if self._onLogout is not None:
            self._onLogout()
            self._onLogout = None
        self.setTimeout(None)
        log.info(
            "disconnect from {client} session={session}{why}",
            client=self.session.client_host,
            session=self.session.session_id,
            why=tls_failure(reason),
        )

    def timeoutConnection(self) -> None:
        # RFC 5321 4.5.3.2: say why before closing.
        log.info("timeout {client}", client=self.session.client_host)
        self.reply(
            421, "4.4.2", f"{self.hostname.decode()} Timeout, closing connection"
        )
        self.transport.loseConnection()

    # -- output -------------------------------------------------------------

    def _write(self, code: int, text: bytes | str) -> None:
        """Send a reply, multi-line if C{text} has newlines, in one write."""
        if isinstance(text, str):
            text = text.encode("utf-8", "replace")
        lines = text.split(b"\n") or [b""]
        out = [b"%03d-%s\r\n" % (code, line) for line in lines[:-1]]
        out.append(b"%03d %s\r\n" % (code, lines[-1]))
        self.transport.write(b"".join(out))
        if code >= 400 and code != 421:
            self.errors += 1
            if self.errors >= self.limits.max_errors:
                log.info(
                    "too many errors from {client}", client=self.session.client_host
                )
                self.transport.write(
                    b"421 4.7.0 Too many errors, closing connection\r\n"
                )
                self.transport.loseConnection()

    def reply(self, code: int, status: str, text: str) -> None:
        """Send a reply with its RFC 3463 enhanced status code."""
        self._write(code, f"{status} {text}")

    def sendCode(self, code, message=b""):
        """
        Replies from code inherited from Twisted: add a generic enhanced
        status code (RFC 2034 wants one on every 2xx/4xx/5xx reply).
        """
        if isinstance(message, str):
            message = message.encode("utf-8", "replace")
        if code >= 200 and code != 220 and not _ENHANCED.match(message):
            message = b"%d.0.0 %s" % (code // 100, message)
        self._write(code, message)

    def _sendReplyFailure(self, failure: Failure, what: str) -> None:
        if failure.check(smtp.SMTPServerError):
            value = failure.value
            self._write(value.code, value.resp)
        else:
            log.failure("{what} failed", failure, what=what)
            self.reply(451, "4.3.0", "Local error in processing, try again later")

    # -- input --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._framer.feed(data)
        if self.state is State.DATA:
            self.resetTimeout()
        self._processInput()

    def _lineLimit(self) -> int:
        if self.state is State.DATA:
            return limits.SMTP_TEXT_LINE
        if self.portal is not None:
            return _AUTH_LINE  # commands other than AUTH are checked after
        return limits.SMTP_COMMAND_LINE

    def _processInput(self) -> None:
        while not self._waiting and not self.transport.disconnecting:
            line = self._framer.next_line(self._lineLimit())
            if line is None:
                break
            if self.state is State.DATA:
                self._dataLine(line)
            elif self._sasl is not None:
                self.resetTimeout()
                self._saslLine(line)
            else:
                self.resetTimeout()
                self._commandLine(line)
        self._holdIfFlooded()

    def _commandLine(self, line: Line) -> None:
        if line.too_long:
            # RFC 5321 4.5.3.1.4: 512 octets including the CRLF.
            self.reply(500, "5.5.2", "Line too long")
            return
        if not line.crlf or line.bare_cr:
            # RFC 5321 2.3.8; CVE-2023-51764 class.
            self.reply(500, "5.5.2", "Bare CR or LF in command, use CRLF")
            return
        content = line.content.strip(b" \t")
        if not content:
            self.reply(500, "5.5.2", "Empty command")
            return
        if b"\0" in content or not content.isascii():
            self.reply(500, "5.5.2", "Invalid characters in command")
            return
        verb, _, rest = content.partition(b" ")
        if not _VERB.match(verb):
            self.reply(500, "5.5.2", "Syntax error, command unrecognized")
            return
        if len(line.content) + 2 > limits.SMTP_COMMAND_LINE and verb.upper() != b"AUTH":
            self.reply(500, "5.5.2", "Line too long")  # RFC 5321 4.5.3.1.4
            return
        method = getattr(self, "smtp_" + verb.decode("ascii").upper(), None)
        if method is None:
            self.reply(500, "5.5.2", "Command unrecognized")
            return
        method(rest.strip(b" \t").decode("ascii"))

    # -- commands -----------------------------------------------------------

    def extensionLines(self) -> list[str]:
        """What EHLO advertises."""
        lines = [
            f"SIZE {self.limits.max_message_size}",  # RFC 1870
            "PIPELINING",  # RFC 2920
            "8BITMIME",  # RFC 6152
            "ENHANCEDSTATUSCODES",  # RFC 2034
        ]
        if self.canStartTLS and not self.startedTLS:
            lines.append("STARTTLS")  # RFC 3207
        if self._authAllowed():
            # RFC 4954; Thunderbird ignores the old "AUTH=" form.
            lines.append("AUTH PLAIN LOGIN")
        return lines

    def _authAllowed(self) -> bool:
        """AUTH only over TLS, or from loopback when so configured."""
        if self.portal is None:
            return False
        if self.startedTLS:
            return True
        return self.allow_plaintext_auth and is_loopback(self.session.client_host)

    def _hello(self, argument: str, esmtp: bool) -> None:
        if not _HELO_ARGUMENT.match(argument):
            self.reply(
                501, "5.5.4", "Syntax: %s hostname" % ("EHLO" if esmtp else "HELO")
            )
            return
        self._resetTransaction()
        self.session.helo = argument
        self.session.esmtp = esmtp
        self.state = State.READY
        log.info(
            "{verb} {helo} from {client} session={session}",
            verb="EHLO" if esmtp else "HELO",
            helo=argument,
            client=self.session.client_host,
            session=self.session.session_id,
        )
        greeting = f"{self.hostname.decode()} Hello {self.session.client_host}"
        # RFC 2034: no enhanced status code on the EHLO/HELO reply.
        if esmtp:
            self._write(250, "\n".join([greeting] + self.extensionLines()))
        else:
            self._write(250, greeting)

    def smtp_EHLO(self, rest: str) -> None:
        self._hello(rest, esmtp=True)

    def smtp_HELO(self, rest: str) -> None:
        self._hello(rest, esmtp=False)

    def smtp_STARTTLS(self, rest: str) -> None:
        if rest:
            self.reply(501, "5.5.4", "STARTTLS takes no parameters")
        elif self.startedTLS:
            self.reply(503, "5.5.1", "TLS already active")
        elif not self.canStartTLS:
            self.reply(502, "5.5.1", "STARTTLS not available")
        elif self.state is State.GREETED:
            self.reply(503, "5.5.1", "Send EHLO first")
        else:
            self.reply(220, "2.0.0", "Ready to start TLS")
            # RFC 3207 4.2: anything the client pipelined after STARTTLS
            # was sent in clear and must not be run as if it came over TLS
            # (CVE-2011-0411).  Discard it, and forget the session.
            dropped = self._framer.discard()
            if dropped:
                log.warn(
                    "discarded {n} bytes pipelined after STARTTLS from {client}",
                    n=len(dropped),
                    client=self.session.client_host,
                )
            self.transport.startTLS(self.ctx)
            self.startedTLS = True
            self._resetTransaction()
            self.session.helo = None
            self.session.authenticated = None
            self.session.tls = True
            self.state = State.GREETED
            log.info(
                "TLS started with {client} session={session}",
                client=self.session.client_host,
                session=self.session.session_id,
            )

    def smtp_NOOP(self, rest: str) -> None:
        self.reply(250, "2.0.0", "OK")

    def smtp_RSET(self, rest: str) -> None:
        self._resetTransaction()
        if self.state is not State.GREETED:
            self.state = State.READY
        self.reply(250, "2.0.0", "OK")

    def smtp_QUIT(self, rest: str) -> None:
        self.reply(221, "2.0.0", "Bye")
        self.transport.loseConnection()

    def smtp_VRFY(self, rest: str) -> None:
        # RFC 5321 3.5.3: 252 without revealing whether the user exists.
        self.reply(252, "2.5.2", "Cannot VRFY user, but will accept message")

    def smtp_EXPN(self, rest: str) -> None:
        self.reply(502, "5.5.1", "EXPN not available")

    def smtp_HELP(self, rest: str) -> None:
        self.reply(214, "2.0.0", "See RFC 5321")

    def smtp_BDAT(self, rest: str) -> None:
        self.reply(502, "5.5.1", "CHUNKING not offered")

    def smtp_MAIL(self, rest: str) -> None:
        if self.state is State.GREETED:
            self.reply(503, "5.5.1", "Send EHLO/HELO first")
            return
        if self.state is not State.READY:
            self.reply(503, "5.5.1", "Nested MAIL command")
            return
        if self.require_auth and self.session.authenticated is None:
            self.reply(530, "5.7.0", "Authentication required")  # RFC 4954 6
            return
        parsed = _parse_command_path("FROM:", rest)
        if parsed is None:
            self.reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
            return
        path, parameters = parsed
        try:
            sender = parse_path(path)
        except AddressError as e:
            self.reply(553, "5.1.7", f"Bad sender address syntax: {e}")
            return
        envelope = Envelope(queue_id=new_queue_id(), sender=sender)
        for keyword, value in parameters:
            if keyword == "SIZE":
                # RFC 1870 6.2
                if value is None or not value.isdigit() or len(value) > 20:
                    self.reply(501, "5.5.4", "Bad SIZE parameter")
                    return
                envelope.declared_size = int(value)
                if envelope.declared_size > self.limits.max_message_size:
                    self.reply(
                        552,
                        "5.3.4",
                        "Message size exceeds fixed limit of "
                        f"{self.limits.max_message_size}",
                    )
                    return
            elif keyword == "BODY":
                # RFC 6152
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    self.reply(501, "5.5.4", "Bad BODY parameter")
                    return
                envelope.body = value.upper()
            elif keyword == "AUTH" and self._authAllowed():
                pass  # RFC 4954 5: accepted; we trust only our own AUTH
            else:
                self.reply(555, "5.5.4", f"Unsupported parameter {keyword}")
                return
        if self.delivery is None:
            self.reply(451, "4.3.0", "Not accepting mail")
            return

        def accepted(ignored):
            self.envelope = envelope
            self.state = State.MAIL
            log.info(
                "MAIL from=<{sender}> queue={queue} client={client}",
                sender=sender or "",
                queue=envelope.queue_id,
                client=self.session.client_host,
            )
            self.reply(250, "2.1.0", "Sender OK")

        def refused(failure):
            log.info(
                "MAIL refused from=<{sender}> client={client}: {why}",
                sender=sender or "",
                client=self.session.client_host,
                why=getattr(failure.value, "resp", failure.getErrorMessage()),
            )
            self.metrics.message_refused(
                "mail", getattr(failure.value, "resp", "4.3.0")
            )
            self._sendReplyFailure(failure, "sender validation")

        d = defer.maybeDeferred(self.delivery.validateFrom, self.session, envelope)
        d.addCallbacks(accepted, refused)
        self._await(d)

    def smtp_RCPT(self, rest: str) -> None:
        if self.state not in (State.MAIL, State.RCPT):
            self.reply(503, "5.5.1", "Need MAIL before RCPT")
            return
        envelope = self.envelope
        assert envelope is not None
        parsed = _parse_command_path("TO:", rest)
        if parsed is None:
            self.reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
            return
        path, parameters = parsed
        if parameters:
            self.reply(555, "5.5.4", f"Unsupported parameter {parameters[0][0]}")
            return
        if len(envelope.recipients) >= self.limits.max_recipients:
            # RFC 5321 4.5.3.1.10
            self.reply(452, "4.5.3", "Too many recipients")
            return
        try:
            if path.lower() == "postmaster" and self.delivery is not None:
                # RFC 5321 4.5.1: <postmaster> without a domain.
                recipient = parse_path("postmaster@" + self.delivery.default_domain)
            else:
                recipient = parse_path(path)
        except AddressError as e:
            self.reply(553, "5.1.3", f"Bad recipient address syntax: {e}")
            return
        if recipient is None:
            self.reply(553, "5.1.3", "The null address is not a recipient")
            return
        if recipient in envelope.routes:
            self.reply(250, "2.1.5", "Recipient OK")
            return

        def accepted(route):
            envelope.recipients.append(recipient)
            envelope.routes[recipient] = route
            self.state = State.RCPT
            log.info(
                "RCPT to=<{rcpt}> accepted queue={queue}",
                rcpt=recipient,
                queue=envelope.queue_id,
            )
            self.reply(250, "2.1.5", "Recipient OK")

        def refused(failure):
            log.info(
                "RCPT to=<{rcpt}> refused queue={queue} client={client}: {why}",
                rcpt=recipient,
                queue=envelope.queue_id,
                client=self.session.client_host,
                why=getattr(failure.value, "resp", failure.getErrorMessage()),
            )
            self.metrics.message_refused(
                "rcpt", getattr(failure.value, "resp", "4.3.0")
            )
            self._sendReplyFailure(failure, "recipient validation")

        d = defer.maybeDeferred(
            self.delivery.validateTo, self.session, envelope, recipient
        )
        d.addCallbacks(accepted, refused)
        self._await(d)

    def smtp_DATA(self, rest: str) -> None:
        if rest:
            self.reply(501, "5.5.4", "DATA takes no parameters")
            return
        if self.state is State.MAIL:
            self.reply(554, "5.5.1", "No valid recipients")
            return
        if self.state is not State.RCPT:
            self.reply(503, "5.5.1", "Need RCPT before DATA")
            return
        self.message = IncomingMessage(self.limits.max_message_size, self.spool_dir)
        self.state = State.DATA
        self._previous_crlf = True
        self.setTimeout(self.limits.data_timeout)
        self._write(354, "End data with <CR><LF>.<CR><LF>")

    # -- AUTH (RFC 4954) ----------------------------------------------------

    def smtp_AUTH(self, rest: str) -> None:
        if self.portal is None:
            self.reply(502, "5.5.1", "AUTH not available")
            return
        if not self._authAllowed():
            self.reply(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism",
            )
            return
        if self.state is State.GREETED:
            self.reply(503, "5.5.1", "Send EHLO first")
            return
        if self.session.authenticated is not None:
            self.reply(503, "5.5.1", "Already authenticated")
            return
        if self.state is not State.READY:
            self.reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
            return
        mechanism, _, initial = rest.partition(" ")
        mechanism = mechanism.upper()
        initial = initial.strip()
        if mechanism == "PLAIN":
            if initial:
                self._saslPlain(initial)
            else:
                self._challenge(b"", self._saslPlain)
        elif mechanism == "LOGIN":
            if initial:
                self._saslLoginUsername(initial)
            else:
                self._challenge(_LOGIN_USERNAME, self._saslLoginUsername)
        else:
            self.reply(504, "5.5.4", "Unrecognized authentication type")

    def _challenge(self, challenge: bytes, step: Callable[[str], None]) -> None:
        self._sasl = step
        self._write(334, challenge)

    def _saslLine(self, line: Line) -> None:
        step, self._sasl = self._sasl, None
        assert step is not None
        if line.too_long or not line.crlf or line.bare_cr:
            self.reply(
                500, "5.5.6", "Authentication exchange line is too long or malformed"
            )
            return
        text = line.content.decode("ascii", "replace").strip()
        if text == "*":
            self.reply(501, "5.0.0", "Authentication aborted")  # RFC 4954 4
            return
        step(text)

    def _decode(self, text: str) -> bytes | None:
        if text == "=":
            return b""  # RFC 4954 4: an empty initial response
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self.reply(501, "5.5.2", "Cannot decode response")
            return None

    def _saslPlain(self, text: str) -> None:
        decoded = self._decode(text)
        if decoded is None:
            return
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            self.reply(501, "5.5.2", "Malformed PLAIN response")
            return
        authzid, username, password = parts
        if authzid and authzid != username:
            # Acting as another user is not offered.
            self._authFailed(username)
            return
        self._login(username, password)

    def _saslLoginUsername(self, text: str) -> None:
        username = self._decode(text)
        if username is None:
            return

        def password_step(answer: str) -> None:
            password = self._decode(answer)
            if password is not None:
                self._login(username, password)

        self._challenge(_LOGIN_PASSWORD, password_step)

    def _login(self, username: bytes, password: bytes) -> None:
        assert self.portal is not None
        d = self.portal.login(UsernamePassword(username, password), None, IMailUser)

        def succeeded(result):
            interface, avatar, logout = result
            self.session.authenticated = avatar.address
            self._onLogout = logout
            log.info(
                "AUTH ok user={user} client={client} session={session}",
                user=avatar.address,
                client=self.session.client_host,
                session=self.session.session_id,
            )
            self.reply(235, "2.7.0", "Authentication successful")

        def failed(failure):
            if failure.check(UnauthorizedLogin):
                self._authFailed(username)
            else:
                log.failure("authentication error", failure)
                self.reply(454, "4.7.0", "Temporary authentication failure")

        d.addCallbacks(succeeded, failed)
        self._await(d)

    def _authFailed(self, username: bytes) -> None:
        self.metrics.auth_failed()
        log.info(
            "AUTH failed user={user} client={client} session={session}",
            user=username.decode("utf-8", "replace")[:100],
            client=self.session.client_host,
            session=self.session.session_id,
        )
        self.reply(535, "5.7.8", "Authentication credentials invalid")

    # -- DATA ---------------------------------------------------------------

    def _dataLine(self, line: Line) -> None:
        message = self.message
        assert message is not None
        # Only <CRLF>.<CRLF> ends DATA: the "." line must end in CRLF and
        # so must the line before it (RFC 5321 4.1.1.4; SMTP smuggling).
        if (
            line.content == b"."
            and line.crlf
            and self._previous_crlf
            and not line.too_long
        ):
            self._endOfData()
            return
        self._previous_crlf = line.crlf
        message.line(line)

    def _endOfData(self) -> None:
        message, envelope = self.message, self.envelope
        assert message is not None and envelope is not None
        self.message = None
        self.envelope = None
        self.state = State.READY
        self.setTimeout(self.limits.command_timeout)
        if message.refusal is not None:
            log.info(
                "message refused queue={queue}: {why}",
                queue=envelope.queue_id,
                why=message.refusal.resp,
            )
            self.metrics.message_refused("data", message.refusal.resp)
            self._write(message.refusal.code, message.refusal.resp)
            return
        if message.normalized_lf:
            log.info("bare LF normalized queue={queue}", queue=envelope.queue_id)
        assert self.delivery is not None
        d = defer.maybeDeferred(
            self.delivery.deliver, self.session, envelope, message.body(), message.size
        )

        def stored(ignored):
            self.metrics.message_accepted()
            self.reply(250, "2.0.0", f"Ok: queued as {envelope.queue_id}")

        def failed(failure):
            log.info(
                "message not stored queue={queue}: {why}",
                queue=envelope.queue_id,
                why=failure.getErrorMessage(),
            )
            self.metrics.message_refused(
                "data", getattr(failure.value, "resp", "4.3.0")
            )
            if failure.check(Reply):
                self._write(failure.value.code, failure.value.resp)
            else:
                # Nothing was stored: the client keeps the message and retries.
                self.reply(451, "4.3.0", "Could not store the message, try again later")

        def finished(result):
            message.discard()
            return result

        d.addCallbacks(stored, failed)
        d.addBoth(finished)
        self._await(d)

    # -- helpers ------------------------------------------------------------

    def _resetTransaction(self) -> None:
        self.envelope = None
        if self.message is not None:
            self.message.discard()
            self.message = None


def _parse_command_path(
    prefix: str, rest: str
) -> tuple[str, list[tuple[str, str | None]]] | None:
    """
    Split C{FROM:<path> PARAM=VALUE ...} into the path and its ESMTP
    parameters (RFC 5321 4.1.2).  The angle brackets are required
    (RFC 5321 4.1.1.2); a space after the colon is tolerated, as Postfix
    does.  Returns C{None} on a syntax error.
    """
    if not rest[: len(prefix)].upper() == prefix:
        return None
    rest = rest[len(prefix) :].lstrip(" ")
    if not rest.startswith("<"):
        return None
    # Find the closing bracket outside a quoted string.
    quoted = escaped = False
    for index in range(1, len(rest)):
        char = rest[index]
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            break
    else:
        return None
    path = rest[1:index]
    tail = rest[index + 1 :]
    if tail and not tail.startswith(" "):
        return None
    parameters: list[tuple[str, str | None]] = []
    for word in tail.split():
        keyword, equals, value = word.partition("=")
        if not _ESMTP_KEYWORD.match(keyword):
            return None
        parameters.append((keyword.upper(), value if equals else None))
    return path, parameters


class ESMTPServerFactory(ServerFactory):
    """
    Builds L{ESMTPServer} sessions for one listener.

    @param tls: the TLS context factory offered with STARTTLS, or C{None}.
    """

    noisy = False  # our own connect/disconnect lines say more

    protocol = ESMTPServer

    def __init__(
        self,
        delivery: ISMTPDelivery,
        hostname: str,
        limits: LimitsSection,
        clock,
        tls=None,
        spool_dir: Path | None = None,
        portal=None,
        require_auth: bool = False,
        implicit_tls: bool = False,
        allow_plaintext_auth: bool = False,
        metrics=SILENT,
    ) -> None:
        """
        @param portal: a twisted.cred portal for AUTH (the user store's
            checker and the mail realm); C{None} offers no AUTH.
        @param require_auth: MAIL is refused until AUTH succeeds
            (submission).
        @param implicit_tls: the listener speaks TLS from the first byte
            (submissions on 465); no STARTTLS is offered.
        @param allow_plaintext_auth: offer AUTH before TLS to loopback
            clients (development and local tests only).
        @param metrics: this listener's L{mailsys.metrics.ServiceMetrics}.
        """
        self.delivery = delivery
        self.hostname = hostname.encode("ascii")
        self.limits = limits
        self.clock = clock
        self.tls = tls
        self.spool_dir = spool_dir
        self.portal = portal
        self.require_auth = require_auth
        self.implicit_tls = implicit_tls
        self.allow_plaintext_auth = allow_plaintext_auth
        self.metrics = metrics

    def buildProtocol(self, addr):
        p = self.protocol(contextFactory=self.tls)
        p.factory = self
        p.delivery = self.delivery
        p.hostname = self.hostname
        p.limits = self.limits
        p.clock = self.clock
        p.spool_dir = self.spool_dir
        p.portal = self.portal
        p.require_auth = self.require_auth
        p.implicit_tls = self.implicit_tls
        p.allow_plaintext_auth = self.allow_plaintext_auth
        p.metrics = self.metrics
        return p

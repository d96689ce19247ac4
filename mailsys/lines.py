"""
Line protocols' input: cutting the byte stream into lines (the place where
SMTP smuggling lives), and answering pipelined commands in order.

RFC 5321 2.3.8 says lines end with CRLF and nothing else.  Many servers
also accept a bare LF, and the disagreement between two servers about where
a line (and so the message) ends is what SMTP smuggling exploits
(CVE-2023-51764, CVE-2023-51766).  The framer therefore reports, for every
line, whether it really ended in CRLF, so the protocol can refuse a bare LF
in a command and make sure only C{<CRLF>.<CRLF>} ends DATA.

It also never holds more than one line limit of data per line: an overlong
line is reported once and the rest of it is skipped, so a client cannot make
us buffer megabytes by never sending a newline.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer

# Stop reading from a client that keeps pipelining while a reply is pending
# once this much is buffered.
PIPELINE_BUFFER = 64 * 1024


@dataclass(frozen=True)
class Line:
    """
    One line of input.

    @ivar content: the bytes before the line ending (empty for a line that
        was too long: its content was dropped).
    @ivar crlf: C{True} when the line ended with CRLF, C{False} for a bare LF.
    @ivar too_long: the line was longer than the limit in force.
    """

    content: bytes
    crlf: bool
    too_long: bool = False

    @property
    def bare_cr(self) -> bool:
        """A CR that is not part of the line ending."""
        return b"\r" in self.content


class LineFramer:
    """
    Buffers received bytes and hands out L{Line}s one at a time, so the
    protocol can stop taking lines (while a reply is pending, or after
    STARTTLS) and leave the rest in the buffer, or throw it away.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._skipping = False  # inside an overlong line, dropping bytes

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def discard(self) -> bytes:
        """Throw away everything buffered (RFC 3207 4.2) and return it."""
        dropped = bytes(self._buffer)
        self._buffer.clear()
        self._skipping = False
        return dropped

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def next_line(self, limit: int) -> Line | None:
        """
        The next complete line, or C{None} if no complete line is buffered.

        @param limit: the longest line allowed, in octets including the CRLF
            (RFC 5321 4.5.3.1.4 and 4.5.3.1.6 count it that way).
        """
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if self._skipping:
                    self._buffer.clear()
                    return None
                if len(self._buffer) > limit:
                    # Report the overlong line now, drop what we have, and
                    # keep dropping until its end arrives.
                    self._buffer.clear()
                    self._skipping = True
                    return Line(b"", crlf=False, too_long=True)
                return None
            raw = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            crlf = raw.endswith(b"\r")
            if crlf:
                raw = raw[:-1]
            if self._skipping:
                # The end of a line already reported as too long.
                self._skipping = False
                continue
            if len(raw) + 2 > limit:
                return Line(b"", crlf=crlf, too_long=True)
            return Line(raw, crlf=crlf)


class OrderedInput:
    """
    Mixin for the SMTP and POP3 servers, which answer one command at a
    time: while a command's reply waits on a Deferred (the disk, a password
    check), further input stays in the framer, so replies to pipelined
    commands keep their order (RFC 2920 3.1, RFC 2449 6.6); past
    L{PIPELINE_BUFFER} the transport is paused until the reply is sent.

    The protocol provides C{_framer} (a L{LineFramer}), C{_processInput()}
    (which takes lines while C{_waiting} is false and then calls
    L{_holdIfFlooded}) and C{transport}.
    """

    _waiting = False
    _paused = False

    def _inputOpen(self) -> bool:
        """Whether input should still be processed."""
        return not self.transport.disconnecting

    def _holdIfFlooded(self) -> None:
        if (
            self._waiting
            and not self._paused
            and self._framer.buffered > PIPELINE_BUFFER
        ):
            self._paused = True
            self.transport.pauseProducing()

    def _await(self, d: defer.Deferred) -> None:
        """
        Hold further input until C{d} has fired, so a pipelined command is
        answered only after the one before it.
        """
        fired: list[bool] = []

        def note(result):
            fired.append(True)
            return result

        d.addBoth(note)
        if fired:
            return
        self._waiting = True

        def resume(result):
            self._waiting = False
            if self._paused:
                self._paused = False
                self.transport.resumeProducing()
            if self._inputOpen():
                self._processInput()
            return result

        d.addBoth(resume)

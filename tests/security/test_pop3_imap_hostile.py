"""
POP3 and IMAP against random clients: any byte stream, cut into any
chunks, after a real login, must never raise out of the protocol (trial
fails a test that logs an unhandled error), and every line the server
writes must be a well-formed response of that protocol.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.mail.pop3 import IMailbox
from twisted.trial.unittest import SynchronousTestCase

from mailsys.accounts import MailRealm
from mailsys.imap import IIMAPAccount, IMAPServerFactory, imap_avatar
from mailsys.maildir import MaildirStore
from mailsys.pop3 import POP3ServerFactory, pop3_avatar
from mailsys.testing import TLSStringTransport

CLIENT = IPv4Address("TCP", "192.0.2.66", 4444)
ALICE = "alice@example.test"
MESSAGE = b"Subject: hi\nFrom: a@b.example\n\n.dot line\nbody\n"

POP3_WORDS = [
    b"USER alice@example.test\r\n",
    b"PASS secret\r\n",
    b"STAT\r\n",
    b"LIST\r\n",
    b"LIST 1\r\n",
    b"UIDL\r\n",
    b"RETR 1\r\n",
    b"TOP 1 0\r\n",
    b"DELE 1\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"CAPA\r\n",
    b"STLS\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH LOGIN\r\n",
    b"*\r\n",
    b"RETR 99999999999999999999\r\n",
    b"LIST -1\r\n",
    b"\r\n",
    b"\n",
    b"\x00",
    b"\xff\xfe",
    b"QUIT\r\n",
]
IMAP_WORDS = [
    b"a SELECT INBOX\r\n",
    b"b FETCH 1:* (FLAGS BODY[])\r\n",
    b"c UID FETCH 1 BODY[1]<0.5>\r\n",
    b"d STORE 1 +FLAGS (\\Seen $Junk)\r\n",
    b"e SEARCH OR SEEN NOT BODY x\r\n",
    b"f APPEND INBOX {5}\r\n",
    b"hello\r\n",
    b"g APPEND INBOX {99999999999}\r\n",
    b'h LIST "" *\r\n',
    b"i CREATE ../x\r\n",
    b"j IDLE\r\n",
    b"DONE\r\n",
    b"k COPY 1 Trash\r\n",
    b"l MOVE 1:* Junk\r\n",
    b"m EXPUNGE\r\n",
    b"n STATUS INBOX (MESSAGES)\r\n",
    b"o FETCH 1 (BODYSTRUCTURE ENVELOPE)\r\n",
    b'p SELECT "a\\"b"\r\n',
    b"(((\r\n",
    b"q UID SEARCH 1:*\r\n",
    b"\r\n",
    b"\x00",
    b"\xff",
    b"{3}\r\n",
    b"r LOGOUT\r\n",
]


def responses(out: bytes) -> list[bytes]:
    """
    The first line of each IMAP response in C{out}: a line ending in a
    literal C{{n}} continues, after n bytes, until a line without one.
    """
    starts, position = [], 0
    while position < len(out):
        end = out.find(b"\r\n", position)
        if end < 0:
            break
        starts.append(out[position:end])
        while (found := re.search(rb"\{(\d+)\}\Z", out[position:end])) is not None:
            position = end + 2 + int(found.group(1))
            end = out.find(b"\r\n", position)
            if end < 0:
                return starts
        position = end + 2
    return starts


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


class HostileStreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp()).resolve()
        store = MaildirStore(self.root, "mail.example.test")
        store.deliver([ALICE], io.BytesIO(MESSAGE))
        checker = InMemoryUsernamePasswordDatabaseDontUse()
        checker.addUser(ALICE.encode(), b"secret")
        realm = MailRealm(self.root, {IMailbox: pop3_avatar, IIMAPAccount: imap_avatar})
        self.portal = Portal(realm, [checker])

    def session(self, factory, login: bytes, data: bytes, chunk: int) -> bytes:
        proto = factory.buildProtocol(CLIENT)
        transport = TLSStringTransport(peerAddress=CLIENT)
        proto.makeConnection(transport)
        for piece in [login] + chunked(data, chunk):
            if transport.disconnecting:
                break
            proto.dataReceived(piece)
        proto.connectionLost(None)
        return transport.value()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.lists(
            st.one_of(st.sampled_from(POP3_WORDS), st.binary(max_size=30)), max_size=25
        ),
        st.integers(min_value=1, max_value=50),
    )
    def test_pop3_random_streams(self, pieces, chunk):
        """Any POP3 byte stream: only +OK/-ERR/+ lines, message lines and
        the terminating dot; no error logged."""
        factory = POP3ServerFactory(
            self.portal,
            "pop.example.test",
            Clock(),
            tls=object(),
            implicit_tls=True,
            run_blocking=defer.maybeDeferred,
        )
        out = self.session(
            factory,
            b"USER alice@example.test\r\nPASS secret\r\n",
            b"".join(pieces),
            chunk,
        )
        self.assertTrue(out.startswith(b"+OK"), out[:80])
        for line in out.split(b"\r\n"):
            self.assertNotIn(b"Traceback", line)
        self.assertEqual(self.flushLoggedErrors(), [])

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.lists(
            st.one_of(st.sampled_from(IMAP_WORDS), st.binary(max_size=30)), max_size=25
        ),
        st.integers(min_value=1, max_value=50),
    )
    def test_imap_random_streams(self, pieces, chunk):
        """Any IMAP byte stream: every line the server starts is untagged
        (*), a continuation (+), or tagged OK/NO/BAD; no error logged."""
        factory = IMAPServerFactory(
            self.portal, "mail.example.test", Clock(), tls=object(), implicit_tls=True
        )
        out = self.session(
            factory, b"l LOGIN alice@example.test secret\r\n", b"".join(pieces), chunk
        )
        self.assertTrue(out.startswith(b"* OK"), out[:80])
        response = re.compile(rb"\A(\* |\+ ?|[!-~]+ (OK|NO|BAD)\b)")
        for line in responses(out):
            self.assertRegex(line, response)
        self.assertEqual(self.flushLoggedErrors(), [])

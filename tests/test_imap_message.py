"""
The message side of FETCH: sections cut from the CRLF bytes, ENVELOPE and
BODYSTRUCTURE, on well-formed mail and on hostile mail (8-bit headers,
broken or missing boundaries, absurd nesting, garbage), which must never
raise and must always give a response that parses.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailsys.imap.message import ParsedMessage, envelope, header_fields, to_crlf


def parsed(message: bytes) -> ParsedMessage:
    return ParsedMessage(to_crlf(message))


NESTED = (
    b"From: a@example.test\nSubject: outer\nMIME-Version: 1.0\n"
    b"Content-Type: multipart/mixed; boundary=outer\n\n"
    b"--outer\nContent-Type: text/plain\n\nfirst part\n"
    b"--outer\nContent-Type: message/rfc822\n\n"
    b"From: b@example.test\nSubject: inner\n"
    b"Content-Type: multipart/alternative; boundary=\"in ner\"\n\n"
    b"--in ner\nContent-Type: text/plain\n\ninner plain\n"
    b"--in ner\nContent-Type: text/html\n\n<p>inner html</p>\n"
    b"--in ner--\n"
    b"--outer--\nepilogue\n"
)

# Mail that breaks the rules, each with what it tests.
HOSTILE = {
    "empty": b"",
    "only a blank line": b"\n",
    "header without body": b"Subject: no body",
    "8-bit utf-8 header": "Subject: Grüße\nFrom: Jörg <jörg@example.test>\n\nx\n".encode(),
    "8-bit latin-1 header": b"Subject: caf\xe9\nFrom: \xe9@\xe9\n\nx\n",
    "no subtype": b"Content-Type: text\n\nx\n",
    "garbage content type": b"Content-Type: ;;;===\n\nx\n",
    "multipart without boundary": b"Content-Type: multipart/mixed\n\nx\n",
    "boundary never used": b"Content-Type: multipart/mixed; boundary=zz\n\nx\n",
    "no closing boundary": b"Content-Type: multipart/mixed; boundary=b\n\n--b\n\nx\n--b\n\ny\n",
    "empty boundary": b'Content-Type: multipart/mixed; boundary=""\n\n--\n\nx\n',
    "huge boundary": b"Content-Type: multipart/mixed; boundary=" + b"b" * 5000 + b"\n\nx\n",
    "base64 message/rfc822": (
        b"Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\nU3ViamVjdDogeA==\n"
    ),
    "message/rfc822 empty": b"Content-Type: message/rfc822\n\n",
    "rfc2231 filename": (
        b"Content-Type: application/pdf; name*=utf-8''%C3%A4.pdf\n"
        b"Content-Disposition: attachment; filename*0*=utf-8''%C3%A4; filename*1=.pdf\n\nx\n"
    ),
    "broken disposition": b"Content-Disposition: ;;; =\n\nx\n",
    "broken addresses": (
        b'From: "unterminated <x@y\nTo: undisclosed-recipients:;\n'
        b"Cc: <<<@@@>>>, ,,\nReply-To: @\nSender: (comment only)\n\nx\n"
    ),
    "control characters": b"Subject: a\x00b\x1bc\nFrom: \x00\n\n\x00\xff\xfe\n",
    "binary garbage": bytes(range(256)) * 4,
    "bare CR": b"Subject: a\rb\n\nline\rline\n",
    "crlf already": b"Subject: crlf\r\n\r\nbody\r\n",
    "continuation first": b" folded first\nSubject: x\n\nbody\n",
    "header line without colon": b"Subject: x\nnot a header\nTo: y@example.test\n\nbody\n",
    "language and location": (
        b"Content-Type: text/plain\nContent-Language: en, de\nContent-Location: http://x/\n"
        b"Content-ID: <id@x>\nContent-Description: \xe9t\xe9\nContent-MD5: abc\n\nx\n"
    ),
}


def deep(levels: int) -> bytes:
    """A message nested C{levels} multiparts deep."""
    head = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i) for i in range(levels)
    )
    tail = b"".join(b"\n--b%d--\n" % i for i in reversed(range(levels)))
    return head + b"Content-Type: text/plain\n\nleaf" + tail


def parses(response: bytes) -> list:
    """
    The IMAP data in C{response} read back as nested lists of bytes (quoted
    strings, literals, atoms), as a client would; fails on any syntax error
    (unbalanced parentheses, a bad literal count, an unterminated string).
    """
    stack: list[list] = [[]]
    pos = 0
    while pos < len(response):
        char = response[pos : pos + 1]
        if char == b" ":
            pos += 1
        elif char == b"(":
            stack.append([])
            pos += 1
        elif char == b")":
            done = stack.pop()
            stack[-1].append(done)
            pos += 1
        elif char == b'"':
            value = bytearray()
            pos += 1
            while response[pos : pos + 1] != b'"':
                if response[pos : pos + 1] == b"\\":
                    pos += 1
                if pos >= len(response) or response[pos] in b"\r\n":
                    raise AssertionError(f"bad quoted string in {response!r}")
                value += response[pos : pos + 1]
                pos += 1
            stack[-1].append(bytes(value))
            pos += 1
        elif char == b"{":
            end = response.index(b"}\r\n", pos)
            size = int(response[pos + 1 : end])
            value = response[end + 3 : end + 3 + size]
            if len(value) != size:
                raise AssertionError(f"short literal in {response!r}")
            stack[-1].append(value)
            pos = end + 3 + size
        else:
            end = pos
            while end < len(response) and response[end : end + 1] not in b' ()"{':
                end += 1
            stack[-1].append(response[pos:end])
            pos = end
    if len(stack) != 1:
        raise AssertionError(f"unbalanced parentheses in {response!r}")
    return stack[0]


class SectionTests(SynchronousTestCase):
    def test_whole_and_header_and_text(self):
        """BODY[] is the message with CRLF; HEADER ends with the blank line;
        HEADER + TEXT is BODY[]."""
        message = parsed(NESTED)
        wire = to_crlf(NESTED)
        self.assertEqual(message.section([], ""), wire)
        header = message.section([], "HEADER")
        self.assertTrue(header.endswith(b"\r\n\r\n"))
        self.assertEqual(header + message.section([], "TEXT"), wire)

    def test_part_numbers(self):
        """Part numbers walk multiparts and into message/rfc822."""
        message = parsed(NESTED)
        self.assertEqual(message.section([1], ""), b"first part")
        self.assertEqual(message.section([1], "MIME"), b"Content-Type: text/plain\r\n\r\n")
        inner = message.section([2], "")
        self.assertTrue(inner.startswith(b"From: b@example.test\r\n"))
        self.assertEqual(message.section([2, 1], ""), b"inner plain")
        self.assertEqual(message.section([2, 2], ""), b"<p>inner html</p>")
        self.assertIn(b"Subject: inner\r\n", message.section([2], "HEADER"))
        self.assertTrue(message.section([2], "TEXT").startswith(b"--in ner\r\n"))
        self.assertEqual(
            message.section([2], "HEADER.FIELDS", [b"subject"]), b"Subject: inner\r\n\r\n"
        )
        for missing in ([3], [1, 1], [2, 3], [0], [2, 1, 1]):
            self.assertEqual(message.section(missing, ""), b"", missing)
        self.assertEqual(message.section([1], "HEADER"), b"")

    def test_single_part_is_part_one(self):
        """In a single-part message the body is part 1 (RFC 3501 6.4.5)."""
        message = parsed(b"Subject: x\n\nbody\n")
        self.assertEqual(message.section([1], ""), b"body\r\n")
        self.assertEqual(message.section([2], ""), b"")

    def test_header_fields(self):
        """HEADER.FIELDS keeps folded lines and message order, matches names
        case-insensitively; .NOT keeps everything else."""
        block = b"Subject: a\r\n b\r\nFrom: x\r\nX-Other: y\r\nsubject: again\r\n\r\n"
        self.assertEqual(
            header_fields(block, [b"SUBJECT"], exclude=False),
            b"Subject: a\r\n b\r\nsubject: again\r\n\r\n",
        )
        self.assertEqual(
            header_fields(block, [b"subject", b"from"], exclude=True), b"X-Other: y\r\n\r\n"
        )
        self.assertEqual(header_fields(block, [b"nothing"], exclude=False), b"\r\n")


class StructureTests(SynchronousTestCase):
    def test_bodystructure_nested(self):
        """BODYSTRUCTURE of a multipart holding a message/rfc822 holding a
        multipart/alternative."""
        structure = parsed(NESTED).bodystructure(extended=True)
        self.assertEqual(
            structure,
            b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 10 1 NIL NIL NIL NIL)'
            b'("message" "rfc822" NIL NIL NIL "7BIT" 213 '
            b'(NIL "inner" ((NIL NIL "b" "example.test")) ((NIL NIL "b" "example.test")) '
            b'((NIL NIL "b" "example.test")) NIL NIL NIL NIL NIL) '
            b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 11 1 NIL NIL NIL NIL)'
            b'("text" "html" ("charset" "us-ascii") NIL NIL "7BIT" 17 1 NIL NIL NIL NIL) '
            b'"alternative" ("boundary" "in ner") NIL NIL NIL) 13 NIL NIL NIL NIL) '
            b'"mixed" ("boundary" "outer") NIL NIL NIL)',
        )
        self.assertTrue(parses(structure))

    def test_body_is_not_extended(self):
        """BODY leaves out the extension data."""
        self.assertEqual(
            parsed(b"Subject: x\n\nhi\n").bodystructure(extended=False),
            b'("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 4 1)',
        )

    def test_envelope(self):
        """ENVELOPE fields in RFC 3501 order; Sender and Reply-To default to
        From; folded values are unfolded; missing ones are NIL."""
        block = to_crlf(
            b"Date: Mon, 7 Jul 2025 10:00:00 +0000\nSubject: a\n  folded\n"
            b'From: "Bob \\"B\\"" <bob@remote.example>\n'
            b"To: alice@example.test, Carol <carol@example.test>\n"
            b"In-Reply-To: <x@y>\nMessage-ID: <id@remote.example>\n\n"
        )
        self.assertEqual(
            envelope(block),
            b'("Mon, 7 Jul 2025 10:00:00 +0000" "a  folded" '
            b'(("Bob \\"B\\"" NIL "bob" "remote.example")) '
            b'(("Bob \\"B\\"" NIL "bob" "remote.example")) '
            b'(("Bob \\"B\\"" NIL "bob" "remote.example")) '
            b'((NIL NIL "alice" "example.test")("Carol" NIL "carol" "example.test")) '
            b'NIL NIL "<x@y>" "<id@remote.example>")',
        )

    def test_8bit_header_is_a_literal(self):
        """An 8-bit Subject travels as a literal of the exact bytes."""
        block = to_crlf("Subject: Grüße\n\n".encode())
        self.assertIn(b"{7}\r\nGr\xc3\xbc\xc3\x9fe", envelope(block))

    def test_rfc2231_parameters(self):
        """RFC 2231 parameters are decoded into UTF-8 values."""
        structure = parsed(HOSTILE["rfc2231 filename"]).bodystructure(extended=True)
        self.assertIn(b'"name" {6}\r\n\xc3\xa4.pdf', structure)
        self.assertIn(b'("attachment" ("filename" {6}\r\n\xc3\xa4.pdf))', structure)

    def test_multipart_without_boundary(self):
        """A multipart with no usable boundary is served as one text part."""
        for name in ("multipart without boundary", "boundary never used", "empty boundary"):
            structure = parsed(HOSTILE[name]).bodystructure(extended=False)
            self.assertTrue(structure.startswith(b'("text" "plain"'), (name, structure))

    def test_missing_closing_boundary(self):
        """Without a closing delimiter the last part runs to the end."""
        message = parsed(HOSTILE["no closing boundary"])
        self.assertEqual(message.section([2], ""), b"y\r\n")

    def test_deep_nesting_is_bounded(self):
        """Thousands of nested multiparts neither recurse without bound nor
        crash; the depth past the limit is served as one opaque part."""
        message = parsed(deep(2000))
        structure = message.bodystructure(extended=True)
        self.assertLess(structure.count(b'"mixed"'), 45)
        self.assertTrue(parses(structure))

    def test_hostile_mail_never_crashes(self):
        """Every hostile fixture gives an ENVELOPE and a BODYSTRUCTURE that
        parse, and sections that are slices of BODY[]."""
        for name, data in HOSTILE.items():
            message = parsed(data)
            for response in (
                message.envelope(),
                message.bodystructure(extended=True),
                message.bodystructure(extended=False),
            ):
                self.assertTrue(parses(response), name)
            for numbers in ([], [1], [2], [1, 1]):
                for text in ("", "HEADER", "TEXT", "MIME", "HEADER.FIELDS"):
                    if text == "MIME" and not numbers:
                        continue
                    section = message.section(numbers, text, [b"subject"])
                    self.assertIsInstance(section, bytes)

    @settings(max_examples=150, deadline=None)
    @given(
        st.lists(
            st.sampled_from(
                [
                    b"Content-Type: multipart/mixed; boundary=b\n",
                    b"Content-Type: message/rfc822\n",
                    b"Content-Type: text/plain; charset=\xff\n",
                    b"Content-Transfer-Encoding: base64\n",
                    b"Subject: \xe9\n",
                    b"From: <a@b>, \"x\n",
                    b"\n",
                    b"--b\n",
                    b"--b--\n",
                    b"body line\n",
                    b"\r",
                    b"\x00",
                    b" folded\n",
                ]
            ),
            max_size=40,
        )
    )
    def test_random_mime_never_crashes(self, pieces):
        """Random arrangements of MIME pieces never crash the parser, and
        what it answers always parses as IMAP."""
        message = parsed(b"".join(pieces))
        self.assertTrue(parses(message.bodystructure(extended=True)))
        parses(message.envelope())
        wire = message.data
        for numbers in ([1], [1, 1], [2, 1]):
            self.assertIn(message.section(numbers, ""), wire)

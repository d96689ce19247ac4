"""
IMAP data syntax: modified UTF-7 mailbox names, command arguments (quoted
strings, literals, lists, sequence sets, dates) and the strings we write
into responses.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailsys.imap import syntax, utf7
from mailsys.imap.syntax import Arguments, BadCommand, Literal, SequenceSet


def literal(data: bytes) -> Literal:
    value = Literal(len(data))
    value.write(data)
    return value


class ModifiedUTF7Tests(SynchronousTestCase):
    def test_known_names(self):
        """The RFC 3501 5.1.3 example and the usual cases."""
        cases = {
            "INBOX": b"INBOX",
            "Entwürfe": b"Entw&APw-rfe",
            "~peter/mail/台北/日本語": b"~peter/mail/&U,BTFw-/&ZeVnLIqe-",
            "A&B": b"A&-B",
            "😀": b"&2D3eAA-",
        }
        for text, wire in cases.items():
            self.assertEqual(utf7.encode(text), wire)
            self.assertEqual(utf7.decode(wire), text)

    def test_rejects_malformed(self):
        """Unterminated, malformed, 8-bit, control characters and encoded
        plain ASCII are refused."""
        for wire in (b"&", b"&Jjo", b"&Jjo!-", b"caf\xc3\xa9", b"a\x01b", b"&AGEAYgBj-", b"&A=-"):
            self.assertRaises(utf7.NameEncodingError, utf7.decode, wire)

    @given(st.text())
    def test_round_trip(self, text):
        """Any text survives encoding and decoding."""
        try:
            text.encode("utf-16-be")
        except UnicodeEncodeError:
            return  # lone surrogates are not text a client can send
        wire = utf7.encode(text)
        self.assertTrue(wire.isascii())
        self.assertEqual(utf7.decode(wire), text)


class ArgumentTests(SynchronousTestCase):
    def test_quoted_with_escapes(self):
        """Quoted strings keep escaped quotes and backslashes."""
        args = Arguments([rb'"a \"b\" \\c" rest'])
        self.assertEqual(args.astring(), b'a "b" \\c')
        args.space()
        self.assertEqual(args.astring(), b"rest")
        self.assertTrue(args.at_end())

    def test_bad_quoted(self):
        """An unterminated string or a bad escape is BAD."""
        for text in (b'"open', b'"bad \\x"'):
            self.assertRaises(BadCommand, Arguments([text]).astring)

    def test_literals(self):
        """A literal may stand wherever a string may, and hold anything."""
        args = Arguments([b"", literal(b"two\r\nlines"), b" ", literal(b""), b""])
        self.assertEqual(args.astring(), b"two\r\nlines")
        args.space()
        self.assertEqual(args.astring(), b"")
        args.end()

    def test_nil_and_nstring(self):
        """NIL is NIL only as a whole word."""
        args = Arguments([b'NIL "x" NILS'])
        self.assertIsNone(args.nstring())
        args.space()
        self.assertEqual(args.nstring(), b"x")
        args.space()
        self.assertRaises(BadCommand, args.nstring)

    def test_flag_lists(self):
        """Flag lists with and without parentheses, system flags and keywords."""
        self.assertEqual(
            Arguments([b"(\\Seen $Forwarded)"]).flag_list(), ["\\Seen", "$Forwarded"]
        )
        self.assertEqual(Arguments([b"()"]).flag_list(), [])
        self.assertEqual(
            Arguments([b"\\Deleted \\Seen"]).flag_list(parenthesised_only=False),
            ["\\Deleted", "\\Seen"],
        )
        for text in (b"(\\Seen", b"(\\)", b"\\Seen"):
            self.assertRaises(BadCommand, Arguments([text]).flag_list)

    def test_numbers(self):
        """Numbers are unsigned 32-bit."""
        self.assertEqual(Arguments([b"4294967295"]).number(), 2**32 - 1)
        self.assertRaises(BadCommand, Arguments([b"4294967296"]).number)
        self.assertRaises(BadCommand, Arguments([b"x"]).number)

    def test_literal_announcement(self):
        """{n} waits for "+", {n+} does not; anything else is no literal."""
        self.assertEqual(syntax.literal_announcement(b"a LOGIN {5}"), (b"a LOGIN ", 5, True))
        self.assertEqual(syntax.literal_announcement(b"a X {0+}"), (b"a X ", 0, False))
        for line in (b"a NOOP", b"a X {5", b"a X {-1}", b"a X {12345678901}"):
            self.assertIsNone(syntax.literal_announcement(line))


class SequenceSetTests(SynchronousTestCase):
    def test_parse_and_bounds(self):
        """Ranges, single numbers and * (the largest), in either order."""
        parsed = SequenceSet.parse(b"1,3:5,*,9:7,4:*")
        self.assertEqual(
            list(parsed.bounds(10)), [(1, 1), (3, 5), (10, 10), (7, 9), (4, 10)]
        )
        self.assertTrue(parsed.contains(8, 10))
        self.assertFalse(parsed.contains(2, 10))

    def test_invalid(self):
        """Zero, leading zeros, empty items and junk are BAD."""
        for text in (b"", b"0", b"01", b"1,,2", b"1:", b":2", b"1:2:3", b"99999999999"):
            self.assertRaises(BadCommand, SequenceSet.parse, text)

    def test_format(self):
        """COPYUID sets compress runs."""
        self.assertEqual(syntax.format_set([1, 2, 3, 5, 7, 8]), b"1:3,5,7:8")


class OutputTests(SynchronousTestCase):
    def test_strings(self):
        """Printable text is quoted (escaped); 8-bit or line breaks become
        literals counted in bytes."""
        self.assertEqual(syntax.string(b'say "hi" \\'), b'"say \\"hi\\" \\\\"')
        self.assertEqual(syntax.string("é"), b"{2}\r\n\xc3\xa9")
        self.assertEqual(syntax.string(b"a\r\nb"), b"{4}\r\na\r\nb")
        self.assertEqual(syntax.nstring(None), b"NIL")

    def test_mailbox_names(self):
        """Names that are atoms go bare; others are quoted; NIL is quoted."""
        self.assertEqual(syntax.astring(b"INBOX"), b"INBOX")
        self.assertEqual(syntax.astring(b"My Mail"), b'"My Mail"')
        self.assertEqual(syntax.astring(b"NIL"), b'"NIL"')
        self.assertEqual(syntax.astring(b""), b'""')

    def test_dates(self):
        """INTERNALDATE is written in UTC; APPEND dates with zones and
        SEARCH dates are read, bad ones refused."""
        self.assertEqual(syntax.format_date_time(0), b'"01-Jan-1970 00:00:00 +0000"')
        self.assertEqual(syntax.parse_date_time(b"07-Jul-2025 12:00:00 +0200"), 1751882400)
        self.assertEqual(syntax.parse_date_time(b" 7-Jul-2025 10:00:00 +0000"), 1751882400)
        self.assertEqual(syntax.parse_date(b"1-feb-1994"), (1994, 2, 1))
        for bad in (b"32-Jul-2025 00:00:00 +0000", b"07-Foo-2025 00:00:00 +0000", b"x"):
            self.assertRaises(BadCommand, syntax.parse_date_time, bad)
        self.assertRaises(BadCommand, syntax.parse_date, b"1994-02-01")

"""
Tests for L{mailsys.addresses}: what the SMTP server accepts in MAIL FROM
and RCPT TO, what becomes a user name, and what hostile input gets instead.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailsys import limits
from mailsys.addresses import (
    AddressError,
    MailAddress,
    is_safe_mailbox_name,
    normalize_domain,
    parse_address,
    parse_path,
)

PRINTABLE_ASCII = st.characters(min_codepoint=32, max_codepoint=126)

# (path as a client sends it, expected local part, expected domain)
VALID_PATHS = [
    ("alice@example.test", "alice", "example.test"),
    ("<alice@example.test>", "alice", "example.test"),
    ("Alice@EXAMPLE.Test", "alice", "example.test"),
    ("alice@example.test.", "alice", "example.test"),
    ("first.last+tag@example.test", "first.last+tag", "example.test"),
    ("postmaster@localhost", "postmaster", "localhost"),
    # RFC 5321 4.1.1.3 / appendix C: source routes are accepted and dropped.
    ("@relay.test:alice@example.test", "alice", "example.test"),
    ("<@a.test,@b.test:alice@example.test>", "alice", "example.test"),
    ("@[192.0.2.1],@[IPv6:::1]:alice@example.test", "alice", "example.test"),
    # Quoted local parts are unquoted.
    ('"alice"@example.test', "alice", "example.test"),
    ('"a b"@example.test', "a b", "example.test"),
    ('"bob@evil"@example.test', "bob@evil", "example.test"),
    ('"a\\"b\\\\c"@example.test', 'a"b\\c', "example.test"),
    ('"../../etc/passwd"@example.test', "../../etc/passwd", "example.test"),
    # The %-hack parses, but is never a user (see is_safe_mailbox_name).
    ("user%other@example.test", "user%other", "example.test"),
    ("a/b@example.test", "a/b", "example.test"),
    # Address literals are kept verbatim (RFC 5321 4.1.3).
    ("alice@[192.0.2.1]", "alice", "[192.0.2.1]"),
    ("alice@[IPv6:::1]", "alice", "[IPv6:::1]"),
    ("alice@[IPv6:2001:db8::1]", "alice", "[IPv6:2001:db8::1]"),
    # International domains become A-labels.
    ("alice@Bücher.example", "alice", "xn--bcher-kva.example"),
    # The limits themselves are allowed (RFC 5321 4.5.3.1.1 and 4.5.3.1.3).
    ("x" * 64 + "@example.test", "x" * 64, "example.test"),
    (
        "x@" + ".".join(["a" * 63] * 3) + "." + "b" * 60,
        "x",
        ".".join(["a" * 63] * 3) + "." + "b" * 60,
    ),
]

# (hostile or broken path, part of the reason given)
INVALID_PATHS = [
    ("alice", "missing '@'"),
    ("alice@", "empty domain"),
    ("@example.test", "empty local part"),
    ('""@example.test', "empty local part"),
    ("../x@example.test", "invalid local part"),
    (".alice@example.test", "invalid local part"),
    ("alice.@example.test", "invalid local part"),
    ("a..b@example.test", "invalid local part"),
    ("a<b@example.test", "invalid local part"),
    ("alice\x00@example.test", "control character"),
    ("alice@example.test\x00", "control character"),
    ('"al\x00ice"@example.test', "control character"),
    ("alice@example.test\r\nRCPT TO:<x@y.test>", "control character"),
    ("alice\n@example.test", "control character"),
    ("al\tice@example.test", "control character"),
    ("al ice@example.test", "space"),
    ("alice@exam ple.test", "space"),
    ("x" * 65 + "@example.test", "local part too long"),
    ('"' + "x" * 63 + '"@example.test', "local part too long"),
    ("x@" + ".".join(["a" * 63] * 3) + "." + "b" * 61, "address too long"),
    ("x" * 100000 + "@example.test", "address too long"),
    ('"alice@example.test', "unterminated quoted local part"),
    ('"alice\\', "unterminated quoted local part"),
    ('"alice"x@example.test', "missing '@' after quoted local part"),
    ("jörg@example.test", "non-ASCII local part"),
    ('"jörg"@example.test', "non-ASCII local part"),
    ("alice@bob@example.test", "invalid domain"),
    ("alice@-example.test", "invalid domain"),
    ("alice@example-.test", "invalid domain"),
    ("alice@ex_ample.test", "invalid domain"),
    ("alice@../etc", "empty label"),
    ("alice@example..test", "empty label"),
    ("alice@.example.test", "empty label"),
    ("alice@" + "a" * 64 + ".test", "domain label too long"),
    ("alice@192.0.2.1", "numeric domain"),
    ("alice@[192.0.2]", "invalid address literal"),
    ("alice@[192.0.2.256]", "invalid address literal"),
    ("alice@[IPv6:fe80::1%eth0]", "invalid address literal"),
    ("alice@[IPv6:::1", "invalid address literal"),
    ("alice@[::1]", "unsupported address literal"),
    ("alice@[x-tag:whatever]", "unsupported address literal"),
    ("alice@☃.☃", "invalid international domain name"),
    ("<alice@example.test", "unbalanced angle brackets"),
    ("alice@example.test>", "unbalanced angle brackets"),
    ("<", "unbalanced angle brackets"),
    ("@bad_route.test:alice@example.test", "invalid source route"),
    ("@a.test;alice@example.test:", "invalid source route"),
    ("@[192.0.2.1:alice@example.test", "invalid source route"),
    ("\udcffalice@example.test", "not valid UTF-8"),
]


class ParsePathTests(SynchronousTestCase):
    """What the SMTP server makes of MAIL FROM and RCPT TO paths."""

    def test_null_reverse_path(self) -> None:
        """C{MAIL FROM:<>} (a bounce) has no sender, whether or not the
        brackets were already removed."""
        self.assertIsNone(parse_path("<>"))
        self.assertIsNone(parse_path(""))
        self.assertIsNone(parse_path(b"<>"))

    def test_valid(self) -> None:
        """Every form of address a real client sends is understood and
        normalised: case, trailing dot, source routes, quoting, literals,
        international domains."""
        for text, local, domain in VALID_PATHS:
            with self.subTest(text=text):
                self.assertEqual(parse_path(text), MailAddress(local, domain))

    def test_invalid(self) -> None:
        """Hostile and broken paths are refused with a short reason, never
        with any other exception."""
        for text, reason in INVALID_PATHS:
            with self.subTest(text=text):
                error = self.assertRaises(AddressError, parse_path, text)
                self.assertIn(reason, str(error))

    def test_reason_does_not_echo_input(self) -> None:
        """The reason can be put in an SMTP reply as is: it never contains
        the client's bytes (no CRLF injection, no NUL)."""
        for text, _ in INVALID_PATHS:
            with self.subTest(text=text):
                error = self.assertRaises(AddressError, parse_path, text)
                self.assertTrue(str(error).isprintable())
                self.assertNotIn("example.test", str(error))

    def test_bytes(self) -> None:
        """Paths straight off the wire are decoded as UTF-8; anything else
        is refused as not UTF-8."""
        self.assertEqual(
            parse_path(b"<alice@example.test>"), MailAddress("alice", "example.test")
        )
        error = self.assertRaises(AddressError, parse_path, b"\xffalice@example.test")
        self.assertEqual(str(error), "address is not valid UTF-8")

    def test_path_limit(self) -> None:
        """A path of exactly 256 octets with its brackets is accepted, one
        octet more is not (RFC 5321 4.5.3.1.3)."""
        domain = ".".join(["a" * 63] * 3) + "."
        at_limit = "<x@" + domain + "b" * (limits.PATH - 2 - 2 - len(domain)) + ">"
        self.assertEqual(len(at_limit), limits.PATH)
        self.assertIsNotNone(parse_path(at_limit))
        over = at_limit[:-1] + "b>"
        error = self.assertRaises(AddressError, parse_path, over)
        self.assertEqual(str(error), "address too long")

    def test_local_part_limit(self) -> None:
        """A local part of 64 octets is accepted, 65 is not (RFC 5321
        4.5.3.1.1)."""
        local = "x" * limits.LOCAL_PART
        self.assertEqual(parse_path(local + "@example.test").local, local)
        error = self.assertRaises(AddressError, parse_path, local + "x@example.test")
        self.assertEqual(str(error), "local part too long")

    def test_quoted_address_is_not_a_user(self) -> None:
        """C{"bob@evil"@ours} cannot be turned into bob's mailbox: its local
        part keeps the C{@} and is not a safe mailbox name."""
        address = parse_path('"bob@evil"@example.test')
        self.assertEqual(address.local, "bob@evil")
        self.assertFalse(is_safe_mailbox_name(address.local))

    @given(st.text(max_size=300))
    def test_any_text(self, text: str) -> None:
        """Whatever a client sends, the answer is an address, C{None} or an
        L{AddressError}; and an address always survives a round trip."""
        try:
            address = parse_path(text)
        except AddressError:
            return
        if address is not None:
            self.assertEqual(parse_path(str(address)), address)

    @given(st.binary(max_size=300))
    def test_any_bytes(self, data: bytes) -> None:
        """Arbitrary bytes off the wire never raise anything but
        L{AddressError}."""
        try:
            parse_path(data)
        except AddressError:
            pass


class ParseAddressTests(SynchronousTestCase):
    """Addresses written by an administrator, in the config or on the command line."""

    def test_valid(self) -> None:
        """A plain address is parsed like an SMTP path."""
        self.assertEqual(
            parse_address("Alice@Example.TEST"), MailAddress("alice", "example.test")
        )
        self.assertEqual(
            parse_address('"a b"@example.test'), MailAddress("a b", "example.test")
        )

    def test_invalid(self) -> None:
        """The same hostile inputs are refused in the same way."""
        for text, reason in INVALID_PATHS:
            if text.startswith(("<", "@")) or text.endswith(">"):
                continue
            with self.subTest(text=text):
                error = self.assertRaises(AddressError, parse_address, text)
                self.assertIn(reason, str(error))

    def test_no_null_path_or_route(self) -> None:
        """An administrator's address is never empty, bracketed or routed:
        those are SMTP syntax, not addresses."""
        error = self.assertRaises(AddressError, parse_address, "")
        self.assertEqual(str(error), "empty address")
        self.assertRaises(AddressError, parse_address, "<>")
        self.assertRaises(AddressError, parse_address, "<alice@example.test>")
        self.assertRaises(AddressError, parse_address, "@relay.test:alice@example.test")


class MailAddressTests(SynchronousTestCase):
    """The normalised address value."""

    def test_str(self) -> None:
        """An address prints as it goes on the wire, quoted only when it
        must be."""
        self.assertEqual(str(MailAddress("alice", "x.test")), "alice@x.test")
        self.assertEqual(str(MailAddress("a b", "example.test")), '"a b"@example.test')
        self.assertEqual(
            str(MailAddress("bob@evil", "example.test")), '"bob@evil"@example.test'
        )
        self.assertEqual(
            str(MailAddress('a"b\\c', "example.test")), '"a\\"b\\\\c"@example.test'
        )
        self.assertEqual(str(MailAddress("a..b", "x.test")), '"a..b"@x.test')

    def test_round_trip(self) -> None:
        """Printing and re-parsing any accepted address gives it back
        unchanged, so addresses can be stored as strings."""
        for text, _, _ in VALID_PATHS:
            with self.subTest(text=text):
                address = parse_path(text)
                self.assertEqual(parse_path(str(address)), address)
                self.assertEqual(parse_address(str(address)), address)

    @given(st.text(PRINTABLE_ASCII, min_size=1, max_size=30))
    def test_quoted_round_trip(self, local: str) -> None:
        """Any printable ASCII local part survives quoting and parsing."""
        address = MailAddress(local.lower(), "example.test")
        self.assertEqual(parse_path(str(address)), address)

    def test_is_literal(self) -> None:
        """Address literals are told apart from domain names."""
        self.assertTrue(parse_path("a@[192.0.2.1]").is_literal)
        self.assertTrue(parse_path("a@[IPv6:::1]").is_literal)
        self.assertFalse(parse_path("a@example.test").is_literal)

    def test_value(self) -> None:
        """Addresses compare, hash and sort by value, so they work as keys
        and in sorted listings."""
        self.assertEqual(parse_path("A@x.test"), parse_path("a@X.TEST"))
        self.assertEqual(len({parse_path("A@x.test"), parse_path("a@X.TEST")}), 1)
        self.assertEqual(
            sorted([MailAddress("b", "x.test"), MailAddress("a", "y.test")]),
            [MailAddress("a", "y.test"), MailAddress("b", "x.test")],
        )


class SafeMailboxNameTests(SynchronousTestCase):
    """Which local parts may ever become a directory under the mail store."""

    SAFE = ["alice", "a", "0", "first.last", "a+tag", "a_b-c", "x" * 64, "a.", "-a"]
    UNSAFE = [
        "",
        ".",
        "..",
        ".alice",
        "../x",
        "a/../b",
        "a..b",
        "a/b",
        "a\\b",
        "Alice",
        "user%other",
        "bob@evil",
        "a b",
        "alice\n",
        "alice\x00",
        "x" * 65,
        "jörg",
        "ａlice",  # full-width a
        "٣",  # Arabic-Indic digit three
        "~alice",
    ]

    def test_safe(self) -> None:
        """Ordinary user names are allowed."""
        for name in self.SAFE:
            with self.subTest(name=name):
                self.assertTrue(is_safe_mailbox_name(name))

    def test_unsafe(self) -> None:
        """Anything that could escape the maildir tree, collide with a
        Maildir++ folder or look like another user is refused."""
        for name in self.UNSAFE:
            with self.subTest(name=name):
                self.assertFalse(is_safe_mailbox_name(name))


class NormalizeDomainTests(SynchronousTestCase):
    """The canonical form our domains and recipients are compared in."""

    def test_normal_form(self) -> None:
        """Case, one trailing dot and Unicode are normalised away."""
        self.assertEqual(normalize_domain("Example.TEST."), "example.test")
        self.assertEqual(normalize_domain("bücher.example"), "xn--bcher-kva.example")
        self.assertEqual(normalize_domain("BÜCHER.example"), "xn--bcher-kva.example")
        self.assertEqual(
            normalize_domain("XN--bcher-kva.example"), "xn--bcher-kva.example"
        )

    def test_idempotent(self) -> None:
        """Normalising twice changes nothing, so stored domains compare equal."""
        for domain in ["Example.TEST.", "bücher.example", "[192.0.2.1]", "[IPv6:::1]"]:
            with self.subTest(domain=domain):
                once = normalize_domain(domain)
                self.assertEqual(normalize_domain(once), once)

    def test_invalid(self) -> None:
        """Names DNS cannot have are refused with a reason."""
        for domain, reason in [
            ("", "empty domain"),
            (".", "empty domain"),
            ("example.test..", "empty label"),
            ("ex ample.test", "invalid domain"),
            ("exa\x00mple.test", "invalid domain"),
            ("a" * 64 + ".test", "domain label too long"),
            (".".join(["a" * 63] * 4) + ".test", "domain too long"),
            ("10.0.0.1", "numeric domain"),
        ]:
            with self.subTest(domain=domain):
                error = self.assertRaises(AddressError, normalize_domain, domain)
                self.assertIn(reason, str(error))

    def test_domain_limit(self) -> None:
        """A domain of 255 octets is accepted, 256 is not (RFC 5321
        4.5.3.1.2)."""
        at_limit = ".".join(["a" * 63] * 3) + "." + "b" * (limits.DOMAIN - 3 * 64)
        self.assertEqual(len(at_limit), limits.DOMAIN)
        self.assertEqual(normalize_domain(at_limit), at_limit)
        error = self.assertRaises(AddressError, normalize_domain, at_limit + "b")
        self.assertEqual(str(error), "domain too long")

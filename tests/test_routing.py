"""
Tests for L{mailsys.routing}: which recipients are ours and where their
mail goes.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailsys.addresses import parse_address
from mailsys.routing import (
    MAX_ALIAS_DEPTH,
    AliasLoop,
    NotOurDomain,
    Router,
    UnknownRecipient,
)

USERS = {"alice@example.test", "bob@example.test", "carol@other.test"}


def router(aliases=None) -> Router:
    return Router(
        ["example.test", "other.test"], lambda a: str(a) in USERS, aliases or {}
    )


def a(text: str):
    return parse_address(text)


class RouterTests(SynchronousTestCase):
    def test_user(self):
        """A user of our domain is delivered to that user's mailbox."""
        route = router().resolve(a("alice@example.test"))
        self.assertEqual(route.local, (a("alice@example.test"),))
        self.assertEqual(route.remote, ())

    def test_unknown_user(self):
        """Our domain, no such user: refused as unknown."""
        self.assertRaises(UnknownRecipient, router().resolve, a("zed@example.test"))

    def test_foreign_domain(self):
        """A foreign domain is never ours (no open relay)."""
        self.assertRaises(NotOurDomain, router().resolve, a("alice@elsewhere.example"))

    def test_address_literal(self):
        """An address literal is never ours, even for our own IP."""
        self.assertRaises(NotOurDomain, router().resolve, a("alice@[127.0.0.1]"))

    def test_alias_fan_out(self):
        """An alias expands to several users, each once."""
        r = router(
            {
                "team@example.test": ["alice@example.test", "bob@example.test"],
                "all@example.test": ["team@example.test", "alice@example.test"],
            }
        )
        route = r.resolve(a("all@example.test"))
        self.assertEqual(route.local, (a("alice@example.test"), a("bob@example.test")))

    def test_alias_to_foreign_address(self):
        """An alias pointing to another domain is a remote target."""
        r = router({"fwd@example.test": ["someone@elsewhere.example"]})
        route = r.resolve(a("fwd@example.test"))
        self.assertEqual(route.remote, (a("someone@elsewhere.example"),))

    def test_alias_cycle_terminates(self):
        """Two aliases pointing at each other and a user end, delivering once."""
        r = router(
            {
                "x@example.test": ["y@example.test", "alice@example.test"],
                "y@example.test": ["x@example.test"],
            }
        )
        self.assertEqual(r.resolve(a("x@example.test")).local, (a("alice@example.test"),))

    def test_alias_depth_limit(self):
        """An alias chain deeper than the limit is refused as a loop."""
        chain = {
            f"l{i}@example.test": [f"l{i + 1}@example.test"]
            for i in range(MAX_ALIAS_DEPTH + 2)
        }
        chain[f"l{MAX_ALIAS_DEPTH + 2}@example.test"] = ["alice@example.test"]
        self.assertRaises(AliasLoop, router(chain).resolve, a("l0@example.test"))

    def test_alias_to_missing_user(self):
        """An alias whose target user does not exist is refused, not lost."""
        r = router({"x@example.test": ["ghost@example.test"]})
        self.assertRaises(UnknownRecipient, r.resolve, a("x@example.test"))

    def test_alias_reload(self):
        """set_aliases replaces the table (SIGHUP reload)."""
        r = router()
        self.assertRaises(UnknownRecipient, r.resolve, a("info@example.test"))
        r.set_aliases({"info@example.test": ["bob@example.test"]})
        self.assertEqual(r.resolve(a("info@example.test")).local, (a("bob@example.test"),))


class SpecialAddressTests(SynchronousTestCase):
    def test_postmaster_always_exists(self):
        """postmaster@ every domain is accepted without a user or alias
        (RFC 5321 4.5.1), and an alias for it wins."""
        self.assertEqual(
            router().resolve(a("postmaster@other.test")).local,
            (a("postmaster@other.test"),),
        )
        r = router({"postmaster@example.test": ["alice@example.test"]})
        self.assertEqual(
            r.resolve(a("Postmaster@example.test")).local, (a("alice@example.test"),)
        )

    def test_catch_all(self):
        """A domain's catch-all takes what no user or alias takes; users
        and aliases still win, and other domains are unaffected."""
        r = router(
            {"@example.test": ["bob@example.test"], "info@example.test": ["alice@example.test"]}
        )
        self.assertEqual(r.resolve(a("anything@example.test")).local, (a("bob@example.test"),))
        self.assertEqual(r.resolve(a("alice@example.test")).local, (a("alice@example.test"),))
        self.assertEqual(r.resolve(a("info@example.test")).local, (a("alice@example.test"),))
        self.assertRaises(UnknownRecipient, r.resolve, a("anything@other.test"))

    def test_catch_all_forward(self):
        """A catch-all may forward to another domain."""
        r = router({"@other.test": ["me@elsewhere.example"]})
        self.assertEqual(r.resolve(a("x@other.test")).remote, (a("me@elsewhere.example"),))

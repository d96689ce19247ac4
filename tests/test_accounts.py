"""
Tests for L{mailsys.accounts}: the user directory every protocol logs in
through, and its C{twisted.cred} checker and realm.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from pathlib import Path
from typing import Any, Callable

from argon2 import PasswordHasher, profiles
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailsys.accounts import (
    AccountError,
    IMailUser,
    MailRealm,
    PasswordChecker,
    UserStore,
    maildir_path,
)
from mailsys.addresses import MailAddress


class CountingHasher(PasswordHasher):
    """The cheapest argon2 parameters, counting how often each call is made."""

    def __init__(self) -> None:
        cheap = profiles.CHEAPEST
        super().__init__(
            time_cost=cheap.time_cost,
            memory_cost=cheap.memory_cost,
            parallelism=cheap.parallelism,
            hash_len=cheap.hash_len,
            salt_len=cheap.salt_len,
            type=cheap.type,
        )
        self.hashed = 0
        self.verified = 0

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        self.hashed += 1
        return super().hash(password, salt=salt)

    def verify(self, hash: str | bytes, password: str | bytes) -> Any:
        self.verified += 1
        return super().verify(hash, password)


class ImmediateThreadPool:
    """A thread pool stand-in that runs work when L{run} is called."""

    def __init__(self) -> None:
        self.pending: list[Callable[[], None]] = []

    def callInThreadWithCallback(
        self,
        onResult: Callable[[bool, Any], None],
        f: Callable[..., Any],
        *a: Any,
        **kw: Any,
    ) -> None:
        def work() -> None:
            try:
                result = f(*a, **kw)
            except BaseException:
                onResult(False, Failure())
            else:
                onResult(True, result)

        self.pending.append(work)

    def run(self) -> None:
        while self.pending:
            self.pending.pop(0)()


class FakeReactor:
    """Just what L{deferToThreadPool} needs: C{callFromThread}, C{getThreadPool}."""

    def __init__(self) -> None:
        self.pool = ImmediateThreadPool()

    def callFromThread(self, f: Callable[..., Any], *a: Any, **kw: Any) -> None:
        f(*a, **kw)

    def getThreadPool(self) -> ImmediateThreadPool:
        return self.pool


class StoreMixin:
    """A fresh store in a temporary directory, with cheap hashing."""

    mktemp: Callable[[], str]

    def make_store(self, domains: Any = ("example.test",)) -> UserStore:
        self.directory = Path(self.mktemp())
        self.path = self.directory / "state" / "users.json"
        self.hasher = CountingHasher()
        return UserStore(self.path, domains, hasher=self.hasher)


class UserStoreTests(StoreMixin, SynchronousTestCase):
    """Adding, changing, removing and listing users."""

    def test_add(self) -> None:
        """An added user exists, is listed and can log in with their password."""
        store = self.make_store()
        alice = MailAddress("alice", "example.test")
        self.assertEqual(store.add("alice@example.test", "s3cret"), alice)
        self.assertTrue(store.exists("alice@example.test"))
        self.assertTrue(store.exists(MailAddress("alice", "example.test")))
        self.assertEqual(store.addresses(), ["alice@example.test"])
        self.assertEqual(store.verify("alice@example.test", "s3cret"), alice)

    def test_case_insensitive(self) -> None:
        """Users are found whatever the case the address is written in."""
        store = self.make_store()
        store.add("Alice@Example.TEST", "pw")
        self.assertEqual(store.addresses(), ["alice@example.test"])
        self.assertTrue(store.exists("ALICE@example.test"))
        alice = MailAddress("alice", "example.test")
        self.assertEqual(store.verify("ALICE@EXAMPLE.test", "pw"), alice)

    def test_sorted(self) -> None:
        """The listing is sorted, whatever order users were added in."""
        store = self.make_store(domains=("example.test", "other.test"))
        for address in ["carol@example.test", "bob@other.test", "alice@example.test"]:
            store.add(address, "pw")
        self.assertEqual(
            store.addresses(),
            ["alice@example.test", "bob@other.test", "carol@example.test"],
        )

    def test_duplicate(self) -> None:
        """Adding an existing user (in any case) is refused and keeps their
        password."""
        store = self.make_store()
        store.add("alice@example.test", "first")
        for address in ["alice@example.test", "ALICE@example.test"]:
            error = self.assertRaises(AccountError, store.add, address, "second")
            self.assertEqual(str(error), "user alice@example.test already exists")
        self.assertIsNotNone(store.verify("alice@example.test", "first"))
        self.assertIsNone(store.verify("alice@example.test", "second"))

    def test_invalid_names(self) -> None:
        """Addresses that could escape the mail store or impersonate a user
        are refused, and nothing is written."""
        store = self.make_store()
        for address in [
            "../x@example.test",
            "a/../../x@example.test",
            "a\x00b@example.test",
            "alice\r\n@example.test",
            '"bob@evil"@example.test',
            '"../x"@example.test',
            "user%other@example.test",
            ".hidden@example.test",
            "a..b@example.test",
            "alice@[192.0.2.1]",
            "alice",
            "",
        ]:
            with self.subTest(address=address):
                error = self.assertRaises(AccountError, store.add, address, "pw")
                self.assertNotIn("\n", str(error))
                self.assertNotIn("\x00", str(error))
        self.assertFalse(self.path.exists())
        self.assertEqual(self.hasher.hashed, 0)

    def test_foreign_domain(self) -> None:
        """Users can only be added in our own domains."""
        store = self.make_store()
        error = self.assertRaises(AccountError, store.add, "bob@example.org", "pw")
        self.assertEqual(
            str(error), "example.org is not one of our domains (example.test)"
        )

    def test_any_domain(self) -> None:
        """Without a list of domains, any domain is accepted."""
        store = self.make_store(domains=None)
        store.add("bob@example.org", "pw")
        self.assertTrue(store.exists("bob@example.org"))

    def test_international_domain(self) -> None:
        """Our domains are compared in their ASCII form, however written."""
        store = self.make_store(domains=["Bücher.example"])
        self.assertEqual(
            str(store.add("alice@bücher.example", "pw")), "alice@xn--bcher-kva.example"
        )
        self.assertTrue(store.exists("alice@xn--bcher-kva.example"))

    def test_empty_password(self) -> None:
        """A user cannot be given an empty password."""
        store = self.make_store()
        error = self.assertRaises(AccountError, store.add, "alice@example.test", "")
        self.assertEqual(str(error), "empty password")
        self.assertFalse(store.exists("alice@example.test"))

    def test_remove(self) -> None:
        """A removed user no longer exists and can no longer log in."""
        store = self.make_store()
        store.add("alice@example.test", "pw")
        store.add("bob@example.test", "pw")
        store.remove("Alice@example.test")
        self.assertFalse(store.exists("alice@example.test"))
        self.assertIsNone(store.verify("alice@example.test", "pw"))
        self.assertEqual(store.addresses(), ["bob@example.test"])

    def test_remove_unknown(self) -> None:
        """Removing a user who does not exist says so."""
        store = self.make_store()
        error = self.assertRaises(AccountError, store.remove, "nobody@example.test")
        self.assertEqual(str(error), "no such user: nobody@example.test")

    def test_remove_foreign_domain(self) -> None:
        """A user left over from a domain no longer configured can still be removed."""
        self.make_store()
        UserStore(self.path, ["old.test"], hasher=self.hasher).add("bob@old.test", "pw")
        store = UserStore(self.path, ["example.test"], hasher=self.hasher)
        store.remove("bob@old.test")
        self.assertEqual(store.addresses(), [])

    def test_set_password(self) -> None:
        """After a password change only the new password works."""
        store = self.make_store()
        store.add("alice@example.test", "old")
        store.set_password("alice@example.test", "new")
        self.assertIsNone(store.verify("alice@example.test", "old"))
        self.assertIsNotNone(store.verify("alice@example.test", "new"))

    def test_set_password_unknown_or_empty(self) -> None:
        """A password cannot be set for an unknown user, nor set to nothing."""
        store = self.make_store()
        error = self.assertRaises(
            AccountError, store.set_password, "bob@example.test", "pw"
        )
        self.assertEqual(str(error), "no such user: bob@example.test")
        store.add("alice@example.test", "old")
        error = self.assertRaises(
            AccountError, store.set_password, "alice@example.test", ""
        )
        self.assertEqual(str(error), "empty password")
        self.assertIsNotNone(store.verify("alice@example.test", "old"))

    def test_exists_bad_input(self) -> None:
        """Asking about nonsense is never an error: it is just not a user."""
        store = self.make_store()
        store.add("alice@example.test", "pw")
        for address in [
            "",
            "alice",
            "alice@",
            "a\x00@example.test",
            b"alice@example.test",
            None,
            7,
        ]:
            with self.subTest(address=address):
                self.assertFalse(store.exists(address))  # type: ignore[arg-type]

    def test_no_file(self) -> None:
        """Before the first user is added there are simply no users."""
        store = self.make_store()
        self.assertEqual(store.addresses(), [])
        self.assertFalse(store.exists("alice@example.test"))
        self.assertIsNone(store.verify("alice@example.test", "pw"))


class FileTests(StoreMixin, SynchronousTestCase):
    """The users file on disk: format, permissions, atomicity, sharing."""

    def test_format(self) -> None:
        """The file is versioned JSON with one argon2id hash per user, never
        the password itself."""
        store = self.make_store()
        store.add("alice@example.test", "s3cret")
        document = json.loads(self.path.read_text())
        self.assertEqual(document["version"], 1)
        self.assertEqual(list(document["users"]), ["alice@example.test"])
        encoded = document["users"]["alice@example.test"]["password"]
        self.assertTrue(encoded.startswith("$argon2id$"))
        self.assertNotIn("s3cret", self.path.read_text())

    def test_default_parameters(self) -> None:
        """Without an injected hasher, passwords get argon2id with RFC 9106's
        low-memory parameters."""
        path = Path(self.mktemp()) / "users.json"
        UserStore(path, ["example.test"]).add("alice@example.test", "pw")
        users = json.loads(path.read_text())["users"]
        encoded = users["alice@example.test"]["password"]
        self.assertTrue(encoded.startswith("$argon2id$v=19$m=65536,t=3,p=4$"), encoded)

    def test_permissions(self) -> None:
        """Only the server's own user can read the hashes: the file is 0600
        in a 0700 directory."""
        store = self.make_store()
        store.add("alice@example.test", "pw")
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(self.path.parent.stat().st_mode), 0o700)

    def test_no_temporary_left(self) -> None:
        """A successful change leaves only users.json and its lock behind."""
        store = self.make_store()
        store.add("alice@example.test", "pw")
        self.assertEqual(
            sorted(os.listdir(self.path.parent)), ["users.json", "users.lock"]
        )

    def test_durable(self) -> None:
        """The new file and its directory entry are fsync'ed before a change
        returns, so a crash right after C{user add} does not lose the user."""
        store = self.make_store()
        synced: list[tuple[int, int]] = []
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            synced.append((st.st_dev, st.st_ino))
            real_fsync(fd)

        self.patch(os, "fsync", fsync)
        store.add("alice@example.test", "pw")
        identity = [
            (p.stat().st_dev, p.stat().st_ino) for p in (self.path, self.path.parent)
        ]
        self.assertEqual(synced, identity)

    def test_atomic(self) -> None:
        """If the final rename fails, the old file is untouched: readers see
        the old users or the new ones, never half a file."""
        store = self.make_store()
        store.add("alice@example.test", "pw")
        before = self.path.read_bytes()

        def fail(*args: object) -> None:
            raise OSError(28, "No space left on device")

        self.patch(os, "replace", fail)
        self.assertRaises(OSError, store.add, "bob@example.test", "pw")
        self.assertEqual(self.path.read_bytes(), before)

    def test_locked_while_writing(self) -> None:
        """Changes hold users.lock, so two C{mailsys user} commands run at
        once cannot lose each other's change."""
        store = self.make_store()
        held: list[bool] = []
        real_write = UserStore._write

        def write(self: UserStore, users: Any) -> Any:
            fd = os.open(self._lock_path, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(True)
            else:
                held.append(False)
            finally:
                os.close(fd)
            return real_write(self, users)

        self.patch(UserStore, "_write", write)
        store.add("alice@example.test", "pw")
        self.assertEqual(held, [True])

    def test_concurrent_stores(self) -> None:
        """A change made through one store (the CLI) is not lost by another
        that had read the file before (a second CLI), and a running server's
        store sees both at once."""
        first = self.make_store()
        second = UserStore(self.path, ["example.test"], hasher=self.hasher)
        server = UserStore(self.path, ["example.test"], hasher=self.hasher)
        self.assertEqual(second.addresses(), [])
        self.assertFalse(server.exists("alice@example.test"))
        first.add("alice@example.test", "pw")
        second.add("bob@example.test", "pw")
        self.assertEqual(server.addresses(), ["alice@example.test", "bob@example.test"])
        self.assertIsNotNone(server.verify("alice@example.test", "pw"))
        first.remove("alice@example.test")
        self.assertFalse(server.exists("alice@example.test"))

    def test_hand_edited(self) -> None:
        """A file edited by hand is picked up without a restart, with its
        addresses normalised."""
        store = self.make_store()
        store.add("alice@example.test", "pw")
        self.assertFalse(store.exists("bob@example.test"))
        document = json.loads(self.path.read_text())
        document["users"]["Bob@Example.TEST"] = document["users"]["alice@example.test"]
        self.path.write_text(json.dumps(document))
        self.assertTrue(store.exists("bob@example.test"))
        self.assertIsNotNone(store.verify("bob@example.test", "pw"))

    def test_corrupt(self) -> None:
        """A broken file is reported naming the file and the problem, and
        never overwritten by a change (that would lose every user)."""
        for content, problem in [
            ("{not json", "not valid JSON"),
            ('{"version": 2, "users": {}}', "unsupported format (expected version 1)"),
            ("[]", "unsupported format"),
            ('{"version": 1, "users": []}', "'users' is not a table"),
            (
                '{"version": 1, "users": {"../x@example.test": {"password": "x"}}}',
                "invalid local part",
            ),
            (
                '{"version": 1, "users": {"a%b@example.test": {"password": "x"}}}',
                "invalid user name",
            ),
            ('{"version": 1, "users": {"a@example.test": {}}}', "no password hash"),
            ('{"version": 1, "users": {"a@example.test": "x"}}', "no password hash"),
            (b"\xff\xfe".decode("latin-1"), "not valid JSON"),
        ]:
            with self.subTest(content=content):
                store = self.make_store()
                self.path.parent.mkdir(parents=True)
                self.path.write_text(content, "latin-1")
                error = self.assertRaises(AccountError, store.exists, "a@example.test")
                self.assertIn(str(self.path), str(error))
                self.assertIn(problem, str(error))
                self.assertRaises(AccountError, store.add, "z@example.test", "pw")
                self.assertEqual(self.path.read_text("latin-1"), content)

    def test_corrupt_then_fixed(self) -> None:
        """Once the file is repaired, the store works again."""
        store = self.make_store()
        store.add("alice@example.test", "pw")
        good = self.path.read_bytes()
        self.path.write_text("{")
        self.assertRaises(AccountError, store.exists, "alice@example.test")
        self.path.write_bytes(good)
        self.assertTrue(store.exists("alice@example.test"))

    def test_other_fields_kept(self) -> None:
        """A password change keeps whatever else is stored for the user."""
        store = self.make_store()
        store.add("alice@example.test", "pw")
        document = json.loads(self.path.read_text())
        document["users"]["alice@example.test"]["quota"] = 1000
        self.path.write_text(json.dumps(document))
        store.set_password("alice@example.test", "new")
        entry = json.loads(self.path.read_text())["users"]["alice@example.test"]
        self.assertEqual(entry["quota"], 1000)


class VerifyTests(StoreMixin, SynchronousTestCase):
    """Password checks: right answers, no exceptions, no timing hints."""

    def setUp(self) -> None:
        self.store = self.make_store()
        self.store.add("alice@example.test", "s3cret")
        self.hasher.hashed = self.hasher.verified = 0

    def test_right_password(self) -> None:
        """The right password, as text or UTF-8 bytes, logs in."""
        alice = MailAddress("alice", "example.test")
        self.assertEqual(self.store.verify("alice@example.test", "s3cret"), alice)
        self.assertEqual(self.store.verify("alice@example.test", b"s3cret"), alice)

    def test_wrong(self) -> None:
        """Wrong passwords, unknown users and nonsense never log in and
        never raise."""
        for address, password in [
            ("alice@example.test", "wrong"),
            ("alice@example.test", "S3CRET"),
            ("alice@example.test", ""),
            ("alice@example.test", "s3cret\x00"),
            ("alice@example.test", None),
            ("alice@example.test", 12),
            ("alice@example.test", "\udcff"),
            ("bob@example.test", "s3cret"),
            ("alice", "s3cret"),
            ("alice@example.test\r\n", "s3cret"),
            ("", ""),
            (None, "s3cret"),
            (b"alice@example.test", "s3cret"),
        ]:
            with self.subTest(address=address, password=password):
                self.assertIsNone(self.store.verify(address, password))

    def test_unknown_user_same_work(self) -> None:
        """Unknown users, invalid names and unusable passwords cost one
        argon2 verification like a real user, so response time does not
        reveal who has an account."""
        for address, password in [
            ("alice@example.test", "wrong"),
            ("bob@example.test", "wrong"),
            ("../x@example.test", "wrong"),
            (None, "wrong"),
            ("alice@example.test", None),
        ]:
            with self.subTest(address=address):
                self.hasher.verified = 0
                self.store.verify(address, password)
                self.assertEqual(self.hasher.verified, 1)

    def test_damaged_hash(self) -> None:
        """A damaged hash in the file denies that user, without an error."""
        document = json.loads(self.path.read_text())
        document["users"]["alice@example.test"]["password"] = "not a hash"
        self.path.write_text(json.dumps(document))
        self.assertIsNone(self.store.verify("alice@example.test", "s3cret"))


class MaildirPathTests(SynchronousTestCase):
    """Where a user's mail lives."""

    def test_layout(self) -> None:
        """A user's maildir is <mail_dir>/<domain>/<localpart>."""
        self.assertEqual(
            maildir_path(Path("mail"), MailAddress("alice", "example.test")),
            Path("mail/example.test/alice"),
        )

    def test_unsafe(self) -> None:
        """An address that could not be a user never becomes a path."""
        for address in [
            MailAddress("../x", "example.test"),
            MailAddress("..", "example.test"),
            MailAddress("bob@evil", "example.test"),
            MailAddress("alice", "[192.0.2.1]"),
        ]:
            with self.subTest(address=address):
                self.assertRaises(AccountError, maildir_path, Path("mail"), address)


class PasswordCheckerTests(StoreMixin, SynchronousTestCase):
    """Logging in through twisted.cred, as SMTP AUTH, POP3 and IMAP do."""

    def setUp(self) -> None:
        self.store = self.make_store()
        self.store.add("alice@example.test", "s3cret")
        self.reactor = FakeReactor()
        self.checker = PasswordChecker(self.store, self.reactor)

    def login(self, username: Any, password: Any) -> Any:
        d = self.checker.requestAvatarId(UsernamePassword(username, password))
        self.reactor.pool.run()
        return d

    def test_interface(self) -> None:
        """The checker is a proper credentials checker for user names and passwords."""
        self.assertTrue(verifyObject(ICredentialsChecker, self.checker))
        self.assertEqual(
            [i.__name__ for i in self.checker.credentialInterfaces],
            ["IUsernamePassword"],
        )

    def test_success(self) -> None:
        """The right password gives the normalised address, whether the
        protocol passes text or bytes."""
        for username, password in [
            ("alice@example.test", "s3cret"),
            (b"alice@example.test", b"s3cret"),
            (b"Alice@Example.TEST", "s3cret"),
        ]:
            with self.subTest(username=username):
                d = self.login(username, password)
                self.assertEqual(self.successResultOf(d), "alice@example.test")

    def test_refused(self) -> None:
        """Wrong passwords, unknown users and undecodable names are all
        refused with UnauthorizedLogin, nothing else."""
        for username, password in [
            ("alice@example.test", "wrong"),
            ("bob@example.test", "s3cret"),
            (b"alice@example.test\xff", b"s3cret"),
            (b"\xff\xfe", b"s3cret"),
            ("alice", "s3cret"),
        ]:
            with self.subTest(username=username):
                d = self.login(username, password)
                self.failureResultOf(d, UnauthorizedLogin)

    def test_undecodable_same_work(self) -> None:
        """A user name that is not UTF-8 costs the same hash as any other
        failed login."""
        self.hasher.verified = 0
        self.failureResultOf(self.login(b"\xff@example.test", b"x"), UnauthorizedLogin)
        self.assertEqual(self.hasher.verified, 1)

    def test_hashing_in_thread_pool(self) -> None:
        """The slow hash runs in the thread pool, not the reactor thread:
        nothing is decided until the pool has done the work."""
        credentials = UsernamePassword(b"alice@example.test", b"s3cret")
        d = self.checker.requestAvatarId(credentials)
        self.assertNoResult(d)
        self.assertEqual(self.hasher.verified, 0)
        self.reactor.pool.run()
        self.assertEqual(self.successResultOf(d), "alice@example.test")

    def test_given_thread_pool(self) -> None:
        """An explicitly given thread pool is used instead of the reactor's."""
        pool = ImmediateThreadPool()
        checker = PasswordChecker(self.store, self.reactor, pool)
        d = checker.requestAvatarId(UsernamePassword(b"alice@example.test", b"s3cret"))
        self.reactor.pool.run()
        self.assertNoResult(d)
        pool.run()
        self.assertEqual(self.successResultOf(d), "alice@example.test")


class MailRealmTests(SynchronousTestCase):
    """Turning a logged-in address into a user with a maildir."""

    def setUp(self) -> None:
        self.realm = MailRealm(Path("mail"))

    def test_interface(self) -> None:
        """The realm is a proper twisted.cred realm."""
        self.assertTrue(verifyObject(IRealm, self.realm))

    def test_avatar(self) -> None:
        """A user's avatar knows their address and maildir."""
        for avatar_id in ["alice@example.test", b"alice@example.test"]:
            with self.subTest(avatar_id=avatar_id):
                interface, user, logout = self.realm.requestAvatar(
                    avatar_id, None, IMailUser
                )
                self.assertIs(interface, IMailUser)
                self.assertTrue(verifyObject(IMailUser, user))
                self.assertEqual(user.address, "alice@example.test")
                self.assertEqual(user.maildir, Path("mail/example.test/alice"))
                self.assertIsNone(logout())

    def test_other_interface(self) -> None:
        """Interfaces the realm does not provide are refused."""
        self.assertRaises(
            NotImplementedError,
            self.realm.requestAvatar,
            "alice@example.test",
            None,
            IRealm,
        )

    def test_registered_view(self) -> None:
        """A protocol's view (a POP3 mailbox, an IMAP account) is made from
        the user, and its logout is called at logout."""
        logged_out = []

        class View:
            def __init__(self, user):
                self.user = user

            def logout(self):
                logged_out.append(self.user.address)

        realm = MailRealm(Path("mail"), {IRealm: View})
        interface, view, logout = realm.requestAvatar(
            "bob@example.test", None, IRealm
        )
        self.assertIs(interface, IRealm)
        self.assertEqual(view.user.maildir, Path("mail/example.test/bob"))
        logout()
        self.assertEqual(logged_out, ["bob@example.test"])

    def test_unsafe_avatar_id(self) -> None:
        """An avatar id that is not a mailbox name never becomes a path."""
        for avatar_id in ['"../x"@example.test', "../x@example.test", "nonsense"]:
            with self.subTest(avatar_id=avatar_id):
                self.assertRaises(
                    AccountError, self.realm.requestAvatar, avatar_id, None, IMailUser
                )


class PortalTests(StoreMixin, SynchronousTestCase):
    """Checker and realm together, the way the protocols use them."""

    def test_login(self) -> None:
        """Logging in with the right password gives the user's maildir; a
        wrong one is refused."""
        store = self.make_store()
        store.add("alice@example.test", "s3cret")
        reactor = FakeReactor()
        realm = MailRealm(self.directory / "mail")
        portal = Portal(realm, [PasswordChecker(store, reactor)])
        right = UsernamePassword(b"alice@example.test", b"s3cret")
        d = portal.login(right, None, IMailUser)
        reactor.pool.run()
        _, user, _ = self.successResultOf(d)
        self.assertEqual(user.maildir, realm.mail_dir / "example.test" / "alice")
        wrong = UsernamePassword(b"alice@example.test", b"nope")
        d = portal.login(wrong, None, IMailUser)
        reactor.pool.run()
        self.failureResultOf(d, UnauthorizedLogin)

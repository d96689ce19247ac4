"""
Tests for L{mailsys.maildir}: the layout other mail programs read, the
durable all-or-nothing delivery behind every "250 OK", and the refusal of
mailbox names that would leave the mail root.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import threading
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailsys import maildir
from mailsys.maildir import DeliveryError, MaildirStore, unique_name

HOST = "mail.example.test"
BODY = b"Subject: hello\n\nHi Alice,\nlunch?\n"
PREFIX = b"Return-Path: <bob@example.org>\nReceived: from x by y\n"

# <secs>.M<usecs>P<pid>Q<counter>R<16 hex>.<host>,S=<size>,W=<wsize>
NAME = re.compile(
    r"(?P<secs>\d+)\.M(?P<usecs>\d+)P(?P<pid>\d+)Q(?P<counter>\d+)"
    r"R(?P<random>[0-9a-f]{16})\.(?P<host>[^,]+),S=(?P<size>\d+),W=(?P<wsize>\d+)\Z"
)


def newStore(case: SynchronousTestCase) -> MaildirStore:
    """A store under a fresh directory of the test."""
    return MaildirStore(Path(case.mktemp()) / "mail", HOST)


def failOnCall(case: SynchronousTestCase, name: str, n: int) -> list[int]:
    """
    Make C{os.<name>} fail with ENOSPC on its C{n}th call (counting from 1),
    as a full disk would.  Returns the list of call numbers seen.
    """
    real = getattr(os, name)
    calls: list[int] = []

    def fake(*args):
        calls.append(len(calls) + 1)
        if len(calls) == n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)

    case.patch(os, name, fake)
    return calls


def allFiles(root: Path) -> list[Path]:
    """Every regular file under C{root}."""
    return sorted(p for p in root.rglob("*") if p.is_file())


class UniqueNameTests(SynchronousTestCase):
    """Maildir file names that Dovecot and mutt parse."""

    def test_format(self) -> None:
        """
        A name has the maildir specification's parts and Dovecot's sizes,
        which POP3/IMAP clients see as the message size.
        """
        match = NAME.match(unique_name(HOST, 120, 125))
        self.assertIsNotNone(match)
        assert match is not None
        self.assertEqual(match["host"], HOST)
        self.assertEqual(int(match["pid"]), os.getpid())
        self.assertEqual((match["size"], match["wsize"]), ("120", "125"))
        self.assertEqual(len(match["usecs"]), 6)

    def test_hostEscaped(self) -> None:
        """
        A host name with C{/} or C{:} cannot make a path or fake the C{:2,}
        info part: they are written as C{\\057} and C{\\072}.
        """
        name = unique_name("a/b:c", 1, 2)
        self.assertIn(".a\\057b\\072c,S=1,W=2", name)
        self.assertNotIn("/", name)
        self.assertNotIn(":", name)

    def test_distinct(self) -> None:
        """Names made in the same instant still differ."""
        names = {unique_name(HOST, 1, 1) for _ in range(1000)}
        self.assertEqual(len(names), 1000)


class PathTests(SynchronousTestCase):
    """Where a mailbox lives, and which names are refused."""

    def test_layout(self) -> None:
        """
        A mailbox is C{<root>/<domain>/<localpart>}, as Dovecot's
        C{mail_location = maildir:<root>/%d/%n} expects.
        """
        store = newStore(self)
        self.assertEqual(
            store.path_for("alice@example.test"),
            store.root / "example.test" / "alice",
        )

    def test_caseFolded(self) -> None:
        """Mail for C{Alice@Example.TEST} goes to the same mailbox as alice's."""
        store = newStore(self)
        self.assertEqual(
            store.path_for("Alice@Example.TEST"), store.path_for("alice@example.test")
        )

    def test_usualNamesAccepted(self) -> None:
        """Ordinary local parts and domains of real users are accepted."""
        store = newStore(self)
        for address in [
            "a@b",
            "first.last+tag@mail.example-one.test",
            "x_y-z@123.example",
            "a" * 64 + "@example.test",
        ]:
            store.path_for(address)

    def test_hostileAddresses(self) -> None:
        """
        Names that would reach outside the mail root, into a hidden Maildir++
        folder, or into a file system oddity are refused with ValueError.
        """
        store = newStore(self)
        for address in [
            "../x@d",
            "a@../d",
            "..@d",
            ".@d",
            ".hidden@d",
            "a..b@d",
            "a/b@d",
            "a@d/e",
            "a@/d",
            "a\x00b@d",
            "a@d\x00",
            "a@d..e",
            "a@.d",
            "a@d.",
            "a@-d",
            "a@d-",
            "a@",
            "@d",
            "a",
            "",
            "a@b@c",
            "a b@d",
            "a\\b@d",
            "\u212a@d",  # KELVIN SIGN lower-cases to an ASCII "k"
            "a" * 65 + "@d",
            "a@" + "b" * 64,
            "a@" + ".".join(["b" * 63] * 5),
        ]:
            with self.assertRaises(ValueError, msg=repr(address)):
                store.path_for(address)
            with self.assertRaises(ValueError, msg=repr(address)):
                store.create(address)
        self.assertFalse(store.root.exists())

    def test_create(self) -> None:
        """
        Creating a mailbox makes C{cur/ new/ tmp/}, private to the server
        (mode 0700), and doing it again changes nothing.
        """
        store = newStore(self)
        mailbox = store.create("alice@example.test")
        self.assertEqual(mailbox, store.path_for("alice@example.test"))
        for name in ("cur", "new", "tmp"):
            mode = os.stat(mailbox / name).st_mode
            self.assertTrue(stat.S_ISDIR(mode))
            self.assertEqual(stat.S_IMODE(mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(mailbox).st_mode), 0o700)
        (mailbox / "cur" / "kept").write_bytes(b"x")
        self.assertEqual(store.create("alice@example.test"), mailbox)
        self.assertEqual((mailbox / "cur" / "kept").read_bytes(), b"x")

    def test_createRace(self) -> None:
        """Many threads creating the same mailbox at once all succeed."""
        store = newStore(self)
        errors: list[BaseException] = []
        barrier = threading.Barrier(8)

        def create() -> None:
            barrier.wait()
            try:
                MaildirStore(store.root, HOST).create("alice@example.test")
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=create) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])
        self.assertTrue((store.path_for("alice@example.test") / "tmp").is_dir())


class DeliverTests(SynchronousTestCase):
    """Delivery: what is on disk when a server says 250."""

    def test_content(self) -> None:
        """
        The delivered file holds the prefix and the message byte for byte,
        lands in C{new/} (where mail clients look for new mail) and nothing
        is left in C{tmp/}.
        """
        store = newStore(self)
        [path] = store.deliver(["alice@example.test"], io.BytesIO(BODY), PREFIX)
        mailbox = store.path_for("alice@example.test")
        self.assertEqual(path.parent, mailbox / "new")
        self.assertEqual(path.read_bytes(), PREFIX + BODY)
        self.assertEqual(allFiles(store.root), [path])
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_fromCurrentPosition(self) -> None:
        """
        The message is read from where the file stands, so a caller can skip
        what it has already consumed.
        """
        store = newStore(self)
        message = io.BytesIO(b"SKIPPED" + BODY)
        message.seek(7)
        [path] = store.deliver(["alice@example.test"], message)
        self.assertEqual(path.read_bytes(), BODY)

    def test_sizes(self) -> None:
        """
        The name's C{S=} is the file size and C{W=} the size with CRLF line
        endings: the sizes POP3 LIST and IMAP RFC822.SIZE report.
        """
        store = newStore(self)
        [path] = store.deliver(["alice@example.test"], io.BytesIO(BODY), PREFIX)
        match = NAME.match(path.name)
        self.assertIsNotNone(match)
        assert match is not None
        size = len(PREFIX + BODY)
        self.assertEqual(int(match["size"]), size)
        self.assertEqual(int(match["size"]), path.stat().st_size)
        crlf = (PREFIX + BODY).replace(b"\n", b"\r\n")
        self.assertEqual(int(match["wsize"]), len(crlf))
        self.assertEqual(match["host"], HOST)

    def test_severalMailboxesLargeMessage(self) -> None:
        """
        A message bigger than one read, sent to several people, arrives
        whole in each mailbox, in the order of the recipients.
        """
        store = newStore(self)
        body = bytes(range(256)) * 1000 + b"\n"  # 256 001 bytes, several chunks
        recipients = ["a@example.test", "b@example.test", "c@other.test"]
        paths = store.deliver(recipients, io.BytesIO(body), PREFIX)
        self.assertEqual(len(paths), 3)
        for address, path in zip(recipients, paths):
            self.assertEqual(path.parent, store.path_for(address) / "new")
            self.assertEqual(path.read_bytes(), PREFIX + body)
        self.assertEqual(len({p.name for p in paths}), 3)

    def test_duplicateRecipient(self) -> None:
        """
        A person named twice among the recipients (in any case) gets one
        copy, and each recipient is still given its file.
        """
        store = newStore(self)
        paths = store.deliver(
            ["alice@example.test", "bob@example.test", "ALICE@example.test"],
            io.BytesIO(BODY),
        )
        self.assertEqual(paths[0], paths[2])
        self.assertEqual(len(store.messages("alice@example.test")), 1)

    def test_noRecipients(self) -> None:
        """Delivering to nobody stores nothing."""
        store = newStore(self)
        self.assertEqual(store.deliver([], io.BytesIO(BODY)), [])
        self.assertFalse(store.root.exists())

    def test_concurrent(self) -> None:
        """
        200 deliveries to one mailbox from 8 threads at once give 200
        separate messages: none overwrites another.
        """
        store = newStore(self)
        errors: list[BaseException] = []
        barrier = threading.Barrier(8)

        def deliverMany(worker: int) -> None:
            barrier.wait()
            for i in range(25):
                try:
                    store.deliver(
                        ["alice@example.test"], io.BytesIO(b"%d-%d\n" % (worker, i))
                    )
                except BaseException as e:
                    errors.append(e)

        threads = [
            threading.Thread(target=deliverMany, args=(n,)) for n in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])
        paths = store.messages("alice@example.test")
        self.assertEqual(len(paths), 200)
        self.assertEqual(len({p.read_bytes() for p in paths}), 200)

    def test_failureLeavesNothing(self) -> None:
        """
        When the disk fills while the second of three copies is synced, the
        sender is told the delivery failed and no mailbox shows the message,
        not even the first, whose copy was complete: mail is never half
        delivered.
        """
        store = newStore(self)
        recipients = ["a@example.test", "b@example.test", "c@example.test"]
        for address in recipients:
            store.create(address)
        calls = failOnCall(self, "fsync", 2)
        error = self.assertRaises(
            DeliveryError, store.deliver, recipients, io.BytesIO(BODY)
        )
        self.assertEqual(len(calls), 2)
        self.assertIn("b@example.test", str(error))
        self.assertIn(os.strerror(errno.ENOSPC), str(error))
        self.assertNotIn("\n", str(error))
        self.assertEqual(allFiles(store.root), [])

    def test_renameFailureLeavesNothing(self) -> None:
        """
        A failure while moving the copies into C{new/} withdraws the copies
        already moved: the first mailbox does not keep a message the sender
        was told failed (and would send again).
        """
        store = newStore(self)
        recipients = ["a@example.test", "b@example.test", "c@example.test"]
        calls = failOnCall(self, "rename", 2)
        self.assertRaises(DeliveryError, store.deliver, recipients, io.BytesIO(BODY))
        self.assertEqual(len(calls), 2)
        self.assertEqual(allFiles(store.root), [])
        for address in recipients:
            self.assertEqual(store.messages(address), [])

    def test_directorySyncFailureLeavesNothing(self) -> None:
        """
        If C{new/} cannot be synced, the renamed copies may not survive a
        crash, so the delivery fails and the copies are withdrawn.
        """
        store = newStore(self)
        recipients = ["a@example.test", "b@example.test"]
        for address in recipients:
            store.create(address)
        # Two file syncs, then the first directory sync fails.
        failOnCall(self, "fsync", 3)
        self.assertRaises(DeliveryError, store.deliver, recipients, io.BytesIO(BODY))
        self.assertEqual(allFiles(store.root), [])

    def test_unsafeAddress(self) -> None:
        """
        An unsafe recipient address fails the whole delivery with a
        L{DeliveryError} before anything is written.
        """
        store = newStore(self)
        self.assertRaises(
            DeliveryError,
            store.deliver,
            ["alice@example.test", "../x@example.test"],
            io.BytesIO(BODY),
        )
        self.assertFalse(store.root.exists())

    def test_fsyncCalled(self) -> None:
        """
        The message file and the C{new/} directory are both synced before
        delivery returns: that is what makes "250 OK" survive a power cut.
        """
        store = newStore(self)
        mailbox = store.create("alice@example.test")
        synced: list[str] = []
        realFsync = os.fsync

        def fsync(fd: int) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            realFsync(fd)

        self.patch(os, "fsync", fsync)
        [path] = store.deliver(["alice@example.test"], io.BytesIO(BODY))
        expected = [mailbox / "tmp" / path.name, mailbox / "new"]
        self.assertEqual(synced, [str(p.resolve()) for p in expected])

    def test_newMailboxSynced(self) -> None:
        """
        A mailbox created by its first delivery has its directory entries
        synced too, or a crash could forget the C{new/} holding the message.
        """
        store = newStore(self)
        store.root.mkdir(parents=True)
        synced: list[str] = []
        realFsync = os.fsync

        def fsync(fd: int) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            realFsync(fd)

        self.patch(os, "fsync", fsync)
        store.deliver(["alice@example.test"], io.BytesIO(BODY))
        mailbox = store.path_for("alice@example.test").resolve()
        for directory in (mailbox, mailbox.parent, store.root.resolve()):
            self.assertIn(str(directory), synced)


class MessagesTests(SynchronousTestCase):
    """Listing a mailbox, as the CLI and tests see it."""

    def test_crashedDeliveryInvisible(self) -> None:
        """
        A file left in C{tmp/} by a crashed delivery is never shown as a
        message, and a later delivery does not move it into C{new/}.
        """
        store = newStore(self)
        mailbox = store.create("alice@example.test")
        leftover = mailbox / "tmp" / unique_name(HOST, 4, 5)
        leftover.write_bytes(b"half")
        self.assertEqual(store.messages("alice@example.test"), [])
        [path] = store.deliver(["alice@example.test"], io.BytesIO(BODY))
        self.assertEqual(store.messages("alice@example.test"), [path])
        self.assertEqual(os.listdir(mailbox / "new"), [path.name])
        self.assertTrue(leftover.exists())

    def test_newAndCur(self) -> None:
        """
        Messages already seen by a client (moved to C{cur/} with flags) are
        listed with the new ones, sorted by name; dot files are not messages.
        """
        store = newStore(self)
        first, second = (
            store.deliver(["alice@example.test"], io.BytesIO(BODY))[0] for _ in range(2)
        )
        seen = first.parent.parent / "cur" / (first.name + ":2,S")
        os.rename(first, seen)
        (first.parent / ".hidden").write_bytes(b"")
        self.assertEqual(store.messages("alice@example.test"), [seen, second])

    def test_missingMailbox(self) -> None:
        """A mailbox nobody wrote to yet is empty, not an error."""
        self.assertEqual(newStore(self).messages("nobody@example.test"), [])


class DeliverDeferredTests(TestCase):
    """Delivery from the reactor, without blocking it."""

    def test_firesWithPaths(self) -> None:
        """
        The Deferred fires, back in the reactor thread, with the delivered
        files once they are on disk.
        """
        store = newStore(self)
        mainThread = threading.current_thread()
        deliveredIn: list[threading.Thread] = []
        realDeliver = store.deliver

        def deliver(*args):
            deliveredIn.append(threading.current_thread())
            return realDeliver(*args)

        self.patch(store, "deliver", deliver)
        recipients = ["alice@example.test", "bob@example.test"]
        d = store.deliver_deferred(reactor, recipients, io.BytesIO(BODY), PREFIX)

        def check(paths: list[Path]) -> None:
            self.assertIs(threading.current_thread(), mainThread)
            self.assertIsNot(deliveredIn[0], mainThread)
            self.assertEqual(len(paths), 2)
            for path in paths:
                self.assertEqual(path.read_bytes(), PREFIX + BODY)

        return d.addCallback(check)

    def test_failure(self) -> None:
        """A failed delivery fails the Deferred with L{DeliveryError}."""
        store = newStore(self)
        failOnCall(self, "rename", 1)
        d = store.deliver_deferred(reactor, ["alice@example.test"], io.BytesIO(BODY))
        return self.assertFailure(d, DeliveryError)


class FsyncDirectoryTests(SynchronousTestCase):
    """The helper other durable stores (users, queue) rely on."""

    def test_syncsTheDirectory(self) -> None:
        """The directory itself is synced, and its descriptor closed."""
        directory = Path(self.mktemp())
        directory.mkdir()
        synced: list[str] = []
        realFsync = os.fsync

        def fsync(fd: int) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            realFsync(fd)

        self.patch(os, "fsync", fsync)
        before = len(os.listdir("/proc/self/fd"))
        maildir.fsync_directory(directory)
        self.assertEqual(synced, [str(directory.resolve())])
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)

"""
Tests for the mailbox views of L{mailsys.maildir}: Maildir++ folders,
flags in file names, persistent UIDs and the cache that POP3, IMAP and the
command-line tools share -- one store, many views.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailsys import maildir
from mailsys.maildir import (
    CHUNK_SIZE,
    DeliveryError,
    Folder,
    FolderError,
    KeywordLimit,
    Mailbox,
    MaildirStore,
    MessageGone,
    folder_levels,
)

HOST = "mail.example.test"
ALICE = "alice@example.test"
HEADERS = b"Subject: hello\nFrom: bob@example.org\n\n"
BODY = HEADERS + b"Hi Alice,\nlunch?\n"


def newMailbox(case: SynchronousTestCase) -> tuple[MaildirStore, Mailbox]:
    """A store under a fresh directory of the test, and Alice's mailbox in it."""
    store = MaildirStore(Path(case.mktemp()) / "mail", HOST)
    store.create(ALICE)
    return store, Mailbox(store, ALICE)


def deliver(store: MaildirStore, body: bytes = BODY) -> Path:
    """Deliver C{body} to Alice as SMTP does."""
    return store.deliver([ALICE], io.BytesIO(body))[0]


def tree(root: Path) -> list[str]:
    """Every path under C{root}, relative, sorted: to see what was created."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def failOnCall(case: SynchronousTestCase, name: str, n: int) -> list[int]:
    """Make C{os.<name>} fail with ENOSPC on its C{n}th call, as a full disk."""
    real = getattr(os, name)
    calls: list[int] = []

    def fake(*args, **kwargs):
        calls.append(len(calls) + 1)
        if len(calls) == n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    case.patch(os, name, fake)
    return calls


def recordFileAccess(case: SynchronousTestCase) -> list[tuple[str, str]]:
    """
    Record C{("open", path)} for every C{open} and C{os.open} and
    C{("stat", path)} for every C{os.stat} from now on, so a test can tell
    which files were read.
    """
    seen: list[tuple[str, str]] = []
    for module, name, kind in (
        (builtins, "open", "open"),
        (os, "open", "open"),
        (os, "stat", "stat"),
    ):
        real = getattr(module, name)

        def recording(path, *args, _real=real, _kind=kind, **kwargs):
            if not isinstance(path, int):
                seen.append((_kind, os.fspath(path)))
            return _real(path, *args, **kwargs)

        case.patch(module, name, recording)
    return seen


def messageFiles(seen: list[tuple[str, str]], kind: str | None = None) -> list[str]:
    """
    The message files (in cur/ or new/) among the accesses C{seen}, of
    C{kind} ("open", "stat") or of any kind.
    """
    return [
        path
        for done, path in seen
        if os.path.basename(os.path.dirname(path)) in ("cur", "new")
        and kind in (None, done)
    ]


class FolderNameTests(SynchronousTestCase):
    """Folder names arrive from IMAP clients: anything may be in them."""

    HOSTILE = [
        "../x",
        "a/../b",
        "/abs",
        "a//b",
        "a/",
        "",
        "~",
        "a~b",
        "tmp",
        "New",
        "cur",
        "Archive/TMP",
        "a\x00b",
        "a\nb",
        "a\rb",
        "a\x7fb",
        "a\x85b",
        ".hidden",
        "a.b",
        "..",
        ".",
        "a\\b",
        "*",
        "a%",
        b"\xff\xfeabc",
        "\udcff",
        "x" * 255,
        "\u00e9" * 128,
        "a/" + "b" * 254,
        b"a/b\x00",
    ]

    def test_hostileNamesRefused(self) -> None:
        """
        A name that could reach outside the user's maildir, hide a folder,
        collide with the Maildir++ separator or the maildir's own
        directories, or that is not UTF-8 or too long for a directory is
        refused by every folder operation with a one-line FolderError, and
        nothing is created anywhere.
        """
        store, mailbox = newMailbox(self)
        mailbox.create_folder("Existing")
        base = store.root.parent
        before = tree(base)
        operations = [
            mailbox.create_folder,
            mailbox.folder,
            mailbox.delete_folder,
            mailbox.subscribe,
            mailbox.unsubscribe,
            mailbox.has_children,
            mailbox.special_use,
            lambda name: mailbox.rename_folder("Existing", name),
            lambda name: mailbox.rename_folder(name, "Other"),
        ]
        for name in self.HOSTILE:
            for operation in operations:
                error = self.assertRaises(FolderError, operation, name)
                self.assertNotIn("\n", str(error), name)
        self.assertEqual(tree(base), before)
        self.assertEqual(mailbox.folders(), ["INBOX", "Existing"])

    def test_longestName(self) -> None:
        """
        A name of 254 bytes is the longest that fits a directory name with
        its leading dot; one more byte is refused rather than failing later.
        """
        _, mailbox = newMailbox(self)
        mailbox.create_folder("x" * 254)
        self.assertIn("x" * 254, mailbox.folders())
        self.assertRaises(FolderError, mailbox.create_folder, "y" * 255)

    def test_levels(self) -> None:
        """
        Ordinary names, including non-ASCII ones, spaces and INBOX in any
        case, are split at C{/}; bytes are read as UTF-8.
        """
        self.assertEqual(folder_levels("Archive/2024"), ("Archive", "2024"))
        self.assertEqual(folder_levels("inbox"), ("INBOX",))
        self.assertEqual(folder_levels("Inbox/Sub"), ("INBOX", "Sub"))
        self.assertEqual(folder_levels("My Stuff"), ("My Stuff",))
        self.assertEqual(folder_levels("Entw\u00fcrfe".encode()), ("Entw\u00fcrfe",))
        self.assertEqual(folder_levels("a/INBOX"), ("a", "INBOX"))


class MailboxFolderTests(SynchronousTestCase):
    """Creating, listing, renaming and deleting folders."""

    def test_inbox(self) -> None:
        """INBOX, in any case, is the user's maildir itself."""
        store, mailbox = newMailbox(self)
        inbox = mailbox.folder("iNbOx")
        self.assertEqual(inbox.name, "INBOX")
        self.assertEqual(inbox.path, store.path_for(ALICE))
        self.assertEqual(mailbox.folders(), ["INBOX"])

    def test_inboxCreatedOnDemand(self) -> None:
        """A user who never received mail still has an (empty) INBOX."""
        store = MaildirStore(Path(self.mktemp()) / "mail", HOST)
        inbox = Mailbox(store, "new@example.test").folder("INBOX")
        self.assertEqual(inbox.scan(), [])

    def test_badAddress(self) -> None:
        """A mailbox address that could escape the mail root is refused."""
        store = MaildirStore(Path(self.mktemp()) / "mail", HOST)
        self.assertRaises(FolderError, Mailbox, store, "../x@example.test")

    def test_maildirPlusPlusLayout(self) -> None:
        """
        Folder C{Archive/2024} is the directory C{.Archive.2024} with its
        own cur/ new/ tmp/ and an empty C{maildirfolder} file, as Dovecot
        and Courier expect; the missing parent C{Archive} is created too.
        """
        store, mailbox = newMailbox(self)
        folder = mailbox.create_folder("Archive/2024")
        root = store.path_for(ALICE)
        self.assertEqual(folder.path, root / ".Archive.2024")
        self.assertEqual(folder.name, "Archive/2024")
        for path in (root / ".Archive.2024", root / ".Archive"):
            for sub in ("cur", "new", "tmp"):
                self.assertTrue((path / sub).is_dir())
            self.assertEqual((path / "maildirfolder").read_bytes(), b"")
        self.assertEqual(mailbox.folders(), ["INBOX", "Archive", "Archive/2024"])
        self.assertTrue(mailbox.has_children("Archive"))
        self.assertFalse(mailbox.has_children("Archive/2024"))
        self.assertFalse(mailbox.has_children("INBOX"))
        # Nothing is left behind where the folders were built.
        self.assertEqual(os.listdir(root / "tmp"), [])

    def test_foldersSorted(self) -> None:
        """INBOX comes first, then the other folders sorted."""
        _, mailbox = newMailbox(self)
        for name in ("Zeta", "alpha", "Beta/x", "INBOX/Sub"):
            mailbox.create_folder(name)
        self.assertEqual(
            mailbox.folders(),
            ["INBOX", "Beta", "Beta/x", "INBOX/Sub", "Zeta", "alpha"],
        )
        self.assertTrue(mailbox.has_children("inbox"))

    def test_foldersMadeByOthers(self) -> None:
        """
        A folder Dovecot or mutt created (no maildirfolder file, no state
        of ours) is listed and usable; dot directories that are not
        maildirs, or whose names we would refuse, are not listed.
        """
        store, mailbox = newMailbox(self)
        root = store.path_for(ALICE)
        for sub in ("cur", "new", "tmp"):
            (root / ".Lists.python" / sub).mkdir(parents=True)
        (root / ".Lists.python" / "cur" / "1.M1P1.other:2,S").write_bytes(BODY)
        (root / ".notamaildir").mkdir()
        (root / ".a~b" / "cur").mkdir(parents=True)
        (root / ".inbox.x" / "cur").mkdir(parents=True)
        (root / "plain" / "cur").mkdir(parents=True)
        self.assertEqual(mailbox.folders(), ["INBOX", "Lists/python"])
        [info] = mailbox.folder("Lists/python").scan()
        self.assertEqual(info.flags, {"\\Seen"})

    def test_createExisting(self) -> None:
        """Creating a folder that exists, or INBOX, fails clearly."""
        _, mailbox = newMailbox(self)
        mailbox.create_folder("Work")
        error = self.assertRaises(FolderError, mailbox.create_folder, "Work")
        self.assertIn("exists", str(error))
        self.assertRaises(FolderError, mailbox.create_folder, "inbox")

    def test_missingFolder(self) -> None:
        """Opening a folder that does not exist fails clearly."""
        _, mailbox = newMailbox(self)
        error = self.assertRaises(FolderError, mailbox.folder, "Nope")
        self.assertIn("no such folder", str(error))

    def test_delete(self) -> None:
        """
        Deleting a folder removes it and its messages at once, leaves the
        folders below it and nothing in tmp/; a session still holding it
        gets a clear error on its next scan.
        """
        store, mailbox = newMailbox(self)
        work = mailbox.create_folder("Work")
        mailbox.create_folder("Work/Old")
        work.append(BODY)
        mailbox.delete_folder("Work")
        self.assertEqual(mailbox.folders(), ["INBOX", "Work/Old"])
        root = store.path_for(ALICE)
        self.assertFalse((root / ".Work").exists())
        self.assertEqual(os.listdir(root / "tmp"), [])
        self.assertRaises(FolderError, work.scan)
        self.assertRaises(FolderError, mailbox.delete_folder, "Work")

    def test_deleteInbox(self) -> None:
        """INBOX cannot be deleted."""
        _, mailbox = newMailbox(self)
        self.assertRaises(FolderError, mailbox.delete_folder, "INBOX")
        self.assertTrue(mailbox.folder("INBOX").path.is_dir())

    def test_recreatedFolderNewUidvalidity(self) -> None:
        """
        A folder deleted and created again at once gets another
        UIDVALIDITY, so no client mistakes the new messages for the old
        ones it cached (RFC 3501 2.3.1.1).
        """
        _, mailbox = newMailbox(self)
        first = mailbox.create_folder("Work").uidvalidity
        mailbox.delete_folder("Work")
        second = mailbox.create_folder("Work").uidvalidity
        self.assertNotEqual(first, second)
        self.assertNotEqual(second, mailbox.folder("INBOX").uidvalidity)

    def test_rename(self) -> None:
        """
        Renaming a folder moves the folders below it too; messages keep
        their UIDs and the folder its UIDVALIDITY, so clients need not
        download it again; subscriptions follow the new names.
        """
        _, mailbox = newMailbox(self)
        work = mailbox.create_folder("Work")
        mailbox.create_folder("Work/2023")
        info = work.append(BODY, ["\\Seen"])
        uidvalidity = work.uidvalidity
        mailbox.subscribe("Work")
        mailbox.subscribe("Work/2023")
        mailbox.subscribe("Workshop")
        mailbox.rename_folder("Work", "Archive/Work")
        self.assertEqual(
            mailbox.folders(), ["INBOX", "Archive", "Archive/Work", "Archive/Work/2023"]
        )
        moved = mailbox.folder("Archive/Work")
        self.assertEqual(moved.uidvalidity, uidvalidity)
        [again] = moved.scan()
        self.assertEqual(
            (again.uid, again.key, again.flags), (info.uid, info.key, info.flags)
        )
        self.assertEqual(
            mailbox.subscriptions(), ["Archive/Work", "Archive/Work/2023", "Workshop"]
        )

    def test_renameRefused(self) -> None:
        """
        Renaming INBOX, a missing folder, onto an existing folder (or one
        of the children's new names) or inside itself fails and changes
        nothing.
        """
        store, mailbox = newMailbox(self)
        mailbox.create_folder("A/B")
        mailbox.create_folder("C/B")
        before = tree(store.root)
        for old, new in [
            ("INBOX", "X"),
            ("Nope", "X"),
            ("A", "C"),
            ("A", "INBOX"),
            ("A", "A/Sub"),
            ("A", "A"),
        ]:
            self.assertRaises(FolderError, mailbox.rename_folder, old, new)
        self.assertEqual(tree(store.root), before)

    def test_specialFolders(self) -> None:
        """
        A new user gets Sent, Drafts, Trash and Junk, subscribed and marked
        with their special use, so mail clients file mail in the right
        place; doing it again changes nothing and keeps their mail.
        """
        _, mailbox = newMailbox(self)
        mailbox.ensure_special_folders()
        mailbox.folder("Sent").append(BODY)
        mailbox.ensure_special_folders()
        self.assertEqual(
            mailbox.folders(), ["INBOX", "Drafts", "Junk", "Sent", "Trash"]
        )
        self.assertEqual(mailbox.subscriptions(), ["Drafts", "Junk", "Sent", "Trash"])
        self.assertEqual(len(mailbox.folder("Sent").scan()), 1)
        self.assertEqual(mailbox.special_use("Sent"), "\\Sent")
        self.assertEqual(mailbox.special_use("Junk"), "\\Junk")
        self.assertIsNone(mailbox.special_use("INBOX"))
        self.assertIsNone(mailbox.special_use("Work/Sent"))


class SubscriptionTests(SynchronousTestCase):
    """The folders a user chose to see, shared with Dovecot."""

    def test_persisted(self) -> None:
        """
        Subscriptions are kept in the C{subscriptions} file, one name per
        line as Dovecot keeps them, and a later session sees them.
        """
        store, mailbox = newMailbox(self)
        mailbox.subscribe("Work")
        mailbox.subscribe("inbox")
        mailbox.subscribe("Work")
        mailbox.subscribe("Lists/python")
        path = store.path_for(ALICE) / "subscriptions"
        self.assertEqual(path.read_bytes(), b"Work\nINBOX\nLists/python\n")
        later = Mailbox(store, ALICE)
        self.assertEqual(later.subscriptions(), ["INBOX", "Lists/python", "Work"])
        later.unsubscribe("Work")
        later.unsubscribe("Never")
        self.assertEqual(mailbox.subscriptions(), ["INBOX", "Lists/python"])

    def test_dovecotVersion2(self) -> None:
        """A subscriptions file in Dovecot's newer format is understood."""
        store, mailbox = newMailbox(self)
        path = store.path_for(ALICE) / "subscriptions"
        path.write_bytes(b"V\t2\n\nINBOX\nLists\tpython\n")
        self.assertEqual(mailbox.subscriptions(), ["INBOX", "Lists/python"])

    def test_concurrent(self) -> None:
        """
        Sessions subscribing at the same moment never lose each other's
        subscriptions.
        """
        store, mailbox = newMailbox(self)
        names = [f"Folder{n}" for n in range(40)]

        def subscribe(part: list[str]) -> None:
            session = Mailbox(store, ALICE)
            for name in part:
                session.subscribe(name)

        threads = [
            threading.Thread(target=subscribe, args=(names[n::4],)) for n in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(sorted(mailbox.subscriptions()), sorted(names))


class ScanTests(SynchronousTestCase):
    """Listing a folder: UIDs, sizes, dates and flags."""

    def test_delivered(self) -> None:
        """
        Messages delivered by SMTP get UIDs 1, 2, ... in arrival order,
        with their sizes (LF and CRLF) and their file's mtime as internal
        date; they stay in new/ unless claimed.
        """
        store, mailbox = newMailbox(self)
        paths = [deliver(store, BODY + b"%d\n" % n) for n in range(3)]
        inbox = mailbox.folder("INBOX")
        infos = inbox.scan()
        self.assertEqual([i.uid for i in infos], [1, 2, 3])
        self.assertEqual([i.path for i in infos], paths)
        for info, path in zip(infos, paths):
            data = path.read_bytes()
            self.assertEqual(info.key, path.name)
            self.assertEqual(info.size, len(data))
            self.assertEqual(info.crlf_size, len(data.replace(b"\n", b"\r\n")))
            self.assertEqual(info.internal_date, path.stat().st_mtime)
            self.assertEqual(info.flags, frozenset())
        self.assertEqual(inbox.uidnext, 4)

    def test_claimNew(self) -> None:
        """
        A session that claims new mail moves it to cur/ with an empty
        C{:2,} info, as mutt and Dovecot do; UIDs do not change, and the
        messages are recent for that session only.
        """
        store, mailbox = newMailbox(self)
        path = deliver(store)
        inbox = mailbox.folder("INBOX")
        [before] = inbox.scan()
        [after] = inbox.scan(claim_new=True)
        self.assertEqual(after.uid, before.uid)
        self.assertEqual(after.path, path.parent.parent / "cur" / (path.name + ":2,"))
        self.assertTrue(after.path.exists())
        self.assertEqual(inbox.recent_count(), 1)
        self.assertTrue(inbox.is_recent(after))
        other = mailbox.folder("INBOX")
        self.assertEqual(other.scan(claim_new=True), [after])
        self.assertEqual(other.recent_count(), 0)

    def test_claimedMeanwhile(self) -> None:
        """
        A message another session moves to cur/ while this one claims it is
        found there, not lost.
        """
        store, mailbox = newMailbox(self)
        path = deliver(store)
        inbox = mailbox.folder("INBOX")
        inbox.scan()
        realRename = os.rename
        target = path.parent.parent / "cur" / (path.name + ":2,S")

        def rename(source, destination):
            # The other session wins the race, and marks it seen as well.
            realRename(path, target)
            self.patch(os, "rename", realRename)
            raise FileNotFoundError(errno.ENOENT, "gone", str(source))

        self.patch(os, "rename", rename)
        [info] = inbox.scan(claim_new=True)
        self.assertEqual((info.uid, info.path, info.flags), (1, target, {"\\Seen"}))

    def test_filesFromOtherPrograms(self) -> None:
        """
        Mail Dovecot or mutt wrote into the maildir is read correctly:
        names without sizes, with other C{,X=} fields or a wrong C{,S=},
        files straight in cur/ with C{:2,S}, files in new/ without info,
        CRLF line endings.  Dot files and tmp/ are not mail.
        """
        store, mailbox = newMailbox(self)
        root = store.path_for(ALICE)
        crlf = BODY.replace(b"\n", b"\r\n")
        files = {
            "new/1700000000.M1P2.mutthost": BODY,
            "cur/1700000001.M2P3.dovecot:2,S": BODY + b"x\n",
            "cur/1700000002.M3P4.host,S=999,X=foo:2,FSa": BODY + b"yy\n",
            "cur/1700000003.M4P5.host:2,RT": crlf,
            "new/.hidden": b"not mail",
            "tmp/1700000004.M5P6.host": b"in progress",
        }
        for name, data in files.items():
            (root / name).write_bytes(data)
        infos = mailbox.folder("INBOX").scan()
        self.assertEqual([i.uid for i in infos], [1, 2, 3, 4])
        self.assertEqual(
            [i.key for i in infos],
            [
                "1700000000.M1P2.mutthost",
                "1700000001.M2P3.dovecot",
                "1700000002.M3P4.host,S=999,X=foo",
                "1700000003.M4P5.host",
            ],
        )
        self.assertEqual(
            [i.flags for i in infos],
            [set(), {"\\Seen"}, {"\\Flagged", "\\Seen"}, {"\\Answered", "\\Deleted"}],
        )
        size = len(BODY)
        self.assertEqual([i.size for i in infos], [size, size + 2, size + 3, len(crlf)])
        # CRLF sizes: every bare LF counts twice; CRLF already there once.
        lines = BODY.count(b"\n")
        self.assertEqual(
            [i.crlf_size for i in infos],
            [size + lines, size + 2 + lines + 1, size + 3 + lines + 1, len(crlf)],
        )

    def test_sizesFromName(self) -> None:
        """
        When the name carries Dovecot's C{,S=} (matching the file) and
        C{,W=}, the message is not read to learn its sizes.
        """
        store, mailbox = newMailbox(self)
        root = store.path_for(ALICE)
        name = f"1700000000.M1P2.dovecot,S={len(BODY)},W=1234:2,S"
        (root / "cur" / name).write_bytes(BODY)
        inbox = mailbox.folder("INBOX")
        seen = recordFileAccess(self)
        [info] = inbox.scan()
        self.assertEqual((info.size, info.crlf_size), (len(BODY), 1234))
        self.assertEqual(messageFiles(seen, "open"), [])
        self.assertEqual(messageFiles(seen, "stat"), [str(root / "cur" / name)])

    def test_uidlistFormat(self) -> None:
        """
        UIDs are kept in C{mailsys-uidlist}: C{1 V<uidvalidity> N<uidnext>}
        then C{<uid> <key>} lines, which an operator can read.
        """
        store, mailbox = newMailbox(self)
        paths = [deliver(store) for _ in range(2)]
        inbox = mailbox.folder("INBOX")
        inbox.scan()
        text = (inbox.path / "mailsys-uidlist").read_text()
        self.assertEqual(
            text,
            f"1 V{inbox.uidvalidity} N3\n1 {paths[0].name}\n2 {paths[1].name}\n",
        )
        self.assertTrue(re.match(r"\d{9,10}\Z", str(inbox.uidvalidity)))

    def test_stableAcrossSessions(self) -> None:
        """
        A server restart (new Folder objects) and flag changes by another
        session keep every UID and the UIDVALIDITY: clients do not
        download the folder again.
        """
        store, mailbox = newMailbox(self)
        for _ in range(3):
            deliver(store)
        first = mailbox.folder("INBOX")
        infos = first.scan(claim_new=True)
        other = Mailbox(store, ALICE).folder("INBOX")
        other.set_flags(other.scan()[1], ["\\Seen"])
        restarted = Folder(first.path, "INBOX", HOST)
        again = restarted.scan()
        self.assertEqual(
            [(i.uid, i.key) for i in again], [(i.uid, i.key) for i in infos]
        )
        self.assertEqual(again[1].flags, {"\\Seen"})
        self.assertEqual(restarted.uidvalidity, first.uidvalidity)
        self.assertEqual(first.scan()[1].flags, {"\\Seen"})

    def test_vanishedNeverReused(self) -> None:
        """
        A message removed by another program disappears from the list, and
        its UID is never given to another message, even after a restart.
        """
        store, mailbox = newMailbox(self)
        paths = [deliver(store) for _ in range(3)]
        inbox = mailbox.folder("INBOX")
        inbox.scan()
        paths[2].unlink()
        self.assertEqual([i.uid for i in inbox.scan()], [1, 2])
        deliver(store)
        self.assertEqual([i.uid for i in inbox.scan()], [1, 2, 4])
        paths[1].unlink()
        restarted = Folder(inbox.path, "INBOX", HOST)
        self.assertEqual([i.uid for i in restarted.scan()], [1, 4])
        deliver(store)
        self.assertEqual([i.uid for i in restarted.scan()], [1, 4, 5])

    def test_cacheLossHarmless(self) -> None:
        """
        A missing, truncated or garbled cache file only costs a re-read:
        the messages are described exactly as before.
        """
        store, mailbox = newMailbox(self)
        (store.path_for(ALICE) / "cur" / "1.M1P1.mutt:2,S").write_bytes(BODY)
        deliver(store)
        inbox = mailbox.folder("INBOX")
        expected = inbox.scan()
        cache = inbox.path / "mailsys-cache"
        original = cache.read_bytes()
        for damaged in (None, original[:-10], original.replace(b" ", b"x"), b""):
            if damaged is None:
                cache.unlink()
            else:
                cache.write_bytes(damaged)
            self.assertEqual(Folder(inbox.path, "INBOX", HOST).scan(), expected)

    def test_uidlistDamaged(self) -> None:
        """
        If the UID list is damaged beyond use, the folder gets a new
        UIDVALIDITY and fresh UIDs: clients resynchronise instead of
        showing the wrong messages.
        """
        store, mailbox = newMailbox(self)
        deliver(store)
        inbox = mailbox.folder("INBOX")
        inbox.scan()
        old = inbox.uidvalidity
        (inbox.path / "mailsys-uidlist").write_bytes(b"garbage\n1 x\n")
        restarted = Folder(inbox.path, "INBOX", HOST)
        self.assertEqual([i.uid for i in restarted.scan()], [1])
        self.assertNotEqual(restarted.uidvalidity, old)

    def test_emptyFolder(self) -> None:
        """An empty folder has no messages and UIDNEXT 1."""
        _, mailbox = newMailbox(self)
        folder = mailbox.create_folder("Empty")
        self.assertEqual(folder.scan(), [])
        self.assertEqual(folder.uidnext, 1)


class FlagTests(SynchronousTestCase):
    """Flags live in the file name, where every mail program sees them."""

    def test_setFlags(self) -> None:
        """
        Setting flags renames the file with the sorted letters, moving it
        from new/ to cur/; flag names are case-insensitive, \\Recent and
        unknown \\ flags are ignored; the UID stays.
        """
        store, mailbox = newMailbox(self)
        path = deliver(store)
        inbox = mailbox.folder("INBOX")
        [info] = inbox.scan()
        changed = inbox.set_flags(info, ["\\seen", "\\Flagged", "\\Recent", "\\Foo"])
        self.assertEqual(changed.path, inbox.path / "cur" / (path.name + ":2,FS"))
        self.assertEqual(changed.flags, {"\\Seen", "\\Flagged"})
        self.assertEqual(os.listdir(inbox.path / "new"), [])
        changed = inbox.set_flags(changed, {"\\Deleted", "\\Answered", "\\Draft"})
        self.assertEqual(changed.path.name, path.name + ":2,DRT")
        [scanned] = inbox.scan()
        self.assertEqual((scanned.uid, scanned.flags), (1, changed.flags))
        self.assertEqual(inbox.set_flags(scanned, []).path.name, path.name + ":2,")

    def test_keywordsKept(self) -> None:
        """
        Letters that are not system flags (Dovecot keywords, P for passed)
        survive a change of the system flags.
        """
        store, mailbox = newMailbox(self)
        root = store.path_for(ALICE)
        (root / "cur" / "1.M1P1.dovecot:2,PSab").write_bytes(BODY)
        inbox = mailbox.folder("INBOX")
        [info] = inbox.scan()
        self.assertEqual(info.flags, {"\\Seen"})
        changed = inbox.set_flags(info, ["\\Flagged"])
        self.assertEqual(changed.path.name, "1.M1P1.dovecot:2,FPab")
        self.assertEqual(changed.flags, {"\\Flagged"})

    def test_staleInfo(self) -> None:
        """
        Setting flags with a description another session made stale (it
        renamed the file meanwhile) still finds the message, and keeps the
        other session's keyword letters.
        """
        store, mailbox = newMailbox(self)
        inbox = mailbox.folder("INBOX")
        info = inbox.append(BODY, ["\\Seen"])
        os.rename(info.path, info.path.with_name(info.key + ":2,Sk"))
        changed = inbox.set_flags(info, ["\\Answered"])
        self.assertEqual(changed.path.name, info.key + ":2,Rk")

    def test_gone(self) -> None:
        """Setting flags of an expunged message raises MessageGone."""
        _, mailbox = newMailbox(self)
        inbox = mailbox.folder("INBOX")
        info = inbox.append(BODY)
        inbox.expunge([info])
        self.assertRaises(MessageGone, inbox.set_flags, info, ["\\Seen"])
        # Also when the flags asked for are the ones it had.
        self.assertRaises(MessageGone, inbox.set_flags, info, [])


class KeywordTests(SynchronousTestCase):
    """
    Keywords ($Forwarded, $Junk, $label1...) live where Dovecot keeps them:
    lower-case info letters, named by the folder's dovecot-keywords file.
    """

    def test_fileFormat(self) -> None:
        """
        A new keyword takes the next letter and a line in dovecot-keywords
        in Dovecot's format; the message's name carries the letter; a new
        session sees the keyword; names are case-insensitive, the first
        spelling stays; removing a keyword removes its letter only.
        """
        store, mailbox = newMailbox(self)
        deliver(store)
        inbox = mailbox.folder("INBOX")
        [info] = inbox.scan()
        changed = inbox.set_flags(info, ["\\Seen", "$Forwarded", "$label1"])
        self.assertEqual(
            (inbox.path / "dovecot-keywords").read_bytes(), b"0 $Forwarded\n1 $label1\n"
        )
        self.assertTrue(changed.path.name.endswith(":2,Sab"), changed.path.name)
        self.assertEqual(changed.flags, {"\\Seen", "$Forwarded", "$label1"})
        fresh = Mailbox(store, ALICE).folder("INBOX")
        self.assertEqual(fresh.keywords(), ["$Forwarded", "$label1"])
        [scanned] = fresh.scan()
        self.assertEqual(scanned.flags, changed.flags)
        again = fresh.set_flags(scanned, ["$FORWARDED", "$Junk"])
        self.assertTrue(again.path.name.endswith(":2,ac"), again.path.name)
        self.assertEqual(again.flags, {"$Forwarded", "$Junk"})
        self.assertEqual(fresh.keywords(), ["$Forwarded", "$label1", "$Junk"])
        self.assertEqual(
            fresh.define_keywords(["$junk", "NonJunk"]), ["$Junk", "NonJunk"]
        )
        self.assertEqual(
            inbox.keywords(), ["$Forwarded", "$label1", "$Junk", "NonJunk"]
        )

    def test_readsDovecotFile(self) -> None:
        """
        A dovecot-keywords written by Dovecot is read as Dovecot reads it
        (gaps, junk lines and indexes past z skipped); a keyword defined
        here takes the first free letter, keeps Dovecot's lines, and moves
        the file's mtime on by a whole second at least, so Dovecot notices.
        """
        store, mailbox = newMailbox(self)
        root = store.path_for(ALICE)
        keywords = root / "dovecot-keywords"
        keywords.write_bytes(
            b"0 $Forwarded\n1 Junk\n3 $label2\nno index\n30 $Far\n7 \n4 bad(name\n"
        )
        past = 1_700_000_000.25
        os.utime(keywords, (past, past))
        (root / "cur" / "1.M1P1.dovecot:2,RSabde").write_bytes(BODY)
        inbox = mailbox.folder("INBOX")
        [info] = inbox.scan()
        self.assertEqual(
            info.flags, {"\\Answered", "\\Seen", "$Forwarded", "Junk", "$label2"}
        )
        # The name IMAP cannot show keeps its letter: it is not given away
        # and not dropped from the message.
        self.assertEqual(inbox.keywords(), ["$Forwarded", "Junk", "$label2"])
        changed = inbox.set_flags(info, ["\\Seen", "$NotJunk"])
        self.assertEqual(changed.path.name, "1.M1P1.dovecot:2,Sce")
        self.assertEqual(changed.flags, {"\\Seen", "$NotJunk"})
        self.assertEqual(
            keywords.read_bytes(),
            b"0 $Forwarded\n1 Junk\n2 $NotJunk\n3 $label2\n4 bad(name\n",
        )
        self.assertGreaterEqual(os.stat(keywords).st_mtime, int(past) + 1)

    def test_concurrentDefinition(self) -> None:
        """
        Sessions defining new keywords at once never give one letter two
        names: each takes its letter under the folder lock, after reading
        the file again, even when its own copy of the list is out of date.
        """
        store, mailbox = newMailbox(self)
        first = mailbox.folder("INBOX")
        second = Mailbox(store, ALICE).folder("INBOX")
        self.assertEqual(first.keywords(), [])
        self.assertEqual(second.keywords(), [])
        first.define_keywords(["$a"])
        second.define_keywords(["$b"])
        first.define_keywords(["$c"])
        self.assertEqual(second.keywords(), ["$a", "$b", "$c"])
        errors: list[BaseException] = []
        barrier = threading.Barrier(8)

        def work(n: int) -> None:
            folder = Mailbox(store, ALICE).folder("INBOX")
            folder.keywords()
            barrier.wait()
            try:
                folder.define_keywords([f"$t{n}", "$shared"])
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])
        names = Mailbox(store, ALICE).folder("INBOX").keywords()
        self.assertEqual(names[:3], ["$a", "$b", "$c"])
        self.assertEqual(
            sorted(names[3:]), sorted([f"$t{n}" for n in range(8)] + ["$shared"])
        )
        lines = (first.path / "dovecot-keywords").read_bytes().splitlines()
        self.assertEqual(len(lines), 12)

    def test_limit(self) -> None:
        """
        26 keywords fit; the 27th is refused with a clear error and the
        message keeps its flags; a message appended or copied with it is
        stored without it.
        """
        store, mailbox = newMailbox(self)
        inbox = mailbox.folder("INBOX")
        info = inbox.append(BODY, ["\\Seen"])
        names = [f"$k{n}" for n in range(26)]
        self.assertEqual(inbox.define_keywords(names), names)
        with self.assertRaises(KeywordLimit) as caught:
            inbox.set_flags(info, ["\\Seen", "$k0", "$extra"])
        self.assertIn("$extra", str(caught.exception))
        self.assertIn("26 keywords", str(caught.exception))
        self.assertIsInstance(caught.exception, FolderError)
        [scanned] = inbox.scan()
        self.assertEqual(scanned.flags, {"\\Seen"})
        self.assertEqual(
            inbox.define_keywords(["$k1", "$extra"], partial=True), ["$k1"]
        )
        self.assertRaises(KeywordLimit, inbox.define_keywords, ["$extra"])
        appended = inbox.append(BODY, ["$extra", "$k25"])
        self.assertEqual(appended.flags, {"$k25"})
        self.assertTrue(appended.path.name.endswith(":2,z"), appended.path.name)
        trash = mailbox.create_folder("Trash")
        trash.define_keywords(names[1:] + ["$other"])
        tagged = inbox.set_flags(info, ["$k0", "$k1"])
        [copy] = inbox.copy_to([tagged], trash)
        self.assertEqual(copy.flags, {"$k1"})

    def test_copyAndAppendKeepKeywords(self) -> None:
        """
        A copy carries its keywords into the target folder, where they may
        have other letters; an appended message gets its keywords.
        """
        store, mailbox = newMailbox(self)
        inbox = mailbox.folder("INBOX")
        info = inbox.append(BODY, ["\\Seen", "$Forwarded"])
        self.assertEqual(info.flags, {"\\Seen", "$Forwarded"})
        self.assertTrue(info.path.name.endswith(":2,Sa"))
        trash = mailbox.create_folder("Trash")
        trash.define_keywords(["Other"])
        [copy] = inbox.copy_to([info], trash)
        self.assertEqual(copy.flags, {"\\Seen", "$Forwarded"})
        self.assertTrue(copy.path.name.endswith(":2,Sb"), copy.path.name)
        [scanned] = Mailbox(store, ALICE).folder("Trash").scan()
        self.assertEqual(scanned.flags, copy.flags)

    def test_invalidKeyword(self) -> None:
        """A keyword that is not an IMAP atom is refused, nothing changed."""
        store, mailbox = newMailbox(self)
        inbox = mailbox.folder("INBOX")
        info = inbox.append(BODY)
        for bad in ("two words", "a(b", "x]", "caf\u00e9", "$" + "x" * 200, ""):
            self.assertRaises(FolderError, inbox.set_flags, info, [bad])
            self.assertRaises(FolderError, inbox.append, BODY, [bad])
        self.assertFalse((inbox.path / "dovecot-keywords").exists())
        self.assertEqual(len(inbox.scan()), 1)


class OpenTests(SynchronousTestCase):
    """Reading a message that other sessions may be changing."""

    def test_content(self) -> None:
        """The stored bytes are returned as they are on disk."""
        store, mailbox = newMailbox(self)
        deliver(store)
        inbox = mailbox.folder("INBOX")
        [info] = inbox.scan()
        with inbox.open(info) as f:
            self.assertEqual(f.read(), BODY)

    def test_renamedByOtherSession(self) -> None:
        """
        A message another session renamed (flags changed, claimed) is still
        found by its key.
        """
        store, mailbox = newMailbox(self)
        deliver(store)
        mine = mailbox.folder("INBOX")
        [info] = mine.scan()
        theirs = Mailbox(store, ALICE).folder("INBOX")
        theirs.set_flags(theirs.scan(claim_new=True)[0], ["\\Seen", "\\Answered"])
        with mine.open(info) as f:
            self.assertEqual(f.read(), BODY)
        self.assertEqual(mine.headers(info), HEADERS)

    def test_expunged(self) -> None:
        """A message another session expunged raises MessageGone."""
        store, mailbox = newMailbox(self)
        deliver(store)
        mine = mailbox.folder("INBOX")
        [info] = mine.scan()
        theirs = Mailbox(store, ALICE).folder("INBOX")
        theirs.expunge(theirs.scan())
        self.assertRaises(MessageGone, mine.open, info)
        self.assertRaises(MessageGone, mine.headers, info)


class HeaderTests(SynchronousTestCase):
    """The header block, which IMAP ENVELOPE and POP3 TOP need often."""

    def headersOf(self, data: bytes, name: str = "1.M1P1.x:2,") -> bytes:
        """Store C{data} as a message and return its header block."""
        store, mailbox = newMailbox(self)
        (store.path_for(ALICE) / "cur" / name).write_bytes(data)
        inbox = mailbox.folder("INBOX")
        [info] = inbox.scan()
        return inbox.headers(info)

    def test_lf(self) -> None:
        """The header block ends with, and includes, the blank line."""
        self.assertEqual(self.headersOf(BODY), HEADERS)

    def test_crlf(self) -> None:
        """A file written with CRLF endings by another program works too."""
        crlf = BODY.replace(b"\n", b"\r\n")
        self.assertEqual(
            self.headersOf(crlf), b"Subject: hello\r\nFrom: bob@example.org\r\n\r\n"
        )

    def test_noBody(self) -> None:
        """A message without a blank line is all header."""
        self.assertEqual(self.headersOf(b"Subject: x\n"), b"Subject: x\n")

    def test_noHeaders(self) -> None:
        """A message starting with a blank line has an empty header block."""
        self.assertEqual(self.headersOf(b"\nbody\n"), b"\n")

    def test_longHeader(self) -> None:
        """
        A header block longer than one read, whose blank line straddles
        two reads, is found whole.
        """
        header = b"X-Long: " + b"a" * (CHUNK_SIZE - 10) + b"\n"
        data = header + b"\n" + b"b" * CHUNK_SIZE
        self.assertEqual(len(header), CHUNK_SIZE - 1)
        self.assertEqual(self.headersOf(data), header + b"\n")

    def test_cached(self) -> None:
        """
        Asking twice reads the file once; a restarted server knows from
        the cache how much to read, and reads just that.
        """
        store, mailbox = newMailbox(self)
        # Sizes in the name: the first scan does not read the file.
        name = f"1.M1P1.x,S={len(BODY)},W={len(BODY) + 5}:2,"
        (store.path_for(ALICE) / "cur" / name).write_bytes(BODY)
        inbox = mailbox.folder("INBOX")
        [info] = inbox.scan()
        first = inbox.headers(info)
        opened = recordFileAccess(self)
        self.assertEqual(inbox.headers(info), first)
        self.assertEqual(messageFiles(opened), [])
        inbox.scan()

        reads: list[int] = []
        realOpen = builtins.open

        class Recording:
            def __init__(self, *args: object) -> None:
                self.file = realOpen(*args)

            def read(self, size: int = -1) -> bytes:
                reads.append(size)
                return self.file.read(size)

            def __enter__(self) -> Recording:
                return self

            def __exit__(self, *exc: object) -> None:
                self.file.close()

        restarted = Folder(inbox.path, "INBOX", HOST)
        [info] = restarted.scan()
        self.patch(builtins, "open", Recording)
        self.assertEqual(restarted.headers(info), first)
        self.assertEqual(reads, [len(first)])


class AppendTests(SynchronousTestCase):
    """IMAP APPEND, and the Sent copy a client saves."""

    def test_append(self) -> None:
        """
        An appended message is stored with LF endings in cur/ with its
        flags and internal date, gets the next UID, and its name carries
        the sizes other programs expect.
        """
        store, mailbox = newMailbox(self)
        inbox = mailbox.folder("INBOX")
        deliver(store)
        inbox.scan()
        sent = BODY.replace(b"\n", b"\r\n")
        info = inbox.append(sent, ["\\Seen", "\\Draft"], internal_date=1_000_000_000.5)
        self.assertEqual(info.uid, 2)
        self.assertEqual(info.path.parent, inbox.path / "cur")
        self.assertTrue(info.path.name.endswith(f",S={len(BODY)},W={len(sent)}:2,DS"))
        self.assertEqual(info.path.read_bytes(), BODY)
        self.assertEqual((info.size, info.crlf_size), (len(BODY), len(sent)))
        self.assertEqual(info.flags, {"\\Seen", "\\Draft"})
        self.assertEqual(info.internal_date, 1_000_000_000.5)
        self.assertEqual(info.path.stat().st_mtime, 1_000_000_000.5)
        self.assertEqual(inbox.scan()[-1], info)
        self.assertEqual(inbox.uidnext, 3)
        self.assertEqual(os.listdir(inbox.path / "tmp"), [])

    def test_stream(self) -> None:
        """
        A message given as a file is converted piece by piece, also where
        a CRLF is split between two reads.
        """
        _, mailbox = newMailbox(self)
        inbox = mailbox.folder("INBOX")
        data = b"Subject: x\r\n\r\n" + b"a" * (CHUNK_SIZE - 15) + b"\r\nend\r\n"
        self.assertEqual(data[CHUNK_SIZE - 1 : CHUNK_SIZE + 1], b"\r\n")
        info = inbox.append(io.BytesIO(data))
        self.assertEqual(info.path.read_bytes(), data.replace(b"\r\n", b"\n"))
        self.assertEqual(info.crlf_size, len(data))

    def test_durable(self) -> None:
        """
        The file is synced while still in tmp/, and cur/ and the UID list
        are synced before append returns: "OK APPEND" survives a power cut.
        """
        _, mailbox = newMailbox(self)
        inbox = mailbox.folder("INBOX")
        inbox.scan()
        synced: list[str] = []
        realFsync = os.fsync

        def fsync(fd: int) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            realFsync(fd)

        self.patch(os, "fsync", fsync)
        info = inbox.append(BODY)
        path = inbox.path.resolve()
        self.assertEqual(synced[0], str(path / "tmp" / info.key))
        self.assertEqual(synced[1], str(path / "cur"))
        self.assertIn(str(path), synced[2:])

    def test_fullDisk(self) -> None:
        """
        When the disk fills, append fails with a one-line DeliveryError,
        stores nothing and uses up no UID.
        """
        _, mailbox = newMailbox(self)
        inbox = mailbox.folder("INBOX")
        inbox.scan()
        failOnCall(self, "fsync", 1)
        error = self.assertRaises(DeliveryError, inbox.append, BODY)
        self.assertIn(os.strerror(errno.ENOSPC), str(error))
        self.assertNotIn("\n", str(error))
        for sub in ("tmp", "new", "cur"):
            self.assertEqual(os.listdir(inbox.path / sub), [])
        self.assertEqual(inbox.uidnext, 1)

    def test_uidsInOrder(self) -> None:
        """Messages appended one after another get increasing UIDs."""
        _, mailbox = newMailbox(self)
        sent = mailbox.create_folder("Sent")
        uids = [sent.append(BODY).uid for _ in range(5)]
        self.assertEqual(uids, [1, 2, 3, 4, 5])


class CopyTests(SynchronousTestCase):
    """IMAP COPY: durable, all or nothing, flags and dates kept."""

    def test_copy(self) -> None:
        """
        Copies keep content, flags and internal date, get new UIDs in the
        target in the order asked (for COPYUID); the originals stay.
        """
        store, mailbox = newMailbox(self)
        inbox = mailbox.folder("INBOX")
        first = inbox.append(b"Subject: 1\n\none\n", ["\\Seen"], 1_500_000_000.0)
        second = inbox.append(b"Subject: 2\n\ntwo\n", ["\\Flagged"], 1_600_000_000.0)
        archive = mailbox.create_folder("Archive")
        archive.append(BODY)
        copies = inbox.copy_to([second, first], archive)
        self.assertEqual([c.uid for c in copies], [2, 3])
        self.assertEqual([c.flags for c in copies], [second.flags, first.flags])
        self.assertEqual(
            [c.internal_date for c in copies], [1_600_000_000.0, 1_500_000_000.0]
        )
        self.assertEqual(copies[0].path.read_bytes(), b"Subject: 2\n\ntwo\n")
        self.assertEqual(archive.scan()[1:], copies)
        self.assertEqual(inbox.scan(), [first, second])

    def test_copyGone(self) -> None:
        """
        Copying a message another session expunged fails with MessageGone
        and leaves the target as it was, without the others either.
        """
        _, mailbox = newMailbox(self)
        inbox = mailbox.folder("INBOX")
        infos = [inbox.append(BODY) for _ in range(3)]
        archive = mailbox.create_folder("Archive")
        inbox.expunge([infos[2]])
        self.assertRaises(MessageGone, inbox.copy_to, infos, archive)
        self.assertEqual(archive.scan(), [])
        self.assertEqual(archive.uidnext, 1)
        self.assertEqual(tree(archive.path / "cur") + tree(archive.path / "tmp"), [])

    def test_copyFails(self) -> None:
        """A full disk during a copy leaves no copy at all."""
        _, mailbox = newMailbox(self)
        inbox = mailbox.folder("INBOX")
        infos = [inbox.append(BODY) for _ in range(3)]
        archive = mailbox.create_folder("Archive")
        failOnCall(self, "fsync", 2)
        self.assertRaises(DeliveryError, inbox.copy_to, infos, archive)
        self.assertEqual(archive.scan(), [])
        self.assertEqual(tree(archive.path / "cur") + tree(archive.path / "tmp"), [])

    def test_copyToSelf(self) -> None:
        """A message copied within its own folder becomes a second message."""
        _, mailbox = newMailbox(self)
        inbox = mailbox.folder("INBOX")
        info = inbox.append(BODY, ["\\Seen"])
        [copy] = inbox.copy_to([info], inbox)
        self.assertEqual([i.uid for i in inbox.scan()], [info.uid, copy.uid])


class ExpungeTests(SynchronousTestCase):
    """Deleting messages for good."""

    def test_expunge(self) -> None:
        """
        Expunged messages are gone from disk and from the list, also for a
        restarted server, and their UIDs are never reused.
        """
        _, mailbox = newMailbox(self)
        inbox = mailbox.folder("INBOX")
        infos = [inbox.append(BODY) for _ in range(3)]
        inbox.expunge(infos[:2])
        self.assertFalse(infos[0].path.exists())
        self.assertEqual(inbox.scan(), infos[2:])
        restarted = mailbox.folder("INBOX")
        self.assertEqual([i.uid for i in restarted.scan()], [3])
        self.assertEqual(restarted.append(BODY).uid, 4)

    def test_alreadyGone(self) -> None:
        """Expunging what another session expunged (or renamed) is fine."""
        _, mailbox = newMailbox(self)
        inbox = mailbox.folder("INBOX")
        gone, renamed = inbox.append(BODY), inbox.append(BODY)
        gone.path.unlink()
        os.rename(renamed.path, renamed.path.with_name(renamed.key + ":2,S"))
        inbox.expunge([gone, renamed])
        self.assertEqual(inbox.scan(), [])


class ConcurrencyTests(SynchronousTestCase):
    """Many sessions, threads and processes on one maildir."""

    def assertOneToOne(self, seen: list[tuple[int, str]]) -> dict[str, int]:
        """
        Every key in the C{(uid, key)} pairs C{seen} had one UID, and every
        UID one key, whoever reported it and whenever.

        @return: the UID of each key.
        """
        uidsOfKey: dict[str, set[int]] = {}
        keysOfUid: dict[int, set[str]] = {}
        for uid, key in seen:
            uidsOfKey.setdefault(key, set()).add(uid)
            keysOfUid.setdefault(uid, set()).add(key)
        self.assertEqual({k: u for k, u in uidsOfKey.items() if len(u) > 1}, {})
        self.assertEqual({u: k for u, k in keysOfUid.items() if len(k) > 1}, {})
        return {key: uids.pop() for key, uids in uidsOfKey.items()}

    def test_threads(self) -> None:
        """
        Threads of one server sharing Folder objects (and each with its
        own) append, deliver, scan and flag at once without errors, and
        every message has one UID of its own, the same for every thread.
        """
        store, mailbox = newMailbox(self)
        shared = mailbox.folder("INBOX")
        errors: list[BaseException] = []
        seen: list[tuple[int, str]] = []
        barrier = threading.Barrier(4)

        def work(n: int) -> None:
            own = Mailbox(store, ALICE).folder("INBOX")
            barrier.wait()
            try:
                for i in range(10):
                    folder = shared if i % 2 else own
                    info = folder.append(b"Subject: %d-%d\n\n" % (n, i))
                    seen.append((info.uid, info.key))
                    deliver(store)
                    for info in folder.scan(claim_new=bool(i % 3)):
                        seen.append((info.uid, info.key))
                        if info.uid % 4 == n:
                            try:
                                info = folder.set_flags(info, ["\\Seen"])
                            except MessageGone:
                                continue
                            seen.append((info.uid, info.key))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])
        uidOf = self.assertOneToOne(seen)
        infos = Folder(shared.path, "INBOX", HOST).scan()
        self.assertEqual(len(infos), 80)
        self.assertEqual(len({i.uid for i in infos}), 80)
        for info in infos:
            self.assertEqual(uidOf.get(info.key, info.uid), info.uid)

    def test_processes(self) -> None:
        """
        Two processes sharing the maildir never give two messages one UID:
        four processes append, deliver and scan at once (sometimes as a
        restarted server), and afterwards every message has exactly one
        UID, the same everywhere, and no UID names two messages.
        """
        store, mailbox = newMailbox(self)
        inbox = mailbox.folder("INBOX")
        inbox.scan()
        source = Path(maildir.__file__).resolve().parent.parent
        environment = dict(os.environ, PYTHONPATH=str(source))
        children = [
            subprocess.Popen(
                [sys.executable, "-b", "-c", CHILD, str(store.root), str(n)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=environment,
            )
            for n in range(4)
        ]
        # Closing their stdin releases all children at once.
        for child in children:
            assert child.stdin is not None
            child.stdin.close()
        seen: list[tuple[int, str]] = []
        for child in children:
            assert child.stdout is not None
            out = child.stdout.read()
            child.stdout.close()
            self.assertEqual(child.wait(), 0, out.decode(errors="replace"))
            seen.extend((uid, key) for uid, key in json.loads(out))
        uidOf = self.assertOneToOne(seen)
        final = Folder(inbox.path, "INBOX", HOST).scan()
        self.assertEqual(len(final), 4 * CHILD_ROUNDS * 2)
        self.assertEqual(len({i.uid for i in final}), len(final))
        for info in final:
            self.assertEqual(uidOf.get(info.key, info.uid), info.uid)


CHILD_ROUNDS = 15

# One competing server process: waits for the go, then appends, delivers
# and scans, printing every (uid, key) pair it was told, as JSON.
CHILD = f"""
import io, json, sys
from pathlib import Path
from mailsys.maildir import Mailbox, MaildirStore

store = MaildirStore(Path(sys.argv[1]), "host" + sys.argv[2] + ".example.test")
sys.stdin.read()
seen = []
folder = Mailbox(store, {ALICE!r}).folder("INBOX")
for i in range({CHILD_ROUNDS}):
    if i % 5 == 4:
        folder = Mailbox(store, {ALICE!r}).folder("INBOX")  # a restart
    info = folder.append(b"Subject: appended %d\\n\\n" % i)
    seen.append((info.uid, info.key))
    store.deliver([{ALICE!r}], io.BytesIO(b"Subject: delivered %d\\n\\n" % i))
    seen.extend((m.uid, m.key) for m in folder.scan(claim_new=bool(i % 2)))
print(json.dumps(seen))
"""


class LargeFolderTests(SynchronousTestCase):
    """A folder of 10,000 messages, as a long-time user has."""

    def test_secondScanReadsNoMessage(self) -> None:
        """
        After the first scan, scanning 10,000 messages again -- in the same
        session or after a restart -- neither opens nor stats a single
        message file: a client's NOOP or a reconnect stays fast.
        """
        store, mailbox = newMailbox(self)
        root = store.path_for(ALICE)
        count = 10_000
        for n in range(count):
            data = b"Subject: %d\n\nbody\n" % n
            base = f"{1_700_000_000 + n}.M{n:06d}P1"
            if n % 2:
                # As Dovecot names them: sizes in the name.
                name = f"{base}.dovecot,S={len(data)},W={len(data) + 4}:2,S"
            else:
                name = f"{base}.mutt:2,"
            fd = os.open(root / "cur" / name, os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, data)
            os.close(fd)
        inbox = mailbox.folder("INBOX")
        first = inbox.scan()
        self.assertEqual([i.uid for i in first], list(range(1, count + 1)))
        # Measured for mutt's (three lines); taken from ",W=" for Dovecot's.
        self.assertEqual(first[0].crlf_size, first[0].size + 3)
        self.assertEqual(first[1].crlf_size, first[1].size + 4)
        self.assertEqual(sum(1 for i in first if i.flags), count // 2)
        touched = recordFileAccess(self)
        self.assertEqual(inbox.scan(), first)
        self.assertEqual(messageFiles(touched)[:3], [])
        self.assertEqual(Folder(inbox.path, "INBOX", HOST).scan(), first)
        self.assertEqual(messageFiles(touched)[:3], [])


class UnreadableMessageTests(SynchronousTestCase):
    def test_unreadable_file_skipped(self):
        """A message file that cannot be read (no ,W= size in its name, so
        it must be read) is skipped with a log line; the folder still
        opens and lists the others, and it comes back once readable."""
        import builtins

        from twisted.logger import globalLogPublisher

        root = Path(self.mktemp())
        store = MaildirStore(root, "mx.example.test")
        inbox = store.create("alice@example.test")
        (inbox / "cur" / "1.mutt:2,S").write_bytes(b"Subject: a\n\nA\n")
        (inbox / "cur" / "2.mutt:2,").write_bytes(b"Subject: b\n\nB\n")
        real_open = builtins.open

        def failing_open(path, *args, **kwargs):
            if str(path).endswith("2.mutt:2,"):
                raise PermissionError(13, "Permission denied")
            return real_open(path, *args, **kwargs)

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.patch(builtins, "open", failing_open)
        folder = Folder(inbox, "INBOX")
        self.assertEqual([info.key for info in folder.scan()], ["1.mutt"])
        self.assertTrue(any("skipping unreadable message" in e.get("log_format", "") for e in events))
        self.patch(builtins, "open", real_open)
        self.assertEqual([info.key for info in folder.scan()], ["1.mutt", "2.mutt"])

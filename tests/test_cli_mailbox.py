"""
Tests for C{mailsys mailbox ...}: every command end to end through
L{mailsys.cli.main}, as an administrator runs it next to a live server, on
maildirs built with the store's own delivery and append.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import mailsys
from mailsys import cli
from mailsys.maildir import DeliveryError, Folder, Mailbox, MaildirStore

from .test_cli import CommandTestCase
from .test_inspection import BROKEN_MIME, LATIN1, LUNCH, MBOX, MIME, NESTED, message

ALICE = "alice@example.test"


class TerminalError(io.StringIO):
    """Standard error that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


def build_large_folder(root: Path, address: str, count: int) -> Path:
    """
    A maildir of C{count} messages written straight into C{cur/} (far
    quicker than delivering each): the first half with sizes in their
    names as mailsys and Dovecot write them, the rest as mutt does.  Dates
    increase with the number, so message C{n} is the (n+1)th oldest.
    """
    store = MaildirStore(root, "mail.example.test")
    maildir = store.create(address)
    for n in range(count):
        when = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(1e9 + n * 60))
        data = (
            f"From: Sender {n} <s{n}@example.org>\nSubject: =?utf-8?q?Nr=2E_{n}?=\n"
            f"Date: {when}\n\nMessage {n}.\n"
        ).encode()
        if n < count // 2:
            wsize = len(data) + data.count(b"\n")
            name = f"{1_700_000_000 + n}.M{n:06d}P1.bench,S={len(data)},W={wsize}:2,S"
        else:
            name = f"{1_700_000_000 + n}.M{n:06d}P1.mutt:2,"
        fd = os.open(maildir / "cur" / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        os.write(fd, data)
        os.close(fd)
    return maildir


class MailboxCommandTestCase(CommandTestCase):
    """A configuration, a store, and a way to run commands that write bytes."""

    def setUp(self) -> None:
        super().setUp()
        self.maildirs = MaildirStore(self.state / "mail", "mail.example.test")

    def run_command(self, *argv: str, terminal: bool = False) -> tuple[int, bytes, str]:
        """
        Run C{mailsys --config FILE ARGV...} with stdout able to take
        bytes; return the status, stdout's bytes and stderr.
        """
        raw = io.BytesIO()
        stdout = io.TextIOWrapper(raw, encoding="utf-8", newline="\n")
        stderr = TerminalError() if terminal else io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", stderr)
        status = cli.main(["--config", str(self.config), *argv])
        stdout.flush()
        return status, raw.getvalue(), stderr.getvalue()

    def mailbox(self, *argv: str, terminal: bool = False) -> tuple[int, str, str]:
        """C{mailsys mailbox ARGV...} with stdout as text."""
        status, out, err = self.run_command("mailbox", *argv, terminal=terminal)
        return status, out.decode("utf-8"), err

    def json(self, *argv: str) -> object:
        """The JSON document C{mailsys mailbox ARGV... --json} prints."""
        status, out, err = self.mailbox(*argv, "--json")
        self.assertEqual((status, err), (0, ""))
        return json.loads(out)

    def deliver(self, data: bytes, address: str = ALICE) -> Path:
        [path] = self.maildirs.deliver([address], io.BytesIO(data))
        return path

    def files(self) -> list[str]:
        """Every message file in the store, with its directory."""
        found = []
        for directory, _, names in os.walk(self.maildirs.root):
            if os.path.basename(directory) in ("cur", "new", "tmp"):
                found.extend(os.path.join(directory, n) for n in names)
        return sorted(found)

    def fixture(self) -> Mailbox:
        """
        Alice (a user) with a multipart message, a latin-1 one, a forwarded
        one, one with broken MIME and a Sent folder; postmaster with mail
        but no user.
        """
        self.add_users(ALICE, "bob@example.test")
        self.deliver(LUNCH)
        self.deliver(MIME)
        self.deliver(LATIN1)
        self.deliver(NESTED)
        mailbox = Mailbox(self.maildirs, ALICE)
        mailbox.ensure_special_folders()
        sent = mailbox.folder("Sent")
        reply = message("re: lunch", "Mon, 13 Nov 2023 13:00:00 +0000", ALICE)
        sent.append(reply, ["\\Seen"])
        bounce = b"From: x@example.org\nSubject: bounce\n\n"
        self.deliver(bounce, "postmaster@example.test")
        return mailbox

    def add_users(self, *addresses: str) -> None:
        """Add users to the user directory (their maildirs are not made)."""
        users = self.store()
        for address in addresses:
            users.add(address, "pw")


class ListTests(MailboxCommandTestCase):
    """C{mailbox list} and C{mailbox stats}."""

    def test_list(self) -> None:
        """
        Every user and every maildir, a line per folder with messages,
        unseen and size, aligned; a maildir without a user and a user
        without a maildir are noted.
        """
        self.fixture()
        status, out, err = self.mailbox("list")
        self.assertEqual((status, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(
            lines[0], "ADDRESS                  FOLDER  MESSAGES  UNSEEN  SIZE  NOTE"
        )
        self.assertRegex(lines[1], r"^alice@example.test       INBOX +4 +4 +1\.2K$")
        self.assertRegex(lines[4], r"^alice@example.test       Sent +1 +0 +101$")
        self.assertEqual(
            lines[6:],
            [
                "bob@example.test         -              0       0     0  no maildir",
                "postmaster@example.test  INBOX          1       1    37  no user",
                "-- 3 mailboxes, 6 messages, 1.3K",
            ],
        )

    def test_listJson(self) -> None:
        """The same as one JSON document with exact sizes."""
        self.fixture()
        document = self.json("list")
        alice, bob, postmaster = document["mailboxes"]
        self.assertEqual(
            (alice["address"], alice["user"], alice["maildir"], alice["messages"]),
            (ALICE, True, True, 5),
        )
        self.assertEqual(
            alice["folders"][0],
            {
                "name": "INBOX",
                "messages": 4,
                "unseen": 4,
                "size": sum(len(m) for m in (LUNCH, MIME, LATIN1, NESTED)),
            },
        )
        self.assertEqual([f["name"] for f in alice["folders"]], [
            "INBOX", "Drafts", "Junk", "Sent", "Trash"])
        self.assertEqual((bob["maildir"], bob["folders"]), (False, []))
        self.assertEqual((postmaster["user"], postmaster["unseen"]), (False, 1))

    def test_damagedUserFile(self) -> None:
        """A damaged users file is one line; the maildirs are still listed."""
        self.deliver(b"Subject: x\n\n")
        (self.state / "users.json").write_text("{")
        status, out, err = self.mailbox("list")
        self.assertEqual(status, 0)
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("not valid JSON; listing the maildirs on disk only", err)
        self.assertIn("alice@example.test", out)

    def test_stats(self) -> None:
        """Per domain (configured ones even without mail): users, mailboxes,
        messages, size; then the totals."""
        self.fixture()
        status, out, err = self.mailbox("stats")
        self.assertEqual((status, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(lines[0], "DOMAIN        USERS  MAILBOXES  MESSAGES  SIZE")
        self.assertEqual(lines[1], "example.test      2          2         6  1.3K")
        self.assertEqual(lines[2], "other.test        0          0         0     0")
        self.assertEqual(lines[3], "total             2          2         6  1.3K")
        document = self.json("stats")
        self.assertEqual(
            [d["domain"] for d in document["domains"]], ["example.test", "other.test"]
        )
        self.assertEqual(document["total"]["messages"], 6)
        self.assertEqual(
            document["total"]["size"], document["domains"][0]["size"]
        )


class LsTests(MailboxCommandTestCase):
    """C{mailbox ls}."""

    def test_table(self) -> None:
        """
        UID, date, sender and subject decoded, size, flags; aligned, newest
        last; the folder is chosen with --folder.
        """
        self.fixture()
        status, out, err = self.mailbox("ls", ALICE)
        self.assertEqual((status, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(
            lines[:4],
            [
                "UID  DATE              FROM                     SUBJECT"
                "            SIZE  FLAGS",
                "  1  2023-11-13 12:00  Bob <b@x.org>            lunch"
                "                88",
                "  2  2023-11-14 22:13  Jörg <bob@example.org>   Grüße aus München"
                "   619",
                "  3  2023-11-15 07:00  Café <cafe@example.org>  Menü"
                "                151",
            ],
        )
        # No Date: header: the date it arrived, so the newest.
        self.assertRegex(
            lines[4],
            r"^  4  \d{4}-\d\d-\d\d \d\d:\d\d  dan@example.org"
            r" +forwarded +360$",
        )
        self.assertEqual(lines[5], "-- 4 messages")
        status, out, err = self.mailbox("ls", ALICE, "--folder", "Sent")
        self.assertEqual(out.splitlines()[1][-3:], "  S")

    def test_json(self) -> None:
        """--json: one document with stable keys; --limit keeps the newest."""
        self.fixture()
        document = self.json("ls", ALICE)
        self.assertEqual((document["address"], document["folder"]), (ALICE, "INBOX"))
        mime = document["messages"][1]
        self.assertEqual(
            set(mime),
            {"folder", "uid", "key", "date", "internal_date", "from", "subject",
             "size", "flags"},
        )
        self.assertEqual(
            (mime["uid"], mime["date"], mime["subject"], mime["size"], mime["flags"]),
            (2, "2023-11-14T22:13:20Z", "Grüße aus München", len(MIME), []),
        )
        self.assertEqual(mime["from"], "Jörg <bob@example.org>")
        newest = self.json("ls", ALICE, "--limit", "2")["messages"]
        self.assertEqual([m["uid"] for m in newest], [3, 4])
        self.assertEqual(self.json("ls", ALICE, "--limit", "0")["messages"], [])
        # Folder names are case-sensitive, as in IMAP (except INBOX).
        self.assertUserError(
            self.mailbox("ls", ALICE, "--folder", "sent", "--json"),
            "alice@example.test: no such folder: 'sent'",
        )
        sent = self.json("ls", "ALICE@example.TEST", "--folder", "Sent")
        self.assertEqual(sent["messages"][0]["flags"], ["seen"])

    def test_missing(self) -> None:
        """
        A missing user or folder, an invalid address or a hostile folder
        name is one line and exit status 2, and nothing is created.
        """
        self.fixture()
        before = sorted(p.name for p in (self.state / "mail").rglob("*"))
        self.assertUserError(
            self.mailbox("ls", "nobody@example.test"),
            "no such mailbox: nobody@example.test",
        )
        self.assertUserError(
            self.mailbox("ls", ALICE, "--folder", "Archive"),
            "alice@example.test: no such folder: 'Archive'",
        )
        self.assertUserError(
            self.mailbox("ls", "../../etc/passwd"),
            "not a mailbox address: '../../etc/passwd'",
        )
        for hostile in ("../../bob", ".Sent", "a\x1b[2Jb", "cur"):
            status, out, err = self.mailbox("ls", ALICE, "--folder", hostile)
            self.assertEqual(status, 2)
            self.assertEqual(len(err.splitlines()), 1)
            self.assertTrue(err.startswith("mailsys: folder name"), err)
            self.assertNotIn("\x1b", err)
        after = sorted(p.name for p in (self.state / "mail").rglob("*"))
        self.assertEqual(after, before)

    def test_damagedFile(self) -> None:
        """
        A damaged file (empty, truncated, not mail) is one line on stderr
        each and skipped; the rest is listed and the status is 0.
        """
        self.fixture()
        cur = self.state / "mail" / "example.test" / "alice" / "cur"
        (cur / "1600000000.M1P1.host:2,").write_bytes(b"")
        with open(self.deliver(MIME), "r+b") as f:
            f.truncate(50)
        (cur / "1600000001.M1P1.host:2,").write_bytes(b"\x89PNG\r\n")
        status, out, err = self.mailbox("ls", ALICE)
        self.assertEqual(status, 0)
        self.assertEqual(len(out.splitlines()), 6)
        problems = err.splitlines()
        self.assertEqual(len(problems), 3)
        for line in problems:
            self.assertTrue(line.startswith("mailsys: INBOX: message "), line)
            self.assertTrue(line.endswith("; skipped"), line)
        self.assertIn(f"truncated: 50 of {len(MIME)} bytes", err)

    def test_readOnly(self) -> None:
        """
        Listing, showing, searching and exporting move no message file:
        mail in new/ stays new for the POP3 and IMAP clients.
        """
        self.fixture()
        before = self.files()
        self.assertTrue(any("/new/" in path for path in before))
        for argv in (
            ("list",),
            ("stats",),
            ("ls", ALICE),
            ("show", ALICE, "2"),
            ("show", ALICE, "2", "--raw"),
            ("search", ALICE, "--all-folders", "--text", "x"),
            ("export", ALICE, "--mbox", str(self.base / "out.mbox")),
        ):
            self.assertEqual(self.run_command("mailbox", *argv)[0], 0, argv)
        self.assertEqual(self.files(), before)

    def test_tenThousand(self) -> None:
        """
        A 10,000-message folder lists in seconds, whole, newest last, and
        again from the cache; --limit gives the newest.
        """
        build_large_folder(self.state / "mail", ALICE, 10_000)
        start = time.monotonic()
        status, out, err = self.mailbox("ls", ALICE)
        first = time.monotonic() - start
        self.assertEqual((status, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(len(lines), 10_002)
        self.assertRegex(
            lines[1], r"^    1  2001-09-09 01:46  Sender 0 <s0@example.org> +Nr\. 0 "
        )
        self.assertRegex(
            lines[-2],
            r"^10000  2001-09-16 00:25  Sender 9999 <s9999@example\.or…"
            r"  Nr\. 9999 +123$",
        )
        self.assertEqual(lines[-1], "-- 10000 messages")
        start = time.monotonic()
        document = self.json("ls", ALICE, "--limit", "3")
        second = time.monotonic() - start
        self.assertEqual([m["subject"] for m in document["messages"]],
                         ["Nr. 9997", "Nr. 9998", "Nr. 9999"])
        # Generous bounds: they catch a quadratic scan, not a slow machine.
        self.assertLess(first, 20)
        self.assertLess(second, 20)

    def test_progress(self) -> None:
        """
        On a terminal, stderr shows DONE/TOTAL and clears it before the
        output; anywhere else, nothing.
        """
        build_large_folder(self.state / "mail", ALICE, 50)
        status, out, err = self.mailbox("ls", ALICE, terminal=True)
        self.assertEqual(status, 0)
        self.assertTrue(err.startswith("\r1/50"), repr(err))
        self.assertTrue(err.endswith("\r50/50\r     \r"), repr(err))
        self.assertEqual(self.mailbox("ls", ALICE)[2], "")


class ShowTests(MailboxCommandTestCase):
    """C{mailbox show}."""

    def test_show(self) -> None:
        """
        The main headers decoded, the text body decoded from
        quoted-printable and latin-1, then the parts with sizes and names.
        """
        self.fixture()
        status, out, err = self.mailbox("show", ALICE, "2")
        self.assertEqual((status, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(
            lines[:5],
            [
                "From:       Jörg <bob@example.org>",
                "To:         alice@example.test",
                "Cc:         carol@example.test",
                "Date:       Tue, 14 Nov 2023 22:13:20 +0000",
                "Subject:    Grüße aus München",
            ],
        )
        self.assertEqual(lines[5], "Message-ID: <mime@example.org>")
        self.assertTrue(lines[6].startswith("[uid 2 in INBOX, 619, flags -, received "))
        self.assertEqual(
            lines[7:],
            [
                "",
                "Schöne Grüße",
                "",
                "PART  TYPE             SIZE  FILENAME",
                "1     text/plain         12",
                "2     application/pdf    15  report.pdf",
            ],
        )

    def test_byKey(self) -> None:
        """A message is also found by its file name, as 'ls -l cur/' shows it."""
        self.fixture()
        path = self.deliver(LATIN1)
        status, out, err = self.mailbox("show", ALICE, path.name)
        self.assertEqual((status, err), (0, ""))
        self.assertIn("\nCafé crème\n", out)

    def test_headers(self) -> None:
        """--headers prints every header field, decoded, in order."""
        self.fixture()
        status, out, err = self.mailbox("show", ALICE, "3", "--headers")
        self.assertEqual(
            out,
            "From: Café <cafe@example.org>\nSubject: Menü\n"
            "Date: Wed, 15 Nov 2023 08:00:00 +0100\nContent-Type: text/plain\n"
            "Content-Transfer-Encoding: 8bit\n",
        )

    def test_raw(self) -> None:
        """--raw writes the stored bytes exactly, 8-bit and all."""
        self.fixture()
        self.assertEqual(self.run_command("mailbox", "show", ALICE, "3", "--raw"),
                         (0, LATIN1, ""))

    def test_part(self) -> None:
        """
        --part N: a text part decoded to text, a binary one as its decoded
        bytes, an attached message as the message.
        """
        self.fixture()
        self.assertEqual(
            self.run_command("mailbox", "show", ALICE, "2", "--part", "1"),
            (0, "Schöne Grüße".encode(), ""),
        )
        self.assertEqual(
            self.run_command("mailbox", "show", ALICE, "2", "--part", "2"),
            (0, b"%PDF-1.4\n%\xc7\xec\x8f\xa2\n", ""),
        )
        status, out, err = self.run_command(
            "mailbox", "show", ALICE, "4", "--part", "2"
        )
        self.assertTrue(out.startswith(b"From: eve@example.org\n"), out)
        self.assertUserError(
            self.mailbox("show", ALICE, "2", "--part", "7"),
            "message 2 has no part '7' (parts: 1, 2)",
        )

    def test_json(self) -> None:
        """--json: headers, body and parts in one document."""
        self.fixture()
        document = self.json("show", ALICE, "4")
        self.assertEqual(
            (document["uid"], document["subject_header"], document["cc_header"]),
            (4, "forwarded", None),
        )
        self.assertEqual(
            (document["body"], document["body_type"]), ("See below.", "text/plain")
        )
        self.assertEqual(
            [(p["number"], p["type"], p["size"]) for p in document["parts"]],
            [("1", "text/plain", 10), ("2", "message/rfc822", None),
             ("2.1", "text/plain", 12), ("2.2", "text/html", 18)],
        )
        self.assertEqual(
            document["headers"][0], {"name": "From", "value": "dan@example.org"}
        )
        self.assertEqual(document["problems"], [])
        self.assertUserError(
            self.mailbox("show", ALICE, "4", "--raw", "--json"),
            "--raw and --part write the message itself; leave out --json",
        )

    def test_damaged(self) -> None:
        """
        Broken MIME is one line on stderr and the rest is still shown; a
        missing message is one line and status 2.
        """
        self.fixture()
        self.deliver(BROKEN_MIME)
        status, out, err = self.mailbox("show", ALICE, "5")
        self.assertEqual(status, 0)
        self.assertEqual(
            err,
            "mailsys: INBOX: message 5: broken MIME: multipart boundary never found,"
            " multipart without parts\n",
        )
        self.assertIn("Subject:    cut short\n", out)
        self.assertUserError(
            self.mailbox("show", ALICE, "99"), "no message '99' in INBOX"
        )

    def test_hostileText(self) -> None:
        """Escape sequences in a subject or body never reach the terminal."""
        self.add_users(ALICE)
        self.deliver(b"Subject: =?utf-8?q?x=1B]0;owned=07y?=\n\nbody\x1b[2J\n")
        for argv in (
            ("ls", ALICE),
            ("show", ALICE, "1"),
            ("show", ALICE, "1", "--headers"),
        ):
            status, out, err = self.mailbox(*argv)
            self.assertEqual(status, 0)
            self.assertNotIn("\x1b", out)
            self.assertNotIn("\x07", out)


class SearchTests(MailboxCommandTestCase):
    """C{mailbox search}."""

    def test_search(self) -> None:
        """
        Criteria combine; --all-folders adds a FOLDER column; dates are
        YYYY-MM-DD; a bad date is a usage error.
        """
        self.fixture()
        status, out, err = self.mailbox(
            "search", ALICE, "--subject", "LUNCH", "--all-folders"
        )
        self.assertEqual((status, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(
            lines[:3],
            [
                "UID  FOLDER  DATE              FROM                SUBJECT"
                "    SIZE  FLAGS",
                "  1  INBOX   2023-11-13 12:00  Bob <b@x.org>       lunch        88",
                "  1  Sent    2023-11-13 13:00  alice@example.test  re: lunch   101  S",
            ],
        )
        self.assertEqual(lines[3], "-- 2 messages")
        document = self.json(
            "search", ALICE, "--since", "2023-11-14", "--before", "2023-11-16",
            "--text", "crème",
        )
        self.assertEqual([m["subject"] for m in document["messages"]], ["Menü"])
        self.assertEqual(document["folders"], ["INBOX"])
        document = self.json("search", ALICE, "--from", "jörg")
        self.assertEqual([m["uid"] for m in document["messages"]], [2])
        status, out, err = self.mailbox("search", ALICE, "--since", "14/11/2023")
        self.assertEqual(status, 2)
        self.assertIn("not a date (YYYY-MM-DD): '14/11/2023'", err)


class TransferTests(MailboxCommandTestCase):
    """C{mailbox import} and C{mailbox export}."""

    def test_mboxRoundTrip(self) -> None:
        """
        An mbox with quoted From_ lines (LF or CRLF) imports and exports
        back to the same bytes; both say how many messages they moved.
        """
        self.add_users(ALICE)
        self.maildirs.create(ALICE)
        for n, data in enumerate((MBOX, MBOX.replace(b"\n", b"\r\n"))):
            source = self.base / f"in{n}.mbox"
            source.write_bytes(data)
            folder = f"Old{n}"
            status, out, err = self.mailbox(
                "import", ALICE, str(source), "--folder", folder, "--create"
            )
            imported = f"imported 2 messages into {ALICE} {folder}\n"
            self.assertEqual((status, out, err), (0, imported, ""))
            target = self.base / f"out{n}.mbox"
            status, out, err = self.mailbox(
                "export", ALICE, "--folder", folder, "--mbox", str(target)
            )
            self.assertEqual(
                (status, out, err),
                (0, f"exported 2 messages from {ALICE} {folder} to {target}\n", ""),
            )
            self.assertEqual(target.read_bytes(), data.replace(b"\r\n", b"\n"))

    def test_maildirRoundTrip(self) -> None:
        """
        Another maildir imports with its flags and dates: exporting both
        gives the same mbox.
        """
        self.fixture()
        bob = Mailbox(self.maildirs, "bob@example.test")
        self.maildirs.create("bob@example.test")
        source = Mailbox(self.maildirs, ALICE).folder("INBOX")
        first = source.scan()[0]
        source.set_flags(first, ["\\Seen", "\\Answered"])
        document = self.json("import", "bob@example.test", str(source.path))
        self.assertEqual(document, {"address": "bob@example.test", "folder": "INBOX",
                                    "imported": 4, "skipped": 0})
        self.assertEqual(
            [sorted(i.flags) for i in bob.folder("INBOX").scan()],
            [["\\Answered", "\\Seen"], [], [], []],
        )
        for address in (ALICE, "bob@example.test"):
            target = str(self.base / address)
            exported = self.mailbox("export", address, "--mbox", target)
            self.assertEqual(exported[0], 0)
        alice, bob = (self.base / ALICE), (self.base / "bob@example.test")
        self.assertEqual(alice.read_bytes(), bob.read_bytes())

    def test_importErrors(self) -> None:
        """
        An unknown user, a missing folder, a file that is not an mbox: one
        line and status 2.  A user without a maildir gets one.
        """
        self.add_users(ALICE)
        source = self.base / "in.mbox"
        source.write_bytes(MBOX)
        self.assertUserError(
            self.mailbox("import", "nobody@example.test", str(source)),
            "no such mailbox: nobody@example.test",
        )
        self.assertUserError(
            self.mailbox("import", ALICE, str(source), "--folder", "Old"),
            "alice@example.test: no such folder: 'Old' (add --create to make it)",
        )
        self.assertUserError(
            self.mailbox("import", ALICE, str(self.config)),
            f"{self.config}: not an mbox file (it must start with 'From ')",
        )
        status, out, err = self.mailbox("import", ALICE, str(source))
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(len(Mailbox(self.maildirs, ALICE).folder("INBOX").scan()), 2)

    def test_diskFull(self) -> None:
        """
        A folder that cannot be written stops the import with one line
        saying how far it got, and status 1; what was imported stays.
        """
        self.add_users(ALICE)
        source = self.base / "in.mbox"
        source.write_bytes(MBOX)
        real_append = Folder.append

        def append(folder, message, flags=(), internal_date=None):
            if len(folder.scan()) == 1:
                raise DeliveryError("INBOX: No space left on device")
            return real_append(folder, message, flags, internal_date)

        self.patch(Folder, "append", append)
        status, out, err = self.mailbox("import", ALICE, str(source))
        self.assertEqual(
            (status, out, err),
            (1, "", "mailsys: INBOX: No space left on device; stopped after 1"
             " messages\n"),
        )
        self.assertEqual(len(Mailbox(self.maildirs, ALICE).folder("INBOX").scan()), 1)

    def test_importProgress(self) -> None:
        """A broken message is one line and skipped; progress on a terminal."""
        self.add_users(ALICE)
        source = self.base / "in.mbox"
        source.write_bytes(b"From x Tue Nov 14 22:13:20 2023\n\njunk\n\n" + MBOX)
        status, out, err = self.mailbox("import", ALICE, str(source), terminal=True)
        self.assertEqual(
            (status, out),
            (0, f"imported 2 messages into {ALICE} INBOX (1 skipped)\n"),
        )
        self.assertEqual(
            err,
            "\r1/3\r   \rmailsys: mbox message 1: not a mail message: no header"
            " fields; skipped\n\r2/3\r3/3\r   \r",
        )

    def test_exportErrors(self) -> None:
        """A missing directory or folder is one line and status 2."""
        self.fixture()
        self.assertUserError(
            self.mailbox("export", ALICE, "--mbox", "/nonexistent/x.mbox"),
            "/nonexistent/x.mbox: no such directory: /nonexistent",
        )
        self.assertUserError(
            self.mailbox(
                "export", ALICE, "--folder", "Nope", "--mbox", str(self.base / "x")
            ),
            "alice@example.test: no such folder: 'Nope'",
        )
        self.assertFalse((self.base / "x").exists())


class ProcessTests(SynchronousTestCase):
    """C{python -m mailsys.cli mailbox ls} as a real process."""

    def test_process(self) -> None:
        """A script gets the table on stdout, and one line for a missing user."""
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        config = base / "mailsys.toml"
        config.write_text(
            '[server]\nstate_dir = "var"\n[domains]\nnames = ["example.test"]\n'
        )
        store = MaildirStore(base / "var" / "mail", "mail.example.test")
        store.deliver([ALICE], io.BytesIO(MIME))
        source = str(Path(mailsys.__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=source)

        def mailsys_(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-b", "-m", "mailsys.cli", "--config", str(config)]
                + list(argv),
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )

        listed = mailsys_("mailbox", "ls", ALICE)
        self.assertEqual((listed.returncode, listed.stderr), (0, ""))
        self.assertEqual(
            listed.stdout.splitlines()[1],
            "  1  2023-11-14 22:13  Jörg <bob@example.org>  Grüße aus München"
            "   619",
        )
        missing = mailsys_("mailbox", "ls", "nobody@example.test")
        self.assertEqual(
            (missing.returncode, missing.stderr),
            (2, "mailsys: no such mailbox: nobody@example.test\n"),
        )

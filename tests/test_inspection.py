"""
Tests for L{mailsys.inspection}: reading users' mail for an administrator
through the store's own L{Mailbox} and L{Folder}, decoding what mail
really looks like, and moving mail in and out as mbox or maildir.
"""

from __future__ import annotations

import errno
import io
import os
from datetime import date
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailsys import inspection as inspect
from mailsys.inspection import (
    InspectError,
    SearchCriteria,
    decode_header,
    decode_text,
    export_mbox,
    find_message,
    header_date,
    header_fields,
    html_to_text,
    import_messages,
    known_addresses,
    mbox_entry,
    open_folder,
    open_mailbox,
    printable,
    read_message,
    read_part,
    search,
    summarize_messages,
)
from mailsys.maildir import Folder, FolderError, Mailbox, MaildirStore

ALICE = "alice@example.test"

MIME = b"""\
Return-Path: <bob@example.org>
From: =?utf-8?q?J=C3=B6rg?= <bob@example.org>
To: alice@example.test
Cc: carol@example.test
Subject: =?iso-8859-1?q?Gr=FC=DFe?= aus =?utf-8?b?TcO8bmNoZW4=?=
Date: Tue, 14 Nov 2023 22:13:20 +0000
Message-ID: <mime@example.org>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

--outer
Content-Type: text/plain; charset=iso-8859-1
Content-Transfer-Encoding: quoted-printable

Sch=F6ne Gr=FC=DFe
--outer
Content-Type: application/pdf; name="report.pdf"
Content-Disposition: attachment; filename="report.pdf"
Content-Transfer-Encoding: base64

JVBERi0xLjQKJcfsj6IK
--outer--
"""

LATIN1 = (
    b"From: Caf\xe9 <cafe@example.org>\n"
    b"Subject: Men\xfc\n"
    b"Date: Wed, 15 Nov 2023 08:00:00 +0100\n"
    b"Content-Type: text/plain\n"
    b"Content-Transfer-Encoding: 8bit\n"
    b"\n"
    b"Caf\xe9 cr\xe8me\n"
)

NESTED = b"""\
From: dan@example.org
Subject: forwarded
Content-Type: multipart/mixed; boundary="a"

--a
Content-Type: text/plain

See below.
--a
Content-Type: message/rfc822

From: eve@example.org
Subject: the original
Content-Type: multipart/alternative; boundary="b"

--b
Content-Type: text/plain

plain inside
--b
Content-Type: text/html

<p>html inside</p>
--b--

--a--
"""

HTML_ONLY = (
    b"From: news@example.org\nSubject: news\nContent-Type: text/html; charset=utf-8\n\n"
    b"<html><head><title>T</title><style>p {}</style></head>"
    b"<body><p>Hello <b>w\xc3\xb6rld</b> &amp; more</p><script>evil()</script>"
    b"<p>second</p></body></html>\n"
)

BROKEN_MIME = b"""\
From: frank@example.org
Subject: cut short
Date: Thu, 16 Nov 2023 09:00:00 +0000
Content-Type: multipart/mixed; boundary="never"

just text, no boundary at all
"""


def message(subject: str, when: str, sender: str = "bob@example.org") -> bytes:
    return (
        f"From: {sender}\nSubject: {subject}\nDate: {when}\n\nbody of {subject}\n"
    ).encode()


LUNCH = message("lunch", "Mon, 13 Nov 2023 12:00:00 +0000", "Bob <b@x.org>")


class StoreTestCase(SynchronousTestCase):
    """A store in a temporary directory, with Alice's mailbox."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute() / "mail"
        self.store = MaildirStore(self.root, "mail.example.test")
        self.store.create(ALICE)
        self.mailbox = Mailbox(self.store, ALICE)
        self.inbox = open_folder(self.mailbox)
        self.problems: list[str] = []

    def deliver(self, data: bytes, address: str = ALICE) -> Path:
        [path] = self.store.deliver([address], io.BytesIO(data))
        return path

    def files(self) -> list[str]:
        """Every message file name under Alice's maildir, by directory."""
        found = []
        for directory, _, names in os.walk(self.mailbox.root):
            if os.path.basename(directory) in ("cur", "new"):
                found.extend(f"{os.path.basename(directory)}/{n}" for n in names)
        return sorted(found)


class DecodingTests(SynchronousTestCase):
    """Header and text decoding as mail really arrives."""

    def test_encodedWords(self) -> None:
        """
        RFC 2047 words in Q and B encoding are decoded in their charsets;
        white space between adjacent words goes, other text stays.
        """
        self.assertEqual(
            decode_header(b"=?iso-8859-1?q?Gr=FC=DFe?= aus =?utf-8?b?TcO8bmNoZW4=?="),
            "Grüße aus München",
        )
        self.assertEqual(decode_header(b"=?utf-8?q?a?=  \n =?utf-8?q?b?="), "ab")
        self.assertEqual(decode_header(b"=?UTF-8?Q?hello_world?="), "hello world")

    def test_splitCharacter(self) -> None:
        """A UTF-8 character split across two encoded words is joined."""
        self.assertEqual(decode_header(b"=?utf-8?b?w6k=?= =?utf-8?b?w6k=?="), "éé")
        self.assertEqual(decode_header(b"=?utf-8?q?=C3?= =?utf-8?q?=A9?="), "é")

    def test_brokenWords(self) -> None:
        """
        An invalid word stays as written; an unknown charset falls back to
        UTF-8 or Windows-1252; a missing base64 padding is forgiven.
        """
        self.assertEqual(decode_header(b"=?utf-8?b?###?="), "=?utf-8?b?###?=")
        self.assertEqual(decode_header(b"=?x-nonsense?q?caf=E9?="), "café")
        self.assertEqual(decode_header(b"=?base64?q?abc?="), "abc")
        self.assertEqual(decode_header(b"=?utf-8?b?w6k?="), "é")

    def test_rawEightBit(self) -> None:
        """Undeclared 8-bit headers: UTF-8 when valid, else Windows-1252."""
        self.assertEqual(decode_header("Grüße".encode()), "Grüße")
        self.assertEqual(decode_header(b"Men\xfc \x80"), "Menü €")
        self.assertEqual(decode_header(None), "")
        self.assertEqual(decode_text(b"caf\xe9", "iso-8859-1"), "café")
        self.assertEqual(decode_text(b"caf\xc3\xa9", "us-ascii"), "café")

    def test_headerDate(self) -> None:
        """
        A Date: value is read in its time zone; one that does not parse, or
        lies outside 1970 to 9999, counts as none (the file's date is used).
        """
        self.assertEqual(header_date(b"Tue, 14 Nov 2023 23:13:20 +0100"), 1_700_000_000)
        self.assertEqual(header_date(b"14 Nov 2023 22:13:20 GMT"), 1_700_000_000)
        for bad in (
            b"yesterday",
            b"31 Dec 9999 23:59:59 -2359",
            b"1 Jan 1960 00:00:00 GMT",
        ):
            self.assertIsNone(header_date(bad), bad)
        self.assertIsNone(header_date(None))

    def test_headerFields(self) -> None:
        """
        Fields are unfolded and in order; reading stops at the blank line;
        a stray line is kept with the field before it.
        """
        block = (
            b"Subject: a\n long\n\tsubject\nX-Y : z\nnot a field\n\nBody: no\n"
        )
        self.assertEqual(
            header_fields(block),
            [("Subject", b"a long\tsubject"), ("X-Y", b"znot a field")],
        )
        self.assertEqual(decode_header(header_fields(block)[0][1]), "a long subject")

    def test_printable(self) -> None:
        """
        Escape sequences, other control characters and bidirectional
        overrides never reach the terminal; line breaks only when kept.
        """
        self.assertEqual(printable("a\x1b[2Jb\u202ec"), "a\ufffd[2Jb\ufffdc")
        self.assertEqual(printable("a\nb\tc"), "a\ufffdb c")
        self.assertEqual(printable("a\r\nb\tc", keep_lines=True), "a\nb\tc")

    def test_htmlToText(self) -> None:
        """Tags, scripts and styles go; entities are decoded; blocks make lines."""
        text = html_to_text(HTML_ONLY.split(b"\n\n", 1)[1].decode())
        self.assertEqual(text, "Hello wörld & more\n\nsecond\n")


class MailboxTests(StoreTestCase):
    """Finding mailboxes and folders without creating anything."""

    def test_missingMailbox(self) -> None:
        """An unknown or invalid address is an error, and nothing is created."""
        with self.assertRaises(InspectError) as caught:
            open_mailbox(self.store, "Nobody@Example.test")
        self.assertEqual(str(caught.exception), "no such mailbox: nobody@example.test")
        self.assertFalse((self.root / "example.test" / "nobody").exists())
        with self.assertRaises(InspectError):
            open_mailbox(self.store, "../../etc@example.test")

    def test_folders(self) -> None:
        """A missing folder is an error; a hostile name is refused by the store."""
        self.assertEqual(open_mailbox(self.store, "ALICE@example.test").address, ALICE)
        with self.assertRaises(InspectError):
            open_folder(self.mailbox, "Archive")
        for hostile in ("../bob", "a/../../b", "cur", "a\x1bb"):
            self.assertRaises(FolderError, open_folder, self.mailbox, hostile)

    def test_knownAddresses(self) -> None:
        """
        Users and maildirs on disk are merged, sorted by domain; directories
        that could not be mailboxes are left out.
        """
        self.store.create("postmaster@example.test")
        self.store.create("zed@another.test")
        (self.root / "example.test" / "Upper" / "cur").mkdir(parents=True)
        (self.root / "example.test" / "halfmade").mkdir()
        (self.root / "example.test" / "stray-file").write_text("")
        found = known_addresses(self.store, ["bob@example.test", "Alice@Example.test"])
        self.assertEqual(
            found,
            {
                "zed@another.test": False,
                ALICE: True,
                "bob@example.test": True,
                "postmaster@example.test": False,
            },
        )
        self.assertEqual(list(found)[0], "zed@another.test")


class SummaryTests(StoreTestCase):
    """What C{ls} lists."""

    def test_newestLast(self) -> None:
        """
        Messages are ordered by their Date: header, newest last, whatever
        order they arrived in; a missing or unparseable date falls back to
        the file's date.  Sender and subject are decoded.
        """
        self.deliver(message("second", "Wed, 15 Nov 2023 10:00:00 +0000"))
        self.deliver(message("first", "Tue, 14 Nov 2023 10:00:00 +0000"))
        undated = self.inbox.append(b"From: x\nSubject: undated\n\n", (), 1_600_000_000)
        self.inbox.append(b"Subject: bad date\nDate: yesterday\n\n", (), 1_800_000_000)
        self.deliver(MIME)
        summaries = summarize_messages(self.inbox)
        self.assertEqual(
            [s.subject for s in summaries],
            ["undated", "first", "Grüße aus München", "second", "bad date"],
        )
        self.assertEqual(summaries[0].date, 1_600_000_000)
        self.assertEqual(summaries[0].uid, undated.uid)
        self.assertEqual(summaries[2].sender, "Jörg <bob@example.org>")
        self.assertEqual(summaries[2].date, 1_700_000_000)

    def test_readOnly(self) -> None:
        """
        Listing while the server runs moves nothing: mail in new/ stays
        there (a POP3 or IMAP client still sees it as new).
        """
        self.deliver(message("new one", "Tue, 14 Nov 2023 10:00:00 +0000"))
        before = self.files()
        self.assertTrue(before[0].startswith("new/"))
        summarize_messages(self.inbox)
        find_message(self.inbox, "1")
        read_message(self.inbox, find_message(self.inbox, "1"))
        self.assertEqual(self.files(), before)

    def test_damaged(self) -> None:
        """
        An empty file, a truncated one, one without a header and one that
        cannot be read are each reported in one line and skipped; the rest
        is listed.
        """
        good = self.deliver(message("good", "Tue, 14 Nov 2023 10:00:00 +0000"))
        cur = self.mailbox.root / "cur"
        (cur / "1700000001.M1P1.host:2,").write_bytes(b"")
        truncated = self.deliver(MIME)
        with open(truncated, "r+b") as f:
            f.truncate(100)
        (cur / "1700000003.M3P1.host:2,S").write_bytes(b"\x00\x01binary junk\n")
        (cur / "1700000004.M4P1.host:2,S").write_bytes(message("locked", "x"))
        real_headers = Folder.headers

        def headers(folder: Folder, info):
            if info.key.startswith("1700000004."):
                raise PermissionError(errno.EACCES, "Permission denied")
            return real_headers(folder, info)

        self.patch(Folder, "headers", headers)
        summaries = summarize_messages(self.inbox, self.problems.append)
        self.assertEqual([s.key for s in summaries], [good.name])
        self.assertEqual(len(self.problems), 4)
        reasons = "\n".join(self.problems)
        self.assertIn("1700000001.M1P1.host): empty file; skipped", reasons)
        self.assertIn(
            f"({truncated.name}): truncated: 100 of {len(MIME)} bytes", reasons
        )
        self.assertIn("not a mail message: no header fields; skipped", reasons)
        self.assertIn("cannot read: Permission denied; skipped", reasons)
        for problem in self.problems:
            self.assertNotIn("\n", problem)
            self.assertTrue(problem.startswith("INBOX: message "), problem)

    def test_findMessage(self) -> None:
        """A message is found by UID, by key, or by its file name."""
        path = self.deliver(message("one", "Tue, 14 Nov 2023 10:00:00 +0000"))
        info = self.inbox.set_flags(find_message(self.inbox, "1"), ["\\Seen"])
        self.assertEqual(find_message(self.inbox, path.name).uid, 1)
        self.assertEqual(find_message(self.inbox, f"cur/{info.path.name}").uid, 1)
        for missing in ("2", "0", "nonsense", "-1"):
            self.assertRaises(InspectError, find_message, self.inbox, missing)


class MessageTests(StoreTestCase):
    """What C{show} shows."""

    def view(self, data: bytes):
        self.deliver(data)
        return read_message(self.inbox, self.inbox.scan()[-1])

    def test_multipart(self) -> None:
        """
        Headers are decoded; the text part is decoded from quoted-printable
        and latin-1; the attachment is listed with its decoded size and name.
        """
        view = self.view(MIME)
        self.assertEqual(view.header("subject"), "Grüße aus München")
        self.assertEqual(view.header("FROM"), "Jörg <bob@example.org>")
        self.assertEqual(view.header("cc"), "carol@example.test")
        self.assertEqual(view.body, "Schöne Grüße")
        self.assertEqual(view.body_type, "text/plain")
        self.assertEqual(
            [(p.number, p.content_type, p.size, p.filename) for p in view.parts],
            [("1", "text/plain", 12, None), ("2", "application/pdf", 15, "report.pdf")],
        )
        self.assertEqual(view.problems, ())
        self.assertEqual(
            [name for name, _ in view.headers],
            ["Return-Path", "From", "To", "Cc", "Subject", "Date", "Message-ID",
             "MIME-Version", "Content-Type"],
        )

    def test_eightBit(self) -> None:
        """An undeclared latin-1 body and 8-bit headers are readable."""
        view = self.view(LATIN1)
        self.assertEqual(view.body, "Café crème\n")
        self.assertEqual(view.header("subject"), "Menü")
        self.assertEqual(view.summary.sender, "Café <cafe@example.org>")

    def test_nested(self) -> None:
        """
        Parts are numbered as IMAP numbers sections: a forwarded message's
        parts are 2.1 and 2.2; the first text/plain is the body.
        """
        view = self.view(NESTED)
        self.assertEqual(
            [(p.number, p.content_type, p.depth) for p in view.parts],
            [
                ("1", "text/plain", 0),
                ("2", "message/rfc822", 0),
                ("2.1", "text/plain", 1),
                ("2.2", "text/html", 1),
            ],
        )
        self.assertIsNone(view.parts[1].size)
        self.assertEqual(view.body, "See below.")

    def test_htmlOnly(self) -> None:
        """A message with only HTML shows its text without markup."""
        view = self.view(HTML_ONLY)
        self.assertEqual(view.body_type, "text/html")
        self.assertEqual(view.body, "Hello wörld & more\n\nsecond\n")

    def test_brokenMime(self) -> None:
        """Broken MIME is described, and what can be read is still shown."""
        view = self.view(BROKEN_MIME)
        self.assertEqual(
            view.problems,
            ("broken MIME: multipart boundary never found, multipart without parts",),
        )
        self.assertEqual(view.header("subject"), "cut short")

    def test_parts(self) -> None:
        """
        A text part comes decoded to text, a binary one to its bytes, an
        attached message as a message; a multipart or a missing number is
        an error naming the parts there are.
        """
        self.deliver(MIME)
        self.deliver(NESTED)
        mime, nested = self.inbox.scan()
        self.assertEqual(read_part(self.inbox, mime, "1").text, "Schöne Grüße")
        pdf = read_part(self.inbox, mime, "2")
        self.assertEqual((pdf.data, pdf.text), (b"%PDF-1.4\n%\xc7\xec\x8f\xa2\n", None))
        self.assertEqual(pdf.part.filename, "report.pdf")
        forwarded = read_part(self.inbox, nested, "2")
        self.assertIn(b"Subject: the original", forwarded.data)
        html = read_part(self.inbox, nested, "2.2")
        self.assertEqual(html.text, "<p>html inside</p>")
        with self.assertRaises(InspectError) as caught:
            read_part(self.inbox, mime, "3")
        self.assertEqual(
            str(caught.exception), "message 1 has no part '3' (parts: 1, 2)"
        )


class SearchTests(StoreTestCase):
    """What C{search} finds."""

    def setUp(self) -> None:
        super().setUp()
        self.deliver(LUNCH)
        self.deliver(MIME)
        self.deliver(LATIN1)
        self.deliver(BROKEN_MIME)
        self.archive = self.mailbox.create_folder("Archive")
        self.archive.append(message("old lunch", "Sun, 1 Jan 2023 12:00:00 +0000"))

    def subjects(self, folders=None, **criteria) -> list[str]:
        found = search(
            folders or [self.inbox], SearchCriteria(**criteria), self.problems.append
        )
        return [s.subject for s in found]

    def test_headers(self) -> None:
        """From and Subject match case-insensitively in their decoded text."""
        self.assertEqual(self.subjects(sender="BOB"), ["lunch", "Grüße aus München"])
        self.assertEqual(self.subjects(sender="jörg"), ["Grüße aus München"])
        self.assertEqual(self.subjects(subject="münchen"), ["Grüße aus München"])

    def test_dates(self) -> None:
        """C{since} is inclusive and C{before} exclusive, in UTC days."""
        self.assertEqual(
            self.subjects(since=date(2023, 11, 14)),
            ["Grüße aus München", "Menü", "cut short"],
        )
        self.assertEqual(
            self.subjects(since=date(2023, 11, 14), before=date(2023, 11, 15)),
            ["Grüße aus München"],
        )
        self.assertEqual(self.subjects(before=date(2023, 11, 14)), ["lunch"])

    def test_text(self) -> None:
        """
        Text is looked for in the decoded bodies; a message with broken MIME
        is reported and skipped.
        """
        self.assertEqual(self.subjects(text="crème"), ["Menü"])
        self.assertEqual(self.subjects(text="SCHÖNE"), ["Grüße aus München"])
        self.assertEqual(self.subjects(text="no boundary"), [])
        self.assertEqual(len(self.problems), 3)
        self.assertIn("broken MIME", self.problems[0])

    def test_allFolders(self) -> None:
        """Several folders are searched together, newest last."""
        folders = [self.inbox, self.archive]
        found = self.subjects(folders, subject="lunch")
        self.assertEqual(found, ["old lunch", "lunch"])


MBOX = b"""\
From bob@example.org Tue Nov 14 22:13:20 2023
Return-Path: <bob@example.org>
From: bob@example.org
Subject: first
Status: RO

Hello
>From the start of a line
>>From quoted twice
From: is not a From_ line

From MAILER-DAEMON Wed Nov 15 08:00:00 2023
From: carol@example.org
Subject: second
X-Status: F

Second body.

"""


class TransferTests(StoreTestCase):
    """Import and export."""

    def test_importMbox(self) -> None:
        """
        mboxrd quoting is undone, Status/X-Status become flags and the
        From_ line's date the internal date.
        """
        source = Path(self.mktemp())
        source.write_bytes(MBOX)
        done = import_messages(self.inbox, source, self.problems.append)
        self.assertEqual((done.count, done.skipped, self.problems), (2, 0, []))
        first, second = self.inbox.scan()
        with self.inbox.open(first) as f:
            data = f.read()
        self.assertIn(b"\nFrom the start of a line\n>From quoted twice\n", data)
        self.assertTrue(data.endswith(b"From: is not a From_ line\n"))
        self.assertEqual(first.flags, {"\\Seen"})
        self.assertEqual(second.flags, {"\\Flagged"})
        self.assertEqual(first.internal_date, 1_700_000_000)

    def test_roundTrip(self) -> None:
        """Export writes back the very mbox that was imported."""
        source = Path(self.mktemp())
        source.write_bytes(MBOX)
        import_messages(self.inbox, source)
        target = Path(self.mktemp())
        done = export_mbox(self.inbox, target)
        self.assertEqual((done.count, done.skipped), (2, 0))
        self.assertEqual(target.read_bytes(), MBOX)
        self.assertEqual(os.listdir(target.parent), [target.name])

    def test_brokenMessage(self) -> None:
        """A message that is not mail is reported and skipped, not fatal."""
        source = Path(self.mktemp())
        source.write_bytes(
            b"From a Tue Nov 14 22:13:20 2023\n\nno header\n\n" + MBOX
        )
        done = import_messages(self.inbox, source, self.problems.append)
        self.assertEqual((done.count, done.skipped), (2, 1))
        self.assertEqual(
            self.problems,
            ["mbox message 1: not a mail message: no header fields; skipped"],
        )

    def test_notMbox(self) -> None:
        """Neither an mbox file nor a maildir, or the folder itself: refused."""
        plain = Path(self.mktemp())
        plain.write_bytes(b"Subject: x\n\n")
        self.assertRaises(InspectError, import_messages, self.inbox, plain)
        missing = Path("/nonexistent")
        self.assertRaises(InspectError, import_messages, self.inbox, missing)
        self.assertRaises(InspectError, import_messages, self.inbox, plain.parent)
        self.assertRaises(InspectError, import_messages, self.inbox, self.inbox.path)

    def test_importMaildir(self) -> None:
        """
        A foreign maildir's messages keep their bytes, flags and dates; the
        source is not changed.
        """
        source = Path(self.mktemp())
        for sub in ("cur", "new", "tmp"):
            (source / sub).mkdir(parents=True)
        (source / "new" / "1700000000.M1P1.mutt").write_bytes(LATIN1)
        (source / "cur" / "1700000001.M1P1.mutt:2,FS").write_bytes(MIME)
        (source / "cur" / "1700000002.M1P1.mutt:2,S").write_bytes(b"")
        os.utime(source / "new" / "1700000000.M1P1.mutt", (1_600_000_000,) * 2)
        listing = sorted(p.name for p in source.rglob("*"))
        done = import_messages(self.inbox, source, self.problems.append)
        self.assertEqual((done.count, done.skipped), (2, 1))
        self.assertIn("1700000002.M1P1.mutt: not a mail message", self.problems[0])
        latin1, mime = self.inbox.scan()
        self.assertEqual((latin1.flags, latin1.internal_date), (set(), 1_600_000_000))
        self.assertEqual(mime.flags, {"\\Seen", "\\Flagged"})
        with self.inbox.open(mime) as f:
            self.assertEqual(f.read(), MIME)
        self.assertEqual(sorted(p.name for p in source.rglob("*")), listing)

    def test_exportQuoting(self) -> None:
        """
        mboxrd: every From_ line of a message gets one more '>'; the envelope
        sender is the Return-Path, MAILER-DAEMON for none or <>.
        """
        entry = mbox_entry(b"Return-Path: <>\n\nFrom x\n>From y\nno newline", 0)
        self.assertEqual(
            entry,
            b"From MAILER-DAEMON Thu Jan  1 00:00:00 1970\nReturn-Path: <>\n\n"
            b">From x\n>>From y\nno newline\n\n",
        )

    def test_exportUnreadable(self) -> None:
        """
        A message that cannot be read is reported and left out of the file;
        a failing write leaves neither the file nor its temporary.
        """
        self.deliver(message("one", "Tue, 14 Nov 2023 10:00:00 +0000"))
        self.deliver(message("two", "Tue, 14 Nov 2023 11:00:00 +0000"))
        real_open = Folder.open

        def open_(folder, info):
            if info.uid == 1:
                raise OSError(errno.EIO, "Input/output error")
            return real_open(folder, info)

        self.patch(Folder, "open", open_)
        target = Path(self.mktemp())
        done = export_mbox(self.inbox, target, self.problems.append)
        self.assertEqual((done.count, done.skipped), (1, 1))
        self.assertIn(b"Subject: two", target.read_bytes())
        self.assertNotIn(b"Subject: one", target.read_bytes())
        self.assertIn("cannot read: Input/output error", self.problems[0])

        def failing(data, when):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(inspect, "mbox_entry", failing)
        other = Path(self.mktemp())
        self.assertRaises(OSError, export_mbox, self.inbox, other)
        self.assertEqual(os.listdir(other.parent), [])
        self.assertRaises(
            InspectError, export_mbox, self.inbox, Path("/nonexistent/dir/x.mbox")
        )

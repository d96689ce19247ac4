"""
Keywords over IMAP: the tags Thunderbird sets ($Forwarded, $Junk/$NotJunk,
Junk/NonJunk, $label1...) are stored, listed in FLAGS and PERMANENTFLAGS,
kept by APPEND, COPY and MOVE, searched with KEYWORD/UNKEYWORD, and refused
with a clear NO past the 26 a maildir folder can hold.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.test_imap_server import FIRST, SECOND, ServerTestMixin, lines, tagged

SYSTEM = b"\\Answered \\Flagged \\Deleted \\Seen \\Draft"


class KeywordTests(ServerTestMixin, SynchronousTestCase):
    def run_command(self, proto, transport, command: bytes) -> bytes:
        return self.say(proto, transport, command + b"\r\n")

    def test_thunderbird_forwarded(self):
        """Thunderbird's `uid store n +FLAGS ($Forwarded)` announces the new
        keyword, then the message's flags; a fresh session sees it in
        SELECT's FLAGS and on the message, and Dovecot would too."""
        self.deliver(FIRST, SECOND)
        proto, transport = self.logged_in()
        out = self.run_command(proto, transport, b"5 uid store 2 +FLAGS ($Forwarded)")
        self.assertEqual(
            lines(out),
            [
                b"* FLAGS (" + SYSTEM + b" $Forwarded)",
                b"* OK [PERMANENTFLAGS ("
                + SYSTEM
                + b" $Forwarded \\*)] Flags permitted",
                b"* 2 FETCH (UID 2 FLAGS (\\Recent $Forwarded))",
                b"5 OK STORE completed",
            ],
        )
        inbox = self.root / "example.test" / "alice"
        self.assertEqual((inbox / "dovecot-keywords").read_bytes(), b"0 $Forwarded\n")
        fresh, fresh_transport = self.logged_in(select=None)
        out = self.run_command(fresh, fresh_transport, b"s SELECT INBOX")
        self.assertIn(b"* FLAGS (" + SYSTEM + b" $Forwarded)\r\n", out)
        out = self.run_command(fresh, fresh_transport, b"f UID FETCH 1:* (FLAGS)")
        self.assertIn(b"* 2 FETCH (UID 2 FLAGS ($Forwarded))", out)
        self.assertIn(b"* 1 FETCH (UID 1 FLAGS ())", out)

    def test_store_keywords(self):
        """Keywords compare case-insensitively and keep the folder's
        spelling; -FLAGS and FLAGS change them as they do system flags;
        Thunderbird's junk tags live side by side."""
        self.deliver(FIRST)
        proto, transport = self.logged_in()
        out = self.run_command(proto, transport, b"a STORE 1 +FLAGS (Junk $label1)")
        self.assertIn(b"* 1 FETCH (FLAGS (\\Recent $label1 Junk))", out)
        out = self.run_command(proto, transport, b"b STORE 1 -FLAGS (junk)")
        self.assertIn(b"* 1 FETCH (FLAGS (\\Recent $label1))", out)
        self.assertNotIn(b"* FLAGS", out)
        out = self.run_command(
            proto, transport, b"c STORE 1 FLAGS (\\Seen NonJunk $NotJunk)"
        )
        self.assertIn(b"* 1 FETCH (FLAGS (\\Seen \\Recent $NotJunk NonJunk))", out)
        self.assertIn(
            b"* FLAGS (" + SYSTEM + b" $NotJunk $label1 Junk NonJunk)\r\n", out
        )
        out = self.run_command(proto, transport, b"d STORE 1 +FLAGS ($LABEL1)")
        self.assertIn(
            b"* 1 FETCH (FLAGS (\\Seen \\Recent $NotJunk $label1 NonJunk))", out
        )
        [info] = self.mailbox().folder("INBOX").scan()
        self.assertEqual(info.flags, {"\\Seen", "$label1", "NonJunk", "$NotJunk"})
        out = self.run_command(
            proto, transport, b"e STORE 1 +FLAGS (" + b"x" * 200 + b")"
        )
        self.assertIn(b"e NO not a valid keyword", out)

    def test_another_session_defines_keyword(self):
        """A keyword another session sets reaches a NOOP: FLAGS and
        PERMANENTFLAGS first, then the message's flags."""
        self.deliver(FIRST)
        watcher, watcher_transport = self.logged_in()
        other, other_transport = self.logged_in()
        self.run_command(other, other_transport, b"a STORE 1 +FLAGS ($Junk)")
        out = self.run_command(watcher, watcher_transport, b"n NOOP")
        self.assertEqual(
            lines(out),
            [
                b"* FLAGS (" + SYSTEM + b" $Junk)",
                b"* OK [PERMANENTFLAGS (" + SYSTEM + b" $Junk \\*)] Flags permitted",
                b"* 1 FETCH (UID 1 FLAGS (\\Recent $Junk))",
                b"n OK NOOP completed",
            ],
        )

    def test_append_copy_move_keep_keywords(self):
        """APPEND stores the keywords it is given; COPY and MOVE carry them
        into the target folder."""
        self.deliver(FIRST)
        proto, transport = self.logged_in()
        out = self.run_command(
            proto, transport, b"a APPEND Drafts (\\Draft $label2) {10+}\r\nSubject: x"
        )
        self.assertIn(b"a OK [APPENDUID", out)
        [draft] = self.mailbox().folder("Drafts").scan()
        self.assertEqual(draft.flags, {"\\Draft", "$label2"})
        self.run_command(proto, transport, b"b STORE 1 +FLAGS (\\Seen $Forwarded)")
        out = self.run_command(proto, transport, b"c COPY 1 Sent")
        self.assertIn(b"c OK [COPYUID", out)
        out = self.run_command(proto, transport, b"d MOVE 1 Trash")
        self.assertIn(b"d OK MOVE completed", out)
        for name in ("Sent", "Trash"):
            [copy] = self.mailbox().folder(name).scan()
            self.assertEqual(copy.flags, {"\\Seen", "$Forwarded"}, name)
        out = self.run_command(proto, transport, b"e SELECT Trash")
        self.assertIn(b"* FLAGS (" + SYSTEM + b" $Forwarded)", out)

    def test_limit(self):
        """Past 26 keywords a STORE of a new one is NO [LIMIT] saying why,
        and the message is unchanged; PERMANENTFLAGS stops offering \\*;
        APPEND and COPY store the message and say which keyword was left
        out."""
        self.deliver(FIRST)
        names = [f"$k{n}" for n in range(26)]
        inbox = self.mailbox().folder("INBOX")
        inbox.define_keywords(names)
        proto, transport = self.logged_in(select=None)
        out = self.run_command(proto, transport, b"s SELECT INBOX")
        permanent = [line for line in lines(out) if b"PERMANENTFLAGS" in line][0]
        self.assertNotIn(b"\\*", permanent)
        self.assertIn(b"$k25", permanent)
        out = self.run_command(proto, transport, b"a STORE 1 +FLAGS (\\Seen $k3 $new)")
        self.assertEqual(
            tagged(out, b"a"),
            b"a NO [LIMIT] cannot add keyword $new: folder 'INBOX' holds 26 keywords"
            b" already, all a maildir file name can carry",
        )
        [info] = inbox.scan()
        self.assertEqual(info.flags, frozenset())
        out = self.run_command(
            proto, transport, b"b APPEND INBOX ($new $k1) {10+}\r\nSubject: x"
        )
        self.assertIn(
            b"] APPEND completed"
            b" (keywords not stored, the folder holds 26 already: $new)",
            tagged(out, b"b"),
        )
        self.assertEqual(inbox.scan()[-1].flags, {"$k1"})
        self.run_command(proto, transport, b"c STORE 1 +FLAGS ($k0)")
        full = self.mailbox().create_folder("Fuller")
        full.define_keywords([f"$o{n}" for n in range(26)])
        out = self.run_command(proto, transport, b"d COPY 1 Fuller")
        self.assertIn(
            b"COPY completed (keywords not stored, the folder holds 26 already: $k0)",
            tagged(out, b"d"),
        )
        [copy] = full.scan()
        self.assertEqual(copy.flags, frozenset())

    def test_examine_lists_keywords(self):
        """EXAMINE lists the folder's keywords (here written by Dovecot) in
        FLAGS; nothing is permanent."""
        self.deliver(FIRST)
        inbox = self.root / "example.test" / "alice"
        (inbox / "dovecot-keywords").write_bytes(b"0 $Junk\n1 $label3\n")
        proto, transport = self.logged_in(select=None)
        out = self.run_command(proto, transport, b"e EXAMINE INBOX")
        self.assertIn(b"* FLAGS (" + SYSTEM + b" $Junk $label3)\r\n", out)
        self.assertIn(b"* OK [PERMANENTFLAGS ()]", out)

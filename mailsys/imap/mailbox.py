"""
The IMAP view of the store: the logged-in account, and the session's picture
of its selected folder (message sequence numbers, \\Recent, what it last
told the client) over L{mailsys.maildir.Mailbox} and L{Folder}.

The store knows nothing of sequence numbers or of what one session has
already announced; this module does, and turns a fresh scan of the folder
into the untagged EXISTS / EXPUNGE / FETCH FLAGS responses RFC 3501 7.3-7.4
asks for.  The functions marked "blocking" touch the disk and are called
from the session through the thread pool.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

from zope.interface import Attribute, Interface, implementer

from mailsys.imap import syntax
from mailsys.imap.syntax import BadCommand, SequenceSet

# The IMAP system flags the maildir info letters hold (upper-case letters);
# keywords ($Forwarded, $Junk...) take the lower-case ones, 26 per folder.
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
MAX_KEYWORDS = 26
HIERARCHY = "/"


class IIMAPAccount(Interface):
    """
    What the realm hands the IMAP server for a logged-in user (the avatar
    interface the portal is asked for).
    """

    address = Attribute("The user's address, a str.")

    def mailbox(hostname: str) -> Any:
        """The user's L{mailsys.maildir.Mailbox}; C{hostname} names new files."""


@implementer(IIMAPAccount)
class IMAPAccount:
    """
    A logged-in IMAP user.  The store object is made per session, on
    demand, with the listener's host name (it goes into the names of the
    files APPEND writes).

    @param open_mailbox: builds the C{Mailbox} for a host name; the real
        maildir by default, an in-memory one in tests.
    """

    def __init__(
        self,
        address: str,
        maildir: Path | None = None,
        open_mailbox: Callable[[str], Any] | None = None,
    ) -> None:
        self.address = address
        self.maildir = maildir
        self._open_mailbox = open_mailbox

    def mailbox(self, hostname: str) -> Any:
        if self._open_mailbox is not None:
            return self._open_mailbox(hostname)
        from mailsys.maildir import Mailbox, MaildirStore

        assert self.maildir is not None
        # The maildir is <root>/<domain>/<local>: the store's root is two up.
        store = MaildirStore(Path(self.maildir).parent.parent, hostname)
        return Mailbox(store, self.address)


def imap_avatar(user: Any) -> IMAPAccount:
    """The avatar factory for C{MailRealm}, keyed by L{IIMAPAccount}."""
    return IMAPAccount(user.address, Path(user.maildir))


# -- the selected folder ------------------------------------------------------


def _in_new(info: Any) -> bool:
    return Path(info.path).parent.name == "new"


class FolderScan(NamedTuple):
    """A look at the selected folder: what a session tells its client."""

    infos: list[Any]
    # The UIDs of the messages that are \\Recent for this session.
    recent: set[int]
    # The keywords defined in the folder, for FLAGS and PERMANENTFLAGS.
    keywords: tuple[str, ...]


def scan_folder(folder: Any, claim: bool) -> FolderScan:
    """
    Blocking.  The folder's messages, the UIDs of those that are \\Recent
    (RFC 3501 2.3.2) and its keywords.  With C{claim} (a read-write
    SELECT) the messages in C{new/} are moved to C{cur/} and are recent
    for this session only; read-only, whatever is still in C{new/} is
    recent.
    """
    infos = folder.scan(claim_new=claim)
    keywords = tuple(folder.keywords())
    if claim:
        recent = {info.uid for info in infos if folder.is_recent(info)}
    else:
        recent = {info.uid for info in infos if _in_new(info)}
    return FolderScan(infos, recent, keywords)


class ChangeWatch:
    """
    Whether a folder may have changed since the last look, from the
    modification times of its C{new/} and C{cur/} (every delivery, flag
    change and expunge renames or unlinks there), so an IDLE session polls
    a 10,000-message folder with two C{stat}s instead of a scan.  A
    directory changed in the last two seconds always counts as changed,
    which covers file systems with coarse timestamps.
    """

    SETTLE_NS = 2_000_000_000

    def __init__(self) -> None:
        self._stamps: tuple[int, ...] | None = None

    def may_have_changed(self, folder: Any) -> bool:
        """Blocking (two C{stat}s)."""
        try:
            stamps = tuple(
                os.stat(Path(folder.path) / sub).st_mtime_ns for sub in ("new", "cur")
            )
        except OSError:
            return True
        now = time.time_ns()
        settled = all(now - stamp > self.SETTLE_NS for stamp in stamps)
        if stamps == self._stamps and settled:
            return False
        self._stamps = stamps
        return True


def poll_folder(folder: Any, claim: bool, watch: ChangeWatch) -> FolderScan | None:
    """Blocking.  L{scan_folder}, or C{None} when nothing can have changed."""
    if not watch.may_have_changed(folder):
        return None
    return scan_folder(folder, claim)


@dataclass
class Entry:
    """One message of the selected folder with its sequence number."""

    seq: int
    info: Any


class FolderView:
    """
    What one session has told its client about the selected folder: the
    messages in sequence-number order, which of them are \\Recent for this
    session, and whether it may change anything (EXAMINE, read-only
    listener).
    """

    def __init__(
        self,
        name: str,
        folder: Any,
        read_only: bool,
        infos: list[Any],
        recent: set[int],
        uidvalidity: int,
        keywords: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.keywords = tuple(keywords)
        self.uidvalidity = uidvalidity
        self.folder = folder
        self.read_only = read_only
        self.messages: list[Any] = list(infos)
        self.recent = set(recent)
        self.watch = ChangeWatch()
        self._index = {info.uid: i for i, info in enumerate(self.messages)}

    def __len__(self) -> int:
        return len(self.messages)

    def _reindex(self) -> None:
        self._index = {info.uid: i for i, info in enumerate(self.messages)}

    def flag_lines(self) -> list[bytes]:
        """
        RFC 3501 7.2.6 FLAGS and 7.1 PERMANENTFLAGS: the system flags and
        the folder's keywords; C{\\*} while new keywords can still be
        made; nothing is permanent in a read-only session.
        """
        flags = syntax.flag_list(list(SYSTEM_FLAGS) + list(self.keywords))
        if self.read_only:
            permanent = b"()"
        elif len(self.keywords) < MAX_KEYWORDS:
            permanent = flags[:-1] + b" \\*)"
        else:
            permanent = flags
        return [
            b"* FLAGS " + flags,
            b"* OK [PERMANENTFLAGS " + permanent + b"] Flags permitted",
        ]

    def learn_keywords(self, keywords: Sequence[str]) -> list[bytes]:
        """
        Take the folder's keywords now; the FLAGS and PERMANENTFLAGS
        responses to send if they changed (RFC 3501 7.2.6: a client must
        hear of a new keyword before it sees a message carry it).
        """
        if tuple(keywords) == self.keywords:
            return []
        self.keywords = tuple(keywords)
        return self.flag_lines()

    def flags(self, info: Any) -> frozenset[str]:
        """The flags to show for C{info}, \\Recent included."""
        if info.uid in self.recent:
            return frozenset(info.flags) | {"\\Recent"}
        return frozenset(info.flags)

    def select(self, messages: SequenceSet, uid: bool) -> list[Entry]:
        """
        The messages a set names, in sequence order.  A message number past
        the end is a client error (BAD); UIDs that are not (or no longer)
        here are skipped (RFC 3501 6.4.8).
        """
        if uid:
            if not self.messages:
                return []
            largest = self.messages[-1].uid
            bounds = list(messages.bounds(largest))
            return [
                Entry(i + 1, info)
                for i, info in enumerate(self.messages)
                if any(low <= info.uid <= high for low, high in bounds)
            ]
        count = len(self.messages)
        if count == 0 or messages.highest(count) > count:
            raise BadCommand("invalid message sequence number")
        chosen: set[int] = set()
        for low, high in messages.bounds(count):
            if low < 1:
                raise BadCommand("invalid message sequence number")
            chosen.update(range(low, high + 1))
        return [Entry(seq, self.messages[seq - 1]) for seq in sorted(chosen)]

    def sequence_of(self, uid: int) -> int | None:
        index = self._index.get(uid)
        return None if index is None else index + 1

    def update(self, info: Any) -> int | None:
        """Take the new state of a message this session changed; its seq."""
        index = self._index.get(info.uid)
        if index is None:
            return None
        self.messages[index] = info
        return index + 1

    def first_unseen(self) -> int | None:
        for seq, info in enumerate(self.messages, 1):
            if "\\Seen" not in info.flags:
                return seq
        return None

    def remove(self, uids: Iterable[int]) -> list[bytes]:
        """
        Forget messages that are gone; the EXPUNGE responses, highest
        sequence number first so each number is right when it is read.
        """
        gone = sorted(
            (self._index[uid] for uid in set(uids) if uid in self._index), reverse=True
        )
        responses = []
        for index in gone:
            info = self.messages.pop(index)
            self.recent.discard(info.uid)
            responses.append(b"* %d EXPUNGE" % (index + 1))
        self._reindex()
        return responses

    def apply_scan(self, infos: Sequence[Any], fresh: set[int]) -> list[bytes]:
        """
        Bring the view up to date with a new scan (NOOP, IDLE, CHECK):
        EXPUNGE for what vanished, FETCH FLAGS for what another session
        changed, EXISTS and RECENT for what arrived.
        """
        current = {info.uid: info for info in infos}
        responses = self.remove(uid for uid in list(self._index) if uid not in current)
        for index, old in enumerate(self.messages):
            new = current[old.uid]
            self.messages[index] = new
            if frozenset(new.flags) != frozenset(old.flags):
                responses.append(
                    b"* %d FETCH (UID %d FLAGS %s)"
                    % (index + 1, new.uid, syntax.flag_list(self.flags(new)))
                )
        known = set(self._index)
        arrived = [info for info in infos if info.uid not in known]
        recent_before = len(self.recent)
        if arrived:
            self.messages.extend(sorted(arrived, key=lambda info: info.uid))
            self.recent.update(uid for uid in fresh if uid not in known)
            self._reindex()
            responses.append(b"* %d EXISTS" % len(self.messages))
        if arrived or len(self.recent) != recent_before:
            responses.append(b"* %d RECENT" % len(self.recent))
        return responses


# -- LIST ------------------------------------------------------------------------


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """
    RFC 3501 6.3.8: C{*} matches anything, C{%} anything but the hierarchy
    delimiter.
    """
    out = []
    for char in pattern:
        if char == "*":
            out.append(".*")
        elif char == "%":
            out.append("[^" + re.escape(HIERARCHY) + "]*")
        else:
            out.append(re.escape(char))
    return re.compile("".join(out), re.DOTALL)


def matches(regex: re.Pattern[str], name: str) -> bool:
    """Match C{name}; INBOX matches case-insensitively (RFC 3501 5.1)."""
    if regex.fullmatch(name):
        return True
    if name == "INBOX":
        folded = re.compile(regex.pattern, re.DOTALL | re.IGNORECASE)
        return bool(folded.fullmatch(name))
    return False


@dataclass
class ListedFolder:
    """One LIST answer: the name, its attributes, and RFC 5258 CHILDINFO."""

    name: str
    attributes: list[str]
    child_subscribed: bool = False


def list_folders(
    mailbox: Any,
    patterns: list[str],
    subscribed_only: bool,
    special_only: bool,
    show_subscribed: bool,
    recursive: bool,
) -> list[ListedFolder]:
    """
    Blocking.  RFC 5258 LIST (and RFC 3501 LIST): the folders matching any
    of C{patterns} with their attributes.
    """
    existing = mailbox.folders()
    exists = set(existing)
    subscriptions: list[str] = []
    if subscribed_only or show_subscribed:
        # INBOX counts as always subscribed, as on Dovecot's default setup
        # and Gmail: a client that lists only subscribed folders must
        # still find it.
        subscriptions = _inbox_first(["INBOX"] + mailbox.subscriptions())
    subscribed = set(subscriptions)
    regexes = [pattern_regex(p) for p in patterns]

    def wanted(name: str) -> bool:
        return any(matches(r, name) for r in regexes)

    if subscribed_only:
        candidates = list(subscriptions)
        if recursive:
            # RFC 5258 3.5: a parent that is not itself subscribed but has a
            # subscribed child is listed with CHILDINFO ("SUBSCRIBED").
            parents = []
            for name in subscriptions:
                parts = name.split(HIERARCHY)
                for depth in range(1, len(parts)):
                    parent = HIERARCHY.join(parts[:depth])
                    if parent not in subscribed and parent not in parents:
                        parents.append(parent)
            candidates += parents
        names = [n for n in _inbox_first(candidates) if wanted(n)]
    else:
        names = [n for n in existing if wanted(n)]
    listed = []
    for name in names:
        attributes: list[str] = []
        if name not in exists:
            attributes.append("\\NonExistent")
        else:
            attributes.append(
                "\\HasChildren" if mailbox.has_children(name) else "\\HasNoChildren"
            )
        special = mailbox.special_use(name) if name in exists else None
        if special_only and special is None:
            continue
        if special:
            attributes.append(special)
        if show_subscribed and name in subscribed:
            attributes.append("\\Subscribed")
        child = subscribed_only and recursive and name not in subscribed
        listed.append(ListedFolder(name, attributes, child_subscribed=child))
    return listed


def _inbox_first(names: list[str]) -> list[str]:
    return sorted(set(names), key=lambda n: (n != "INBOX", n))

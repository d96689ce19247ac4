"""
The mail store: one maildir per user, shared by every protocol.

SMTP delivers into it now; POP3, IMAP and the command-line tools read and
change the same files later, so the layout is the contract:
C{<root>/<domain>/<localpart>/} holding C{cur/ new/ tmp/}, file names as in
U{https://cr.yp.to/proto/maildir.html} with Dovecot's C{,S=} and C{,W=}
size fields, so that Dovecot or mutt pointed at the same directory read it.

The promise behind "250 OK" lives here.  L{MaildirStore.deliver} is the one
durable-write path: write under C{tmp/}, C{fsync} the file, rename it into
C{new/}, C{fsync} C{new/}.  Only when it returns may a server say the
message is accepted; a crash at any earlier point leaves at most a file in
C{tmp/}, which no reader ever shows.  It blocks on the disk, so the reactor
calls it through L{MaildirStore.deliver_deferred}, in a thread.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from pathlib import Path
from typing import BinaryIO, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from mailsys import limits

# Read and write messages in pieces this big, so a 25 MiB message never has
# to sit in memory once per recipient.
CHUNK_SIZE = 64 * 1024

# The three directories of a maildir, in the order they are created.
SUBDIRECTORIES = ("cur", "new", "tmp")

# Mail local parts we store, already lower-cased: a deliberately narrow set
# so that a local part is always a safe single directory name.
_LOCAL_PART = re.compile(r"[a-z0-9._+-]+\Z")
# One DNS label: letters, digits and hyphens, no hyphen at either end.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")

# Part of every unique name: distinguishes deliveries made by threads of this
# process in the same microsecond.
_counter = itertools.count(1)
_counter_lock = threading.Lock()


class DeliveryError(Exception):
    """
    A message could not be stored in every mailbox; none of them holds it.
    C{str(error)} is one line, fit to log and to follow a 451 reply.
    """


def fsync_directory(path: Path | str) -> None:
    """
    Make the entries of directory C{path} (names created, renamed or removed
    in it) durable.  A renamed file survives a crash only once the directory
    holding its new name has been synced; the file's own C{fsync} is not
    enough.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unique_name(hostname: str, size: int, wsize: int) -> str:
    """
    A maildir file name no other delivery, in this process or any other,
    will produce: C{<secs>.M<usecs>P<pid>Q<counter>R<random>.<host>} as the
    maildir specification recommends, followed by Dovecot's C{,S=<size>}
    (bytes on disk) and C{,W=<wsize>} (bytes with CRLF line endings, what
    POP3 and IMAP report), which spare readers a C{stat} or a full read.

    C{/} and C{:} in the host name are written as C{\\057} and C{\\072}, as
    the specification says: one would make a path, the other starts the
    C{:2,} info.  The microseconds are zero-padded to six digits, so that
    names sort in arrival order.
    """
    now = time.time_ns()
    seconds, nanoseconds = divmod(now, 1_000_000_000)
    with _counter_lock:
        counter = next(_counter)
    host = hostname.replace("/", "\\057").replace(":", "\\072")
    return (
        f"{seconds}.M{nanoseconds // 1000:06d}P{os.getpid()}Q{counter}"
        f"R{os.urandom(8).hex()}.{host},S={size},W={wsize}"
    )


def _split_address(address: str) -> tuple[str, str]:
    """
    The C{(domain, localpart)} directory names for C{address}, lower-cased.

    Only a narrow ASCII set is accepted, so that neither part can name
    another directory (C{..}, C{/}, NUL) or a hidden Maildir++ folder
    (leading dot).

    @raise ValueError: if either part is not a safe mailbox name.
    """
    if not isinstance(address, str) or not address.isascii():
        raise ValueError(f"unsafe mailbox address: {address!r}")
    local, at, domain = address.lower().partition("@")
    if (
        not at
        # RFC 5321 4.5.3.1.1: a local part is at most 64 octets.
        or not 1 <= len(local) <= limits.LOCAL_PART
        or not _LOCAL_PART.match(local)
        or local.startswith(".")
        or ".." in local
    ):
        raise ValueError(f"unsafe mailbox address: {address!r}")
    # RFC 5321 4.5.3.1.2: a domain is at most 255 octets.
    if not 1 <= len(domain) <= limits.DOMAIN or not all(
        _LABEL.match(label) for label in domain.split(".")
    ):
        raise ValueError(f"unsafe mailbox address: {address!r}")
    return domain, local


def _make_directory(path: Path) -> bool:
    """
    Create directory C{path} (mode 0700) unless it exists.  Another thread
    or process creating it at the same moment is not an error.

    @return: whether this call created it.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not path.is_dir():
            raise
        return False
    return True


def _measure(message: BinaryIO, prefix: bytes) -> tuple[int, int]:
    """
    The size of C{prefix} plus the rest of C{message}, and that size with
    every LF counted as CRLF; C{message} is left where it was.
    """
    start = message.tell()
    size = len(prefix)
    newlines = prefix.count(b"\n")
    while chunk := message.read(CHUNK_SIZE):
        size += len(chunk)
        newlines += chunk.count(b"\n")
    message.seek(start)
    return size, size + newlines


def _one_line(error: BaseException) -> str:
    """A short reason for C{error}, without the line breaks of a traceback."""
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:
        reason = str(error) or type(error).__name__
    return " ".join(reason.split())


class MaildirStore:
    """
    All mailboxes under one root directory, as maildirs.

    @ivar root: the directory holding C{<domain>/<localpart>/}.
    @ivar hostname: this server's name, part of every file name delivered.
    """

    def __init__(self, root: Path, hostname: str) -> None:
        self.root = Path(root)
        self.hostname = hostname
        # Mailboxes whose directories, and the entries naming them, are
        # known to be on disk: their parents need no more fsyncs.
        self._durable: set[Path] = set()

    def path_for(self, address: str) -> Path:
        """
        The maildir of C{address} (C{local@domain}), whether or not it
        exists yet.  Case is folded: C{Alice@Example.TEST} and
        C{alice@example.test} share one mailbox.

        @raise ValueError: if the address could name anything but a
            directory two levels below the root.
        """
        domain, local = _split_address(address)
        return self.root / domain / local

    def create(self, address: str) -> Path:
        """
        Make sure the maildir of C{address} exists with C{cur/ new/ tmp/},
        each mode 0700, and that the directory entries leading to it are on
        disk (a message renamed into a C{new/} that a crash then forgets
        would be lost).  Safe to call again, and from several threads or
        processes at once.

        @return: the maildir.
        @raise ValueError: for an unsafe address (see L{path_for}).
        """
        mailbox = self.path_for(address)
        if mailbox in self._durable and (mailbox / "tmp").is_dir():
            return mailbox
        if not self.root.is_dir():
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            fsync_directory(self.root.parent)
        _make_directory(mailbox.parent)
        _make_directory(mailbox)
        for name in SUBDIRECTORIES:
            _make_directory(mailbox / name)
        # Synced even when another thread made the directories: it may not
        # have synced them yet, and this caller is about to rely on them.
        for directory in (mailbox, mailbox.parent, self.root):
            fsync_directory(directory)
        self._durable.add(mailbox)
        return mailbox

    def deliver(
        self,
        addresses: Sequence[str],
        message: BinaryIO,
        prefix: bytes = b"",
    ) -> list[Path]:
        """
        Store one message in the mailboxes of C{addresses}, all or nothing:
        when this returns every copy is on disk, and when it raises no
        mailbox shows any.  It blocks on the disk: call it in a thread (see
        L{deliver_deferred}).

        Each file holds C{prefix} (the trace headers, say) then C{message}
        from its current position to its end; the content is stored as
        given, LF line endings expected.  Mailboxes are created on demand;
        an address repeated (in any case) gets one copy.

        First every copy is written under C{tmp/} and synced, then every
        copy is renamed into C{new/} and each C{new/} is synced.  On any
        failure, the files of this call are removed from C{tmp/} and
        C{new/} alike.

        @return: the delivered files, one per address, in the same order.
        @raise DeliveryError: with a one-line reason naming the mailbox, for
            an unsafe address, a full disk, an I/O or permission error.
        """
        mailboxes: dict[Path, str] = {}
        for address in addresses:
            try:
                mailbox = self.path_for(address)
            except ValueError as e:
                raise DeliveryError(str(e)) from None
            mailboxes.setdefault(mailbox, address)

        written: list[Path] = []
        delivered: dict[Path, Path] = {}
        address = ""
        try:
            start = message.tell()
            size, wsize = _measure(message, prefix)
            staged: list[tuple[Path, Path]] = []
            # Phase 1: a synced copy in each tmp/.
            for mailbox, address in mailboxes.items():
                self.create(address)
                name = unique_name(self.hostname, size, wsize)
                temporary = mailbox / "tmp" / name
                message.seek(start)
                written.append(temporary)
                self._write(temporary, prefix, message, size)
                staged.append((mailbox, temporary))
            # Phase 2: rename them all into new/, then sync each new/.
            for mailbox, temporary in staged:
                address = mailboxes[mailbox]
                final = mailbox / "new" / temporary.name
                os.rename(temporary, final)
                written.remove(temporary)
                delivered[mailbox] = final
            for mailbox in delivered:
                address = mailboxes[mailbox]
                fsync_directory(mailbox / "new")
        except BaseException as e:
            for path in written + list(delivered.values()):
                try:
                    os.unlink(path)
                except OSError:
                    pass
            if not isinstance(e, Exception):
                raise
            where = f"{address}: " if address else ""
            raise DeliveryError(f"{where}{_one_line(e)}") from e
        return [delivered[self.path_for(address)] for address in addresses]

    @staticmethod
    def _write(path: Path, prefix: bytes, message: BinaryIO, size: int) -> None:
        """
        Write C{prefix} and the rest of C{message} to the new file C{path}
        (mode 0600) and sync it.

        @raise OSError: if the file exists, cannot be written, or ends up
            another size than C{size} (the message changed under us).
        """
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(prefix)
            while chunk := message.read(CHUNK_SIZE):
                out.write(chunk)
            out.flush()
            if out.tell() != size:
                raise OSError(f"message changed while it was written: {path}")
            os.fsync(out.fileno())

    def deliver_deferred(
        self,
        reactor,
        addresses: Sequence[str],
        message: BinaryIO,
        prefix: bytes = b"",
    ) -> Deferred[list[Path]]:
        """
        L{deliver} in C{reactor}'s thread pool, so the reactor never waits
        for the disk.  Fires with the delivered files, or fails with
        L{DeliveryError}; reply "250" only when it fires.
        """
        return deferToThreadPool(
            reactor, reactor.getThreadPool(), self.deliver, addresses, message, prefix
        )

    def messages(self, address: str) -> list[Path]:
        """
        The messages in the mailbox of C{address}: the files of C{new/} and
        C{cur/}, sorted by file name (for names this store made, arrival
        order to the microsecond).  Files still in C{tmp/}, from a delivery
        in progress or one that crashed, are never listed; nor are names
        starting with a dot.  A mailbox that does not exist yet is empty.

        @raise ValueError: for an unsafe address (see L{path_for}).
        """
        mailbox = self.path_for(address)
        found: list[Path] = []
        for name in ("new", "cur"):
            try:
                entries = list(os.scandir(mailbox / name))
            except FileNotFoundError:
                continue
            found.extend(
                Path(entry.path)
                for entry in entries
                if not entry.name.startswith(".")
                and entry.is_file(follow_symlinks=False)
            )
        return sorted(found, key=lambda path: path.name)

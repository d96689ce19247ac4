"""
The user directory: who may log in, with which password, and where their
mail lives.

SMTP AUTH, POP3 and IMAP all authenticate through one L{UserStore}, a small
JSON file of argon2id hashes that the C{mailsys user} command edits and a
running server re-reads as soon as it changes.  L{PasswordChecker} and
L{MailRealm} connect it to C{twisted.cred}, so the protocols only ever see a
portal.  Password hashing is deliberately slow; the checker runs it in a
thread pool so the reactor never waits for it.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from argon2 import PasswordHasher, profiles
from argon2.exceptions import VerificationError
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from zope.interface import Attribute, Interface, implementer

from mailsys.addresses import (
    AddressError,
    MailAddress,
    is_safe_mailbox_name,
    normalize_domain,
    parse_address,
)

FORMAT_VERSION = 1


class AccountError(Exception):
    """
    A user-directory problem (unknown user, duplicate, invalid name, bad
    file).  C{str(error)} is one line, ready for C{mailsys: <message>}.
    """


class UserStore:
    """
    Users and their password hashes in C{users.json}:
    C{{"version": 1, "users": {"alice@example.test": {"password": "$argon2id$..."}}}}.

    Every change is a locked read-modify-write of the whole file, written
    atomically, so concurrent C{mailsys user} commands and a running server
    never see half a file.  Reads are cached and re-done when the file's
    identity, size or modification time changes.
    """

    def __init__(
        self,
        path: Path,
        domains: Sequence[str] | None = None,
        hasher: PasswordHasher | None = None,
    ) -> None:
        """
        @param path: the users file, C{config.users_file}.
        @param domains: our domains; L{add} refuses addresses in others.
            C{None} accepts any domain.
        @param hasher: the argon2 hasher; tests inject a cheap one.
        """
        self._path = Path(path)
        self._lock_path = self._path.with_name("users.lock")
        try:
            self._domains = (
                None if domains is None else tuple(normalize_domain(d) for d in domains)
            )
        except AddressError as e:
            raise AccountError(f"invalid domain: {e}") from None
        # RFC 9106 4: the second recommended option (64 MiB, t=3), which
        # is what argon2-cffi uses by default.
        self._hasher = hasher or PasswordHasher.from_parameters(
            profiles.RFC_9106_LOW_MEMORY
        )
        self._dummy_hash: str | None = None
        # The cache is shared by the reactor thread (exists) and the
        # thread pool (verify).
        self._cache_lock = threading.Lock()
        self._users: dict[str, dict[str, Any]] = {}
        self._signature: tuple[int, int, int] | None = None

    def parse(self, address: str | MailAddress) -> MailAddress:
        """
        Parse an address as the store does, turning the reason it is
        invalid into an L{AccountError} for the command line.
        """
        if isinstance(address, MailAddress):
            return address
        try:
            return parse_address(address)
        except AddressError as e:
            raise AccountError(f"invalid address {address!r}: {e}") from None

    def check_address(self, address: str | MailAddress) -> MailAddress:
        """
        Parse C{address} and check that it could be one of our users: a safe
        mailbox name in one of our domains.

        @raise AccountError: with the reason when it could not.
        """
        addr = self.parse(address)
        if addr.is_literal:
            raise AccountError(f"{addr.domain} is an address literal, not a domain")
        if not is_safe_mailbox_name(addr.local):
            raise AccountError(
                f"invalid user name {addr.local!r}: use only a-z, 0-9, '.', '_',"
                " '+' and '-', not starting with '.'"
            )
        if self._domains is not None and addr.domain not in self._domains:
            raise AccountError(
                f"{addr.domain} is not one of our domains ({', '.join(self._domains)})"
            )
        return addr

    def add(self, address: str, password: str) -> MailAddress:
        """
        Store a new user.

        @raise AccountError: if the user exists, the address is invalid or
            foreign, or the password is empty.
        """
        addr = self.check_address(address)
        if self.exists(addr):
            raise AccountError(f"user {addr} already exists")
        entry = {"password": self._hash(password)}

        def change(users: dict[str, dict[str, Any]]) -> None:
            if str(addr) in users:
                raise AccountError(f"user {addr} already exists")
            users[str(addr)] = entry

        self._modify(change)
        return addr

    def remove(self, address: str) -> None:
        """
        Forget a user (their mail stays on disk).

        @raise AccountError: if there is no such user.
        """
        key = str(self.parse(address))

        def change(users: dict[str, dict[str, Any]]) -> None:
            if users.pop(key, None) is None:
                raise AccountError(f"no such user: {key}")

        self._modify(change)

    def set_password(self, address: str, password: str) -> None:
        """
        Replace a user's password.

        @raise AccountError: if there is no such user or the password is
            empty.
        """
        key = str(self.parse(address))
        if not self.exists(key):
            raise AccountError(f"no such user: {key}")
        encoded = self._hash(password)

        def change(users: dict[str, dict[str, Any]]) -> None:
            if key not in users:
                raise AccountError(f"no such user: {key}")
            users[key] = {**users[key], "password": encoded}

        self._modify(change)

    def addresses(self) -> list[str]:
        """All users' addresses, sorted."""
        return sorted(self._current())

    def exists(self, address: str | MailAddress) -> bool:
        """
        Whether C{address} is a user.  Cheap (no hashing), so the SMTP
        server may ask for every recipient; invalid addresses are simply
        not users.

        @raise AccountError: if the users file exists but cannot be read.
        """
        key = self._lookup_key(address)
        return key is not None and key in self._current()

    def verify(self, address: object, password: object) -> MailAddress | None:
        """
        The user's address if C{password} is theirs, else C{None}.

        Slow on purpose (argon2id) and equally slow for unknown users, bad
        addresses and bad passwords, which are checked against a dummy
        hash, so timing does not tell who has an account.  Call it from a
        thread, never the reactor.  Never raises for bad input.

        @raise AccountError: if the users file exists but cannot be read.
        """
        key = self._lookup_key(address)
        entry = self._current().get(key) if key is not None else None
        encoded = entry.get("password") if entry is not None else None
        if not isinstance(encoded, str):
            encoded = self._dummy()
        usable = isinstance(password, (str, bytes))
        if isinstance(password, str):
            try:
                password.encode("utf-8")
            except UnicodeEncodeError:
                usable = False
        try:
            # argon2 compares the digests in constant time.
            matched = self._hasher.verify(encoded, password if usable else b"")
        except (VerificationError, ValueError):  # incl. InvalidHashError
            matched = False
        if not (matched and usable and entry is not None and key is not None):
            return None
        return parse_address(key)

    def _lookup_key(self, address: object) -> str | None:
        """The users-file key for C{address}, or C{None} if it cannot be one."""
        if isinstance(address, MailAddress):
            return str(address)
        if not isinstance(address, str):
            return None
        try:
            return str(parse_address(address))
        except AddressError:
            return None

    def _hash(self, password: str) -> str:
        """Hash a new password, refusing ones nobody could type."""
        if not isinstance(password, str) or password == "":
            raise AccountError("empty password")
        try:
            password.encode("utf-8")
        except UnicodeEncodeError:
            raise AccountError("password is not valid UTF-8") from None
        return self._hasher.hash(password)

    def _dummy(self) -> str:
        """A hash of a random secret, made with the same parameters as real ones."""
        if self._dummy_hash is None:
            self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(24))
        return self._dummy_hash

    def _current(self) -> dict[str, dict[str, Any]]:
        """The users, re-read if the file changed since we last looked."""
        with self._cache_lock:
            try:
                st = os.stat(self._path)
                signature: tuple[int, int, int] | None = (
                    st.st_ino,
                    st.st_size,
                    st.st_mtime_ns,
                )
            except FileNotFoundError:
                signature = None
            if signature != self._signature:
                self._users, self._signature = self._read()
            return self._users

    def _read(self) -> tuple[dict[str, dict[str, Any]], tuple[int, int, int] | None]:
        """Read and validate the whole file; a missing file has no users."""
        try:
            with open(self._path, "rb") as f:
                data = f.read()
                st = os.fstat(f.fileno())
        except FileNotFoundError:
            return {}, None
        except OSError as e:
            raise AccountError(f"{self._path}: {e.strerror}") from None
        return self._decode(data), (st.st_ino, st.st_size, st.st_mtime_ns)

    def _decode(self, data: bytes) -> dict[str, dict[str, Any]]:
        """Validate the file's contents; a hand-edited mistake names the entry."""
        try:
            document = json.loads(data)
        except ValueError:
            raise AccountError(f"{self._path}: not valid JSON") from None
        if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
            raise AccountError(
                f"{self._path}: unsupported format (expected version {FORMAT_VERSION})"
            )
        users = document.get("users")
        if not isinstance(users, dict):
            raise AccountError(f"{self._path}: 'users' is not a table")
        result: dict[str, dict[str, Any]] = {}
        for key, entry in users.items():
            try:
                addr = parse_address(key)
            except AddressError as e:
                raise AccountError(f"{self._path}: {key!r}: {e}") from None
            if addr.is_literal or not is_safe_mailbox_name(addr.local):
                raise AccountError(f"{self._path}: {key!r}: invalid user name")
            if not (isinstance(entry, dict) and isinstance(entry.get("password"), str)):
                raise AccountError(f"{self._path}: {key!r}: no password hash")
            result[str(addr)] = entry
        return result

    def _modify(self, change: Callable[[dict[str, dict[str, Any]]], None]) -> None:
        """Locked read-modify-write of the whole file."""
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._exclusive():
            users, _ = self._read()
            change(users)
            signature = self._write(users)
        with self._cache_lock:
            self._users, self._signature = users, signature

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold C{users.lock}, so concurrent commands keep each other's changes."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, users: dict[str, dict[str, Any]]) -> tuple[int, int, int]:
        """
        Replace the file atomically and durably: write a temporary file,
        fsync it, rename it over the old one, fsync the directory.
        """
        data = (
            json.dumps(
                {"version": FORMAT_VERSION, "users": dict(sorted(users.items()))},
                indent=2,
            ).encode("utf-8")
            + b"\n"
        )
        tmp = self._path.with_name(self._path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # in case a stale temporary file was looser
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
            os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._path)
        directory = os.open(self._path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return (st.st_ino, st.st_size, st.st_mtime_ns)


def maildir_path(mail_dir: Path, address: MailAddress) -> Path:
    """
    Where a user's maildir is: C{<mail_dir>/<domain>/<localpart>}.

    @raise AccountError: if the address could not be a user, so that no
        other address ever becomes a path.
    """
    if address.is_literal or not is_safe_mailbox_name(address.local):
        raise AccountError(f"{address} is not a mailbox name")
    return Path(mail_dir) / address.domain / address.local


@implementer(ICredentialsChecker)
class PasswordChecker:
    """
    Checks user names and passwords against a L{UserStore} for
    C{twisted.cred}, hashing in a thread pool so the reactor keeps serving
    other clients meanwhile.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, store: UserStore, reactor: Any, threadpool: Any = None) -> None:
        """
        @param reactor: the reactor that receives the result.
        @param threadpool: where hashing runs; the reactor's own pool by
            default.
        """
        self._store = store
        self._reactor = reactor
        self._threadpool = threadpool

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[str]:
        """
        Fire with the user's normalised address, or fail with
        L{UnauthorizedLogin}.  A user name that is not UTF-8 is checked like
        an unknown user, taking the same time.
        """
        username: object = credentials.username
        if isinstance(username, bytes):
            try:
                username = username.decode("utf-8")
            except UnicodeDecodeError:
                username = None
        pool = self._threadpool or self._reactor.getThreadPool()
        d = deferToThreadPool(
            self._reactor, pool, self._store.verify, username, credentials.password
        )
        return d.addCallback(_avatar_id)


def _avatar_id(address: MailAddress | None) -> str:
    """Turn the result of L{UserStore.verify} into an avatar id or a refusal."""
    if address is None:
        raise UnauthorizedLogin("invalid user name or password")
    return str(address)


class IMailUser(Interface):
    """A logged-in user: who they are and where their mail is."""

    address = Attribute("The user's normalised address, a str.")
    maildir = Attribute("The Path of the user's maildir.")


@implementer(IMailUser)
class MailUser:
    """The avatar for a logged-in user."""

    def __init__(self, address: str, maildir: Path) -> None:
        self.address = address
        self.maildir = maildir

    def __repr__(self) -> str:
        return f"MailUser({self.address!r}, {self.maildir!r})"


@implementer(IRealm)
class MailRealm:
    """
    Turns an authenticated address into the avatar a protocol asked for:
    a L{MailUser} (who, and where the maildir is:
    C{<mail_dir>/<domain>/<localpart>}) seen through the view each protocol
    registers, such as a POP3 mailbox or an IMAP account.  One realm, one
    store, many views.
    """

    def __init__(
        self,
        mail_dir: Path,
        avatars: Mapping[Any, Callable[[MailUser], Any]] | None = None,
    ) -> None:
        """
        @param mail_dir: C{config.mail_dir}.
        @param avatars: interface -> factory making that interface's avatar
            from the L{MailUser}.  L{IMailUser} itself is always available.
        """
        self.mail_dir = Path(mail_dir)
        self.avatars: dict[Any, Callable[[MailUser], Any]] = {IMailUser: lambda u: u}
        self.avatars.update(avatars or {})

    def requestAvatar(
        self, avatarId: str | bytes, mind: object, *interfaces: Any
    ) -> tuple[Any, Any, Callable[[], None]]:
        """
        The avatar for the first of C{interfaces} this realm can make.

        @raise NotImplementedError: if it can make none of them.
        @raise AccountError: if C{avatarId} is not a mailbox name (a
            checker bug; never turned into a path).
        """
        for interface in interfaces:
            factory = self.avatars.get(interface)
            if factory is not None:
                break
        else:
            raise NotImplementedError(f"MailRealm provides none of {interfaces!r}")
        if isinstance(avatarId, bytes):
            avatarId = avatarId.decode("utf-8")
        try:
            address = parse_address(avatarId)
        except AddressError as e:
            raise AccountError(f"invalid avatar id {avatarId!r}: {e}") from None
        user = MailUser(str(address), maildir_path(self.mail_dir, address))
        avatar = factory(user)
        logout = getattr(avatar, "logout", None)
        return interface, avatar, logout if callable(logout) else (lambda: None)

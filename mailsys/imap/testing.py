"""
An in-memory stand-in for the maildir store's mailbox view
(L{mailsys.maildir.Mailbox} and L{Folder}), with the same contract as far
as the IMAP server uses it: UIDs, flags, C{new/} and C{cur/}, folders and
subscriptions, and the same name rules (it calls the store's own
C{folder_levels}).

It exists so that protocol tests that run one session hundreds of times
(a session split at every byte boundary) do not spend their time in
C{mkdir} and C{rename}; tests about the store itself use the real one.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO, Iterable, Sequence

from mailsys.maildir import (
    FLAG_LETTERS,
    MAX_KEYWORDS,
    SPECIAL_USE,
    FolderError,
    KeywordLimit,
    MessageGone,
    MessageInfo,
    folder_levels,
)


class MemoryFolder:
    """
    One folder's messages in memory, by UID.  Its methods do what the
    same-named methods of L{mailsys.maildir.Folder} do, without a disk.
    """

    def __init__(self, name: str, uidvalidity: int) -> None:
        self.name = name
        self.path = Path("/memory") / name
        self.uidvalidity = uidvalidity
        self._uidnext = 1
        self._data: dict[int, bytes] = {}
        self._infos: dict[int, MessageInfo] = {}
        self._recent: set[int] = set()
        self._keywords: list[str] = []
        self._clock = 1751882400.0

    @property
    def uidnext(self) -> int:
        return self._uidnext

    def _add(
        self, data: bytes, flags: Iterable[str], where: str, date: float | None
    ) -> MessageInfo:
        uid = self._uidnext
        self._uidnext += 1
        key = f"{uid}.memory"
        self._clock += 1
        info = MessageInfo(
            uid=uid,
            key=key,
            path=self.path / where / key,
            flags=self._flags(flags, partial=True),
            size=len(data),
            crlf_size=len(data) + data.count(b"\n") - data.count(b"\r\n"),
            internal_date=self._clock if date is None else date,
        )
        self._data[uid] = data
        self._infos[uid] = info
        return info

    def keywords(self) -> list[str]:
        return list(self._keywords)

    def define_keywords(
        self, keywords: Iterable[str], partial: bool = False
    ) -> list[str]:
        known = {k.lower(): k for k in self._keywords}
        wanted = {k.lower(): k for k in keywords if not k.startswith("\\")}
        new = [k for lower, k in wanted.items() if lower not in known]
        room = MAX_KEYWORDS - len(self._keywords)
        if len(new) > room and not partial:
            raise KeywordLimit(f"cannot add keyword {new[room]}: folder is full")
        self._keywords += new[:room]
        known = {k.lower(): k for k in self._keywords}
        return [known[lower] for lower in wanted if lower in known]

    def _flags(self, flags: Iterable[str], partial: bool) -> frozenset[str]:
        """The system flags and (defined) keywords of C{flags}."""
        flags = list(flags)
        keywords = self.define_keywords(flags, partial)
        return frozenset([f for f in flags if f in FLAG_LETTERS] + keywords)

    def deliver(self, data: bytes) -> MessageInfo:
        """What SMTP delivery does: a new message in C{new/}."""
        return self._add(data, (), "new", None)

    def scan(self, claim_new: bool = False) -> list[MessageInfo]:
        if claim_new:
            for uid, info in self._infos.items():
                if info.path.parent.name == "new":
                    self._infos[uid] = replace(info, path=self.path / "cur" / info.key)
                    self._recent.add(uid)
        return [self._infos[uid] for uid in sorted(self._infos)]

    def is_recent(self, info: MessageInfo) -> bool:
        return info.uid in self._recent

    def _current(self, info: MessageInfo) -> MessageInfo:
        current = self._infos.get(info.uid)
        if current is None:
            raise MessageGone(f"message {info.uid} in {self.name!r} is gone")
        return current

    def open(self, info: MessageInfo) -> BinaryIO:
        self._current(info)
        return io.BytesIO(self._data[info.uid])

    def headers(self, info: MessageInfo) -> bytes:
        self._current(info)
        data = self._data[info.uid]
        for blank in (b"\n\n", b"\n\r\n"):
            end = data.find(blank)
            if end >= 0:
                return data[: end + len(blank)]
        return data

    def set_flags(self, info: MessageInfo, flags: Iterable[str]) -> MessageInfo:
        current = self._current(info)
        changed = replace(
            current,
            path=self.path / "cur" / current.key,
            flags=self._flags(flags, partial=False),
        )
        self._infos[info.uid] = changed
        return changed

    def expunge(self, infos: Sequence[MessageInfo]) -> None:
        for info in infos:
            self._infos.pop(info.uid, None)
            self._data.pop(info.uid, None)
            self._recent.discard(info.uid)

    def append(
        self,
        message: BinaryIO | bytes,
        flags: Iterable[str] = (),
        internal_date: float | None = None,
    ) -> MessageInfo:
        data = message if isinstance(message, bytes) else message.read()
        return self._add(data.replace(b"\r\n", b"\n"), flags, "cur", internal_date)

    def copy_to(
        self, infos: Sequence[MessageInfo], target: "MemoryFolder"
    ) -> list[MessageInfo]:
        sources = [(self._data[self._current(i).uid], self._current(i)) for i in infos]
        return [
            target._add(data, info.flags, "cur", info.internal_date)
            for data, info in sources
        ]


class MemoryMailbox:
    """
    All folders of one user, in memory; INBOX exists from the start.  Its
    methods do what those of L{mailsys.maildir.Mailbox} do.
    """

    def __init__(self, address: str = "alice@example.test") -> None:
        self.address = address
        self._next_validity = 1000
        self._folders: dict[str, MemoryFolder] = {}
        self._subscriptions: list[str] = []
        self._make("INBOX")

    def _make(self, name: str) -> MemoryFolder:
        self._next_validity += 1
        folder = MemoryFolder(name, self._next_validity)
        self._folders[name] = folder
        return folder

    @staticmethod
    def _canonical(name: str) -> str:
        return "/".join(folder_levels(name))

    def folder(self, name: str) -> MemoryFolder:
        canonical = self._canonical(name)
        if canonical not in self._folders:
            raise FolderError(f"no such folder: {canonical}")
        return self._folders[canonical]

    def folders(self) -> list[str]:
        return ["INBOX"] + sorted(n for n in self._folders if n != "INBOX")

    def create_folder(self, name: str) -> MemoryFolder:
        levels = folder_levels(name)
        canonical = "/".join(levels)
        if canonical in self._folders:
            raise FolderError(f"folder already exists: {canonical}")
        for depth in range(1, len(levels)):
            parent = "/".join(levels[:depth])
            if parent not in self._folders:
                self._make(parent)
        return self._make(canonical)

    def delete_folder(self, name: str) -> None:
        canonical = self._canonical(name)
        if canonical == "INBOX":
            raise FolderError("INBOX cannot be deleted")
        self.folder(canonical)
        del self._folders[canonical]

    def rename_folder(self, old: str, new: str) -> None:
        source, target = self._canonical(old), self._canonical(new)
        if source == "INBOX":
            raise FolderError("renaming INBOX is not supported")
        if target in self._folders:
            raise FolderError(f"folder already exists: {target}")
        self.folder(source)
        for name in list(self._folders):
            if name == source or name.startswith(source + "/"):
                folder = self._folders.pop(name)
                folder.name = target + name[len(source) :]
                self._folders[folder.name] = folder

    def ensure_special_folders(self) -> None:
        for name in SPECIAL_USE:
            if name not in self._folders:
                self._make(name)
            if name not in self._subscriptions:
                self._subscriptions.append(name)

    def special_use(self, name: str) -> str | None:
        return SPECIAL_USE.get(self._canonical(name))

    def has_children(self, name: str) -> bool:
        prefix = self._canonical(name) + "/"
        return any(n.startswith(prefix) for n in self._folders)

    def subscriptions(self) -> list[str]:
        inbox = ["INBOX"] if "INBOX" in self._subscriptions else []
        return inbox + sorted(n for n in self._subscriptions if n != "INBOX")

    def subscribe(self, name: str) -> None:
        canonical = self._canonical(name)
        if canonical not in self._subscriptions:
            self._subscriptions.append(canonical)

    def unsubscribe(self, name: str) -> None:
        canonical = self._canonical(name)
        self._subscriptions = [n for n in self._subscriptions if n != canonical]


__all__ = ["MemoryFolder", "MemoryMailbox"]

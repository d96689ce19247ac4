"""
Prompt IDLE: the kernel tells us when a folder changes, so new mail is
pushed to an IDLE client within milliseconds instead of at the next poll.

Every change a client cares about is a directory entry appearing in or
leaving the folder's C{new/} or C{cur/}: a delivery renames a file into
C{new/}, a flag change renames within C{cur/}, an expunge unlinks.  On Linux
C{inotify} reports exactly those (C{IN_CREATE}, C{IN_MOVED_TO},
C{IN_MOVED_FROM}, C{IN_DELETE}); elsewhere, or when the kernel refuses a
watch, the IDLE session polls as before.

One inotify descriptor serves every IDLE session of a listener: the kernel
allows only 128 descriptors per user by default but many thousand watches,
and two sessions idling in one folder share its two watches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from twisted.logger import Logger
from twisted.python.filepath import FilePath

log = Logger(namespace="mailsys.imap")

# The inotify event bits (linux/inotify.h), spelt out so that this module
# imports on every platform; twisted.internet.inotify is only needed to watch.
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
# A message arriving, moving (flags, new/ -> cur/) or leaving.
WATCHED_EVENTS = IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE
# The directories of a maildir whose entries are its messages.
MESSAGE_DIRECTORIES = ("new", "cur")


def system_notifier(reactor: Any) -> Any:
    """
    A started C{twisted.internet.inotify.INotify} on C{reactor}.

    @raise Exception: where inotify is missing (not Linux) or the kernel
        refuses another descriptor (C{fs.inotify.max_user_instances}).
    """
    from twisted.internet.inotify import INotify

    notifier = INotify(reactor)
    notifier.startReading()
    return notifier


class FolderWatch:
    """
    One session's interest in one folder; L{cancel} ends it.

    @ivar active: false once cancelled or once the watcher lost its
        descriptor (a watched directory was deleted): the session must then
        watch again, or poll.
    """

    def __init__(
        self, watcher: FolderWatcher, keys: list[bytes], changed: Callable[[], None]
    ) -> None:
        self._watcher = watcher
        self.keys = keys
        self.changed = changed
        self.active = True

    def cancel(self) -> None:
        """Stop the notifications; the last watch of a folder frees its watches."""
        if self.active:
            self.active = False
            self._watcher._forget(self)


class FolderWatcher:
    """
    Calls back IDLE sessions when their folder's C{new/} or C{cur/} changes.

    @param reactor: the reactor the inotify descriptor reads in.
    @param notifier_factory: makes that descriptor from the reactor
        (L{system_notifier}); tests inject one that raises, to see the
        sessions fall back to polling.
    """

    def __init__(
        self, reactor: Any, notifier_factory: Callable[[Any], Any] = system_notifier
    ) -> None:
        self._reactor = reactor
        self._notifier_factory = notifier_factory
        self._notifier: Any = None
        # Watched directory (bytes path) -> the watches interested in it.
        self._watches: dict[bytes, list[FolderWatch]] = {}
        self._warned = False

    @property
    def watching(self) -> bool:
        """Whether an inotify descriptor is open (some session is watching)."""
        return self._notifier is not None

    def watch(self, folder: Path, changed: Callable[[], None]) -> FolderWatch | None:
        """
        Call C{changed()} whenever a message arrives in, moves within or
        leaves the maildir C{folder}, until the returned watch is cancelled.
        Several events in a row make several calls: the caller debounces.

        @return: the watch, or C{None} when inotify cannot be used; the
            caller polls then.
        """
        # Absolute, as the paths of the events are.
        keys = [
            FilePath(os.fsencode(Path(folder) / sub)).path
            for sub in MESSAGE_DIRECTORIES
        ]
        try:
            if self._notifier is None:
                self._notifier = self._notifier_factory(self._reactor)
            notifier = self._notifier

            def event(watchpoint: object, path: FilePath[bytes], mask: int) -> None:
                self._event(notifier, path, mask)

            for key in keys:
                if key not in self._watches:
                    directory = FilePath(key)
                    notifier.watch(directory, mask=WATCHED_EVENTS, callbacks=[event])
                    self._watches[key] = []
        except Exception as e:
            if not self._warned:
                self._warned = True
                log.warn(
                    "inotify unavailable ({error}); IDLE polls the folder instead",
                    error=str(e) or type(e).__name__,
                )
            self._release_unused()
            return None
        self._warned = False
        watch = FolderWatch(self, keys, changed)
        for key in keys:
            self._watches[key].append(watch)
        return watch

    def _event(self, notifier: Any, path: FilePath[bytes], mask: int) -> None:
        """An inotify event: tell the watches of the directory it happened in."""
        if notifier is not self._notifier:
            return  # a descriptor we have already given up
        if mask & IN_DELETE_SELF:
            # A watched directory is gone (its folder was deleted).  Twisted
            # closes the whole descriptor after this callback; every
            # session looks at its folder again and watches anew.
            watches = {id(w): w for ws in self._watches.values() for w in ws}
            self._notifier = None
            self._watches.clear()
            for watch in watches.values():
                watch.active = False
                watch.changed()
            return
        for watch in list(self._watches.get(path.parent().path, ())):
            watch.changed()

    def _forget(self, watch: FolderWatch) -> None:
        for key in watch.keys:
            watches = self._watches.get(key)
            if watches is not None and watch in watches:
                watches.remove(watch)
        self._release_unused()

    def _release_unused(self) -> None:
        """Drop the kernel watches nobody needs; close the descriptor if none remain."""
        notifier = self._notifier
        for key in [key for key, watches in self._watches.items() if not watches]:
            del self._watches[key]
            if notifier is not None:
                try:
                    notifier.ignore(FilePath(key))
                except Exception:
                    pass  # already gone with its directory
        if notifier is not None and not self._watches:
            self._notifier = None
            notifier.loseConnection()

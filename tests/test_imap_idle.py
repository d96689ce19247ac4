"""
IDLE pushed by inotify: new mail, expunges and flag changes reach an IDLE
client at once instead of at the next poll; bursts cost one rescan; the
session falls back to polling where inotify cannot be used; and no watch,
descriptor or timer outlives IDLE.

The inotify tests run on the real reactor (the kernel's events have to be
read by it), with the poll interval at a minute so that only inotify can
explain a prompt answer.  The debounce, the safety-net poll and the
fallback run on a C{task.Clock} with a fake descriptor.
"""

from __future__ import annotations

import io
import time

from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailsys.imap import IMAPServerFactory
from mailsys.imap.watch import IN_DELETE_SELF, IN_MOVED_TO, FolderWatcher
from mailsys.testing import TLSStringTransport
from tests.test_imap_server import (
    ALICE,
    CLIENT,
    FIRST,
    SECOND,
    THIRD,
    TLS,
    ServerTestMixin,
    lines,
)


class WaitingTransport(TLSStringTransport):
    """A string transport that can say when some output has arrived."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._waiting: list[tuple[bytes, defer.Deferred[float]]] = []

    def write(self, data: bytes) -> None:
        super().write(data)
        for entry in list(self._waiting):
            wanted, d = entry
            if wanted in self.value():
                self._waiting.remove(entry)
                d.callback(time.monotonic())

    def arrival(self, wanted: bytes) -> defer.Deferred[float]:
        """Fires with the time C{wanted} appeared in the output."""
        d: defer.Deferred[float] = defer.Deferred()
        self._waiting.append((wanted, d))
        return d


def in_line(f, *args):
    """Run store calls in line: the test is about events, not threads."""
    return defer.maybeDeferred(f, *args)


def pause(seconds: float) -> defer.Deferred[None]:
    """Let the reactor run (and read the kernel's events) for a moment."""
    return deferLater(reactor, seconds, lambda: None)


class InotifyIdleTests(ServerTestMixin, TestCase):
    """IDLE on the real reactor with the kernel's inotify."""

    timeout = 20

    def setUp(self) -> None:
        super().setUp()
        self.watcher = FolderWatcher(reactor)
        self.factory = IMAPServerFactory(
            self.portal,
            "mail.example.test",
            reactor,
            tls=TLS,
            implicit_tls=True,
            blocking=in_line,
            watcher=self.watcher,
            idle_poll=60.0,
            idle_safety_poll=60.0,
        )

    def connect(self, peer=CLIENT):
        proto = self.factory.buildProtocol(peer)
        transport = WaitingTransport(peerAddress=peer)
        proto.makeConnection(transport)
        self.addCleanup(self.hang_up, proto)
        return proto, transport

    @staticmethod
    def hang_up(proto) -> None:
        if not proto._closed:
            proto.connectionLost(None)

    @defer.inlineCallbacks
    def idling(self, select: bytes = b"INBOX"):
        """A session idling in C{select}, after its first check has run."""
        proto, transport = self.logged_in(select)
        proto.dataReceived(b"i IDLE\r\n")
        self.assertEqual(transport.value(), b"+ idling\r\n")
        self.assertTrue(self.watcher.watching)
        # IDLE looks once at once, for mail that came before the watch.
        yield self.settled(proto)
        transport.clear()
        return proto, transport

    @defer.inlineCallbacks
    def settled(self, proto):
        """Wait until the session has no check pending (its own renames,
        new/ to cur/, make events too)."""
        yield pause(0.1)
        while proto._idle_soon or proto._idle_poll is not None:
            yield pause(0.01)

    def assert_nothing_left(self, proto) -> None:
        self.assertFalse(self.watcher.watching)
        self.assertIsNone(proto._idle_watch)
        self.assertIsNone(proto._idle_call)

    @defer.inlineCallbacks
    def test_delivery_announced_at_once(self):
        """A message delivered during IDLE is announced in well under a
        second, long before the one-minute poll; DONE ends IDLE and
        removes the watch and the timer."""
        self.deliver(FIRST)
        proto, transport = yield self.idling()
        arrived = transport.arrival(b"* 2 RECENT\r\n")
        started = time.monotonic()
        self.store.deliver([ALICE], io.BytesIO(SECOND))
        when = yield arrived
        self.assertLess(when - started, 2.0)
        self.assertEqual(transport.value(), b"* 2 EXISTS\r\n* 2 RECENT\r\n")
        # The next look is the safety-net poll, a minute away.
        yield self.settled(proto)
        self.assertGreater(proto._idle_call.getTime() - reactor.seconds(), 50)
        out = self.say(proto, transport, b"DONE\r\nn NOOP\r\n")
        self.assertEqual(out, b"i OK IDLE terminated\r\nn OK NOOP completed\r\n")
        self.assert_nothing_left(proto)

    @defer.inlineCallbacks
    def test_expunge_and_flags_by_another_session(self):
        """Another session's expunge and flag change reach the IDLE client
        at once."""
        self.deliver(FIRST, SECOND)
        proto, transport = yield self.idling()
        folder = self.mailbox().folder("INBOX")
        first, second = folder.scan()
        arrived = transport.arrival(b"* 1 EXPUNGE\r\n")
        folder.expunge([first])
        yield arrived
        arrived = transport.arrival(b"FLAGS (\\Flagged")
        folder.set_flags(second, {"\\Flagged"})
        yield arrived
        self.assertEqual(
            lines(transport.value()),
            [b"* 1 EXPUNGE", b"* 1 FETCH (UID 2 FLAGS (\\Flagged \\Recent))"],
        )

    @defer.inlineCallbacks
    def test_burst_is_one_rescan(self):
        """Five deliveries in a row are one rescan and one EXISTS."""
        self.deliver(FIRST)
        proto, transport = yield self.idling()
        folder = proto.view.folder
        scans = []
        original = folder.scan

        def counting_scan(claim_new=False):
            scans.append(claim_new)
            return original(claim_new)

        folder.scan = counting_scan
        arrived = transport.arrival(b"* 6 RECENT\r\n")
        for _ in range(5):
            self.store.deliver([ALICE], io.BytesIO(THIRD))
        yield arrived
        self.assertEqual(len(scans), 1)
        self.assertEqual(transport.value(), b"* 6 EXISTS\r\n* 6 RECENT\r\n")

    @defer.inlineCallbacks
    def test_connection_lost_during_idle(self):
        """A client that hangs up mid-IDLE leaves no watch and no timer
        (trial checks the reactor is clean)."""
        proto, transport = yield self.idling()
        proto.connectionLost(None)
        self.assert_nothing_left(proto)

    @defer.inlineCallbacks
    def test_sessions_share_the_watch(self):
        """Two sessions idling in INBOX share its watches: when one says
        DONE, the other still hears of new mail; logging out frees them."""
        first, first_transport = yield self.idling()
        second, second_transport = yield self.idling()
        self.say(first, first_transport, b"DONE\r\n")
        self.assertTrue(self.watcher.watching)
        arrived = second_transport.arrival(b"* 1 EXISTS\r\n")
        self.store.deliver([ALICE], io.BytesIO(FIRST))
        yield arrived
        self.assertNotIn(b"EXISTS", first_transport.value())
        self.say(second, second_transport, b"DONE\r\nz LOGOUT\r\n")
        self.assertTrue(second_transport.disconnecting)
        self.assertFalse(self.watcher.watching)

    @defer.inlineCallbacks
    def test_watched_folder_deleted(self):
        """Deleting a folder a session idles in ends that session with BYE;
        another session idling in INBOX, which shared the inotify
        descriptor, watches again and still hears of new mail at once."""
        self.mailbox().create_folder("Work")
        work, work_transport = yield self.idling(b"Work")
        inbox, inbox_transport = yield self.idling()
        bye = work_transport.arrival(b"* BYE The selected mailbox was deleted\r\n")
        self.mailbox().delete_folder("Work")
        yield bye
        yield pause(0)
        self.assertTrue(work_transport.disconnecting)
        work.connectionLost(None)
        # INBOX's session watches again after one look at its folder.
        while inbox._idle_watch is None or not inbox._idle_watch.active:
            yield pause(0.01)
        arrived = inbox_transport.arrival(b"* 1 EXISTS\r\n")
        self.store.deliver([ALICE], io.BytesIO(FIRST))
        yield arrived


class FakeNotifier:
    """Stands for the inotify descriptor: records watches, fires events."""

    def __init__(self) -> None:
        self.watched: dict[bytes, list] = {}
        self.closed = False

    def watch(self, path, mask, callbacks):
        self.watched[path.path] = callbacks

    def ignore(self, path):
        del self.watched[path.path]

    def loseConnection(self):
        self.closed = True

    def fire(self, directory: bytes, name: bytes, mask: int = IN_MOVED_TO) -> None:
        from twisted.python.filepath import FilePath

        path = FilePath(directory)
        if name:
            path = path.child(name)
        for callback in self.watched[directory]:
            callback(None, path, mask)


class ClockIdleTests(ServerTestMixin, SynchronousTestCase):
    """The IDLE timers on a fake clock: debounce, safety net, fallback."""

    def use_watcher(self, notifier_factory) -> FolderWatcher:
        watcher = FolderWatcher(self.clock, notifier_factory)
        self.factory.watcher = watcher
        return watcher

    def new_directory(self) -> bytes:
        return bytes(self.root / "example.test" / "alice" / "new")

    def test_events_debounced(self):
        """Events wait 50 ms for the rest of their burst: many events are
        one rescan; without events the folder is looked at every 30 s."""
        notifiers: list[FakeNotifier] = []
        self.use_watcher(
            lambda clock: notifiers.append(FakeNotifier()) or notifiers[-1]
        )
        proto, transport = self.logged_in()
        folder = proto.view.folder
        scans = []
        original = folder.scan
        folder.scan = lambda claim_new=False: scans.append(1) or original(claim_new)
        self.say(proto, transport, b"i IDLE\r\n")
        [notifier] = notifiers
        self.assertEqual(len(notifier.watched), 2)
        self.clock.advance(0.05)  # the look at IDLE's start
        self.assertEqual(len(scans), 1)
        transport.clear()
        for _ in range(3):
            self.deliver(FIRST)
            notifier.fire(self.new_directory(), b"x")
            self.clock.advance(0.01)
        self.assertEqual(len(scans), 1)
        self.clock.advance(0.02)
        self.assertEqual(len(scans), 2)
        self.assertEqual(transport.value(), b"* 3 EXISTS\r\n* 3 RECENT\r\n")
        # No more events: the safety-net poll comes after 30 s, not 1 s.
        self.clock.advance(29)
        self.assertEqual(len(scans), 2)
        self.deliver(SECOND)
        transport.clear()
        self.clock.advance(1)
        self.assertEqual(transport.value(), b"* 4 EXISTS\r\n* 4 RECENT\r\n")
        out = self.say(proto, transport, b"DONE\r\n")
        self.assertEqual(out, b"i OK IDLE terminated\r\n")
        self.assertEqual(notifier.watched, {})
        self.assertTrue(notifier.closed)
        self.assertIsNone(proto._idle_call)

    def test_descriptor_lost(self):
        """When the shared descriptor goes (a watched directory deleted),
        the session looks at its folder at once and watches anew."""
        notifiers: list[FakeNotifier] = []
        watcher = self.use_watcher(
            lambda clock: notifiers.append(FakeNotifier()) or notifiers[-1]
        )
        proto, transport = self.logged_in()
        self.say(proto, transport, b"i IDLE\r\n")
        self.clock.advance(0.05)
        self.deliver(FIRST)
        notifiers[0].fire(self.new_directory(), b"", IN_DELETE_SELF)
        self.assertFalse(watcher.watching)
        transport.clear()
        self.clock.advance(0.05)
        self.assertEqual(transport.value(), b"* 1 EXISTS\r\n* 1 RECENT\r\n")
        self.assertEqual(len(notifiers), 2)
        self.assertEqual(len(notifiers[1].watched), 2)
        self.assertTrue(proto._idle_watch.active)
        proto.connectionLost(None)
        self.assertTrue(notifiers[1].closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fallback_to_polling(self):
        """Where inotify cannot start, IDLE polls every second as before,
        and ends cleanly."""

        def unavailable(clock):
            raise OSError(24, "Too many open files")

        watcher = self.use_watcher(unavailable)
        self.deliver(FIRST)
        proto, transport = self.logged_in()
        out = self.say(proto, transport, b"i IDLE\r\n")
        self.assertEqual(out, b"+ idling\r\n")
        self.assertIsNone(proto._idle_watch)
        self.deliver(SECOND)
        transport.clear()
        self.clock.advance(0.5)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.5)
        self.assertEqual(transport.value(), b"* 2 EXISTS\r\n* 2 RECENT\r\n")
        self.assertFalse(watcher.watching)
        proto.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_default_watcher(self):
        """A listener on a real reactor watches with inotify; one on a fake
        clock polls."""
        on_reactor = IMAPServerFactory(self.portal, "h", reactor)
        self.assertIsInstance(on_reactor.watcher, FolderWatcher)
        self.assertIsNone(IMAPServerFactory(self.portal, "h", Clock()).watcher)

"""
The queue runner: carries every queued message to its next hop, however
long that takes, and tells the sender when it cannot.

For each entry, the pending recipients that are due are grouped by domain
(our own users' domains go to the local transport, the others to the
remote one); each group is one call to a transport, within limits on
deliveries in progress in total and per domain.  Each result is written to
the spool as soon as it arrives, before anything else is done with it:

    2xx                    delivered
    5xx                    bounced at once
    4xx, no connection     retried after retry_initial, doubling up to
                           retry_max; bounced once give_up_after has passed

Bounced recipients get one DSN per batch to the envelope sender (never to
the null sender, so never a bounce of a bounce); a sender whose message is
still pending after delay_warning_after gets one delay warning.  An entry
with nothing left pending is removed.

Why nothing is lost or sent twice: the spool's promises (see
L{mailsys.queue.spool}) plus this order of events.  The one window left is
between the next hop's "250" and our write of "delivered": a crash there
sends that message again to those recipients on restart.  No protocol can
close it (RFC 5321 6.1 accepts duplicates over loss); we keep it to one
disk write.

Groups waiting for a free slot wait in one first-in, first-out line per
destination, so that a freed slot costs only the work it starts, not a walk
over the whole backlog (see L{QueueRunner._pump_once}).

Operators change entries from outside (C{mailsys queue hold}, C{release},
C{flush}, C{delete}) by rewriting envelopes under the spool's lock.  The
runner sees those changes by re-reading the spool every L{RESCAN_INTERVAL}
seconds, and re-reads an entry just before each attempt, so a held or
deleted entry is never attempted again.
"""

from __future__ import annotations

import dataclasses
import heapq
import io
import itertools
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Sequence

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mailsys.metrics import SILENT
from mailsys.queue import bounce
from mailsys.queue.interfaces import IOutboundTransport, RecipientResult
from mailsys.queue.spool import (
    BOUNCED,
    DELIVERED,
    DSN,
    MAIL,
    NOTICE,
    PENDING,
    QueueEntry,
    RecipientStatus,
    Spool,
    Transaction,
)

log = Logger(namespace="mailsys.queue")

# How often the runner re-reads the spool for changes made by
# `mailsys queue` (hold, release, flush, delete) in another process.
RESCAN_INTERVAL = 30.0

# Two times closer than this are the same time (float clocks).
_EPSILON = 0.001

# Synthetic result for a recipient the transport gave no answer for.
_NO_RESULT = (451, "4.3.0 no result from the delivery transport")

# Where a group of recipients goes: (delivered locally?, domain).  The
# per-destination limit counts attempts per domain.
_Destination = tuple[bool, str]


@dataclass(frozen=True)
class RetrySchedule:
    """
    How long to keep trying, after Postfix: 5 minutes doubling to an hour,
    a delay warning after 4 hours, give up after 5 days.  All in seconds;
    C{delay_warning_after} 0 means never warn.
    """

    retry_initial: float = 300.0
    retry_max: float = 3600.0
    give_up_after: float = 5 * 24 * 3600.0
    delay_warning_after: float = 4 * 3600.0

    def delay(self, failures: int) -> float:
        """The wait after the C{failures}-th temporary failure in a row (1, 2, ...)."""
        exponent = min(max(failures - 1, 0), 64)
        return min(self.retry_initial * 2.0**exponent, self.retry_max)

    @classmethod
    def from_config(cls, relay: Any) -> RetrySchedule:
        """The schedule of a L{mailsys.config.RelaySection}."""
        return cls(
            retry_initial=relay.retry_initial,
            retry_max=relay.retry_max,
            give_up_after=relay.give_up_after,
            delay_warning_after=relay.delay_warning_after,
        )


def _when(seconds: float) -> str:
    """A time for log lines: ISO 8601, UTC, to the second."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _synchronously(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
    return defer.maybeDeferred(f, *args, **kwargs)


@dataclass
class _Due:
    """
    An entry with recipients waiting for a delivery slot.

    @ivar forced: all its pending recipients go, due or not (wake, flush),
        until it has left every line it waits in.
    @ivar places: the destinations whose line it waits in, each with the
        number of its place there; a place in a line that is not listed
        here (the entry was held, removed or started since) is void.
    """

    forced: bool
    places: dict[_Destination, int] = field(default_factory=dict)


@dataclass
class _Outcome:
    """What one recording transaction did, for the reactor thread to act on."""

    entry: QueueEntry | None
    now: float = 0.0
    created: list[QueueEntry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class QueueRunner(Service):
    """
    Delivers the entries of a L{Spool}, retrying and bouncing as
    L{RetrySchedule} says.

    @param local: the transport for our own users (see L{is_local}).
    @param remote: the transport for everyone else.
    @param is_local: whether an address is delivered by C{local}.
    @param clock: time and timers (the reactor; a L{task.Clock} in tests).
        Arrival times in the spool must use the same time base.
    @param postmaster: where a DSN that cannot be delivered is copied, or
        C{""} to only log it.
    @param threads: runs a blocking spool function, returning a Deferred;
        by default C{clock}'s thread pool, or in-line when C{clock} has none
        (a L{task.Clock}: tests stay synchronous).
    @param rescan_interval: seconds between re-reads of the spool, which is
        how changes made by C{mailsys queue} reach a running server.
    @param metrics: counts each recorded result (L{mailsys.metrics}).

    @ivar entries: every entry known to be queued, by id.
    """

    def __init__(
        self,
        spool: Spool,
        local: IOutboundTransport,
        remote: IOutboundTransport,
        is_local: Callable[[str], bool],
        clock,
        schedule: RetrySchedule,
        hostname: str,
        postmaster: str,
        max_concurrent: int = 20,
        max_per_destination: int = 4,
        *,
        threads: Callable[..., Deferred] | None = None,
        rescan_interval: float = RESCAN_INTERVAL,
        metrics: Any = SILENT,
    ) -> None:
        self.spool = spool
        self.local = local
        self.remote = remote
        self.is_local = is_local
        self.clock = clock
        self.schedule = schedule
        self.hostname = hostname
        self.postmaster = postmaster.lower()
        self.max_concurrent = max_concurrent
        self.max_per_destination = max_per_destination
        if threads is None:
            if hasattr(clock, "getThreadPool"):

                def threads(f, *args, **kwargs):
                    pool = clock.getThreadPool()
                    return deferToThreadPool(clock, pool, f, *args, **kwargs)

            else:
                threads = _synchronously
        self._threads = threads
        self.rescan_interval = rescan_interval
        self.metrics = metrics

        self.entries: dict[str, QueueEntry] = {}
        self._timers: dict[str, IDelayedCall] = {}
        # Entries with recipients waiting for a free slot.
        self._due: dict[str, _Due] = {}
        # One line per destination of (place, queue id), first come first
        # served; places are numbered in the order entries became due.
        self._lines: dict[_Destination, deque[tuple[int, str]]] = {}
        self._places = itertools.count()
        # A heap of (place, destination): the head of each line whose
        # domain has a free slot, so the oldest startable group is found
        # without looking at full destinations.  Items no longer at the
        # head of their line are skipped when they come up.
        self._heads: list[tuple[int, _Destination]] = []
        self._in_flight: dict[str, set[str]] = {}
        self._active = 0
        self._per_destination: Counter[str] = Counter()
        self._pumping = False
        self._pump_again = False
        self._settling: set[str] = set()
        self._problems: set[str] = set()
        self._rescanner = LoopingCall(self.rescan)
        self._rescanner.clock = clock
        # Fires once the spool has been recovered and loaded.
        self.ready: Deferred = Deferred()

    # --- service -------------------------------------------------------------

    def startService(self) -> None:
        """Recover and load the spool, schedule every entry, start rescanning."""
        super().startService()
        d = self._threads(self.spool.recover)

        def loaded(result: tuple[list[QueueEntry], list[str]]) -> None:
            entries, notes = result
            for note in notes:
                log.warn("queue recovery: {note}", note=note)
            for entry in entries:
                self._adopt(entry)
            log.info("queue: {count} entries loaded", count=len(entries))

        d.addCallback(loaded)
        d.addErrback(lambda f: log.failure("queue: cannot load the spool", f))
        d.addBoth(self._loaded)

    def _loaded(self, ignored: object) -> None:
        # Even if loading failed, keep re-reading: the operator may fix it.
        if self.running and not self._rescanner.running:
            self._rescanner.start(self.rescan_interval, now=False)
        if not self.ready.called:
            self.ready.callback(None)

    def stopService(self):
        """
        Stop starting attempts.  Attempts under way are left to finish and
        are recorded if the process lives long enough; if it does not, they
        are simply made again at the next start.
        """
        super().stopService()
        if self._rescanner.running:
            self._rescanner.stop()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()

    # --- public --------------------------------------------------------------

    def wake(self, queue_id: str) -> Deferred:
        """
        Attempt C{queue_id} now: called right after the SMTP side enqueued
        it.  Reads it from the spool if this runner has not seen it yet.
        """
        d = self._threads(self.spool.load, queue_id)

        def loaded(entry: QueueEntry | None) -> None:
            if entry is None:
                return
            self._adopt(entry)
            self._make_due(queue_id, forced=True)

        d.addCallback(loaded)
        d.addErrback(
            lambda f: log.failure("{queue_id}: cannot read", f, queue_id=queue_id)
        )
        return d

    def flush(self) -> None:
        """Attempt every entry that is not held now, whether due or deferred."""
        for queue_id in list(self.entries):
            self._make_due(queue_id, forced=True)

    def rescan(self) -> Deferred:
        """
        Re-read the spool and adopt what changed on disk: entries another
        process added, held, released, flushed or deleted.
        """
        known = set(self.entries)
        d = self._threads(self.spool.load_all)
        d.addCallback(self._rescanned, known)
        d.addErrback(lambda f: log.failure("queue: cannot re-read the spool", f))
        return d

    @property
    def busy(self) -> bool:
        """Whether any attempt or bookkeeping is under way."""
        return bool(self._active or self._settling)

    # --- bookkeeping ---------------------------------------------------------

    def _rescanned(
        self, loaded: tuple[list[QueueEntry], dict[str, str]], known: set[str]
    ) -> None:
        entries, problems = loaded
        for queue_id, problem in problems.items():
            if queue_id not in self._problems:
                log.error("queue: {problem}", problem=problem)
        self._problems = set(problems)
        on_disk = {entry.queue_id for entry in entries}
        for entry in entries:
            self._adopt(entry)
        for entry in list(self.entries.values()):
            # Settling that failed earlier (a full disk, say) is tried again.
            if entry.unreported or entry.finished:
                self._settle(entry.queue_id)
        for queue_id in known - on_disk - set(problems):
            if queue_id in self.entries:
                self._forget(queue_id, "removed from the queue")

    def _adopt(self, entry: QueueEntry) -> None:
        """
        Take C{entry} as read from disk, unless we hold a newer copy, and
        (re)schedule it.  Entries with bounces not yet reported, or nothing
        left to do, are settled.
        """
        current = self.entries.get(entry.queue_id)
        if current is not None and current.revision >= entry.revision:
            return
        self.entries[entry.queue_id] = entry
        if entry.held:
            self._due.pop(entry.queue_id, None)
        if entry.unreported or entry.finished:
            self._settle(entry.queue_id)
        self._reschedule(entry.queue_id)

    def _forget(self, queue_id: str, why: str) -> None:
        if self.entries.pop(queue_id, None) is not None:
            log.info("{queue_id}: {why}", queue_id=queue_id, why=why)
        timer = self._timers.pop(queue_id, None)
        if timer is not None and timer.active():
            timer.cancel()
        self._due.pop(queue_id, None)

    def _reschedule(self, queue_id: str) -> None:
        """
        Set the entry's one timer to the earliest time one of its pending
        recipients falls due, leaving out those already being tried or
        already waiting in a line (they need no timer to go).
        """
        timer = self._timers.pop(queue_id, None)
        if timer is not None and timer.active():
            timer.cancel()
        entry = self.entries.get(queue_id)
        if entry is None or entry.held or not self.running:
            return
        flying = self._in_flight.get(queue_id, set())
        due = self._due.get(queue_id)
        waiting = due.places if due is not None else {}
        times = [
            r.next_attempt
            for r in entry.pending
            if r.address not in flying
            and not (waiting and self._destination(r.address) in waiting)
        ]
        if not times:
            return
        delay = max(0.0, min(times) - self.clock.seconds())
        timer = self.clock.callLater(delay, self._timer_fired, queue_id)
        self._timers[queue_id] = timer

    def _timer_fired(self, queue_id: str) -> None:
        self._timers.pop(queue_id, None)
        self._make_due(queue_id, forced=False)

    def _make_due(self, queue_id: str, forced: bool) -> None:
        """
        Put the entry in the line of each destination it has recipients to
        try for (all pending ones if C{forced}), keeping any place it
        already has, then start what the limits allow.
        """
        entry = self.entries.get(queue_id)
        if entry is None or entry.held:
            return
        due = self._due.get(queue_id)
        if due is None:
            due = self._due[queue_id] = _Due(forced)
        due.forced = due.forced or forced
        for destination in self._groups(entry, due.forced):
            if destination not in due.places:
                place = next(self._places)
                due.places[destination] = place
                line = self._lines.setdefault(destination, deque())
                line.append((place, queue_id))
                if len(line) == 1:
                    heapq.heappush(self._heads, (place, destination))
        if not due.places:
            del self._due[queue_id]
        self._pump()
        # Recipients that are not due yet, in destinations it is not
        # waiting for, need the timer.
        self._reschedule(queue_id)

    # --- attempts ------------------------------------------------------------

    def _destination(self, address: str) -> _Destination:
        """Where C{address} is delivered: its transport and its domain."""
        return (bool(self.is_local(address)), address.rpartition("@")[2].lower())

    def _candidates(
        self, entry: QueueEntry, forced: bool
    ) -> Iterator[tuple[_Destination, str]]:
        """Due pending recipients not already being tried, with their destination."""
        now = self.clock.seconds()
        flying = self._in_flight.get(entry.queue_id, set())
        for status in entry.pending:
            if status.address in flying:
                continue
            if not forced and status.next_attempt > now + _EPSILON:
                continue
            yield self._destination(status.address), status.address

    def _groups(self, entry: QueueEntry, forced: bool) -> dict[_Destination, list[str]]:
        """Due pending recipients not already being tried, by destination."""
        groups: dict[_Destination, list[str]] = {}
        for destination, address in self._candidates(entry, forced):
            groups.setdefault(destination, []).append(address)
        return groups

    def _pump(self) -> None:
        """Start every due attempt the concurrency limits allow."""
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            self._pump_again = True
            while self._pump_again and self.running:
                self._pump_again = False
                self._pump_once()
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        """
        Start waiting groups, oldest first, while a slot is free in total.

        Why this is cheap: C{_heads} holds the head of each line whose
        domain had a free slot, so each step looks at one line only; a full
        domain's head is dropped here and pushed again by the attempt that
        frees a slot there.  Each step starts a group or throws away a
        place or heap item made void since, which is paid for once, when
        it was made.
        """
        while self._heads and self._active < self.max_concurrent:
            place, destination = heapq.heappop(self._heads)
            line = self._lines.get(destination)
            if not line or line[0][0] != place:
                continue
            if self._per_destination[destination[1]] >= self.max_per_destination:
                continue
            _, queue_id = line.popleft()
            if line:
                heapq.heappush(self._heads, (line[0][0], destination))
            else:
                del self._lines[destination]
            recipients = self._take(queue_id, destination, place)
            if recipients:
                self._start(queue_id, destination[0], destination[1], recipients)

    def _take(self, queue_id: str, destination: _Destination, place: int) -> list[str]:
        """
        Leave the line for C{destination} at C{place}: the entry's
        recipients to try there now, none if the place was void.
        """
        due = self._due.get(queue_id)
        if due is None or due.places.get(destination) != place:
            return []
        del due.places[destination]
        if not due.places:
            del self._due[queue_id]
        entry = self.entries.get(queue_id)
        if entry is None or entry.held:
            return []
        recipients = [
            address
            for where, address in self._candidates(entry, due.forced)
            if where == destination
        ]
        if not recipients:
            # Nothing due any more (the entry changed on disk): keep the
            # timer right for whatever is left.
            self._reschedule(queue_id)
        return recipients

    def _start(
        self, queue_id: str, local: bool, domain: str, recipients: list[str]
    ) -> None:
        self._active += 1
        self._per_destination[domain] += 1
        self._in_flight.setdefault(queue_id, set()).update(recipients)
        d = Deferred.fromCoroutine(self._attempt(queue_id, local, recipients))

        def failed(failure) -> None:
            # Nothing was recorded (a damaged envelope, a full disk, a bug):
            # the recipients stay pending; try again later, not in a loop.
            log.failure(
                "{queue_id}: delivery attempt failed", failure, queue_id=queue_id
            )
            entry = self.entries.get(queue_id)
            later = self.clock.seconds() + self.schedule.retry_initial
            for address in recipients:
                status = entry.recipient(address) if entry is not None else None
                if status is not None:
                    status.next_attempt = max(status.next_attempt, later)

        d.addErrback(failed)

        def done(_: object) -> None:
            self._active -= 1
            self._per_destination[domain] -= 1
            if not self._per_destination[domain]:
                del self._per_destination[domain]
            # A slot is free for this domain: its lines may move again.
            for destination in ((False, domain), (True, domain)):
                line = self._lines.get(destination)
                if line:
                    heapq.heappush(self._heads, (line[0][0], destination))
            flying = self._in_flight.get(queue_id, set())
            flying.difference_update(recipients)
            if not flying:
                self._in_flight.pop(queue_id, None)
            self._reschedule(queue_id)
            self._pump()

        d.addBoth(done)

    async def _attempt(self, queue_id: str, local: bool, recipients: list[str]) -> None:
        """
        One delivery attempt for C{recipients} of one domain: re-read the
        entry (an operator may have held or deleted it), send, and record
        the results before anything else.
        """
        entry = await self._threads(self.spool.load, queue_id)
        if entry is None:
            self._forget(queue_id, "removed from the queue")
            return
        self._adopt(entry)
        if entry.held:
            return
        recipients = [
            address
            for address in recipients
            if (status := entry.recipient(address)) is not None
            and status.state == PENDING
        ]
        if not recipients:
            return
        transport = self.local if local else self.remote
        try:
            results = await transport.send(
                queue_id, entry.sender, recipients, entry.message_path
            )
        except Exception:
            log.failure("{queue_id}: the transport failed", queue_id=queue_id)
            results = []
        results = self._one_per_recipient(results, recipients)
        now = self.clock.seconds()
        # If this fails the results are not written down: the recipients
        # stay pending and are tried again (a duplicate, since the disk
        # refused the record).
        outcome = await self._threads(self._record, queue_id, results, now)
        self._log_results(queue_id, outcome.entry, results, local)
        self._apply(queue_id, outcome)

    @staticmethod
    def _one_per_recipient(
        results: Sequence[RecipientResult], recipients: Sequence[str]
    ) -> list[RecipientResult]:
        """
        One result per recipient, in order, naming the recipient as we
        queued it: matched by address, ignoring case (a transport may
        normalise it); a recipient without a result gets a temporary
        failure, so it is retried, never dropped.
        """
        by_address: dict[str, RecipientResult] = {}
        for result in results:
            if isinstance(result, RecipientResult):
                by_address.setdefault(result.recipient.lower(), result)
        matched = []
        for address in recipients:
            result = by_address.get(address.lower())
            if result is None:
                matched.append(RecipientResult(address, *_NO_RESULT))
            else:
                matched.append(dataclasses.replace(result, recipient=address))
        return matched

    def _log_results(
        self,
        queue_id: str,
        entry: QueueEntry | None,
        results: Sequence[RecipientResult],
        local: bool,
    ) -> None:
        """One line per recipient: queue id, recipient, next hop, reply, outcome."""
        for result in results:
            status = entry.recipient(result.recipient) if entry is not None else None
            if result.delivered:
                outcome = "delivered"
                age = (
                    self.clock.seconds() - entry.created if entry is not None else None
                )
                self.metrics.queue_result("delivered", age)
            elif status is None:
                outcome = "not recorded (entry removed from the queue)"
            elif status.state == BOUNCED:
                outcome = "bounced" if result.permanent else "expired, bounced"
                self.metrics.queue_result("bounced")
            else:
                outcome = f"deferred, next attempt {_when(status.next_attempt)}"
                self.metrics.queue_result("deferred")
            log.info(
                "{queue_id}: to=<{recipient}> relay={next_hop} reply={code} {text}:"
                " {outcome}",
                queue_id=queue_id,
                recipient=result.recipient,
                next_hop=result.next_hop or ("local" if local else "none"),
                code=result.code,
                text=result.text,
                outcome=outcome,
                next_attempt=status.next_attempt if status is not None else None,
            )

    def _apply(self, queue_id: str, outcome: _Outcome) -> None:
        """Act on a recording transaction: log, wake new DSNs, forget finished."""
        for note in outcome.notes:
            log.info("{queue_id}: {note}", queue_id=queue_id, note=note)
        for created in outcome.created:
            self._adopt(created)
            self._make_due(created.queue_id, forced=True)
        if outcome.entry is None:
            self._forget(queue_id, "removed from the queue")
        elif outcome.entry.finished:
            self._forget(queue_id, "done, removed from the queue")
        else:
            self._adopt(outcome.entry)

    def _settle(self, queue_id: str) -> None:
        """Report and remove, in a thread, an entry loaded in need of it."""
        if queue_id in self._settling:
            return
        self._settling.add(queue_id)
        d = self._threads(self._settle_blocking, queue_id, self.clock.seconds())
        d.addCallback(lambda outcome: self._apply(queue_id, outcome))
        d.addErrback(
            lambda f: log.failure("{queue_id}: cannot settle", f, queue_id=queue_id)
        )
        d.addBoth(lambda _: self._settling.discard(queue_id))

    # --- in a thread, under the spool's lock ----------------------------------

    def _record(
        self, queue_id: str, results: Sequence[RecipientResult], now: float
    ) -> _Outcome:
        """
        Write the results of an attempt, then the DSNs they call for.
        Blocks; runs in a thread.
        """
        with self.spool.transaction() as txn:
            entry = txn.read(queue_id)
            if entry is None:
                return _Outcome(None)
            for result in results:
                self._apply_result(entry, result, now)
            # First of all, durably: what the next hop has accepted.
            if entry.finished:
                txn.remove(entry)
                return _Outcome(entry)
            txn.save(entry)
            return self._report(txn, entry, now)

    def _settle_blocking(self, queue_id: str, now: float) -> _Outcome:
        with self.spool.transaction() as txn:
            entry = txn.read(queue_id)
            if entry is None:
                return _Outcome(None)
            return self._report(txn, entry, now)

    def _apply_result(
        self, entry: QueueEntry, result: RecipientResult, now: float
    ) -> None:
        status = entry.recipient(result.recipient)
        if status is None or status.state != PENDING:
            return
        status.code = result.code
        status.text = result.text
        status.next_hop = result.next_hop
        status.last_attempt = now
        if result.delivered:
            status.state = DELIVERED
        elif result.permanent:
            status.state = BOUNCED
        else:
            status.attempts += 1
            deadline = entry.created + self.schedule.give_up_after
            if now >= deadline - _EPSILON:
                status.state = BOUNCED
            else:
                # The last retry falls on the deadline itself, so a message
                # is bounced when it expires, not up to retry_max later.
                retry = now + self.schedule.delay(status.attempts)
                status.next_attempt = min(retry, deadline)

    def _report(self, txn: Transaction, entry: QueueEntry, now: float) -> _Outcome:
        """
        Queue the DSNs C{entry} calls for, then mark them sent and write or
        remove C{entry}.  Each DSN's id is fixed by C{entry.reports}, so
        doing this again after a crash finds it queued and sends nothing
        twice.
        """
        outcome = _Outcome(entry, now)
        changed = False
        failed = entry.unreported
        if failed:
            changed = True
            addresses = ", ".join(r.address for r in failed)
            if entry.sender is not None:
                report_id = self._queue_report(
                    txn, entry, failed, bounce.FAILED, entry.sender, outcome
                )
                outcome.notes.append(f"bounce {report_id} for {addresses} queued")
            elif (
                entry.kind != NOTICE
                and self.postmaster
                and self.postmaster not in {r.address.lower() for r in failed}
            ):
                report_id = self._queue_report(
                    txn, entry, failed, bounce.FAILED, self.postmaster, outcome
                )
                outcome.notes.append(
                    f"undeliverable {entry.kind} with null sender to {addresses}:"
                    f" copied to {self.postmaster} as {report_id}"
                )
            else:
                # Never a bounce to <>: that is how bounce loops start.
                outcome.notes.append(
                    f"undeliverable {entry.kind} with null sender to {addresses}:"
                    " dropped"
                )
            for status in failed:
                status.reported = True
        warn_after = self.schedule.delay_warning_after
        delayed = [r for r in entry.pending if r.attempts > 0]
        if (
            entry.sender is not None
            and entry.kind == MAIL
            and not entry.warned
            and warn_after > 0
            and delayed
            and now >= entry.created + warn_after - _EPSILON
        ):
            changed = True
            report_id = self._queue_report(
                txn, entry, delayed, bounce.DELAYED, entry.sender, outcome
            )
            entry.warned = True
            addresses = ", ".join(r.address for r in delayed)
            outcome.notes.append(f"delay warning {report_id} for {addresses} queued")
        if entry.finished:
            txn.remove(entry)
        elif changed:
            txn.save(entry)
        return outcome

    def _queue_report(
        self,
        txn: Transaction,
        entry: QueueEntry,
        recipients: list[RecipientStatus],
        action: str,
        to: str,
        outcome: _Outcome,
    ) -> str:
        """Queue one DSN about C{recipients} of C{entry} to C{to}; its id."""
        now = outcome.now
        report_id = entry.next_report_id()
        data = bounce.delivery_report(
            hostname=self.hostname,
            entry=entry,
            recipients=recipients,
            action=action,
            to=to,
            report_id=report_id,
            now=now,
            will_retry_until=entry.created + self.schedule.give_up_after,
        )
        kind = NOTICE if entry.sender is None else DSN
        created = txn.add(report_id, None, [to], io.BytesIO(data), kind=kind, now=now)
        if created is not None:
            outcome.created.append(created)
        entry.reports += 1
        return report_id

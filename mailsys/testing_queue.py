"""
Fakes for the outbound queue, shipped so that tests (ours and a user's)
can drive the queue runner without sockets, DNS or threads: a transport
that answers from a script, and a way to run the spool in-line.

    clock = task.Clock()
    transport = ScriptedTransport({"bob@b.test": [(450, "4.2.0 busy"), (250, "OK")]})
    runner = QueueRunner(spool, transport, transport, lambda a: False, clock,
                         RetrySchedule(), "mail.a.test", "", threads=synchronously)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from mailsys.queue.interfaces import IOutboundTransport, RecipientResult

OK = (250, "2.0.0 OK")


def synchronously(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
    """
    Run blocking spool work in-line (the C{threads} argument of the runner
    and the local transport): with a L{task.Clock}, a test is then fully
    deterministic.  Never use it with a real reactor.
    """
    return defer.maybeDeferred(f, *args, **kwargs)


@dataclass(frozen=True)
class Attempt:
    """
    One call of L{ScriptedTransport.send}: the message as it was read and
    the results given.
    """

    queue_id: str
    sender: str | None
    recipients: tuple[str, ...]
    message: bytes
    results: tuple[RecipientResult, ...]


@implementer(IOutboundTransport)
class ScriptedTransport:
    """
    An L{IOutboundTransport} that answers each recipient from a script.

    C{replies} maps a recipient to the replies of its successive attempts,
    as C{(code, text)}; the last one repeats for ever, and recipients not
    in the script get C{default}.  With C{hold} set, C{send} returns
    Deferreds that fire only when the test calls L{release}, so it can see
    what is in progress (concurrency limits, a crash "on the wire").

    @ivar attempts: every call, in order.
    """

    def __init__(
        self,
        replies: Mapping[str, Sequence[tuple[int, str]]] | None = None,
        default: tuple[int, str] = OK,
        next_hop: str = "mx.fake.test[192.0.2.25]:25",
    ) -> None:
        self.replies = {k: list(v) for k, v in (replies or {}).items()}
        self.default = default
        self.next_hop = next_hop
        self.attempts: list[Attempt] = []
        self.hold = False
        self.pending: list[tuple[Deferred, list[RecipientResult]]] = []

    def script(self, recipient: str, *replies: tuple[int, str]) -> None:
        """Replace the replies for C{recipient}."""
        self.replies[recipient] = list(replies)

    def _reply(self, recipient: str) -> tuple[int, str]:
        script = self.replies.get(recipient)
        if not script:
            return self.default
        return script.pop(0) if len(script) > 1 else script[0]

    def send(
        self,
        queue_id: str,
        sender: str | None,
        recipients: Sequence[str],
        message_path: Path,
    ) -> Deferred[list[RecipientResult]]:
        message = Path(message_path).read_bytes()
        results = [
            RecipientResult(r, *self._reply(r), next_hop=self.next_hop)
            for r in recipients
        ]
        self.attempts.append(
            Attempt(queue_id, sender, tuple(recipients), message, tuple(results))
        )
        if self.hold:
            d: Deferred[list[RecipientResult]] = Deferred()
            self.pending.append((d, results))
            return d
        return defer.succeed(results)

    def release(self) -> None:
        """Fire every held attempt with its scripted results."""
        pending, self.pending = self.pending, []
        for d, results in pending:
            d.callback(results)

    def delivered(self) -> list[tuple[str, str]]:
        """C{(queue_id, recipient)} for every attempt answered 2xx, in order."""
        return [
            (attempt.queue_id, result.recipient)
            for attempt in self.attempts
            for result in attempt.results
            if result.delivered
        ]

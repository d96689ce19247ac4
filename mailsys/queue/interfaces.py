"""The contract between the queue runner and the transports that carry mail.

The runner knows nothing about SMTP or maildirs: it hands a transport one
queued message and the recipients of ONE domain, and gets back one result per
recipient.  Keeping the result a plain value (code + text + next hop) lets the
runner decide retry, bounce or done in a single place, whatever the transport.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from twisted.internet.defer import Deferred
from zope.interface import Interface


@dataclass(frozen=True)
class RecipientResult:
    """What the next hop (or our failure to reach it) said about one recipient.

    ``code`` is the SMTP reply code from the next hop, or a synthetic one:
    421/451 for connection failures, timeouts and TLS required-but-failed
    (temporary); 550/554/556 for permanent failures such as a null MX
    (RFC 7505: 556 5.1.10) or a domain that does not exist (NXDOMAIN is
    permanent, SERVFAIL/timeout temporary).
    """

    recipient: str  # "bob@b.test"
    code: int
    text: str  # reply text (with enhanced code if given), or a failure description
    next_hop: str = ""  # "mx.b.test[192.0.2.1]:25" for logs and DSNs

    @property
    def delivered(self) -> bool:
        """The next hop took responsibility for this recipient."""
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        """Retrying will not help: bounce now."""
        return self.code >= 500


class IOutboundTransport(Interface):
    """Something that can carry a queued message to its next hop."""

    def send(
        queue_id: str,
        sender: str | None,
        recipients: Sequence[str],
        message_path: Path,
    ) -> Deferred[list[RecipientResult]]:
        """Deliver one queued message to recipients that all share ONE domain
        (the runner groups them).  The file holds the message with LF line
        endings; the transport sends CRLF lines with dot-stuffing.  Fires with
        one result per recipient, in order; never fails (errors become
        temporary results) except for programming errors."""

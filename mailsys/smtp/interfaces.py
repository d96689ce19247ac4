"""
The seam between the SMTP protocol and the rest of the system.

The protocol parses commands, enforces limits and keeps replies in order;
everything it must decide (is this sender acceptable, is this recipient
ours, where does the message go) it asks an L{ISMTPDelivery} provider, as
Twisted's own C{IMessageDelivery} intends.  Ours differs from Twisted's in
two ways that matter for "nothing lost": it receives the whole transaction
once (not one message object per recipient), so delivery to several
mailboxes is all-or-nothing; and C{deliver} fires only when the message is
durably stored, which is when the protocol may say 250.
"""

from __future__ import annotations

import base64
import os
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from twisted.mail.smtp import SMTPServerError
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from mailsys.addresses import MailAddress
    from mailsys.routing import Route


class Reply(SMTPServerError):
    """
    A reply chosen by policy code, with its RFC 3463 enhanced status code.

    Raise it (or fail a Deferred with it) from an L{ISMTPDelivery} method to
    refuse: C{Reply(550, "5.1.1", "User unknown")}.
    """

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(code, f"{status} {text}")
        self.status = status
        self.text = text


def new_queue_id() -> str:
    """
    A short, unique, sortable id for one message, shown in the 250 reply,
    the C{Received:} header and every log line about the message.
    """
    stamp = struct.pack(">Q", time.time_ns() // 1000)[2:]
    return base64.b32encode(stamp + os.urandom(4)).decode("ascii").rstrip("=")


@dataclass
class Session:
    """
    What the server knows about one client connection.

    @ivar client_host: the client's IP address as text.
    @ivar helo: the HELO/EHLO argument, once given.
    @ivar tls: whether the session is encrypted (STARTTLS or implicit TLS).
    @ivar authenticated: the address the client authenticated as, if any.
    """

    client_host: str
    session_id: str = field(default_factory=new_queue_id)
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    authenticated: str | None = None

    @property
    def protocol_name(self) -> str:
        """The C{with} value of RFC 3848: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA."""
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls else "") + ("A" if self.authenticated else "")


@dataclass
class Envelope:
    """
    One mail transaction: from MAIL FROM to the end of DATA.

    @ivar sender: the reverse path; C{None} for the null sender C{<>}.
    @ivar recipients: accepted recipients, in RCPT order, without duplicates.
    @ivar routes: the route the policy found for each accepted recipient.
    """

    queue_id: str
    sender: MailAddress | None
    recipients: list[MailAddress] = field(default_factory=list)
    routes: dict[MailAddress, Route] = field(default_factory=dict)
    declared_size: int | None = None
    body: str = "7BIT"


class ISMTPDelivery(Interface):
    """
    Decides what the SMTP server accepts and stores what it accepted.
    """

    default_domain = Attribute(
        "The domain that RCPT TO:<postmaster> without a domain means (RFC 5321 4.5.1)."
    )

    def validateFrom(session, envelope):
        """
        Accept or refuse the sender C{envelope.sender}.

        @return: C{None} or a L{Deferred} firing with C{None}.
        @raise Reply: to refuse.
        """

    def validateTo(session, envelope, recipient):
        """
        Accept or refuse one recipient.

        @return: the L{Route} for C{recipient}, or a L{Deferred} of it.
        @raise Reply: to refuse (550 5.1.1 unknown user, 550 5.7.1 relay).
        """

    def deliver(session, envelope, message, size):
        """
        Store the message durably for every accepted recipient.

        @param message: a binary file positioned at the start of the message
            as received (dot-unstuffed, LF line endings).
        @param size: its length in bytes.
        @return: a L{Deferred} that fires only once the message is on disk
            and fsync'ed; it fails (with L{Reply} or anything else) if any
            recipient could not be stored, in which case nothing was.
        """

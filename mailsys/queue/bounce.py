"""
Telling a sender what became of their message: RFC 3464 delivery status
notifications (DSNs), and the loop check that keeps mail from circling.

A DSN is a C{multipart/report; report-type=delivery-status} message
(RFC 6522) with three parts: a text a person reads, a
C{message/delivery-status} part a program reads (one block about the
message, one per recipient), and the original headers
(C{text/rfc822-headers}), so the sender can tell which message it was
without getting the whole of it back.  It is built with the standard
library's C{email} package, which also parses it back in the tests.

DSNs go from C{MAILER-DAEMON@<hostname>} with the null reverse path C{<>},
so that a DSN that cannot be delivered never produces another
(RFC 5321 4.5.5, 6.1); the runner decides who gets one.
"""

from __future__ import annotations

import re
import textwrap
from datetime import datetime, timezone
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime
from pathlib import Path
from typing import Iterable, Sequence

from mailsys.queue.spool import QueueEntry, RecipientStatus

# RFC 5321 6.3 suggests counting Received: fields to find loops; Postfix
# stops at 50 (hopcount_limit), we at more than 30.
MAX_RECEIVED = 30

# At most this much of the original header block is returned in a DSN.
MAX_RETURNED_HEADERS = 64 * 1024

FAILED = "failed"
DELAYED = "delayed"

# The next hop the local transport reports: not a remote MTA.
LOCAL_HOP = "local"

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def _printable(text: str) -> str:
    """C{text} as one line of printable ASCII, for header fields."""
    return " ".join(_UNPRINTABLE.sub("?", text).split())


def _date(when: float) -> str:
    """An RFC 5322 date, in UTC."""
    return format_datetime(datetime.fromtimestamp(when, timezone.utc))


def enhanced_status(code: int, text: str) -> str:
    """
    The RFC 3463 status of a reply: the enhanced code at the start of its
    text when the server gave one whose class matches the reply code,
    otherwise the generic C{4.0.0} or C{5.0.0}.
    """
    match = _ENHANCED.match(text.strip())
    kind = "5" if code >= 500 else "4" if code >= 400 else "2"
    if match and match[1] == kind:
        return match.group(0)
    return f"{kind}.0.0"


def _status(action: str, recipient: RecipientStatus) -> str:
    """
    The DSN status of a recipient; a failure after temporary errors only
    (the queue gave up) without a more precise code from the server is
    RFC 3463's 4.4.7, "message delivery time expired".
    """
    status = enhanced_status(recipient.code, recipient.text)
    if action == FAILED and recipient.code < 500 and status == "4.0.0":
        return "4.4.7"
    return status


def remote_mta(next_hop: str) -> str | None:
    """
    The host name of C{next_hop} (C{"mx.b.test[192.0.2.1]:25"} gives
    C{"mx.b.test"}, C{"[192.0.2.1]:25"} gives C{"192.0.2.1"}), or C{None}
    for local delivery and unknown hops.
    """
    if not next_hop or next_hop == LOCAL_HOP:
        return None
    match = re.match(r"([^\[\]:]*)(?:\[([^\]]*)\])?", next_hop)
    host = (match[1] or match[2] or "") if match else ""
    return _printable(host) or None


def _address_field(address: str) -> str:
    """
    An address for C{Final-Recipient:}: C{rfc822; ADDRESS} when it is
    ASCII, otherwise RFC 6533's C{utf-8} type with C{\\x{HHHH}} escapes,
    which keeps the DSN pure ASCII.
    """
    if address.isascii() and not _UNPRINTABLE.search(address):
        return f"rfc822; {address}"
    escaped = "".join(
        c if 0x20 < ord(c) < 0x7F and c != "\\" else f"\\x{{{ord(c):X}}}"
        for c in address
    )
    return f"utf-8; {escaped}"


def original_headers(message_path: Path, limit: int = MAX_RETURNED_HEADERS) -> bytes:
    """
    The header block of the queued message (up to its first empty line),
    cut at C{limit} bytes on a line boundary.  Empty if the file is gone.
    """
    try:
        with open(message_path, "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return b""
    end = data.find(b"\n\n")
    if end >= 0:
        return data[: end + 1]
    if len(data) > limit:
        data = data[: data.rfind(b"\n", 0, limit) + 1]
    return data


def _human_text(
    hostname: str,
    action: str,
    recipients: Sequence[RecipientStatus],
    entry: QueueEntry,
    will_retry_until: float | None,
    about_bounce: bool,
) -> str:
    """The part a person reads: what happened, to whom, and what was said."""
    lines = [f"This is the mail system at host {hostname}.", ""]
    if action == DELAYED:
        lines += [
            "####### THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR"
            " MESSAGE. #######",
            "",
            "Your message could not be delivered yet to the recipients below."
            " It is still being tried",
        ]
        if will_retry_until is not None:
            lines[-1] += f" until {_date(will_retry_until)}"
        lines[-1] += "."
    elif about_bounce:
        lines.append(
            "A delivery status notification (a bounce) generated here could not"
            " be delivered to its recipients below, so it is copied to you, the"
            " postmaster.  Its headers are attached."
        )
    else:
        lines.append(
            "I'm sorry to have to inform you that your message could not be"
            " delivered to one or more recipients.  It's attached below"
            " (headers only)."
        )
    lines += ["", "For further assistance, please send mail to postmaster.", ""]
    for status in recipients:
        reply = _printable(f"{status.code} {status.text}".strip())
        where = remote_mta(status.next_hop)
        detail = f"host {where} said: {reply}" if where else reply
        if action == FAILED and status.code < 500:
            detail = f"delivery time expired; the last attempt got: {detail}"
        lines.append(f"<{_printable(status.address)}>: {detail}")
    wrapped: list[str] = []
    for line in lines:
        wrapped.extend(textwrap.wrap(line, 76, break_long_words=True) or [""])
    return "\n".join(wrapped) + "\n"


def delivery_report(
    *,
    hostname: str,
    entry: QueueEntry,
    recipients: Sequence[RecipientStatus],
    action: str,
    to: str,
    report_id: str,
    now: float,
    will_retry_until: float | None = None,
) -> bytes:
    """
    An RFC 3464 DSN about C{recipients} of C{entry}, addressed to C{to},
    as the bytes to queue (LF line endings).

    @param action: L{FAILED} (a bounce) or L{DELAYED} (a warning).
    @param report_id: the DSN's own queue id, part of its Message-ID.
    @param will_retry_until: for a warning, when we give up.
    """
    about_bounce = entry.sender is None
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = _printable(to)
    if action == DELAYED:
        report["Subject"] = "Delayed Mail (still being retried)"
    elif about_bounce:
        report["Subject"] = "Undeliverable delivery status notification"
    else:
        report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = _date(now)
    report["Message-ID"] = f"<{report_id}@{hostname}>"
    # RFC 3834 5: an automatic reply; vacation responders leave it alone.
    report["Auto-Submitted"] = "auto-replied"
    report.preamble = "This is a MIME-encapsulated message.\n"

    text = _human_text(
        hostname, action, recipients, entry, will_retry_until, about_bounce
    )
    report.attach(MIMEText(text, "plain", "us-ascii"))

    status = Message()
    status["Content-Description"] = "Delivery report"
    status.set_type("message/delivery-status")
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {hostname}"
    per_message["X-Mailsys-Queue-ID"] = entry.queue_id
    per_message["Arrival-Date"] = _date(entry.created)
    status.attach(per_message)
    for recipient in recipients:
        block = Message()
        block["Final-Recipient"] = _address_field(recipient.address)
        block["Action"] = action
        block["Status"] = _status(action, recipient)
        host = remote_mta(recipient.next_hop)
        if host:
            block["Remote-MTA"] = f"dns; {host}"
        if recipient.code:
            diagnostic = _printable(f"{recipient.code} {recipient.text}")
            block["Diagnostic-Code"] = f"smtp; {diagnostic}"
        if recipient.last_attempt is not None:
            block["Last-Attempt-Date"] = _date(recipient.last_attempt)
        if action == DELAYED and will_retry_until is not None:
            block["Will-Retry-Until"] = _date(will_retry_until)
        status.attach(block)
    report.attach(status)

    headers = original_headers(entry.message_path)
    if headers.isascii():
        returned = MIMEText(headers.decode("ascii"), "rfc822-headers", "us-ascii")
    else:
        decoded = headers.decode("utf-8", errors="replace")
        returned = MIMEText(decoded, "rfc822-headers", "utf-8")
    returned["Content-Description"] = "Undelivered message headers"
    report.attach(returned)
    return report.as_bytes()


def _header_lines(header_block: bytes) -> list[bytes]:
    """The header fields of C{header_block}, unfolded, up to the first empty line."""
    fields: list[bytes] = []
    for line in header_block.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line:
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b" " + line.strip()
        else:
            fields.append(line)
    return fields


def is_looping(header_block: bytes, our_delivered_to: Iterable[str]) -> bool:
    """
    Whether a message with these headers has been round a loop: more than
    L{MAX_RECEIVED} C{Received:} fields (RFC 5321 6.3), or a
    C{Delivered-To:} naming one of C{our_delivered_to} (we delivered it
    before, so an alias or forward brought it back).  The SMTP side refuses
    such a message with 554 5.4.6 (RFC 3463: routing loop detected).
    """
    ours = {address.strip().strip("<>").lower() for address in our_delivered_to}
    received = 0
    for field in _header_lines(header_block):
        name, colon, value = field.partition(b":")
        if not colon:
            continue
        name = name.strip().lower()
        if name == b"received":
            received += 1
            if received > MAX_RECEIVED:
                return True
        elif name == b"delivered-to":
            text = value.decode("utf-8", errors="replace").strip().strip("<>").lower()
            if text in ours:
                return True
    return False

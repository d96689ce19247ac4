"""
Tests for L{mailsys.queue.bounce}: the DSNs a sender gets, read back the
way a mail client would (with the C{email} package), and the loop check.
"""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailsys.queue.bounce import (
    DELAYED,
    FAILED,
    delivery_report,
    enhanced_status,
    is_looping,
    original_headers,
    remote_mta,
)
from mailsys.queue.spool import BOUNCED, PENDING, QueueEntry, RecipientStatus

HEADERS = (
    b"Received: from client.a.test by mail.a.test with ESMTPSA id Q1\n"
    b"From: Alice <alice@a.test>\n"
    b"To: bob@b.test, carol@c.test\n"
    b"Subject: Lunch?\n"
    b"Message-ID: <lunch@a.test>\n"
)
BODY = b"\nAre you free on Friday?\n"


class ReportTests(SynchronousTestCase):
    """The structure of an RFC 3464 report."""

    def setUp(self) -> None:
        path = Path(self.mktemp())
        path.write_bytes(HEADERS + BODY)
        self.entry = QueueEntry(
            queue_id="Q1",
            sender="alice@a.test",
            recipients=[
                RecipientStatus(
                    "bob@b.test",
                    BOUNCED,
                    attempts=0,
                    last_attempt=1_700_000_100.0,
                    code=550,
                    text="5.1.1 <bob@b.test>: Recipient address rejected",
                    next_hop="mx.b.test[192.0.2.1]:25",
                ),
                RecipientStatus(
                    "carol@c.test",
                    PENDING,
                    attempts=3,
                    last_attempt=1_700_000_200.0,
                    code=421,
                    text="connection refused",
                    next_hop="[192.0.2.7]:25",
                ),
            ],
            created=1_700_000_000.0,
            message_path=path,
        )

    def report(self, recipients, action=FAILED, **kwargs):
        data = delivery_report(
            hostname="mail.a.test",
            entry=self.entry,
            recipients=recipients,
            action=action,
            to="alice@a.test",
            report_id="Q1.R0",
            now=1_700_000_300.0,
            **kwargs,
        )
        self.assertNotIn(b"\r", data)
        self.assertTrue(data.isascii())
        return email.message_from_bytes(data, policy=email.policy.default)

    def test_structure(self) -> None:
        """
        A bounce is C{multipart/report; report-type=delivery-status} from
        MAILER-DAEMON to the sender, marked as automatic, with three parts:
        text for a person, the machine-readable status, and the original
        headers (not the body).
        """
        report = self.report([self.entry.recipients[0]])
        self.assertEqual(report.get_content_type(), "multipart/report")
        self.assertEqual(report.get_param("report-type"), "delivery-status")
        self.assertEqual(
            report["From"], "Mail Delivery System <MAILER-DAEMON@mail.a.test>"
        )
        self.assertEqual(report["To"], "alice@a.test")
        self.assertEqual(report["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(report["Message-ID"], "<Q1.R0@mail.a.test>")
        self.assertEqual(report["Auto-Submitted"], "auto-replied")
        self.assertEqual(report["Date"], "Tue, 14 Nov 2023 22:18:20 +0000")
        parts = list(report.iter_parts())
        self.assertEqual(
            [p.get_content_type() for p in parts],
            ["text/plain", "message/delivery-status", "text/rfc822-headers"],
        )
        text = parts[0].get_content()
        self.assertIn("could not be delivered", text)
        self.assertIn(
            "<bob@b.test>: host mx.b.test said: 550 5.1.1 <bob@b.test>: Recipient"
            " address rejected",
            " ".join(text.split()),
        )
        self.assertEqual(parts[2].get_content().encode("ascii"), HEADERS)
        self.assertNotIn("Friday", report.as_string())

    def test_statusFields(self) -> None:
        """
        The status part has the per-message fields (Reporting-MTA,
        Arrival-Date) and, per recipient, Final-Recipient, Action, Status,
        Remote-MTA, Diagnostic-Code and Last-Attempt-Date.
        """
        report = self.report([self.entry.recipients[0]])
        blocks = list(report.iter_parts())[1].get_payload()
        self.assertEqual(len(blocks), 2)
        self.assertEqual(
            dict(blocks[0]),
            {
                "Reporting-MTA": "dns; mail.a.test",
                "X-Mailsys-Queue-ID": "Q1",
                "Arrival-Date": "Tue, 14 Nov 2023 22:13:20 +0000",
            },
        )
        self.assertEqual(
            dict(blocks[1]),
            {
                "Final-Recipient": "rfc822; bob@b.test",
                "Action": "failed",
                "Status": "5.1.1",
                "Remote-MTA": "dns; mx.b.test",
                "Diagnostic-Code": "smtp; 550 5.1.1 <bob@b.test>: Recipient address"
                " rejected",
                "Last-Attempt-Date": "Tue, 14 Nov 2023 22:15:00 +0000",
            },
        )

    def test_expired(self) -> None:
        """
        A recipient given up on after temporary failures without a precise
        code is reported failed with 4.4.7 (delivery time expired), and the
        text says so.
        """
        carol = self.entry.recipients[1]
        report = self.report([carol])
        [fields] = list(report.iter_parts())[1].get_payload()[1:]
        self.assertEqual(fields["Status"], "4.4.7")
        self.assertEqual(fields["Remote-MTA"], "dns; 192.0.2.7")
        text = list(report.iter_parts())[0].get_content()
        self.assertIn("delivery time expired", text)

    def test_delayed(self) -> None:
        """
        A delay warning says it is only a warning, has Action "delayed" and
        Will-Retry-Until.
        """
        carol = self.entry.recipients[1]
        report = self.report([carol], action=DELAYED, will_retry_until=1_700_432_000.0)
        self.assertEqual(report["Subject"], "Delayed Mail (still being retried)")
        text = list(report.iter_parts())[0].get_content()
        self.assertIn("THIS IS A WARNING ONLY", text)
        [fields] = list(report.iter_parts())[1].get_payload()[1:]
        self.assertEqual(fields["Action"], "delayed")
        self.assertEqual(fields["Status"], "4.0.0")
        self.assertEqual(fields["Will-Retry-Until"], "Sun, 19 Nov 2023 22:13:20 +0000")

    def test_hostileReplyText(self) -> None:
        """
        A remote reply with line breaks or control characters cannot add
        header fields to the report.
        """
        bob = self.entry.recipients[0]
        bob.text = "5.1.1 nope\r\nX-Injected: yes\x00"
        report = self.report([bob])
        [fields] = list(report.iter_parts())[1].get_payload()[1:]
        self.assertNotIn("X-Injected", fields)
        self.assertIsNone(report["X-Injected"])

    def test_nonASCIIAddress(self) -> None:
        """
        An internationalised address is reported with RFC 6533's utf-8
        address type, escaped, so the report stays ASCII.
        """
        bob = self.entry.recipients[0]
        bob.address = "bøb@b.test"
        [fields] = list(self.report([bob]).iter_parts())[1].get_payload()[1:]
        self.assertEqual(fields["Final-Recipient"], "utf-8; b\\x{F8}b@b.test")

    def test_nonASCIIHeaders(self) -> None:
        """Original headers with 8-bit text are returned, decoded as UTF-8."""
        self.entry.message_path.write_bytes("Subject: Grüße\n\nx\n".encode("utf-8"))
        report = self.report([self.entry.recipients[0]])
        headers = list(report.iter_parts())[2].get_content()
        self.assertEqual(headers, "Subject: Grüße\n")

    def test_originalHeaders(self) -> None:
        """
        Only the header block is returned, cut at a line when huge; a
        missing message gives nothing.
        """
        path = self.entry.message_path
        self.assertEqual(original_headers(path), HEADERS)
        path.write_bytes(b"A: 1\nB: 2\nC: 3\n")
        self.assertEqual(original_headers(path, limit=12), b"A: 1\nB: 2\n")
        self.assertEqual(original_headers(path.with_name("gone")), b"")

    def test_enhancedStatus(self) -> None:
        """The server's enhanced code is used when its class matches the reply."""
        for code, text, expected in [
            (550, "5.7.1 relaying denied", "5.7.1"),
            (550, "relaying denied", "5.0.0"),
            (550, "4.7.1 confused server", "5.0.0"),
            (451, "4.3.0 try again", "4.3.0"),
            (421, "", "4.0.0"),
            (554, "5.4.6.7 not a code", "5.0.0"),
        ]:
            self.assertEqual(enhanced_status(code, text), expected, (code, text))

    def test_remoteMTA(self) -> None:
        """The host name of a next hop, for Remote-MTA; none for local delivery."""
        self.assertEqual(remote_mta("mx.b.test[192.0.2.1]:25"), "mx.b.test")
        self.assertEqual(remote_mta("[2001:db8::1]:25"), "2001:db8::1")
        self.assertEqual(remote_mta("smtp.example.net:587"), "smtp.example.net")
        self.assertIsNone(remote_mta("local"))
        self.assertIsNone(remote_mta(""))


class LoopTests(SynchronousTestCase):
    """L{is_looping}: the check the SMTP side answers with 554 5.4.6."""

    def test_receivedCount(self) -> None:
        """Thirty Received: fields are fine; thirty-one are a loop."""
        thirty = b"Received: from x by y\n\tid 1;\n" * 30 + b"Subject: s\n"
        self.assertFalse(is_looping(thirty, []))
        self.assertTrue(is_looping(b"received: z\n" + thirty, []))

    def test_bodyNotCounted(self) -> None:
        """Received: lines after the header block (in the body) do not count."""
        message = b"Subject: s\n\n" + b"Received: quoted\n" * 40
        self.assertFalse(is_looping(message, []))
        crlf = b"Subject: s\r\n\r\n" + b"Received: quoted\r\n" * 40
        self.assertFalse(is_looping(crlf, []))

    def test_ourDeliveredTo(self) -> None:
        """
        A Delivered-To: naming an address we deliver to is a loop, whatever
        its case, brackets or folding; someone else's is not.
        """
        ours = ["bob@a.test"]
        self.assertTrue(is_looping(b"Delivered-To: bob@a.test\n", ours))
        self.assertTrue(is_looping(b"delivered-to: <Bob@A.test>\r\n", ours))
        self.assertTrue(is_looping(b"Subject: x\nDelivered-To:\n bob@a.test\n", ours))
        self.assertFalse(is_looping(b"Delivered-To: bob@b.test\n", ours))
        self.assertFalse(is_looping(b"X-Delivered-To: bob@a.test\n", ours))
        self.assertFalse(is_looping(b"Subject: x\n\nDelivered-To: bob@a.test\n", ours))

    def test_garbage(self) -> None:
        """Lines that are not header fields, and 8-bit bytes, are no error."""
        garbage = b"\xff\xfe\nno colon here\n: empty name\n"
        self.assertFalse(is_looping(garbage, ["a@b"]))

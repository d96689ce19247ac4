"""
The twistd plugin: C{twistd -n mailsys [--config FILE]}.  Thin by design:
everything lives in L{mailsys.tap}.
"""

from twisted.application.service import ServiceMaker

mailsys = ServiceMaker(
    "mailsys",
    "mailsys.tap",
    "A complete small mail system: SMTP, submission, relay, maildir, POP3, IMAP",
    "mailsys",
)

"""
The peer for bench/smtp_delivery.py: Twisted's own ESMTP server and maildir
message writer (C{twisted.mail.mail.FileMessage}: tmp/ then rename, no
fsync), as C{twistd mail --maildirdbmdomain} would run them.

C{twistd mail} itself cannot be the peer on Python 3: its user lookup
compares str with bytes DirDBM keys and refuses every recipient, and its
C{startMessage} opens the file in text mode and then writes bytes.  This
script is those same classes with the two type bugs fixed, nothing more.

    python bench/twisted_peer.py PORT MAILDIR_ROOT
"""

from __future__ import annotations

import os
import sys

from twisted.internet import reactor
from twisted.mail import smtp
from twisted.mail.mail import FileMessage
from twisted.mail.maildir import _generateMaildirName, initializeMaildir
from zope.interface import implementer


@implementer(smtp.IMessageDelivery)
class MaildirDelivery:
    def __init__(self, root: str) -> None:
        self.root = root

    def receivedHeader(self, helo, origin, recipients):
        return b"Received: from " + (helo[0] or b"") + b" by twisted-peer"

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        if user.dest.local != b"alice" or user.dest.domain != b"example.test":
            raise smtp.SMTPBadRcpt(user)
        directory = os.path.join(self.root, "alice")
        initializeMaildir(directory)

        def message():
            name = os.fsdecode(_generateMaildirName())
            tmp = os.path.join(directory, "tmp", name)
            return FileMessage(
                open(tmp, "wb"), tmp, os.path.join(directory, "new", name)
            )

        return message


class PeerFactory(smtp.SMTPFactory):
    def buildProtocol(self, addr):
        p = smtp.ESMTP()
        p.delivery = self.delivery
        p.factory = self
        return p


def main() -> None:
    port, root = int(sys.argv[1]), sys.argv[2]
    factory = PeerFactory()
    factory.delivery = MaildirDelivery(root)
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()

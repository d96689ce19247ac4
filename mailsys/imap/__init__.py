"""
IMAP4rev1 over the maildir store: Thunderbird, phones and mbsync read and
file mail here.

Public surface: L{IMAPServerFactory} (one per listener), L{imap_avatar}
(the avatar factory the realm maps L{IIMAPAccount} to) and L{IIMAPAccount}.
"""

from mailsys.imap.mailbox import IIMAPAccount, IMAPAccount, imap_avatar
from mailsys.imap.server import IMAPServer, IMAPServerFactory

__all__ = [
    "IIMAPAccount",
    "IMAPAccount",
    "IMAPServer",
    "IMAPServerFactory",
    "imap_avatar",
]

"""
mailsys: a complete small mail system on Twisted.

Inbound ESMTP into maildirs, authenticated submission, a durable outbound
queue, POP3 and IMAP over the same store, and the operations around them.
"""

__version__ = "0.1.0"

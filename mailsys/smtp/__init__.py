"""
SMTP: the hardened ESMTP server (L{mailsys.smtp.server}) and the policy
that decides what to accept and where it goes (L{mailsys.smtp.delivery}).
"""

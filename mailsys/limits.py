"""
Every protocol limit in one place, each a named default with the RFC that
sets or motivates it.

The values here are defaults: the ``[limits]`` section of the configuration
overrides the operator-facing ones (see L{mailsys.config.LimitsSection}).
Keeping them together makes it easy to see what a hostile client can make
the server spend, and to test each limit at N and N+1.
"""

# RFC 5321 4.5.3.1.4: the maximum total length of a command line including
# the command word and the <CRLF> is 512 octets.  We allow a little more
# (ESMTP parameters such as SIZE= and BODY= push real clients past 512
# octets; RFC 1869 6.1 allows extensions to raise the limit by the length
# of their parameters), but nowhere near Twisted's 16 KiB.
SMTP_COMMAND_LINE = 512
SMTP_COMMAND_LINE_WITH_PARAMETERS = 1024

# RFC 5321 4.5.3.1.6: the maximum total length of a text line including the
# <CRLF> is 1000 octets.  Longer lines are refused with 500 5.5.6 at the end
# of DATA (the message is never delivered half-wrapped).
SMTP_TEXT_LINE = 1000

# RFC 5321 4.5.3.1.8: at least 100 recipients must be accepted; above the
# limit the reply is 452 4.5.3.
SMTP_MAX_RECIPIENTS = 100

# RFC 5321 4.5.3.1.10 and RFC 1870: the message size we accept, advertised
# in EHLO as SIZE.  25 MiB, the size most providers accept today.
SMTP_MAX_MESSAGE_SIZE = 25 * 1024 * 1024

# RFC 5321 4.5.3.2.7: a server SHOULD wait at least 5 minutes for the next
# command.  Used between commands and between chunks of DATA.
SMTP_COMMAND_TIMEOUT = 300.0
SMTP_DATA_TIMEOUT = 300.0

# After this many protocol errors in one session the server replies 421 and
# closes (Postfix's smtpd_hard_error_limit is 20, its soft limit 10).
SMTP_MAX_ERRORS = 10

# Concurrent connections, in total per listener and per client address
# (Postfix: smtpd_client_connection_count_limit = 50, process limit 100).
MAX_CONNECTIONS = 100
MAX_CONNECTIONS_PER_CLIENT = 20

# RFC 5321 4.5.3.1.1-2: a local part of at most 64 octets, a domain of at
# most 255 octets; RFC 5321 4.5.3.1.3: a path of at most 256 octets.
LOCAL_PART = 64
DOMAIN = 255
PATH = 256

# /healthz fails when the file system of state_dir has less free space than
# the larger of these (100 MiB: a few maximum-size messages and the queue's
# bookkeeping; 1%: the margin file systems keep usable on large disks).
HEALTH_MIN_FREE_BYTES = 100 * 1024 * 1024
HEALTH_MIN_FREE_FRACTION = 0.01

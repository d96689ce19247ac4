"""
The outbound queue: everything mailsys has accepted but not yet handed on.

    interfaces.py  the seam: IOutboundTransport and RecipientResult
    spool.py       the durable queue directory (<state_dir>/queue)
    runner.py      QueueRunner: attempts, retries, limits, DSNs
    bounce.py      RFC 3464 delivery status notifications; loop detection
    local.py       LocalTransport: delivery to our own users' maildirs
    client.py      SMTPTransport: delivery to other servers (MX, smarthost)

The SMTP side queues a message with L{spool.Spool.enqueue_deferred}, says
250 when it fires, and calls L{runner.QueueRunner.wake}; the runner does the
rest.  Modules are imported directly; this package exports nothing, so that
importing one part never drags in the others.
"""

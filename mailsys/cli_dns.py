"""
C{mailsys dns-records [DOMAIN]} and C{mailsys check-dns DOMAIN}: the DNS
side of setting up a domain.

C{dns-records} prints the zone-file lines to paste into the domain's zone
(L{mailsys.dnsrecords} derives them from the configuration);
C{check-dns} asks DNS for each of them and says, one line a record, which
are in place, missing or different, so that an administrator knows when
the domain is ready (exit status 0) and what is left (1).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import TYPE_CHECKING

from twisted.internet import task

from mailsys.config import Config
from mailsys.dnsrecords import (
    OK,
    DomainRecords,
    RecordCheck,
    check_records,
    domain_name,
    domain_records,
)
from mailsys.queue.client import make_resolver

if TYPE_CHECKING:
    from mailsys.cli import _Subparsers

# As mailsys.cli: 2 for a mistake in the command, 1 for records not right.
_EXIT_USER_ERROR = 2
_EXIT_NOT_READY = 1


class _UsageError(Exception):
    """A mistake in the command line; C{str()} is the one line to print."""


def _refuse(error: _UsageError) -> int:
    """
    Print C{error} as C{mailsys.cli} prints its own (one line, status 2).
    Done here rather than by raising C{mailsys.cli.CommandError}: this
    module is imported by C{mailsys.cli}, which may be running as
    C{__main__}, with a class of its own by that name.
    """
    line = re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], str(error))
    print(f"mailsys: {line}", file=sys.stderr)
    return _EXIT_USER_ERROR


def _our_domain(cfg: Config, text: str) -> str:
    """C{text} as one of our domains, or a one-line error naming them."""
    try:
        domain = domain_name(text)
    except ValueError as e:
        raise _UsageError(str(e)) from None
    if domain not in cfg.domains:
        ours = ", ".join(cfg.domains)
        raise _UsageError(
            f"{domain} is not one of our domains ({ours}); add it to domains.names"
        )
    return domain


def _dns_records(cfg: Config, args: argparse.Namespace) -> int:
    """Print the records of one domain, or of every configured one."""
    try:
        domains = [_our_domain(cfg, args.domain)] if args.domain else list(cfg.domains)
    except _UsageError as e:
        return _refuse(e)
    wanted = [domain_records(cfg, domain) for domain in domains]
    if args.json:
        print(json.dumps([records.as_json() for records in wanted], indent=2))
        return 0
    blocks = ["\n".join(records.zone_lines()) for records in wanted]
    print("\n\n".join(blocks))
    return 0


def report_lines(wanted: DomainRecords, checks: list[RecordCheck]) -> list[str]:
    """
    One line a record, its zone-file line then what DNS said, aligned; and
    a last line counting what needs doing.
    """
    width = wanted.width()
    lines = [check.record.zone_line(width) for check in checks]
    column = max(len(line) for line in lines) + 2
    result = [
        f"{line:<{column}}{check.describe()}"
        for line, check in zip(lines, checks, strict=True)
    ]
    wrong = sum(check.status != OK for check in checks)
    if wrong:
        result.append(f"-- {wrong} of {len(checks)} records need attention")
    else:
        result.append(f"-- all {len(checks)} records ok")
    return result


def _check_dns(cfg: Config, args: argparse.Namespace) -> int:
    """
    Look up every record of the domain (through C{--resolver}, else
    C{[relay] resolver}, else the system's) and report each: 0 when all are
    right, 1 otherwise.  The lookups run in a reactor of their own, started
    and stopped here with L{task.react}.
    """
    server = args.resolver if args.resolver is not None else cfg.relay.resolver
    try:
        wanted = domain_records(cfg, _our_domain(cfg, args.domain))
        if server:  # a bad address is refused before anything starts
            try:
                make_resolver(task.Clock(), server)
            except ValueError as e:
                raise _UsageError(str(e)) from None
    except _UsageError as e:
        return _refuse(e)
    lines: list[str] = []

    async def check(reactor) -> None:
        checks = await check_records(make_resolver(reactor, server), wanted.records)
        lines.extend(report_lines(wanted, checks))
        if any(check.status != OK for check in checks):
            raise SystemExit(_EXIT_NOT_READY)

    status = _EXIT_NOT_READY
    try:
        task.react(check)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else _EXIT_NOT_READY
    if not lines:  # interrupted (Ctrl-C stops the reactor first)
        print(file=sys.stderr)
        return 130
    print("\n".join(lines))
    return status


def add_dns_commands(commands: _Subparsers) -> None:
    """C{mailsys dns-records [DOMAIN]} and C{mailsys check-dns DOMAIN}."""
    records = commands.add_parser(
        "dns-records",
        help="print the DNS records a domain needs (zone-file lines)",
        description=(
            "Print the MX, SPF, DMARC, SRV (RFC 6186) and autoconfig records that"
            " DOMAIN (default: every configured domain) needs for the server"
            " hostname and listeners of the configuration, as zone-file lines"
            " with comments."
        ),
    )
    records.add_argument("domain", nargs="?", help="one of domains.names")
    records.add_argument(
        "--json", action="store_true", help="print the records as JSON, for scripts"
    )
    records.set_defaults(run=_dns_records)
    check = commands.add_parser(
        "check-dns",
        help="compare the DNS records of a domain with what DNS answers",
        description=(
            "Look up each record 'dns-records DOMAIN' prints and report it as ok,"
            " missing or different.  Exit status 0 when all are ok, 1 otherwise."
        ),
    )
    check.add_argument("domain", help="one of domains.names")
    check.add_argument(
        "--resolver",
        metavar="IP:PORT",
        help="DNS server to ask (default: relay.resolver, else the system's)",
    )
    check.set_defaults(run=_check_dns)

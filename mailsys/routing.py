"""
Routing: what happens to mail for one recipient address.

The SMTP protocol never decides whether an address is ours; it asks the
delivery policy, which asks the L{Router}.  The router knows our domains,
the users and the aliases, and answers with a L{Route}: the local
mailboxes the message goes to and the foreign addresses it must be relayed
to.  It knows nothing of sockets, so the same answers serve SMTP, the CLI
and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from mailsys.addresses import AddressError, MailAddress, parse_address

# Alias chains longer than this are a configuration loop or a mistake.
MAX_ALIAS_DEPTH = 10


class RoutingError(Exception):
    """A recipient we refuse; subclasses say why."""


class NotOurDomain(RoutingError):
    """The address belongs to a domain we do not serve: relaying."""


class UnknownRecipient(RoutingError):
    """Our domain, but no such user or alias."""


class AliasLoop(RoutingError):
    """Alias expansion went deeper than L{MAX_ALIAS_DEPTH}."""


@dataclass(frozen=True)
class Route:
    """
    Where mail for one recipient goes.

    @ivar local: the users whose maildirs receive a copy.
    @ivar remote: foreign addresses the message must be relayed to (alias
        targets in other domains).
    """

    local: tuple[MailAddress, ...] = ()
    remote: tuple[MailAddress, ...] = field(default=())


class Router:
    """
    Resolves recipients against our domains, users and aliases.

    @param domains: our domains, lower-case.
    @param user_exists: tells whether a local address is a user (the user
        store's C{exists}; it notices users added while the server runs).
    @param aliases: alias address -> target addresses, lower-case.
    """

    def __init__(
        self,
        domains: Iterable[str],
        user_exists: Callable[[MailAddress], bool],
        aliases: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        self.domains = frozenset(d.lower() for d in domains)
        self._user_exists = user_exists
        self.set_aliases(aliases or {})

    def set_aliases(self, aliases: Mapping[str, Iterable[str]]) -> None:
        """
        Replace the alias table (on configuration reload).  A key
        C{"@domain"} is the catch-all of that domain.
        """
        table: dict[MailAddress, tuple[MailAddress, ...]] = {}
        catch_all: dict[str, tuple[MailAddress, ...]] = {}
        for source, targets in aliases.items():
            resolved = tuple(parse_address(t) for t in targets)
            if source.startswith("@"):
                catch_all[source[1:].lower()] = resolved
            else:
                table[parse_address(source)] = resolved
        self._aliases = table
        self._catch_all = catch_all

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self.domains

    def resolve(self, address: MailAddress) -> Route:
        """
        The route for C{address}.

        @raise NotOurDomain: for a foreign domain or an address literal
            (we never accept mail for C{user@[192.0.2.1]}: an open-relay
            trick).
        @raise UnknownRecipient: for an address of ours that is neither a
            user nor an alias.
        @raise AliasLoop: for an alias chain that does not end.
        """
        if address.is_literal or not self.is_local_domain(address.domain):
            raise NotOurDomain(str(address))
        local: list[MailAddress] = []
        remote: list[MailAddress] = []
        self._expand(address, 0, local, remote, set())
        if not local and not remote:
            raise UnknownRecipient(str(address))
        return Route(tuple(local), tuple(remote))

    def _expand(
        self,
        address: MailAddress,
        depth: int,
        local: list[MailAddress],
        remote: list[MailAddress],
        seen: set[MailAddress],
    ) -> None:
        if depth > MAX_ALIAS_DEPTH:
            raise AliasLoop(str(address))
        if address in seen:
            return
        seen.add(address)
        if address.is_literal or not self.is_local_domain(address.domain):
            remote.append(address)
            return
        targets = self._aliases.get(address)
        if targets is not None:
            for target in targets:
                self._expand(target, depth + 1, local, remote, seen)
            return
        if self._user_exists(address):
            local.append(address)
            return
        if depth:
            # An alias pointing at a user that does not exist is a
            # configuration mistake; refuse rather than lose the mail.
            raise UnknownRecipient(str(address))
        targets = self._catch_all.get(address.domain)
        if targets is not None:
            for target in targets:
                self._expand(target, depth + 1, local, remote, seen)
            return
        if address.local == "postmaster":
            # RFC 5321 4.5.1: postmaster of every domain must work.  Without
            # an alias, the mail waits in that mailbox (read it with
            # `mailsys mailbox`, or create the user to log in).
            local.append(address)


__all__ = [
    "AddressError",
    "AliasLoop",
    "MAX_ALIAS_DEPTH",
    "NotOurDomain",
    "Route",
    "Router",
    "RoutingError",
    "UnknownRecipient",
]

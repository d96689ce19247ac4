"""
Configuration: a TOML file turned into frozen, validated objects.

Every problem is reported as one line naming the file, the key and what is
wrong (L{ConfigError}); the command-line tools print that line and exit with
status 2, never a traceback.  Relative paths are relative to the directory
of the configuration file.  Listeners are Twisted endpoint strings; an empty
or absent listener is off.

Validation happens once, here, so that the rest of the system can trust
what it is given: domains and alias addresses are already lower-case ASCII
(IDNA), paths are absolute, limits are positive, endpoints parse.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import idna
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

from mailsys import limits


class ConfigError(Exception):
    """
    A configuration problem.  C{str(error)} is one line of the form
    C{FILE: KEY: PROBLEM}, ready to print to an administrator.  Problems
    with the file as a whole (missing, not TOML) have no key:
    C{FILE: PROBLEM}.

    @ivar key: the dotted key at fault, as written in TOML
        (C{"listen.smtp"}, C{'aliases."a@example.test"'}), or C{None} when
        the problem is the file as a whole; lets tools and tests point at it
        without parsing the message.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class ServerSection:
    hostname: str = "mail.example.test"
    state_dir: Path = Path("var")


@dataclass(frozen=True)
class TLSSection:
    # Both missing on disk: a self-signed pair is generated at start.
    cert: Path = Path("var/tls/cert.pem")
    key: Path = Path("var/tls/key.pem")


# Names of the listeners, in the order they are documented and started.
LISTENERS = (
    "smtp",
    "submission",
    "submissions",
    "imap",
    "imaps",
    "pop3",
    "pop3s",
    "http",
)


@dataclass(frozen=True)
class ListenSection:
    """Endpoint strings; C{""} means the listener is off."""

    smtp: str = ""
    submission: str = ""
    submissions: str = ""
    imap: str = ""
    imaps: str = ""
    pop3: str = ""
    pop3s: str = ""
    http: str = ""

    def enabled(self) -> dict[str, str]:
        """The listeners that are on, by name, in L{LISTENERS} order."""
        return {name: getattr(self, name) for name in LISTENERS if getattr(self, name)}


@dataclass(frozen=True)
class LimitsSection:
    max_message_size: int = limits.SMTP_MAX_MESSAGE_SIZE
    max_recipients: int = limits.SMTP_MAX_RECIPIENTS
    command_timeout: float = limits.SMTP_COMMAND_TIMEOUT
    data_timeout: float = limits.SMTP_DATA_TIMEOUT
    max_connections: int = limits.MAX_CONNECTIONS
    max_connections_per_client: int = limits.MAX_CONNECTIONS_PER_CLIENT
    max_errors: int = limits.SMTP_MAX_ERRORS


@dataclass(frozen=True)
class RelaySection:
    """
    Outbound delivery: where mail for other domains goes, and how long and
    how hard the queue tries.

    @ivar smarthost: C{host:port} all remote mail goes through, or C{""}
        to deliver to each domain's MX.
    @ivar routes: destination domain -> C{host:port}, overriding both.
    @ivar smarthost_username: AUTH to the smarthost (only over TLS); empty:
        no AUTH.  Given together with C{smarthost_password}.
    @ivar smarthost_cafile: CA certificates (PEM) that verify the
        smarthost, or C{None} for the system's.
    @ivar resolver: C{IP:port} of the DNS server for MX lookups, or C{""}
        for the system's (C{/etc/resolv.conf}).
    @ivar mx_port: the port of MX hosts (25; tests point it elsewhere).
    @ivar retry_initial: seconds before the first retry; doubled after each
        temporary failure up to C{retry_max} (Postfix: 300 and 4000).
    @ivar give_up_after: seconds after arrival when a message still not
        delivered is bounced (Postfix's maximal_queue_lifetime, 5 days).
    @ivar delay_warning_after: seconds after arrival when the sender is
        told, once, that delivery is delayed; 0: never (Postfix's
        delay_warning_time, RFC 3464 Action: delayed).
    @ivar max_concurrent: deliveries in progress at once, in total.
    @ivar max_per_destination: deliveries in progress at once to one domain.
    """

    smarthost: str = ""
    routes: Mapping[str, str] = field(default_factory=dict)
    smarthost_username: str = ""
    smarthost_password: str = ""
    smarthost_cafile: Path | None = None
    resolver: str = ""
    mx_port: int = 25
    retry_initial: float = 300.0
    retry_max: float = 3600.0
    give_up_after: float = 5 * 24 * 3600.0
    delay_warning_after: float = 4 * 3600.0
    max_concurrent: int = 20
    max_per_destination: int = 4


@dataclass(frozen=True)
class SubmissionSection:
    """
    Policy of the submission listeners (587, 465) for authenticated users.

    @ivar hide_client_ip: leave the client's address out of the
        C{Received:} header of submitted mail (it reveals a user's home or
        mobile address to every recipient).
    @ivar sender_must_match: the envelope sender must be the authenticated
        user or one of its aliases (553 5.7.1 otherwise), so one user
        cannot send as another.
    """

    hide_client_ip: bool = False
    sender_must_match: bool = True


@dataclass(frozen=True)
class AuthSection:
    """
    How passwords may travel.

    @ivar allow_plaintext_on_loopback: a password sent before TLS (SMTP
        AUTH, IMAP LOGIN, POP3 USER/PASS) is accepted only when this is true
        I{and} the client connects from a loopback address.  Off by default
        so that a password never crosses a network in clear; the development
        instance turns it on so that plain local clients work.
    """

    allow_plaintext_on_loopback: bool = False


@dataclass(frozen=True)
class IMAPSection:
    """
    Options of one IMAP listener: C{[imap]} for the STARTTLS one, C{[imaps]}
    for the implicit-TLS one.

    @ivar read_only: serve mailboxes read-only on this listener: every
        SELECT behaves as EXAMINE, and APPEND, STORE, EXPUNGE, COPY, MOVE,
        CREATE, DELETE and RENAME are refused with a clear NO (an archive,
        or a second port for a viewer that must never change anything).
    """

    read_only: bool = False


@dataclass(frozen=True)
class Config:
    """
    The whole, validated configuration.

    @ivar path: the file it was read from, or C{None} for the development
        instance.
    @ivar domains: our domains, lower-case, in file order.
    @ivar aliases: lower-case alias address -> target addresses.
    """

    path: Path | None = None
    server: ServerSection = field(default_factory=ServerSection)
    tls: TLSSection = field(default_factory=TLSSection)
    listen: ListenSection = field(default_factory=ListenSection)
    domains: tuple[str, ...] = ("example.test",)
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    relay: RelaySection = field(default_factory=RelaySection)
    submission: SubmissionSection = field(default_factory=SubmissionSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    auth: AuthSection = field(default_factory=AuthSection)
    imap: IMAPSection = field(default_factory=IMAPSection)
    imaps: IMAPSection = field(default_factory=IMAPSection)

    @property
    def state_dir(self) -> Path:
        return self.server.state_dir

    @property
    def mail_dir(self) -> Path:
        """Root of the maildirs: C{<state_dir>/mail/<domain>/<localpart>/}."""
        return self.server.state_dir / "mail"

    @property
    def users_file(self) -> Path:
        return self.server.state_dir / "users.json"


# --- loading ---------------------------------------------------------------


class _Problem(Exception):
    """
    A validation failure inside one file, before the file name is known to
    the code that found it; L{load} turns it into a L{ConfigError}.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(key, problem)
        self.key = key
        self.problem = problem


_SECTIONS = (
    "server",
    "tls",
    "auth",
    "listen",
    "domains",
    "aliases",
    "relay",
    "submission",
    "limits",
    "imap",
    "imaps",
)
# The keys of [relay]; routes is a table of its own.
_RELAY_KEYS = tuple(f.name for f in dataclasses.fields(RelaySection))
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def load(path: Path | str) -> Config:
    """
    Read and validate the TOML file at C{path}.

    @raise ConfigError: for any problem, as one line naming the file and key.
    """
    shown = str(path)
    source = Path(path).absolute()
    try:
        with open(source, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise _error(shown, None, f"cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        # tomllib's message ends "(at line L, column C)": keep it.
        raise _error(shown, None, f"not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        # TOML files are UTF-8 (TOML 1.0, "Spec").
        problem = f"not valid UTF-8: {e.reason} at byte {e.start}"
        raise _error(shown, None, problem) from None
    try:
        return _build(data, source)
    except _Problem as p:
        raise _error(shown, p.key, p.problem) from None


def _error(shown: str, key: str | None, problem: str) -> ConfigError:
    """Make the one-line error; control characters never split the line."""
    parts = [shown] + ([key] if key else []) + [problem]
    message = _CONTROL.sub(lambda m: repr(m.group())[1:-1], ": ".join(parts))
    return ConfigError(message, key)


def _key(*names: str) -> str:
    """A dotted key as TOML writes it: C{aliases."a@example.test"}."""
    return ".".join(n if _BARE_KEY.match(n) else _toml_string(n) for n in names)


def _show(value: Any) -> str:
    """A value as it would appear in the file, short enough for one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _build(data: dict[str, Any], source: Path) -> Config:
    """Validate the parsed TOML document C{data} read from C{source}."""
    for name in data:
        if name not in _SECTIONS:
            raise _Problem(_key(name), "unknown section")
    base = source.parent

    server = _section(data, "server", ("hostname", "state_dir"))
    hostname = _hostname(
        _string(server, "server", "hostname", ServerSection.hostname),
        _key("server", "hostname"),
    )
    state_dir = _path(server, "server", "state_dir", base) or base / "var"

    tls = _section(data, "tls", ("cert", "key"))
    tls_section = TLSSection(
        cert=_path(tls, "tls", "cert", base) or state_dir / "tls" / "cert.pem",
        key=_path(tls, "tls", "key", base) or state_dir / "tls" / "key.pem",
    )
    _check_tls_files(tls_section)

    auth = _section(data, "auth", ("allow_plaintext_on_loopback",))
    auth_section = AuthSection(
        allow_plaintext_on_loopback=_boolean(
            auth, "auth", "allow_plaintext_on_loopback", False
        )
    )

    listen = _section(data, "listen", LISTENERS)
    endpoints = {name: _string(listen, "listen", name, "") for name in LISTENERS}
    _check_endpoints(endpoints)

    domains = _domains(_section(data, "domains", ("names",)))
    aliases = _aliases(data.get("aliases", {}), domains)
    relay = _relay(_section(data, "relay", _RELAY_KEYS), domains, base)
    submission = _section(data, "submission", ("hide_client_ip", "sender_must_match"))
    submission_section = SubmissionSection(
        hide_client_ip=_boolean(submission, "submission", "hide_client_ip", False),
        sender_must_match=_boolean(submission, "submission", "sender_must_match", True),
    )
    limit_names = tuple(f.name for f in dataclasses.fields(LimitsSection))
    limits_section = _limits(_section(data, "limits", limit_names))
    imap_sections = {
        name: IMAPSection(
            read_only=_boolean(
                _section(data, name, ("read_only",)), name, "read_only", False
            )
        )
        for name in ("imap", "imaps")
    }

    return Config(
        path=source,
        server=ServerSection(hostname=hostname, state_dir=state_dir),
        tls=tls_section,
        listen=ListenSection(**endpoints),
        domains=domains,
        aliases=aliases,
        relay=relay,
        submission=submission_section,
        limits=limits_section,
        auth=auth_section,
        **imap_sections,
    )


def _section(data: dict[str, Any], name: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The table C{name} (empty if absent), refusing keys not in C{keys}."""
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise _Problem(_key(name), f"expected a table, got {_show(table)}")
    for key in table:
        if key not in keys:
            raise _Problem(_key(name, key), "unknown key")
    return table


def _string(table: dict[str, Any], section: str, key: str, default: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise _Problem(_key(section, key), f"expected a string, got {_show(value)}")
    return value


def _boolean(table: dict[str, Any], section: str, key: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        problem = f"expected true or false, got {_show(value)}"
        raise _Problem(_key(section, key), problem)
    return value


def _path(table: dict[str, Any], section: str, key: str, base: Path) -> Path | None:
    """
    The path at C{key}, made absolute against C{base} (the directory of the
    configuration file, so that the file means the same from any working
    directory), or C{None} when absent.
    """
    if key not in table:
        return None
    value = _string(table, section, key, "")
    if not value or "\x00" in value:
        raise _Problem(_key(section, key), f"not a valid path: {_show(value)}")
    return Path(os.path.abspath(base / value))


def _check_tls_files(tls: TLSSection) -> None:
    """
    Both certificate and key present and readable, or both absent (a
    self-signed pair is generated at start).  One without the other is
    refused: generating would overwrite the operator's file.
    """
    present = {name: os.path.lexists(getattr(tls, name)) for name in ("cert", "key")}
    if present["cert"] != present["key"]:
        missing = "key" if present["cert"] else "cert"
        other = "cert" if present["cert"] else "key"
        raise _Problem(
            _key("tls", missing),
            f"{str(getattr(tls, missing))!r} does not exist but tls.{other} does"
            " (give both, or neither to generate a self-signed pair)",
        )
    if present["cert"]:
        for name in ("cert", "key"):
            filename = getattr(tls, name)
            try:
                with open(filename, "rb"):
                    pass
            except OSError as e:
                problem = f"cannot read {str(filename)!r}: {e.strerror or e}"
                raise _Problem(_key("tls", name), problem) from None


# --- names and addresses ---------------------------------------------------

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")


def _domain_name(text: str) -> str:
    """
    C{text} as a lower-case ASCII DNS name (IDNA 2008 for non-ASCII names,
    as mail to such domains is addressed on the wire: RFC 5890).

    @raise ValueError: with the reason, if it is not a valid name.
    """
    if not text.isascii():
        try:
            text = idna.encode(text, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as e:
            raise ValueError(f"not valid IDNA ({e})") from None
    name = text.lower()
    if len(name) > limits.DOMAIN:  # RFC 5321 4.5.3.1.2
        raise ValueError(f"longer than {limits.DOMAIN} octets")
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        # RFC 1035 2.3.1 and RFC 1123 2.1: letters, digits, hyphens.
        raise ValueError("labels must be letters, digits and inner hyphens")
    if labels[-1].isdigit():
        raise ValueError("an IP address, not a name")
    return name


def _hostname(value: str, key: str) -> str:
    try:
        return _domain_name(value)
    except ValueError as e:
        raise _Problem(key, f"not a valid hostname: {_show(value)} ({e})") from None


def _address(value: Any, key: str) -> str:
    """
    C{value} as a lower-case C{local@domain}.  Refuses what could never be
    a mailbox or could escape the maildir tree: whitespace, control
    characters, C{/}, and local parts that are not dot-strings.
    """
    if not isinstance(value, str):
        raise _Problem(key, f"expected an address (a string), got {_show(value)}")
    local, at, domain = value.rpartition("@")
    reason = None
    if re.search(r"[\s\x00-\x1f\x7f/\\]", value):
        reason = "contains whitespace, a control character or a slash"
    elif not at or not local:
        reason = "expected local@domain"
    elif len(local.encode("utf-8")) > limits.LOCAL_PART:  # RFC 5321 4.5.3.1.1
        reason = f"local part longer than {limits.LOCAL_PART} octets"
    elif "@" in local or "" in local.split("."):
        # RFC 5321 4.1.2 Dot-string: no empty atoms (leading, trailing or
        # doubled dots); also keeps "." and ".." out of maildir paths.
        reason = "not a valid local part"
    else:
        try:
            domain = _domain_name(domain)
        except ValueError as e:
            reason = f"bad domain: {e}"
    if reason:
        raise _Problem(key, f"not a valid address: {_show(value)} ({reason})")
    return f"{local.lower()}@{domain}"


def _domains(table: dict[str, Any]) -> tuple[str, ...]:
    key = _key("domains", "names")
    names = table.get("names", list(Config.domains))
    if not isinstance(names, list):
        raise _Problem(key, f"expected a list of domain names, got {_show(names)}")
    if not names:
        raise _Problem(key, "expected at least one domain")
    result: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise _Problem(key, f"expected a domain name (a string), got {_show(name)}")
        try:
            domain = _domain_name(name)
        except ValueError as e:
            raise _Problem(key, f"not a valid domain: {_show(name)} ({e})") from None
        if domain in result:
            raise _Problem(key, f"{name!r} is listed twice")
        result.append(domain)
    return tuple(result)


def _aliases(table: Any, domains: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """
    Alias address -> targets.  An alias must be in one of our domains
    (nothing else routes through it); a target may be anywhere.  A key
    C{"@domain"} is that domain's catch-all: it receives mail for every
    address of the domain that is neither a user nor another alias.
    """
    if not isinstance(table, dict):
        raise _Problem("aliases", f"expected a table, got {_show(table)}")
    result: dict[str, tuple[str, ...]] = {}
    for alias, targets in table.items():
        key = _key("aliases", alias)
        if isinstance(alias, str) and alias.startswith("@"):
            # "@domain": the catch-all of one of our domains.
            address = "@" + _address("catchall" + alias, key).partition("@")[2]
        else:
            address = _address(alias, key)
        if address.rpartition("@")[2] not in domains:
            raise _Problem(key, "domain is not one of domains.names")
        if address in result:
            raise _Problem(key, "same alias as another key (they differ only in case)")
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list):
            raise _Problem(key, f"expected a list of addresses, got {_show(targets)}")
        if not targets:
            raise _Problem(key, "expected at least one address")
        result[address] = tuple(_address(target, key) for target in targets)
    return result


def _host_port(value: str, key: str) -> str:
    """
    C{value} as C{host:port} with a valid host (name, IPv4, or C{[IPv6]})
    and port; the host lower-case, IDNA-encoded.
    """
    match = re.fullmatch(r"(?:\[([^\]]*)\]|([^:\[\]]*)):([0-9]{1,5})", value)
    reason = None
    if not match:
        reason = "expected host:port"
    elif not 0 < int(match[3]) < 65536:
        reason = "invalid port"
    else:
        try:
            if match[1] is not None:
                host = "[" + str(ipaddress.IPv6Address(match[1])) + "]"
            elif re.fullmatch(r"[0-9.]+", match[2]):
                host = str(ipaddress.IPv4Address(match[2]))
            else:
                host = _domain_name(match[2])
        except ValueError as e:
            reason = f"invalid host: {e}"
    if reason:
        raise _Problem(key, f"not a valid host:port: {_show(value)} ({reason})")
    return f"{host}:{int(match[3])}"


def _relay(table: dict[str, Any], domains: tuple[str, ...], base: Path) -> RelaySection:
    smarthost = _string(table, "relay", "smarthost", "")
    if smarthost:
        smarthost = _host_port(smarthost, _key("relay", "smarthost"))
    routes_table = table.get("routes", {})
    if not isinstance(routes_table, dict):
        problem = f"expected a table, got {_show(routes_table)}"
        raise _Problem(_key("relay", "routes"), problem)
    routes: dict[str, str] = {}
    for name, hop in routes_table.items():
        key = _key("relay", "routes", name)
        try:
            domain = _domain_name(name)
        except ValueError as e:
            raise _Problem(key, f"not a valid domain ({e})") from None
        if domain in domains:
            raise _Problem(key, "is one of domains.names (its mail is delivered here)")
        if domain in routes:
            raise _Problem(key, "same domain as another route (differs only in case)")
        if not isinstance(hop, str):
            raise _Problem(key, f"expected a string host:port, got {_show(hop)}")
        routes[domain] = _host_port(hop, key)
    return RelaySection(
        smarthost=smarthost, routes=routes, **_relay_options(table, smarthost, base)
    )


def _relay_options(table: dict[str, Any], smarthost: str, base: Path) -> dict[str, Any]:
    """
    The smarthost credentials, resolver and queue settings of C{[relay]}.
    Credentials come in pairs and need a smarthost (they are sent nowhere
    else); times are seconds, and the retry ceiling is not below the start.
    """
    values: dict[str, Any] = {}
    for name in ("smarthost_username", "smarthost_password"):
        value = _string(table, "relay", name, "")
        if "\x00" in value:  # RFC 4616: NUL separates the PLAIN fields
            raise _Problem(_key("relay", name), "must not contain a NUL character")
        values[name] = value
    username, password = values["smarthost_username"], values["smarthost_password"]
    if bool(username) != bool(password):
        missing = "smarthost_password" if username else "smarthost_username"
        raise _Problem(_key("relay", missing), "needed too (give both, or neither)")
    if username and not smarthost:
        problem = "credentials are only sent to relay.smarthost, which is not set"
        raise _Problem(_key("relay", "smarthost_username"), problem)

    cafile = _string(table, "relay", "smarthost_cafile", "")
    values["smarthost_cafile"] = None
    if cafile:
        key = _key("relay", "smarthost_cafile")
        if "\x00" in cafile:
            raise _Problem(key, f"not a valid path: {_show(cafile)}")
        path = Path(os.path.abspath(base / cafile))
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            problem = f"cannot read {str(path)!r}: {e.strerror or e}"
            raise _Problem(key, problem) from None
        values["smarthost_cafile"] = path

    resolver = _string(table, "relay", "resolver", "")
    if resolver:
        key = _key("relay", "resolver")
        resolver = _host_port(resolver, key)
        host = resolver.rpartition(":")[0].strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            problem = f"expected IP:port of a DNS server, got {_show(resolver)}"
            raise _Problem(key, problem) from None
    values["resolver"] = resolver

    values["mx_port"] = _integer(table, "relay", "mx_port", 25, 1, 65535)
    for name in ("retry_initial", "retry_max", "give_up_after"):
        values[name] = _seconds(table, name, getattr(RelaySection, name), positive=True)
    values["delay_warning_after"] = _seconds(
        table, "delay_warning_after", RelaySection.delay_warning_after, positive=False
    )
    if values["retry_max"] < values["retry_initial"]:
        problem = f"must be at least relay.retry_initial ({values['retry_initial']!r})"
        raise _Problem(_key("relay", "retry_max"), problem)
    for name in ("max_concurrent", "max_per_destination"):
        values[name] = _integer(table, "relay", name, getattr(RelaySection, name), 1)
    return values


def _integer(
    table: dict[str, Any],
    section: str,
    key: str,
    default: int,
    least: int,
    most: int | None = None,
) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Problem(_key(section, key), f"expected an integer, got {_show(value)}")
    if value < least or (most is not None and value > most):
        bounds = f"at least {least}" if most is None else f"between {least} and {most}"
        raise _Problem(_key(section, key), f"must be {bounds}, got {_show(value)}")
    return value


def _seconds(table: dict[str, Any], key: str, default: float, positive: bool) -> float:
    """A duration in seconds under C{[relay]}: a finite number, > 0 or >= 0."""
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problem = f"expected a number of seconds, got {_show(value)}"
        raise _Problem(_key("relay", key), problem)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        least = "positive" if positive else "zero or positive"
        problem = f"must be a {least} number of seconds, got {_show(value)}"
        raise _Problem(_key("relay", key), problem)
    return float(value)


def _limits(table: dict[str, Any]) -> LimitsSection:
    """
    Every limit positive.  Integers stay integers (C{true} is not 1);
    timeouts accept integers and floats.  C{max_recipients} below 100 is
    allowed for testing but RFC 5321 4.5.3.1.8 asks servers to accept 100.
    """
    values: dict[str, int | float] = {}
    for f in dataclasses.fields(LimitsSection):
        if f.name not in table:
            continue
        value = table[f.name]
        key = _key("limits", f.name)
        if isinstance(f.default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _Problem(key, f"expected a number, got {_show(value)}")
            if not (math.isfinite(value) and value > 0):
                raise _Problem(key, f"must be a positive number, got {_show(value)}")
            values[f.name] = float(value)
        else:
            if isinstance(value, bool) or not isinstance(value, int):
                raise _Problem(key, f"expected an integer, got {_show(value)}")
            if value < 1:
                raise _Problem(key, f"must be at least 1, got {_show(value)}")
            values[f.name] = value
    return LimitsSection(**values)


# --- endpoints ---------------------------------------------------------------

_ENDPOINT_TYPES = ("tcp", "tcp6", "ssl", "unix", "systemd")


def endpoint_parts(text: str) -> tuple[list[str], dict[str, str]]:
    """
    Split an endpoint string as Twisted does: on colons not escaped with a
    backslash, C{name=value} parts are keyword arguments.
    """
    parts, current, escaped = [], "", False
    for char in text:
        if escaped:
            current, escaped = current + char, False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    args = [p for p in parts if "=" not in p]
    kwargs = dict(p.split("=", 1) for p in parts if "=" in p)
    return args, kwargs


def _endpoint_problem(text: str) -> tuple[str | None, tuple[Any, ...] | None]:
    """
    Check one endpoint string without listening.

    @return: the problem (C{None} if it is valid) and the address it would
        listen on, to find two listeners on one address (C{None} for port 0,
        which picks a free port each time).
    """
    if _CONTROL.search(text):
        return "contains a control character", None
    args, kwargs = endpoint_parts(text)
    kind = args[0] if args else ""
    if kind not in _ENDPOINT_TYPES:
        return f"unsupported type {kind!r}: use {', '.join(_ENDPOINT_TYPES)}", None
    if kind == "systemd":
        # Resolved against inherited descriptors only at start (which this
        # process may not have), so check its syntax here.
        if kwargs.get("domain") not in ("INET", "INET6", "UNIX"):
            return "systemd needs domain=INET, INET6 or UNIX", None
        if ("index" in kwargs) == ("name" in kwargs):
            return "systemd needs exactly one of index= or name=", None
        if "index" in kwargs and not kwargs["index"].isdigit():
            return "invalid index", None
        if set(kwargs) - {"domain", "index", "name"} or len(args) > 1:
            return "unknown systemd option", None
        return None, (kind, text)
    clash: tuple[Any, ...] | None = (kind, text)
    if kind in ("tcp", "tcp6", "ssl"):
        port = kwargs.get("port", args[1] if len(args) > 1 else "")
        if not port.isdigit() or int(port) > 65535:
            return "invalid port", None
        clash = (kind == "tcp6", int(port), kwargs.get("interface", ""))
        if not int(port):  # a free port each time: never clashes
            clash = None
    try:
        serverFromString(MemoryReactor(), text)
    except Exception as e:  # Twisted's parsers raise all sorts: report any.
        unknown = re.search(r"unexpected keyword argument '(.*)'", str(e))
        problem = f"unknown option {unknown[1]!r}" if unknown else str(e)
        return problem or type(e).__name__, None
    return None, clash


def _check_endpoints(endpoints: dict[str, str]) -> None:
    """
    Every listener that is on must parse, and no two may share an address
    (they would fail at start, after the others had begun listening).
    """
    seen: dict[tuple[Any, ...], str] = {}
    for name, text in endpoints.items():
        if not text:
            continue
        key = _key("listen", name)
        problem, address = _endpoint_problem(text)
        if problem:
            raise _Problem(key, f"not a valid endpoint: {_show(text)} ({problem})")
        if address is None:
            continue
        if address in seen:
            raise _Problem(key, f"same address as listen.{seen[address]}")
        seen[address] = name


# --- development instance and description --------------------------------

_DEVELOPMENT_PORTS = {
    "smtp": 2525,
    "submission": 2587,
    "submissions": 2465,
    "imap": 2143,
    "imaps": 2993,
    "pop3": 2110,
    "pop3s": 2995,
    "http": 2080,
}


def development(base_dir: Path | str) -> Config:
    """
    The development instance: domain C{example.test}, state under
    C{base_dir/var}, the unprivileged loopback ports of the example
    configuration and a generated self-signed certificate.

    Plaintext passwords are allowed from loopback, so that a developer can
    try it with telnet, smtplib or fetchmail before setting up TLS; nothing
    listens beyond 127.0.0.1.
    """
    state_dir = Path(os.path.abspath(base_dir)) / "var"
    return Config(
        path=None,
        server=ServerSection(hostname="mail.example.test", state_dir=state_dir),
        tls=TLSSection(state_dir / "tls" / "cert.pem", state_dir / "tls" / "key.pem"),
        listen=ListenSection(
            **{
                name: f"tcp:{port}:interface=127.0.0.1"
                for name, port in _DEVELOPMENT_PORTS.items()
            }
        ),
        domains=("example.test",),
        aliases={},
        relay=RelaySection(),
        submission=SubmissionSection(),
        limits=LimitsSection(),
        auth=AuthSection(allow_plaintext_on_loopback=True),
    )


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and controls escaped."""
    escapes = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    return (
        '"'
        + "".join(
            escapes.get(c) or (f"\\u{ord(c):04x}" if _CONTROL.match(c) else c)
            for c in text
        )
        + '"'
    )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # repr of a float is valid TOML: 300.0, 1e+20, inf
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _toml_string(str(value))


def describe(config: Config) -> str:
    """
    The effective settings as TOML text, for C{mailsys check-config}: every
    section and key, defaults included, so that an administrator sees what
    the server will actually do.  L{load}ing the text gives back an equal
    configuration (paths are absolute, so it means the same anywhere).
    """
    lines = ["# Effective mailsys configuration"]
    if config.path is not None:
        lines[0] += f" read from {config.path}"
    lines[0] = _CONTROL.sub("?", lines[0])

    def section(name: str, values: Mapping[str, Any]) -> None:
        lines.extend(["", f"[{name}]"])
        lines.extend(f"{_key(k)} = {_toml_value(v)}" for k, v in values.items())

    def fields(obj: Any) -> dict[str, Any]:
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}

    section("server", fields(config.server))
    section("tls", fields(config.tls))
    section("auth", fields(config.auth))
    section("listen", fields(config.listen))
    section("domains", {"names": config.domains})
    section("aliases", config.aliases)
    relay = fields(config.relay)
    del relay["routes"]
    if relay["smarthost_cafile"] is None:
        relay["smarthost_cafile"] = ""  # TOML has no null: "" means none
    section("relay", relay)
    section("relay.routes", config.relay.routes)
    section("submission", fields(config.submission))
    section("limits", fields(config.limits))
    section("imap", fields(config.imap))
    section("imaps", fields(config.imaps))
    return "\n".join(lines) + "\n"

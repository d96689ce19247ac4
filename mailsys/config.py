"""
Configuration: a TOML file turned into frozen, validated objects.

Every problem is reported as one line naming the file, the key and what is
wrong (L{ConfigError}); the command-line tools print that line and exit with
status 2, never a traceback.  Relative paths are relative to the directory
of the configuration file.  Listeners are Twisted endpoint strings; an empty
or absent listener is off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from mailsys import limits


class ConfigError(Exception):
    """
    A configuration problem.  C{str(error)} is one line of the form
    C{FILE: KEY: PROBLEM}, ready to print to an administrator.
    """


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
    smarthost: str = ""
    routes: Mapping[str, str] = field(default_factory=dict)


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
    limits: LimitsSection = field(default_factory=LimitsSection)

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


def load(path: Path | str) -> Config:
    """
    Read and validate the TOML file at C{path}.

    @raise ConfigError: for any problem, as one line naming the file and key.
    """
    raise NotImplementedError


def development(base_dir: Path | str) -> Config:
    """
    The development instance: domain C{example.test}, state under
    C{base_dir/var}, the unprivileged loopback ports of the example
    configuration and a generated self-signed certificate.
    """
    raise NotImplementedError


def describe(config: Config) -> str:
    """The effective settings as TOML text, for C{mailsys check-config}."""
    raise NotImplementedError

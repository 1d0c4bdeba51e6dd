"""Configuration: defaults table -> INI file -> environment -> CLI overrides -> ``Settings``.

Layers, later wins (STYLE.md §5):

1. the defaults, which are the field defaults of the section dataclasses below (one table,
   so ``scripts/fs-cc360.ini`` and the tests can be checked against it);
2. the INI file given to :func:`load_settings` (unknown sections and keys are errors, so a
   typo never silently falls back to a default; ``[extensions]`` is a free-form map);
3. environment variables ``FS_CC360_<SECTION>_<KEY>`` (upper case, e.g.
   ``FS_CC360_CRM_URL``); a ``FS_CC360_`` variable that names no setting is an error too,
   except :data:`RESERVED_ENV` (e.g. ``FS_CC360_CONFIG``). ``FS_CC360_EXTENSIONS_<USER>``
   adds an ``[extensions]`` entry for the lower-cased ``<USER>``;
4. explicit overrides (CLI flags) as ``{section: {key: value}}``; ``None`` values are
   skipped, so unset argparse flags can be passed as they are.

Every value is text until it is parsed into its type. The result is a frozen
:class:`Settings` that :func:`validate` checks once, at start-up, so an admin sees a bad
key before the first call, not in the middle of one. Every problem found is reported in
one :class:`~fs_cc360.errors.ConfigError`, one line per problem, each line naming the
``[section] key``, where the value came from, the value (``***`` for secrets) and what is
expected::

    [crm] url = 'ftp://x' (from /etc/fs-cc360/fs-cc360.ini): expected an http:// or https:// URL
"""

from __future__ import annotations

import configparser
import difflib
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import re
import shutil
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import phonenumbers

from fs_cc360.errors import ConfigError
from fs_cc360.numbers import NumberRules

log = logging.getLogger(__name__)

#: Prefix of the environment variables that override settings.
ENV_PREFIX = "FS_CC360_"
#: ``FS_CC360_*`` variables that are not settings (the CLI's config file path).
RESERVED_ENV = frozenset({"FS_CC360_CONFIG"})
#: What :meth:`Settings.dump` shows for a secret that is set.
MASK = "***"
#: Secret values shipped in ``scripts/fs-cc360.ini``: refused in strict mode.
PLACEHOLDER = "change-me"
#: The originate template used by click-to-call (``[webapi] originate``).
DEFAULT_ORIGINATE = "{vars}user/{agent} {client} XML default"
#: Placeholders of the originate template: channel variables block (``{a=b,c=d}``),
#: the agent's extension and the client's number.
ORIGINATE_FIELDS = ("vars", "agent", "client")
#: May appear in the template: the tenant's domain (the first of ``[calls] domains``).
ORIGINATE_OPTIONAL = ("domain",)
#: The originate template of a tenant's connector (``[calls] domains`` set) unless the
#: admin wrote another: the agent is dialled inside the tenant's domain.
TENANT_ORIGINATE = "{vars}user/{agent}@{domain} {client} XML default"
#: Encoders that ``[webapi] convert_to_mp3`` can use.
MP3_ENCODERS = ("lame", "ffmpeg")
#: URL schemes ``[outbox] database`` accepts: a SQLite file, or a PostgreSQL server
#: shared by the connectors of several FreeSWITCH nodes (fs_cc360/outbox_pg.py).
DATABASE_SCHEMES = ("sqlite", "postgresql", "postgres")
#: A webapi token shorter than this is accepted with a warning.
WEAK_TOKEN_LENGTH = 16
#: The operator console's token (``[webapi] admin_token``) is refused when shorter.
ADMIN_TOKEN_LENGTH = 16

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ASCII_DIGITS = re.compile(r"[0-9]+")
_URL_TOKEN = re.compile(r"[A-Za-z0-9._~-]+")  # RFC 3986 unreserved: safe in a path segment
_VARNAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")  # also matches IPv4 addresses


# --------------------------------------------------------------------------- sources


class SourceKind(str, Enum):  # noqa: UP042 - StrEnum is 3.11+, we support 3.10
    """Which layer an effective value came from."""

    DEFAULT = "default"
    FILE = "file"
    ENV = "env"
    OVERRIDE = "override"


@dataclass(frozen=True)
class ValueSource:
    """Where one effective value came from: ``kind`` plus the file path or variable name."""

    kind: SourceKind
    where: str = ""

    def __str__(self) -> str:
        if self.kind is SourceKind.FILE:
            return self.where
        if self.kind is SourceKind.ENV:
            return f"env {self.where}"
        if self.kind is SourceKind.OVERRIDE:
            return "command line"
        return "default"

    def describe(self) -> str:
        """The parenthesised origin used in error messages."""
        if self.kind is SourceKind.DEFAULT:
            return "(default)"
        if self.kind is SourceKind.OVERRIDE:
            return "(from the command line)"
        return f"(from {self})"


_DEFAULT_SOURCE = ValueSource(SourceKind.DEFAULT)


# --------------------------------------------------------------------------- value parsers
# Each parser turns the text of one value into its type, or raises ValueError("expected ...").


def _text(value: str) -> str:
    return value


def _required_text(value: str) -> str:
    if not value:
        raise ValueError("expected a non-empty value")
    return value


def _host(value: str) -> str:
    if not value or any(c.isspace() for c in value) or "/" in value:
        raise ValueError("expected a host name or IP address")
    return value


_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def _domains(value: str) -> tuple[str, ...]:
    """``tenant1.example.com, tenant2.example.com``: FreeSWITCH directory domains."""
    domains = tuple(dict.fromkeys(part.strip().lower() for part in value.split(",")
                                  if part.strip()))
    for domain in domains:
        if not _DOMAIN.fullmatch(domain) or len(domain) > 253:
            raise ValueError("expected a comma-separated list of directory domains like "
                             "tenant1.example.com (or an IP address), or empty for every domain")
    return domains


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        if not re.fullmatch(r"[+-]?[0-9]+", value) or not low <= int(value) <= high:
            raise ValueError(f"expected a whole number from {low} to {high}")
        return int(value)

    return parse


def _seconds(*, allow_zero: bool = False, unit: str = "seconds") -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
            raise ValueError(f"expected a number of {unit} {'>= 0' if allow_zero else '> 0'}")
        return number

    return parse


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected true or false")


def _choice(*choices: str) -> Callable[[str], str]:
    """An enum kept as text; matched case-insensitively, stored as spelled in ``choices``."""
    by_lower = {c.lower(): c for c in choices}

    def parse(value: str) -> str:
        try:
            return by_lower[value.lower()]
        except KeyError:
            raise ValueError(f"expected one of {'|'.join(choices)}") from None

    return parse


def _regex(value: str) -> re.Pattern[str]:
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValueError(f"expected a valid regular expression ({exc})") from None


def _path(value: str) -> Path:
    if not value:
        raise ValueError("expected a path")
    return Path(value)


def _optional_path(value: str) -> Path | None:
    return Path(value) if value else None


def _http_url(value: str, *, allow_empty: bool) -> str:
    """An ``http(s)://host[:port][/prefix]`` base URL, returned without a trailing ``/``."""
    if not value and allow_empty:
        return ""
    expected = "expected an http:// or https:// URL"
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{expected} (like https://crm.example.com[:port][/prefix])")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise ValueError(f"{expected} without ?query or #fragment")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{expected} without user:password@ (credentials go in their own keys)")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"{expected} with a valid port") from None
    if any(c.isspace() for c in value):
        raise ValueError(f"{expected} without spaces")
    return value.rstrip("/")


def _crm_url(value: str) -> str:
    return _http_url(value, allow_empty=True)


def _public_url(value: str) -> str:
    return _http_url(value, allow_empty=True)


def _crm_token(value: str) -> str:
    # The CC360 token goes into a URL path segment; we do not choose it, so only refuse
    # what would break the path.
    if value and re.search(r"[\s/?#%]", value):
        raise ValueError("expected the OmniWhoCallsToken value, without spaces, /, ?, # or %")
    return value


def _url_token(value: str) -> str:
    if value and not _URL_TOKEN.fullmatch(value):
        raise ValueError("expected letters, digits and . _ ~ - only (it is part of a URL path)")
    return value


def _admin_token(value: str) -> str:
    # the example file's placeholder parses: strict validation refuses it with its own message
    if value and value != PLACEHOLDER and (
            len(value) < ADMIN_TOKEN_LENGTH or any(c.isspace() for c in value)):
        raise ValueError(f"expected at least {ADMIN_TOKEN_LENGTH} characters without spaces "
                         "(e.g. \"openssl rand -hex 24\"), or empty to turn the console off")
    return value


def _database(value: str) -> str:
    if not value:
        raise ValueError("expected a file path, a sqlite:/// URL or a "
                         "postgresql://user@host:5432/dbname URL")
    if "://" in value:
        scheme = value.split("://", 1)[0].lower()
        if scheme not in DATABASE_SCHEMES:
            raise ValueError(
                f"expected a file path or a URL with scheme {'|'.join(DATABASE_SCHEMES)}"
            )
        if scheme != "sqlite":
            parts = urlsplit(value)
            try:
                parts.port  # noqa: B018 (raises on a bad port)
            except ValueError:
                raise ValueError("expected postgresql://user@host:5432/dbname "
                                 "(the port is not a number)") from None
            if not parts.path.strip("/"):
                raise ValueError("expected postgresql://user@host:5432/dbname "
                                 "(the database name is missing)")
    return value


def mask_database_url(value: str) -> str:
    """``[outbox] database`` with the password of a URL replaced by ``***`` (logs, errors,
    check-config): ``postgresql://fs:***@db:5432/cc360``."""
    if "://" not in value:
        return value
    parts = urlsplit(value)
    if parts.password is None:
        return value
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:{MASK}@{host}"))


def _journal_path(value: str) -> str:
    if not value or "://" in value or value == ":memory:":
        raise ValueError("expected a file path (a local SQLite file)")
    return value


def _node_name(value: str) -> str:
    if value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", value):
        raise ValueError("expected a short name (letters, digits, . _ -), e.g. fs1, "
                         "or empty for the host name")
    return value


def _national_prefix(value: str) -> str:
    if value and not re.fullmatch(r"[0-9]+:[0-9]*", value):
        raise ValueError("expected digits:digits, e.g. 8:7, or empty")
    return value


def _region(value: str) -> str:
    upper = value.upper()
    if upper and upper not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError("expected a two-letter ISO country code known to phonenumbers, e.g. RU")
    return upper


def _varname(value: str) -> str:
    if value and not _VARNAME.fullmatch(value):
        raise ValueError("expected a channel variable name (letters, digits, _), or empty")
    return value


def _originate(value: str) -> str:
    expected = "expected an originate template with {vars}, {agent} and {client}"
    seen: set[str] = set()
    try:
        parsed = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ValueError(f"{expected} ({exc}; write literal braces as {{{{ }}}})") from None
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in ORIGINATE_FIELDS + ORIGINATE_OPTIONAL or spec or conversion:
            raise ValueError(f"{expected} (unknown placeholder {{{name}}})")
        seen.add(name)
    missing = [name for name in ORIGINATE_FIELDS if name not in seen]
    if missing:
        raise ValueError(f"{expected} (missing {', '.join('{' + m + '}' for m in missing)})")
    return value


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8080`` for IPv6) -> ``(host, port)``; ``ValueError`` if not.

    Port 0 is accepted (bind any free port; useful in tests).
    """
    expected = "expected host:port, e.g. 127.0.0.1:8080, 0.0.0.0:8080 or [::]:8080"
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(expected)
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{expected} (bad IPv6 address in [])") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{expected} (IPv6 addresses go in [])" if ":" in host else expected)
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(expected)
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or int(port_text) > 65535:
        raise ValueError(f"{expected} (port 0..65535)")
    return host, int(port_text)


def _listen(value: str) -> str:
    parse_listen(value)
    return value.strip()


def _origins(value: str) -> tuple[str, ...]:
    origins = tuple(part.strip().rstrip("/") for part in value.split(",") if part.strip())
    for origin in origins:
        if origin == "*":
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
            raise ValueError(
                "expected a comma-separated list of origins like https://crm.example.com, or *"
            )
    return origins


# --------------------------------------------------------------------------- sections


def _key(default: Any, parse: Callable[[str], Any], *, secret: bool = False) -> Any:
    """A setting: its typed default, the parser for its text, whether it is a secret."""
    return field(default=default, metadata={"parse": parse, "secret": secret})


@dataclass(frozen=True)
class FreeswitchSettings:
    """``[freeswitch]``: the event socket (ESL) of the FreeSWITCH to follow."""

    host: str = _key("127.0.0.1", _host)
    port: int = _key(8021, _int_range(1, 65535))
    password: str = _key("ClueCon", _required_text, secret=True)
    connect_timeout: float = _key(5.0, _seconds())
    #: Cap of the reconnect backoff, seconds.
    reconnect_max: float = _key(30.0, _seconds())


@dataclass(frozen=True)
class CrmSettings:
    """``[crm]``: the CC360 instance and how to authenticate to it."""

    #: Base URL, ``http(s)://host[:port][/prefix]``, stored without a trailing ``/``.
    url: str = _key("", _crm_url)
    auth: str = _key("forms", _choice("forms", "anonymous"))
    login: str = _key("", _text)
    password: str = _key("", _text, secret=True)
    #: The "Who Calls Token" system setting (``OmniWhoCallsToken``); part of every URL.
    token: str = _key("", _crm_token, secret=True)
    timeout: float = _key(10.0, _seconds())
    verify_tls: bool = _key(True, _bool)
    #: CA bundle file (or directory) for a CRM with a private CA; must exist if set.
    ca_bundle: Path | None = _key(None, _optional_path)

    @property
    def requests_verify(self) -> bool | str:
        """The ``verify=`` argument for ``requests``."""
        if self.ca_bundle is not None:
            return str(self.ca_bundle)
        return self.verify_tls


@dataclass(frozen=True)
class OutboxSettings:
    """``[outbox]``: the durable outbox (a SQLite file, or PostgreSQL shared by nodes)."""

    #: A file path (relative to the working directory), a ``sqlite://`` URL or a
    #: ``postgresql://user@host:5432/dbname`` URL (its password is masked everywhere).
    database: str = _key("fs-cc360.sqlite3", _database)
    #: The PostgreSQL password when not in the URL (else libpq's PGPASSWORD / ~/.pgpass).
    password: str = _key("", _text, secret=True)
    #: This connector's name on the rows of a shared PostgreSQL outbox (empty: host name).
    node: str = _key("", _node_name)
    #: With PostgreSQL: the local SQLite file where rows are committed while the server
    #: is unreachable, moved to PostgreSQL in order when it is back (and the position).
    journal: str = _key("fs-cc360.journal.sqlite3", _journal_path)
    synchronous: str = _key("FULL", _choice("OFF", "NORMAL", "FULL", "EXTRA"))
    #: Delivered rows are purged after this many days; pending rows never are.
    retention_days: float = _key(7.0, _seconds(unit="days"))


@dataclass(frozen=True)
class DeliverySettings:
    """``[delivery]``: how the outbox is drained to CC360."""

    concurrency: int = _key(8, _int_range(1, 256))
    #: Ringing/answer/hangup older than this when their turn comes are expired, not sent.
    realtime_ttl: float = _key(120.0, _seconds())
    backoff_initial: float = _key(1.0, _seconds())
    backoff_max: float = _key(60.0, _seconds())
    #: Tries before a request the CRM rejects (non-retryable 4xx) is marked dead.
    max_rejections: int = _key(3, _int_range(1, 1000))
    #: How long a claimed row stays in flight before another worker may reclaim it.
    lease_seconds: float = _key(60.0, _seconds())


@dataclass(frozen=True)
class CallsSettings:
    """``[calls]``: the call mapping rules (see ``fs_cc360.calls``)."""

    #: An agent leg's user must fully match this (and be ASCII digits: the spec).
    extension_pattern: re.Pattern[str] = _key(re.compile(r"^\d{2,7}$"), _regex)
    missed_calls: str = _key("first", _choice("first", "all", "none"))
    outgoing_realtime: bool = _key(False, _bool)
    internal_calls: str = _key("skip", _choice("skip", "report"))
    number_format: str = _key("digits", _choice("digits", "e164", "raw"))
    default_region: str = _key("RU", _region)
    #: ``8:7`` rewrites 11-digit ``8XXXXXXXXXX`` to ``7XXXXXXXXXX``.
    national_prefix: str = _key("", _national_prefix)
    #: Optional channel variable holding a recording path (besides RECORD_STOP).
    recording_variable: str = _key("", _varname)
    #: Seconds to wait for the partner leg's RECORD_STOP before sending a summary anyway.
    summary_wait: float = _key(10.0, _seconds(allow_zero=True))
    #: Report only calls of agents in these directory domains (one connector per tenant on
    #: a hosted FreeSWITCH); empty: every domain.
    domains: tuple[str, ...] = _key((), _domains)


@dataclass(frozen=True)
class WebapiSettings:
    """``[webapi]``: click-to-call, recordings, health and metrics over HTTP."""

    enabled: bool = _key(True, _bool)
    listen: str = _key("127.0.0.1:8080", _listen)
    #: Token in ``/webapi/<token>/makecall`` (and in recording links when ``shared``).
    token: str = _key("", _url_token, secret=True)
    #: Base URL the CRM fetches recordings from; empty: summaries carry no links.
    public_url: str = _key("", _public_url)
    recordings_dir: Path = _key(Path("/var/lib/freeswitch/recordings"), _path)
    recording_auth: str = _key("signed", _choice("signed", "shared"))
    #: HMAC key of signed recording links; empty: derived from ``token``.
    recording_secret: str = _key("", _text, secret=True)
    originate: str = _key(DEFAULT_ORIGINATE, _originate)
    cors_origins: tuple[str, ...] = _key((), _origins)
    convert_to_mp3: bool = _key(False, _bool)
    #: Token for ``/metrics`` (bearer or ``?token=``); empty: ``/metrics`` is open.
    metrics_token: str = _key("", _url_token, secret=True)
    #: Password of the operator console under ``/ui/``; empty: no console (404).
    admin_token: str = _key("", _admin_token, secret=True)
    max_connections: int = _key(100, _int_range(1, 100000))
    makecall_per_agent_seconds: float = _key(10.0, _seconds(allow_zero=True))
    tls_cert: Path | None = _key(None, _optional_path)
    tls_key: Path | None = _key(None, _optional_path)

    @property
    def address(self) -> tuple[str, int]:
        """``listen`` as ``(host, port)``."""
        return parse_listen(self.listen)

    def recording_key(self) -> bytes:
        """The HMAC key of signed recording links.

        ``recording_secret`` when set; otherwise derived from ``token`` (HMAC-SHA256 of a
        fixed label), so rotating ``token`` then also invalidates every link already sent to
        the CRM. Set ``recording_secret`` to keep links valid across token changes.
        """
        if self.recording_secret:
            return self.recording_secret.encode()
        if not self.token:
            return b""
        return hmac.new(self.token.encode(), b"fs-cc360 recording links", hashlib.sha256).digest()


@dataclass(frozen=True)
class BackfillSettings:
    """``[backfill]``: automatic catch-up from mod_json_cdr's files after a gap."""

    #: mod_json_cdr's log directory (``log-dir``); empty: no automatic catch-up
    #: (``fs-cc360 backfill DIR`` still works by hand).
    cdr_dir: Path | None = _key(None, _optional_path)
    #: After a gap, legs that ended since the last event read before it, less this, are
    #: read (the margin covers a crash between two saves of that time).
    margin: float = _key(120.0, _seconds(allow_zero=True))


@dataclass(frozen=True)
class LoggingSettings:
    """``[logging]``: set up by ``service.py`` / ``cli.py`` only."""

    level: str = _key("INFO", _choice("DEBUG", "INFO", "WARNING", "ERROR"))
    format: str = _key("text", _choice("text", "json"))


#: Section name -> dataclass, in the order of the example config.
SECTIONS: tuple[tuple[str, type], ...] = (
    ("freeswitch", FreeswitchSettings),
    ("crm", CrmSettings),
    ("outbox", OutboxSettings),
    ("delivery", DeliverySettings),
    ("calls", CallsSettings),
    ("webapi", WebapiSettings),
    ("backfill", BackfillSettings),
    ("logging", LoggingSettings),
)
#: The free-form section: SIP user -> digit extension.
EXTENSIONS = "extensions"
_SECTION_CLASSES = dict(SECTIONS)
_SECTION_ORDER = ("freeswitch", "crm", "outbox", "delivery", "calls", EXTENSIONS, "webapi",
                  "backfill", "logging")


def _format(value: Any) -> str:
    """A typed value back to the text an INI file would hold."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, re.Pattern):
        return value.pattern
    if isinstance(value, tuple):
        return ", ".join(value)
    return str(value)


def _is_secret(section: str, key: str) -> bool:
    cls = _SECTION_CLASSES.get(section)
    if cls is None:
        return False
    return any(f.name == key and f.metadata["secret"] for f in fields(cls))


def secret_keys() -> list[str]:
    """``section.key`` of every secret setting (masked by :meth:`Settings.dump`)."""
    return [f"{name}.{f.name}" for name, cls in SECTIONS for f in fields(cls)
            if f.metadata["secret"]]


def defaults_table() -> dict[str, dict[str, str]]:
    """Every section and key with its default, as INI text (``[extensions]`` is empty)."""
    table: dict[str, dict[str, str]] = {}
    for name in _SECTION_ORDER:
        if name == EXTENSIONS:
            table[name] = {}
            continue
        table[name] = {f.name: _format(f.default) for f in fields(_SECTION_CLASSES[name])}
    return table


@dataclass(frozen=True)
class Settings:
    """The effective configuration: one frozen dataclass per section.

    Build it with :func:`load_settings`. ``Settings()`` (all defaults) and
    ``dataclasses.replace`` are fine in tests; call :func:`validate` on what you build.
    """

    freeswitch: FreeswitchSettings = field(default_factory=FreeswitchSettings)
    crm: CrmSettings = field(default_factory=CrmSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    calls: CallsSettings = field(default_factory=CallsSettings)
    #: ``[extensions]``: SIP user -> digit extension (``alice = 101``).
    extensions: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    webapi: WebapiSettings = field(default_factory=WebapiSettings)
    backfill: BackfillSettings = field(default_factory=BackfillSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    #: ``"section.key"`` -> where the effective value came from (missing: default).
    sources: Mapping[str, ValueSource] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )

    def source_of(self, key: str) -> ValueSource:
        """Where ``"section.key"`` came from."""
        return self.sources.get(key, _DEFAULT_SOURCE)

    def dump(self, masked: bool = True) -> dict[str, dict[str, str]]:
        """Every effective value as text, by section; secrets that are set become ``***``.

        An unset secret stays empty, so ``check-config`` shows whether it is set.
        """
        result: dict[str, dict[str, str]] = {}
        for name in _SECTION_ORDER:
            if name == EXTENSIONS:
                result[name] = dict(self.extensions)
                continue
            section = getattr(self, name)
            values: dict[str, str] = {}
            for f in fields(section):
                text = _format(getattr(section, f.name))
                if masked and f.metadata["secret"] and text:
                    text = MASK
                elif masked and name == "outbox" and f.name == "database":
                    text = mask_database_url(text)
                values[f.name] = text
            result[name] = values
        return result

    def dump_sources(self) -> dict[str, dict[str, str]]:
        """Like :meth:`dump`, but each value is where it came from (``check-config``)."""
        return {
            section: {key: str(self.source_of(f"{section}.{key}")) for key in values}
            for section, values in self.dump(masked=True).items()
        }

    def number_rules(self) -> NumberRules:
        """The callerid / click-to-call number rules of ``[calls]``."""
        return NumberRules(
            mode=self.calls.number_format,
            default_region=self.calls.default_region,
            national_prefix=self.calls.national_prefix,
        )

    def extension_for(self, user: str | None) -> str | None:
        """The CC360 extension for a FreeSWITCH user, or ``None`` if it is not an agent.

        ``[extensions]`` is looked up first (exact match: SIP user names are case
        sensitive); the result, or the user itself, must be ASCII digits (spec §1:
        extensions are digits only; ``\\d`` alone would also take other scripts' digits)
        and fully match ``[calls] extension_pattern``.
        """
        if not user:
            return None
        extension = self.extensions.get(user, user)
        if not _ASCII_DIGITS.fullmatch(extension):
            return None
        if not self.calls.extension_pattern.fullmatch(extension):
            return None
        return extension


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class _Problem:
    key: str | None
    source: ValueSource | None
    message: str


def _value_problem(section: str, key: str, value: str, source: ValueSource,
                   expected: str) -> _Problem:
    if (section, key) == ("outbox", "database"):
        value = mask_database_url(value)
    shown = MASK if value and _is_secret(section, key) else repr(value)
    return _Problem(f"{section}.{key}", source,
                    f"[{section}] {key} = {shown} {source.describe()}: {expected}")


def _raise(problems: list[_Problem]) -> None:
    if not problems:
        return
    first = problems[0]
    if len(problems) == 1:
        message = first.message
    else:
        lines = "\n".join(f"  {p.message}" for p in problems)
        message = f"{len(problems)} configuration problems:\n{lines}"
    raise ConfigError(message, key=first.key,
                      source=str(first.source) if first.source is not None else None)


def _known_keys(section: str) -> list[str]:
    return [f.name for f in fields(_SECTION_CLASSES[section])]


def _unknown_key_hint(section: str, key: str) -> str:
    known = _known_keys(section)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown key{hint}; known keys: {', '.join(known)}"


def _unknown_section_hint(section: str) -> str:
    close = difflib.get_close_matches(section, _SECTION_ORDER, n=1)
    hint = f" (did you mean [{close[0]}]?)" if close else ""
    return f"unknown section{hint}; known sections: {', '.join(_SECTION_ORDER)}"


# --------------------------------------------------------------------------- loading

#: section -> key -> (text, source); extension keys keep their case.
_Layers = dict[str, dict[str, tuple[str, ValueSource]]]


def _read_file(path: Path, layers: _Layers, problems: list[_Problem]) -> None:
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"config file {where}: not found", source=where) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {where}: not UTF-8 text ({exc.reason})",
                          source=where) from None
    except OSError as exc:
        raise ConfigError(f"config file {where}: cannot read it ({exc.strerror})",
                          source=where) from None
    # No interpolation (% in passwords), no [DEFAULT] magic (it would copy its keys into
    # every section), keys keep their case ([extensions] holds SIP user names).
    parser = configparser.ConfigParser(
        interpolation=None, default_section="\x00default", strict=True,
        empty_lines_in_values=False, inline_comment_prefixes=None,
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source=where)
    except configparser.Error as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(f"config file {where}: {message}", source=where) from None
    source = ValueSource(SourceKind.FILE, where)
    for section in parser.sections():
        name = section.strip().lower()
        if name != EXTENSIONS and name not in _SECTION_CLASSES:
            problems.append(_Problem(None, source, f"[{section}] {source.describe()}: "
                                     f"{_unknown_section_hint(name)}"))
            continue
        for raw_key, value in parser.items(section):
            key = raw_key if name == EXTENSIONS else raw_key.lower()
            if name != EXTENSIONS and key not in _known_keys(name):
                problems.append(_Problem(f"{name}.{key}", source,
                                         f"[{name}] {raw_key} {source.describe()}: "
                                         f"{_unknown_key_hint(name, key)}"))
                continue
            if key in layers[name] and layers[name][key][1] == source:
                problems.append(_Problem(f"{name}.{key}", source,
                                         f"[{name}] {raw_key} {source.describe()}: "
                                         "given more than once"))
                continue
            layers[name][key] = (value.strip(), source)


def _read_env(env: Mapping[str, str], layers: _Layers, problems: list[_Problem]) -> None:
    for variable in sorted(env):
        if not variable.startswith(ENV_PREFIX) or variable in RESERVED_ENV:
            continue
        source = ValueSource(SourceKind.ENV, variable)
        section, _, key = variable[len(ENV_PREFIX):].partition("_")
        section, key = section.lower(), key.lower()
        if section == EXTENSIONS:
            if not key:
                problems.append(_Problem(None, source, f"{variable}: names no SIP user "
                                         "(FS_CC360_EXTENSIONS_<USER>)"))
                continue
            layers[section][key] = (env[variable].strip(), source)
            continue
        if section not in _SECTION_CLASSES:
            hint = _unknown_section_hint(section)
            message = f"{variable}: not a setting (FS_CC360_<SECTION>_<KEY>); {hint}"
            problems.append(_Problem(None, source, message))
            continue
        if key not in _known_keys(section):
            problems.append(_Problem(f"{section}.{key}", source, f"{variable}: [{section}] "
                                     f"{_unknown_key_hint(section, key)}"))
            continue
        layers[section][key] = (env[variable].strip(), source)


def _read_overrides(overrides: Mapping[str, Mapping[str, Any]], layers: _Layers,
                    problems: list[_Problem]) -> None:
    source = ValueSource(SourceKind.OVERRIDE)
    for section, values in overrides.items():
        name = section.lower()
        if name != EXTENSIONS and name not in _SECTION_CLASSES:
            problems.append(_Problem(None, source, f"[{section}] {source.describe()}: "
                                     f"{_unknown_section_hint(name)}"))
            continue
        for key, value in values.items():
            if value is None:
                continue
            if name != EXTENSIONS and key not in _known_keys(name):
                problems.append(_Problem(f"{name}.{key}", source,
                                         f"[{name}] {key} {source.describe()}: "
                                         f"{_unknown_key_hint(name, key)}"))
                continue
            layers[name][key] = (_format(value).strip(), source)


def _parse_value(parse: Callable[[str], Any], text: str) -> Any:
    if _CONTROL.search(text):
        # Values end up in ESL commands and HTTP headers: no line breaks, no NULs.
        hint = " (in the file, indented lines continue the value above)" if "\n" in text else ""
        raise ValueError(f"expected a single line without control characters{hint}")
    return parse(text)


def _parse_extension(user: str, extension: str) -> str:
    if not user or _CONTROL.search(user) or any(c.isspace() for c in user):
        raise ValueError("expected a SIP user name without spaces")
    if not _ASCII_DIGITS.fullmatch(extension):
        raise ValueError("expected a digit extension (the spec: extensions are digits only)")
    return extension


def _build(layers: _Layers, problems: list[_Problem]) -> Settings:
    sources: dict[str, ValueSource] = {}
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS:
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            sources[f"{name}.{f.name}"] = _DEFAULT_SOURCE
            if f.name not in layers[name]:
                continue
            text, source = layers[name][f.name]
            sources[f"{name}.{f.name}"] = source
            try:
                kwargs[f.name] = _parse_value(f.metadata["parse"], text)
            except ValueError as exc:
                problems.append(_value_problem(name, f.name, text, source, str(exc)))
        sections[name] = cls(**kwargs)
    extensions: dict[str, str] = {}
    for user, (extension, source) in layers[EXTENSIONS].items():
        sources[f"{EXTENSIONS}.{user}"] = source
        try:
            extensions[user] = _parse_extension(user, extension)
        except ValueError as exc:
            problems.append(_value_problem(EXTENSIONS, user, extension, source, str(exc)))
    return Settings(**sections, extensions=MappingProxyType(extensions),
                    sources=MappingProxyType(sources))


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    require_crm: bool = True,
) -> Settings:
    """Build and validate the settings from defaults, ``path``, ``env`` and ``overrides``.

    ``path=None`` reads no file; a ``path`` that does not exist is an error. ``env``
    defaults to ``os.environ``. ``require_crm=False`` accepts a partial config (demo,
    tests, ``check-config`` of a draft): what only the admin can supply (the CRM URL,
    credentials and token, the webapi token) may be empty and placeholders are allowed.
    Raises :class:`~fs_cc360.errors.ConfigError` listing every problem found.
    """
    layers: _Layers = {name: {} for name in _SECTION_ORDER}
    problems: list[_Problem] = []
    if path is not None:
        _read_file(Path(path), layers, problems)
    _read_env(os.environ if env is None else env, layers, problems)
    if overrides:
        _read_overrides(overrides, layers, problems)
    _raise(problems)
    settings = _build(layers, problems)
    _raise(problems)
    validate(settings, require_crm=require_crm)
    return settings


# --------------------------------------------------------------------------- validation


def validate(settings: Settings, *, require_crm: bool = True) -> None:
    """Check ``settings`` once, at start-up; raise ConfigError listing every problem.

    Re-checks each value against its key's rules (so a ``Settings`` built in code is
    checked too), then the rules that join keys or look at the machine (files exist,
    an MP3 encoder is installed).
    """
    problems: list[_Problem] = []
    _check_values(settings, problems)
    if not problems:  # the joint rules assume each value is well-formed
        _check_required(settings, require_crm, problems)
        _check_crm(settings, problems)
        _check_delivery(settings, problems)
        _check_extensions(settings, problems)
        _check_webapi(settings, require_crm, problems)
    _raise(problems)
    _warn_weak_secrets(settings)


def _problem(settings: Settings, section: str, key: str, expected: str) -> _Problem:
    value = _format(getattr(getattr(settings, section), key))
    return _value_problem(section, key, value, settings.source_of(f"{section}.{key}"), expected)


def _check_values(settings: Settings, problems: list[_Problem]) -> None:
    for name, _cls in SECTIONS:
        section = getattr(settings, name)
        for f in fields(section):
            text = _format(getattr(section, f.name))
            try:
                _parse_value(f.metadata["parse"], text)
            except ValueError as exc:
                problems.append(_value_problem(name, f.name, text,
                                               settings.source_of(f"{name}.{f.name}"), str(exc)))
    for user, extension in settings.extensions.items():
        try:
            _parse_extension(user, extension)
        except ValueError as exc:
            problems.append(_value_problem(EXTENSIONS, user, extension,
                                           settings.source_of(f"{EXTENSIONS}.{user}"), str(exc)))


def _check_required(settings: Settings, require_crm: bool, problems: list[_Problem]) -> None:
    if not require_crm:
        return
    crm = settings.crm
    if not crm.url:
        problems.append(_problem(settings, "crm", "url",
                                 "required: the CC360 base URL, e.g. https://crm.example.com"))
    if not crm.token:
        problems.append(_problem(settings, "crm", "token",
                                 "required: the CRM system setting OmniWhoCallsToken"))
    if crm.auth == "forms":
        for key in ("login", "password"):
            if not getattr(crm, key):
                problems.append(_problem(settings, "crm", key,
                                         "required when auth = forms (or set auth = anonymous)"))
    if settings.webapi.enabled and not settings.webapi.token:
        problems.append(_problem(settings, "webapi", "token",
                                 "required when [webapi] enabled = true (makecall token)"))
    for key in secret_keys():
        section, name = key.split(".")
        if getattr(getattr(settings, section), name).lower() == PLACEHOLDER:
            problems.append(_problem(settings, section, name,
                                     f"replace the placeholder {PLACEHOLDER!r} with a real secret"))


def _check_crm(settings: Settings, problems: list[_Problem]) -> None:
    crm = settings.crm
    if crm.ca_bundle is not None:
        if not crm.ca_bundle.exists():
            problems.append(_problem(settings, "crm", "ca_bundle",
                                     "expected an existing CA bundle file (or directory)"))
        elif not crm.verify_tls:
            problems.append(_problem(settings, "crm", "ca_bundle",
                                     "set, but [crm] verify_tls = false: drop one of them"))


def _check_delivery(settings: Settings, problems: list[_Problem]) -> None:
    delivery = settings.delivery
    if delivery.backoff_max < delivery.backoff_initial:
        problems.append(_problem(settings, "delivery", "backoff_max",
                                 f"expected >= [delivery] backoff_initial "
                                 f"({_format(delivery.backoff_initial)})"))
    if delivery.lease_seconds <= settings.crm.timeout:
        # A lease that can run out during a request lets a second worker send it again.
        problems.append(_problem(settings, "delivery", "lease_seconds",
                                 f"expected more than [crm] timeout "
                                 f"({_format(settings.crm.timeout)})"))


def _check_extensions(settings: Settings, problems: list[_Problem]) -> None:
    pattern = settings.calls.extension_pattern
    for user, extension in settings.extensions.items():
        if not pattern.fullmatch(extension):
            problems.append(_value_problem(
                EXTENSIONS, user, extension, settings.source_of(f"{EXTENSIONS}.{user}"),
                f"expected an extension matching [calls] extension_pattern ({pattern.pattern})"))


def _check_webapi(settings: Settings, require_crm: bool, problems: list[_Problem]) -> None:
    webapi = settings.webapi
    if (webapi.tls_cert is None) != (webapi.tls_key is None):
        missing = "tls_key" if webapi.tls_key is None else "tls_cert"
        present = "tls_cert" if missing == "tls_key" else "tls_key"
        problems.append(_problem(settings, "webapi", present,
                                 f"set without [webapi] {missing}: give both or neither"))
    for key in ("tls_cert", "tls_key"):
        path = getattr(webapi, key)
        if path is not None and not path.is_file():
            problems.append(_problem(settings, "webapi", key, "expected an existing file"))
    if (require_crm and webapi.public_url and webapi.recording_auth == "signed"
            and not webapi.recording_key()):
        problems.append(_problem(settings, "webapi", "recording_secret",
                                 "required to sign recording links when public_url is set "
                                 "(or set [webapi] token, it is derived from it)"))
    if (require_crm and webapi.public_url and webapi.recording_auth == "shared"
            and not webapi.token):
        problems.append(_problem(settings, "webapi", "token",
                                 "required for recording links when recording_auth = shared"))
    if webapi.admin_token and webapi.admin_token != PLACEHOLDER:
        if not webapi.enabled:
            problems.append(_problem(settings, "webapi", "admin_token",
                                     "set, but [webapi] enabled = false: the console is served "
                                     "by the web API (empty it, or enable the web API)"))
        for other in ("token", "metrics_token"):
            if hmac.compare_digest(webapi.admin_token, getattr(webapi, other)):
                problems.append(_problem(settings, "webapi", "admin_token",
                                         f"a secret of its own, not [webapi] {other} (that one "
                                         "travels in URLs)"))
    if webapi.enabled and webapi.convert_to_mp3 and not _find_encoder(MP3_ENCODERS):
        problems.append(_problem(settings, "webapi", "convert_to_mp3",
                                 f"needs an MP3 encoder on PATH ({' or '.join(MP3_ENCODERS)}); "
                                 "install one or set it to false"))


def _find_encoder(names: Iterable[str]) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def _warn_weak_secrets(settings: Settings) -> None:
    token = settings.webapi.token
    if settings.webapi.enabled and token and len(token) < WEAK_TOKEN_LENGTH:
        log.warning("config.weak_secret key=webapi.token length=%d advice=use_%d+_random_chars",
                    len(token), WEAK_TOKEN_LENGTH)

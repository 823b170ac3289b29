# -*- test-case-name: tests.test_config -*-
"""
The daemon's configuration: a TOML file, command-line options and the environment, merged
into one validated, frozen L{Config}.

Precedence, highest first: command line, environment (C{OLLAMA_URLS}), config file,
defaults. Every mistake is a L{ConfigError} naming the offending key, raised at startup,
never a traceback at the first request.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import tomllib
from collections.abc import Mapping
from typing import Any, Callable
from urllib.parse import urlsplit

import attrs

PRIORITIES = ("vip", "boost", "normal")
FAIR_SHARES = ("requests", "time")
AUTH_MODES = ("optional", "required")
# A configured key given as its digest rather than in the clear.
DIGEST_PREFIX = "sha256:"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
DEFAULT_PORT = 11435
DEFAULT_BACKEND = "http://localhost:11434"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """
    The configuration is invalid; the message names the key and says what is expected.
    """


@attrs.frozen
class BackendConfig:
    """
    One configured backend.

    @ivar url: base URL, scheme and authority (and optional path prefix), no trailing slash.
    @ivar name: short unique name used in status, metrics and the admin API.
    @ivar slots: how many requests the proxy runs on it at once; L{None} (not set): what
        the backend reports (llama-server's C{/props} C{total_slots}), else 1.
    @ivar apiKey: the backend's own key, sent to it (and to no other) as
        C{Authorization: Bearer}; L{None} when it needs none.
    """

    url: str
    name: str
    slots: int | None = None
    apiKey: str | None = attrs.field(default=None, repr=False)


@attrs.frozen
class UserConfig:
    """
    Scheduling policy and credentials of one configured user.

    @ivar weight: share under contention; C{boost} priority doubles it.
    @ivar keys: bearer keys that authenticate as this user, each in the clear or as
        C{sha256:HEX} (the digest of the key).
    @ivar maxQueued: per-user queue limit, overriding the server-wide one.
    @ivar maxRequestsPerMinute: per-user rate limit, overriding the server-wide one.
    @ivar maxRunning: requests of this user running at once (more wait in the queue),
        overriding the server-wide one.
    @ivar maxTokensPerDay: prompt and completion tokens per UTC day, overriding the
        server-wide limit.
    """

    priority: str = "normal"
    weight: float = 1.0
    keys: tuple[str, ...] = attrs.field(default=(), repr=False)
    maxQueued: int | None = None
    maxRequestsPerMinute: int | None = None
    maxRunning: int | None = None
    maxTokensPerDay: int | None = None


@attrs.frozen
class ModelRule:
    """
    Per-model rules: aliases that resolve to this model and request rewriting.

    @ivar name: the concrete model name requests are rewritten to.
    @ivar enforce: option names (C{num_ctx}, C{keep_alive}) whose configured value overrides
        the client's instead of only filling in a missing one.
    """

    name: str
    aliases: tuple[str, ...] = ()
    keepAlive: str | int | None = None
    numCtx: int | None = None
    enforce: frozenset[str] = frozenset()


@attrs.frozen
class Config:
    """
    The whole validated configuration of one daemon.
    """

    listen: tuple[str, ...] = (f"tcp:{DEFAULT_PORT}:interface=127.0.0.1",)
    backends: tuple[BackendConfig, ...] = ()
    timeout: float = 300.0
    firstByteTimeout: float = 600.0
    healthInterval: float = 10.0
    # Failures in a row before a suspect backend is offline.
    downAfter: int = 3
    # Seconds queued requests wait for an unavailable backend; None: 3 probe periods.
    downGrace: float | None = None
    probeTimeout: float = 5.0
    control: str = "ollamamq.sock"
    state: str = "ollamamq.db"
    allowAllRoutes: bool = False
    demo: bool = False
    maxQueuedPerUser: int = 100
    maxQueuedTotal: int = 10000
    maxBodyBytes: int = 100 * 1024 * 1024
    maxBlobBytes: int = 256 * 1024**3
    maxQueuedPerPeer: int = 1000
    maxQueuedBytes: int = 1024**3
    # Users tracked at once; idle, unconfigured ones are forgotten first beyond it.
    maxUsers: int = 10_000
    queueTimeout: float | None = None
    idleForget: float = 3600.0
    # The unit of fair share: dispatched requests, or lease seconds (GPU time).
    fairShare: str = "requests"
    trustUserHeader: bool = True
    trustedProxies: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.1/32"),)
    adminKey: str | None = attrs.field(default=None, repr=False)
    # "required": a request without a valid key is refused with 401.
    auth: str = "optional"
    # Per-user defaults; None means no limit.
    maxRequestsPerMinute: int | None = None
    maxRunningPerUser: int | None = None
    maxTokensPerDay: int | None = None
    # Seconds a client has to send its request headers (and, beyond that, the body at
    # MIN_BODY_RATE); and the most header bytes a request may have.
    clientTimeout: float = 30.0
    maxHeaderBytes: int = 16384
    users: Mapping[str, UserConfig] = attrs.field(factory=dict)
    models: Mapping[str, ModelRule] = attrs.field(factory=dict)
    # Observability: /metrics without the admin key, how many users get a metrics label
    # of their own, how long request log rows are kept (None: forever), log lines' format.
    metricsPublic: bool = True
    metricsTopUsers: int = 50
    logRetentionDays: float | None = 30.0
    logFormat: str = "text"


def keyDigest(key: str) -> str:
    """
    The C{sha256:HEX} form of a configured key: a digest stays as it is, a key in the clear
    is hashed.
    """
    if key.lower().startswith(DIGEST_PREFIX):
        return key.lower()
    return DIGEST_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


# --- value checkers: each takes the dotted key (for the message) and the raw value ---


def _positiveNumber(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{key}: expected a positive number, got {value!r}")
    return float(value)


def _positiveInt(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _stringList(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    return tuple(_string(f"{key}[{i}]", item) for i, item in enumerate(value))


def _networks(key: str, value: Any) -> tuple[IPNetwork, ...]:
    nets = []
    for i, item in enumerate(_stringList(key, value)):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"{key}[{i}]: not an IP network: {item!r}") from None
    return tuple(nets)


def _keys(key: str, value: Any) -> tuple[str, ...]:
    keys = _stringList(key, value)
    for i, item in enumerate(keys):
        if item.lower().startswith(DIGEST_PREFIX) and not _DIGEST.match(item.lower()):
            raise ConfigError(
                f"{key}[{i}]: a {DIGEST_PREFIX} key needs 64 hex digits after the prefix "
                "(ollamamq-keys prints one)"
            )
        if item != item.strip() or any(c.isspace() for c in item):
            raise ConfigError(f"{key}[{i}]: a key may not contain whitespace")
    return tuple(k.lower() if k.lower().startswith(DIGEST_PREFIX) else k for k in keys)


def _authMode(key: str, value: Any) -> str:
    if value not in AUTH_MODES:
        raise ConfigError(f'{key}: expected "optional" or "required", got {value!r}')
    return value


def _keepAlive(key: str, value: Any) -> str | int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"{key}: expected a duration such as \"30m\" or seconds, got {value!r}")
    return value


def _fairShare(key: str, value: Any) -> str:
    if value not in FAIR_SHARES:
        allowed = " or ".join(f'"{v}"' for v in FAIR_SHARES)
        raise ConfigError(f"{key}: expected {allowed}, got {value!r}")
    return value


def backendURL(key: str, value: Any) -> str:
    """
    Validate and normalise a backend URL: http or https, a host, no trailing slash.

    @raise ConfigError: naming C{key} when the URL is not usable.
    """
    url = _string(key, value).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: expected an http:// or https:// URL, got {value!r}")
    try:
        parts.port  # noqa: B018 -- urlsplit checks the port only when it is read
    except ValueError:
        raise ConfigError(f"{key}: bad port in {value!r}") from None
    return url


def defaultBackendName(url: str) -> str:
    """
    Name a backend after its host and port, which is what operators recognise.
    """
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def _table(key: str, value: Any, checkers: Mapping[str, Callable[[str, Any], Any]]) -> dict:
    """
    Check a TOML table against its known keys; return the converted values by key.
    """
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table, got {value!r}")
    result = {}
    for name, raw in value.items():
        checker = checkers.get(name)
        if checker is None:
            known = ", ".join(sorted(checkers))
            raise ConfigError(f"{key}.{name}: unknown key (known: {known})")
        result[name] = checker(f"{key}.{name}", raw)
    return result


_SERVER_KEYS: Mapping[str, tuple[str, Callable[[str, Any], Any]]] = {
    "listen": ("listen", _stringList),
    "timeout": ("timeout", _positiveNumber),
    "first_byte_timeout": ("firstByteTimeout", _positiveNumber),
    "health_interval": ("healthInterval", _positiveNumber),
    "down_after": ("downAfter", _positiveInt),
    "down_grace": ("downGrace", _positiveNumber),
    "probe_timeout": ("probeTimeout", _positiveNumber),
    "control": ("control", _string),
    "state": ("state", _string),
    "allow_all_routes": ("allowAllRoutes", _bool),
    "max_queued_per_user": ("maxQueuedPerUser", _positiveInt),
    "max_queued_total": ("maxQueuedTotal", _positiveInt),
    "max_body_bytes": ("maxBodyBytes", _positiveInt),
    "max_blob_bytes": ("maxBlobBytes", _positiveInt),
    "max_queued_per_peer": ("maxQueuedPerPeer", _positiveInt),
    "max_queued_bytes": ("maxQueuedBytes", _positiveInt),
    "max_users": ("maxUsers", _positiveInt),
    "queue_timeout": ("queueTimeout", _positiveNumber),
    "idle_forget": ("idleForget", _positiveNumber),
    "fair_share": ("fairShare", _fairShare),
    "trust_user_header": ("trustUserHeader", _bool),
    "trusted_proxies": ("trustedProxies", _networks),
    "admin_key": ("adminKey", _string),
    "metrics_public": ("metricsPublic", _bool),
    "metrics_top_users": ("metricsTopUsers", _positiveInt),
    "log_retention_days": ("logRetentionDays", _positiveNumber),
    "log_format": ("logFormat", lambda key, value: logFormat(key, value)),
    "auth": ("auth", _authMode),
    "max_requests_per_minute": ("maxRequestsPerMinute", _positiveInt),
    "max_running_per_user": ("maxRunningPerUser", _positiveInt),
    "max_tokens_per_day": ("maxTokensPerDay", _positiveInt),
    "client_timeout": ("clientTimeout", _positiveNumber),
    "max_header_bytes": ("maxHeaderBytes", _positiveInt),
}

LOG_FORMATS = ("text", "json")


def logFormat(key: str, value: Any) -> str:
    """
    Check a log format name (C{text} or C{json}).
    """
    if value not in LOG_FORMATS:
        raise ConfigError(f"{key}: expected one of {', '.join(LOG_FORMATS)}, got {value!r}")
    return value


def _priority(key: str, value: Any) -> str:
    if value not in PRIORITIES:
        raise ConfigError(f"{key}: expected one of {', '.join(PRIORITIES)}, got {value!r}")
    return value


def _users(value: Any) -> dict[str, UserConfig]:
    if not isinstance(value, dict):
        raise ConfigError(f"users: expected a table of users, got {value!r}")
    users = {}
    seenKeys: dict[str, str] = {}
    for userID, table in value.items():
        fields = _table(
            f"users.{userID}",
            table,
            {
                "priority": _priority,
                "weight": _positiveNumber,
                "keys": _keys,
                "max_queued": _positiveInt,
                "max_requests_per_minute": _positiveInt,
                "max_running": _positiveInt,
                "max_tokens_per_day": _positiveInt,
            },
        )
        for name, field in (
            ("max_queued", "maxQueued"),
            ("max_requests_per_minute", "maxRequestsPerMinute"),
            ("max_running", "maxRunning"),
            ("max_tokens_per_day", "maxTokensPerDay"),
        ):
            if name in fields:
                fields[field] = fields.pop(name)
        for bearer in fields.get("keys", ()):
            # Compared as digests, so a key given in the clear to one user and as its
            # digest to another is caught too.
            digest = keyDigest(bearer)
            if digest in seenKeys:
                raise ConfigError(
                    f"users.{userID}.keys: a key is also given to user {seenKeys[digest]!r}"
                )
            seenKeys[digest] = userID
        users[userID] = UserConfig(**fields)
    return users


_ENFORCEABLE = ("num_ctx", "keep_alive")


def _enforce(key: str, value: Any) -> frozenset[str]:
    names = _stringList(key, value)
    for name in names:
        if name not in _ENFORCEABLE:
            raise ConfigError(f"{key}: can enforce only {', '.join(_ENFORCEABLE)}, got {name!r}")
    return frozenset(names)


def _models(value: Any) -> dict[str, ModelRule]:
    if not isinstance(value, dict):
        raise ConfigError(f"models: expected a table of models, got {value!r}")
    rules = {}
    aliasOwner: dict[str, str] = {}
    for name, table in value.items():
        fields = _table(
            f"models.{name!r}",
            table,
            {
                "aliases": _stringList,
                "keep_alive": _keepAlive,
                "num_ctx": _positiveInt,
                "enforce": _enforce,
            },
        )
        rule = ModelRule(
            name=name,
            aliases=fields.get("aliases", ()),
            keepAlive=fields.get("keep_alive"),
            numCtx=fields.get("num_ctx"),
            enforce=fields.get("enforce", frozenset()),
        )
        for option, attribute in (("num_ctx", rule.numCtx), ("keep_alive", rule.keepAlive)):
            if option in rule.enforce and attribute is None:
                raise ConfigError(f"models.{name!r}.enforce: {option} is enforced but not set")
        for alias in rule.aliases:
            folded = alias.lower()
            if folded in aliasOwner:
                raise ConfigError(
                    f"models.{name!r}.aliases: {alias!r} is already an alias of "
                    f"{aliasOwner[folded]!r}"
                )
            aliasOwner[folded] = name
        rules[name] = rule
    return rules


def _backends(value: Any) -> list[BackendConfig]:
    if not isinstance(value, list):
        raise ConfigError(f"backends: expected [[backends]] tables, got {value!r}")
    result = []
    for i, table in enumerate(value):
        fields = _table(
            f"backends[{i}]",
            table,
            {"url": backendURL, "name": _string, "slots": _positiveInt, "api_key": _string},
        )
        if "api_key" in fields:
            fields["apiKey"] = fields.pop("api_key")
        if "url" not in fields:
            raise ConfigError(f"backends[{i}].url: missing")
        fields.setdefault("name", defaultBackendName(fields["url"]))
        result.append(BackendConfig(**fields))
    return result


def parseTOML(text: str, source: str = "config") -> dict[str, Any]:
    """
    Turn the text of a TOML config file into keyword arguments for L{Config}.

    @param source: named in error messages (the file's path).
    @raise ConfigError: for TOML syntax errors, unknown keys and wrong types.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    fields: dict[str, Any] = {}
    for section, value in data.items():
        if section == "server":
            for name, raw in _table("server", value, {k: c for k, (_, c) in _SERVER_KEYS.items()}).items():
                fields[_SERVER_KEYS[name][0]] = raw
        elif section == "backends":
            fields["backends"] = _backends(value)
        elif section == "users":
            fields["users"] = _users(value)
        elif section == "models":
            fields["models"] = _models(value)
        else:
            raise ConfigError(f"{section}: unknown section (known: server, backends, users, models)")
    return fields


def backendsFromURLs(urls: list[str], source: str) -> list[BackendConfig]:
    """
    Backends given as bare URLs (command line or environment), one slot each.
    """
    result = []
    for url in urls:
        url = backendURL(source, url)
        result.append(BackendConfig(url=url, name=defaultBackendName(url)))
    return result


def buildConfig(
    fileFields: Mapping[str, Any],
    cliFields: Mapping[str, Any],
    environ: Mapping[str, str],
) -> Config:
    """
    Merge the three sources into a validated L{Config}.

    @param fileFields: from L{parseTOML}, or empty.
    @param cliFields: L{Config} fields given on the command line (already converted).
    @param environ: the process environment; C{OLLAMA_URLS} (comma-separated) gives backends.
    """
    fields = dict(fileFields)
    envURLs = [u for u in environ.get("OLLAMA_URLS", "").split(",") if u.strip()]
    if envURLs:
        fields["backends"] = backendsFromURLs(envURLs, "OLLAMA_URLS")
    fields.update(cliFields)
    if fields.get("auth") == "required":
        # Required keys must not be sidestepped by a header any local process can send
        # (the default trusted proxy is 127.0.0.1): trusting X-User-ID from a proxy that
        # authenticates users is then an explicit choice.
        fields.setdefault("trustUserHeader", False)
    if not fields.get("backends") and not fields.get("demo"):
        fields["backends"] = backendsFromURLs([DEFAULT_BACKEND], "backend")
    backends = fields.get("backends", ())
    names = [b.name for b in backends]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"backends: duplicate name(s) {', '.join(duplicates)}; set name = ...")
    fields["backends"] = tuple(backends)
    for key in ("listen", "trustedProxies"):
        if key in fields:
            fields[key] = tuple(fields[key])
    return Config(**fields)


def loadConfigFile(path: str) -> dict[str, Any]:
    """
    Read and parse a config file.

    @raise ConfigError: when it cannot be read or is invalid.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config file is not UTF-8 text") from None
    return parseTOML(text, path)

"""Configuration, parsed once at start-up from the environment.

Names follow openai-aca-lb (`BACKEND_{X}_URL`, `_PRIORITY`, `_APIKEY`, `HTTP_TIMEOUT_SECONDS`) so its
users can switch without edits. Every error names the variable at fault, so a bad setting stops
start-up with one readable line instead of a traceback.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from lb.metering.quota import Limit

DEFAULT_TIMEOUT_SECONDS = 100.0
DEFAULT_COOLDOWN_SECONDS = 10.0
MAX_COOLDOWN_SECONDS = 60.0
DEFAULT_STATE_TABLE = "lbcooldowns"
DEFAULT_POOL = "default"
DEFAULT_STATE_REFRESH_MS = 1000
DEFAULT_STATE_HOT_REFRESH_MS = 20
DEFAULT_STATE_CONFIRM_MS = 50
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_BREAKER_FAILURES = 3  # timeouts / 5xx from distinct requests that open a backend's circuit ...
DEFAULT_BREAKER_WINDOW_SECONDS = 30.0  # ... within this long, with no success in between (docs/robustness.md)
DEFAULT_AUTH_COOLDOWN_SECONDS = 300.0  # a backend refusing our credential (401/403) is out this long
DEFAULT_SERVE_MAX_CONNECTIONS = 1000  # `lb serve` only: open client connections; more get a 503
DEFAULT_SERVE_HEAD_TIMEOUT_SECONDS = 10.0  # `lb serve` only: time to send a complete request head
DEFAULT_ENTRA_AUDIENCES = ("https://cognitiveservices.azure.com",)  # what azure-search-openai-demo asks a token for
DEFAULT_ENTRA_AUTHORITY = "https://login.microsoftonline.com"
_GUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# How the balancer weighs backends inside a priority group (lb.routing.balancer): configured weights only, or
# weights times the quota each backend last reported left. `random` stays the default until the
# throttling simulation says otherwise.
POLICIES = ("random", "headroom")
# LB_STREAM_USAGE: a streamed chat's client stream stays as the backend sent it (`as-sent`), or the
# proxy asks the backend for its usage chunk (`include`), which the client then gets too (lb.metering).
STREAM_USAGE_MODES = ("as-sent", "include")
DEFAULT_POLICY = "random"
# Prompt-cache affinity (lb.routing.affinity): a conversation's calls prefer one backend. On by default: in
# `python -m bench affinity` it kept the cached share of prompt tokens near the most the
# conversations allow, at the same client success and load spread as random (docs/affinity.md).
AFFINITY_MODES = ("on", "off")
DEFAULT_AFFINITY = "on"

BACKEND_SETTING_RE = re.compile(r"^BACKEND_([A-Za-z0-9]+)_(URL|PRIORITY|WEIGHT|APIKEY|DEPLOYMENTS|DEPLOYMENT_NAME)$")
# Anything shaped like a backend setting: one the pattern above does not know stops start-up, because a
# misspelt or foreign setting (`BACKEND_1_API_KEY`) silently ignored sends calls where nobody meant.
_ANY_BACKEND_SETTING_RE = re.compile(r"^BACKEND_([A-Za-z0-9]+)_(.+)$")
# A deployment name as Azure allows it (letters, digits, '-', '_', '.'), so a name mapped into a path
# can never add a segment, a query or an escape.
_DEPLOYMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CLIENT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")

# Every fixed-name setting the app reads (the infra tests check Bicep against this list).
SETTING_NAMES = frozenset(
    {
        "HTTP_TIMEOUT_SECONDS",
        "LB_ATTEMPT_TIMEOUT_SECONDS",
        "LB_MAX_ATTEMPTS",
        "LB_DEFAULT_COOLDOWN_SECONDS",
        "LB_MAX_COOLDOWN_SECONDS",
        "LB_MAX_BODY_BYTES",
        "LB_BREAKER_FAILURES",
        "LB_BREAKER_WINDOW_SECONDS",
        "LB_AUTH_COOLDOWN_SECONDS",
        "LB_SERVE_MAX_CONNECTIONS",
        "LB_SERVE_HEAD_TIMEOUT_SECONDS",
        "LB_CLIENT_KEYS",
        "LB_ALLOW_ANONYMOUS",
        "LB_ENTRA_TENANT_ID",
        "LB_ENTRA_AUDIENCES",
        "LB_ENTRA_ALLOWED_CLIENTS",
        "LB_ENTRA_AUTHORITY",
        "LB_STATE_CONNECTION_STRING",
        "LB_STATE_TABLE_ENDPOINT",
        "LB_STATE_TABLE",
        "LB_POOL",
        "LB_STATE_REFRESH_MS",
        "LB_STATE_HOT_REFRESH_MS",
        "LB_STATE_CONFIRM_MS",
        "LB_LOG_LEVEL",
        "LB_POLICY",
        "LB_CLIENT_LIMITS",
        "LB_STREAM_USAGE",
        "LB_AFFINITY",
        "AZURE_CLIENT_ID",
        "AzureWebJobsStorage",
        "AzureWebJobsStorage__accountName",
        "AzureWebJobsStorage__tableServiceUri",
        "AzureWebJobsStorage__credential",
        "AzureWebJobsStorage__clientId",
        "APPLICATIONINSIGHTS_CONNECTION_STRING",
        "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
        "PYTHON_ENABLE_INIT_INDEXING",
        "AzureWebJobsFeatureFlags",
        "FUNCTIONS_WORKER_RUNTIME",
        "WEBSITE_INSTANCE_ID",
    }
)


class ConfigError(Exception):
    """A setting is missing or malformed; the message starts with the variable's name."""


@dataclass(frozen=True)
class Backend:
    """One Azure OpenAI endpoint of the pool.

    `deployments` maps the name clients use to the name this backend calls it (`alias=name` in
    `BACKEND_X_DEPLOYMENTS`; a bare name maps to itself); None serves every deployment. A set of
    names is accepted too and means each name as itself. `deployment_name` is openai-aca-lb's
    `BACKEND_X_DEPLOYMENT_NAME`: the one name this backend is called with for every deployment not
    mapped explicitly.
    """

    name: str
    url: str
    priority: int = 1
    weight: float = 1.0
    api_key: str | None = field(default=None, repr=False)
    deployments: Mapping[str, str] | None = field(default=None, hash=False)
    deployment_name: str | None = None

    def __post_init__(self) -> None:
        if self.deployments is not None and not isinstance(self.deployments, Mapping):
            object.__setattr__(self, "deployments", {name: name for name in self.deployments})
        renames = self.deployment_name is not None or any(a != n for a, n in (self.deployments or {}).items())
        object.__setattr__(self, "_renames", renames)

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    def serves(self, deployment: str | None) -> bool:
        return self.deployments is None or deployment is None or deployment in self.deployments

    def upstream_name(self, deployment: str) -> str:
        """The name this backend knows `deployment` by (the hot path: one attribute when nothing is renamed)."""
        if not self._renames:  # type: ignore[attr-defined]
            return deployment
        if self.deployments is not None and deployment in self.deployments:
            return self.deployments[deployment]
        return self.deployment_name or deployment

    def renamed(self) -> dict[str, str]:
        """Every client name this backend calls by another name (`*` for the catch-all DEPLOYMENT_NAME)."""
        names = {a: n for a, n in (self.deployments or {}).items() if a != n}
        if self.deployment_name is not None and self.deployments is None:
            names["*"] = self.deployment_name
        return names

    def __repr__(self) -> str:  # the key is masked, never printed
        key = "********" if self.api_key else None
        return (
            f"Backend(name={self.name!r}, url={self.url!r}, priority={self.priority}, weight={self.weight}, "
            f"api_key={key!r}, deployments={self.deployments!r}, deployment_name={self.deployment_name!r})"
        )


@dataclass(frozen=True)
class ClientKey:
    """One of `LB_CLIENT_KEYS`: `name:key`, or a bare key named by its position (`key1`, `key2`, ...).

    The name is the client's identity wherever the proxy needs one (who created a stored object,
    whose quota a call spends); the key itself is never printed.
    """

    name: str
    key: str = field(repr=False)


@dataclass(frozen=True)
class StateSettings:
    """Where the shared cooldown state lives; all None means in-memory (one instance)."""

    connection_string: str | None = field(default=None, repr=False)
    table_endpoint: str | None = None
    table: str = DEFAULT_STATE_TABLE
    pool: str = DEFAULT_POOL
    refresh_ms: int = DEFAULT_STATE_REFRESH_MS
    hot_refresh_ms: int = DEFAULT_STATE_HOT_REFRESH_MS  # under throttling: the oldest view a request is routed on
    confirm_ms: int = DEFAULT_STATE_CONFIRM_MS  # ... and the most it waits for a fresher one (0: never)

    @property
    def kind(self) -> str:
        return "table" if (self.connection_string or self.table_endpoint) else "memory"


@dataclass(frozen=True)
class EntraSettings:
    """Which Microsoft Entra ID bearer tokens a client may call with (instead of a shared key)."""

    tenant_id: str
    audiences: tuple[str, ...] = DEFAULT_ENTRA_AUDIENCES
    allowed_clients: frozenset[str] | None = None  # app / object ids; None = any identity of the tenant
    authority: str = DEFAULT_ENTRA_AUTHORITY

    @property
    def issuers(self) -> tuple[str, str]:
        """v1 tokens (what a managed identity gets for a resource) and v2 tokens name different issuers."""
        return (
            f"https://sts.windows.net/{self.tenant_id}/",
            f"https://login.microsoftonline.com/{self.tenant_id}/v2.0",
        )

    @property
    def openid_configuration_url(self) -> str:
        return f"{self.authority}/{self.tenant_id}/v2.0/.well-known/openid-configuration"


@dataclass(frozen=True)
class Settings:
    backends: tuple[Backend, ...]
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    attempt_timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS / 2  # while another backend could still answer
    max_attempts: int = 1
    default_cooldown_seconds: float = DEFAULT_COOLDOWN_SECONDS
    max_cooldown_seconds: float = MAX_COOLDOWN_SECONDS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    breaker_failures: int = DEFAULT_BREAKER_FAILURES
    breaker_window_seconds: float = DEFAULT_BREAKER_WINDOW_SECONDS
    auth_cooldown_seconds: float = DEFAULT_AUTH_COOLDOWN_SECONDS
    serve_max_connections: int = DEFAULT_SERVE_MAX_CONNECTIONS
    serve_head_timeout_seconds: float = DEFAULT_SERVE_HEAD_TIMEOUT_SECONDS
    client_keys: tuple[ClientKey, ...] = field(default=(), repr=False)
    entra: EntraSettings | None = None
    state: StateSettings = field(default_factory=StateSettings)
    on_azure: bool = False
    policy: str = DEFAULT_POLICY
    client_limits: dict[str, Limit] = field(default_factory=dict)  # LB_CLIENT_LIMITS, by client name
    stream_usage: str = "as-sent"  # LB_STREAM_USAGE: "include": chat streams' clients get the usage chunk
    reserve_tokens: dict[str, int] = field(default_factory=dict)  # LB_RESERVE_TOKENS, by deployment ("*": any)
    affinity: bool = DEFAULT_AFFINITY == "on"

    @property
    def anonymous(self) -> bool:
        return not self.client_keys and self.entra is None


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting; raise ConfigError naming the first bad one."""
    env = os.environ if environ is None else environ
    backends = _load_backends(env)
    on_azure = bool(env.get("WEBSITE_INSTANCE_ID"))
    client_keys = _client_keys(env)
    entra = _load_entra(env)
    if on_azure and not client_keys and entra is None and not _flag(env, "LB_ALLOW_ANONYMOUS"):
        raise ConfigError(
            "LB_CLIENT_KEYS: required when running on Azure (set it or LB_ENTRA_TENANT_ID,"
            " or LB_ALLOW_ANONYMOUS=true to serve anyone)"
        )
    default_cooldown = _number(env, "LB_DEFAULT_COOLDOWN_SECONDS", DEFAULT_COOLDOWN_SECONDS, minimum=0.0)
    max_cooldown = _number(env, "LB_MAX_COOLDOWN_SECONDS", MAX_COOLDOWN_SECONDS, minimum=0.0)
    if default_cooldown > max_cooldown:
        raise ConfigError(
            f"LB_DEFAULT_COOLDOWN_SECONDS: {default_cooldown:g} is above LB_MAX_COOLDOWN_SECONDS ({max_cooldown:g})"
        )
    timeout = _number(env, "HTTP_TIMEOUT_SECONDS", DEFAULT_TIMEOUT_SECONDS, minimum=0.001)
    return Settings(
        backends=backends,
        timeout_seconds=timeout,
        attempt_timeout_seconds=_number(env, "LB_ATTEMPT_TIMEOUT_SECONDS", timeout / 2, minimum=0.001),
        max_attempts=int(_number(env, "LB_MAX_ATTEMPTS", len(backends), minimum=1, integer=True)),
        default_cooldown_seconds=default_cooldown,
        max_cooldown_seconds=max_cooldown,
        max_body_bytes=int(_number(env, "LB_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, minimum=1, integer=True)),
        breaker_failures=int(_number(env, "LB_BREAKER_FAILURES", DEFAULT_BREAKER_FAILURES, minimum=1, integer=True)),
        breaker_window_seconds=_number(env, "LB_BREAKER_WINDOW_SECONDS", DEFAULT_BREAKER_WINDOW_SECONDS, minimum=0.0),
        auth_cooldown_seconds=_number(env, "LB_AUTH_COOLDOWN_SECONDS", DEFAULT_AUTH_COOLDOWN_SECONDS, minimum=0.0),
        serve_max_connections=int(
            _number(env, "LB_SERVE_MAX_CONNECTIONS", DEFAULT_SERVE_MAX_CONNECTIONS, minimum=1, integer=True)
        ),
        serve_head_timeout_seconds=_number(
            env, "LB_SERVE_HEAD_TIMEOUT_SECONDS", DEFAULT_SERVE_HEAD_TIMEOUT_SECONDS, minimum=0.001
        ),
        client_keys=client_keys,
        entra=entra,
        state=_load_state(env),
        on_azure=on_azure,
        policy=_policy(env),
        client_limits=_client_limits(env, client_keys, entra),
        stream_usage=_choice(env, "LB_STREAM_USAGE", STREAM_USAGE_MODES),
        reserve_tokens=_reservations(env),
        affinity=_affinity(env),
    )


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    """One of `choices` (the first is the default), case-insensitive."""
    raw = env.get(name, "").strip()
    if not raw:
        return choices[0]
    if raw.lower() not in choices:
        raise ConfigError(f"{name}: {raw!r} is not one of {', '.join(choices)}")
    return raw.lower()


def _reservations(env: Mapping[str, str]) -> dict[str, int]:
    from lb.metering.quota import parse_reservations  # lb.metering.quota imports this module

    return parse_reservations(env.get("LB_RESERVE_TOKENS", ""))


def _client_limits(
    env: Mapping[str, str], client_keys: tuple[Any, ...], entra: EntraSettings | None
) -> dict[str, Limit]:
    """LB_CLIENT_LIMITS, each name one a configured key or an accepted Entra client could have."""
    from lb.metering.quota import parse_limits  # here, not at the top: lb.metering.quota imports this module

    limits = parse_limits(env.get("LB_CLIENT_LIMITS", ""))
    key_names = {getattr(k, "name", None) or f"key{i}" for i, k in enumerate(client_keys, start=1)}
    checked: dict[str, Limit] = {}
    for name, limit in limits.items():
        if name in key_names:
            checked[name] = limit
        elif entra is not None and _GUID_RE.fullmatch(name):  # Entra app ids come lower-cased
            if entra.allowed_clients is not None and name.lower() not in entra.allowed_clients:
                raise ConfigError(f"LB_CLIENT_LIMITS: {name!r} is not one of LB_ENTRA_ALLOWED_CLIENTS")
            checked[name.lower()] = limit
        elif not client_keys and entra is None and name == "anonymous":  # local runs without keys
            checked[name] = limit
        else:
            raise ConfigError(
                f"LB_CLIENT_LIMITS: no client can be named {name!r} (not a key name of LB_CLIENT_KEYS"
                " nor an Entra app id LB_ENTRA_ALLOWED_CLIENTS accepts)"
            )
    return checked


def _policy(env: Mapping[str, str]) -> str:
    raw = env.get("LB_POLICY", "").strip()
    if not raw:
        return DEFAULT_POLICY
    if raw.lower() not in POLICIES:
        raise ConfigError(f"LB_POLICY: {raw!r} is not one of {', '.join(POLICIES)}")
    return raw.lower()


def _affinity(env: Mapping[str, str]) -> bool:
    raw = env.get("LB_AFFINITY", "").strip()
    if not raw:
        return DEFAULT_AFFINITY == "on"
    if raw.lower() not in AFFINITY_MODES:
        raise ConfigError(f"LB_AFFINITY: {raw!r} is not one of {', '.join(AFFINITY_MODES)}")
    return raw.lower() == "on"


def _client_keys(env: Mapping[str, str]) -> tuple[ClientKey, ...]:
    """`LB_CLIENT_KEYS=chatapp:KEY1,batch:KEY2,KEY3`: the one parser of client names (KEY3 is `key3`)."""
    keys: list[ClientKey] = []
    for position, item in enumerate((i.strip() for i in env.get("LB_CLIENT_KEYS", "").split(",")), start=1):
        if not item:
            continue
        name, sep, key = item.partition(":")
        if not sep:
            name, key = f"key{position}", item
        name, key = name.strip(), key.strip()
        if not _CLIENT_NAME_RE.fullmatch(name) or not key:
            raise ConfigError(
                f"LB_CLIENT_KEYS: item {position} is not `key` or `name:key` (name: letters, digits, ._@-)"
            )
        if any(k.name == name for k in keys):
            raise ConfigError(f"LB_CLIENT_KEYS: the name {name!r} is used twice")
        keys.append(ClientKey(name, key))
    return tuple(keys)


def _deployments(env: Mapping[str, str], name: str, default_name: str | None) -> dict[str, str] | None:
    """`chat=gpt4o-eastus,embedding=emb3,other`: client name -> this backend's name (bare: the same,
    or `default_name` when BACKEND_X_DEPLOYMENT_NAME is set)."""
    raw = env.get(name, "").strip()
    if not raw:
        return None
    mapping: dict[str, str] = {}
    for item in (i.strip() for i in raw.split(",")):
        if not item:
            continue
        alias, sep, upstream = (part.strip() for part in item.partition("="))
        upstream = upstream if sep else (default_name or alias)
        if not _DEPLOYMENT_RE.fullmatch(alias) or not _DEPLOYMENT_RE.fullmatch(upstream):
            raise ConfigError(
                f"{name}: {item!r} is not `name` or `alias=name` (deployment names: letters, digits, '-', '_', '.')"
            )
        if mapping.get(alias, upstream) != upstream:
            raise ConfigError(f"{name}: {alias!r} is mapped twice")
        mapping[alias] = upstream
    return mapping or None


def _load_backends(env: Mapping[str, str]) -> tuple[Backend, ...]:
    for key in sorted(env):
        if _ANY_BACKEND_SETTING_RE.match(key) and not BACKEND_SETTING_RE.match(key):
            raise ConfigError(
                f"{key}: unknown backend setting (known: BACKEND_X_URL, _PRIORITY, _WEIGHT, _APIKEY, _DEPLOYMENTS,"
                " _DEPLOYMENT_NAME)"
            )
    names = sorted(
        {m.group(1) for key in env if (m := BACKEND_SETTING_RE.match(key))},
        key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n),
    )
    backends = []
    for name in names:
        prefix = f"BACKEND_{name}_"
        url = _url(env, prefix + "URL")
        deployment_name = env.get(prefix + "DEPLOYMENT_NAME", "").strip() or None
        if deployment_name is not None and not _DEPLOYMENT_RE.fullmatch(deployment_name):
            raise ConfigError(f"{prefix}DEPLOYMENT_NAME: {deployment_name!r} is not a deployment name")
        backends.append(
            Backend(
                name=name,
                url=url,
                priority=int(_number(env, prefix + "PRIORITY", 1, integer=True)),
                weight=_number(env, prefix + "WEIGHT", 1.0, minimum=0.0),
                api_key=env.get(prefix + "APIKEY", "").strip() or None,
                deployments=_deployments(env, prefix + "DEPLOYMENTS", deployment_name),
                deployment_name=deployment_name,
            )
        )
    if not backends:
        raise ConfigError("BACKEND_1_URL: no backend configured (set BACKEND_1_URL=https://<account>.openai.azure.com)")
    if all(b.weight == 0 for b in backends):
        raise ConfigError(f"BACKEND_{backends[0].name}_WEIGHT: every backend has weight 0")
    return tuple(backends)


def _load_entra(env: Mapping[str, str]) -> EntraSettings | None:
    """Entra ID inbound auth is on when a tenant is named; the other LB_ENTRA_* settings need it."""
    tenant = env.get("LB_ENTRA_TENANT_ID", "").strip()
    if not tenant:
        for name in ("LB_ENTRA_AUDIENCES", "LB_ENTRA_ALLOWED_CLIENTS", "LB_ENTRA_AUTHORITY"):
            if env.get(name, "").strip():
                raise ConfigError(f"{name}: needs LB_ENTRA_TENANT_ID (the tenant whose tokens are accepted)")
        return None
    if not _GUID_RE.fullmatch(tenant):
        # Tokens name the tenant by its GUID in `iss` and `tid`, so a domain name could never match.
        raise ConfigError(f"LB_ENTRA_TENANT_ID: {tenant!r} is not a tenant id (a GUID, Entra ID > Overview)")
    audiences = tuple(a.strip() for a in env.get("LB_ENTRA_AUDIENCES", "").split(",") if a.strip())
    clients = frozenset(c.strip().lower() for c in env.get("LB_ENTRA_ALLOWED_CLIENTS", "").split(",") if c.strip())
    for client in clients:
        if not _GUID_RE.fullmatch(client):
            raise ConfigError(f"LB_ENTRA_ALLOWED_CLIENTS: {client!r} is not an app or object id (a GUID)")
    authority = DEFAULT_ENTRA_AUTHORITY
    if env.get("LB_ENTRA_AUTHORITY", "").strip():
        authority = _url(env, "LB_ENTRA_AUTHORITY")
    return EntraSettings(
        tenant_id=tenant.lower(),
        audiences=audiences or DEFAULT_ENTRA_AUDIENCES,
        allowed_clients=clients or None,
        authority=authority,
    )


def _load_state(env: Mapping[str, str]) -> StateSettings:
    connection_string = env.get("LB_STATE_CONNECTION_STRING", "").strip() or None
    endpoint = env.get("LB_STATE_TABLE_ENDPOINT", "").strip() or None
    if not connection_string and not endpoint:
        # Fall back to the Function's own storage: a connection string, or the identity-based form.
        host_storage = env.get("AzureWebJobsStorage", "").strip()
        if host_storage:
            connection_string = host_storage
        elif env.get("AzureWebJobsStorage__tableServiceUri", "").strip():
            endpoint = env["AzureWebJobsStorage__tableServiceUri"].strip()
        elif env.get("AzureWebJobsStorage__accountName", "").strip():
            endpoint = f"https://{env['AzureWebJobsStorage__accountName'].strip()}.table.core.windows.net"
    if endpoint:
        _url(env, "LB_STATE_TABLE_ENDPOINT", endpoint)
    table = env.get("LB_STATE_TABLE", DEFAULT_STATE_TABLE).strip() or DEFAULT_STATE_TABLE
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{2,62}", table):
        raise ConfigError(f"LB_STATE_TABLE: {table!r} is not a valid table name (3-63 letters or digits)")
    pool = env.get("LB_POOL", DEFAULT_POOL).strip() or DEFAULT_POOL
    if re.search(r"[/\\#?\x00-\x1f]", pool):
        raise ConfigError(f"LB_POOL: {pool!r} may not contain / \\ # ? or control characters")
    refresh_ms = int(_number(env, "LB_STATE_REFRESH_MS", DEFAULT_STATE_REFRESH_MS, minimum=1, integer=True))
    hot_refresh_ms = int(_number(env, "LB_STATE_HOT_REFRESH_MS", DEFAULT_STATE_HOT_REFRESH_MS, minimum=1, integer=True))
    confirm_ms = int(_number(env, "LB_STATE_CONFIRM_MS", DEFAULT_STATE_CONFIRM_MS, minimum=0, integer=True))
    return StateSettings(
        connection_string=connection_string,
        table_endpoint=endpoint,
        table=table,
        pool=pool,
        refresh_ms=refresh_ms,
        hot_refresh_ms=min(refresh_ms, hot_refresh_ms),
        confirm_ms=confirm_ms,
    )


def _url(env: Mapping[str, str], name: str, value: str | None = None) -> str:
    raw = (env.get(name, "") if value is None else value).strip()
    if not raw:
        raise ConfigError(f"{name}: is empty")
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{name}: {raw!r} must start with https:// (or http:// for a local endpoint)")
    if not parts.hostname:
        raise ConfigError(f"{name}: {raw!r} has no host")
    if parts.query or parts.fragment:
        raise ConfigError(f"{name}: {raw!r} must not have a query or fragment")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} has an invalid port") from None
    return raw.rstrip("/")


def _number(
    env: Mapping[str, str], name: str, default: float, *, minimum: float | None = None, integer: bool = False
) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise ConfigError(f"{name}: {raw!r} is not {kind}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name}: {raw!r} is not a finite number")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}: {raw!r} must be at least {minimum:g}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")

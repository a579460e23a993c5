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
from typing import TYPE_CHECKING, Literal, TypeVar, get_args
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from lb.metering.quota import Limit

DEFAULT_TIMEOUT_SECONDS = 100.0  # the wait for an answer's head, then the longest silence in its body
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
# What clients ask a token for: azure-search-openai-demo `https://cognitiveservices.azure.com/.default`;
# Learn's /openai/v1 samples `https://ai.azure.com/.default` (docs/deployment.md cites both).
DEFAULT_ENTRA_AUDIENCES = ("https://cognitiveservices.azure.com", "https://ai.azure.com")
DEFAULT_ENTRA_AUTHORITY = "https://login.microsoftonline.com"
_GUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# How the balancer weighs backends inside a priority group (lb.routing.balancer): configured weights only, or
# weights times the quota each backend last reported left. `random` stays the default until the
# throttling simulation says otherwise.
Policy = Literal["random", "headroom"]
POLICIES: tuple[Policy, ...] = get_args(Policy)
# LB_STREAM_USAGE: a streamed chat's client stream stays as the backend sent it (`as-sent`), or the
# proxy asks the backend for its usage chunk (`include`), which the client then gets too (lb.metering).
StreamUsage = Literal["as-sent", "include"]
STREAM_USAGE_MODES: tuple[StreamUsage, ...] = get_args(StreamUsage)
DEFAULT_POLICY: Policy = "random"
# Prompt-cache affinity (lb.routing.affinity): the calls of a conversation whose prompt Azure can cache
# (estimated 1,024 tokens or more) prefer one backend; shorter calls are picked as with `off`. On by
# default because it raises the cached share of prompt tokens at the same client success, and a hard
# load bound keeps every backend near its fair share whatever keys clients send (figures: docs/affinity.md).
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
        "LB_TOTAL_TIMEOUT_SECONDS",
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
        "LB_ADMIN_CLIENTS",
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


def is_guid(text: str) -> bool:
    """Entra names tenants, apps and principals (`oid`) by GUIDs."""
    return _GUID_RE.fullmatch(text) is not None


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
    allowed_clients: frozenset[str] | None = None  # object ids (`oid`), lower-cased; None = any identity of the tenant
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
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS  # head: wall-clock from the first byte; body: silence
    total_timeout_seconds: float | None = None  # LB_TOTAL_TIMEOUT_SECONDS: a whole call, last byte included; off
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
    policy: Policy = DEFAULT_POLICY
    client_limits: dict[str, Limit] = field(default_factory=dict)  # LB_CLIENT_LIMITS, by client name
    admin_clients: frozenset[str] = frozenset()  # LB_ADMIN_CLIENTS: names that may read /lb/status, all /lb/usage
    stream_usage: StreamUsage = "as-sent"  # LB_STREAM_USAGE: "include" asks chat streams for their usage chunk
    reserve_tokens: dict[str, int] = field(default_factory=dict)  # LB_RESERVE_TOKENS, by deployment ("*": any)
    affinity: bool = DEFAULT_AFFINITY == "on"
    object_lookup: bool = False  # LB_OBJECT_LOOKUP: with several clients, ids without a record are looked up

    @property
    def anonymous(self) -> bool:
        return not self.client_keys and self.entra is None

    @property
    def isolating(self) -> bool:
        """Several clients share the pool, so each one's stored objects must be its own."""
        return len(self.client_keys) > 1 or self.entra is not None


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting; raise ConfigError naming the first bad one."""
    env = os.environ if environ is None else environ
    backends = _load_backends(env)
    on_azure = bool(env.get("WEBSITE_INSTANCE_ID"))
    client_keys = _client_keys(env)
    entra = _load_entra(env)
    for key in client_keys if entra is not None else ():
        if _GUID_RE.fullmatch(key.name):  # limits, operators and usage name clients by name alone
            raise ConfigError(
                f"LB_CLIENT_KEYS: the name {key.name!r} is shaped like an Entra object id; with LB_ENTRA_TENANT_ID"
                " set, give keys names that are not GUIDs"
            )
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
        total_timeout_seconds=_total_timeout(env, timeout),
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
        policy=_choice(env, "LB_POLICY", POLICIES),  # the first, random, is the default
        client_limits=_client_limits(env, client_keys, entra),
        admin_clients=frozenset(_client_name("LB_ADMIN_CLIENTS", n, client_keys, entra) for n in _admin_names(env)),
        stream_usage=_choice(env, "LB_STREAM_USAGE", STREAM_USAGE_MODES),
        reserve_tokens=_reservations(env),
        affinity=_affinity(env),
        object_lookup=_choice(env, "LB_OBJECT_LOOKUP", ("off", "on")) == "on",
    )


def _total_timeout(env: Mapping[str, str], timeout: float) -> float | None:
    """LB_TOTAL_TIMEOUT_SECONDS: unset or 0 is off (a flowing answer is never cut). It can't be below
    HTTP_TIMEOUT_SECONDS, which the wait for an answer's head alone may take."""
    total = _number(env, "LB_TOTAL_TIMEOUT_SECONDS", 0.0, minimum=0.0)
    if not total:
        return None
    if total < timeout:
        raise ConfigError(
            f"LB_TOTAL_TIMEOUT_SECONDS: {total:g} is below HTTP_TIMEOUT_SECONDS ({timeout:g}), which the wait"
            " for an answer's head alone may take"
        )
    return total


_Word = TypeVar("_Word", bound=str)


def _choice(env: Mapping[str, str], name: str, choices: tuple[_Word, ...]) -> _Word:
    """One of `choices` (the first is the default), case-insensitive."""
    raw = env.get(name, "").strip()
    if not raw:
        return choices[0]
    for choice in choices:
        if raw.lower() == choice:
            return choice
    raise ConfigError(f"{name}: {raw!r} is not one of {', '.join(choices)}")


def _reservations(env: Mapping[str, str]) -> dict[str, int]:
    from lb.metering.quota import parse_reservations  # lb.metering.quota imports this module

    return parse_reservations(env.get("LB_RESERVE_TOKENS", ""))


def _client_limits(
    env: Mapping[str, str], client_keys: tuple[ClientKey, ...], entra: EntraSettings | None
) -> dict[str, Limit]:
    """LB_CLIENT_LIMITS, each name one a configured key or an accepted Entra client could have."""
    from lb.metering.quota import parse_limits  # here, not at the top: lb.metering.quota imports this module

    limits = parse_limits(env.get("LB_CLIENT_LIMITS", ""))
    anonymous = not client_keys and entra is None
    checked: dict[str, Limit] = {}
    for name, limit in limits.items():
        if anonymous and name == "anonymous":  # local runs without keys
            checked[name] = limit
        else:
            checked[_client_name("LB_CLIENT_LIMITS", name, client_keys, entra)] = limit
    return checked


def _client_name(variable: str, name: str, client_keys: tuple[ClientKey, ...], entra: EntraSettings | None) -> str:
    """The name a client can be called by, as lb.auth names it, or ConfigError naming `variable`.

    A key is named by `LB_CLIENT_KEYS` (`key<n>` when unnamed), an Entra client by its token's `oid`
    (lower-cased). A name neither could ever be stops start-up: a limit or an operator right given
    to nobody is a setting that silently does nothing.
    """
    if any(k.name == name for k in client_keys):
        return name
    if entra is not None and _GUID_RE.fullmatch(name):
        if entra.allowed_clients is not None and name.lower() not in entra.allowed_clients:
            raise ConfigError(
                f"{variable}: {name!r} is not one of LB_ENTRA_ALLOWED_CLIENTS (whose tokens alone are accepted)"
            )
        return name.lower()
    if not client_keys and entra is None:
        why = "LB_CLIENT_KEYS and LB_ENTRA_TENANT_ID are unset: every caller is anonymous"
    elif entra is None:
        why = "not a key name of LB_CLIENT_KEYS"
    else:
        why = "neither a key name of LB_CLIENT_KEYS nor an Entra object id, oid"
    raise ConfigError(f"{variable}: no client can be named {name!r} ({why})")


def _admin_names(env: Mapping[str, str]) -> list[str]:
    return [n.strip() for n in env.get("LB_ADMIN_CLIENTS", "").split(",") if n.strip()]


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
            raise ConfigError(f"LB_ENTRA_ALLOWED_CLIENTS: {client!r} is not an object id (oid, a GUID)")
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

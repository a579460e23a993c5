"""Who may call the proxy, and how the proxy proves itself to each backend.

Inbound: a client sends one of `LB_CLIENT_KEYS` as `api-key` or `Authorization: Bearer` (the two
ways the openai SDK sends a key), compared in constant time; or, with `LB_ENTRA_TENANT_ID`, an
Entra ID token as `Authorization: Bearer` (what the openai SDK sends with `azure_ad_token_provider`),
checked by `lb.auth.entra`. A bearer that looks like a JWT is validated as a token, anything else as a
key. LlamaIndex's Azure classes with `use_azure_ad=True` send the token twice, as `api-key` and as
`Authorization: Bearer`: when `api-key` is that very bearer it is the token, validated as one (and
refused as one if it fails: it never gets a second chance as a key). An `api-key` that differs from the
bearer is a key and is checked as one, as before. Whatever was presented is never forwarded, logged or
echoed.

Outbound: a backend with `BACKEND_X_APIKEY` gets that key as `api-key`; the others get an Entra ID
token for Cognitive Services from DefaultAzureCredential (managed identity on Azure, `az login`
locally). The token is cached and refreshed in the background shortly before it expires, so no
request waits on Entra except the very first (bounded by its deadline); see `BackendAuth`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lb.auth.entra import EntraValidator, InvalidToken, looks_like_jwt, principal
from lb.config import Backend, ClientKey, EntraSettings
from lb.errors import BackendCredentialUnavailable, Unauthorized

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential

COGNITIVE_SCOPE = "https://cognitiveservices.azure.com/.default"
REFRESH_MARGIN_SECONDS = 300.0  # refresh this long before expiry, as azure-identity's own policy does
USABLE_MARGIN_SECONDS = 30.0  # a token closer to its expiry than this is not sent (it could lapse in flight)
RETRY_SECONDS = 10.0  # after a failed fetch, calls fail at once for this long instead of each waiting on Entra

log = logging.getLogger("lb")

# Headers that carry the client's credentials: checked here, never sent upstream.
CREDENTIAL_HEADERS = frozenset({"api-key", "authorization", "x-functions-key", "ocp-apim-subscription-key"})


@dataclass(frozen=True)
class Client:
    """Who is calling: the name of the key it sent (`LB_CLIENT_KEYS`), or its Entra ID object id (`oid`).

    `id` is the identity everything per-client keys on (stored objects' owners, quotas); the two
    kinds are prefixed so a key named like an object id can never pass for that identity.
    """

    name: str
    kind: str  # "key", "entra" or "anonymous"

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"


ANONYMOUS = Client("anonymous", "anonymous")


class ClientAuth:
    def __init__(self, keys: tuple[ClientKey | str, ...], entra: EntraSettings | EntraValidator | None = None) -> None:
        named = [k if isinstance(k, ClientKey) else ClientKey(f"key{i}", k) for i, k in enumerate(keys, start=1)]
        self._names = tuple(k.name for k in named)
        self._keys = tuple(k.key.encode() for k in named)
        self.entra = EntraValidator(entra) if isinstance(entra, EntraSettings) else entra

    @property
    def enabled(self) -> bool:
        return bool(self._keys) or self.entra is not None

    async def check(self, api_key: str | None, authorization: str | None) -> Client:
        """The calling client; raise Unauthorized unless a configured key or a valid Entra token was presented."""
        if not self.enabled:
            return ANONYMOUS
        bearer = None
        if authorization:
            scheme, _, rest = authorization.strip().partition(" ")
            if scheme.lower() == "bearer":
                bearer = rest.strip()
        if self.entra is not None and bearer and looks_like_jwt(bearer) and _no_other_key(api_key, bearer):
            try:
                return Client(principal(await self.entra.validate(bearer)), "entra")  # its `oid`: lb.auth.entra
            except InvalidToken as exc:
                raise Unauthorized(str(exc), error="invalid_token") from None
        presented = api_key if api_key is not None else bearer
        if not presented:
            raise Unauthorized(self._missing_message())
        if not self._keys:  # Entra ID only, and what came is no JWT
            raise Unauthorized("Access denied: the bearer is not an Entra ID access token.", error="invalid_token")
        matched = self._matches(presented.encode())
        if matched is None:
            raise Unauthorized("Access denied due to invalid subscription key.", error="invalid_token")
        return Client(self._names[matched], "key")

    def _matches(self, candidate: bytes) -> int | None:
        # Compare against every key so timing does not reveal which one (or whether any) matched.
        matched = None
        for i, key in enumerate(self._keys):
            if hmac.compare_digest(candidate, key):
                matched = i
        return matched

    def _missing_message(self) -> str:
        if self._keys and self.entra is not None:
            return "Access denied: send a key as 'api-key' header or an Entra ID token as 'Authorization: Bearer'."
        if self.entra is not None:
            return "Access denied: send an Entra ID token as 'Authorization: Bearer'."
        return "Access denied due to missing subscription key. Send a key as 'api-key' header."


def _no_other_key(api_key: str | None, bearer: str) -> bool:
    """Whether the call carries no key besides its bearer: no `api-key`, or the bearer itself again."""
    return api_key is None or hmac.compare_digest(api_key.encode(), bearer.encode())


class BackendAuth:
    """Outbound credential headers per backend; one cached Entra token for all keyless backends.

    No request waits on Entra once a token is in hand: `REFRESH_MARGIN_SECONDS` before it expires a
    request starts a refresh in the background and is served with the token it has. Only the first
    fetch (or one after the token expired) is waited on, and only until the request's deadline. A
    failing fetch is logged once per outage, kept for `RETRY_SECONDS` (the calls in between fail at
    once rather than each waiting on Entra) and answered as `BackendCredentialUnavailable`: it is the
    balancer's credential, not the backend, so no backend is cooled or suspected for it.
    """

    def __init__(self, credential: AsyncTokenCredential | None = None) -> None:
        self._credential = credential
        self._token: str | None = None
        self._expires_on = 0.0
        self._task: asyncio.Task[None] | None = None  # the fetch in flight, shared by every caller
        self._error: str | None = None  # the last fetch's failure, while the outage lasts
        self._failed_at = -math.inf  # monotonic

    async def headers(self, backend: Backend, deadline: float | None = None) -> dict[str, str]:
        """`deadline` (monotonic): how long a request may wait for a token it has none of."""
        if backend.api_key:
            return {"api-key": backend.api_key}
        return {"authorization": f"Bearer {await self._bearer(deadline)}"}

    async def _bearer(self, deadline: float | None) -> str:
        now = time.time()
        if self._token is not None and now < self._expires_on - USABLE_MARGIN_SECONDS:
            if now >= self._expires_on - REFRESH_MARGIN_SECONDS and self._may_fetch():
                self._refresh()  # in the background: this request goes on with the token in hand
            return self._token
        if self._may_fetch():
            self._refresh()
        if self._task is not None and not self._task.done():
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                raise BackendCredentialUnavailable(
                    "The load balancer got no Entra ID token for the backends in time. Your key was accepted."
                ) from None
        if self._token is not None and time.time() < self._expires_on - USABLE_MARGIN_SECONDS:
            return self._token
        raise BackendCredentialUnavailable(
            "The load balancer could not get its own Entra ID token for the backends (its operator can see"
            f" why in its log: {self._error or 'no token'}). Your key was accepted."
        )

    def _may_fetch(self) -> bool:
        in_flight = self._task is not None and not self._task.done()
        return not in_flight and time.monotonic() - self._failed_at >= RETRY_SECONDS

    def _refresh(self) -> None:
        self._task = asyncio.ensure_future(self._fetch())

    async def _fetch(self) -> None:
        try:
            if self._credential is None:
                from azure.identity.aio import DefaultAzureCredential  # only keyless pools pay for the import

                self._credential = DefaultAzureCredential()
            token = await self._credential.get_token(COGNITIVE_SCOPE)
        except Exception as exc:  # never raised into a task nobody awaits: kept and logged once
            self._failed_at = time.monotonic()
            first = self._error is None
            self._error = type(exc).__name__
            if first:
                log.error(
                    "the load balancer's Entra ID token for the backends could not be fetched (%s: %s); keyless"
                    " backends are called with the token in hand until it expires, then answered 503",
                    type(exc).__name__,
                    str(exc)[:200],
                )
            return
        if self._error is not None:
            log.warning("the load balancer's Entra ID token for the backends is fetched again")
        self._token, self._expires_on = token.token, float(token.expires_on)
        self._error, self._failed_at = None, -math.inf

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._credential is not None and hasattr(self._credential, "close"):
            await self._credential.close()

"""Validating Microsoft Entra ID bearer tokens sent by clients (e.g. the chat app's managed identity).

A token is accepted when PyJWT verifies its RS256 signature against one of the tenant's published
keys and its issuer (v1 `sts.windows.net` or v2 `login.microsoftonline.com`), audience, expiry and
not-before, and, when `LB_ENTRA_ALLOWED_CLIENTS` is set, its `oid` is listed.

A client is named by one claim, `oid`: the object id of the principal the token was issued to (the
service principal of an app or managed identity for app-only tokens, the user for delegated ones).
It is what operators see in the portal and `azd env` (`..._PRINCIPAL_ID`), allow-list, limit and
make operators of, so one name means the same identity everywhere. The app id (`appid` / `azp`)
names the application, which all its users share, so it is never a client's name.

The keys come from the tenant's OpenID configuration (`jwks_uri`) and are cached. Entra rotates
keys and announces new ones before signing with them, so an unknown `kid` triggers one refetch,
but at most once per `refetch_interval` however many bogus kids arrive, and concurrent requests
share one fetch. Everything stays async: a fetch never blocks the event loop (PyJWKClient would).
A fetch uses a short-lived httpx client: fetches are rare (start-up, rotation, once a day).

No request waits for the daily refresh: once the keys are `KEYS_REFRESH_AFTER_SECONDS` old, a
request starts a refresh in the background and is served with the keys in hand. A refresh that
fails keeps the old keys and is retried every `refetch_interval`, logged once per outage, for
`KEYS_GRACE_SECONDS` past the keys' day; after that they are dropped (Entra may have withdrawn one
of them) and tokens are refused until the tenant answers again. Only a token signed with a key not
seen yet (or the very first one) waits for a fetch, at most `FETCH_TIMEOUT_SECONDS`, wall-clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt

from lb.config import EntraSettings, is_guid
from lb.upstream import tls_context

log = logging.getLogger("lb")

ALGORITHMS = ["RS256"]  # what Entra signs access tokens with; never "none" nor HMAC (key-confusion)
KEYS_MAX_AGE_SECONDS = 24 * 3600.0  # refetch the key set at least daily, as Microsoft recommends
KEYS_REFRESH_AFTER_SECONDS = 23 * 3600.0  # ... starting an hour early, in the background
KEYS_GRACE_SECONDS = 24 * 3600.0  # an unreachable tenant: its last keys still trusted this long past their day
REFETCH_INTERVAL_SECONDS = 60.0  # unknown kids cannot make us call the IdP more often than this
FETCH_TIMEOUT_SECONDS = 10.0
LEEWAY_SECONDS = 60  # clock skew tolerated on exp / nbf


class InvalidToken(Exception):
    """The token is not acceptable; the message says why without repeating any of the token."""


def principal(claims: dict[str, Any]) -> str:
    """The client a validated token names: its `oid`, lower-cased, or InvalidToken when it has none."""
    oid = claims.get("oid")
    if not isinstance(oid, str) or not is_guid(oid):
        raise InvalidToken(
            "The bearer token has no 'oid' claim (object id), which names a client here; a user's token carries it"
            " when the app asks for the 'profile' scope."
        )
    return oid.lower()


def looks_like_jwt(credential: str) -> bool:
    """Three base64url parts with a JSON header (`eyJ` = '{"'): Azure OpenAI style keys never look so."""
    return credential.startswith("eyJ") and credential.count(".") == 2


class EntraValidator:
    def __init__(
        self,
        settings: EntraSettings,
        *,
        refetch_interval: float = REFETCH_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.refetch_interval = refetch_interval
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # last successful fetch: how old the keys are
        self._tried_at: float | None = None  # last fetch attempt, successful or not: the rate limit
        self._jwks_uri: str | None = None
        self._issuers = set(settings.issuers)
        self._task: asyncio.Task[None] | None = None  # the fetch in flight, shared by every caller
        self._failing = False  # the last fetch failed: said once, not at every retry
        self.fetches = 0  # key-set fetches made; tests and /lb/status can see the IdP is not hammered

    async def validate(self, token: str) -> dict[str, Any]:
        """Return the token's claims, or raise InvalidToken."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("The bearer token is not a well-formed JWT.") from None
        if header.get("alg") not in ALGORITHMS:
            raise InvalidToken("The bearer token is not signed with RS256.")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("The bearer token names no signing key (kid).")
        key = await self._key(kid)
        claims = self._decode(token, key)
        if str(claims.get("tid", self.settings.tenant_id)).lower() != self.settings.tenant_id:
            raise InvalidToken("The bearer token was issued for another tenant.")
        allowed = self.settings.allowed_clients
        if allowed is not None and principal(claims) not in allowed:
            apps = {str(claims[c]).lower() for c in ("appid", "azp") if c in claims}  # v1: appid, v2: azp
            hint = " (its app id is: list the identity's object id, oid, instead)" if apps & allowed else ""
            raise InvalidToken(f"The bearer token's object id (oid) is not in LB_ENTRA_ALLOWED_CLIENTS{hint}.")
        return claims

    def _decode(self, token: str, key: jwt.PyJWK) -> dict[str, Any]:
        audiences = {a for aud in self.settings.audiences for a in (aud.rstrip("/"), aud.rstrip("/") + "/")}
        try:
            return jwt.decode(
                token,
                key.key,
                algorithms=ALGORITHMS,
                audience=sorted(audiences),
                issuer=sorted(self._issuers),
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iss", "aud"], "verify_nbf": True},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("The bearer token has expired.") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("The bearer token is not valid yet (nbf).") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("The bearer token is for another audience.") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("The bearer token is from another issuer.") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"The bearer token has no '{exc.claim}' claim.") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("The bearer token's signature does not verify.") from None
        except jwt.PyJWTError:
            raise InvalidToken("The bearer token is invalid.") from None

    # Keys -------------------------------------------------------------------------------------
    async def _key(self, kid: str) -> jwt.PyJWK:
        key = self._keys.get(kid)
        if key is not None and self._usable():
            if self._due() and self._may_fetch():
                self._refresh()  # in the background: this request goes on with the keys in hand
            return key
        if self._may_fetch() or self._refreshing():
            task = self._refresh()
            await asyncio.wait({task}, timeout=FETCH_TIMEOUT_SECONDS)  # the fetch itself is bounded too
        key = self._keys.get(kid) if self._usable() else None
        if key is None and not (self._keys and self._usable()):
            raise InvalidToken("The tenant's signing keys could not be fetched; try again shortly.")
        if key is None:
            raise InvalidToken("The bearer token is signed with a key the tenant does not publish.")
        return key

    def _age(self) -> float:
        return float("inf") if self._fetched_at is None else self._clock() - self._fetched_at

    def _usable(self) -> bool:
        return self._age() <= KEYS_MAX_AGE_SECONDS + KEYS_GRACE_SECONDS

    def _due(self) -> bool:
        return self._age() > KEYS_REFRESH_AFTER_SECONDS

    def _may_fetch(self) -> bool:
        return not self._refreshing() and (
            self._tried_at is None or self._clock() - self._tried_at >= self.refetch_interval
        )

    def _refreshing(self) -> bool:
        return self._task is not None and not self._task.done()

    def _refresh(self) -> asyncio.Task[None]:
        """The one fetch in flight, started if there is none: every caller shares it."""
        if not self._refreshing():
            self._tried_at = self._clock()
            self._task = asyncio.ensure_future(self._fetch())
        assert self._task is not None
        return self._task

    async def _fetch(self) -> None:
        """Replace the key set; on failure keep the old one (an IdP blip must not lock everyone out)."""
        self.fetches += 1
        try:
            async with (
                asyncio.timeout(FETCH_TIMEOUT_SECONDS),
                httpx.AsyncClient(timeout=FETCH_TIMEOUT_SECONDS, trust_env=False, verify=tls_context()) as client,
            ):
                if self._jwks_uri is None:
                    config = await _get_json(client, self.settings.openid_configuration_url)
                    self._jwks_uri = str(config["jwks_uri"])
                    if isinstance(config.get("issuer"), str):  # sovereign clouds name their own v2 issuer
                        self._issuers.add(config["issuer"].replace("{tenantid}", self.settings.tenant_id))
                jwks = await _get_json(client, self._jwks_uri)
            keys = {}
            for entry in jwks.get("keys", []):
                if entry.get("kty") == "RSA" and entry.get("kid") and entry.get("use", "sig") == "sig":
                    try:
                        keys[entry["kid"]] = jwt.PyJWK(entry, algorithm="RS256")
                    except jwt.PyJWTError:
                        continue  # one malformed key must not hide the others
        except (httpx.HTTPError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            if not self._failing:
                log.warning(
                    "Entra ID signing keys could not be fetched (%s); keeping %d known, retrying every %gs",
                    type(exc).__name__ if isinstance(exc, TimeoutError) else exc,
                    len(self._keys),
                    self.refetch_interval,
                )
            self._failing = True
            return
        if self._failing:
            log.warning("Entra ID signing keys fetched again after a failure: %d", len(keys))
        else:
            log.info("Entra ID signing keys fetched: %d", len(keys))
        self._failing = False
        self._keys = keys
        self._fetched_at = self._tried_at


async def _get_json(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    response = await client.get(url)
    response.raise_for_status()
    data = response.json()
    if not isinstance(data, dict):
        raise ValueError(f"{url} did not answer a JSON object")
    return data

"""Validating Microsoft Entra ID bearer tokens sent by clients (e.g. the chat app's managed identity).

A token is accepted when PyJWT verifies its RS256 signature against one of the tenant's published
keys and its issuer (v1 `sts.windows.net` or v2 `login.microsoftonline.com`), audience, expiry and
not-before, and, when `LB_ENTRA_ALLOWED_CLIENTS` is set, its `appid` / `azp` / `oid` is listed.

The keys come from the tenant's OpenID configuration (`jwks_uri`) and are cached. Entra rotates
keys and announces new ones before signing with them, so an unknown `kid` triggers one refetch,
but at most once per `refetch_interval` however many bogus kids arrive, and concurrent requests
share one fetch. Everything stays async: a fetch never blocks the event loop (PyJWKClient would).
A fetch uses a short-lived httpx client: fetches are rare (start-up, rotation, once a day).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt

from lb.config import EntraSettings

log = logging.getLogger("lb")

ALGORITHMS = ["RS256"]  # what Entra signs access tokens with; never "none" nor HMAC (key-confusion)
KEYS_MAX_AGE_SECONDS = 24 * 3600.0  # refetch the key set at least daily, as Microsoft recommends
REFETCH_INTERVAL_SECONDS = 60.0  # unknown kids cannot make us call the IdP more often than this
FETCH_TIMEOUT_SECONDS = 10.0
LEEWAY_SECONDS = 60  # clock skew tolerated on exp / nbf


class InvalidToken(Exception):
    """The token is not acceptable; the message says why without repeating any of the token."""


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
        self._lock = asyncio.Lock()
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
        if allowed is not None:
            ids = {str(claims[c]).lower() for c in ("appid", "azp", "oid") if c in claims}
            if not ids & allowed:
                raise InvalidToken("The bearer token's client is not in LB_ENTRA_ALLOWED_CLIENTS.")
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
        if key is not None and not self._stale():
            return key
        async with self._lock:  # one fetch at a time; waiters then find the key the fetch brought
            if (kid not in self._keys or self._stale()) and self._may_fetch():
                await self._fetch()
        key = self._keys.get(kid)
        if key is None and not self._keys:
            raise InvalidToken("The tenant's signing keys could not be fetched; try again shortly.")
        if key is None:
            raise InvalidToken("The bearer token is signed with a key the tenant does not publish.")
        return key

    def _stale(self) -> bool:
        return self._fetched_at is None or self._clock() - self._fetched_at > KEYS_MAX_AGE_SECONDS

    def _may_fetch(self) -> bool:
        return self._tried_at is None or self._clock() - self._tried_at >= self.refetch_interval

    async def _fetch(self) -> None:
        """Replace the key set; on failure keep the old one (an IdP blip must not lock everyone out)."""
        self._tried_at = self._clock()
        self.fetches += 1
        try:
            async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_SECONDS, trust_env=False) as client:
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
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.warning("Entra ID signing keys could not be fetched (%s); keeping %d known", exc, len(self._keys))
            return
        self._keys = keys
        self._fetched_at = self._tried_at
        log.info("Entra ID signing keys fetched: %d", len(keys))


async def _get_json(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    response = await client.get(url)
    response.raise_for_status()
    data = response.json()
    if not isinstance(data, dict):
        raise ValueError(f"{url} did not answer a JSON object")
    return data

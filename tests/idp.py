"""A local Microsoft Entra ID stand-in: an RSA key pair, tokens minted with it, and the tenant's
OpenID configuration + JWKS served on 127.0.0.1, so token validation is tested over real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
OTHER_TENANT = "11111111-2222-3333-4444-555555555555"
APP_ID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
OBJECT_ID = str(uuid.uuid5(uuid.NAMESPACE_OID, "identity"))  # `oid` of the default token: the client's name
AUDIENCE = "https://cognitiveservices.azure.com"
V1_ISSUER = f"https://sts.windows.net/{TENANT}/"
V2_ISSUER = f"https://login.microsoftonline.com/{TENANT}/v2.0"


class _KeyPool:
    """2048-bit RSA keys, each unlike every other key handed out in the current test.

    Making one costs tens of ms of CPU and most Entra tests make a few, so keys are kept and handed
    out again in later tests: two keys within a test never match (a token signed by another key with
    the same kid must still fail), and no IdP or validator lives longer than its test (no fixture
    holding one is wider than a test's). Outside pytest every key is a new one.
    """

    def __init__(self) -> None:
        self.keys: list[rsa.RSAPrivateKey] = []
        self.test = ""  # the test keys were last handed to
        self.handed = 0  # how many of `keys` it holds (the first ones)

    def take(self) -> rsa.RSAPrivateKey:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]  # "<nodeid> (setup|call|teardown)"
        if not test:
            return rsa.generate_private_key(65537, 2048)
        if test != self.test:
            self.test, self.handed = test, 0
        if self.handed == len(self.keys):
            self.keys.append(rsa.generate_private_key(65537, 2048))
        self.handed += 1
        return self.keys[self.handed - 1]


_KEYS = _KeyPool()


@dataclass
class SigningKey:
    kid: str
    private: rsa.RSAPrivateKey = field(default_factory=_KEYS.take)

    def jwk(self) -> dict[str, Any]:
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key()))
        return {**public, "kid": self.kid, "use": "sig", "kty": "RSA"}


@dataclass
class LocalIdP:
    """ASGI app serving `/{tenant}/v2.0/.well-known/openid-configuration` and the JWKS it points to."""

    keys: list[SigningKey] = field(default_factory=lambda: [SigningKey("key-1")])
    url: str = ""  # set once served
    down: bool = False  # answer 503 to everything
    delay: float = 0.0  # seconds before each answer (a slow tenant)
    requests: list[str] = field(default_factory=list)

    def token(self, key: SigningKey | None = None, *, v2: bool = False, **claims: Any) -> str:
        """A token as Entra issues it for a managed identity (v1) or an app (v2); `claims` override."""
        now = int(time.time())
        payload: dict[str, Any] = {
            "aud": AUDIENCE,
            "iss": V2_ISSUER if v2 else V1_ISSUER,
            "iat": now - 10,
            "nbf": now - 10,
            "exp": now + 3600,
            "tid": TENANT,
            "oid": OBJECT_ID,
            "sub": "subject",
            ("azp" if v2 else "appid"): APP_ID,
        }
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        signer = key or self.keys[0]
        return jwt.encode(payload, signer.private, algorithm="RS256", headers={"kid": signer.kid})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        self.requests.append(path)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.down:
            status, body = 503, {"error": "temporarily_unavailable"}
        elif path == f"/{TENANT}/v2.0/.well-known/openid-configuration":
            status, body = 200, {"issuer": V2_ISSUER, "jwks_uri": f"{self.url}/{TENANT}/discovery/v2.0/keys"}
        elif path == f"/{TENANT}/discovery/v2.0/keys":
            status, body = 200, {"keys": [k.jwk() for k in self.keys]}
        else:
            status, body = 404, {"error": "not_found"}
        data = json.dumps(body).encode()
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": data})

    def key_fetches(self) -> int:
        return sum(p.endswith("/keys") for p in self.requests)


def entra_env(idp: LocalIdP, **extra: str) -> dict[str, str]:
    return {"LB_ENTRA_TENANT_ID": TENANT, "LB_ENTRA_AUTHORITY": idp.url, **extra}

"""A client's credential-like query parameters reaching a backend, where they are read as the balancer's.

The balancer strips a client's `api-key` from the query however it is encoded (`lb.requestinfo`):
"a key in the URL is the client's credential: never forwarded". Azure AI services' gateway also
reads a key from the `subscription-key` query parameter (the query twin of the
`Ocp-Apim-Subscription-Key` header, which the balancer strips). If a backend reads it, a client's
bad value there makes the backend answer "invalid subscription key", which `lb.auth.refusals`
takes as the balancer's credential refused: that backend leaves rotation for everyone for
LB_AUTH_COOLDOWN_SECONDS (one client shutting the pool for the others). Fails on the current code.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from lb.app import create_app
from lb.config import load_settings
from lb.sim import SimBackend

KEYS = "alice:key-a,bob:key-b"


class Recording:
    """A simulated backend that keeps the query string of every call."""

    def __init__(self) -> None:
        self.backend = SimBackend("s", api_key="key-1")
        self.queries: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.queries.append(scope.get("query_string", b"").decode("latin-1"))
        await self.backend(scope, receive, send)


@pytest.mark.parametrize("name", ["subscription-key", "Subscription-Key", "subscription%2Dkey"])
def test_a_clients_subscription_key_in_the_query_never_reaches_a_backend(servers, name):
    recording = Recording()
    env = {
        "LB_CLIENT_KEYS": KEYS,
        "LB_AFFINITY": "off",
        "BACKEND_1_URL": servers.start(recording),
        "BACKEND_1_APIKEY": "key-1",
    }
    url = servers.start(create_app(load_settings(env)))
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    sent = httpx.post(f"{url}/openai/v1/chat/completions?{name}=bobs-garbage", json=body, headers={"api-key": "key-b"})
    assert sent.status_code == 200
    assert recording.queries and all("bobs-garbage" not in q for q in recording.queries), recording.queries


class ReadsQueryKeys(Recording):
    """A backend whose gateway reads `subscription-key` from the query, as Azure AI services document."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        query = scope.get("query_string", b"").lower() if scope["type"] == "http" else b""
        if b"subscription-key=" not in query:
            return await super().__call__(scope, receive, send)
        body = (
            b'{"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API'
            b' endpoint. Make sure to provide a valid key for an active subscription."}}'
        )
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def test_bob_cannot_take_a_backend_out_of_rotation_for_alice_with_a_query_key(servers):
    backend = ReadsQueryKeys()
    env = {
        "LB_CLIENT_KEYS": KEYS,
        "LB_AFFINITY": "off",
        "BACKEND_1_URL": servers.start(backend),
        "BACKEND_1_APIKEY": "key-1",
    }
    url = servers.start(create_app(load_settings(env)))
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    httpx.post(f"{url}/openai/v1/chat/completions?subscription-key=x", json=body, headers={"api-key": "key-b"})
    alices = httpx.post(f"{url}/openai/v1/chat/completions", json=body, headers={"api-key": "key-a"})
    assert alices.status_code == 200, f"alice was refused after bob's call: {alices.status_code} {alices.text[:200]}"

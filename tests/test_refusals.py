"""Whose a backend's 401/403 is (`lb.auth.refusals`), and what the balancer does with each answer.

A refusal in Azure's words about our credential cools the backend at once; one that may be about
the client's request (no words at all, or PermissionDenied on inference) cools it only when a probe
that carries nothing of the client's is refused too; any other is the client's answer.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from lb.auth.refusals import PROBE_FRESH_SECONDS, PROBE_PATH, Probes, judged
from lb.sim import SimBackend, read_body, replayed
from tests.conftest import CLIENT_KEY
from tests.test_faults import post

CHAT = "/openai/deployments/chat/chat/completions?api-version=2024-10-21"
FINE_TUNING = "/openai/v1/fine_tuning/jobs"
BAD_KEY = {"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint."}}
BAD_TOKEN = {
    "statusCode": 401,
    "message": "Unauthorized. Access token is missing, invalid, audience is incorrect"
    " (https://cognitiveservices.azure.com), or have expired.",
}
KEYS_OFF = {"error": {"code": "AuthenticationTypeDisabled", "message": "Key based authentication is disabled."}}
APIM_NO_KEY = {
    "statusCode": 401,
    "message": "Access denied due to missing subscription key. Make sure to include subscription key when making"
    " requests to an API.",
}
PRIVATE_ONLY = {"error": {"code": "403", "message": "Public access is disabled. Please configure private endpoint."}}
DENIED = {"error": {"code": "PermissionDenied", "message": "Principal does not have access to API/Operation."}}
APP_GATEWAY_403 = (
    b"<html><head><title>403 Forbidden</title></head><body><center><h1>403 Forbidden</h1></center>"
    b"<hr><center>Microsoft-Azure-Application-Gateway/v2</center></body></html>"
)


# Reading a refusal --------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [CHAT, FINE_TUNING, "/openai/v1/files"])
@pytest.mark.parametrize(
    "body", [BAD_KEY, BAD_TOKEN, KEYS_OFF, APIM_NO_KEY, PRIVATE_ONLY], ids=["key", "token", "off", "apim", "network"]
)
def test_azures_words_about_our_credential_are_ours_whatever_was_asked(path, body):
    assert judged(path, json.dumps(body).encode()) == "ours"


@pytest.mark.parametrize(
    "path",
    [
        CHAT,
        "/openai/v1/responses",
        "/openai/v1/embeddings",
        "/openai/deployments/d/audio/speech",
        "/openai/v1/images/generations",
        "/openai/responses?api-version=2025-04-01-preview",
        # in any case or encoding a loose router matches (`lb.apipath`)
        "/openai/Deployments/chat/Chat/Completions",
        "/openai/V1/Responses",
        "/openai/d%65ployments/d/chat/c%6Fmpletions",
    ],
)
def test_permission_denied_on_an_inference_call_is_confirmed_by_a_probe(path):
    """Our identity may lack the role, or this one call a data action: the backend is asked."""
    assert judged(path, json.dumps(DENIED).encode()) == "unsure"


@pytest.mark.parametrize(
    "path",
    [
        FINE_TUNING,
        "/openai/v1/files",
        "/openai/v1/batches",
        "/openai/v1/vector_stores",
        "/openai/v1/chat/completions_x",  # a route that only begins like one
        "/openai/chat/completions",  # no deployment, no v1: not a call Azure serves
        "/openai/deployments/embeddings/files",  # a deployment named like a route
    ],
)
def test_permission_denied_on_anything_else_is_the_clients_answer(path):
    assert judged(path, json.dumps(DENIED).encode()) == "theirs"


@pytest.mark.parametrize("path", [CHAT, FINE_TUNING])
@pytest.mark.parametrize("body", [b"", APP_GATEWAY_403, b"The request is blocked.", b"null", b'{"error": "blocked"}'])
def test_a_refusal_without_words_is_confirmed_by_a_probe_on_any_route(path, body):
    assert judged(path, body) == "unsure"


def test_a_gateways_words_about_something_else_are_the_clients_answer():
    blocked = {"statusCode": 403, "message": "The request was blocked by a content safety policy."}
    assert judged(CHAT, json.dumps(blocked).encode()) == "theirs"


def test_a_burst_of_unsure_refusals_asks_each_backend_once_per_window():
    async def run() -> None:
        now = [0.0]
        probes = Probes(clock=lambda: now[0])
        asked: list[str] = []

        def probe(backend: str, refused: bool):
            async def ask() -> bool:
                asked.append(backend)
                await asyncio.sleep(0.01)
                return refused

            return ask

        answers = await asyncio.gather(*(probes.refused("a", probe("a", False)) for _ in range(20)))
        assert answers == [False] * 20 and asked == ["a"]  # one probe, its answer shared
        assert await probes.refused("b", probe("b", True)) is True and asked == ["a", "b"]  # per backend
        now[0] = PROBE_FRESH_SECONDS + 1
        assert await probes.refused("a", probe("a", True)) is True and asked == ["a", "b", "a"]  # asked again

    asyncio.run(run())


# What the balancer does with each -------------------------------------------------------------------
class Gateway:
    """A simulated Azure OpenAI behind a gateway: `refuse(method, path, body)` gives the (status,
    content type, body) it answers instead, or None to pass the call on. Keeps every call."""

    def __init__(self, refuse: Any) -> None:
        self.sim = SimBackend("gw", api_key="key-9")
        self.refuse = refuse
        self.calls: list[tuple[str, str, dict[str, str], bytes]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.sim(scope, receive, send)
        body = await read_body(receive)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"] + ("?" + scope["query_string"].decode() if scope["query_string"] else "")
        self.calls.append((scope["method"], path, headers, body))
        refused = self.refuse(scope["method"], path, body)
        if refused is None:
            return await self.sim(scope, replayed(body), send)
        status, content_type, content = refused
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
        await send({"type": "http.response.body", "body": content})

    def probes(self) -> list[tuple[str, str, dict[str, str], bytes]]:
        return [call for call in self.calls if call[1] == PROBE_PATH]


def gateway_pool(make_pool, servers, gateway: Gateway):
    """The gateway's backend (9) first, a plain simulated backend (1) behind it."""
    env = {"BACKEND_1_PRIORITY": "2", "BACKEND_9_URL": servers.start(gateway), "BACKEND_9_APIKEY": "key-9"}
    return make_pool(1, env=env)


def chat(content: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}]}


def test_a_waf_refusing_one_prompt_is_that_clients_answer_and_cools_nothing(make_pool, servers):
    waf = Gateway(lambda method, path, body: (403, b"text/html", APP_GATEWAY_403) if b"<script>" in body else None)
    pool = gateway_pool(make_pool, servers, waf)
    for _ in range(3):
        refused = post(pool.url, json=chat("explain <script>alert(1)</script>"))
        assert refused.status_code == 403 and refused.content == APP_GATEWAY_403  # relayed as the WAF sent it
        assert refused.headers["x-lb-backend"] == "9" and refused.headers["x-lb-attempts"] == "1"
    assert pool.proxy.store.active() == []  # nothing cooled
    probes = waf.probes()
    assert len(probes) == 1  # one probe for the three refusals (PROBE_FRESH_SECONDS)
    method, _, headers, body = probes[0]
    assert method == "GET" and body == b"" and headers["api-key"] == "key-9"  # ours, and nothing of the client's
    assert "x-forwarded-for" not in headers and "x-request-id" not in headers
    answer = post(pool.url, json=chat("hello"))
    assert answer.status_code == 200 and answer.headers["x-lb-backend"] == "9"  # still first in rotation


def test_a_backend_refusing_us_without_words_is_cooled_once_its_probe_is_refused_too(make_pool, servers):
    """A gateway whose refusal of our key says nothing readable (an empty 401) still takes its backend
    out: the probe, which carries nothing of the client's, is refused too."""
    locked = Gateway(lambda method, path, body: (401, b"text/plain", b""))
    pool = gateway_pool(make_pool, servers, locked)
    answer = post(pool.url)
    assert answer.status_code == 200 and answer.headers["x-lb-backend"] == "1"
    assert answer.headers["x-lb-attempts"] == "2"
    (cooled,) = pool.proxy.store.active()
    assert cooled.backend == "9" and cooled.until - time.time() > 250  # LB_AUTH_COOLDOWN_SECONDS, 300 by default
    assert cooled.reason.startswith("auth 401") and "refused too" in cooled.reason
    assert len(locked.probes()) == 1
    assert post(pool.url).headers["x-lb-attempts"] == "1"  # out of rotation: not asked again
    status = httpx.get(f"{pool.url}/lb/status", headers={"api-key": CLIENT_KEY}).json()
    assert {b["name"]: b["auth_failure"] is not None for b in status["backends"]} == {"1": False, "9": True}


def test_a_permission_denied_that_the_probe_does_not_share_is_the_clients_answer(make_pool, servers):
    """One chat that needs a data action our identity lacks (here: any chat naming `data_sources`)
    is refused; the role itself is there, since the probe is answered: relayed, nothing cooled."""
    denied = json.dumps(DENIED).encode()
    gateway = Gateway(
        lambda method, path, body: (401, b"application/json", denied) if b"data_sources" in body else None
    )
    pool = gateway_pool(make_pool, servers, gateway)
    refused = post(pool.url, json={**chat("hi"), "data_sources": []})
    assert refused.status_code == 401 and refused.json() == DENIED and refused.headers["x-lb-backend"] == "9"
    assert pool.proxy.store.active() == [] and len(gateway.probes()) == 1
    assert post(pool.url).headers["x-lb-backend"] == "9"

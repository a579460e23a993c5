"""Companions of tests/test_redteam_quota.py, test_redteam_credentials.py and test_redteam_usage.py:
the forms those don't send, and what the new token calls are charged.

- A call is known by its lower-cased route (`lb.apipath.split_path`), whatever the URL's shape.
- Images, speech and compaction reserve like any generating call, and are charged what their answer
  says (images, compaction) or their reservation (speech: the answer is audio, without usage).
- A compaction is not a read of a stored response: it is charged, even when it names one.
- With several clients, none of the backend's `x-ratelimit-*` headers reaches a client (a limited
  one gets its own remaining quota); with one client, they pass as before.
- A credential in the query (`Authorization`, `subscription-key`) never reaches a backend.
- A compressed request body is a 415 on every route, before any backend is called.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from typing import Any

import httpx
import pytest

from lb.apipath import split_path
from lb.app import create_app
from lb.config import load_settings
from lb.metering import Metering
from lb.requestinfo import RequestInfo, described
from lb.sim import SimBackend
from lb.telemetry import Telemetry

BOB, ALICE = "bob-key", "alice-key"
KEYS = f"bob:{BOB},alice:{ALICE}"
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/openai/v1/Chat/Completions", "chat/completions"),
        ("/openai/deployments/Chat/chat/Completions?api-version=2024-10-21", "chat/completions"),
        ("/openai/Deployments/chat/Embeddings", "embeddings"),
        ("/openai/responses?api-version=2025-04-01-preview", "responses"),
        ("/openai/v1/RESPONSES/compact", "responses/compact"),
        ("/openai/deployments/responses/chat/completions", "chat/completions"),  # a deployment named like a route
        ("/openai/v1/Batches", "batches"),
        ("/openai/batches?api-version=2024-10-21", "batches"),
        ("/openai/v1/responses/resp_AB/cancel", "responses/resp_ab/cancel"),
    ],
)
def test_a_call_is_known_by_its_route_whatever_its_case_or_shape(path: str, expected: str) -> None:
    assert split_path(path).operation == expected


def _info(path: str, body: dict[str, Any]) -> RequestInfo:
    return asyncio.run(described(path, json.dumps(body).encode()))


@pytest.mark.parametrize(
    ("path", "body", "output"),
    [
        ("/openai/v1/Chat/Completions", {"model": "m", "messages": []}, 1024),
        ("/openai/v1/images/generations", {"model": "m", "prompt": "a cat"}, 1024),
        ("/openai/deployments/tts/Audio/Speech", {"input": "hello", "voice": "alloy"}, 1024),
        ("/openai/v1/responses/compact", {"model": "m", "input": "a long conversation"}, 1024),
        ("/openai/v1/Embeddings", {"model": "m", "input": "text"}, 0),  # no output
    ],
)
def test_a_token_call_reserves_its_prompt_and_its_output(path: str, body: dict[str, Any], output: int) -> None:
    info = _info(path, body)
    assert Metering({}, Telemetry()).reservation(info) == len(info.body) // 4 + output


@pytest.mark.parametrize("path", ["/openai/v1/files", "/openai/v1/Batches"])
def test_a_call_that_spends_no_tokens_reserves_nothing(path: str) -> None:
    assert Metering({}, Telemetry()).reservation(_info(path, {"model": "m", "input": "x"})) == 0


@pytest.mark.parametrize(
    "path",
    [
        "/openai/deployments/gpt-big/chat/completions",
        "/openai/Deployments/gpt-big/Chat/Completions",
        "/openai/d%65ployments/gpt-big/chat/completions",
        "/openai/deployments/gpt%2Dbig/chat/c%6Fmpletions",
    ],
)
def test_a_deployment_path_in_any_case_or_encoding_reserves_that_deployments_default(path: str) -> None:
    """`LB_RESERVE_TOKENS` is per deployment: read from the path in whatever case or encoding a
    loose router accepts (`lb.apipath`), else the call would reserve the catch-all's smaller figure."""
    info = _info(path, {"messages": [{"role": "user", "content": "hi"}]})
    assert info.deployment == "gpt-big"
    metering = Metering({}, Telemetry(), reserve={"gpt-big": 16_000, "*": 100})
    assert metering.reservation(info) == len(info.body) // 4 + 16_000


@pytest.mark.parametrize("path", ["/openai/v1/audio/Transcriptions", "/openai/v1/images/edits"])
def test_a_file_input_reserves_the_default_whatever_its_size(path: str) -> None:
    info = _info(path, {"model": "m", "input": "x" * 100_000})
    assert Metering({}, Telemetry()).reservation(info) == 1024


class TokenCalls:
    """A backend answering images (with gpt-image-1's usage), speech (audio bytes) and compaction
    (a response object naming its id, as a stored response's read would)."""

    IMAGE_USAGE = {"input_tokens": 50, "output_tokens": 4160, "total_tokens": 4210, "input_tokens_details": {}}
    COMPACT_USAGE = {"input_tokens": 500, "output_tokens": 100, "total_tokens": 600}

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.calls += 1
        while (await receive()).get("more_body"):
            pass
        path = scope["path"].lower()
        if path.endswith("/audio/speech"):
            body, kind = b"ID3" + b"\x00" * 500, b"audio/mpeg"
        elif path.endswith("/images/generations"):
            body, kind = (
                json.dumps({"created": 1, "data": [{"b64_json": "AAAA"}], "usage": self.IMAGE_USAGE}).encode(),
                b"application/json",
            )
        else:
            answer = {"id": "resp_1", "object": "response", "status": "completed", "usage": self.COMPACT_USAGE}
            body, kind = json.dumps(answer).encode(), b"application/json"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]})
        await send({"type": "http.response.body", "body": body})


def _bobs_limit(url: str) -> dict[str, Any]:
    """Bob's limit report once none of his calls holds a reservation (polled)."""
    deadline = time.monotonic() + 5
    while True:
        report = httpx.get(url + "/lb/usage", headers={"api-key": BOB}).json()["limits"]["bob"]
        if report["reserved"]["calls"] == 0 or time.monotonic() > deadline:
            return report
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("path", "body", "charged"),
    [
        ("/openai/v1/images/generations", {"model": "img", "prompt": "a cat"}, TokenCalls.IMAGE_USAGE["total_tokens"]),
        ("/openai/v1/responses/compact", {"model": "chat", "input": "a conversation"}, 600),
        ("/openai/v1/audio/speech", {"model": "tts", "input": "hello", "voice": "alloy"}, None),  # its reservation
    ],
)
def test_images_speech_and_compaction_are_charged(
    servers, path: str, body: dict[str, Any], charged: int | None
) -> None:
    backend = TokenCalls()
    env = {"LB_CLIENT_KEYS": KEYS, "LB_CLIENT_LIMITS": "bob=100000tpm", "LB_AFFINITY": "off"}
    url = servers.start(
        create_app(load_settings({**env, "BACKEND_1_URL": servers.start(backend), "BACKEND_1_APIKEY": "k"}))
    )
    content = json.dumps(body).encode()
    sent = httpx.post(url + path, content=content, headers={"api-key": BOB, "content-type": "application/json"})
    assert sent.status_code == 200 and backend.calls == 1
    expected = len(content) // 4 + 1024 if charged is None else charged
    assert _bobs_limit(url)["charged_last_minute"] == expected


class QuotaHeaders:
    """A simulated backend whose every answer carries Azure's rate-limit headers; it keeps every query."""

    HEADERS = [
        (b"x-ratelimit-remaining-tokens", b"9000"),
        (b"x-ratelimit-remaining-requests", b"90"),
        (b"x-ratelimit-limit-tokens", b"10000"),
        (b"x-ratelimit-limit-requests", b"100"),
        (b"x-ratelimit-reset-tokens", b"1s"),
    ]

    def __init__(self) -> None:
        self.backend = SimBackend("s", api_key="key-1")
        self.queries: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.backend(scope, receive, send)
        self.queries.append(scope.get("query_string", b"").decode("latin-1"))

        async def with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message["headers"] if not k.lower().startswith(b"x-ratelimit-")]
                message = {**message, "headers": kept + self.HEADERS}
            await send(message)

        await self.backend(scope, receive, with_headers)


def _proxy(servers, backend: QuotaHeaders, **env: str) -> str:
    settings = {"LB_AFFINITY": "off", "BACKEND_1_URL": servers.start(backend), "BACKEND_1_APIKEY": "key-1", **env}
    return servers.start(create_app(load_settings(settings)))


def test_with_several_clients_no_backend_quota_header_reaches_a_client(servers) -> None:
    url = _proxy(servers, QuotaHeaders(), LB_CLIENT_KEYS=KEYS, LB_CLIENT_LIMITS="bob=1000tpm")
    alices = httpx.post(url + "/openai/v1/chat/completions", json=CHAT, headers={"api-key": ALICE})
    assert alices.status_code == 200
    assert not [h for h in alices.headers if h.startswith("x-ratelimit-")], alices.headers
    bobs = httpx.post(url + "/openai/v1/chat/completions", json=CHAT, headers={"api-key": BOB})
    assert bobs.status_code == 200
    assert [h for h in bobs.headers if h.startswith("x-ratelimit-")] == ["x-ratelimit-remaining-tokens"]
    assert int(bobs.headers["x-ratelimit-remaining-tokens"]) < 1000  # his own quota, after this call


def test_with_one_client_the_backends_quota_headers_pass(servers) -> None:
    url = _proxy(servers, QuotaHeaders(), LB_CLIENT_KEYS=ALICE)
    answer = httpx.post(url + "/openai/v1/chat/completions", json=CHAT, headers={"api-key": ALICE})
    assert answer.status_code == 200
    assert answer.headers["x-ratelimit-remaining-tokens"] == "9000"
    assert answer.headers["x-ratelimit-limit-tokens"] == "10000"


def test_the_balancer_reads_the_backends_quota_headers_it_does_not_relay(servers) -> None:
    url = _proxy(servers, QuotaHeaders(), LB_CLIENT_KEYS=KEYS, LB_POLICY="headroom", LB_ADMIN_CLIENTS="alice")
    answer = httpx.post(url + "/openai/v1/chat/completions", json=CHAT, headers={"api-key": ALICE})
    assert answer.status_code == 200 and "x-ratelimit-remaining-tokens" not in answer.headers
    status = httpx.get(url + "/lb/status", headers={"api-key": ALICE}).json()
    assert status["backends"][0]["headroom"][0]["remaining_tokens"] == 9000


@pytest.mark.parametrize(
    "query",
    ["Authorization=Bearer%20eyJ.bobs.token", "authorization=x", "SUBSCRIPTION-KEY=x", "subscription%2Dkey=x"],
)
def test_a_credential_in_the_query_never_reaches_a_backend(servers, query: str) -> None:
    backend = QuotaHeaders()
    url = _proxy(servers, backend, LB_CLIENT_KEYS=KEYS)
    path = f"/openai/deployments/chat/chat/completions?api-version=2024-10-21&{query}"
    sent = httpx.post(url + path, json=CHAT, headers={"api-key": BOB})
    assert sent.status_code == 200
    assert backend.queries == ["api-version=2024-10-21"]


@pytest.mark.parametrize("encoding", ["gzip", "br", "GZIP", "identity, gzip"])
@pytest.mark.parametrize("path", ["/openai/v1/chat/completions", "/openai/v1/files", "/openai/responses"])
def test_a_compressed_body_is_refused_on_every_route(servers, encoding: str, path: str) -> None:
    backend = QuotaHeaders()
    url = _proxy(servers, backend, LB_CLIENT_KEYS=KEYS)
    body = gzip.compress(json.dumps(CHAT).encode())
    headers = {"api-key": BOB, "content-type": "application/json", "content-encoding": encoding}
    sent = httpx.post(url + path, content=body, headers=headers)
    assert sent.status_code == 415 and sent.json()["error"]["code"] == "UnsupportedMediaType"
    assert backend.queries == []


def test_a_body_said_to_be_identity_is_read_as_sent(servers) -> None:
    backend = QuotaHeaders()
    url = _proxy(servers, backend, LB_CLIENT_KEYS=KEYS)
    headers = {"api-key": BOB, "content-type": "application/json", "content-encoding": "identity"}
    sent = httpx.post(url + "/openai/v1/chat/completions", content=json.dumps(CHAT).encode(), headers=headers)
    assert sent.status_code == 200 and len(backend.queries) == 1

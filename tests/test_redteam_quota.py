"""A limited client (bob) getting around his quota: paths metering does not recognise.

Azure OpenAI matches routes whatever their case, so metering knows a call by its lower-cased route
(`lb.apipath.split_path`), and charges images, speech and compaction in tokens like chat: a call
that reserves nothing is admitted however far over his tokens per minute the client is.
docs/metering.md's promise is that a limited client is refused once over its limit and charged
what it spends.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from lb.app import create_app
from lb.config import load_settings
from lb.sim import SimBackend

BOB, ALICE = "bob-key", "alice-key"
KEYS = f"bob:{BOB},alice:{ALICE}"
BIG_PROMPT = "word " * 800  # ~1,000 tokens: more than bob's whole limit, which a first call may take alone


def start(servers, backend: SimBackend, limits: str) -> str:
    settings = {
        "LB_CLIENT_KEYS": KEYS,
        "LB_CLIENT_LIMITS": limits,
        "LB_AFFINITY": "off",
        "BACKEND_1_URL": servers.start(backend),
        "BACKEND_1_APIKEY": "key-1",
    }
    return servers.start(create_app(load_settings(settings)))


def limit_of(url: str) -> dict:
    return httpx.get(url + "/lb/usage", headers={"api-key": BOB}).json()["limits"]["bob"]


def settled(url: str, timeout: float = 5.0) -> dict:
    """Bob's limit report once none of his calls holds a reservation (polled)."""
    deadline = time.monotonic() + timeout
    while True:
        report = limit_of(url)
        if report["reserved"]["calls"] == 0 or time.monotonic() > deadline:
            return report
        time.sleep(0.05)


def over_limit(url: str) -> None:
    """Bob spends more than his 100 tokens a minute in one call (a first call may take the whole window)."""
    chat = {"model": "chat", "messages": [{"role": "user", "content": BIG_PROMPT}], "max_tokens": 10}
    first = httpx.post(url + "/openai/v1/chat/completions", json=chat, headers={"api-key": BOB}, timeout=10)
    assert first.status_code == 200
    assert settled(url)["used_last_minute"]["tokens"] > 100
    again = httpx.post(url + "/openai/v1/chat/completions", json=chat, headers={"api-key": BOB}, timeout=10)
    assert again.status_code == 429  # the plain path is refused now


CHAT = {"model": "chat", "messages": [{"role": "user", "content": BIG_PROMPT}]}
SPENDING = {
    "v1-mixed-case-chat": ("/openai/v1/Chat/Completions", CHAT),
    "deployment-mixed-case-chat": ("/openai/deployments/chat/chat/Completions?api-version=2024-10-21", CHAT),
    "deployments-word-mixed-case": ("/openai/Deployments/chat/Chat/Completions?api-version=2024-10-21", CHAT),
    # percent-encoded words: a router that decodes before matching (ASP.NET Core's) reads chat
    "v1-encoded-chat": ("/openai/v1/chat/c%6Fmpletions", CHAT),
    "v1-word-encoded": ("/openai/%761/Chat/Completions", CHAT),
    "deployments-word-encoded": ("/openai/d%65ployments/ch%61t/chat/completions?api-version=2024-10-21", CHAT),
    "responses-encoded": ("/openai/r%65sponses?api-version=2025-04-01-preview", {"model": "chat", "input": BIG_PROMPT}),
    "v1-mixed-case-embeddings": ("/openai/v1/Embeddings", {"model": "chat", "input": BIG_PROMPT}),
    "v1-mixed-case-responses": ("/openai/v1/Responses", {"model": "chat", "input": BIG_PROMPT}),
    "responses-compact": ("/openai/v1/responses/compact", {"model": "chat", "input": BIG_PROMPT}),
    # gpt-image-1 and gpt-4o-mini-tts are billed in tokens, and their answers say how many
    "images-generations": ("/openai/v1/images/generations", {"model": "chat", "prompt": BIG_PROMPT}),
    "audio-speech": ("/openai/v1/audio/speech", {"model": "chat", "input": BIG_PROMPT, "voice": "alloy"}),
}


# An image to edit or audio to transcribe, sent as the SDK sends it: a multipart form with the file.
FILE_INPUTS = {
    "images-edits": ("/openai/v1/images/edits", {"model": "chat", "prompt": "a hat"}, "image", "a.png"),
    "images-variations": ("/openai/v1/images/variations", {"model": "chat"}, "image", "a.png"),
    "audio-transcriptions": ("/openai/v1/audio/transcriptions", {"model": "chat"}, "file", "a.wav"),
    "audio-translations": ("/openai/v1/audio/translations", {"model": "chat"}, "file", "a.wav"),
}


@pytest.mark.parametrize("way", sorted(FILE_INPUTS))
def test_a_client_over_its_tokens_per_minute_cannot_spend_more_by_sending_a_file(servers, way):
    backend = SimBackend("s", api_key="key-1")
    url = start(servers, backend, "bob=100tpm")
    over_limit(url)
    path, fields, name, filename = FILE_INPUTS[way]
    calls = len(backend.calls)
    files = {name: (filename, b"\x00" * 4096)}
    sent = httpx.post(url + path, data=fields, files=files, headers={"api-key": BOB}, timeout=10)
    assert len(backend.calls) == calls, f"bob spent past his limit through {path} ({sent.status_code})"
    assert sent.status_code == 429


def test_a_file_input_reserves_the_deployment_default_not_its_bytes(servers):
    """A 400 KB image is not 100,000 tokens: a client with room for a call's default is admitted."""
    backend = SimBackend("s", api_key="key-1")
    url = start(servers, backend, "bob=5000tpm")
    files = {"image": ("a.png", b"\x00" * 400_000)}
    sent = httpx.post(
        url + "/openai/v1/images/edits",
        data={"model": "chat", "prompt": "a hat"},
        files=files,
        headers={"api-key": BOB},
        timeout=10,
    )
    assert sent.status_code != 429, sent.text


@pytest.mark.parametrize("way", sorted(SPENDING))
def test_a_client_over_its_tokens_per_minute_cannot_spend_more_by_another_path(servers, way):
    backend = SimBackend("s", api_key="key-1")
    url = start(servers, backend, "bob=100tpm")
    over_limit(url)
    path, body = SPENDING[way]
    calls = len(backend.calls)
    sent = httpx.post(url + path, json=body, headers={"api-key": BOB}, timeout=10)
    assert len(backend.calls) == calls, f"bob spent past his limit through {path} ({sent.status_code})"
    assert sent.status_code == 429


@pytest.mark.parametrize(
    "path",
    [
        "/openai/v1/Chat/Completions",
        "/openai/v1/chat/c%6Fmpletions",
        "/openai/Deployments/chat/Chat/Completions?api-version=2024-10-21",
        "/openai/d%65ployments/chat/chat/completions?api-version=2024-10-21",
    ],
)
def test_a_stream_on_a_mixed_case_or_encoded_path_is_charged_its_usage(servers, path):
    """A chat stream asks the backend for its usage chunk whatever the path's case or encoding: else
    its usage stays unknown and it is charged its reservation, nothing on a route metering missed."""
    backend = SimBackend("s", api_key="key-1", chunks=40)
    url = start(servers, backend, "bob=100000tpm")
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", url + path, json=body, headers={"api-key": BOB}) as answer:
        assert answer.status_code == 200
        events = [line for line in answer.iter_lines() if line.startswith("data: {")]
    assert events
    assert settled(url)["used_last_minute"]["tokens"] >= backend.chunks  # at least the output it streamed


def test_a_client_without_a_batch_allowance_cannot_create_one_through_another_case(servers):
    backend = SimBackend("s", api_key="key-1")
    url = start(servers, backend, "bob=100000tpm")  # a tpm and no bph: no batches
    line = {"custom_id": "1", "method": "POST", "url": "/chat/completions", "body": {"model": "chat"}}
    files = {"file": ("in.jsonl", json.dumps(line).encode()), "purpose": (None, "batch")}
    upload = httpx.post(url + "/openai/v1/files", files=files, headers={"api-key": BOB})
    assert upload.status_code == 200
    body = json.dumps({"input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions"}).encode()
    headers = {"api-key": BOB, "content-type": "application/json"}
    plain = httpx.post(url + "/openai/v1/batches", content=body, headers=headers)
    assert plain.status_code == 403 and plain.json()["error"]["code"] == "ClientQuotaExceeded"
    calls = len(backend.calls)
    other = httpx.post(url + "/openai/v1/Batches", content=body, headers=headers)
    assert len(backend.calls) == calls, f"bob's batch create reached the backend ({other.status_code})"
    assert other.status_code == 403

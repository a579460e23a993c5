"""Quotas against a client that tries to get around them: each way of issue 22, end to end.

Client `bob` is limited, client `alice` is not; the openai SDK (or raw HTTP where the SDK would
hide the trick) talks to `lb` on sockets, in front of simulated backends.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable

import httpx
import openai
import pytest
from starlette.middleware.gzip import GZipMiddleware

from lb.app import create_app
from lb.config import load_settings
from lb.sim import SimBackend
from tests.azurite import azurite_fixture  # noqa: F401
from tests.conftest import wait_until

BOB, ALICE = "bob-key", "alice-key"
RESERVE = 1000  # LB_RESERVE_TOKENS: output reserved for a call that names no maximum
KEYS = f"bob:{BOB},alice:{ALICE}"


def start(servers, backend_app, limits: str, **env: str) -> str:
    settings = {
        "LB_CLIENT_KEYS": KEYS,
        "LB_CLIENT_LIMITS": limits,
        "LB_AFFINITY": "off",
        "LB_RESERVE_TOKENS": str(RESERVE),
        "BACKEND_1_URL": servers.start(backend_app),
        "BACKEND_1_APIKEY": "key-1",
        **env,
    }
    return servers.start(create_app(load_settings(settings)))


SHARE_ROUND_SECONDS = 0.25  # the instances' usage share rounds (1 s by default): what a cross-instance wait waits out


def start_instance(servers, env: dict[str, str]) -> str:
    """One more instance on the table `env` names, sharing its counts every SHARE_ROUND_SECONDS."""
    app = create_app(load_settings(env))
    app.state.proxy.metering.share.interval = SHARE_ROUND_SECONDS
    return servers.start(app)


def limit_of(url: str, client: str = "bob", key: str = BOB) -> dict:
    return httpx.get(url + "/lb/usage", headers={"api-key": key}).json()["limits"][client]


def settled(url: str, client: str = "bob", key: str = BOB, timeout: float = 5.0) -> dict:
    """The client's limit report once none of its calls holds a reservation (polled)."""
    deadline = time.monotonic() + timeout
    while True:
        report = limit_of(url, client, key)
        if report.get("reserved", {}).get("calls") == 0 or time.monotonic() > deadline:
            return report
        time.sleep(0.05)


def until(condition: Callable[[], bool], timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def v1(url: str, key: str = BOB, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/openai/v1", api_key=key, max_retries=0, **kwargs)


def test_a_stream_that_refuses_usage_is_charged_its_usage_and_never_sees_the_chunk(servers) -> None:
    backend = SimBackend("s", api_key="key-1", chunks=60)
    url = start(servers, backend, "bob=100000tpm", LB_STREAM_USAGE="include")
    stream = v1(url).chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": False},
    )
    chunks = list(stream)
    assert chunks and all(c.usage is None and c.choices for c in chunks)
    used = backend.prompt_tokens + backend.chunks  # the sim's usage: prompt plus one token per chunk
    assert settled(url)["used_last_minute"]["tokens"] == used


def test_a_background_response_is_charged_once_when_first_seen_completed(servers) -> None:
    backend = SimBackend("s", api_key="key-1", chunks=50)
    url = start(servers, backend, "bob=100000tpm")
    client = v1(url)
    created = client.responses.create(model="chat", input="write a lot", background=True)
    assert created.status == "queued"
    assert limit_of(url)["used_last_minute"]["tokens"] >= RESERVE  # reserved while it is generated
    final = client.responses.retrieve(created.id)
    while final.status != "completed":
        final = client.responses.retrieve(created.id)
    for _ in range(5):  # read again: free
        assert client.responses.retrieve(created.id).usage.total_tokens == final.usage.total_tokens
    report = settled(url)
    assert report["used_last_minute"]["tokens"] == final.usage.total_tokens  # 100 output tokens, not the ~5 of the body
    counted = httpx.get(url + "/lb/usage", headers={"api-key": BOB}).json()["clients"]["bob"]["last_minute"]
    assert counted["total_tokens"] == final.usage.total_tokens and counted["unknown_usage"] == 0


def test_a_stored_response_read_five_times_is_counted_once(servers) -> None:
    url = start(servers, SimBackend("s", api_key="key-1"), "bob=100000tpm")
    client = v1(url, ALICE)  # not limited: polling must not inflate anybody's counts
    response = client.responses.create(model="chat", input="hello")
    for _ in range(5):
        client.responses.retrieve(response.id)
    counted = httpx.get(url + "/lb/usage", headers={"api-key": ALICE}).json()["clients"]["alice"]["last_minute"]
    assert counted["requests"] == 6 and counted["total_tokens"] == response.usage.total_tokens


def test_concurrent_streams_are_admitted_only_while_their_reservations_fit(servers) -> None:
    # Streams of up to 10 s: every admitted one is still in flight when the last call is decided (then let go).
    backend = SimBackend("s", api_key="key-1", chunks=40, chunk_gap=0.25)
    url = start(servers, backend, "bob=3000tpm")
    statuses: list[int] = []
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    gate = threading.Barrier(12)

    def one() -> None:
        gate.wait()
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", url + "/openai/v1/chat/completions", json=body, headers={"api-key": BOB}) as r:
                statuses.append(r.status_code)
                r.read()

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    wait_until(lambda: len(statuses) == 12, "every call to be admitted or refused")
    backend.chunk_gap = 0  # the admitted streams may end now
    for t in threads:
        t.join()
    assert statuses.count(200) + statuses.count(429) == 12
    assert 1 <= statuses.count(200) <= 3000 // RESERVE  # on an empty window: 2
    settled(url)
    served = backend.count(200)
    assert served == statuses.count(200)


def test_a_responses_stream_cut_before_completed_is_charged_its_reservation(servers) -> None:
    backend = SimBackend("s", api_key="key-1", chunks=300, chunk_gap=0.01)
    url = start(servers, backend, "bob=100000tpm", LB_RESERVE_TOKENS="chat=2500")
    body = {"model": "chat", "input": "tell me everything", "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", url + "/openai/v1/responses", json=body, headers={"api-key": BOB}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if "output_text.delta" in line:
                    break  # the client leaves before response.completed
    until(lambda: backend.disconnects == 1)
    report = settled(url)
    assert report["used_last_minute"]["tokens"] >= 2500  # LB_RESERVE_TOKENS for `chat`, plus the prompt


def _gzip(app, asked: list[bytes], forced: bool):
    """A backend that compresses its answers when asked to (or, `forced`, whether or not it was)."""
    gz = GZipMiddleware(app, minimum_size=0)

    async def wrapped(scope, receive, send):
        if scope["type"] == "http":
            asked.extend(v for k, v in scope["headers"] if k == b"accept-encoding")
            if forced:
                kept = [(k, v) for k, v in scope["headers"] if k != b"accept-encoding"]
                scope = {**scope, "headers": [*kept, (b"accept-encoding", b"gzip")]}
        await gz(scope, receive, send)

    return wrapped


@pytest.mark.parametrize("forced", [False, True])
def test_an_answer_compressed_by_the_backend_is_still_charged(servers, forced: bool) -> None:
    backend = SimBackend("s", api_key="key-1")
    asked: list[bytes] = []
    url = start(servers, _gzip(backend, asked, forced), "bob=100000tpm")
    with httpx.Client(timeout=30) as http:
        r = http.post(
            url + "/openai/v1/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 3000},
            headers={"api-key": BOB, "accept-encoding": "gzip"},
        )
    assert r.status_code == 200
    usage = r.json()["usage"]  # httpx decodes gzip if it was sent so
    assert asked == [b"identity"]  # never the client's gzip
    assert (r.headers.get("content-encoding") == "gzip") is forced
    assert settled(url)["used_last_minute"]["tokens"] == usage["total_tokens"]


def test_batches_need_a_batch_allowance_beside_a_token_limit(servers) -> None:
    url = start(servers, SimBackend("s", api_key="key-1"), "bob=100000tpm,alice=100000tpm/1bph")
    line = {"custom_id": "1", "method": "POST", "url": "/chat/completions", "body": {"model": "chat"}}
    for key in (BOB, ALICE):
        client = v1(url, key)
        upload = client.files.create(file=("in.jsonl", json.dumps(line).encode()), purpose="batch")
        create = {"input_file_id": upload.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        if key == BOB:
            with pytest.raises(openai.PermissionDeniedError) as refused:
                client.batches.create(**create)
            assert refused.value.code == "ClientQuotaExceeded"
        else:
            assert client.batches.create(**create).id
            with pytest.raises(openai.RateLimitError, match="1 batches per hour"):
                client.batches.create(**create)


def test_reservations_in_flight_count_on_the_other_instance(servers, azurite) -> None:
    # Streams of up to 15 s: a's is surely in flight while b is asked, and ends once the test lets it (below).
    backend = SimBackend("s", api_key="key-1", chunks=60, chunk_gap=0.25)
    env = {
        "LB_CLIENT_KEYS": KEYS,
        "LB_CLIENT_LIMITS": "bob=2000tpm",
        "LB_RESERVE_TOKENS": str(RESERVE),
        "BACKEND_1_URL": servers.start(backend),
        "BACKEND_1_APIKEY": "key-1",
        "LB_STATE_CONNECTION_STRING": azurite.connection_string,
        "LB_STATE_TABLE": "q" + uuid.uuid4().hex[:12],
    }
    a, b = (start_instance(servers, env) for _ in range(2))
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    streams: list[int] = []

    def stream_on_a() -> None:
        with httpx.Client(timeout=30) as http:
            streams.append(
                http.post(a + "/openai/v1/chat/completions", json=body, headers={"api-key": BOB}).status_code
            )

    threads = [threading.Thread(target=stream_on_a)]
    for t in threads:
        t.start()
    until(lambda: limit_of(b)["used_last_minute"]["tokens"] >= RESERVE)  # b sees a's call in flight
    refused = httpx.post(b + "/openai/v1/chat/completions", json=body, headers={"api-key": BOB})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "ClientQuotaExceeded"
    backend.chunk_gap = 0  # the rest of a's stream at once; alice's stream is not held either
    assert httpx.post(b + "/openai/v1/chat/completions", json=body, headers={"api-key": ALICE}).status_code == 200
    for t in threads:
        t.join()
    assert streams == [200]


def test_a_background_response_polled_through_another_instance_is_charged_once(servers, azurite) -> None:
    backend = SimBackend("s", api_key="key-1", chunks=50)
    env = {
        "LB_CLIENT_KEYS": KEYS,
        "LB_CLIENT_LIMITS": "bob=100000tpm",
        "BACKEND_1_URL": servers.start(backend),
        "BACKEND_1_APIKEY": "key-1",
        "LB_STATE_CONNECTION_STRING": azurite.connection_string,
        "LB_STATE_TABLE": "q" + uuid.uuid4().hex[:12],
    }
    a, b = (start_instance(servers, env) for _ in range(2))
    created = v1(a).responses.create(model="chat", input="write a lot", background=True)
    until(lambda: limit_of(b)["used_last_minute"]["tokens"] >= RESERVE)  # a's hold, seen by b
    final = v1(b).responses.retrieve(created.id)
    while final.status != "completed":
        final = v1(b).responses.retrieve(created.id)
    for instance in (a, b):  # a lets its hold go once it reads that b charged the response; b then reads a
        until(lambda url=instance: limit_of(url)["used_last_minute"]["tokens"] == final.usage.total_tokens)

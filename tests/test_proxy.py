"""End to end: the real openai SDK -> the local runner on a socket -> simulated Azure OpenAI backends."""

from __future__ import annotations

import os
import socket
import time
from collections import Counter

import httpx
import openai
import pytest

from lb.sim import SimBackend
from tests.conftest import CLIENT_KEY, SendTimes, Stalls, wait_until

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(client: openai.AzureOpenAI | openai.OpenAI, model: str = "chat"):
    return client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)


def test_normal_scenario_spreads_calls_randomly_over_healthy_backends(make_pool):
    pool = make_pool(3)
    client = pool.azure()
    served = Counter()
    for _ in range(60):
        raw = chat(client)
        assert raw.status_code == 200
        completion = raw.parse()
        served[raw.headers["x-lb-backend"]] += 1
        assert completion.choices[0].message.content.startswith("Hello from sim")
        assert raw.headers["x-lb-attempts"] == "1"
    assert set(served) == {"1", "2", "3"}
    assert min(served.values()) >= 8  # uniform weights: ~20 each


def test_each_backend_gets_its_own_key_and_never_the_clients(make_pool):
    pool = make_pool(2)
    client = pool.azure()
    for _ in range(10):
        chat(client)
    pool.v1().embeddings.create(model="embedding", input="x")
    for i, backend in enumerate(pool.backends, start=1):
        for call in backend.calls:
            assert call.headers["api-key"] == f"key-{i}"
            assert "authorization" not in call.headers
            assert CLIENT_KEY not in str(call.headers)


def test_throttled_backend_is_retried_elsewhere_and_kept_out_until_retry_after(make_pool):
    pool = make_pool(2)
    throttled = pool.backends[0]
    # Room for the 20 calls below while it cools, even on a machine busy enough to slow each tenfold.
    throttled.throttle_next, throttled.retry_after = 1000, 1.5
    client = pool.azure()
    first = chat(client)
    while throttled.count(429) == 0:  # until the random pick has hit the throttled one once
        first = chat(client)
    assert first.status_code == 200 and first.headers["x-lb-backend"] == "2"
    assert first.headers["x-lb-attempts"] == "2"
    assert 1.0 < pool.proxy.store.cooling_until("1", "chat", time.time()) - time.time() <= 1.5  # its Retry-After
    calls_when_throttled = len(throttled.calls)
    for _ in range(20):
        raw = chat(client)
        assert raw.headers["x-lb-backend"] == "2" and raw.headers["x-lb-attempts"] == "1"
    assert len(throttled.calls) == calls_when_throttled  # out of rotation for its Retry-After
    throttled.throttle_next = 0
    wait_until(lambda: pool.proxy.store.cooling_until("1", "chat", time.time()) == 0, "the Retry-After to pass")
    served = Counter(chat(client).headers["x-lb-backend"] for _ in range(30))
    assert served["1"] > 0  # back in rotation once Retry-After passed


def test_cooldown_is_per_deployment(make_pool):
    pool = make_pool(2)
    pool.backends[0].throttle_next, pool.backends[0].retry_after = 1, 30
    client = pool.azure()
    while pool.backends[0].count(429) == 0:
        chat(client)
    assert any(chat(client, "other").headers["x-lb-backend"] == "1" for _ in range(30))
    assert all(chat(client).headers["x-lb-backend"] == "2" for _ in range(10))


def test_all_backends_throttled_answers_429_at_once_with_the_soonest_recovery(make_pool):
    pool = make_pool(2)
    pool.backends[0].throttle_next, pool.backends[0].retry_after = 100, 5
    pool.backends[1].throttle_next, pool.backends[1].retry_after = 100, 3
    client = pool.azure()
    with pytest.raises(openai.RateLimitError) as first:
        chat(client)
    assert first.value.response.headers["x-lb-attempts"] == "2"
    assert first.value.response.headers["retry-after"] == "3"
    calls = sum(len(b.calls) for b in pool.backends)
    started = time.perf_counter()
    with Stalls(os.getpid()) as stalls, pytest.raises(openai.RateLimitError) as cooling:
        chat(client)
    assert time.perf_counter() - started < 0.5 + stalls.seconds  # answered at once: what a loaded machine adds aside
    assert sum(len(b.calls) for b in pool.backends) == calls  # no backend call while all cool
    response = cooling.value.response
    assert response.headers["x-lb-attempts"] == "0"
    assert 1 <= int(response.headers["retry-after"]) <= 3
    assert 0 < int(response.headers["retry-after-ms"]) <= 3000
    assert response.json()["error"]["code"] == "429"


def test_priority_group_is_drained_first_and_weights_split_the_load(make_pool):
    pool = make_pool(
        3,
        env={
            "BACKEND_1_PRIORITY": "1",
            "BACKEND_1_WEIGHT": "3",
            "BACKEND_2_PRIORITY": "1",
            "BACKEND_2_WEIGHT": "1",
            "BACKEND_3_PRIORITY": "2",
        },
    )
    client = pool.azure()  # one client: making one costs more than a call
    served = Counter(chat(client).headers["x-lb-backend"] for _ in range(180))
    assert served["3"] == 0
    # 3:1 expected, so backend 1's count is Binomial(180, 0.75), mean 135. The check fails only if it
    # is 105 or less (105 > 1.4 * 75 is false) or 180 (none for 2): P = 7.3e-7, summed exactly from
    # the binomial terms. Weights ignored (1:1) would pass it with P = 0.010.
    assert served["1"] > 1.4 * served["2"] > 0
    pool.backends[0].throttle_next = pool.backends[1].throttle_next = 1000
    assert chat(client).headers["x-lb-backend"] == "3"  # spills to priority 2 when group 1 cools


def test_5xx_fails_over_and_the_last_backends_error_passes_through(make_pool):
    pool = make_pool(2, env={"LB_DEFAULT_COOLDOWN_SECONDS": "0"})  # an open circuit cools 0 s: 1 stays in play
    pool.backends[0].fail_status = 503
    client = pool.azure()
    assert all(chat(client).headers["x-lb-backend"] == "2" for _ in range(10))
    pool.backends[1].fail_status = 500
    with pytest.raises(openai.InternalServerError) as exc:
        chat(client)
    assert exc.value.response.headers["x-lb-attempts"] == "2"
    assert exc.value.response.json()["error"]["message"] == "Simulated failure."


def test_client_errors_pass_through_untouched_without_retry(make_pool):
    pool = make_pool(2)
    pool.backends[0].fail_status = pool.backends[1].fail_status = 400
    with pytest.raises(openai.BadRequestError) as exc:
        chat(pool.azure())
    assert exc.value.response.headers["x-lb-attempts"] == "1"
    assert sum(len(b.calls) for b in pool.backends) == 1


def test_connection_refused_fails_over_then_answers_502(make_pool, servers):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    pool = make_pool(1, env={"BACKEND_9_URL": dead, "BACKEND_9_APIKEY": "k"})
    client = pool.azure()
    assert all(chat(client).headers["x-lb-backend"] == "1" for _ in range(10))
    pool.backends[0].fail_status = 503
    with pytest.raises(openai.APIStatusError) as exc:
        chat(client)
    assert exc.value.status_code in (502, 503)
    assert exc.value.response.json()["error"]["code"]


async def never_answers(scope, receive, send) -> None:
    """A backend that reads the request and never answers. It returns once the caller hangs up, so
    nothing of it is left running for the servers' shutdown to wait out (SimBackend.hang waits forever)."""
    if scope["type"] != "http":
        return
    while (await receive())["type"] != "http.disconnect":
        pass


def test_a_backend_that_never_answers_hits_the_deadline_with_504(make_pool, servers):
    silent = servers.start(never_answers)
    pool = make_pool(0, env={"HTTP_TIMEOUT_SECONDS": "0.5", "BACKEND_9_URL": silent, "BACKEND_9_APIKEY": "k"})
    started = time.perf_counter()
    with pytest.raises(openai.APIStatusError) as exc:
        chat(pool.azure())
    assert exc.value.status_code == 504
    assert exc.value.response.json()["error"]["code"] == "GatewayTimeout"
    assert time.perf_counter() - started < 2


def test_attempts_are_capped_by_lb_max_attempts(make_pool):
    pool = make_pool(3, env={"LB_MAX_ATTEMPTS": "2"})
    for b in pool.backends:
        b.fail_status = 503
    with pytest.raises(openai.InternalServerError) as exc:
        chat(pool.azure())
    assert exc.value.response.headers["x-lb-attempts"] == "2"
    assert sum(len(b.calls) for b in pool.backends) == 2


def test_streamed_chat_arrives_chunk_by_chunk(make_pool, servers):
    # 3 words, the finish, usage and [DONE], 0.2 s apart; the backend notes when it sends each
    backend = SendTimes(SimBackend("sim1", api_key="k", chunks=3, chunk_gap=0.2))
    pool = make_pool(0, env={"BACKEND_1_URL": servers.start(backend), "BACKEND_1_APIKEY": "k"})
    arrivals, text = [], ""
    with Stalls() as client_waits:  # this thread's waits for a CPU: a loaded machine's, not the proxy's
        for chunk in pool.azure().chat.completions.create(model="chat", messages=MESSAGES, stream=True):
            arrivals.append(time.perf_counter() - client_waits.so_far())
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
    assert text == "sim1 tok0 tok1 tok2" and len(backend.sent) == 6
    # Each of the words and the finish was in the client's hands before the backend sent the next
    # part (so the first was not held back until the end): an order, not a bound on gaps.
    assert all(arrived < sent_next for arrived, sent_next in zip(arrivals[:4], backend.sent[1:5], strict=True))


def test_streaming_fails_over_before_the_first_byte(make_pool):
    pool = make_pool(2)
    pool.backends[0].throttle_next = 1000
    for _ in range(5):
        chunks = list(pool.v1().chat.completions.create(model="chat", messages=MESSAGES, stream=True))
        assert chunks[0].choices[0].delta.content.startswith("sim2")


def test_broken_streams_end_with_an_error_and_the_third_in_a_row_cools_the_backend(make_pool):
    pool = make_pool(1, chunks=4, break_stream_after=2)
    for expected_cooling in (False, False, True):  # one break is one request's outcome; three agree
        with pytest.raises(openai.APIError):
            for _ in pool.azure().chat.completions.create(model="chat", messages=MESSAGES, stream=True):
                pass
        assert (pool.proxy.store.cooling_until("1", "chat", time.time()) > 0) is expected_cooling


def test_client_disconnect_cancels_the_upstream_stream_without_retry(make_pool):
    pool = make_pool(2, chunks=20, chunk_gap=0.05)  # a full answer would take ~1 s
    with httpx.Client(timeout=5) as client:
        with client.stream(
            "POST",
            f"{pool.url}/openai/deployments/chat/chat/completions?api-version=2024-10-21",
            headers={"api-key": CLIENT_KEY},
            json={"messages": MESSAGES, "stream": True},
        ) as response:
            assert response.status_code == 200
            next(response.iter_raw())
    wait_until(lambda: sum(b.disconnects for b in pool.backends) == 1, "the proxy to hang up on the backend")
    served = [b for b in pool.backends if b.calls]
    assert len(served) == 1  # not retried elsewhere
    assert served[0].disconnects == 1  # the proxy hung up on the backend: upstream was cancelled
    assert served[0].count(200) == 0
    assert pool.proxy.store.active() == []  # the client left: the backend did nothing wrong, nothing cools


def test_v1_shape_routes_by_model_in_body(make_pool):
    pool = make_pool(2, env={"BACKEND_1_DEPLOYMENTS": "chat", "BACKEND_2_DEPLOYMENTS": "embedding"})
    client = pool.v1()
    assert all(chat(client).headers["x-lb-backend"] == "1" for _ in range(5))
    raw = client.embeddings.with_raw_response.create(model="embedding", input="x")
    assert raw.headers["x-lb-backend"] == "2"
    assert raw.parse().data[0].embedding == [0.1, 0.2, 0.3, 0.4]
    with pytest.raises(openai.NotFoundError) as exc:
        chat(client, "nobody-serves-this")
    assert exc.value.response.json()["error"]["code"] == "DeploymentNotFound"


def test_embeddings_on_the_azure_shape(make_pool):
    pool = make_pool(2)
    result = pool.azure().embeddings.create(model="embedding", input=["a", "b"])
    assert result.data[0].embedding == [0.1, 0.2, 0.3, 0.4]
    call = next(c for b in pool.backends for c in b.calls)
    assert call.path == "/openai/deployments/embedding/embeddings"


def test_wrong_or_missing_client_key_is_401_without_a_backend_call(make_pool):
    pool = make_pool(1)
    with pytest.raises(openai.AuthenticationError) as exc:
        chat(pool.azure(key="wrong"))
    assert exc.value.response.json()["error"]["code"] == "401"
    assert "WWW-Authenticate" in exc.value.response.headers
    missing = httpx.post(f"{pool.url}/openai/deployments/chat/chat/completions", json={})
    assert missing.status_code == 401
    bearer = httpx.post(
        f"{pool.url}/openai/deployments/chat/chat/completions?api-version=1",
        json={"messages": MESSAGES},
        headers={"authorization": f"Bearer {CLIENT_KEY}"},
    )
    assert bearer.status_code == 200
    assert len(pool.backends[0].calls) == 1


def test_bad_input_gets_azure_shaped_errors(make_pool):
    pool = make_pool(1, env={"LB_MAX_BODY_BYTES": "1000"})
    headers = {"api-key": CLIENT_KEY}
    cases = [
        ("/openai/v1/chat/completions", b"{not json", 400),
        ("/openai/deployments/chat/chat/completions", b"x" * 2000, 413),
        ("/openai/deployments/%2e%2e/chat/completions", b"{}", 400),
        ("/openai/deployments/a%5cb/chat", b"{}", 400),
    ]
    for path, body, status in cases:
        response = httpx.post(pool.url + path, content=body, headers={**headers, "content-type": "application/json"})
        assert response.status_code == status, path
        assert set(response.json()["error"]) == {"code", "message"}
    assert pool.backends[0].calls == []


def test_backend_ratelimit_headers_pass_through(make_pool):
    pool = make_pool(1)
    raw = chat(pool.azure())
    assert raw.headers["x-ratelimit-remaining-requests"] == "1000"
    assert raw.headers["apim-request-id"]


def test_healthz_and_status(make_pool):
    pool = make_pool(2, env={"BACKEND_2_DEPLOYMENTS": "chat"})
    assert httpx.get(pool.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(pool.url + "/lb/status").status_code == 401
    pool.backends[0].throttle_next, pool.backends[0].retry_after = 1, 20
    client = pool.azure()
    while pool.backends[0].count(429) == 0:
        chat(client)
    status = httpx.get(pool.url + "/lb/status", headers={"api-key": CLIENT_KEY}).json()
    first, second = status["backends"]
    assert first["name"] == "1" and first["host"].startswith("127.0.0.1:")
    assert first["cooldowns"][0]["deployment"] == "chat"
    assert 15 < first["cooldowns"][0]["seconds_left"] <= 20
    assert second["deployments"] == ["chat"] and second["cooldowns"] == []
    assert status["state"]["kind"] == "memory"
    assert "key-1" not in str(status)

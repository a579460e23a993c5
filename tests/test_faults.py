"""Backends and clients misbehaving, through the real runner: every call ends, in bounded time, well-formed."""

from __future__ import annotations

import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate

import httpx
import openai
import pytest

from lb.sim import SimBackend
from tests.conftest import API_VERSION, CLIENT_KEY, SendTimes, Stalls

MESSAGES = [{"role": "user", "content": "hi"}]


def chat_url(url: str, deployment: str = "chat") -> str:
    return f"{url}/openai/deployments/{deployment}/chat/completions?api-version={API_VERSION}"


def post(url: str, deployment: str = "chat", **kwargs: object) -> httpx.Response:
    kwargs.setdefault("json", {"messages": MESSAGES})
    kwargs.setdefault("headers", {"api-key": CLIENT_KEY})
    # Plain HTTP on loopback: verify=False spares each call loading the CA bundle (most of its CPU).
    return httpx.post(chat_url(url, deployment), timeout=10, verify=False, **kwargs)


def established(port: int) -> int:
    """TCP connections on 127.0.0.1 with `port` at either end, from /proc/net/tcp (state 01).

    The table is read a few times and the most seen is kept: a table that changes while it is
    read (other processes share this machine) can momentarily skip a row.
    """
    most = 0
    for _ in range(3):
        with open("/proc/net/tcp", "rb") as f:
            lines = f.read().decode().splitlines()[1:]
        count = 0
        for line in lines:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state == "01" and port in (int(local.split(":")[1], 16), int(remote.split(":")[1], 16)):
                count += 1
        most = max(most, count)
    return most


class Silent:
    """Accepts connections and reads requests, but never answers (a raw server: nothing to drain at exit)."""

    def __init__(self) -> None:
        self.requests = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            await reader.read()  # until the caller hangs up
        finally:
            writer.close()


def test_a_silent_backend_costs_streamed_calls_one_attempt_timeout_and_three_such_calls_cool_it(make_pool, servers):
    silent = Silent()
    env = {"HTTP_TIMEOUT_SECONDS": "2", "LB_ATTEMPT_TIMEOUT_SECONDS": "0.3", "LB_DEFAULT_COOLDOWN_SECONDS": "30"}
    pool = make_pool(1, env={**env, "BACKEND_9_URL": servers.start_tcp(silent), "BACKEND_9_APIKEY": "k"})
    stream = {"messages": MESSAGES, "stream": True}
    while silent.requests < 3:  # until the random pick has landed on the silent one three times
        seen = silent.requests
        started = time.perf_counter()
        with Stalls(os.getpid()) as stalls:  # what a loaded machine adds: the threads' waits for a CPU
            response = post(pool.url, json=stream)
        duration = time.perf_counter() - started
        assert response.status_code == 200 and response.headers["x-lb-backend"] == "1"
        if silent.requests > seen:
            assert response.headers["x-lb-attempts"] == "2"  # the silent one, then the healthy one
            assert 0.3 <= duration < 0.3 + 0.5 + stalls.seconds
            expected = silent.requests >= 3  # distinct requests agree: only then is it the backend's fault
            assert (pool.proxy.store.cooling_until("9", "chat", time.time()) > 0) is expected
    for _ in range(10):  # cooled: the next calls go straight to the healthy backend
        started = time.perf_counter()
        with Stalls(os.getpid()) as stalls:
            response = post(pool.url, json=stream)
        assert response.status_code == 200 and response.headers["x-lb-backend"] == "1"
        assert time.perf_counter() - started < 0.3 + stalls.seconds  # not the silent one's attempt timeout
    assert silent.requests == 3


def test_a_non_streamed_call_longer_than_the_attempt_timeout_is_answered_once_and_cools_nothing(make_pool):
    env = {"HTTP_TIMEOUT_SECONDS": "3", "LB_ATTEMPT_TIMEOUT_SECONDS": "0.2"}
    pool = make_pool(3, env=env, latency=0.6)  # a reasoning model: no header before the whole answer
    with ThreadPoolExecutor(4) as clients:  # four at once: the 0.6 s waits overlap
        responses = list(clients.map(lambda _: post(pool.url), range(4)))
    for response in responses:
        assert response.status_code == 200 and response.headers["x-lb-attempts"] == "1"
    assert sum(len(b.calls) for b in pool.backends) == 4  # one upstream call per call: never billed twice
    assert pool.proxy.store.active() == []


def test_the_last_backend_left_gets_the_rest_of_the_deadline_not_the_attempt_timeout(make_pool, servers):
    silent = Silent()
    env = {"HTTP_TIMEOUT_SECONDS": "0.5", "LB_ATTEMPT_TIMEOUT_SECONDS": "0.2"}
    pool = make_pool(0, env={**env, "BACKEND_9_URL": servers.start_tcp(silent), "BACKEND_9_APIKEY": "k"})
    started = time.perf_counter()
    with Stalls(os.getpid()) as stalls:
        response = post(pool.url)
    assert response.status_code == 504
    assert 0.5 <= time.perf_counter() - started < 0.5 + 0.5 + stalls.seconds  # the whole deadline for the only one


def test_when_every_backend_is_silent_the_whole_request_still_ends_at_the_deadline(make_pool, servers):
    silent = Silent()
    env = {"HTTP_TIMEOUT_SECONDS": "0.5", "BACKEND_1_WEIGHT": "0"}
    for name in ("7", "8", "9"):
        env |= {f"BACKEND_{name}_URL": servers.start_tcp(silent), f"BACKEND_{name}_APIKEY": "k"}
    pool = make_pool(1, env=env)
    started = time.perf_counter()
    with Stalls(os.getpid()) as stalls:
        response = post(pool.url)
    assert response.status_code == 504 and response.json()["error"]["code"] == "GatewayTimeout"
    assert time.perf_counter() - started < 0.5 + 0.5 + stalls.seconds  # one deadline in all, not one per backend
    assert 1 <= silent.requests <= 3


def test_a_stream_silent_past_http_timeout_seconds_mid_way_is_ended_within_it_and_the_sdk_names_our_limit(
    make_pool, servers
):
    backend = SendTimes(SimBackend("sim1", api_key="k", chunks=5, chunk_gap=30))  # one event, then 30 s of silence
    pool = make_pool(
        0, env={"HTTP_TIMEOUT_SECONDS": "0.5", "BACKEND_1_URL": servers.start(backend), "BACKEND_1_APIKEY": "k"}
    )
    client = pool.azure(timeout=10)
    received = []
    limit = r"^The load balancer ended this answer: the backend sent nothing for 0.5 seconds .*HTTP_TIMEOUT_SECONDS"
    with pytest.raises(openai.APIError, match=limit) as raised:
        for chunk in client.chat.completions.create(model="chat", messages=MESSAGES, stream=True):
            received.append(chunk)
            last = time.perf_counter()
    ended = time.perf_counter()
    # Silent 0.5 s as the proxy saw it: it read the event after the backend sent it, so the cut comes
    # 0.5 s after that at the earliest; and within the timeout + 1 s of the event the client last saw.
    assert received and len(backend.sent) == 1
    assert ended - backend.sent[0] >= 0.5 and ended - last < 0.5 + 1
    assert raised.value.body == {"code": "GatewayTimeout", "message": raised.value.message}
    # Cut by our limit, it is that request's length (a reasoning model may pause that long): no cooling.
    assert pool.proxy.store.active() == []


async def _reset_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"choices": [')
    await writer.drain()
    writer.transport.abort()  # RST after 14 of the 1000 promised bytes


def test_a_backend_that_resets_mid_body_closes_the_clients_answer_and_three_resets_cool_it(make_pool, servers, caplog):
    reset_url = servers.start_tcp(_reset_mid_body)
    pool = make_pool(1, env={"BACKEND_1_PRIORITY": "2", "BACKEND_9_URL": reset_url, "BACKEND_9_APIKEY": "k"})
    for expected_cooling in (False, False, True):
        started = time.perf_counter()
        with pytest.raises(httpx.HTTPError):  # a short body and a closed connection: never a complete "success"
            post(pool.url)
        assert time.perf_counter() - started < 2
        assert (pool.proxy.store.cooling_until("9", "chat", time.time()) > 0) is expected_cooling
    assert post(pool.url).headers["x-lb-backend"] == "1"  # the next call avoids it
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)


GARBAGE_RETRY_AFTER = {
    "negative": ("-5", "default"),
    "word": ("abc", "default"),
    "huge": (str(10**12), "max"),
    "past-date": (formatdate(time.time() - 3600, usegmt=True), "default"),
    "empty": ("", "default"),
}


async def _garbage_throttler(scope, receive, send) -> None:
    """Answers 429 with the Retry-After named by the deployment, e.g. /openai/deployments/huge/..."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    value = GARBAGE_RETRY_AFTER[scope["path"].split("/")[3]][0]
    body = json.dumps({"error": {"code": "429", "message": "Rate limit is exceeded."}}).encode()
    headers = [(b"content-type", b"application/json"), (b"retry-after", value.encode())]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def test_garbage_retry_after_headers_give_bounded_cooldowns_and_the_call_still_succeeds(make_pool, servers):
    env = {
        "BACKEND_1_PRIORITY": "2",
        "BACKEND_9_URL": servers.start(_garbage_throttler),
        "BACKEND_9_APIKEY": "k",
        "LB_DEFAULT_COOLDOWN_SECONDS": "7",
        "LB_MAX_COOLDOWN_SECONDS": "30",
    }
    pool = make_pool(1, env=env)
    for deployment, (_, expected) in GARBAGE_RETRY_AFTER.items():
        response = post(pool.url, deployment)
        assert response.status_code == 200 and response.headers["x-lb-attempts"] == "2", deployment
        left = pool.proxy.store.cooling_until("9", deployment, time.time()) - time.time()
        want = 7 if expected == "default" else 30
        assert want - 1 < left <= want, (deployment, left)


async def _invalid_body(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"choices": [{"broken\x00'})


def test_a_200_with_an_invalid_body_is_passed_through_untouched_and_not_retried(make_pool, servers):
    env = {"BACKEND_1_PRIORITY": "2", "BACKEND_9_URL": servers.start(_invalid_body), "BACKEND_9_APIKEY": "k"}
    pool = make_pool(1, env=env)
    response = post(pool.url)
    assert response.status_code == 200 and response.content == b'{"choices": [{"broken\x00'
    assert response.headers["x-lb-backend"] == "9" and response.headers["x-lb-attempts"] == "1"
    assert pool.backends[0].calls == []
    assert pool.proxy.store.cooling_until("9", "chat", time.time()) == 0


def test_a_client_that_hangs_up_mid_stream_leaves_no_upstream_connection_open(make_pool):
    pool = make_pool(1, chunks=40, chunk_gap=0.05)
    backend_port = pool.proxy.settings.backends[0].url.rsplit(":", 1)[1]
    with httpx.Client(timeout=5) as client:
        with client.stream(
            "POST", chat_url(pool.url), headers={"api-key": CLIENT_KEY}, json={"messages": MESSAGES, "stream": True}
        ) as response:
            chunks = response.iter_raw()
            next(chunks)
            assert established(int(backend_port)) == 2  # proxy -> backend, seen from both ends
    deadline = time.monotonic() + 3
    while established(int(backend_port)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert established(int(backend_port)) == 0
    assert len(pool.backends[0].calls) == 1 and pool.backends[0].disconnects == 1


def test_a_backend_header_that_is_not_latin_1_passes_through_as_sent(make_pool, servers):
    async def euro(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read(200)
        body = b'{"choices": []}'
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-note: 5 \xe2\x82\xac\r\n"
        writer.write(head + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    pool = make_pool(0, env={"BACKEND_9_URL": servers.start_tcp(euro), "BACKEND_9_APIKEY": "k"})
    response = post(pool.url)
    assert response.status_code == 200 and response.json() == {"choices": []}
    assert response.headers.raw[[k for k, _ in response.headers.raw].index(b"x-note")][1] == b"5 \xe2\x82\xac"


async def _drip_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A head sent one byte every 0.1 s: each read is quick, the whole never comes."""
    await reader.readuntil(b"\r\n\r\n")
    try:
        for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + b"x-pad: " + b"a" * 1000:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.1)
    except ConnectionError:
        pass
    finally:
        writer.close()


def test_a_backend_dripping_its_head_is_cut_at_the_deadline_as_wall_clock(make_pool, servers):
    env = {"HTTP_TIMEOUT_SECONDS": "0.5", "BACKEND_9_URL": servers.start_tcp(_drip_head), "BACKEND_9_APIKEY": "k"}
    pool = make_pool(0, env=env)
    started = time.perf_counter()
    with Stalls(os.getpid()) as stalls:
        response = post(pool.url)
    assert response.status_code == 504 and response.json()["error"]["code"] == "GatewayTimeout"
    assert time.perf_counter() - started < 0.5 + 0.5 + stalls.seconds


async def _no_continue(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Never sends `100 Continue`: answers once the whole body is in, saying whether Expect came."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    await reader.readexactly(length)
    body = json.dumps({"expect": b"expect:" in head.lower()}).encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    writer.close()


def test_expect_100_continue_is_not_forwarded_so_a_backend_that_never_sends_100_still_answers(make_pool, servers):
    pool = make_pool(
        0,
        env={"HTTP_TIMEOUT_SECONDS": "2", "BACKEND_9_URL": servers.start_tcp(_no_continue), "BACKEND_9_APIKEY": "k"},
    )
    started = time.perf_counter()
    response = post(pool.url, headers={"api-key": CLIENT_KEY, "expect": "100-continue"})
    assert response.status_code == 200 and response.json() == {"expect": False}
    assert time.perf_counter() - started < 1


async def _drip_body(scope, receive, send) -> None:
    """A chunked, non-SSE answer that trickles for 10 s (a file download, a slow proxy). It stops
    when its caller hangs up, so nothing of it is left for the servers' shutdown to wait out."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    gone = asyncio.ensure_future(receive())  # the next message can only be http.disconnect
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    for _ in range(200):
        await send({"type": "http.response.body", "body": b" " * 100, "more_body": True})
        await asyncio.wait([gone], timeout=0.05)
        if gone.done():
            return
    gone.cancel()
    await send({"type": "http.response.body", "body": b"{}"})


def test_a_client_leaving_a_non_sse_answer_closes_its_upstream_connection(make_pool, servers):
    pool = make_pool(0, env={"BACKEND_9_URL": servers.start(_drip_body), "BACKEND_9_APIKEY": "k"})
    backend_port = int(pool.proxy.settings.backends[0].url.rsplit(":", 1)[1])
    with httpx.Client(timeout=5) as client:
        with client.stream("POST", chat_url(pool.url), headers={"api-key": CLIENT_KEY}, json={"messages": []}) as r:
            chunks = r.iter_raw()
            next(chunks)
            next(chunks)
            assert established(backend_port) == 2
    deadline = time.monotonic() + 3
    while established(backend_port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert established(backend_port) == 0  # long before the backend would have ended it (10 s)


async def _sse_with_length_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    event = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}], "id": "1", "object": "x", "created": 0}\n\n'
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 5000\r\n\r\n" + event)
    await writer.drain()
    await asyncio.sleep(0.3)  # read by the proxy before the reset (a reset discards what is unread)
    writer.transport.abort()


def test_a_broken_sse_answer_with_a_declared_length_ends_with_an_error_event_and_no_server_error(
    make_pool, servers, caplog
):
    pool = make_pool(0, env={"BACKEND_9_URL": servers.start_tcp(_sse_with_length_then_reset), "BACKEND_9_APIKEY": "k"})
    with httpx.Client(timeout=5) as client:
        with client.stream(
            "POST", chat_url(pool.url), headers={"api-key": CLIENT_KEY}, json={"messages": [], "stream": True}
        ) as response:
            assert "content-length" not in response.headers
            body = b"".join(response.iter_raw())
    # The backend's failure, named as the backend's: not one of the balancer's limits.
    last = json.loads(body.rstrip().rsplit(b"\n\n", 1)[1].removeprefix(b"data: "))
    assert last["error"]["code"] == "BadGateway"
    assert last["error"]["message"].startswith("The backend stream ended unexpectedly (")
    assert "Content-Length" not in caplog.text and not any(r.exc_info for r in caplog.records)

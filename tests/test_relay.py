"""How long an answer's body may go on (lb.relay): silence is bounded, length is not, unless asked.

The first tests drive `UpstreamResponse` alone (a paced body, a fake ASGI send; no sockets); the
rest go through the runner with the real openai SDK against simulated backends.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import openai
import pytest

from lb.config import ConfigError, Settings, load_settings
from lb.relay import CLOCK_SLACK, BodyLimits, UpstreamResponse
from tests.conftest import CLIENT_KEY, Stalls

MESSAGES = [{"role": "user", "content": "hi"}]
EVENT = b'data: {"choices": []}\n\n'
# Seconds a cut may come after its limit on a quiet machine; on a loaded one, plus the time the
# loop waited for a CPU meanwhile (Stalls).
SLACK = 0.15


class Paced(httpx.AsyncByteStream):
    """A backend's body: one event after each gap (seconds)."""

    def __init__(self, gaps: list[float]) -> None:
        self.gaps = gaps
        self.closed = False

    async def __aiter__(self):
        for gap in self.gaps:
            await asyncio.sleep(gap)
            yield EVENT

    async def aclose(self) -> None:
        self.closed = True


class Relayed:
    """What one relayed answer sent the client, how its end was reported, and when."""

    def __init__(self, gaps: list[float], limits: BodyLimits, *, sse: bool = True, client_takes: float = 0.0) -> None:
        self.stream = Paced(gaps)
        content_type = "text/event-stream" if sse else "application/json"
        upstream = httpx.Response(200, headers={"content-type": content_type}, stream=self.stream)
        self.ended: list[Exception | None] = []
        self.response = UpstreamResponse(upstream, "b1", 1, self.ended.append, limits=limits)
        self.client_takes = client_takes
        self.sent: list[dict] = []
        self.seconds = 0.0
        self.ended_at = 0.0  # time.monotonic(), the clock of BodyLimits.until
        self.late = 0.0  # seconds the event loop waited for a CPU meanwhile (Stalls)

    async def run(self) -> Relayed:
        stalls = Stalls()
        started = time.perf_counter()
        try:
            with stalls:
                await self.response({"type": "http"}, self._receive, self._send)
        finally:
            self.seconds = time.perf_counter() - started
            self.ended_at = time.monotonic()
            self.late = stalls.seconds
        return self

    async def _receive(self) -> dict:
        await asyncio.Event().wait()  # a client that stays
        return {}

    async def _send(self, message: dict) -> None:
        self.sent.append(message)
        if self.client_takes and message.get("body"):
            await asyncio.sleep(self.client_takes)

    @property
    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m.get("body")]

    @property
    def completed(self) -> bool:
        return self.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}

    def last_event(self) -> dict:
        return json.loads(self.bodies[-1].removeprefix(b"data: "))


def relay(gaps: list[float], limits: BodyLimits, **kwargs: object) -> Relayed:
    return asyncio.run(Relayed(gaps, limits, **kwargs).run())  # type: ignore[arg-type]


def test_a_body_that_keeps_flowing_longer_than_the_silence_limit_arrives_whole():
    relayed = relay([0.1] * 5, BodyLimits(silence=0.25))  # twice the limit in all, never silent that long
    assert relayed.bodies == [EVENT] * 5 and relayed.completed
    assert relayed.seconds >= 0.5 and relayed.ended == [None]


def test_a_backend_silent_past_the_limit_is_cut_at_it_with_an_event_naming_http_timeout_seconds():
    relayed = relay([0, 0, 30], BodyLimits(silence=0.2))
    assert relayed.bodies[:2] == [EVENT, EVENT] and 0.2 <= relayed.seconds < 0.2 + SLACK + relayed.late
    assert relayed.last_event() == {
        "error": {
            "code": "GatewayTimeout",
            "message": "The load balancer ended this answer: the backend sent nothing for 0.2 seconds"
            " (its limit on silence, HTTP_TIMEOUT_SECONDS).",
        }
    }
    assert relayed.completed and relayed.stream.closed
    assert isinstance(relayed.ended[0], httpx.TimeoutException)  # our limit: not held against the backend


def test_the_optional_total_cuts_a_flowing_answer_and_names_lb_total_timeout_seconds():
    async def cut() -> tuple[Relayed, float]:
        until = time.monotonic() + 0.3  # set as the relay starts, not before the event loop has
        return await Relayed([0.05] * 40, BodyLimits(silence=1, total=0.3, until=until)).run(), until

    relayed, until = asyncio.run(cut())
    # Cut at `until` (its timer may fire a clock tick early), whenever the relay itself started.
    assert until - CLOCK_SLACK <= relayed.ended_at < until + SLACK + relayed.late and len(relayed.bodies) > 3
    error = relayed.last_event()["error"]
    assert error["code"] == "GatewayTimeout" and "0.3 seconds per call (LB_TOTAL_TIMEOUT_SECONDS)" in error["message"]


def test_a_client_slow_to_take_each_chunk_is_not_taken_for_a_silent_backend():
    relayed = relay([0] * 3, BodyLimits(silence=0.2), client_takes=0.3)
    assert relayed.bodies == [EVENT] * 3 and relayed.completed and relayed.ended == [None]


def test_a_json_answer_cut_by_a_limit_is_closed_short_never_completed():
    relayed = relay([0, 30], BodyLimits(silence=0.2), sse=False)
    assert relayed.bodies == [EVENT] and not relayed.completed and relayed.seconds < 0.2 + SLACK + relayed.late


def test_a_cancel_from_outside_is_not_swallowed_by_the_relay():
    async def cancelled() -> Relayed:
        relayed = Relayed([30], BodyLimits(silence=5))
        task = asyncio.ensure_future(relayed.run())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return relayed

    relayed = asyncio.run(cancelled())
    assert relayed.ended == [] and relayed.stream.closed


def test_body_limits_count_the_total_from_the_request_s_first_byte():
    settings = Settings(backends=(), timeout_seconds=100, total_timeout_seconds=600)
    deadline = time.monotonic() + 90  # the request arrived 10 s ago
    limits = BodyLimits.of(settings, deadline)
    assert limits.silence == 100 and limits.total == 600 and limits.until == pytest.approx(deadline - 100 + 600)
    assert BodyLimits.of(Settings(backends=(), timeout_seconds=7), deadline) == BodyLimits(silence=7)


# Settings -------------------------------------------------------------------------------------
BACKEND = {"BACKEND_1_URL": "https://a.openai.azure.com"}


def test_lb_total_timeout_seconds_is_off_unless_set():
    assert load_settings(BACKEND).total_timeout_seconds is None
    assert load_settings({**BACKEND, "LB_TOTAL_TIMEOUT_SECONDS": "0"}).total_timeout_seconds is None
    assert load_settings({**BACKEND, "LB_TOTAL_TIMEOUT_SECONDS": "900"}).total_timeout_seconds == 900


def test_lb_total_timeout_seconds_below_http_timeout_seconds_stops_start_up():
    env = {**BACKEND, "HTTP_TIMEOUT_SECONDS": "120", "LB_TOTAL_TIMEOUT_SECONDS": "60"}
    with pytest.raises(ConfigError, match=r"^LB_TOTAL_TIMEOUT_SECONDS: 60 is below HTTP_TIMEOUT_SECONDS \(120\)"):
        load_settings(env)
    with pytest.raises(ConfigError, match=r"^LB_TOTAL_TIMEOUT_SECONDS: 'soon' is not a number"):
        load_settings({**BACKEND, "LB_TOTAL_TIMEOUT_SECONDS": "soon"})


# Through the runner, with the openai SDK ------------------------------------------------------
def contents(stream) -> list[str | None]:
    return [chunk.choices[0].delta.content for chunk in stream if chunk.choices]


def test_a_stream_flowing_longer_than_http_timeout_seconds_reaches_the_sdk_whole(make_pool):
    # 3 words, the finish, the usage the proxy asks for and [DONE], 0.2 s apart: 1 s, never 0.5 s silent.
    pool = make_pool(1, env={"HTTP_TIMEOUT_SECONDS": "0.5"}, chunks=3, chunk_gap=0.2)
    client = pool.azure(timeout=10)
    started = time.perf_counter()
    through = contents(client.chat.completions.create(model="chat", messages=MESSAGES, stream=True))
    assert time.perf_counter() - started >= 1.0
    direct = openai.AzureOpenAI(
        azure_endpoint=pool.proxy.settings.backends[0].url, api_key="key-1", api_version="2024-10-21", max_retries=0
    )
    pool.backends[0].chunk_gap = 0  # the same answer, sent at once: what it should be, word for word
    assert through == contents(direct.chat.completions.create(model="chat", messages=MESSAGES, stream=True))
    assert len(through) >= 3 and pool.backends[0].disconnects == 0


def test_a_responses_stream_silent_past_the_limit_raises_in_the_sdk_naming_it(make_pool):
    pool = make_pool(1, env={"HTTP_TIMEOUT_SECONDS": "0.5"}, chunk_gap=30)
    client = pool.v1(timeout=10)
    events = []
    with pytest.raises(openai.APIError, match=r"sent nothing for 0.5 seconds .*HTTP_TIMEOUT_SECONDS"):
        for event in client.responses.create(model="chat", input="hi", stream=True):
            events.append(event)
            last = time.perf_counter()
    # Ended 0.5 s after the last event, not at the backend's next one (30 s) or the client's timeout
    # (10 s). Timed from that event, not from the call: how long the call took to start is not the limit's.
    assert events and time.perf_counter() - last < 0.5 + 1


def test_lb_total_timeout_seconds_ends_a_flowing_stream_and_the_sdk_names_it(make_pool):
    env = {"HTTP_TIMEOUT_SECONDS": "0.5", "LB_TOTAL_TIMEOUT_SECONDS": "0.6"}
    pool = make_pool(1, env=env, chunks=20, chunk_gap=0.1)  # 2 s, never silent
    client = pool.azure(timeout=10)
    started = time.perf_counter()
    received = []
    with (
        Stalls(os.getpid()) as stalls,
        pytest.raises(openai.APIError, match=r"limit of 0.6 seconds per call \(LB_TOTAL_TIMEOUT_SECONDS\)"),
    ):
        for chunk in client.chat.completions.create(model="chat", messages=MESSAGES, stream=True):
            received.append(chunk)
    assert 0.6 <= time.perf_counter() - started < 0.6 + 0.5 + stalls.seconds and len(received) >= 3
    assert pool.proxy.store.active() == []


async def _slow_json(scope, receive, send) -> None:
    """A non-streamed answer whose body comes in pieces 0.2 s apart, 0.8 s in all."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    for _ in range(4):
        await send({"type": "http.response.body", "body": b" " * 10, "more_body": True})
        await asyncio.sleep(0.2)
    await send({"type": "http.response.body", "body": b'{"ok": true}'})


def test_a_json_body_arriving_slowly_but_steadily_is_relayed_whole(make_pool, servers):
    pool = make_pool(
        0, env={"HTTP_TIMEOUT_SECONDS": "0.5", "BACKEND_9_URL": servers.start(_slow_json), "BACKEND_9_APIKEY": "k"}
    )
    url = f"{pool.url}/openai/deployments/chat/chat/completions?api-version=2024-10-21"
    response = httpx.post(url, headers={"api-key": CLIENT_KEY}, json={"messages": MESSAGES}, timeout=10)
    assert response.status_code == 200 and response.json() == {"ok": True}

"""Metering end to end: the real openai SDK through the proxy, on sockets, both APIs, JSON and streams."""

from __future__ import annotations

import contextlib
import json

import httpx
import pytest

from lb.metering import Metering
from lb.metering.usage import Usage
from lb.telemetry import Telemetry
from tests.conftest import CLIENT_KEY


def usage_report(pool, key: str = CLIENT_KEY) -> dict:
    response = httpx.get(pool.url + "/lb/usage", headers={"api-key": key})
    assert response.status_code == 200, response.text
    return response.json()


def test_counts_equal_the_usage_the_client_saw_for_json_and_streams_of_both_apis(make_pool) -> None:
    pool = make_pool(2)
    client = pool.v1()
    seen = {"prompt": 0, "completion": 0, "total": 0, "cached": 0, "requests": 0}

    def add(prompt: int, completion: int, total: int, cached: int = 0) -> None:
        for name, value in (("prompt", prompt), ("completion", completion), ("total", total), ("cached", cached)):
            seen[name] += value
        seen["requests"] += 1

    long_prompt = "many words " * 500  # 5,500 characters: the simulator reports some of it cached
    for text in ("hi", "a longer question about tokens", long_prompt):
        chat = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": text}])
        add(chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens,
            chat.usage.prompt_tokens_details.cached_tokens)  # fmt: skip
        stream = client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": text}],
            stream=True,
            stream_options={"include_usage": True},
        )
        final = [c for c in stream if c.usage is not None]
        assert len(final) == 1
        u = final[0].usage
        add(u.prompt_tokens, u.completion_tokens, u.total_tokens, u.prompt_tokens_details.cached_tokens)
        response = client.responses.create(model="chat", input=text)
        r = response.usage
        add(r.input_tokens, r.output_tokens, r.total_tokens, r.input_tokens_details.cached_tokens)
        with client.responses.stream(model="chat", input=text, instructions="be brief") as events:
            r = events.get_final_response().usage
        add(r.input_tokens, r.output_tokens, r.total_tokens, r.input_tokens_details.cached_tokens)
    embedding = pool.azure().embeddings.create(model="embed", input="some text")
    add(embedding.usage.prompt_tokens, 0, embedding.usage.total_tokens)

    report = usage_report(pool)
    counted = report["clients"]["key1"]["last_minute"]
    assert counted == {
        "requests": seen["requests"],
        "prompt_tokens": seen["prompt"],
        "completion_tokens": seen["completion"],
        "total_tokens": seen["total"],
        "cached_tokens": seen["cached"],
        "reasoning_tokens": 0,
        "unknown_usage": 0,
    }
    assert seen["cached"] > 0
    assert report["clients"]["key1"]["last_hour"] == counted
    by_backend = report["backends"]
    assert set(by_backend) <= {"1", "2"}
    assert sum(b["last_minute"]["total_tokens"] for b in by_backend.values()) == seen["total"]
    assert sum(b["last_minute"]["requests"] for b in by_backend.values()) == seen["requests"]


@pytest.mark.parametrize("mode", ["as-sent", "include"])
@pytest.mark.parametrize("options", [None, {"include_usage": False}])
def test_a_stream_whose_client_wants_no_usage_is_metered_and_relayed_without_the_usage_chunk(
    make_pool, mode: str, options: dict | None
) -> None:
    pool = make_pool(1, env={"LB_STREAM_USAGE": mode})
    extra = {} if options is None else {"stream_options": options}
    raw = httpx.post(
        pool.url + "/openai/v1/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": "x" * 400}], "stream": True, **extra},
        headers={"api-key": CLIENT_KEY},
    )
    events = [line for line in raw.text.split("\n\n") if line.startswith("data: {")]
    sent = json.loads(pool.backends[0].calls[-1].body)
    assert sent["stream_options"]["include_usage"] is True  # the balancer always asks
    shown = mode == "include" and options is None  # LB_STREAM_USAGE=include and the client did not say
    usage_chunks = [e for e in events if json.loads(e[6:]).get("usage")]
    assert len(usage_chunks) == (1 if shown else 0)
    assert raw.text.endswith("data: [DONE]\n\n") and len(events) == pool.backends[0].chunks + 1 + shown
    counted = usage_report(pool)["clients"]["key1"]["last_minute"]
    assert counted["unknown_usage"] == 0 and counted["total_tokens"] > 100  # the prompt's 100 tokens and more


def test_refused_calls_count_as_requests_without_tokens_and_need_no_usage(make_pool) -> None:
    pool = make_pool(1, fail_status=400)
    response = httpx.post(
        pool.url + "/openai/v1/chat/completions", json={"model": "chat"}, headers={"api-key": CLIENT_KEY}
    )
    assert response.status_code == 400
    counted = usage_report(pool)["clients"]["key1"]["last_minute"]
    assert counted["requests"] == 1 and counted["unknown_usage"] == 0 and counted["total_tokens"] == 0


def test_usage_needs_a_client_key(make_pool) -> None:
    pool = make_pool(1)
    assert httpx.get(pool.url + "/lb/usage").status_code == 401
    assert httpx.get(pool.url + "/lb/usage", headers={"api-key": "wrong"}).status_code == 401


def test_minute_and_hour_windows_forget_old_counts() -> None:
    clock = [10_000.0]
    metering = Metering({}, Telemetry(), clock=lambda: clock[0])
    metering.record("app", "b1", "chat", Usage(prompt=10, completion=5, total=15), answered=True)
    clock[0] += 59.0
    metering.record("app", "b1", "chat", None, answered=True)
    minute = metering.report()["clients"]["app"]["last_minute"]
    assert minute["total_tokens"] == 15 and minute["unknown_usage"] == 1
    clock[0] += 1.0  # the first call is now 60 s old: out of the minute, still in the hour
    report = metering.report()["clients"]["app"]
    assert report["last_minute"]["total_tokens"] == 0 and report["last_minute"]["requests"] == 1
    assert report["last_hour"]["total_tokens"] == 15 and report["last_hour"]["requests"] == 2
    clock[0] += 3600.0
    assert metering.report()["clients"]["app"]["last_hour"]["requests"] == 0


def test_token_metrics_carry_client_backend_deployment_and_kind_never_a_key(servers) -> None:
    from lb.app import create_app
    from lb.config import load_settings
    from lb.proxy import Proxy
    from lb.sim import SimBackend
    from tests.test_telemetry import Recorded, point

    recorded = Recorded()
    backend = SimBackend("sim1", api_key="key-1")
    env = {"LB_CLIENT_KEYS": CLIENT_KEY, "BACKEND_1_URL": servers.start(backend), "BACKEND_1_APIKEY": "key-1"}
    url = servers.start(create_app(proxy=Proxy(load_settings(env), telemetry=recorded.telemetry)))
    body = {"model": "chat", "messages": [{"role": "user", "content": "x" * 400}]}
    with httpx.Client(base_url=url, headers={"api-key": CLIENT_KEY}) as client:
        usage = client.post("/openai/v1/chat/completions", json=body).json()["usage"]
        backend.break_stream_after = 2  # a stream cut before its usage: the one answer whose usage stays unknown
        with contextlib.suppress(httpx.HTTPError):
            client.post("/openai/v1/chat/completions", json={**body, "stream": True}).read()

    points = recorded.points()
    who = {"client": "key1", "backend": "1", "deployment": "chat"}
    assert points[point("lb.tokens", **who, kind="prompt")] == usage["prompt_tokens"]
    assert points[point("lb.tokens", **who, kind="completion")] == usage["completion_tokens"]
    assert points[point("lb.tokens", **who, kind="total")] == usage["total_tokens"]
    assert points[point("lb.metered_requests", **who, usage="known")] == 1
    assert points[point("lb.metered_requests", **who, usage="unknown")] == 1
    assert not any(CLIENT_KEY in str(v) or "key-1" in str(v) for key in points for _, v in key[1])


def test_stream_usage_include_asks_the_backend_and_meters_every_chat_stream(make_pool) -> None:
    pool = make_pool(1, env={"LB_STREAM_USAGE": "include"})
    stream = pool.v1().chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}], stream=True)
    usages = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usages) == 1  # the client gets the usage chunk it did not ask for: that is the setting
    assert json.loads(pool.backends[0].calls[-1].body)["stream_options"] == {"include_usage": True}
    counted = usage_report(pool)["clients"]["key1"]["last_minute"]
    assert counted["unknown_usage"] == 0 and counted["total_tokens"] == usages[0].total_tokens


def test_stream_usage_setting_is_checked_at_start_up() -> None:
    from lb.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match=r"^LB_STREAM_USAGE: 'always' is not one of as-sent, include"):
        load_settings({"BACKEND_1_URL": "https://one.openai.azure.com", "LB_STREAM_USAGE": "always"})

"""Per-client quotas end to end: the openai SDK through `lb` on sockets; the pool's share on Azurite."""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest

from lb.app import create_app
from lb.config import load_settings
from tests.azurite import Azurite
from tests.badtable import SlowRelay, drop_table
from tests.conftest import SdkHttp, wait_until

LIMITED, FREE = "limited-key", "free-key"
SHARE_ROUND_SECONDS = 0.25  # the instances' usage share rounds (1 s by default): what a cross-instance wait waits out


def chat(client: openai.OpenAI):
    return client.chat.completions.with_raw_response.create(model="chat", messages=[{"role": "user", "content": "hi"}])


def anonymous_pool(make_pool, limits: str, **env: str):
    return make_pool(1, env={"LB_CLIENT_KEYS": "", "LB_CLIENT_LIMITS": limits, **env})


def test_over_limit_client_gets_429_with_its_own_code_and_headers(make_pool) -> None:
    pool = anonymous_pool(make_pool, "anonymous=3rpm/100000tpm")
    client = pool.v1("any")
    remaining = []
    for _ in range(3):
        raw = chat(client)
        remaining.append(raw.headers["x-ratelimit-remaining-requests"])
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 100000
    assert remaining == ["2", "1", "0"]  # its own quota, not the backend's
    with pytest.raises(openai.RateLimitError) as refused:
        chat(client)
    response = refused.value.response
    assert refused.value.code == "ClientQuotaExceeded"
    assert "own quota" in refused.value.message
    assert 55 <= int(response.headers["retry-after"]) <= 61  # a charge counts for 60 to 61 s
    assert 55_000 <= int(response.headers["retry-after-ms"]) <= 61_000
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(pool.backends[0].calls) == 3  # the refused call never reached a backend


def test_streamed_answers_true_up_the_charge_from_usage(make_pool) -> None:
    pool = anonymous_pool(make_pool, "anonymous=100000tpm")
    client = pool.v1("any")
    stream = client.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "hello there"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=5000,
    )
    (total,) = [c.usage.total_tokens for c in stream if c.usage]  # the whole stream, read to its end
    used = httpx.get(pool.url + "/lb/usage").json()["limits"]["anonymous"]["used_last_minute"]
    assert used == {"requests": 1, "tokens": total}  # the 5,000-token estimate is gone


def pool_requests(proxy, client: str) -> int:
    """The requests `client` made in the last minute, pool-wide, as `proxy` last read them."""
    return proxy.metering.report()["pool"]["clients"].get(client, {}).get("last_minute", {}).get("requests", 0)


def two_instances(
    servers, azurite, make_backend_env, limits: str, keys: str = "", admins: str = ""
) -> tuple[list[str], list]:
    table = "q" + uuid.uuid4().hex[:12]
    env = {
        **make_backend_env,
        "LB_CLIENT_KEYS": keys,
        "LB_ADMIN_CLIENTS": admins,  # who reads every client's /lb/usage
        "LB_CLIENT_LIMITS": limits,
        "LB_STATE_CONNECTION_STRING": azurite.connection_string,
        "LB_STATE_TABLE": table,
    }
    apps = [create_app(load_settings(env)) for _ in range(2)]
    for app in apps:
        app.state.proxy.metering.share.interval = SHARE_ROUND_SECONDS
    return [servers.start(app) for app in apps], [app.state.proxy for app in apps]


def test_two_instances_on_azurite_share_one_limit_and_the_other_client_is_unaffected(
    make_pool, servers, azurite
) -> None:
    pool = make_pool(1)
    backend_env = {"BACKEND_1_URL": pool.proxy.settings.backends[0].url, "BACKEND_1_APIKEY": "key-1"}
    keys = f"batch:{LIMITED},chatapp:{FREE}"
    started = time.monotonic()
    urls, proxies = two_instances(servers, azurite, backend_env, "batch=4rpm,chatapp=100rpm", keys, "chatapp")
    a, b = (
        openai.OpenAI(base_url=u + "/openai/v1", api_key=LIMITED, max_retries=0, http_client=SdkHttp()) for u in urls
    )
    free = [openai.OpenAI(base_url=u + "/openai/v1", api_key=FREE, max_retries=0, http_client=SdkHttp()) for u in urls]
    chat(a)
    chat(a)
    chat(a)
    wait_until(lambda: pool_requests(proxies[1], "batch") == 3, "a share round (a's row written, read by b)")
    chat(b)  # the pool's fourth call
    with pytest.raises(openai.RateLimitError) as refused:
        chat(b)
    assert refused.value.code == "ClientQuotaExceeded"
    wait_until(lambda: pool_requests(proxies[0], "batch") == 4, "a to read b's row")
    with pytest.raises(openai.RateLimitError):
        chat(a)
    for i in range(6):
        assert chat(free[i % 2]).http_response.status_code == 200  # chatapp is under its own limit
    wait_until(lambda: pool_requests(proxies[0], "chatapp") == 6, "a to read b's chatapp calls")
    pool_report = httpx.get(urls[0] + "/lb/usage", headers={"api-key": FREE}).json()["pool"]
    assert pool_report["instances"] == 2
    assert pool_report["clients"]["batch"]["last_minute"]["requests"] == 4
    assert pool_report["clients"]["chatapp"]["last_minute"]["requests"] == 6
    assert pool_report["clients"]["chatapp"]["last_minute"]["total_tokens"] > 0
    writes = proxies[0].metering.share.ops["writes"]
    rounds = math.ceil((time.monotonic() - started) / SHARE_ROUND_SECONDS) + 1
    assert writes <= rounds  # one row write per share round at most, only when something changed


@pytest.fixture
def relay(servers, azurite) -> Iterator[SlowRelay]:
    """A relay in front of Azurite, on the servers' loop: through it, Azurite stops and restarts as far as
    the instances can tell, in milliseconds rather than a Node.js restart."""
    relay = SlowRelay(azurite.table_url)
    servers.run(relay.start())
    yield relay
    servers.run(relay.close())


def test_a_table_outage_keeps_limits_per_instance_and_logs_once(make_pool, servers, azurite, relay, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lb.metering.usage")
    pool = make_pool(1)
    backend_env = {"BACKEND_1_URL": pool.proxy.settings.backends[0].url, "BACKEND_1_APIKEY": "key-1"}
    urls, proxies = two_instances(servers, Azurite(external_url=relay.url), backend_env, "anonymous=3rpm")
    ids = [p.metering.share.instance_id for p in proxies]
    a, b = (openai.OpenAI(base_url=u + "/openai/v1", api_key="x", max_retries=0, http_client=SdkHttp()) for u in urls)
    for _ in range(3):
        chat(a)
    wait_until(lambda: pool_requests(proxies[1], "anonymous") == 3, "b to read a's row")
    with pytest.raises(openai.RateLimitError):
        chat(b)  # the pool's limit, shared
    servers.run(relay.go_away())
    try:
        wait_until(lambda: not any(p.metering.share.healthy for p in proxies), "both instances to see the outage")
        for _ in range(3):
            chat(b)  # b alone now: its own 3
        with pytest.raises(openai.RateLimitError):
            chat(b)
    finally:  # back without the table, as a restarted in-memory Azurite
        servers.run(drop_table(azurite.connection_string, proxies[0].settings.state.table))
        servers.run(relay.come_back())
    wait_until(
        lambda: any("reachable again" in r.getMessage() for r in caplog.records),
        "the usage share to recover",
        timeout=15,
    )
    warnings = [r for r in caplog.records if r.name == "lb.metering.usage" and r.levelno == logging.WARNING]
    for instance in ids:  # once per instance, however many rounds failed
        assert sum(instance in r.getMessage() for r in warnings) == 1
    assert all("per instance" in r.getMessage() and "AccountKey" not in r.getMessage() for r in warnings)


def test_a_limited_named_client_is_refused_while_another_is_unaffected(make_pool) -> None:
    keys = {"LB_CLIENT_KEYS": f"chatapp:{FREE},batch:{LIMITED}", "LB_ADMIN_CLIENTS": "chatapp"}
    pool = make_pool(1, env={**keys, "LB_CLIENT_LIMITS": "batch=2rpm"})
    batch, chatapp = pool.v1(LIMITED), pool.v1(FREE)
    chat(batch)
    chat(batch)
    with pytest.raises(openai.RateLimitError) as refused:
        chat(batch)
    assert refused.value.code == "ClientQuotaExceeded" and "'batch'" in refused.value.message
    for _ in range(5):
        raw = chat(chatapp)  # no limit: never a 429 of batch's, and with two clients not the backend's
        assert "x-ratelimit-remaining-requests" not in raw.headers  # rate headers (they count batch's spend)
    report = httpx.get(pool.url + "/lb/usage", headers={"api-key": FREE}).json()
    assert report["clients"]["batch"]["last_minute"]["requests"] == 2
    assert report["clients"]["chatapp"]["last_minute"]["requests"] == 5
    assert report["limits"]["batch"]["used_last_minute"]["requests"] == 2
    assert "chatapp" not in report["limits"]

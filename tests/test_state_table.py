"""The Table Storage cooldown store, against a real Azurite: sharing, ETag races, outages, cost.

Each test uses its own table, so tests are independent and can run in any order.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
from azure.data.tables.aio import TableClient

import lb.state.table as state_table
from lb.app import create_app
from lb.config import StateSettings, load_settings
from lb.proxy import Proxy
from lb.sim import Servers, SimBackend
from lb.state import Cooldown
from lb.state.table import TableStore, row_key
from tests.azurite import ACCOUNT, ACCOUNT_KEY, Azurite, connection_string
from tests.badtable import SlowRelay, drop_table
from tests.conftest import SdkHttp, Stalls, eventually, wait_until

API_VERSION = "2024-10-21"
MESSAGES = [{"role": "user", "content": "hi"}]
REFRESH_MS = 200
pytestmark = pytest.mark.timeout(120)


def start_proxy(
    own_servers: Servers, backends: list[str], azurite: Azurite, table: str, **env: str
) -> tuple[str, Proxy]:
    settings_env = {
        "LB_STATE_CONNECTION_STRING": azurite.connection_string,
        "LB_STATE_TABLE": table,
        "LB_STATE_REFRESH_MS": str(REFRESH_MS),
        **env,
    }
    for i, url in enumerate(backends, start=1):
        settings_env[f"BACKEND_{i}_URL"] = url
        settings_env[f"BACKEND_{i}_APIKEY"] = f"key-{i}"
    app = create_app(load_settings(settings_env))
    return own_servers.start(app), app.state.proxy


def sim_pool(own_servers: Servers, n: int = 2) -> tuple[list[SimBackend], list[str]]:
    sims = [SimBackend(f"sim{i}", api_key=f"key-{i}") for i in range(1, n + 1)]
    return sims, [own_servers.start(sim) for sim in sims]


def azure_client(url: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=url, api_key="any", api_version=API_VERSION, max_retries=0, timeout=10, http_client=SdkHttp()
    )


def chat(client: openai.AzureOpenAI) -> tuple[int, str]:
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
    raw.parse()
    return raw.status_code, raw.headers.get("x-lb-backend", "")


def read_row(azurite: Azurite, table: str, backend: str, deployment: str) -> dict:
    async def read() -> dict:
        async with TableClient.from_connection_string(azurite.connection_string, table) as client:
            return dict(await client.get_entity("default", row_key(backend, deployment)))

    return asyncio.run(read())


def test_row_keys_escape_what_table_keys_forbid_and_stay_distinct():
    assert row_key("1", "chat") == "1|chat"
    key = row_key("1", "a/b\\c#d?e\x01%|")
    assert not any(c in key for c in "/\\#?\x01")
    assert row_key("1", "a|b") != row_key("1|a", "b")
    assert row_key("1", "%2F") != row_key("1", "/")


def test_a_backend_one_instance_saw_throttled_gets_nothing_from_another_within_refresh(own_servers, azurite, table):
    sims, urls = sim_pool(own_servers)
    url_a, _ = start_proxy(own_servers, urls, azurite, table)
    url_b, proxy_b = start_proxy(own_servers, urls, azurite, table)
    a, b = azure_client(url_a), azure_client(url_b)
    assert chat(b)[0] == 200  # B is up and serving

    sims[0].throttle_next, sims[0].retry_after = 1, 30
    deadline = time.monotonic() + 10
    while sims[0].count(429) == 0:  # the balancer picks at random: go on until A meets the 429
        assert time.monotonic() < deadline, "instance A never reached backend 1"
        assert chat(a) == (200, "2")  # failover hides the 429 from the client
    throttled_at = time.monotonic()

    while time.monotonic() < throttled_at + (REFRESH_MS + 500) / 1000:  # B serving while the news spreads
        assert chat(b)[0] == 200
        time.sleep(0.02)  # a call now and then is enough: a busy loop only takes CPU from the instances
    calls_before = len(sims[0].calls)
    # Had B not learned of the cooldown, each of its calls would pick backend 1 with probability 1/2:
    # 25 calls all missing it by chance is 2**-25 (3e-8).
    for _ in range(25):
        assert chat(b) == (200, "2")
        assert chat(a) == (200, "2")
    assert len(sims[0].calls) == calls_before, "an instance sent a request to the backend another saw throttled"
    assert proxy_b.store.cooling_until("1", "chat", time.time()) > time.time() + 20
    assert proxy_b.store.health()["healthy"] is True


def test_an_idle_instance_knows_of_another_instances_429_before_its_first_request(own_servers, azurite, table):
    sims, urls = sim_pool(own_servers)
    prefer_1 = {"BACKEND_1_PRIORITY": "1", "BACKEND_2_PRIORITY": "2"}  # without the news, B would pick 1
    url_a, _ = start_proxy(own_servers, urls, azurite, table, **prefer_1)
    url_b, proxy_b = start_proxy(own_servers, urls, azurite, table, **prefer_1)  # B gets no request until the end
    sims[0].throttle_next, sims[0].retry_after = 1, 30
    assert chat(azure_client(url_a)) == (200, "2")
    assert sims[0].count(429) == 1
    wait_until(lambda: proxy_b.store.cooling_until("1", "chat", time.time()) > 0, "B's poller to read A's row")
    calls_before = len(sims[0].calls)
    b = azure_client(url_b)
    assert [chat(b) for _ in range(5)] == [(200, "2")] * 5
    assert len(sims[0].calls) == calls_before


def test_an_instance_that_saw_a_backend_near_its_quota_learns_of_its_first_429_within_milliseconds(
    own_servers, azurite, table
):
    sims = [SimBackend("sim1", api_key="key-1", requests_per_window=5), SimBackend("sim2", api_key="key-2")]
    urls = [own_servers.start(sim) for sim in sims]
    slow = {"LB_STATE_REFRESH_MS": "60000", "BACKEND_1_PRIORITY": "1", "BACKEND_2_PRIORITY": "2"}
    # A request may wait 5 s for its fresh view, not 50 ms: a loaded machine's Azurite can take longer
    # than 50 ms, and how long a request waits is bounded elsewhere (the confirm_ms tests below).
    slow["LB_STATE_CONFIRM_MS"] = "5000"
    url_a, _ = start_proxy(own_servers, urls, azurite, table, **slow)
    url_b, proxy_b = start_proxy(own_servers, urls, azurite, table, **slow)  # its poller alone would take a minute
    a, b = azure_client(url_a), azure_client(url_b)
    assert [chat(b) for _ in range(4)] == [(200, "1")] * 4  # backend 1 answers "1 request left" of 5
    assert chat(a) == (200, "1")  # the last one
    assert chat(a) == (200, "2")  # A meets the 429, fails over and writes the cooldown
    wait_until(lambda: read_row_or_none(azurite, table, "1", "chat"), "A's background write of the cooldown", 5)

    raw = b.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
    assert (raw.headers["x-lb-backend"], raw.headers["x-lb-attempts"]) == ("2", "1")
    assert sims[0].count(429) == 1  # B did not send backend 1 a doomed call
    assert proxy_b.store.cooling_until("1", "chat", time.time()) > 0


def test_concurrent_writers_on_one_row_leave_the_longest_cooldown(azurite, table):
    now = time.time()
    deployments = ["chat", "embed", "mini"]  # three rows, so a lucky interleaving cannot hide a lost update
    untils = {d: random.sample([now + 5 + i * 1.5 for i in range(24)], 24) for d in deployments}

    async def race() -> list[TableStore]:
        settings = StateSettings(connection_string=azurite.connection_string, table=table, refresh_ms=REFRESH_MS)
        # The race is the point, not a slow table: 72 writes at once can take Azurite past the 2 s a call is
        # given on a loaded machine, and a writer that meets three timeouts leaves its row to the recovery.
        stores = [TableStore(settings, instance_id=f"writer{i}", op_timeout=30) for i in range(24)]
        await asyncio.gather(*(s.start() for s in stores))
        for i, store in enumerate(stores):  # one instance per 429: 24 writers on each row at once
            for d in deployments:
                store.mark("1", d, untils[d][i], f"429 #{i}")
        # Every write settled first: close() waits CLOSE_SECONDS at most, which a loaded machine can outlast.
        await asyncio.gather(*(_written(s) for s in stores))
        await asyncio.gather(*(s.close() for s in stores))
        return stores

    stores = asyncio.run(race())
    for d in deployments:
        row = read_row(azurite, table, "1", d)
        assert row["cooling_until"] == pytest.approx(max(untils[d]), abs=1e-6)
        assert row["instance"] == f"writer{untils[d].index(max(untils[d]))}"
        assert row["backend"] == "1" and row["deployment"] == d and row["status"] == "cooling"
    assert sum(s.ops["reads"] for s in stores) >= len(deployments)  # writers that lost a race re-read the row
    assert all(s.healthy for s in stores)


def test_a_shorter_cooldown_never_replaces_a_longer_one_and_the_writer_learns_the_longer(azurite, table):
    async def scenario() -> tuple[float, float]:
        settings = StateSettings(connection_string=azurite.connection_string, table=table, refresh_ms=REFRESH_MS)
        long_writer, short_writer = TableStore(settings), TableStore(settings)
        await long_writer.start()
        await short_writer.start()
        now = time.time()
        long_writer.mark("1", "chat", now + 40, "429 long")
        await long_writer.close()
        short_writer.mark("1", "chat", now + 5, "429 short")
        await short_writer.close()
        return now, short_writer.cooling_until("1", "chat", time.time())

    now, learned = asyncio.run(scenario())
    assert read_row(azurite, table, "1", "chat")["cooling_until"] == pytest.approx(now + 40)
    assert learned == pytest.approx(now + 40)


def test_proxy_keeps_answering_through_a_table_outage_and_shares_state_again_after(
    own_servers, azurite, table, caplog, monkeypatch
):
    if azurite.external_url:
        pytest.skip("cannot stop an Azurite we did not start (AZURITE_TABLE_URL is set)")
    monkeypatch.setattr(state_table, "OUTAGE_RETRY_SECONDS", 0.25)  # retries while degraded: more of them, sooner back
    caplog.set_level(logging.INFO, logger="lb.state")
    sims, urls = sim_pool(own_servers)
    url, proxy = start_proxy(own_servers, urls, azurite, table)
    client = azure_client(url)
    assert chat(client)[0] == 200

    azurite.stop()
    try:
        sims[0].throttle_next, sims[0].retry_after = 1, 30
        started = time.monotonic()
        while time.monotonic() < started + 2:  # several refresh periods and retries of outage
            assert chat(client)[0] == 200
            time.sleep(0.02)  # >= 20 calls: one reaches backend 1 but with chance 2**-20 (1e-6) or less
        assert sims[0].count(429) == 1  # failover worked on the local view alone
        state = status(url)["state"]
        assert state["kind"] == "table" and state["healthy"] is False
        assert state["last_error"] and state["table"] == table and state["pool"] == "default"
        assert state["last_refresh_age_s"] >= 2
        assert "AccountKey" not in str(state) and azurite.connection_string not in caplog.text
    finally:
        azurite.start()  # empty: in-memory Azurite lost the table, the store must recreate it

    deadline = time.monotonic() + 15
    while not status(url)["state"]["healthy"]:
        assert time.monotonic() < deadline, "the store did not recover after Azurite came back"
        assert chat(client)[0] == 200
        time.sleep(0.05)
    warnings = [r for r in caplog.records if r.name == "lb.state" and r.levelno == logging.WARNING]
    recoveries = [r for r in caplog.records if r.name == "lb.state" and "reachable again" in r.getMessage()]
    assert len(warnings) == 1 and len(recoveries) == 1

    async def other_instance() -> tuple[float, TableStore]:
        other = TableStore(proxy.store.settings, instance_id="other")
        await other.start()
        seen = other.cooling_until("1", "chat", time.time())  # the outage-time 429, re-sent on recovery
        other.mark("2", "other-deployment", time.time() + 20, "429 elsewhere")
        await other.close()
        return seen, other

    wait_until(lambda: read_row_or_none(azurite, table, "1", "chat"), "the outage-time cooldown to reach the table", 5)
    seen, _ = own_servers.run(other_instance())
    assert seen > time.time() + 20
    deadline = time.monotonic() + 5
    while not proxy.store.cooling_until("2", "other-deployment", time.time()):
        assert time.monotonic() < deadline, "the proxy never learned another instance's cooldown"
        assert chat(client) == (200, "2")


def status(url: str) -> dict:
    """The proxy's /lb/status, on a connection closed after it (plain HTTP: verify=False loads no CA bundle)."""
    return httpx.get(f"{url}/lb/status", timeout=10, verify=False).json()


def read_row_or_none(azurite: Azurite, table: str, backend: str, deployment: str) -> dict | None:
    try:
        return read_row(azurite, table, backend, deployment)
    except Exception:
        return None


def test_a_cooldown_already_written_is_written_again_when_the_table_comes_back_empty(azurite, table, monkeypatch):
    monkeypatch.setattr(state_table, "OUTAGE_RETRY_SECONDS", 0.25)  # the degraded store's retries: back sooner

    async def until(condition: object, seconds: float, store: TableStore) -> bool:
        deadline = time.monotonic() + seconds
        while not condition():  # type: ignore[operator]
            if time.monotonic() > deadline:
                return False
            await store.sync()  # requests keep coming
            await asyncio.sleep(0.02)
        return True

    async def scenario() -> tuple[bool, bool]:
        relay = SlowRelay(azurite.table_url)  # Azurite stops and restarts as far as the store can tell
        settings = StateSettings(
            connection_string=connection_string(await relay.start()), table=table, refresh_ms=60_000
        )
        store = TableStore(settings)
        await store.start()
        store.mark("1", "chat", time.time() + 60, "429")
        await _written(store)
        await relay.go_away()
        try:
            lost = await until(lambda: not store.healthy, 5, store)
        finally:
            await drop_table(azurite.connection_string, table)  # back without the table or its row, as after a restart
            await relay.come_back()
        back = await until(lambda: store.healthy, 10, store)
        await _written(store)  # the refresh that found the table again queued the rewrite before `healthy` turned
        await store.close()
        await relay.close()
        return lost, back

    assert asyncio.run(scenario()) == (True, True)
    assert read_row_or_none(azurite, table, "1", "chat") is not None


def test_happy_path_sends_no_table_reads_or_writes_and_at_most_one_query_per_refresh(own_servers, azurite, table):
    _, urls = sim_pool(own_servers, 3)
    url, proxy = start_proxy(own_servers, urls, azurite, table)
    with httpx.Client(base_url=url, timeout=10) as client:
        body = {"messages": MESSAGES}
        path = f"/openai/deployments/chat/chat/completions?api-version={API_VERSION}"
        assert client.post(path, json=body).status_code == 200  # first load done
        before = dict(proxy.store.ops)
        started = time.monotonic()
        n = 300
        for _ in range(n):
            assert client.post(path, json=body).status_code == 200
        duration = time.monotonic() - started
    after = proxy.store.ops
    assert after["reads"] == before["reads"] and after["writes"] == before["writes"]
    assert after["deletes"] == before["deletes"]
    queries = after["queries"] - before["queries"]
    assert queries <= math.ceil(duration * 1000 / REFRESH_MS) + 1
    assert queries / n < 1  # far fewer than one per request
    assert proxy.store.health()["ops"] == after


def test_rows_expired_long_enough_are_deleted_by_a_refresh(azurite, table):
    async def scenario() -> list[dict]:
        settings = StateSettings(connection_string=azurite.connection_string, table=table, refresh_ms=1)
        writer, cleaner = TableStore(settings), TableStore(settings, keep_expired_seconds=0.0)
        await writer.start()
        writer.mark("1", "chat", time.time() + 0.2, "429")
        writer.mark("2", "chat", time.time() + 30, "429")
        await writer.close()
        await asyncio.sleep(0.4)
        await cleaner.start()
        deadline = time.monotonic() + 5
        async with TableClient.from_connection_string(azurite.connection_string, table) as client:
            while True:
                rows = [dict(r) async for r in client.query_entities("PartitionKey eq 'default'")]
                if len(rows) == 1 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
        await cleaner.close()
        assert cleaner.cooling_until("2", "chat", time.time()) > 0
        assert isinstance(cleaner.active()[0], Cooldown)
        return rows

    rows = asyncio.run(scenario())
    assert [r["backend"] for r in rows] == ["2"]


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A table endpoint that accepts connections and never answers: the slowest Table there is."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/{ACCOUNT}"
    sock.close()


def test_a_table_that_never_answers_does_not_slow_requests(own_servers, blackhole, table, caplog, monkeypatch):
    monkeypatch.setattr(state_table, "FIRST_LOAD_SECONDS", 0.25)  # start-up's one wait: not 2 s here
    _, urls = sim_pool(own_servers)
    cs = connection_string(blackhole)
    started = time.monotonic()
    url, proxy = start_proxy(own_servers, urls, Azurite(external_url=blackhole), table)
    # The cooldown store's first load gives up after FIRST_LOAD_SECONDS; the shares don't wait for the
    # same table again (their own wait is 2 s: a start-up past 2 s has waited twice).
    assert time.monotonic() - started < 2
    with httpx.Client(base_url=url, timeout=10) as client:
        path = f"/openai/deployments/chat/chat/completions?api-version={API_VERSION}"
        for _ in range(30):
            t0 = time.monotonic()
            with Stalls(os.getpid()) as stalls:  # the client's and the proxy's waits for a CPU
                assert client.post(path, json={"messages": MESSAGES}).status_code == 200
            assert time.monotonic() - t0 < 0.5 + stalls.seconds
            time.sleep(0.02)  # spread over a second, while the poller's query hangs (its timeout is 2 s)
        state = client.get("/lb/status").json()["state"]
    assert state["healthy"] is False and "Timeout" in state["last_error"]
    assert ACCOUNT_KEY not in caplog.text and cs not in caplog.text
    assert proxy.store.health()["ops"]["queries"] <= 4  # while degraded, retries are spaced out


def test_a_rejected_key_is_a_degraded_store_not_a_failing_proxy(own_servers, azurite, table, caplog):
    _, urls = sim_pool(own_servers)
    wrong = Azurite(external_url=azurite.table_url)
    wrong_key = base64.b64encode(b"not the key" * 6).decode()
    settings = StateSettings(connection_string=wrong.connection_string.replace(ACCOUNT_KEY, wrong_key), table=table)
    url, proxy = start_proxy(own_servers, urls, azurite, table)  # a healthy instance, for contrast
    store = TableStore(settings)
    own_servers.run(store.start())
    health = store.health()
    own_servers.run(store.close())
    assert health["healthy"] is False and "403" in health["last_error"]
    assert wrong_key not in caplog.text and wrong_key not in str(health)
    assert proxy.store.health()["healthy"] is True
    assert azure_client(url).chat.completions.create(model="chat", messages=MESSAGES).choices


async def _written(store: TableStore) -> None:
    """Wait until every cooldown the store has queued is in the table."""
    await store.flush()


def test_under_throttling_a_request_is_routed_on_a_view_that_includes_rows_written_just_before(azurite, table):
    async def scenario() -> tuple[int, int, int, bool, int]:
        settings = StateSettings(
            connection_string=azurite.connection_string,
            table=table,
            refresh_ms=60_000,
            hot_refresh_ms=200,
            confirm_ms=5_000,  # generous, so a slow machine cannot fail this test; the wait is bounded elsewhere
        )
        writer, reader = TableStore(settings, instance_id="writer"), TableStore(settings, instance_id="reader")
        await writer.start()
        await reader.start()
        await asyncio.sleep(0.25)  # the view is older than hot_refresh_ms: only calm keeps requests from a query
        before = reader.ops["queries"]
        for _ in range(20):
            await reader.sync()  # calm: the request never waits, nothing is sent
        calm = reader.ops["queries"] - before
        reader.mark("2", "chat", time.time() + 30, "429")  # the reader has seen throttling: it is alert now
        before = reader.ops["queries"]
        await asyncio.sleep(0.5)  # under pressure but idle: only the poller may query, and it is at refresh_ms
        idle = reader.ops["queries"] - before
        writer.mark("1", "chat", time.time() + 30, "429 elsewhere")
        await _written(writer)
        before = reader.ops["queries"]
        await asyncio.gather(*(reader.sync() for _ in range(20)))  # twenty requests arrive at once
        shared = reader.ops["queries"] - before
        knows = reader.cooling_until("1", "chat", time.time()) > 0
        before = reader.ops["queries"]
        await reader.sync()  # the view is fresh: no query
        fresh = reader.ops["queries"] - before
        await writer.close()
        await reader.close()
        return calm, idle, shared, knows, fresh

    calm, idle, shared, knows, fresh = asyncio.run(scenario())
    assert calm == 0
    assert idle == 0
    assert knows  # without waiting for the poller (60 s): the request itself got a fresh view
    assert shared == 1  # one partition query served all twenty
    assert fresh == 0


@contextlib.asynccontextmanager
async def writer_and_relayed_reader(
    azurite: Azurite, table: str, **reader_settings: int
) -> AsyncIterator[tuple[SlowRelay, TableStore, TableStore]]:
    """Two started stores on one table: a writer on Azurite and a reader behind a SlowRelay, which the
    reader's own cooldown has put under pressure. Both poll once a minute, so only requests refresh."""
    relay = SlowRelay(azurite.table_url)
    via_relay = StateSettings(
        connection_string=connection_string(await relay.start()), table=table, refresh_ms=60_000, **reader_settings
    )
    direct = StateSettings(connection_string=azurite.connection_string, table=table, refresh_ms=60_000)
    writer, reader = TableStore(direct, instance_id="writer"), TableStore(via_relay, instance_id="reader")
    await writer.start()
    await reader.start()
    reader.mark("2", "chat", time.time() + 30, "429")
    await _written(reader)
    try:
        yield relay, writer, reader
    finally:
        await writer.close()
        await reader.close()
        await relay.close()


def test_a_table_slower_than_confirm_ms_holds_a_request_no_longer_and_the_view_still_catches_up(azurite, table):
    async def scenario() -> tuple[float, float, float, bool]:
        async with writer_and_relayed_reader(azurite, table, hot_refresh_ms=1) as (relay, writer, reader):
            writer.mark("1", "chat", time.time() + 30, "429 elsewhere")
            await _written(writer)
            relay.delay = 0.4  # every Table answer now takes 0.4 s, far over confirm_ms (50)
            with Stalls() as stalls:  # what a loaded machine adds to the times below
                started = time.perf_counter()
                await reader.sync()
                first = time.perf_counter() - started
                started = time.perf_counter()
                for _ in range(10):
                    await reader.sync()
                after = time.perf_counter() - started
            knows = await eventually(lambda: reader.cooling_until("1", "chat", time.time()) > 0)
            return first, after, stalls.seconds, knows

    first, after, stalled, knows = asyncio.run(scenario())
    assert 0.04 <= first < 0.2 + stalled  # waited confirm_ms (50 ms), not the query's 0.4 s
    assert after < 0.02 + stalled  # then requests stop waiting for a table that slow
    assert knows  # the query went on without them and updated the view


def test_with_confirm_ms_0_requests_never_wait_but_still_refresh_the_view(azurite, table):
    async def scenario() -> tuple[float, float, bool]:
        async with writer_and_relayed_reader(azurite, table, hot_refresh_ms=1, confirm_ms=0) as (relay, writer, reader):
            writer.mark("1", "chat", time.time() + 30, "429 elsewhere")
            await _written(writer)
            relay.delay = 0.3
            with Stalls() as stalls:  # what a loaded machine adds to the time below
                started = time.perf_counter()
                for _ in range(10):
                    await reader.sync()
                waited = time.perf_counter() - started
            knows = await eventually(lambda: reader.cooling_until("1", "chat", time.time()) > 0)
            return waited, stalls.seconds, knows

    waited, stalled, knows = asyncio.run(scenario())
    assert waited < 0.1 + stalled  # ten requests, none held for the 0.3 s query
    assert knows  # the query they started updated the view


def test_under_throttling_an_instance_that_lost_the_table_retries_within_seconds_not_refresh_ms(
    azurite, table, monkeypatch
):
    monkeypatch.setattr(state_table, "OUTAGE_RETRY_SECONDS", 0.25)  # 1 s by default: the wait this test waits out

    async def scenario() -> tuple[bool, float, bool]:
        async with writer_and_relayed_reader(azurite, table, hot_refresh_ms=1) as (relay, writer, reader):
            relay.cut()
            await asyncio.sleep(0.01)
            await reader.sync()  # its query fails (after confirm_ms, on a loaded machine): the store is degraded,
            degraded = await eventually(lambda: not reader.healthy)  # and requests stop refreshing
            writer.mark("1", "chat", time.time() + 30, "429 elsewhere")
            await _written(writer)
            relay.down = False
            started = time.monotonic()
            while not reader.cooling_until("1", "chat", time.time()) and time.monotonic() - started < 10:
                await reader.sync()
                await asyncio.sleep(0.02)
            return degraded, time.monotonic() - started, reader.healthy

    degraded, learned_in, healthy = asyncio.run(scenario())
    assert degraded
    assert learned_in < 3  # OUTAGE_RETRY_SECONDS under pressure, not LB_STATE_REFRESH_MS (60 s)
    assert healthy


def test_a_listing_taken_before_our_own_write_does_not_undo_what_the_write_taught(azurite, table):
    async def scenario() -> dict[str, int]:
        relay = SlowRelay(azurite.table_url)
        settings = StateSettings(
            connection_string=connection_string(await relay.start()),
            table=table,
            refresh_ms=60_000,
            hot_refresh_ms=1,
            confirm_ms=0,
        )
        store = TableStore(settings)
        await store.start()
        store.mark("2", "chat", time.time() + 30, "429")
        await _written(store)
        relay.delay, relay.only = 0.3, b'"value"'  # listings arrive late; writes do not
        await asyncio.sleep(0.01)
        await store.sync()  # a listing is taken now and answered in 0.3 s
        await asyncio.sleep(0.05)
        store.mark("2", "chat", time.time() + 40, "429 again")  # written, with a new ETag, before that answer
        await _written(store)
        await asyncio.sleep(0.5)  # the old listing has been applied
        relay.delay = 0.0
        before = dict(store.ops)
        store.mark("2", "chat", time.time() + 50, "429 a third time")
        await _written(store)
        after = dict(store.ops)
        await store.close()
        await relay.close()
        return {k: after[k] - before[k] for k in ("reads", "writes")}

    assert asyncio.run(scenario()) == {"reads": 0, "writes": 1}  # the write's ETag was kept: no 412, no re-read


def test_a_cooldown_is_written_in_one_table_call_when_the_listing_is_fresh(azurite, table):
    async def scenario() -> tuple[dict[str, int], dict[str, int]]:
        settings = StateSettings(connection_string=azurite.connection_string, table=table, refresh_ms=60_000)
        store = TableStore(settings)
        await store.start()
        before = dict(store.ops)
        store.mark("1", "chat", time.time() + 20, "429")  # a new row: created without a read
        await _written(store)
        store.mark("1", "chat", time.time() + 40, "429 again")  # our own row: updated with its known ETag
        await store.close()
        return before, store.ops

    before, after = asyncio.run(scenario())
    assert after["writes"] - before["writes"] == 2
    assert after["reads"] == before["reads"]
    assert read_row(azurite, table, "1", "chat")["reason"] == "429 again"

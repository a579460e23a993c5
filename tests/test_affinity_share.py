"""lb.state.affinity against a real Azurite: one random secret for the pool, the live instances, their counts.

Each test uses its own table, so tests are independent and can run in any order.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import Counter

import httpx
import pytest
from azure.data.tables.aio import TableClient

from lb.app import create_app
from lb.config import Backend, StateSettings, load_settings
from lb.routing.affinity import Affinity, local_secret, pool_secret
from lb.sim import Servers, SimBackend
from lb.state.affinity import AffinityShare, read_secret
from tests.azurite import Azurite
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(60)
UNREACHABLE = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
    "TableEndpoint=http://127.0.0.1:9/devstoreaccount1;"
)
ENTRA_ONLY = (Backend("1", "https://one.openai.azure.com"), Backend("2", "https://two.openai.azure.com"))


def settings(azurite: Azurite, table: str) -> StateSettings:
    return StateSettings(connection_string=azurite.connection_string, table=table, refresh_ms=100)


def share(state: StateSettings, name: str) -> AffinityShare:
    return AffinityShare(state, Affinity(local_secret(ENTRA_ONLY)), name)


def test_every_instance_reads_one_random_secret_that_the_configuration_does_not_give_away(azurite: Azurite):
    state = settings(azurite, f"aff{uuid.uuid4().hex[:8]}")

    async def run() -> list[bytes]:
        first, second = share(state, "a"), share(state, "b")
        await asyncio.gather(first.start(), second.start())  # a race to create it: one wins, both read it
        found = [first.affinity.secret, second.affinity.secret]
        await asyncio.gather(first.close(), second.close())
        later = share(state, "c")  # a restart keeps it: conversations keep their backends
        await later.start()
        found.append(later.affinity.secret)
        assert later.health()["secret"] == "table"
        await later.close()
        return found

    found = asyncio.run(run())
    assert len(set(found)) == 1 and len(found[0]) == 32
    assert found[0] != pool_secret(ENTRA_ONLY)  # names and URLs alone do not give the ranking away


def test_instances_count_each_other_and_share_their_recent_calls(azurite: Azurite):
    state = settings(azurite, f"aff{uuid.uuid4().hex[:8]}")

    async def run() -> None:
        first, second = share(state, "a"), share(state, "b")
        await first.start()
        await second.start()
        for _ in range(5):
            second.affinity.served.add("1", "chat", time.time())
            second.affinity.calls.add("", "chat", time.time())
        await second.round()
        await first.round()
        assert (first.affinity.instances, second.affinity.instances) == (2, 2)
        assert first.affinity.others is not None
        assert first.affinity.others.get("1", "chat", time.time()) == pytest.approx(5.0, rel=0.05)  # half-life 30 s
        assert first.affinity.others.get("", "chat", time.time()) == pytest.approx(5.0, rel=0.05)
        assert first.affinity.others.get("2", "chat", time.time()) == 0.0
        await second.close()  # its row goes with it: the other's allowance grows back at the next read
        await first.round()
        assert first.affinity.instances == 1
        await first.close()

    asyncio.run(run())


def test_an_unreachable_table_leaves_the_local_secret_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
):
    state = StateSettings(connection_string=UNREACHABLE, table="nowhere", refresh_ms=50)

    async def run() -> AffinityShare:
        down = AffinityShare(state, Affinity(b"this process's"), "a", op_timeout=0.5)
        await down.start()
        await down.round()
        await down.close()
        return down

    with caplog.at_level(logging.WARNING, logger="lb.state.affinity"):
        down = asyncio.run(run())
    assert down.affinity.secret == b"this process's"
    assert down.health()["healthy"] is False and down.health()["secret"] == "local"
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1


def test_start_up_does_not_wait_again_for_a_table_the_cooldown_store_found_out_of_reach():
    state = StateSettings(connection_string=UNREACHABLE, table="nowhere", refresh_ms=50)

    async def run() -> float:
        share = AffinityShare(state, Affinity(b"this process's"), "a", op_timeout=1.5, table_answers=lambda: False)
        started = time.monotonic()
        await share.start()
        took = time.monotonic() - started
        await share.close()
        return took

    assert asyncio.run(run()) < 0.5


def test_a_secret_row_is_only_read_where_creating_is_not_asked(azurite: Azurite):
    async def run() -> bytes | None:
        async with TableClient.from_connection_string(azurite.connection_string, f"aff{uuid.uuid4().hex[:8]}") as c:
            return await read_secret(c, "default.affinity", 2.0, create=False)

    assert asyncio.run(run()) is None


def test_four_proxies_on_one_table_keep_a_burst_of_one_key_under_the_bound_from_call_30(
    own_servers: Servers, azurite: Azurite
):
    """On main each instance gave the full allowance of a quiet pool: 3x a backend's share until call 120."""
    urls = [own_servers.start(SimBackend(f"sim{i}", api_key=f"key-{i}")) for i in (1, 2, 3)]
    env = {
        "LB_STATE_CONNECTION_STRING": azurite.connection_string,
        "LB_STATE_TABLE": f"aff{uuid.uuid4().hex[:8]}",
        "LB_STATE_REFRESH_MS": "100",
        **{f"BACKEND_{i}_URL": url for i, url in enumerate(urls, start=1)},
        **{f"BACKEND_{i}_APIKEY": f"key-{i}" for i in (1, 2, 3)},
    }
    apps = [create_app(load_settings(env)) for _ in range(4)]
    proxies = [own_servers.start(app) for app in apps]
    status = [app.state.proxy for app in apps]
    wait_until(lambda: all(p.balancer.affinity.instances == 4 for p in status), "four instances to count each other")
    assert len({p.balancer.affinity.secret for p in status}) == 1
    body = {"messages": [{"role": "system", "content": "Manual. " * 600}, {"role": "user", "content": "q"}]}
    body["prompt_cache_key"] = "everyone"
    rng, picks = random.Random(5), []
    with httpx.Client(timeout=10) as client:
        for _ in range(90):
            url = f"{rng.choice(proxies)}/openai/deployments/chat/chat/completions?api-version=2024-10-21"
            answer = client.post(url, json=body)
            assert answer.status_code == 200, answer.text
            picks.append(answer.headers["x-lb-backend"])
        report = client.get(f"{proxies[0]}/lb/status").json()["affinity_share"]
    assert report["instances"] == 4 and report["secret"] == "table" and report["healthy"] is True
    worst = max(max(Counter(picks[:n]).values()) / (n / 3) for n in range(30, len(picks) + 1))
    assert worst <= 1.35, Counter(picks)

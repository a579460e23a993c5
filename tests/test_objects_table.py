"""Object records shared by two instances through a real Azurite: routing, cost, outage, expiry.

Each test uses its own table. Three simulated backends hold their own objects; two proxies share
one table, and the client alternates between them as a load balancer in front would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import openai
import pytest

import lb.objects.table as object_table
from lb.app import create_app
from lb.config import StateSettings, load_settings
from lb.objects.records import ObjectRecord
from lb.objects.table import TableObjectStore
from lb.proxy import Proxy
from lb.sim import Servers, SimBackend
from tests.azurite import Azurite
from tests.badtable import SlowRelay, drop_table

JSONL = b'{"custom_id": "1", "method": "POST", "url": "/chat/completions", "body": {"model": "chat", "messages": []}}\n'
pytestmark = pytest.mark.timeout(120)


def two_instances(
    own_servers: Servers, azurite: Azurite, table: str
) -> tuple[list[SimBackend], list[str], list[Proxy]]:
    sims = [SimBackend(f"sim{i}", api_key=f"key-{i}") for i in (1, 2, 3)]
    env = {
        "LB_STATE_CONNECTION_STRING": azurite.connection_string,
        "LB_STATE_TABLE": table,
        "LB_CLIENT_KEYS": "chatapp:key-a,batch:key-b",
    }
    for i, sim in enumerate(sims, start=1):
        env[f"BACKEND_{i}_URL"] = own_servers.start(sim)
        env[f"BACKEND_{i}_APIKEY"] = f"key-{i}"
    urls, proxies = [], []
    for _ in range(2):
        app = create_app(load_settings(env))
        urls.append(own_servers.start(app))
        proxies.append(app.state.proxy)
    return sims, urls, proxies


def v1(url: str, key: str = "key-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/openai/v1", api_key=key, max_retries=0, timeout=10)


def ops(proxy: Proxy) -> dict[str, int]:
    return proxy.objects.records.health()["ops"]


def test_two_instances_route_conversations_files_and_batches_to_their_holders(own_servers, azurite, table):
    sims, urls, proxies = two_instances(own_servers, azurite, table)
    clients = [v1(url) for url in urls]
    previous, created = None, 0
    for turn in range(6):  # A, B, A, B, ...: every follow-up reaches the instance that did not see the last turn
        raw = clients[turn % 2].responses.with_raw_response.create(
            model="chat", input=f"turn {turn}", previous_response_id=previous
        )
        assert raw.headers["x-lb-attempts"] == "1"
        previous = raw.parse().id
        created += 1
    for turn in range(4):
        assert clients[turn % 2].responses.retrieve(previous).id == previous
    uploaded = clients[0].files.create(file=("in.jsonl", JSONL * 2), purpose="batch")
    batch = clients[1].batches.create(input_file_id=uploaded.id, endpoint="/chat/completions", completion_window="24h")
    polls = 0
    while batch.status not in ("completed", "failed", "cancelled"):
        batch = clients[polls % 2].batches.retrieve(batch.id)
        polls += 1
    assert batch.status == "completed" and clients[polls % 2].files.content(batch.output_file_id).read()
    created += 3  # the file, the batch and its output file

    assert sum(p.objects.counters["lookups"] for p in proxies) == 0  # no backend was ever asked in vain
    assert sum(ops(p)["writes"] for p in proxies) == created  # one Table write per object created
    reads = sum(ops(p)["reads"] for p in proxies)
    assert reads <= created  # at most one point read per object an instance had not seen
    assert sum(len(s.calls) for s in sims) == 6 + 4 + 2 + polls + 1


def test_chat_and_embeddings_make_no_object_table_call(own_servers, azurite, table):
    _, urls, proxies = two_instances(own_servers, azurite, table)
    for url in urls:
        client = v1(url)
        for _ in range(10):
            client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
            client.embeddings.create(model="embedding", input="hi")
    for proxy in proxies:
        assert ops(proxy) == {"reads": 0, "queries": 0, "writes": 0, "deletes": 0}
        assert proxy.store.health()["ops"]["reads"] == 0  # nor a cooldown row read


def test_another_clients_object_is_refused_on_every_instance(own_servers, azurite, table):
    sims, urls, _ = two_instances(own_servers, azurite, table)
    response = v1(urls[0], "key-a").responses.create(model="chat", input="private")
    calls = sum(len(s.calls) for s in sims)
    with pytest.raises(openai.NotFoundError):
        v1(urls[1], "key-b").responses.retrieve(response.id)
    assert sum(len(s.calls) for s in sims) == calls
    assert v1(urls[1], "key-a").responses.retrieve(response.id).id == response.id


@pytest.fixture
def relay(own_servers, azurite) -> Iterator[SlowRelay]:
    """A relay in front of Azurite, on the servers' loop: through it, Azurite stops and restarts as far as
    the instances can tell, in milliseconds rather than a Node.js restart."""
    relay = SlowRelay(azurite.table_url)
    own_servers.run(relay.start())
    yield relay
    own_servers.run(relay.close())


def test_with_the_table_down_an_object_this_instance_does_not_know_is_a_503_never_a_look_up(
    own_servers, azurite, relay, table, monkeypatch
):
    monkeypatch.setattr(object_table, "OUTAGE_RETRY_SECONDS", 0.3)
    sims, urls, proxies = two_instances(own_servers, Azurite(external_url=relay.url), table)
    a, b = v1(urls[0]), v1(urls[1])
    own_servers.run(relay.go_away())
    try:
        first = a.responses.create(model="chat", input="hi")
        second = a.responses.create(model="chat", input="more", previous_response_id=first.id)  # A's memory
        calls = sum(len(s.calls) for s in sims)
        with pytest.raises(openai.InternalServerError) as down:  # B can't tell whose it is: refused
            b.responses.create(model="chat", input="more", previous_response_id=second.id)
        assert down.value.status_code == 503 and int(down.value.response.headers["retry-after"]) >= 1
        assert sum(len(s.calls) for s in sims) == calls  # no backend was asked
        assert proxies[1].objects.counters["lookups"] == 0
        assert proxies[0].objects.records.health()["healthy"] is False
        assert proxies[0].objects.records.health()["unsaved"] >= 2
    finally:  # back without the table, as a restarted in-memory Azurite
        own_servers.run(drop_table(azurite.connection_string, table))
        own_servers.run(relay.come_back())
    time.sleep(0.4)
    a.responses.retrieve(second.id)  # served from A's memory
    a.responses.create(model="chat", input="x")  # a call after the retry time finds the table back
    deadline = time.monotonic() + 10
    while proxies[0].objects.records.health()["unsaved"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert proxies[0].objects.records.health()["healthy"] is True
    time.sleep(0.4)  # B's own retry time
    third = b.responses.create(model="chat", input="more", previous_response_id=second.id)
    assert third.previous_response_id == second.id  # written meanwhile: every instance routes it
    with pytest.raises(openai.NotFoundError):  # and it is still A's client's alone
        v1(urls[1], "key-b").responses.retrieve(second.id)


def test_an_expired_row_is_absent_and_the_sweep_deletes_expired_rows(azurite, table):
    async def run() -> None:
        store = TableObjectStore(StateSettings(connection_string=azurite.connection_string, table=table))
        other = TableObjectStore(StateSettings(connection_string=azurite.connection_string, table=table))
        try:
            past = time.time() - 1
            await store.create("resp_old", ObjectRecord("1", "key:a", "response", past))
            await store.create("resp_old2", ObjectRecord("1", "key:a", "response", past))
            await store.create("resp_new", ObjectRecord("2", "key:a", "response", time.time() + 60))
            assert await other.find("resp_old") is None
            assert (await other.find("resp_new")).backend == "2"
            assert await other.sweep() >= 1
            assert await other.sweep() == 0
            for odd in ("resp_'x' or 1", "a/b?c#d%e", "x" * 2000, "\u00e9t\u00e9"):  # never an error, never a fault
                assert await other.find(odd) is None
            assert other.health()["healthy"] is True
        finally:
            await store.close()
            await other.close()

    asyncio.run(run())


def test_a_record_is_inserted_once_and_no_instance_can_replace_its_owner(azurite, table):
    async def run() -> None:
        settings = StateSettings(connection_string=azurite.connection_string, table=table)
        first, second, third = (TableObjectStore(settings) for _ in range(3))
        try:
            later = time.time() + 60
            owned = await first.create("resp_1", ObjectRecord("1", "key:alice", "response", later))
            held = await second.create("resp_1", ObjectRecord("2", "", "response", later))  # a look-up's, ownerless
            assert owned.client == held.client == "key:alice" and held.backend == "1"
            assert (await third.find("resp_1")).client == "key:alice"
            await first.create("file-2", ObjectRecord("1", "key:alice", "file", later))
            await second.create("file-3", ObjectRecord("2", "key:bob", "file", later))
            assert await third.owned("key:alice", "file") == {"file-2"}
            assert await third.owned("key:bob", "file") == {"file-3"}
            for store in (first, second, third):
                assert store.health()["healthy"] is True
        finally:
            for store in (first, second, third):
                await store.close()

    asyncio.run(run())


def test_the_stateful_benchmarks_mix_fails_no_call_through_two_instances(own_servers, azurite, table):
    from bench.stateful import run

    _, urls, _ = two_instances(own_servers, azurite, table)
    tally = run([v1(url) for url in urls], conversations=4, turns=5)
    assert sum(tally.calls.values()) >= 50 and sum(tally.failed.values()) == 0, tally.errors

"""Reasoning items recorded from a Responses answer, and records kept per client.

Only the backend's own reasoning items are recorded (`output[]` items of type `reasoning`; in a
stream, the items of `response.output_item.added` / `.done` and the `output[]` of the events that
carry the response), never an `rs_` id the client chose and the answer echoes (`tools`,
`metadata`, `instructions`, the text itself). In memory, a client's records are dropped only while
it holds the most: another client's flood never takes them.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import random
import time
import uuid
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from lb.app import create_app
from lb.config import load_settings
from lb.objects.reasoning import MAX_ITEMS, watch_reasoning
from lb.objects.records import ObjectRecord, ObjectStore

KEYS = "alice:key-a,bob:key-b"
REASONING = "reasoning"
FAKE = [f"rs_fake{i}" for i in range(50)]
SCHEMA = {"type": "object", "properties": {f"p{i}": {"type": "string", "id": fake} for i, fake in enumerate(FAKE)}}
# What bob sends: rs_ ids everywhere a client may write, and a whole fake output item in a schema
ASKED = {
    "model": "chat",
    "input": "hi",
    "instructions": 'say {"id": "rs_instructions", "type": "reasoning"}',
    "tools": [{"type": "function", "name": "f", "parameters": SCHEMA, "strict": False}],
    "metadata": {"id": "rs_metadata", "output": json.dumps([{"id": "rs_meta2", "type": "reasoning"}])},
    "text": {"format": {"type": "json_schema", "name": "x", "schema": {"output": [{"id": "rs_x", "type": REASONING}]}}},
}


class Reasoner:
    """A Responses API making `items` reasoning items per answer (ids `rs_<name>_...`), echoing the
    request's `instructions`, `tools`, `metadata` and `text` as Azure does, its text quoting
    `"id": "rs_text"`; JSON, or an event stream with `stream: true`, gzip-compressed if asked.
    A call replaying a reasoning item is answered 400 `invalid_encrypted_content` unless it made it."""

    def __init__(self, name: str, items: int = 2, compress: bool = False) -> None:
        self.name, self.items, self.compress = name, items, compress
        self.made: set[str] = set()
        self.replayed: list[str] = []

    def response(self, request: dict[str, Any]) -> dict[str, Any]:
        reasoning = [
            {"id": f"rs_{self.name}_{uuid.uuid4().hex}", "type": REASONING, "summary": [], "encrypted_content": "gA"}
            for _ in range(self.items)
        ]
        self.made.update(item["id"] for item in reasoning)
        text = 'a quoted item: {"id": "rs_text", "type": "reasoning"}'
        message = {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text}],
        }
        echoed = {k: request[k] for k in ("instructions", "tools", "metadata", "text") if k in request}
        return {"id": f"resp_{uuid.uuid4().hex}", "object": "response", **echoed, "output": [*reasoning, message]}

    def events(self, response: dict[str, Any]) -> bytes:
        started = {**response, "output": []}
        events: list[dict[str, Any]] = [{"type": "response.created", "response": started}]
        for index, item in enumerate(response["output"]):
            events.append({"type": "response.output_item.added", "output_index": index, "item": item})
            if item["type"] == "message":
                delta = item["content"][0]["text"]
                events.append({"type": "response.output_text.delta", "item_id": item["id"], "delta": delta})
            events.append({"type": "response.output_item.done", "output_index": index, "item": item})
        events.append({"type": "response.completed", "response": response})
        return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        request = json.loads(body or b"{}")
        replays = [i["id"] for i in request.get("input", []) if isinstance(i, dict) and i.get("type") == "reasoning"]
        if replays:
            self.replayed += replays
            ok = all(i in self.made for i in replays)
            answer = {"id": "resp_next", "output": []} if ok else {"error": {"code": "invalid_encrypted_content"}}
            return await self.send(send, 200 if ok else 400, b"application/json", json.dumps(answer).encode())
        response = self.response(request)
        if request.get("stream"):
            return await self.send(send, 200, b"text/event-stream", self.events(response))
        await self.send(send, 200, b"application/json", json.dumps(response).encode())

    async def send(self, send: Any, status: int, content_type: bytes, data: bytes) -> None:
        headers = [(b"content-type", content_type)]
        if self.compress:
            data = gzip.compress(data)
            headers.append((b"content-encoding", b"gzip"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for start in range(0, len(data), 700):  # many reads: items and events split between them
            await send({"type": "http.response.body", "body": data[start : start + 700], "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def reasoners(servers, *backends: Reasoner, **env: str):
    settings = {"LB_AFFINITY": "off", "LB_CLIENT_KEYS": KEYS, **env}
    for i, backend in enumerate(backends, start=1):
        settings[f"BACKEND_{i}_URL"] = servers.start(backend)
        settings[f"BACKEND_{i}_APIKEY"] = "key"
    app = create_app(load_settings(settings))
    return servers.start(app), app.state.proxy


def create(url: str, key: str, **extra: Any) -> httpx.Response:
    body = {**ASKED, "store": False, "include": ["reasoning.encrypted_content"], **extra}
    return httpx.post(url + "/openai/v1/responses", json=body, headers={"api-key": key}, timeout=20)


def output_items(answer: httpx.Response) -> list[dict[str, Any]]:
    if answer.headers["content-type"].startswith("text/event-stream"):
        events = [json.loads(line[5:]) for line in answer.text.splitlines() if line.startswith("data:")]
        return next(e["response"]["output"] for e in events if e["type"] == "response.completed")
    return answer.json()["output"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_only_the_backends_reasoning_items_are_recorded_and_routed_to_their_holder(servers, stream, compress):
    one, two = Reasoner("one", compress=compress), Reasoner("two", compress=compress)
    url, proxy = reasoners(servers, one, two)
    answer = create(url, "key-b", stream=stream)
    assert answer.status_code == 200
    items = [i for i in output_items(answer) if i["type"] == "reasoning"]
    assert len(items) == 2 and answer.headers.get("content-encoding") == ("gzip" if compress else None)
    records = proxy.objects.records
    assert records.counts() == {"reasoning": 2}  # none of the echoed or quoted rs_ ids
    holder = answer.headers["x-lb-backend"]
    for item in items:
        record = records.known(item["id"])
        assert record is not None and record.client == "key:bob" and record.backend == holder
    for fake in ("rs_fake0", "rs_instructions", "rs_metadata", "rs_meta2", "rs_x", "rs_text"):
        assert records.known(fake) is None
    replay = [*items, {"role": "user", "content": "next"}]
    for _ in range(4):  # random choice would reach the other backend about half the time
        again = httpx.post(
            url + "/openai/v1/responses",
            json={"model": "chat", "input": replay, "store": False},
            headers={"api-key": "key-b"},
            timeout=20,
        )
        assert again.status_code == 200 and again.headers["x-lb-backend"] == holder
    other = two if holder == "1" else one
    assert other.replayed == []
    with httpx.Client(base_url=url, headers={"api-key": "key-a"}, timeout=20) as alice:  # bob's items are bob's
        refused = alice.post("/openai/v1/responses", json={"model": "chat", "input": replay, "store": False})
    assert refused.status_code == 404


def test_one_answer_records_at_most_max_items(servers):
    backend = Reasoner("many", items=MAX_ITEMS + 40)
    url, proxy = reasoners(servers, backend)
    answer = create(url, "key-b")
    assert answer.status_code == 200 and len(output_items(answer)) == MAX_ITEMS + 41  # relayed whole
    assert proxy.objects.records.counts() == {"reasoning": MAX_ITEMS}
    kept = [i["id"] for i in output_items(answer)[:MAX_ITEMS]]
    assert all(proxy.objects.records.known(i) for i in kept)  # the first ones, in order


def test_alices_records_survive_bobs_reasoning_flood_in_memory(servers):
    backend = Reasoner("flood", items=MAX_ITEMS)
    url, proxy = reasoners(servers, backend)
    proxy.objects.records.max_records = 300
    mine = create(url, "key-a")
    alices = [i["id"] for i in output_items(mine) if i["type"] == "reasoning"]
    for _ in range(6):  # bob: 6 answers of as many items, far past the cap
        assert create(url, "key-b").status_code == 200
    records = proxy.objects.records
    assert all(records.known(i) is not None for i in alices)
    assert len(asyncio.run(records.owned("key:bob", "reasoning"))) == 300 - MAX_ITEMS  # his flood dropped his own
    replay = [*(i for i in output_items(mine) if i["type"] == "reasoning"), {"role": "user", "content": "next"}]
    again = httpx.post(
        url + "/openai/v1/responses",
        json={"model": "chat", "input": replay, "store": False},
        headers={"api-key": "key-a"},
        timeout=20,
    )
    assert again.status_code == 200


def test_alices_files_survive_bobs_uploads_and_bob_loses_his_oldest(make_pool):
    pool = make_pool(2, env={"LB_CLIENT_KEYS": KEYS})
    alice, bob = pool.v1("key-a"), pool.v1("key-b")
    hers = [alice.files.create(file=("a.txt", io.BytesIO(b"a")), purpose="assistants").id for _ in range(3)]
    pool.proxy.objects.records.max_records = 10
    his = [bob.files.create(file=("b.txt", io.BytesIO(b"b")), purpose="assistants").id for _ in range(12)]
    for file_id in hers:
        assert alice.files.retrieve(file_id).id == file_id
    with httpx.Client(base_url=pool.url, headers={"api-key": "key-b"}, timeout=10) as http:
        assert [http.get(f"/openai/v1/files/{f}").status_code for f in his] == [404] * 5 + [200] * 7


def record(client: str) -> ObjectRecord:
    return ObjectRecord("1", client, "file", time.time() + 3600)


def test_past_the_cap_the_client_holding_the_most_loses_its_least_recently_used():
    store = ObjectStore(max_records=6)

    async def make() -> None:
        for i in range(3):
            await store.create(f"file-a{i}", record("alice"))
        for i in range(10):
            await store.create(f"file-b{i}", record("bob"))
            store.known("file-b0")  # bob uses his first file: it stays, his others go

    asyncio.run(make())
    assert asyncio.run(store.owned("alice", "file")) == {"file-a0", "file-a1", "file-a2"}
    assert asyncio.run(store.owned("bob", "file")) == {"file-b0", "file-b8", "file-b9"}
    asyncio.run(store.create("file-a3", record("alice")))  # alice among the heaviest: her own oldest goes
    assert asyncio.run(store.owned("alice", "file")) == {"file-a1", "file-a2", "file-a3"}
    assert len(asyncio.run(store.owned("bob", "file"))) == 3


def test_a_new_clients_first_record_is_kept_when_every_client_is_at_the_top():
    store = ObjectStore(max_records=2)
    asyncio.run(store.create("file-a", record("alice")))
    asyncio.run(store.create("file-b", record("bob")))
    asyncio.run(store.create("file-c", record("carol")))
    assert store.known("file-c") is not None and sum(store.counts().values()) == 2


def relay(chunks: list[bytes], stream: bool, encoding: str = "identity") -> tuple[bytes, list[str]]:
    """What watch_reasoning relays and records from an answer read in `chunks`."""
    seen: list[str] = []

    async def on_id(item_id: str) -> None:
        seen.append(item_id)

    async def source():
        for chunk in chunks:
            yield chunk

    async def run() -> bytes:
        headers = {"content-encoding": encoding}
        answer = SimpleNamespace(upstream=SimpleNamespace(headers=headers), event_stream=stream, body_iterator=source())
        watch_reasoning(answer, on_id)  # type: ignore[arg-type]  # the attributes it reads
        return b"".join([chunk async for chunk in answer.body_iterator])

    return asyncio.run(run()), seen


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_items_are_found_wherever_the_reads_split_and_every_byte_is_relayed(stream):
    backend = Reasoner("s")
    response = backend.response({**ASKED, "instructions": 'x\\"y\\\\ {"id": "rs_i", "type": "reasoning"}'})
    whole = backend.events(response) if stream else json.dumps(response, indent=1).encode()
    want = [i["id"] for i in response["output"] if i["type"] == "reasoning"]
    for cut in range(1, len(whole), 7 if len(whole) > 4000 else 1):
        relayed, seen = relay([whole[:cut], whole[cut:]], stream)
        assert relayed == whole and seen == want, cut
    relayed, seen = relay([whole[i : i + 1] for i in range(len(whole))], stream)  # a byte per read
    assert relayed == whole and seen == want


def test_a_stream_records_only_output_items_of_their_own_events():
    def event(payload: dict[str, Any]) -> bytes:
        return f"data: {json.dumps(payload)}\n\n".encode()

    def item(item_id: str) -> dict[str, str]:
        return {"id": item_id, "type": REASONING}

    stream = b"".join(
        [
            event({"item": item("rs_real"), "type": "response.output_item.done"}),  # its type last: still read
            event({"type": "response.output_text.delta", "item": item("rs_delta")}),
            event({"type": "response.completed", "item": item("rs_wrong")}),
            event({"type": "response.output_item.added", "response": {"output": [item("rs_no")]}}),
            event({"type": "response.completed", "response": {"tools": [{"output": [item("rs_t")]}], "output": []}}),
            event({"type": "response.completed", "response": {"output": [item("rs_real")]}}),  # seen: once
            event({"type": "response.incomplete", "response": {"output": [item("rs_late")]}}),
        ]
    )
    relayed, seen = relay([stream], True)
    assert relayed == stream and seen == ["rs_real", "rs_late"]


def test_an_answer_that_is_not_json_or_not_readable_is_relayed_and_records_nothing():
    for chunks, stream, encoding in [
        ([b"not json {", b'"output": [{"id": "rs_1", "type": "reasoning"}]}'], False, "identity"),
        ([b'[{"output": [{"id": "rs_1", "type": "reasoning"}]}]'], False, "identity"),
        ([b'{"output": [{"id": "rs_1", "type": "reasoning"}]}'], False, "br"),
        ([b"\x1f\x8b not gzip"], False, "gzip"),
        ([b"data: [DONE]\n\n", b'data: {"type": "response.completed", "response": {"output": '], True, "identity"),
    ]:
        relayed, seen = relay(chunks, stream, encoding)
        assert relayed == b"".join(chunks) and seen == [], chunks


def test_random_answers_read_in_random_pieces_record_what_json_loads_finds():
    """Against a reference reading (json.loads), over random documents: items in random key order,
    rs_ ids, escapes and long strings off the paths, pieces cut anywhere."""
    rng = random.Random(7)

    def junk(depth: int = 0) -> Any:
        roll = rng.random()
        if depth > 3 or roll < 0.3:
            return rng.choice(["x", 'q"uo\\te\\\\', "rs_fake", 3, None, True, "é\u2028", "a" * 300, "rs_" + "b" * 40])
        if roll < 0.6:
            return [junk(depth + 1) for _ in range(rng.randint(0, 4))]
        keys = ["id", "type", "output", "item", "response", "k", REASONING]
        return {rng.choice(keys): junk(depth + 1) for _ in range(rng.randint(0, 4))}

    def item() -> dict[str, Any]:
        fields = {"id": f"rs_{rng.randint(0, 10**9)}" if rng.random() < 0.8 else "msg_1"}
        fields["type"] = rng.choice([REASONING, "message", "function_call"])
        fields["encrypted_content"] = "g" * rng.randint(0, 500)
        fields["summary"] = junk()
        keys = list(fields)
        rng.shuffle(keys)
        return {k: fields[k] for k in keys}

    def reasoning_ids(items: Any) -> list[str]:
        return [i["id"] for i in items or [] if i["type"] == REASONING and i["id"].startswith("rs_")]

    def pieces(raw: bytes) -> list[bytes]:
        cuts = sorted(rng.sample(range(1, len(raw)), min(len(raw) - 1, rng.randint(0, 20))))
        return [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]

    for _ in range(300):
        doc = {"instructions": junk(), "tools": junk(), "metadata": junk(), "output": [item() for _ in range(4)]}
        keys = list(doc)
        rng.shuffle(keys)
        raw = json.dumps({k: doc[k] for k in keys}, ensure_ascii=rng.random() < 0.5).encode()
        assert relay(pieces(raw), False)[1] == reasoning_ids(doc["output"]), raw
    for _ in range(200):
        kinds = ["response.completed", "response.output_item.done", "response.output_text.delta", "error"]
        events, want = [], []
        for kind in rng.choices(kinds, k=5):
            event: dict[str, Any] = {"type": kind, "item": item(), "response": {"tools": junk(), "output": [item()]}}
            keys = list(event)
            rng.shuffle(keys)
            events.append(f"data: {json.dumps({k: event[k] for k in keys})}\n\n".encode())
            found = reasoning_ids([event["item"]] if kind == "response.output_item.done" else [])
            found += reasoning_ids(event["response"]["output"]) if kind == "response.completed" else []
            want += [i for i in found if i not in want]
        raw = b"".join(events)
        assert relay(pieces(raw), True)[1] == want, raw

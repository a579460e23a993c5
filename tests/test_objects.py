"""Stateful objects through the pool (one instance, records in memory): the real openai SDK over sockets.

Three simulated backends, each keeping its own stored responses, conversations, files and batches
(lb.sim.objects) and answering as Azure does for an id it does not hold; without the routing, two
calls in three would reach a backend that answers 400 `previous_response_not_found` or 404.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from lb.errors import BadRequest
from lb.objects.routes import classify
from tests.conftest import API_VERSION

KEYS = {"LB_CLIENT_KEYS": "chatapp:key-a,batch:key-b"}
LOOKUP = {**KEYS, "LB_OBJECT_LOOKUP": "on"}  # ids made before the balancer are looked for
JSONL = b'{"custom_id": "1", "method": "POST", "url": "/chat/completions", "body": {"model": "chat", "messages": []}}\n'


@pytest.fixture
def pool(make_pool):
    return make_pool(3, env=KEYS)


def holder_of(pool, object_id: str) -> int:
    holders = [i for i, b in enumerate(pool.backends) if object_id in {**b.objects.responses, **b.objects.files}]
    assert len(holders) == 1
    return holders[0]


def test_calls_that_cannot_name_or_create_objects_are_dismissed_by_their_path():
    chat = "/openai/deployments/chat/chat/completions?api-version=1"
    assert classify("POST", chat, b'{"previous_response_id": "resp_1"}', "application/json") is None
    assert classify("POST", "/openai/v1/embeddings", b"{}", "application/json") is None
    assert classify("POST", "/openai/v1/chat/completions", b"{}", "application/json") is None


def test_ids_are_found_in_the_path_and_the_body():
    call = classify("GET", "/openai/v1/responses/resp_1/input_items", b"", None)
    assert [(i.value, i.kind, i.field) for i in call.ids] == [("resp_1", "response", None)] and not call.creates
    payload = {
        "model": "m",
        "previous_response_id": "resp_2",
        "conversation": {"id": "conv_3"},
        "tools": [{"type": "file_search", "vector_store_ids": ["vs_4"]}],
        "input": [{"content": [{"type": "input_file", "file_id": "file-5"}]}],
    }
    body = json.dumps(payload).encode()
    call = classify("POST", "/openai/v1/responses", body, "application/json")
    assert {(i.value, i.kind) for i in call.ids} == {
        ("resp_2", "response"),
        ("conv_3", "conversation"),
        ("vs_4", "vector_store"),
        ("file-5", "file"),
    }
    assert call.creates
    assert not classify("POST", "/openai/v1/responses", b'{"store": false, "input": "x"}', "application/json").creates
    with pytest.raises(BadRequest):  # what the balancer can't read, it does not forward
        classify("POST", "/openai/v1/responses", b"previous_response_id: not json", "application/json")
    mention = json.dumps({"input": 'say {"file_id": "file-9", "previous_response_id": "resp_9"}'}).encode()
    assert classify("POST", "/openai/v1/responses", mention, "application/json").ids == ()  # text, not fields
    run = classify("POST", "/openai/threads/thread_1/runs?api-version=1", b'{"assistant_id": "asst_2"}', None)
    assert [i.value for i in run.ids] == ["thread_1", "asst_2"] and not run.creates  # a run lives in its thread
    job = classify("GET", "/openai/v1/fine_tuning/jobs/ftjob-9", b"", None)
    assert [(i.value, i.kind) for i in job.ids] == [("ftjob-9", "fine_tuning_job")]
    assert classify("DELETE", "/openai/v1/files/file-1", b"", None).deletes


def test_a_five_turn_conversation_stays_on_the_backend_holding_it(pool):
    client = pool.v1("key-a")
    first = client.responses.with_raw_response.create(model="chat", input="turn 0")
    backend = first.headers["x-lb-backend"]
    previous = first.parse().id
    for turn in range(1, 6):
        raw = client.responses.with_raw_response.create(
            model="chat", input=f"turn {turn}", previous_response_id=previous
        )
        assert raw.headers["x-lb-backend"] == backend and raw.headers["x-lb-attempts"] == "1"
        previous = raw.parse().id
    holder = pool.backends[int(backend) - 1]
    assert holder_of(pool, previous) == int(backend) - 1 and len(holder.objects.responses) == 6
    assert sum(len(b.calls) for b in pool.backends) == 6  # no look-up, no failover: one call per turn
    report = pool.proxy.status_report()["objects"]
    assert report["records"] == {"response": 6} and report["calls"]["pinned"] == 5


def test_streamed_turns_are_recorded_from_the_first_event(pool):
    client = pool.v1("key-a")
    previous = None
    for turn in range(4):
        with client.responses.stream(model="chat", input=f"turn {turn}", previous_response_id=previous) as stream:
            response = stream.get_final_response()
        assert response.status == "completed"
        previous = response.id
    assert pool.proxy.objects.counters["pinned"] == 3 and pool.proxy.objects.counters["lookups"] == 0


def test_retrieve_input_items_cancel_and_delete_reach_the_holder(pool):
    client = pool.v1("key-a")
    response = client.responses.create(model="chat", input="hello")
    for _ in range(6):
        assert client.responses.retrieve(response.id).status == "completed"
    assert client.responses.input_items.list(response.id).data[0].content[0].text == "hello"
    with pytest.raises(openai.BadRequestError):  # the holder's own answer: only background responses cancel
        client.responses.cancel(response.id)
    background = client.responses.create(model="chat", input="long job", background=True)
    assert client.responses.cancel(background.id).status == "cancelled"
    client.responses.delete(response.id)
    assert pool.proxy.objects.records.known(response.id) is None  # forgotten with the object
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    assert pool.proxy.objects.counters["refused"] == 0


def test_a_background_response_is_polled_to_completion(pool):
    client = pool.v1("key-a")
    response = client.responses.create(model="chat", input="think", background=True)
    seen = [response.status]
    while response.status in ("queued", "in_progress"):
        response = client.responses.retrieve(response.id)
        seen.append(response.status)
    assert seen == ["queued", "in_progress", "completed"] and response.output_text


def test_a_file_upload_then_a_batch_made_from_it_polled_to_its_output(pool):
    for client in (pool.v1("key-b"), pool.azure("key-b")):  # both API shapes
        uploaded = client.files.create(file=("requests.jsonl", JSONL * 3), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/chat/completions", completion_window="24h")
        while batch.status not in ("completed", "failed", "cancelled"):
            batch = client.batches.retrieve(batch.id)
        assert batch.status == "completed" and batch.request_counts.completed == 3
        assert client.files.content(batch.output_file_id).read().count(b"custom_id") == 3
        assert client.files.retrieve(uploaded.id).filename == "requests.jsonl"
        client.files.delete(uploaded.id)


def test_a_conversation_and_its_responses_stay_together(pool):
    client = pool.v1("key-a")
    conversation = client.conversations.create()
    for turn in range(4):
        response = client.responses.create(model="chat", input=f"turn {turn}", conversation=conversation.id)
        assert response.id
    assert client.conversations.retrieve(conversation.id).id == conversation.id


def test_the_holder_throttled_is_the_clients_429_and_no_other_backend_is_called(pool):
    client = pool.v1("key-a")
    response = client.responses.create(model="chat", input="hi")
    holder = pool.backends[holder_of(pool, response.id)]
    holder.throttle_next, holder.retry_after = 1, 7
    calls = [len(b.calls) for b in pool.backends]
    with pytest.raises(openai.RateLimitError) as throttled:
        client.responses.create(model="chat", input="again", previous_response_id=response.id)
    assert throttled.value.response.headers["retry-after"] == "7"
    # while it cools for this deployment, the proxy answers at once with its remaining time, calling nobody
    with pytest.raises(openai.RateLimitError) as cooling:
        client.responses.create(model="chat", input="again", previous_response_id=response.id)
    assert 1 <= int(cooling.value.response.headers["retry-after"]) <= 7
    assert [len(b.calls) for b in pool.backends] == [
        c + (b is holder) for c, b in zip(calls, pool.backends, strict=True)
    ]


def test_a_holder_failing_is_the_clients_5xx_without_failover(pool):
    client = pool.v1("key-a")
    response = client.responses.create(model="chat", input="hi")
    holder = pool.backends[holder_of(pool, response.id)]
    holder.fail_status = 503
    others = sum(len(b.calls) for b in pool.backends if b is not holder)
    with pytest.raises(openai.InternalServerError):
        client.responses.retrieve(response.id)
    assert sum(len(b.calls) for b in pool.backends if b is not holder) == others


def test_another_clients_object_is_a_404_as_if_it_did_not_exist(pool):
    owner, other = pool.v1("key-a"), pool.v1("key-b")
    response = owner.responses.create(model="chat", input="private")
    uploaded = owner.files.create(file=("a.jsonl", JSONL), purpose="batch")
    calls = sum(len(b.calls) for b in pool.backends)
    with pytest.raises(openai.NotFoundError) as refused:
        other.responses.retrieve(response.id)
    assert refused.value.body["message"] == f"Response with id '{response.id}' not found."
    with pytest.raises(openai.NotFoundError) as refused:
        other.responses.create(model="chat", input="x", previous_response_id=response.id)
    assert refused.value.body["code"] == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        other.batches.create(input_file_id=uploaded.id, endpoint="/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(response.id)
    assert sum(len(b.calls) for b in pool.backends) == calls  # refused without a backend call
    assert owner.responses.retrieve(response.id).id == response.id
    assert pool.proxy.objects.counters["refused"] == 4


def test_an_id_made_without_the_balancer_is_looked_for_then_pinned(make_pool):
    pool = make_pool(3, env=LOOKUP)
    backend = pool.backends[2]
    made = backend.create_response({"model": "chat", "input": "made directly"})
    client = pool.v1("batch:key-b".split(":")[1])
    raw = client.responses.with_raw_response.retrieve(made["id"])
    assert raw.headers["x-lb-backend"] == "3" and 1 <= int(raw.headers["x-lb-attempts"]) <= 3
    assert pool.proxy.objects.counters["lookups"] == 1 and pool.proxy.objects.counters["found"] == 1
    raw = client.responses.with_raw_response.create(model="chat", input="next", previous_response_id=made["id"])
    assert raw.headers["x-lb-backend"] == "3" and raw.headers["x-lb-attempts"] == "1"
    # found by look-up, its creator unknown: any client of the pool may use it
    assert pool.v1("key-a").responses.retrieve(made["id"]).id == made["id"]


def test_an_unknown_id_is_looked_for_at_most_max_attempts_then_the_backends_answer_passes(make_pool):
    pool = make_pool(3, env={**LOOKUP, "LB_MAX_ATTEMPTS": "2"})
    client = pool.v1("key-a")
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.retrieve("resp_doesnotexist")
    assert missing.value.response.headers["x-lb-attempts"] == "2"
    assert sum(len(b.calls) for b in pool.backends) == 2
    with pytest.raises(openai.BadRequestError) as bad:  # not an id Azure issues: refused before any backend
        client.responses.create(model="chat", input="x", previous_response_id="not an id at all")
    assert bad.value.body["code"] == "invalid_id" and sum(len(b.calls) for b in pool.backends) == 2
    assert pool.proxy.objects.records.counts() == {}


def test_a_body_that_is_not_json_is_refused_and_reaches_no_backend(pool):
    body = b"previous_response_id=resp_1 & not json"
    with httpx.Client(base_url=pool.url, headers={"api-key": "key-a"}, timeout=10) as http:
        answer = http.post(
            f"/openai/responses?api-version={API_VERSION}", content=body, headers={"content-type": "application/json"}
        )
    sent = [c.body for b in pool.backends for c in b.calls]
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "BadRequest" and sent == []
    assert pool.proxy.objects.records.counts() == {}


def test_store_false_chat_and_embeddings_record_nothing(pool):
    client = pool.v1("key-a")
    client.responses.create(model="chat", input="x", store=False)
    with client.responses.stream(model="chat", input="x", store=False) as stream:
        stream.get_final_response()
    client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    client.embeddings.create(model="embedding", input="hi")
    assert pool.proxy.objects.records.counts() == {} and not pool.proxy.objects.counters


def _relayed(generator) -> list[bytes]:
    import asyncio

    async def collect() -> list[bytes]:
        return [chunk async for chunk in generator]

    return asyncio.run(collect())


def _source(*chunks: bytes):
    async def gen():
        for chunk in chunks:
            yield chunk

    return gen()


def test_the_first_event_is_read_across_chunks_and_every_byte_relayed_unchanged():
    from lb.objects.watch import _first_event

    seen: list[str] = []

    async def on_id(object_id: str) -> None:
        seen.append(object_id)

    event = b'event: response.created\ndata: {"type": "response.created", "response": {"id": "resp_9"}}\n\n'
    chunks = (event[:20], event[20:] + b"event: response.in_progress\n", b"data: {}\n\n", b"data: [DONE]\n\n")
    assert b"".join(_relayed(_first_event(_source(*chunks), on_id))) == b"".join(chunks)
    assert seen == ["resp_9"]


def test_a_gzip_json_answer_yields_its_id_and_a_batch_its_output_file():
    import gzip

    from lb.objects.watch import _whole_json

    seen: list[str] = []

    async def on_id(object_id: str) -> None:
        seen.append(object_id)

    body = gzip.compress(json.dumps({"object": "batch", "id": "batch_1", "output_file_id": "file-2"}).encode())
    assert b"".join(_relayed(_whole_json(_source(body[:10], body[10:]), on_id, "gzip"))) == body
    assert seen == ["batch_1"]  # a creation's answer: its own id
    seen.clear()
    made = ("output_file_id", "error_file_id")  # a batch retrieved by its owner: the files it made
    assert b"".join(_relayed(_whole_json(_source(body[:10], body[10:]), on_id, "gzip", made))) == body
    assert seen == ["file-2"]
    seen.clear()
    assert _relayed(_whole_json(_source(b"not json"), on_id, "identity")) == [b"not json"] and seen == []


def test_the_azure_client_shape_is_routed_the_same(pool):
    client = pool.azure("key-a")  # /openai/responses?api-version=... and /openai/files?api-version=...
    previous = client.responses.create(model="chat", input="turn 0").id
    for turn in range(1, 4):
        previous = client.responses.create(model="chat", input=f"turn {turn}", previous_response_id=previous).id
    assert client.responses.retrieve(previous).previous_response_id is not None
    assert pool.proxy.objects.counters["pinned"] == 4 and pool.proxy.objects.counters["lookups"] == 0


def test_encrypted_reasoning_items_replayed_without_store_go_back_to_the_backend_that_made_them(pool):
    client = pool.v1("key-a")
    include = ["reasoning.encrypted_content"]
    context: list = [{"role": "user", "content": "turn 0"}]
    for turn in range(1, 5):  # store: false, the whole context replayed each turn, as stateless clients do
        if turn % 2:
            response = client.responses.create(model="chat", input=context, store=False, include=include)
        else:
            with client.responses.stream(model="chat", input=context, store=False, include=include) as stream:
                response = stream.get_final_response()
        reasoning = [item for item in response.output if item.type == "reasoning"]
        assert reasoning and reasoning[0].encrypted_content
        context += [item.model_dump(exclude_none=True) for item in reasoning]
        context.append({"role": "user", "content": f"turn {turn}"})
    assert pool.proxy.objects.counters["pinned"] == 3 and pool.proxy.objects.counters["lookups"] == 0
    assert pool.proxy.objects.records.counts() == {"reasoning": 4}  # store: false: no response recorded


def test_a_reasoning_item_unknown_to_the_balancer_is_found_by_the_look_up(make_pool):
    pool = make_pool(3, env=LOOKUP)
    backend = pool.backends[1]
    made = backend.create_response({"input": "x", "include": ["reasoning.encrypted_content"]})
    item = made["output"][-1]
    raw = pool.v1("key-a").responses.with_raw_response.create(
        model="chat", input=[item, {"role": "user", "content": "next"}], store=False
    )
    assert raw.headers["x-lb-backend"] == "2" and pool.proxy.objects.counters["found"] == 1


def test_another_clients_id_spelled_with_json_escapes_is_still_refused_without_a_backend_call(pool):
    response = pool.v1("key-a").responses.create(model="chat", input="private")
    escaped_id = response.id.replace("_", "\\u005f", 1)
    alice, large = response.id, "y" * 100_000  # a large body is decoded in a thread
    bodies = [
        f'{{"model": "chat", "input": "x", "previous_response_id": "{escaped_id}"}}',
        f'{{"model": "chat", "input": "x", "previous_response\\u005fid": "{alice}"}}',
        f'{{"model": "chat", "input": "x", "previous_respons\\u0065_id": "{escaped_id}"}}',
        f'{{"model": "chat", "input": "{large}", "previous_response\\u005fid": "{alice}"}}',
    ]
    calls = sum(len(b.calls) for b in pool.backends)
    with httpx.Client(base_url=pool.url, headers={"api-key": "key-b"}, timeout=10) as http:
        for body in bodies:
            for path in ("/openai/v1/responses", f"/openai/responses?api-version={API_VERSION}"):
                answer = http.post(path, content=body.encode(), headers={"content-type": "application/json"})
                assert answer.status_code == 404, (path, body[:120], answer.text)
                assert answer.json()["error"]["code"] == "previous_response_not_found"
    assert sum(len(b.calls) for b in pool.backends) == calls  # refused without a backend call
    assert pool.proxy.objects.counters["refused"] == len(bodies) * 2


def test_an_id_field_the_byte_search_cannot_read_is_decoded():
    body = json.dumps({"conversation": {"type": "x", "id": "conv_1"}, "file_ids": [f"file-{i}" for i in range(70)]})
    call = classify("POST", "/openai/v1/responses", body.encode(), "application/json")
    assert {i.value for i in call.ids} == {"conv_1", *(f"file-{i}" for i in range(70))}
    assert classify("POST", "/openai/v1/responses", b'{"previous_response_id": null}', None).ids == ()


def test_a_body_too_deeply_nested_to_decode_is_a_400_in_azures_shape(pool):
    deep = b'{"previous_response\\u005fid": "resp_1", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with httpx.Client(base_url=pool.url, headers={"api-key": "key-a"}, timeout=10) as http:
        for body in (deep, deep[:60_000] + b"\\u0041"):  # too deep; not JSON at all
            answer = http.post(
                f"/openai/responses?api-version={API_VERSION}",
                content=body,
                headers={"content-type": "application/json"},
            )
            assert answer.status_code == 400 and answer.json()["error"]["code"] == "BadRequest"
    assert sum(len(b.calls) for b in pool.backends) == 0


def test_object_routes_are_matched_whatever_their_case(pool):
    call = classify("GET", "/openai/V1/Responses/resp_1/Input_Items", b"", None)
    assert call is not None and [i.value for i in call.ids] == ["resp_1"]
    response = pool.v1("key-a").responses.create(model="chat", input="private")
    calls = sum(len(b.calls) for b in pool.backends)
    with httpx.Client(base_url=pool.url, headers={"api-key": "key-b"}, timeout=10) as http:
        for path in (f"/openai/v1/RESPONSES/{response.id}", f"/openai/Responses/{response.id}?api-version=1"):
            assert http.get(path).status_code == 404
    assert sum(len(b.calls) for b in pool.backends) == calls  # refused, not balanced to the holder


def test_a_looked_up_answer_points_its_location_at_the_proxy_not_the_backend():
    from lb.attempt import buffered
    from lb.config import Backend

    base = "https://acct.openai.azure.com"
    upstream = httpx.Response(
        404, headers={"location": f"{base}/openai/v1/files/file-1", "operation-location": f"{base}/openai/ops/1"}
    )
    response = buffered(upstream, b"{}", Backend("b", base), 1, lambda: "https://lb.example")
    assert response.headers["location"] == "https://lb.example/openai/v1/files/file-1"
    assert response.headers["operation-location"] == "https://lb.example/openai/ops/1"

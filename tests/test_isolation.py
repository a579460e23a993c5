"""A second client trying to reach the first one's stored objects, through one in-process proxy.

The two-instance, Azurite-backed versions of the issue's repros are in tests/test_isolation_e2e.py;
these pin down the rules themselves: a record is written once and never replaced, an id without a
record is refused with several clients (no backend call), lists show the caller's objects from the
whole pool.
"""

from __future__ import annotations

import asyncio
import io
import json
import time

import httpx
import openai
import pytest

from lb.objects.records import ObjectRecord, ObjectStore
from tests.conftest import CLIENT_KEY

KEYS = {"LB_CLIENT_KEYS": "alice:key-a,bob:key-b"}
JSON_TYPE = "application/json"


@pytest.fixture
def pool(make_pool):
    return make_pool(3, env=KEYS)


def test_a_record_is_inserted_once_and_never_replaced():
    async def run() -> None:
        store = ObjectStore()
        later = time.time() + 60
        first = await store.create("resp_1", ObjectRecord("1", "key:alice", "response", later))
        second = await store.create("resp_1", ObjectRecord("2", "", "response", later))
        assert first == second == store.known("resp_1") and second.client == "key:alice"

    asyncio.run(run())


def test_with_several_clients_an_id_without_a_record_is_a_404_with_no_backend_call(pool):
    made = pool.backends[1].create_response({"model": "chat", "input": "direct"})
    calls = pool.backend_calls()
    for key in ("key-a", "key-b"):
        with pytest.raises(openai.NotFoundError):
            pool.v1(key).responses.retrieve(made["id"])
        with pytest.raises(openai.NotFoundError) as previous:
            pool.v1(key).responses.create(model="chat", input="x", previous_response_id=made["id"])
        assert previous.value.body["code"] == "previous_response_not_found"
    assert pool.backend_calls() == calls
    assert pool.proxy.objects.records.counts() == {}  # nothing was recorded for anyone


def test_with_one_client_an_id_made_before_the_balancer_is_still_found(make_pool):
    pool = make_pool(3)  # one key: nobody to keep apart
    made = pool.backends[2].create_response({"model": "chat", "input": "direct"})
    assert pool.v1().responses.retrieve(made["id"]).id == made["id"]


def test_the_owners_objects_stay_the_owners_whatever_the_other_client_sends(pool):
    alice = pool.v1("key-a")
    response = alice.responses.create(model="chat", input="alice's secret")
    upload = alice.files.create(file=("a.jsonl", io.BytesIO(b'{"x": 1}\n')), purpose="batch")
    with httpx.Client(base_url=pool.url, headers={"api-key": "key-b"}, timeout=10) as http:
        attempts = [
            http.get(f"/openai/v1/responses/{response.id}"),
            http.get(f"/openai/v1/responses/{response.id}%2Finput_items"),
            http.get(f"/openai/v1/files/{upload.id}%2Fcontent"),
            http.get(f"/openai/v1/files/{upload.id}/content"),
            http.post(
                "/openai/v1/responses",
                content=json.dumps({"model": "chat", "input": "x", "previous_response_id": response.id}).encode(
                    "utf-16"
                ),
                headers={"content-type": "application/json"},
            ),
            http.post(
                "/openai/v1/responses",
                content=json.dumps({"model": "chat", "input": "x", "previous_response_id": response.id}),
                headers={"content-type": "text/plain"},
            ),
            http.post(
                "/openai/v1/fine_tuning/jobs",
                json={"model": "chat", "training_file": upload.id},
            ),
            http.post(
                "/openai/v1/chat/completions",
                json={
                    "model": "chat",
                    "messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": upload.id}}]}],
                },
            ),
            http.post(
                "/openai/v1/responses",
                json={"model": "chat", "input": "x", "metadata": {"file_id": "/" * 300}},
            ),
        ]
    for answer in attempts:
        assert not 200 <= answer.status_code < 300, (answer.request.url, answer.text)
        assert "error" in answer.json() and "alice's secret" not in answer.text and '{"x": 1}' not in answer.text
    assert [a.status_code for a in attempts[:4]] == [404, 400, 400, 404]
    assert attempts[4].status_code == 400 and attempts[5].status_code == 415
    assert alice.responses.retrieve(response.id).id == response.id
    assert alice.files.content(upload.id).read() == b'{"x": 1}\n'
    assert pool.proxy.objects.records.health()["healthy"] is True


@pytest.mark.parametrize(
    "path",
    [
        "/openai/Deployments/chat/Chat/Completions",
        "/openai/d%65ployments/chat/chat/completions",
        "/openai/deployments/ch%61t/chat/c%6Fmpletions",
        "/openai/V1/chat/completions",
    ],
)
def test_a_chat_on_a_path_in_another_case_or_encoding_is_read_for_the_objects_it_names(pool, path):
    """The backend may read each path as a chat call (`lb.apipath`): so the balancer reads its body
    for ids like any chat's. Bob's naming alice's file is a 404 with no backend call; alice's goes to
    the file's holder; a chat naming nothing is served, not refused as a route it can't read."""
    upload = pool.v1("key-a").files.create(file=("a.txt", io.BytesIO(b"alice's notes")), purpose="user_data")
    holder = next(str(i) for i, b in enumerate(pool.backends, start=1) if upload.id in b.objects.files)
    named = {
        "model": "chat",
        "messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": upload.id}}]}],
    }
    plain = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    url = f"{path}?api-version=2024-10-21"
    with (
        httpx.Client(base_url=pool.url, headers={"api-key": "key-a"}, timeout=10) as alice,
        httpx.Client(base_url=pool.url, headers={"api-key": "key-b"}, timeout=10) as bob,
    ):
        calls = pool.backend_calls()
        theirs = bob.post(url, json=named)
        assert theirs.status_code == 404 and set(theirs.json()["error"]) >= {"code", "message"}, theirs.text
        assert pool.backend_calls() == calls  # refused before any backend saw it
        for _ in range(3):  # the holder each time, never a backend that has no such file
            mine = alice.post(url, json=named)
            assert mine.status_code == 200 and mine.headers["x-lb-backend"] == holder, mine.text
        assert bob.post(url, json=plain).status_code == 200


def test_lists_show_the_callers_objects_from_the_whole_pool_paged_in_azures_shape(pool):
    alice, bob = pool.v1("key-a"), pool.v1("key-b")
    mine = [alice.files.create(file=(f"{i}.jsonl", io.BytesIO(b"{}\n")), purpose="batch").id for i in range(5)]
    theirs = bob.files.create(file=("b.jsonl", io.BytesIO(b"{}\n")), purpose="batch").id
    holders = {i for i, b in enumerate(pool.backends) for f in mine if f in b.objects.files}
    assert len(holders) >= 2  # spread over the pool, listed as one
    assert sorted(f.id for f in alice.files.list()) == sorted(mine)  # the SDK pages through them all
    assert [f.id for f in bob.files.list()] == [theirs]
    with httpx.Client(base_url=pool.url, headers={"api-key": "key-a"}, timeout=10) as http:
        first = http.get("/openai/v1/files", params={"limit": 2}).json()
        assert first["object"] == "list" and len(first["data"]) == 2 and first["has_more"] is True
        assert first["first_id"] == first["data"][0]["id"] and first["last_id"] == first["data"][1]["id"]
        rest = http.get("/openai/v1/files", params={"limit": 10, "after": first["last_id"]}).json()
        assert rest["has_more"] is False and len(rest["data"]) == 3
        assert {f["id"] for f in first["data"] + rest["data"]} == set(mine)
        assert http.get("/openai/v1/files", params={"limit": 1000}).status_code == 400
        assert http.get("/openai/v1/files", params={"after": "../x"}).status_code == 400


def test_a_large_body_is_read_to_its_end_for_the_ids_it_names(pool):
    response = pool.v1("key-a").responses.create(model="chat", input="alice's secret")
    filler = [{"role": "user", "content": "x" * 1000}] * 300  # ~300 KB: scanned in slices, parsed off the loop
    calls = pool.backend_calls()
    with httpx.Client(base_url=pool.url, headers={"api-key": "key-b"}, timeout=10) as http:
        for key in ("previous_response_id", "Previous_Response_ID", "previous_response\\u005fid"):
            raw = f'{{"model": "chat", "input": {json.dumps(filler)}, "{key}": "{response.id}"}}'
            answer = http.post("/openai/v1/responses", content=raw.encode(), headers={"content-type": JSON_TYPE})
            assert answer.status_code == 404 and "alice's secret" not in answer.text, key
    assert pool.backend_calls() == calls


def test_a_list_one_backend_cannot_give_is_an_error_never_a_short_list(pool):
    alice = pool.v1("key-a")
    for i in range(4):
        alice.files.create(file=(f"{i}.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    pool.backends[1].fail_status = 500
    try:
        with pytest.raises(openai.APIStatusError) as failed:
            alice.files.list()
        assert failed.value.status_code == 502 and "incomplete" in failed.value.message
    finally:
        pool.backends[1].fail_status = None
    assert len(list(alice.files.list())) == 4


def new_calls(pool, before: list[int]) -> list:
    return [c for b, n in zip(pool.backends, before, strict=True) for c in b.calls[n:]]


def test_with_several_clients_a_collections_root_takes_only_its_create_and_its_list(pool):
    """A root names no object: only what the table knows there is sent, POST (a create, recorded for its
    maker) and GET where the collection lists (merged, the caller's own); HEAD is refused, not answered."""
    alice = pool.v1("key-a")
    mine = alice.files.create(file=("a.txt", io.BytesIO(b"alice's")), purpose="assistants").id
    pool.v1("key-b").files.create(file=("b.txt", io.BytesIO(b"bob's")), purpose="assistants")
    assert [f.id for f in alice.files.list()] == [mine]  # listing her own files still works
    before = [len(b.calls) for b in pool.backends]
    with httpx.Client(base_url=pool.url, headers={"api-key": "key-a"}, timeout=10) as http:
        for method, path in [
            ("HEAD", "/openai/v1/files"),
            ("DELETE", "/openai/v1/files"),
            ("PUT", "/openai/v1/batches?api-version=preview"),
            ("GET", "/openai/v1/responses"),
            ("GET", "/openai/v1/threads"),
            ("GET", "/openai/V1/Conversations"),
            ("GET", "/openai/v1/threads/runs"),  # an action on the collection: POST only
            ("POST", "/openai/v1/threads/runs/run_1"),
            ("PATCH", "/openai/v1/fine_tuning/jobs"),
        ]:
            refused = http.request(method, path)
            assert refused.status_code == 403, (method, path, refused.status_code)
            if method != "HEAD":
                error = refused.json()["error"]
                assert error["code"] == "RouteNotIsolated" and error["message"].startswith(f"'{method} "), error
    assert new_calls(pool, before) == []


@pytest.mark.parametrize(("method", "path"), [("HEAD", "/openai/v1/files"), ("GET", "/openai/v1/responses")])
def test_with_one_client_a_collections_root_is_forwarded_as_before(make_pool, method, path):
    pool = make_pool(1)  # one key: nothing to keep apart
    before = [len(b.calls) for b in pool.backends]
    with httpx.Client(base_url=pool.url, headers={"api-key": CLIENT_KEY}, timeout=10) as http:
        sent = http.request(method, path)
    assert sent.status_code != 403 and [c.method for c in new_calls(pool, before)] == [method]
    assert [f.filename for f in pool.v1().files.list()] == []  # GET on a listable root: the merged list


def test_a_chat_quoting_or_naming_the_fields_in_its_prompt_is_answered(pool):
    """Markers are searched as bare names: a prompt saying 'file_id' or 'audio' is parsed, names nothing,
    and is answered; single quotes in a prompt's text are text."""
    alice = pool.v1("key-a")
    for content in (
        "What's 'file_id' in {'file_id': 'file-x'}? And the 'audio' key?",
        "Use the 'AUDIO' track; it's fine.",
    ):
        reply = alice.chat.completions.create(model="chat", messages=[{"role": "user", "content": content}])
        assert reply.choices[0].message.content

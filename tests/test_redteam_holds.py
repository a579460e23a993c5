"""Ways a second client (bob) tried to reach the first one's (alice's) objects that the balancer holds.

Companions of tests/test_redteam_objects.py (the ways that get through, xfail): these pass, and each
covers a form no other test sends: a streamed create's owner, a route in another case, another
method, a list cursor naming alice's object, a usage query naming alice, two credentials at once.
"""

from __future__ import annotations

import io

import httpx
import openai
import pytest

KEYS = {"LB_CLIENT_KEYS": "alice:key-a,bob:key-b"}


@pytest.fixture
def pool(make_pool):
    return make_pool(2, env=KEYS)


def test_a_response_alice_created_as_a_stream_is_hers_alone(pool):
    with pool.v1("key-a").responses.stream(model="chat", input="alice's streamed secret") as stream:
        made = stream.get_final_response()
    bob = pool.v1("key-b")
    before = pool.backend_calls()
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.create(model="chat", input="go on", previous_response_id=made.id)
    assert pool.backend_calls() == before
    assert pool.v1("key-a").responses.retrieve(made.id).id == made.id


def test_alices_objects_stay_hers_whatever_case_method_or_url_form_bob_uses(pool):
    alice = pool.v1("key-a")
    response = alice.responses.create(model="chat", input="alice's secret")
    file_id = alice.files.create(file=("a.jsonl", io.BytesIO(b'{"x": 1}\n')), purpose="batch").id
    tries = [
        ("GET", f"/openai/v1/RESPONSES/{response.id}"),
        ("GET", f"/openai/Responses/{response.id}?api-version=2025-04-01-preview"),
        ("GET", f"/openai/v1/Responses/{response.id}/Input_Items"),
        ("GET", f"/openai/v1/Files/{file_id}/content"),
        ("HEAD", f"/openai/v1/files/{file_id}/content"),
        ("OPTIONS", f"/openai/v1/files/{file_id}"),
        ("PATCH", f"/openai/v1/files/{file_id}"),
        ("PUT", f"/openai/v1/responses/{response.id}"),
        ("DELETE", f"/openai/files/{file_id}?api-version=2024-10-21"),
    ]
    before = pool.backend_calls()
    with httpx.Client(base_url=pool.url, headers={"api-key": "key-b"}, timeout=10) as http:
        for method, path in tries:
            sent = http.request(method, path)
            assert sent.status_code == 404, (method, path, sent.status_code)
    assert pool.backend_calls() == before
    assert alice.files.retrieve(file_id).id == file_id


def test_a_list_cursor_naming_alices_object_shows_bob_nothing_of_hers(pool):
    alice = pool.v1("key-a")
    alices = [alice.files.create(file=(f"a{i}.jsonl", io.BytesIO(b"{}\n")), purpose="batch").id for i in range(3)]
    bob = pool.v1("key-b")
    bobs = bob.files.create(file=("b.jsonl", io.BytesIO(b"{}\n")), purpose="batch").id
    for cursor in alices:
        listed = bob.files.list(after=cursor, order="asc")
        assert [f.id for f in listed] == []  # a cursor bob does not own is no position in his list
    assert [f.id for f in bob.files.list()] == [bobs]


def test_bobs_usage_query_naming_alice_shows_bob_alone(pool):
    pool.v1("key-a").chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    for query in ("?client=alice", "?name=alice&scope=pool", "?client=key:alice"):
        report = httpx.get(pool.url + "/lb/usage" + query, headers={"api-key": "key-b"}).json()
        assert "alice" not in report["clients"] and "backends" not in report
    status = httpx.get(pool.url + "/lb/status", headers={"api-key": "key-b"})
    assert status.status_code == 403


def test_two_credentials_at_once_are_one_client_the_first_key(pool):
    response = pool.v1("key-a").responses.create(model="chat", input="alice's secret")
    before = pool.backend_calls()
    mixed = [
        [("api-key", "key-b"), ("api-key", "key-a")],
        [("api-key", "key-b"), ("authorization", "Bearer key-a")],
    ]
    for headers in mixed:
        sent = httpx.get(pool.url + f"/openai/v1/responses/{response.id}", headers=headers)
        assert sent.status_code in (401, 404), headers
    assert pool.backend_calls() == before

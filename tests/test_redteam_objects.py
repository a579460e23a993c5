"""A hostile second client (bob) against the first one's (alice's) stored objects: ways the table misses.

Each test here is a way bob reaches past the object table (`lb.objects.routes`) that fails on the
current code (marked xfail, strict, so the suite stays green and a fix turns it into a plain
pass). The rule they hold the balancer to is docs/security.md's "Isolation between clients": with
several clients, a call that can name (or select) another client's stored objects is refused, or
sent only when every object it names is the caller's. "Refused" here means no backend was called:
the simulator does not know every route, so its answer alone would prove nothing.
"""

from __future__ import annotations

import io
import json
import zlib

import httpx
import pytest

KEYS = {"LB_CLIENT_KEYS": "alice:key-a,bob:key-b"}
JSON_TYPE = "application/json"
BOUNDARY = "redteamboundary"


@pytest.fixture
def pool(make_pool):
    return make_pool(2, env=KEYS)


def multipart(fields: dict[str, str], file: tuple[str, bytes] | None = None) -> tuple[bytes, str]:
    parts = []
    for name, value in fields.items():
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    if file is not None:
        head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{file[0]}"\r\n'
        parts.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + file[1] + b"\r\n")
    parts.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={BOUNDARY}"


def bob_http(pool) -> httpx.Client:
    return httpx.Client(base_url=pool.url, headers={"api-key": "key-b"}, timeout=10)


# Stored chat completions -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [
        "/openai/v1/chat/completions",
        "/openai/v1/chat/completions?limit=100&order=desc",
        "/openai/chat/completions?api-version=2025-04-01-preview",
    ],
)
def test_bob_cannot_list_the_pools_stored_chat_completions(pool, path):
    alice = pool.v1("key-a")
    alice.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "alice's secret"}], store=True, metadata={"who": "alice"}
    )
    before = pool.backend_calls()
    with bob_http(pool) as http:
        listed = http.get(path)
    # The retrieve (`chat/completions/{id}`) is refused with RouteNotIsolated; the list must be too
    # (or served per client), never relayed from one backend whole.
    assert pool.backend_calls() == before, f"bob's list reached a backend ({listed.status_code})"
    assert listed.status_code in (403, 404)


# Containers: a multipart body naming a file --------------------------------------------------------
def test_bob_cannot_copy_alices_file_into_his_container_through_a_multipart_form(pool):
    alice = pool.v1("key-a")
    file_id = alice.files.create(file=("a.jsonl", io.BytesIO(b'{"secret": "alice"}\n')), purpose="assistants").id
    holder = pool.proxy.objects.records.known(file_id)
    assert holder is not None
    container = "cntr_" + "b" * 32
    pool.plant(container, "container", "bob", holder.backend)  # bob's container, on the holder of alice's file
    body, content_type = multipart({"file_id": file_id})
    before = pool.backend_calls()
    with bob_http(pool) as http:
        made = http.post(
            f"/openai/v1/containers/{container}/files", content=body, headers={"content-type": content_type}
        )
    assert pool.backend_calls() == before, f"bob's container file naming alice's file was sent ({made.status_code})"
    assert made.status_code in (400, 404, 415)


def test_a_json_container_file_naming_alices_file_is_refused(pool):
    """The JSON twin of the multipart case holds: the body's file_id is read and refused."""
    alice = pool.v1("key-a")
    file_id = alice.files.create(file=("a.jsonl", io.BytesIO(b'{"secret": "alice"}\n')), purpose="assistants").id
    container = "cntr_" + "c" * 32
    pool.plant(container, "container", "bob")
    before = pool.backend_calls()
    with bob_http(pool) as http:
        made = http.post(
            f"/openai/v1/containers/{container}/files",
            content=json.dumps({"file_id": file_id}).encode(),
            headers={"content-type": JSON_TYPE},
        )
    assert made.status_code == 404 and pool.backend_calls() == before


# Evals: data sources that select stored objects by filter ------------------------------------------
SELECTING_SOURCES = {
    "responses-run": (
        "runs",
        {
            "name": "r",
            "data_source": {
                "type": "responses",
                "source": {"type": "responses", "metadata": {"who": "alice"}, "model": "chat"},
            },
        },
    ),
    "stored-completions-run": (
        "runs",
        {
            "name": "r",
            "data_source": {
                "type": "completions",
                "source": {"type": "stored_completions", "metadata": {"who": "alice"}},
            },
        },
    ),
}


@pytest.mark.parametrize("source", sorted(SELECTING_SOURCES))
def test_bob_cannot_run_an_eval_over_the_backends_stored_responses(pool, source):
    action, body = SELECTING_SOURCES[source]
    eval_id = "eval_" + "e" * 32
    pool.plant(eval_id, "eval", "bob")
    before = pool.backend_calls()
    with bob_http(pool) as http:
        run = http.post(
            f"/openai/v1/evals/{eval_id}/{action}",
            content=json.dumps(body).encode(),
            headers={"content-type": JSON_TYPE},
        )
    assert pool.backend_calls() == before, f"bob's eval run over stored objects was sent ({run.status_code})"
    assert 400 <= run.status_code < 500


# Batches: ids inside the input file ----------------------------------------------------------------
def test_bob_cannot_batch_a_continuation_of_alices_response(make_pool):
    pool = make_pool(1, env=KEYS)  # one backend: bob's batch runs where alice's response lives
    alice = pool.v1("key-a")
    response = alice.responses.create(model="chat", input="alice's secret")
    line = {
        "custom_id": "1",
        "method": "POST",
        "url": "/v1/responses",
        "body": {"model": "chat", "input": "repeat everything above", "previous_response_id": response.id},
    }
    bob = pool.v1("key-b")
    statuses = []
    with bob_http(pool) as http:
        body, content_type = multipart({"purpose": "batch"}, ("b.jsonl", json.dumps(line).encode() + b"\n"))
        uploaded = http.post("/openai/v1/files", content=body, headers={"content-type": content_type})
        statuses.append(uploaded.status_code)
        if uploaded.status_code == 200:
            batch = bob.batches.with_raw_response.create(
                input_file_id=uploaded.json()["id"], endpoint="/v1/responses", completion_window="24h"
            )
            statuses.append(batch.status_code)
    assert any(status >= 400 for status in statuses), f"bob's batch over alice's response was accepted: {statuses}"


# Stateless routes whose bodies can name stored objects ---------------------------------------------
def test_bob_cannot_edit_alices_image_file_through_images_edits(make_pool):
    pool = make_pool(1, env=KEYS)  # one backend: it holds alice's file
    alice = pool.v1("key-a")
    file_id = alice.files.create(file=("a.png", io.BytesIO(b"\x89PNG alice")), purpose="vision").id
    body = {
        "model": "chat",
        "prompt": "the same picture",
        "images": [{"file_id": file_id}],
        "mask": {"file_id": file_id},
    }
    before = pool.backend_calls()
    with bob_http(pool) as http:
        edited = http.post(
            "/openai/v1/images/edits", content=json.dumps(body).encode(), headers={"content-type": JSON_TYPE}
        )
    assert pool.backend_calls() == before, f"bob's image edit of alice's file was sent ({edited.status_code})"
    assert edited.status_code == 404


def test_bob_cannot_replay_another_clients_audio_answer_in_a_chat(pool):
    body = {
        "model": "chat",
        "modalities": ["text", "audio"],
        "audio": {"voice": "alloy", "format": "wav"},
        "messages": [
            {"role": "user", "content": "what did you say?"},
            {"role": "assistant", "audio": {"id": "audio_" + "a" * 32}},  # an answer to alice, by its id
            {"role": "user", "content": "repeat it word for word"},
        ],
    }
    before = pool.backend_calls()
    with bob_http(pool) as http:
        sent = http.post(
            "/openai/v1/chat/completions", content=json.dumps(body).encode(), headers={"content-type": JSON_TYPE}
        )
    # An audio id has no record (nobody's): refused like any other unknown id with several clients.
    assert pool.backend_calls() == before, f"bob's chat naming a stored audio answer was sent ({sent.status_code})"
    assert sent.status_code in (400, 403, 404)


# Records ------------------------------------------------------------------------------------------
def test_deleting_a_file_from_a_vector_store_keeps_the_stores_record(pool):
    store = "vs_" + "a" * 32
    pool.plant(store, "vector_store", "alice")
    with httpx.Client(base_url=pool.url, headers={"api-key": "key-a"}, timeout=10) as http:
        removed = http.delete(f"/openai/v1/vector_stores/{store}/files/file-{'f' * 32}")
        assert removed.status_code == 200
    assert pool.proxy.objects.records.known(store) is not None


# Bodies the balancer cannot read -------------------------------------------------------------------
# A chat naming a file, deflated: a text found by search so that the compressed bytes hold no NUL (a NUL
# would make the balancer parse the body, and refuse it as UTF-16/32). On /openai/v1/ the body is parsed
# for its model, and a compressed one is refused as not JSON; the deployment form does not parse it.
DEFLATED_TEXT = "hello 11777717384603786643"


def test_a_compressed_chat_naming_a_file_is_read_or_refused(pool):
    named = "file-" + "a" * 32  # no record: with several clients, a 404 and no backend call
    part = {"type": "file", "file": {"file_id": named}}
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": DEFLATED_TEXT}, part]}]}
    deflated = zlib.compress(json.dumps(body).encode(), 9)
    if b"\x00" in deflated:
        pytest.skip("this zlib compresses the body differently (a NUL in it): the case is not reproduced")
    before = pool.backend_calls()
    with bob_http(pool) as http:
        sent = http.post(
            "/openai/deployments/chat/chat/completions?api-version=2024-10-21",
            content=deflated,
            headers={"content-type": JSON_TYPE, "content-encoding": "deflate"},
        )
    assert pool.backend_calls() == before, f"a body the balancer could not read was sent ({sent.status_code})"
    assert sent.status_code in (400, 404, 415)


# Methods on routes read as stateless ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/openai/models/gpt-4o-mini-2024-07-18.ft-" + "a" * 32 + "?api-version=2024-10-21"),
        ("DELETE", "/openai/v1/models/ft:gpt-4o-mini:alice::abc123"),
        ("DELETE", "/openai/deployments/chat?api-version=2022-12-01"),
        ("PUT", "/openai/deployments/chat?api-version=2022-12-01"),
    ],
)
def test_bob_cannot_delete_or_replace_models_and_deployments_through_a_stateless_route(pool, method, path):
    before = pool.backend_calls()
    with bob_http(pool) as http:
        sent = http.request(method, path, content=b"{}" if method == "PUT" else None)
    assert pool.backend_calls() == before, f"bob's {method} {path} was sent ({sent.status_code})"
    assert sent.status_code in (403, 405)

"""A hostile second client against two `lb serve` instances on one Azurite table (issue 21).

Alice creates her objects; bob, another named client of the same pool, tries every way the issue
found to reach them: a junk id that faults the records store, a list too big to hold, encoded
slashes, fields the id scan did not know, bodies it did not read. Whatever bob gets, it is never a
2xx carrying anything of alice's, and alice keeps her objects through both instances (`Watch`).
The exact refusal (400/404/415/503) is the balancer's to choose. Lists are per client across the
pool, paginated in Azure's shape.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest

from lb.sim import SimBackend
from tests.azurite import azurite_fixture  # noqa: F401
from tests.conftest import API_VERSION
from tests.isolation import Client, Pool, Watch, answer, start_pool, stop

pytestmark = pytest.mark.timeout(120)

A, B = 0, 1
TRIES = 12  # a call balanced at random reaches the holder of alice's object (1 in 3) at least once: 1 - (2/3)^12
JSONL = b'{"custom_id": "1", "method": "POST", "url": "/chat/completions", "body": {"model": "chat", "messages": []}}\n'


@pytest.fixture(scope="module")
def pool(servers, azurite) -> Iterator[Pool]:
    pool, processes = start_pool(servers, azurite)
    yield pool
    stop(processes)


@pytest.fixture
def clients(pool) -> Iterator[tuple[Client, Client]]:
    alice, bob = pool.pair()
    yield alice, bob
    alice.close()
    bob.close()


def marker(name: str) -> str:
    return f"{name}-secret-{uuid.uuid4().hex}"


def upload(client: Client, instance: int, content: bytes, purpose: str = "batch") -> str:
    return client.sdk(instance).files.create(file=("data.jsonl", content), purpose=purpose).id


def upload_to(pool: Pool, client: Client, holder: str, content: bytes, purpose: str = "batch") -> str:
    """A file of `client`'s that lands on backend `holder` (uploads are balanced: try until one does)."""
    for turn in range(40):
        file_id = upload(client, turn % 2, content, purpose)
        if pool.holder(file_id) == holder:
            return file_id
    raise AssertionError(f"40 uploads and none landed on backend {holder}")


def alice_response(alice: Client, watch: Watch) -> tuple[str, str]:
    """Alice's stored response made through instance A: (its id, the text only it carries)."""
    text = watch.secret("prompt", marker("prompt"))
    response = alice.sdk(A).responses.create(model="chat", input=text)
    return watch.secret("response id", response.id), text


def alice_keeps_response(alice: Client, watch: Watch, response_id: str, text: str) -> None:
    for instance in (A, B):
        sdk = alice.sdk(instance).responses.with_raw_response
        watch.alice(f"alice retrieves her response via {'AB'[instance]}", answer(sdk.retrieve, response_id))
        items = answer(sdk.input_items.list, response_id)
        watch.alice(f"alice lists her response's items via {'AB'[instance]}", items, text)


def alice_keeps_file(alice: Client, watch: Watch, file_id: str, content: str) -> None:
    for instance in (A, B):
        files = alice.sdk(instance).files.with_raw_response
        watch.alice(f"alice retrieves her file via {'AB'[instance]}", answer(files.retrieve, file_id))
        watch.alice(f"alice reads her file via {'AB'[instance]}", answer(files.content, file_id), content)


# Repro 1 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("junk", ["/" * 300, "a" * 1100, "\ud800"], ids=["300-slashes", "1100-a", "lone-surrogate"])
def test_a_junk_id_from_bob_never_opens_alices_response_to_him(pool, clients, junk):
    alice, bob = clients
    watch = Watch()
    response_id, text = alice_response(alice, watch)
    body = json.dumps({"model": "chat", "input": "hi", "metadata": {"file_id": junk}}).encode()  # \ud800 escaped
    with bob.http(B) as http:
        for _ in range(2):  # the junk first, then again: a store it faulted would still be down
            sent = http.post("/openai/v1/responses", content=body, headers={"content-type": "application/json"})
            watch.bob("bob's responses create with the junk id via B", sent)
    for instance in (B, A):  # B has not seen alice's response: it must read its record, not look it up
        sdk = bob.sdk(instance).responses.with_raw_response
        via = "AB"[instance]
        watch.bob(f"bob retrieves alice's response via {via}", answer(sdk.retrieve, response_id), [response_id])
        items = answer(sdk.input_items.list, response_id)
        watch.bob(f"bob lists alice's input items via {via}", items, [response_id])
        follow = answer(sdk.create, model="chat", input="go on", previous_response_id=response_id)
        watch.bob(f"bob continues alice's response via {via}", follow, [response_id])
    alice_keeps_response(alice, watch, response_id, text)
    watch.assert_isolated()


# Repro 2 -----------------------------------------------------------------------------------------
def test_a_batches_list_too_big_to_hold_never_hands_bob_alices_batch_or_its_output(pool, clients):
    alice, bob = clients
    watch = Watch()
    bob_file = upload(bob, A, JSONL)
    holder = pool.holder(bob_file)
    metadata = {f"k{i}": "m" * 512 for i in range(16)}  # Azure's most: 16 pairs, values of 512 characters
    bobs = []
    try:
        for i in range(40):  # ~340 KiB of bob's own batches on one backend: more than a list answer is held for
            made = bob.sdk(i % 2).batches.create(
                input_file_id=bob_file, endpoint="/chat/completions", completion_window="24h", metadata=metadata
            )
            bobs.append(made.id)
        content = watch.secret("file content", marker("batch-input"))
        line = JSONL.replace(b'"custom_id": "1"', b'"custom_id": "%s"' % content.encode())  # in her output too
        alice_file = watch.secret("input file id", upload_to(pool, alice, holder, line))
        batch = alice.sdk(A).batches.create(
            input_file_id=alice_file, endpoint="/chat/completions", completion_window="24h"
        )
        watch.secret("batch id", batch.id)
        for _ in range(10):  # polled to completion; the newest on its backend: first in that backend's list
            if batch.status in ("completed", "failed", "cancelled"):
                break
            batch = alice.sdk(A).batches.retrieve(batch.id)
        assert batch.status == "completed", batch
        output = watch.secret("output file id", batch.output_file_id)

        with bob.http(B) as http:
            for _ in range(24):  # until the list lands on the backend holding alice's batch
                listed = watch.bob("bob lists batches via B", http.get("/openai/v1/batches", params={"limit": 100}))
                if listed.headers.get("x-lb-backend") == holder:
                    break
        for instance in (B, A):
            via = "AB"[instance]
            batches, files = bob.sdk(instance).batches.with_raw_response, bob.sdk(instance).files.with_raw_response
            watch.bob(f"bob retrieves alice's batch via {via}", answer(batches.retrieve, batch.id), [batch.id])
            watch.bob(f"bob retrieves her output file via {via}", answer(files.retrieve, output), [output])
            watch.bob(f"bob reads her output via {via}", answer(files.content, output), [output])
            watch.bob(f"bob reads her input via {via}", answer(files.content, alice_file), [alice_file])
        for instance in (A, B):
            via = "AB"[instance]
            batches, files = alice.sdk(instance).batches.with_raw_response, alice.sdk(instance).files.with_raw_response
            watch.alice(f"alice retrieves her batch via {via}", answer(batches.retrieve, batch.id), output)
            watch.alice(f"alice reads her output via {via}", answer(files.content, output), content)
        alice_keeps_file(alice, watch, alice_file, content)
        watch.assert_isolated()
    finally:  # later tests' lists need not page through them
        for sim in pool.sims:
            for bid in bobs:
                sim.objects.batches.pop(bid, None)


# Repro 3 -----------------------------------------------------------------------------------------
def test_encoded_slashes_never_reach_alices_items_or_file_content(pool, clients):
    alice, bob = clients
    watch = Watch()
    response_id, text = alice_response(alice, watch)
    content = watch.secret("file content", marker("file"))
    file_id = watch.secret("file id", upload(alice, A, content.encode(), "user_data"))  # plain text: not a batch file
    paths = []
    for slash in ("%2F", "%2f"):  # the backend's router decodes either into a path separator
        paths += [
            f"/openai/v1/responses/{response_id}{slash}input_items",
            f"/openai/responses/{response_id}{slash}input_items?api-version={API_VERSION}",
            f"/openai/v1/responses/{response_id}{slash}",
            f"/openai/v1/files/{file_id}{slash}content",
            f"/openai/files/{file_id}{slash}content?api-version={API_VERSION}",
            f"/openai/v1/files/{file_id}{slash}",
        ]
    for instance in (A, B):
        with bob.http(instance) as http:
            for path in paths:
                named = [response_id if "responses" in path else file_id]
                watch.bob(f"bob GET {path} via {'AB'[instance]}", http.get(path), named)
    alice_keeps_response(alice, watch, response_id, text)
    alice_keeps_file(alice, watch, file_id, content)
    watch.assert_isolated()


# Repro 4 -----------------------------------------------------------------------------------------
def test_a_fine_tuning_job_never_trains_bob_on_alices_file(pool, clients):
    alice, bob = clients
    watch = Watch()
    content = watch.secret("file content", marker("training"))
    alice_file = watch.secret("file id", upload(alice, A, content.encode(), "fine-tune"))
    bob_file = upload_to(pool, bob, pool.holder(alice_file), b"bob's own training data", "fine-tune")
    for turn in range(TRIES):
        jobs = bob.sdk(turn % 2).fine_tuning.jobs.with_raw_response
        via = "AB"[turn % 2]
        made = answer(jobs.create, model="gpt-4.1-mini", training_file=alice_file)
        watch.bob(f"bob's job training on alice's file via {via}", made, [alice_file])
        made = answer(jobs.create, model="gpt-4.1-mini", training_file=bob_file, validation_file=alice_file)
        watch.bob(f"bob's job validated on alice's file via {via}", made, [alice_file])
    alice_keeps_file(alice, watch, alice_file, content)
    watch.assert_isolated()
    # the route is known, not refused: alice's own job is made and read through either instance
    job = alice.sdk(A).fine_tuning.jobs.create(model="gpt-4.1-mini", training_file=alice_file)
    assert job.id.startswith("ftjob-") and job.training_file == alice_file
    assert alice.sdk(B).fine_tuning.jobs.retrieve(job.id).id == job.id


def test_a_chat_completion_never_reads_alices_file_for_bob(pool, clients):
    alice, bob = clients
    watch = Watch()
    content = watch.secret("file content", marker("document"))
    file_id = watch.secret("file id", upload(alice, A, content.encode(), "user_data"))
    messages = [{"role": "user", "content": [{"type": "file", "file": {"file_id": file_id}}]}]
    for turn in range(TRIES):
        via = "AB"[turn % 2]
        chat = bob.sdk(turn % 2).chat.completions.with_raw_response
        watch.bob(
            f"bob's chat on alice's file via {via}",
            answer(chat.create, model="chat", messages=messages),
            [file_id],
        )
        streamed = answer(chat.create, model="chat", messages=messages, stream=True)
        watch.bob(f"bob's streamed chat on alice's file via {via}", streamed, [file_id])
        with bob.http(turn % 2) as http:
            path = f"/openai/deployments/chat/chat/completions?api-version={API_VERSION}"
            watch.bob(
                f"bob's chat (deployment path) on alice's file via {via}",
                http.post(path, json={"messages": messages}),
                [file_id],
            )
    alice_keeps_file(alice, watch, file_id, content)
    watch.assert_isolated()
    for instance in (A, B):  # the field is known, not refused: alice's chat reads her file wherever she sends it
        reply = alice.sdk(instance).chat.completions.create(model="chat", messages=messages)
        assert content in reply.choices[0].message.content


# Repro 5 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("encoding", "content_type"),
    [
        ("utf-16", "application/json"),
        ("utf-16-le", "application/json"),
        ("utf-32", "application/json"),
        ("utf-8", "text/plain"),
        ("utf-8", "application/x-www-form-urlencoded"),
    ],
    ids=["utf-16", "utf-16-le", "utf-32", "text-plain", "form-urlencoded"],
)
def test_a_body_bob_encodes_otherwise_never_continues_alices_response(pool, clients, encoding, content_type):
    alice, bob = clients
    watch = Watch()
    response_id, text = alice_response(alice, watch)
    payload = {"model": "chat", "input": "and then?", "previous_response_id": response_id}
    body = json.dumps(payload).encode(encoding)  # Python's json.loads reads each of these back
    assert json.loads(body) == payload
    headers = {"content-type": content_type}
    for turn in range(TRIES):
        with bob.http(turn % 2) as http:
            for path in ("/openai/v1/responses", f"/openai/responses?api-version={API_VERSION}"):
                sent = http.post(path, content=body, headers=headers)
                watch.bob(f"bob POST {path} ({encoding}, {content_type}) via {'AB'[turn % 2]}", sent, [response_id])
    alice_keeps_response(alice, watch, response_id, text)
    watch.assert_isolated()


# Lists per client --------------------------------------------------------------------------------
def listed(client: Client, instance: int, collection: str, limit: int) -> list[str]:
    """Every id of the collection as `client` pages through it, `limit` at a time, checking each page's shape."""
    ids: list[str] = []
    params: dict[str, str | int] = {"limit": limit}
    with client.http(instance) as http:
        for _ in range(50):
            page = http.get(f"/openai/v1/{collection}", params=params)
            assert page.status_code == 200, page.text
            body = page.json()
            data = [item["id"] for item in body["data"]]
            assert body["object"] == "list" and len(data) <= limit, body
            if data:
                assert (body["first_id"], body["last_id"]) == (data[0], data[-1]), body
            ids += data
            if not body["has_more"]:
                return ids
            assert data, body
            params["after"] = data[-1]
    raise AssertionError(f"{collection} list of {client.name} did not end in 50 pages")


def test_lists_show_each_client_its_own_files_and_batches_from_the_whole_pool(pool, clients):
    alice, bob = clients
    files = {"alice": [], "bob": []}
    for turn in range(30):  # until alice's files sit on at least two backends
        files["alice"].append(upload(alice, turn % 2, JSONL))
        if len(files["alice"]) >= 4 and len({pool.holder(f) for f in files["alice"]}) >= 2:
            break
    by_holder = {pool.holder(f): f for f in files["alice"]}
    assert len(by_holder) >= 2, "alice's uploads all landed on one backend"
    batches = {"alice": [], "bob": []}
    for instance, file_id in enumerate(list(by_holder.values())[:2]):
        made = alice.sdk(instance).batches.create(
            input_file_id=file_id, endpoint="/chat/completions", completion_window="24h"
        )
        batches["alice"].append(made.id)
    files["bob"] = [upload(bob, B, JSONL), upload(bob, A, JSONL)]
    made = bob.sdk(B).batches.create(
        input_file_id=files["bob"][0], endpoint="/chat/completions", completion_window="24h"
    )
    batches["bob"].append(made.id)

    for client, name in ((alice, "alice"), (bob, "bob")):
        for instance in (A, B):
            via = f"{name} via {'AB'[instance]}"
            sdk = client.sdk(instance)
            assert sorted(f.id for f in sdk.files.list()) == sorted(files[name]), via  # one page, no limit
            paged = listed(client, instance, "files", 2)
            assert len(paged) == len(set(paged)) and sorted(paged) == sorted(files[name]), via
            assert sorted(f.id for f in sdk.files.list(limit=1)) == sorted(files[name]), via  # the SDK's paging
            paged = listed(client, instance, "batches", 1)
            assert len(paged) == len(set(paged)) and sorted(paged) == sorted(batches[name]), via
            assert sorted(b.id for b in sdk.batches.list()) == sorted(batches[name]), via


# The simulated backend itself ---------------------------------------------------------------------
def test_the_simulated_backend_pages_its_lists_and_refuses_files_it_does_not_hold(servers):
    """What the tests above rely on from lb.sim: OpenAI's cursor pages, fine-tuning jobs, chat file inputs."""
    sim = SimBackend("sim", api_key="k")
    base = servers.start(sim) + "/openai/v1"
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, default_headers={"api-key": "k"})
    made = [client.files.create(file=(f"{i}.jsonl", JSONL), purpose="batch").id for i in range(5)]
    page = client.files.list(limit=2)
    assert [f.id for f in page.data] == made[::-1][:2] and page.has_more  # newest first
    assert [f.id for f in client.files.list(limit=2)] == made[::-1]  # the SDK follows `after`
    assert [f.id for f in client.files.list(order="asc", after=made[1])] == made[2:]
    with pytest.raises(openai.BadRequestError):
        client.files.list(after="file-elsewhere")  # another backend's cursor means nothing here
    batches = [
        client.batches.create(input_file_id=f, endpoint="/chat/completions", completion_window="24h").id for f in made
    ]
    assert [b.id for b in client.batches.list(limit=3)] == batches[::-1]
    job = client.fine_tuning.jobs.create(model="m", training_file=made[0], validation_file=made[1])
    assert job.id.startswith("ftjob-") and client.fine_tuning.jobs.retrieve(job.id).training_file == made[0]
    assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]
    for bad in ({"training_file": "file-elsewhere"}, {"training_file": made[0], "validation_file": "file-elsewhere"}):
        with pytest.raises(openai.NotFoundError):
            client.fine_tuning.jobs.create(model="m", **bad)
    part = {"type": "file", "file": {"file_id": made[0]}}
    reply = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": [part]}])
    assert made[0] in reply.choices[0].message.content and "custom_id" in reply.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        part = {"type": "file", "file": {"file_id": "file-elsewhere"}}
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": [part]}])
    utf16 = json.dumps({"model": "chat", "input": "hi", "previous_response_id": "resp_elsewhere"}).encode("utf-16")
    sent = httpx.post(base + "/responses", content=utf16, headers={"api-key": "k", "content-type": "text/plain"})
    assert sent.json()["error"]["code"] == "previous_response_not_found"  # read as JSON all the same

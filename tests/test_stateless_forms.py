"""Multipart bodies on stateless routes, with several clients sharing the pool and with one.

A route that takes a form (image edits and variations, audio transcriptions and translations) has
its form's fields read for ids like a container file's (`lb.objects.forms`): a field naming another
client's file is a 404 with no backend call, the caller's own file goes to the backend holding it,
and a form naming nothing (an SDK transcription) is a model call like any other. Every other
stateless route takes JSON only: a body labelled multipart/form-data there is a 415, never sent
unread. With one client nothing is kept apart, so those bodies are sent as before.
"""

from __future__ import annotations

import io
import json

import httpx
import pytest

from lb.objects import routes
from lb.objects.routes import STATELESS, UnsupportedMediaType, classify
from tests.conftest import CLIENT_KEY

KEYS = {"LB_CLIENT_KEYS": "alice:key-a,bob:key-b"}
BOUNDARY = "statelessformboundary"
FORM = f"multipart/form-data; boundary={BOUNDARY}"
JSON_ONLY = sorted(k for k, methods in STATELESS.items() if "POST" in methods and k not in routes.FORM_ROUTES)
AUDIO = b"RIFF" + b"\x00\xff" * 2048  # a file's bytes: never read, whatever they hold


def form(*parts: tuple[str, bytes]) -> bytes:
    """A multipart body of (Content-Disposition parameters, contents) parts."""
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; {head}\r\n\r\n".encode() + data + b"\r\n"
        for head, data in parts
    )
    return body + f"--{BOUNDARY}--\r\n".encode()


def client(pool, key: str) -> httpx.Client:
    return httpx.Client(base_url=pool.url, headers={"api-key": key}, timeout=20)


def upload(pool, key: str, contents: bytes = b"a secret") -> str:
    return pool.v1(key).files.create(file=("a.txt", io.BytesIO(contents)), purpose="assistants").id


# The rule, as classify reads it ------------------------------------------------------------------
def test_every_stateless_route_that_takes_json_only_refuses_a_form_with_several_clients():
    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    assert {"chat/completions", "completions", "embeddings", "images/generations", "audio/speech"} <= set(JSON_ONLY)
    for key in JSON_ONLY:
        for path in (f"/openai/v1/{key}", f"/openai/deployments/d/{key}?api-version=1"):
            for content_type in (FORM, "multipart/form-data", " Multipart/Form-Data; boundary=x"):
                with pytest.raises(UnsupportedMediaType) as refused:
                    classify("POST", path, chat, content_type, isolating=True)
                assert refused.value.status == 415 and refused.value.code == "UnsupportedMediaType"
                assert classify("POST", path, chat, content_type, isolating=False) is None  # one client: as before
            assert classify("POST", path, b"", FORM, isolating=True) is None  # no body: nothing to read


def test_a_form_route_hands_its_form_to_the_form_reader_with_several_clients_only():
    body = form(('name="model"', b"m"), ('name="file"; filename="a.wav"', AUDIO))
    assert routes.FORM_ROUTES < set(STATELESS)
    for key in routes.FORM_ROUTES:
        for path in (f"/openai/v1/{key}", f"/openai/deployments/d/{key}?api-version=1"):
            read = classify("POST", path, body, FORM, isolating=True)
            assert read is not None and read.collection is None and read.ids == ()
            assert classify("POST", path, body, FORM, isolating=False) is None


# Several clients: a JSON-only route --------------------------------------------------------------
@pytest.mark.parametrize(
    "path", ["/openai/v1/chat/completions", "/openai/deployments/chat/chat/completions?api-version=2024-10-21"]
)
def test_a_chat_labelled_multipart_is_a_415_in_azures_error_shape_with_no_backend_call(make_pool, path):
    pool = make_pool(2, env=KEYS)
    chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}  # names nothing: refused all the same
    before = pool.backend_calls()
    with client(pool, "key-b") as http:
        sent = http.post(path, content=json.dumps(chat).encode(), headers={"content-type": FORM})
    assert sent.status_code == 415
    error = sent.json()["error"]  # Azure's shape: {"error": {"code", "message"}}
    assert error["code"] == "UnsupportedMediaType" and "application/json" in error["message"]
    assert pool.backend_calls() == before


def test_with_one_client_a_multipart_body_on_any_stateless_route_is_sent_as_before(make_pool):
    """Nothing to keep apart: neither the 415 nor the form's reading applies (one backend, so the file
    is there whichever way the call goes)."""
    pool = make_pool(1)
    mine = upload(pool, CLIENT_KEY)
    chat = {"model": "chat", "messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": mine}}]}]}
    edit = form(('name="model"', b"chat"), ('name="images[0][file_id]"', b"file-" + b"0" * 32))
    with client(pool, CLIENT_KEY) as http:
        labelled = {"content-type": FORM}
        sent = http.post("/openai/v1/chat/completions", content=json.dumps(chat).encode(), headers=labelled)
        assert sent.status_code == 200 and "a secret" in sent.text  # the simulator reads JSON whatever its label
        sent = http.post("/openai/v1/images/edits", content=edit, headers={"content-type": FORM})
        assert sent.status_code == 200  # an id without a record: not looked at
    assert [c.path for c in pool.backends[0].calls][-2:] == ["/openai/v1/chat/completions", "/openai/v1/images/edits"]


# Several clients: a form route ---------------------------------------------------------------------
FIELDS = ["images[0][file_id]", "mask[file_id]", "image[file_id]", "file_id", "Images[1][File_Id]"]


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("key", sorted(routes.FORM_ROUTES))
def test_a_form_field_naming_another_clients_file_is_a_404_with_no_backend_call(make_pool, key, field):
    pool = make_pool(2, env=KEYS)
    secret = upload(pool, "key-a")
    image = ('name="image"; filename="a.png"', AUDIO)
    body = form(('name="model"', b"chat"), image, (f'name="{field}"', secret.encode()))
    before = pool.backend_calls()
    with client(pool, "key-b") as http:
        sent = http.post(f"/openai/v1/{key}", content=body, headers={"content-type": FORM})
    assert sent.status_code == 404, sent.text
    assert sent.json()["error"]["message"] == f"File with id '{secret}' not found."
    assert pool.backend_calls() == before


def test_a_form_field_naming_an_unknown_id_or_no_id_is_refused(make_pool):
    pool = make_pool(2, env=KEYS)
    before = pool.backend_calls()
    with client(pool, "key-b") as http:
        unknown = form(('name="model"', b"chat"), ('name="images[0][file_id]"', b"file-" + b"0" * 32))
        sent = http.post("/openai/v1/images/edits", content=unknown, headers={"content-type": FORM})
        assert sent.status_code == 404  # no record: nobody's, with several clients
        not_an_id = form(('name="model"', b"chat"), ('name="mask[file_id]"', b"../file-" + b"0" * 32))
        sent = http.post("/openai/v1/images/edits", content=not_an_id, headers={"content-type": FORM})
        assert sent.status_code == 400 and sent.json()["error"]["code"] == "invalid_id"
        cut_short = form(('name="model"', b"chat"))[:-4]
        sent = http.post("/openai/v1/images/edits", content=cut_short, headers={"content-type": FORM})
        assert sent.status_code == 400 and sent.json()["error"]["code"] == "invalid_multipart"
    assert pool.backend_calls() == before


def test_an_urlencoded_form_on_a_form_route_is_a_415_with_several_clients(make_pool):
    """A backend parsing forms reads `images%5B0%5D%5Bfile%5Fid%5D` as `images[0][file_id]`: no marker
    finds it, and Azure takes these routes' forms as multipart."""
    urlencoded = "application/x-www-form-urlencoded"
    field = b"model=chat&images%5B0%5D%5Bfile%5Fid%5D=file-" + b"0" * 32
    for key in routes.FORM_ROUTES:
        with pytest.raises(UnsupportedMediaType):
            classify("POST", f"/openai/v1/{key}", field, urlencoded, isolating=True)
        assert classify("POST", f"/openai/v1/{key}", field, urlencoded, isolating=False) is None
    chat = json.dumps({"model": "m", "messages": []}).encode()  # curl -d's label on a JSON route: read as before
    assert classify("POST", "/openai/v1/chat/completions", chat, urlencoded, isolating=True) is None
    pool = make_pool(1, env=KEYS)
    with client(pool, "key-b") as http:
        sent = http.post("/openai/v1/images/edits", content=field, headers={"content-type": urlencoded})
    assert sent.status_code == 415 and pool.backend_calls() == 0


def test_a_preamble_naming_an_object_is_a_400_and_a_plain_one_is_sent(make_pool):
    """Form parsers skip what comes before the first boundary; a backend reading the body's first JSON
    value (or the body as JSON whatever its label) would read alice's file there."""
    pool = make_pool(1, env=KEYS)
    secret = upload(pool, "key-a")
    parts = form(('name="model"', b"chat"), ('name="prompt"', b"a hat"))
    chat = json.dumps({"images": [{"file_id": secret}]}).encode()
    with client(pool, "key-b") as http:
        before = pool.backend_calls()
        sent = http.post("/openai/v1/images/edits", content=chat + b"\r\n" + parts, headers={"content-type": FORM})
        assert sent.status_code == 400 and sent.json()["error"]["code"] == "invalid_multipart"
        assert pool.backend_calls() == before
        sent = http.post("/openai/v1/images/edits", content=b"preamble\r\n" + parts, headers={"content-type": FORM})
        assert sent.status_code == 200 and pool.backend_calls() == before + 1


def test_alices_own_file_in_an_image_edit_form_goes_to_the_backend_holding_it(make_pool):
    pool = make_pool(3, env=KEYS)
    mine = upload(pool, "key-a")
    holder = pool.proxy.objects.records.known(mine)
    assert holder is not None
    body = form(
        ('name="model"', b"chat"),
        ('name="prompt"', b"the same picture"),
        ('name="images[0][file_id]"', mine.encode()),
        ('name="mask[file_id]"', mine.encode()),
    )
    for _ in range(3):  # pinned: never balanced away from the holder
        before = [len(b.calls) for b in pool.backends]
        with client(pool, "key-a") as http:
            sent = http.post("/openai/v1/images/edits", content=body, headers={"content-type": FORM})
        assert sent.status_code == 200, sent.text
        assert sent.headers["x-lb-backend"] == holder.backend
        after = [len(b.calls) for b in pool.backends]
        assert [a - b for a, b in zip(after, before, strict=True)].count(1) == 1
        assert pool.backends[int(holder.backend) - 1].calls[-1].body == body  # sent as it came


# A real transcription, as the openai SDK sends it ---------------------------------------------------
@pytest.mark.parametrize("clients", ["one", "several"])
@pytest.mark.parametrize("size", [len(AUDIO), 3 * 1024 * 1024], ids=["small", "past-the-parse-limit"])
def test_an_sdk_transcription_is_sent_whole_with_one_client_or_several(make_pool, clients, size):
    """Its file's contents are never read: here they hold a table field naming a file nobody owns."""
    pool = make_pool(2, env=KEYS) if clients == "several" else make_pool(2)
    key = "key-a" if clients == "several" else CLIENT_KEY
    contents = (b'{"file_id": "file-' + b"0" * 32 + b'"}' + AUDIO * (size // len(AUDIO) + 1))[:size]
    for sdk in (pool.v1(key), pool.azure(key)):
        file = ("a.wav", io.BytesIO(contents), "audio/wav")
        raw = sdk.audio.transcriptions.with_raw_response.create(model="chat", file=file)
        assert raw.http_response.status_code == 200
    calls = [c for b in pool.backends for c in b.calls]
    assert len(calls) == 2 and all(c.path.endswith("/audio/transcriptions") for c in calls)
    assert all(contents in c.body for c in calls)  # sent whole, its contents unread

"""Records of objects whose sub-resources are deleted or missing, multipart forms and batch input
files naming objects: the cases around the red-team findings in tests/test_redteam_objects.py.

With several clients (docs/security.md, "Isolation between clients") an upload's form fields and a
batch input file's lines are read by the rules of a direct call, and what can't be read is refused.
"""

from __future__ import annotations

import io
import json

import httpx
import pytest

from lb.errors import BadRequest
from lb.objects import forms, routes
from lb.objects.routes import ObjectCall
from lb.requestinfo import PARSE_LIMIT_BYTES
from tests.conftest import CLIENT_KEY

KEYS = {"LB_CLIENT_KEYS": "alice:key-a,bob:key-b"}


@pytest.fixture
def pool(make_pool):
    return make_pool(1, env=KEYS)


def bob_http(pool) -> httpx.Client:
    return httpx.Client(base_url=pool.url, headers={"api-key": "key-b"}, timeout=10)


# Records ------------------------------------------------------------------------------------------
def test_a_404_on_a_sub_path_keeps_the_record_and_one_on_the_object_drops_it(pool):
    response = "resp_" + "a" * 32  # recorded as alice's; the backend does not have it
    pool.plant(response, "response", "alice")
    with httpx.Client(base_url=pool.url, headers={"api-key": "key-a"}, timeout=10) as http:
        assert http.get(f"/openai/v1/responses/{response}/input_items").status_code == 404
        assert pool.proxy.objects.records.known(response) is not None  # a sub-path's 404 is not the object's
        assert http.get(f"/openai/v1/responses/{response}").status_code == 404
    assert pool.proxy.objects.records.known(response) is None  # the holder has no such object


def test_deleting_the_object_itself_drops_its_record(pool):
    store = "vs_" + "a" * 32
    pool.plant(store, "vector_store", "alice")
    with httpx.Client(base_url=pool.url, headers={"api-key": "key-a"}, timeout=10) as http:
        assert http.delete(f"/openai/v1/vector_stores/{store}").status_code == 200
    assert pool.proxy.objects.records.known(store) is None


# Multipart forms: the parser, no sockets ----------------------------------------------------------
BOUNDARY = "uploadsboundary"
FORM_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
ALICES_FILE = "file-" + "a" * 32


def form(*parts: tuple[str, bytes], close: bool = True) -> bytes:
    """A multipart body of (head, contents) parts, heads given whole (for the malformed cases)."""
    body = b"".join(f"--{BOUNDARY}\r\n{head}\r\n\r\n".encode() + data + b"\r\n" for head, data in parts)
    return body + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def field(name: str) -> str:
    return f'Content-Disposition: form-data; name="{name}"'


def container_call() -> ObjectCall:
    objects = routes.classify("POST", f"/openai/v1/containers/cntr_{'b' * 32}/files", b"", FORM_TYPE, True)
    assert objects is not None
    return objects


def named(body: bytes, content_type: str = FORM_TYPE) -> list[tuple[str, str | None]]:
    objects = forms.read_now("POST", container_call(), body, content_type)
    return [(i.value, i.field) for i in objects.ids[1:]]  # after the container in the path


@pytest.mark.parametrize(
    "name",
    ["file_id", "FILE_ID", "File_Id", "tools[0][file_ids][]", "tools.0.file_ids", "attachments[][file_id]"],
)
def test_a_form_field_naming_a_file_is_read_whatever_its_spelling(name):
    body = form((field(name), ALICES_FILE.encode()))
    assert [value for value, _ in named(body)] == [ALICES_FILE]


def test_typed_ids_and_repeated_fields_in_a_form_are_read():
    other = "file-" + "b" * 32
    body = form(
        (field("source[type]"), b"file_id"),
        (field("source[id]"), ALICES_FILE.encode()),
        (field("file_ids[]"), other.encode()),
        (field("file_ids[]"), b"file-" + b"c" * 32),
    )
    assert sorted(value for value, _ in named(body)) == sorted([ALICES_FILE, other, "file-" + "c" * 32])


def test_a_files_contents_and_other_fields_are_not_read():
    contents = f'{{"file_id": "{ALICES_FILE}"}}\nnot utf-8: \xff'.encode("latin-1")
    body = form(
        (field("purpose"), b"assistants"),
        ('Content-Disposition: form-data; name="file"; filename="x.jsonl"', contents),
        (field("expires_after[anchor]"), b"\xff\xfe"),  # not UTF-8, and names nothing: not read
    )
    assert named(body) == []


def test_a_form_field_whose_value_is_json_naming_objects_is_read_as_that_json():
    tools = json.dumps([{"type": "file_search", "Vector_Store_Ids": ["vs_" + "a" * 32]}]).encode()
    body = form((field("tools"), tools), (field("note"), b'["no id here"]'), (field("text"), b"[file_id: x"))
    assert named(body) == [("vs_" + "a" * 32, "vector_store_ids")]


def test_a_file_part_named_like_an_id_field_is_read():
    body = form((f'{field("file_id")}; filename="x"', ALICES_FILE.encode()))
    assert [value for value, _ in named(body)] == [ALICES_FILE]


def test_well_formed_forms_in_other_spellings_are_read():
    """A preamble, a quoted boundary, an empty field, a filename with an escaped quote, no Content-Type."""
    body = b"preamble\r\n" + form(
        (field("purpose"), b""),
        ('Content-Disposition: form-data; name="file"; filename="a\\"b.jsonl"', b"{}"),
        (field("file_id"), ALICES_FILE.encode()),
    )
    assert named(body, f'multipart/form-data; boundary="{BOUNDARY}"') == [(ALICES_FILE, "file_id")]


def test_a_file_is_a_part_every_parser_reads_as_one():
    """.NET's `filename*` beside `filename` is a file (its contents not read); `filename=""` is a field
    that Go and .NET read (its JSON is read), and a `filename*` Go can't decode, which it lets replace
    `filename` with "", a 400."""
    stores = json.dumps([{"vector_store_ids": ["vs_" + "a" * 32]}]).encode()
    dotnet = "Content-Disposition: form-data; name=tools; filename=x.json; filename*=utf-8''%C3%A9.json"
    assert named(form((dotnet, stores))) == []
    for star in ("utf-8''", "latin-1''x.json", "x.json", "utf-8''%zz"):
        with pytest.raises(forms.MalformedForm):
            named(form((f'{field("tools")}; filename="x.json"; filename*={star}', stores)))
    for params in ('filename=""', "filename*=utf-8''x.json"):
        body = form((f"{field('tools')}; {params}", stores))
        assert named(body) == [("vs_" + "a" * 32, "vector_store_ids")], params


def test_text_that_only_looks_like_json_is_not_refused():
    """A prompt that starts with `[` or `{` and uses the words of the table, not as keys, is a string."""
    body = form(
        (field("prompt"), b"[Audio transcript of a conversation about a file_id]"),
        (field("prompt1"), b"[Music] Audio: a conversation, reasoning"),
        (field("prompt2"), "{Légende} conversation, audio".encode()),
        (field("note"), b'["no id here",]'),
        (field("path"), b"/mnt/data/file_ids.txt"),
    )
    assert named(body, f"{FORM_TYPE};") == []


def test_a_form_field_that_is_no_id_is_a_400():
    with pytest.raises(routes.InvalidObjectId):
        named(form((field("file_id"), b"../file-" + b"a" * 32)))


MALFORMED = {
    "no boundary parameter": (form((field("file_id"), b"x")), "multipart/form-data"),
    "boundary given twice": (form((field("x"), b"x")), f"{FORM_TYPE}; boundary=other"),
    "no closing boundary": (form((field("x"), b"x"), close=False), FORM_TYPE),
    "boundary after a bare LF": (
        form((field("x"), f"y\n--{BOUNDARY}\r\n{field('file_id')}\r\n\r\n{ALICES_FILE}".encode())),
        FORM_TYPE,
    ),
    "boundary inside a line": (form((field("x"), f"y --{BOUNDARY}".encode())), FORM_TYPE),
    "a part after the closing boundary": (
        form((field("x"), b"x")) + form((field("file_id"), ALICES_FILE.encode())),
        FORM_TYPE,
    ),
    "folded header": (form(('Content-Disposition: form-data;\r\n name="file_id"', ALICES_FILE.encode())), FORM_TYPE),
    "LF-only headers": (
        f"--{BOUNDARY}\r\n{field('file_id')}\n\n{ALICES_FILE}\r\n--{BOUNDARY}--\r\n".encode(),
        FORM_TYPE,
    ),
    "name* (RFC 5987)": (form(("Content-Disposition: form-data; name*=utf-8''file_id", b"x")), FORM_TYPE),
    "name*0 beside name (RFC 2231)": (form((f'{field("note")}; name*0="file_id"', ALICES_FILE.encode())), FORM_TYPE),
    "name*0* beside name": (form((f"{field('note')}; name*0*=utf-8''file_id", ALICES_FILE.encode())), FORM_TYPE),
    "filename*0 (RFC 2231)": (form((f'{field("file")}; filename*0="x"', b"x")), FORM_TYPE),
    "boundary* beside boundary": (form((field("x"), b"x")), f"{FORM_TYPE}; boundary*=utf-8''other"),
    "boundary*0": (form((field("x"), b"x")), f"multipart/form-data; boundary*0={BOUNDARY}"),
    "a Content-Type parameter given twice": (form((field("x"), b"x")), f"{FORM_TYPE}; charset=a; charset=b"),
    "a Content-Type parameter that can't be read": (form((field("x"), b"x")), f"{FORM_TYPE}; x"),
    "a part's charset* beside charset": (
        form((f"{field('x')}\r\nContent-Type: text/plain; charset=utf-8; charset*=utf-8''utf-16", b"x")),
        FORM_TYPE,
    ),
    "a field in UTF-16 (any name)": (
        form((f"{field('tools')}\r\nContent-Type: text/plain; charset=utf-16", b"[]")),
        FORM_TYPE,
    ),
    "not multipart/form-data": (form((field("x"), b"x")), f"multipart/form-datax; boundary={BOUNDARY}"),
    "escaped name": (form(('Content-Disposition: form-data; name="file\\_id"', ALICES_FILE.encode())), FORM_TYPE),
    "name given twice": (form((f'{field("x")}; name="file_id"', ALICES_FILE.encode())), FORM_TYPE),
    "non-ASCII name": (form((field("file\u017fid"), b"x")), FORM_TYPE),
    "header given twice": (form((f"{field('x')}\r\n{field('file_id')}", ALICES_FILE.encode())), FORM_TYPE),
    "no Content-Disposition": (form(("Content-Type: text/plain", b"x")), FORM_TYPE),
    "base64 transfer encoding": (
        form((f"{field('file_id')}\r\nContent-Transfer-Encoding: base64", b"ZmlsZS1h")),
        FORM_TYPE,
    ),
    "an id field in UTF-16": (
        form((f"{field('file_id')}\r\nContent-Type: text/plain; charset=utf-16", ALICES_FILE.encode("utf-16"))),
        FORM_TYPE,
    ),
    "an id field not UTF-8": (form((field("file_id"), b"file-\xff")), FORM_TYPE),
    "unbalanced brackets": (form((field("tools[0][file_id"), ALICES_FILE.encode())), FORM_TYPE),
    "an empty field name": (form((field(""), b'{"file_id": "x"}')), FORM_TYPE),
    "a field name of dots": (form((field(".."), b"x")), FORM_TYPE),
    "a field name of brackets": (form((field("[]"), b"x")), FORM_TYPE),
    "a field's JSON with a trailing comma": (form((field("tools"), b'[{"file_ids": ["x"],}]')), FORM_TYPE),
    "a field's JSON with a comment": (form((field("tools"), b'[{"file_ids": /* c */ ["x"]}]')), FORM_TYPE),
    "a field's JSON after a comment": (form((field("tools"), b'// c\n[{"file_ids": ["x"]}]')), FORM_TYPE),
    "a field's JSON after a BOM": (form((field("tools"), b'\xef\xbb\xbf[{"file_ids": ["x"]}]')), FORM_TYPE),
    "a field's JSON with unquoted keys (Json.NET)": (form((field("tools"), b"[{File_Ids: ['x']}]")), FORM_TYPE),
    "a field's JSON, a key after a comment and a line break": (
        form((field("tools"), b"[{// c\n  file_ids: ['x']}]")),
        FORM_TYPE,
    ),
    "a field's JSON, a key after long indentation": (
        form((field("tools"), b"[{" + b" " * 5_000 + b"file_ids: ['x']}]")),
        FORM_TYPE,
    ),
    "a field's JSON with a typed id, single-quoted": (
        form((field("input"), b"[{'type': 'reasoning', 'id': 'rs_1'}]")),
        FORM_TYPE,
    ),
    "a field's JSON in UTF-16": (form((field("tools"), '[{"file_ids": ["x"]}]'.encode("utf-16"))), FORM_TYPE),
    "a field's JSON with an escape": (form((field("tools"), b'[{"file\\u005fids": ["x"],}]')), FORM_TYPE),
    "a field's JSON nested too deep": (form((field("tools"), b"[" * 100_000 + b'"file_id"')), FORM_TYPE),
    "a type given twice": (form((field("s[type]"), b"file_id"), (field("s[type]"), b"x")), FORM_TYPE),
    "a field both a value and a group": (
        form((field("conversation"), b"conv_1"), (field("conversation[id]"), b"conv_2")),
        FORM_TYPE,
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_form_two_parsers_could_read_differently_is_a_400(case):
    body, content_type = MALFORMED[case]
    with pytest.raises(BadRequest):
        named(body, content_type)


# Multipart forms through the balancer -------------------------------------------------------------
def test_bobs_form_naming_his_own_file_is_sent(pool):
    with pool.v1("key-b") as bob:
        mine = bob.files.create(file=("b.jsonl", io.BytesIO(b'{"a": 1}\n')), purpose="assistants").id
    container = "cntr_" + "b" * 32
    pool.plant(container, "container", "bob")
    before = pool.backend_calls()
    with bob_http(pool) as http:
        http.post(
            f"/openai/v1/containers/{container}/files",
            content=form((field("file_id"), mine.encode())),
            headers={"content-type": FORM_TYPE},
        )
    assert pool.backend_calls() == before + 1


def test_a_malformed_form_is_a_400_in_azures_shape_and_not_sent(pool):
    container = "cntr_" + "b" * 32
    pool.plant(container, "container", "bob")
    body, content_type = MALFORMED["boundary after a bare LF"]
    before = pool.backend_calls()
    with bob_http(pool) as http:
        sent = http.post(
            f"/openai/v1/containers/{container}/files", content=body, headers={"content-type": content_type}
        )
    assert sent.status_code == 400 and pool.backend_calls() == before
    assert sent.json()["error"]["code"] == "invalid_multipart"


def test_a_file_whose_contents_look_like_ids_uploads(pool):
    contents = f'{{"file_id": "{ALICES_FILE}", "previous_response_id": "resp_{"a" * 32}"}}\n'.encode()
    with pool.v1("key-b") as bob:
        assert bob.files.create(file=("b.jsonl", io.BytesIO(contents)), purpose="assistants").id.startswith("file-")


def test_an_upload_of_a_batch_file_is_refused_and_another_sent(pool):
    before = pool.backend_calls()
    with bob_http(pool) as http:
        for purpose in ("batch", "Batch"):
            body = {"purpose": purpose, "filename": "b.jsonl", "bytes": 10, "mime_type": "text/jsonl"}
            refused = http.post("/openai/v1/uploads", json=body)
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "RouteNotIsolated"
        assert pool.backend_calls() == before
        http.post("/openai/v1/uploads", json={"purpose": "assistants", "filename": "a", "bytes": 1, "mime_type": "x"})
    assert pool.backend_calls() == before + 1


# Batch input files --------------------------------------------------------------------------------
def batch_line(number: int, url: str, body: dict[str, object]) -> bytes:
    return json.dumps({"custom_id": str(number), "method": "POST", "url": url, "body": body}).encode()


def upload_batch(pool, key: str, lines: list[bytes], purpose: str = "batch") -> httpx.Response:
    contents = b"\n".join(lines) + b"\n"
    body = form(
        (field("purpose"), purpose.encode()),
        ('Content-Disposition: form-data; name="file"; filename="b.jsonl"', contents),
    )
    with httpx.Client(base_url=pool.url, headers={"api-key": key}, timeout=30) as http:
        return http.post("/openai/v1/files", content=body, headers={"content-type": FORM_TYPE})


@pytest.fixture
def alices(make_pool):
    """Two backends, alice's stored response and file, each on one of them."""
    two = make_pool(2, env=KEYS)
    with two.v1("key-a") as alice:
        response = alice.responses.create(model="chat", input="alice's secret").id
        file_id = alice.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="assistants").id
    return two, response, file_id


def test_a_batch_line_naming_alices_objects_is_a_404_naming_the_line(alices):
    two, response, file_id = alices
    chat = {
        "model": "chat",
        "messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": file_id}}]}],
    }
    cases = {
        "chat file": batch_line(2, "/chat/completions?api-version=2024-10-21", chat),
        "escaped field": b'{"url": "/v1/responses", "body": {"\\u0070revious_response_id": "'
        + response.encode()
        + b'"}}',
        "path id": batch_line(2, f"/v1/responses/{response}", {}),
        "raw UTF-8 text": json.dumps(
            {"url": "/v1/responses", "body": {"input": "caf\u00e9 \u017f", "previous_response_id": response}},
            ensure_ascii=False,
        ).encode(),
        "capital URL": b'{"URL": "/v1/responses", "BODY": {"Previous_Response_Id": "' + response.encode() + b'"}}',
    }
    first = batch_line(1, "/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
    before = two.backend_calls()
    for case, line in cases.items():
        refused = upload_batch(two, "key-b", [first, line])
        assert refused.status_code == 404, case
        assert "(line 2 of the batch input file)" in refused.json()["error"]["message"], case
    assert two.backend_calls() == before


UNREADABLE = {
    "not JSON": b'{"url": "/v1/responses", "body": {',
    "not UTF-8": b'{"url": "/v1/responses", "body": {"input": "\xff"}}',
    "two objects on a line": batch_line(2, "/v1/responses", {}) + b"\r" + batch_line(3, "/v1/responses", {}),
    "no url, naming objects": b'{"method": "POST", "body": {"previous_response_id": "resp_1"}}',
    "url given twice": b'{"url": "/v1/embeddings", "url": "/v1/responses", "body": {}}',
    "an id field given twice": b'{"url": "/v1/responses", "body": {"previous_response_id": "resp_1", '
    b'"previous_response_id": "resp_2"}}',
    "an id field that is no id": batch_line(2, "/v1/responses", {"previous_response_id": "../x"}),
    "an encoded path": batch_line(2, "/v1/responses/resp_1%2Finput_items", {}),
    "body not an object, naming objects": b'{"url": "/v1/responses", "body": "file_id"}',
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_a_batch_line_that_cant_be_read_is_a_400_naming_the_line(pool, case):
    first = batch_line(1, "/v1/embeddings", {"model": "emb", "input": "x"})
    before = pool.backend_calls()
    refused = upload_batch(pool, "key-b", [first, UNREADABLE[case]])
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["message"].startswith("Line 2 of the batch input file")
    assert pool.backend_calls() == before


def test_a_batch_line_naming_nothing_and_making_no_call_is_left_to_the_backend(pool):
    lines = [b'{"x": 1}', b"[]", b'{"url": 1}', b'{"url": "/v1/responses", "body": "x"}']
    assert upload_batch(pool, "key-b", lines).status_code == 200


def test_a_batch_line_to_a_route_not_isolated_is_refused_naming_the_line(pool):
    refused = upload_batch(pool, "key-b", [batch_line(1, "/v1/chat/completions/chatcmpl-1", {})])
    assert refused.status_code == 403 and refused.json()["error"]["message"].startswith("Line 1 of")


def test_bobs_batch_continuing_his_own_response_goes_to_its_holder(alices):
    two, _, _ = alices
    with two.v1("key-b") as bob:
        response = bob.responses.create(model="chat", input="bob's").id
    holder = two.proxy.objects.records.known(response)
    assert holder is not None
    lines = [
        batch_line(n, "/v1/responses", {"model": "chat", "input": "more", "previous_response_id": response})
        for n in range(1, 4)
    ]
    uploaded = upload_batch(two, "key-b", lines)
    assert uploaded.status_code == 200
    record = two.proxy.objects.records.known(uploaded.json()["id"])
    assert record is not None and record.backend == holder.backend and record.client == "key:bob"


def test_a_large_batch_file_is_read_to_its_last_line(alices):
    two, response, _ = alices
    filler = batch_line(0, "/v1/embeddings", {"model": "emb", "input": "x" * 200})
    lines = [filler] * 2_000 + [batch_line(2_001, "/v1/responses", {"previous_response_id": response})]
    assert sum(map(len, lines)) > PARSE_LIMIT_BYTES  # read off the event loop
    refused = upload_batch(two, "key-b", lines)
    assert refused.status_code == 404 and "line 2001 " in refused.json()["error"]["message"]


def test_other_purposes_and_a_single_client_are_not_read(make_pool, alices):
    two, response, _ = alices
    line = batch_line(1, "/v1/responses", {"previous_response_id": response})
    assert upload_batch(two, "key-b", [line], purpose="fine-tune").status_code == 200
    one = make_pool(1)  # one client: nothing to keep apart
    assert upload_batch(one, CLIENT_KEY, [line, b"not json"]).status_code == 200


def test_too_many_lines_or_objects_in_a_batch_file_are_a_400(monkeypatch):
    monkeypatch.setattr(forms, "MAX_BATCH_IDS", 2)
    lines = [batch_line(n, "/v1/responses", {"previous_response_id": f"resp_{n}"}) for n in range(1, 4)]
    body = form(
        (field("purpose"), b"batch"), ('Content-Disposition: form-data; name="file"; filename="b"', b"\n".join(lines))
    )
    upload = routes.classify("POST", "/openai/v1/files", body, FORM_TYPE, True)
    assert upload is not None
    with pytest.raises(BadRequest, match="Line 3 of the batch input file: the file names more than 2"):
        forms.read_now("POST", upload, body, FORM_TYPE)
    monkeypatch.setattr(forms, "MAX_BATCH_LINES", 2)
    with pytest.raises(BadRequest, match="at most 2 lines"):
        forms.read_now("POST", upload, body, FORM_TYPE)

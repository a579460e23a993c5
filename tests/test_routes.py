"""The object table and the strict reading of a call (lb.objects.routes): no sockets, no sleeps.

Each refusal here is a way a second client could make the balancer read one id while the backend
reads another; the balancer must refuse it rather than route it.
"""

from __future__ import annotations

import json

import pytest

from lb.errors import BadRequest
from lb.objects.routes import (
    COLLECTIONS,
    InvalidObjectId,
    RouteNotIsolated,
    UnsupportedMediaType,
    classify,
    is_id,
)

JSON = "application/json"


def body(payload: object) -> bytes:
    return json.dumps(payload).encode()


def ids(call) -> set[tuple[str, str]]:
    return {(i.value, i.kind) for i in call.ids}


def test_ids_are_accepted_only_in_the_shape_azure_issues():
    assert is_id("resp_67ccd2bed1ec8190b14f964abc054267") and is_id("batch_72a2792ef7d24ba7b82c7fe4a37e379f")
    assert is_id("file-b4fa7277f3eb4722ac18b90f46102c3f", "file") and is_id("assistant-Q9mT2x", "file")
    assert is_id("batch_6caaf24d-54a5-46be-b1b7-518884fcbdde")
    for bad in ("resp_", "resp_a/b", "resp_a b", "resp_" + "a" * 129, "resp_\ud800", "resp_é", "x_1", "", "/" * 300):
        assert not is_id(bad), bad
    assert not is_id("file-1", "response")  # a file id where a response id belongs


@pytest.mark.parametrize(
    "path",
    [
        "/openai/v1/responses/resp_1%2Finput_items",
        "/openai/v1/files/file-1%2fcontent",
        "/openai/v1/files/file-1%5Ccontent",
        "/openai/v1/responses/resp_1%252Finput_items",
        "/openai/v1/batches/batch_1%3Fx",
    ],
)
def test_an_object_path_with_an_encoded_delimiter_is_a_400(path):
    with pytest.raises(InvalidObjectId):
        classify("GET", path, b"", None)


@pytest.mark.parametrize("path", ["/openai/v1/responses/not-an-id", "/openai/v1/files/resp_1", "/openai/v1/batches/x"])
def test_a_path_id_of_another_shape_or_kind_is_a_400(path):
    with pytest.raises(InvalidObjectId):
        classify("GET", path, b"", None)


@pytest.mark.parametrize("junk", ["/" * 300, "a" * 1100, "\ud800", "", 7, {"nested": "resp_1"}])
def test_a_value_in_an_id_field_that_is_no_id_is_a_400_at_any_depth(junk):
    for payload in (
        {"model": "m", "metadata": {"file_id": junk}},
        {"model": "m", "previous_response_id": junk},
        {"model": "m", "tools": [{"type": "file_search", "vector_store_ids": ["vs_1", junk]}]},
    ):
        with pytest.raises(InvalidObjectId):
            classify("POST", "/openai/v1/responses", body(payload), JSON)


def test_a_body_in_utf16_or_utf32_or_with_a_bom_is_a_400_and_another_content_type_a_415():
    payload = {"model": "m", "previous_response_id": "resp_1", "input": "x"}
    text = json.dumps(payload)
    for encoded in (
        text.encode("utf-16"),
        text.encode("utf-16-le"),
        text.encode("utf-32"),
        b"\xef\xbb\xbf" + text.encode(),
    ):
        with pytest.raises(BadRequest):
            classify("POST", "/openai/v1/responses", encoded, JSON)
    with pytest.raises(UnsupportedMediaType):
        classify("POST", "/openai/v1/responses", text.encode(), "text/plain")
    with pytest.raises(BadRequest):
        classify("POST", "/openai/v1/responses", b"\xff\xfe{", JSON)


def test_a_field_name_spelled_with_escapes_is_read_as_the_backend_reads_it():
    raw = b'{"model": "m", "previous_response\\u005fid": "resp_\\u0031"}'
    assert ids(classify("POST", "/openai/v1/responses", raw, JSON)) == {("resp_1", "response")}


def test_every_object_bearing_field_is_found():
    fine_tuning = classify(
        "POST", "/openai/v1/fine_tuning/jobs", body({"training_file": "file-a", "validation_file": "file-b"}), JSON
    )
    assert ids(fine_tuning) == {("file-a", "file"), ("file-b", "file")} and fine_tuning.creates
    chat = {"model": "m", "messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-c"}}]}]}
    for path in ("/openai/v1/chat/completions", "/openai/deployments/chat/chat/completions?api-version=1"):
        assert ids(classify("POST", path, body(chat), JSON)) == {("file-c", "file")}
    responses = {
        "model": "m",
        "conversation": {"id": "conv_1"},
        "input": [
            {"role": "user", "content": [{"type": "input_file", "file_id": "file-d"}]},
            {"type": "reasoning", "id": "rs_1", "encrypted_content": "gAAA"},
            {"type": "item_reference", "id": "msg_1"},
        ],
        "tools": [
            {"type": "file_search", "vector_store_ids": ["vs_1"]},
            {"type": "code_interpreter", "container": "cntr_1"},
        ],
    }
    assert ids(classify("POST", "/openai/v1/responses", body(responses), JSON)) == {
        ("conv_1", "conversation"),
        ("file-d", "file"),
        ("rs_1", "reasoning"),
        ("msg_1", "item"),
        ("vs_1", "vector_store"),
        ("cntr_1", "container"),
    }
    run = {"data_source": {"type": "jsonl", "source": {"type": "file_id", "id": "file-e"}}}
    assert ids(classify("POST", "/openai/v1/evals/eval_1/runs", body(run), JSON)) == {
        ("eval_1", "eval"),
        ("file-e", "file"),
    }
    assert ids(classify("POST", "/openai/v1/batches", body({"input_file_id": "file-f"}), JSON)) == {("file-f", "file")}


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/openai/v1/containers/cntr_1/files/cfile_2/content", "container"),
        ("/openai/v1/uploads/upload_1/parts", "upload"),
        ("/openai/v1/evals/eval_1/runs/evalrun_2/output_items", "eval"),
        ("/openai/v1/vector_stores/vs_1/files", "vector_store"),
        ("/openai/v1/fine_tuning/jobs/ftjob-1/events", "fine_tuning_job"),
        ("/openai/v1/conversations/conv_1/items", "conversation"),
        ("/openai/responses/resp_1?api-version=2025-04-01-preview", "response"),
        ("/openai/V1/Responses/resp_1/Input_Items", "response"),
    ],
)
def test_every_object_route_names_its_owned_object(path, kind):
    call = classify("GET", path, b"", None, isolating=True)
    assert call is not None and call.path_id is not None and call.path_id.kind == kind


def test_every_collection_names_its_source_and_id_prefixes():
    assert {c.path[-1] for c in COLLECTIONS} >= {
        "responses",
        "conversations",
        "files",
        "batches",
        "jobs",
        "vector_stores",
        "containers",
        "uploads",
        "evals",
    }
    assert all(c.source and c.prefixes for c in COLLECTIONS)


@pytest.mark.parametrize(
    "path",
    [
        "/openai/v1/chat/completions/chatcmpl-1",  # stored chat completions: not in the table
        "/openai/v1/chat/completions/chatcmpl-1/messages",
        "/openai/v1/realtime/sessions",
        "/openai/v1/fine_tuning/checkpoints/ftckpt-1/permissions",
        "/openai/deployments/chat/files/file-1",
        "/openai/v1/somethingnew/obj_1",
    ],
)
def test_with_several_clients_a_route_outside_the_table_is_refused_naming_it(path):
    with pytest.raises(RouteNotIsolated, match="refused while several clients share the pool"):
        classify("GET", path, b"", None, isolating=True)
    assert classify("GET", path, b"", None, isolating=False) is None  # one client: nothing to keep apart


@pytest.mark.parametrize(
    "path",
    [
        "/openai/v1/chat/completions",
        "/openai/v1/embeddings",
        "/openai/v1/models",
        "/openai/v1/models/gpt-5",
        "/openai/deployments/chat/chat/completions?api-version=1",
        "/openai/deployments/emb/embeddings?api-version=1",
        "/openai/v1/audio/transcriptions",
    ],
)
def test_stateless_routes_cost_nothing_and_are_never_refused(path):
    method = "GET" if "/models" in path else "POST"  # models are read; the other routes are model calls
    assert classify(method, path, body({"model": "m", "input": "x"}), JSON, isolating=True) is None


def test_a_get_on_a_listable_collection_is_a_list():
    assert classify("GET", "/openai/v1/files?purpose=batch", b"", None).lists
    assert classify("GET", "/openai/v1/batches", b"", None).lists
    assert not classify("GET", "/openai/v1/batches/batch_1", b"", None).lists


def test_a_field_name_in_another_case_is_read_as_a_case_insensitive_backend_would():
    raw = b'{"model": "m", "Previous_Response_ID": "resp_1", "input": [{"TYPE": "Item_Reference", "Id": "msg_2"}]}'
    assert ids(classify("POST", "/openai/v1/responses", raw, JSON)) == {("resp_1", "response"), ("msg_2", "item")}
    chat = b'{"model": "m", "messages": [{"content": [{"type": "file", "file": {"FILE_ID": "file-3"}}]}]}'
    assert ids(classify("POST", "/openai/v1/chat/completions", chat, JSON)) == {("file-3", "file")}


def test_an_id_field_given_twice_in_one_object_is_a_400():
    # parsers differ on which of two equal keys counts: the balancer must not read one and the backend the other
    for raw in (
        b'{"model": "m", "previous_response_id": "resp_1", "previous_response_id": "resp_2"}',
        b'{"model": "m", "previous_response_id": "resp_1", "PREVIOUS_RESPONSE_ID": "resp_2"}',
        b'{"input": [{"type": "reasoning", "id": "rs_1", "id": "rs_2"}]}',
    ):
        with pytest.raises(InvalidObjectId, match="twice"):
            classify("POST", "/openai/v1/responses", raw, JSON)


def test_a_body_without_an_id_field_is_not_parsed_but_still_must_be_utf8_json_by_type():
    assert classify("POST", "/openai/v1/responses", b'{"model": "m", "input": "hi"}', JSON).ids == ()
    with pytest.raises(UnsupportedMediaType):
        classify("POST", "/openai/v1/responses", b'{"model": "m", "input": "hi"}', "application/x-www-form-urlencoded")
    with pytest.raises(BadRequest):
        classify("POST", "/openai/v1/responses", '{"model": "m"}'.encode("utf-16"), JSON)


def test_a_body_naming_an_object_that_python_cannot_build_is_a_400():
    deep = b'{"previous_response_id": "resp_1", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(BadRequest, match="not valid JSON"):
        classify("POST", "/openai/v1/responses", deep, JSON)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/openai/v1/chat/completions?limit=100"),  # the stored chat completions list
        ("GET", "/openai/chat/completions?api-version=2025-04-01-preview"),
        ("DELETE", "/openai/v1/chat/completions"),
        ("GET", "/openai/deployments/chat/embeddings?api-version=1"),
        ("DELETE", "/openai/models/gpt-4o-mini.ft-1?api-version=2024-10-21"),  # deletes a fine-tuned model
        ("DELETE", "/openai/v1/models/ft:gpt-4o-mini:org::abc"),
        ("PUT", "/openai/deployments/chat?api-version=2022-12-01"),  # the old authoring API
        ("PATCH", "/openai/v1/deployments/chat"),
        ("POST", "/openai/v1/models"),
        ("POST", "/openai/v1/"),
    ],
)
def test_with_several_clients_a_stateless_route_takes_only_its_own_methods(method, path):
    with pytest.raises(RouteNotIsolated, match="refused while several clients share the pool") as refused:
        classify(method, path, b"", None, isolating=True)
    assert refused.value.status == 403 and refused.value.message.startswith(f"'{method} ")  # names the route
    assert "ft-1" not in refused.value.message and "abc" not in refused.value.message  # by its shape, no name
    assert classify(method, path, b"", None, isolating=False) is None  # one client: forwarded as before


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/openai/v1/models"),
        ("HEAD", "/openai/v1/models/gpt-5"),
        ("GET", "/openai/models/gpt-4o?api-version=2024-10-21"),
        ("GET", "/openai/deployments?api-version=2022-12-01"),
        ("GET", "/openai/deployments/chat?api-version=2022-12-01"),
        ("GET", "/openai/v1/"),
    ],
)
def test_reads_of_models_and_deployments_stay_stateless(method, path):
    assert classify(method, path, b"", None, isolating=True) is None


def run(source: dict) -> bytes:
    return body({"name": "r", "data_source": {"type": "responses", "source": source}})


@pytest.mark.parametrize(
    "raw",
    [
        run({"type": "responses", "metadata": {"who": "alice"}}),
        body({"data_source": {"type": "completions", "source": {"type": "stored_completions", "limit": 10}}}),
        body({"data_source": {"type": "completions", "SOURCE": {"Type": "Stored_Completions"}}}),
        b'{"data_source": {"type": "responses", "source": {"type": "re\\u0073ponses"}}}',
    ],
)
def test_with_several_clients_an_eval_run_selecting_stored_objects_by_filter_is_refused(raw):
    path = "/openai/v1/evals/eval_1/runs"
    with pytest.raises(RouteNotIsolated, match="reads stored objects by filter"):
        classify("POST", path, raw, JSON, isolating=True)
    assert ids(classify("POST", path, raw, JSON, isolating=False)) == {("eval_1", "eval")}  # one client: as before


TEMPLATE = {"type": "template", "template": [{"role": "user", "content": "{{item.question}}"}]}
ITEM_REFERENCE = {"type": "item_reference", "item_reference": "item.messages"}


def test_an_eval_run_over_its_own_items_or_a_file_is_read_as_before():
    path = "/openai/v1/evals/eval_1/runs"
    inline = run({"type": "file_content", "content": [{"item": {"q": "responses"}}]})
    assert ids(classify("POST", path, inline, JSON, isolating=True)) == {("eval_1", "eval")}
    source = {"type": "file_id", "id": "file-1"}
    for data_source in (
        {"type": "responses", "source": source, "input_messages": TEMPLATE},  # items' values in its text
        {"type": "completions", "source": source, "input_messages": {"Type": "Template", "template": []}},
        {"type": "jsonl", "source": source},  # items graded as they are: no model called with them
    ):
        from_file = body({"name": "r", "data_source": data_source})
        assert ids(classify("POST", path, from_file, JSON, isolating=True)) == {("eval_1", "eval"), ("file-1", "file")}
    twice = b'{"data_source": {"type": "responses", "source": {"type": "file_id", "id": "file-1"}, "Source": {}}}'
    with pytest.raises(InvalidObjectId, match="twice"):
        classify("POST", path, twice, JSON, isolating=True)
    twice = b'{"data_source": {"type": "jsonl", "source": {"type": "file_id", "id": "file-1"},'
    twice += b' "input_messages": null, "Input_Messages": {"type": "item_reference"}}}'
    with pytest.raises(InvalidObjectId, match="twice"):  # one reader may take the one, another the other
        classify("POST", path, twice, JSON, isolating=True)


@pytest.mark.parametrize(
    "data_source",
    [
        {"type": "responses", "input_messages": ITEM_REFERENCE},  # each item's messages sent whole
        {"type": "completions", "input_messages": ITEM_REFERENCE},
        {"type": "azure_ai_target_completions", "input_messages": ITEM_REFERENCE, "target": {"type": "x"}},
        {"type": "responses"},  # no template: what the sampler sends is not known, so not read
        {"type": "jsonl", "input_messages": {"type": "item_reference"}},
        {"type": "responses", "input_messages": {"type": "something_new"}},
    ],
)
def test_with_several_clients_an_eval_run_sending_a_files_items_whole_is_refused(data_source):
    """An items file is not read (`purpose=evals` or not): with `item_reference` its items' messages, which
    may name another client's file by `file_id`, reach the model unread."""
    path = "/openai/v1/evals/eval_1/runs"
    raw = body({"name": "r", "data_source": {**data_source, "source": {"type": "file_id", "id": "file-1"}}})
    with pytest.raises(RouteNotIsolated, match="items from a file") as refused:
        classify("POST", path, raw, JSON, isolating=True)
    assert refused.value.status == 403
    single = raw.replace(b'"', b"'")  # a lenient reader's spelling: parsed, and not JSON
    with pytest.raises(BadRequest, match="not valid JSON"):
        classify("POST", path, single, JSON, isolating=True)
    assert ids(classify("POST", path, raw, JSON, isolating=False)) == {("eval_1", "eval"), ("file-1", "file")}


def test_an_image_edit_names_its_images_and_mask_by_file_id():
    edit = {"model": "m", "prompt": "p", "images": [{"file_id": "file-a"}, {"image_url": "https://x"}]}
    edit["mask"] = {"file_id": "file-b"}
    for path in ("/openai/v1/images/edits", "/openai/deployments/img/images/edits?api-version=1"):
        assert ids(classify("POST", path, body(edit), JSON, isolating=True)) == {("file-a", "file"), ("file-b", "file")}


def test_every_stateless_routes_json_body_is_read_for_the_tables_fields():
    for route in ("images/generations", "completions", "moderations", "audio/speech"):
        named = body({"model": "m", "input": "x", "previous_response_id": "resp_1"})
        assert ids(classify("POST", f"/openai/v1/{route}", named, JSON, isolating=True)) == {("resp_1", "response")}


def test_a_chat_names_a_stored_audio_answer_by_its_id():
    turn = {"role": "assistant", "audio": {"id": "audio_abc"}}
    chat = {"model": "m", "audio": {"voice": "alloy", "format": "wav"}, "messages": [turn]}
    assert ids(classify("POST", "/openai/v1/chat/completions", body(chat), JSON)) == {("audio_abc", "audio")}
    chat["messages"] = [{"role": "user", "content": "hi"}]  # the output's voice and format name nothing
    assert classify("POST", "/openai/v1/chat/completions", body(chat), JSON, isolating=True) is None
    with pytest.raises(InvalidObjectId):
        classify("POST", "/openai/v1/chat/completions", body({"messages": [{"audio": {"id": "x/y"}}]}), JSON)


def test_hot_bodies_without_an_id_field_are_not_parsed(monkeypatch):
    def parsed(*args):
        raise AssertionError("parsed")

    monkeypatch.setattr("lb.objects.routes.parse_body", parsed)
    tools = {"messages": [{"role": "tool", "tool_call_id": "call_1", "content": "a file, some sound, 'quoted'"}]}
    assert classify("POST", "/openai/v1/chat/completions", body(tools), JSON, isolating=True) is None
    embed = {"input": ["file_id", "previous_response_id", "\\u00e9"]}  # embeddings name nothing: never read
    assert classify("POST", "/openai/v1/embeddings", body(embed), JSON, isolating=True) is None


@pytest.mark.parametrize(
    "key",
    [
        "previou\u017f_response_id",  # long s
        "\uff50revious_response_id",  # fullwidth p
        "\ufb01le_id",  # the fi ligature
        "conver\u017fation",
        "typ\u1d49",  # modifier small e: a typed id's "type"
    ],
)
@pytest.mark.parametrize("escaped", [False, True], ids=["utf8", "escaped"])
def test_a_key_in_letters_that_fold_to_a_field_name_is_refused(key, escaped):
    raw = json.dumps({"model": "m", "input": [{key: "resp_1", "id": "file-1"}]}, ensure_ascii=escaped)
    for path in ("/openai/v1/responses", "/openai/v1/chat/completions", "/openai/v1/images/edits"):
        with pytest.raises(BadRequest, match="letters other than ASCII") as refused:
            classify("POST", path, raw.encode(), JSON, isolating=True)
        assert refused.value.status == 400 and refused.value.code == "invalid_field_name"


def test_a_body_in_other_scripts_is_read_as_before():
    chat = {
        "model": "m",
        "messages": [{"role": "user", "content": "Grüße, 你好, \u017f, \u212a"}],
        "ид": 1,
        "\u017fize": 2,
    }
    for escaped in (False, True):
        raw = json.dumps(chat, ensure_ascii=escaped).encode()
        assert classify("POST", "/openai/v1/chat/completions", raw, JSON, isolating=True) is None
    part = {"type": "file", "file": {"file_id": "file-1"}}
    named = json.dumps({"messages": [{"role": "user", "content": ["é", part]}]}, ensure_ascii=False)
    assert ids(classify("POST", "/openai/v1/chat/completions", named.encode(), JSON)) == {("file-1", "file")}
    typed = json.dumps(
        {"data_source": {"type": "jsonl", "source": {"type": "\ufb01le_id", "id": "file-2"}}}, ensure_ascii=False
    )
    evaluated = classify("POST", "/openai/v1/evals/eval_1/runs", typed.encode(), JSON, isolating=True)
    assert ids(evaluated) == {("eval_1", "eval"), ("file-2", "file")}  # a typed id's type is folded like a key


@pytest.mark.parametrize(
    "schema_at",
    [
        lambda s: {"tools": [{"type": "function", "function": {"name": "open", "parameters": s}}]},
        lambda s: {"tools": [{"type": "function", "name": "open", "parameters": s}]},
        lambda s: {"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": s}}},
        lambda s: {"text": {"format": {"type": "json_schema", "name": "r", "schema": s}}},
    ],
)
def test_a_json_schema_with_a_property_named_file_id_is_a_schema_not_an_id(schema_at):
    """A function tool or structured output describing a `file_id` argument names no object: the call
    is routed as any other, and an id the caller really names beside it is still read."""
    schema = {"type": "object", "properties": {"file_id": {"type": "string"}, "vector_store_ids": {"type": "array"}}}
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], **schema_at(schema)}
    for path in ("/openai/v1/chat/completions", "/openai/v1/responses"):
        call = classify("POST", path, json.dumps(body).encode(), "application/json", True)
        assert call is None or not call.ids
    body["messages"][0]["content"] = [{"type": "file", "file": {"file_id": "file-abc123"}}]
    call = classify("POST", "/openai/v1/chat/completions", json.dumps(body).encode(), "application/json", True)
    assert call is not None and [i.value for i in call.ids] == ["file-abc123"]

"""What reading a body for ids may cost others (lb.objects.routes.check_json_size, the router's one parse at a time).

`json.loads` holds the GIL but where it calls Python, so a body of millions of tiny values stalls every
other request of the process, in a thread too: a red team's 9 MB of 3,000,000 empty objects cost
3.4 s of CPU in `classify`. A body to parse is bounded before it is parsed, and large ones are parsed
one at a time, so the event loop shares the GIL with one thread at most.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import pytest

from lb.errors import BadRequest
from lb.objects import forms, routes
from lb.objects.routes import MAX_JSON_COMMAS, MAX_JSON_CONTAINERS, TooManyJsonValues, classify
from lb.requestinfo import PARSE_LIMIT_BYTES

JSON = "application/json"
FILE = "file-" + "a" * 32
BOUNDARY = "boundsboundary"
FORM_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def named_file(filler: bytes) -> bytes:
    """A chat naming a file, with `filler` (values, comma-separated) beside it."""
    part = {"type": "file", "file": {"file_id": FILE}}
    head = json.dumps({"model": "chat", "messages": [{"role": "user", "content": [part]}]})
    return head[:-1].encode() + b', "x": [' + filler + b"0]}"


@pytest.mark.parametrize(
    "filler",
    [
        b"{}," * MAX_JSON_CONTAINERS,  # the red team's body, at the cap
        b"[]," * MAX_JSON_CONTAINERS,
        b"[{}]," * (MAX_JSON_CONTAINERS // 2),
        b"0," * MAX_JSON_COMMAS,
        b'"{[",' * MAX_JSON_CONTAINERS,  # in strings they count too: a bound, not a reading
    ],
    ids=["objects", "lists", "lists-of-objects", "numbers", "in-strings"],
)
@pytest.mark.parametrize("path", ["/openai/v1/chat/completions", "/openai/v1/responses"])
def test_a_body_holding_more_values_than_any_call_needs_is_a_400_before_it_is_parsed(monkeypatch, filler, path):
    def parsed(pairs):
        raise AssertionError("parsed")

    monkeypatch.setattr(routes, "keyed", parsed)  # every body here has an object: parsing it would call this
    with pytest.raises(TooManyJsonValues, match="more than any call needs") as refused:
        classify("POST", path, named_file(filler), JSON, isolating=True)
    assert refused.value.status == 400 and refused.value.code == "too_many_json_values"


def test_a_body_under_the_bounds_is_read_as_before():
    for filler in (b"{}," * (MAX_JSON_CONTAINERS - 100), b"1.5," * (MAX_JSON_COMMAS - 100)):
        call = classify("POST", "/openai/v1/chat/completions", named_file(filler), JSON, isolating=True)
        assert call is not None and [i.value for i in call.ids] == [FILE]


def test_a_chat_at_azures_limits_with_a_long_json_context_is_read():
    """2,048 messages and 128 tools (Azure's limits per chat), tools with 30-property schemas, 4.4 MB of JSON
    tool output as text, more than the largest context (1M tokens) holds (brackets and commas in strings
    count too): under both bounds."""
    row = {"id": 1, "name": "a", "tags": ["x", "y"], "meta": {"k": [1, 2], "v": None}, "ok": True}
    output = json.dumps([row] * 40)  # 4.4 KB once escaped, one bracket in 27 bytes (as real API JSON), a `,` in 14
    schema = {
        "type": "object",
        "properties": {f"p{i}": {"type": "array", "items": {"type": "string"}} for i in range(30)},
    }
    tools = [{"type": "function", "function": {"name": f"t{i}", "parameters": schema}} for i in range(128)]
    messages: list[dict[str, object]] = [
        {"role": "tool", "tool_call_id": f"c{i}", "content": output} for i in range(1_000)
    ]
    messages += [{"role": "user", "content": [{"type": "text", "text": f"turn {i}"}]} for i in range(1_047)]
    messages.append({"role": "user", "content": [{"type": "file", "file": {"file_id": FILE}}]})
    raw = json.dumps({"model": "chat", "messages": messages, "tools": tools}).encode()
    assert len(raw) > 4_400_000 and raw.count(b"{") + raw.count(b"[") < MAX_JSON_CONTAINERS
    call = classify("POST", "/openai/v1/chat/completions", raw, JSON, isolating=True)
    assert call is not None and [i.value for i in call.ids] == [FILE]


def form(*parts: tuple[str, bytes]) -> bytes:
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; {head}\r\n\r\n".encode() + data + b"\r\n"
        for head, data in parts
    )
    return body + f"--{BOUNDARY}--\r\n".encode()


def test_a_batch_line_or_a_form_fields_json_over_the_bounds_is_a_400():
    """Each line of a batch file is one parse, bounded alone (a file of 100,000 honest lines holds more);
    a form field's JSON too."""
    heavy = {"model": "chat", "input": [{"type": "input_file", "file_id": FILE}], "x": [[]] * (MAX_JSON_CONTAINERS + 1)}
    line = json.dumps({"custom_id": "1", "method": "POST", "url": "/v1/responses", "body": heavy}).encode()
    honest = json.dumps({"custom_id": "0", "method": "POST", "url": "/v1/responses", "body": {"input": "hi"}}).encode()
    batch = form(('name="purpose"', b"batch"), ('name="file"; filename="b.jsonl"', honest + b"\n" + line + b"\n"))
    upload = classify("POST", "/openai/v1/files", batch, FORM_TYPE, True)
    assert upload is not None
    with pytest.raises(BadRequest, match="Line 2 of the batch input file holds more than"):
        forms.read_now("POST", upload, batch, FORM_TYPE)
    tools = json.dumps([{"file_ids": [FILE]}] + [{}] * MAX_JSON_CONTAINERS).encode()
    container = classify("POST", f"/openai/v1/containers/cntr_{'b' * 32}/files", b"", FORM_TYPE, True)
    assert container is not None
    with pytest.raises(TooManyJsonValues, match="multipart field 'tools'"):
        forms.read_now("POST", container, form(('name="tools"', tools)), FORM_TYPE)


def test_large_bodies_are_parsed_one_at_a_time(make_pool, monkeypatch):
    """Three large bodies at once: each parsed in a thread, never two together (the loop then shares
    the GIL with one parse, not three), and each answered."""
    pool = make_pool(1, env={"LB_CLIENT_KEYS": "alice:key-a,bob:key-b"})
    running, most = 0, 0
    lock = threading.Lock()
    read = routes.classify

    def counted(*args, **kwargs):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            time.sleep(0.2)  # long enough for the others to arrive
            return read(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(routes, "classify", counted)
    body = named_file(b'"' + b"x" * PARSE_LIMIT_BYTES + b'",')  # over PARSE_LIMIT_BYTES: off the loop

    def send(_: int) -> int:
        with httpx.Client(base_url=pool.url, headers={"api-key": "key-b"}, timeout=30) as http:
            return http.post("/openai/v1/chat/completions", content=body, headers={"content-type": JSON}).status_code

    with concurrent.futures.ThreadPoolExecutor(3) as threads:
        statuses = list(threads.map(send, range(3)))
    assert statuses == [404, 404, 404]  # a file without a record, with several clients: no backend call
    assert most == 1

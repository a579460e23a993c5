from __future__ import annotations

import json

import pytest

from lb.metering.runs import Run, runs_in
from lb.metering.usage import Usage, UsageChunkFilter, UsageReader, from_object, usage_requested


def read(chunks: list[bytes], event_stream: bool) -> Usage | None:
    reader = UsageReader(event_stream)
    for chunk in chunks:
        reader.feed(chunk)
    return reader.result()


def every_split(data: bytes) -> list[list[bytes]]:
    """The data cut in two at every position, and in one-byte reads."""
    return [[data[:i], data[i:]] for i in range(len(data) + 1)] + [[data[i : i + 1] for i in range(len(data))]]


CHAT_USAGE = {
    "prompt_tokens": 120,
    "completion_tokens": 30,
    "total_tokens": 150,
    "prompt_tokens_details": {"cached_tokens": 64},
    "completion_tokens_details": {"reasoning_tokens": 12},
}
RESPONSES_USAGE = {
    "input_tokens": 90,
    "input_tokens_details": {"cached_tokens": 32},
    "output_tokens": 41,
    "output_tokens_details": {"reasoning_tokens": 7},
    "total_tokens": 131,
}


def sse(obj: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def chat_stream(with_usage: bool) -> bytes:
    chunk = {"id": "c", "choices": [{"index": 0, "delta": {"content": 'say "usage":{'}}]}
    events = [sse({**chunk, "usage": None} if with_usage else chunk) for _ in range(3)]
    if with_usage:
        events.append(sse({"id": "c", "choices": [], "usage": CHAT_USAGE}))
    return b"".join(events) + b"data: [DONE]\n\n"


def test_usage_object_of_both_apis_maps_onto_one_shape() -> None:
    assert from_object(CHAT_USAGE) == Usage(prompt=120, completion=30, total=150, cached=64, reasoning=12)
    assert from_object(RESPONSES_USAGE) == Usage(prompt=90, completion=41, total=131, cached=32, reasoning=7)
    assert from_object({"prompt_tokens": 4, "total_tokens": 4}) == Usage(prompt=4, total=4)  # embeddings


@pytest.mark.parametrize(
    "bad",
    [None, [], "x", {}, {"prompt_tokens": -1, "total_tokens": 3}, {"prompt_tokens": "9"}, {"prompt_tokens": True}],
)
def test_malformed_usage_is_none_not_an_error(bad: object) -> None:
    assert from_object(bad) is None


def test_json_body_usage_at_any_read_boundary() -> None:
    body = json.dumps(
        {"choices": [{"message": {"content": 'text with "usage":{"prompt_tokens":1} inside'}}], "usage": CHAT_USAGE}
    ).encode()
    for chunks in every_split(body):
        assert read(chunks, event_stream=False) == from_object(CHAT_USAGE)


def test_json_body_takes_the_top_level_usage_after_an_escaped_lookalike() -> None:
    body = b'{"usage": {"prompt_tokens": 5, "total_tokens": 5}, "note": "\\"usage\\": {\\"prompt_tokens\\": 9}"}'
    assert read([body], event_stream=False) == Usage(prompt=5, total=5)


@pytest.mark.parametrize("body", [b"", b"not json", b'{"choices": []}', b'{"usage": null}', b'{"usage": {"x": 1'])
def test_json_body_without_readable_usage_is_unknown(body: bytes) -> None:
    assert read([body], event_stream=False) is None


def test_chat_stream_final_usage_chunk_at_any_read_boundary() -> None:
    data = chat_stream(with_usage=True)
    for chunks in every_split(data):
        assert read(chunks, event_stream=True) == from_object(CHAT_USAGE), chunks


def test_chat_stream_without_include_usage_is_unknown() -> None:
    assert read([chat_stream(with_usage=False)], event_stream=True) is None


def test_responses_stream_reads_the_completed_event() -> None:
    started = {"type": "response.created", "response": {"id": "r", "status": "in_progress", "usage": None}}
    delta = {"type": "response.output_text.delta", "delta": "hi"}
    done = {"type": "response.completed", "response": {"id": "r", "status": "completed", "usage": RESPONSES_USAGE}}
    data = sse(started, "response.created") + sse(delta, delta["type"]) + sse(done, "response.completed")
    for chunks in every_split(data):
        assert read(chunks, event_stream=True) == from_object(RESPONSES_USAGE)


def test_crlf_event_separators_are_understood() -> None:
    data = chat_stream(with_usage=True).replace(b"\n", b"\r\n")
    assert read([data[:50], data[50:]], event_stream=True) == from_object(CHAT_USAGE)


def test_stream_cut_before_its_usage_is_unknown_and_malformed_usage_event_is_skipped() -> None:
    data = chat_stream(with_usage=True)
    assert read([data[: data.index(b'"choices":[]')]], event_stream=True) is None
    assert read([b'data: {"usage":{"prompt_tokens": oops}\n\n'], event_stream=True) is None


def test_a_chat_stream_always_asks_the_backend_for_its_usage() -> None:
    plain = json.dumps({"model": "chat", "messages": [], "stream": True}).encode()
    body, asked = usage_requested(plain)
    assert json.loads(body or b"")["stream_options"] == {"include_usage": True} and not asked
    other = json.dumps({"model": "chat", "messages": [], "stream": True, "stream_options": {"x": 1}}).encode()
    assert json.loads(usage_requested(other)[0] or b"")["stream_options"] == {"x": 1, "include_usage": True}
    refused = {"model": "chat", "messages": [], "stream": True, "stream_options": {"include_usage": False}}
    body, asked = usage_requested(json.dumps(refused).encode())
    assert json.loads(body or b"")["stream_options"] == {"include_usage": True} and not asked  # asked anyway
    wants = {"model": "chat", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
    assert usage_requested(json.dumps(wants).encode()) == (None, True)
    assert usage_requested(b'{"stream_options": 5, "stream": true}') == (None, False)


def test_the_usage_chunk_the_client_did_not_ask_for_is_dropped_at_any_read_boundary() -> None:
    data = chat_stream(with_usage=True)
    expected = b"".join(e + b"\n\n" for e in data.split(b"\n\n") if e and b'"choices":[]' not in e)
    assert b'"choices":[]' in data and expected != data
    for chunks in every_split(data):
        hide = UsageChunkFilter()
        out = b"".join(hide.push(c) for c in chunks) + hide.flush()
        assert out == expected
        assert read(chunks, event_stream=True) == from_object(CHAT_USAGE)  # the balancer still reads it


def test_a_responses_answer_says_its_id_status_and_background() -> None:
    queued = {"id": "resp_1", "object": "response", "status": "queued", "background": True, "usage": None}
    reader = UsageReader(False, responses=True)
    reader.feed(json.dumps(queued).encode())
    assert reader.result() is None
    assert (reader.response_id, reader.status, reader.background) == ("resp_1", "queued", True)
    created = sse({"type": "response.created", "response": {**queued, "status": "in_progress"}})
    done = sse({"type": "response.completed", "response": {**queued, "status": "completed", "usage": RESPONSES_USAGE}})
    for chunks in every_split(created + done):
        reader = UsageReader(True, responses=True)
        for chunk in chunks:
            reader.feed(chunk)
        assert reader.result() == from_object(RESPONSES_USAGE)
        assert (reader.response_id, reader.status, reader.background) == ("resp_1", "completed", True)
    cut = UsageReader(True, responses=True)
    cut.feed(created)
    assert cut.result() is None and (cut.response_id, cut.status) == ("resp_1", "in_progress")


def test_a_run_stream_shows_its_run_at_any_read_boundary_and_never_a_steps_usage() -> None:
    run = {"id": "run_1", "object": "thread.run", "status": "queued", "usage": None}
    step = {"id": "step_1", "object": "thread.run.step", "run_id": "run_1", "usage": CHAT_USAGE}
    done = {**run, "status": "completed", "completed_at": 1_800_000_000, "usage": CHAT_USAGE}
    data = b"".join(
        [
            sse(run, "thread.run.created"),
            sse({"id": "msg_1", "object": "thread.message.delta", "delta": {"content": '"usage":{'}}),
            sse(step, "thread.run.step.completed"),
            json.dumps(done).encode().join([b"event: thread.run.completed\ndata: ", b"\n\n"]),  # spaced JSON
            b"event: done\ndata: [DONE]\n\n",
        ]
    )
    for chunks in every_split(data):
        reader = UsageReader(True, runs=runs_in)
        for chunk in chunks:
            reader.feed(chunk)
        assert reader.result() is None  # no usage of the answer's own: the run's, by id
        assert reader.runs == {"run_1": Run("completed", from_object(CHAT_USAGE), 1_800_000_000)}, chunks
    reader = UsageReader(True, runs=runs_in)
    reader.feed(data[: data.index(b"event: thread.run.step.completed")])  # cut before its end
    reader.result()
    assert reader.runs == {"run_1": Run("queued", None, None)}


def test_a_page_of_runs_shows_each_run_and_no_steps() -> None:
    page = {
        "object": "list",
        "data": [
            {"id": "run_2", "object": "thread.run", "status": "in_progress", "usage": None},
            {"id": "run_1", "object": "thread.run", "status": "failed", "failed_at": 5, "usage": None},
            {"id": "step_1", "object": "thread.run.step", "usage": CHAT_USAGE},
        ],
    }
    reader = UsageReader(False, runs=runs_in)
    reader.feed(json.dumps(page).encode())
    assert reader.result() is None
    assert reader.runs == {"run_2": Run("in_progress", None, None), "run_1": Run("failed", None, 5)}

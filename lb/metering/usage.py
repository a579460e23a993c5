"""The tokens an answer used, read from its `usage` as the answer passes through the relay.

Why it reads this way:
- The client's bytes are never held back. The readers only look at chunks on their way out, so a
  stream's first chunk leaves as early as before and nothing is re-chunked.
- Nothing is parsed per chunk. A stream carries usage once, at its end: the chat stream's final
  chunk when the client asked for `stream_options.include_usage` (every earlier chunk says
  `"usage":null`), the Responses stream's `response.completed` (or `.incomplete` / `.failed`)
  event. So a chunk costs one substring search for `"usage":{`; only the event(s) containing it
  are decoded. A JSON body is kept (a reference per read, bounded) and only the object after its
  last top-level-looking `"usage":` key is decoded, not the whole body (an embeddings answer can
  be megabytes of floats).
- A malformed or missing `usage` is never an error: the reader says `None` and the answer is
  counted as "unknown" (see docs/metering.md for what is counted then).
"""

from __future__ import annotations

import contextlib
import json
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

MAX_JSON_BYTES = 32 * 1024 * 1024  # a JSON answer larger than this is relayed but not metered
MAX_EVENT_BYTES = 8 * 1024 * 1024  # ... nor is a stream event larger than this
MAX_REWRITE_BYTES = 1024 * 1024  # a body naming stream_options is parsed to ask for usage up to this size
_MARK, _MARK_SPACED = b'"usage":{', b'"usage": {'  # compact JSON (Azure OpenAI, OpenAI) and Python's default
_KEY = b'"usage":'
_MARKS = (_MARK, _MARK_SPACED)
_MARKS_RESPONSES = (_MARK, _MARK_SPACED, b'"response":{', b'"response": {')  # lifecycle events carry the object
_MARKS_RUNS = (b'"object":"thread.run"', b'"object": "thread.run"')  # a run's events (not its steps')
_NO_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
MAX_PARSE_BYTES = 4 * 1024 * 1024  # a Responses or runs JSON answer up to this is parsed whole (ids, status)
_EDGE = len(_MARKS_RUNS[1]) - 1  # the longest marker but one byte
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class Usage:
    """One answer's tokens; the names of the chat API, the Responses API's mapped onto them."""

    prompt: int = 0
    completion: int = 0
    total: int = 0
    cached: int = 0
    reasoning: int = 0


def from_object(obj: Any) -> Usage | None:
    """A `usage` object of either API (chat / embeddings: prompt_tokens...; Responses: input_tokens...)."""
    if not isinstance(obj, dict):
        return None
    if "input_tokens" in obj or "output_tokens" in obj:  # Responses API
        prompt, completion = obj.get("input_tokens"), obj.get("output_tokens", 0)
        cached = _detail(obj.get("input_tokens_details"), "cached_tokens")
        reasoning = _detail(obj.get("output_tokens_details"), "reasoning_tokens")
    else:
        prompt, completion = obj.get("prompt_tokens"), obj.get("completion_tokens", 0)
        cached = _detail(obj.get("prompt_tokens_details"), "cached_tokens")
        reasoning = _detail(obj.get("completion_tokens_details"), "reasoning_tokens")
    if completion is None:
        completion = 0
    total = obj.get("total_tokens")
    if not (_count(prompt) and _count(completion)):
        return None
    if total is None:
        total = prompt + completion
    if not _count(total) or cached is None or reasoning is None:
        return None
    return Usage(prompt, completion, total, cached, reasoning)


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _detail(details: Any, name: str) -> int | None:
    """An optional details field: absent or null is 0, anything else but a count is malformed."""
    if details is None:
        return 0
    if not isinstance(details, dict):
        return None
    value = details.get(name)
    if value is None:
        return 0
    return value if _count(value) else None


class UsageReader:
    """Watches one answer's body go by (`feed` each read, in order) and says its usage at the end.

    With `responses` (a Responses API call), it also says which stored response the answer is
    (`response_id`), whether that runs in the background and its last status: a response is
    charged once, however often it is read (`lb.metering.responses`). With `runs` (a call whose
    answer shows Assistants runs), it reads no usage of its own but collects, in `runs`, what
    `runs(obj)` finds in the answer or in each of its run events (`lb.metering.runs`): a run is
    charged once, by id, however often it is read."""

    def __init__(
        self, event_stream: bool, responses: bool = False, runs: Callable[[Any], dict[str, Any]] | None = None
    ) -> None:
        self.event_stream = event_stream
        self.responses = responses
        self._runs_in = runs
        self.runs: dict[str, Any] = {}  # run id -> what the last answer or event showing it said
        self._marks = _MARKS_RUNS if runs is not None else _MARKS_RESPONSES if responses else _MARKS
        self._chunks: list[bytes] = []  # JSON: the body so far; stream: the unfinished event(s)
        self._size = 0
        self._hot = False  # stream: the unfinished part contains a marker
        self._usage: Usage | None = None
        self._overflow = False
        self._edge = b""  # stream: its last few bytes so far
        self.response_id: str | None = None
        self.status: str | None = None
        self.background = False

    def feed(self, chunk: bytes) -> None:
        if self.event_stream:
            self._feed_event(chunk)
        elif not self._overflow:
            self._size += len(chunk)
            if self._size > MAX_JSON_BYTES:
                self._overflow, self._chunks = True, []
            else:
                self._chunks.append(chunk)

    def result(self) -> Usage | None:
        """The usage the answer carried, or None (none, malformed, or too large to look at)."""
        if self.event_stream:
            if self._hot:  # a last event without its blank line
                self._scan(b"".join(self._chunks))
                self._chunks, self._hot = [], False
            return self._usage
        if self._overflow or not self._chunks:
            return None
        body = b"".join(self._chunks)
        if self._runs_in is not None:  # the runs' usage, by run: none of the answer's own
            if len(body) <= MAX_PARSE_BYTES:
                with contextlib.suppress(ValueError, RecursionError):  # not JSON: no run seen
                    self.runs.update(self._runs_in(json.loads(body)))
            return None
        if self.responses and len(body) <= MAX_PARSE_BYTES:
            try:
                obj = json.loads(body)
            except ValueError:
                return None
            if isinstance(obj, dict):
                self._saw_response(obj)
                return from_object(obj.get("usage"))
            return None
        return _from_body(body)

    def _saw_response(self, obj: dict[str, Any]) -> None:
        if obj.get("object") == "response" and isinstance(obj.get("id"), str):
            self.response_id = obj["id"]
            self.status = obj.get("status") if isinstance(obj.get("status"), str) else self.status
            self.background = self.background or obj.get("background") is True

    def _feed_event(self, chunk: bytes) -> None:
        if not self._hot:
            self._hot = any(m in chunk for m in self._marks) or (bool(self._edge) and self._straddles(chunk))
        if chunk.endswith(b"\n\n"):  # the common case: the read ends where an event does
            if self._hot:
                self._scan(b"".join((*self._chunks, chunk)) if self._chunks else chunk)
            self._chunks, self._size, self._hot, self._edge = [], 0, False, b""
            return
        self._edge = chunk[-_EDGE:] if len(chunk) >= _EDGE else (self._edge + chunk)[-_EDGE:]
        end = chunk.rfind(b"\n\n")
        if end < 0:
            end = chunk.rfind(b"\r\n\r\n")
        if end < 0:  # the event goes on in the next read
            self._size += len(chunk)
            if self._size > MAX_EVENT_BYTES:  # an event this long is relayed, not looked at
                self._chunks, self._size, self._hot = [], 0, False
            else:
                self._chunks.append(chunk)
            return
        if self._hot:
            self._scan(b"".join((*self._chunks, chunk[:end])))
        rest = chunk[end:].lstrip(b"\r\n")
        self._chunks, self._size = ([rest], len(rest)) if rest else ([], 0)
        self._hot = bool(rest) and any(m in rest for m in self._marks)

    def _straddles(self, chunk: bytes) -> bool:
        """Whether a marker begins in the previous read and ends in this one."""
        seam = self._edge + chunk[:_EDGE]
        return any(m in seam for m in self._marks)

    def _scan(self, events: bytes) -> None:
        """Decode the complete events that contain a marker; the last usage seen wins."""
        for event in events.replace(b"\r\n", b"\n").split(b"\n\n"):
            if not any(m in event for m in self._marks):
                continue
            data = b"\n".join(line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
            try:
                obj = json.loads(data)
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue
            if self._runs_in is not None:  # a run's event: the run as it stands (its steps' usage is in it)
                self.runs.update(self._runs_in(obj))
                continue
            found = obj.get("usage")
            if isinstance(obj.get("response"), dict):  # Responses API's lifecycle events
                self._saw_response(obj["response"])
                if found is None:
                    found = obj["response"].get("usage")
            usage = from_object(found)
            if usage is not None:
                self._usage = usage


class UsageChunkFilter:
    """Drops a chat stream's usage chunk (`"choices":[]` with a usage object) that the balancer asked
    for and the client did not. Only whole events leave (a read that ends mid-event keeps its tail
    until the event is complete: no client can use half an event); reads are otherwise untouched."""

    def __init__(self) -> None:
        self._tail = b""

    def push(self, chunk: bytes) -> bytes:
        data = self._tail + chunk if self._tail else chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._tail = data
            return b""
        whole, self._tail = data[: end + 2], data[end + 2 :]
        if _MARK in whole or _MARK_SPACED in whole:
            whole = _without_usage_events(whole)
        return whole

    def flush(self) -> bytes:
        tail, self._tail = self._tail, b""
        return _without_usage_events(tail) if _MARK in tail or _MARK_SPACED in tail else tail


def _without_usage_events(events: bytes) -> bytes:
    kept = [e for e in events.split(b"\n\n") if not ((_MARK in e or _MARK_SPACED in e) and _NO_CHOICES.search(e))]
    return b"\n\n".join(kept)


def decoder(encoding: str) -> Callable[[bytes], bytes] | None:
    """A function turning a gzip/deflate body's reads into its plain bytes (bounded), for reading
    usage from an answer a backend compressed although asked not to; None for other encodings."""
    if encoding not in ("gzip", "x-gzip", "deflate"):
        return None
    inflate = zlib.decompressobj(47 if encoding != "deflate" else 15)  # 47: a gzip or zlib header

    def plain(chunk: bytes) -> bytes:
        try:
            return inflate.decompress(chunk, MAX_EVENT_BYTES)
        except zlib.error:
            return b""

    return plain


def _from_body(body: bytes) -> Usage | None:
    """The usage of a JSON answer, decoding only the object after the last `"usage":` key.

    A top-level `usage` comes after the answer's content in both APIs, and a `"usage":` inside a
    string would have its quote escaped, so the last unescaped one is the answer's own.
    """
    at = len(body)
    while (at := body.rfind(_KEY, 0, at)) >= 0:
        backslashes = 0
        while at - backslashes > 0 and body[at - backslashes - 1] == 0x5C:
            backslashes += 1
        if backslashes % 2 == 0:
            break
    if at < 0:
        return None
    try:
        text = body[at + len(_KEY) :].decode()
        obj, _ = _DECODER.raw_decode(text, len(text) - len(text.lstrip()))
    except ValueError:  # UnicodeDecodeError is one
        return None
    return from_object(obj)


_USAGE_MEMBER = b'"stream_options":{"include_usage":true},'
_BLANK = re.compile(rb"\s*")


def usage_inserted(body: bytes, stream_options: bool) -> tuple[bytes, int] | None:
    """(the body with the usage member inserted as its first, how far every byte after the opening
    brace moved), when it names no `stream_options` (`bodyscan.Marks`) and is an object; else None."""
    if stream_options:
        return None
    start = _BLANK.match(body).end()  # type: ignore[union-attr]  # \s* always matches
    if body[start : start + 1] != b"{":  # a stream's body has members
        return None
    return body[: start + 1] + _USAGE_MEMBER + body[start + 1 :], len(_USAGE_MEMBER)


def usage_requested(body: bytes, payload: Any = None, stream_options: bool | None = None) -> tuple[bytes | None, bool]:
    """For a call known to ask a chat stream: (its body asking the backend for the final usage
    chunk, or None when it already does or cannot be rewritten; whether the client asked for it).

    The balancer always wants the usage; what the client sees is `UsageChunkFilter`'s business.
    Most bodies have no `stream_options`: the member is inserted as bytes, no JSON parsed."""
    named = b'"stream_options"' in body if stream_options is None else stream_options  # None: not known yet
    inserted = usage_inserted(body, named)
    if inserted is not None:
        return inserted[0], False
    if len(body) > MAX_REWRITE_BYTES and not isinstance(payload, dict):  # not parsed on the event loop
        return None, False
    try:
        payload = json.loads(body) if not isinstance(payload, dict) else payload
    except ValueError:
        return None, False
    if not isinstance(payload, dict) or payload.get("stream") is not True:
        return None, False
    options = payload.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        return None, False
    if options.get("include_usage") is True:
        return None, True
    payload = {**payload, "stream_options": {**options, "include_usage": True}}
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode(), False

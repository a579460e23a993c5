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

import json
from dataclasses import dataclass
from typing import Any, TypeGuard

MAX_JSON_BYTES = 32 * 1024 * 1024  # a JSON answer larger than this is relayed but not metered
MAX_EVENT_BYTES = 8 * 1024 * 1024  # ... nor is a stream event larger than this
MAX_REWRITE_BYTES = 1024 * 1024  # LB_STREAM_USAGE=include rewrites bodies up to this size
_MARK, _MARK_SPACED = b'"usage":{', b'"usage": {'  # compact JSON (Azure OpenAI, OpenAI) and Python's default
_KEY = b'"usage":'
_EDGE = len(_MARK_SPACED) - 1
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
    """Watches one answer's body go by (`feed` each read, in order) and says its usage at the end."""

    def __init__(self, event_stream: bool) -> None:
        self.event_stream = event_stream
        self._chunks: list[bytes] = []  # JSON: the body so far; stream: the unfinished event(s)
        self._size = 0
        self._hot = False  # stream: the unfinished part contains a usage marker
        self._usage: Usage | None = None
        self._overflow = False
        self._edge = b""  # stream: its last few bytes so far

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
            return self._usage
        if self._overflow or not self._chunks:
            return None
        return _from_body(b"".join(self._chunks))

    def _feed_event(self, chunk: bytes) -> None:
        if not self._hot:
            self._hot = _MARK in chunk or _MARK_SPACED in chunk or (bool(self._edge) and self._straddles(chunk))
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
        self._hot = bool(rest) and (_MARK in rest or _MARK_SPACED in rest)

    def _straddles(self, chunk: bytes) -> bool:
        """Whether a marker begins in the previous read and ends in this one."""
        seam = self._edge + chunk[:_EDGE]
        return _MARK in seam or _MARK_SPACED in seam

    def _scan(self, events: bytes) -> None:
        """Decode the complete events that contain a usage marker; the last usage seen wins."""
        for event in events.replace(b"\r\n", b"\n").split(b"\n\n"):
            if _MARK not in event and _MARK_SPACED not in event:
                continue
            data = b"\n".join(line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
            try:
                obj = json.loads(data)
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue
            found = obj.get("usage")
            if found is None and isinstance(obj.get("response"), dict):  # Responses API's final events
                found = obj["response"].get("usage")
            usage = from_object(found)
            if usage is not None:
                self._usage = usage


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


def with_usage_requested(body: bytes) -> bytes | None:
    """A streamed chat call's body asking for the final usage chunk (`LB_STREAM_USAGE=include`),
    or None to send the body as it is: not a chat stream, too large to rewrite on the event loop,
    or the client said itself whether it wants usage (`include_usage` present, true or false)."""
    if len(body) > MAX_REWRITE_BYTES:
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict) or payload.get("stream") is not True or "messages" not in payload:
        return None
    options = payload.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict) or "include_usage" in options:
        return None
    payload["stream_options"] = {**options, "include_usage": True}
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()

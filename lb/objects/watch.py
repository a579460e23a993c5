"""The id of an object a backend just created, read from its answer as it is relayed.

A JSON answer of a creating call is small (a response, a file, a batch): it is held until it is
whole (or `MAX_HEAD_BYTES`), its top-level `id` recorded, then released, so the client cannot use
the id before every instance can route it. An event stream is never held: only its first event
(`response.created`, which carries the response's id) is, until it is complete; every later byte
passes as it comes. A body that cannot be read (not JSON, compressed with something other than
gzip/deflate, too big) is relayed as is and simply not recorded.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

from lb.relay import UpstreamResponse

MAX_HEAD_BYTES = 256 * 1024
_FIRST_ID = re.compile(rb'"id"\s*:\s*"([^"\\]{1,256})"')

OnId = Callable[[str], Awaitable[None]]
Chunks = AsyncIterable[Any]  # an UpstreamResponse's body: bytes, though Starlette types it wider
CREATED = ("id",)  # a creation's answer: the new object's own id


def watch(response: UpstreamResponse, on_id: OnId, fields: tuple[str, ...] = CREATED) -> UpstreamResponse:
    """Make `response` call `on_id(id)` for each id in its top-level `fields` (a field holding an
    object stands for that object's `id`), before the client receives it. Only a creation's own id
    is read from the head of an answer too big to hold, or from a stream's first event."""
    encoding = response.upstream.headers.get("content-encoding", "identity").lower()
    if response.event_stream:
        if fields[:1] == CREATED:
            response.body_iterator = _first_event(response.body_iterator, on_id)
    else:
        response.body_iterator = _whole_json(response.body_iterator, on_id, encoding, fields)
    return response


async def _whole_json(
    chunks: Chunks, on_id: OnId, encoding: str, fields: tuple[str, ...] = CREATED
) -> AsyncIterator[bytes]:
    held: list[bytes] = []
    size = 0
    async for chunk in chunks:
        if size > MAX_HEAD_BYTES:  # too big to hold: passed on as it comes
            yield chunk
            continue
        held.append(chunk)
        size += len(chunk)
        if size > MAX_HEAD_BYTES:  # the id is usually the first key: look for it there, then let go
            head = _decoded(b"".join(held), encoding) if fields[:1] == CREATED else None
            match = _FIRST_ID.search(head[:4096]) if head else None
            if match:
                await on_id(match.group(1).decode())
            for part in held:
                yield part
            held = []
    if held:
        for object_id in _top_level_ids(_decoded(b"".join(held), encoding), fields):
            await on_id(object_id)
        for part in held:
            yield part


async def _first_event(chunks: Chunks, on_id: OnId) -> AsyncIterator[bytes]:
    head = b""
    seen = False
    async for chunk in chunks:
        if seen:
            yield chunk
            continue
        head += chunk
        end = head.find(b"\n\n")
        if end < 0 and len(head) < MAX_HEAD_BYTES:
            continue  # the first event is not complete yet
        object_id = _event_id(head[:end]) if end >= 0 else None
        if object_id:
            await on_id(object_id)
        yield head
        seen = True
    if head and not seen:
        yield head


def _event_id(event: bytes) -> str | None:
    """`response.created`'s `response.id` (or a top-level `id`) from one SSE event's data lines."""
    data = b"\n".join(line[5:].lstrip() for line in event.replace(b"\r\n", b"\n").split(b"\n") if line[:5] == b"data:")
    payload = _loads(data)
    if not isinstance(payload, dict):
        return None
    inner = payload.get("response")
    if isinstance(inner, dict) and isinstance(inner.get("id"), str):
        return inner["id"]
    return payload["id"] if isinstance(payload.get("id"), str) else None


def _top_level_ids(body: bytes | None, fields: tuple[str, ...] = CREATED) -> list[str]:
    payload = _loads(body) if body else None
    if not isinstance(payload, dict):
        return []
    found = []
    for key in fields:
        value = payload.get(key)
        if isinstance(value, dict):
            value = value.get("id")
        if isinstance(value, str) and value:
            found.append(value)
    return found


def _decoded(body: bytes, encoding: str) -> bytes | None:
    if encoding in ("identity", ""):
        return body
    if encoding in ("gzip", "deflate"):
        try:
            return zlib.decompressobj(47).decompress(body, 4 * MAX_HEAD_BYTES)  # 47: gzip or zlib header
        except zlib.error:
            return None
    return None


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None

"""Which stored objects a call names, and whether it may create one.

Azure OpenAI's object routes live under `/openai/v1/{collection}/...` (and the older
`/openai/{collection}/...?api-version=`); the collection is the first path segment after the
prefix, so a call to `/openai/deployments/...`, `chat/completions` or `embeddings` is dismissed by
one set lookup. The body's ids are found by a byte search, and the body is decoded as JSON only
when that search could be misled: a `\\u00XX` escape that spells a printable ASCII character (a
field name or an id may hide behind it: `"previous_response\\u005fid"`), or an id field whose value
the search cannot read (an object with its `id` not first, a long array). The backend decodes the
body whole, so what it reads as an id, we must too: otherwise the call is balanced like a new one
and reaches the holder of another client's object one time in N.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from lb.requestinfo import NOT_PARSED, parse_json

# Id prefixes Azure OpenAI hands out, and the kind of object each names.
PREFIXES = {
    "resp_": "response",
    "conv_": "conversation",
    "file-": "file",
    "batch_": "batch",
    "vs_": "vector_store",
    "asst_": "assistant",
    "thread_": "thread",
    "run_": "run",
    "ftjob-": "fine_tuning_job",
    "rs_": "reasoning",  # a reasoning item whose encrypted_content only its own resource can decrypt
}
# Collections whose objects live in one resource (the first path segment after /openai/[v1/]).
COLLECTIONS = {
    "responses": "response",
    "conversations": "conversation",
    "files": "file",
    "batches": "batch",
    "vector_stores": "vector_store",
    "assistants": "assistant",
    "threads": "thread",
    "fine_tuning": "fine_tuning_job",
}
NOT_IDS = frozenset({"runs", "jobs", "input_items", "cancel", "content", "items", "messages", "steps", "files"})
# Body fields that name an object; `conversation` may also be {"id": ...}.
BODY_FIELDS = {
    "previous_response_id": "response",
    "conversation": "conversation",
    "input_file_id": "file",
    "file_id": "file",
    "file_ids": "file",
    "vector_store_ids": "vector_store",
    "assistant_id": "assistant",
    "thread_id": "thread",
}
_MARKERS = (b"previous_response_id", b'"conversation"', b"file_id", b"vector_store_ids", b"assistant_id", b"thread_id")
_STORE_FALSE = re.compile(rb'"store"\s*:\s*false')
_FIELDS = b"|".join(k.encode() for k in BODY_FIELDS)
_VALUE = rb'"([^"\\\x00-\x1f]{1,256})"'
# "field": "id" | "conversation": {"id": "conv_..."} | "field": ["id", ...]
_ID_FIELD = re.compile(
    rb'"('
    + _FIELDS
    + rb')"\s*:\s*(?:'
    + _VALUE
    + rb'|\{\s*"id"\s*:\s*'
    + _VALUE
    + rb'|\[((?:\s*"[^"\\\x00-\x1f]{1,256}"\s*,?){1,64})\s*\])'
)
_STRING = re.compile(_VALUE)
_ENCRYPTED = b"encrypted_content"
_INCLUDE_ENCRYPTED = b"reasoning.encrypted_content"
REASONING_ID = re.compile(rb'"id"\s*:\s*"(rs_[^"\\\x00-\x1f]{1,256})"')
# An escape for a printable ASCII character (JSON never needs one; a few encoders escape <>&' anyway):
# a field name or an id could be spelled with it.
_ASCII_ESCAPE = re.compile(rb"\\u00[2-7][0-9a-fA-F]")
_KEY = re.compile(rb'"(?:' + _FIELDS + rb')"\s*:(?!\s*null\b)')


@dataclass(frozen=True)
class ObjectId:
    value: str
    kind: str
    field: str | None  # the body field that named it; None for the path


@dataclass(frozen=True)
class ObjectCall:
    """A call to an object route: the ids it names (path first) and whether a 2xx may create one."""

    collection: str
    ids: tuple[ObjectId, ...]
    creates: bool
    deletes: bool
    reasoning: bool = False  # asks for encrypted reasoning items: their ids are read from the answer

    @property
    def path_id(self) -> ObjectId | None:
        return self.ids[0] if self.ids and self.ids[0].field is None else None


def kind_of(object_id: str, default: str = "object") -> str:
    for prefix, kind in PREFIXES.items():
        if object_id.startswith(prefix):
            return kind
    return default


def classify(
    method: str, raw_path: str, body: bytes, content_type: str | None, payload: object = NOT_PARSED
) -> ObjectCall | None:
    """The object call this is, or None for a call that can neither name nor create an object.

    `payload`: the body already parsed, if it was; a body the byte search can't read is parsed here
    otherwise (the caller parses one larger than `requestinfo.PARSE_LIMIT_BYTES` off the loop first:
    see `needs_decode`). A body that is not JSON Python can build is a 400."""
    collection = _collection(raw_path)
    if collection is None:
        return None
    segments = raw_path.split("?", 1)[0].split("/")[2:]
    if segments[0].lower() == "v1":
        segments = segments[1:]
    ids = _path_ids(collection, [unquote(s) for s in segments[1:]])
    reasoning = False
    if body and method == "POST" and "json" in (content_type or "application/json"):
        if needs_decode(body):
            decoded = parse_json(body) if payload is NOT_PARSED else payload
            ids += _decoded_ids(decoded)
            if collection == "responses":
                ids += _decoded_reasoning_ids(decoded)
                include = decoded.get("include") if isinstance(decoded, dict) else None
                reasoning = isinstance(include, list) and "reasoning.encrypted_content" in include
        else:
            ids += _body_ids(body)
            if collection == "responses" and _ENCRYPTED in body:
                ids += _reasoning_ids(body)
                reasoning = _INCLUDE_ENCRYPTED in body
    creates = (
        method == "POST" and segments[-1].lower() != "cancel" and not (collection == "responses" and _no_store(body))
    )
    return ObjectCall(collection, tuple(ids), creates, deletes=method == "DELETE", reasoning=reasoning)


def is_object_route(raw_path: str) -> bool:
    return _collection(raw_path) is not None


def _collection(raw_path: str) -> str | None:
    """The collection (lower case: Azure matches routes whatever their case, so must we), if any."""
    segments = raw_path.split("?", 1)[0].split("/")[2:]  # after "", "openai"
    if segments and segments[0].lower() == "v1":
        segments = segments[1:]
    collection = segments[0].lower() if segments else None
    return collection if collection in COLLECTIONS else None


def needs_decode(body: bytes) -> bool:
    """Whether the byte search could miss an id the backend reads in this body: a printable ASCII
    character escaped (in a field name or an id), or an id field (not null) whose value it can't read."""
    at = body.find(b"\\u00")  # bytes.find first: a regex search of 25 MiB costs more
    if at != -1 and _ASCII_ESCAPE.search(body, at) is not None:
        return True
    if not any(marker in body for marker in _MARKERS):
        return False
    return sum(1 for _ in _KEY.finditer(body)) != sum(1 for _ in _ID_FIELD.finditer(body))


def _path_ids(collection: str, rest: list[str]) -> list[ObjectId]:
    """`responses/{id}/...`, `threads/{id}/runs/{id}`, `fine_tuning/jobs/{id}`: the segments naming objects."""
    found: list[ObjectId] = []
    default = COLLECTIONS[collection]
    for i, segment in enumerate(rest):
        kind = kind_of(segment, "")
        if not kind and i == 0 and segment.lower() not in NOT_IDS:
            kind = default  # an id of a shape we don't know is still the collection's object
        elif not kind and i == 1 and collection == "fine_tuning" and rest[0].lower() == "jobs":
            kind = default
        if kind:
            found.append(ObjectId(segment, kind, None))
    return found


def _body_ids(body: bytes) -> list[ObjectId]:
    """Ids in the body's id fields, at any depth, found by a byte search (C, no objects built): a
    large body is never parsed on the event loop for them. A field name inside a string value has
    its quotes escaped, so text that merely mentions one is not taken for it."""
    if not any(marker in body for marker in _MARKERS):
        return []
    found: list[ObjectId] = []
    for match in _ID_FIELD.finditer(body):
        key = match.group(1).decode()
        if match.group(2) is not None:
            values = [match.group(2)]
        elif match.group(3) is not None:
            values = [match.group(3)]
        else:
            values = _STRING.findall(match.group(4))
        for raw in values:
            value = raw.decode("utf-8", "replace")
            found.append(ObjectId(value, kind_of(value, BODY_FIELDS[key]), key))
    return found


def _decoded_ids(payload: object) -> list[ObjectId]:
    """Ids in the decoded body's id fields, at any depth (as `_body_ids` finds them in its bytes)."""
    found: list[ObjectId] = []
    for node in _objects(payload):
        for key, value in node.items():
            if key not in BODY_FIELDS:
                continue
            if isinstance(value, dict):
                value = value.get("id")
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and item:
                    found.append(ObjectId(item, kind_of(item, BODY_FIELDS[key]), key))
    return found


def _decoded_reasoning_ids(payload: object) -> list[ObjectId]:
    return [
        ObjectId(node["id"], "reasoning", "encrypted_content")
        for node in _objects(payload)
        if "encrypted_content" in node and isinstance(node.get("id"), str) and node["id"].startswith("rs_")
    ]


def _objects(payload: object) -> list[dict[str, Any]]:
    """Every JSON object in the payload, at any depth (without recursion: depth is the client's)."""
    found: list[dict[str, Any]] = []
    stack = [payload]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            found.append(node)
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
    return found


def _reasoning_ids(body: bytes) -> list[ObjectId]:
    """Reasoning items replayed with their `encrypted_content` (store: false conversations): they
    decrypt only in the resource that made them, so they name it like a stored object does."""
    return [ObjectId(m.decode(), "reasoning", "encrypted_content") for m in REASONING_ID.findall(body)]


def _no_store(body: bytes) -> bool:
    """`"store": false` on a Responses call: nothing is kept, so nothing is recorded."""
    return b'"store"' in body and _STORE_FALSE.search(body) is not None

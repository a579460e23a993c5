"""Which routes and body fields name a stored object: one table, as data, and the strict reading of a call.

A stored object lives in the one resource that created it. Every route and body field of Azure
OpenAI's v1 surface that names one is listed here, each with the reference it was read from
(Azure OpenAI v1 REST reference, learn.microsoft.com/azure/ai-foundry/openai/reference-preview-latest,
and the OpenAI API reference it mirrors; read 2026-12-07). The balancer reads a call the way the
backend will, or refuses it:

- ids are accepted only in the shape Azure issues: a known prefix, then 1-128 of `[A-Za-z0-9_-]`
  (`resp_`, `batch_` + 32 hex digits, `file-` + 32 hex digits in the reference's examples);
- an object route's path is plain: a `%` anywhere in it (an encoded `/`, `\\`, `.`) is a 400, since
  the backend's router decodes what we would read as one id into a longer path;
- a JSON body on an object-bearing route must be UTF-8 JSON (a body in UTF-16/32 is a 400, another
  content type a 415), and it is parsed whole, so a field name spelled with escapes is still read;
- a key in letters other than ASCII that fold to a field it reads (a long s, fullwidth letters) is
  a 400: a backend folding keys loosely would read the field, a strict one would not;
- with several clients, a multipart/form-data body on a stateless route is read as a form where the
  route takes one (FORM_ROUTES: image edits and variations, audio transcriptions and translations),
  by `lb.objects.forms`, and is a 415 on any other (they take JSON only); an urlencoded form on a
  FORM_ROUTES route is a 415;
- with several clients, a route under /openai/ that is neither stateless nor in this table, a
  stateless route called with a method it does not list, or a collection's root called with a
  method other than its create (POST) and its list (GET, where the collection `lists`), is refused
  (`RouteNotIsolated`), never forwarded blind;
- the markers that make a body parsed are searched as bare names, lower-cased, never with their
  quotes: a lenient reader (Json.NET, JSON5) takes `{'file_id': ...}` or `{file_id: ...}`, so such
  a body is parsed too, and refused as not JSON;
- a body that is parsed may hold at most MAX_JSON_CONTAINERS `{` and `[` and MAX_JSON_COMMAS `,`
  (counted as bytes, in strings too, before parsing), else it is a 400 (`TooManyJsonValues`): a
  parse holds the GIL, so its size is every other request's wait.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lb.apipath import DEPLOYMENTS, ApiPath, split_path
from lb.errors import BadRequest, ProxyError

# Collections whose objects live in one resource: path (after /openai/ or /openai/v1/) -> spec.
# `words`: segments allowed where an id would be (actions on the collection, not objects).
# `lists`: GET on the collection lists objects (merged across the pool, per client).


@dataclass(frozen=True)
class Collection:
    path: tuple[str, ...]
    kind: str
    prefixes: tuple[str, ...]
    source: str
    lists: bool = False
    words: frozenset[str] = frozenset()
    multipart: bool = False  # its create takes multipart/form-data (an upload), not JSON
    selects: frozenset[str] = frozenset()  # `source` types in its bodies that select stored objects by filter


COLLECTIONS: tuple[Collection, ...] = (
    Collection(
        ("responses",),
        "response",
        ("resp_",),
        "Responses: create, get, delete, cancel, input_items",
        words=frozenset({"input_tokens", "compact"}),
    ),
    Collection(("conversations",), "conversation", ("conv_",), "Conversations: create, get, update, delete, items"),
    Collection(
        ("files",),
        "file",
        ("file-", "assistant-"),
        "Files: upload, list, get, delete, content",
        lists=True,
        multipart=True,
    ),
    Collection(("batches",), "batch", ("batch_",), "Batch: create, list, get, cancel", lists=True),
    Collection(
        ("vector_stores",),
        "vector_store",
        ("vs_",),
        "Vector stores: create, list, get, files, file_batches",
        lists=True,
    ),
    Collection(
        ("fine_tuning", "jobs"),
        "fine_tuning_job",
        ("ftjob-",),
        "Fine-tuning: create, list, get, cancel, events, checkpoints",
        lists=True,
    ),
    Collection(
        ("containers",),
        "container",
        ("cntr_",),
        "Containers: create, list, get, delete, files",
        lists=True,
        multipart=True,
    ),
    Collection(("uploads",), "upload", ("upload_",), "Uploads: create, parts, complete, cancel", multipart=True),
    Collection(
        ("evals",),
        "eval",
        ("eval_",),
        "Evals: create, list, get, update, delete, runs",
        lists=True,
        # runs' data_source.source: {"type": "responses", "metadata"/"model"/"created_after"...} reads the
        # resource's stored responses, {"type": "stored_completions", ...} its stored chat completions
        selects=frozenset({"responses", "stored_completions"}),
    ),
    Collection(("assistants",), "assistant", ("asst_",), "Assistants: create, list, get, modify, delete", lists=True),
    Collection(("threads",), "thread", ("thread_",), "Threads: create, get, messages, runs", words=frozenset({"runs"})),
)
_BY_FIRST: dict[str, list[Collection]] = {}
for _c in COLLECTIONS:
    _BY_FIRST.setdefault(_c.path[0], []).append(_c)

# Body fields that name an object, at any depth (request bodies nest them: Responses' input_file
# and file_search, chat completions' {"type": "file", "file": {"file_id"}}, fine-tuning's files).
# A value may be an id, a list of ids, or {"id": ...} (`conversation`).
BODY_FIELDS: dict[str, str] = {
    "previous_response_id": "response",  # Responses create
    "conversation": "conversation",  # Responses create: "conv_..." or {"id": "conv_..."}
    "file_id": "file",  # Responses input_file / input_image, chat file parts, messages' attachments
    "file_ids": "file",  # vector store file batches, code interpreter containers
    "input_file_id": "file",  # Batch create
    "training_file": "file",  # Fine-tuning create
    "validation_file": "file",  # Fine-tuning create
    "vector_store_ids": "vector_store",  # Responses file_search tool, assistants' tool_resources
    "vector_store_id": "vector_store",
    "assistant_id": "assistant",  # Runs create
    "thread_id": "thread",
    "container": "container",  # Responses code_interpreter tool: "cntr_..." (or {"type": "auto", ...})
    "container_id": "container",
    "audio": "audio",  # chat: an assistant turn's {"audio": {"id": "audio_..."}}, a stored audio answer
}
# Fields whose value may be {"id": ...} (a container also {"type": "auto", ...}, chat's audio also
# the output's {"voice": ..., "format": ...}): an object without "id" names nothing.
_ID_OBJECTS = frozenset({"conversation", "container", "audio"})
# Objects named by {"type": T, "id": ...} rather than by a field name.
TYPED_IDS: dict[str, str] = {
    "file_id": "file",  # evals' data sources: {"type": "file_id", "id": "file-..."}
    "reasoning": "reasoning",  # Responses input: a reasoning item, decrypted only where it was made
    "item_reference": "item",  # Responses input: an item stored with a response
}
# The body field whose {"type": T} value is a data source; with one of its collection's `selects`
# types it names no id but reads whichever stored objects match its filter, any client's.
SOURCE_FIELD = "source"
ID_PREFIXES: dict[str, str] = {
    "rs_": "reasoning",
    "audio_": "audio",  # chat completions' audio answers, kept by the resource that made them
    **{p: c.kind for c in COLLECTIONS for p in c.prefixes},
}
# Stateless routes: name no object in their path and create none (after /openai/v1/ or
# /openai/deployments/{d}/), each with the methods that are model calls (POST) or reads of the
# pool's models and deployments (GET, HEAD). Another method on the same path is another operation:
# GET chat/completions lists the resource's stored completions (every client's), DELETE
# models/{model} deletes a fine-tuned model, PUT / DELETE deployments/{deployment} is the old
# authoring API. With several clients those are refused (`RouteNotIsolated`), never forwarded.
INFERENCE = frozenset({"POST"})
READ = frozenset({"GET", "HEAD"})
STATELESS: dict[str, frozenset[str]] = {
    "chat/completions": INFERENCE,
    "completions": INFERENCE,
    "embeddings": INFERENCE,
    "images/generations": INFERENCE,
    "images/edits": INFERENCE,
    "images/variations": INFERENCE,
    "audio/transcriptions": INFERENCE,
    "audio/translations": INFERENCE,
    "audio/speech": INFERENCE,
    "moderations": INFERENCE,
    "extensions/chat/completions": INFERENCE,
    "models": READ,
    "models/{model}": READ,
    "deployments": READ,
    "deployments/{deployment}": READ,
    "": READ,  # /openai/v1/ itself
}
_NAMED = {"models": "models/{model}", "deployments": "deployments/{deployment}"}
# Stateless routes whose request is a multipart form (an image or an audio file, with its fields):
# with several clients a form sent there is read by `lb.objects.forms` (fields only, never the file),
# like a container file's. Every other stateless route takes JSON only: a body labelled
# multipart/form-data there is refused (415), never sent unread to a backend that may parse it as JSON.
FORM_ROUTES = frozenset({"images/edits", "images/variations", "audio/transcriptions", "audio/translations"})
# The body fields by which the reference lets these stateless routes' JSON bodies name a stored
# object; any other stateless route's body is searched for every field of the table. Chat: a file
# part ({"type": "file", "file": {"file_id": ...}}) and an assistant turn's stored audio answer
# ({"role": "assistant", "audio": {"id": "audio_..."}}), so the chat hot path looks for two names (bare:
# `MARKERS`), an escape and a non-ASCII byte.
# Embeddings take text or tokens and name nothing: never searched (their bodies are the largest).
STATELESS_FIELDS: dict[str, tuple[str, ...]] = {
    "chat/completions": ("file_id", "audio"),
    "extensions/chat/completions": ("file_id", "audio"),
    "embeddings": (),
}
MAX_ID_CHARS = 128
_ID_BODY = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_ID_CHARS}}}")
_ITEM_ID = re.compile(rf"[a-z]{{1,16}}_[A-Za-z0-9_-]{{1,{MAX_ID_CHARS}}}")  # msg_, fc_, ... (any item)
_SEGMENT = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_ID_CHARS}}}")

# Any JSON escape: `\u0050` spells an ASCII letter of a field name, `\u017f` (a long s) a letter that
# folds to one. With a non-ASCII byte (`names_objects`), it makes the body parsed.
ESCAPE = b"\\u"


def _shortest(markers: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """The markers without those holding another (`file_id` finds `input_file_id` too): fewer searches."""
    return tuple(m for m in dict.fromkeys(markers) if not any(o != m and o in m for o in markers))


# An object route's body is parsed for ids only if its lower-cased bytes hold one of these. Every
# marker is a bare name, never with its quotes: a lenient reader (Json.NET, JSON5) takes a key in
# single quotes or none (`{'file_id': ...}`, `{file_id: ...}`), so the search must not depend on the
# quote; a body holding the name anywhere (a prompt mentioning "file_id" too) is parsed, and one
# that is no JSON is a 400.
MARKERS = _shortest((*(k.encode() for k in BODY_FIELDS), *(t.encode() for t in TYPED_IDS), ESCAPE))
# A stateless route's JSON body is parsed, and read for every field of the table, when it holds one
# of MARKERS; a hot route whose reference names objects by a few fields only is looked for those.
_STATELESS_MARKERS: dict[str, tuple[bytes, ...] | None] = {
    key: (*(f.encode() for f in fields), ESCAPE) if fields else None for key, fields in STATELESS_FIELDS.items()
}
# ... and, on a collection with `selects`, one of these (a data source that selects by filter).
_SELECTING_MARKERS = {c.kind: _shortest((*MARKERS, *(t.encode() for t in sorted(c.selects)))) for c in COLLECTIONS}
# A run's data source that takes its items (the `item` namespace) from a file, `{"type": "file_id", "id":
# ...}` as its `source`, sends each item to the model only through `input_messages`: a `template` puts an
# item's values into the text of the messages it spells, an `item_reference` ("item.messages") sends an
# item's messages whole, parts naming files (`input_file` by `file_id`) included, read from a file the
# balancer never reads. The OpenAI reference (developers.openai.com/api/reference/resources/evals/
# subresources/runs/methods/create) and Azure's (learn.microsoft.com/azure/foundry/reference/rest/
# evals-create-eval-run: jsonl, completions, responses and Azure's own `azure_ai_target_completions`,
# whose `input_messages` is an item reference) give these shapes; read 2026-12-08.
ITEMS_FILE = "file_id"
ITEMS_AS_TEXT = "template"
ITEMS_UNSAMPLED = "jsonl"  # a data source whose items are graded as they are: no model is called with them
# Keys the balancer reads: one given twice in one object is refused (parsers differ on which counts).
_READ_KEYS = frozenset({*BODY_FIELDS, "id", "type", SOURCE_FIELD, "input_messages"})
_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")
# What one parse may build (`check_json_size`), counted as bytes before parsing: `{` and `[` (an object
# costs a Python call, `keyed`, and a list garbage collections, ~0.15-0.6 us each on this 2-core machine),
# and `,` (each a value more). `json.loads` is C and holds the GIL but where it calls Python (`keyed`,
# `_int`), so a parse runs off the loop one at a time (`lb.objects.router`), and these caps bound the
# stretch no other request moves: 200,000 lists ~30 ms, 1,000,000 strings ~20 ms. 3,000,000 empty objects
# in 9 MB cost 3.4 s of CPU before. An honest body never comes near: Azure takes at most 2,048 chat
# messages and 128 tools (learn.microsoft.com/azure/ai-services/openai/quotas-limits), ~20,000 brackets
# with rich tool schemas; brackets and commas in its text are bounded by the context (at most 1M tokens):
# real compact API JSON has one bracket in ~27-29 bytes and one `,` in ~40 (botocore's and cfn-lint's
# JSON data), so the caps are ~5.4 MB and ~40 MB of JSON-dense text, 1.5M tokens and more at 3-4 bytes
# a token (tests/test_parse_bounds.py reads 4.4 MB of it in a chat at Azure's limits).
MAX_JSON_CONTAINERS = 200_000
MAX_JSON_COMMAS = 1_000_000
_COUNT_SLICE = 1024 * 1024  # counted a slice at a time: in a thread, the loop may take the GIL between
_STORE_FALSE = re.compile(rb'"store"\s*:\s*false')


class InvalidObjectId(BadRequest):
    code = "invalid_id"


class TooManyJsonValues(BadRequest):
    """A body to parse holding more `{`, `[` or `,` than any honest call needs (`check_json_size`)."""

    code = "too_many_json_values"


class FoldedFieldName(BadRequest):
    """A key in letters that fold to a field the balancer reads (`previou\u017f_response_id`): a backend
    that folds keys loosely reads the field, a strict one does not. Refused, so both agree: nothing is sent."""

    code = "invalid_field_name"


class UnsupportedMediaType(ProxyError):
    status = 415
    code = "UnsupportedMediaType"


class RouteNotIsolated(ProxyError):
    status = 403
    code = "RouteNotIsolated"


@dataclass(frozen=True)
class ObjectId:
    value: str
    kind: str
    field: str | None  # the body field that named it; None for the path


@dataclass(frozen=True)
class ObjectCall:
    """A call to an object route (or a stateless one whose body names objects)."""

    collection: Collection | None  # None: a stateless route (chat with a file input)
    ids: tuple[ObjectId, ...]
    creates: bool  # a 2xx answer's id is a new object, owned by the caller
    deletes: bool
    lists: bool = False  # a GET on the collection: merged across the pool, per client
    responses: bool = False  # a Responses create: reasoning item ids in its answer are recorded
    made_fields: tuple[str, ...] = ()  # fields of the answer naming objects the holder made for the owner
    itself: bool = False  # the path is exactly {collection}/{id}: a DELETE or 404 there is the object's own

    @property
    def path_id(self) -> ObjectId | None:
        return self.ids[0] if self.ids and self.ids[0].field is None else None


def classify(
    method: str,
    path: ApiPath | str,
    body: bytes,
    content_type: str | None,
    isolating: bool = False,
    named: bool | None = None,
) -> ObjectCall | None:
    """The object call this is, or None for a call that can neither name nor create an object.
    Raises a 4xx for a call the balancer can't read the way the backend will; with `isolating`
    (several clients), also for a route that is neither stateless nor in the table. `named`:
    whether the body's bytes may name an object (`names_objects`), when the caller scanned them
    already (a large body, in slices); None: scanned here. `path`: the request's (`RequestInfo.path`),
    or a raw path (a batch file's line) split here."""
    path = split_path(path) if isinstance(path, str) else path
    collection, rest, name = route(path)
    if collection is None:
        free = stateless(path)
        if free is None or method not in STATELESS[free[1]]:
            if not isolating:
                return None
            if free is None:
                raise RouteNotIsolated(
                    f"'{method} {name}' can name stored objects this load balancer does not keep apart"
                    " per client, so it is refused while several clients share the pool."
                )
            raise RouteNotIsolated(
                f"'{method} {free[0] or 'v1'}' is neither a model call nor a read of models and deployments: it"
                " can list, change or delete what other clients stored or use, so it is refused while"
                f" several clients share the pool (this route takes {' or '.join(sorted(STATELESS[free[1]]))})."
            )
        if isolating and body and (is_form(content_type) or free[1] in FORM_ROUTES):
            form = _stateless_form(method, *free, content_type)
            if form is not None:
                return form
        markers = _stateless_markers(method, free[1], body, content_type)
        if markers is None or not (names_objects(body, markers) if named is None else named):
            return None
        ids = body_ids(parse_body(body, content_type))
        return ObjectCall(None, tuple(ids), creates=False, deletes=False) if ids else None
    if path.encoded:
        raise InvalidObjectId("An object's path must not be percent-encoded.")
    ids, creates = path_ids(method, collection, rest)
    if not rest or rest[0] in collection.words:  # the collection itself, or an action on it: no object
        if method == "GET" and not rest and collection.lists:
            return ObjectCall(collection, (), creates=False, deletes=False, lists=True)
        if isolating and (method != "POST" or len(rest) > 1):
            raise _not_an_operation(method, collection, rest)
    markers = _markers(method, collection, body, content_type)
    if markers is not None:
        check_encoding(body, content_type)
        if names_objects(body, markers) if named is None else named:
            payload = parse_body(body, content_type)
            if isolating and collection.selects:
                _refuse_unread_sources(method, collection, payload)
            ids += body_ids(payload)
    responses = collection.kind == "response" and creates
    if responses and b'"store"' in body and _STORE_FALSE.search(body) is not None:
        creates = False  # nothing is kept, so nothing is recorded
    made: tuple[str, ...] = ()
    if method == "GET" and collection.kind == "batch" and len(rest) == 1:
        made = ("output_file_id", "error_file_id")  # a finished batch's files are its owner's
    elif method == "POST" and collection.kind == "upload" and rest[1:] == ["complete"]:
        made = ("file",)  # a completed upload is a new file
    elif method == "POST" and collection.kind == "thread" and rest == ["runs"]:
        made = ("thread_id",)  # create-and-run makes a thread
    itself = len(rest) == 1 and bool(ids) and ids[0].field is None
    return ObjectCall(
        collection,
        tuple(ids),
        creates,
        deletes=method == "DELETE",
        responses=responses,
        made_fields=made,
        itself=itself,
    )


def _not_an_operation(method: str, collection: Collection, rest: list[str]) -> RouteNotIsolated:
    """A collection's root (or an action on it) called with a method the table gives it no rule for:
    with no object in the path the router would send it to one backend as it is, and a `HEAD /files`,
    a `GET /responses` or a `DELETE /files` there is that backend's answer about every client's objects.
    A HEAD on a listable collection is refused too, not answered from the merged list: Azure's reference
    lists no HEAD there, and a header-only answer is not worth a fan-out to every backend."""
    shape = "/".join((*collection.path, *rest[:1], *(["..."] if len(rest) > 1 else [])))  # rest[0]: a word
    takes = "POST (a create) or GET (the caller's own list)" if collection.lists and not rest else "POST"
    return RouteNotIsolated(
        f"'{method} {shape}' names no {collection.kind.replace('_', ' ')} and is not an operation this load"
        f" balancer keeps apart per client (it takes {takes} there): it could read or change every client's"
        f" {collection.path[-1].replace('_', ' ')}, so it is refused while several clients share the pool."
    )


def body_markers(method: str, path: ApiPath, body: bytes, content_type: str | None) -> tuple[bytes, ...] | None:
    """What to look for in the body's (lower-cased) bytes before parsing it for ids; None when the
    body is never read: no body, an upload's multipart, a route whose body names no object."""
    collection = route(path)[0]
    if collection is not None:
        return _markers(method, collection, body, content_type)
    free = stateless(path)
    return _stateless_markers(method, free[1], body, content_type) if free is not None else None


def _stateless_markers(method: str, key: str, body: bytes, content_type: str | None) -> tuple[bytes, ...] | None:
    """`body_markers` of a stateless route (its key in STATELESS): only a JSON body of its own method
    is searched. A multipart body is not JSON: with several clients `classify` reads it as a form or
    refuses it (`_stateless_form`); with one it is sent as it is."""
    if not body or method not in STATELESS[key]:
        return None
    if is_form(content_type):
        return None
    return _STATELESS_MARKERS.get(key, MARKERS)


def _stateless_form(method: str, shape: str, key: str, content_type: str | None) -> ObjectCall | None:
    """A form body on a stateless route, with several clients; None for a body that is no form. A
    multipart/form-data body: on a route that takes a form (FORM_ROUTES), an object call naming
    nothing yet, whose form `lb.objects.forms` reads for ids (the router sends it as a plain model
    call when it names none); on any other, a 415. An urlencoded form there is a 415 too: Azure takes
    these routes' forms as multipart, and its field names may be percent-encoded past every marker."""
    if is_form(content_type):
        if key not in FORM_ROUTES:
            raise UnsupportedMediaType(
                f"'{method} {shape or 'v1'}' takes a JSON body (Content-Type: application/json), not"
                " multipart/form-data."
            )
        return ObjectCall(None, (), creates=False, deletes=False)
    if (content_type or "").lower().lstrip().startswith("application/x-www-form-urlencoded"):
        raise UnsupportedMediaType(
            f"'{method} {shape}' takes multipart/form-data (or a JSON body), not application/x-www-form-urlencoded."
        )
    return None


def _markers(method: str, collection: Collection, body: bytes, content_type: str | None) -> tuple[bytes, ...] | None:
    """`body_markers` for a path whose collection is already known (`route` is not run twice)."""
    if not body or method not in ("POST", "PUT", "PATCH"):
        return None
    if collection.multipart and is_form(content_type):
        return None
    return _SELECTING_MARKERS[collection.kind] if collection.selects else MARKERS


def is_form(content_type: str | None) -> bool:
    """A multipart/form-data body: never JSON; its fields are read by `lb.objects.forms`."""
    return (content_type or "").lower().lstrip().startswith("multipart/form-data")


def names_objects(body: bytes, markers: tuple[bytes, ...]) -> bool:
    """Whether the body may name an object: a field name of the table in any case (a backend may
    match keys case-insensitively), an escape that could spell one, a non-ASCII byte (a letter
    that folds to an ASCII one, `keyed`), or bytes that are no UTF-8."""
    if not body.isascii() or b"\x00" in body:
        return True  # UTF-16/32 and BOMs hide every name from a byte search: parsed, and refused
    lowered = body.lower()
    return any(marker in lowered for marker in markers)


def check_encoding(body: bytes, content_type: str | None) -> None:
    """A body on an object route is UTF-8 JSON, or refused: the backend must read what we read."""
    if "json" not in (content_type or "application/json").lower():
        raise UnsupportedMediaType("A call naming stored objects must send its body as application/json.")
    if body.startswith(_BOMS) or b"\x00" in body:
        raise BadRequest("The request body must be UTF-8 JSON (no byte order mark, no UTF-16 or UTF-32).")


def parse_body(body: bytes, content_type: str | None) -> Any:
    """The body as the backend will read it, for its ids: UTF-8 JSON only, keys lower-cased, and an
    id field given twice in one object refused (parsers differ on which one counts). Numbers are read
    by Python functions (`_int`, `_float`), as objects are by `keyed`: each call is a point where a thread
    parsing lets the event loop take the GIL, which a C-only stretch of a million numbers would not."""
    check_encoding(body, content_type)
    check_json_size(body)
    try:
        with _collector_paused():
            return json.loads(body.decode("utf-8"), object_pairs_hook=keyed, parse_int=_int, parse_float=_float)
    except UnicodeDecodeError:
        raise BadRequest("The request body must be UTF-8 JSON.") from None
    except (ValueError, RecursionError):
        raise BadRequest("The request body is not valid JSON.") from None


def check_json_size(raw: bytes, where: str = "The request body") -> None:
    """A 400 for JSON holding more `{` and `[` than MAX_JSON_CONTAINERS or more `,` than MAX_JSON_COMMAS,
    before it is parsed (bytes in strings count too: a bound, not a reading). Free for a body shorter
    than the smaller cap, which can't hold more."""
    if len(raw) <= MAX_JSON_CONTAINERS:
        return
    containers = commas = 0
    for start in range(0, len(raw), _COUNT_SLICE):
        end = start + _COUNT_SLICE
        containers += raw.count(b"{", start, end) + raw.count(b"[", start, end)
        commas += raw.count(b",", start, end)
    if containers > MAX_JSON_CONTAINERS or commas > MAX_JSON_COMMAS:
        raise TooManyJsonValues(
            f"{where} holds more than {MAX_JSON_CONTAINERS:,} '{{' and '[' or {MAX_JSON_COMMAS:,} ',' (counted in its"
            " strings too), more than any call needs, and the load balancer reads every body naming stored objects"
            " whole: send less at a time."
        )


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a body is parsed: every list it builds is reachable until
    the parse ends, so collections then find nothing, yet they were 80% of a parse of 200,000 lists
    (130-190 ms -> 26-33 ms in the balancer's process), time in C no other request moves in. Global to
    the process: another thread's garbage waits for the next collection, tens of ms at most. Left
    alone if something else turned it off."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _int(text: str) -> int:
    """A JSON integer as json.loads reads it, but in Python: see `parse_body`."""
    return int(text)


def _float(text: str) -> float:
    return float(text)


def keyed(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as the balancer reads it (`object_pairs_hook`): keys lower-cased, a key that
    folds to a field it reads refused, an id field given twice refused."""
    node: dict[str, Any] = {}
    for key, value in pairs:
        lowered = key.lower()
        if not key.isascii():
            field = lowered if lowered in _READ_KEYS else _fold(key)
            if field in _READ_KEYS:
                raise FoldedFieldName(f"The body spells the field '{field}' with letters other than ASCII.")
        if lowered in node and lowered in _READ_KEYS:
            raise InvalidObjectId(f"The body gives '{shown(key)}' twice in one object.")
        node[lowered] = value
    return node


def _fold(text: str) -> str:
    """`text` as a backend folding it loosely may read it: lower-cased (ASCII), or NFKC and casefold,
    which map the long s (U+017F) to `s`, the Kelvin sign to `k`, fullwidth and ligatures to ASCII."""
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def is_id(value: str, kind: str | None = None) -> bool:
    """Whether `value` has the shape of an id Azure issues (of `kind`, if given)."""
    for prefix, prefix_kind in ID_PREFIXES.items():
        if value.startswith(prefix) and (kind is None or prefix_kind == kind):
            return _ID_BODY.fullmatch(value, len(prefix)) is not None
    return False


def kind_of(object_id: str, default: str = "object") -> str:
    for prefix, kind in ID_PREFIXES.items():
        if object_id.startswith(prefix):
            return kind
    return default


def route(path: ApiPath) -> tuple[Collection | None, list[str], str]:
    """(collection, the segments after it as sent, the route's name) for an /openai/ path; collection
    None for any other route (every route under /openai/deployments/{deployment}/: none keeps objects).
    The name is the path's shape with ids replaced, for error messages."""
    if path.prefix == DEPLOYMENTS:
        return None, list(path.segments), f"deployments/{{deployment}}/{path.operation}"
    words = path.operation.split("/")  # decoded and lower-cased: Azure matches routes whatever their case
    for collection in _BY_FIRST.get(words[0], ()):
        n = len(collection.path)
        if tuple(words[:n]) == collection.path:
            return collection, list(path.segments[n:]), "/".join(collection.path)
    if words[0] == "fine_tuning":  # checkpoints' permissions etc.: not in the table
        return None, list(path.segments[1:]), "fine_tuning/" + "/".join(words[1:2])
    return None, list(path.segments), path.operation


def stateless(path: ApiPath) -> tuple[str, str] | None:
    """(the route's shape, its key in STATELESS) for a route that names no object in its path: a
    model call under /openai/deployments/{d}/ or /openai/v1/, or a read of models and deployments;
    None for any other route."""
    rest = path.operation
    if path.prefix == DEPLOYMENTS:
        key = rest or "deployments/{deployment}"
        return (f"deployments/{{deployment}}/{rest}" if rest else key, key) if key in STATELESS else None
    first, _, name = rest.partition("/")
    if name and "/" not in name and first in _NAMED:  # a model's or deployment's name
        rest = _NAMED[first]
    return (rest, rest) if rest in STATELESS else None


def path_ids(method: str, collection: Collection, rest: list[str]) -> tuple[list[ObjectId], bool]:
    """The object the path names (its first segment after the collection) and whether the call
    creates one (a POST to the collection itself, or to one of its words such as `threads/runs`).
    Every later segment is a sub-resource word or a child's id: checked for shape, never looked up."""
    for segment in rest:
        if not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
            raise InvalidObjectId(f"The path segment '{shown(segment)}' is not an id or a route Azure OpenAI serves.")
    if not rest or rest[0] in collection.words:
        return [], method == "POST"
    first = rest[0]
    if not is_id(first, collection.kind):
        raise InvalidObjectId(
            f"'{shown(first)}' is not a {collection.kind.replace('_', ' ')} id (expected "
            f"{' or '.join(repr(p + '...') for p in collection.prefixes)})."
        )
    return [ObjectId(first, collection.kind, None)], False


def body_ids(payload: Any) -> list[ObjectId]:
    """Every object the parsed body (keys lower-cased: `parse_body`) names, at any depth. A value
    in an id field that is not an id is a 400: the backend would read it as one, and we can't route
    what we can't read."""
    found: list[ObjectId] = []
    for node in _objects(payload):
        kind = TYPED_IDS.get(_fold(node["type"])) if isinstance(node.get("type"), str) else None
        if kind is not None and "id" in node:
            found.extend(_ids(node["id"], kind, f"{node['type']}.id"))
        for key, value in node.items():
            field_kind = BODY_FIELDS.get(key)
            if field_kind is None or value is None:
                continue
            if isinstance(value, dict) and key in _ID_OBJECTS:
                value = value.get("id")
                if value is None:
                    continue
            found.extend(_ids(value, field_kind, key))
    return found


def _refuse_unread_sources(method: str, collection: Collection, payload: Any) -> None:
    """With several clients, a data source whose objects the balancer can't check is refused: one that
    selects stored objects by filter (it names no id, and the backend reads every client's objects that
    match), and one that sends items of a file to the model whole (`ITEMS_FILE` without a `template`:
    an item's message may name another client's file, in a file the balancer never reads)."""
    shape = "/".join(collection.path)
    for node in _objects(payload):
        source = node.get(SOURCE_FIELD)
        kind = source.get("type") if isinstance(source, dict) else None
        if not isinstance(kind, str):
            continue
        if _fold(kind) in collection.selects:
            raise RouteNotIsolated(
                f"'{method} {shape}' with a data source of type '{shown(kind)}' reads stored objects by filter,"
                " whichever client stored them, so it is refused while several clients share the pool; send"
                " the items in the run (file_content) or in a file (file_id) instead."
            )
        if _fold(kind) == ITEMS_FILE and _sends_items_whole(node):
            raise RouteNotIsolated(
                f"'{method} {shape}' with items from a file (source of type 'file_id') and no input_messages"
                " template sends the file's items to the model as they are, and an item's messages can name"
                " stored files the load balancer does not read there, so it is refused while several clients"
                " share the pool; give input_messages as a template, or send the items in the run (file_content)."
            )


def _sends_items_whole(source: dict[str, Any]) -> bool:
    """Whether a data source (a node with `source`) may send its items' own messages to a model: all but
    an `input_messages` template (items' values go into its text) and a `jsonl` one without input_messages
    (items graded as they are, no model called)."""
    messages = source.get("input_messages")
    if isinstance(messages, dict) and isinstance(messages.get("type"), str):
        return _fold(messages["type"]) != ITEMS_AS_TEXT
    kind = source.get("type")
    return not (messages is None and isinstance(kind, str) and _fold(kind) == ITEMS_UNSAMPLED)


def _ids(value: Any, kind: str, field: str) -> list[ObjectId]:
    items = value if isinstance(value, list) else [value]
    found = []
    for item in items:
        shaped = isinstance(item, str) and (is_id(item) if kind != "item" else _ITEM_ID.fullmatch(item) is not None)
        if not shaped:
            raise InvalidObjectId(f"'{field}' holds '{shown(item)}', which is not an id Azure OpenAI issues.")
        found.append(ObjectId(item, kind_of(item, kind), field))
    return found


# JSON Schemas a body carries (a function tool's `parameters`, a structured output's `schema`, an
# eval's `item_schema`): the backend validates against them and never looks an object up from them,
# so a property named `file_id` there is a name, not an id (and is not refused as a malformed one).
_SCHEMA_KEYS = frozenset({"parameters", "schema", "item_schema"})


def _objects(payload: Any) -> list[dict[str, Any]]:
    """Every JSON object in the payload, at any depth (without recursion: depth is the client's),
    JSON Schemas excepted."""
    found: list[dict[str, Any]] = []
    stack = [payload]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            found.append(node)
            stack.extend(
                v for k, v in node.items() if isinstance(v, list) or (isinstance(v, dict) and k not in _SCHEMA_KEYS)
            )
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, dict | list))
    return found


def shown(value: object) -> str:
    """A client's value, short and printable, for an error message."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(c if c.isprintable() and c.isascii() else "?" for c in text)
    return text[:40] + ("..." if len(text) > 40 else "")

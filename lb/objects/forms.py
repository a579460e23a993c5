"""Object ids in what the JSON reading of `lb.objects.routes` does not see: upload forms and batch input files.

With several clients, a call to an object route is sent only when every object it names is the
caller's (`lb.objects.router`). Two kinds of body name objects outside a JSON body:

- **multipart/form-data** (files, containers' files, uploads' parts, and the stateless routes that
  take a form: `images/edits` and `variations`, `audio/transcriptions` and `translations`): a form
  field can name an object as a JSON field can (`POST /containers/{id}/files` with `file_id=...`,
  `POST /images/edits` with `images[0][file_id]=...`). The form's part headers and its fields are
  read; a file's contents are not. Each field name is read as a path (`tools[0][file_ids][]`,
  `a.b` -> `tools` / `0` / `file_ids`), lower-cased, and the fields are checked by the table's own
  rules (`routes.body_ids`), as the same JSON would be. Text before the first boundary (a preamble,
  which form parsers skip) that could name an object is a 400: a backend reading the body as JSON
  whatever its label, or only its first JSON value, would find ids there that the form does not have.
- **a batch input file** (`POST /files` with `purpose=batch`): each JSONL line is a call the batch
  will make later, on the backend holding the file. Each line's `url` and `body` are read as a
  direct call to that route would be: the route by `routes.classify` (an object in the path, a
  `%`, a route not isolated), then the markers pre-scan (searched in the whole file at once), then
  the body's id fields (`routes.body_ids`); its ids are checked like the upload's own (the 404
  names the line), and a line that can't be read is a 400 naming it. Uploads (`POST /uploads`)
  with `purpose=batch` assemble a file from parts whose lines can't be read one by one, so they
  are refused (403 `RouteNotIsolated`): such files are uploaded through `/files`.

The form is parsed here, strictly, rather than by python-multipart (not a dependency, and a
streaming parser for a body already in memory): the body is split on its boundary with
`bytes.find`, each part's headers (at most `MAX_HEADER_BYTES`) are read, and whatever two parsers
could read differently is a 400 rather than a guess: a boundary inside a part, line endings other
than CRLF, folded or repeated headers, a `name*=` or escaped name, a non-ASCII field name, a
Content-Transfer-Encoding, a field in a charset other than UTF-8.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lb.errors import BadRequest, ProxyError
from lb.objects import routes
from lb.objects.routes import ObjectCall, ObjectId, RouteNotIsolated
from lb.requestinfo import PARSE_LIMIT_BYTES

MAX_HEADER_BYTES = 8 * 1024  # one part's headers: a Content-Disposition and a Content-Type need far less
MAX_PARTS = 1_000  # parts of one form (an upload has a handful)
# Azure OpenAI's batch limits (quotas and limits, "Batch limits"): at most 100,000 requests a file.
MAX_BATCH_LINES = 100_000
MAX_BATCH_IDS = 1_000  # distinct stored objects one batch file may name: each is one record read
_BOUNDARY = re.compile(r"""[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]""")
_BOUNDARY_PARAM = re.compile(r"""\s*boundary\s*=\s*(?:"([^"]*)"|([^\s;"]*))\s*""", re.IGNORECASE)
_PARAM = re.compile(r"""\s*;\s*([^\s=;"]+)\s*=\s*(?:"((?:[^"\\\r\n]|\\.)*)"|([^\s;"]*))\s*""")
_NAME = re.compile(r"[^\[\]]*(?:\[[^\[\]]*\])*")
_SEGMENTS = re.compile(r"[\[\].]")
_READ_ANYWAY = frozenset({*routes.BODY_FIELDS, "id", "type", "purpose"})  # the fields read (files too)
_JSON_START = re.compile(rb"\s*[\[{]")
_TEXT_CHARSETS = ("utf-8", "utf8", "us-ascii", "ascii")
_BOM = b"\xef\xbb\xbf"
_LINE_KEYS = (b'"url"', b'"method"', b'"body"')  # a line's own keys: given twice, json.loads would keep the last
_DECODER = json.JSONDecoder()


class MalformedForm(BadRequest):
    code = "invalid_multipart"


@dataclass(frozen=True)
class LineObjectId(ObjectId):
    """An id named by a line of a batch input file (the 404 names the line)."""

    line: int = 0


@dataclass(frozen=True)
class Part:
    name: str  # as sent (ASCII)
    file: bool  # has a filename: its contents are not read unless its name is a table field
    start: int  # its contents: body[start:end]
    end: int
    charset: str | None


def reads(method: str, objects: ObjectCall, content_type: str | None) -> bool:
    """Whether the call's body has ids only this module reads (called with several clients only)."""
    collection = objects.collection
    if method not in ("POST", "PUT", "PATCH"):
        return False
    if collection is None:  # a stateless route: only a form (`routes.FORM_ROUTES`) is read here
        return routes.is_form(content_type)
    if routes.is_form(content_type):
        return collection.multipart
    return collection.kind == "upload" and objects.creates


async def read(method: str, objects: ObjectCall, body: bytes, content_type: str | None) -> ObjectCall:
    """The call with the ids its form (and a batch file's lines) name added; a large body is read
    off the event loop. Raises a 4xx for what can't be read the way the backend will."""
    if len(body) <= PARSE_LIMIT_BYTES:
        return read_now(method, objects, body, content_type)
    return await asyncio.to_thread(read_now, method, objects, body, content_type)


def read_now(method: str, objects: ObjectCall, body: bytes, content_type: str | None) -> ObjectCall:
    kind = objects.collection.kind if objects.collection is not None else None
    if not routes.is_form(content_type):  # an Upload's create (JSON): only its purpose is read here
        payload = routes.parse_body(body, content_type) if body else None
        if kind == "upload" and isinstance(payload, dict) and _is_batch(payload):
            raise _batch_upload()
        return objects
    check_preamble(body, content_type)
    parts = list(form_parts(body, content_type))
    form = fields(body, parts)
    found: list[ObjectId] = routes.body_ids(form)
    if objects.creates and _is_batch(form):
        if kind == "upload":
            raise _batch_upload()
        if kind == "file":
            found += batch_ids(body, [p for p in parts if p.file or p.name.lower() == "file"])
    if not found:
        return objects
    return dataclasses.replace(objects, ids=objects.ids + tuple(found))


# The form ------------------------------------------------------------------------------------------
def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a multipart/form-data content type: given once, in RFC 2046's characters."""
    params = (content_type or "").split(";")[1:]
    found = [m for m in (_BOUNDARY_PARAM.fullmatch(p) for p in params) if m is not None]
    if len(found) != 1:
        raise MalformedForm("A multipart/form-data body needs one boundary parameter in its Content-Type.")
    value = found[0].group(1) if found[0].group(1) is not None else found[0].group(2)
    if not _BOUNDARY.fullmatch(value):
        raise MalformedForm("The multipart boundary must be 1-70 of RFC 2046's characters.")
    return value.encode("ascii")


def check_preamble(body: bytes, content_type: str | None) -> None:
    """A 400 for text before the first boundary line that could name an object: form parsers skip
    it, but a backend reading the body as JSON (whatever its label, or its first value only) would not."""
    first = body.find(b"--" + boundary_of(content_type))
    if first > 0 and routes.names_objects(body[:first], routes.MARKERS):
        raise MalformedForm("The multipart body's text before its first boundary (a preamble) must not name objects.")


def form_parts(body: bytes, content_type: str | None) -> Iterator[Part]:
    """Each part of the form, its headers read and its contents located (not copied)."""
    dash = b"--" + boundary_of(content_type)
    at = _delimiter(body, dash, 0)
    if at == -1:
        raise MalformedForm("The multipart body has no boundary line.")
    count = 0
    while True:
        after = at + len(dash)
        if body.startswith(b"--", after):  # the close delimiter: what follows must not hold another
            if body.find(dash, after) != -1:
                raise MalformedForm("The multipart body goes on after its closing boundary.")
            return
        if not body.startswith(b"\r\n", after):
            raise MalformedForm("A multipart boundary line must end with CRLF.")
        start = after + 2
        following = _delimiter(body, dash, start)
        if following == -1:
            raise MalformedForm("The multipart body ends without its closing boundary.")
        count += 1
        if count > MAX_PARTS:
            raise MalformedForm(f"A multipart body may have at most {MAX_PARTS} parts.")
        yield _part(body, start, following - 2)  # the CRLF before a boundary belongs to it
        at = following


def _delimiter(body: bytes, dash: bytes, start: int) -> int:
    """The next boundary line at or after `start` (-1 for none); the boundary anywhere else is a 400:
    parsers differ on what a boundary inside a line, or after a bare LF, means."""
    at = body.find(dash, start)
    if at <= 0 or body[at - 2 : at] == b"\r\n":
        return at
    raise MalformedForm("The multipart boundary occurs inside a part (or after a bare LF).")


def _part(body: bytes, start: int, end: int) -> Part:
    if start > end:
        raise MalformedForm("A multipart part is cut short.")
    if body.startswith(b"\r\n", start):
        raise MalformedForm("A multipart part has no Content-Disposition header.")
    stop = body.find(b"\r\n\r\n", start, min(end, start + MAX_HEADER_BYTES + 4))
    if stop == -1:
        raise MalformedForm(f"A multipart part's headers must end with a blank line within {MAX_HEADER_BYTES} bytes.")
    headers: dict[str, str] = {}
    for line in body[start:stop].decode("latin-1").split("\r\n"):
        if "\r" in line or "\n" in line or line[:1] in (" ", "\t") or ":" not in line:
            raise MalformedForm("A multipart part's headers must be 'Name: value' lines ending in CRLF, not folded.")
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in headers:
            raise MalformedForm(f"A multipart part gives the header '{routes.shown(key)}' twice.")
        headers[key] = value.strip()
    encoding = headers.get("content-transfer-encoding")
    if encoding is not None and encoding.lower() not in ("7bit", "8bit", "binary"):
        raise MalformedForm("A multipart part must not be sent with a Content-Transfer-Encoding.")
    name, file = _disposition(headers.get("content-disposition"))
    charset = None
    for param in _PARAM.finditer(";" + headers.get("content-type", "").partition(";")[2]):
        if param.group(1).lower() == "charset":
            charset = (param.group(2) or param.group(3) or "").lower()
    return Part(name, file, stop + 4, end, charset)


def _disposition(value: str | None) -> tuple[str, bool]:
    """(field name, whether it is a file) of `form-data; name="..."[; filename="..."]`, read strictly."""
    if value is None or not value.lower().startswith("form-data"):
        raise MalformedForm("Each multipart part needs 'Content-Disposition: form-data; name=...'.")
    params: dict[str, str] = {}
    at = len("form-data")
    rest = value[at:]
    position = 0
    while position < len(rest.rstrip()):
        param = _PARAM.match(rest, position)
        if param is None or param.end() == position:
            raise MalformedForm("A multipart part's Content-Disposition can't be read.")
        key = param.group(1).lower()
        if key in params:
            raise MalformedForm(f"A multipart part's Content-Disposition gives '{routes.shown(key)}' twice.")
        params[key] = param.group(2) if param.group(2) is not None else param.group(3)
        position = param.end()
    name = params.get("name")
    if name is None or "name*" in params:
        raise MalformedForm('A multipart part\'s field name must be given as name="..." (not name*=).')
    if "\\" in name or not name.isascii() or not name.isprintable():
        raise MalformedForm(f"The multipart field name '{routes.shown(name)}' must be printable ASCII, unescaped.")
    return name, "filename" in params or "filename*" in params


def fields(body: bytes, parts: list[Part]) -> dict[str, Any]:
    """The form as the JSON the table reads: `a[b][]=v` -> {"a": {"b": "v"}}, keys lower-cased, a
    repeated field a list. Only fields whose name holds a table field, `id`, `type` or `purpose` are read
    (a file's contents are not, unless so named), and other fields whose value is JSON naming objects
    (`tools=[{"vector_store_ids": [...]}]`: a backend may parse a field's JSON), read as that JSON."""
    payload: dict[str, Any] = {}
    for part in parts:
        if not _NAME.fullmatch(part.name):
            raise MalformedForm(f"The multipart field name '{routes.shown(part.name)}' has unbalanced brackets.")
        segments = [s.lower() for s in _SEGMENTS.split(part.name) if s]
        value: Any
        if _READ_ANYWAY.intersection(segments):
            value = _text(body, part)
        else:
            value = None if part.file else _json_value(body, part)
            if value is None:
                continue  # names no object (a file's contents, `expires_after[...]`): not read
        node = payload
        for segment in segments[:-1]:
            child = node.setdefault(segment, {})
            if not isinstance(child, dict):
                raise MalformedForm(f"The multipart field '{routes.shown(part.name)}' is both a value and a group.")
            node = child
        leaf = segments[-1]
        if leaf not in node:
            node[leaf] = value
        elif isinstance(node[leaf], dict) or leaf in ("id", "type"):
            raise MalformedForm(f"The multipart field '{routes.shown(part.name)}' is given twice.")
        else:
            node[leaf] = [*node[leaf], value] if isinstance(node[leaf], list) else [node[leaf], value]
    return payload


def _json_value(body: bytes, part: Part) -> Any:
    """The field's value parsed, when it is JSON (an object or array) holding a marker of the table; else None."""
    if _JSON_START.match(body, part.start, part.end) is None:
        return None
    raw = body[part.start : part.end]
    if not routes.names_objects(raw, routes.MARKERS):
        return None
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=routes.keyed)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None  # not JSON: a string, read by the backend as one


def _text(body: bytes, part: Part) -> str:
    if part.charset is not None and part.charset not in _TEXT_CHARSETS:
        raise MalformedForm(f"The multipart field '{routes.shown(part.name)}' must be UTF-8.")
    try:
        return body[part.start : part.end].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedForm(f"The multipart field '{routes.shown(part.name)}' must be UTF-8.") from None


def _is_batch(payload: dict[str, Any]) -> bool:
    purpose = payload.get("purpose")
    values = purpose if isinstance(purpose, list) else [purpose]
    return any(isinstance(v, str) and v.strip().lower() == "batch" for v in values)


def _batch_upload() -> RouteNotIsolated:
    """An Upload (`POST /uploads`) of a batch input file: its parts can't be read line by line."""
    return RouteNotIsolated(
        "A batch input file's lines can name stored objects, which the load balancer reads only in a file"
        " uploaded whole through /files, so an Upload with purpose 'batch' is refused while several clients"
        " share the pool."
    )


# Batch input files ------------------------------------------------------------------------------
def batch_ids(body: bytes, parts: list[Part]) -> list[ObjectId]:
    """Every object the lines of the batch input file(s) name, once each, with the first line naming it."""
    found: dict[str, ObjectId] = {}
    routes_read: dict[tuple[str, str], tuple[ObjectId, ...]] = {}  # (method, path) -> the ids its path names
    for part in parts:
        for number, line, named, plain in _lines(body, part.start, part.end):
            for object_id in line_ids(line, number, named, plain, routes_read):
                if object_id.value not in found:
                    if len(found) >= MAX_BATCH_IDS:
                        raise BadRequest(
                            f"Line {number} of the batch input file: the file names more than {MAX_BATCH_IDS}"
                            " stored objects; split it into several batches."
                        )
                    found[object_id.value] = object_id
    return list(found.values())


def _lines(body: bytes, start: int, end: int) -> Iterator[tuple[int, bytes, bool, bool]]:
    """(number from 1, bytes, named, plain) of each line with more than whitespace; a UTF-8 BOM
    before the first is skipped. `named`: the line holds a marker of `routes.MARKERS` (or a NUL),
    so its body may name objects; `plain`: not named, and `"url"`, `"method"`, `"body"` occur at most
    once each. The markers are searched in the whole file at once (one `find` per occurrence, not
    one search per marker and line), none spanning lines; a line with bytes beyond ASCII is also
    searched by `routes.names_objects` itself, which decides how such bytes may spell a field name."""
    if body.startswith(_BOM, start, end):
        start += len(_BOM)
    lowered = body[start:end].lower()
    marks = sorted(_occurrences(lowered, (*routes.MARKERS, b"\x00")))
    keys = sorted(_occurrences(lowered, _LINE_KEYS))
    at = mark = key = number = 0
    while at < len(lowered):
        stop = lowered.find(b"\n", at)
        stop = len(lowered) if stop == -1 else stop
        number += 1
        if number > MAX_BATCH_LINES:
            raise BadRequest(f"A batch input file may have at most {MAX_BATCH_LINES} lines.")
        named = False
        while mark < len(marks) and marks[mark][0] < stop:
            named = True
            mark += 1
        counts: dict[bytes, int] = {}
        while key < len(keys) and keys[key][0] < stop:
            counts[keys[key][1]] = counts.get(keys[key][1], 0) + 1
            key += 1
        line = body[start + at : start + stop]
        at = stop + 1
        if not named and not line.isascii():  # beyond ASCII, the byte search is the table's own
            named = routes.names_objects(line, routes.MARKERS)
        if line.strip():
            yield number, line, named, not named and all(c <= 1 for c in counts.values())


def _occurrences(data: bytes, needles: tuple[bytes, ...]) -> Iterator[tuple[int, bytes]]:
    for needle in needles:
        at = data.find(needle)
        while at != -1:
            yield at, needle
            at = data.find(needle, at + 1)


def line_ids(
    line: bytes,
    number: int,
    named: bool,
    plain: bool,
    routes_read: dict[tuple[str, str], tuple[ObjectId, ...]],
) -> list[ObjectId]:
    """The ids one batch line names, read as a direct call to its `url` with its `body` would be
    (`routes.classify`). A `plain` line (`_lines`) is parsed by json.loads alone, its own keys' case
    checked; any other as a direct call's body is (`routes.parse_body`'s key rules, at every depth),
    and its body, serialized again, goes through the markers pre-scan and the id fields."""
    where = f"Line {number} of the batch input file"
    try:
        text = line.decode("utf-8")
        if plain:
            parsed = _DECODER.decode(text)
            if isinstance(parsed, dict):  # its url, method and body are spelled once each (in any case)
                parsed = {k.lower(): v for k, v in parsed.items()}
        else:
            parsed = json.loads(text, object_pairs_hook=_line_keys)
    except UnicodeDecodeError:
        raise BadRequest(f"{where} is not UTF-8.") from None
    except (ValueError, RecursionError):
        raise BadRequest(f"{where} is not a JSON object.") from None
    except ProxyError as exc:
        exc.message = f"{where}: {exc.message}"
        raise
    line_fields = parsed if isinstance(parsed, dict) else {}
    url, method, call_body = line_fields.get("url"), line_fields.get("method", "POST"), line_fields.get("body")
    if not isinstance(url, str) or not url.startswith("/") or not isinstance(method, str):
        if not named:
            return []  # no call the batch could make, and no field naming an object: nothing to check
        raise BadRequest(
            f"{where} names objects but has no 'url' (a path such as /v1/responses) or 'method' to read them by."
        )
    if call_body is not None and not isinstance(call_body, dict):
        if not named:
            return []
        raise BadRequest(f"{where}: its 'body' must be a JSON object.")
    method = method.upper()
    path = url if url.lower().startswith("/openai/") else "/openai" + url
    try:
        if named and call_body:  # read as a direct call with this body (keys lower-cased, escapes decoded)
            raw = json.dumps(call_body, ensure_ascii=False).encode()
            objects = routes.classify(method, path, raw, "application/json", True)
            ids = objects.ids if objects is not None else ()
        else:  # no marker: as a direct call, only its route is read (once per route and file)
            ids = routes_read.get((method, path)) or ()
            if (method, path) not in routes_read:  # a 400 or 403 for a route that can't be read
                objects = routes.classify(method, path, b"", "application/json", True)
                ids = routes_read[(method, path)] = objects.ids if objects is not None else ()
    except ProxyError as exc:
        exc.message = f"{where}: {exc.message}"
        raise
    return [LineObjectId(i.value, i.kind, i.field, line=number) for i in ids]


def _line_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`routes.keyed` (lower-cased, an id field given twice refused), and a line's url, method or body
    given twice (in any case), at any depth (json.loads calls it for every object of the line)."""
    seen = set()
    for key, _ in pairs:
        lowered = key.lower()
        if lowered in ("url", "method", "body") and lowered in seen:
            raise BadRequest(f"it gives '{lowered}' twice.")
        seen.add(lowered)
    return routes.keyed(pairs)

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
than CRLF, folded or repeated headers, a parameter given twice or in RFC 2231's form (`name*=`,
`name*0=`, `boundary*=`: Go's mime parser lets them replace `name` and `boundary`; only
`filename*=utf-8''...` is taken, as .NET sends it), an escaped, empty or non-ASCII field name, a
Content-Transfer-Encoding, a field in a charset other than UTF-8, a field whose value starts like
JSON and could name objects but that Python's json refuses (a trailing comma, a comment, a BOM:
lenient parsers such as Json.NET read it). A part is a file (its contents not read unless its name
is a field the table reads) only with a non-empty `filename`: Go and .NET read `filename=""` as a
field.
"""

from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lb.errors import BadRequest, ProxyError
from lb.objects import routes
from lb.objects.routes import ObjectCall, ObjectId, RouteNotIsolated

MAX_HEADER_BYTES = 8 * 1024  # one part's headers: a Content-Disposition and a Content-Type need far less
MAX_PARTS = 1_000  # parts of one form (an upload has a handful)
# Azure OpenAI's batch limits (quotas and limits, "Batch limits"): at most 100,000 requests a file.
MAX_BATCH_LINES = 100_000
MAX_BATCH_IDS = 1_000  # distinct stored objects one batch file may name: each is one record read
_BOUNDARY = re.compile(r"""[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]""")
_PARAM = re.compile(r"""\s*;\s*([^\s=;"]+)\s*=\s*(?:"((?:[^"\\\r\n]|\\.)*)"|([^\s;"]*))\s*""")
# RFC 5987's `filename*` as .NET sends it: a charset Go decodes, a language, then a non-empty value
_FILENAME_STAR = re.compile(r"(?:utf-8|us-ascii)'[^']*'(?:[^%]|%[0-9A-Fa-f]{2})+", re.IGNORECASE)
_NAME = re.compile(r"[^\[\]]*(?:\[[^\[\]]*\])*")
_SEGMENTS = re.compile(r"[\[\].]")
_READ_ANYWAY = frozenset({*routes.BODY_FIELDS, "id", "type", "purpose"})  # the fields read (files too)
# A value a JSON parser may read: `{`, `[` or a comment, after a BOM (UTF-8, -16) and whitespace (NULs: UTF-16/32).
_JSON_START = re.compile(rb"(?:\xef\xbb\xbf|\xff\xfe|\xfe\xff)?[\s\x00]*[\[{/]")
# In a lower-cased value that looks like JSON but does not parse, what a lenient parser could read as
# naming an object (`_may_name_objects`): a field of the table as a key, quoted (`"file_ids":`,
# `'audio' /* c */ :`) or not (Json.NET's `{file_ids: ...}`), or a typed id's type as a quoted value.
_FIELD_WORDS = tuple(f for f in routes.BODY_FIELDS if not any(o != f and o in f for o in routes.BODY_FIELDS))
_KEY_END = re.compile(r"""[a-z0-9_$]{0,40}["']?\s*[:/]""")  # after a field: the rest of its key, then `:`
_WORD_TAIL = re.compile(r"[a-z0-9_$]{0,40}\Z")  # before a field: the start of its key
_QUOTE_NEXT = re.compile(r"""\s*["']""")
_MAX_MENTIONS = 1_000  # fields of the table mentioned, beyond which such a value is refused unread
_LOOK_BACK = 1_000  # whitespace before a key looked through; more is taken as a key's indentation
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


def read_now(method: str, objects: ObjectCall, body: bytes, content_type: str | None) -> ObjectCall:
    """The call with the ids its form (and a batch file's lines) name added (the router reads a large
    body off the event loop). Raises a 4xx for what can't be read the way the backend will."""
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
    """The boundary of a multipart/form-data content type: given once, in RFC 2046's characters, among
    parameters read strictly (`_parameters`: `boundary*=` beside `boundary=` is a 400)."""
    media, _, rest = (content_type or "").partition(";")
    if media.strip().lower() != "multipart/form-data":
        raise MalformedForm("A multipart body must be sent as multipart/form-data.")
    value = _parameters(";" + rest, "Content-Type").get("boundary")
    if value is None:
        raise MalformedForm("A multipart/form-data body needs one boundary parameter in its Content-Type.")
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
    charset = _parameters(";" + headers.get("content-type", "").partition(";")[2], "Content-Type").get("charset")
    return Part(name, file, stop + 4, end, charset.lower() if charset is not None else None)


def _parameters(text: str, header: str, starred: frozenset[str] = frozenset()) -> dict[str, str]:
    """A header's `; key=value` parameters (keys lower-cased; a trailing `;` is allowed), read strictly:
    one that can't be read, a key given twice, or a key with a `*` (RFC 2231's `name*=`, `name*0=`,
    `name*0*=`, which Go's mime parser assembles into `name`, replacing it) other than `starred` is a 400."""
    params: dict[str, str] = {}
    position, end = 0, len(text.rstrip())
    while position < end:
        param = _PARAM.match(text, position)
        if param is None or param.end() == position:
            if text[position:end].strip() == ";":
                break
            raise MalformedForm(f"A multipart {header} header's parameters can't be read.")
        key = param.group(1).lower()
        if "*" in key and key not in starred:
            raise MalformedForm(
                f"A multipart {header} header's parameter '{routes.shown(key)}' is in RFC 2231's form"
                " (name*=, name*0=): give it once, plainly."
            )
        if key in params:
            raise MalformedForm(f"A multipart {header} header gives '{routes.shown(key)}' twice.")
        params[key] = param.group(2) if param.group(2) is not None else param.group(3)
        position = param.end()
    return params


def _disposition(value: str | None) -> tuple[str, bool]:
    """(field name, whether it is a file) of `form-data; name="..."[; filename="..."]`, read strictly."""
    if value is None or not value.lower().startswith("form-data"):
        raise MalformedForm("Each multipart part needs 'Content-Disposition: form-data; name=...'.")
    # .NET's MultipartFormDataContent sends `filename*=utf-8''...` beside `filename=`: the one `*` taken
    params = _parameters(value[len("form-data") :], "Content-Disposition", frozenset({"filename*"}))
    name = params.get("name")
    if name is None:
        raise MalformedForm('A multipart part\'s field name must be given as name="...".')
    if "\\" in name or not name.isascii() or not name.isprintable():
        raise MalformedForm(f"The multipart field name '{routes.shown(name)}' must be printable ASCII, unescaped.")
    # A file only with a filename every parser sees: Go and .NET read `filename=""` as a field, and Go
    # lets `filename*` replace `filename`, so one it may decode to "" is a 400 (golang/go's mime decodes
    # a charset other than UTF-8 and ASCII, or a bad %-escape, to "", at least in some versions).
    star = params.get("filename*")
    if star is not None and not _FILENAME_STAR.fullmatch(star):
        raise MalformedForm("A multipart part's filename* must be utf-8'' and a percent-encoded name (RFC 5987).")
    return name, bool(params.get("filename"))


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
        if not segments:  # "", ".", "[]": Go skips such a part, others keep it under some name
            raise MalformedForm(f"The multipart field name '{routes.shown(part.name)}' must name a field.")
        value: Any
        if _READ_ANYWAY.intersection(segments):
            value = _text(body, part)
        else:
            if not part.file and part.charset is not None and part.charset not in _TEXT_CHARSETS:
                # .NET decodes a field by its charset: in UTF-16 its names hide from a byte search
                raise MalformedForm(f"The multipart field '{routes.shown(part.name)}' must be UTF-8.")
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
    """The field's value parsed, when it is JSON (an object or array) holding a marker of the table; else
    None. A value that starts like JSON and could name objects but that json.loads refuses is a 400: a
    lenient parser (Json.NET takes trailing commas and comments, .NET and `json.loads(bytes)` a BOM)
    reads the ids that skipping it as a string would send unread."""
    if _JSON_START.match(body, part.start, part.end) is None:
        return None
    raw = body[part.start : part.end]
    if not routes.names_objects(raw, routes.MARKERS):
        return None
    routes.check_json_size(raw, f"The multipart field '{routes.shown(part.name)}'")
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=routes.keyed)
    except (UnicodeDecodeError, ValueError, RecursionError):
        if _may_name_objects(raw):
            raise MalformedForm(
                f"The multipart field '{routes.shown(part.name)}' starts like JSON naming stored objects but is"
                " not strict JSON (a trailing comma, a comment, a byte order mark): send it as plain JSON."
            ) from None
        return None  # no JSON that could name an object: a string, read by the backend as one


def _may_name_objects(raw: bytes) -> bool:
    """Whether a value no strict parser reads could, read leniently, name an object: a field of the table
    as a key or a typed id's type as a value (in any case, and folded as `routes.keyed` folds non-ASCII
    letters), a `\\u` escape (which may spell one), bytes that are not UTF-8 or hold a NUL (UTF-16 and
    -32), or more than `_MAX_MENTIONS` fields. Prose that only uses the words ("[Audio transcript of a
    conversation]") is not. Each mention is found by `str.find` and its context read in a bounded window,
    so a value of many MB costs a few scans, not a regex tried at every character."""
    if b"\x00" in raw:
        return True
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    text = (
        text.lower()
        if text.isascii()
        else unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    )
    if "\\u" in text:
        return True
    mentions = 0
    for words, named in ((_FIELD_WORDS, _is_key), (tuple(routes.TYPED_IDS), _is_quoted)):
        for word in words:
            at = text.find(word)
            while at != -1:
                mentions += 1
                if mentions > _MAX_MENTIONS or named(text, at, at + len(word)):
                    return True
                at = text.find(word, at + 1)
    return False


def _is_key(text: str, start: int, end: int) -> bool:
    """Whether the field at text[start:end] is (part of) a key: `"..field..":`, or unquoted after `{`,
    `,`, a comment or a line break (`:` or a comment after it)."""
    if _KEY_END.match(text, end) is None:
        return False
    tail = _WORD_TAIL.search(text, max(0, start - 41), start)
    assert tail is not None  # `{0,40}` matches the empty string at the end
    start = tail.start()
    before = text[max(0, start - _LOOK_BACK) : start]
    if before[-1:] in ("'", '"'):
        return True
    stripped = before.rstrip()
    if not stripped:
        return True  # after more whitespace than is looked through: taken as a key
    return stripped[-1] in "{,/" or "\n" in before[len(stripped) :]


def _is_quoted(text: str, start: int, end: int) -> bool:
    """Whether the type at text[start:end] is a quoted value (`"reasoning"`, `' file_id'`)."""
    if _QUOTE_NEXT.match(text, end) is None:
        return False
    return text[max(0, start - _LOOK_BACK) : start].rstrip()[-1:] in ("'", '"')


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
    routes.check_json_size(line, where)  # each line is one parse: the file as a whole may hold more
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

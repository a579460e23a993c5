"""The reasoning items a Responses answer carries, read from it as it is relayed.

An encrypted reasoning item decrypts only in the resource that made it, so its id is recorded for
the caller. Only the backend's own items count: an item of `output[]` whose `type` is `reasoning`
(a JSON answer), and in an event stream the `item` of `response.output_item.added` / `.done` and
the `response.output[]` of the events that carry the response (`response.completed` ...). An
`"id": "rs_..."` anywhere else is text the client chose (Azure echoes `tools`, `instructions`,
`metadata`), and recording it would let one call make thousands of records.

Nothing is held: the answer is scanned as it passes, by a JSON tokenizer that keeps only the path
it is on. Long strings are skipped with `bytes.find`, short ones and the subtrees off the paths
with regular expressions, so the Python work is per key and bracket on those paths, not per byte:
a long text, an encrypted item, an echoed schema cost a few calls each, and the scan stops once
`output` has closed. In a stream, the lines before the next one naming an event type that can
carry an item (the deltas: most of a stream) are skipped by one regex search. An id is recorded
before the read that completes its item goes out; at most `MAX_ITEMS` per answer.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from lb.relay import UpstreamResponse

log = logging.getLogger("lb.objects")

MAX_ITEMS = 128  # distinct reasoning ids recorded from one answer; a real one has a handful
MAX_STRING = 256  # a key or value longer than this is none the scanner looks for
DECODE_STEP = 64 * 1024  # a compressed answer is scanned this much decoded output at a time
_ID = re.compile(r"rs_[A-Za-z0-9_-]{1,128}")
# A short plain string, or a byte of the structure. A lone `"` opens a string that is long, has
# escapes or ends in a later read: its end is found by `bytes.find`, some 50 times faster than a
# character class (a text, an encrypted item, an image's base64 are such strings).
_TOKEN = re.compile(rb'"[^"\\]{0,256}+"|[{}\[\]:,"]')
_FLAT = rb'[^"{}\[\]]++|"[^"\\]{0,256}+"'  # what is neither a bracket nor a long string


def _nested(depth: int) -> bytes:
    """Values and whole objects / arrays nested up to `depth` (the regex module has no recursion)."""
    inner = rb"(?:" + _FLAT + rb")*+"
    for _ in range(depth):
        inner = rb"(?:" + _FLAT + rb"|[{\[]" + inner + rb"[}\]])*+"
    return inner


# Off the paths: skipped up to a bracket that closes the subtree, one nested two deeper, a long
# string, or the read's end, so an echoed schema costs few regex calls, not one per bracket.
_SKIP = re.compile(_nested(1))  # deeper patterns cost more per byte in `re` than they save
# An object's member: its key (no escape), then a short string or a scalar value and its comma.
_MEMBER = re.compile(rb'\s*"([^"\\]{0,256}+)"\s*:\s*(?:("([^"\\]{0,256}+)"|[-+.0-9a-zA-Z]++)\s*,?)?')
_NOT_SPACE = re.compile(rb"[^ \t\r\n]")
_DATA_TYPE = re.compile(rb'[ \t]*\{[ \t]*"type"[ \t]*:[ \t]*"([^"\\]{1,64})"')  # an event's usual opening
# In a stream, only an event whose type names an output item or the response can carry an item:
# lines before the first line holding one of these types are skipped (the deltas, most of a stream).
_MARKER = re.compile(rb'"response\.(?:output_item\.|[a-z0-9_]++")')

Path = tuple[str, ...]
ITEM = "[]"  # a path step into an array's element
IN_OUTPUT: Path = ("output", ITEM)  # a JSON answer's items
IN_EVENT: tuple[Path, ...] = (("item",), ("response", "output", ITEM))  # a stream event's items
ITEM_EVENTS = frozenset({"response.output_item.added", "response.output_item.done"})


class _Frame:
    """An open object or array on a path the scanner follows."""

    __slots__ = ("found", "is_object", "key", "path", "wants_key")

    def __init__(self, is_object: bool, path: Path) -> None:
        self.is_object = is_object
        self.path = path
        self.key: str | None = None
        self.wants_key = is_object
        self.found: dict[str, str] = {}  # an item's `id` and `type`, the root's `type`


class Scanner:
    """Reasoning ids of one JSON document fed in pieces (`items`: the paths of its items)."""

    def __init__(self, items: tuple[Path, ...], event: bool = False) -> None:
        self.items = items
        self.prefixes = _prefixes(items)
        self.event = event  # a stream event: its root's `type` says whether `item` is an output item
        self.found: list[str] = []  # ids found, in order, to be taken by the caller
        self.done = False  # nothing more to find (a path closed, an event of no interest, not JSON)
        self._stack: list[_Frame] = []
        self._skip = 0  # brackets open in a subtree off the paths
        self._string: bytearray | None = None  # an unfinished string that is kept (None: skipped)
        self._in_string = False
        self._escaped = False  # the piece ended inside an escape
        self.started = False
        self._pending: list[tuple[Path, dict[str, str]]] = []  # `item`s seen before the event's `type`

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end and not self.done:
            if self._in_string:
                pos = self._string_rest(data, pos)
            elif self._skip:
                pos = self._skipped(data, pos)
            elif not self.started:  # the document must be an object, from its first byte
                first = _NOT_SPACE.search(data, pos)
                if first is None:
                    return
                self.started, self.done = True, data[first.start()] != 0x7B
                if not self.done:
                    pos = first.start() + 1
                    self._open(True)
            else:
                member = _MEMBER.match(data, pos) if self._stack and self._stack[-1].wants_key else None
                if member is not None:  # `"key": ` and a short value, one regex call for the lot
                    pos = member.end()
                    self._member(member)
                    continue
                match = _TOKEN.search(data, pos)
                if match is None:
                    return
                pos = match.end()
                self._token(data, match.start(), pos)

    def _member(self, member: re.Match[bytes]) -> None:
        frame = self._stack[-1]
        key = _text(member.group(1))
        if member.group(2) is None:  # the value is an object, an array or a long string: read next
            frame.key, frame.wants_key = key, False
            return
        if member.group(3) is not None and key is not None and self._collects(key):
            self._value(frame, key, _text(member.group(3)))

    def _token(self, data: bytes, start: int, end: int) -> None:
        byte = data[start]
        if byte == 0x22:  # '"'
            if end - start == 1:  # opens a string read by `_string_rest`
                self._in_string = True
                self._string = bytearray() if self._keeps_string() else None
            else:
                self._string_done(data[start + 1 : end - 1] if self._keeps_string(end - start) else None)
        elif byte in (0x7B, 0x5B):  # '{', '['
            self._open(byte == 0x7B)
        elif byte in (0x7D, 0x5D):  # '}', ']'
            self._close()
        elif byte == 0x3A:  # ':'
            if self._stack:
                self._stack[-1].wants_key = False
        elif self._stack and self._stack[-1].is_object:  # ','
            frame = self._stack[-1]
            frame.wants_key, frame.key = True, None

    def _child(self) -> Path | None:
        """The path of a value starting here; None when no item can be under it."""
        if not self._stack:
            return ()
        frame = self._stack[-1]
        step = frame.key if frame.is_object else ITEM
        path = (*frame.path, step) if step is not None and not frame.wants_key else None
        return path if path in self.prefixes else None

    def _open(self, is_object: bool) -> None:
        path = self._child()
        if path is None or (not is_object and path in self.items):  # off the paths, or an item not an object
            self._skip = 1
        else:
            self._stack.append(_Frame(is_object, path))

    def _close(self) -> None:
        if not self._stack:
            self.done = True
            return
        frame = self._stack.pop()
        if frame.path in self.items:
            self._item(frame.path, frame.found)
        if not self._stack:
            self._resolve(frame.found.get("type"))
            self.done = True
        elif frame.path == self.items[-1][:-1]:  # the output closed: nothing else to find, unless
            kind = self._stack[0].found.get("type")  # an event's `item` may follow
            self.done = not self.event or (kind is not None and not self._pending and kind not in ITEM_EVENTS)

    def _item(self, path: Path, found: dict[str, str]) -> None:
        if found.get("type") != "reasoning":
            return
        if self.event:  # an event's items count only in events of their kind
            kind = self._stack[0].found.get("type") if self._stack else None
            if kind is None:
                self._pending.append((path, found))
                return
            if not carries(kind, path):
                return
        self._take(found.get("id"))

    def _resolve(self, kind: str | None) -> None:
        for path, found in self._pending:
            if kind is not None and carries(kind, path):
                self._take(found.get("id"))
        self._pending = []

    def _take(self, item_id: str | None) -> None:
        if item_id is not None and _ID.fullmatch(item_id):
            self.found.append(item_id)

    def _keeps_string(self, size: int = 0) -> bool:
        """A key on the paths, or the value of an item's `id` / `type` (of an event's `type`)."""
        if not self._stack or size > MAX_STRING + 2:
            return False
        frame = self._stack[-1]
        if not frame.is_object:
            return False
        if frame.wants_key:
            return True
        return frame.key is not None and self._collects(frame.key)

    def _collects(self, key: str) -> bool:
        """An item's `id` and `type`, an event's `type`: the values kept."""
        if key not in ("id", "type"):
            return False
        return self._stack[-1].path in self.items or (self.event and len(self._stack) == 1)

    def _string_done(self, raw: bytes | bytearray | None) -> None:
        if not self._stack or not self._stack[-1].is_object:
            return
        frame = self._stack[-1]
        text = _text(raw) if raw is not None else None
        if frame.wants_key:
            frame.key = text  # None: a key no path goes through
            return
        if text is not None and frame.key is not None:
            self._value(frame, frame.key, text)

    def _value(self, frame: _Frame, key: str, text: str | None) -> None:
        if text is None:
            return
        frame.found.setdefault(key, text)
        if self.event and len(self._stack) == 1 and key == "type" and not interesting(text):
            self.done = True  # a delta, a part: no item in it

    def _string_rest(self, data: bytes, pos: int) -> int:
        """Past the closing quote of the string being read; the piece's end when it is not there."""
        start = pos
        if self._escaped:  # the previous piece ended in a backslash: this byte is escaped
            self._escaped = False
            pos += 1
        quote = data.find(b'"', pos)
        while quote >= 0 and _backslashes(data, pos, quote) % 2:
            quote = data.find(b'"', quote + 1)
        if quote < 0:
            self._escaped = _backslashes(data, pos, len(data)) % 2 == 1
            self._keep(data, start, len(data))
            return len(data)
        self._keep(data, start, quote)
        kept = self._string
        self._in_string, self._string = False, None
        if not self._skip:  # a string inside a skipped subtree is nobody's key
            self._string_done(kept)
        return quote + 1

    def _keep(self, data: bytes, start: int, end: int) -> None:
        if self._string is not None:
            self._string += data[start:end]
            if len(self._string) > MAX_STRING:
                self._string = None

    def _skipped(self, data: bytes, pos: int) -> int:
        end = _SKIP.match(data, pos).end()  # type: ignore[union-attr]  # always matches
        if end >= len(data):
            return end
        byte = data[end]
        if byte == 0x22:  # a string that is long, has escapes or ends in a later read
            self._in_string, self._string = True, None
        elif byte in (0x7B, 0x5B):
            self._skip += 1
        else:
            self._skip -= 1
            if not self._skip and not self._stack:
                self.done = True
        return end + 1


@functools.cache
def _prefixes(items: tuple[Path, ...]) -> frozenset[Path]:
    return frozenset(path[:n] for path in items for n in range(len(path) + 1))


def interesting(kind: str) -> bool:
    """An event type that can carry a reasoning item: an output item's, or one carrying the response."""
    return kind in ITEM_EVENTS or _carries_response(kind)


def carries(kind: str, path: Path) -> bool:
    """Whether an item at `path` of an event of type `kind` is one of the response's output items."""
    return kind in ITEM_EVENTS if path == IN_EVENT[0] else _carries_response(kind)


def _carries_response(kind: str) -> bool:
    return kind.startswith("response.") and kind.count(".") == 1  # response.created, .completed ...


def _backslashes(data: bytes, low: int, high: int) -> int:
    """How many backslashes end `data[low:high]`."""
    at = high
    while at > low and data[at - 1] == 0x5C:
        at -= 1
    return high - at


def _text(raw: bytes | bytearray) -> str | None:
    if b"\\" not in raw:
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return None
    try:
        value = json.loads(b'"' + bytes(raw) + b'"')
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, str) else None


class Events:
    """Reasoning ids of an event stream fed in pieces: each event's `data` lines are one document."""

    done = False  # a stream is read to its end

    def __init__(self) -> None:
        self.found: list[str] = []
        self._doc = Scanner(IN_EVENT, event=True)
        self._line = b""  # the first bytes of the current line (up to 5): its field, or a blank line
        self._state = "start"  # start (field not known yet), data, other (a line of no interest)

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._state == "start" and not self._line and not self._doc.started:
                marker = _MARKER.search(data, pos)  # its line, or the last line (it may be cut)
                pos = max(pos, data.rfind(b"\n", pos, marker.start() if marker else end) + 1)
                if pos >= end:
                    return
            newline = data.find(b"\n", pos)
            stop = end if newline < 0 else newline
            if self._state == "start":
                take = min(stop, pos + 5 - len(self._line))
                self._line += data[pos:take]
                pos = take
                if self._line == b"data:":
                    self._state = "data" if self._opens_doc(data, pos, stop) else "other"
                elif not b"data:".startswith(self._line):
                    self._state = "other"
            if self._state == "data" and pos < stop and not self._doc.done:
                self._doc.feed(data[pos:stop])
                self._take()
            elif self._state == "other" and pos < stop:
                self._line = b"-"  # not blank
            if newline < 0:
                return
            if self._line in (b"", b"\r") and self._doc.started:  # a blank line ends the event
                self._doc = Scanner(IN_EVENT, event=True)
            pos, self._state, self._line = newline + 1, "start", b""

    def _opens_doc(self, data: bytes, pos: int, stop: int) -> bool:
        """False for an event's first data line whose `type` comes first and is of no interest."""
        match = None if self._doc.started else _DATA_TYPE.match(data, pos, stop)
        return match is None or interesting(match.group(1).decode("latin-1"))

    def _take(self) -> None:
        if self._doc.found:
            self.found += self._doc.found
            self._doc.found = []


OnId = Callable[[str], Awaitable[None]]


def watch_reasoning(response: UpstreamResponse, on_id: OnId) -> UpstreamResponse:
    """Make `response` call `on_id` for each reasoning item it carries (once each, at most
    `MAX_ITEMS`), before the read that completes the item goes out."""
    encoding = response.upstream.headers.get("content-encoding", "identity").lower().strip()
    scanner: Scanner | Events = Events() if response.event_stream else Scanner((IN_OUTPUT,))
    response.body_iterator = _scanned(response.body_iterator, scanner, on_id, encoding)
    return response


async def _scanned(chunks: Any, scanner: Scanner | Events, on_id: OnId, encoding: str) -> AsyncIterator[bytes]:
    decoder = zlib.decompressobj(47) if encoding in ("gzip", "deflate") else None  # 47: gzip or zlib header
    feed: Callable[[bytes], None] | None = scanner.feed
    if decoder is not None:
        feed = functools.partial(_decoded, scanner, decoder)
    elif encoding not in ("identity", ""):
        feed = None  # not readable: relayed as is, nothing recorded
    seen: set[str] = set()
    async for chunk in chunks:
        if feed is not None:
            try:
                feed(chunk)
            except zlib.error:
                feed = None
            if scanner.found:
                if not await _record(scanner.found, seen, on_id):
                    feed = None
                scanner.found = []
            if scanner.done:
                feed = None
        yield chunk


async def _record(found: list[str], seen: set[str], on_id: OnId) -> bool:
    """Record the ids not seen yet; False once the answer has carried `MAX_ITEMS` (the rest are not)."""
    for item_id in found:
        if item_id in seen:
            continue
        if len(seen) >= MAX_ITEMS:
            log.warning("an answer carried more than %d reasoning items; the rest are not recorded", MAX_ITEMS)
            return False
        seen.add(item_id)
        await on_id(item_id)
    return True


def _decoded(scanner: Scanner | Events, decoder: Any, chunk: bytes) -> None:
    """Feed a compressed answer's decoded bytes, a bounded step at a time."""
    data = decoder.decompress(chunk, DECODE_STEP)
    while data and not scanner.done:
        scanner.feed(data)
        data = decoder.decompress(decoder.unconsumed_tail, DECODE_STEP) if decoder.unconsumed_tail else b""

"""Reading a field or two of a large JSON body without parsing it on the event loop.

`json.loads` is C, but it holds the GIL: a 26 MiB body of small messages costs ~0.7 s, during
which no other request moves (and a thread would not help: the parse never releases the GIL). The
balancer needs only the top-level `"model"`, so a large body is searched instead of built:

1. `bytes.find`, one MiB at a time, lists where `"model"` occurs. In the bodies the
   SDKs send it occurs once, as a key followed by a short string: that string is the answer.
2. Otherwise (several different values, a nested `"model"` key in a tool schema, escapes) a
   tokenizer walks strings and brackets to find the key at depth 1, handing the loop back every
   `SLICE_SECONDS`, so other requests wait at most that long behind it.

Neither step validates the JSON: the backend does, and answers a malformed body with its own 400.

What the policies read in any body, whatever its size (`Marks`: `"stream": true`, the usage flag,
the max-tokens fields, the number of choices), is found by `marks` in the same way, a slice at a
time: the request's one read (`lb.requestinfo.described`) calls it once, and the policies take the
fields. A body that was parsed anyway gives its number of choices from the parsed object
(`choices_in`), by the same rules.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

SLICE_SECONDS = 0.001  # the longest the tokenizer holds the loop at a time
WINDOW_BYTES = 1024 * 1024  # searched at a time (~0.6 ms) before the loop gets a turn
MAX_CANDIDATES = 16  # more occurrences than this of the key: let the tokenizer sort them out
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_SHORT_STRING_VALUE = re.compile(rb'\s*:\s*"([^"\\\x00-\x1f]{0,256})"')
_ANY_VALUE = re.compile(rb"\s*:")
_SPACE = re.compile(rb"\s*")
_STREAM_TRUE = re.compile(rb"\s*:\s*true\b")
_STREAM = b'"stream"'
_STREAM_OPTIONS, _INCLUDE_USAGE = b'"stream_options"', b'"include_usage"'
_MAX_TOKENS_KEYS = (b'"max_tokens"', b'"max_completion_tokens"', b'"max_output_tokens"')  # the last: Responses API
_MAX_PREFIX = b'"max_'  # one search finds the three keys it begins
_COLON_NUMBER = re.compile(rb"\s*:\s*(\d+)")
# The number of completions a call has the model generate: chat's and completions' `n` (1-128 in
# Azure OpenAI's reference), completions' `best_of` (0-20, generated server-side), images' `n`.
N, BEST_OF = b'"n"', b'"best_of"'
MAX_CHOICES = 128  # the most `n` allows: what a count that can't be read as one counts as
# After a choices key: null (the default, 1), a plain integer, another number (`-1`, `2.0`, `1e3`:
# unreadable), or anything else (a string, object, array: a nested key of that name, not a count).
_CHOICES_VALUE = re.compile(rb"\s*:\s*(?:(null)|(\d{1,15})(?![.eE\d])|[-+.\d])")
# Occurrences of the max-tokens or choices keys one read looks at, at most: each costs a few us in
# Python, and a body naming them more often than any request does (one each, a few more in tool
# schemas) counts as stating the most (10**15 tokens, MAX_CHOICES), at no further cost.
MAX_KEYS = 1000
_STREAM_PREFIX = b'"stream'  # one search finds both keys it begins
_OPEN, _CLOSE, _QUOTE = frozenset(b"[{"), frozenset(b"]}"), ord('"')


@dataclass(frozen=True)
class Marks:
    """What the policies read in a body's bytes, found in one place (`marks`) so none searches it again."""

    stream: bool = False  # a `"stream": true` anywhere (the body's own answer when it is not parsed)
    stream_options: bool = False  # `"stream_options"` occurs (metering inserts it as bytes only if not)
    include_usage: bool = (
        False  # `"include_usage"` occurs (the client asked for the usage chunk): looked for in streams
    )
    max_tokens: int | None = None  # the largest max-tokens value stated; None: not looked for (`tokens`)
    choices: int = 1  # completions generated per call (`n`, `best_of`): 1 unless asked for (`choices`)


NO_MARKS = Marks(max_tokens=0)


def choice_count(value: object) -> int:
    """A choices field's value as a count: null is the default (1), an integer is clamped to 1-128
    (Azure refuses the others with a 400, which charges nothing). Anything else (negative,
    fractional, a string, a bool) is no count we can read, so it counts as `MAX_CHOICES`: never
    fewer choices than a backend that took it anyway might generate."""
    if value is None:
        return 1
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return max(1, min(value, MAX_CHOICES))
    return MAX_CHOICES


def choices_in(payload: dict[str, object], keys: tuple[bytes, ...]) -> int:
    """`Marks.choices` of a parsed body: the largest count among its top-level `keys` (1 if none)."""
    count = 1
    for key in keys:
        name = key[1:-1].decode()
        if name in payload:
            count = max(count, choice_count(payload[name]))
    return count


def read_marks(
    body: bytes,
    lo: int = 0,
    hi: int | None = None,
    *,
    usage: bool = True,
    tokens: bool = True,
    choices: tuple[bytes, ...] = (),
) -> Marks:
    """The marks of the keys starting in body[lo:hi], without yielding (a body in hand, up to a window).

    One C-speed `find` per key, the two that begin `"stream` sharing one and the three max-tokens
    keys another (`"max_`): a regex alternation over a large prompt costs ten times more, and a
    shorter needle than a key risks a slow search; the choices keys, as short as `"n"`, are the
    exception (`_choices`). `"stream": true` counts unless its quote is escaped; a max-tokens or
    choices key unless a backslash precedes it (quoted inside a string); a max-tokens number of
    more than 15 digits (or more than `MAX_KEYS` such keys) reads as 10**15, "more than any
    quota", instead of making int() raise; a choices value as `choice_count` says, the largest
    wherever the key is (a nested key of that name can only make the count larger). The others are
    plain presence. `usage`, `tokens` and `choices` say whether `"include_usage"`, the max-tokens
    keys and which choices keys (`N`, `BEST_OF`) are looked for at all."""
    size = len(body)
    hi = size if hi is None else hi

    def within(key: bytes) -> int:  # a key starting before `hi` may end after it
        return min(size, hi + len(key) - 1)

    stream = options = False
    at = body.find(_STREAM_PREFIX, lo, within(_STREAM_PREFIX))
    while at != -1 and not (stream and options):
        if body.startswith(_STREAM, at):
            stream = stream or (not _escaped(body, at) and _STREAM_TRUE.match(body, at + len(_STREAM)) is not None)
        elif body.startswith(_STREAM_OPTIONS, at):
            options = True
        at = body.find(_STREAM_PREFIX, at + 1, within(_STREAM_PREFIX))
    completion = seen = 0
    at = body.find(_MAX_PREFIX, lo, within(_MAX_PREFIX)) if tokens else -1
    while at != -1:
        if at == 0 or body[at - 1] != 0x5C:
            seen += 1
            if seen > MAX_KEYS:  # no request's body: "more than any quota", at no further cost
                completion = 10**15
                break
            for key in _MAX_TOKENS_KEYS:
                if body.startswith(key, at):
                    number = _COLON_NUMBER.match(body, at + len(key))
                    if number:
                        digits = number.group(1)
                        completion = max(completion, int(digits) if len(digits) <= 15 else 10**15)
                    break
        at = body.find(_MAX_PREFIX, at + 1, within(_MAX_PREFIX))
    count = _choices(body, lo, hi, choices) if choices else 1
    asked = usage and body.find(_INCLUDE_USAGE, lo, within(_INCLUDE_USAGE)) != -1
    return Marks(stream, options, asked, completion if tokens else None, count)


def _choices(body: bytes, lo: int, hi: int, keys: tuple[bytes, ...]) -> int:
    """The largest count the choices `keys` starting in body[lo:hi] state. A key is found by a regex
    search for it as a literal, which runs at one speed whatever the text (`bytes.find` of a key as
    short as `"n"` slows down on a run of the letters it holds: 2.6 ms per MiB of `n`)."""
    count = seen = 0
    for key in keys:
        # a match ends by `hi + len(key) - 1`: it starts in this slice, and may end in the next
        for found in _literal(key).finditer(body, lo, min(len(body), hi + len(key) - 1)):
            at = found.start()
            if at and body[at - 1] == 0x5C:  # quoted inside a string
                continue
            seen += 1
            if seen > MAX_KEYS:
                return MAX_CHOICES
            count = max(count, _choices_after(body, found.end()))
    return max(count, 1)


@functools.lru_cache(maxsize=8)
def _literal(key: bytes) -> re.Pattern[bytes]:
    return re.compile(re.escape(key))


def _choices_after(body: bytes, end: int) -> int:
    """The count a choices key ending at `end` states (`choice_count`'s rules on the bytes); 1 when
    its value is no number (a nested key of that name: an object, a string)."""
    value = _CHOICES_VALUE.match(body, end)
    if value is None or value.group(1) is not None:
        return 1
    digits = value.group(2)
    return choice_count(int(digits)) if digits is not None else MAX_CHOICES


async def marks(body: bytes, *, usage: bool = True, tokens: bool = True, choices: tuple[bytes, ...] = ()) -> Marks:
    """`read_marks` over the whole body; a large one a slice at a time, handing the loop back between
    slices (a slice is a window shared by the searches: each is one `find` over it)."""
    if len(body) <= WINDOW_BYTES:
        return read_marks(body, usage=usage, tokens=tokens, choices=choices)
    step = WINDOW_BYTES // (1 + usage + tokens + len(choices))
    found = Marks(max_tokens=0 if tokens else None)
    for start in range(0, len(body), step):
        if start:
            await asyncio.sleep(0)
        part = read_marks(body, start, min(len(body), start + step), usage=usage, tokens=tokens, choices=choices)
        found = Marks(
            found.stream or part.stream,
            found.stream_options or part.stream_options,
            found.include_usage or part.include_usage,
            None if found.max_tokens is None else max(found.max_tokens, part.max_tokens or 0),
            max(found.choices, part.choices),
        )
    return found


async def include_usage(body: bytes) -> bool:
    """`Marks.include_usage` alone, for a body found to be a stream by its other marks."""
    for start in range(0, len(body), WINDOW_BYTES):
        if start:
            await asyncio.sleep(0)
        if body.find(_INCLUDE_USAGE, start, min(len(body), start + WINDOW_BYTES + len(_INCLUDE_USAGE) - 1)) != -1:
            return True
    return False


async def top_level_string(body: bytes, key: bytes) -> str | None:
    """The string value of `key` in the body's top-level object; None if absent or not a string."""
    needle = b'"' + key + b'"'
    values: set[bytes] = set()
    seen = 0
    async for at in _occurrences(body, needle):
        seen += 1
        if _ANY_VALUE.match(body, at + len(needle)):
            short = _SHORT_STRING_VALUE.match(body, at + len(needle))
            if short is None or seen > MAX_CANDIDATES:
                return await _tokenize(body, needle)  # an escaped or long value, or too many to trust
            values.add(short.group(1))
    if len(values) > 1:
        return await _tokenize(body, needle)  # a nested key of that name too: which one is on top?
    return values.pop().decode("utf-8", "replace") if values else None


async def top_level_spans(body: bytes, key: bytes) -> list[tuple[int, int]]:
    """Where the string value(s) of `key` in the body's top-level object are, quotes included (a
    duplicated key: each, the last being the one json.loads keeps); [] if absent or not a string.
    Found like `top_level_string`, so the span replaced is the value the balancer routed on."""
    needle = b'"' + key + b'"'
    spans: list[tuple[int, int]] = []
    async for at in _occurrences(body, needle):
        if len(spans) >= 1 or not _ANY_VALUE.match(body, at + len(needle)):
            break  # a second occurrence (nested, or a string that reads like it): let the tokenizer say
        short = _SHORT_STRING_VALUE.match(body, at + len(needle))
        if short is None:
            break
        spans.append((short.start(1) - 1, short.end(1) + 1))
    else:
        if spans:
            return spans
    return await _tokenize_spans(body, needle)


async def _tokenize_spans(body: bytes, needle: bytes) -> list[tuple[int, int]]:
    """Every depth-1 `needle` key's string value span (the key's escapes decoded)."""
    spans: list[tuple[int, int]] = []
    async for start, end in _top_level_strings(body):
        if _is_key(body, start, end, needle) and (span := _string_value_span(body, end)) is not None:
            spans.append(span)
    return spans


def _is_key(body: bytes, start: int, end: int, needle: bytes) -> bool:
    """Whether the string token body[start:end] is `needle`, escapes decoded (`"mod\\u0065l"` is "model")."""
    if end - start == len(needle):
        return body.startswith(needle, start)
    if b"\\" not in body[start:end] or end - start > 8 * len(needle):
        return False
    try:
        return json.loads(body[start:end]) == json.loads(needle)
    except ValueError:
        return False


async def _occurrences(body: bytes, needle: bytes) -> AsyncIterator[int]:
    """Where `needle` starts with an unescaped quote, found window by window: a `find` over 26 MiB
    takes ~15 ms, which the loop gets back every `WINDOW_BYTES`."""
    start = 0
    while start < len(body):
        end = min(len(body), start + WINDOW_BYTES + len(needle) - 1)
        at = body.find(needle, start, end)
        while at != -1:
            if not _escaped(body, at):
                yield at
            at = body.find(needle, at + 1, end)
        start += WINDOW_BYTES
        if start < len(body):
            await asyncio.sleep(0)


async def _tokenize(body: bytes, needle: bytes) -> str | None:
    found: str | None = None
    async for start, end in _top_level_strings(body):
        if end - start == len(needle) and body.startswith(needle, start):
            found = _value_after(body, end)  # a later duplicate wins, as in json.loads
    return found


async def _top_level_strings(body: bytes) -> AsyncIterator[tuple[int, int]]:
    """Where each string of the body's top-level object is (keys and string values), walking strings
    and brackets and handing the loop back every `SLICE_SECONDS`; nothing if the body is no object."""
    start = _after_space(body, 0)
    if body[start : start + 1] != b"{":
        return
    depth = 0
    count = 0
    slice_started = time.perf_counter()
    for token in _TOKEN.finditer(body, start):
        first = body[token.start()]
        if first == _QUOTE:
            if depth == 1:
                yield token.start(), token.end()
        elif first in _OPEN:
            depth += 1
        elif first in _CLOSE:
            depth -= 1
            if depth == 0:
                break
        count += 1
        if not count & 1023 and time.perf_counter() - slice_started > SLICE_SECONDS:
            await asyncio.sleep(0)  # let other requests run
            slice_started = time.perf_counter()


def _after_space(body: bytes, pos: int) -> int:
    """The index of the first non-blank byte at or after `pos` (`\\s*` always matches)."""
    match = _SPACE.match(body, pos)
    return match.end() if match else pos


def _string_value_span(body: bytes, end: int) -> tuple[int, int] | None:
    """The span of the string value after a key ending at `end`, quotes included; None if the string
    there is no key (no colon after it: a value that reads like the key) or its value is no string."""
    colon = _ANY_VALUE.match(body, end)
    if colon is None:
        return None
    value = _TOKEN.match(body, _after_space(body, colon.end()))
    if value is None or body[value.start()] != _QUOTE:
        return None
    return value.start(), value.end()


def _value_after(body: bytes, end: int) -> str | None:
    span = _string_value_span(body, end)
    if span is None:
        return None
    try:
        decoded = json.loads(body[span[0] : span[1]])
    except ValueError:
        return None
    return decoded if isinstance(decoded, str) else None


def _escaped(body: bytes, at: int) -> bool:
    """Whether the quote at `at` is escaped (preceded by an odd number of backslashes)."""
    backslashes = 0
    while at - backslashes > 0 and body[at - backslashes - 1] == 0x5C:
        backslashes += 1
    return backslashes % 2 == 1

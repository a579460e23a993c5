"""Soft prompt-cache affinity: which backend a conversation prefers, and when it has to move.

Azure OpenAI caches prompt prefixes per resource, for 5-10 minutes idle, but only of prompts of
1,024 tokens and more. Every turn of a chat starts with the whole previous prompt, so the backend
that served the last turn holds most of the next one; a weighted random pick finds it only by
luck. A shorter prompt is never cached, so keeping it anywhere saves nothing: `cacheable` says
which calls affinity applies to, and the others are picked exactly as with affinity off.

The conversation is named by a key read from the body in hand: `prompt_cache_key` or `user` when
the client sends one, else a hash of the prompt's head (the messages before the first user message
and that message, or the Responses API's `instructions` and first user `input`), which every later
turn repeats. Found by byte search and one bounded decode, not by parsing the body: a prompt of
megabytes costs what its head costs.

The key, hashed again with a secret of the pool no client knows (random, created once in the state
table and read by every instance, `lb.state.affinity`; in memory: `local_secret`), ranks the candidates
by weighted rendezvous hashing: every instance ranks alike, a backend leaving the group moves only
its own conversations, and no client can work out offline which keys a backend ranks first.
Two bounds keep load off any one backend:
- soft: a backend offered more than LOAD_FACTOR times its fair share of recent calls passes the
  excess on, always the same conversations, each to the next backend of its own order, where it
  settles (and is cached);
- hard: a backend that has served LOAD_BOUND times its fair share of recent calls takes no more,
  whatever keys clients send (crafted ones, or one heavy key): the call goes down its order. Each
  instance holds it on its own calls (so it holds over the pool), splitting the allowance of a
  quiet pool with the other instances.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import secrets
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from lb.config import Backend

HEAD_BYTES = 4096  # of the messages before the first user message, and of that message, hashed
SCAN_BYTES = 256 * 1024  # where keys and the first user message are looked for (head, and tail for keys)
KEY_BYTES = 256  # of a prompt_cache_key / user value
# A backend offered more than this multiple of its fair share of recent calls sheds the excess. Under
# 1 because offers count calls passed on by busier backends too, so they add up to more than the
# calls: a backend at its share of offers keeps more than its share of calls (bench model, docs).
LOAD_FACTOR = 0.95
# No backend serves more than this multiple of its fair share of recent calls (once there are
# LOAD_MIN_CALLS of them; before, it may serve that multiple of its share of that many), whatever the keys.
LOAD_BOUND = 1.3
LOAD_MIN_CALLS = 30.0  # fewer recent calls than this: shares are chance, nobody moves by the soft bound
# Azure caches a prompt of 1,024 tokens or more, below that affinity saves nothing (Microsoft Learn,
# learn.microsoft.com/azure/foundry/openai/how-to/prompt-caching; docs/affinity.md).
MIN_CACHED_TOKENS = 1024
BYTES_PER_TOKEN = 4  # English text and JSON average about 4 bytes a token
LOAD_HALF_LIFE_SECONDS = 30.0  # "recent calls": each counts half after this long
_SHED_SALT = 0x5BD1E9955BD1E995

_MASK = (1 << 64) - 1
_DECODER = json.JSONDecoder()
_COLON_STRING = re.compile(rb'\s*:\s*"')
_COLON_ARRAY = re.compile(rb"\s*:\s*\[")
_COLON_USER = re.compile(rb'\s*:\s*"user"')


# Which calls ------------------------------------------------------------------------------------
def prompt_tokens(body: bytes) -> int:
    """The prompt's tokens, roughly and from above: what decides whether Azure could cache it.

    The whole body stands in for the prompt (messages, tools and images are all part of the cached
    prefix; field names and JSON syntax make it an overestimate), at 4 bytes a token for ASCII and
    2 for other bytes (a CJK character is 3 bytes and about a token). Counting non-ASCII bytes takes
    a pass over the body, so it is done only where it can change the answer: under 4 KiB.
    """
    size = len(body)
    if size >= MIN_CACHED_TOKENS * BYTES_PER_TOKEN or body.isascii():
        return size // BYTES_PER_TOKEN
    other = size - len(body.decode("ascii", "ignore"))
    return (size + other) // BYTES_PER_TOKEN


def cacheable(body: bytes) -> bool:
    """Whether Azure could cache this call's prompt (1,024 tokens or more): affinity applies only then."""
    return prompt_tokens(body) >= MIN_CACHED_TOKENS


# The key -----------------------------------------------------------------------------------------
def conversation_key(body: bytes) -> int | None:
    """A 64-bit name for the conversation `body` belongs to; None when it names none (not a chat)."""
    for name in (b'"prompt_cache_key"', b'"user"'):
        value = _string_value(body, name)
        if value:
            return _hash(b"k" + value)
    head = _prompt_head(body)
    return _hash(b"h" + head) if head else None


def _prompt_head(body: bytes) -> bytes:
    """The prompt's first messages, bounded: identical in every turn of one conversation."""
    messages = _array_start(body, b'"messages"')
    if messages >= 0:
        return _array_head(body, messages)
    instructions = _string_value(body, b'"instructions"', HEAD_BYTES)
    items = _array_start(body, b'"input"')
    text = _string_value(body, b'"input"', HEAD_BYTES) if items < 0 else _array_head(body, items)
    return instructions + b"\x00" + text if text else b""


def _array_head(body: bytes, at: int) -> bytes:
    """From `at` (just inside `[`): what precedes the first user message (bounded), then that message (bounded)."""
    end = min(len(body), at + SCAN_BYTES)
    role = _find_key(body, b'"role"', _COLON_USER, at, end)
    if role < 0:
        # No user message in sight: a first message longer than the scan is stable in its head; a
        # short conversation without a user message is no chat to keep together.
        return body[at : at + HEAD_BYTES] if end < len(body) else b""
    start = body.rfind(b"{", at, role)
    start = role if start < 0 else start
    return body[at : min(start, at + HEAD_BYTES)] + b"\x00" + _message_head(body, start, role)


def _message_head(body: bytes, start: int, role: int) -> bytes:
    """The user message object at `start` (its role key at `role`), cut at HEAD_BYTES.

    Fast path: a string `content` after the role (what the SDKs send) ends at its closing quote,
    found by byte search. Anything else (content parts, keys in another order) is decoded.
    """
    limit = min(len(body), start + HEAD_BYTES)
    content = _find_key(body, b'"content"', _COLON_STRING, role, limit)
    if content >= 0 and body.find(b"}", role, content) < 0:  # no other object closed in between: it is ours
        value = _COLON_STRING.match(body, content + len(b'"content"')).end()  # type: ignore[union-attr]
        return body[start : _string_end(body, value, limit)]
    return _value_head(body, start)


def _value_head(body: bytes, at: int) -> bytes:
    """The JSON value starting at `at`, or its first HEAD_BYTES when it is longer (then all of those are its own)."""
    window = body[at : at + HEAD_BYTES]
    text = window.decode("utf-8", "replace")
    try:
        _, end = _DECODER.raw_decode(text)
    except ValueError:
        return window
    return text[:end].encode()


def _array_start(body: bytes, name: bytes) -> int:
    """Index just inside the array that key `name` holds, -1 if there is none near the start."""
    at = _find_key(body, name, _COLON_ARRAY, 0, min(len(body), SCAN_BYTES))
    if at < 0:
        return -1
    match = _COLON_ARRAY.match(body, at + len(name))
    return match.end() if match else -1


def _string_value(body: bytes, name: bytes, limit: int = KEY_BYTES) -> bytes:
    """The raw (still escaped) string key `name` holds, at most `limit` bytes; b"" if absent.

    Searched in the body's head and tail only: the SDKs put these keys before or after the prompt,
    never inside it, and a bounded search is what keeps a huge prompt cheap.
    """
    size = len(body)
    spans = [(0, size)] if size <= 2 * SCAN_BYTES else [(0, SCAN_BYTES), (size - SCAN_BYTES, size)]
    for lo, hi in spans:
        at = _find_key(body, name, _COLON_STRING, lo, hi)
        if at >= 0:
            start = _COLON_STRING.match(body, at + len(name)).end()  # type: ignore[union-attr]
            return body[start : _string_end(body, start, min(size, start + limit))]
    return b""


def _find_key(body: bytes, name: bytes, follows: re.Pattern[bytes], lo: int, hi: int) -> int:
    """Where `name` (quoted) stands as a key followed by `follows`: quotes inside JSON strings are
    escaped, so an unescaped match is JSON structure, not prompt text."""
    at = body.find(name, lo, hi)
    while at >= 0:
        if (at == 0 or body[at - 1] != 0x5C) and follows.match(body, at + len(name), hi):
            return at
        at = body.find(name, at + 1, hi)
    return -1


def _string_end(body: bytes, start: int, limit: int) -> int:
    """Index of the quote closing the JSON string begun at `start`, or `limit` if it runs past it."""
    at = body.find(b'"', start, limit)
    while at >= 0:
        backslashes = 0
        while body[at - 1 - backslashes] == 0x5C:
            backslashes += 1
        if backslashes % 2 == 0:
            return at
        at = body.find(b'"', at + 1, limit)
    return limit


def _hash(data: bytes) -> int:
    """64 well-mixed bits of `data`: CRC-32 runs at memory speed, and two conversations sharing a
    value only share a backend; the length and the mix spread it over the whole word."""
    return _mix(zlib.crc32(data) | len(data) << 32)


# The pick ----------------------------------------------------------------------------------------
def rank(key: int, backends: Sequence[Backend]) -> list[int]:
    """Indexes of `backends` in the conversation's own order: weighted rendezvous hashing.

    Each backend scores weight / -ln(u), u uniform in (0, 1) from (key, backend name), so backend i
    comes first for a share weight_i / sum(weights) of keys, and removing one backend changes the
    order of no other. With equal weights the order of the u alone is the same, without the logs.
    """
    draws = [_mix(key ^ _seed(b.name)) for b in backends]
    weights = {b.weight for b in backends}
    if len(weights) > 1 or 0 in weights:
        scores = [
            b.weight / -math.log(((d >> 11) | 1) * 2.0**-53) if b.weight > 0 else -1.0
            for b, d in zip(backends, draws, strict=True)
        ]
        return sorted(range(len(backends)), key=scores.__getitem__, reverse=True)
    return sorted(range(len(backends)), key=draws.__getitem__, reverse=True)


_SEEDS: dict[str, int] = {}


def _seed(name: str) -> int:
    seed = _SEEDS.get(name)
    if seed is None:
        seed = _SEEDS[name] = _mix(zlib.crc32(name.encode()) ^ 0x2545F4914F6CDD1D)
    return seed


def _mix(z: int) -> int:
    """splitmix64's finalizer: every input bit flips about half the output bits."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


@dataclass
class RecentLoad:
    """Calls this instance sent to each (backend, deployment) lately, each counting less as it ages.

    Per instance on purpose: every instance sees a fair sample of the traffic, so its own counts
    say which backend is over its share without a Table read on the request path. With state in
    the Table the instances also publish them (`lb.state.affinity`), a second or two late.
    """

    half_life: float = LOAD_HALF_LIFE_SECONDS
    _counts: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)  # -> (count, as of)

    def add(self, backend: str, deployment: str, now: float) -> None:
        self.count(backend, deployment, now, add=True)

    def get(self, backend: str, deployment: str, now: float) -> float:
        count, since = self._counts.get((backend, deployment), (0.0, now))
        return count * 0.5 ** ((now - since) / self.half_life) if now > since else count

    def last(self, backend: str, deployment: str) -> float | None:
        """When the pair was last counted; None if never."""
        entry = self._counts.get((backend, deployment))
        return entry[1] if entry else None

    def count(self, backend: str, deployment: str, now: float, add: bool) -> float:
        """The count before this call, which is counted too when `add` (one look-up for both)."""
        before = self.get(backend, deployment, now)
        if add:
            self._counts[(backend, deployment)] = (before + 1.0, now)
        return before

    def snapshot(self, now: float) -> list[list[str | float]]:
        """Every count as of `now`, [backend, deployment, count], dropping those faded below 0.01."""
        rows: list[list[str | float]] = []
        for backend, deployment in list(self._counts):
            count = self.get(backend, deployment, now)
            if count >= 0.01:
                rows.append([backend, deployment, round(count, 3)])
            else:
                del self._counts[(backend, deployment)]
        return rows

    def merge(self, rows: list[list[str | float]], now: float) -> None:
        """Adds a `snapshot` of another instance's (taken as of `now`)."""
        for backend, deployment, count in rows:
            key = (str(backend), str(deployment))
            self._counts[key] = (self.get(*key, now) + float(count), now)


def pool_secret(backends: Sequence[Backend]) -> bytes:
    """A secret every instance derives alike from its configuration: a hash of the backends' names,
    URLs and API keys. No client sees a backend key, so with keys no client can work it out; a pool
    whose backends all use Entra ID has none, and its names and URLs may be known."""
    digest = hashlib.blake2b(b"lb-affinity", digest_size=32)
    for backend in sorted(backends, key=lambda b: b.name):
        for part in (backend.name, backend.url, backend.api_key or ""):
            data = part.encode()
            digest.update(len(data).to_bytes(4, "little") + data)
    return digest.digest()


def local_secret(backends: Sequence[Backend]) -> bytes:
    """The secret before (or without) the state table's: `pool_secret` when some backend has an API
    key (every instance alike, and unpredictable), else random for this process (unpredictable; with
    state in memory there is one instance, and with the Table the table's secret replaces it)."""
    if any(b.api_key for b in backends):
        return pool_secret(backends)
    return secrets.token_bytes(32)


@dataclass
class Affinity:
    """Picks within a priority group by conversation: its own order, each backend shedding what exceeds its share.

    Soft bound, on what backends are *offered*, not on where calls went: each backend counts the
    recent calls that reached it in their conversation's order (as first choice, or passed on by
    a busier one). One offered more than `factor` times its fair share of recent calls passes the
    excess on, as a fixed set of conversations (those whose own draw for it is lowest), each to
    the next backend of its order. Moving the same conversations every time, not a share of every
    conversation's calls, is what lets a moved conversation settle (and be cached) where it went;
    counting offers, not outcomes, keeps that set still while the moves even out the load.

    Hard bound, on where calls went: a backend that served `bound` times its fair share of recent
    calls (of at least `min_calls`) is skipped. The soft bound relies on keys being many and spread;
    this one holds for any keys, so a heavy conversation's overflow, or a client's crafted keys,
    spread down their order. With many ordinary conversations it does not bind (the soft one keeps
    every backend within about 10% of its share).
    """

    secret: bytes = b""  # the pool's: ranks and draws keyed with it are the same on every instance
    offered: RecentLoad = field(default_factory=RecentLoad)  # per backend: calls that reached it in order
    served: RecentLoad = field(default_factory=RecentLoad)  # per backend: calls it was picked for
    calls: RecentLoad = field(default_factory=RecentLoad)  # per deployment: calls picked (backend "")
    factor: float = LOAD_FACTOR
    bound: float = LOAD_BOUND
    min_calls: float = LOAD_MIN_CALLS
    # Shared through the Table (lb.state.affinity); alone (state in memory) these stay as they are.
    instances: int = 1  # live instances of the pool: each one's allowance is min_calls / instances**2
    others: RecentLoad | None = None  # the other instances' served and calls, as last read
    shared_after: float = 0.0  # a call this long after this instance's previous one reads the pool's counts
    _rng: random.Random = field(default_factory=random.Random, repr=False)  # ties at the bound: a draw per call

    @property
    def allowance(self) -> float:
        """Recent calls below which an instance measures the hard bound as if it had seen this many.

        `min_calls` for a lone instance. Several instances each count only their own calls, so their
        allowances add up: each gets min_calls / instances**2, not / instances, because an instance
        that saw fewer than its share of a burst's first calls spends its allowance in full (the
        offline model: / instances left a backend up to 1.45x its share after call 30 in 4 to 12 of
        60 runs, / instances**2 at most 1.31x in 300 runs each of 2, 3 and 4; docs/affinity.md).
        """
        return self.min_calls / max(1, self.instances) ** 2

    def keyed(self, key: int) -> int:
        """The conversation key hashed with the pool's secret: what its order and draws derive from."""
        data = key.to_bytes(8, "little")
        return int.from_bytes(hashlib.blake2b(data, key=self.secret[:64], digest_size=8).digest(), "little")

    def order(self, key: int, members: Sequence[Backend]) -> list[int]:
        """Indexes of `members` in the conversation's own order (the same on every instance of the pool)."""
        return rank(self.keyed(key), members)

    def choose(
        self,
        key: int,
        deployment: str,
        members: Sequence[Backend],
        fair: Sequence[float],
        now: float,
        charge: bool = True,
    ) -> Backend:
        """The first backend in `key`'s order that keeps this conversation and is under its bound.

        `fair` are the weights a fair share is measured by (the policy's weights: configured, or
        times the quota left under `headroom`), so a backend short of quota sheds sooner.
        """
        secret_key = self.keyed(key)
        order = rank(secret_key, members)
        previous = self.calls.last("", deployment)
        total, weight = self.calls.count("", deployment, now, charge), sum(fair)
        balance = total >= self.min_calls  # else shares are chance: nobody moves by the soft bound
        # Quiet here (no call for two refreshes): the pool's counts as last read are about complete, so
        # the hard bound is the pool's, with the pool's allowance. Busy: this instance's own counts,
        # whose 1.3x adds up to 1.3x over the pool, and its part of the allowance.
        others = self.others if previous is None or now - previous >= self.shared_after else None
        if others is not None:
            pool_total = total + others.get("", deployment, now)
            room = self.bound * max(pool_total + 1.0, self.min_calls) / (weight or 1.0)
        else:
            room = self.bound * max(total + 1.0, self.allowance) / (weight or 1.0)  # hard bound per unit of fair weight
        chosen = members[order[0]] if weight <= 0 else None  # no shares to measure: the conversation's first
        for i in order if chosen is None else ():
            backend = members[i]
            offers = self.offered.count(backend.name, deployment, now, charge)
            served = self.served.get(backend.name, deployment, now)
            if others is not None:
                served += others.get(backend.name, deployment, now)
            if served + 1.0 > room * fair[i]:
                continue  # at its hard bound: down the order, whatever the soft bound says
            if not balance or i == order[-1]:
                chosen = backend
                break
            cap = self.factor * total * fair[i] / weight
            if offers <= cap or _draw(secret_key, backend) >= 1.0 - cap / offers:
                chosen = backend
                break
        if chosen is None:  # every backend at its bound: the least loaded for its share, ties drawn per call
            rest = [i for i in order if fair[i] > 0] or order
            loads = {i: self.served.get(members[i].name, deployment, now) / fair[i] for i in rest}
            least = min(loads.values())
            chosen = members[self._rng.choice([i for i in rest if loads[i] <= least + 1e-9])]
        if charge:
            self.served.add(chosen.name, deployment, now)
        return chosen


def _draw(key: int, backend: Backend) -> float:
    """The conversation's own uniform number for `backend`, independent of its rank there."""
    return (_mix(key ^ _seed(backend.name) ^ _SHED_SALT) >> 11) * 2.0**-53

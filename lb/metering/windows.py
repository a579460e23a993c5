"""Counts over the last minute and the last hour, per key, in time buckets.

Why buckets: a sliding window must forget old counts without keeping one record per request. A
key's counts live in one-second buckets (the last 60 s: the minute, and a quota's window) and
one-minute buckets (the last 60 min: the hour). A bucket is a small list of ints so one structure
serves every kind of count (tokens by kind for metering; requests and charged tokens for quotas).
Times are epoch seconds (`time.time()`), because buckets are compared across instances.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from operator import add

MINUTE = 60
HOUR = 3600


class Windows:
    """`width` counters per key, in second and minute buckets."""

    def __init__(self, width: int) -> None:
        self.width = width
        self._seconds: dict[str, dict[int, list[int]]] = {}
        self._minutes: dict[str, dict[int, list[int]]] = {}

    def add(self, key: str, at: float, values: Iterable[int]) -> None:
        """Count `values` at epoch second `at` (a correction may be negative: a true-up)."""
        second, values = int(at), list(values)
        _bump(self._seconds, key, second, values)
        _bump(self._minutes, key, second // MINUTE, values)

    def minute(self, key: str, now: float, span: int = MINUTE) -> list[int]:
        """Sums over the last `span` one-second buckets (60: the last minute), this second's included."""
        return _sum(self._seconds.get(key, {}), int(now) - span + 1, self.width)

    def hour(self, key: str, now: float) -> list[int]:
        """Sums over the last 60 one-minute buckets, this minute included."""
        return _sum(self._minutes.get(key, {}), int(now) // MINUTE - MINUTE + 1, self.width)

    def seconds(self, key: str, now: float, span: int = MINUTE) -> Iterator[tuple[int, list[int]]]:
        """(second, counts) of the last `span` one-second buckets, oldest first."""
        start = int(now) - span + 1
        per_key = self._seconds.get(key, {})
        return ((s, per_key[s]) for s in sorted(per_key) if s >= start)

    def minute_buckets(self, key: str, now: float) -> Iterator[tuple[int, list[int]]]:
        """(minute, counts) of the buckets still in the hour window."""
        start = int(now) // MINUTE - MINUTE + 1
        return ((m, v) for m, v in self._minutes.get(key, {}).items() if m >= start)

    def keys(self) -> list[str]:
        return list(self._minutes)

    def buckets(self, now: float, span: int = MINUTE) -> dict[str, dict[str, list[list[int]]]]:
        """Every key's live buckets (the last `span` seconds), as lists `[slot, *counts]`: what an instance shares."""
        second, minute = int(now) - span + 1, int(now) // MINUTE - MINUTE + 1
        shared: dict[str, dict[str, list[list[int]]]] = {}
        for key in self.keys():
            s = [[t, *v] for t, v in self._seconds.get(key, {}).items() if t >= second]
            m = [[t, *v] for t, v in self._minutes.get(key, {}).items() if t >= minute]
            if s or m:
                shared[key] = {"s": s, "m": m}
        return shared

    def load(self, shared: dict[str, dict[str, list[list[int]]]]) -> None:
        """Add another instance's shared buckets (see `buckets`)."""
        for key, kinds in shared.items():
            for name, target in (("s", self._seconds), ("m", self._minutes)):
                per_key = target.setdefault(key, {})
                for row in kinds.get(name, ()):
                    slot, values = int(row[0]), row[1 : 1 + self.width]
                    bucket = per_key.setdefault(slot, [0] * self.width)
                    for i, v in enumerate(values):
                        bucket[i] += int(v)

    def prune(self, now: float) -> None:
        """Forget buckets older than the windows (a key unused for an hour goes entirely)."""
        for buckets, oldest in ((self._seconds, int(now) - MINUTE), (self._minutes, int(now) // MINUTE - MINUTE)):
            for key in list(buckets):
                _prune(buckets[key], oldest)
                if not buckets[key]:
                    del buckets[key]


def _bump(buckets: dict[str, dict[int, list[int]]], key: str, slot: int, values: list[int]) -> None:
    per_key = buckets.get(key)
    if per_key is None:
        per_key = buckets[key] = {}
    bucket = per_key.get(slot)
    if bucket is None:
        per_key[slot] = values.copy()
        if len(per_key) > 2 * MINUTE + 2:  # a key counted at every slot still keeps only its windows
            _prune(per_key, slot - MINUTE - 1)
    else:
        per_key[slot] = list(map(add, bucket, values))


def _prune(per_key: dict[int, list[int]], oldest: int) -> None:
    for slot in [s for s in per_key if s < oldest]:
        del per_key[slot]


def _sum(per_key: dict[int, list[int]], start: int, width: int) -> list[int]:
    total = [0] * width
    for slot, values in per_key.items():
        if slot >= start:
            for i, v in enumerate(values):
                total[i] += v
    return total

"""What each (backend, deployment) last said about its remaining quota, and what that is worth.

Azure OpenAI puts `x-ratelimit-remaining-requests` / `-tokens` on every answer. Read after each
attempt, they let the balancer steer away from a backend *before* it answers 429, instead of
paying a wasted round trip to find out. The record is local to the instance on purpose: it changes
on every answer, so sharing it through the Table would cost a write per request, and every
instance reads the same counters from the backend anyway (each answer carries the backend's
global remaining quota, not this instance's share).

Azure sends no limit header, so the most seen lately (`Peak`) stands in for the limit when
turning "remaining" into a fraction. A reading is trusted only for the rate-limit window (Azure evaluates
per 10 s), until an `x-ratelimit-reset-*` header says the quota refills, or until the next refill
predicted from the window learnt between two refills; after that the backend counts as unknown
and gets a full share, so a backend is never starved on old news.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lb.routing.throttle import parse_duration
from lb.state import ANY_DEPLOYMENT

STALE_AFTER_SECONDS = 10.0  # Azure evaluates RPM per 10 s: older readings say little about now
MAX_EXHAUSTED_HOLD_SECONDS = 60.0  # a reset header is believed this far at most (like LB_MAX_COOLDOWN_SECONDS)
EXHAUSTED_HOLD_SECONDS = 1.0  # "0 left" without a reset header: the next call would be a 429 for about this long
SHORT_HOLD_SECONDS = 1.0  # "fewer tokens left than this request needs" is believed for this long
SHORT_MARGIN = 2.0  # fits only with twice the call's tokens left: calls in flight are not in the reading yet
MIN_WINDOW_SECONDS = 0.5  # refills closer than this are noise (answers out of order), not a window
MIN_SHARE = 0.05  # the least share a backend keeps, so fresh low readings still get refreshed
NEAR_LIMIT_FRACTION = 0.25  # a backend with this little quota left may throttle any moment
PEAK_MEMORY_SECONDS = 120.0  # the limit's stand-in is the most seen over the last 120-240 s
DRAIN_MIN_INTERVAL = 0.05  # readings closer than this are too noisy to tell a consumption rate


@dataclass(frozen=True)
class Peak:
    """The most a remaining-counter showed lately: it stands in for the limit Azure doesn't send.

    Two buckets of PEAK_MEMORY_SECONDS rather than the most ever seen, so a quota that was lowered
    (or that other callers now share) is learnt, instead of the backend looking nearly empty, and
    the pool under pressure, for good. Every window's refill shows the full quota again anyway.
    """

    current: int = 0
    previous: int = 0
    since: float = 0.0  # epoch second the current bucket began

    def see(self, value: int | None, now: float) -> Peak:
        current, previous, since = self.current, self.previous, self.since
        if now - since >= PEAK_MEMORY_SECONDS:
            previous = current if now - since < 2 * PEAK_MEMORY_SECONDS else 0
            current, since = 0, now
        return Peak(max(current, value or 0), previous, since)

    @property
    def most(self) -> int:
        return max(self.current, self.previous)


@dataclass
class Reading:
    """The latest remaining quota one (backend, deployment) reported, and when."""

    requests: int | None  # x-ratelimit-remaining-requests
    tokens: int | None  # x-ratelimit-remaining-tokens
    seen: float  # epoch seconds
    stale_at: float  # after this the quota may have refilled: the reading is ignored
    exhausted_until: float  # 0.0, or until when a reported 0 makes the next call a sure 429
    requests_peak: Peak  # most remaining-requests seen lately: the limit Azure doesn't send
    tokens_peak: Peak
    drain: float = 0.0  # tokens per second the backend's quota falls by (every caller), from successive readings
    sent: int = 0  # tokens this instance has sent there since the reading
    refilled_at: float = 0.0  # when a reading last showed the tokens quota refilled (0.0: never seen)
    window: float = 0.0  # shortest time seen between two refills: the quota's window, learnt (0.0: unknown)

    @property
    def most_requests(self) -> int:
        return self.requests_peak.most

    @property
    def most_tokens(self) -> int:
        return self.tokens_peak.most

    def tokens_at(self, now: float) -> int | None:
        """Tokens left now: the reading less what was spent since, by this instance or (at the drain rate) anyone.

        A reading is as old as the last answer, and other instances keep spending meanwhile; without
        this, every instance would pile onto a backend whose last good news is already used up.
        """
        if self.tokens is None:
            return None
        return max(0, self.tokens - int(max(self.sent, self.drain * (now - self.seen))))

    def near_limit(self, now: float) -> bool:
        """Whether the backend is close enough to its quota that a 429 may come any moment."""
        return self.fraction(now) <= NEAR_LIMIT_FRACTION

    def fraction(self, now: float) -> float:
        """Share of the quota left: the scarcer of requests and tokens, 1.0 when unknown."""
        parts = [
            left / most
            for left, most in ((self.requests, self.most_requests), (self.tokens_at(now), self.most_tokens))
            if left is not None and most > 0
        ]
        return min(parts, default=1.0)


class Headroom:
    """Per-instance record of remaining quota, updated after every attempt; no locks (one event loop)."""

    def __init__(self, stale_after: float = STALE_AFTER_SECONDS) -> None:
        self.stale_after = stale_after
        self._readings: dict[tuple[str, str], Reading] = {}

    def record(self, backend: str, deployment: str, headers: Mapping[str, str], now: float) -> Reading | None:
        """Remember what an answer said, and return it (None: it said nothing about quota).

        Callers skip 429s: their zeros say less than their Retry-After."""
        requests = _count(headers.get("x-ratelimit-remaining-requests"))
        tokens = _count(headers.get("x-ratelimit-remaining-tokens"))
        if requests is None and tokens is None:
            return None
        reset_requests = parse_duration(headers.get("x-ratelimit-reset-requests"))
        reset_tokens = parse_duration(headers.get("x-ratelimit-reset-tokens"))
        resets = [r for r in (reset_requests, reset_tokens) if r is not None]
        stale_at = now + (min(min(resets), self.stale_after) if resets else self.stale_after)
        key = (backend, deployment)
        old = self._readings.get(key)
        refilled_at, window = _refill(old, tokens, now)
        next_refill = refilled_at + window * (1 + (now - refilled_at) // window) if window else 0.0
        if next_refill and not resets:  # the quota refills on a schedule we have seen: the reading ends there
            stale_at = min(stale_at, next_refill)
        exhausted_until = 0.0
        if requests == 0 or tokens == 0:
            reset = reset_requests if requests == 0 else reset_tokens
            hold = EXHAUSTED_HOLD_SECONDS if reset is None else min(reset, MAX_EXHAUSTED_HOLD_SECONDS)
            exhausted_until = now + hold
            if reset is None and next_refill:  # ... and so does "0 left": holding past the refill wastes it
                exhausted_until = min(exhausted_until, next_refill)
        reading = self._readings[key] = Reading(
            drain=_drain(old, tokens, now),
            refilled_at=refilled_at,
            window=window,
            requests=requests,
            tokens=tokens,
            seen=now,
            stale_at=max(stale_at, exhausted_until),
            exhausted_until=exhausted_until,
            requests_peak=(old.requests_peak if old else Peak()).see(requests, now),
            tokens_peak=(old.tokens_peak if old else Peak()).see(tokens, now),
        )
        return reading

    def fresh(self, backend: str, deployment: str, now: float) -> Reading | None:
        """The reading if it still describes now; a stale one is dropped (the backend gets probed)."""
        reading = self._readings.get((backend, deployment))
        if reading is None or _stale(reading, now):
            return None
        return reading

    def exhausted_until(self, backend: str, deployment: str, now: float) -> float:
        """Epoch second a backend that reported 0 left can take calls again; 0.0 if it can now."""
        reading = self.fresh(backend, deployment, now)
        return reading.exhausted_until if reading is not None else 0.0

    def charge(self, backend: str, deployment: str, need: int) -> None:
        """Count a call just sent there against the last reading, until the next reading includes it."""
        reading = self._readings.get((backend, deployment))
        if reading is not None:
            reading.sent += need

    def share(self, backend: str, deployment: str, need: int, now: float) -> tuple[float, bool]:
        """(weight factor in [MIN_SHARE, 1], whether it is too short of tokens for `need` right now)."""
        reading = self.fresh(backend, deployment, now)
        if reading is None:
            return 1.0, False  # unknown or stale: full share, so it is probed
        left = reading.tokens_at(now)
        short = need > 0 and left is not None and left < need * SHORT_MARGIN and now - reading.seen < SHORT_HOLD_SECONDS
        return max(reading.fraction(now), MIN_SHARE), short

    def report(self, backend: str, now: float) -> list[dict[str, Any]]:
        """What `/lb/status` shows: every deployment's last reading of this backend."""
        return [
            {
                "deployment": None if deployment == ANY_DEPLOYMENT else deployment,
                "remaining_requests": r.requests,
                "remaining_tokens": r.tokens,
                "seconds_ago": round(now - r.seen, 3),
                "stale": _stale(r, now),
                "exhausted_seconds_left": round(r.exhausted_until - now, 3) if r.exhausted_until > now else None,
            }
            for (name, deployment), r in self._readings.items()
            if name == backend
        ]


def _refill(old: Reading | None, tokens: int | None, now: float) -> tuple[float, float]:
    """(when the quota last refilled, the window learnt from refills), updated by a new reading.

    Azure sends no reset time on a 200, but a jump in remaining tokens of over half the quota is a
    refill; the time between two is the window (its shortest, as idle spells only lengthen it).
    """
    if old is None:
        return 0.0, 0.0
    if tokens is None or old.tokens is None or tokens - old.tokens <= old.most_tokens / 2:
        return old.refilled_at, old.window
    if not old.refilled_at or now - old.refilled_at < MIN_WINDOW_SECONDS:
        return now, old.window
    interval = now - old.refilled_at
    return now, min(old.window, interval) if old.window else interval


def _drain(old: Reading | None, tokens: int | None, now: float) -> float:
    """Smoothed rate the backend's remaining tokens fell at between two readings of one window."""
    if old is None or old.tokens is None or tokens is None:
        return 0.0
    elapsed = now - old.seen
    if elapsed < DRAIN_MIN_INTERVAL or tokens > old.tokens:  # too close to tell, or the quota refilled
        return old.drain
    rate = (old.tokens - tokens) / elapsed
    return rate if not old.drain else (old.drain + rate) / 2


def _stale(reading: Reading, now: float) -> bool:
    # Past a reported exhaustion the quota has refilled by definition, whatever the window.
    return reading.stale_at <= now or 0.0 < reading.exhausted_until <= now


def _count(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        value = int(float(raw.strip()))
    except (ValueError, OverflowError):
        return None
    return value if value >= 0 else None

"""How long to keep a backend out of rotation after it pushed back.

Azure OpenAI says when to come back in several ways; we trust the most precise one present:
`retry-after-ms`, then `Retry-After` (seconds or an HTTP-date), then `x-ratelimit-reset-requests`
/ `-tokens` (seconds, or Go-style durations such as `6m0s` / `20ms`). Anything unparseable,
negative or already past is ignored, and the result is clamped so a bogus huge value cannot take
a backend out for hours.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

MIN_COOLDOWN_SECONDS = 1.0  # "Retry-After: 0" or a 5xx's hint still gets a breather: no hammering a flapping backend
# A 429's own positive hint is honoured down to this: cooling past the quota's refill would waste
# quota the backend has already given back (Azure's retry-after-ms can be a few hundred ms).
MIN_HINTED_COOLDOWN_SECONDS = 0.1

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def cooldown_seconds(
    headers: Mapping[str, str], *, default: float, maximum: float, now: float | None = None, throttled: bool = True
) -> tuple[float, str]:
    """Return (seconds to cool, which header said so), clamped to [floor, maximum]: the floor is
    MIN_HINTED_COOLDOWN_SECONDS for a positive hint on a 429 (`throttled`), else MIN_COOLDOWN_SECONDS."""
    seconds, source = _from_headers(headers, time.time() if now is None else now)
    if seconds is None:
        seconds, source = default, "default"
    hinted = throttled and source != "default" and seconds > 0
    return clamp(seconds, maximum, MIN_HINTED_COOLDOWN_SECONDS if hinted else MIN_COOLDOWN_SECONDS), source


def clamp(seconds: float, maximum: float, floor: float = MIN_COOLDOWN_SECONDS) -> float:
    return min(max(seconds, floor), max(maximum, floor))


def _from_headers(headers: Mapping[str, str], now: float) -> tuple[float | None, str]:
    ms = _number(headers.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000.0, "retry-after-ms"
    retry_after = headers.get("retry-after")
    if retry_after is not None:
        seconds = _number(retry_after)
        if seconds is None:
            seconds = _http_date(retry_after, now)
        if seconds is not None:
            return seconds, "retry-after"
    resets = [
        s
        for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
        if (s := parse_duration(headers.get(name))) is not None
    ]
    if resets:
        return max(resets), "x-ratelimit-reset"
    return None, "default"


def _number(raw: str | None) -> float | None:
    """A non-negative finite number, or None."""
    if raw is None:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _http_date(raw: str, now: float) -> float | None:
    try:
        when = parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None or when.tzinfo is None:
        return None
    seconds = when.timestamp() - now
    return seconds if seconds > 0 else None


def parse_duration(raw: str | None) -> float | None:
    """Seconds from `12`, `1.5`, `6m0s`, `1h2m3.5s` or `20ms`; None when malformed."""
    if raw is None:
        return None
    raw = raw.strip()
    plain = _number(raw)
    if plain is not None:
        return plain
    if not raw or _DURATION_RE.sub("", raw):  # something other than number+unit pairs
        return None
    return sum(float(n) * _UNITS[unit] for n, unit in _DURATION_RE.findall(raw))

"""Which failures say something about a backend, rather than about one request.

A 429, or a 503 with Retry-After, is the backend itself saying it is busy: the proxy cools it at
once (`lb.routing.throttle`). A timeout or a 5xx is only one request's outcome: a prompt that makes every
model slow, or that every backend answers with 500, says nothing about any backend. So such a
failure only lets that request fail over, and it becomes evidence against the backend only when
the same request then succeeded on another backend (the request was fine; this backend was not).
A request that failed everywhere it was tried is evidence against nothing.

The evidence is counted per (backend, deployment) like API Management's backend circuit breaker:
`threshold` failures from distinct requests within `window` seconds, with no success from that
backend in between, open the circuit, i.e. cool the pair like a 429 would.

A backend's own 401/403 is a third kind: its credential is wrong (a rotated key, a missing role).
`AuthFailures` remembers the cause per backend so `/lb/status` can show it and the log says it once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

DEFAULT_THRESHOLD = 3
DEFAULT_WINDOW_SECONDS = 30.0


class Breaker:
    """Counts failures from distinct requests per (backend, deployment); a success clears them."""

    def __init__(self, threshold: int = DEFAULT_THRESHOLD, window: float = DEFAULT_WINDOW_SECONDS) -> None:
        self.threshold = threshold
        self.window = window
        self._failures: dict[tuple[str, str], list[float]] = {}

    def failure(self, backend: str, deployment: str, now: float) -> int | None:
        """Record one request's failure; the number of failures when this one opens the circuit."""
        key = (backend, deployment)
        times = [t for t in self._failures.get(key, ()) if now - t < self.window]
        times.append(now)
        if len(times) >= self.threshold:
            del self._failures[key]
            return len(times)
        self._failures[key] = times
        return None

    def success(self, backend: str, deployment: str) -> None:
        """The backend answered well: earlier failures no longer count (cheap when there are none)."""
        if self._failures:
            self._failures.pop((backend, deployment), None)

    def pending(self, backend: str, deployment: str, now: float) -> int:
        """Failures counted and not yet expired (for tests and /lb/status)."""
        return sum(1 for t in self._failures.get((backend, deployment), ()) if now - t < self.window)


@dataclass(frozen=True)
class AuthFailure:
    """Why a backend refused the proxy's credential: its status and its own words, never a secret."""

    status: int
    cause: str
    since: float  # epoch second first seen


class AuthFailures:
    """Backends currently refusing our credential; one log line per backend per outage."""

    def __init__(self) -> None:
        self.by_backend: dict[str, AuthFailure] = {}

    def record(self, backend: str, status: int, cause: str) -> bool:
        """True when this is news (the backend was fine before, or its cause changed): log it then."""
        known = self.by_backend.get(backend)
        if known is not None and known.status == status and known.cause == cause:
            return False
        self.by_backend[backend] = AuthFailure(status, cause, known.since if known else time.time())
        return True

    def clear(self, backend: str) -> bool:
        """The backend accepted us again; True when it had been failing."""
        return bool(self.by_backend) and self.by_backend.pop(backend, None) is not None

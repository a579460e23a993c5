"""A Table store's health as that store sees it: one set of rules for the four stores that share the
account (cooldowns, object records, usage counts, affinity counts).

A fault marks the store unhealthy and is kept as one line (`last_error`: the exception's type, its
status and the first line of its message, never a body, a key or a token); only the first fault of
an outage is logged, at WARNING, saying what the store does meanwhile, and the first success after
it logs the recovery once, at INFO, so an outage never floods the log. A store that would otherwise
ask a faulty table on every request waits `retry_seconds` between tries (`may_call`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

ERROR_CHARS = 160


def describe(exc: BaseException) -> str:
    """One line about a Table fault: `ServiceRequestError: Cannot connect ...`, `HttpResponseError 403: ...`."""
    status = getattr(exc, "status_code", None)
    first_line = str(exc).splitlines()[0][:ERROR_CHARS] if str(exc) else ""
    return f"{type(exc).__name__}{f' {status}' if status else ''}: {first_line}".rstrip(": ")


@dataclass
class TableHealth:
    name: str  # "state table", "object table", ...: how the log names it
    log: logging.Logger
    retry_seconds: float = 0.0  # while unhealthy, tries at most this often (`may_call`)
    healthy: bool = True
    last_error: str | None = None
    _since: float = field(default=0.0, repr=False)  # monotonic: when the outage began
    _retry_at: float = field(default=0.0, repr=False)

    def fault(self, exc: BaseException, meanwhile: str) -> bool:
        """Record a fault; True when it begins an outage (then logged, with what the store does `meanwhile`)."""
        self.last_error = describe(exc)
        now = time.monotonic()
        self._retry_at = now + self.retry_seconds
        if not self.healthy:
            return False
        self.healthy = False
        self._since = now
        self.log.warning("%s unreachable, %s: %s", self.name, meanwhile, self.last_error)
        return True

    def ok(self, detail: str = "") -> bool:
        """Record a success; True when it ends an outage (then logged once, with `detail`)."""
        if self.healthy:
            return False
        self.healthy = True
        seconds = time.monotonic() - self._since
        self.log.info("%s reachable again after %.1fs%s", self.name, seconds, f": {detail}" if detail else "")
        return True

    def may_call(self) -> bool:
        """Whether to ask the table now: always while healthy, else once `retry_seconds` have passed."""
        return self.healthy or time.monotonic() >= self._retry_at

    def retry_in(self) -> float:
        """Seconds until the table is asked again (at least 1: what a client's Retry-After says)."""
        return max(1.0, self._retry_at - time.monotonic())

"""Cooldown state: which (backend, deployment) pairs are out of rotation, and until when.

The request path only ever reads the in-memory view (`cooling_until`), so it costs a dict lookup.
`CooldownStore` is the interface; `MemoryStore` keeps the view for one process. A shared store
(Table Storage, `lb.state.table`) extends the same view: it publishes `mark()` in the background
and refreshes the view from the shared table, so instances learn of each other's 429s.

Times are wall-clock (`time.time()`) seconds, because they are compared across instances.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

ANY_DEPLOYMENT = "*"  # key for calls that name no deployment (e.g. GET /openai/v1/models)


@dataclass(frozen=True)
class Cooldown:
    backend: str
    deployment: str
    until: float  # epoch seconds
    reason: str
    instance: str = ""


class CooldownStore:
    """In-memory cooldown view; the base of every store.

    Subclasses override the async hooks; the sync methods are the hot path and must not block.
    """

    kind = "memory"

    def __init__(self) -> None:
        self._view: dict[tuple[str, str], Cooldown] = {}

    # Hot path ---------------------------------------------------------------------------------
    def cooling_until(self, backend: str, deployment: str, now: float) -> float:
        """Epoch second the pair recovers, or 0.0 when it is in rotation."""
        entry = self._view.get((backend, deployment))
        if entry is None:
            return 0.0
        if entry.until <= now:
            del self._view[(backend, deployment)]
            return 0.0
        return entry.until

    def mark(self, backend: str, deployment: str, until: float, reason: str) -> Cooldown:
        """Take the pair out of rotation until `until`; never shortens a longer cooldown."""
        entry = self._merge(Cooldown(backend, deployment, until, reason, self.instance_id))
        self.publish(entry)
        return entry

    async def sync(self) -> None:
        """Called once per request before selection: a shared store may refresh its view here."""

    # Extension points -------------------------------------------------------------------------
    instance_id = ""

    def expect_throttling(self, now: float) -> None:
        """A backend said its quota is nearly used up: a shared store gets ready to share a 429 fast."""

    def publish(self, entry: Cooldown) -> None:
        """Share a new cooldown with other instances (background, must not block)."""

    async def start(self) -> None:
        """Open connections; called once before the first request."""

    async def flush(self) -> None:
        """Return once every cooldown published so far is shared (written, or given up on)."""

    async def close(self) -> None:
        """Release connections and wait for pending writes."""

    def health(self) -> dict[str, Any]:
        return {"kind": self.kind, "healthy": True}

    # Helpers ----------------------------------------------------------------------------------
    def _merge(self, entry: Cooldown) -> Cooldown:
        """Keep whichever cooldown ends later; return the one now in the view."""
        key = (entry.backend, entry.deployment)
        current = self._view.get(key)
        if current is not None and current.until >= entry.until:
            return current
        self._view[key] = entry
        return entry

    def active(self, now: float | None = None) -> list[Cooldown]:
        now = time.time() if now is None else now
        return [c for c in self._view.values() if c.until > now]


class MemoryStore(CooldownStore):
    """State of this process only: right for one instance or local development."""

"""Which backend serves the next attempt.

Candidates are the backends that serve the deployment, have not been tried for this request and
are not cooling. Among them only the best (lowest) priority group is used, and the pick inside it
is weighted random, so load spreads while a preferred group (e.g. provisioned throughput) is
drained first.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from lb.config import Backend
from lb.state import ANY_DEPLOYMENT, CooldownStore


@dataclass(frozen=True)
class NoCandidate:
    """Why no backend could be picked."""

    served: bool  # some backend serves this deployment at all
    retry_at: float  # epoch second the soonest cooling candidate recovers; 0.0 if none is cooling


class Balancer:
    def __init__(self, backends: Sequence[Backend], store: CooldownStore, rng: random.Random | None = None) -> None:
        self.backends = tuple(backends)
        self.store = store
        self._rng = rng or random.Random()

    def pick(self, deployment: str | None, now: float, tried: Collection[str] = ()) -> Backend | NoCandidate:
        key = deployment or ANY_DEPLOYMENT
        best: list[Backend] = []
        best_priority = 0
        served = False
        retry_at = 0.0
        for backend in self.backends:
            if not backend.serves(deployment):
                continue
            served = True
            if backend.name in tried:
                continue
            until = self.store.cooling_until(backend.name, key, now)
            if until:
                retry_at = until if not retry_at else min(retry_at, until)
                continue
            if not best or backend.priority < best_priority:
                best, best_priority = [backend], backend.priority
            elif backend.priority == best_priority:
                best.append(backend)
        if not best:
            return NoCandidate(served=served, retry_at=retry_at)
        if len(best) == 1:
            return best[0]
        weights = [b.weight for b in best]
        if not any(weights):  # a group of weight-0 backends is still better than none
            return self._rng.choice(best)
        return self._rng.choices(best, weights=weights)[0]

    def soonest_recovery(self, deployment: str | None, now: float) -> float:
        """Epoch second the first cooling backend for `deployment` recovers; 0.0 if none cools."""
        key = deployment or ANY_DEPLOYMENT
        times = [
            until
            for b in self.backends
            if b.serves(deployment) and (until := self.store.cooling_until(b.name, key, now))
        ]
        return min(times, default=0.0)

"""Which backend serves the next attempt.

Candidates are the backends that serve the deployment, have not been tried for this request and
are not cooling. Among them only the best (lowest) priority group is used, and the pick inside it
is weighted random, so load spreads while a preferred group (e.g. provisioned throughput) is
drained first.

Two policies (`LB_POLICY`) differ only in the weights inside the group:
- `random`: the configured weights. Nothing is estimated per request.
- `headroom`: the configured weights times the share of quota each backend last reported left
  (`lb.headroom`), so load drifts away from a backend before it answers 429. A backend that
  reported 0 left counts as cooling until its quota refills (the 429 round trip is skipped), one
  with fewer tokens left than the request needs is passed over while another has enough, and one
  with no fresh reading gets its full weight so it is probed rather than starved.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from lb.config import POLICIES, Backend
from lb.headroom import Headroom, estimate_tokens
from lb.state import ANY_DEPLOYMENT, CooldownStore


@dataclass(frozen=True)
class NoCandidate:
    """Why no backend could be picked."""

    served: bool  # some backend serves this deployment at all
    retry_at: float  # epoch second the soonest cooling candidate recovers; 0.0 if none is cooling


class Balancer:
    def __init__(
        self,
        backends: Sequence[Backend],
        store: CooldownStore,
        rng: random.Random | None = None,
        *,
        policy: str = "random",
        headroom: Headroom | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}")
        self.backends = tuple(backends)
        self.store = store
        self.policy = policy
        self.headroom = headroom or Headroom()
        self._by_headroom = policy == "headroom"
        self._rng = rng or random.Random()

    def need(self, body: bytes) -> int:
        """Tokens the request will take from a backend's quota; 0 (not computed) under `random`."""
        return estimate_tokens(body) if self._by_headroom and body else 0

    def pick(
        self, deployment: str | None, now: float, tried: Collection[str] = (), need: int = 0
    ) -> Backend | NoCandidate:
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
            until = self._unavailable_until(backend.name, key, now)
            if until:
                retry_at = until if not retry_at else min(retry_at, until)
                continue
            if not best or backend.priority < best_priority:
                best, best_priority = [backend], backend.priority
            elif backend.priority == best_priority:
                best.append(backend)
        if not best:
            return NoCandidate(served=served, retry_at=retry_at)
        if not self._by_headroom:
            return best[0] if len(best) == 1 else self._weighted(best, [b.weight for b in best])
        chosen = best[0] if len(best) == 1 else self._weighted(best, self._headroom_weights(best, key, need, now))
        self.headroom.charge(chosen.name, key, need)
        return chosen

    def _weighted(self, group: list[Backend], weights: list[float]) -> Backend:
        if not any(weights):  # a group of weight-0 backends is still better than none
            return self._rng.choice(group)
        return self._rng.choices(group, weights=weights)[0]

    def soonest_recovery(self, deployment: str | None, now: float) -> float:
        """Epoch second the first unavailable backend for `deployment` recovers; 0.0 if none is."""
        key = deployment or ANY_DEPLOYMENT
        times = [
            until
            for b in self.backends
            if b.serves(deployment) and (until := self._unavailable_until(b.name, key, now))
        ]
        return min(times, default=0.0)

    def _unavailable_until(self, backend: str, key: str, now: float) -> float:
        until = self.store.cooling_until(backend, key, now)
        if self._by_headroom:
            until = max(until, self.headroom.exhausted_until(backend, key, now))
        return until

    def _headroom_weights(self, group: list[Backend], key: str, need: int, now: float) -> list[float]:
        shares = [self.headroom.share(b.name, key, need, now) for b in group]
        enough = [not short for _, short in shares]
        if not any(enough):  # every one is short: the most headroom is still the best bet
            enough = [True] * len(group)
        return [b.weight * share if ok else 0.0 for b, (share, _), ok in zip(group, shares, enough, strict=True)]

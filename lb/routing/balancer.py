"""Which backend serves the next attempt.

Candidates are the backends that serve the deployment, have not been tried for this request and
are not cooling. Among them only the best (lowest) priority group is used, and the pick inside it
is weighted random, so load spreads while a preferred group (e.g. provisioned throughput) is
drained first.

Two policies (`LB_POLICY`) differ only in the weights inside the group:
- `random`: the configured weights. Nothing is estimated per request.
- `headroom`: the configured weights times the share of quota each backend last reported left
  (`lb.routing.headroom`), so load drifts away from a backend before it answers 429. A backend that
  reported 0 left counts as cooling until its quota refills (the 429 round trip is skipped), one
  with fewer tokens left than the request needs counts as cooling for that call while another
  (even of a worse priority) has enough, and one with no fresh reading gets its full weight so it
  is probed rather than starved.

With prompt-cache affinity on (`LB_AFFINITY`, `lb.routing.affinity`), a call whose prompt Azure
could cache (1,024 tokens or more) and that names a conversation is not drawn at random: the group
is ranked in the conversation's own order (weighted rendezvous hashing over the configured weights,
keyed with a secret of the pool no client knows, the same on every instance) and the first backend not over its
share of recent calls takes it. A shorter call is drawn exactly as with affinity off. Who is in
the group is decided as before (cooling, tried, exhausted or short under `headroom`, deployment,
priority), so failover, headroom's holds and a caller's restriction of the candidates all win
over affinity; under `headroom` the fair share is measured by the headroom weights, so a backend
short of quota passes conversations on sooner.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from lb.config import POLICIES, Backend
from lb.requestinfo import RequestInfo
from lb.routing.affinity import Affinity, cacheable, conversation_key, local_secret
from lb.routing.headroom import Headroom
from lb.state import ANY_DEPLOYMENT, CooldownStore


class Shared(Protocol):
    """What the balancer starts and closes with the proxy: `lb.state.affinity.AffinityShare`."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def health(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class NoCandidate:
    """Why no backend could be picked."""

    served: bool  # some backend serves this deployment at all
    retry_at: float  # epoch second the soonest cooling candidate recovers; 0.0 if none is cooling


@dataclass
class Demand:
    """What one call asks of the pool: tokens from a quota (headroom policy) and which conversation it continues.

    The conversation key is worked out on first use only, so a pick that has one candidate (or
    affinity off) never reads the body for it. A prompt too short for Azure to cache has none: its
    pick is the policy's, exactly as with affinity off.
    """

    tokens: int = 0
    body: bytes = b""
    _key: int | None = field(default=None, init=False, repr=False)
    _keyed: bool = field(default=False, init=False, repr=False)

    @property
    def key(self) -> int | None:
        if not self._keyed:
            cached = self.body and cacheable(self.body)
            self._key, self._keyed = (conversation_key(self.body) if cached else None), True
        return self._key


class Balancer:
    def __init__(
        self,
        backends: Sequence[Backend],
        store: CooldownStore,
        rng: random.Random | None = None,
        *,
        policy: str = "random",
        headroom: Headroom | None = None,
        affinity: bool = False,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}")
        self.backends = tuple(backends)
        self.store = store
        self.policy = policy
        self.headroom = headroom or Headroom()
        self._by_headroom = policy == "headroom"
        self._rng = rng or random.Random()
        self.affinity = Affinity(local_secret(self.backends)) if affinity else None
        self.share: Shared | None = None  # with state in the Table: the pool's secret and instances (lb.state.affinity)

    async def start(self) -> None:
        if self.share is not None:
            await self.share.start()

    async def close(self) -> None:
        if self.share is not None:
            await self.share.close()

    def demand(self, info: RequestInfo) -> Demand:
        """What the request asks of the pool: the tokens it will take from a backend's quota (0 under
        `random`) and, with affinity on, the conversation it continues."""
        return Demand(info.tokens if self._by_headroom and info.body else 0, info.body if self.affinity else b"")

    def pick(
        self,
        deployment: str | None,
        now: float,
        tried: Collection[str] = (),
        need: Demand | int = 0,
        charge: bool = True,
    ) -> Backend | NoCandidate:
        """The backend for the next attempt; `charge=False` only looks (nothing is sent to it)."""
        demand = need if isinstance(need, Demand) else Demand(need)
        key = deployment or ANY_DEPLOYMENT
        fits, short = _Group(), _Group()  # short: fewer tokens left than `need` (headroom policy only)
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
            if not self._by_headroom:
                fits.add(backend, backend.weight)
                continue
            share, too_short = self.headroom.share(backend.name, key, demand.tokens, now)
            (short if too_short else fits).add(backend, backend.weight * share)
        # A short backend is like a cooling one for this call: the next priority group is tried first.
        # With none left that fits, short ones are still tried, most headroom first: a reading may be
        # older than the backend's last quota refill (Azure does not say when that is).
        group = fits if fits.members else short
        if not group.members:
            return NoCandidate(served=served, retry_at=retry_at)
        if len(group.members) == 1:
            chosen = group.members[0]
        elif self.affinity is not None and (conversation := demand.key) is not None:
            chosen = self.affinity.choose(conversation, key, group.members, group.weights, now, charge)
        else:
            chosen = self._weighted(group.members, group.weights)
        if self._by_headroom and charge:
            self.headroom.charge(chosen.name, key, demand.tokens)
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


class _Group:
    """The best (lowest) priority group seen so far, with each member's weight."""

    def __init__(self) -> None:
        self.members: list[Backend] = []
        self.weights: list[float] = []
        self.priority = 0

    def add(self, backend: Backend, weight: float) -> None:
        if not self.members or backend.priority < self.priority:
            self.members, self.weights, self.priority = [backend], [weight], backend.priority
        elif backend.priority == self.priority:
            self.members.append(backend)
            self.weights.append(weight)

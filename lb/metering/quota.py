"""Per-client quotas (`LB_CLIENT_LIMITS`): tokens and requests per minute, batches per hour, over the pool.

Why it works this way:
- A sliding 60-second window in one-second buckets (`lb.metering.windows`), not a fixed minute: a fixed
  window lets a client spend two minutes' worth around each boundary.
- A call is admitted against a reservation, as Azure OpenAI and API Management's token-limit
  policy charge an estimate up front: the prompt (body size / 4) plus the output it may produce
  (`max_tokens`, `max_completion_tokens` or `max_output_tokens`, else the deployment's default of
  `LB_RESERVE_TOKENS`) once per choice it asks for (`n`, `best_of`). So a burst of concurrent calls
  cannot all pass before any answer is counted, and a call whose usage never shows (a cut stream,
  a run the backend goes on generating) still costs what it could have used.
- The reservation is not in the window: it is held apart until the call settles, however long
  that takes, and counts against the limit meanwhile (on every instance, `lb.metering.share`).
  Settling puts what the call used in the bucket of the second it ended: a call longer than the
  window is charged when it ends, never in a bucket that already left the window.
- Over several instances, each decides on a view of the others about a second old. So between two
  share rounds an instance reserves for a client at most its share of what was left (what was
  left / instances, at least 2 with a shared table), counting what it reserved in the last two
  rounds (the others may not have read the last one yet), past its first call: the instances
  together cannot admit much more than what was left, however the client spreads its calls.
- A call is refused while the window is full (requests), or while its reservation does not fit in
  what is left (tokens); a call that reserves nothing (a read: polling a background response,
  listing files) is not refused for tokens. A call larger than the whole limit still passes on an empty window (nothing
  charged, nothing reserved), as it would otherwise never pass. The 429 says when enough frees.
- Batches run outside any minute window (Azure's global batch quota), so their tokens are not in
  `tpm`: a client with a token limit creates batches only as its `bph` allows (none without one).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lb.config import ConfigError
from lb.errors import ProxyError
from lb.metering.windows import MINUTE, Windows

REQUESTS, TOKENS, BATCHES = 0, 1, 2
WIDTH = 3  # [requests, tokens, batches] per bucket
# One-second buckets a quota's window sums: 61, so a charge counts for at least 60 s whatever the
# fraction of its second (60 buckets would let it go after 59.x s, and a client spend 61 s' worth).
WINDOW = MINUTE + 1
DEFAULT_RESERVE_TOKENS = 1024  # output reserved for a generating call that names no maximum
_LIMIT_RE = re.compile(r"(\d+)\s*(tpm|rpm|bph)", re.IGNORECASE)
_UNITS = {"tpm": "tokens_per_minute", "rpm": "requests_per_minute", "bph": "batches_per_hour"}


@dataclass(frozen=True)
class Limit:
    """One client's quota; None means that dimension is not limited (batches: see `batch_allowance`)."""

    tokens_per_minute: int | None = None
    requests_per_minute: int | None = None
    batches_per_hour: int | None = None

    def batch_allowance(self) -> int | None:
        """Batches per hour: a token limit without `bph` allows none (their tokens escape `tpm`)."""
        if self.batches_per_hour is not None:
            return self.batches_per_hour
        return 0 if self.tokens_per_minute is not None else None


def parse_limits(text: str) -> dict[str, Limit]:
    """`chatapp=200000tpm/600rpm,batch=50000tpm/2bph` -> {name: Limit}; ConfigError naming the setting."""
    limits: dict[str, Limit] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, spec = item.rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"LB_CLIENT_LIMITS: {item!r} is not client=<n>tpm/<n>rpm")
        if name in limits:
            raise ConfigError(f"LB_CLIENT_LIMITS: client {name!r} is listed twice")
        values: dict[str, int] = {}
        for part in spec.split("/"):
            match = _LIMIT_RE.fullmatch(part.strip())
            if match is None:
                raise ConfigError(
                    f"LB_CLIENT_LIMITS: {part.strip()!r} (client {name!r}) is not <n>tpm, <n>rpm or <n>bph"
                )
            unit, value = match.group(2).lower(), int(match.group(1))
            if unit in values:
                raise ConfigError(f"LB_CLIENT_LIMITS: client {name!r} has two {unit} limits")
            if value < 1 and unit != "bph":
                raise ConfigError(f"LB_CLIENT_LIMITS: client {name!r}: {part.strip()!r} must be at least 1")
            values[unit] = value
        limits[name] = Limit(**{_UNITS[unit]: value for unit, value in values.items()})
    return limits


def parse_reservations(text: str) -> dict[str, int]:
    """`LB_RESERVE_TOKENS`: `4096` (every deployment) or `chat=4096,gpt5=16000,*=1024` -> {deployment or "*": n}."""
    reserve: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, value = item.rpartition("=")
        name = name.strip() if sep else "*"
        if not value.strip().isdigit() or not name:
            raise ConfigError(f"LB_RESERVE_TOKENS: {item!r} is not <tokens> or <deployment>=<tokens>")
        if name in reserve:
            raise ConfigError(f"LB_RESERVE_TOKENS: {name!r} is listed twice")
        reserve[name] = int(value)
    return reserve


class ClientQuotaExceeded(ProxyError):
    """429 for one client's own quota: a code of its own, so it is never mistaken for the pool's."""

    status = 429
    code = "ClientQuotaExceeded"

    def __init__(self, client: str, what: str, seconds: float, headers: dict[str, str]) -> None:
        whole = max(1, math.ceil(seconds))
        super().__init__(
            f"Client '{client}' has used its own quota of {what}. Please retry after {whole} second"
            f"{'s' if whole != 1 else ''}.",
            {**headers, "Retry-After": str(whole), "retry-after-ms": str(max(1, math.ceil(seconds * 1000)))},
        )


class BatchesNotAllowed(ProxyError):
    """403: a client with a token limit and no `bph` may not create batches (retrying never helps)."""

    status = 403
    code = "ClientQuotaExceeded"

    def __init__(self, client: str) -> None:
        super().__init__(f"Client '{client}' has a token quota and no batch allowance: it may not create batches.")


@dataclass
class Charge:
    """What one admitted call reserved, so its end can settle it."""

    client: str
    at: float  # epoch seconds of admission
    tokens: int  # reserved
    headers: dict[str, str]  # the client's own x-ratelimit-remaining-* as of admission
    settled: bool = False


class Limiter:
    """Admits or refuses calls of limited clients; counts this instance's charges and reservations."""

    def __init__(self, limits: dict[str, Limit]) -> None:
        self.limits = limits
        self.local = Windows(WIDTH)  # [requests, tokens, batches] charged here
        self.others = Windows(WIDTH)  # ... by the other instances, as last read from the shared table
        self.reserved: dict[str, list[int]] = {}  # client -> [calls, tokens] in flight here
        self.others_reserved: dict[str, list[int]] = {}  # ... on the other instances
        self.instances = 1  # instances sharing the limits, as last read (`lb.metering.share`)
        self.unseen: dict[str, int] = {}  # client -> tokens reserved here since the last share round ...
        self.unseen_before: dict[str, int] = {}  # ... and in the round before (the others may not have read it)

    def admit(self, client: str, tokens: int, now: float, *, batch: bool = False) -> Charge | None:
        """Reserve `tokens` for the call or raise; None for a client without a limit."""
        limit = self.limits.get(client)
        if limit is None:
            return None
        estimate = tokens if limit.tokens_per_minute is not None else 0
        used = self.used(client, now)
        rpm, tpm = limit.requests_per_minute, limit.tokens_per_minute
        if rpm is not None and used[REQUESTS] + 1 > rpm:
            wait = self._frees(client, now, REQUESTS, used[REQUESTS] + 1 - rpm)
            raise ClientQuotaExceeded(client, f"{rpm} requests per minute", wait, _remaining(limit, used))
        if tpm is not None and estimate > 0 and used[TOKENS] > 0:
            if used[TOKENS] + estimate > tpm:
                wait = self._frees(client, now, TOKENS, used[TOKENS] + estimate - tpm)
                raise ClientQuotaExceeded(client, f"{tpm} tokens per minute", wait, _remaining(limit, used))
            unseen = self.unseen.get(client, 0) + self.unseen_before.get(client, 0)
            if unseen and unseen + estimate > (tpm - used[TOKENS] + unseen) / self.instances:
                raise ClientQuotaExceeded(client, f"{tpm} tokens per minute", 1.0, _remaining(limit, used))
        if batch:
            self._admit_batch(client, limit, now)
        self.local.add(client, now, (1, 0, 1 if batch else 0))
        held = self.reserved.setdefault(client, [0, 0])
        held[0] += 1
        held[1] += estimate
        if estimate:
            self.unseen[client] = self.unseen.get(client, 0) + estimate
        after = [used[REQUESTS] + 1, used[TOKENS] + estimate]
        return Charge(client, now, estimate, _remaining(limit, after))

    def _admit_batch(self, client: str, limit: Limit, now: float) -> None:
        allowance = limit.batch_allowance()
        if allowance is None:
            return
        if allowance == 0:
            raise BatchesNotAllowed(client)
        made = self.local.hour(client, now)[BATCHES] + self.others.hour(client, now)[BATCHES]
        if made >= allowance:
            raise ClientQuotaExceeded(client, f"{allowance} batches per hour", self._batch_frees(client, now), {})

    def synced(self, instances: int) -> None:
        """A share round wrote this instance's reservations and read the others'."""
        self.instances, self.unseen_before, self.unseen = max(1, instances), self.unseen, {}

    def settle(self, charge: Charge, tokens: int | None, now: float, requests: int = 1) -> None:
        """The call ended: release its reservation and charge, at `now`, `tokens` it used (None: what
        it reserved, its usage unknown); `requests` 0 gives the request back (no backend answered)."""
        if charge.settled:
            return
        charge.settled = True
        held = self.reserved.get(charge.client)
        if held is not None:
            held[0] -= 1
            held[1] -= charge.tokens
            if held[0] <= 0:
                del self.reserved[charge.client]
        spent = charge.tokens if tokens is None else tokens
        if spent:
            self.local.add(charge.client, now, (0, spent, 0))
        if requests != 1:
            self.local.add(charge.client, charge.at, (requests - 1, 0, 0))

    def used(self, client: str, now: float) -> list[int]:
        """[requests, tokens] of this client over the last 60 seconds, pool-wide: charged plus reserved."""
        mine, theirs = self.local.minute(client, now, WINDOW), self.others.minute(client, now, WINDOW)
        return [mine[REQUESTS] + theirs[REQUESTS], mine[TOKENS] + theirs[TOKENS] + self.reserved_tokens(client)]

    def reserved_tokens(self, client: str) -> int:
        return self.reserved.get(client, (0, 0))[1] + self.others_reserved.get(client, (0, 0))[1]

    def reserved_calls(self, client: str) -> int:
        return self.reserved.get(client, (0, 0))[0] + self.others_reserved.get(client, (0, 0))[0]

    def _frees(self, client: str, now: float, index: int, excess: int) -> float:
        """Seconds until buckets holding `excess` of the count leave the window (reservations free
        when their calls end: at least a second)."""
        merged: dict[int, int] = {}
        for windows in (self.local, self.others):
            for second, values in windows.seconds(client, now, WINDOW):
                merged[second] = merged.get(second, 0) + values[index]
        freed = 0
        for second in sorted(merged):
            freed += merged[second]
            if freed >= excess:
                return max(second + WINDOW - now, 1.0 if index == TOKENS else 0.001)
        return 1.0  # held by calls in flight (or a limit lowered meanwhile): try again soon

    def _batch_frees(self, client: str, now: float) -> float:
        """Seconds until the oldest batch of the hour leaves it (minute buckets)."""
        minutes = [m for w in (self.local, self.others) for m, v in w.minute_buckets(client, now) if v[BATCHES] > 0]
        return max((min(minutes) + MINUTE) * MINUTE - now, 1.0) if minutes else 1.0

    def headers(self, client: str, now: float) -> dict[str, str]:
        """The client's own remaining quota, for answers that charged nothing (e.g. refused ones)."""
        limit = self.limits.get(client)
        return {} if limit is None else _remaining(limit, self.used(client, now))


def _remaining(limit: Limit, used: list[int]) -> dict[str, str]:
    headers = {}
    if limit.requests_per_minute is not None:
        headers["x-ratelimit-remaining-requests"] = str(max(0, limit.requests_per_minute - used[REQUESTS]))
    if limit.tokens_per_minute is not None:
        headers["x-ratelimit-remaining-tokens"] = str(max(0, limit.tokens_per_minute - used[TOKENS]))
    return headers

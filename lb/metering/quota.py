"""Per-client quotas (`LB_CLIENT_LIMITS`): tokens and requests per minute, over the pool.

Why it works this way:
- A sliding 60-second window in one-second buckets (`lb.metering.windows`), not a fixed minute: a fixed
  window lets a client spend two minutes' worth around each boundary.
- A call is charged at admission on its estimate (`lb.routing.headroom.estimate_tokens`: body size / 4
  plus `max_tokens`, `max_completion_tokens` or `max_output_tokens`), as Azure OpenAI and API Management's
  token-limit policy do, so a burst of concurrent calls cannot all pass before any answer is
  counted; the charge is trued up to the answer's `usage` when it ends (to 0 tokens when the
  backend refused the call, and the whole charge is given back when no backend answered).
- A call is refused while the window is full (requests), or while its estimate does not fit in
  what is left (tokens). A call larger than the whole limit still passes on an empty window, as
  it would otherwise never pass. The 429 says when enough of the window frees.
- Other instances' charges come in through `others` (see `lb.metering.share`), about a second old;
  without a shared table, or while it is away, the limits hold per instance.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lb.config import ConfigError
from lb.errors import ProxyError
from lb.metering.windows import MINUTE, Windows
from lb.routing.headroom import estimate_tokens

REQUESTS, TOKENS = 0, 1
_LIMIT_RE = re.compile(r"(\d+)\s*(tpm|rpm)", re.IGNORECASE)


@dataclass(frozen=True)
class Limit:
    """One client's quota; None means that dimension is not limited."""

    tokens_per_minute: int | None = None
    requests_per_minute: int | None = None


def parse_limits(text: str) -> dict[str, Limit]:
    """`chatapp=200000tpm/600rpm,batch=50000tpm` -> {name: Limit}; ConfigError naming the setting."""
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
                raise ConfigError(f"LB_CLIENT_LIMITS: {part.strip()!r} (client {name!r}) is not <n>tpm or <n>rpm")
            unit, value = match.group(2).lower(), int(match.group(1))
            if unit in values:
                raise ConfigError(f"LB_CLIENT_LIMITS: client {name!r} has two {unit} limits")
            if value < 1:
                raise ConfigError(f"LB_CLIENT_LIMITS: client {name!r}: {part.strip()!r} must be at least 1")
            values[unit] = value
        limits[name] = Limit(values.get("tpm"), values.get("rpm"))
    return limits


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


@dataclass
class Charge:
    """What one admitted call was charged, so its answer can true it up."""

    client: str
    at: float  # epoch seconds of admission
    tokens: int
    headers: dict[str, str]  # the client's own x-ratelimit-remaining-* as of admission


class Limiter:
    """Admits or refuses calls of limited clients; counts this instance's charges."""

    def __init__(self, limits: dict[str, Limit]) -> None:
        self.limits = limits
        self.local = Windows(2)  # [requests, tokens] charged here
        self.others = Windows(2)  # ... by the other instances, as last read from the shared table

    def admit(self, client: str, body: bytes, now: float) -> Charge | None:
        """Charge the call or raise ClientQuotaExceeded; None for a client without a limit."""
        limit = self.limits.get(client)
        if limit is None:
            return None
        estimate = estimate_tokens(body) if limit.tokens_per_minute is not None else 0
        used = self.used(client, now)
        rpm, tpm = limit.requests_per_minute, limit.tokens_per_minute
        if rpm is not None and used[REQUESTS] + 1 > rpm:
            wait = self._frees(client, now, REQUESTS, used[REQUESTS] + 1 - rpm)
            raise ClientQuotaExceeded(client, f"{rpm} requests per minute", wait, _remaining(limit, used))
        if tpm is not None and used[TOKENS] > 0 and used[TOKENS] + estimate > tpm:
            wait = self._frees(client, now, TOKENS, used[TOKENS] + estimate - tpm)
            raise ClientQuotaExceeded(client, f"{tpm} tokens per minute", wait, _remaining(limit, used))
        self.local.add(client, now, (1, estimate))
        after = [used[REQUESTS] + 1, used[TOKENS] + estimate]
        return Charge(client, now, estimate, _remaining(limit, after))

    def settle(self, charge: Charge, tokens: int | None, requests: int = 1) -> None:
        """True the charge up: `tokens` the answer used (None: keep the estimate), `requests` 0 to refund."""
        delta_tokens = 0 if tokens is None else tokens - charge.tokens
        if delta_tokens or requests != 1:
            self.local.add(charge.client, charge.at, (requests - 1, delta_tokens))

    def used(self, client: str, now: float) -> list[int]:
        """[requests, tokens] the pool charged this client over the last 60 seconds."""
        mine, theirs = self.local.minute(client, now), self.others.minute(client, now)
        return [mine[0] + theirs[0], mine[1] + theirs[1]]

    def _frees(self, client: str, now: float, index: int, excess: int) -> float:
        """Seconds until buckets holding `excess` of the count leave the window."""
        merged: dict[int, int] = {}
        for windows in (self.local, self.others):
            for second, values in windows.seconds(client, now):
                merged[second] = merged.get(second, 0) + values[index]
        freed = 0
        for second in sorted(merged):
            freed += merged[second]
            if freed >= excess:
                return max(second + MINUTE - now, 0.001)
        return 1.0  # the excess is not in the buckets (a limit lowered meanwhile): try again soon

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

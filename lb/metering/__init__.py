"""Who spent the tokens, on which backend: the counts behind `GET /lb/usage` and the token metrics.

The proxy calls two hooks around its failover loop and nothing else: `admit()` before (the
client's quota, `lb.metering.quota`) and `observe()` on the answer, which watches its body go by
(`lb.metering.usage.UsageReader`) and, when the body ends, counts its usage per client and per backend,
exports it (`Telemetry.tokens`) and trues the quota charge up. The body is wrapped, not copied:
each read leaves for the client as it came.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from lb.metering.quota import Charge, Limit, Limiter
from lb.metering.usage import Usage, UsageReader, with_usage_requested
from lb.metering.windows import Windows
from lb.relay import UpstreamResponse
from lb.requestinfo import NOT_PARSED, RequestInfo

if TYPE_CHECKING:
    from lb.metering.share import UsageShare
    from lb.telemetry import Telemetry

STREAM_USAGE_AS_SENT, STREAM_USAGE_INCLUDE = "as-sent", "include"  # LB_STREAM_USAGE
FIELDS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")
UNKNOWN = "unknown_usage"  # answers that carried no readable usage (counted as requests, not tokens)
_WIDTH = len(FIELDS) + 1
_RATE_HEADERS = (b"x-ratelimit-remaining-tokens", b"x-ratelimit-remaining-requests")


class Metering:
    """This instance's token counts and client quotas; built once per process."""

    def __init__(
        self,
        limits: dict[str, Limit],
        telemetry: Telemetry,
        clock: Callable[[], float] = time.time,
        stream_usage: str = STREAM_USAGE_AS_SENT,
    ) -> None:
        self.limiter = Limiter(limits)
        self.include_stream_usage = stream_usage == STREAM_USAGE_INCLUDE
        self.telemetry = telemetry
        self.clock = clock
        self.clients = Windows(_WIDTH)
        self.backends = Windows(_WIDTH)
        self.share: UsageShare | None = None  # set when counts are shared through Table Storage
        self._pruned = 0.0
        self.version = 0  # bumped by every count, so the shared row is written only when it changed

    async def start(self) -> None:
        if self.share is not None:
            await self.share.start()

    async def close(self) -> None:
        if self.share is not None:
            await self.share.close()

    # Hooks of the request path --------------------------------------------------------------
    def prepare(self, info: RequestInfo) -> RequestInfo:
        """With `LB_STREAM_USAGE=include`, a streamed chat asks the backend for its usage chunk."""
        if not (info.stream and self.include_stream_usage):
            return info
        body = with_usage_requested(info.body)
        return info if body is None else replace(info, body=body, payload=NOT_PARSED, model_spans=())

    def admit(self, client: str, body: bytes) -> Charge | None:
        """Charge a limited client's call on its estimate; raises ClientQuotaExceeded when over."""
        if client not in self.limiter.limits:
            return None
        self.version += 1
        return self.limiter.admit(client, body, self.clock())

    def observe(self, response: Response, client: str, deployment: str | None, charge: Charge | None) -> Response:
        """Count the answer's usage when its body has passed; a limited client gets its own quota headers."""
        if charge is not None:
            _set_rate_headers(response, charge.headers)
        if not isinstance(response, UpstreamResponse):  # the proxy's own answer: no backend spent anything
            if charge is not None:
                self.limiter.settle(charge, 0, requests=0)
            elif client in self.limiter.limits:
                _set_rate_headers(response, self.limiter.headers(client, self.clock()))
            return response
        backend, ok, stream = response.backend, 200 <= response.status_code < 300, response.event_stream
        readable = stream or "json" in response.upstream.headers.get("content-type", "")  # not audio, files, ...
        reader = UsageReader(stream) if ok and readable else None
        body = response.body_iterator

        async def metered() -> AsyncIterator[Any]:
            try:
                if reader is None:
                    async for chunk in body:
                        yield chunk
                else:
                    feed = reader.feed
                    async for chunk in body:
                        feed(chunk)
                        yield chunk
            finally:
                usage = reader.result() if reader is not None else None
                self.record(client, backend, deployment, usage, answered=ok)
                if charge is not None:
                    self.limiter.settle(charge, usage.total if usage else (None if ok else 0))
                    self.version += 1

        response.body_iterator = metered()
        return response

    # Counting --------------------------------------------------------------------------------
    def record(self, client: str, backend: str, deployment: str | None, usage: Usage | None, answered: bool) -> None:
        """Count one answer from a backend: its tokens, or one `unknown` when a 2xx carried no usage."""
        now = self.clock()
        self.version += 1
        if usage is not None:
            values = [1, usage.prompt, usage.completion, usage.total, usage.cached, usage.reasoning, 0]
        else:
            values = [1, 0, 0, 0, 0, 0, 1 if answered else 0]
        self.clients.add(client, now, values)
        self.backends.add(backend, now, values)
        self.telemetry.tokens(client, backend, deployment, usage)
        if now - self._pruned > 60:
            self._pruned = now
            self.clients.prune(now)
            self.backends.prune(now)
            self.limiter.local.prune(now)

    def report(self, client: str | None = None) -> dict[str, Any]:
        """`GET /lb/usage`: this instance's counts, and the pool's when they are shared.

        `client`: only what that client may see (its own counts and limit); None: everything (operators).
        """
        now = self.clock()
        report: dict[str, Any] = {
            "scope": "instance",
            "clients": windows_table(self.clients, now),
            "backends": windows_table(self.backends, now),
        }
        if self.limiter.limits:
            report["limits"] = {
                name: {
                    "tokens_per_minute": limit.tokens_per_minute,
                    "requests_per_minute": limit.requests_per_minute,
                    "used_last_minute": dict(zip(("requests", "tokens"), self.limiter.used(name, now), strict=True)),
                }
                for name, limit in self.limiter.limits.items()
            }
        if self.share is not None:
            report["pool"] = self.share.pool_report(now)
        return report if client is None else _own(report, client)


def _own(report: dict[str, Any], client: str) -> dict[str, Any]:
    """One client's part of the report: nothing that names another client or shows the backends' totals."""
    own: dict[str, Any] = {"scope": report["scope"], "client": client}
    own["clients"] = {k: v for k, v in report["clients"].items() if k == client}
    if client in report.get("limits", {}):
        own["limits"] = {client: report["limits"][client]}
    if "pool" in report:
        own["pool"] = {"clients": {k: v for k, v in report["pool"]["clients"].items() if k == client}}
    return own


def windows_table(windows: Windows, now: float) -> dict[str, dict[str, dict[str, int]]]:
    names = (*FIELDS, UNKNOWN)
    return {
        key: {
            "last_minute": dict(zip(names, windows.minute(key, now), strict=True)),
            "last_hour": dict(zip(names, windows.hour(key, now), strict=True)),
        }
        for key in sorted(windows.keys())
    }


def _set_rate_headers(response: Response, values: dict[str, str]) -> None:
    """The client's own remaining quota replaces the backend's (which is the pool's, not the client's)."""
    if not values:
        return
    raw = [(k, v) for k, v in response.raw_headers if k not in _RATE_HEADERS]
    raw.extend((k.encode(), v.encode()) for k, v in values.items())
    response.raw_headers = raw

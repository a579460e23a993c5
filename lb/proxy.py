"""The request handler both hosts call: the Functions HTTP-streaming trigger and `python -m lb serve`.

One request: check the client's key, read the (bounded) body, find the deployment, then try
backends picked by the balancer until one gives an answer worth returning. A 429 / 408 / 5xx /
connect error / timeout cools that backend and moves on at once, as long as nothing has been sent
to the client, the attempt cap is not reached and the deadline has time left. The answer that
wins is streamed back as it arrives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from lb import errors, logctx, throttle
from lb.auth import BackendAuth, ClientAuth
from lb.balancer import Balancer, NoCandidate
from lb.config import Backend, Settings
from lb.headers import forwarded as forwarded_headers
from lb.metering import ANONYMOUS_CLIENT, Metering
from lb.relay import UpstreamResponse
from lb.requestinfo import RequestInfo, check_headers, read_request
from lb.state import ANY_DEPLOYMENT, CooldownStore, MemoryStore
from lb.telemetry import Telemetry
from lb.upstream import create_client

log = logging.getLogger("lb")

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
DISCARD_READ_SECONDS = 0.5  # how long a failed-over answer's body may take to drain


class Proxy:
    """Everything a request needs, built once per process and shared by all requests."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: CooldownStore | None = None,
        client: httpx.AsyncClient | None = None,
        backend_auth: BackendAuth | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.store = store or MemoryStore()
        self.balancer = Balancer(settings.backends, self.store, policy=settings.policy)
        self.client = client or create_client(settings)
        self.client_auth = ClientAuth(settings.client_keys, settings.entra)
        self.backend_auth = backend_auth or BackendAuth()
        self.telemetry = telemetry or Telemetry()
        self.metering = Metering(settings.client_limits, self.telemetry)
        self._started = False
        self._start_lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._start_lock:
            if not self._started:
                await self.store.start()
                await self.metering.start()
                self._started = True

    async def close(self) -> None:
        await self.store.close()
        await self.metering.close()
        await self.client.aclose()
        await self.backend_auth.close()
        self.telemetry.close()

    # Routes -----------------------------------------------------------------------------------
    async def handle(self, request: Request) -> Response:
        """`/openai/{path}`: never raises; every request gets exactly one answer, carrying its request id."""
        request_id = logctx.request_id_from(request.headers)
        logctx.bind(request_id)
        client, charge, info = None, None, None  # for metering: who asked, their quota's charge
        try:
            if not self._started:
                await self.start()
            check_headers(request)
            client = await self._authorize(request)
            info = await read_request(request, self.settings.max_body_bytes)
            charge = self.metering.admit(client, info.body)  # raises ClientQuotaExceeded when over
            await self.store.sync()
            attempts: list[Attempt] = []
            response = await self._forward(request, info, attempts)
            self.telemetry.request(
                info.deployment, response.status_code, len(attempts), sum(a.status == 429 for a in attempts)
            )
        except errors.ProxyError as exc:
            if exc.status >= 500:
                log.warning("%s %s: %s", exc.status, exc.code, exc.message)
            response = exc.response()
        except ClientDisconnect:  # the client left while sending its body: nobody is waiting for an answer
            log.debug("client went away while sending its request")
            response = errors.BadRequest("The request body was not received in full.").response()
        except Exception:  # a bug must still produce an answer, without leaking details
            log.exception("unexpected error while proxying %s %s", request.method, request.url.path)
            response = errors.ProxyError("The load balancer failed to handle the request.").response()
        if client is not None:
            response = self.metering.observe(response, client, info and info.deployment, charge)
        if "x-request-id" not in response.headers:
            response.headers["x-request-id"] = request_id
        return response

    async def _authorize(self, request: Request) -> str:
        """The client's name (see lb.metering) once its key or token is accepted."""
        try:
            identity = await self.client_auth.check(
                request.headers.get("api-key"), request.headers.get("authorization")
            )
        except errors.Unauthorized as exc:
            log.info("client refused: %s", exc.message)  # our own words only, never the credential
            raise
        return getattr(identity, "name", None) or ANONYMOUS_CLIENT

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def status(self, request: Request) -> Response:
        try:
            await self._authorize(request)
        except errors.ProxyError as exc:
            return exc.response()
        if not self._started:
            await self.start()
        return JSONResponse(self.status_report())

    async def usage(self, request: Request) -> Response:
        """`GET /lb/usage`: tokens and requests per client and per backend (see lb.metering)."""
        try:
            await self._authorize(request)
        except errors.ProxyError as exc:
            return exc.response()
        if not self._started:
            await self.start()
        return JSONResponse(self.metering.report())

    def status_report(self) -> dict[str, Any]:
        now = time.time()
        cooling: dict[str, list[dict[str, Any]]] = {}
        for c in self.store.active(now):
            cooling.setdefault(c.backend, []).append(
                {
                    "deployment": None if c.deployment == ANY_DEPLOYMENT else c.deployment,
                    "seconds_left": round(c.until - now, 3),
                    "reason": c.reason,
                    "instance": c.instance or None,
                }
            )
        return {
            "backends": [
                {
                    "name": b.name,
                    "host": b.host,
                    "priority": b.priority,
                    "weight": b.weight,
                    "auth": "api-key" if b.api_key else "entra-id",
                    "deployments": sorted(b.deployments) if b.deployments is not None else "all",
                    "cooldowns": cooling.get(b.name, []),
                    "headroom": self.balancer.headroom.report(b.name, now),
                }
                for b in self.settings.backends
            ],
            "state": self.store.health(),
            "policy": self.balancer.policy,
            "max_attempts": self.settings.max_attempts,
            "timeout_seconds": self.settings.timeout_seconds,
        }

    # Failover loop ----------------------------------------------------------------------------
    async def _forward(self, request: Request, info: RequestInfo, tried: list[Attempt]) -> Response:
        """Try backends until one answers for good; `tried` collects every attempt made."""
        settings = self.settings
        deadline = time.monotonic() + settings.timeout_seconds
        headers = forwarded_headers(request, logctx.current_request_id.get())
        failure: errors.ProxyError | None = None
        need = self.balancer.need(info.body)
        choice = self.balancer.pick(info.deployment, time.time(), need=need)

        while isinstance(choice, Backend):
            backend = choice
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failure = errors.GatewayTimeout(f"No backend answered within {settings.timeout_seconds:g} seconds.")
                break
            attempt = Attempt(backend.name, time.time(), time.perf_counter())
            tried.append(attempt)
            timeout = remaining
            if remaining > settings.attempt_timeout_seconds and self._has_alternative(info, tried, need):
                timeout = settings.attempt_timeout_seconds  # a silent backend must leave time for another
            try:
                upstream = await self._send(backend, request.method, info, headers, timeout)
            except Exception as exc:
                failure = errors.upstream_error(exc, backend.name)
                seconds = self._cool(backend, info.deployment, settings.default_cooldown_seconds, type(exc).__name__)
                self._attempted(attempt, info, f"error {type(exc).__name__}", seconds)
                choice = self._next(info, tried, need)
                continue

            try:  # until the relay owns the answer, any failure must release its connection
                status = upstream.status_code
                if status != 429:  # a 429's zeros say less than its Retry-After, which cools it below
                    now = time.time()
                    reading = self.balancer.headroom.record(
                        backend.name, info.deployment or ANY_DEPLOYMENT, upstream.headers, now
                    )
                    if reading is not None and reading.near_limit(now):
                        self.store.expect_throttling(now)  # before the first 429, not after it
                if status not in RETRYABLE_STATUS:
                    self._attempted(attempt, info, status, None)
                    return self._relay(upstream, backend, info, len(tried))

                seconds, source = throttle.cooldown_seconds(
                    upstream.headers,
                    default=settings.default_cooldown_seconds,
                    maximum=settings.max_cooldown_seconds,
                    throttled=status == 429,
                )
                self._cool(backend, info.deployment, seconds, f"{status} ({source})")
                self._attempted(attempt, info, status, seconds)
                choice = self._next(info, tried, need)
                if isinstance(choice, Backend) and deadline > time.monotonic():
                    await _discard(upstream)
                    continue
                if status == 429:
                    await _discard(upstream)
                    return self._all_cooling(info, tried)
                return self._relay(upstream, backend, info, len(tried))  # the last backend's own 5xx/408 is the answer
            except BaseException:
                await upstream.aclose()
                raise

        if failure is not None:
            return failure.response({"x-lb-attempts": str(len(tried))})
        if isinstance(choice, NoCandidate) and not choice.served:
            raise errors.NotFound(f"No backend serves deployment '{info.deployment}'.")
        return self._all_cooling(info, tried)

    def _has_alternative(self, info: RequestInfo, tried: list[Attempt], need: int) -> bool:
        """Whether another backend could still be tried if the current attempt fails (only looks)."""
        return isinstance(self._next(info, tried, need, charge=False), Backend)

    def _next(self, info: RequestInfo, tried: list[Attempt], need: int, charge: bool = True) -> Backend | NoCandidate:
        if len(tried) >= self.settings.max_attempts:
            return NoCandidate(served=True, retry_at=0.0)
        return self.balancer.pick(info.deployment, time.time(), {a.backend for a in tried}, need, charge)

    def _attempted(self, attempt: Attempt, info: RequestInfo, status: int | str, cooldown: float | None) -> None:
        """Log and record one finished attempt: INFO when it cooled a backend, DEBUG otherwise."""
        attempt.status = status
        seconds = time.perf_counter() - attempt.perf_started
        self.telemetry.attempt(attempt.backend, info.deployment, status, attempt.started, seconds, cooldown)
        level = logging.DEBUG if cooldown is None else logging.INFO
        if log.isEnabledFor(level):
            log.log(
                level,
                "attempt backend=%s deployment=%s status=%s ms=%.1f cooldown=%s",
                attempt.backend,
                info.deployment or "-",
                status,
                seconds * 1000,
                f"{cooldown:.1f}s" if cooldown is not None else "-",
            )

    def _relay(self, upstream: httpx.Response, backend: Backend, info: RequestInfo, attempts: int) -> Response:
        def on_broken_stream() -> None:
            self._cool(backend, info.deployment, self.settings.default_cooldown_seconds, "broken stream")

        return UpstreamResponse(upstream, backend.name, attempts, on_broken_stream)

    def _cool(self, backend: Backend, deployment: str | None, seconds: float, reason: str) -> float:
        self.store.mark(backend.name, deployment or ANY_DEPLOYMENT, time.time() + seconds, reason)
        return seconds

    def _all_cooling(self, info: RequestInfo, tried: list[Attempt]) -> Response:
        now = time.time()
        retry_at = self.balancer.soonest_recovery(info.deployment, now)
        seconds = retry_at - now if retry_at else self.settings.default_cooldown_seconds
        if not tried:
            self.telemetry.all_cooling(info.deployment)
            log.debug("all backends cooling deployment=%s retry_after=%.1fs", info.deployment, seconds)
        return errors.AllBackendsCooling(info.deployment, seconds).response({"x-lb-attempts": str(len(tried))})

    async def _send(
        self, backend: Backend, method: str, info: RequestInfo, headers: list[tuple[str, str]], timeout: float
    ) -> httpx.Response:
        auth = await self.backend_auth.headers(backend)
        # A bare httpx.Request, not client.build_request(): the client's default headers (its own
        # User-Agent, Accept-Encoding) have no place in a forwarded call, and merging them costs.
        request = httpx.Request(
            method,
            backend.url + info.raw_path,
            headers=[*headers, *auth.items()],
            content=info.body,
            extensions={"timeout": httpx.Timeout(timeout).as_dict()},
        )
        return await self.client.send(request, stream=True)


async def _discard(upstream: httpx.Response) -> None:
    """Drop an answer we won't relay (a 429 or 5xx being failed over). Its small body is read to the
    end first, so the connection goes back to the pool instead of a new handshake per 429."""
    try:
        await asyncio.wait_for(upstream.aread(), DISCARD_READ_SECONDS)
    except (httpx.HTTPError, asyncio.TimeoutError):
        pass
    finally:
        await upstream.aclose()


@dataclass
class Attempt:
    """One upstream try of a request."""

    backend: str
    started: float  # epoch seconds, for telemetry
    perf_started: float  # perf_counter, for the duration
    status: int | str | None = None

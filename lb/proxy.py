"""The request handler both hosts call: the Functions HTTP-streaming trigger and `python -m lb serve`.

One request: check the client's key, read the (bounded) body, find the deployment, then try
backends picked by the balancer until one gives an answer worth returning. A 429 / 408 / 5xx /
connect error / timeout cools that backend and moves on at once, as long as nothing has been sent
to the client, the attempt cap is not reached and the deadline has time left. The answer that
wins is streamed back as it arrives.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from lb import errors, logctx
from lb.auth import BackendAuth, Client, ClientAuth
from lb.auth.refusals import refuses_our_credential
from lb.config import Backend, Settings
from lb.headers import forwarded as forwarded_headers
from lb.headers import returned as returned_headers
from lb.metering import Metering
from lb.objects.records import ObjectStore
from lb.objects.router import ObjectRouter
from lb.relay import UpstreamResponse
from lb.requestinfo import RequestInfo, arrived, check_headers, read_request
from lb.routing import throttle
from lb.routing.balancer import Balancer, Demand, NoCandidate
from lb.routing.breaker import AuthFailures, Breaker
from lb.routing.deployments import located, upstream_call
from lb.state import ANY_DEPLOYMENT, CooldownStore, MemoryStore
from lb.telemetry import Telemetry
from lb.upstream import AiohttpTransport, parsed_url

log = logging.getLogger("lb")
_deadline: ContextVar[float | None] = ContextVar("lb_deadline", default=None)  # this request's, monotonic

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
AUTH_REFUSED = frozenset({401, 403})  # ours refused (fail over, cool long) or the client's answer: lb.auth.refusals
AUTH_REASON = "auth"  # cooldown reasons that start with this mean "refuses our credential"
DISCARD_READ_SECONDS = 0.5  # how long a failed-over answer's body may take to drain
CAUSE_CHARS = 200
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


class Proxy:
    """Everything a request needs, built once per process and shared by all requests."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: CooldownStore | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        backend_auth: BackendAuth | None = None,
        telemetry: Telemetry | None = None,
        objects: ObjectStore | None = None,
    ) -> None:
        self.settings = settings
        self.store = store or MemoryStore()
        self.balancer = Balancer(settings.backends, self.store, policy=settings.policy, affinity=settings.affinity)
        self.transport = transport or AiohttpTransport()  # one pool for every upstream call
        self.client_auth = ClientAuth(settings.client_keys, settings.entra)
        self.backend_auth = backend_auth or BackendAuth()
        self.telemetry = telemetry or Telemetry()
        self.metering = Metering(
            settings.client_limits, self.telemetry, stream_usage=settings.stream_usage, reserve=settings.reserve_tokens
        )
        self.breaker = Breaker(settings.breaker_failures, settings.breaker_window_seconds)
        self.auth_failures = AuthFailures()
        self.objects = ObjectRouter(objects or ObjectStore(), settings)  # who holds which stored object
        self._started = False
        self._start_lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._start_lock:
            if not self._started:
                await self.store.start()
                await self.metering.start()
                await self.objects.records.start()
                self._started = True

    async def close(self) -> None:
        await self.store.close()
        await self.metering.close()
        await self.objects.records.close()
        await self.transport.aclose()
        await self.backend_auth.close()
        self.telemetry.close()

    # Routes -----------------------------------------------------------------------------------
    async def handle(self, request: Request) -> Response:
        """`/openai/{path}`: never raises; every request gets exactly one answer, carrying its request id."""
        request_id = logctx.request_id_from(request.headers)
        logctx.bind(request_id)
        client, charge, info = None, None, None  # for metering: who asked, their quota's charge
        deadline = arrived(request) + self.settings.timeout_seconds  # the client's whole call, body upload included
        _deadline.set(deadline)  # for the relay, however the answer is reached
        try:
            if not self._started:
                await self.start()
            check_headers(request)
            client = await self._authorize(request)
            info = await read_request(request, self.settings.max_body_bytes)
            info = self.metering.prepare(info)  # a chat stream asks the backend for its usage chunk
            info = await located(info, self.settings.backends)  # where a renamed deployment's body names it
            charge = self.metering.admit(client.name, info)  # reserves its cost; raises ClientQuotaExceeded when over
            await self.store.sync()
            attempts: list[Attempt] = []
            call = await self.objects.classify(request, info)  # None unless the call can name or create an object
            if call is None:
                response = await self._forward(request, info, attempts, deadline)
            else:
                response = await self.objects.forward(self, request, info, attempts, call, client, deadline)
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
            response = self.metering.observe(response, client.name, info, charge)
        if "x-request-id" not in response.headers:
            response.headers["x-request-id"] = request_id
        return response

    async def _authorize(self, request: Request) -> Client:
        try:
            return await self.client_auth.check(request.headers.get("api-key"), request.headers.get("authorization"))
        except errors.Unauthorized as exc:
            log.info("client refused: %s", exc.message)  # our own words only, never the credential
            raise

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def status(self, request: Request) -> Response:
        return await self._report(request, self.status_report)

    async def usage(self, request: Request) -> Response:
        """`GET /lb/usage`: tokens and requests per client and per backend (see lb.metering)."""
        return await self._report(request, self.metering.report)

    async def _report(self, request: Request, report: Callable[[], dict[str, Any]]) -> Response:
        """The `/lb/...` reports: a client key or token first, like every proxied call."""
        try:
            await self._authorize(request)
        except errors.ProxyError as exc:
            return exc.response()
        if not self._started:
            await self.start()
        return JSONResponse(report())

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
                    "deployment_names": b.renamed(),
                    "cooldowns": cooling.get(b.name, []),
                    "auth_failure": self._auth_report(b.name),
                    "headroom": self.balancer.headroom.report(b.name, now),
                }
                for b in self.settings.backends
            ],
            "state": self.store.health(),
            "objects": self.objects.report(),
            "policy": self.balancer.policy,
            "affinity": "on" if self.balancer.affinity else "off",
            "max_attempts": self.settings.max_attempts,
            "timeout_seconds": self.settings.timeout_seconds,
        }

    def _auth_report(self, backend: str) -> dict[str, Any] | None:
        failure = self.auth_failures.by_backend.get(backend)
        if failure is None:
            return None
        return {"status": failure.status, "cause": failure.cause, "since": round(failure.since)}

    # Failover loop ----------------------------------------------------------------------------
    async def _forward(self, request: Request, info: RequestInfo, tried: list[Attempt], deadline: float) -> Response:
        """Try backends until one answers for good; `tried` collects every attempt made.

        Only the backend's own words cool it at once: a 429 or a 503 with Retry-After (busy), a
        401/403 refusing our credential (any other 401/403 is the client's answer), a refused
        connection. No token of our own (`BackendCredentialUnavailable`) blames no backend. A
        timeout or another 5xx lets this request fail over, and becomes evidence against that
        backend (`lb.routing.breaker`) only if the request then succeeds elsewhere.
        """
        settings = self.settings
        headers = forwarded_headers(request, logctx.current_request_id.get())
        failure: errors.ProxyError | None = None
        suspects: list[tuple[Backend, str]] = []  # failed this request; the backend's fault if another succeeds
        need = self.balancer.demand(info.body)
        choice = self.balancer.pick(info.deployment, time.time(), need=need)

        while isinstance(choice, Backend):
            backend = choice
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failure = errors.GatewayTimeout(f"No backend answered within {settings.timeout_seconds:g} seconds.")
                break
            attempt = Attempt(backend.name, time.time(), time.perf_counter())
            tried.append(attempt)
            connect, first_byte = self._attempt_timeouts(
                info, remaining, lambda: self._has_alternative(info, tried, need)
            )
            call = upstream_call(backend, info)  # ours, before the catch-all: never booked against the backend
            try:
                upstream = await self._send(backend, request.method, call, headers, remaining, connect, first_byte)
            except errors.BackendCredentialUnavailable as exc:  # our token, not the backend: nothing blamed
                failure = exc
                self._attempted(attempt, info, "error BackendCredentialUnavailable", None)
                choice = self._next(info, tried, need)
                continue
            except Exception as exc:
                failure = errors.upstream_error(exc, backend.name)
                seconds = None
                if isinstance(exc, httpx.ConnectError):  # unreachable, whatever the request: about the backend
                    seconds = self._cool(
                        backend, info.deployment, settings.default_cooldown_seconds, type(exc).__name__
                    )
                else:
                    suspects.append((backend, type(exc).__name__))
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
                if status in AUTH_REFUSED:
                    refusal = await _discard(upstream)
                    if not refuses_our_credential(info.raw_path, refusal):  # about what the client asked
                        self._attempted(attempt, info, status, None)
                        return _refusal_relayed(upstream, refusal, backend, len(tried))
                    seconds = self._refused(backend, info, status, refusal)
                    self._attempted(attempt, info, status, seconds)
                    choice = self._next(info, tried, need)
                    continue
                if status not in RETRYABLE_STATUS:
                    self._attempted(attempt, info, status, None)
                    if status < 400:
                        self._succeeded(backend, info, suspects)
                    return self._relay(request, upstream, backend, info, len(tried))

                seconds = self._cool_if_busy(backend, info, upstream)
                if seconds is None:
                    suspects.append((backend, str(status)))
                self._attempted(attempt, info, status, seconds)
                choice = self._next(info, tried, need)
                if isinstance(choice, Backend) and deadline > time.monotonic():
                    await _discard(upstream)
                    continue
                if status == 429:
                    await _discard(upstream)
                    return self._all_cooling(info, tried)
                # the last backend's own 5xx/408 is the answer
                return self._relay(request, upstream, backend, info, len(tried))
            except BaseException:
                await upstream.aclose()
                raise

        if isinstance(choice, NoCandidate) and not choice.served:
            raise errors.NotFound(f"No backend serves deployment '{info.deployment}'.")
        if self._all_refuse_us(info):
            return errors.BackendAuthFailed(info.deployment).response({"x-lb-attempts": str(len(tried))})
        if failure is not None:
            return failure.response({"x-lb-attempts": str(len(tried))})
        return self._all_cooling(info, tried)

    def _succeeded(self, backend: Backend, info: RequestInfo, suspects: list[tuple[Backend, str]]) -> None:
        """A good answer (its head): the backends this request failed on before get one failure
        each (the request was fine, they were not). The backend's own circuit closes once the
        body is through (`_relay`)."""
        if self.auth_failures.by_backend and self.auth_failures.clear(backend.name):
            log.warning("backend %s accepts the load balancer's credential again", backend.name)
        for suspect, cause in suspects:
            self._suspect(suspect, info.deployment, cause)

    def _suspect(self, backend: Backend, deployment: str | None, cause: str) -> None:
        opened = self.breaker.failure(backend.name, deployment or ANY_DEPLOYMENT, time.monotonic())
        if opened:
            seconds = self.settings.default_cooldown_seconds
            self._cool(backend, deployment, seconds, f"circuit open ({opened} failed requests, last: {cause})")
            log.warning(
                "backend %s deployment=%s: %d requests failed there and succeeded elsewhere (last: %s); cooled %gs",
                backend.name,
                deployment or "-",
                opened,
                cause,
                seconds,
            )

    def _refused(self, backend: Backend, info: RequestInfo, status: int, refusal: bytes) -> float:
        """The backend refuses our credential (`lb.auth.refusals`): out of rotation for long, said
        once in the log and in /lb/status, with its own words as the cause (a wrong key is never the
        client's problem)."""
        cause = _cause(refusal, backend)
        seconds = self.settings.auth_cooldown_seconds
        self._cool(backend, info.deployment, seconds, f"{AUTH_REASON} {status}: {cause}")
        if self.auth_failures.record(backend.name, status, cause):
            log.error(
                "backend %s refuses the load balancer's credential (%d %s): check BACKEND_%s_APIKEY or the"
                " managed identity's role; out of rotation for %gs",
                backend.name,
                status,
                cause,
                backend.name,
                seconds,
            )
        return seconds

    def _all_refuse_us(self, info: RequestInfo) -> bool:
        """Whether every backend serving the deployment is out because it refused our credential."""
        now = time.time()
        key = info.deployment or ANY_DEPLOYMENT
        refusing = {
            c.backend for c in self.store.active(now) if c.deployment == key and c.reason.startswith(AUTH_REASON)
        }
        if not refusing:
            return False
        return all(b.name in refusing for b in self.settings.backends if b.serves(info.deployment))

    def _attempt_timeouts(
        self, info: RequestInfo, remaining: float, may_fail_over: Callable[[], bool]
    ) -> tuple[float | None, float | None]:
        """(connect, first byte) bounds of one attempt; None: the request's deadline. A silent backend
        must leave time for another; but a non-streamed generation sends nothing until it is done, so
        it is never abandoned (and billed twice) for being long."""
        limit = self.settings.attempt_timeout_seconds
        if remaining <= limit or not may_fail_over():
            return None, None
        return limit, limit if info.stream or not info.body else None

    def _cool_if_busy(self, backend: Backend, info: RequestInfo, upstream: httpx.Response) -> float | None:
        """Cool `backend` when its answer says it is busy (a 429, or a 503 with a retry hint): the
        seconds, or None when the answer says nothing about the backend."""
        status = upstream.status_code
        if status != 429 and not (status == 503 and _retry_hint(upstream.headers)):
            return None
        seconds, source = throttle.cooldown_seconds(
            upstream.headers,
            default=self.settings.default_cooldown_seconds,
            maximum=self.settings.max_cooldown_seconds,
            throttled=status == 429,
        )
        return self._cool(backend, info.deployment, seconds, f"{status} ({source})")

    def _has_alternative(self, info: RequestInfo, tried: list[Attempt], need: Demand) -> bool:
        """Whether another backend could still be tried if the current attempt fails (only looks)."""
        return isinstance(self._next(info, tried, need, charge=False), Backend)

    def _next(
        self, info: RequestInfo, tried: list[Attempt], need: Demand, charge: bool = True
    ) -> Backend | NoCandidate:
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

    def _relay(
        self, request: Request, upstream: httpx.Response, backend: Backend, info: RequestInfo, attempts: int
    ) -> Response:
        def on_end(exc: Exception | None) -> None:
            # A whole body closes the backend's circuit. One cut at the deadline is this request's
            # length, not the backend's fault; a reset or a truncated body counts against it.
            if exc is None:
                self.breaker.success(backend.name, info.deployment or ANY_DEPLOYMENT)
            elif not isinstance(exc, httpx.TimeoutException):
                self._suspect(backend, info.deployment, f"broken body ({type(exc).__name__})")

        deadline = _deadline.get()
        return UpstreamResponse(
            upstream, backend.name, attempts, on_end, backend.url, lambda: _own_url(request), deadline
        )

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
        self,
        backend: Backend,
        method: str,
        call: tuple[str, bytes],
        headers: list[tuple[bytes, bytes]],
        total: float,
        connect: float | None,
        first_byte: float | None,
    ) -> httpx.Response:
        """One upstream call up to its answer's head: `total` seconds bound all of it, wall-clock,
        with one timer (aiohttp's own per-read and `total` timers cost ~0.1 ms per stream);
        `connect` bounds the pool wait and connect, `first_byte` the wait for the head. The relay
        bounds the body's reads by the request's deadline."""
        deadline = time.monotonic() + total
        auth = await self.backend_auth.headers(backend, deadline)  # waits only for a first token, to the deadline
        path, body = call  # this backend's deployment name (`upstream_call`)
        # A connect bound shorter than the deadline is aiohttp's to enforce (its timer maps to
        # ConnectTimeout); one as long is already the timer below: one timer per call, not two.
        connect = None if connect is None or connect >= total else connect
        # A bare httpx.Request, sent by the transport itself: no client's default headers (its own
        # User-Agent, Accept-Encoding), cookies or redirects have a place in a forwarded call. Raw
        # headers and the body as a stream skip httpx's normalising and merging (~40 us): the
        # transport sets Content-Length itself.
        request = httpx.Request(
            method,
            parsed_url(backend.url + path),
            headers=[*headers, *((k.encode(), v.encode("latin-1")) for k, v in auth.items())],
            stream=httpx.ByteStream(body),
            extensions={"timeout": {"connect": connect, "pool": connect, "read": None, "write": None}},
        )
        request.read()  # request.content, for the transport: the body already in hand
        until = deadline if first_byte is None else min(deadline, time.monotonic() + first_byte)
        async with asyncio.timeout_at(until):
            return await self.transport.handle_async_request(request)


async def _discard(upstream: httpx.Response) -> bytes:
    """Drop an answer we won't relay (a 429 or 5xx being failed over). Its small body is read to the
    end first, so the connection goes back to the pool instead of a new handshake per 429."""
    try:
        return await asyncio.wait_for(upstream.aread(), DISCARD_READ_SECONDS)
    except (httpx.HTTPError, asyncio.TimeoutError):
        return b""
    finally:
        await upstream.aclose()


def _refusal_relayed(upstream: httpx.Response, body: bytes, backend: Backend, attempts: int) -> Response:
    """A 401/403 about what the client asked (read to be judged, so relayed as read: decoded)."""
    response = Response(body, status_code=upstream.status_code)
    skip = {b"content-length", b"content-encoding"}
    returned = [(k, v) for k, v in returned_headers(upstream.headers, backend.url) if k not in skip]
    response.raw_headers = [
        *returned,
        (b"content-length", str(len(body)).encode()),
        (b"x-lb-backend", backend.name.encode()),
        (b"x-lb-attempts", str(attempts).encode()),
    ]
    return response


def _cause(body: bytes, backend: Backend) -> str:
    """The backend's own reason for refusing us, short and on one line, never with our key in it."""
    try:
        data = json.loads(body)
        error = data["error"] if isinstance(data.get("error"), dict) else data  # or {"statusCode", "message"}
        cause = f"{error.get('code', '')}: {error.get('message', '')}".strip(": ")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        cause = ""
    cause = _UNPRINTABLE.sub(" ", cause)[:CAUSE_CHARS] or "no reason given"
    if backend.api_key:
        cause = cause.replace(backend.api_key, "********")
    return cause


def _retry_hint(headers: httpx.Headers) -> bool:
    """A 503 that says when to come back is the backend saying it is busy, like a 429."""
    return "retry-after" in headers or "retry-after-ms" in headers


def _own_url(request: Request) -> str:
    """Where the client reached us (scheme and Host), the base a backend's Location is rewritten to."""
    host = request.headers.get("host") or "localhost"
    return f"{request.scope.get('scheme', 'http')}://{host}{request.scope.get('root_path', '')}"


@dataclass
class Attempt:
    """One upstream try of a request."""

    backend: str
    started: float  # epoch seconds, for telemetry
    perf_started: float  # perf_counter, for the duration
    status: int | str | None = None

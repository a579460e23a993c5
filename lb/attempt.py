"""One attempt: send a call to one backend once, read what its answer means, book it.

Two policies sit on top of it, and neither reaches into the other: the failover loop
(`lb.proxy`) tries backends picked by the balancer in turn, and the object router
(`lb.objects.router`) sends a call naming a stored object to the one backend holding it. Both
need the same reading of an answer, so it lives here once:

    answer        anything worth returning (2xx, 3xx, a 4xx about the call itself): relay it
    busy          a 429, or a 503 with a retry hint: the backend is cooled for its Retry-After
    failed        a 408 / 5xx / timeout / broken connection: the request may fail over; it becomes
                  evidence against the backend (`lb.routing.breaker`) only if another one succeeds.
                  A refused connection is about the backend whatever the request: cooled at once
    refused_us    a 401/403 refusing the balancer's own credential: cooled long, never relayed. Only
                  Azure's words about our credential say so at once; a refusal that may be about the
                  client's request (no words, or PermissionDenied on inference) is ours only if the
                  backend refuses a probe that carries no client content too (`lb.auth.refusals`)
    no_credential no token of our own to send: nobody is blamed

Booking is part of the attempt: telemetry, the log line, the cooldown, the headroom reading.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import httpx
from starlette.requests import Request
from starlette.responses import Response

from lb import errors
from lb.auth import BackendAuth
from lb.auth.refusals import PROBE_PATH, PROBE_SECONDS, Probes, judged
from lb.config import Backend, Settings
from lb.headers import returned as returned_headers
from lb.relay import BodyLimits, UpstreamResponse
from lb.requestinfo import RequestInfo
from lb.routing import throttle
from lb.routing.breaker import AuthFailures, Breaker
from lb.routing.deployments import upstream_call
from lb.routing.headroom import Headroom
from lb.state import ANY_DEPLOYMENT, CooldownStore
from lb.telemetry import Telemetry
from lb.upstream import parsed_url

log = logging.getLogger("lb")

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
AUTH_REFUSED = frozenset({401, 403})  # ours refused (fail over, cool long) or the client's answer: lb.auth.refusals
AUTH_REASON = "auth"  # cooldown reasons that start with this mean "refuses our credential"
DISCARD_READ_SECONDS = 0.5  # how long a failed-over answer's body may take to drain
CAUSE_CHARS = 200
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")

Verdict = Literal["answer", "busy", "failed", "refused_us", "no_credential"]


@dataclass
class Attempt:
    """One upstream try of a request."""

    backend: str
    started: float  # epoch seconds, for telemetry
    perf_started: float  # perf_counter, for the duration
    status: int | str | None = None


@dataclass
class Call:
    """One client request on its way to the backends: what every attempt of it needs."""

    request: Request
    info: RequestInfo
    deadline: float  # monotonic: the client's whole call, body upload included
    headers: list[tuple[bytes, bytes]]  # what is forwarded (`lb.headers.forwarded`), built once
    tried: list[Attempt] = field(default_factory=list)

    def own_url(self) -> str:
        """Where the client reached us (scheme and Host), the base a backend's Location is rewritten to."""
        request = self.request
        host = request.headers.get("host") or "localhost"
        return f"{request.scope.get('scheme', 'http')}://{host}{request.scope.get('root_path', '')}"


@dataclass
class Outcome:
    """What one attempt's answer means. `upstream` is still open for "answer", and for "busy" /
    "failed" when the backend answered with a status: the policy relays or discards it."""

    verdict: Verdict
    backend: Backend
    upstream: httpx.Response | None = None
    relayed: Response | None = None  # a 401/403 about the client's call, read to be judged: its answer as is
    error: errors.ProxyError | None = None  # the client's answer if this attempt is the last word
    suspect: str | None = None  # "failed": the evidence against the backend if another succeeds

    @property
    def status(self) -> int | None:
        return self.upstream.status_code if self.upstream is not None else None


class Attempts:
    """Sends, reads and books single attempts; shared by every request of the process."""

    def __init__(
        self,
        settings: Settings,
        store: CooldownStore,
        transport: httpx.AsyncBaseTransport,
        backend_auth: BackendAuth,
        telemetry: Telemetry,
        headroom: Headroom,
    ) -> None:
        self.settings = settings
        self.store = store
        self.transport = transport
        self.backend_auth = backend_auth
        self.telemetry = telemetry
        self.headroom = headroom
        self.breaker = Breaker(settings.breaker_failures, settings.breaker_window_seconds)
        self.auth_failures = AuthFailures()
        self.probes = Probes()

    async def send(self, call: Call, backend: Backend, may_fail_over: Callable[[], bool]) -> Outcome:
        """One attempt of `call` at `backend`. `may_fail_over`: whether another backend could take
        the call if this one stays silent (a lone holder is never cut by the attempt timeout)."""
        info = call.info
        attempt = Attempt(backend.name, time.time(), time.perf_counter())
        call.tried.append(attempt)
        remaining = max(0.001, call.deadline - time.monotonic())
        connect, first_byte = self._timeouts(info, remaining, may_fail_over)
        path_body = upstream_call(backend, info)  # ours, before the catch-all: never booked against the backend
        try:
            upstream = await self._send(
                backend, call.request.method, path_body, call.headers, remaining, connect, first_byte
            )
        except errors.BackendCredentialUnavailable as exc:  # our token, not the backend: nothing blamed
            self._booked(attempt, info, "error BackendCredentialUnavailable", None)
            return Outcome("no_credential", backend, error=exc)
        except Exception as exc:
            error = errors.upstream_error(exc, backend.name)
            if isinstance(exc, httpx.ConnectError):  # unreachable, whatever the request: about the backend
                cooldown = self.settings.default_cooldown_seconds
                seconds = self.cool(backend, info.deployment, cooldown, type(exc).__name__)
                self._booked(attempt, info, f"error {type(exc).__name__}", seconds)
                return Outcome("failed", backend, error=error)
            self._booked(attempt, info, f"error {type(exc).__name__}", None)
            return Outcome("failed", backend, error=error, suspect=type(exc).__name__)

        try:  # until a policy owns the answer, any failure must release its connection
            status = upstream.status_code
            if status != 429:  # a 429's zeros say less than its Retry-After, which cools it below
                now = time.time()
                reading = self.headroom.record(backend.name, info.deployment or ANY_DEPLOYMENT, upstream.headers, now)
                if reading is not None and reading.near_limit(now):
                    self.store.expect_throttling(now)  # before the first 429, not after it
            if status in AUTH_REFUSED:
                refusal = await discard(upstream)
                ours, probed = await self._refuses_us(call, backend, refusal)
                if not ours:  # about what the client asked
                    self._booked(attempt, info, status, None)
                    relayed = buffered(upstream, refusal, backend, len(call.tried))  # read to be judged
                    return Outcome("answer", backend, relayed=relayed)
                seconds = self._refused(backend, info, status, refusal, probed)
                self._booked(attempt, info, status, seconds)
                return Outcome("refused_us", backend, error=errors.BackendAuthFailed(info.deployment))
            if status not in RETRYABLE_STATUS:
                self._booked(attempt, info, status, None)
                return Outcome("answer", backend, upstream)
            cooled = self._cool_if_busy(backend, info, upstream)
            self._booked(attempt, info, status, cooled)
            if cooled is not None:
                return Outcome("busy", backend, upstream)
            return Outcome("failed", backend, upstream, suspect=str(status))
        except BaseException:
            await upstream.aclose()
            raise

    def relay(self, call: Call, upstream: httpx.Response, backend: Backend) -> UpstreamResponse:
        """The answer streamed back; its end closes the backend's circuit, or counts against it."""
        deployment = call.info.deployment

        def on_end(exc: Exception | None) -> None:
            # A whole body closes the backend's circuit. One cut by our limits (silence, total) is this
            # request's length, not the backend's fault; a reset or a truncated body counts against it.
            if exc is None:
                self.breaker.success(backend.name, deployment or ANY_DEPLOYMENT)
            elif not isinstance(exc, httpx.TimeoutException):
                self.suspect(backend, deployment, f"broken body ({type(exc).__name__})")

        limits = BodyLimits.of(self.settings, call.deadline)  # silence, and the optional total
        return UpstreamResponse(upstream, backend.name, len(call.tried), on_end, backend.url, call.own_url, limits)

    def succeeded(self, backend: Backend, info: RequestInfo, suspects: list[tuple[Backend, str]]) -> None:
        """A good answer (its head): the backends this request failed on before get one failure
        each (the request was fine, they were not)."""
        if self.auth_failures.by_backend and self.auth_failures.clear(backend.name):
            log.warning("backend %s accepts the load balancer's credential again", backend.name)
        for suspect, cause in suspects:
            self.suspect(suspect, info.deployment, cause)

    def suspect(self, backend: Backend, deployment: str | None, cause: str) -> None:
        opened = self.breaker.failure(backend.name, deployment or ANY_DEPLOYMENT, time.monotonic())
        if opened:
            seconds = self.settings.default_cooldown_seconds
            self.cool(backend, deployment, seconds, f"circuit open ({opened} failed requests, last: {cause})")
            log.warning(
                "backend %s deployment=%s: %d requests failed there and succeeded elsewhere (last: %s); cooled %gs",
                backend.name,
                deployment or "-",
                opened,
                cause,
                seconds,
            )

    def all_refuse_us(self, info: RequestInfo) -> bool:
        """Whether every backend serving the deployment is out because it refused our credential."""
        now = time.time()
        key = info.deployment or ANY_DEPLOYMENT
        refusing = {
            c.backend for c in self.store.active(now) if c.deployment == key and c.reason.startswith(AUTH_REASON)
        }
        if not refusing:
            return False
        return all(b.name in refusing for b in self.settings.backends if b.serves(info.deployment))

    def cool(self, backend: Backend, deployment: str | None, seconds: float, reason: str) -> float:
        self.store.mark(backend.name, deployment or ANY_DEPLOYMENT, time.time() + seconds, reason)
        return seconds

    def cooling_until(self, backend: Backend, info: RequestInfo) -> float:
        """When `backend` may be asked again for this call's deployment (0 when it may now)."""
        now = time.time()
        until = self.store.cooling_until(backend.name, info.deployment or ANY_DEPLOYMENT, now)
        return until if until > now else 0.0

    # Reading an answer ----------------------------------------------------------------------------
    def _refused(self, backend: Backend, info: RequestInfo, status: int, refusal: bytes, probed: bool) -> float:
        """The backend refuses our credential (`lb.auth.refusals`): out of rotation for long, said
        once in the log and in /lb/status, with its own words as the cause (a wrong key is never the
        client's problem)."""
        cause = _cause(refusal, backend)
        if probed:
            cause += f"; GET {PROBE_PATH.partition('?')[0]} refused too"
        seconds = self.settings.auth_cooldown_seconds
        self.cool(backend, info.deployment, seconds, f"{AUTH_REASON} {status}: {cause}")
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

    async def _refuses_us(self, call: Call, backend: Backend, refusal: bytes) -> tuple[bool, bool]:
        """(whether a 401/403 refuses our credential, whether a probe had to say so): Azure's words
        decide at once; a refusal that may be about the client's request is ours only if the
        backend refuses a call without it too (`lb.auth.refusals`)."""
        judgement = judged(call.info.path, refusal)
        if judgement != "unsure":
            return judgement == "ours", False
        left = max(0.001, call.deadline - time.monotonic())  # waiting on another call's probe counts too
        try:
            refused = await asyncio.wait_for(
                self.probes.refused(backend.name, lambda: self._probe(backend, call.deadline)), left
            )
        except asyncio.TimeoutError:
            return False, False  # no answer in time proves nothing: the refusal is relayed as the client's
        return refused, refused

    async def _probe(self, backend: Backend, deadline: float) -> bool:
        """Whether `backend` refuses a call that carries nothing of the client's (`PROBE_PATH`, with
        our credential): then its refusal of the client's call was about us. No answer (an error, a
        timeout) proves nothing, and nothing is cooled on the client's request alone."""
        total = max(0.001, min(PROBE_SECONDS, deadline - time.monotonic()))
        try:
            upstream = await self._send(backend, "GET", (PROBE_PATH, b""), [], total, None, None)
        except Exception as exc:
            log.info("backend %s: probe of our credential got no answer (%s)", backend.name, type(exc).__name__)
            return False
        await discard(upstream)
        refused = upstream.status_code in AUTH_REFUSED
        log.info(
            "backend %s refused a client's call without saying it was our credential; a probe was %s (%d)",
            backend.name,
            "refused too" if refused else "answered",
            upstream.status_code,
        )
        return refused

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
        return self.cool(backend, info.deployment, seconds, f"{status} ({source})")

    def _timeouts(
        self, info: RequestInfo, remaining: float, may_fail_over: Callable[[], bool]
    ) -> tuple[float | None, float | None]:
        """(connect, first byte) bounds of one attempt; None: the request's deadline. A silent backend
        must leave time for another; but a non-streamed generation sends nothing until it is done, so
        it is never abandoned (and billed twice) for being long."""
        limit = self.settings.attempt_timeout_seconds
        if remaining <= limit or not may_fail_over():
            return None, None
        return limit, limit if info.stream or not info.body else None

    def _booked(self, attempt: Attempt, info: RequestInfo, status: int | str, cooldown: float | None) -> None:
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
        with one timer (aiohttp's own per-read and `total` timers would arm one per chunk);
        `connect` bounds the pool wait and connect, `first_byte` the wait for the head. The relay
        bounds the body by silence (`lb.relay.BodyLimits`)."""
        deadline = time.monotonic() + total
        auth = await self.backend_auth.headers(backend, deadline)  # waits only for a first token, to the deadline
        path, body = call  # this backend's deployment name (`upstream_call`)
        # A connect bound shorter than the deadline is aiohttp's to enforce (its timer maps to
        # ConnectTimeout); one as long is already the timer below: one timer per call, not two.
        connect = None if connect is None or connect >= total else connect
        # A bare httpx.Request, sent by the transport itself: no client's default headers (its own
        # User-Agent, Accept-Encoding), cookies or redirects have a place in a forwarded call. Raw
        # headers and the body as a stream skip httpx's normalising and merging: the transport
        # sets Content-Length itself.
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


async def discard(upstream: httpx.Response) -> bytes:
    """Drop an answer we won't relay (a 429 or 5xx being failed over). Its small body is read to the
    end first, so the connection goes back to the pool instead of a new handshake per 429."""
    try:
        return await asyncio.wait_for(upstream.aread(), DISCARD_READ_SECONDS)
    except (httpx.HTTPError, asyncio.TimeoutError):
        return b""
    finally:
        await upstream.aclose()


def buffered(
    upstream: httpx.Response,
    body: bytes,
    backend: Backend,
    attempts: int,
    own_url: Callable[[], str] = lambda: "",
) -> Response:
    """An answer already read whole (decoded), relayed with the backend's own headers and the
    proxy's two; those pointing at the backend (Location, operation-location) point at `own_url()`."""
    response = Response(body, status_code=upstream.status_code)
    skip = {b"content-length", b"content-encoding"}
    returned = [(k, v) for k, v in returned_headers(upstream.headers, backend.url, own_url) if k not in skip]
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

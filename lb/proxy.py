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
from collections.abc import Callable
from typing import Any

import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from lb import errors, logctx
from lb.attempt import Attempt, Attempts, Call, discard
from lb.auth import BackendAuth, Client, ClientAuth
from lb.config import Backend, Settings
from lb.headers import forwarded as forwarded_headers
from lb.headers import without_backend_quota
from lb.metering import Metering
from lb.objects.records import ObjectStore
from lb.objects.router import ObjectRouter
from lb.requestinfo import RequestInfo, arrived, check_headers, read_request
from lb.routing.balancer import Balancer, Demand, NoCandidate
from lb.state import ANY_DEPLOYMENT, CooldownStore, MemoryStore
from lb.telemetry import Telemetry
from lb.upstream import AiohttpTransport

log = logging.getLogger("lb")


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
            settings.client_limits,
            self.telemetry,
            stream_usage=settings.stream_usage,
            reserve=settings.reserve_tokens,
        )
        self.attempts = Attempts(
            settings, self.store, self.transport, self.backend_auth, self.telemetry, self.balancer.headroom
        )
        self.objects = ObjectRouter(objects or ObjectStore(), settings, self.attempts)  # who holds which object
        self._started = False
        self._start_lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._start_lock:
            if not self._started:
                await self.store.start()
                await self.metering.start()
                await self.objects.records.start()
                await self.balancer.start()
                self._started = True

    async def close(self) -> None:
        await self.store.close()
        await self.metering.close()
        await self.objects.records.close()
        await self.balancer.close()
        await self.transport.aclose()
        await self.backend_auth.close()
        self.telemetry.close()

    # Routes -----------------------------------------------------------------------------------
    async def handle(self, request: Request) -> Response:
        """`/openai/{path}`: never raises; every request gets exactly one answer, carrying its request id."""
        request_id = logctx.request_id_from(request.headers)
        logctx.bind(request_id)
        client, charge, info = None, None, None  # for metering: who asked, their quota's charge
        deadline = arrived(request) + self.settings.timeout_seconds  # up to the answer's head, upload included
        try:
            if not self._started:
                await self.start()
            check_headers(request)
            client = await self._authorize(request)
            # the call's token estimate is read by a client's quota and the headroom policy only
            tokens = client.name in self.metering.limiter.limits or self.balancer.policy == "headroom"
            info = await read_request(request, self.settings.max_body_bytes, tokens=tokens)
            info = await self.metering.prepare(info)  # a chat stream asks the backend for its usage chunk
            charge = self.metering.admit(client.name, info)  # reserves its cost; raises ClientQuotaExceeded when over
            await self.store.sync()
            objects = await self.objects.classify(request, info)  # None unless the call can name or create one
            call = Call(request, info, deadline, forwarded_headers(request, logctx.current_request_id.get()))
            if objects is None:
                response = await self.forward(call)
            else:
                response = await self.objects.forward(call, objects, client, self.forward)
            tried = call.tried
            throttled = sum(a.status == 429 for a in tried)
            self.telemetry.request(info.deployment, response.status_code, len(tried), throttled)
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
        if self.settings.isolating:  # every answer that leaves, whichever path made it
            response = without_backend_quota(response)
        if client is not None:  # then a limited client's own remaining quota
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
        """`GET /lb/status`: backends, hosts, cooldowns and state: for operators (`LB_ADMIN_CLIENTS`) only."""
        return await self._report(request, lambda client: self.status_report(), operators_only=True)

    async def usage(self, request: Request) -> Response:
        """`GET /lb/usage`: tokens and requests per client and per backend (see lb.metering); a client
        not in `LB_ADMIN_CLIENTS` sees only its own counts and limit."""
        return await self._report(request, lambda client: self.metering.report(client=client))

    async def _report(
        self, request: Request, report: Callable[[str | None], dict[str, Any]], *, operators_only: bool = False
    ) -> Response:
        """The `/lb/...` reports: a client key or token first, like every proxied call. `report` gets
        None for an operator (the whole pool), else the caller's name (only what is its own)."""
        try:
            client = await self._authorize(request)
            operator = client.kind == "anonymous" or client.name in self.settings.admin_clients
            if operators_only and not operator:
                raise errors.Forbidden(
                    f"{request.url.path} is for operators: this client ({client.name}) is not in LB_ADMIN_CLIENTS."
                )
        except errors.ProxyError as exc:
            return exc.response()
        if not self._started:
            await self.start()
        return JSONResponse(report(None if operator else client.name))

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
            "affinity_share": self.balancer.share.health() if self.balancer.share else None,
            "max_attempts": self.settings.max_attempts,
            "timeout_seconds": self.settings.timeout_seconds,
        }

    def _auth_report(self, backend: str) -> dict[str, Any] | None:
        failure = self.attempts.auth_failures.by_backend.get(backend)
        if failure is None:
            return None
        return {"status": failure.status, "cause": failure.cause, "since": round(failure.since)}

    # Failover loop ----------------------------------------------------------------------------
    async def forward(self, call: Call) -> Response:
        """Try backends until one answers for good; `call.tried` collects every attempt made.

        Only the backend's own words cool it at once: a 429 or a 503 with Retry-After (busy), a
        401/403 refusing our credential (any other 401/403 is the client's answer), a refused
        connection. No token of our own blames no backend. A timeout or another 5xx lets this
        request fail over, and becomes evidence against that backend (`lb.routing.breaker`) only
        if the request then succeeds elsewhere. What an answer means is `lb.attempt`'s to say.
        """
        info, tried = call.info, call.tried
        failure: errors.ProxyError | None = None
        suspects: list[tuple[Backend, str]] = []  # failed this request; the backend's fault if another succeeds
        need = self.balancer.demand(info)
        choice = self.balancer.pick(info.deployment, time.time(), need=need)

        while isinstance(choice, Backend):
            backend = choice
            if call.deadline - time.monotonic() <= 0:
                failure = errors.GatewayTimeout(
                    f"No backend answered within {self.settings.timeout_seconds:g} seconds."
                )
                break
            outcome = await self.attempts.send(call, backend, lambda: self._has_alternative(info, tried, need))
            if outcome.verdict == "answer":
                if outcome.relayed is not None:
                    return outcome.relayed
                upstream = outcome.upstream
                assert upstream is not None
                if upstream.status_code < 400:
                    self.attempts.succeeded(backend, info, suspects)
                return self.attempts.relay(call, upstream, backend)
            if outcome.suspect is not None:
                suspects.append((backend, outcome.suspect))
            upstream = outcome.upstream
            if upstream is None:  # no answer at all: an error, our credential refused or missing
                if outcome.verdict != "refused_us":
                    failure = outcome.error
                choice = self._next(info, tried, need)
                continue
            try:
                choice = self._next(info, tried, need)
                if isinstance(choice, Backend) and call.deadline > time.monotonic():
                    await discard(upstream)
                    continue
                if upstream.status_code == 429:
                    await discard(upstream)
                    return self._all_cooling(info, tried)
            except BaseException:
                await upstream.aclose()
                raise
            return self.attempts.relay(call, upstream, backend)  # the last backend's own 5xx/408 is the answer

        if isinstance(choice, NoCandidate) and not choice.served:
            raise errors.NotFound(f"No backend serves deployment '{info.deployment}'.")
        if self.attempts.all_refuse_us(info):
            return errors.BackendAuthFailed(info.deployment).response({"x-lb-attempts": str(len(tried))})
        if failure is not None:
            return failure.response({"x-lb-attempts": str(len(tried))})
        return self._all_cooling(info, tried)

    def _has_alternative(self, info: RequestInfo, tried: list[Attempt], need: Demand) -> bool:
        """Whether another backend could still be tried if the current attempt fails (only looks)."""
        return isinstance(self._next(info, tried, need, charge=False), Backend)

    def _next(
        self, info: RequestInfo, tried: list[Attempt], need: Demand, charge: bool = True
    ) -> Backend | NoCandidate:
        if len(tried) >= self.settings.max_attempts:
            return NoCandidate(served=True, retry_at=0.0)
        return self.balancer.pick(info.deployment, time.time(), {a.backend for a in tried}, need, charge)

    def _all_cooling(self, info: RequestInfo, tried: list[Attempt]) -> Response:
        now = time.time()
        retry_at = self.balancer.soonest_recovery(info.deployment, now)
        seconds = retry_at - now if retry_at else self.settings.default_cooldown_seconds
        if not tried:
            self.telemetry.all_cooling(info.deployment)
            log.debug("all backends cooling deployment=%s retry_after=%.1fs", info.deployment, seconds)
        return errors.AllBackendsCooling(info.deployment, seconds).response({"x-lb-attempts": str(len(tried))})

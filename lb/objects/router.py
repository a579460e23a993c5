"""Calls that name a stored object go to the backend holding it; calls that create one are recorded.

- Holder known: one attempt, to it alone. Cooling, or answering 429 / 5xx, it is still the only
  backend that can answer, so the client gets that 429 (with the Retry-After of the holder) or 5xx;
  failing over would only swap it for a certain "not found".
- Id unknown (made before the balancer was there, or its record lost): backends are asked in turn
  (priority order, random inside a group) until one answers something other than "not found" (404,
  or 400 `..._not_found`), at most `LB_MAX_ATTEMPTS`; a 2xx records the holder. A backend cooling or
  failing meanwhile might be the holder: with no other answer the client gets a 429 to retry, not a
  "not found" that could be false.
- Another client's object: refused with the 404 Azure gives for an object that does not exist.
- A call naming nothing (a first Responses turn, an upload) is balanced and failed over as usual;
  its 2xx answer's id is recorded against the backend that made it, and the creating client.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
from starlette.requests import Request
from starlette.responses import Response

from lb import errors, headers, logctx
from lb.auth import Client
from lb.auth.refusals import refuses_our_credential
from lb.config import Backend, Settings
from lb.objects.ids import (
    COLLECTIONS,
    REASONING_ID,
    ObjectCall,
    ObjectId,
    classify,
    is_object_route,
    kind_of,
    needs_decode,
)
from lb.objects.records import RETENTION_SECONDS, ObjectRecord, ObjectStore
from lb.objects.watch import watch, watch_all
from lb.relay import UpstreamResponse
from lb.requestinfo import NOT_PARSED, PARSE_LIMIT_BYTES, RequestInfo, parse_json
from lb.routing.deployments import upstream_call
from lb.state import ANY_DEPLOYMENT

if TYPE_CHECKING:
    from lb.proxy import Attempt, Proxy

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_ERROR_BYTES = 64 * 1024  # a "not found" answer is read whole to tell it from another 400


class HolderThrottled(errors.ProxyError):
    """The backend holding the object is cooling: only it can answer, so the client retries later."""

    status = 429
    code = "429"

    def __init__(self, seconds: float) -> None:
        seconds = max(seconds, 0.001)
        whole = max(1, math.ceil(seconds))
        super().__init__(
            f"The backend holding this object is throttled. Please retry after {whole} second"
            f"{'s' if whole != 1 else ''}.",
            {"Retry-After": str(whole), "retry-after-ms": str(max(1, math.ceil(seconds * 1000)))},
        )


def not_found(object_id: ObjectId) -> Response:
    """Azure OpenAI's answer for an object that does not exist (what another client's object looks like)."""
    if object_id.field == "previous_response_id":
        code, message = "previous_response_not_found", f"Previous response with id '{object_id.value}' not found."
    else:
        code, message = None, f"{object_id.kind.replace('_', ' ').capitalize()} with id '{object_id.value}' not found."
    error = {"message": message, "type": "invalid_request_error", "param": object_id.field, "code": code}
    return Response(json.dumps({"error": error}), status_code=404, media_type="application/json")


class ObjectRouter:
    def __init__(self, records: ObjectStore, settings: Settings, rng: random.Random | None = None) -> None:
        self.records = records
        self.settings = settings
        self.backends = {b.name: b for b in settings.backends}
        self.counters: Counter[str] = Counter()  # pinned, lookups, found, refused, recorded, forgotten
        self._rng = rng or random.Random()

    async def classify(self, request: Request, info: RequestInfo) -> ObjectCall | None:
        """None (the cost of a chat or embeddings call: a path split and a set lookup) or the object call.

        A body the byte search can't read is decoded: the payload routing already parsed if there is
        one, inline up to `PARSE_LIMIT_BYTES`, in a thread above it (once per request)."""
        content_type = request.headers.get("content-type")
        payload = info.payload
        if (
            payload is NOT_PARSED
            and len(info.body) > PARSE_LIMIT_BYTES
            and request.method == "POST"
            and "json" in (content_type or "application/json")
            and is_object_route(info.raw_path)
            and needs_decode(info.body)
        ):
            payload = await asyncio.to_thread(parse_json, info.body)
        return classify(request.method, info.raw_path, info.body, content_type, payload)

    def report(self) -> dict[str, Any]:
        return {"records": self.records.counts(), "calls": dict(self.counters), "store": self.records.health()}

    async def forward(
        self,
        proxy: Proxy,
        request: Request,
        info: RequestInfo,
        tried: list[Attempt],
        call: ObjectCall,
        client: Client,
        deadline: float,
    ) -> Response:
        holder: Backend | None = None
        unknown: list[ObjectId] = []
        for object_id in call.ids:
            record = await self.records.find(object_id.value)
            if record is None or record.backend not in self.backends:
                unknown.append(object_id)
                continue
            if record.client and record.client != client.id:
                self._count(proxy, "refused")
                return not_found(object_id)
            holder = holder or self.backends[record.backend]
        if holder is not None:
            self._count(proxy, "pinned")
            return await self._pinned(proxy, request, info, tried, call, client, holder, deadline)
        if unknown:
            self._count(proxy, "lookups")
            return await self._look_up(proxy, request, info, tried, call, client, unknown, deadline)
        return self._after(await proxy._forward(request, info, tried, deadline), call, client)

    # Holder known -------------------------------------------------------------------------------
    async def _pinned(
        self,
        proxy: Proxy,
        request: Request,
        info: RequestInfo,
        tried: list[Attempt],
        call: ObjectCall,
        client: Client,
        holder: Backend,
        deadline: float,
    ) -> Response:
        now = time.time()
        until = proxy.store.cooling_until(holder.name, info.deployment or ANY_DEPLOYMENT, now)
        if until > now:
            return HolderThrottled(until - now).response({"x-lb-attempts": "0", "x-lb-backend": holder.name})
        upstream = await self._attempt(proxy, request, info, tried, holder, deadline, alone=True)
        if isinstance(upstream, Response):
            return upstream  # connect error / timeout / refused credential: no other backend can know the object
        if upstream.status_code == 404 and call.path_id is not None:
            self._forget(call.path_id.value)  # its holder no longer has it (deleted, expired)
        return self._after(proxy._relay(request, upstream, holder, info, len(tried)), call, client)

    # Id unknown ---------------------------------------------------------------------------------
    async def _look_up(
        self,
        proxy: Proxy,
        request: Request,
        info: RequestInfo,
        tried: list[Attempt],
        call: ObjectCall,
        client: Client,
        unknown: list[ObjectId],
        deadline: float,
    ) -> Response:
        from lb.proxy import _own_url

        def own_url() -> str:
            return _own_url(request)

        candidates = self._in_turn(info.deployment)
        if not candidates:
            return await proxy._forward(request, info, tried, deadline)  # no backend serves it: the usual 404
        retry_at = 0.0  # the soonest a backend that might hold it can be asked again
        unsure: Response | None = None  # a backend that might hold it could not say (error, 5xx, cooling)
        answer: Response | None = None  # the last "not found", relayed if every backend said so
        key = info.deployment or ANY_DEPLOYMENT
        for backend in candidates:
            if len(tried) >= self.settings.max_attempts or deadline <= time.monotonic():
                break
            until = proxy.store.cooling_until(backend.name, key, time.time())
            if until:
                retry_at = min(retry_at or until, until)
                continue
            upstream = await self._attempt(proxy, request, info, tried, backend, deadline, alone=False)
            if isinstance(upstream, Response):
                unsure = upstream
                continue
            if upstream.status_code in RETRYABLE_STATUS:
                until = proxy.store.cooling_until(backend.name, key, time.time())
                retry_at = min(retry_at or until, until) if until else retry_at
                raw = await _read_raw(upstream)
                unsure = _buffered(upstream, raw, backend, len(tried), own_url)
                continue
            if upstream.status_code in (400, 404):
                raw = await _read_raw(upstream)
                if _says_not_found(upstream, raw):
                    answer = _buffered(upstream, raw, backend, len(tried), own_url)
                    continue
                return _buffered(upstream, raw, backend, len(tried), own_url)
            if 200 <= upstream.status_code < 300:
                self._count(proxy, "found")
                for object_id in unknown:  # its creator is unknown: any client of the pool may use it
                    await self._remember(object_id.value, object_id.kind, backend, "")
            return self._after(proxy._relay(request, upstream, backend, info, len(tried)), call, client)
        # Nobody said it is there. A "not found" is the answer only if no backend that might hold it
        # was left unheard: otherwise the client retries (429) or sees that backend's failure.
        attempts = {"x-lb-attempts": str(len(tried))}
        if retry_at:
            return HolderThrottled(retry_at - time.time()).response(attempts)
        if unsure is not None:
            return unsure
        if answer is not None:
            return answer
        return HolderThrottled(self.settings.default_cooldown_seconds).response(attempts)

    def _in_turn(self, deployment: str | None) -> list[Backend]:
        """Backends serving the deployment, best priority first, random inside a priority group."""
        serving = [b for b in self.settings.backends if b.serves(deployment)]
        self._rng.shuffle(serving)
        return sorted(serving, key=lambda b: b.priority)

    # One attempt --------------------------------------------------------------------------------
    async def _attempt(
        self,
        proxy: Proxy,
        request: Request,
        info: RequestInfo,
        tried: list[Attempt],
        backend: Backend,
        deadline: float,
        alone: bool,
    ) -> httpx.Response | Response:
        """Send to `backend`, cooling it on what the failover loop cools on (a 429 or a 503 with a
        retry hint, an unreachable backend, a refused credential). An error, or a backend refusing
        our credential, comes back as the proxy's own answer (502 / 504). `alone`: no other backend
        could answer instead, so a long generation is never cut by the attempt timeout."""
        from lb.proxy import AUTH_REFUSED, Attempt, _discard, _refusal_relayed

        settings = self.settings
        attempt = Attempt(backend.name, time.time(), time.perf_counter())
        tried.append(attempt)
        forwarded = headers.forwarded(request, logctx.current_request_id.get())
        remaining = max(0.001, deadline - time.monotonic())
        connect, first_byte = proxy._attempt_timeouts(info, remaining, lambda: not alone)
        call = upstream_call(backend, info)  # ours, before the catch-all: never booked against the backend
        try:
            upstream = await proxy._send(backend, request.method, call, forwarded, remaining, connect, first_byte)
        except errors.BackendCredentialUnavailable as exc:  # our token, not the backend: nothing blamed
            proxy._attempted(attempt, info, "error BackendCredentialUnavailable", None)
            return exc.response({"x-lb-attempts": str(len(tried))})
        except Exception as exc:
            seconds = None
            if isinstance(exc, httpx.ConnectError):
                seconds = proxy._cool(backend, info.deployment, settings.default_cooldown_seconds, type(exc).__name__)
            proxy._attempted(attempt, info, f"error {type(exc).__name__}", seconds)
            return errors.upstream_error(exc, backend.name).response({"x-lb-attempts": str(len(tried))})
        status = upstream.status_code
        if status in AUTH_REFUSED:
            refusal = await _discard(upstream)
            if not refuses_our_credential(info.raw_path, refusal):  # about what the client asked: its answer
                proxy._attempted(attempt, info, status, None)
                return _refusal_relayed(upstream, refusal, backend, len(tried))
            # our credential, not the client's: never relayed as the client's 401
            proxy._attempted(attempt, info, status, proxy._refused(backend, info, status, refusal))
            return errors.BackendAuthFailed(info.deployment).response({"x-lb-attempts": str(len(tried))})
        proxy._attempted(attempt, info, status, proxy._cool_if_busy(backend, info, upstream))
        return upstream

    # Records ------------------------------------------------------------------------------------
    def _after(self, response: Response, call: ObjectCall, client: Client) -> Response:
        """Record what a 2xx created, forget what it deleted."""
        if not isinstance(response, UpstreamResponse) or not 200 <= response.status_code < 300:
            return response
        if call.deletes and call.path_id is not None and len(call.ids) == 1:
            self._forget(call.path_id.value)
            return response
        if call.creates or call.collection == "batches":  # a batch's output files are made as it completes
            named = {i.value for i in call.ids}
            backend = self.backends[response.backend]
            default_kind = COLLECTIONS[call.collection]

            async def on_id(object_id: str) -> None:
                known = self.records.known(object_id)
                if object_id not in named and (known is None or known.backend != backend.name):
                    kind = kind_of(object_id, default_kind if call.creates else "file")
                    await self._remember(object_id, kind, backend, client.id)

            watch(response, on_id)
        if call.reasoning:  # encrypted reasoning items decrypt only where they were made
            backend = self.backends[response.backend]

            async def on_reasoning(item_id: str) -> None:
                await self._remember(item_id, "reasoning", backend, client.id)

            watch_all(response, REASONING_ID, on_reasoning)
        return response

    async def _remember(self, object_id: str, kind: str, backend: Backend, client: str) -> None:
        record = ObjectRecord(backend.name, client, kind, time.time() + RETENTION_SECONDS)
        await self.records.remember(object_id, record)
        self.counters["recorded"] += 1

    def _forget(self, object_id: str) -> None:
        self.records.forget(object_id)
        self.counters["forgotten"] += 1

    def _count(self, proxy: Proxy, outcome: str) -> None:
        self.counters[outcome] += 1
        proxy.telemetry.object_call(outcome)


def _says_not_found(upstream: httpx.Response, raw: bytes) -> bool:
    """404, or a 400 whose error code says the named object does not exist here (`previous_response_not_found`,
    `invalid_encrypted_content`: a reasoning item made by another resource)."""
    if upstream.status_code == 404:
        return True
    try:
        error = json.loads(raw).get("error") or {}
    except (ValueError, AttributeError, RecursionError):
        return False
    code = str(error.get("code") or "")
    return (
        code.endswith("not_found")
        or code == "invalid_encrypted_content"
        or ("not found" in str(error.get("message") or "").lower() and bool(error.get("param")))
    )


async def _read_raw(upstream: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in upstream.aiter_raw():
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ERROR_BYTES:
                break
    except httpx.HTTPError:
        pass
    finally:
        await upstream.aclose()
    return b"".join(chunks)


def _buffered(
    upstream: httpx.Response, raw: bytes, backend: Backend, attempts: int, own_url: Callable[[], str]
) -> Response:
    """An answer already read whole, relayed with the backend's own headers (and the proxy's two);
    those pointing at the backend (Location, operation-location) point at us, as on the main path."""
    response = Response(raw, status_code=upstream.status_code)
    returned = headers.returned(upstream.headers, backend.url, own_url)
    kept = [(k, v) for k, v in returned if k not in (b"content-length", b"content-encoding")]
    response.raw_headers = [
        *kept,
        (b"content-length", str(len(raw)).encode()),
        (b"x-lb-backend", backend.name.encode()),
        (b"x-lb-attempts", str(attempts).encode()),
    ]
    if upstream.headers.get("content-encoding"):
        response.raw_headers.append((b"content-encoding", upstream.headers["content-encoding"].encode()))
    return response

"""Calls that name a stored object go to the backend holding it, for the client that created it.

- Holder known, caller its creator: one attempt, to it alone (`lb.attempt`). Cooling, or answering
  429 / 5xx, it is still the only backend that can answer, so the client gets that 429 (with the
  holder's Retry-After) or 5xx; failing over would only swap it for a certain "not found".
- Another client's object, or an id without a record while several clients share the pool: the
  404 Azure gives for an object that does not exist, and no backend call. Ids made before the
  balancer was there are looked up across the backends only with one client, or when the operator
  turns `LB_OBJECT_LOOKUP` on; what a look-up finds has no creator, so any client may use it.
- Records that can't be read: 503 + Retry-After (fail closed), never a guess.
- A call naming nothing (a first Responses turn, an upload) is balanced and failed over as usual
  (`failover`); its 2xx answer's id is recorded, inserted only if absent, for the calling client.
- A GET on a collection fans out to every backend, keeps the caller's objects and pages through
  them in Azure's list shape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lb import errors
from lb.attempt import RETRYABLE_STATUS, Attempts, Call, buffered
from lb.auth import Client
from lb.config import Backend, Settings
from lb.objects import forms, routes
from lb.objects.reasoning import watch_reasoning
from lb.objects.records import RETENTION_SECONDS, ObjectRecord, ObjectStore, RecordsUnavailable
from lb.objects.routes import ObjectCall, ObjectId
from lb.objects.watch import watch
from lb.relay import UpstreamResponse
from lb.requestinfo import PARSE_LIMIT_BYTES, RequestInfo

SCAN_SLICE_BYTES = 1024 * 1024  # a large body is searched for id fields a slice per turn of the loop
MAX_ERROR_BYTES = 64 * 1024  # a "not found" answer is read whole to tell it from another 400
MAX_LIST_BYTES = 8 * 1024 * 1024  # one backend's page of a list
LIST_PAGE = 100  # objects asked of each backend per page (the most Azure's lists give)
MAX_LIST_PAGES = 20  # pages read from one backend for one list call
DEFAULT_LIMIT, MAX_LIMIT = 20, 100

Failover = Callable[[Call], Awaitable[Response]]


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


class RecordsDown(errors.ProxyError):
    """Who owns an object can't be read now: refused, never guessed."""

    status = 503
    code = "ServiceUnavailable"

    def __init__(self, seconds: float) -> None:
        whole = max(1, math.ceil(seconds))
        super().__init__(
            "The load balancer can't read its object records now, so it can't tell whose this object is."
            f" Please retry after {whole} second{'s' if whole != 1 else ''}.",
            {"Retry-After": str(whole)},
        )


def not_found(object_id: ObjectId) -> Response:
    """Azure OpenAI's answer for an object that does not exist (what another client's object looks like)."""
    if object_id.field == "previous_response_id":
        code, message = "previous_response_not_found", f"Previous response with id '{object_id.value}' not found."
    else:
        code, message = None, f"{object_id.kind.replace('_', ' ').capitalize()} with id '{object_id.value}' not found."
    if isinstance(object_id, forms.LineObjectId):
        message += f" (line {object_id.line} of the batch input file)"
    error = {"message": message, "type": "invalid_request_error", "param": object_id.field, "code": code}
    return Response(json.dumps({"error": error}), status_code=404, media_type="application/json")


class ObjectRouter:
    def __init__(
        self, records: ObjectStore, settings: Settings, attempts: Attempts, rng: random.Random | None = None
    ) -> None:
        self.records = records
        self.settings = settings
        self.attempts = attempts
        self.backends = {b.name: b for b in settings.backends}
        self.isolating = settings.isolating  # several clients: each one's objects are its own
        self.lookup = not settings.isolating or settings.object_lookup
        self.counters: Counter[str] = Counter()  # pinned, lookups, found, refused, recorded, forgotten, lists
        self._rng = rng or random.Random()
        self._parsing = asyncio.Semaphore(1)  # large bodies read off the loop, one at a time (`_off_loop`)

    # Reading the call ---------------------------------------------------------------------------
    async def classify(self, request: Request, info: RequestInfo) -> ObjectCall | None:
        """None for a call that can neither name nor create an object (chat and embeddings cost a
        path split, a set lookup and, for chat, two byte searches); else the object call. A call
        the balancer can't read the way the backend will is refused (`lb.objects.routes`). A large
        body that must be parsed is parsed off the event loop."""
        content_type = request.headers.get("content-type")
        objects = await self._classify(request, info, content_type)
        if self.isolating and objects is not None and forms.reads(request.method, objects, content_type):
            args = (request.method, objects, info.body, content_type)  # forms, batch files
            small = len(info.body) <= PARSE_LIMIT_BYTES
            objects = forms.read_now(*args) if small else await self._off_loop(forms.read_now, *args)
            if objects.collection is None and not objects.ids:
                return None  # a stateless route's form naming no object: a model call like any other
        return objects

    async def _classify(self, request: Request, info: RequestInfo, content_type: str | None) -> ObjectCall | None:
        body = info.body
        if len(body) <= PARSE_LIMIT_BYTES:
            return routes.classify(request.method, info.path, body, content_type, self.isolating)
        markers = routes.body_markers(request.method, info.path, body, content_type)
        named = markers is not None and await _names_objects(body, markers)
        if not named and routes.route(info.path)[0] is None:
            return routes.classify(request.method, info.path, body, content_type, self.isolating, named=False)
        # off the loop: an object route's body is parsed if it may name objects, and searched whole
        # (its encoding, `"store": false`) even if not, each a pass other requests would wait behind
        args = (request.method, info.path, body, content_type, self.isolating, named)
        return await self._off_loop(routes.classify, *args)

    async def _off_loop(self, read: Callable[..., ObjectCall | None], *args: Any) -> Any:
        """`read(*args)` in a thread, one at a time in this process. A parse holds the GIL but where it calls
        Python (`routes.keyed`, a number), so the loop waits for it as long as it shares the GIL with one
        thread at most: three 9 MB bodies parsed at once made its 1 ms ticks p99 170 ms, max 330 ms.
        Other large bodies wait their turn here; small ones (PARSE_LIMIT_BYTES) are read on the loop."""
        async with self._parsing:
            return await asyncio.to_thread(read, *args)

    def report(self) -> dict[str, Any]:
        return {"records": self.records.counts(), "calls": dict(self.counters), "store": self.records.health()}

    # Routing ----------------------------------------------------------------------------------
    async def forward(self, call: Call, objects: ObjectCall, client: Client, failover: Failover) -> Response:
        if objects.lists:
            return await self._list(call, objects, client)
        holder: Backend | None = None
        owner = client.id
        try:
            unknown: list[ObjectId] = []
            for object_id in objects.ids:
                record = await self.records.find(object_id.value)
                if record is None or record.backend not in self.backends:
                    unknown.append(object_id)
                    continue
                if not self._may_use(record, client):
                    self._count("refused")
                    return not_found(object_id)
                owner = record.client or owner
                holder = holder or self.backends[record.backend]
        except RecordsUnavailable as exc:
            self._count("unavailable")
            return RecordsDown(exc.retry_after).response({"x-lb-attempts": "0"})
        if unknown and not self.lookup:
            self._count("unknown")
            return not_found(unknown[0])
        if holder is not None:
            self._count("pinned")
            return await self._pinned(call, objects, client, holder, owner)
        if unknown:
            self._count("lookups")
            return await self._look_up(call, objects, client, unknown, failover)
        return self._after(await failover(call), objects, client.id)

    def _may_use(self, record: ObjectRecord, client: Client) -> bool:
        """Its creator may; a record with no creator (found by a look-up) only where look-ups are allowed."""
        if record.client:
            return record.client == client.id
        return self.lookup

    async def _pinned(self, call: Call, objects: ObjectCall, client: Client, holder: Backend, owner: str) -> Response:
        until = self.attempts.cooling_until(holder, call.info)
        if until:
            return HolderThrottled(until - time.time()).response({"x-lb-attempts": "0", "x-lb-backend": holder.name})
        outcome = await self.attempts.send(call, holder, lambda: False)
        attempts = {"x-lb-attempts": str(len(call.tried))}
        if outcome.relayed is not None:
            return outcome.relayed
        if outcome.upstream is None:  # no other backend can know the object: its failure is the answer
            error = outcome.error or errors.BadGateway(f"Backend '{holder.name}' failed.")
            return error.response(attempts)
        upstream = outcome.upstream
        if upstream.status_code == 404 and objects.itself and objects.path_id is not None:
            self._forget(objects.path_id.value)  # its holder no longer has it (deleted, expired)
        # a 404 on a sub-path (a file not attached to the store, an item not in the conversation) says
        # nothing about the object itself: its record stays
        return self._after(self.attempts.relay(call, upstream, holder), objects, owner)

    async def _look_up(
        self, call: Call, objects: ObjectCall, client: Client, unknown: list[ObjectId], failover: Failover
    ) -> Response:
        """Ask backends in turn until one answers something other than "not found"."""
        info = call.info
        candidates = self._in_turn(info.deployment)
        if not candidates:
            return await failover(call)  # no backend serves it: the usual 404
        retry_at = 0.0  # the soonest a backend that might hold it can be asked again
        unsure: Response | None = None  # a backend that might hold it could not say (error, 5xx, cooling)
        answer: Response | None = None  # the last "not found", relayed if every backend said so
        for backend in candidates:
            if len(call.tried) >= self.settings.max_attempts or call.deadline <= time.monotonic():
                break
            until = self.attempts.cooling_until(backend, info)
            if until:
                retry_at = min(retry_at or until, until)
                continue
            outcome = await self.attempts.send(call, backend, lambda: False)
            if outcome.relayed is not None:
                return outcome.relayed
            upstream = outcome.upstream
            if upstream is None:
                error = outcome.error or errors.BadGateway(f"Backend '{backend.name}' failed.")
                unsure = error.response({"x-lb-attempts": str(len(call.tried))})
                continue
            status = upstream.status_code
            if status in RETRYABLE_STATUS:
                until = self.attempts.cooling_until(backend, info)
                retry_at = min(retry_at or until, until) if until else retry_at
                unsure = buffered(
                    upstream, await _read_raw(upstream, call.deadline), backend, len(call.tried), call.own_url
                )
                continue
            if status in (400, 404):
                raw = await _read_raw(upstream, call.deadline)
                if _says_not_found(status, raw):
                    answer = buffered(upstream, raw, backend, len(call.tried), call.own_url)
                    continue
                return buffered(upstream, raw, backend, len(call.tried), call.own_url)
            if 200 <= status < 300:
                self._count("found")
                for object_id in unknown:  # its creator is unknown: recorded with none, never over a record
                    await self._record(object_id.value, object_id.kind, backend, "")
            return self._after(self.attempts.relay(call, upstream, backend), objects, client.id)
        attempts = {"x-lb-attempts": str(len(call.tried))}
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

    # Lists ------------------------------------------------------------------------------------
    async def _list(self, call: Call, objects: ObjectCall, client: Client) -> Response:
        """A collection's list over the whole pool: every backend's objects, the caller's only
        (with several clients), newest first unless `order=asc`, paged by `after` / `limit`."""
        assert objects.collection is not None
        self._count("lists")
        path, _, query = call.info.raw_path.partition("?")
        params = parse_qsl(query, keep_blank_values=True)
        asked = {k: v for k, v in params}
        limit = _limit(asked.get("limit"))
        order = "asc" if asked.get("order") == "asc" else "desc"
        after = asked.get("after")
        if after is not None and not routes.is_id(after, objects.collection.kind):
            raise routes.InvalidObjectId(f"'after' must be a {objects.collection.kind.replace('_', ' ')} id.")
        kept = [(k, v) for k, v in params if k not in ("limit", "after", "order")]
        try:
            mine = await self.records.owned(client.id, objects.collection.kind) if self.isolating else None
        except RecordsUnavailable as exc:
            return RecordsDown(exc.retry_after).response({"x-lb-attempts": "0"})
        merged: dict[str, dict[str, Any]] = {}
        for backend in self.settings.backends:
            page_after: str | None = None
            for _ in range(MAX_LIST_PAGES):
                page_query = urlencode(
                    [*kept, ("limit", str(LIST_PAGE)), ("order", order)]
                    + ([("after", page_after)] if page_after else [])
                )
                info = dataclasses.replace(call.info, raw_path=f"{path}?{page_query}")
                page = dataclasses.replace(call, info=info)
                outcome = await self.attempts.send(page, backend, lambda: False)  # page.tried is call.tried
                if outcome.relayed is not None:
                    return outcome.relayed
                listed = None
                if outcome.upstream is not None:
                    ok = outcome.upstream.status_code == 200
                    raw = await _read_raw(outcome.upstream, call.deadline, MAX_LIST_BYTES)
                    listed = _page(raw) if ok else None
                if listed is None:  # a short list would pass for the whole pool's: refused instead
                    return errors.BadGateway(
                        f"Backend '{backend.name}' could not list its {objects.collection.path[-1]}; the pool's list"
                        " would be incomplete. Please retry."
                    ).response({"Retry-After": "1", "x-lb-attempts": str(len(call.tried))})
                data, more = listed
                for item in data:
                    object_id = item.get("id")
                    if isinstance(object_id, str) and (mine is None or object_id in mine):
                        merged[object_id] = item
                if not more or not data or not isinstance(data[-1].get("id"), str):
                    break
                page_after = data[-1]["id"]
        items = sorted(merged.values(), key=lambda o: (o.get("created_at") or 0, o["id"]), reverse=order == "desc")
        if after is not None:
            ids = [o["id"] for o in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        shown = items[:limit]
        body = {
            "object": "list",
            "data": shown,
            "first_id": shown[0]["id"] if shown else None,
            "last_id": shown[-1]["id"] if shown else None,
            "has_more": len(items) > limit,
        }
        return JSONResponse(body, headers={"x-lb-attempts": str(len(call.tried))})

    # Records ------------------------------------------------------------------------------------
    def _after(self, response: Response, objects: ObjectCall, owner: str) -> Response:
        """Record what a 2xx created (for its creator), forget what it deleted."""
        if not isinstance(response, UpstreamResponse) or not 200 <= response.status_code < 300:
            return response
        backend = self.backends[response.backend]
        if objects.deletes and objects.path_id is not None and len(objects.ids) == 1:
            if objects.itself:  # a sub-resource's DELETE (a store's file, a conversation's item) keeps it
                self._forget(objects.path_id.value)
            return response
        fields = ("id", *objects.made_fields) if objects.creates else objects.made_fields
        if fields and objects.collection is not None:
            named = {i.value for i in objects.ids}
            default = objects.collection.kind if objects.creates else "file"

            async def on_id(object_id: str) -> None:
                if object_id not in named and routes.is_id(object_id):
                    await self._record(object_id, routes.kind_of(object_id, default), backend, owner)

            watch(response, on_id, fields)
        if objects.responses:  # reasoning items decrypt only where they were made

            async def on_reasoning(item_id: str) -> None:
                await self._record(item_id, "reasoning", backend, owner)

            watch_reasoning(response, on_reasoning)
        return response

    async def _record(self, object_id: str, kind: str, backend: Backend, client: str) -> None:
        record = ObjectRecord(backend.name, client, kind, time.time() + RETENTION_SECONDS)
        await self.records.create(object_id, record)
        self.counters["recorded"] += 1

    def _forget(self, object_id: str) -> None:
        self.records.forget(object_id)
        self.counters["forgotten"] += 1

    def _count(self, outcome: str) -> None:
        self.counters[outcome] += 1
        self.attempts.telemetry.object_call(outcome)


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise errors.BadRequest(f"'limit' must be a whole number from 1 to {MAX_LIMIT}.")
    return int(raw)


def _page(raw: bytes) -> tuple[list[dict[str, Any]], bool] | None:
    """A backend's page of a list: its objects and whether more follow; None when it is not one."""
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        return None
    return [o for o in payload["data"] if isinstance(o, dict)], payload.get("has_more") is True


async def _names_objects(body: bytes, markers: tuple[bytes, ...]) -> bool:
    """`routes.names_objects` over a large body in slices, yielding to the loop between them."""
    overlap = max(len(m) for m in markers)
    for start in range(0, len(body), SCAN_SLICE_BYTES):
        if routes.names_objects(body[max(0, start - overlap) : start + SCAN_SLICE_BYTES], markers):
            return True
        await asyncio.sleep(0)
    return False


def _says_not_found(status: int, raw: bytes) -> bool:
    """404, or a 400 whose error code says the named object does not exist here (`previous_response_not_found`,
    `invalid_encrypted_content`: a reasoning item made by another resource)."""
    if status == 404:
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


async def _read_raw(upstream: httpx.Response, deadline: float, limit: int = MAX_ERROR_BYTES) -> bytes:
    """An answer read whole (decoded), up to `limit` bytes and the request's deadline: what arrived by then."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout_at(deadline):
            async for chunk in upstream.aiter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    break
    except (httpx.HTTPError, TimeoutError):
        pass
    finally:
        await upstream.aclose()
    return b"".join(chunks)

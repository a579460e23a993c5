"""Who spent the tokens, on which backend: the counts behind `GET /lb/usage`, the token metrics and quotas.

The proxy calls three hooks and nothing else: `prepare()` (a chat stream asks the backend for its
usage chunk, whatever the client sent), `admit()` before the failover loop (the client's quota
reserves the call's cost, `lb.metering.quota`) and `observe()` on the answer, which watches its
body go by (`lb.metering.usage.UsageReader`) and, when the body ends, counts its usage per client
and per backend, exports it (`Telemetry.tokens`) and settles the reservation. What is generated out
of the call's sight (a background response, an Assistants run) is charged once, by id, when first
seen finished (`lb.metering.responses`, `lb.metering.runs`). The body is wrapped,
not copied: each read leaves for the client as it came, except a usage chunk the client did not
ask for, which is dropped.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from lb import bodyscan
from lb.metering.quota import DEFAULT_RESERVE_TOKENS, WINDOW, Charge, Limit, Limiter
from lb.metering.responses import MAX_HELD, TERMINAL, Held, ResponseBook
from lb.metering.runs import AGE_SECONDS, runs_in, shows_runs, total
from lb.metering.usage import Usage, UsageChunkFilter, UsageReader, decoder, usage_inserted, usage_requested
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
# Calls by what they do (`RequestInfo.operation`: the route lower-cased, whatever the URL's shape or case).
CHAT_OPERATIONS = frozenset({"chat/completions", "completions", "extensions/chat/completions"})  # usage when asked
# Calls that produce output, reserved for it. Images (gpt-image-1) and speech (gpt-4o-mini-tts) are
# billed in tokens too; an image answer says its usage, a speech answer (audio) does not: it is
# charged its reservation, like any call whose usage stays unknown.
GENERATING_OPERATIONS = CHAT_OPERATIONS | {"responses", "responses/compact", "images/generations", "audio/speech"}
# Calls whose input is a file in a multipart form (an image to edit, audio to transcribe: gpt-image-1
# and gpt-4o-transcribe bill them in tokens). The file's bytes say little of its tokens, so these
# reserve the deployment's default (`LB_RESERVE_TOKENS`) and are charged the usage their answer
# states, else that reservation: a limited client can't spend through them unmetered.
FILE_INPUT_OPERATIONS = frozenset({"images/edits", "images/variations", "audio/transcriptions", "audio/translations"})
TOKEN_OPERATIONS = GENERATING_OPERATIONS | FILE_INPUT_OPERATIONS | {"embeddings"}  # calls charged in tokens
_hide_usage: ContextVar[bool] = ContextVar("lb_hide_usage", default=False)  # this request's client didn't ask


def starts_generation(operation: str) -> bool:
    """Whether a call has the backend generate later on the client's behalf, out of our sight: an
    Assistants run created (`threads/runs`, `threads/{id}/runs`) or resumed with tool outputs
    (`threads/{id}/runs/{id}/submit_tool_outputs`), an eval run created (`evals/{id}/runs`, which
    samples the model once per item). Their answer is the run, queued: what it spends is not in it.
    So they reserve like a generating call; an Assistants run's reservation is then held by the run
    and settled against its usage when the run is first seen finished (`lb.metering.runs`), an eval
    run's is charged (docs/metering.md)."""
    parts = operation.split("/")
    if parts[0] == "threads":
        return parts[1:] == ["runs"] or (
            len(parts) in (3, 5) and parts[2] == "runs" and parts[4:] in ([], ["submit_tool_outputs"])
        )
    return len(parts) == 3 and parts[0] == "evals" and parts[2] == "runs"


class Metering:
    """This instance's token counts and client quotas; built once per process."""

    def __init__(
        self,
        limits: dict[str, Limit],
        telemetry: Telemetry,
        clock: Callable[[], float] = time.time,
        stream_usage: str = STREAM_USAGE_AS_SENT,
        reserve: dict[str, int] | None = None,
    ) -> None:
        self.limiter = Limiter(limits)
        self.include_stream_usage = stream_usage == STREAM_USAGE_INCLUDE
        self.reserve = reserve or {}  # LB_RESERVE_TOKENS: deployment (or "*") -> output tokens reserved
        self.telemetry = telemetry
        self.clock = clock
        self.clients = Windows(_WIDTH)
        self.backends = Windows(_WIDTH)
        self.responses = ResponseBook()  # background responses and Assistants runs, by id
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
    async def prepare(self, info: RequestInfo) -> RequestInfo:
        """A streamed chat always asks the backend for its usage chunk; the client sees that chunk
        only if it asked for it (or, with `LB_STREAM_USAGE=include`, did not say)."""
        _hide_usage.set(False)
        if not info.stream or info.operation not in CHAT_OPERATIONS:
            return info
        marks = info.marks
        inserted = usage_inserted(info.body, marks.stream_options)
        if inserted is not None:  # the usual stream: a member inserted as bytes, what was found only moves
            body, shift = inserted
            spans = info.model_spans
            moved = None if spans is None else tuple((start + shift, end + shift) for start, end in spans)
            changed = replace(info, body=body, payload=NOT_PARSED, model_spans=moved)
        else:
            rewritten, _asked = usage_requested(info.body, info.payload, stream_options=True)
            if rewritten is None:
                return info
            body = rewritten
            # re-serialised: a new body, read again (bounded: MAX_REWRITE_BYTES, or already parsed)
            spans = None if info.model_spans is None else tuple(await bodyscan.top_level_spans(body, b"model"))
            changed = replace(
                info,
                body=body,
                payload=NOT_PARSED,
                model_spans=spans,
                marks=replace(bodyscan.read_marks(body, tokens=marks.max_tokens is not None), choices=marks.choices),
            )
        _hide_usage.set(not (self.include_stream_usage and not marks.include_usage))
        return changed

    def reservation(self, info: RequestInfo) -> int:
        """Tokens a call may cost: its prompt (body / 4) plus its stated maximum output, else the
        deployment's default (`LB_RESERVE_TOKENS`) when it generates anything, once per choice it
        asks for (`n`, `best_of`). A run started for later (`starts_generation`) reserves the same
        way. Calls that spend no tokens (files, batches, reads) reserve nothing: a batch's input
        file is not its prompt."""
        operation = info.operation
        if not info.body:
            return 0
        later = operation not in TOKEN_OPERATIONS  # then it spends tokens only if it starts a run
        if later and not starts_generation(operation):
            return 0
        default = self.reserve.get(info.deployment or "", self.reserve.get("*", DEFAULT_RESERVE_TOKENS))
        choices = info.marks.choices
        if operation in FILE_INPUT_OPERATIONS:
            return default * choices
        tokens = info.tokens
        if not info.marks.max_tokens and (later or operation in GENERATING_OPERATIONS):  # none stated
            tokens += default * choices
        return tokens

    def admit(self, client: str, info: RequestInfo) -> Charge | None:
        """Reserve a limited client's call; raises ClientQuotaExceeded (or BatchesNotAllowed) when over."""
        if client not in self.limiter.limits:
            return None
        self.version += 1
        batch = bool(info.body) and info.operation == "batches"
        return self.limiter.admit(client, self.reservation(info), self.clock(), batch=batch)

    def observe(self, response: Response, client: str, info: RequestInfo | None, charge: Charge | None) -> Response:
        """Count the answer's usage when its body has passed; a limited client gets its own quota headers.
        (With several clients, `lb.proxy` has taken the backend's `x-ratelimit-*` off every answer.)"""
        if charge is not None:
            _set_rate_headers(response, charge.headers)
        deployment = info.deployment if info is not None else None
        if not isinstance(response, UpstreamResponse):  # the proxy's own answer: no backend spent anything
            if charge is not None:
                self.limiter.settle(charge, 0, self.clock(), requests=0)
                self.version += 1
            elif client in self.limiter.limits:
                _set_rate_headers(response, self.limiter.headers(client, self.clock()))
            return response
        backend, ok, stream = response.backend, 200 <= response.status_code < 300, response.event_stream
        readable = stream or "json" in response.upstream.headers.get("content-type", "")  # not audio, files, ...
        operation = info.operation if info is not None else ""
        responses = operation == "responses" or operation.startswith("responses/")
        # a stored response read, polled or cancelled (a compaction makes a new output: charged as made)
        read = responses and operation not in ("responses", "responses/compact")
        runs = shows_runs(operation)
        reader = UsageReader(stream, responses, runs_in if runs else None) if ok and readable else None
        hide = UsageChunkFilter() if reader is not None and stream and _hide_usage.get() else None
        encoding = response.upstream.headers.get("content-encoding", "identity").lower()
        plain = decoder(encoding) if reader is not None and encoding != "identity" else None
        if plain is not None:
            hide = None  # a compressed stream cannot be edited: relayed as sent
        if hide is not None:  # the body will be shorter than the backend said, if it said
            response.raw_headers = [(k, v) for k, v in response.raw_headers if k != b"content-length"]
        body = response.body_iterator

        async def metered() -> AsyncIterator[Any]:
            try:
                if reader is None:
                    async for chunk in body:
                        yield chunk
                elif hide is None:
                    feed = reader.feed
                    async for chunk in body:
                        feed(plain(chunk) if plain is not None else chunk)
                        yield chunk
                else:
                    feed, push = reader.feed, hide.push
                    async for chunk in body:
                        feed(chunk)
                        if out := push(chunk):
                            yield out
                    if out := hide.flush():
                        yield out
            finally:
                if runs:
                    starts = info is not None and bool(info.body) and starts_generation(operation)
                    self._settle_runs(client, backend, deployment, charge, reader, ok, starts)
                else:
                    self._settle(client, backend, deployment, charge, reader, ok, read)

        response.body_iterator = metered()
        return response

    # Settling --------------------------------------------------------------------------------
    def _settle(
        self,
        client: str,
        backend: str,
        deployment: str | None,
        charge: Charge | None,
        reader: Any,
        ok: bool,
        read: bool,
    ) -> None:
        """An answer ended (whole or cut): count it and settle its reservation, once per response.

        A response made in the foreground was charged by the call that made it (through the
        balancer: a client reads only its own objects, which were made through it), so reading it
        is free. One made in the background is charged by the first read that shows it finished."""
        usage = reader.result() if reader is not None else None
        now = self.clock()
        rid = reader.response_id if reader is not None else None
        if rid is None or not reader.background:
            if read and rid is not None:  # a foreground response read again
                self.record(client, backend, deployment, None, answered=False)
                self._charge(charge, 0, now)
            else:
                self.record(client, backend, deployment, usage, answered=ok)
                self._charge(charge, usage.total if usage else (None if ok else 0), now)
            return
        book = self.responses
        if book.charged(rid):  # read again: its tokens were charged when it was first seen finished
            self.record(client, backend, deployment, None, answered=False)
            self._charge(charge, 0, now)
        elif reader.status not in TERMINAL and usage is None:
            self.record(client, backend, deployment, None, answered=False)  # counted once it finishes
            if rid in book.held:  # a poll of a response still being generated: free
                self._charge(charge, 0, now)
            else:  # its create (or a cut background stream): the reservation waits for the response
                book.held[rid] = Held(charge, client, backend, deployment, now)
                self.version += 1
        else:  # first seen finished
            book.mark(rid, now)
            held = book.held.pop(rid, None)
            self.record(client, backend, deployment, usage, answered=True)
            if held is not None:
                self._charge(held.charge, usage.total if usage else None, now)
                self._charge(charge, 0, now)
            else:
                self._charge(charge, usage.total if usage else None, now)
            self.version += 1

    def _settle_runs(
        self,
        client: str,
        backend: str,
        deployment: str | None,
        charge: Charge | None,
        reader: UsageReader | None,
        ok: bool,
        starts: bool,
    ) -> None:
        """An answer showing Assistants runs ended: each run is charged its usage once, when first
        seen finished (`lb.metering.runs`). `starts`: the call created or resumed a run, so its
        reservation is held by that run until then, and settled against the run's usage."""
        now = self.clock()
        if reader is not None:
            reader.result()  # a JSON answer is read at its end
        seen = reader.runs if reader is not None else {}
        if not seen:  # no run in it (a refusal, an unreadable answer, a step): as any other answer
            self.record(client, backend, deployment, None, answered=ok)
            self._charge(charge, None if ok else 0, now)
            return
        book = self.responses
        own = next(reversed(seen)) if starts else None  # the run this call made or resumed
        usages: list[Usage] = []  # of the runs first seen finished here
        unknown, spent = False, 0  # ... those with no usage; what the others cost this call
        for rid, run in seen.items():
            if not run.finished or book.charged(rid):
                continue
            held = book.held.pop(rid, None)
            holder = book.runs_held_elsewhere.get(rid) if held is None else None
            if held is None and holder is None and rid != own and run.ended_before(now - AGE_SECONDS):
                continue  # held nowhere and ended long ago: charged when first seen (`lb.metering.runs`)
            book.mark(rid, now)
            self.version += 1
            charges = held.charges() if held is not None else []
            if rid == own and charge is not None:
                charges.append(charge)
            if run.usage is not None:
                usages.append(run.usage)
            else:
                unknown = True
            tokens = run.usage.total if run.usage is not None else None
            if holder is not None:  # another instance holds its reservation: that one settles it
                book.tell(rid, tokens, holder, now)
                for each in charges:
                    self._charge(each, 0, now)
            elif charges:
                self._settle_held(charges, tokens, now)
            else:  # held nowhere we know of: this call pays (a read reserved nothing)
                spent += tokens or 0
        if own is not None and not seen[own].finished and charge is not None:
            self._hold_run(own, charge, client, backend, deployment, now)
        elif charge is not None and not charge.settled:
            self._charge(charge, spent, now)
        usage = total(usages)
        self.record(client, backend, deployment, usage, answered=usage is not None or unknown)

    def _settle_held(self, charges: list[Charge], tokens: int | None, now: float) -> None:
        """The reservations held for one run, settled against its usage: the first call is charged
        the run's tokens, the others nothing; each its reservation when the usage is unknown."""
        for i, each in enumerate(charges):
            self._charge(each, tokens if i == 0 or tokens is None else 0, now)

    def _hold_run(
        self, rid: str, charge: Charge, client: str, backend: str, deployment: str | None, now: float
    ) -> None:
        """A run still being generated: the call's reservation waits for it (next to any already held)."""
        book = self.responses
        held = book.held.get(rid)
        if held is not None:
            held.more.append(charge)
        elif len(book.held) >= MAX_HELD:  # memory is bounded: charged its reservation at once
            self._charge(charge, None, now)
            return
        else:
            book.held[rid] = Held(charge, client, backend, deployment, now, run=True)
        self.version += 1

    def _charge(self, charge: Charge | None, tokens: int | None, now: float) -> None:
        if charge is not None:
            self.limiter.settle(charge, tokens, now)
            self.version += 1

    def tick(self, now: float) -> None:
        """Runs held here that another instance saw finished are settled with what they spent; holds
        another instance charged are let go; holds too old are charged their reservation."""
        book = self.responses
        for rid, held, tokens in book.settled_by_others():  # a run held here, seen finished elsewhere
            book.mark(rid, now)
            self._settle_held(held.charges(), tokens, now)
        for _, held in book.settled_elsewhere():
            for charge in held.charges():
                self._charge(charge, 0, now)
        for rid, held in book.expired(now):
            book.mark(rid, now)
            self.record(held.client, held.backend, held.deployment, None, answered=True)
            self._settle_held(held.charges(), None, now)

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
            self.tick(now)
            self.clients.prune(now)
            self.backends.prune(now)
            self.limiter.local.prune(now)

    def report(self, client: str | None = None) -> dict[str, Any]:
        """`GET /lb/usage`: this instance's counts, and the pool's when they are shared; with
        `client`, only that client's counts, reservations and limits (no backends)."""
        now = self.clock()
        report: dict[str, Any] = {"scope": "instance", "clients": windows_table(self.clients, now, client)}
        if client is None:
            report["backends"] = windows_table(self.backends, now)
        limits = self.limiter.limits
        pool_clients = self.share.pool_clients if self.share is not None else None
        if limits:
            report["limits"] = {
                name: self._limit_report(name, limit, now, pool_clients)
                for name, limit in limits.items()
                if client is None or name == client
            }
        if self.share is not None:
            report["pool"] = self.share.pool_report(now, client)
        return report

    def _limit_report(self, name: str, limit: Limit, now: float, pool_clients: Windows | None) -> dict[str, Any]:
        requests, tokens = self.limiter.used(name, now)
        charged = self.limiter.local.minute(name, now, WINDOW)[1] + self.limiter.others.minute(name, now, WINDOW)[1]
        unknown = self.clients.minute(name, now)[-1] + (pool_clients.minute(name, now)[-1] if pool_clients else 0)
        return {
            "tokens_per_minute": limit.tokens_per_minute,
            "requests_per_minute": limit.requests_per_minute,
            "batches_per_hour": limit.batch_allowance(),
            "used_last_minute": {"requests": requests, "tokens": tokens},
            "charged_last_minute": charged,
            "reserved": {"calls": self.limiter.reserved_calls(name), "tokens": self.limiter.reserved_tokens(name)},
            "unknown_usage_last_minute": unknown,
        }


def windows_table(windows: Windows, now: float, only: str | None = None) -> dict[str, dict[str, dict[str, int]]]:
    names = (*FIELDS, UNKNOWN)
    return {
        key: {
            "last_minute": dict(zip(names, windows.minute(key, now), strict=True)),
            "last_hour": dict(zip(names, windows.hour(key, now), strict=True)),
        }
        for key in sorted(windows.keys())
        if only is None or key == only
    }


def _set_rate_headers(response: Response, values: dict[str, str]) -> None:
    """The client's own remaining quota replaces the backend's (which is the pool's, not the client's)."""
    if not values:
        return
    raw = [(k, v) for k, v in response.raw_headers if k not in _RATE_HEADERS]
    raw.extend((k.encode(), v.encode()) for k, v in values.items())
    response.raw_headers = raw

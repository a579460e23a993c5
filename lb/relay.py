"""The backend's answer, relayed to the client as it arrives.

`UpstreamResponse` is a Starlette `StreamingResponse` (what the Functions HTTP streaming extension
takes) with its own ASGI call: bytes go out in the reads they came in, nothing is buffered, and
the upstream connection is released on every exit: the end of the body, a client that went away,
a backend that failed mid-body.

How long a body may go on (`BodyLimits`): the backend may send nothing for at most
`HTTP_TIMEOUT_SECONDS` at a time (openai-aca-lb's meaning of the setting, YARP's `ActivityTimeout`),
so an answer that keeps flowing is never cut for being long; and only when `LB_TOTAL_TIMEOUT_SECONDS`
is set does a call end that long after its request's first byte. (The wait for the head is the
proxy's, bounded wall-clock by the request's deadline.) One timer per answer, moved only when it
fires, not one per read.

An answer ended early says whose doing it was, in one log line without a traceback. An SSE answer
ends with an error event the openai SDK raises on: the balancer's limit and its setting
(`lb.errors.AnswerCut`), or the backend breaking off (`lb.errors.BackendBrokeOff`); it loses the
backend's Content-Length, since that event changes its length. Any other answer ends with its
connection closed short, so the client can't take a cut body for a whole one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from starlette.responses import StreamingResponse

from lb import errors, headers

if TYPE_CHECKING:
    from lb.config import Settings

log = logging.getLogger("lb")
CLOCK_SLACK = 0.001  # a timer may fire up to the loop's clock resolution early (uvloop: 1 ms)


@dataclass(frozen=True, slots=True)
class BodyLimits:
    """The balancer's own limits on relaying one answer's body."""

    silence: float | None = None  # seconds the backend may send nothing (HTTP_TIMEOUT_SECONDS)
    total: float | None = None  # LB_TOTAL_TIMEOUT_SECONDS, for the message
    until: float | None = None  # monotonic: the request's first byte + `total`

    @classmethod
    def of(cls, settings: Settings, deadline: float | None) -> BodyLimits:
        """`deadline`: the request's (its first byte + HTTP_TIMEOUT_SECONDS), from whose start the total runs."""
        total = settings.total_timeout_seconds
        if total is None:
            return cls(settings.timeout_seconds)
        started = time.monotonic() if deadline is None else deadline - settings.timeout_seconds
        return cls(settings.timeout_seconds, total, started + total)


class UpstreamBroken(Exception):
    """The answer's body ended early (already logged; the client's answer is cut short)."""


class UpstreamResponse(StreamingResponse):
    """The chosen backend's answer: its status, its headers (as raw bytes) and its body as read."""

    body_iterator: AsyncIterator[bytes]  # raw bytes as read (Starlette's type also allows str)

    def __init__(
        self,
        upstream: httpx.Response,
        backend: str,
        attempts: int,
        on_end: Callable[[Exception | None], None],
        backend_url: str = "",
        own_url: Callable[[], str] = lambda: "",
        limits: BodyLimits = BodyLimits(),
    ) -> None:
        self.upstream = upstream
        self.backend = backend
        # Told how the body ended: None when whole, else the error (an httpx.TimeoutException when
        # one of our limits ended it: the request's length, not the backend's fault).
        self.on_end = on_end
        self.event_stream = upstream.headers.get("content-type", "").startswith("text/event-stream")
        self.client_gone = False
        self.limits = limits
        self.cut: errors.AnswerCut | None = None  # set when one of our limits ended the body
        self._waiting_since: float | None = None  # loop time the pending upstream read began; None while sending
        self._reader: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._until = 0.0  # `limits.until` on the loop's clock
        super().__init__(self._body(), status_code=upstream.status_code)
        self.media_type = None
        returned = headers.returned(upstream.headers, backend_url, own_url)
        if self.event_stream:
            returned = [(k, v) for k, v in returned if k != b"content-length"]
        self.raw_headers = [*returned, (b"x-lb-backend", backend.encode()), (b"x-lb-attempts", str(attempts).encode())]

    async def _body(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        self._reader = asyncio.current_task()
        self._waiting_since = loop.time()
        self._arm(loop)
        broke: Exception | None = None
        try:
            async for chunk in self.upstream.aiter_raw():
                self._waiting_since = None  # the client's turn: its slowness is not the backend's silence
                yield chunk
                if self.cut is not None:  # the total ran out while the client took the chunk
                    break
                self._waiting_since = loop.time()
        except asyncio.CancelledError:  # our timer's cancel is undone here; anyone else's stands
            if self.cut is None or self._reader is None or self._reader.uncancel() > 0:
                raise
        except (httpx.HTTPError, httpx.StreamError) as exc:
            if self.client_gone:
                return  # we closed the upstream ourselves: not the backend's fault
            broke = exc
        finally:
            if self._timer is not None:
                self._timer.cancel()
        if self.cut is not None:
            log.warning("answer from backend %s cut short: %s", self.backend, self.cut.message)
            self.on_end(httpx.ReadTimeout(self.cut.message))
            failure: errors.ProxyError = self.cut
        elif broke is not None:
            log.warning("backend %s failed mid-body: %s", self.backend, type(broke).__name__)
            self.on_end(broke)
            failure = errors.BackendBrokeOff(type(broke).__name__)
        else:
            self.on_end(None)
            return
        if not self.event_stream:
            raise UpstreamBroken(failure.message)
        yield errors.sse_event(failure)

    # The limits: one timer, set for the earliest moment a limit could be reached and, when it
    # fires early (the backend spoke since), set again from the last read. A stream that sends
    # every 50 ms under a 100 s limit pays one timer per 100 s, not one per read.
    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        limits = self.limits
        if limits.silence is None and limits.until is None:
            return
        if limits.until is not None:
            self._until = loop.time() + (limits.until - time.monotonic())
        self._schedule(loop, loop.time())

    def _schedule(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        due = self._until if self.limits.until is not None else float("inf")
        if self.limits.silence is not None:
            since = self._waiting_since
            due = min(due, (now if since is None else since) + self.limits.silence)
        self._timer = loop.call_at(due, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        limits = self.limits
        since = self._waiting_since
        if limits.until is not None and limits.total is not None and now >= self._until - CLOCK_SLACK:
            self._end(errors.AnswerCut.total(limits.total))
        elif limits.silence is not None and since is not None and now - since >= limits.silence - CLOCK_SLACK:
            self._end(errors.AnswerCut.silence(limits.silence))
        else:
            self._schedule(loop, now)

    def _end(self, cut: errors.AnswerCut) -> None:
        self.cut = cut
        if self._waiting_since is not None and self._reader is not None:
            self._reader.cancel()  # the pending read ends, whatever the transport; `_body` takes it back

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # A stream may run for minutes, so one small task watches for the client going away and then
        # closes the upstream call, which ends the body loop below. (Starlette's own StreamingResponse
        # does this with an anyio task group, which costs ~0.3 ms on a stream's first chunk.) An
        # answer of any other type gets the watcher once a read leaves more to come: the usual JSON
        # answer comes in one read and pays nothing, a long or dripping one is watched like a stream.
        watcher = asyncio.ensure_future(self._watch(receive)) if self.event_stream else None
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if watcher is None and not _at_eof(self.upstream):
                    watcher = asyncio.ensure_future(self._watch(receive))
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except UpstreamBroken:
            return  # the host closes a connection whose answer was not completed: the client sees it cut
        finally:
            if watcher is not None:
                watcher.cancel()
            with anyio.CancelScope(shield=True):
                await self.upstream.aclose()

    async def _watch(self, receive: Any) -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a host whose receive() fails once the answer is out: nothing to watch then
            return
        self.client_gone = True
        log.debug("client went away mid-stream from backend %s; closing the upstream call", self.backend)
        await self.upstream.aclose()


def _at_eof(upstream: httpx.Response) -> bool:
    """Whether the whole body has been read (False when the transport can't tell)."""
    at_eof = getattr(upstream.stream, "at_eof", None)
    return bool(at_eof()) if at_eof is not None else False

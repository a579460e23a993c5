"""The backend's answer, relayed to the client as it arrives.

`UpstreamResponse` is a Starlette `StreamingResponse` (what the Functions HTTP streaming extension
takes) with its own ASGI call: bytes go out in the reads they came in, nothing is buffered, and
the upstream connection is released on every exit: the end of the body, a client that went away,
a backend that failed mid-body.

A backend that breaks off mid-body is logged in one line, without a traceback: an SSE answer ends
with an error event (the openai SDK raises on it), any other answer ends with its connection
closed short, so the client can't take a cut body for a whole one. An SSE answer loses the
backend's Content-Length, since the error event would change its length.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
from starlette.responses import StreamingResponse

from lb import headers

log = logging.getLogger("lb")


class UpstreamBroken(Exception):
    """The backend's answer broke off mid-body (already logged; the client's answer is cut short)."""


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
        deadline: float | None = None,
    ) -> None:
        self.upstream = upstream
        self.backend = backend
        self.on_end = on_end  # told how the body ended: None when whole, the error when it broke off
        self.event_stream = upstream.headers.get("content-type", "").startswith("text/event-stream")
        self.client_gone = False
        self.deadline = deadline  # monotonic: the request's, the body's last read included
        self.expired = False
        super().__init__(self._body(), status_code=upstream.status_code)
        self.media_type = None
        returned = headers.returned(upstream.headers, backend_url, own_url)
        if self.event_stream:
            returned = [(k, v) for k, v in returned if k != b"content-length"]
        self.raw_headers = [*returned, (b"x-lb-backend", backend.encode()), (b"x-lb-attempts", str(attempts).encode())]

    async def _body(self) -> AsyncIterator[bytes]:
        # One timer for the whole body (not one per read) closes the upstream call at the deadline.
        timer = asyncio.get_running_loop().call_at(self.deadline, self._expire) if self.deadline else None
        try:
            async for chunk in self.upstream.aiter_raw():
                yield chunk
            self.on_end(None)
        except (httpx.HTTPError, httpx.StreamError) as exc:
            if self.client_gone:
                return  # we closed the upstream ourselves: not the backend's fault
            error = httpx.ReadTimeout("the request's deadline passed mid-body") if self.expired else exc
            log.warning("backend %s failed mid-body: %s", self.backend, type(error).__name__)
            self.on_end(error)
            if not self.event_stream:
                raise UpstreamBroken(type(error).__name__) from None
            # The openai SDK raises on an SSE event carrying "error", so the caller sees a failure.
            event = {"error": {"code": "BadGateway", "message": "The backend stream ended unexpectedly."}}
            yield f"data: {json.dumps(event)}\n\n".encode()
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self) -> None:
        self.expired = True
        self._closing = asyncio.ensure_future(self.upstream.aclose())  # the pending read fails: the loop ends

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

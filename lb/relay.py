"""The backend's answer, relayed to the client as it arrives.

`UpstreamResponse` is a Starlette `StreamingResponse` (what the Functions HTTP streaming extension
takes) with its own ASGI call: bytes go out in the reads they came in, nothing is buffered, and
the upstream connection is released on every exit: the end of the body, a client that went away,
a backend that failed mid-body.
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


class UpstreamResponse(StreamingResponse):
    """The chosen backend's answer: its status, its headers (as raw bytes) and its body as read."""

    def __init__(self, upstream: httpx.Response, backend: str, attempts: int, on_broken: Callable[[], None]) -> None:
        self.upstream = upstream
        self.backend = backend
        self.on_broken = on_broken
        self.event_stream = upstream.headers.get("content-type", "").startswith("text/event-stream")
        self.client_gone = False
        super().__init__(self._body(), status_code=upstream.status_code)
        self.media_type = None
        self.raw_headers = [
            *headers.returned(upstream.headers),
            (b"x-lb-backend", backend.encode()),
            (b"x-lb-attempts", str(attempts).encode()),
        ]

    async def _body(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.upstream.aiter_raw():
                yield chunk
        except (httpx.HTTPError, httpx.StreamError) as exc:
            if self.client_gone:
                return  # we closed the upstream ourselves: not the backend's fault
            log.warning("backend %s failed mid-body: %s", self.backend, type(exc).__name__)
            self.on_broken()
            if not self.event_stream:
                raise
            # The openai SDK raises on an SSE event carrying "error", so the caller sees a failure.
            error = {"error": {"code": "BadGateway", "message": "The backend stream ended unexpectedly."}}
            yield f"data: {json.dumps(error)}\n\n".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # A stream may run for minutes, so one small task watches for the client going away and then
        # closes the upstream call, which ends the body loop below. (Starlette's own StreamingResponse
        # does this with an anyio task group, which costs ~0.3 ms on a stream's first chunk.) A whole
        # answer arrives at network speed and needs no watcher.
        watcher = asyncio.ensure_future(self._watch(receive)) if self.event_stream else None
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
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

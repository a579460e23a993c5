"""Connection limits for `python -m lb serve`, enforced before uvicorn buffers anything.

Behind Azure Functions the host's own server (Kestrel) sits in front of the worker and applies its
limits: request head size and header count, a header-read timeout, connection limits. Run alone,
uvicorn with httptools has none of these: it buffers a request head of any size (a 200 MB head
costs tens of seconds of CPU before the handler's 32 KiB check), and keeps a connection that never
finishes its head open for ever (a thousand of them exhaust the process's file descriptors).

`guarded_protocol()` returns uvicorn's httptools protocol with those limits, answered in Azure
OpenAI's error shape:
- a head larger than `MAX_HEADER_BYTES` or with more than `MAX_HEADER_COUNT` fields: 431, counted
  as the bytes arrive, so nothing past the limit is parsed or kept;
- a head not complete within `LB_SERVE_HEAD_TIMEOUT_SECONDS` of the connection opening (or of the
  previous answer, on a kept-alive connection): 408 and closed (an idle one is just closed);
- a body not complete within `HTTP_TIMEOUT_SECONDS` of its head: 408 and closed. The timer is set
  only when a read ends with the body incomplete: the usual request, head and body in one read,
  costs nothing (behind Functions, Kestrel's minimum body data rate does this);
- more than `LB_SERVE_MAX_CONNECTIONS` open connections: 503 with Retry-After, closed;
- an answer the client stops reading: once its send buffer is full, `HTTP_TIMEOUT_SECONDS` more
  without the client taking any of it and the connection is aborted (the relay then closes the
  upstream call). The timer is set only when the buffer fills (behind Functions, Kestrel's minimum
  response data rate does this). So the relay's limit on a backend's silence is matched by one on
  the client's: a call that makes no progress either way ends.

Each request's scope carries the moment its first byte was read (`lb.requestinfo.ARRIVED`): the
proxy's deadline starts there, not when the handler gets its turn after a burst of others.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from lb import errors
from lb.config import Settings
from lb.requestinfo import ARRIVED, MAX_HEADER_BYTES, MAX_HEADER_COUNT

KEEP_ALIVE_SECONDS = 5  # uvicorn's default, said here: an idle kept-alive connection is closed after it
_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


def error_bytes(error: errors.ProxyError, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 error answer that closes the connection, in Azure OpenAI's JSON shape."""
    body = json.dumps({"error": {"code": error.code, "message": error.message}}).encode()
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n%s\r\n"
        % (error.status, _REASONS[error.status], len(body), extra)
    ) + body


def guarded_protocol(settings: Settings) -> type[HttpToolsProtocol]:
    head_timeout = settings.serve_head_timeout_seconds
    max_connections = settings.serve_max_connections
    too_large = error_bytes(
        errors.HeadersTooLarge(
            f"The request head is larger than {MAX_HEADER_BYTES} bytes or has more than {MAX_HEADER_COUNT} headers."
        )
    )
    too_slow = error_bytes(errors.RequestTimeout(f"The request head did not arrive within {head_timeout:g} seconds."))
    body_timeout = settings.timeout_seconds
    write_timeout = settings.timeout_seconds  # a client that takes none of its answer for this long
    body_too_slow = error_bytes(
        errors.RequestTimeout(f"The request body did not arrive within {body_timeout:g} seconds.")
    )
    too_many = error_bytes(
        errors.Overloaded("The load balancer has too many open connections; retry shortly."), b"retry-after: 1\r\n"
    )

    class GuardedProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, with a bounded request head and a bounded number of connections."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_bytes = 0
            self._header_count = 0
            self._in_head = True
            self._head_timer: asyncio.TimerHandle | None = None
            self._body_timer: asyncio.TimerHandle | None = None
            self._write_timer: asyncio.TimerHandle | None = None
            # Over the cap: answered once the request is in (closing on an unread request would
            # reset the connection, and the client might never read the 503).
            self._over_cap = len(self.connections) > max_connections
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            self._disarm_body_timer()
            self._disarm_write_timer()
            super().connection_lost(exc)

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(write_timeout, self._write_timed_out)

        def resume_writing(self) -> None:
            super().resume_writing()
            self._disarm_write_timer()

        def _disarm_write_timer(self) -> None:
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _write_timed_out(self) -> None:
            self._write_timer = None
            if not self.transport.is_closing():
                self.transport.abort()  # close() would wait for a buffer that never drains

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return
            if self._over_cap:
                self._refuse(too_many)
                return
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            # Past the limit and still no end of head: refused before the next read is parsed, so
            # at most one read (<= 256 KiB) beyond the limit is ever looked at.
            if self._in_head and self._head_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
                self._refuse(too_large)
            elif self._body_timer is None and not self._in_head and self.cycle is not None and self.cycle.more_body:
                self._body_timer = self.loop.call_later(body_timeout, self._body_timed_out)

        def on_message_complete(self) -> None:
            self._disarm_body_timer()
            super().on_message_complete()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope[ARRIVED] = time.monotonic()  # type: ignore[literal-required]  # the deadline's start
            self._in_head = True
            self._header_count = 0
            if self._head_timer is None:
                self._arm_head_timer()

        def on_header(self, name: bytes, value: bytes) -> None:
            if self.transport.is_closing():
                return
            self._header_count += 1
            if self._header_count > MAX_HEADER_COUNT:
                self._refuse(too_large)
                return
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self.transport.is_closing():
                return
            self._in_head = False
            self._head_bytes = 0
            self._disarm_head_timer()
            super().on_headers_complete()
            if self.cycle is not None and self.cycle.transport is self.transport:  # the answer's head waits
                self.cycle.transport = HeldHead(self.transport, self.loop)  # type: ignore[assignment]  # for what follows it this turn

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._in_head = True  # the next request's head, on this kept-alive connection
                self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            self._head_timer = self.loop.call_later(head_timeout, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._in_head and not self.transport.is_closing():
                if self._head_bytes:
                    self._refuse(too_slow)
                else:
                    self.transport.close()  # idle: nothing was asked, nothing to answer

        def _disarm_body_timer(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def _body_timed_out(self) -> None:
            self._body_timer = None
            cycle = self.cycle
            if cycle is None or not cycle.more_body or self.transport.is_closing():
                return
            if cycle.response_started:
                self.transport.close()
            else:
                cycle.disconnected = True  # the handler reads the end of the body, and its answer goes nowhere
                cycle.message_event.set()
                self._refuse(body_too_slow)

        def _refuse(self, answer: bytes) -> None:
            self._disarm_head_timer()
            self.transport.write(answer)
            self.transport.close()

    return GuardedProtocol


class HeldHead:
    """One answer's writes, with the first (its head) held to the end of the event loop's turn: a
    JSON answer's head and body, or a stream's head and a first event already read, leave in one
    send. On loopback each send costs ~0.1-0.3 ms, most of it waking the reader, so this takes that
    much off a streamed answer's first event, and a syscall off every answer. Every write after
    the first goes out at once, behind the head."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop: asyncio.AbstractEventLoop | None = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._loop is None:  # the head has gone: pass through
            self._transport.write(data)
        elif self._held is None:
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            held, self._held, self._loop = self._held, None, None
            self._transport.writelines((held, data))  # one send (uvloop: one writev, the body not copied)

    def flush(self) -> None:
        held, self._held, self._loop = self._held, None, None
        if held and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def serve_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.run() keyword arguments for `lb serve`'s limits."""
    # proxy_headers off: a local client must not set our scheme or its own address with X-Forwarded-*.
    return {"http": guarded_protocol(settings), "timeout_keep_alive": KEEP_ALIVE_SECONDS, "proxy_headers": False}

"""The one shared transport every upstream call goes through.

The API is httpx's (its requests, responses and exceptions), and the transport is the seam: tests
can pass any `httpx.AsyncBaseTransport`. The proxy calls the transport itself, not through an
`httpx.AsyncClient`: redirects, cookies, auth and event hooks are all off for a forwarded call,
and the client's layers around them add measurably to a streamed answer's first event
(docs/performance.md). The default transport sends through aiohttp, whose C-accelerated HTTP
parser and connection pool cost less CPU per request than httpcore's (README, "Performance").
aiohttp is already required by azure's async clients, so this adds no dependency.

Connections are pooled and kept alive, so a busy proxy does one TLS handshake per backend
connection, not per request. Every aiohttp error is mapped to the httpx exception it means, in one
place (`_mapped`), so the failover loop sees exactly what it would see from httpcore.

A request's `timeout` extension may carry `total` (aiohttp's own: a wall-clock bound on the whole
call, every body read included). The proxy bounds its calls with one asyncio timer instead (see
`Attempts.send`): aiohttp's total and per-read timers each arm a timer per read, a cost paid on
every chunk of a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import math
import ssl
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import certifi
import httpx

MAX_CONNECTIONS = 1000
KEEPALIVE_SECONDS = 60.0
STALE_DROP_SECONDS = 0.05  # a reused connection found closed fails within this; a backend that read the call, later


@functools.cache
def tls_context() -> ssl.SSLContext:
    """certifi's CA bundle (the same trust as httpx's default), loaded once per process: loading it
    costs tens of ms of CPU, and a context is safe to share between sessions."""
    return ssl.create_default_context(cafile=certifi.where())


@functools.lru_cache(maxsize=4096)
def parsed_url(url: str) -> httpx.URL:
    """`url` as httpx's URL. httpx parses URLs in pure Python (~30-50 us each) and a pool calls a
    handful of distinct ones (a backend's path per deployment, API version and object), so each is
    parsed once; URL objects are immutable."""
    return httpx.URL(url)


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests with one aiohttp session, created on first use inside the running loop."""

    def __init__(self, max_connections: int = MAX_CONNECTIONS, keepalive: float = KEEPALIVE_SECONDS) -> None:
        self._max_connections = max_connections
        self._keepalive = keepalive
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                keepalive_timeout=self._keepalive,
                ssl=tls_context(),
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,  # the client gets the backend's bytes as they are
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),  # one client's cookies must never reach another's calls
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        sent = time.monotonic()
        try:
            return await self._send(request)
        except httpx.RemoteProtocolError as exc:
            # Dropped at once, before any answer: a pooled keep-alive connection the backend closed
            # as we reused it, so the backend never saw the request: once more, on a new connection.
            # A drop after a while may follow a request the backend did see: never sent twice.
            if not isinstance(exc.__cause__, _DROPPED) or time.monotonic() - sent > STALE_DROP_SECONDS:
                raise
        return await self._send(request)

    async def _send(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        with _mapped(request):
            response = await self._get_session().request(
                request.method,
                str(request.url),
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
                data=_payload(request.content),
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=timeouts.get("total"),  # wall-clock, from here to the body's last byte
                    connect=timeouts.get("pool"),  # waiting for a free pooled connection is bounded too
                    sock_connect=timeouts.get("connect"),
                    sock_read=timeouts.get("read"),
                    ceil_threshold=math.inf,  # never round a deadline up to the next whole second
                ),
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),  # httpx's headers stand
            )
        return httpx.Response(response.status, headers=response.raw_headers, stream=_ResponseBody(response, request))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


_DROPPED = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
LARGE_BODY_BYTES = 1024 * 1024  # aiohttp writes bytes in one call; past this, 64 KiB at a time


def _payload(content: bytes) -> bytes | io.BytesIO | None:
    """The body as aiohttp should send it: a large one as a BytesIO (no copy until read), which
    aiohttp writes a chunk at a time, handing the loop back and waiting for the socket between
    chunks, instead of queueing megabytes in one write."""
    if len(content) > LARGE_BODY_BYTES:
        return io.BytesIO(content)
    return content or None


class _ResponseBody(httpx.AsyncByteStream):
    """The backend's body as aiohttp reads it: each read passed on as is, never re-chunked."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped(self._request, reading=True):
            async for chunk in self._response.content.iter_any():
                yield chunk

    def at_eof(self) -> bool:
        """The whole body has been read (lb.relay then needs no disconnect watcher)."""
        return self._response.content.at_eof()

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # the connection goes back to the pool
        else:
            self._response.close()  # unread body: the connection can't be reused


@contextlib.contextmanager
def _mapped(request: httpx.Request, reading: bool = False) -> Iterator[None]:
    """aiohttp's errors as the httpx exceptions the failover loop and lb.errors understand."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "connect timeout", request=request) from exc
    except (aiohttp.ServerTimeoutError, asyncio.TimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc) or "read timeout", request=request) from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc), request=request) from exc
    except aiohttp.ClientPayloadError as exc:
        raise httpx.RemoteProtocolError(str(exc), request=request) from exc
    except aiohttp.ClientError as exc:
        error = httpx.ReadError if reading else httpx.RemoteProtocolError
        raise error(str(exc) or type(exc).__name__, request=request) from exc

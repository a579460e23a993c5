"""Which headers cross the proxy, in each direction.

Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are never relayed, nor are the
headers a Connection header names, nor any Proxy-* header (meant for a proxy, i.e. for us). The
upstream host is always the backend's, so the client's Host / X-Forwarded-Host / Forwarded never
travel, and neither do its credentials. Headers some servers take as a routing or method override
(X-Original-URL, X-Rewrite-URL, X-HTTP-Method-Override, ...) never travel either: the backend must
serve the path and method we checked. A name is matched with `_` read as `-`, as a CGI or WSGI
server reads it (both spellings become `HTTP_API_KEY`), so `api_key` is a credential too.
`Expect: 100-continue` is dropped and the body sent at once:
the backend's 100 would be one more unbounded wait, and the body is already in hand. The client's
`Accept-Encoding` never travels: the backend is asked for `identity`, because the balancer reads
every answer's usage as it passes (`lb.metering`) and a compressed answer would hide it (a client
asking for gzip could otherwise be served without being charged).

Going back, a header that points at the backend (`Location`, `Content-Location`,
`operation-location`, the last being where Azure says to poll an async operation) is rewritten to
the proxy's own URL, so the client keeps talking to the proxy and never learns the backend's host;
one at the backend's host but outside its `/openai/` paths cannot be reached through us: dropped.
With several clients, a backend's quota figures (`x-ratelimit-*`) leave with no answer at all: they
count every client's spend on that backend (`without_backend_quota`, applied once by `lb.proxy`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
from starlette.requests import Request
from starlette.responses import Response

from lb.auth import CREDENTIAL_HEADERS

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
HOP_BY_HOP_PREFIX = "proxy-"
ROUTING_OVERRIDES = frozenset(
    {
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-forwarded-proto",  # ours says how the client reached us
        "x-forwarded-port",
        "x-forwarded-prefix",
    }
)
NOT_FORWARDED = (
    HOP_BY_HOP
    | CREDENTIAL_HEADERS
    | ROUTING_OVERRIDES
    | {"host", "content-length", "x-forwarded-host", "forwarded", "expect", "accept-encoding"}
)
NOT_RETURNED = HOP_BY_HOP | {"set-cookie", "server", "date"}  # the host adds its own date and server
POINTING = frozenset({b"location", b"content-location", b"operation-location"})
BACKEND_QUOTA = b"x-ratelimit-"  # a backend's remaining / limit / reset figures: every client's spend on it


def connection_named(headers: Any) -> set[str]:
    """Names listed by every Connection header (Starlette or httpx headers, or (name, value) pairs)."""
    pairs = headers.items() if hasattr(headers, "items") else headers
    values = [v for k, v in pairs if k.lower() == "connection"]
    return {t.strip().lower() for value in values for t in value.split(",") if t.strip()}


def forwarded(request: Request, request_id: str | None) -> list[tuple[bytes, bytes]]:
    """The client's headers, as raw bytes, minus its credentials, hop-by-hop ones and the body's
    length (the transport sets it). One pass over the raw headers: this runs for every attempt."""
    raw: list[tuple[bytes, bytes]] = request.scope["headers"]
    named = connection_named((k.decode("latin-1"), v.decode("latin-1")) for k, v in raw if k.lower() == b"connection")
    skip = NOT_FORWARDED | named if named else NOT_FORWARDED
    headers = []
    seen_id = False
    prior = None
    for k, v in raw:
        k = k.lower()
        if k == b"x-forwarded-for":
            prior = v if prior is None else prior  # the first one, as Starlette's .get() reads it
            continue
        seen_id = seen_id or k == b"x-request-id"
        name = k.decode("latin-1").replace("_", "-")  # CGI/WSGI servers read `api_key` as `api-key`
        if name not in skip and not name.startswith("proxy-"):
            headers.append((k, v))
    if request_id and not seen_id:
        headers.append((b"x-request-id", request_id.encode()))  # the backend's logs can be matched with ours
    headers.append((b"accept-encoding", b"identity"))  # answers the balancer must read: never compressed
    client = request.scope.get("client")
    if client:
        host = client[0].encode("latin-1")
        headers.append((b"x-forwarded-for", prior + b", " + host if prior else host))
    elif prior is not None:
        headers.append((b"x-forwarded-for", prior))
    headers.append((b"x-forwarded-proto", request.scope.get("scheme", "http").encode("latin-1")))
    return headers


def returned(
    upstream: httpx.Headers, backend_url: str = "", own_url: Callable[[], str] = lambda: ""
) -> list[tuple[bytes, bytes]]:
    """The backend's answer headers the client gets, as raw bytes (never re-encoded, so a value that
    is not Latin-1 passes as sent): all but hop-by-hop ones and what the host sets itself, with
    the ones pointing at the backend pointed at us (`backend_url` -> `own_url()`, asked for only then)."""
    skip = NOT_RETURNED | connection_named(upstream)
    headers = []
    for raw_name, value in upstream.raw:
        name = raw_name.lower()
        if name.decode("latin-1") in skip or name.startswith(b"proxy-"):
            continue
        if name in POINTING:
            pointed = repointed(value, backend_url, own_url())
            if pointed is None:
                continue
            value = pointed
        headers.append((name, value))
    return headers


def repointed(value: bytes, backend_url: str, own_url: str) -> bytes | None:
    """A URL at the backend, as the same resource through the proxy; None if it can't be one.

    A relative URL, or one at another host (e.g. a storage link), is left as it is.
    """
    parts = urlsplit(value.decode("latin-1").strip())
    backend = urlsplit(backend_url)
    if not parts.netloc or parts.hostname != backend.hostname:
        return value
    base = backend.path.rstrip("/")
    if not parts.path.startswith(base + "/openai/"):
        return None  # at the backend, outside what the proxy relays
    rest = parts.path[len(base) :] + (f"?{parts.query}" if parts.query else "")
    return (own_url.rstrip("/") + rest).encode("latin-1")


def without_backend_quota(response: Response) -> Response:
    """`response` without a backend's `x-ratelimit-*` headers, whichever kind of answer it is (streamed,
    read whole, the balancer's own): applied to every answer while several clients share the pool,
    before a limited client's own remaining quota is set (`lb.metering`)."""
    raw = response.raw_headers
    if any(name.lower().startswith(BACKEND_QUOTA) for name, _ in raw):
        response.raw_headers = [(k, v) for k, v in raw if not k.lower().startswith(BACKEND_QUOTA)]
    return response

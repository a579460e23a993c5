"""Which headers cross the proxy, in each direction.

Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are never relayed, nor are the
headers a Connection header names, nor any Proxy-* header (meant for a proxy, i.e. for us). The
upstream host is always the backend's, so the client's Host / X-Forwarded-Host / Forwarded never
travel, and neither do its credentials.
"""

from __future__ import annotations

from typing import Any

import httpx
from starlette.requests import Request

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
NOT_FORWARDED = HOP_BY_HOP | CREDENTIAL_HEADERS | {"host", "content-length", "x-forwarded-host", "forwarded"}
NOT_RETURNED = HOP_BY_HOP | {"set-cookie", "server", "date"}  # the host adds its own date and server


def connection_named(headers: Any) -> set[str]:
    """Names listed by every Connection header (Starlette and httpx headers both take `.items()`)."""
    values = [v for k, v in headers.items() if k.lower() == "connection"]
    return {t.strip().lower() for value in values for t in value.split(",") if t.strip()}


def forwarded(request: Request, request_id: str | None) -> list[tuple[str, str]]:
    """The client's headers minus its credentials, hop-by-hop ones and what httpx sets itself."""
    skip = NOT_FORWARDED | connection_named(request.headers)
    headers = [(k, v) for k, v in request.headers.items() if k not in skip and not k.startswith(HOP_BY_HOP_PREFIX)]
    if request_id and "x-request-id" not in request.headers:
        headers.append(("x-request-id", request_id))  # the backend's logs can be matched with ours
    if "accept-encoding" not in request.headers:  # don't ask for a compression the client can't read
        headers.append(("accept-encoding", "identity"))
    client = request.client
    if client is not None:
        prior = request.headers.get("x-forwarded-for")
        headers = [(k, v) for k, v in headers if k != "x-forwarded-for"]
        headers.append(("x-forwarded-for", f"{prior}, {client.host}" if prior else client.host))
    if "x-forwarded-proto" not in request.headers:
        headers.append(("x-forwarded-proto", request.url.scheme))
    return headers


def returned(upstream: httpx.Headers) -> list[tuple[bytes, bytes]]:
    """The backend's answer headers the client gets, as raw bytes (never re-encoded, so a value that
    is not Latin-1 passes as sent): all but hop-by-hop ones and what the host sets itself."""
    skip = NOT_RETURNED | connection_named(upstream)
    return [
        (name, value)
        for raw_name, value in upstream.raw
        if (name := raw_name.lower()).decode("latin-1") not in skip and not name.startswith(b"proxy-")
    ]

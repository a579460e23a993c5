"""The one shared HTTP client every upstream call goes through.

httpx's transport is the seam (`transport=`): tests and benchmarks can swap it without touching
the failover loop. Connections are pooled and kept alive, so a busy proxy does one TLS handshake
per backend connection, not per request.
"""

from __future__ import annotations

import httpx

from lb.config import Settings

MAX_CONNECTIONS = 1000
KEEPALIVE_SECONDS = 60.0


def create_client(settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=transport,
        timeout=settings.timeout_seconds,
        limits=httpx.Limits(
            max_connections=MAX_CONNECTIONS,
            max_keepalive_connections=MAX_CONNECTIONS,
            keepalive_expiry=KEEPALIVE_SECONDS,
        ),
        follow_redirects=False,
        trust_env=False,  # an HTTP(S)_PROXY meant for other tools must not reroute backend traffic
    )

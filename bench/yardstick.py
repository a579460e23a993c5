"""The yardstick: the least a pass-through proxy can do, to measure `lb` against.

Starlette + one shared httpx.AsyncClient with keep-alive; forwards `/openai/{path}` to one backend
(`YARDSTICK_BACKEND`) and streams the answer back as it arrives. No auth, no failover, no logging.
Run: `YARDSTICK_BACKEND=http://127.0.0.1:8001 python -m bench.yardstick --port 8002`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

_HOP = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"})


async def forward(request: Request) -> StreamingResponse:
    client: httpx.AsyncClient = request.app.state.client
    path = request.scope["path"]
    query = request.scope["query_string"]
    url = request.app.state.backend + path + ("?" + query.decode("latin-1") if query else "")
    headers = [(k, v) for k, v in request.headers.items() if k not in _HOP and k != "content-length"]
    upstream_request = client.build_request(request.method, url, headers=headers, content=await request.body())
    upstream = await client.send(upstream_request, stream=True)
    return StreamingResponse(
        upstream.aiter_raw(),
        status_code=upstream.status_code,
        headers={k: v for k, v in upstream.headers.items() if k not in _HOP},
        background=BackgroundTask(upstream.aclose),
    )


def create_app(backend: str) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000, keepalive_expiry=60)
        async with httpx.AsyncClient(limits=limits, timeout=100, trust_env=False) as client:
            app.state.client, app.state.backend = client, backend.rstrip("/")
            yield

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    return Starlette(routes=[Route("/openai/{path:path}", forward, methods=methods)], lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.yardstick")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args()
    app = create_app(os.environ.get("YARDSTICK_BACKEND", "http://127.0.0.1:8001"))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()

"""Azure Functions entry point (Python v2 programming model): routes only, all logic lives in lb/.

The HTTP streaming extension hands each function a Starlette/FastAPI `Request` and streams the
returned response, so SSE chat completions pass through chunk by chunk. Auth level is ANONYMOUS
because openai SDK clients cannot send a Functions key: the proxy checks `LB_CLIENT_KEYS` itself.
"""

import azure.functions as func
from azurefunctions.extensions.http.fastapi import JSONResponse, Request, StreamingResponse

from lb.app import route_not_found, shared_proxy
from lb.config import load_settings

load_settings()  # a bad setting stops the host at start-up with a message naming it

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


@app.route(route="openai/{*path}", methods=ALL_METHODS)
async def openai_proxy(req: Request) -> StreamingResponse:
    return await shared_proxy().handle(req)


@app.route(route="healthz", methods=["GET"])
async def healthz(req: Request) -> JSONResponse:
    return await shared_proxy().healthz(req)


@app.route(route="lb/status", methods=["GET"])
async def lb_status(req: Request) -> JSONResponse:
    return await shared_proxy().status(req)


@app.route(route="lb/usage", methods=["GET"])
async def lb_usage(req: Request) -> JSONResponse:
    return await shared_proxy().usage(req)


# Anything else (e.g. /chat/completions from an OpenAI client given the bare host as base_url) gets
# the proxy's JSON 404 naming the URL forms served, not the host's empty one. Literal routes above win.
@app.route(route="{*path}", methods=ALL_METHODS)
async def not_served(req: Request) -> JSONResponse:
    return route_not_found(req.url.path)

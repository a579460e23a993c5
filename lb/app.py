"""Builds the proxy for either host, and the Starlette app of the local runner.

The Functions host has no lifespan hook, so `function_app.py` uses the lazily built `shared_proxy()`;
`python -m lb serve` uses `create_app()`, whose lifespan starts and closes the same `Proxy`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from lb import errors, logctx
from lb.config import Settings, load_settings
from lb.objects.records import ObjectStore
from lb.proxy import Proxy
from lb.state import CooldownStore, MemoryStore
from lb.telemetry import create_telemetry

log = logging.getLogger("lb")

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
PROXIED_PREFIX = "/openai/"

_shared: Proxy | None = None

# What a chat app pointed at the wrong URL form (e.g. the bare host as an OpenAI base_url, which
# calls /chat/completions) is told, so the fix is in the error rather than in a search.
SERVED_URL_FORMS = (
    "The balancer serves /openai/deployments/{deployment}/...?api-version=... (AzureOpenAI client:"
    " endpoint = the balancer's base URL) and /openai/v1/... (OpenAI client: base_url ="
    " <balancer URL>/openai/v1), plus /healthz, /lb/status and /lb/usage."
)


def create_store(settings: Settings) -> CooldownStore:
    if settings.state.kind == "table":
        from lb.state.table import TableStore  # azure-data-tables is imported only when used

        return TableStore(settings.state)
    return MemoryStore()


def create_object_store(settings: Settings) -> ObjectStore:
    if settings.state.kind == "table":
        from lb.objects.table import TableObjectStore

        return TableObjectStore(settings.state)
    return ObjectStore()


def create_proxy(settings: Settings) -> Proxy:
    if settings.anonymous:
        log.warning(
            "ANONYMOUS ACCESS: neither LB_CLIENT_KEYS nor LB_ENTRA_TENANT_ID is set, so anyone who can reach"
            " this proxy can spend your Azure OpenAI quota"
        )
    if settings.entra is not None and settings.entra.allowed_clients is None:
        log.warning(
            "LB_ENTRA_ALLOWED_CLIENTS is not set: any user or app of tenant %s that can get a token for %s may call",
            settings.entra.tenant_id,
            ", ".join(settings.entra.audiences),
        )
    store = create_store(settings)
    proxy = Proxy(settings, store=store, telemetry=create_telemetry(), objects=create_object_store(settings))
    table_answers = lambda: bool(store.health()["healthy"])  # noqa: E731  (start-up waits for a table once)
    if settings.state.kind == "table":  # counts are shared where cooldowns are: the pool's quotas and totals
        from lb.metering.share import UsageShare

        proxy.metering.share = UsageShare(
            settings.state, proxy.metering, store.instance_id, table_answers=table_answers
        )
    if settings.state.kind == "table" and proxy.balancer.affinity is not None:  # one secret and bound for the pool
        from lb.state.affinity import AffinityShare

        proxy.balancer.share = AffinityShare(
            settings.state, proxy.balancer.affinity, store.instance_id, table_answers=table_answers
        )
    return proxy


def shared_proxy() -> Proxy:
    """The process-wide proxy of the Functions host, built on first use."""
    global _shared
    if _shared is None:
        logctx.prefix_messages("lb", "lb.state")  # the worker's log format is not ours: the id goes in the text
        _shared = create_proxy(load_settings())
    return _shared


def create_app(settings: Settings | None = None, proxy: Proxy | None = None) -> ProxyApp:
    proxy = proxy or create_proxy(settings or load_settings())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await proxy.start()
        try:
            yield
        finally:
            await proxy.close()

    app = ProxyApp(
        proxy,
        routes=[
            Route("/openai/{path:path}", proxy.handle, methods=METHODS),
            Route("/healthz", proxy.healthz, methods=["GET"]),
            Route("/lb/status", proxy.status, methods=["GET"]),
            Route("/lb/usage", proxy.usage, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: _routing_error},
    )
    app.router.redirect_slashes = False  # `/openai` is not a route: a JSON 404, not a redirect to one
    return app


class ProxyApp(Starlette):
    """The local runner's app. `/openai/...` goes straight to `Proxy.handle`, as the Functions host
    calls it: the handler never raises and answers every method itself, so the router, Starlette's
    two exception middlewares and the endpoint wrapper would only add work to every call. Every
    other path goes through Starlette's routing."""

    def __init__(self, proxy: Proxy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state.proxy = proxy
        self._handle = proxy.handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROXIED_PREFIX) and scope["method"] in METHODS:
            scope["app"] = self
            response = await self._handle(Request(scope, receive, send))
            await response(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


async def _routing_error(request: Request, exc: Exception) -> Response:
    """Unknown routes and methods get Azure OpenAI's JSON error shape too, not Starlette's plain text."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 404:
        return route_not_found(request.url.path)
    if status == 405:
        error: errors.ProxyError = errors.MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}.")
    else:
        error = errors.BadRequest(str(getattr(exc, "detail", "Bad request.")))
        error.status = status
    return error.response(getattr(exc, "headers", None))


def route_not_found(path: str) -> Response:
    """Azure OpenAI's JSON 404 naming the URL forms served; both hosts answer unknown routes with it."""
    return errors.RouteNotFound(f"{path[:200]} is not served. {SERVED_URL_FORMS}").response()

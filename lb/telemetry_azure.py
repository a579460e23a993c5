"""The telemetry hooks exported to Application Insights through OpenTelemetry.

Imported only when `APPLICATIONINSIGHTS_CONNECTION_STRING` is set (see `lb.telemetry`), because the
distro costs about a third of a second to import. Each upstream attempt becomes a CLIENT span
("lb.attempt", a dependency in Application Insights, its target the backend's name) and four counters
give the totals: requests, attempts, 429s absorbed by failover, answers made while every backend cooled.
Two more meter tokens (`lb.tokens`, one point per kind: prompt, completion, total, cached,
reasoning) and answers (`lb.metered_requests`, usage known or unknown) per client, backend and
deployment, so a workbook can chart who spends what where (docs/metering.md has the Kusto query).

The distro's library instrumentations stay off: they would patch httpx, requests and the Azure SDK,
adding a span and a cost to every upstream call and every cooldown-table refresh, which the attempt
spans already describe. Log export is off too: the Functions host already sends the worker's logs.
Attributes carry names (backend, deployment) and statuses only, never a key, token or URL.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from lb.telemetry import Telemetry

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from opentelemetry.util.types import Attributes

    from lb.metering.usage import Usage

log = logging.getLogger("lb")

CLOSE_TIMEOUT_SECONDS = 5.0
SERVICE_NAME = "azure-openai-lb"


class AzureMonitorTelemetry(Telemetry):
    """Spans and counters for Application Insights.

    Given `tracer_provider` / `meter_provider` (tests pass in-memory ones), nothing global is
    configured; a provider left out is then the global one (a no-op unless someone set it).
    """

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        if tracer_provider is None and meter_provider is None:
            configure(env)
        self._tracer_provider = tracer_provider or trace.get_tracer_provider()
        self._meter_provider = meter_provider or metrics.get_meter_provider()
        self._tracer = self._tracer_provider.get_tracer("lb")
        meter = self._meter_provider.get_meter("lb")
        self._requests = meter.create_counter(
            "lb.requests", unit="{request}", description="Client requests answered, by final status"
        )
        self._attempts = meter.create_counter(
            "lb.attempts", unit="{attempt}", description="Upstream attempts, by backend and status"
        )
        self._absorbed = meter.create_counter(
            "lb.throttled_absorbed", unit="{response}", description="Upstream 429s the client never saw"
        )
        self._all_cooling = meter.create_counter(
            "lb.all_cooling", unit="{request}", description="Requests answered 429 at once: every backend cooling"
        )
        self._tokens = meter.create_counter(
            "lb.tokens", unit="{token}", description="Tokens answers used, by client, backend, deployment and kind"
        )
        self._metered = meter.create_counter(
            "lb.metered_requests", unit="{request}", description="Backend answers by client; usage=unknown: no usage"
        )
        self._objects = meter.create_counter(
            "lb.object_calls",
            unit="{request}",
            description="Calls naming a stored object, by outcome: pinned, lookups, found, refused",
        )
        self._closed = False

    def attempt(
        self,
        backend: str,
        deployment: str | None,
        status: int | str,
        started: float,
        seconds: float,
        cooldown: float | None,
    ) -> None:
        start_ns = int(started * 1e9)
        span_attrs: dict[str, str | int | float] = {"lb.backend": backend, "peer.service": backend}
        if deployment:
            span_attrs["lb.deployment"] = deployment
        if isinstance(status, int):
            span_attrs["http.response.status_code"] = status
            error = str(status) if status >= 400 else None
        else:  # the proxy's "error <ExceptionName>"
            error = status.removeprefix("error").strip() or "error"
        if error is not None:
            span_attrs["error.type"] = error
        if cooldown is not None:
            span_attrs["lb.cooldown_seconds"] = float(cooldown)
        span = self._tracer.start_span("lb.attempt", kind=SpanKind.CLIENT, start_time=start_ns, attributes=span_attrs)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=start_ns + int(seconds * 1e9))
        self._attempts.add(1, _attrs(deployment, backend=backend, status=status))

    def request(self, deployment: str | None, status: int, attempts: int, upstream_429s: int) -> None:
        self._requests.add(1, _attrs(deployment, status=status))
        if upstream_429s and status != 429:
            self._absorbed.add(upstream_429s, _attrs(deployment))

    def all_cooling(self, deployment: str | None) -> None:
        self._all_cooling.add(1, _attrs(deployment))

    def tokens(self, client: str, backend: str, deployment: str | None, usage: Usage | None) -> None:
        known = "known" if usage is not None else "unknown"
        self._metered.add(1, _attrs(deployment, client=client, backend=backend, usage=known))
        if usage is None:
            return
        for kind, count in (
            ("prompt", usage.prompt),
            ("completion", usage.completion),
            ("total", usage.total),
            ("cached", usage.cached),
            ("reasoning", usage.reasoning),
        ):
            if count:
                self._tokens.add(count, _attrs(deployment, client=client, backend=backend, kind=kind))

    def object_call(self, outcome: str) -> None:
        self._objects.add(1, {"lb.outcome": outcome})

    def close(self) -> None:
        """Export what is buffered, waiting at most CLOSE_TIMEOUT_SECONDS for the ingestion endpoint.

        A flush, not a shutdown: the SDK shuts its providers down at exit and warns if that is the second time.
        """
        if self._closed:
            return
        self._closed = True
        providers = (self._tracer_provider, self._meter_provider)
        timeout_millis = int(CLOSE_TIMEOUT_SECONDS * 1000)

        def flush() -> None:
            for provider in providers:
                try:
                    getattr(provider, "force_flush", lambda timeout_millis: True)(timeout_millis=timeout_millis)
                except Exception:
                    log.warning("telemetry flush failed", exc_info=True)

        worker = threading.Thread(target=flush, name="lb-telemetry-flush", daemon=True)
        worker.start()
        worker.join(CLOSE_TIMEOUT_SECONDS + 0.5)  # the exporters' own timeouts are not all bounded
        if worker.is_alive():
            log.warning("telemetry not flushed within %.0f seconds; some may be lost", CLOSE_TIMEOUT_SECONDS)


def _attrs(deployment: str | None, **attrs: str | int) -> Attributes:
    """Metric dimensions; an unknown deployment is left out rather than given a made-up name."""
    if deployment:
        attrs["deployment"] = deployment
    return attrs


def configure(env: Mapping[str, str]) -> None:
    """Set the global OpenTelemetry providers to export to the Application Insights of `env`."""
    from azure.monitor.opentelemetry import configure_azure_monitor
    from opentelemetry.sdk.resources import Resource

    # The distro's only switch for log export (its `disable_logging` argument is ignored); a value set wins.
    os.environ.setdefault("OTEL_LOGS_EXPORTER", "none")
    # Every attempt by default (the distro's default, 5 traces a second, drops most failovers under load);
    # OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG choose otherwise. The counters are never sampled.
    sampling = {} if os.environ.get("OTEL_TRACES_SAMPLER") else {"sampling_ratio": 1.0}
    service = env.get("OTEL_SERVICE_NAME") or env.get("WEBSITE_SITE_NAME") or SERVICE_NAME
    configure_azure_monitor(
        connection_string=env["APPLICATIONINSIGHTS_CONNECTION_STRING"].strip(),
        credential=credential(env),
        resource=Resource.create({"service.name": service}),
        instrumentation_options=_all_instrumentations_off(),
        enable_live_metrics=False,
        enable_performance_counters=False,
        **sampling,
    )


def credential(env: Mapping[str, str]) -> TokenCredential | None:
    """Entra ID for ingestion when `APPLICATIONINSIGHTS_AUTHENTICATION_STRING` is `Authorization=AAD[;ClientId=...]`.

    A sync credential: the exporter sends from its own threads. With a ClientId it is that user-assigned
    managed identity; without one DefaultAzureCredential (managed identity on Azure, `az login` locally).
    None leaves the instrumentation key of the connection string alone to authorize (local auth on).
    """
    fields = {}
    for part in env.get("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "").split(";"):
        key, _, value = part.partition("=")
        fields[key.strip().lower()] = value.strip()
    if fields.get("authorization", "").upper() != "AAD":
        return None
    if fields.get("clientid"):
        from azure.identity import ManagedIdentityCredential

        return ManagedIdentityCredential(client_id=fields["clientid"])
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


def _all_instrumentations_off() -> dict[str, dict[str, bool]]:
    """Every instrumentation installed (and the Azure SDK's tracing), disabled, so none patches a library."""
    names = {ep.name for ep in entry_points(group="opentelemetry_instrumentor")} | {"azure_sdk"}
    return {name: {"enabled": False} for name in sorted(names)}

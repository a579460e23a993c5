"""Telemetry: nothing without a connection string; with one, a span per attempt and four counters."""

from __future__ import annotations

import gzip
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from lb import telemetry_azure
from lb.app import create_app
from lb.config import load_settings
from lb.proxy import Proxy
from lb.sim import Servers, SimBackend
from lb.telemetry import Telemetry, create_telemetry
from lb.telemetry_azure import AzureMonitorTelemetry
from tests.conftest import API_VERSION, CLIENT_KEY

ROOT = Path(__file__).resolve().parents[1]
FAKE_KEY = "00000000-0000-0000-0000-000000000000"


class Recorded:
    """An AzureMonitorTelemetry writing to in-memory exporters instead of Application Insights."""

    def __init__(self) -> None:
        self.spans_exporter = InMemorySpanExporter()
        self.reader = InMemoryMetricReader()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans_exporter))
        self.telemetry = AzureMonitorTelemetry(
            {}, tracer_provider=tracer_provider, meter_provider=MeterProvider(metric_readers=[self.reader])
        )

    def spans(self) -> list[ReadableSpan]:
        return sorted(self.spans_exporter.get_finished_spans(), key=lambda s: s.start_time or 0)

    def points(self) -> dict[tuple[str, frozenset[tuple[str, Any]]], float]:
        """(metric name, attributes) -> counter value."""
        data = self.reader.get_metrics_data()
        found: dict[tuple[str, frozenset[tuple[str, Any]]], float] = {}
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        found[(metric.name, frozenset((point.attributes or {}).items()))] = point.value  # type: ignore[union-attr]
        return found


def point(name: str, **attrs: Any) -> tuple[str, frozenset[tuple[str, Any]]]:
    return name, frozenset(attrs.items())


@pytest.fixture
def recorded() -> Recorded:
    return Recorded()


# Off --------------------------------------------------------------------------------------------
@pytest.mark.e2e  # a fresh interpreter
def test_without_a_connection_string_telemetry_is_the_no_op_and_nothing_is_imported():
    code = (
        "import lb.app, lb.telemetry, sys; t = lb.telemetry.create_telemetry({}); "
        "print(type(t) is lb.telemetry.Telemetry, "
        "sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'azure.monitor', 'lb.telemetry_azure'))))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLICATIONINSIGHTS_", "OTEL_"))}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "[]"], out.stderr
    assert type(create_telemetry({"APPLICATIONINSIGHTS_CONNECTION_STRING": "  "})) is Telemetry


# Spans ------------------------------------------------------------------------------------------
def test_an_attempt_is_a_client_span_with_its_timing_backend_deployment_status_and_cooldown(recorded):
    started = time.time() - 1
    recorded.telemetry.attempt("1", "chat", 429, started, 0.25, 2.5)
    recorded.telemetry.attempt("2", "chat", 200, started + 0.25, 0.5, None)
    throttled, answered = recorded.spans()
    assert throttled.name == answered.name == "lb.attempt"
    assert throttled.kind is SpanKind.CLIENT
    assert throttled.start_time == int(started * 1e9)
    assert throttled.end_time == throttled.start_time + 250_000_000
    assert dict(throttled.attributes or {}) == {
        "lb.backend": "1",
        "peer.service": "1",
        "lb.deployment": "chat",
        "http.response.status_code": 429,
        "error.type": "429",
        "lb.cooldown_seconds": 2.5,
    }
    assert throttled.status.status_code is StatusCode.ERROR
    assert dict(answered.attributes or {}) == {
        "lb.backend": "2",
        "peer.service": "2",
        "lb.deployment": "chat",
        "http.response.status_code": 200,
    }
    assert answered.status.status_code is StatusCode.UNSET


def test_a_connection_error_is_an_error_span_without_a_status_code(recorded):
    recorded.telemetry.attempt("1", None, "error ConnectError", time.time(), 0.01, 10.0)
    (span,) = recorded.spans()
    attributes = dict(span.attributes or {})
    assert attributes["error.type"] == "ConnectError"
    assert "http.response.status_code" not in attributes and "lb.deployment" not in attributes
    assert span.status.status_code is StatusCode.ERROR


# Metrics ----------------------------------------------------------------------------------------
def test_counters_count_requests_attempts_absorbed_429s_and_all_cooling_answers(recorded):
    t = recorded.telemetry
    t.attempt("1", "chat", 429, time.time(), 0.01, 2.0)
    t.attempt("2", "chat", 200, time.time(), 0.01, None)
    t.request("chat", 200, attempts=2, upstream_429s=1)
    t.request("chat", 200, attempts=1, upstream_429s=0)
    t.request("chat", 429, attempts=2, upstream_429s=2)  # the client saw this 429: nothing absorbed
    t.request("chat", 429, attempts=0, upstream_429s=0)
    t.all_cooling("chat")
    t.request(None, 404, attempts=1, upstream_429s=0)
    assert recorded.points() == {
        point("lb.attempts", backend="1", deployment="chat", status=429): 1,
        point("lb.attempts", backend="2", deployment="chat", status=200): 1,
        point("lb.requests", deployment="chat", status=200): 2,
        point("lb.requests", deployment="chat", status=429): 2,
        point("lb.requests", status=404): 1,
        point("lb.throttled_absorbed", deployment="chat"): 1,
        point("lb.all_cooling", deployment="chat"): 1,
    }


# Lifecycle --------------------------------------------------------------------------------------
def test_close_exports_what_is_buffered_once():
    exporter = InMemorySpanExporter()
    flushes: list[int] = []

    class Provider(TracerProvider):
        def force_flush(self, timeout_millis: int = 30000) -> bool:
            flushes.append(timeout_millis)
            return super().force_flush(timeout_millis)

    provider = Provider()
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=60_000))
    telemetry = AzureMonitorTelemetry({}, tracer_provider=provider, meter_provider=MeterProvider())
    telemetry.attempt("1", "chat", 200, time.time(), 0.01, None)
    assert exporter.get_finished_spans() == ()
    telemetry.close()
    telemetry.close()
    assert [s.name for s in exporter.get_finished_spans()] == ["lb.attempt"]
    assert len(flushes) == 1


def test_close_gives_up_waiting_for_a_slow_ingestion_endpoint(monkeypatch):
    class Stuck(TracerProvider):
        def force_flush(self, timeout_millis: int = 30000) -> bool:
            time.sleep(5)
            return False

    monkeypatch.setattr(telemetry_azure, "CLOSE_TIMEOUT_SECONDS", 0.2)
    telemetry = AzureMonitorTelemetry({}, tracer_provider=Stuck(), meter_provider=MeterProvider())
    started = time.perf_counter()
    telemetry.close()
    assert time.perf_counter() - started < 1.5


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ("", None),
        ("Authorization=AAD;ClientId=11111111-2222-3333-4444-555555555555", "ManagedIdentityCredential"),
        ("authorization=aad", "DefaultAzureCredential"),
        ("Authorization=Basic", None),
    ],
)
def test_the_authentication_string_picks_the_ingestion_credential(auth, expected):
    credential = telemetry_azure.credential({"APPLICATIONINSIGHTS_AUTHENTICATION_STRING": auth})
    assert (type(credential).__name__ if credential else None) == expected


# With the real exporter -------------------------------------------------------------------------
class FakeIngestion(http.server.ThreadingHTTPServer):
    """Application Insights' track endpoint: accepts every envelope and keeps it."""

    def __init__(self) -> None:
        self.envelopes: list[dict[str, Any]] = []
        super().__init__(("127.0.0.1", 0), _IngestionHandler)


class _IngestionHandler(http.server.BaseHTTPRequestHandler):
    server: FakeIngestion

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        items = json.loads(body)
        self.server.envelopes.extend(items)
        answer = json.dumps({"itemsReceived": len(items), "itemsAccepted": len(items), "errors": []}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def ingestion() -> Iterator[FakeIngestion]:
    server = FakeIngestion()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


EXPORTING = """
import logging, sys, time, httpx, lb.telemetry
telemetry = lb.telemetry.create_telemetry({"APPLICATIONINSIGHTS_CONNECTION_STRING": sys.argv[1]})
telemetry.attempt("1", "chat", 429, time.time(), 0.01, 2.0)
telemetry.attempt("2", "chat", 200, time.time(), 0.02, None)
telemetry.request("chat", 200, 2, 1)
started = time.perf_counter()
telemetry.close()
print(type(telemetry).__name__, time.perf_counter() - started)
libraries = ("asgi", "fastapi", "httpx", "requests", "urllib", "urllib3", "wsgi", "django", "flask", "psycopg2")
print([m for m in sys.modules if m in {f"opentelemetry.instrumentation.{name}" for name in libraries}])
from azure.core.settings import settings
print(type(httpx.AsyncClient.send).__name__, [type(h).__name__ for h in logging.getLogger().handlers],
      settings.tracing_implementation())
"""


@pytest.mark.e2e  # a real process and a fake ingestion endpoint on a socket
def test_with_a_connection_string_attempts_and_counters_reach_the_ingestion_endpoint(ingestion, tmp_path):
    """A real process, the real distro, a fake Application Insights on 127.0.0.1."""
    connection = f"InstrumentationKey={FAKE_KEY};IngestionEndpoint=http://127.0.0.1:{ingestion.server_port}/"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLICATIONINSIGHTS_", "OTEL_"))}
    env |= {"APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true", "TMPDIR": str(tmp_path)}  # no Microsoft endpoint
    out = subprocess.run(
        [sys.executable, "-c", EXPORTING, connection], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    kind_and_close, instrumentations, patched = out.stdout.splitlines()
    kind, close_seconds = kind_and_close.split()
    assert kind == "AzureMonitorTelemetry" and float(close_seconds) < telemetry_azure.CLOSE_TIMEOUT_SECONDS
    assert instrumentations == "[]"  # no instrumentor imported, let alone applied
    assert patched == "function [] None"  # httpx not wrapped, no log handler added, Azure SDK not traced

    dependencies = [e["data"]["baseData"] for e in ingestion.envelopes if e["name"].endswith("RemoteDependency")]
    assert sorted((d["name"], d["target"], d["success"]) for d in dependencies) == [
        ("lb.attempt", "1", False),
        ("lb.attempt", "2", True),
    ]
    throttled = next(d for d in dependencies if d["target"] == "1")
    assert throttled["properties"]["lb.cooldown_seconds"] in ("2.0", 2.0)
    metrics = {
        m["name"]: m["value"]
        for e in ingestion.envelopes
        if e["name"].endswith(".Metric")
        for m in e["data"]["baseData"]["metrics"]
    }
    assert metrics["lb.attempts"] == 1 and metrics["lb.requests"] == 1 and metrics["lb.throttled_absorbed"] == 1


# Through the proxy ------------------------------------------------------------------------------
def test_a_request_that_failed_over_has_one_span_per_attempt(servers: Servers, recorded: Recorded):
    backends = [SimBackend(f"sim{i}", api_key=f"key-{i}") for i in (1, 2)]
    env = {"LB_CLIENT_KEYS": CLIENT_KEY, "BACKEND_2_PRIORITY": "2"}  # backend 1 is always tried first
    for i, backend in enumerate(backends, start=1):
        env[f"BACKEND_{i}_URL"] = servers.start(backend)
        env[f"BACKEND_{i}_APIKEY"] = f"key-{i}"
    settings = load_settings(env)
    url = servers.start(create_app(proxy=Proxy(settings, telemetry=recorded.telemetry)))
    backends[0].throttle_next, backends[0].retry_after = 1, 30

    response = httpx.post(
        f"{url}/openai/deployments/chat/chat/completions?api-version={API_VERSION}",
        headers={"api-key": CLIENT_KEY},
        json={"messages": [{"role": "user", "content": "hi"}]},
    )

    assert response.status_code == 200 and response.headers["x-lb-attempts"] == "2"
    first, second = recorded.spans()
    assert [(s.attributes or {}).get("lb.backend") for s in (first, second)] == ["1", "2"]
    assert (first.attributes or {})["http.response.status_code"] == 429
    assert (first.attributes or {})["lb.cooldown_seconds"] == 30
    assert (second.attributes or {})["http.response.status_code"] == 200
    assert first.end_time and second.start_time and second.end_time
    assert first.end_time <= second.start_time + 5_000_000  # one after the other (clocks differ by microseconds)
    points = recorded.points()
    assert points[point("lb.requests", deployment="chat", status=200)] == 1
    assert points[point("lb.throttled_absorbed", deployment="chat")] == 1
    recorded_values = [str(v) for s in (first, second) for v in (s.attributes or {}).values()]
    recorded_values += [str(v) for key in points for _, v in key[1]]
    assert not any(secret in v for v in recorded_values for secret in (CLIENT_KEY, "key-1", "key-2"))


def test_object_calls_are_counted_by_outcome(servers: Servers, recorded: Recorded):
    import openai

    sims = [SimBackend(f"sim{i}", api_key=f"key-{i}") for i in (1, 2)]
    env = {"LB_CLIENT_KEYS": f"a:{CLIENT_KEY},b:other-key"}
    for i, sim in enumerate(sims, start=1):
        env[f"BACKEND_{i}_URL"], env[f"BACKEND_{i}_APIKEY"] = servers.start(sim), f"key-{i}"
    url = servers.start(create_app(proxy=Proxy(load_settings(env), telemetry=recorded.telemetry)))
    owner = openai.OpenAI(base_url=url + "/openai/v1", api_key=CLIENT_KEY, max_retries=0)
    response = owner.responses.create(model="chat", input="hi")
    owner.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=url + "/openai/v1", api_key="other-key", max_retries=0).responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        owner.responses.retrieve("resp_unknown")
    points = recorded.points()
    for outcome in ("pinned", "refused", "unknown"):  # unknown: no record, so no look-up with several clients
        assert points[point("lb.object_calls", **{"lb.outcome": outcome})] == 1

"""Core Tools can't run here, so check what the Functions host would index from function_app.py."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import azure.functions as func
import pytest

from lb.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def load_function_app(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.syspath_prepend(str(ROOT))
    sys.modules.pop("function_app", None)
    return importlib.import_module("function_app")


def test_registered_functions_routes_methods_and_auth(monkeypatch):
    module = load_function_app(monkeypatch, {"BACKEND_1_URL": "https://one.openai.azure.com"})
    triggers = {f.get_function_name(): f.get_trigger() for f in module.app.get_functions()}
    assert set(triggers) == {"openai_proxy", "healthz", "lb_status", "lb_usage", "not_served"}
    proxy = triggers["openai_proxy"]
    assert proxy.route == "openai/{*path}"
    assert {str(m.value) for m in proxy.methods} >= {"GET", "POST", "PUT", "PATCH", "DELETE"}
    assert triggers["healthz"].route == "healthz" and [m.value for m in triggers["healthz"].methods] == ["GET"]
    assert triggers["lb_status"].route == "lb/status"
    assert triggers["lb_usage"].route == "lb/usage" and [m.value for m in triggers["lb_usage"].methods] == ["GET"]
    assert triggers["not_served"].route == "{*path}"  # a catch-all: the literal routes above take precedence
    assert all(t.auth_level == func.AuthLevel.ANONYMOUS for t in triggers.values())


def test_functions_use_the_streaming_extension_types(monkeypatch):
    module = load_function_app(monkeypatch, {"BACKEND_1_URL": "https://one.openai.azure.com"})
    from azurefunctions.extensions.http.fastapi import Request, StreamingResponse

    functions = {f.get_function_name(): f for f in module.app.get_functions()}
    user_fn = functions["openai_proxy"].get_user_function()
    assert user_fn.__annotations__["req"] in (Request, "Request")
    assert user_fn.__annotations__["return"] in (StreamingResponse, "StreamingResponse")


def test_bad_configuration_stops_indexing(monkeypatch):
    with pytest.raises(ConfigError, match=r"^BACKEND_1_URL"):
        load_function_app(monkeypatch, {})


def test_host_json_serves_azure_openai_paths_unprefixed():
    host = json.loads((ROOT / "host.json").read_text())
    assert host["version"] == "2.0"
    assert host["extensions"]["http"]["routePrefix"] == ""


def test_requirements_hold_the_runtime_dependencies():
    names = {
        line.split(">")[0].split("=")[0].split("<")[0].strip().lower()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"azure-functions", "azurefunctions-extensions-http-fastapi", "azure-identity", "httpx"} <= names
    assert {"azure-data-tables", "aiohttp"} <= names
    assert "pytest" not in names and "openai" not in names

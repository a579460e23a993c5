"""`python -m lb serve` as a user starts it: a real process, configured by the environment."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from lb.sim import SimBackend, free_port
from tests.conftest import API_VERSION, SdkHttp
from tests.idp import LocalIdP, SigningKey, entra_env

pytestmark = pytest.mark.e2e  # starts `python -m lb` processes

ROOT = Path(__file__).resolve().parents[1]


def run_lb(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BACKEND_", "LB_", "WEBSITE_"))}
    return subprocess.Popen(
        [sys.executable, "-m", "lb", *args],
        cwd=ROOT,
        env={**clean, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def serve_lb(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """`python -m lb serve` on a free port, once it answers `/healthz`: the process and its URL."""
    port = free_port()
    process = run_lb(env, "serve", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    with httpx.Client() as http:  # one client for every poll (each new one loads the CA bundle)
        while True:
            try:
                assert http.get(url + "/healthz").json() == {"status": "ok"}
                return process, url
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    raise AssertionError(f"lb serve did not start: {process.communicate()[1]}") from None
                time.sleep(0.1)


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"BACKEND_1_PRIORITY": "high"}, "error: BACKEND_1_PRIORITY: 'high' is not a whole number"),
        (
            {"LB_ENTRA_TENANT_ID": "contoso.onmicrosoft.com"},
            "error: LB_ENTRA_TENANT_ID: 'contoso.onmicrosoft.com' is not a tenant id (a GUID, Entra ID > Overview)",
        ),
        (
            {"WEBSITE_INSTANCE_ID": "instance-1"},
            "error: LB_CLIENT_KEYS: required when running on Azure (set it or LB_ENTRA_TENANT_ID,"
            " or LB_ALLOW_ANONYMOUS=true to serve anyone)",
        ),
        (
            {"BACKEND_1_DEPLOYMENTS": "chat=gpt4o-eastus,embedding="},
            "error: BACKEND_1_DEPLOYMENTS: 'embedding=' is not `name` or `alias=name`"
            " (deployment names: letters, digits, '-', '_', '.')",
        ),
        (
            {"BACKEND_1_DEPLOYMENT": "gpt-4o"},
            "error: BACKEND_1_DEPLOYMENT: unknown backend setting (known: BACKEND_X_URL, _PRIORITY, _WEIGHT,"
            " _APIKEY, _DEPLOYMENTS, _DEPLOYMENT_NAME)",
        ),
    ],
)
def test_bad_configuration_stops_start_up_with_one_line_naming_the_variable(env, line):
    process = run_lb({"BACKEND_1_URL": "https://a.openai.azure.com", **env}, "serve")
    out, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert err.strip() == line
    assert "Traceback" not in out + err


def test_serve_proxies_with_each_backends_key_and_logs_no_secret(servers):
    """A full run with keys and Entra tokens, accepted and refused: every log line names its request, none a secret."""
    backends = [SimBackend("a", api_key="backend-secret-a"), SimBackend("b", api_key="backend-secret-b")]
    backends[0].throttle_next = 1
    idp = LocalIdP()
    idp_port = free_port()
    idp.url = f"http://127.0.0.1:{idp_port}"
    servers.start(idp, idp_port)
    env = {"LB_CLIENT_KEYS": "client-secret", "LB_LOG_LEVEL": "DEBUG", "LB_AFFINITY": "off", **entra_env(idp)}
    for i, backend in enumerate(backends, start=1):
        env[f"BACKEND_{i}_URL"] = servers.start(backend)
        env[f"BACKEND_{i}_APIKEY"] = backend.api_key or ""
    process, url = serve_lb(env)
    try:
        client = openai.AzureOpenAI(
            azure_endpoint=url, api_key="client-secret", api_version=API_VERSION, max_retries=0, http_client=SdkHttp()
        )
        for _ in range(6):
            client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            if c.choices
        )
        assert "tok4" in text
        client.embeddings.create(model="embedding", input="x")
        v1 = openai.OpenAI(base_url=url + "/openai/v1", api_key="client-secret", max_retries=0, http_client=SdkHttp())
        assert v1.responses.create(model="chat", input="hi").status == "completed"
        with v1.responses.stream(model="chat", input="hi", store=False) as stream:  # head and first event: one send
            types = [event.type for event in stream]
        assert types[0] == "response.created" and types[-1] == "response.completed"
        token = idp.token()
        with_token = openai.AzureOpenAI(
            azure_endpoint=url, azure_ad_token=token, api_version=API_VERSION, max_retries=0, http_client=SdkHttp()
        ).with_options(default_headers={"x-request-id": "req-with-token"})
        with_token.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
        refused = [token[:-4] + "AAAA", idp.token(SigningKey("key-1")), "wrong-client-secret"]
        for bad in refused:
            answer = httpx.post(
                f"{url}/openai/deployments/chat/chat/completions?api-version={API_VERSION}",
                json={"messages": []},
                headers={"authorization": f"Bearer {bad}", "x-request-id": "req-refused"},
            )
            assert answer.status_code == 401 and bad not in answer.text + str(answer.headers)
    finally:
        process.terminate()
        out, err = process.communicate(timeout=20)
    assert backends[0].count(429) == 1
    for backend in backends:
        assert backend.calls and all(c.headers["api-key"] == backend.api_key for c in backend.calls)
    logs = out + err
    assert "status=429" in logs  # the failover was logged ...
    for secret in ("client-secret", "backend-secret-a", "backend-secret-b", token, *refused):
        assert secret not in logs  # ... without any credential
    assert token.rsplit(".", 1)[1] not in logs and token.split(".")[1] not in logs  # not even a part of one
    assert "[req-refused]: client refused: The bearer token" in logs
    lines = [line for line in logs.splitlines() if " lb" in line and ": " in line]
    assert lines and all(" [" in line.split(": ", 1)[0] for line in lines)  # every lb line names its request

"""One reading of a call's path (`lb.apipath.split_path`): its shape, deployment and route, in any case and encoding.

The three users of the reading (the deployment: tests/test_deployments.py; metering:
tests/test_redteam_quota.py and test_redteam_metering.py; isolation: tests/test_isolation.py) each
have their end-to-end test of the same paths.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response

from lb.apipath import DEPLOYMENTS, V1, ApiPath, split_path
from lb.config import load_settings
from lb.errors import BadRequest
from lb.objects.routes import classify, route, stateless
from lb.proxy import Proxy
from lb.requestinfo import RequestInfo, check_path
from tests.conftest import CLIENT_KEY


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (
            "/openai/deployments/chat/chat/completions?api-version=2024-10-21",
            ApiPath(DEPLOYMENTS, "chat", "chat/completions", ("chat", "completions")),
        ),
        (
            "/openai/Deployments/chat/Chat/Completions",
            ApiPath(DEPLOYMENTS, "chat", "chat/completions", ("Chat", "Completions")),
        ),
        (
            "/openai/DEPLOYMENTS/Chat-GPT/embeddings",  # the name keeps its case: deployments are named by the operator
            ApiPath(DEPLOYMENTS, "Chat-GPT", "embeddings", ("embeddings",)),
        ),
        (
            "/openai/d%65ployments/ch%61t/chat/c%6Fmpletions",
            ApiPath(DEPLOYMENTS, "chat", "chat/completions", ("chat", "c%6Fmpletions"), encoded=True),
        ),
        ("/openai/deployments/chat?api-version=1", ApiPath(DEPLOYMENTS, "chat", "", ())),  # the deployment itself
        ("/openai/deployments", ApiPath("", None, "deployments", ("deployments",))),  # the list of deployments
        ("/openai/V1/Responses/resp_AB", ApiPath(V1, None, "responses/resp_ab", ("Responses", "resp_AB"))),
        ("/openai/%761/chat/completions", ApiPath(V1, None, "chat/completions", ("chat", "completions"), True)),
        ("/openai/Responses?api-version=1", ApiPath("", None, "responses", ("Responses",))),
        ("/openai/v1/", ApiPath(V1, None, "", ("",))),
    ],
)
def test_a_path_is_read_in_any_case_and_decoded_once(path: str, expected: ApiPath) -> None:
    assert split_path(path) == expected


@pytest.mark.parametrize(
    ("path", "in_body"),
    [
        ("/openai/v1/chat/completions", True),
        ("/openai/V1/embeddings", True),
        ("/openai/responses?api-version=1", True),
        ("/openai/R%65sponses/compact", True),
        ("/openai/deployments/responses/chat/completions", False),  # a deployment named like a route
        ("/openai/files", False),
    ],
)
def test_the_calls_that_name_their_deployment_in_the_body(path: str, in_body: bool) -> None:
    assert split_path(path).model_in_body is in_body


@pytest.mark.parametrize(
    "path",
    [
        "/openai/deployments/chat/chat/completions",
        "/openai/Deployments/chat/Chat/Completions",
        "/openai/deployments/ch%61t/chat/completions",
        "/openai/d%65ployments/chat/chat/c%6Fmpletions",
        "/openai/v1/chat/c%6Fmpletions",
    ],
)
def test_every_user_reads_the_same_call_from_one_split(path: str) -> None:
    check_path(path)  # a path the balancer accepts
    info = RequestInfo(path, None, b"{}")
    assert info.path == split_path(path) and info.operation == "chat/completions"
    free = stateless(info.path)  # a model call: it names no stored object in its path
    assert free is not None and free[1] == "chat/completions"
    assert route(info.path)[0] is None and classify("POST", info.path, b"{}", "application/json", True) is None


def test_an_object_route_is_known_in_any_case_and_refused_encoded() -> None:
    collection, rest, _ = route(split_path("/openai/V1/Responses/resp_AB/Input_Items"))
    assert collection is not None and collection.kind == "response" and rest == ["resp_AB", "Input_Items"]
    with pytest.raises(BadRequest):  # the id as sent, never a decoded reading of it
        classify("GET", "/openai/v1/r%65sponses/resp_AB", b"", None)


def _direct(proxy: Proxy, path: str, body: bytes) -> Response:
    """`path` as the Functions host hands it to the proxy: its route `openai/{*path}` matches in any case."""
    headers = [(b"api-key", CLIENT_KEY.encode()), (b"content-type", b"application/json")]
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b""}

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def run() -> Response:
        try:
            return await proxy.handle(Request({**scope, "headers": headers, "scheme": "http"}, receive))
        finally:
            await proxy.close()

    return asyncio.run(run())


@pytest.mark.parametrize("path", ["/OpenAI/v1/Responses", "/OPENAI/deployments/chat/chat/completions"])
def test_the_openai_prefix_in_another_case_is_a_404_on_both_hosts_and_reaches_no_backend(make_pool, path):
    """Every SDK sends `/openai/` in lower case; in another, the call is refused before anything is
    read (`check_path`), so no policy has a reading of it to get wrong: Azure's JSON 404, nothing sent."""
    body = json.dumps({"model": "chat", "input": "hi", "messages": []}).encode()
    pool = make_pool(1)
    served = httpx.post(pool.url + path, content=body, headers={"api-key": CLIENT_KEY}, timeout=10)  # `lb serve`
    sent: list[httpx.Request] = []

    def backend(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={})

    settings = load_settings(
        {"LB_CLIENT_KEYS": CLIENT_KEY, "BACKEND_1_URL": "https://one.example", "BACKEND_1_APIKEY": "k"}
    )
    hosted = _direct(Proxy(settings, transport=httpx.MockTransport(backend)), path, body)
    for status, error in ((served.status_code, served.json()), (hosted.status_code, json.loads(bytes(hosted.body)))):
        assert status == 404 and set(error["error"]) == {"code", "message"}
    assert pool.backends[0].calls == [] and sent == []

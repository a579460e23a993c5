"""Per-backend deployment names: each backend is called by its own name, on both API shapes, streaming too."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx
import openai
import pytest
from starlette.requests import Request

from lb import bodyscan
from lb.config import Backend, load_settings
from lb.proxy import Proxy
from lb.requestinfo import RequestInfo, described
from lb.routing.deployments import upstream_call
from lb.sim import SimBackend
from tests.conftest import API_VERSION, CLIENT_KEY
from tests.test_cli import serve_lb

CHAT_PATH = "/openai/deployments/chat/chat/completions?api-version=2024-10-21"


def test_path_and_body_pass_untouched_when_the_name_is_the_same():
    body = b'{"model": "chat",  "input": "hi"}'
    plain = Backend("a", "https://a")
    same = Backend("b", "https://b", deployments={"chat": "chat"})
    for backend in (plain, same):
        for info in (RequestInfo(CHAT_PATH, "chat", body), RequestInfo("/openai/v1/responses", "chat", body)):
            path, sent = upstream_call(backend, info)
            assert path == info.raw_path and sent is body  # the very same bytes object: nothing re-serialized


def test_the_path_segment_is_renamed_and_the_query_kept():
    backend = Backend("a", "https://a", deployments={"chat": "gpt4o-eastus"})
    path, body = upstream_call(backend, RequestInfo(CHAT_PATH, "chat", b"{}"))
    assert path == "/openai/deployments/gpt4o-eastus/chat/completions?api-version=2024-10-21" and body == b"{}"


def _located(body: bytes) -> RequestInfo:
    return asyncio.run(described("/openai/v1/responses", body))


def test_the_v1_body_model_is_renamed_and_everything_else_kept():
    backend = Backend("a", "https://a", deployment_name="gpt-4o")
    original = {"model": "chat", "input": [{"role": "user", "content": "héllo"}], "stream": True}
    path, body = upstream_call(backend, _located(json.dumps(original).encode()))
    assert path == "/openai/v1/responses" and json.loads(body) == {**original, "model": "gpt-4o"}


def test_a_large_v1_body_gets_its_model_replaced_in_place():
    backend = Backend("a", "https://a", deployments={"chat": "gpt4o-eastus"})
    for big in (
        {"model": "chat", "input": "x" * 100_000, "tools": [{"model": "other"}]},
        {"tools": [{"model": "chat"}], "input": "x" * 100_000, "model": "chat"},  # found by the tokenizer
    ):
        body = json.dumps(big).encode()
        _, sent = upstream_call(backend, _located(body))
        assert json.loads(sent) == {**big, "model": "gpt4o-eastus"} and len(sent) == len(body) + len("gpt4o-eastus") - 4
    escaped = b'{"mod\\u0065l": "ch\\u0061t", "input": "hi"}'
    _, sent = upstream_call(backend, _located(escaped))
    assert json.loads(sent) == {"model": "gpt4o-eastus", "input": "hi"}


def _proxy_with_renaming_backend(answer: httpx.Response, seen: list[bytes]) -> Proxy:
    async def backend(request: httpx.Request) -> httpx.Response:
        seen.append(request.content[:64])  # a slice: the test must not block the loop itself
        return answer

    settings = load_settings(
        {"BACKEND_1_URL": "https://one.example", "BACKEND_1_APIKEY": "k", "BACKEND_1_DEPLOYMENTS": "chat=gpt4o"}
    )
    return Proxy(settings, transport=httpx.MockTransport(backend))


def _request(body: bytes) -> Request:
    chunks = [body[i : i + 1024 * 1024] for i in range(0, len(body), 1024 * 1024)]

    async def receive() -> dict:
        chunk = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "method": "POST", "path": "/openai/v1/responses", "raw_path": b"/openai/v1/responses"}
    return Request({**scope, "query_string": b"", "headers": headers, "scheme": "http"}, receive)


async def _longest_stall(work) -> tuple[object, float]:
    """Run `work` while a ticker measures the longest the event loop went without running it, in
    CPU time of the loop's thread: the loop's own work between two ticks counts, while the machine
    running other processes (which stops the wall clock's ticks as much) does not."""
    longest = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal longest
        last = time.thread_time()
        while not done.is_set():
            await asyncio.sleep(0.002)
            now = time.thread_time()
            longest, last = max(longest, now - last), now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    try:
        return await work, longest
    finally:
        done.set()
        await task


def test_renaming_a_25_mb_body_never_holds_the_event_loop():
    seen: list[bytes] = []
    proxy = _proxy_with_renaming_backend(httpx.Response(200, json={"id": "r"}), seen)
    message = {"role": "user", "content": "x" * 1000}
    # a nested "model" of the same name: the byte search can't tell which is on top, the tokenizer can
    body = json.dumps({"tools": [{"model": "chat"}], "input": [message] * 25_000, "model": "chat"}).encode()
    assert len(body) > 25_000_000

    async def run() -> tuple[object, float]:
        try:
            return await _longest_stall(proxy.handle(_request(body)))
        finally:
            await proxy.close()

    response, longest = asyncio.run(run())
    assert response.status_code == 200 and seen == [body[:64]]  # the model at the end, renamed in place
    assert longest < 0.05, f"the event loop was held {longest * 1000:.0f} ms"


def test_a_renamed_stream_is_sent_byte_for_byte_as_asked_and_its_body_is_read_once(monkeypatch):
    """The usage member is inserted and the model renamed as bytes, the model's spans found before the
    insertion and moved by it; the request path runs `bodyscan`'s reading once, whatever the policies."""
    sent: list[bytes] = []

    async def backend(request: httpx.Request) -> httpx.Response:
        sent.append(request.content)
        return httpx.Response(200, json={"id": "r"})

    env = {"BACKEND_1_URL": "https://one.example", "BACKEND_1_APIKEY": "k", "BACKEND_1_DEPLOYMENTS": "chat=gpt4o"}
    env |= {"BACKEND_2_URL": "https://two.example", "BACKEND_2_APIKEY": "k", "BACKEND_2_DEPLOYMENT_NAME": "gpt4o"}
    env |= {"LB_POLICY": "headroom", "LB_CLIENT_KEYS": "app:key-1", "LB_CLIENT_LIMITS": "app=1000000tpm"}
    proxy = Proxy(load_settings(env), transport=httpx.MockTransport(backend))
    reads: list[str] = []  # bodyscan's readings asked for from outside it
    for name in ("marks", "read_marks", "include_usage", "top_level_spans", "top_level_string"):
        original = getattr(bodyscan, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            if sys._getframe(1).f_globals["__name__"] != bodyscan.__name__:
                reads.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(bodyscan, name, counted)
    prompt = b'[{"role": "user", "content": "hi \\"model\\""}]'
    body = b' {"messages": ' + prompt + b', "model" : "chat", "stream": true, "max_tokens": 9}'
    request = _request(body)
    request.scope["path"] = request.scope["raw_path"] = "/openai/v1/chat/completions"
    request.scope["raw_path"] = b"/openai/v1/chat/completions"
    request.scope["headers"].append((b"api-key", b"key-1"))

    async def run() -> int:
        try:
            return (await proxy.handle(request)).status_code
        finally:
            await proxy.close()

    assert asyncio.run(run()) == 200
    expected = body.replace(b' {"messages"', b' {"stream_options":{"include_usage":true},"messages"')
    assert sent == [expected.replace(b'"model" : "chat"', b'"model" : "gpt4o"')]
    assert sorted(reads) == ["marks", "top_level_spans"]


def test_a_body_too_deeply_nested_for_python_is_the_backends_400_never_a_502():
    seen: list[bytes] = []
    invalid = httpx.Response(400, json={"error": {"code": "invalid_request_error", "message": "too deep"}})
    proxy = _proxy_with_renaming_backend(invalid, seen)
    deep = b'{"model": "chat", "tools": [{"model": "chat"}], "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    async def run():
        try:
            return await proxy.handle(_request(deep))
        finally:
            await proxy.close()

    response = asyncio.run(run())
    # no id field in it: not parsed for ids (lb.objects.routes), so the backend's own answer
    assert response.status_code == 400 and seen == [deep.replace(b"chat", b"gpt4o", 1)[:64]]
    assert response.headers["x-lb-backend"] == "1" and not proxy.store.active(time.time())


def _names(backend) -> list[str | None]:
    return [c.deployment for c in backend.calls]


def test_both_api_shapes_reach_each_backend_by_its_own_name(make_pool):
    pool = make_pool(2, env={"BACKEND_1_DEPLOYMENTS": "chat=gpt4o-eastus,embedding", "BACKEND_2_DEPLOYMENT_NAME": "g4"})
    azure, v1 = pool.azure(), pool.v1()
    for _ in range(6):  # 24 calls at random: one backend getting none of them has P = 2 * 0.5**24 = 1.2e-7
        azure.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
        list(azure.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], stream=True))
        v1.responses.create(model="chat", input="hi")
        with v1.responses.stream(model="chat", input="hi") as stream:
            assert stream.get_final_response().status == "completed"
    one, two = pool.backends
    assert set(_names(one)) == {"gpt4o-eastus"} and set(_names(two)) == {"g4"}
    assert len(one.calls) + len(two.calls) == 24 and one.calls and two.calls

    # embedding is served by both: backend 1 by the same name, backend 2 by its one name
    def embedded_by_two() -> bool:
        return any(c.path.endswith("/embeddings") and c.deployment == "g4" for c in two.calls)

    for _ in range(40):  # until each has served one: a random pick misses one 40 times with P = 2 * 0.5**40
        azure.embeddings.create(model="embedding", input="x")
        if "embedding" in _names(one) and embedded_by_two():
            break
    assert "embedding" in _names(one) and embedded_by_two()
    status = pool.proxy.status_report()["backends"]
    assert status[0]["deployment_names"] == {"chat": "gpt4o-eastus"} and status[1]["deployment_names"] == {"*": "g4"}


def test_a_name_no_backend_maps_is_refused_like_an_unknown_deployment(make_pool):
    pool = make_pool(1, env={"BACKEND_1_DEPLOYMENTS": "chat=gpt4o-eastus"})
    with pytest.raises(openai.NotFoundError):
        pool.azure().chat.completions.create(model="gpt4o-eastus", messages=[{"role": "user", "content": "hi"}])
    assert pool.backends[0].calls == []


@pytest.mark.parametrize(
    "path",
    [
        "/openai/Deployments/chat/Chat/Completions",
        "/openai/DEPLOYMENTS/chat/chat/completions",
        "/openai/d%65ployments/chat/chat/completions",
        "/openai/deployments/ch%61t/chat/completions",
    ],
)
def test_a_deployment_path_in_another_case_or_encoding_is_renamed_and_routed_like_any(make_pool, path):
    """A router matching as ASP.NET Core does (any case, decoded: `lb.apipath`) reads each of these as
    a chat call to `chat`: so does the balancer, which calls backend 1 by its name for `chat` and never
    sends the call to backend 2, which does not serve `chat`."""
    pool = make_pool(2, env={"BACKEND_1_DEPLOYMENTS": "chat=gpt4o-eastus", "BACKEND_2_DEPLOYMENTS": "embedding"})
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=pool.url, headers={"api-key": CLIENT_KEY}, timeout=10) as http:
        for _ in range(8):  # a pick at random would miss backend 2 eight times with P = 0.5**8
            answer = http.post(f"{path}?api-version={API_VERSION}", json=chat)
            assert answer.status_code == 200 and answer.headers["x-lb-backend"] == "1", answer.text
    one, two = pool.backends
    assert two.calls == [] and [c.deployment for c in one.calls] == ["gpt4o-eastus"] * 8
    assert all(c.path.lower().endswith("/gpt4o-eastus/chat/completions") for c in one.calls)


# The AzureOpenAI client's Responses path, through `python -m lb serve` -----------------------------
def test_the_azure_responses_path_reaches_each_backend_by_its_own_name_and_never_a_non_serving_one(servers):
    """`AzureOpenAI.responses` posts to `/openai/responses?api-version=` with the deployment in the body."""

    renamed, same, other = SimBackend("renamed"), SimBackend("same"), SimBackend("other")
    env = {
        "LB_CLIENT_KEYS": "app:client-key",
        "LB_ADMIN_CLIENTS": "app",
        "LB_AFFINITY": "off",
        "BACKEND_1_URL": servers.start(renamed),
        "BACKEND_1_APIKEY": "k1",
        "BACKEND_1_DEPLOYMENTS": "chat=gpt4o-eastus",
        "BACKEND_2_URL": servers.start(same),
        "BACKEND_2_APIKEY": "k2",
        "BACKEND_2_DEPLOYMENTS": "chat",
        "BACKEND_3_URL": servers.start(other),
        "BACKEND_3_APIKEY": "k3",
        "BACKEND_3_DEPLOYMENTS": "embedding",
    }
    process, url = serve_lb(env)
    try:
        client = openai.AzureOpenAI(azure_endpoint=url, api_key="client-key", api_version=API_VERSION, max_retries=0)
        for _ in range(8):
            assert client.responses.create(model="chat", input="hi").status == "completed"
            with client.responses.stream(model="chat", input="hi") as stream:
                assert stream.get_final_response().status == "completed"
        with pytest.raises(openai.NotFoundError, match="No backend serves deployment 'gpt4o-eastus'"):
            client.responses.create(model="gpt4o-eastus", input="hi")  # the backend's own name is not a deployment
        renamed.throttle_next = 1
        # Until the throttled backend was tried (at random: missed 40 times with P = 0.5**40): its 429
        # cools `chat`, not every deployment.
        for _ in range(40):
            client.responses.create(model="chat", input="hi")
            if renamed.count(429):
                break
        status = httpx.get(f"{url}/lb/status", headers={"api-key": "client-key"}).json()
    finally:
        process.terminate()
        process.communicate(timeout=20)
    assert other.calls == []
    assert renamed.calls and {(c.path, c.deployment) for c in renamed.calls} == {("/openai/responses", "gpt4o-eastus")}
    assert same.calls and {(c.path, c.deployment) for c in same.calls} == {("/openai/responses", "chat")}
    assert all(json.loads(c.body)["input"] == "hi" for c in renamed.calls + same.calls)  # only `model` changed
    assert renamed.count(429) == 1
    cooling = {b["name"]: b["cooldowns"] for b in status["backends"]}
    assert [c["deployment"] for c in cooling["1"]] == ["chat"]

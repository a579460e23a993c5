"""Per-backend deployment names: each backend is called by its own name, on both API shapes, streaming too."""

from __future__ import annotations

import json

from lb.config import Backend
from lb.requestinfo import RequestInfo
from lb.routing.deployments import upstream_call

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


def test_the_v1_body_model_is_renamed_and_everything_else_kept():
    backend = Backend("a", "https://a", deployment_name="gpt-4o")
    original = {"model": "chat", "input": [{"role": "user", "content": "héllo"}], "stream": True}
    path, body = upstream_call(backend, RequestInfo("/openai/v1/responses", "chat", json.dumps(original).encode()))
    assert path == "/openai/v1/responses" and json.loads(body) == {**original, "model": "gpt-4o"}


def test_a_large_v1_body_gets_its_model_replaced_in_place():
    backend = Backend("a", "https://a", deployments={"chat": "gpt4o-eastus"})
    big = {"model": "chat", "input": "x" * 100_000, "tools": [{"model": "other"}]}
    body = json.dumps(big).encode()
    _, sent = upstream_call(backend, RequestInfo("/openai/v1/responses", "chat", body))
    assert json.loads(sent) == {**big, "model": "gpt4o-eastus"} and len(sent) == len(body) + len("gpt4o-eastus") - 4


def _names(backend) -> list[str | None]:
    return [c.deployment for c in backend.calls]


def test_both_api_shapes_reach_each_backend_by_its_own_name(make_pool):
    pool = make_pool(2, env={"BACKEND_1_DEPLOYMENTS": "chat=gpt4o-eastus,embedding", "BACKEND_2_DEPLOYMENT_NAME": "g4"})
    azure, v1 = pool.azure(), pool.v1()
    for _ in range(12):
        azure.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
        list(azure.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], stream=True))
        v1.responses.create(model="chat", input="hi")
        with v1.responses.stream(model="chat", input="hi") as stream:
            assert stream.get_final_response().status == "completed"
    one, two = pool.backends
    assert set(_names(one)) == {"gpt4o-eastus"} and set(_names(two)) == {"g4"}
    assert len(one.calls) + len(two.calls) == 48 and one.calls and two.calls
    # embedding is served by both: backend 1 by the same name, backend 2 by its one name
    for _ in range(8):
        azure.embeddings.create(model="embedding", input="x")
    assert "embedding" in _names(one) and _names(two).count("g4") > 0
    status = pool.proxy.status_report()["backends"]
    assert status[0]["deployment_names"] == {"chat": "gpt4o-eastus"} and status[1]["deployment_names"] == {"*": "g4"}


def test_a_name_no_backend_maps_is_refused_like_an_unknown_deployment(make_pool):
    import openai
    import pytest

    pool = make_pool(1, env={"BACKEND_1_DEPLOYMENTS": "chat=gpt4o-eastus"})
    with pytest.raises(openai.NotFoundError):
        pool.azure().chat.completions.create(model="gpt4o-eastus", messages=[{"role": "user", "content": "hi"}])
    assert pool.backends[0].calls == []

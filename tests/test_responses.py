"""The Responses API through the balancer, with the real openai SDK (`base_url=<balancer>/openai/v1`).

The deployment is the body's `model` (there is none in the path), so routing, failover and cooldowns
must read it from there; streamed answers must reach the SDK's `responses.stream` helper whole.
"""

from __future__ import annotations

import openai
import pytest

MESSAGES = [{"role": "user", "content": "Hello"}]


def test_responses_create_through_the_balancer(make_pool):
    pool = make_pool(2, chunks=3)
    raw = pool.v1().responses.with_raw_response.create(model="chat", input="Hello", instructions="Be brief.")
    response = raw.parse()
    assert response.status == "completed" and response.output_text.endswith("tok0 tok1 tok2")
    assert raw.headers["x-lb-attempts"] == "1"
    call = next(c for b in pool.backends for c in b.calls)
    assert call.path == "/openai/v1/responses" and call.deployment == "chat"
    assert call.headers["api-key"].startswith("key-")


def test_responses_stream_reaches_the_sdk_helper_whole(make_pool):
    pool = make_pool(2, chunks=5)
    with pool.v1().responses.stream(model="chat", input=MESSAGES, store=False) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == 5
    assert final.status == "completed" and final.usage is not None


def test_a_429_mid_pool_fails_over_and_cools_that_backend_for_the_responses_deployment(make_pool):
    """Backend 2 is preferred (priority 1) and throttled: the call lands on another, nothing reaches the client."""
    pool = make_pool(
        3,
        env={"BACKEND_2_PRIORITY": "1", "BACKEND_1_PRIORITY": "2", "BACKEND_3_PRIORITY": "2"},
        retry_after=30,
    )
    middle = pool.backends[1]
    middle.throttle_next = 2
    client = pool.v1()
    raw = client.responses.with_raw_response.create(model="chat", input="Hello")
    assert raw.parse().status == "completed"
    assert raw.headers["x-lb-attempts"] == "2" and raw.headers["x-lb-backend"] != "2"
    with client.responses.stream(model="chat", input=MESSAGES) as stream:  # cooling: not asked again
        assert stream.get_final_response().status == "completed"
    assert middle.count(429) == 1 and len(middle.calls) == 1


def test_a_streamed_response_fails_over_before_its_first_byte(make_pool):
    pool = make_pool(2, env={"BACKEND_1_PRIORITY": "1", "BACKEND_2_PRIORITY": "2"}, chunks=3)
    pool.backends[0].throttle_next = 1
    with pool.v1().responses.stream(model="chat", input=MESSAGES) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
    assert deltas[0].startswith("sim2")  # the whole stream came from backend 2
    assert pool.backends[0].count(429) == 1


def test_the_deployment_is_taken_from_the_body_model(make_pool):
    pool = make_pool(2, env={"BACKEND_1_DEPLOYMENTS": "chat", "BACKEND_2_DEPLOYMENTS": "reasoner"}, chunks=2)
    client = pool.v1()
    for _ in range(4):
        raw = client.responses.with_raw_response.create(model="reasoner", input="Hello")
        assert raw.headers["x-lb-backend"] == "2"
    assert {c.deployment for c in pool.backends[1].calls} == {"reasoner"} and not pool.backends[0].calls


def test_every_call_succeeds_while_one_backend_throttles(make_pool):
    """One backend has a quota of 2 calls per window; streamed and non-streamed calls all get through."""
    pool = make_pool(3, chunks=2)
    pool.backends[0].requests_per_window, pool.backends[0].window_seconds = 2, 60.0
    client = pool.v1()
    ok = 0
    for i in range(30):
        if i % 2:
            with client.responses.stream(model="chat", input=MESSAGES) as stream:
                ok += stream.get_final_response().status == "completed"
        else:
            ok += client.responses.create(model="chat", input="Hello").status == "completed"
    assert ok == 30
    assert pool.backends[0].count(429) >= 1  # it did throttle, and the client never saw it


def test_a_model_no_backend_serves_is_a_404_naming_it_without_a_backend_call(make_pool):
    pool = make_pool(1, env={"BACKEND_1_DEPLOYMENTS": "chat"})
    with pytest.raises(openai.NotFoundError) as caught:
        pool.v1().responses.create(model="nope", input="Hello")
    assert "'nope'" in caught.value.response.json()["error"]["message"]
    assert not pool.backends[0].calls

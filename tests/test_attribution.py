"""Whose fault a failure is: one request's outcome never takes a backend out for everyone else."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from lb.app import create_app
from lb.auth import BackendAuth
from lb.config import load_settings
from lb.proxy import Proxy
from lb.routing.breaker import Breaker
from lb.sim import SimBackend, read_body
from tests.conftest import CLIENT_KEY
from tests.test_auth import FakeCredential
from tests.test_faults import MESSAGES, post


def test_the_breaker_opens_on_the_third_failure_in_its_window_and_a_success_clears_it():
    breaker = Breaker(threshold=3, window=10)
    assert breaker.failure("a", "chat", 0) is None
    assert breaker.failure("a", "chat", 1) is None
    breaker.success("a", "chat")
    assert breaker.failure("a", "chat", 2) is None
    assert breaker.failure("a", "chat", 3) is None
    assert breaker.failure("b", "chat", 3) is None  # per backend ...
    assert breaker.failure("a", "other", 3) is None  # ... and per deployment
    assert breaker.failure("a", "chat", 4) == 3
    assert breaker.pending("a", "chat", 4) == 0  # open: counting starts over
    assert breaker.failure("a", "chat", 5) is None
    assert breaker.failure("a", "chat", 20) is None  # the first one has left the window
    assert breaker.pending("a", "chat", 20) == 1


def request_provoked(trigger: bytes, *, status: int = 500, delay: float = 0.0):
    """A backend that is fine except with requests whose body contains `trigger` (a prompt that
    crashes or slows every model): those get `status` (after `delay`, unless the caller hangs up
    first: then nothing is left for the servers' shutdown to wait out)."""

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        if trigger in body:
            gone = asyncio.ensure_future(receive())  # the next message can only be http.disconnect
            await asyncio.wait([gone], timeout=delay)
            if gone.done():
                return
            gone.cancel()
            answer, code = {"error": {"code": "InternalServerError", "message": "The server had an error."}}, status
        else:
            answer, code = {"choices": [{"message": {"role": "assistant", "content": "ok"}}]}, 200
        data = json.dumps(answer).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    return app


def three_of(servers, app, env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(env or {})
    for name in ("1", "2", "3"):
        env |= {f"BACKEND_{name}_URL": servers.start(app), f"BACKEND_{name}_APIKEY": "k"}
    return env


def test_a_request_that_every_backend_answers_with_500_cools_none_of_them(make_pool, servers):
    pool = make_pool(0, env=three_of(servers, request_provoked(b"poison")))
    poison = {"messages": [{"role": "user", "content": "poison"}]}
    for _ in range(5):  # one client, in a loop
        response = post(pool.url, json=poison)
        assert response.status_code == 500 and response.headers["x-lb-attempts"] == "3"
    assert pool.proxy.store.active() == []
    for _ in range(10):  # everyone else is untouched
        response = post(pool.url)
        assert response.status_code == 200 and response.headers["x-lb-attempts"] == "1"


def test_a_streamed_request_slow_everywhere_fails_over_then_times_out_and_cools_nothing(make_pool, servers):
    env = {"HTTP_TIMEOUT_SECONDS": "1", "LB_ATTEMPT_TIMEOUT_SECONDS": "0.2"}
    pool = make_pool(0, env=three_of(servers, request_provoked(b"slow", status=200, delay=5), env))
    slow = {"messages": [{"role": "user", "content": "slow"}], "stream": True}

    def timed(_: int) -> tuple[httpx.Response, float]:
        started = time.perf_counter()
        return post(pool.url, json=slow), time.perf_counter() - started

    with ThreadPoolExecutor(3) as clients:  # three distinct requests, each failing everywhere, at once
        for response, seconds in clients.map(timed, range(3)):
            assert response.status_code == 504 and seconds < 1.5
    assert pool.proxy.store.active() == []
    for _ in range(10):
        assert post(pool.url).status_code == 200


def test_a_backend_failing_requests_that_succeed_elsewhere_is_cooled_on_the_third(make_pool):
    pool = make_pool(2, env={"BACKEND_2_PRIORITY": "2"})  # 1 is always tried first
    pool.backends[0].fail_status = 500
    for expected_cooling in (False, False, True):
        response = post(pool.url)
        assert response.status_code == 200 and response.headers["x-lb-backend"] == "2"
        assert (pool.proxy.store.cooling_until("1", "chat", time.time()) > 0) is expected_cooling
    assert "circuit open" in pool.proxy.store.active()[0].reason
    assert post(pool.url).headers["x-lb-attempts"] == "1"


def test_a_503_with_retry_after_cools_at_once_one_without_does_not(make_pool, servers):
    async def busy(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        hint = [(b"retry-after", b"7")] if "hinted" in scope["path"] else []
        await send({"type": "http.response.start", "status": 503, "headers": hint})
        await send({"type": "http.response.body", "body": b"{}"})

    pool = make_pool(1, env={"BACKEND_1_PRIORITY": "2", "BACKEND_9_URL": servers.start(busy), "BACKEND_9_APIKEY": "k"})
    assert post(pool.url, "plain").headers["x-lb-attempts"] == "2"
    assert pool.proxy.store.cooling_until("9", "plain", time.time()) == 0
    assert post(pool.url, "hinted").headers["x-lb-attempts"] == "2"
    assert 6 < pool.proxy.store.cooling_until("9", "hinted", time.time()) - time.time() <= 7


def test_a_backend_with_a_wrong_key_fails_over_is_cooled_long_said_once_and_named_in_status(make_pool, caplog):
    pool = make_pool(3, env={"BACKEND_2_APIKEY": "rotated-away"})
    client = pool.azure()
    with caplog.at_level(logging.WARNING, logger="lb"):
        for _ in range(30):
            completion = client.chat.completions.create(model="chat", messages=MESSAGES)
            assert completion.choices[0].message.content
        for _ in range(10):
            client.embeddings.create(model="embed", input="hi")  # another deployment: one more 401 at most
    assert len(pool.backends[1].calls) <= 2  # out of rotation after its first refusal per deployment
    assert sum("refuses the load balancer's credential" in r.getMessage() for r in caplog.records) == 1
    assert "rotated-away" not in caplog.text
    status = httpx.get(f"{pool.url}/lb/status", headers={"api-key": CLIENT_KEY}).json()
    by_name = {b["name"]: b for b in status["backends"]}
    assert by_name["2"]["auth_failure"]["status"] == 401
    assert "invalid subscription key" in by_name["2"]["auth_failure"]["cause"]
    assert by_name["1"]["auth_failure"] is None
    assert by_name["2"]["cooldowns"][0]["seconds_left"] > 250  # LB_AUTH_COOLDOWN_SECONDS, 300 by default


def test_when_every_backend_refuses_our_key_the_client_hears_it_is_not_its_key(make_pool):
    pool = make_pool(2, env={"BACKEND_1_APIKEY": "wrong-1", "BACKEND_2_APIKEY": "wrong-2"})
    for calls in (2, 2):  # the second call is answered without asking the backends again
        with pytest.raises(openai.APIStatusError) as exc:
            pool.azure().chat.completions.create(model="chat", messages=MESSAGES)
        assert exc.value.status_code == 502
        error = exc.value.response.json()["error"]
        assert error["code"] == "BackendAuthenticationFailed" and "Your key was accepted" in error["message"]
        assert sum(len(b.calls) for b in pool.backends) == calls


FINE_TUNING_DENIED = {
    "error": {
        "code": "PermissionDenied",
        "message": "The principal `0000` lacks the required data action `Microsoft.CognitiveServices/accounts/"
        "OpenAI/fine-tunes/write` to perform `POST /openai/v1/fine_tuning/jobs` operation.",
    }
}


def denying_fine_tuning(sim: SimBackend):
    """Azure with only the "Cognitive Services OpenAI User" role: chat is allowed, fine-tuning is not."""

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http" or "fine_tuning" not in scope["path"]:
            return await sim(scope, receive, send)
        while (await receive()).get("more_body"):
            pass
        body = json.dumps(FINE_TUNING_DENIED).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    return app


def test_a_permission_denied_on_fine_tuning_is_the_callers_answer_and_shuts_nothing(make_pool, servers):
    pool = make_pool(1, env={"BACKEND_1_URL": servers.start(denying_fine_tuning(SimBackend("rbac", api_key="key-1")))})
    with pytest.raises(openai.AuthenticationError) as exc:
        pool.v1().fine_tuning.jobs.create(model="chat", training_file="file-abc")  # "chat": the deployment
    assert exc.value.response.json() == FINE_TUNING_DENIED
    assert exc.value.response.headers["x-lb-attempts"] == "1"
    assert pool.proxy.store.active() == []  # nothing cooled
    assert pool.azure().chat.completions.create(model="chat", messages=MESSAGES).choices
    status = httpx.get(f"{pool.url}/lb/status", headers={"api-key": CLIENT_KEY}).json()
    assert status["backends"][0]["auth_failure"] is None


def test_a_permission_denied_on_chat_is_our_identity_lacking_the_role_and_fails_over(make_pool, servers):
    async def no_role(scope, receive, send) -> None:
        while (await receive()).get("more_body"):
            pass
        body = json.dumps(
            {"error": {"code": "PermissionDenied", "message": "Principal does not have access to API/Operation."}}
        )
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body.encode()})

    pool = make_pool(
        1, env={"BACKEND_1_PRIORITY": "2", "BACKEND_9_URL": servers.start(no_role), "BACKEND_9_APIKEY": "k"}
    )
    answer = post(pool.url)
    assert answer.status_code == 200 and answer.headers["x-lb-attempts"] == "2"
    assert pool.proxy.store.active()[0].reason.startswith("auth 401: PermissionDenied")


def test_the_all_refused_502_says_how_many_attempts_it_took(make_pool):
    pool = make_pool(2, env={"BACKEND_1_APIKEY": "wrong-1", "BACKEND_2_APIKEY": "wrong-2"})
    answer = post(pool.url)
    assert answer.status_code == 502 and answer.headers["x-lb-attempts"] == "2"


def keyless(servers, credential: FakeCredential, **env: str) -> tuple[str, Proxy, SimBackend]:
    """A proxy whose one backend is keyless, its Entra ID token fetched by `credential`: given when
    the Proxy is built, as its attempts keep the BackendAuth they were built with."""
    backend = SimBackend("sim1")
    env = {"LB_CLIENT_KEYS": CLIENT_KEY, "BACKEND_1_URL": servers.start(backend), "BACKEND_1_APIKEY": "", **env}
    proxy = Proxy(load_settings(env), backend_auth=BackendAuth(credential))
    return servers.start(create_app(proxy=proxy)), proxy, backend


def test_a_failing_token_fetch_is_the_balancers_own_503_and_cools_no_backend(servers, caplog):
    credential = FakeCredential(fail=True)
    url, proxy, backend = keyless(servers, credential)
    with caplog.at_level(logging.ERROR, logger="lb"):
        for _ in range(3):
            answer = post(url)
            assert answer.status_code == 503 and answer.headers["x-lb-attempts"] == "1"
            assert answer.json()["error"]["code"] == "BackendCredentialUnavailable"
    assert proxy.store.active() == [] and backend.calls == []
    assert sum("could not be fetched" in r.getMessage() for r in caplog.records) == 1
    assert credential.fetches == 1  # then kept for RETRY_SECONDS: the next two failed at once


def test_a_slow_first_token_fetch_ends_at_the_request_deadline(servers):
    credential = FakeCredential(delay=5)
    url, proxy, _ = keyless(servers, credential, HTTP_TIMEOUT_SECONDS="0.5")
    started = time.monotonic()
    answer = post(url)
    assert time.monotonic() - started < 0.5 + 2
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "BackendCredentialUnavailable"
    assert proxy.store.active() == [] and credential.fetches == 1

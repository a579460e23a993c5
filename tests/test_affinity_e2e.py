"""Prompt-cache affinity through the proxy, with the real openai SDK over sockets."""

from __future__ import annotations

import itertools
import re
from collections import Counter

import httpx
import pytest

from tests.conftest import API_VERSION, CLIENT_KEY
from tests.test_cli import run_lb, serve_lb

ON = {"LB_AFFINITY": "on"}
SYSTEM = "You are the support assistant of Contoso. Answer from the manual below.\n" + "Manual text. " * 500


def converse(client, question: str, turns: int) -> list[tuple[str, int, int, str]]:
    """(backend, prompt tokens, cached tokens, attempts) of each turn of one conversation."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    seen = []
    for turn in range(turns):
        raw = client.chat.completions.with_raw_response.create(model="chat", messages=messages)
        completion = raw.parse()
        usage = completion.usage
        seen.append(
            (
                raw.headers["x-lb-backend"],
                usage.prompt_tokens,
                usage.prompt_tokens_details.cached_tokens,
                raw.headers["x-lb-attempts"],
            )
        )
        messages += [
            {"role": "assistant", "content": completion.choices[0].message.content + " Details. " * 60},
            {"role": "user", "content": f"Follow-up {turn} on {question}"},
        ]
    return seen


def test_a_conversation_stays_on_one_backend_and_its_cached_tokens_rise(make_pool):
    pool = make_pool(3, env=ON)
    turns = converse(pool.azure(), "How do I reset the router?", 5)
    assert len({backend for backend, *_ in turns}) == 1
    cached = [c for _, _, c, _ in turns]
    assert cached[0] == 0 and all(b > a for a, b in itertools.pairwise(cached))
    assert all(c <= p for _, p, c, _ in turns)


def test_conversations_spread_over_the_backends(make_pool):
    pool = make_pool(3, env=ON)
    client = pool.azure()
    homes = Counter(converse(client, f"Question number {i}", 1)[0][0] for i in range(30))
    assert set(homes) == {"1", "2", "3"}


def test_a_throttled_home_fails_over_at_once_and_the_conversation_settles_on_the_next(make_pool):
    pool = make_pool(3, env=ON)
    client = pool.azure()
    home = converse(client, "Where is my order?", 1)[0][0]
    pool.backends[int(home) - 1].throttle_next = 1
    pool.backends[int(home) - 1].retry_after = 30
    turns = converse(client, "Where is my order?", 4)
    assert turns[0][0] != home and turns[0][3] == "2"  # the 429 moved it at once
    assert len({backend for backend, *_ in turns}) == 1  # and it stays on the next while home cools
    assert turns[-1][2] > 0  # where it is cached now


def test_responses_api_conversations_keep_their_backend(make_pool):
    pool = make_pool(3, env=ON)
    client = pool.v1()
    items: list[dict] = [{"role": "user", "content": "Plan a trip to Lisbon"}]
    backends, cached = set(), []
    for turn in range(3):
        raw = client.responses.with_raw_response.create(model="chat", instructions=SYSTEM, input=items)
        response = raw.parse()
        backends.add(raw.headers["x-lb-backend"])
        cached.append(response.usage.input_tokens_details.cached_tokens)
        items += [
            {"role": "assistant", "content": response.output_text},
            {"role": "user", "content": f"and day {turn + 2}?"},
        ]
    assert len(backends) == 1 and cached[0] == 0 and cached[-1] > 0


def test_prompt_cache_key_keeps_different_prompts_together(make_pool):
    pool = make_pool(3, env=ON)
    client = pool.azure()
    served = {
        client.chat.completions.with_raw_response.create(
            model="chat",
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"task {i}"}],
            prompt_cache_key="batch-7",
        ).headers["x-lb-backend"]
        for i in range(12)
    }
    assert len(served) == 1


def test_identical_short_calls_spread_like_random(make_pool):
    """Under Azure's 1,024-token minimum nothing is cached, so affinity keeps nothing together."""
    pool = make_pool(3, env=ON)
    client = pool.azure()
    served = Counter(
        client.chat.completions.with_raw_response.create(
            model="chat", messages=[{"role": "user", "content": "Hello"}], max_tokens=16
        ).headers["x-lb-backend"]
        for _ in range(60)
    )
    assert set(served) == {"1", "2", "3"} and min(served.values()) >= 8, served


def test_a_body_that_is_not_json_is_routed_as_before_by_weight(make_pool):
    pool = make_pool(3, env=ON)
    url = f"{pool.url}/openai/deployments/chat/chat/completions?api-version={API_VERSION}"
    headers = {"api-key": CLIENT_KEY, "content-type": "text/plain"}
    with httpx.Client() as http:
        served = Counter(
            http.post(url, content=b"not json", headers=headers).headers["x-lb-backend"] for _ in range(30)
        )
    assert set(served) == {"1", "2", "3"}


def test_affinity_off_spreads_one_conversation(make_pool):
    pool = make_pool(3, env={"LB_AFFINITY": "off"})
    turns = converse(pool.azure(), "How do I reset the router?", 12)
    assert len({backend for backend, *_ in turns}) > 1
    assert pool.proxy.status_report()["affinity"] == "off"


@pytest.mark.e2e  # `lb serve` processes
@pytest.mark.parametrize("value", ["yes", "sticky"])
def test_a_bad_lb_affinity_stops_start_up_with_one_line_naming_it(value):
    process = run_lb({"BACKEND_1_URL": "https://a.openai.azure.com", "LB_AFFINITY": value}, "serve")
    out, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert err.strip() == f"error: LB_AFFINITY: '{value}' is not one of on, off"
    assert "Traceback" not in out + err


def test_the_demo_conversation_shows_cached_tokens_rising(servers, capsys):
    from lb.demo import cached_conversation
    from lb.sim import SimBackend

    env = {"LB_CLIENT_KEYS": "demo-client-key"}
    for i in (1, 2, 3):
        env[f"BACKEND_{i}_URL"] = servers.start(SimBackend(f"d{i}", api_key=f"key-{i}"))
        env[f"BACKEND_{i}_APIKEY"] = f"key-{i}"
    assert cached_conversation(servers, env)
    out = capsys.readouterr().out
    cached = [int(n) for n in re.findall(r"tokens, (\d+) cached", out)]
    assert cached[0] == 0 and cached == sorted(cached) and cached[-1] > 0
    assert len(set(re.findall(r"-> backend-(\d)", out))) == 1
    assert "cached share of prompt tokens:" in out


def test_lb_serve_keeps_a_conversation_on_one_backend_by_default(servers):
    """As a user starts it: a `python -m lb serve` process, no LB_AFFINITY set, the real SDK."""
    import openai

    from lb.sim import SimBackend

    env = {"LB_CLIENT_KEYS": CLIENT_KEY, "LB_ADMIN_CLIENTS": "key1"}
    for i in (1, 2, 3):
        env[f"BACKEND_{i}_URL"] = servers.start(SimBackend(f"s{i}", api_key=f"key-{i}"))
        env[f"BACKEND_{i}_APIKEY"] = f"key-{i}"
    process, url = serve_lb(env)
    try:
        client = openai.AzureOpenAI(azure_endpoint=url, api_key=CLIENT_KEY, api_version=API_VERSION, max_retries=0)
        turns = converse(client, "Why is my bill higher this month?", 4)
        status = httpx.get(url + "/lb/status", headers={"api-key": CLIENT_KEY}).json()
    finally:
        process.terminate()
        process.communicate(timeout=20)
    assert status["affinity"] == "on"
    assert len({backend for backend, *_ in turns}) == 1 and turns[-1][2] > 0

"""The simulated backends' prompt cache follows Azure OpenAI's rules (lb.sim.cache)."""

from __future__ import annotations

import openai

from lb.sim import Servers, SimBackend
from lb.sim.cache import PromptCache, prompt_text, tokens

T0 = 100.0


def text(n_tokens: int, seed: str = "a") -> str:
    return (seed * 4 * n_tokens)[: 4 * n_tokens]


def test_prompts_under_1024_tokens_are_never_cached():
    cache = PromptCache()
    assert cache.serve("chat", text(1023), T0) == 0
    assert cache.serve("chat", text(1023), T0 + 1) == 0


def test_a_repeated_prefix_is_cached_from_1024_tokens_in_128_token_steps():
    cache = PromptCache()
    assert cache.serve("chat", text(1300), T0) == 0
    assert cache.serve("chat", text(1300), T0 + 1) == 1280  # 1024 + 2 x 128
    assert cache.serve("chat", text(1300) + text(500, "b"), T0 + 2) == 1280  # the longer turn: its known head
    assert cache.serve("chat", text(1300) + text(500, "b"), T0 + 3) == 1792


def test_a_prompt_differing_in_its_first_1024_tokens_misses():
    cache = PromptCache()
    cache.serve("chat", text(2000), T0)
    assert cache.serve("chat", "x" + text(2000)[1:], T0 + 1) == 0
    assert cache.serve("chat", text(1100) + text(900, "z"), T0 + 1) == 1024


def test_the_cache_is_per_deployment_and_per_backend():
    one, other = PromptCache(), PromptCache()
    one.serve("chat", text(1500), T0)
    assert one.serve("other", text(1500), T0 + 1) == 0
    assert other.serve("chat", text(1500), T0 + 1) == 0


def test_prefixes_are_forgotten_after_5_to_10_idle_minutes_and_kept_while_used():
    cache = PromptCache()
    cache.serve("chat", text(1100), T0)
    assert cache.serve("chat", text(1100), T0 + 299) == 1024  # used again: idle time starts over
    assert cache.serve("chat", text(1100), T0 + 299 + 290) == 1024
    assert cache.serve("chat", text(1100), T0 + 589 + 601) == 0


def test_prompt_text_reads_chat_messages_and_responses_input_parts():
    assert prompt_text({"messages": [{"role": "system", "content": "ab"}, {"role": "user", "content": "cd"}]}) == "abcd"
    parts = {"instructions": "i", "input": [{"role": "user", "content": [{"type": "input_text", "text": "t"}]}]}
    assert prompt_text(parts) == "it"
    assert prompt_text({"input": "plain"}) == "plain" and prompt_text(None) == ""
    assert tokens("") == 1 and tokens("abcde") == 2


def test_the_sdk_sees_prompt_tokens_and_cached_tokens_of_a_chat_and_a_response(servers: Servers) -> None:
    sim = SimBackend("simC", api_key="k")
    url = servers.start(sim)
    client = openai.OpenAI(base_url=url + "/openai/v1", api_key="unused", default_headers={"api-key": "k"})
    messages = [{"role": "system", "content": "s" * 6000}, {"role": "user", "content": "hello"}]
    first = client.chat.completions.create(model="chat", messages=messages)  # type: ignore[arg-type]
    again = client.chat.completions.create(model="chat", messages=messages)  # type: ignore[arg-type]
    assert first.usage is not None and again.usage is not None
    assert first.usage.prompt_tokens == again.usage.prompt_tokens == 1502  # 6005 characters / 4
    assert first.usage.prompt_tokens_details is not None and first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details is not None and again.usage.prompt_tokens_details.cached_tokens == 1408
    response = client.responses.create(model="chat", instructions="s" * 6000, input="hello")
    assert response.usage is not None and response.usage.input_tokens_details.cached_tokens == 1408
    assert (sim.prompt_tokens, sim.cached_tokens) == (3 * 1502, 2 * 1408)

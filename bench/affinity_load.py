"""The affinity benchmark's traffic: seeded multi-turn RAG conversations, each turn sent when the last one answered.

Every conversation opens with one long system prompt shared by all of them, then a first user
message carrying its own retrieved sources; each later turn resends the whole history plus the
assistant's answer and a follow-up question with the sources retrieved for it. The answers
appended are synthetic and seeded (not what the backend said), so both routings send
byte-identical prompts and only the pick differs.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from lb.sim.cache import PromptCache, prompt_text, tokens

API_VERSION = "2024-10-21"
PATH = f"/openai/deployments/chat/chat/completions?api-version={API_VERSION}"
SYSTEM_TOKENS = 1100  # the system prompt every conversation shares: cacheable on its own (>= 1,024)
CONTEXT_TOKENS = (1000, 2000)  # the sources retrieved for a conversation's first question
ANSWER_TOKENS = (150, 400)  # each synthetic assistant answer
TURN_CONTEXT_TOKENS = (500, 1000)  # fresh sources retrieved for each follow-up question
FOLLOW_UP_TOKENS = (15, 60)
_WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su", "ra", "ti", "vo") for b in ("ren", "dax", "pul", "som")]


@dataclass
class Conversation:
    start: float  # seconds after the run begins
    think: list[float]  # seconds between an answer and the next turn
    messages: list[dict[str, str]]  # the system prompt and first user message
    later: list[tuple[str, str]]  # (assistant answer, user follow-up) of every later turn

    @property
    def turns(self) -> int:
        return 1 + len(self.later)

    def body(self, turn: int) -> dict[str, Any]:
        messages = list(self.messages)
        for answer, follow_up in self.later[:turn]:
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": follow_up}]
        return {"messages": messages, "max_tokens": 200}


@dataclass
class Turn:
    conversation: int
    turn: int
    sent: float  # seconds after the run began
    status: int = 0  # 0: no HTTP answer
    seconds: float = 0.0
    backend: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    text: str = field(default="", repr=False)  # the prompt, for the bound


def _text(rng: random.Random, n_tokens: int) -> str:
    words: list[str] = []
    size = 0
    while size < 4 * n_tokens:
        word = rng.choice(_WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[: 4 * n_tokens]


def conversations(n: int, spread: float, think: tuple[float, float], seed: int) -> list[Conversation]:
    """`n` conversations of 3 to 10 turns, starting evenly at random over `spread` seconds."""
    rng = random.Random(seed)
    system = "You answer questions from the retrieved sources only. " + _text(rng, SYSTEM_TOKENS)
    out = []
    for i in range(n):
        turns = rng.randint(3, 10)
        context = _text(rng, rng.randint(*CONTEXT_TOKENS))
        first = f"Sources:\n{context}\n\nQuestion {i}: what do the sources say?"
        later = [
            (
                _text(rng, rng.randint(*ANSWER_TOKENS)),
                _text(rng, rng.randint(*TURN_CONTEXT_TOKENS)) + _text(rng, rng.randint(*FOLLOW_UP_TOKENS)) + "?",
            )
            for _ in range(turns - 1)
        ]
        out.append(
            Conversation(
                start=rng.uniform(0, spread),
                think=[rng.uniform(*think) for _ in range(turns)],
                messages=[{"role": "system", "content": system}, {"role": "user", "content": first}],
                later=later,
            )
        )
    return out


async def converse(urls: Sequence[str], convs: Sequence[Conversation], key: str, seed: int) -> list[Turn]:
    """Run every conversation against `urls` (each call to a random instance, as a host's front end would)."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    turns: list[Turn] = []
    async with httpx.AsyncClient(timeout=60, limits=limits, headers={"api-key": key}) as client:
        began = time.monotonic()

        async def one(index: int, conv: Conversation) -> None:
            await asyncio.sleep(conv.start)
            for turn in range(conv.turns):
                body = conv.body(turn)
                record = Turn(index, turn, time.monotonic() - began, text=prompt_text(body))
                turns.append(record)
                started = time.perf_counter()
                try:
                    response = await client.post(rng.choice(urls) + PATH, content=json.dumps(body).encode())
                except httpx.HTTPError:
                    record.seconds = time.perf_counter() - started
                else:
                    record.seconds = time.perf_counter() - started
                    record.status = response.status_code
                    record.backend = response.headers.get("x-lb-backend", "")
                    if response.status_code == 200:
                        usage = response.json()["usage"]
                        record.prompt_tokens = usage["prompt_tokens"]
                        record.cached_tokens = usage["prompt_tokens_details"]["cached_tokens"]
                await asyncio.sleep(conv.think[turn])

        await asyncio.gather(*(one(i, c) for i, c in enumerate(convs)))
    return turns


def most_cached(turns: Sequence[Turn]) -> float:
    """Cached share of prompt tokens had every call met every earlier prompt's prefix: one backend holding all."""
    cache = PromptCache()
    cached = prompt = 0
    for t in sorted(turns, key=lambda t: t.sent):
        cached += cache.serve("chat", t.text, t.sent)
        prompt += tokens(t.text)
    return cached / max(prompt, 1)


async def throttle_periodically(sim: Any, period: float, on: float) -> None:
    """`sim` answers every call 429 (Retry-After: the rest of the spell) for `on` seconds of every `period`."""
    while True:
        await asyncio.sleep(period - on)
        sim.retry_after = on
        sim.throttle_next = 10**9
        await asyncio.sleep(on)
        sim.throttle_next = 0

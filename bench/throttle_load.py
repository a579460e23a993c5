"""The throttling simulation's offered load: a seeded mix of chat calls sent open loop, every answer recorded.

Each call has its own prompt length and `max_tokens`, so what it costs against a tokens-per-window
quota varies the way real traffic does, and the same seed gives both policies the very same
sequence. Open loop: call i leaves at i / rate whatever earlier calls did, as independent users
would, so a slow or throttled pool is not let off by a client that waits.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from bench.procs import percentile_ms

API_VERSION = "2024-10-21"
PATH = f"/openai/deployments/chat/chat/completions?api-version={API_VERSION}"
PROMPT_CHARS = (400, 2400)  # 100-600 prompt tokens at 4 characters a token
MAX_TOKENS = (100, 700)
STREAM_SHARE = 0.25  # a quarter of the calls stream their answer
MEAN_TOKENS = sum(PROMPT_CHARS) / 2 / 4 + sum(MAX_TOKENS) / 2  # what the backend charges per call, on average
TOLERANCE_SECONDS = 0.05  # scheduling noise allowed when checking Retry-After against the backends' clocks


@dataclass(frozen=True)
class Call:
    at: float  # seconds after the start
    body: dict[str, Any]
    tokens: int  # what a backend charges for it at admission


@dataclass
class Answer:
    status: int  # 0: no HTTP answer (connect error, timeout)
    seconds: float
    retry_after: int | None = None  # whole seconds, client 429s only
    recovery: float | None = None  # seconds until the soonest throttled backend's quota refilled, at the 429
    recovery_for_call: float | None = None  # seconds until some backend would have admitted this very call


def workload(rate: float, seconds: float, seed: int, poisson: bool = False) -> list[Call]:
    """`rate` calls a second for `seconds`: evenly spaced, or as independent users would send them (Poisson)."""
    rng = random.Random(seed)
    gaps = random.Random(seed + 1)
    calls = []
    at = 0.0
    for i in range(int(rate * seconds)):
        chars, max_tokens = rng.randint(*PROMPT_CHARS), rng.randint(*MAX_TOKENS)
        body: dict[str, Any] = {"messages": [{"role": "user", "content": "x" * chars}], "max_tokens": max_tokens}
        if rng.random() < STREAM_SHARE:
            body["stream"] = True
        calls.append(Call(at if poisson else i / rate, body, math.ceil(chars / 4) + max_tokens))
        at += gaps.expovariate(rate)
    return calls


async def offer(
    urls: Sequence[str], calls: Sequence[Call], key: str, recovery: Callable[[int | None], float]
) -> list[Answer]:
    """Send `calls` round-robin over `urls`.

    `recovery(None)`: seconds until the soonest backend recovers; `recovery(tokens)`: until one would
    admit a call charged `tokens`.
    """
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(timeout=30, limits=limits, headers={"api-key": key}) as client:

        async def one(url: str, call: Call) -> Answer:
            started = time.perf_counter()
            try:
                response = await client.post(url + PATH, json=call.body)
            except httpx.HTTPError:
                return Answer(0, time.perf_counter() - started)
            answer = Answer(response.status_code, time.perf_counter() - started)
            if response.status_code == 429:
                answer.recovery = recovery(None)
                answer.recovery_for_call = recovery(call.tokens)
                raw = response.headers.get("retry-after", "")
                answer.retry_after = int(raw) if raw.isdigit() else None
            return answer

        start = time.monotonic()
        tasks = []
        for i, call in enumerate(calls):
            delay = start + call.at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(urls[i % len(urls)], call)))
        return list(await asyncio.gather(*tasks))


def summarize(answers: Sequence[Answer]) -> dict[str, Any]:
    """Client-side figures of one run."""
    ok = [a for a in answers if a.status == 200]
    throttled = [a for a in answers if a.status == 429]
    late = [a for a in throttled if _late(a.retry_after, a.recovery)]
    late_for_call = [a for a in throttled if _late(a.retry_after, a.recovery_for_call)]
    return {
        "sent": len(answers),
        "ok": len(ok),
        "client_429": len(throttled),
        "client_other_failures": len(answers) - len(ok) - len(throttled),
        "retry_after_late": len(late),
        "retry_after_late_for_call": len(late_for_call),
        "p50_ms": percentile_ms([a.seconds for a in answers], 50),
        "p99_ms": percentile_ms([a.seconds for a in answers], 99),
        "p99_ok_ms": percentile_ms([a.seconds for a in ok], 99),
    }


def _late(retry_after: int | None, recovery: float | None) -> bool:
    """Whether a Retry-After (whole seconds) told the client to wait past `recovery` (rounded up likewise)."""
    return retry_after is None or recovery is None or retry_after > math.ceil(recovery + TOLERANCE_SECONDS)

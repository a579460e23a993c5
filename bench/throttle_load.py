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
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

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


@dataclass
class Answer:
    status: int  # 0: no HTTP answer (connect error, timeout)
    seconds: float
    retry_after: int | None = None  # whole seconds, client 429s only
    recovery: float | None = None  # seconds until the soonest backend took calls again, when the 429 arrived


def workload(rate: float, seconds: float, seed: int) -> list[Call]:
    rng = random.Random(seed)
    calls = []
    for i in range(int(rate * seconds)):
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": "x" * rng.randint(*PROMPT_CHARS)}],
            "max_tokens": rng.randint(*MAX_TOKENS),
        }
        if rng.random() < STREAM_SHARE:
            body["stream"] = True
        calls.append(Call(i / rate, body))
    return calls


async def offer(urls: Sequence[str], calls: Sequence[Call], key: str, recovery: Callable[[], float]) -> list[Answer]:
    """Send `calls` round-robin over `urls`; `recovery()` says when the soonest backend takes calls again."""
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
                answer.recovery = recovery()
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
    late = [
        a
        for a in throttled
        if a.retry_after is None or a.recovery is None or a.retry_after > math.ceil(a.recovery + TOLERANCE_SECONDS)
    ]
    return {
        "sent": len(answers),
        "ok": len(ok),
        "client_429": len(throttled),
        "client_other_failures": len(answers) - len(ok) - len(throttled),
        "retry_after_late": len(late),
        "p50_ms": _percentile([a.seconds for a in answers], 50),
        "p99_ms": _percentile([a.seconds for a in answers], 99),
        "p99_ok_ms": _percentile([a.seconds for a in ok], 99),
    }


def _percentile(samples: list[float], p: int) -> float | None:
    if len(samples) < 2:
        return round(samples[0] * 1000, 1) if samples else None
    return round(statistics.quantiles(samples, n=100, method="inclusive")[p - 1] * 1000, 1)

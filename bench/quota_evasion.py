"""A client trying to get around its token quota, through two `lb serve` on one table.

`python -m bench quota evasion [--seconds-each 300] [--seconds-combined 300] [--ways a,b] [--lb-root DIR]`

Client `bob` (`bob=3000tpm`) tries each way of the issue alone, then all at once, spread over two
`lb serve` instances sharing one Azurite table; client `alice` (`alice=100000tpm/600rpm`) calls
beside him the whole time (JSON chat, a stored response then read five times). The simulated
backend (in this process) answers chat with 500 completion tokens, Responses with 1,000, and
compresses any answer whose call asks for gzip. Printed, per way: bob's calls admitted / tried,
the tokens the backend served him (its own usage: a cut stream is counted whole, as Azure bills
what it generated), the most served in any 60 s (goal: <= 1.1 x 3,000 + one call's reservation),
what `/lb/usage` charged him, and alice's refusals (goal: none).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from starlette.middleware.gzip import GZipMiddleware

from bench.procs import Server, lb_command
from lb.sim import Servers, SimBackend
from lb.sim.cache import tokens
from tests.azurite import start_azurite

BOB, ALICE, BACKEND_KEY = "bob-key", "alice-key", "bench-backend-key"
LIMIT = 3000
CHUNKS = 500  # chat: 500 completion tokens; Responses: 2 per chunk, 1,000
GAP = 0.002  # seconds between chunks: a stream is about a second in flight
PROMPT = "hi"
RESERVE = 1024  # the default output reservation (LB_RESERVE_TOKENS unset); main reserves none
Way = Callable[["Run"], Awaitable[None]]


class Run:
    """One attack: bob's calls through `urls` until `end`, what they were served, when."""

    def __init__(self, urls: list[str], end: float) -> None:
        self.urls, self.end, self.n = urls, end, 0
        self.tried = self.admitted = self.other = 0
        self.served: list[tuple[float, int]] = []  # (monotonic time it ended, tokens the backend spent)
        self.http = httpx.AsyncClient(timeout=60, headers={"api-key": BOB})

    def url(self) -> str:
        self.n += 1
        return self.urls[self.n % len(self.urls)]

    def counted(self, status: int) -> bool:
        self.tried += 1
        if status == 200:
            self.admitted += 1
        elif status != 429:
            self.other += 1
        return status == 200

    async def refused(self) -> None:
        await asyncio.sleep(0.25)  # a client that retries at once only costs more CPU here


CHAT = {"model": "chat", "messages": [{"role": "user", "content": PROMPT}]}
CHAT_TOKENS = tokens(PROMPT) + CHUNKS
RESPONSE_TOKENS = tokens(PROMPT) + 2 * CHUNKS


async def no_usage(run: Run) -> None:
    """Chat streams with `stream_options.include_usage: false`."""
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": False}}
    while time.monotonic() < run.end:
        r = await run.http.post(run.url() + "/openai/v1/chat/completions", json=body)
        if run.counted(r.status_code) and r.text.endswith("[DONE]\n\n"):
            run.served.append((time.monotonic(), CHAT_TOKENS))
        else:
            await run.refused()


async def background(run: Run) -> None:
    """Responses with `background: true`, polled (through either instance) until completed."""
    while time.monotonic() < run.end:
        body = {"model": "chat", "input": PROMPT, "background": True}
        r = await run.http.post(run.url() + "/openai/v1/responses", json=body)
        if not run.counted(r.status_code):
            await run.refused()
            continue
        rid = r.json()["id"]
        for _ in range(20):
            got = await run.http.get(run.url() + f"/openai/v1/responses/{rid}")
            if got.status_code == 200 and got.json().get("status") == "completed":
                run.served.append((time.monotonic(), got.json()["usage"]["total_tokens"]))
                break
            await asyncio.sleep(0.05)


async def concurrent(run: Run) -> None:
    """40 streams at once."""
    body = {**CHAT, "stream": True}

    async def one() -> None:
        r = await run.http.post(run.url() + "/openai/v1/chat/completions", json=body)
        if run.counted(r.status_code):
            run.served.append((time.monotonic(), CHAT_TOKENS))

    while time.monotonic() < run.end:
        await asyncio.gather(*(one() for _ in range(40)))
        await run.refused()


async def cut(run: Run) -> None:
    """Responses streams left before `response.completed`."""
    body = {"model": "chat", "input": PROMPT, "stream": True}
    while time.monotonic() < run.end:
        async with run.http.stream("POST", run.url() + "/openai/v1/responses", json=body) as r:
            if not run.counted(r.status_code):
                await r.aread()
                await run.refused()
                continue
            async for line in r.aiter_lines():
                if "output_text.delta" in line:
                    break
        run.served.append((time.monotonic(), RESPONSE_TOKENS))


async def gzip(run: Run) -> None:
    """JSON Responses asking for gzip answers."""
    body = {"model": "chat", "input": PROMPT, "store": False}
    while time.monotonic() < run.end:
        r = await run.http.post(run.url() + "/openai/v1/responses", json=body, headers={"accept-encoding": "gzip"})
        if run.counted(r.status_code):
            run.served.append((time.monotonic(), r.json()["usage"]["total_tokens"]))
        else:
            await run.refused()


async def _persist(way: Way, run: Run) -> None:
    """A way goes on after a transport error (counted with the other errors) until its time is up."""
    while time.monotonic() < run.end:
        try:
            await way(run)
        except httpx.HTTPError:
            run.other += 1
            await asyncio.sleep(0.1)


WAYS: dict[str, Way] = {
    "no_usage": no_usage,
    "background": background,
    "concurrent": concurrent,
    "cut": cut,
    "gzip": gzip,
}


async def alice(urls: list[str], end: float) -> dict[str, int]:
    """The honest client: a JSON chat and a stored response read five times, every two seconds."""
    seen = {"calls": 0, "refused": 0, "other": 0}
    async with httpx.AsyncClient(timeout=60, headers={"api-key": ALICE}) as http:
        n = 0
        while time.monotonic() < end:
            n += 1
            url = urls[n % len(urls)]
            chat = await http.post(url + "/openai/v1/chat/completions", json={**CHAT, "max_tokens": 600})
            body = {"model": "chat", "input": PROMPT, "max_output_tokens": 1200}
            r = await http.post(url + "/openai/v1/responses", json=body)
            statuses = [chat.status_code, r.status_code]
            if r.status_code == 200:
                for i in range(5):
                    got = await http.get(urls[(n + i) % len(urls)] + f"/openai/v1/responses/{r.json()['id']}")
                    statuses.append(got.status_code)
            seen["calls"] += len(statuses)
            seen["refused"] += sum(s == 429 for s in statuses)
            seen["other"] += sum(s not in (200, 429) for s in statuses)
            await asyncio.sleep(2)
    return seen


def busiest_minute(served: list[tuple[float, int]], start: float) -> int:
    """The most tokens served in any 60 s window (ends of calls, 1 s steps)."""
    times = sorted((t - start, n) for t, n in served)
    best = 0
    for i, (t0, _) in enumerate(times):
        best = max(best, sum(n for t, n in times[i:] if t < t0 + 60))
    return best


def attack(names: list[str], seconds: float, lb_root: str | None) -> dict[str, Any]:
    sims = Servers()
    backend = SimBackend("sim", api_key=BACKEND_KEY, chunks=CHUNKS, chunk_gap=GAP)
    azurite = start_azurite()
    lbs: list[Server] = []
    try:
        env = {
            "BACKEND_1_URL": sims.start(GZipMiddleware(backend, minimum_size=0)),
            "BACKEND_1_APIKEY": BACKEND_KEY,
            "LB_CLIENT_KEYS": f"bob:{BOB},alice:{ALICE}",
            "LB_CLIENT_LIMITS": f"bob={LIMIT}tpm,alice=100000tpm/600rpm",
            "LB_STREAM_USAGE": "include",
            "LB_STATE_CONNECTION_STRING": azurite.connection_string,
            "LB_STATE_TABLE": "evasion" + uuid.uuid4().hex[:10],
            "LB_LOG_LEVEL": "ERROR",
        }
        command = lb_command(lb_root) if lb_root else None
        args = ["lb", "serve"] if command is None else ["serve"]
        lbs = [Server(f"lb{i}", args, env, command=command, quiet=True) for i in range(2)]
        urls = [s.url for s in lbs]

        async def both() -> tuple[list[Run], dict[str, int], float]:
            start = time.monotonic()
            runs = [Run(urls, start + seconds) for _ in names]
            attacks = (_persist(WAYS[n], r) for n, r in zip(names, runs, strict=True))
            results = await asyncio.gather(*attacks, alice(urls, start + seconds))
            for r in runs:
                await r.http.aclose()
            return runs, results[-1], start

        runs, honest, start = asyncio.run(both())
        time.sleep(2.5)  # the last share round, so each instance's report is the pool's
        charged = httpx.get(urls[0] + "/lb/usage", headers={"api-key": BOB}).json()
    finally:
        for s in lbs:
            s.stop()
        sims.stop()
        azurite.close()
    served = [x for r in runs for x in r.served]
    limits = charged.get("limits", {}).get("bob", {})
    bob_hour = charged.get("pool", {}).get("clients", {}).get("bob", {}).get("last_hour", {})  # usage read
    return {
        "ways": names,
        "seconds": seconds,
        "bob_tried": sum(r.tried for r in runs),
        "bob_admitted": sum(r.admitted for r in runs),
        "bob_other_errors": sum(r.other for r in runs),
        "served_tokens": sum(n for _, n in served),
        "busiest_60s": busiest_minute(served, start),
        "goal_60s": int(1.1 * LIMIT) + RESERVE + tokens(PROMPT),
        "charged_last_minute": limits.get("charged_last_minute", limits.get("used_last_minute", {}).get("tokens")),
        "metered_tokens": bob_hour.get("total_tokens"),
        "alice": honest,
        "served_at": [round(t - start, 2) for t, _ in sorted(served)],
    }


def evasion(
    seconds_each: float, seconds_combined: float, lb_root: str | None, ways: list[str] | None = None
) -> list[dict[str, Any]]:
    results = []
    chosen = ways or list(WAYS)
    plans = [[n] for n in chosen] if seconds_each > 0 else []
    if seconds_combined > 0:
        plans.append(chosen)
    for names in plans:
        result = attack(names, seconds_each if len(names) == 1 else seconds_combined, lb_root)
        results.append(result)
        print(json.dumps(result), flush=True)
    return results

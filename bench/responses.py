"""`python -m bench responses`: the Responses API through one `lb serve`, with one backend throttling.

Two figures from one run. Success: `--calls` Responses API calls through lb (every other one
streamed), plus the lb half of the timing pairs, while one of its three backends has a small quota
(`--rpm` requests per minute, then 429 + Retry-After); a call succeeds when it gets a complete
answer (JSON with status "completed", or an SSE stream ending in `response.completed`). Latency:
the time to the first SSE event of a streamed Responses API call, straight at a healthy backend
("direct") and through lb, one pair after each streamed call, each call starting once the
processes on its path are quiet (bench.procs.quiesce, as bench/overhead.py does), so both see the
same machine; lb's cost is the difference of the medians.
Results: bench/results/responses.json (`--quick`: responses.quick.json).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Any

import aiohttp

from bench.concurrency import commit
from bench.procs import ROOT, Server, percentile_ms, quiesce, write_json

KEY = "bench-client-key"
PATH = "/openai/v1/responses"
HEADERS = {"api-key": KEY, "content-type": "application/json"}
RESULTS = ROOT / "bench" / "results" / "responses.json"
_USERS = itertools.count(1)


def body(stream: bool) -> bytes:
    """A new conversation each call, as many users make (one prompt would stay on one backend)."""
    user = next(_USERS)
    return json.dumps(
        {
            "model": "chat",
            "input": [{"role": "user", "content": f"Hello from user {user}"}],
            "store": False,
            "stream": stream,
        }
    ).encode()


async def call(session: aiohttp.ClientSession, url: str, stream: bool) -> tuple[bool, float | None, int, int]:
    """(complete answer?, seconds to the first SSE event or None, HTTP status, lb's attempts)."""
    started = time.perf_counter()
    first: float | None = None
    async with session.post(url + PATH, data=body(stream), headers=HEADERS) as response:
        attempts = int(response.headers.get("x-lb-attempts", "1"))
        if not stream:
            data = await response.read()
            ok = response.status == 200 and json.loads(data).get("status") == "completed"
            return ok, None, response.status, attempts
        seen = b""
        async for chunk in response.content.iter_any():
            if first is None and b"\n\n" in chunk:
                first = time.perf_counter() - started
            seen = (seen + chunk)[-4096:]
        ok = response.status == 200 and b"event: response.completed" in seen
        return ok, first, response.status, attempts


async def run(direct: str, lb: str, calls: int, pids: list[int]) -> dict[str, Any]:
    """`calls` calls through lb, every other one streamed; after each streamed one, a timed pair
    (direct, then lb). Every call through lb, the pairs' included, counts for success."""
    outcomes: list[tuple[bool, bool, int]] = []  # (streamed, complete, status) of every call through lb
    failovers = 0
    first: dict[str, list[float]] = {"direct": [], "lb": []}
    async with aiohttp.ClientSession() as session:

        async def through_lb(stream: bool) -> float | None:
            nonlocal failovers
            quiesce(pids)
            ok, seconds, status, attempts = await call(session, lb, stream)
            outcomes.append((stream, ok, status))
            failovers += attempts > 1
            return seconds if ok else None

        for i in range(calls):
            stream = i % 2 == 1
            await through_lb(stream)
            if stream:  # the latency pair: direct, then lb, same body
                quiesce(pids)
                ok, seconds, _, _ = await call(session, direct, True)
                if ok and seconds is not None:
                    first["direct"].append(seconds)
                seconds = await through_lb(True)
                if seconds is not None:
                    first["lb"].append(seconds)
    return {"outcomes": outcomes, "first": first, "failovers": failovers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench responses", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 calls: a smoke run")
    parser.add_argument("--calls", type=int, default=600, help="Responses API calls through lb (half streamed)")
    parser.add_argument("--rpm", type=int, default=60, help="quota of the throttling backend, requests per minute")
    parser.add_argument("--chunk-gap", type=float, default=0.01, help="seconds between a stream's events")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.calls = 60
    backend = ["bench.backend", "--api-key", KEY, "--chunks", "5", "--chunk-gap", str(args.chunk_gap)]  # short streams
    with (
        Server("a", [*backend, "--name", "a"], quiet=True, wait=False) as a,
        Server("b", [*backend, "--name", "b"], quiet=True, wait=False) as b,
        Server("throttling", [*backend, "--name", "throttling", "--rpm", str(args.rpm)], quiet=True, wait=False) as t,
    ):
        env = {"LB_CLIENT_KEYS": KEY, "LB_LOG_LEVEL": "WARNING"}
        for i, s in enumerate((a, b, t), start=1):
            env |= {f"BACKEND_{i}_URL": s.url, f"BACKEND_{i}_APIKEY": KEY}
        with Server("lb", ["lb", "serve"], env, quiet=True, wait=False) as lb:
            for server in (a, b, t, lb):  # started side by side: lb needs only the backends' URLs to start
                server.wait_listening()
            pids = [*a.pids(), *b.pids(), *t.pids(), *lb.pids()]
            load_before = os.getloadavg()[0]
            warm = asyncio.run(run(a.url, lb.url, 6, pids))  # imports, pools; its calls count too
            got = asyncio.run(run(a.url, lb.url, args.calls, pids))
            got["failovers"] += warm["failovers"]
            got["outcomes"] += warm["outcomes"]
    outcomes = got["outcomes"]
    streamed = [ok for s, ok, _ in outcomes if s]
    plain = [ok for s, ok, _ in outcomes if not s]
    direct_p50 = statistics.median(got["first"]["direct"])
    lb_p50 = statistics.median(got["first"]["lb"])
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "commit": commit(),
        "settings": {"calls": args.calls, "throttling_rpm": args.rpm, "chunk_gap_s": args.chunk_gap, "backends": 3},
        "calls_through_lb": len(outcomes),
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "success_pct": round(100 * sum(ok for _, ok, _ in outcomes) / len(outcomes), 2),
        "success_streamed_pct": round(100 * sum(streamed) / len(streamed), 2),
        "success_non_streamed_pct": round(100 * sum(plain) / len(plain), 2),
        "failovers_the_client_never_saw": got["failovers"],
        "statuses": {str(s): sum(1 for *_, st in outcomes if st == s) for s in sorted({st for *_, st in outcomes})},
        "first_event_ms": {
            "direct_p50": round(direct_p50 * 1000, 2),
            "lb_p50": round(lb_p50 * 1000, 2),
            "added_p50": round((lb_p50 - direct_p50) * 1000, 2),
            "direct_p99": percentile_ms(got["first"]["direct"], 99),
            "lb_p99": percentile_ms(got["first"]["lb"], 99),
            "pairs": min(len(got["first"]["direct"]), len(got["first"]["lb"])),
        },
    }
    write_json(result, args.out or (RESULTS.with_suffix(".quick.json") if args.quick else RESULTS))
    print(json.dumps({k: v for k, v in result.items()}, indent=1))
    return 0 if result["success_pct"] == 100 else 1


if __name__ == "__main__":
    sys.exit(main())

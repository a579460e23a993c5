"""Throttle simulation, scaling mode: does sharing cooldowns through Table Storage stop N instances
from hammering a throttled backend N times over?

Not a test: it prints a Markdown table. Run from the repo root (Azurite installed with
`npm install --no-save --no-audit --no-fund azurite@3`):

    python -m bench throttle --scaling            # ~2 minutes
    python -m bench throttle --scaling --seconds 5 --instances 1 2

Setup: 3 simulated Azure OpenAI backends, each allowing `--quota` requests per `--window`
seconds (429 + Retry-After until the window resets), behind 1, 2, 4, 8 proxy instances. Each
instance is its own `python -m lb serve` process, so instances share nothing but the table. A
fixed offered load (`--rate` requests/s, open loop) goes round-robin over the instances, first with
in-memory state, then with Table state on a real Azurite (a fresh table per run).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

import httpx

from bench.procs import percentile_ms
from bench.throttle_instances import CLIENT_KEY, Instances, proxy_env
from lb.sim import Servers, SimBackend
from tests.azurite import start_azurite

API_VERSION = "2024-10-21"
PATH = f"/openai/deployments/chat/chat/completions?api-version={API_VERSION}"
BODY = {"messages": [{"role": "user", "content": "hi"}]}
BACKENDS = 3


@dataclass
class Result:
    policy: str
    state: str
    refresh_ms: int | None
    instances: int
    sent: int
    ok: int
    upstream_429: int
    windows: float
    table_reads: int
    table_writes: int
    table_queries: int
    seconds: float
    p50_ms: float | None  # client latency of the calls that got 200 (None: none did)
    p99_ms: float | None

    def row(self) -> str:
        per_window = self.upstream_429 / (self.windows * BACKENDS) if self.windows else 0.0
        table = (
            f"{self.table_reads / self.seconds:.1f} | {self.table_writes / self.seconds:.1f} | "
            f"{self.table_queries / self.seconds:.1f}"
            if self.state == "table"
            else "- | - | -"
        )
        state = f"table, refresh {self.refresh_ms} ms" if self.state == "table" else self.state
        return (
            f"| {self.policy} | {state} | {self.instances} | {self.sent} | {100 * self.ok / max(self.sent, 1):.1f}% | "
            f"{self.upstream_429} | {per_window:.2f} | {_ms(self.p50_ms)} | {_ms(self.p99_ms)} | {table} |"
        )


HEADER = (
    "| policy | state | instances | client requests | client success | upstream 429s"
    " | 429s per window per (backend, deployment) | p50 ms | p99 ms"
    " | Table reads/s | Table writes/s | Table queries/s |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


async def offer_load(urls: list[str], rate: float, seconds: float) -> tuple[int, list[float]]:
    """Open loop: request i leaves at i / rate whatever earlier ones did, to instance i mod N.
    Returns the number sent and the latency (seconds) of each call that got 200."""
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(timeout=30, limits=limits, headers={"api-key": CLIENT_KEY}) as client:

        async def one(url: str) -> float | None:
            started = time.perf_counter()
            try:
                status = (await client.post(url + PATH, json=BODY)).status_code
            except httpx.HTTPError:
                return None
            return time.perf_counter() - started if status == 200 else None

        n = int(rate * seconds)
        start = time.monotonic()
        tasks = []
        for i in range(n):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(urls[i % len(urls)])))
        results = await asyncio.gather(*tasks)
    return n, [r for r in results if r is not None]


def reset(sims: list[SimBackend]) -> None:
    for sim in sims:
        sim.calls.clear()
        sim.answered.clear()
        sim.reset_quota()


def run_setting(
    policy: str,
    state: str,
    refresh_ms: int | None,
    n: int,
    sims: list[SimBackend],
    urls: list[str],
    args: argparse.Namespace,
    azurite_cs: str,
    logdir: str,
) -> Result:
    state_env: dict[str, str] = {"LB_POLICY": policy}
    if state == "table":
        state_env |= {
            "LB_STATE_CONNECTION_STRING": azurite_cs,
            "LB_STATE_TABLE": "sim" + uuid.uuid4().hex[:12],
            "LB_STATE_REFRESH_MS": str(refresh_ms),
        }
    instances = Instances(n, proxy_env(urls, state_env), logdir)
    try:
        instances.wait_ready()
        reset(sims)
        before = instances.table_ops() if state == "table" else {"reads": 0, "writes": 0, "queries": 0}
        started = time.monotonic()
        sent, latencies = asyncio.run(offer_load(instances.urls, args.rate, args.seconds))
        seconds = time.monotonic() - started
        after = instances.table_ops() if state == "table" else before
    finally:
        instances.stop()
    return Result(
        policy=policy,
        state=state,
        refresh_ms=refresh_ms,
        instances=n,
        sent=sent,
        ok=len(latencies),
        upstream_429=sum(sim.count(429) for sim in sims),
        windows=seconds / args.window,
        table_reads=after["reads"] - before["reads"],
        table_writes=after["writes"] - before["writes"],
        table_queries=after["queries"] - before["queries"],
        seconds=seconds,
        p50_ms=percentile_ms(latencies, 50),
        p99_ms=percentile_ms(latencies, 99),
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--states", nargs="+", default=["memory", "table"], choices=["memory", "table"])
    parser.add_argument("--seconds", type=float, default=10.0, help="offered load per setting")
    parser.add_argument("--rate", type=float, default=40.0, help="offered requests per second, all instances")
    parser.add_argument("--quota", type=int, default=20, help="requests each backend allows per window")
    parser.add_argument("--window", type=float, default=2.0, help="backend quota window, seconds")
    parser.add_argument("--refresh-ms", type=int, nargs="+", default=[1000], help="LB_STATE_REFRESH_MS values")
    parser.add_argument("--policies", nargs="+", default=["random"], choices=["random", "headroom"])
    args = parser.parse_args(argv)

    capacity = BACKENDS * args.quota / args.window
    print(
        f"{BACKENDS} backends x {args.quota} requests / {args.window:g} s = {capacity:g} req/s capacity; "
        f"offered {args.rate:g} req/s for {args.seconds:g} s per setting; "
        f"Table refresh {'/'.join(map(str, args.refresh_ms))} ms; "
        "each instance a separate `python -m lb serve` process\n",
        flush=True,
    )
    azurite = start_azurite() if "table" in args.states else None
    servers = Servers()
    sims = [
        SimBackend(f"sim{i}", api_key=f"key-{i}", requests_per_window=args.quota, window_seconds=args.window)
        for i in range(1, BACKENDS + 1)
    ]
    urls = [servers.start(sim) for sim in sims]
    results: list[Result] = []
    try:
        with tempfile.TemporaryDirectory(prefix="lb-sim-") as logdir:
            print(HEADER, flush=True)
            settings = [(s, r) for s in args.states for r in (args.refresh_ms if s == "table" else [None])]
            for policy in args.policies:
                for state, refresh_ms in settings:
                    for n in args.instances:
                        cs = azurite.connection_string if azurite else ""
                        results.append(run_setting(policy, state, refresh_ms, n, sims, urls, args, cs, logdir))
                        print(results[-1].row(), flush=True)
    finally:
        servers.stop()
        if azurite is not None:
            azurite.close()
    print(
        "\n429s per window per (backend, deployment) = upstream 429s / (run seconds / window seconds * backends); "
        f"ideal is about 1 ({math.ceil(args.seconds / args.window)} windows per run)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

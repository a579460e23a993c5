"""Memory of each proxy process under sustained traffic: RSS after 0, 1k, 2k, 5k and 10k requests.

A proxy that leaks a little per call (an unclosed upstream response, a growing per-request log or
cache) shows it as RSS rising with the request count; one that does not is flat after warm-up.
Each proxy (yardstick, lb, LiteLLM) takes the same load, 16 in flight from an aiohttp client,
every 10th call streamed (20 chunks, no gap), in alternating segments so all age alike. RSS is
VmRSS of the proxy process and its children. Results: bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import asyncio
from datetime import datetime, timezone
from typing import Any

from bench.overhead import Targets, load, machine
from bench.procs import ROOT, markdown_table, write_json

CHECKPOINTS = (1000, 2000, 5000, 10000)
RESULTS = ROOT / "bench" / "results" / "memory.json"
WARMUP = 200


def run(checkpoints: tuple[int, ...], with_peer: bool, concurrency: int = 16) -> dict[str, Any]:
    t = Targets(chunks=20, chunk_gap=0.0, with_peer=with_peer)
    rss: dict[str, dict[str, float]] = {p: {} for p in t.proxies}
    try:
        for proxy in t.proxies:
            asyncio.run(load(t.urls[proxy], WARMUP, concurrency, stream_every=10))
            rss[proxy]["0"] = round(t.servers[proxy].rss(), 1)
        done = 0
        for checkpoint in checkpoints:
            for proxy in t.proxies:
                asyncio.run(load(t.urls[proxy], checkpoint - done, concurrency, stream_every=10))
                rss[proxy][str(checkpoint)] = round(t.servers[proxy].rss(), 1)
            done = checkpoint
    finally:
        t.stop()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "params": {"warmup": WARMUP, "concurrency": concurrency, "stream_every": 10, "checkpoints": list(checkpoints)},
        "rss_mb": rss,
        "growth_mb": {p: round(v[str(checkpoints[-1])] - v["0"], 1) for p, v in rss.items()},
    }


def render(r: dict[str, Any]) -> str:
    points = ["0", *(str(c) for c in r["params"]["checkpoints"])]
    head = ["proxy", *(f"RSS MB after {int(p):,}" for p in points), "growth after warm-up, MB"]
    rows = [[p, *(v[k] for k in points), r["growth_mb"][p]] for p, v in r["rss_mb"].items()]
    intro = f"## Memory ({r['date']}), after {r['params']['warmup']} warm-up calls; 16 in flight, 1 in 10 streamed"
    return "\n".join([intro, "", markdown_table(head, rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench memory", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="checkpoints at a fifth of the requests")
    parser.add_argument("--no-peer", action="store_true", help="leave LiteLLM out")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    checkpoints = tuple(c // 5 for c in CHECKPOINTS) if args.quick else CHECKPOINTS
    results = run(checkpoints, with_peer=not args.no_peer)
    out = args.out or (RESULTS.with_suffix(".quick.json") if args.quick else RESULTS)
    write_json(results, out)
    print(render(results))
    print(f"\nwritten: {out}")
    return 0

"""`python -m bench concurrency`: how many long streamed chats one `lb serve` process holds at once.

Why: Flex Consumption gives a Python app one HTTP request per instance unless
`perInstanceConcurrency` is set, and scales out when an instance is full. lb is async, so one
process can hold many streams; this measures how many before users would notice, to choose that
setting (infra/main.bicep, docs/performance.md).

How: two simulated backends (`bench.backend`, separate processes) stream `--seconds`-long chats, one
event every `--gap` s. The same aiohttp client holds N streams at once, started over `--ramp` s,
first straight at the backends ("direct"), then through one `python -m lb serve` in front of both
(the order alternates per N, so drift hits both alike). For each it records the gap before every SSE
event; lb's cost is the gap p99 through lb minus the gap p99 direct ("added p99"), with lb's CPU
share (CPU seconds / wall seconds of the hold: 1.0 = one core) and its peak RSS.
Results: bench/results/concurrency.json (`--quick`: concurrency.quick.json, short streams, N = 20, 50).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any

from bench.procs import ROOT, Server, percentile_ms, write_json
from bench.streams import hold_streams

CLIENT_KEY = "bench-client-key"
PATH = "/openai/deployments/chat/chat/completions?api-version=2024-10-21"
HEADERS = {"api-key": CLIENT_KEY, "content-type": "application/json"}  # the backends take it too: same client
BODY = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "stream": True}).encode()
ADDED_P99_BUDGET_MS = 5.0  # what "holds" means: a user cannot tell 5 ms in a 50 ms cadence
RESULTS = ROOT / "bench" / "results" / "concurrency.json"


def run_hold(targets: list[str], streams: int, ramp: float) -> dict[str, Any]:
    try:
        import uvloop

        factory = uvloop.new_event_loop  # the client's own overhead, kept low alike for both targets
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(hold_streams(targets, PATH, BODY, HEADERS, streams, ramp))


class Sampler:
    """Peak RSS (MB) of a server, sampled every 0.2 s in a thread while the hold runs."""

    def __init__(self, server: Server) -> None:
        self.server, self.peak, self._stop = server, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss())
            self._stop.wait(0.2)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(name: str, targets: list[str], streams: int, ramp: float, lb: Server, backends: list[Server]) -> dict:
    lb_cpu, backend_cpu = lb.cpu(), sum(b.cpu() for b in backends)
    client_cpu = resource.getrusage(resource.RUSAGE_SELF)
    rss_before = lb.rss()
    started = time.perf_counter()
    with Sampler(lb) as sampler:
        got = run_hold(targets, streams, ramp)
    wall = time.perf_counter() - started
    client_after = resource.getrusage(resource.RUSAGE_SELF)
    client_used = (client_after.ru_utime + client_after.ru_stime) - (client_cpu.ru_utime + client_cpu.ru_stime)
    gaps = [g for g in got["gaps"] if g > 0]  # zero gaps are the 2nd+ event of one read
    return {
        "target": name,
        "streams": streams,
        "broken": len(got["broken"]),
        "broken_examples": got["broken"][:3],
        "events": len(got["gaps"]),
        "gap_p50_ms": percentile_ms(gaps, 50),
        "gap_p99_ms": percentile_ms(gaps, 99),
        "gap_max_ms": round(max(gaps) * 1000, 1) if gaps else None,
        "wall_s": round(wall, 2),
        "lb_cpu_share": round((lb.cpu() - lb_cpu) / wall, 3),
        "backends_cpu_share": round((sum(b.cpu() for b in backends) - backend_cpu) / wall, 3),
        "client_cpu_share": round(client_used / wall, 3),
        "lb_rss_mb_before": round(rss_before, 1),
        "lb_rss_mb_peak": round(sampler.peak, 1),
    }


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def summarise(rows: list[dict]) -> list[dict]:
    """Per N: direct and lb side by side, lb's added gap p99, and whether it stays within budget."""
    out = []
    for n in sorted({r["streams"] for r in rows}):
        direct = next(r for r in rows if r["streams"] == n and r["target"] == "direct")
        via = next(r for r in rows if r["streams"] == n and r["target"] == "lb")
        added = round(via["gap_p99_ms"] - direct["gap_p99_ms"], 1)
        out.append(
            {
                "streams": n,
                "direct_gap_p99_ms": direct["gap_p99_ms"],
                "lb_gap_p99_ms": via["gap_p99_ms"],
                "added_gap_p99_ms": added,
                "lb_gap_max_ms": via["gap_max_ms"],
                "lb_cpu_share": via["lb_cpu_share"],
                "lb_rss_mb_peak": via["lb_rss_mb_peak"],
                "broken": direct["broken"] + via["broken"],
                "holds": added <= ADDED_P99_BUDGET_MS and via["broken"] == 0,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench concurrency", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 20, 50 with 3 s streams: a smoke run")
    parser.add_argument("--streams", type=int, nargs="+", default=[100, 250, 500, 1000])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each streamed chat")
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between events of a stream")
    parser.add_argument("--ramp", type=float, default=2.0, help="streams start spread over this many seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.streams, args.seconds, args.ramp = [20, 50], 3.0, 0.5
    chunks = max(1, round(args.seconds / args.gap))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit: 1,000 streams are 4,000 sockets

    backend_args = ["bench.backend", "--chunks", str(chunks), "--chunk-gap", str(args.gap), "--api-key", CLIENT_KEY]
    rows: list[dict] = []
    with (
        Server("backend-a", [*backend_args, "--name", "a"], quiet=True) as a,
        Server("backend-b", [*backend_args, "--name", "b"], quiet=True) as b,
    ):
        env = {
            "BACKEND_1_URL": a.url,
            "BACKEND_1_APIKEY": CLIENT_KEY,
            "BACKEND_2_URL": b.url,
            "BACKEND_2_APIKEY": CLIENT_KEY,
            "LB_CLIENT_KEYS": CLIENT_KEY,
            "LB_LOG_LEVEL": "WARNING",
            "HTTP_TIMEOUT_SECONDS": str(int(args.seconds * 3 + 30)),
        }
        with Server("lb", ["lb", "serve"], env, quiet=True) as lb:
            run_hold([lb.url], 10, 0.1)  # warm-up: imports, connection pools
            for i, n in enumerate(args.streams):
                order = [("direct", [a.url, b.url]), ("lb", [lb.url])]
                for name, targets in order if i % 2 == 0 else order[::-1]:
                    row = measure(name, targets, n, args.ramp, lb, [a, b])
                    rows.append(row)
                    print(
                        f"{n:>5} streams {name:<6}: gap p50 {row['gap_p50_ms']} ms, p99 {row['gap_p99_ms']} ms,"
                        f" max {row['gap_max_ms']} ms, broken {row['broken']}, lb CPU {row['lb_cpu_share']:.2f},"
                        f" lb RSS {row['lb_rss_mb_peak']} MB",
                        flush=True,
                    )
    summary = summarise(rows)
    held = [s["streams"] for s in summary if s["holds"]]
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "commit": commit(),
        "machine": f"{os.cpu_count()} CPUs {platform.machine()}, Python {sys.version.split()[0]}",
        "settings": {"seconds": args.seconds, "gap_s": args.gap, "ramp_s": args.ramp, "backends": 2},
        "budget_added_gap_p99_ms": ADDED_P99_BUDGET_MS,
        "summary": summary,
        "most_streams_within_budget": max(held) if held else None,
        "runs": rows,
    }
    write_json(result, RESULTS.with_suffix(".quick.json") if args.quick else RESULTS)
    print("\n| streams | direct gap p99 ms | lb gap p99 ms | added p99 ms | lb CPU share | lb RSS MB | holds |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for s in summary:
        print(
            f"| {s['streams']} | {s['direct_gap_p99_ms']} | {s['lb_gap_p99_ms']} | {s['added_gap_p99_ms']} |"
            f" {s['lb_cpu_share']} | {s['lb_rss_mb_peak']} | {'yes' if s['holds'] else 'no'} |"
        )
    print(f"\nmost streams held within +{ADDED_P99_BUDGET_MS:g} ms gap p99: {result['most_streams_within_budget']}")
    return 0 if all(s["broken"] == 0 for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())

"""`python -m bench concurrency`: how many long streamed chats one `lb serve` process holds at once.

Why: Flex Consumption gives a Python app one HTTP request per instance unless
`perInstanceConcurrency` is set, and scales out when an instance is full. lb is async, so one
process can hold many streams; this measures how many before users would notice, to choose that
setting (infra/main.bicep, docs/performance.md).

How: two simulated backends (`bench.backend`, separate processes) stream `--seconds`-long chats, one
event every `--gap` s. One aiohttp client holds N streams through one `python -m lb serve` in front
of both backends and, at the same time, N streams straight at the backends ("direct"), all started
at random moments over `--ramp` s. Running both at once means both see the same machine: on a
shared machine, other processes' bursts delay events by tens of ms, and back-to-back runs would
charge those bursts to whichever target ran during them. For every event it records the gap since
the previous one; lb's cost is the gap p99 through lb minus the gap p99 direct ("added p99"), with
lb's CPU share (CPU seconds / wall seconds: 1.0 = one core) and its peak RSS (a fresh `lb serve`
for every run, so the RSS is that N's). Each N runs `--repeat` times; the summary takes the medians.
The 1-minute load average is recorded with each run: on a shared machine it explains the outliers.
Results: bench/results/concurrency.json (`--quick`: concurrency.quick.json, short streams, N = 20, 50).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
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
ADDED_P99_BUDGET_MS = 5.0  # what "holds" means: a user cannot tell 5 ms in a 50 ms cadence
RESULTS = ROOT / "bench" / "results" / "concurrency.json"


def body(i: int) -> bytes:
    """Stream i is user i's own conversation, as in real traffic (affinity would pin one prompt)."""
    return json.dumps({"messages": [{"role": "user", "content": f"Hello from user {i}"}], "stream": True}).encode()


def run_loop(coro: Any) -> Any:
    """Run the client on uvloop when installed (lb serve uses it too), so the client's own cost stays low."""
    try:
        import uvloop

        factory = uvloop.new_event_loop  # the client's own overhead, kept low alike for both targets
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


async def hold_side_by_side(direct: list[str], via: list[str], streams: int, ramp: float) -> list[dict[str, Any]]:
    """N streams direct and N through lb, at once: both sides meet the same machine."""
    return await asyncio.gather(
        hold_streams(direct, PATH, body, HEADERS, streams, ramp),
        hold_streams(via, PATH, body, HEADERS, streams, ramp),
    )


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


def side(name: str, got: dict, streams: int) -> dict:
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
    }


def measure(direct: list[str], lb: Server, backends: list[Server], streams: int, ramp: float) -> dict:
    """N streams through lb and N direct, at the same time; both sides' gaps and lb's CPU and RSS."""
    lb_cpu, backend_cpu = lb.cpu(), sum(b.cpu() for b in backends)
    before = resource.getrusage(resource.RUSAGE_SELF)
    rss_before = lb.rss()
    started = time.perf_counter()
    with Sampler(lb) as sampler:
        got_direct, got_lb = run_loop(hold_side_by_side(direct, [lb.url], streams, ramp))
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    client_used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "streams": streams,
        "direct": side("direct", got_direct, streams),
        "lb": side("lb", got_lb, streams),
        "wall_s": round(wall, 2),
        "load_avg_1m": round(os.getloadavg()[0], 2),
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
    """Per N: the median over repeats of lb's added gap p99, and whether it stays within budget."""
    out = []
    for n in sorted({r["streams"] for r in rows}):
        runs = [r for r in rows if r["streams"] == n]
        added = [round(r["lb"]["gap_p99_ms"] - r["direct"]["gap_p99_ms"], 1) for r in runs]
        median = round(statistics.median(added), 1)
        broken = sum(r["lb"]["broken"] + r["direct"]["broken"] for r in runs)
        out.append(
            {
                "streams": n,
                "direct_gap_p99_ms": round(statistics.median(r["direct"]["gap_p99_ms"] for r in runs), 1),
                "lb_gap_p99_ms": round(statistics.median(r["lb"]["gap_p99_ms"] for r in runs), 1),
                "added_gap_p99_ms": median,
                "added_gap_p99_ms_each": added,
                "lb_gap_max_ms": max(r["lb"]["gap_max_ms"] or 0 for r in runs),
                "lb_cpu_share": round(statistics.median(r["lb_cpu_share"] for r in runs), 3),
                "lb_rss_mb_peak": round(statistics.median(r["lb_rss_mb_peak"] for r in runs), 1),
                "load_avg_1m": [r["load_avg_1m"] for r in runs],
                "broken": broken,
                "holds": median <= ADDED_P99_BUDGET_MS and broken == 0,
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
    parser.add_argument("--repeat", type=int, default=1, help="runs per N; the summary takes the median")
    parser.add_argument("--out", default=None, help="results file (default: bench/results/concurrency[.quick].json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.streams, args.seconds, args.ramp = [20, 50], 3.0, 0.5
    chunks = max(1, round(args.seconds / args.gap))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit: 1,000 streams are 4,000 sockets

    # Idle pooled connections outlive a 5 s keep-alive between runs; Azure OpenAI keeps them longer.
    keep_alive = ["--keep-alive", "120"]
    backend_args = [
        "bench.backend",
        "--chunks",
        str(chunks),
        "--chunk-gap",
        str(args.gap),
        "--api-key",
        CLIENT_KEY,
        *keep_alive,
    ]
    rows: list[dict] = []
    with (
        Server("backend-a", [*backend_args, "--name", "a"], quiet=True, wait=False) as a,
        Server("backend-b", [*backend_args, "--name", "b"], quiet=True, wait=False) as b,
    ):
        a.wait_listening()  # the two started side by side
        b.wait_listening()
        env = {
            "BACKEND_1_URL": a.url,
            "BACKEND_1_APIKEY": CLIENT_KEY,
            "BACKEND_2_URL": b.url,
            "BACKEND_2_APIKEY": CLIENT_KEY,
            "LB_CLIENT_KEYS": CLIENT_KEY,
            "LB_LOG_LEVEL": "WARNING",
            "HTTP_TIMEOUT_SECONDS": str(int(args.seconds * 3 + 30)),
        }
        for _ in range(args.repeat):
            for n in args.streams:
                with Server("lb", ["lb", "serve"], env, quiet=True) as lb:  # fresh: its RSS is this N's
                    row = measure([a.url, b.url], lb, [a, b], n, args.ramp)
                rows.append(row)
                d, v = row["direct"], row["lb"]
                print(
                    f"{n:>5} streams: gap p99 direct {d['gap_p99_ms']} ms, lb {v['gap_p99_ms']} ms"
                    f" (max {d['gap_max_ms']} / {v['gap_max_ms']}), broken {d['broken']} / {v['broken']},"
                    f" lb CPU {row['lb_cpu_share']:.2f}, lb RSS {row['lb_rss_mb_peak']} MB,"
                    f" load {row['load_avg_1m']}",
                    flush=True,
                )
    summary = summarise(rows)
    held = [s["streams"] for s in summary if s["holds"]]
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "commit": commit(),
        "machine": f"{os.cpu_count()} CPUs {platform.machine()}, Python {sys.version.split()[0]}",
        "settings": {
            "seconds": args.seconds,
            "gap_s": args.gap,
            "ramp_s": args.ramp,
            "repeat": args.repeat,
            "backends": 2,
            "side_by_side": True,
        },
        "budget_added_gap_p99_ms": ADDED_P99_BUDGET_MS,
        "summary": summary,
        "most_streams_within_budget": max(held) if held else None,
        "runs": rows,
    }
    write_json(result, args.out or (RESULTS.with_suffix(".quick.json") if args.quick else RESULTS))
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

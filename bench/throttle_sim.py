"""Throttling simulation: random vs headroom routing on a pool under quota pressure.

Not a test: it writes bench/results/throttle.json, docs/throttle.png and prints Markdown tables.
Run from the repo root (Azurite installed with `npm install --no-save --no-audit --no-fund azurite@3`):

    python -m bench throttle              # the whole matrix, ~8 minutes
    python -m bench throttle --quick      # 6 s per setting instead of 18, ~4 minutes
    python -m bench throttle --scaling    # the 1-8 instances scaling table (bench/throttle_scaling.py)

Setup: 3 simulated Azure OpenAI backends, each with a tokens quota per window (charged at
admission from prompt length + max_tokens, as Azure does) and a requests quota in Azure's ratio
(6 requests per 1000 tokens), answering 429 + Retry-After beyond it and `x-ratelimit-remaining-*`
on every 200. The window is 6 s, so a run of 18 s spans three (Azure's RPM sub-window is 10 s;
much shorter windows would mostly measure the proxy's 1 s minimum cooldown). Offered load: 50%,
90% and 130% of the pool's token capacity, a seeded mix of chat calls (a quarter streamed), sent
open loop round-robin over 1 or 4 `python -m lb serve` processes, with in-memory or Table
(Azurite) state, under LB_POLICY=random and =headroom. The two policies of one (state,
instances, load) run back to back on the same call sequence.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # also runnable as `python bench/throttle_sim.py`

from bench.plots import plot_throttle  # noqa: E402
from bench.throttle_instances import CLIENT_KEY, Instances, proxy_env  # noqa: E402
from bench.throttle_load import MEAN_TOKENS, offer, summarize, workload  # noqa: E402
from bench.throttle_plot import render  # noqa: E402
from lb.sim import Servers, SimBackend  # noqa: E402
from tests.azurite import start_azurite  # noqa: E402

BACKENDS = 3
REQUESTS_PER_1000_TOKENS = 6  # Azure OpenAI grants 6 RPM per 1000 TPM
OUT = ROOT / "bench" / "results" / "throttle.json"
PLOT = ROOT / "docs" / "throttle.png"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--scaling" in argv:
        from bench import throttle_scaling

        return throttle_scaling.main([a for a in argv if a != "--scaling"])
    args = _parser().parse_args(argv)
    if args.seconds is None:
        args.seconds = 6.0 if args.quick else 18.0
    if args.out is None:  # a smoke run never replaces the committed results or plot
        args.out = OUT.with_suffix(".quick.json") if args.quick else OUT
    if args.plot is None:
        args.plot = "" if args.quick else str(PLOT)
    capacity = BACKENDS * args.tokens / args.window / MEAN_TOKENS  # calls per second the pool can admit
    print(
        f"{BACKENDS} backends x {args.tokens} tokens / {args.window:g} s (~{MEAN_TOKENS:g} tokens a call): "
        f"{capacity:.1f} calls/s capacity; {args.seconds:g} s per setting; each instance a `python -m lb serve`\n",
        flush=True,
    )
    azurite = start_azurite() if "table" in args.states else None
    servers = Servers()
    sims = [
        SimBackend(
            f"sim{i}",
            api_key=f"key-{i}",
            latency=args.latency,
            chunks=5,
            chunk_gap=0.02,
            tokens_per_window=args.tokens,
            requests_per_window=args.tokens * REQUESTS_PER_1000_TOKENS // 1000,
            window_seconds=args.window,
        )
        for i in range(1, BACKENDS + 1)
    ]
    urls = [servers.start(sim) for sim in sims]
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="lb-sim-") as logdir:
            for state in args.states:
                for n in args.instances:
                    for load in args.loads:
                        rate = capacity * load / 100
                        calls = workload(rate, args.seconds, seed=args.seed + load, poisson=args.poisson)
                        for policy in args.policies:
                            extra = {"LB_POLICY": policy}
                            if state == "table":
                                extra |= {
                                    "LB_STATE_CONNECTION_STRING": azurite.connection_string,  # type: ignore[union-attr]
                                    "LB_STATE_TABLE": "sim" + uuid.uuid4().hex[:12],
                                    "LB_STATE_REFRESH_MS": str(args.refresh_ms),
                                }
                            run = {"state": state, "instances": n, "load_pct": load, "policy": policy}
                            run["offered_per_second"] = round(rate, 2)
                            run |= _run(Instances(n, proxy_env(urls, extra), logdir), sims, calls)
                            runs.append(run)
                            print(_line(run), flush=True)
    finally:
        servers.stop()
        if azurite is not None:
            azurite.close()
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "params": {
            "backends": BACKENDS,
            "tokens_per_window": args.tokens,
            "requests_per_window": sims[0].requests_per_window,
            "window_seconds": args.window,
            "mean_tokens_per_call": MEAN_TOKENS,
            "capacity_calls_per_second": round(capacity, 2),
            "seconds_per_setting": args.seconds,
            "latency_seconds": args.latency,
            "refresh_ms": args.refresh_ms,
            "arrivals": "poisson" if args.poisson else "uniform",
            "seed": args.seed,
        },
        "wall_seconds": round(time.monotonic() - started, 1),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + render(result))
    print(f"\nwrote {args.out}")
    if args.plot:
        plot_throttle(result, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0


def _run(instances: Instances, sims: list[SimBackend], calls: list) -> dict[str, Any]:
    """One setting: fresh quotas, the call sequence through the instances, what clients and backends saw."""

    def recovery(tokens: int | None) -> float:
        now = time.monotonic()
        return min(sim.recovers_at(now, tokens) for sim in sims) - now

    try:
        instances.wait_ready()
        for sim in sims:
            sim.calls.clear()
            sim.answered.clear()
            sim.reset_quota()
        started = time.monotonic()
        answers = asyncio.run(offer(instances.urls, calls, CLIENT_KEY, recovery))
        seconds = time.monotonic() - started
    finally:
        instances.stop()
    return {
        **summarize(answers),
        "upstream_calls": sum(len(sim.calls) for sim in sims),
        "upstream_429": sum(sim.count(429) for sim in sims),
        "seconds": round(seconds, 2),
    }


def _line(run: dict[str, Any]) -> str:
    return (
        f"{run['state']:6} x{run['instances']} {run['load_pct']:>3}% {run['policy']:8} "
        f"success {100 * run['ok'] / max(run['sent'], 1):5.1f}%  upstream 429s {run['upstream_429']:4}  "
        f"client 429s {run['client_429']:4} (Retry-After late {run['retry_after_late']}, "
        f"for the call {run['retry_after_late_for_call']})  "
        f"p99 {run['p99_ms']} ms"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 s per setting instead of 18")
    parser.add_argument("--seconds", type=float, help="offered load per setting")
    parser.add_argument("--loads", type=int, nargs="+", default=[50, 90, 130], help="percent of pool capacity")
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--states", nargs="+", default=["memory", "table"], choices=["memory", "table"])
    parser.add_argument("--policies", nargs="+", default=["random", "headroom"], choices=["random", "headroom"])
    parser.add_argument("--tokens", type=int, default=45_000, help="tokens each backend admits per window")
    parser.add_argument("--window", type=float, default=6.0, help="quota window, seconds")
    parser.add_argument("--latency", type=float, default=0.05, help="backend latency before the answer, seconds")
    parser.add_argument("--refresh-ms", type=int, default=1000, help="LB_STATE_REFRESH_MS for Table state")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--poisson", action="store_true", help="Poisson arrivals instead of evenly spaced calls")
    parser.add_argument("--out", type=Path, default=None, help="default: throttle.json (--quick: throttle.quick.json)")
    parser.add_argument("--plot", default=None, help="PNG to write, '' for none (default: docs/throttle.png)")
    return parser


if __name__ == "__main__":
    sys.exit(main())

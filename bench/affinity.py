"""Prompt-cache affinity: random vs affinity routing of multi-turn conversations.

Not a test: it writes bench/results/affinity.json, docs/affinity.png and prints Markdown tables.

    python -m bench affinity            # 200 conversations per run, 8 runs, ~5 minutes
    python -m bench affinity --quick    # 40 conversations, shorter waits: a smoke run (affinity.quick.json)

Setup: 3 simulated Azure OpenAI backends (weights 1:1:1) modelling the prompt cache
(lb.sim.cache: 1,024 tokens, then 128-token steps, per backend and deployment, 4 characters a
token) and a prefill time per uncached token, so a cache hit is also faster. 200 conversations of
3-10 turns (bench.affinity_load: a 1,100-token system prompt shared by all, 1,000-2,000 tokens
of sources retrieved for the first question, 150-400-token answers, 500-1,000 tokens of fresh
sources with each follow-up), each turn sent to a random one of 1 or 4 `python
-m lb serve` processes, with LB_AFFINITY=off (weighted random) and =on, with and without
backend 1 answering 429 for 3 s of every 10. Both routings of a setting run the same prompts in
the same order. The bound is the cached share had one backend served every call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # also runnable as `python bench/affinity.py`

from bench import deps  # noqa: E402
from bench.affinity_load import Turn, conversations, converse, most_cached, throttle_periodically  # noqa: E402
from bench.affinity_plot import plot, render  # noqa: E402
from bench.procs import percentile_ms  # noqa: E402
from bench.throttle_instances import CLIENT_KEY, Instances, proxy_env  # noqa: E402
from lb.routing.affinity import conversation_key  # noqa: E402
from lb.sim import Servers, SimBackend  # noqa: E402
from tests.azurite import start_azurite  # noqa: E402

BACKENDS = 3
OUT = ROOT / "bench" / "results" / "affinity.json"
PLOT = ROOT / "docs" / "affinity.png"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.conversations, args.spread, args.think = min(args.conversations, 40), 3.0, (0.1, 0.3)
        args.period, args.spell = 2.0, 0.6
    out = args.out or (OUT.with_suffix(".quick.json") if args.quick else OUT)
    plot_path = "" if args.quick else (args.plot if args.plot is not None else str(PLOT))
    if plot_path:
        deps.ensure_matplotlib()  # before the runs, not after them
    if args.report:
        return _report(json.loads(Path(out).read_text()), plot_path, out)
    convs = conversations(args.conversations, args.spread, tuple(args.think), args.seed)
    calls = sum(c.turns for c in convs)
    print(
        f"{args.conversations} conversations ({calls} calls) over {BACKENDS} backends, "
        f"each call to a random `lb serve` instance\n",
        flush=True,
    )
    servers = Servers()
    sims = [
        SimBackend(f"sim{i}", api_key=f"key-{i}", latency=args.latency, prefill_per_1k=args.prefill)
        for i in range(1, BACKENDS + 1)
    ]
    urls = [servers.start(sim) for sim in sims]
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    azurite = start_azurite() if args.state == "table" else None
    try:
        with tempfile.TemporaryDirectory(prefix="lb-affinity-") as logdir:
            for n in args.instances:
                for throttled in args.throttling:
                    for routing in ("random", "affinity"):
                        extra = {"LB_AFFINITY": "on" if routing == "affinity" else "off"}
                        if azurite is not None:  # one table, a fresh pool per run: cooldowns, secret, instances
                            extra |= {
                                "LB_STATE_CONNECTION_STRING": azurite.connection_string,
                                "LB_POOL": f"p{time.time_ns()}",
                            }
                        env = proxy_env(urls, extra)
                        run = {"instances": n, "throttled": throttled, "routing": routing}
                        spells = (args.period, args.spell) if throttled else None
                        run |= _run(Instances(n, env, logdir), sims, convs, spells, args.seed)
                        runs.append(run)
                        print(_line(run), flush=True)
    finally:
        servers.stop()
        if azurite is not None:
            azurite.close()
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "params": {
            "backends": BACKENDS,
            "conversations": args.conversations,
            "calls": calls,
            "start_spread_seconds": args.spread,
            "think_seconds": list(args.think),
            "latency_seconds": args.latency,
            "prefill_seconds_per_1k_uncached": args.prefill,
            "throttle": f"backend 1: 429 for {args.spell:g} s of every {args.period:g}",
            "seed": args.seed,
            "state": args.state,
        },
        "wall_seconds": round(time.monotonic() - started, 1),
        "key_cost_us": key_cost(convs),
        "runs": runs,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")
    return _report(result, plot_path, out)


def _report(result: dict[str, Any], plot_path: str, out: Path) -> int:
    print("\n" + render(result))
    if plot_path:
        plot(result, Path(plot_path))
        print(f"wrote {plot_path}")
    return 0


def _run(
    instances: Instances, sims: list[SimBackend], convs: list, spells: tuple[float, float] | None, seed: int
) -> dict[str, Any]:
    """One setting: cold caches, every conversation through the instances, what clients and backends saw."""
    try:
        instances.wait_ready()
        for sim in sims:
            sim.cache.clear()
            sim.calls.clear()
            sim.answered.clear()
            sim.throttle_next = 0
            sim.prompt_tokens = sim.cached_tokens = 0

        async def go() -> list[Turn]:
            throttler = asyncio.ensure_future(throttle_periodically(sims[0], *spells)) if spells else None
            try:
                return await converse(instances.urls, convs, CLIENT_KEY, seed)
            finally:
                if throttler:
                    throttler.cancel()
                sims[0].throttle_next = 0

        began = time.monotonic()
        turns = asyncio.run(go())
        seconds = time.monotonic() - began
    finally:
        instances.stop()
    return summarize(turns, sims) | {"seconds": round(seconds, 1)}


def summarize(turns: list[Turn], sims: list[SimBackend]) -> dict[str, Any]:
    ok = [t for t in turns if t.status == 200]
    prompt = sum(t.prompt_tokens for t in ok)
    served = {str(i): sum(t.backend == str(i) for t in ok) for i in range(1, len(sims) + 1)}
    shares = {b: n / max(len(ok), 1) for b, n in served.items()}
    return {
        "sent": len(turns),
        "ok": len(ok),
        "cached_share": round(sum(t.cached_tokens for t in ok) / max(prompt, 1), 4),
        "most_cached_share": round(most_cached(ok), 4),
        "prompt_tokens": prompt,
        "load": {b: round(s, 4) for b, s in shares.items()},
        "load_off_share_max": round(max(abs(s * len(sims) - 1) for s in shares.values()), 4),
        "upstream_429": sum(sim.count(429) for sim in sims),
        "client_failures": len(turns) - len(ok),
        "p50_ms": percentile_ms([t.seconds for t in turns], 50),
        "p99_ms": percentile_ms([t.seconds for t in turns], 99),
        "mean_ms": round(statistics.fmean(t.seconds for t in turns) * 1000, 1),
    }


def key_cost(convs: list) -> dict[str, dict[str, float]]:
    """Microseconds to find a body's conversation key, next to a full json.loads of it, by body size."""
    longest = max(convs, key=lambda c: c.turns)
    huge = {"messages": [{"role": "system", "content": "s" * 20_000_000}, {"role": "user", "content": "q"}]}
    bodies = {
        "hello (61 B)": {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16},
        "first turn": longest.body(0),
        "tenth turn": longest.body(longest.turns - 1),
        "20 MB system prompt": huge,
    }
    out = {}
    for name, body in bodies.items():
        raw = json.dumps(body).encode()
        repeat = 3 if len(raw) > 1_000_000 else 200
        out[name] = {
            "bytes": len(raw),
            "key_us": round(_best(lambda raw=raw: conversation_key(raw), repeat) * 1e6, 1),
            "json_loads_us": round(_best(lambda raw=raw: json.loads(raw), repeat) * 1e6, 1),
        }
    return out


def _best(call: Any, repeat: int) -> float:
    """The least seconds one call took over `repeat` tries: the cost without the machine's noise."""
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - began)
    return best


def _line(run: dict[str, Any]) -> str:
    load = " ".join(f"{b}:{s:.0%}" for b, s in run["load"].items())
    return (
        f"x{run['instances']} {'throttled' if run['throttled'] else 'healthy  '} {run['routing']:8} "
        f"cached {run['cached_share']:.1%} (most {run['most_cached_share']:.1%})  load {load}  "
        f"success {100 * run['ok'] / max(run['sent'], 1):.1f}%  p50 {run['p50_ms']} p99 {run['p99_ms']} ms"
    )


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench affinity", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 conversations, short waits (a smoke run)")
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--spread", type=float, default=20.0, help="seconds over which conversations start")
    parser.add_argument("--think", type=float, nargs=2, default=(0.5, 1.5), help="seconds between turns, min max")
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--state", choices=["memory", "table"], default="memory", help="table: the instances share one Azurite table"
    )
    parser.add_argument("--throttling", type=int, nargs="+", default=[0, 1], choices=[0, 1])
    parser.add_argument("--latency", type=float, default=0.02, help="backend seconds before an answer")
    parser.add_argument("--prefill", type=float, default=0.02, help="backend seconds per 1,000 uncached tokens")
    parser.add_argument("--period", type=float, default=10.0, help="throttling: seconds between spells")
    parser.add_argument("--spell", type=float, default=3.0, help="throttling: seconds backend 1 answers 429")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--report", action="store_true", help="no runs: redraw the tables and plot from --out")
    parser.add_argument("--out", type=Path, default=None, help="default: affinity.json (--quick: .quick.json)")
    parser.add_argument("--plot", default=None, help="PNG to write, '' for none (default: docs/affinity.png)")
    return parser


if __name__ == "__main__":
    sys.exit(main())

"""Where a proxy's CPU time per request goes: py-spy samples `lb serve` and LiteLLM under load.

py-spy reads the process's stacks from outside (`--nonblocking`: it never pauses it), so the proxy
runs as measured everywhere else: one process, 16 non-streamed calls in flight from an aiohttp
client on a zero-latency backend. Idle samples (the loop waiting in epoll) are left out, so the
shares below are of the time the process was busy. Each sample is charged to the package of its
innermost Python frame ("self" time); "on stack" is the share of samples with any frame of that
package anywhere on the stack. CPU ms per request from /proc turns the shares into microseconds.
Results: bench/results/profile-<target>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import deps
from bench.overhead import Targets, load, machine
from bench.procs import ROOT, markdown_table, write_json

RESULTS = ROOT / "bench" / "results"
# First path component of py-spy's short file name -> the bucket it is reported under.
GROUPS = {
    "lb": "lb (this project)",
    "httpx": "httpx",
    "httpcore": "httpcore",
    "h11": "h11",
    "anyio": "anyio",
    "aiohttp": "aiohttp",
    "starlette": "starlette",
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
    "httptools": "uvicorn",
    "asyncio": "asyncio",
    "uvloop": "asyncio",
    "json": "json",
    "logging": "logging",
    "litellm": "litellm",
    "openai": "openai SDK",
    "pydantic": "pydantic",
    "pydantic_core": "pydantic",
}


def group(frame: str) -> str:
    """`func (pkg/mod.py:12)` -> its bucket; stdlib modules without a package go to 'other'."""
    path = frame.rsplit("(", 1)[-1]
    top = path.split("/", 1)[0] if "/" in path else ""
    return GROUPS.get(top, "other (stdlib, typing, enum, ...)")


def summarise(raw: str, top_n: int = 15) -> dict[str, Any]:
    """Shares of busy samples by package (self and on stack) and the hottest leaf functions."""
    self_time: Counter[str] = Counter()
    on_stack: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    own: Counter[str] = Counter()  # self time of this project's functions, lines merged
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        self_time[group(frames[-1])] += count
        leaves[frames[-1]] += count
        if group(frames[-1]) == GROUPS["lb"]:
            name, _, where = frames[-1].rpartition(" (")
            own[f"{name} ({where.split(':')[0]})"] += count
        for name in {group(f) for f in frames}:
            on_stack[name] += count
    share = {k: round(100 * v / total, 1) for k, v in self_time.most_common()} if total else {}
    return {
        "samples": total,
        "self_pct": share,
        "on_stack_pct": {k: round(100 * v / total, 1) for k, v in on_stack.most_common()} if total else {},
        "top_leaves_pct": {k: round(100 * v / total, 1) for k, v in leaves.most_common(top_n)} if total else {},
        "own_functions_pct": {k: round(100 * v / total, 1) for k, v in own.most_common(10)} if total else {},
    }


def run(target: str, seconds: float, rate: int) -> dict[str, Any]:
    spy = deps.py_spy()
    t = Targets(chunks=20, chunk_gap=0.0, with_peer=target == "litellm")
    try:
        server = t.servers[target]
        asyncio.run(load(server.url, 300, 16))  # warm up before sampling
        out = Path(tempfile.mkdtemp(prefix="bench-profile-")) / "stacks.txt"
        cmd = [spy, "record", "--pid", str(server.pid), "--duration", str(int(seconds)), "--rate", str(rate)]
        cmd += ["--format", "raw", "--output", str(out), "--nonblocking"]
        recorder = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)  # let py-spy attach
        cpu_before, requests, started = server.cpu(), 0, time.perf_counter()
        while recorder.poll() is None and time.perf_counter() - started < seconds + 30:
            asyncio.run(load(server.url, 500, 16))
            requests += 500
        cpu_ms = (server.cpu() - cpu_before) / requests * 1000
        _, err = recorder.communicate(timeout=30)
        if recorder.returncode != 0 or not out.exists():
            raise RuntimeError(f"py-spy failed ({recorder.returncode}): {err.strip()[-500:]}")
        summary = summarise(out.read_text())
    finally:
        t.stop()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "params": {"target": target, "seconds": seconds, "rate": rate, "concurrency": 16, "requests": requests},
        "cpu_ms_per_request": round(cpu_ms, 3),
        **summary,
    }


def render(r: dict[str, Any]) -> str:
    cpu_us = r["cpu_ms_per_request"] * 1000
    rows = [
        [k, v, r["on_stack_pct"].get(k, 0.0), round(cpu_us * v / 100)] for k, v in r["self_pct"].items() if v >= 0.5
    ]
    p = r["params"]
    out = [f"## Profile of {p['target']} ({r['date']}): {r['samples']} busy samples, {p['requests']} requests", ""]
    out += [f"CPU per request (from /proc, during sampling): {r['cpu_ms_per_request']} ms", ""]
    out += [markdown_table(["package", "self %", "on stack %", "self us/request"], rows), ""]
    leaf_rows = [[f"`{k}`", v] for k, v in r["top_leaves_pct"].items()]
    out += ["Hottest functions (self time):", "", markdown_table(["function", "%"], leaf_rows)]
    own_rows = [[f"`{k}`", v] for k, v in r.get("own_functions_pct", {}).items()]
    if own_rows and r["params"]["target"] == "lb":
        out += ["", "lb's own functions (self time):", "", markdown_table(["function", "%"], own_rows)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench profile", description=__doc__)
    parser.add_argument("--target", nargs="+", choices=("lb", "yardstick", "litellm"), default=["lb", "litellm"])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--quick", action="store_true", help="5 s of sampling")
    args = parser.parse_args(argv)
    for target in args.target:
        results = run(target, 5 if args.quick else args.seconds, args.rate)
        out = RESULTS / f"profile-{target}{'.quick' if args.quick else ''}.json"
        write_json(results, out)
        print(render(results))
        print(f"\nwritten: {out}\n")
    return 0

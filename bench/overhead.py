"""Overhead of `python -m lb serve` next to the backend called directly, the yardstick pass-through
and the peer (LiteLLM's proxy, one worker, same backend), all measured by one client in one run.

Every target runs as a child process on 127.0.0.1 in front of the same simulated backend (zero
latency; streamed answers of `--chunks` chunks `--chunk-gap` apart). Comparisons are side by side:
sequential calls go round-robin (direct, yardstick, lb, litellm, direct, ...) and load runs in
alternating blocks, so machine noise hits every target alike; everything is reported as added ms
over direct and as ratios.

Pacing of sequential calls (the same for every target): before each call the client spins until
every process on that call's path (backend, and the proxy if any) has used no CPU for 1 ms, read
from /proc/<pid>/task/*/schedstat (capped at 50 ms). Firing the next call the moment the previous
one returned would overlap it with the proxy's teardown of the previous call (closing the upstream
response, logging, background tasks), which charges that teardown to the next call's latency
(0.1-0.5 ms, up to ~1 ms on a streamed first chunk; docs/performance.md). Sleeping a fixed 10 ms
instead lets the CPUs drop into deep idle, and every hop then pays a wake-up no busy proxy pays.
Waiting for measured quiet, while spinning, pays neither: each call starts on a settled but awake
path, and a proxy with a slow teardown is not rewarded with a head start.

CPU time per request is read from /proc (utime + stime of the proxy and its children) over calls
through each proxy alone, so nothing else is charged to it. Throughput is the requests/s at 16 and
64 in flight from an aiohttp client; the best of them is the proxy's maximum on this machine.
Streams are also timed 16 and 64 at a time (bench/streams.py).
Results: bench/results/overhead.json (with the raw samples the CDF plots are drawn from).
`--pacing none` / `--pacing sleep10` rerun the sequential parts the other two ways, to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import aiohttp
import httpx

from bench import peer
from bench.procs import ROOT, Server, in_flight, lb_command, percentiles, quiesce, write_json
from bench.report import figures, render
from bench.streams import concurrent_streams

CLIENT_KEY = "bench-client-key"
BACKEND_KEY = "bench-backend-key"
PATH = "/openai/deployments/chat/chat/completions?api-version=2024-10-21"
HEADERS = {"api-key": CLIENT_KEY, "content-type": "application/json"}
CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}
BODY = json.dumps(CHAT).encode()
STREAM_BODY = json.dumps({**CHAT, "stream": True}).encode()
RESULTS = ROOT / "bench" / "results" / "overhead.json"
PACINGS = ("quiet", "none", "sleep10")


class Targets:
    """The backend and the proxies in front of it; `paths[t]` are the pids one call to `t` runs through."""

    def __init__(
        self, chunks: int, chunk_gap: float, with_peer: bool, base: str | None = None, lb_backends: int = 1
    ) -> None:
        """`lb_backends`: how many backends lb is given (all the one simulated backend, so its pick
        has a choice to make: prompt-cache affinity hashes only then)."""

        def start(servers: dict[str, Server], backend: Server) -> None:
            lb_env = {"LB_CLIENT_KEYS": CLIENT_KEY, "LB_LOG_LEVEL": "WARNING"}
            for i in range(1, lb_backends + 1):
                lb_env |= {f"BACKEND_{i}_URL": backend.url, f"BACKEND_{i}_APIKEY": BACKEND_KEY}
            servers["yardstick"] = Server("yardstick", ["bench.yardstick"], {"YARDSTICK_BACKEND": backend.url})
            servers["lb"] = Server("lb", ["lb", "serve"], lb_env)
            if base:  # the same proxy from another checkout (e.g. main), side by side with this one
                servers["lb-base"] = Server("lb-base", ["serve"], lb_env, command=lb_command(base))
            if with_peer:
                servers["litellm"] = peer.start(backend.url, BACKEND_KEY)

        self._start(chunks, chunk_gap, start)

    def _start(self, chunks: int, chunk_gap: float, start: Callable[[dict[str, Server], Server], None]) -> None:
        """The backend ("direct"), then what `start` puts in front of it; if any fails to start,
        every one started is stopped."""
        self.servers: dict[str, Server] = {}
        try:
            backend_args = ["bench.backend", "--chunks", str(chunks), "--chunk-gap", str(chunk_gap)]
            self.servers["direct"] = backend = Server("backend", backend_args)
            start(self.servers, backend)
        except BaseException:
            self.stop()
            raise
        self.urls = {t: s.url for t, s in self.servers.items()}
        self.proxies = [t for t in self.servers if t != "direct"]
        self.paths = {t: sorted({*backend.pids(), *s.pids()}) for t, s in self.servers.items()}

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


def pace(t: Targets, name: str, how: str) -> None:
    """Wait before a sequential call to `name` (see the module docstring; `quiet` is the default)."""
    if how == "quiet":
        quiesce(t.paths[name])
    elif how == "sleep10":
        time.sleep(0.01)
    # "none": back to back


def _call(client: httpx.Client, url: str) -> float:
    started = time.perf_counter()
    response = client.post(url + PATH, content=BODY, headers=HEADERS)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{url}: HTTP {response.status_code}: {response.text[:200]}")
    return elapsed


def sequential(t: Targets, calls: int, warmup: int, pacing: str = "quiet") -> dict[str, list[float]]:
    """`calls` non-streamed chats per target over one keep-alive client, round-robin per call, paced by quiet."""
    samples: dict[str, list[float]] = {name: [] for name in t.urls}
    with httpx.Client(timeout=30, trust_env=False) as client:
        for i in range(warmup + calls):
            for name, url in t.urls.items():
                pace(t, name, pacing)
                elapsed = _call(client, url)
                if i >= warmup:
                    samples[name].append(elapsed)
    return samples


def sdk_sequential(t: Targets, calls: int, warmup: int, pacing: str = "quiet") -> dict[str, list[float]]:
    """The same through the openai SDK's AzureOpenAI client (what a chat app would use)."""
    from openai import AzureOpenAI

    clients = {
        name: AzureOpenAI(azure_endpoint=url, api_key=CLIENT_KEY, api_version="2024-10-21", max_retries=0)
        for name, url in t.urls.items()
    }
    samples: dict[str, list[float]] = {name: [] for name in t.urls}
    for i in range(warmup + calls):
        for name, client in clients.items():
            pace(t, name, pacing)
            started = time.perf_counter()
            client.chat.completions.create(model="chat", messages=CHAT["messages"], max_tokens=16)  # type: ignore[arg-type]
            if i >= warmup:
                samples[name].append(time.perf_counter() - started)
    for client in clients.values():
        client.close()
    return samples


def cpu_alone(t: Targets, calls: int, blocks: int = 4) -> dict[str, float]:
    """CPU seconds per request of each proxy, over back-to-back runs through it alone (alternating blocks)."""
    spent = {p: 0.0 for p in t.proxies}
    per_block = max(1, calls // blocks)
    with httpx.Client(timeout=30, trust_env=False) as client:
        for _ in range(blocks):
            for proxy in t.proxies:
                server = t.servers[proxy]
                before = server.cpu()
                for _ in range(per_block):
                    _call(client, server.url)
                spent[proxy] += server.cpu() - before
    return {p: spent[p] / (per_block * blocks) for p in t.proxies}


def streaming(t: Targets, calls: int, warmup: int = 3, pacing: str = "quiet") -> dict[str, dict[str, list[float]]]:
    """Time to the first and the last chunk of a streamed chat, the gaps between reads, and how many reads."""
    keys = ("first", "last", "reads", "gaps")
    samples: dict[str, dict[str, list[float]]] = {name: {k: [] for k in keys} for name in t.urls}
    with httpx.Client(timeout=30, trust_env=False) as client:
        for i in range(warmup + calls):
            for name, url in t.urls.items():
                pace(t, name, pacing)
                started = time.perf_counter()
                arrivals: list[float] = []
                with client.stream("POST", url + PATH, content=STREAM_BODY, headers=HEADERS) as response:
                    for chunk in response.iter_raw():
                        if chunk:
                            arrivals.append(time.perf_counter() - started)
                last = time.perf_counter() - started
                if response.status_code != 200 or not arrivals:
                    raise RuntimeError(f"{url}: streamed HTTP {response.status_code}")
                if i >= warmup:
                    s = samples[name]
                    s["first"].append(arrivals[0])
                    s["last"].append(last)
                    s["reads"].append(len(arrivals))
                    s["gaps"] += [b - a for a, b in itertools.pairwise(arrivals)]
    return samples


async def load(url: str, requests: int, concurrency: int, stream_every: int = 0) -> tuple[list[float], float]:
    """`requests` calls with `concurrency` in flight, from aiohttp (httpx's async pool costs the client
    ~5 ms of CPU per request at 64 connections, so it, not the proxy, would be measured). Every
    `stream_every`-th call is streamed (0: none). Returns the latencies and the wall time."""
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def call(n: int = 1) -> None:
            body = STREAM_BODY if stream_every and n % stream_every == 0 else BODY
            started = time.perf_counter()
            async with session.post(url + PATH, data=body, headers=HEADERS) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url}: HTTP {response.status}")
            latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(call() for _ in range(concurrency)))  # open the connections first
        latencies.clear()
        started = time.perf_counter()
        await in_flight(requests, concurrency, call)
        return latencies, time.perf_counter() - started


def concurrent(t: Targets, requests: int, concurrency: int, blocks: int = 2) -> dict[str, Any]:
    """Throughput, latency and server CPU at a fixed number in flight, target by target in alternating blocks."""
    lat: dict[str, list[float]] = {name: [] for name in t.urls}
    wall = {name: 0.0 for name in t.urls}
    cpu = {name: 0.0 for name in t.urls}
    for _ in range(blocks):
        for name, server in t.servers.items():
            before = server.cpu()
            samples, elapsed = asyncio.run(load(server.url, requests // blocks, concurrency))
            cpu[name] += server.cpu() - before
            lat[name] += samples
            wall[name] += elapsed
    return {
        name: {
            "rps": round(len(lat[name]) / wall[name], 1),
            **percentiles(lat[name]),
            "server_cpu_ms_per_request": round(cpu[name] / len(lat[name]) * 1000, 3),
        }
        for name in t.urls
    }


def _micro(values: list[float]) -> list[float]:
    return [round(v * 1000, 3) for v in values]


def run(args: argparse.Namespace) -> dict[str, Any]:
    t = Targets(args.chunks, args.chunk_gap, with_peer=not args.no_peer, base=args.base, lb_backends=args.lb_backends)
    try:
        seq = sequential(t, args.calls, args.warmup, args.pacing)
        sdk = sdk_sequential(t, args.sdk_calls, 10, args.pacing)
        cpu = cpu_alone(t, args.cpu_calls)
        stream = streaming(t, args.stream_calls, pacing=args.pacing)
        conc = {str(c): concurrent(t, args.requests, c) for c in args.concurrency}
        conc_streams = {
            str(c): concurrent_streams(t.urls, PATH, STREAM_BODY, HEADERS, args.concurrent_streams, c)
            for c in args.concurrency
        }
        rss = {name: round(s.rss(), 1) for name, s in t.servers.items()}
    finally:
        t.stop()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "params": {k: v for k, v in vars(args).items() if k != "out"},
        "sequential": {name: percentiles(s) for name, s in seq.items()},
        "sdk_sequential": {name: percentiles(s) for name, s in sdk.items()},
        "cpu_ms_per_request": {p: round(v * 1000, 3) for p, v in cpu.items()},
        "streaming": {
            name: {
                "first": percentiles(s["first"]),
                "last": percentiles(s["last"]),
                "gaps": percentiles(s["gaps"]),
                "reads_per_stream": statistics.fmean(s["reads"]),
            }
            for name, s in stream.items()
        },
        "concurrency": conc,
        "concurrent_streaming": conc_streams,
        "rss_mb_at_end": rss,
        "samples_ms": {
            "sequential": {name: _micro(s) for name, s in seq.items()},
            "first_chunk": {name: _micro(s["first"]) for name, s in stream.items()},
        },
    }


def base_comparison(r: dict[str, Any]) -> str:
    """This checkout's lb next to --base's: added p50 over direct and CPU per request, from the same run."""
    rows = []
    for name in ("lb", "lb-base"):
        added = r["sequential"][name]["p50"] - r["sequential"]["direct"]["p50"]
        first = r["streaming"][name]["first"]["p50"] - r["streaming"]["direct"]["first"]["p50"]
        rows.append(f"| {name} | {added:.3f} | {first:.3f} | {r['cpu_ms_per_request'][name]:.3f} |")
    head = "| target | added p50 ms (chat) | added p50 ms (first chunk) | CPU ms/request |\n|---|---:|---:|---:|"
    return "\n".join(["## This checkout vs --base, same run", head, *rows, ""])


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": model, "python": platform.python_version(), "uname": platform.platform()}


def parser(prog: str = "python -m bench overhead") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="about a fifth of the calls: a smoke run, noisy figures")
    p.add_argument("--no-peer", action="store_true", help="leave LiteLLM out (no venv needed)")
    p.add_argument("--base", default=None, help="also run `lb serve` from this checkout as target lb-base")
    p.add_argument("--pacing", choices=PACINGS, default="quiet", help="wait before each sequential call (see above)")
    p.add_argument("--calls", type=int, default=300, help="sequential non-streamed calls per target")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--sdk-calls", type=int, default=100, help="sequential calls per target via the openai SDK")
    p.add_argument("--cpu-calls", type=int, default=1000, help="calls through each proxy alone for CPU time")
    p.add_argument("--stream-calls", type=int, default=100)
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--chunk-gap", type=float, default=0.02)
    p.add_argument("--requests", type=int, default=2000, help="requests per target at each concurrency")
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    p.add_argument("--concurrent-streams", type=int, default=256, help="streamed calls per target at each concurrency")
    p.add_argument("--lb-backends", type=int, default=1, help="backends lb is given (all the one simulated backend)")
    p.add_argument("--out", default=None, help="default: bench/results/overhead.json (--quick: overhead.quick.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        for name in ("calls", "sdk_calls", "cpu_calls", "stream_calls", "requests", "concurrent_streams"):
            setattr(args, name, max(20, getattr(args, name) // 5))
        args.warmup = 10
    results = run(args)
    results["figures"] = figures(results)
    if args.base:
        print(base_comparison(results))
    out = args.out or (RESULTS.with_suffix(".quick.json") if args.quick else RESULTS)
    write_json(results, out)
    print(render(results))
    print(f"\nwritten: {out}")
    return 0  # a missed figure is a finding, not a failure of the benchmark

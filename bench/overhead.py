"""Overhead of `python -m lb serve` next to the yardstick pass-through and the backend called directly.

All three run as child processes on 127.0.0.1; one client measures them side by side in one run,
interleaving calls (direct, yardstick, lb, direct, ...) so machine noise hits all alike. CPU time
per request is read from /proc for each proxy over runs through it alone, so nothing else is charged
to it. Results: bench/results/overhead.json and a Markdown report on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from typing import Any

import aiohttp
import httpx

from bench.procs import ROOT, Server, percentiles, rss_mb
from bench.report import figures, render

TARGETS = ("direct", "yardstick", "lb")
PROXIES = ("yardstick", "lb")
CLIENT_KEY = "bench-client-key"
BACKEND_KEY = "bench-backend-key"
PATH = "/openai/deployments/chat/chat/completions?api-version=2024-10-21"
HEADERS = {"api-key": CLIENT_KEY, "content-type": "application/json"}
CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}
BODY = json.dumps(CHAT).encode()
STREAM_BODY = json.dumps({**CHAT, "stream": True}).encode()
RESULTS = ROOT / "bench" / "results" / "overhead.json"


def start_servers(chunks: int, chunk_gap: float) -> dict[str, Server]:
    servers: dict[str, Server] = {}
    try:
        backend_args = ["bench.backend", "--chunks", str(chunks), "--chunk-gap", str(chunk_gap)]
        servers["direct"] = backend = Server("backend", backend_args)
        lb_env = {"BACKEND_1_URL": backend.url, "BACKEND_1_APIKEY": BACKEND_KEY}
        lb_env |= {"LB_CLIENT_KEYS": CLIENT_KEY, "LB_LOG_LEVEL": "WARNING"}
        servers["yardstick"] = Server("yardstick", ["bench.yardstick"], {"YARDSTICK_BACKEND": backend.url})
        servers["lb"] = Server("lb", ["lb", "serve"], lb_env)
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def _call(client: httpx.Client, url: str) -> float:
    started = time.perf_counter()
    response = client.post(url + PATH, content=BODY, headers=HEADERS)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{url}: HTTP {response.status_code}: {response.text[:200]}")
    return elapsed


def sequential(urls: dict[str, str], calls: int, warmup: int) -> dict[str, list[float]]:
    """`calls` non-streamed chats per target over one keep-alive client, round-robin per call."""
    samples: dict[str, list[float]] = {t: [] for t in urls}
    with httpx.Client(timeout=30, trust_env=False) as client:
        for i in range(warmup + calls):
            for target, url in urls.items():
                elapsed = _call(client, url)
                if i >= warmup:
                    samples[target].append(elapsed)
    return samples


def sdk_sequential(urls: dict[str, str], calls: int, warmup: int) -> dict[str, list[float]]:
    """The same, through the openai SDK's AzureOpenAI client (what a chat app would use)."""
    from openai import AzureOpenAI

    clients = {
        t: AzureOpenAI(azure_endpoint=u, api_key=CLIENT_KEY, api_version="2024-10-21", max_retries=0)
        for t, u in urls.items()
    }
    samples: dict[str, list[float]] = {t: [] for t in urls}
    for i in range(warmup + calls):
        for target, client in clients.items():
            started = time.perf_counter()
            client.chat.completions.create(model="chat", messages=CHAT["messages"], max_tokens=16)  # type: ignore[arg-type]
            if i >= warmup:
                samples[target].append(time.perf_counter() - started)
    for client in clients.values():
        client.close()
    return samples


def cpu_alone(servers: dict[str, Server], calls: int, blocks: int = 4) -> dict[str, float]:
    """CPU seconds per request of each proxy, over runs through it alone (alternating blocks)."""
    spent = {p: 0.0 for p in PROXIES}
    with httpx.Client(timeout=30, trust_env=False) as client:
        for _ in range(blocks):
            for proxy in PROXIES:
                server = servers[proxy]
                before = server.cpu()
                for _ in range(calls // blocks):
                    _call(client, server.url)
                spent[proxy] += server.cpu() - before
    return {p: spent[p] / (calls // blocks * blocks) for p in PROXIES}


def streaming(urls: dict[str, str], calls: int, warmup: int = 3) -> dict[str, dict[str, list[float]]]:
    """Time to the first and the last chunk of a streamed chat, and how many reads it took."""
    samples: dict[str, dict[str, list[float]]] = {t: {"first": [], "last": [], "reads": []} for t in urls}
    with httpx.Client(timeout=30, trust_env=False) as client:
        for i in range(warmup + calls):
            for target, url in urls.items():
                started = time.perf_counter()
                first, reads = 0.0, 0
                with client.stream("POST", url + PATH, content=STREAM_BODY, headers=HEADERS) as response:
                    for chunk in response.iter_raw():
                        if chunk:
                            reads += 1
                            first = first or time.perf_counter() - started
                last = time.perf_counter() - started
                if i >= warmup:
                    for key, value in (("first", first), ("last", last), ("reads", reads)):
                        samples[target][key].append(value)
    return samples


async def _load(url: str, requests: int, concurrency: int) -> tuple[list[float], float]:
    """`requests` calls with `concurrency` in flight, from aiohttp: httpx's async pool costs the client
    ~5 ms of CPU per request at 64 connections (measured), so it, not the proxy, would be measured."""
    latencies: list[float] = []
    left = requests
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def call() -> None:
            started = time.perf_counter()
            async with session.post(url + PATH, data=BODY, headers=HEADERS) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url}: HTTP {response.status}")
            latencies.append(time.perf_counter() - started)

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await call()

        await asyncio.gather(*(call() for _ in range(concurrency)))  # open the connections first
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - started


def concurrent(servers: dict[str, Server], requests: int, concurrency: int, blocks: int = 2) -> dict[str, Any]:
    """Throughput and latency at a fixed number of requests in flight, target by target in alternating blocks."""
    out: dict[str, Any] = {}
    lat: dict[str, list[float]] = {t: [] for t in TARGETS}
    wall = {t: 0.0 for t in TARGETS}
    cpu = {t: 0.0 for t in TARGETS}
    for _ in range(blocks):
        for target in TARGETS:
            server = servers[target]
            before = server.cpu()
            samples, elapsed = asyncio.run(_load(server.url, requests // blocks, concurrency))
            cpu[target] += server.cpu() - before
            lat[target] += samples
            wall[target] += elapsed
    for target in TARGETS:
        out[target] = {
            "rps": round(len(lat[target]) / wall[target], 1),
            **percentiles(lat[target]),
            "server_cpu_ms_per_request": round(cpu[target] / len(lat[target]) * 1000, 3),
        }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    servers = start_servers(args.chunks, args.chunk_gap)
    try:
        urls = {t: servers[t].url for t in TARGETS}
        seq = sequential(urls, args.calls, args.warmup)
        sdk = sdk_sequential(urls, args.sdk_calls, 10)
        cpu = cpu_alone(servers, args.cpu_calls)
        stream = streaming(urls, args.stream_calls)
        conc = {str(c): concurrent(servers, args.requests, c) for c in args.concurrency}
        rss = {t: round(rss_mb(servers[t].pid), 1) for t in TARGETS}
    finally:
        for server in servers.values():
            server.stop()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "uname": platform.platform()},
        "params": vars(args),
        "sequential": {t: percentiles(s) for t, s in seq.items()},
        "sdk_sequential": {t: percentiles(s) for t, s in sdk.items()},
        "cpu_ms_per_request": {p: round(v * 1000, 3) for p, v in cpu.items()},
        "streaming": {
            t: {
                "first": percentiles(s["first"]),
                "last": percentiles(s["last"]),
                "reads_per_stream": statistics.fmean(s["reads"]),
            }
            for t, s in stream.items()
        },
        "concurrency": conc,
        "rss_mb_at_end": rss,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench overhead", description=__doc__)
    parser.add_argument("--calls", type=int, default=300, help="sequential non-streamed calls per target")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--sdk-calls", type=int, default=100, help="sequential calls per target via the openai SDK")
    parser.add_argument("--cpu-calls", type=int, default=1000, help="calls through each proxy alone for CPU time")
    parser.add_argument("--stream-calls", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--chunk-gap", type=float, default=0.02)
    parser.add_argument("--requests", type=int, default=2000, help="requests per target at each concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    results = run(args)
    results["figures"] = figures(results)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(render(results))
    print(f"\nwritten: {args.out}")
    return 0  # a missed figure is a finding, not a failure of the benchmark

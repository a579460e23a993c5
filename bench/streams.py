"""Streamed chats with many in flight.

`concurrent_streams`: time to the first and to the last chunk at 16 and 64 concurrent streams.
Sequential streams show what one hop adds; concurrent ones show whether a proxy keeps the chunks
flowing when it has 64 streams to copy at once (20 chunks each, 20 ms apart: 64 streams are
~3,200 chunk writes per second). Same aiohttp client for every target, alternating blocks.

`hold_streams`: hundreds of long streams held at once (bench/concurrency.py), timing the gap before
every event, which is what a user watching a chat sees when a proxy falls behind.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from bench.procs import in_flight, percentiles


async def stream_load(
    url: str, path: str, body: bytes, headers: dict[str, str], streams: int, concurrency: int
) -> dict[str, list[float]]:
    """`streams` streamed calls with `concurrency` in flight; seconds to first and last chunk of each."""
    first: list[float] = []
    last: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def call(record: bool) -> None:
            started = time.perf_counter()
            got_first = 0.0
            async with session.post(url + path, data=body, headers=headers) as response:
                if response.status != 200:
                    raise RuntimeError(f"{url}: streamed HTTP {response.status}")
                async for chunk in response.content.iter_any():
                    if chunk and not got_first:
                        got_first = time.perf_counter() - started
            if record:
                first.append(got_first)
                last.append(time.perf_counter() - started)

        await asyncio.gather(*(call(False) for _ in range(concurrency)))  # connections open, caches warm
        await in_flight(streams, concurrency, lambda _: call(True))
    return {"first": first, "last": last}


def concurrent_streams(
    urls: dict[str, str],
    path: str,
    body: bytes,
    headers: dict[str, str],
    streams: int,
    concurrency: int,
    blocks: int = 2,
) -> dict[str, Any]:
    """p50/p90/p99 of first and last chunk per target, its blocks alternating with the other targets'."""
    samples: dict[str, dict[str, list[float]]] = {name: {"first": [], "last": []} for name in urls}
    for _ in range(blocks):
        for name, url in urls.items():
            per_block = max(concurrency, streams // blocks)  # never fewer streams than the concurrency asked for
            got = asyncio.run(stream_load(url, path, body, headers, per_block, concurrency))
            samples[name]["first"] += got["first"]
            samples[name]["last"] += got["last"]
    return {name: {k: percentiles(v) for k, v in s.items()} for name, s in samples.items()}


async def hold_streams(
    targets: list[str],
    path: str,
    body: bytes | Callable[[int], bytes],
    headers: dict[str, str],
    streams: int,
    ramp: float,
) -> dict[str, Any]:
    """Hold `streams` long streamed calls at once, started over `ramp` seconds (round-robin over
    `targets`); the gap before each SSE event of each stream, in seconds, and how many streams broke.

    An event is counted when its closing blank line arrives, so two events that reach the client in
    one read count as one normal gap and one zero gap: a proxy that holds events back shows up as a
    long gap, not hidden by the read size. Random start offsets spread the streams' timers over the
    chunk interval, as independent users would. `body` may be a function of the stream's number, so
    each stream is its own conversation (prompt-cache affinity keeps one conversation on one backend).
    """
    gaps: list[float] = []
    broken: list[str] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=30)
    rng = random.Random(streams)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(i: int) -> None:
            await asyncio.sleep(rng.uniform(0, ramp))
            try:
                data = body(i) if callable(body) else body
                async with session.post(targets[i % len(targets)] + path, data=data, headers=headers) as response:
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}")
                    last = time.perf_counter()
                    events, done = 0, False
                    async for chunk in response.content.iter_any():
                        now = time.perf_counter()
                        n = chunk.count(b"\n\n")
                        if n:
                            gaps.append(now - last)
                            gaps.extend([0.0] * (n - 1))
                            last = now
                            events += n
                        done = done or b"[DONE]" in chunk
                    if not done:
                        raise RuntimeError(f"stream ended after {events} events without [DONE]")
            except Exception as exc:  # a broken stream is a result to report, not a crash
                broken.append(f"{type(exc).__name__}: {exc}")

        await asyncio.gather(*(one(i) for i in range(streams)))
    return {"gaps": gaps, "broken": broken}

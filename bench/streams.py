"""Streamed chats with many in flight: time to the first and to the last chunk at 16 and 64 concurrent streams.

Sequential streams show what one hop adds; concurrent ones show whether a proxy keeps the chunks
flowing when it has 64 streams to copy at once (20 chunks each, 20 ms apart: 64 streams are
~3,200 chunk writes per second). Same aiohttp client for every target, alternating blocks.
"""

from __future__ import annotations

import asyncio
import time
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

"""Why `overhead` paces sequential calls by measured quiet: the three pacings side by side, same servers.

For each round, each pacing (`none`: back to back; `sleep10`: 10 ms sleep; `quiet`: spin until the
path used no CPU for 1 ms) and each target, one streamed and one non-streamed call. Reported: p50
of first chunk and of the non-streamed call, added over direct, per pacing. A pacing that moves
"added" a lot is measuring itself, not the proxy. Not part of `all`: `python -m bench pacing`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx

from bench.overhead import BODY, HEADERS, PATH, STREAM_BODY, Targets, pace
from bench.procs import markdown_table

PACINGS = ("none", "sleep10", "quiet")


def _first_chunk(client: httpx.Client, url: str) -> float:
    started = time.perf_counter()
    first = 0.0
    with client.stream("POST", url + PATH, content=STREAM_BODY, headers=HEADERS) as response:
        for chunk in response.iter_raw():
            first = first or (time.perf_counter() - started if chunk else 0.0)
    return first


def _plain(client: httpx.Client, url: str) -> float:
    started = time.perf_counter()
    client.post(url + PATH, content=BODY, headers=HEADERS).raise_for_status()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench pacing", description=__doc__)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--peer", action="store_true", help="include LiteLLM")
    args = parser.parse_args(argv)
    t = Targets(chunks=5, chunk_gap=0.02, with_peer=args.peer)
    first = {(p, n): [] for p in PACINGS for n in t.urls}  # type: dict[tuple[str, str], list[float]]
    plain = {(p, n): [] for p in PACINGS for n in t.urls}  # type: dict[tuple[str, str], list[float]]
    try:
        with httpx.Client(timeout=30, trust_env=False) as client:
            for i in range(args.rounds + 5):
                for pacing in PACINGS:
                    for name, url in t.urls.items():
                        pace(t, name, pacing)
                        f = _first_chunk(client, url)
                        pace(t, name, pacing)
                        q = _plain(client, url)
                        if i >= 5:
                            first[pacing, name].append(f)
                            plain[pacing, name].append(q)
    finally:
        t.stop()

    def p50(samples: list[float]) -> float:
        return statistics.median(samples) * 1000

    rows = []
    for pacing in PACINGS:
        for name in t.urls:
            added_f = p50(first[pacing, name]) - p50(first[pacing, "direct"])
            added_q = p50(plain[pacing, name]) - p50(plain[pacing, "direct"])
            rows.append([pacing, name, round(p50(first[pacing, name]), 3), round(added_f, 3)])
            rows[-1] += [round(p50(plain[pacing, name]), 3), round(added_q, 3)]
    head = ["pacing", "target", "first chunk p50 ms", "added", "non-streamed p50 ms", "added"]
    print(f"## Pacing of sequential calls, {args.rounds} rounds, interleaved\n")
    print(markdown_table(head, rows))
    return 0

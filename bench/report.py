"""Turns bench/results/overhead.json into the goals check and the Markdown tables printed after a run."""

from __future__ import annotations

from typing import Any

from bench.procs import markdown_table

TARGETS = ("direct", "yardstick", "lb")


def _added(a: dict[str, float], b: dict[str, float], key: str) -> float:
    return round(a[key] - b[key], 3)


def figures(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal of issues 3 and 6 next to what was measured (ms unless said)."""
    seq, cpu, st = r["sequential"], r["cpu_ms_per_request"], r["streaming"]
    cpu_ratio = round(cpu["lb"] / cpu["yardstick"], 2)
    added_p50 = _added(seq["lb"], seq["direct"], "p50")
    added_p99 = _added(seq["lb"], seq["direct"], "p99")
    first = _added(st["lb"]["first"], st["direct"]["first"], "p50")
    rows = [
        ("#3", "lb CPU/request vs yardstick's", "<= 1.5x", cpu_ratio, cpu_ratio <= 1.5),
        ("#3", "added p50 over direct, sequential (ms)", "<= 1.5", added_p50, added_p50 <= 1.5),
        ("#3", "streamed first chunk added, p50 (ms)", "<= 2", first, first <= 2),
        ("#6", "added p50 over direct, sequential (ms)", "<= 0.5", added_p50, added_p50 <= 0.5),
        ("#6", "added p99 over direct, sequential (ms)", "<= 2", added_p99, added_p99 <= 2),
        ("#6", "streamed first chunk added, p50 (ms)", "<= 1", first, first <= 1),
    ]
    return [{"issue": i, "figure": f, "goal": g, "measured": m, "met": ok} for i, f, g, m, ok in rows]


def _latency_rows(stats: dict[str, dict[str, float]]) -> list[list[object]]:
    direct = stats["direct"]
    return [
        [t, s["p50"], s["p90"], s["p99"], _added(s, direct, "p50"), _added(s, direct, "p99")] for t, s in stats.items()
    ]


def render(r: dict[str, Any]) -> str:
    p = r["params"]
    head = ["target", "p50 ms", "p90 ms", "p99 ms", "added p50 ms", "added p99 ms"]
    out = [f"## Overhead ({r['date']}, {r['machine']['cpus']} CPUs, Python {r['machine']['python']})", ""]
    out += [f"### Sequential non-streamed chat, {p['calls']} calls per target, httpx keep-alive, interleaved", ""]
    out += [markdown_table(head, _latency_rows(r["sequential"])), ""]
    out += [f"### Same through the openai SDK (AzureOpenAI), {p['sdk_calls']} calls per target", ""]
    out += [markdown_table(head, _latency_rows(r["sdk_sequential"])), ""]
    cpu = r["cpu_ms_per_request"]
    out += [f"### CPU time per request of the proxy process ({p['cpu_calls']} sequential calls through each alone)", ""]
    cpu_rows: list[list[object]] = [[k, v, round(v / cpu["yardstick"], 2)] for k, v in cpu.items()]
    out += [markdown_table(["proxy", "CPU ms/request", "x yardstick"], cpu_rows), ""]
    st = r["streaming"]
    gap = p["chunk_gap"] * 1000
    out += [f"### Streamed chat, {p['chunks']} chunks {gap:g} ms apart, {p['stream_calls']} calls per target", ""]
    stream_rows: list[list[object]] = [
        [
            t,
            s["first"]["p50"],
            s["first"]["p99"],
            _added(s["first"], st["direct"]["first"], "p50"),
            s["last"]["p50"],
            s["last"]["p99"],
            _added(s["last"], st["direct"]["last"], "p50"),
            round(s["reads_per_stream"], 1),
        ]
        for t, s in st.items()
    ]
    head_s = ["target", "first p50", "first p99", "added first p50", "last p50", "last p99", "added last p50", "reads"]
    out += [markdown_table(head_s, stream_rows), ""]
    out += [f"### Concurrent non-streamed chat, {p['requests']} requests per target (aiohttp client)", ""]
    conc_rows: list[list[object]] = []
    for c, by_target in r["concurrency"].items():
        yard = by_target["yardstick"]["rps"]
        for t, s in by_target.items():
            ratio = round(s["rps"] / yard, 2)
            conc_rows.append([c, t, s["rps"], ratio, s["p50"], s["p99"], s["server_cpu_ms_per_request"]])
    head_c = ["in flight", "target", "req/s", "x yardstick", "p50 ms", "p99 ms", "server CPU ms/req"]
    out += [markdown_table(head_c, conc_rows), ""]
    out += ["### Goals", ""]
    goal_rows = [
        [f["issue"], f["figure"], f["goal"], f["measured"], "met" if f["met"] else "MISSED"] for f in r["figures"]
    ]
    out += [markdown_table(["issue", "figure", "goal", "measured", ""], goal_rows)]
    rss = ", ".join(f"{t} {v} MB" for t, v in r["rss_mb_at_end"].items())
    out += ["", f"RSS at the end: {rss}"]
    return "\n".join(out)

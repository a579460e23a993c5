"""Turns bench/results/overhead.json into the goals check and the Markdown tables printed after a run.

Every figure is a difference from, or a ratio to, another target measured in the same run: absolute
milliseconds on a shared 2-core machine move between runs, side-by-side ratios much less.
"""

from __future__ import annotations

from typing import Any

from bench.procs import markdown_table


def _added(a: dict[str, float], b: dict[str, float], key: str) -> float:
    return round(a[key] - b[key], 3)


def _ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")


def max_rps(r: dict[str, Any], target: str) -> float:
    """The best requests/s a target reached at any concurrency of the run."""
    return max(by_target[target]["rps"] for by_target in r["concurrency"].values())


def figures(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal next to what was measured (ms unless said); `issue` names where the goal was set."""
    seq, cpu, st = r["sequential"], r["cpu_ms_per_request"], r["streaming"]
    added_p50 = _added(seq["lb"], seq["direct"], "p50")
    added_p99 = _added(seq["lb"], seq["direct"], "p99")
    first = _added(st["lb"]["first"], st["direct"]["first"], "p50")
    gap99 = _added(st["lb"]["gaps"], st["direct"]["gaps"], "p99") if "gaps" in st["lb"] else float("nan")
    yard_x = _ratio(cpu["lb"], cpu["yardstick"])
    rows: list[tuple[str, str, str, float, bool]] = [
        ("#3", "lb CPU/request vs yardstick's (x)", "<= 1.5", yard_x, yard_x <= 1.5),
        ("#6", "added p50 over direct, sequential non-streamed", "<= 0.5", added_p50, added_p50 <= 0.5),
        ("#6", "added p99 over direct, sequential non-streamed", "<= 2", added_p99, added_p99 <= 2),
        ("#6", "streamed first chunk added, p50", "<= 1", first, first <= 1),
        ("#6", "gap between chunks added, p99", "<= 1", gap99, gap99 <= 1),
    ]
    if "litellm" in cpu:
        cpu_x = _ratio(cpu["litellm"], cpu["lb"])
        rps_x = _ratio(max_rps(r, "lb"), max_rps(r, "litellm"))
        busiest = max(r["concurrency"].values(), key=lambda by_target: by_target["lb"]["rps"])
        load_x = _ratio(busiest["litellm"]["server_cpu_ms_per_request"], busiest["lb"]["server_cpu_ms_per_request"])
        rows += [
            ("#6", "CPU/request, LiteLLM's / lb's, sequential (x)", ">= 10", cpu_x, cpu_x >= 10),
            ("#6", "CPU/request, LiteLLM's / lb's, at lb's best load (x)", ">= 10", load_x, load_x >= 10),
            ("#6", "max throughput, lb / LiteLLM (x)", ">= 5", rps_x, rps_x >= 5),
        ]
    return [{"issue": i, "figure": f, "goal": g, "measured": m, "met": ok} for i, f, g, m, ok in rows]


def _latency_rows(stats: dict[str, dict[str, float]]) -> list[list[object]]:
    direct = stats["direct"]
    return [
        [t, s["p50"], s["p90"], s["p99"], _added(s, direct, "p50"), _added(s, direct, "p99")] for t, s in stats.items()
    ]


def _streaming_rows(st: dict[str, Any]) -> list[list[object]]:
    rows: list[list[object]] = []
    for t, s in st.items():
        gaps = s.get("gaps", {"p50": float("nan"), "p99": float("nan")})
        rows.append(
            [
                t,
                s["first"]["p50"],
                s["first"]["p99"],
                _added(s["first"], st["direct"]["first"], "p50"),
                s["last"]["p50"],
                _added(s["last"], st["direct"]["last"], "p50"),
                gaps["p50"],
                gaps["p99"],
                round(s["reads_per_stream"], 1),
            ]
        )
    return rows


def _concurrency_rows(r: dict[str, Any]) -> list[list[object]]:
    rows: list[list[object]] = []
    for c, by_target in r["concurrency"].items():
        lb = by_target["lb"]["rps"]
        for t, s in by_target.items():
            rows.append([c, t, s["rps"], _ratio(s["rps"], lb), s["p50"], s["p99"], s["server_cpu_ms_per_request"]])
    return rows


def _stream_load_rows(r: dict[str, Any]) -> list[list[object]]:
    rows: list[list[object]] = []
    for c, by_target in r.get("concurrent_streaming", {}).items():
        direct = by_target["direct"]
        for t, s in by_target.items():
            first, last = s["first"], s["last"]
            rows.append([c, t, first["p50"], first["p99"], _added(first, direct["first"], "p50")])
            rows[-1] += [last["p50"], last["p99"], _added(last, direct["last"], "p50")]
    return rows


def goals_table(rows: list[dict[str, Any]]) -> str:
    body = [[f["issue"], f["figure"], f["goal"], f["measured"], "met" if f["met"] else "MISSED"] for f in rows]
    return markdown_table(["issue", "figure (ms unless x)", "goal", "measured", ""], body)


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
    cpu_rows: list[list[object]] = [[k, v, _ratio(v, cpu["lb"])] for k, v in cpu.items()]
    out += [markdown_table(["proxy", "CPU ms/request", "x lb"], cpu_rows), ""]
    gap = p["chunk_gap"] * 1000
    out += [f"### Streamed chat, {p['chunks']} chunks {gap:g} ms apart, {p['stream_calls']} calls per target", ""]
    head_s = ["target", "first p50", "first p99", "added first p50", "last p50", "added last p50"]
    head_s += ["gap p50", "gap p99", "reads"]
    out += [markdown_table(head_s, _streaming_rows(r["streaming"])), ""]
    out += [f"### Concurrent non-streamed chat, {p['requests']} requests per target (aiohttp client)", ""]
    head_c = ["in flight", "target", "req/s", "x lb", "p50 ms", "p99 ms", "server CPU ms/req"]
    out += [markdown_table(head_c, _concurrency_rows(r)), ""]
    if "concurrent_streaming" in r:
        out += [
            f"### Streamed chat with many in flight, {p['concurrent_streams']} streams per target (aiohttp client)",
            "",
        ]
        head_cs = ["in flight", "target", "first p50", "first p99", "added first p50", "last p50", "last p99"]
        out += [markdown_table([*head_cs, "added last p50"], _stream_load_rows(r)), ""]
    out += ["### Goals", "", goals_table(r["figures"])]
    rss = ", ".join(f"{t} {v} MB" for t, v in r["rss_mb_at_end"].items())
    out += ["", f"RSS at the end: {rss}"]
    return "\n".join(out)

"""`python -m bench report`: docs/benchmarks.md and its PNG plots, redrawn from bench/results/*.json.

Kept apart from the benchmarks so the docs can be redrawn (or restyled) without re-measuring, and
so a smoke test can render them from a tiny fake result. matplotlib runs on the Agg backend: no
display needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import memory, overhead, profile, report
from bench.plots import plot_latency, plot_memory
from bench.procs import ROOT

DOCS = ROOT / "docs"
RESULTS = ROOT / "bench" / "results"
RSS_GOAL_MB, FLAT_MB = 100.0, 5.0


def memory_figures(m: dict[str, Any]) -> list[dict[str, Any]]:
    last = str(m["params"]["checkpoints"][-1])
    rss, growth = m["rss_mb"]["lb"][last], m["growth_mb"]["lb"]
    return [
        {"issue": "#6", "figure": f"lb RSS after {int(last):,} requests (MB)", "goal": "<= 100"}
        | {"measured": rss, "met": rss <= RSS_GOAL_MB},
        {"issue": "#6", "figure": "lb RSS growth after warm-up (MB; flat)", "goal": f"<= {FLAT_MB:g}"}
        | {"measured": growth, "met": growth <= FLAT_MB},
    ]


def markdown(o: dict[str, Any], m: dict[str, Any] | None, profiles: list[dict[str, Any]]) -> str:
    mach = o["machine"]
    o = {**o, "figures": report.figures(o)}  # recomputed: the goals check may be newer than the run
    goals = [f for f in o["figures"] if f["issue"] == "#6"] + (memory_figures(m) if m else [])
    out = ["# Benchmarks", ""]
    out += [f"Measured {o['date'][:16].replace('T', ' ')} UTC on {mach['cpus']} CPUs ({mach['cpu'] or 'unknown'}),"]
    out += [f"Python {mach['python']}, {mach['uname']}. Regenerate with `python -m bench all` (11-15 minutes here)."]
    out += ["Other work ran on the machine at the same time; every comparison below is side by side in one run."]
    out += ["", "## Goals (issue 6)", "", report.goals_table(goals), ""]
    out += ["![latency CDF](latency-cdf.png)", ""]
    out += ["Method: " + overhead.__doc__.split("\n\n", 2)[2].replace("\n", " ").strip(), ""]
    out += ["#" + report.render(o), ""]
    if m:
        out += ["#" + memory.render(m), "", "![RSS under load](memory.png)", ""]
    for p in profiles:
        out += ["#" + profile.render(p), ""]
    return "\n".join(out)


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def write(docs: Path = DOCS, results: Path = RESULTS) -> list[Path]:
    o = json.loads((results / "overhead.json").read_text())
    m = json.loads((results / "memory.json").read_text()) if (results / "memory.json").exists() else None
    profiles = [json.loads(p.read_text()) for p in sorted(results.glob("profile-*.json")) if ".quick" not in p.name]
    docs.mkdir(exist_ok=True)
    written = [docs / "benchmarks.md", docs / "latency-cdf.png"]
    written[0].write_text(markdown(o, m, profiles))
    plot_latency(o, written[1])
    if m:
        written.append(docs / "memory.png")
        plot_memory(m, written[-1])
    return written


def main(argv: list[str] | None = None) -> int:
    for path in write():
        print(f"written: {path.relative_to(ROOT)}")
    return 0

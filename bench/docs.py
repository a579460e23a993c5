"""`python -m bench report`: docs/benchmarks.md and its PNG plots, redrawn from bench/results/*.json.

Kept apart from the benchmarks so the docs can be redrawn (or restyled) without re-measuring, and
so a smoke test can render them from a tiny fake result. matplotlib runs on the Agg backend: no
display needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import deps, memory, overhead, profile, report
from bench.procs import ROOT

DOCS = ROOT / "docs"
RESULTS = ROOT / "bench" / "results"
COLORS = {"direct": "#444444", "yardstick": "#999999", "lb": "#1f77b4", "litellm": "#d62728"}
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


def _cdf(ax: Any, samples: dict[str, list[float]], title: str) -> None:
    from matplotlib.ticker import FuncFormatter

    for target, values in samples.items():
        xs = sorted(values)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.plot(xs, ys, label=target, color=COLORS.get(target), linewidth=1.6)
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.1g}"[0] in "25" else ""))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("ms (log scale)")
    ax.set_ylabel("fraction of calls")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")


def plot_latency(o: dict[str, Any], path: Path) -> None:
    deps.ensure_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    s = o["samples_ms"]
    _cdf(axes[0], s["sequential"], "Sequential non-streamed chat: latency CDF")
    _cdf(axes[1], s["first_chunk"], "Streamed chat: time to first chunk, CDF")
    fig.suptitle(f"Same client, same backend, interleaved; {o['machine']['cpus']} CPUs, {o['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(m: dict[str, Any], path: Path) -> None:
    deps.ensure_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for proxy, points in m["rss_mb"].items():
        xs = [int(k) for k in points]
        ax.plot(xs, list(points.values()), marker="o", label=proxy, color=COLORS.get(proxy))
    ax.set_xlabel("requests served after warm-up")
    ax.set_ylabel("RSS, MB")
    ax.set_ylim(bottom=0)
    ax.set_title("RSS of each proxy process under load", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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

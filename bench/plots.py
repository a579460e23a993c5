"""Every PNG under docs/ that bench/ draws (matplotlib on the Agg backend: no display needed).

One module, so the plots share one look and one way of loading matplotlib, and the benchmarks that
feed them stay free of drawing code. Prompt-cache affinity draws its own (bench/affinity_plot.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import deps
from bench.throttle_plot import success as throttle_success

COLORS = {"direct": "#444444", "yardstick": "#999999", "lb": "#1f77b4", "litellm": "#d62728"}


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, installed on first use (requirements-bench.txt)."""
    deps.ensure_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    s = o["samples_ms"]
    _cdf(axes[0], s["sequential"], "Sequential non-streamed chat: latency CDF")
    _cdf(axes[1], s["first_chunk"], "Streamed chat: time to first chunk, CDF")
    fig.suptitle(f"Same client, same backend, interleaved; {o['machine']['cpus']} CPUs, {o['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(m: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
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


def plot_throttle(result: dict[str, Any], path: Path) -> None:
    """Client success and upstream 429s vs offered load, one line per (policy, state, instances)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    lines: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for run in result["runs"]:
        lines.setdefault((run["policy"], run["state"], run["instances"]), []).append(run)
    colors = {"random": "tab:red", "headroom": "tab:blue"}
    for (policy, state, n), runs in sorted(lines.items()):
        runs.sort(key=lambda r: r["load_pct"])
        loads = [r["load_pct"] for r in runs]
        style = {
            "color": colors.get(policy, "gray"),
            "linestyle": "-" if state == "memory" else "--",
            "marker": "o" if n == 1 else "s",
            "label": f"{policy}, {state}, {n} inst.",
        }
        left.plot(loads, [throttle_success(r) for r in runs], **style)
        right.plot(loads, [100 * r["upstream_429"] / max(r["sent"], 1) for r in runs], **style)
    left.set(xlabel="offered load, % of pool capacity", ylabel="client success, %", title="Client success")
    right.set(xlabel="offered load, % of pool capacity", ylabel="per 100 client calls", title="Upstream 429s")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.set_xticks(sorted({r["load_pct"] for r in result["runs"]}))
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

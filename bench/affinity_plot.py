"""Turns bench/results/affinity.json into the goals check, the docs table and docs/affinity.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.procs import markdown_table

Setting = tuple[int, bool]  # (instances, one backend throttling)


def _pairs(result: dict[str, Any]) -> dict[Setting, dict[str, dict[str, Any]]]:
    pairs: dict[Setting, dict[str, dict[str, Any]]] = {}
    for run in result["runs"]:
        pairs.setdefault((run["instances"], bool(run["throttled"])), {})[run["routing"]] = run
    return pairs


def _where(setting: Setting) -> str:
    n, throttled = setting
    return f"{n} instance{'s' if n > 1 else ''}, {'one backend throttling' if throttled else 'healthy'}"


def success(run: dict[str, Any]) -> float:
    return 100 * run["ok"] / max(run["sent"], 1)


def figures(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal affinity was built to reach, next to what was measured."""
    rows = []
    for setting, by in _pairs(result).items():
        r, a = by.get("random"), by.get("affinity")
        if not (r and a):
            continue
        where = _where(setting)
        of_most = a["cached_share"] / max(a["most_cached_share"], 1e-9)
        rows.append((f"{where}: cached share, affinity / most allowed", ">= 0.9x", f"{of_most:.2f}x", of_most >= 0.9))
        of_random = a["cached_share"] / max(r["cached_share"], 1e-9)
        rows.append((f"{where}: cached share, affinity / random", ">= 1.3x", f"{of_random:.2f}x", of_random >= 1.3))
        if not setting[1]:
            off = a["load_off_share_max"]
            rows.append((f"{where}: load per backend off its weighted share", "<= 10%", f"{off:.1%}", off <= 0.1))
        else:
            rows.append(
                (
                    f"{where}: client success, affinity (random)",
                    "100%",
                    f"{success(a):.1f}% ({success(r):.1f}%)",
                    a["ok"] == a["sent"],
                )
            )
    return [{"figure": f, "goal": g, "measured": m, "met": ok} for f, g, m, ok in rows]


def render(result: dict[str, Any]) -> str:
    """Random vs affinity side by side, one row per (instances, throttling)."""
    rows: list[list[object]] = []
    for setting, by in _pairs(result).items():
        r, a = by.get("random"), by.get("affinity")
        if not (r and a):
            continue
        rows.append(
            [
                setting[0],
                "yes" if setting[1] else "no",
                f"{r['cached_share']:.1%} / {a['cached_share']:.1%}",
                f"{a['most_cached_share']:.1%}",
                " ".join(f"{s:.0%}" for s in r["load"].values())
                + " / "
                + " ".join(f"{s:.0%}" for s in a["load"].values()),
                f"{success(r):.1f}% / {success(a):.1f}%",
                f"{r['upstream_429']} / {a['upstream_429']}",
                f"{r['p50_ms']} / {a['p50_ms']}",
                f"{r['p99_ms']} / {a['p99_ms']}",
            ]
        )
    head = [
        "instances",
        "backend 1 throttling",
        "cached share random / affinity",
        "most allowed",
        "load per backend random / affinity",
        "client success",
        "upstream 429s",
        "p50 ms",
        "p99 ms",
    ]
    p = result["params"]
    cost = result.get("key_cost_us", {})
    cost_table = markdown_table(
        ["body", "bytes", "conversation key, us", "json.loads, us"],
        [[name, c["bytes"], c["key_us"], c["json_loads_us"]] for name, c in cost.items()],
    )
    out = [
        f"Prompt-cache affinity ({result['date']}, commit {result.get('commit') or '?'}, "
        f"{result['machine']['cpus']} CPUs): {p['conversations']} conversations, {p['calls']} calls, "
        f"{p['backends']} backends",
        "",
        markdown_table(head, rows),
        "",
        markdown_table(
            ["figure", "goal", "measured", ""],
            [[f["figure"], f["goal"], f["measured"], "met" if f["met"] else "MISSED"] for f in figures(result)],
        ),
        *(["", cost_table] if cost else []),
    ]
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path) -> None:
    """Cached share (random, affinity, most allowed) and load per backend, per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [(s, by) for s, by in _pairs(result).items() if "random" in by and "affinity" in by]
    labels = [f"{n} inst.\n{'throttling' if t else 'healthy'}" for (n, t), _ in pairs]
    x = list(range(len(pairs)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.27
    for offset, (name, color, get) in enumerate(
        [
            ("random", "tab:red", lambda by: by["random"]["cached_share"]),
            ("affinity", "tab:blue", lambda by: by["affinity"]["cached_share"]),
            ("most allowed", "tab:gray", lambda by: by["affinity"]["most_cached_share"]),
        ]
    ):
        left.bar(
            [i + (offset - 1) * width for i in x], [100 * get(by) for _, by in pairs], width, label=name, color=color
        )
    left.set(ylabel="% of prompt tokens", title="Cached share of prompt tokens")
    left.set_xticks(x, labels, fontsize=8)
    left.legend(fontsize=8, loc="lower right")
    backends = list(pairs[0][1]["random"]["load"]) if pairs else []
    for offset, routing in enumerate(("random", "affinity")):
        for j, backend in enumerate(backends):
            right.bar(
                [i + (offset - 0.5) * 0.4 + (j - 1) * 0.12 for i in x],
                [100 * by[routing]["load"][backend] for _, by in pairs],
                0.12,
                color=("tab:red", "tab:blue")[offset],
                alpha=(1.0, 0.65, 0.35)[j % 3],
                label=f"{routing}, backend {backend}",
            )
    if backends:
        right.axhline(100 / len(backends), color="black", linewidth=0.8, linestyle="--", label="weighted share")
    right.set(ylabel="% of calls", title="Load per backend (left: random, right: affinity)")
    right.set_xticks(x, labels, fontsize=8)
    right.legend(fontsize=6, ncol=2, loc="lower center")
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

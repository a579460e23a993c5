"""Turns bench/results/throttle.json into the goals check and the README table (the plot: bench/plots.py)."""

from __future__ import annotations

from typing import Any

from bench.procs import markdown_table

Key = tuple[str, int, int]  # (state, instances, load %)


def _pairs(result: dict[str, Any]) -> dict[Key, dict[str, dict[str, Any]]]:
    """Runs grouped by setting, then by policy."""
    pairs: dict[Key, dict[str, dict[str, Any]]] = {}
    for run in result["runs"]:
        pairs.setdefault((run["state"], run["instances"], run["load_pct"]), {})[run["policy"]] = run
    return pairs


def success(run: dict[str, Any]) -> float:
    return 100 * run["ok"] / max(run["sent"], 1)


def figures(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal next to what was measured, per state and instance count."""
    rows = []
    pairs = _pairs(result)
    # p99 noise floor: at 50% neither policy meets a 429, yet their p99s differ by this much in one run.
    noise = max(
        (
            abs(by["random"]["p99_ms"] - by["headroom"]["p99_ms"])
            for (_, _, ld), by in pairs.items()
            if ld == 50 and len(by) == 2
        ),
        default=0.0,
    )
    for (state, n, load), by in pairs.items():
        where = f"{state}, {n} instance{'s' if n > 1 else ''}"
        r, h = by.get("random"), by.get("headroom")
        if load == 90 and r and h:
            if r["upstream_429"]:
                cut = 100 * (1 - h["upstream_429"] / r["upstream_429"])
                measured, met = f"{cut:.0f}% ({r['upstream_429']} -> {h['upstream_429']})", cut >= 50
            else:
                measured, met = f"random had none ({h['upstream_429']} with headroom)", h["upstream_429"] == 0
            rows.append(("#8", f"{where}, 90%: fewer upstream 429s, headroom vs random", ">= 50%", measured, met))
            ok = success(h) >= success(r)
            rows.append(
                (
                    "#8",
                    f"{where}, 90%: client success, headroom vs random",
                    ">=",
                    f"{success(h):.1f}% vs {success(r):.1f}%",
                    ok,
                )
            )
            p99 = (h["p99_ms"] or 0) <= (r["p99_ms"] or 0) + noise
            rows.append(
                (
                    "#8",
                    f"{where}, 90%: p99 ms, headroom vs random",
                    f"<= (+{noise:.1f} noise)",
                    f"{h['p99_ms']} vs {r['p99_ms']}",
                    p99,
                )
            )
        for policy, run in by.items():
            if load == 90:
                rows.append(
                    (
                        "#6",
                        f"{where}, 90%, {policy}: client success",
                        ">= 99.9%",
                        f"{success(run):.1f}%",
                        success(run) >= 99.9,
                    )
                )
            if load == 130:
                failed = run["sent"] - run["ok"]
                good = failed - run["client_other_failures"] - run["retry_after_late"]
                rows.append(
                    (
                        "#6",
                        f"{where}, 130%, {policy}: failed calls that are 429 with Retry-After <= soonest refill",
                        "all",
                        f"{good} of {failed}",
                        good == failed,
                    )
                )
    at90 = [by for (_, _, ld), by in pairs.items() if ld == 90 and len(by) == 2]
    r_all, h_all = (sum(by[p]["upstream_429"] for by in at90) for p in ("random", "headroom"))
    if r_all:
        cut = 100 * (1 - h_all / r_all)
        rows.append(
            (
                "#8",
                "all 90% settings: fewer upstream 429s in total",
                ">= 50%",
                f"{cut:.0f}% ({r_all} -> {h_all})",
                cut >= 50,
            )
        )
    return [{"issue": i, "figure": f, "goal": g, "measured": m, "met": ok} for i, f, g, m, ok in rows]


def render(result: dict[str, Any]) -> str:
    """Random vs headroom side by side, one row per (state, instances, load)."""
    rows: list[list[object]] = []
    for (state, n, load), by in _pairs(result).items():
        r, h = by.get("random"), by.get("headroom")
        if not (r and h):
            continue
        change = (
            f"{100 * (h['upstream_429'] - r['upstream_429']) / r['upstream_429']:+.0f}%" if r["upstream_429"] else "-"
        )
        rows.append(
            [
                state,
                n,
                f"{load}%",
                f"{r['upstream_429']} / {h['upstream_429']}",
                change,
                f"{success(r):.1f}% / {success(h):.1f}%",
                f"{r['client_429']} / {h['client_429']}",
                f"{r['p99_ms']} / {h['p99_ms']}",
                f"{r['p99_ok_ms']} / {h['p99_ok_ms']}",
                f"{r['retry_after_late']} ({r.get('retry_after_late_for_call', '-')}) / "
                f"{h['retry_after_late']} ({h.get('retry_after_late_for_call', '-')})",
            ]
        )
    head = [
        "state",
        "instances",
        "load",
        "upstream 429s random / headroom",
        "change",
        "client success",
        "client 429s",
        "p99 ms, all calls",
        "p99 ms, served",
        "client 429s whose Retry-After is past the soonest refill (past when a backend would take that call)",
    ]
    p = result["params"]
    out = [
        f"Throttling simulation ({result['date']}, {result['machine']['cpus']} CPUs): {p['backends']} backends x "
        f"{p['tokens_per_window']} tokens / {p['window_seconds']:g} s, capacity {p['capacity_calls_per_second']} "
        f"calls/s, {p['seconds_per_setting']:g} s per setting",
        "",
        markdown_table(head, rows),
        "",
        markdown_table(
            ["issue", "figure", "goal", "measured", ""],
            [
                [f["issue"], f["figure"], f["goal"], f["measured"], "met" if f["met"] else "MISSED"]
                for f in figures(result)
            ],
        ),
    ]
    return "\n".join(out)

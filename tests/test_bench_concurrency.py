"""bench/concurrency.py: the verdict logic, and a tiny real run (lb serve and two backends as processes)."""

from __future__ import annotations

import json

import pytest

from bench import concurrency

pytestmark = pytest.mark.bench  # runs the bench scripts in miniature


def row(n: int, direct_p99: float, lb_p99: float, broken: int = 0) -> dict:
    side = {"gap_p99_ms": 0.0, "gap_max_ms": 1.0, "broken": 0}
    return {
        "streams": n,
        "direct": {**side, "gap_p99_ms": direct_p99},
        "lb": {**side, "gap_p99_ms": lb_p99, "broken": broken},
        "lb_cpu_share": 0.1,
        "lb_rss_mb_peak": 60.0,
        "load_avg_1m": 1.0,
    }


def test_a_count_holds_when_the_median_added_p99_is_within_budget_and_nothing_broke():
    rows = [row(100, 52.0, 53.0), row(100, 52.0, 70.0), row(100, 52.0, 55.0)]  # added 1, 18, 3: median 3
    rows += [row(500, 52.0, 60.0), row(500, 52.0, 59.0)]  # median 7.5
    rows += [row(250, 52.0, 53.0, broken=1)]
    summary = {s["streams"]: s for s in concurrency.summarise(rows)}
    assert summary[100]["added_gap_p99_ms"] == 3.0 and summary[100]["holds"]
    assert summary[500]["added_gap_p99_ms"] == 7.5 and not summary[500]["holds"]
    assert not summary[250]["holds"]  # within budget, but a stream broke


def test_a_tiny_run_measures_both_sides_and_writes_its_verdict(tmp_path):
    out = tmp_path / "c.json"
    status = concurrency.main(["--streams", "5", "--seconds", "0.5", "--ramp", "0.1", "--out", str(out)])
    assert status == 0
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    for side in ("direct", "lb"):
        assert run[side]["broken"] == 0
        assert run[side]["events"] == 5 * (10 + 2)  # 10 chunks of 50 ms, the finish chunk and [DONE]
    assert run["lb_cpu_share"] > 0 and run["lb_rss_mb_peak"] > 10
    assert result["summary"][0]["streams"] == 5 and "commit" in result and "date" in result

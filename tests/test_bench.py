"""Smoke tests of the benchmark scripts: they import, and render their reports from tiny fake results.

Nothing here times anything or starts a server: the benchmarks measure, the tests only check that
their reporting code still runs on the result shape the benchmarks write.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import __main__ as bench_main
from bench import docs, memory, profile, report

pytestmark = pytest.mark.bench  # runs the bench scripts in miniature

TARGETS = ("direct", "yardstick", "lb", "litellm")


def _stats(base: float) -> dict[str, float]:
    return {"p50": base, "p90": base * 1.2, "p99": base * 1.5, "mean": base * 1.1}


def fake_overhead() -> dict:
    base = {"direct": 0.7, "yardstick": 1.7, "lb": 1.8, "litellm": 7.0}
    r = {
        "date": "2026-11-26T04:00:00+00:00",
        "machine": {"cpus": 2, "cpu": "test cpu", "python": "3.11.7", "uname": "Linux"},
        "params": {"calls": 3, "sdk_calls": 3, "cpu_calls": 3, "stream_calls": 3, "chunks": 20, "chunk_gap": 0.02}
        | {"requests": 10, "concurrent_streams": 4},
        "sequential": {t: _stats(v) for t, v in base.items()},
        "sdk_sequential": {t: _stats(v + 1) for t, v in base.items()},
        "cpu_ms_per_request": {"yardstick": 1.1, "lb": 1.2, "litellm": 6.0},
        "streaming": {
            t: {"first": _stats(v + 1), "last": _stats(v + 390), "gaps": _stats(20.1), "reads_per_stream": 22.0}
            for t, v in base.items()
        },
        "concurrency": {
            "16": {t: {"rps": 600.0 / v, **_stats(v * 10), "server_cpu_ms_per_request": v} for t, v in base.items()}
        },
        "concurrent_streaming": {
            "16": {t: {"first": _stats(v + 2), "last": _stats(v + 395)} for t, v in base.items()},
        },
        "rss_mb_at_end": {t: 40.0 for t in TARGETS},
        "samples_ms": {
            "sequential": {t: [v, v * 1.1, v * 1.3] for t, v in base.items()},
            "first_chunk": {t: [v + 1, v + 1.2, v + 1.5] for t, v in base.items()},
        },
    }
    r["figures"] = report.figures(r)
    return r


def fake_memory() -> dict:
    rss = {p: {"0": 40.0, "1000": 40.5, "10000": 41.0} for p in ("yardstick", "lb", "litellm")}
    return {
        "date": "2026-11-26T04:00:00+00:00",
        "params": {"warmup": 200, "concurrency": 16, "stream_every": 10, "checkpoints": [1000, 10000]},
        "rss_mb": rss,
        "growth_mb": {p: 1.0 for p in rss},
    }


def test_figures_compare_lb_with_direct_and_litellm() -> None:
    by_name = {f["figure"]: f for f in report.figures(fake_overhead())}
    assert by_name["added p50 over direct, sequential non-streamed"]["measured"] == pytest.approx(1.1)
    assert by_name["CPU/request, LiteLLM's / lb's, sequential (x)"]["measured"] == 5.0
    assert by_name["max throughput, lb / LiteLLM (x)"]["met"] is False


def test_overhead_report_renders_every_target() -> None:
    text = report.render(fake_overhead())
    assert all(f"| {t} |" in text for t in TARGETS)
    assert "| 16 | lb | 3.8 |" in text  # streams 16 at a time: first chunk p50


def test_profile_summary_charges_samples_to_the_innermost_package() -> None:
    raw = (
        "run (asyncio/runners.py:1);handle (lb/proxy.py:9);send (httpx/_client.py:5) 3\nrun (asyncio/runners.py:1) 1\n"
    )
    summary = profile.summarise(raw)
    assert summary["self_pct"] == {"httpx": 75.0, "asyncio": 25.0}
    assert summary["on_stack_pct"]["lb (this project)"] == 75.0
    text = profile.render(
        {"date": "d", "params": {"target": "lb", "requests": 4}, "cpu_ms_per_request": 1.0, **summary}
    )
    assert "| httpx | 75.0 | 75.0 | 750 |" in text


def test_docs_render_from_fake_results(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "overhead.json").write_text(json.dumps(fake_overhead()))
    (results / "memory.json").write_text(json.dumps(fake_memory()))
    text = docs.markdown(fake_overhead(), fake_memory(), [])
    assert "lb RSS after 10,000 requests (MB)" in text and "latency-cdf.png" in text
    assert "| yardstick | 40.0 | 40.5 | 41.0 | 1.0 |" in memory.render(fake_memory())
    pytest.importorskip("matplotlib")  # requirements-bench.txt; plots are drawn only where it is installed
    written = docs.write(tmp_path / "docs", results)
    assert all(p.stat().st_size > 0 for p in written)


def test_all_skips_a_benchmark_whose_module_is_missing(monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench_main, "BENCHMARKS", {"load": "bench.not_there_yet"})
    assert bench_main.run_all([]) == 0
    assert "not there yet, skipped" in capsys.readouterr().out


def test_redteam_help_prints_its_options_and_runs_nothing(capsys):
    from bench import redteam

    assert redteam.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--only" in out and "--hanging-calls" in out

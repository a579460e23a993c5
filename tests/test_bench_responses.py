"""bench/responses.py, tiny: Responses API calls through lb serve with a throttling backend, all complete."""

from __future__ import annotations

import json

import pytest

from bench import responses

pytestmark = pytest.mark.bench  # runs the bench scripts in miniature


def test_a_tiny_run_counts_complete_answers_and_times_first_events_on_both_paths(tmp_path):
    out = tmp_path / "r.json"
    status = responses.main(["--calls", "12", "--rpm", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert status == 0 and result["success_pct"] == 100.0
    assert result["success_streamed_pct"] == 100.0 and result["success_non_streamed_pct"] == 100.0
    assert set(result["statuses"]) == {"200"}  # the throttling backend's 429s never reached the client
    assert result["failovers_the_client_never_saw"] >= 1
    first = result["first_event_ms"]
    assert first["pairs"] == 6 and first["direct_p50"] > 0 and first["lb_p50"] > 0

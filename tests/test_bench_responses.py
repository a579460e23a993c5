"""bench/responses.py, tiny: Responses API calls through lb serve with a throttling backend, all complete."""

from __future__ import annotations

import json

import pytest

from bench import responses

pytestmark = pytest.mark.bench  # runs the bench scripts in miniature


def test_a_tiny_run_counts_complete_answers_and_times_first_events_on_both_paths(tmp_path):
    out = tmp_path / "r.json"
    # A failover needs the throttling backend (quota: 1 call) picked twice. The 6 warm-up and 24 calls,
    # and a second call through lb per streamed one (3 + 12), are 45 picks, each of 3 backends at
    # random: P(0 or 1 of them it) = (2/3)^45 + 45 * (1/3) * (2/3)^44 = 2.8e-7, the false failure.
    args = ["--calls", "24", "--rpm", "1", "--chunk-gap", "0", "--out", str(out)]  # the streams unpaced
    status = responses.main(args)
    result = json.loads(out.read_text())
    assert status == 0 and result["success_pct"] == 100.0
    assert result["success_streamed_pct"] == 100.0 and result["success_non_streamed_pct"] == 100.0
    assert set(result["statuses"]) == {"200"}  # the throttling backend's 429s never reached the client
    assert result["failovers_the_client_never_saw"] >= 1
    first = result["first_event_ms"]
    assert first["pairs"] == 12 and first["direct_p50"] > 0 and first["lb_p50"] > 0

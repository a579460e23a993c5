"""`python -m lb demo` (README's first command) runs both scenarios and shows every kind of call."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lb.demo import absorbed

pytestmark = pytest.mark.e2e  # runs `python -m lb demo`

ROOT = Path(__file__).resolve().parents[1]


def test_demo_shows_responses_api_calls_beside_chat_and_embeddings_and_exits_zero():
    # --quick: the same calls and scenarios as `make demo`, without its simulated latency and waits
    command = [sys.executable, "-m", "lb", "demo", "--quick"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    summary = out.split("by kind:", 1)[1].splitlines()[0]
    by_kind = {kind.strip(): count for kind, count in re.findall(r"([a-z ()]+?) (\d+/\d+)", summary)}
    # 50 calls, 10 of each kind; the throttled scenario adds rounds of all five kinds while no 429 came
    assert set(by_kind) == {"chat", "chat (streamed)", "embeddings", "responses", "responses (streamed)"}
    assert len(set(by_kind.values())) == 1
    answered, made = map(int, by_kind["chat"].split("/"))
    assert answered == made >= 10
    assert re.search(r"\[throttled\] #\d+ +responses \(streamed\) +-> backend-\d  200", out)
    assert re.search(r"throttled: \d+/\d+ calls answered 200, [1-9]\d* upstream 429s? absorbed", out)
    assert re.search(r"recovered: \d+/\d+ calls answered 200, \d+ upstream 429s? absorbed", out)
    assert "client-visible failures: 0" in out


def test_the_summary_counts_429s_in_good_english():
    assert [absorbed(n) for n in (0, 1, 2)] == [
        "0 upstream 429s absorbed",
        "1 upstream 429 absorbed",
        "2 upstream 429s absorbed",
    ]

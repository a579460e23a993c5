"""The affinity benchmark's workload and report, without starting anything (bench/affinity*.py)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from bench.affinity_load import Turn, conversations, most_cached
from bench.affinity_plot import figures, render
from lb.config import Backend
from lb.sim.cache import prompt_text

pytestmark = pytest.mark.bench  # runs the bench scripts in miniature


def test_conversations_have_3_to_10_turns_each_repeating_the_last_as_its_prefix():
    convs = conversations(50, 10.0, (0.5, 1.5), seed=1)
    assert {c.turns for c in convs} <= set(range(3, 11))
    assert len({c.messages[0]["content"] for c in convs}) == 1  # one shared system prompt
    assert len({c.messages[1]["content"] for c in convs}) == 50  # each its own sources
    for conv in convs[:5]:
        texts = [prompt_text(conv.body(t)) for t in range(conv.turns)]
        assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    assert conversations(50, 10.0, (0.5, 1.5), seed=1)[7].body(2) == convs[7].body(2)  # seeded


def test_the_bound_is_one_backend_holding_every_prefix():
    conv = conversations(1, 0.0, (1.0, 1.0), seed=2)[0]
    turns = [Turn(0, t, float(t), text=prompt_text(conv.body(t))) for t in range(conv.turns)]
    alone = most_cached(turns[:1])
    assert alone == 0.0  # nothing seen before the first call
    assert 0.5 < most_cached(turns) < 1.0


def run(routing: str, instances: int, throttled: bool, cached: float, load: dict[str, float], ok: int = 100) -> dict:
    off = max(abs(s * 3 - 1) for s in load.values())
    return {
        "instances": instances,
        "throttled": throttled,
        "routing": routing,
        "sent": 100,
        "ok": ok,
        "cached_share": cached,
        "most_cached_share": 0.8,
        "load": load,
        "load_off_share_max": off,
        "upstream_429": 3 if throttled else 0,
        "p50_ms": 50.0,
        "p99_ms": 90.0,
    }


@pytest.fixture
def result() -> dict:
    even, skewed = {"1": 0.33, "2": 0.34, "3": 0.33}, {"1": 0.2, "2": 0.4, "3": 0.4}
    return {
        "date": "2026-12-01T03:00:00+00:00",
        "commit": "abc1234",
        "machine": {"cpus": 2, "python": "3.11.7"},
        "params": {"conversations": 200, "calls": 1300, "backends": 3},
        "key_cost_us": {"hello": {"bytes": 70, "key_us": 5.0, "json_loads_us": 3.0}},
        "runs": [
            run("random", 1, False, 0.56, even),
            run("affinity", 1, False, 0.78, even),
            run("random", 4, True, 0.57, skewed),
            run("affinity", 4, True, 0.70, skewed, ok=99),
        ],
    }


def test_the_report_checks_every_goal_of_the_issue(result: dict):
    met = {f["figure"]: f["met"] for f in figures(result)}
    assert met["1 instance, healthy: cached share, affinity / most allowed"] is True  # 0.975x
    assert met["1 instance, healthy: cached share, affinity / random"] is True  # 1.39x
    assert met["1 instance, healthy: load per backend off its weighted share"] is True
    assert met["4 instances, one backend throttling: cached share, affinity / random"] is False  # 1.23x
    assert met["4 instances, one backend throttling: client success, affinity (random)"] is False  # 99 of 100
    text = render(result)
    assert "56.0% / 78.0%" in text and "commit abc1234" in text and "json.loads" in text


def test_the_plot_is_drawn(result: dict, tmp_path: Path):
    pytest.importorskip("matplotlib")
    from bench.affinity_plot import plot

    plot(result, tmp_path / "affinity.png")
    assert (tmp_path / "affinity.png").stat().st_size > 10_000


def test_the_offline_model_replays_the_pick_and_affinity_beats_random():
    from bench.affinity_model import most, replay

    convs = conversations(30, 5.0, (0.5, 1.5), seed=3)
    with_affinity, load = replay(convs, 1, 0.95)
    at_random, _ = replay(convs, 1, None)
    assert at_random < with_affinity <= most(convs) + 1e-9
    assert abs(sum(load) - 1) < 1e-9


def test_the_offline_model_takes_backend_1_out_in_spells_and_compares_routers_no_proxy_can_be():
    from bench.affinity_model import PERIOD, SPELL, most, replay

    convs = conversations(40, 20.0, (0.5, 1.5), seed=3)
    healthy, _ = replay(convs, 1, 0.95)
    shares = {r: replay(convs, 1, 0.95, throttled=True, router=r) for r in ("affinity", "sticky", "oracle")}
    at_random, load = replay(convs, 1, None, throttled=True)
    assert load[0] < 1 / 3 * (1 - SPELL / PERIOD / 2)  # backend 1 misses its calls during the spells
    assert shares["affinity"][0] < healthy  # a spell costs the cache of the turns it moves
    assert at_random < shares["affinity"][0] <= shares["oracle"][0] <= most(convs) + 1e-9
    assert shares["sticky"][1][0] < shares["affinity"][1][0]  # sticky keeps what the spells moved off backend 1


def test_the_on_off_cost_run_measures_both_processes():
    from bench.affinity_cost import measure

    cpu = measure(calls=40, backends=2, blocks=2, warmup=5)
    assert set(cpu) == {"on", "off"} and all(v >= 0 for v in cpu.values())


def test_the_bound_benchmark_crafts_keys_as_a_client_would_and_measures_from_call_30():
    from bench.affinity_bound import crafted_offline, holds_from, long_body, worst_share
    from lb.routing.affinity import _draw, conversation_key, rank

    keys = crafted_offline(20, ["1", "2", "3"])
    backends = [Backend(name, f"https://{name}") for name in ("1", "2", "3")]
    for key in keys:
        k = conversation_key(json.dumps(long_body(key)).encode())
        assert k is not None and rank(k, backends)[0] == 0 and _draw(k, backends[0]) > 0.7
    even = ["1", "2", "3"] * 20
    assert worst_share(even) < 1.1 and holds_from(even) == 5  # 2 of the first 4 calls is 1.5x a third
    piled = ["1"] * 30 + ["2", "3"] * 60
    assert worst_share(piled) == 3.0
    assert holds_from(piled) == 1 + max(n for n in range(1, 151) if piled[:n].count("1") > 1.35 * n / 3)
    assert holds_from(["1"] * 40) is None

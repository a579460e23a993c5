from __future__ import annotations

import random
from collections import Counter

from lb.balancer import Balancer, NoCandidate
from lb.config import Backend
from lb.state import ANY_DEPLOYMENT, MemoryStore

NOW = 1_000.0


def make(*backends: Backend) -> Balancer:
    return Balancer(backends, MemoryStore(), rng=random.Random(7))


def test_only_the_best_priority_group_is_used():
    balancer = make(Backend("a", "https://a", priority=2), Backend("b", "https://b", priority=1))
    assert {balancer.pick("chat", NOW).name for _ in range(50)} == {"b"}


def test_weights_split_the_group():
    balancer = make(Backend("a", "https://a", weight=3), Backend("b", "https://b", weight=1))
    counts = Counter(balancer.pick("chat", NOW).name for _ in range(4000))
    assert 2.6 < counts["a"] / counts["b"] < 3.4


def test_cooling_backends_are_skipped_and_the_next_group_used():
    balancer = make(Backend("a", "https://a", priority=1), Backend("b", "https://b", priority=2))
    balancer.store.mark("a", "chat", NOW + 5, "429")
    assert balancer.pick("chat", NOW).name == "b"
    assert balancer.pick("embedding", NOW).name == "a"  # cooldown is per deployment
    assert balancer.pick("chat", NOW + 6).name == "a"  # and ends


def test_all_cooling_reports_the_soonest_recovery():
    balancer = make(Backend("a", "https://a"), Backend("b", "https://b"))
    balancer.store.mark("a", "chat", NOW + 8, "429")
    balancer.store.mark("b", "chat", NOW + 3, "429")
    assert balancer.pick("chat", NOW) == NoCandidate(served=True, retry_at=NOW + 3)
    assert balancer.soonest_recovery("chat", NOW) == NOW + 3


def test_deployments_filter_and_unknown_deployment():
    balancer = make(Backend("a", "https://a", deployments=frozenset({"chat"})), Backend("b", "https://b"))
    assert {balancer.pick("embedding", NOW).name for _ in range(20)} == {"b"}
    only = make(Backend("a", "https://a", deployments=frozenset({"chat"})))
    assert only.pick("embedding", NOW) == NoCandidate(served=False, retry_at=0.0)


def test_tried_backends_are_not_picked_again():
    balancer = make(Backend("a", "https://a"), Backend("b", "https://b"))
    assert balancer.pick("chat", NOW, tried={"a"}).name == "b"
    assert isinstance(balancer.pick("chat", NOW, tried={"a", "b"}), NoCandidate)


def test_calls_without_deployment_use_their_own_key():
    balancer = make(Backend("a", "https://a"))
    balancer.store.mark("a", ANY_DEPLOYMENT, NOW + 5, "429")
    assert isinstance(balancer.pick(None, NOW), NoCandidate)
    assert balancer.pick("chat", NOW).name == "a"


def test_a_longer_cooldown_is_never_shortened():
    store = MemoryStore()
    store.mark("a", "chat", NOW + 30, "429")
    store.mark("a", "chat", NOW + 5, "429")
    assert store.cooling_until("a", "chat", NOW) == NOW + 30

from __future__ import annotations

import asyncio
import random
from collections import Counter

from lb.config import Backend
from lb.requestinfo import RequestInfo, described
from lb.routing.balancer import Balancer, NoCandidate
from lb.routing.headroom import Headroom
from lb.state import ANY_DEPLOYMENT, MemoryStore

NOW = 1_000.0


def asked(body: bytes) -> RequestInfo:
    """A chat call carrying `body`, read as the proxy reads it."""
    return asyncio.run(described("/openai/deployments/chat/chat/completions", body))


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


# Headroom policy ------------------------------------------------------------------------------


def headroom_pool(*backends: Backend) -> Balancer:
    return Balancer(backends, MemoryStore(), rng=random.Random(7), policy="headroom")


def report(balancer: Balancer, name: str, tokens: int, *, requests: int = 100, at: float = NOW, **extra: str) -> None:
    headers = {"x-ratelimit-remaining-requests": str(requests), "x-ratelimit-remaining-tokens": str(tokens), **extra}
    balancer.headroom.record(name, "chat", headers, at)


def shares(
    balancer: Balancer, n: int = 4000, need: int = 0, at: float = NOW, left: dict[str, int] | None = None
) -> Counter:
    """Who n picks go to; `left` is reported again before each pick, so the picks' own charges don't add up."""
    counts: Counter = Counter()
    for _ in range(n):
        for name, tokens in (left or {}).items():
            report(balancer, name, tokens, at=at)
        counts[balancer.pick("chat", at, need=need).name] += 1
    return counts


def test_random_policy_ignores_reported_headroom_and_estimates_nothing():
    balancer = make(Backend("a", "https://a"), Backend("b", "https://b"))
    report(balancer, "a", 10_000)
    report(balancer, "a", 100)
    counts = Counter(balancer.pick("chat", NOW, need=5_000).name for _ in range(4000))
    assert 0.9 < counts["a"] / counts["b"] < 1.1
    assert balancer.demand(asked(b'{"max_tokens": 500}')).tokens == 0


def test_headroom_policy_weights_the_pick_by_the_share_of_quota_left():
    balancer = headroom_pool(Backend("a", "https://a"), Backend("b", "https://b"))
    for name in "ab":
        report(balancer, name, 10_000)
    report(balancer, "a", 2_500)
    counts = shares(balancer)
    assert 3.4 < counts["b"] / counts["a"] < 4.6  # 100% left vs 25% left


def test_headroom_multiplies_the_configured_weights():
    balancer = headroom_pool(Backend("a", "https://a", weight=3), Backend("b", "https://b", weight=1))
    for name in "ab":
        report(balancer, name, 10_000)
    report(balancer, "a", 5_000)
    counts = shares(balancer)
    assert 1.25 < counts["a"] / counts["b"] < 1.75  # 3 x 50% vs 1 x 100%


def test_a_backend_with_fewer_tokens_left_than_the_request_needs_is_passed_over():
    balancer = headroom_pool(Backend("a", "https://a"), Backend("b", "https://b"))
    report(balancer, "a", 10_000)
    left = {"a": 600, "b": 2_000}  # fitting takes twice the call's tokens: calls in flight are not in a reading
    assert set(shares(balancer, 200, need=700, left=left)) == {"b"}
    assert set(shares(balancer, 200, need=250, left=left)) == {"a", "b"}


def test_when_every_backend_is_short_the_pick_still_goes_by_headroom_and_never_refuses():
    balancer = headroom_pool(Backend("a", "https://a"), Backend("b", "https://b"))
    for name in "ab":
        report(balancer, name, 10_000)
    counts = shares(balancer, need=5_000, left={"a": 500, "b": 3_000})
    assert 4.5 < counts["b"] / counts["a"] < 7.5  # 30% left vs 5%


def test_a_stale_reading_never_starves_a_backend_it_gets_a_full_share():
    balancer = headroom_pool(Backend("a", "https://a"), Backend("b", "https://b"))
    for name in "ab":
        report(balancer, name, 10_000)
    report(balancer, "a", 1)
    assert shares(balancer)["a"] > 0  # even a fresh near-zero reading keeps a minimum share
    later = NOW + balancer.headroom.stale_after
    report(balancer, "b", 10_000, at=later)
    counts = shares(balancer, at=later)
    assert 0.9 < counts["a"] / counts["b"] < 1.1


def test_a_backend_that_reported_zero_left_is_skipped_like_a_cooling_one_until_its_reset():
    balancer = headroom_pool(Backend("a", "https://a", priority=1), Backend("b", "https://b", priority=2))
    report(balancer, "a", 5_000, requests=0, **{"x-ratelimit-reset-requests": "4s"})
    assert balancer.pick("chat", NOW).name == "b"  # the next group, as when a cools
    assert balancer.pick("chat", NOW, tried={"b"}) == NoCandidate(served=True, retry_at=NOW + 4)
    assert balancer.soonest_recovery("chat", NOW) == NOW + 4
    assert balancer.pick("chat", NOW + 4).name == "a"
    assert make(Backend("a", "https://a")).soonest_recovery("chat", NOW) == 0.0


def test_the_request_size_estimate_is_made_only_under_the_headroom_policy():
    balancer = headroom_pool(Backend("a", "https://a"))
    assert balancer.demand(asked(b'{"max_tokens": 500}')).tokens == 19 // 4 + 500
    assert balancer.demand(asked(b"")).tokens == 0


def test_calls_sent_since_the_last_reading_count_against_it():
    balancer = headroom_pool(Backend("a", "https://a"), Backend("b", "https://b"))
    for name in "ab":
        report(balancer, name, 10_000)
    assert balancer.pick("chat", NOW, tried={"b"}, need=6_000).name == "a"  # a now has ~4000 left
    assert [balancer.pick("chat", NOW, need=2_500).name for _ in range(2)] == ["b", "b"]  # a is short of 2 x 2500
    report(balancer, "a", 10_000, at=NOW + 0.5)  # the next answer's reading includes that call
    assert balancer.headroom.share("a", "chat", 5_000, NOW + 0.5) == (1.0, False)


def test_tokens_left_are_extrapolated_at_the_rate_other_callers_spend_them():
    headroom = Headroom()
    headroom.record("a", "chat", {"x-ratelimit-remaining-tokens": "10000"}, NOW)
    headroom.record("a", "chat", {"x-ratelimit-remaining-tokens": "8000"}, NOW + 1)  # 2000 a second
    assert headroom.share("a", "chat", 0, NOW + 1)[0] == 0.8
    assert headroom.share("a", "chat", 0, NOW + 2)[0] == 0.6  # nobody told us, but others kept spending
    assert headroom.share("a", "chat", 7_500, NOW + 1.5)[1] is True
    headroom.record("a", "chat", {"x-ratelimit-remaining-tokens": "10000"}, NOW + 3)  # refilled
    assert headroom.share("a", "chat", 0, NOW + 3)[0] == 1.0


def test_when_the_preferred_group_is_short_for_the_call_the_next_group_that_fits_takes_it():
    balancer = headroom_pool(Backend("a", "https://a", priority=1), Backend("b", "https://b", priority=2))
    report(balancer, "a", 300)
    assert balancer.pick("chat", NOW, need=500).name == "b"
    assert balancer.pick("chat", NOW, need=100).name == "a"


def test_backends_short_for_the_call_are_still_tried_last_as_their_quota_may_have_refilled():
    balancer = headroom_pool(Backend("a", "https://a"), Backend("b", "https://b"), Backend("c", "https://c"))
    for name in "abc":
        report(balancer, name, 10_000)
    for name in "bc":
        report(balancer, name, 300)
    assert balancer.pick("chat", NOW, need=500).name == "a"  # the one that fits goes first
    assert balancer.pick("chat", NOW, tried={"a"}, need=500).name in {"b", "c"}  # never a refusal


def test_a_pick_that_only_looks_charges_no_backend():
    balancer = headroom_pool(Backend("a", "https://a"))
    report(balancer, "a", 10_000)
    for _ in range(20):
        balancer.pick("chat", NOW, need=1_000, charge=False)
    assert balancer.headroom.share("a", "chat", 0, NOW)[0] == 1.0  # nothing was counted against it
    balancer.pick("chat", NOW, need=1_000)
    assert balancer.headroom.share("a", "chat", 0, NOW)[0] < 1.0

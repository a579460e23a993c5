from __future__ import annotations

import asyncio

import pytest

from lb.config import ConfigError, load_settings
from lb.requestinfo import described
from lb.routing.headroom import (
    EXHAUSTED_HOLD_SECONDS,
    MAX_EXHAUSTED_HOLD_SECONDS,
    MIN_SHARE,
    NEAR_LIMIT_FRACTION,
    PEAK_MEMORY_SECONDS,
    STALE_AFTER_SECONDS,
    Headroom,
)

NOW = 1_000.0
ONE = {"BACKEND_1_URL": "https://one.openai.azure.com"}


def left(requests: int | None = None, tokens: int | None = None, **extra: str) -> dict[str, str]:
    headers = dict(extra)
    if requests is not None:
        headers["x-ratelimit-remaining-requests"] = str(requests)
    if tokens is not None:
        headers["x-ratelimit-remaining-tokens"] = str(tokens)
    return headers


def test_the_most_remaining_ever_seen_stands_in_for_the_limit():
    headroom = Headroom()
    headroom.record("a", "chat", left(100, 10_000), NOW)
    headroom.record("a", "chat", left(90, 2_500), NOW + 1)
    assert headroom.share("a", "chat", 0, NOW + 1) == (0.25, False)  # the scarcer of 90/100 and 2500/10000


def test_a_deployment_is_its_own_quota():
    headroom = Headroom()
    headroom.record("a", "chat", left(10, 10_000), NOW)
    headroom.record("a", "chat", left(10, 1_000), NOW)
    assert headroom.share("a", "embedding", 0, NOW)[0] == 1.0
    assert headroom.share("a", "chat", 0, NOW)[0] == 0.1


def test_a_low_reading_keeps_a_minimum_share_so_it_is_refreshed():
    headroom = Headroom()
    headroom.record("a", "chat", left(tokens=10_000), NOW)
    headroom.record("a", "chat", left(tokens=1), NOW)
    assert headroom.share("a", "chat", 0, NOW)[0] == MIN_SHARE


def test_fewer_tokens_left_than_the_request_needs_is_short_only_while_fresh():
    headroom = Headroom()
    headroom.record("a", "chat", left(tokens=500), NOW)
    assert headroom.share("a", "chat", 800, NOW)[1] is True
    assert headroom.share("a", "chat", 400, NOW)[1] is True  # fitting takes twice the call: some are in flight
    assert headroom.share("a", "chat", 250, NOW)[1] is False
    assert headroom.share("a", "chat", 800, NOW + 1.5)[1] is False  # it may have refilled: worth a try again


def test_readings_go_stale_after_the_window_and_the_backend_counts_as_full():
    headroom = Headroom()
    headroom.record("a", "chat", left(tokens=10_000), NOW)
    headroom.record("a", "chat", left(tokens=100), NOW + 1)
    assert headroom.share("a", "chat", 0, NOW + STALE_AFTER_SECONDS)[0] < 0.5
    assert headroom.share("a", "chat", 0, NOW + 1 + STALE_AFTER_SECONDS) == (1.0, False)


def test_a_reset_header_ends_the_reading_when_the_quota_refills():
    headroom = Headroom()
    headroom.record("a", "chat", left(tokens=10_000), NOW)
    headroom.record("a", "chat", left(tokens=2_000, **{"x-ratelimit-reset-tokens": "2s"}), NOW)
    assert headroom.share("a", "chat", 0, NOW + 1.9)[0] == 0.2
    assert headroom.share("a", "chat", 0, NOW + 2.0)[0] == 1.0


def test_zero_left_makes_the_backend_unavailable_until_the_reset_or_a_short_hold():
    headroom = Headroom()
    headroom.record("a", "chat", left(requests=0, tokens=5_000, **{"x-ratelimit-reset-requests": "3s"}), NOW)
    assert headroom.exhausted_until("a", "chat", NOW + 1) == NOW + 3
    assert headroom.exhausted_until("a", "chat", NOW + 3) == 0.0
    headroom.record("b", "chat", left(requests=5, tokens=0), NOW)
    assert headroom.exhausted_until("b", "chat", NOW) == NOW + EXHAUSTED_HOLD_SECONDS
    assert headroom.share("b", "chat", 0, NOW + EXHAUSTED_HOLD_SECONDS) == (1.0, False)  # refilled: probe it


def test_the_window_is_learnt_from_refills_and_a_reading_ends_at_the_next_one():
    headroom = Headroom()
    for at, tokens in ((0, 10_000), (1, 1_000), (3, 10_000), (4, 1_000), (6, 9_800), (7, 500)):
        headroom.record("a", "chat", left(tokens=tokens), NOW + at)
    assert headroom.fresh("a", "chat", NOW + 7).window == 3.0
    assert headroom.share("a", "chat", 0, NOW + 8.9)[0] == 0.05
    assert headroom.share("a", "chat", 0, NOW + 9) == (1.0, False)  # refilled by now, Azure just didn't say


def test_a_backend_is_near_its_limit_once_a_quarter_or_less_of_its_quota_is_left():
    headroom = Headroom()
    assert headroom.record("a", "chat", {"x-other": "1"}, NOW) is None  # nothing said about quota
    assert not headroom.record("a", "chat", left(100, 10_000), NOW).near_limit(NOW)
    assert not headroom.record("a", "chat", left(26, 9_000), NOW).near_limit(NOW)
    assert headroom.record("a", "chat", left(int(100 * NEAR_LIMIT_FRACTION), 9_000), NOW).near_limit(NOW)
    assert headroom.record("a", "chat", left(90, 2_000), NOW).near_limit(NOW)  # tokens run out first


def test_a_lowered_quota_is_learnt_so_the_backend_does_not_look_near_its_limit_for_good():
    headroom = Headroom()
    headroom.record("a", "chat", left(100, 10_000), NOW)
    assert headroom.record("a", "chat", left(20, 2_000), NOW + 1).near_limit(NOW + 1)  # a fifth of the most seen
    later = NOW + PEAK_MEMORY_SECONDS + 1
    assert headroom.record("a", "chat", left(20, 2_000), later).near_limit(later)  # the old peak still counts
    much_later = NOW + 2 * PEAK_MEMORY_SECONDS + 1
    assert not headroom.record("a", "chat", left(20, 2_000), much_later).near_limit(much_later)  # 20 is the quota now


def test_zero_left_without_a_reset_header_is_held_only_until_the_learnt_refill():
    headroom = Headroom()
    for at, tokens in ((0, 10_000), (1, 1_000), (3, 10_000), (4, 1_000), (6, 9_800)):
        headroom.record("a", "chat", left(tokens=tokens), NOW + at)
    headroom.record("a", "chat", left(requests=0, tokens=300), NOW + 8.7)  # refills next at NOW + 9
    assert headroom.exhausted_until("a", "chat", NOW + 8.8) == NOW + 9
    assert headroom.exhausted_until("a", "chat", NOW + 9) == 0.0  # not EXHAUSTED_HOLD_SECONDS after the reading


@pytest.mark.parametrize("headers", [{}, left(), {"x-ratelimit-remaining-tokens": "lots"}, left(-1, -5)])
def test_answers_without_usable_headers_leave_no_reading(headers):
    headroom = Headroom()
    headroom.record("a", "chat", headers, NOW)
    assert headroom.fresh("a", "chat", NOW) is None
    assert headroom.share("a", "chat", 10, NOW) == (1.0, False)


def test_the_report_shows_the_last_reading_and_whether_it_is_stale():
    headroom = Headroom()
    headroom.record("a", "*", left(7, 700), NOW)
    assert headroom.report("a", NOW + 2) == [
        {
            "deployment": None,
            "remaining_requests": 7,
            "remaining_tokens": 700,
            "seconds_ago": 2.0,
            "stale": False,
            "exhausted_seconds_left": None,
        }
    ]
    assert headroom.report("a", NOW + STALE_AFTER_SECONDS)[0]["stale"] is True
    assert headroom.report("b", NOW) == []


def estimate_tokens(body: bytes) -> int:
    return asyncio.run(described("/openai/v1/chat/completions", body)).tokens


def test_request_size_is_the_body_length_over_4_plus_max_tokens():
    body = b'{"messages": [{"role": "user", "content": "' + b"x" * 400 + b'"}], "max_tokens": 300}'
    assert estimate_tokens(body) == len(body) // 4 + 300
    assert estimate_tokens(b'{"model": "o1", "max_completion_tokens": 1000}') == 46 // 4 + 1000
    assert estimate_tokens(b'{"input": "hello"}') == 18 // 4


def test_max_tokens_quoted_inside_a_message_is_not_taken_for_the_setting():
    body = b'{"messages": [{"role": "user", "content": "set \\"max_tokens\\": 90000 please"}]}'
    assert estimate_tokens(body) == len(body) // 4


def test_policy_defaults_to_random_and_accepts_headroom():
    assert load_settings(ONE).policy == "random"
    assert load_settings({**ONE, "LB_POLICY": " Headroom "}).policy == "headroom"


def test_an_unknown_policy_stops_start_up_naming_the_variable():
    with pytest.raises(ConfigError, match=r"^LB_POLICY: 'fastest' is not one of random, headroom$"):
        load_settings({**ONE, "LB_POLICY": "fastest"})


def test_a_reset_header_holds_an_exhausted_backend_no_longer_than_a_cooldown_may_last():
    headroom = Headroom()
    headroom.record("a", "chat", left(requests=0, tokens=5_000, **{"x-ratelimit-reset-requests": "86400s"}), NOW)
    assert headroom.exhausted_until("a", "chat", NOW) == NOW + MAX_EXHAUSTED_HOLD_SECONDS

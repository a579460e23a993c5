from __future__ import annotations

import time
from email.utils import formatdate

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.routing.throttle import MIN_COOLDOWN_SECONDS, MIN_HINTED_COOLDOWN_SECONDS, cooldown_seconds, parse_duration

NOW = 1_700_000_000.0


def cool(headers: dict[str, str]) -> tuple[float, str]:
    return cooldown_seconds(headers, default=10, maximum=60, now=NOW)


def test_retry_after_ms_wins_over_retry_after():
    assert cool({"retry-after-ms": "2500", "retry-after": "9"}) == (2.5, "retry-after-ms")


def test_retry_after_in_seconds():
    assert cool({"retry-after": "7"}) == (7, "retry-after")


def test_retry_after_as_http_date():
    seconds, source = cool({"retry-after": formatdate(NOW + 30, usegmt=True)})
    assert source == "retry-after" and seconds == pytest.approx(30, abs=1)


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": "-5"},
        {"retry-after": "abc"},
        {"retry-after": formatdate(NOW - 30, usegmt=True)},
        {"retry-after-ms": "nan"},
        {"retry-after-ms": "-1"},
        {"retry-after": "inf"},
        {},
    ],
)
def test_garbage_negative_or_past_values_fall_back_to_the_default(headers):
    assert cool(headers) == (10, "default")


def test_huge_values_are_clamped_to_the_maximum():
    assert cool({"retry-after": str(10**12)}) == (60, "retry-after")
    assert cool({"retry-after-ms": "1e300"}) == (60, "retry-after-ms")


def test_zero_still_cools_for_the_minimum():
    assert cool({"retry-after": "0"}) == (MIN_COOLDOWN_SECONDS, "retry-after")


def test_a_429s_sub_second_hint_is_honoured_not_rounded_up_to_a_second():
    # cooling past the backend's own refill time would waste quota it has already given back
    assert cool({"retry-after-ms": "300", "retry-after": "1"}) == (pytest.approx(0.3), "retry-after-ms")
    assert cool({"x-ratelimit-reset-requests": "20ms"}) == (MIN_HINTED_COOLDOWN_SECONDS, "x-ratelimit-reset")


@pytest.mark.parametrize("headers", [{"retry-after-ms": "0"}, {"retry-after": "0"}, {"x-ratelimit-reset-tokens": "0s"}])
def test_a_zero_hint_still_cools_a_whole_second_so_a_flapping_backend_is_not_hammered(headers):
    assert cool(headers)[0] == MIN_COOLDOWN_SECONDS == 1.0


def test_a_5xx_sub_second_hint_gets_the_whole_second_floor():
    seconds, _ = cooldown_seconds({"retry-after-ms": "300"}, default=10, maximum=60, throttled=False)
    assert seconds == MIN_COOLDOWN_SECONDS


def test_ratelimit_reset_headers_take_the_longer_reset():
    assert cool({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}) == (60, "x-ratelimit-reset")
    assert cool({"x-ratelimit-reset-tokens": "12"}) == (12, "x-ratelimit-reset")


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [("20ms", 0.02), ("1.5", 1.5), ("6m0s", 360), ("1h2m3.5s", 3723.5), ("bogus", None), ("5x", None), ("", None)],
)
def test_parse_duration(raw, seconds):
    assert parse_duration(raw) == (pytest.approx(seconds) if seconds is not None else None)


@given(st.dictionaries(st.sampled_from(["retry-after", "retry-after-ms", "x-ratelimit-reset-tokens"]), st.text()))
def test_any_header_values_give_a_bounded_cooldown(headers):
    seconds, source = cooldown_seconds(headers, default=10, maximum=60, now=time.time())
    assert MIN_HINTED_COOLDOWN_SECONDS <= seconds <= 60
    assert seconds >= MIN_COOLDOWN_SECONDS or source != "default"  # under a second only on a 429's own hint
    assert cooldown_seconds(headers, default=10, maximum=60, now=time.time(), throttled=False)[0] >= 1.0

from __future__ import annotations

from lb.metering.windows import Windows


def test_minute_is_the_last_sixty_seconds_and_hour_the_last_sixty_minutes() -> None:
    w = Windows(2)
    w.add("a", 119.9, (1, 10))  # second 119, minute 1
    w.add("a", 120.0, (1, 20))  # second 120, minute 2
    assert w.minute("a", 178.99) == [2, 30]
    assert w.minute("a", 179.0) == [1, 20]  # second 119 has left the window
    assert w.hour("a", 3659.0) == [2, 30]  # minutes 1..60
    assert w.hour("a", 3660.0) == [1, 20]  # minutes 2..61: minute 1 has left the hour
    assert w.hour("a", 3720.0) == [0, 0]
    assert w.minute("nobody", 0.0) == [0, 0]


def test_shared_buckets_load_into_another_instances_view() -> None:
    mine, theirs = Windows(2), Windows(2)
    mine.add("a", 1000.0, (1, 5))
    mine.add("a", 1001.5, (2, 7))
    mine.add("a", 1001.5, (0, -3))  # a true-up
    theirs.add("a", 1001.0, (1, 1))
    theirs.load(mine.buckets(1010.0))
    assert theirs.minute("a", 1010.0) == [4, 10]
    assert [s for s, _ in theirs.seconds("a", 1010.0)] == [1000, 1001]


def test_prune_forgets_what_left_both_windows() -> None:
    w = Windows(1)
    w.add("old", 0.0, (1,))
    w.add("new", 3000.0, (1,))
    w.prune(3700.0)
    assert w.keys() == ["new"]
    assert w.buckets(3700.0) == {"new": {"s": [], "m": [[50, 1]]}}

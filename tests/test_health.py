"""lb.state.health: the one set of rules the four Table stores follow when their table is away."""

from __future__ import annotations

import logging

import pytest

from lb.state.health import TableHealth, describe


class Refused(Exception):
    status_code = 403


def test_an_outage_is_logged_once_when_it_begins_and_once_when_it_ends(caplog: pytest.LogCaptureFixture):
    health = TableHealth("object table", logging.getLogger("lb.state"), retry_seconds=60)
    caplog.set_level(logging.INFO, "lb.state")
    assert health.fault(Refused("This request is not authorized.\nRequestId: x"), "refusing unknown objects")
    assert not health.fault(TimeoutError(), "refusing unknown objects")  # the same outage: not logged again
    assert not health.healthy and health.last_error == "TimeoutError"
    assert not health.may_call() and 59 < health.retry_in() <= 60
    assert health.ok("writing 2 records") and not health.ok()
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == (
        "object table unreachable, refusing unknown objects: Refused 403: This request is not authorized."
    )
    assert messages[1].startswith("object table reachable again after ") and messages[1].endswith(": writing 2 records")
    assert len(messages) == 2 and health.healthy and health.may_call()


def test_a_fault_is_one_line_with_no_body():
    assert describe(Refused("first\nsecond line with a body")) == "Refused 403: first"
    assert describe(ValueError("x" * 500)) == "ValueError: " + "x" * 160
    assert describe(TimeoutError()) == "TimeoutError"

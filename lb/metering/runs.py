"""Assistants runs are charged their usage once: when the balancer first sees one finished.

A run (`POST threads/runs`, `threads/{id}/runs`) answers at once (`queued`, `usage` null) and is
generated afterwards; its `usage` shows only once it has ended, in every answer that shows the run
from then on: each poll (`GET threads/{id}/runs/{id}`), each page listing the thread's runs, a
cancel, a resumed stream. So, as for background responses (`lb.metering.responses`, whose book
this shares):
- the create's reservation is held by the run's id (it still counts against the limit), and so is
  that of each `submit_tool_outputs` that resumes it; the first answer that shows the run finished
  settles them against its usage (the first one its usage, the others nothing), in that minute;
- every later answer showing it costs nothing: the id is remembered (`KEEP_SECONDS`) and shared
  with the other instances (`SHARE_SECONDS`), as are the ids of the runs held here, so the first
  instance to see a run finished charges it whichever instance holds its reservation;
- a run seen finished for the first time here, held nowhere, that ended more than `AGE_SECONDS`
  ago (its own `completed_at` and the like) was seen before, through an instance whose memory of
  it has gone, or its hold was charged its reservation: it is not charged again. So the state kept
  per run is bounded in time (an hour at most) while a thread's old runs can be listed forever.
A run step (`threads/{id}/runs/{id}/steps`) carries the usage of its part of the run, already in
the run's: it is never charged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lb.metering.responses import SHARE_SECONDS
from lb.metering.usage import Usage, from_object

RUN = "thread.run"
TERMINAL = frozenset({"completed", "failed", "cancelled", "expired", "incomplete"})
# A run not held anywhere that ended longer ago than this is not charged when first seen here:
# charged runs stay in the shared rows for SHARE_SECONDS; the margin allows for the backend's clock.
AGE_SECONDS = SHARE_SECONDS - 120.0
_ENDS = ("completed_at", "failed_at", "cancelled_at", "expired_at")


@dataclass(frozen=True)
class Run:
    """One run as an answer showed it."""

    status: str | None
    usage: Usage | None
    ended: float | None  # epoch seconds it ended, by the backend's clock (None: not said)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def ended_before(self, when: float) -> bool:
        return self.ended is not None and self.ended < when


def shows_runs(operation: str) -> bool:
    """Whether a call's answer is a run, a page of runs or a run's stream (create, create with a
    thread, retrieve, list, cancel, modify, submit tool outputs) or a run's steps."""
    parts = operation.split("/")
    return parts[0] == "threads" and (parts[1:2] == ["runs"] or parts[2:3] == ["runs"])


def runs_in(obj: Any) -> dict[str, Run]:
    """The runs a decoded answer (or stream event) shows: itself, or the items of a list."""
    found: dict[str, Run] = {}
    if not isinstance(obj, dict):
        return found
    items = obj.get("data") if obj.get("object") == "list" else [obj]
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict) and item.get("object") == RUN and isinstance(item.get("id"), str):
            status = item.get("status")
            ends = [item[k] for k in _ENDS if _stamp(item.get(k))]
            found[item["id"]] = Run(
                status if isinstance(status, str) else None, from_object(item.get("usage")), max(ends, default=None)
            )
    return found


def _stamp(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def total(usages: list[Usage]) -> Usage | None:
    """The sum of several runs' usage (None for none)."""
    if not usages:
        return None
    names = ("prompt", "completion", "total", "cached", "reasoning")
    return Usage(*(sum(getattr(u, name) for u in usages) for name in names))

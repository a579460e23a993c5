"""Background responses are charged once: when the balancer first sees one finished.

A Responses API answer names its response (`resp_...`). One made in the foreground is charged by
the call that made it, and reading it again is free (`lb.metering.Metering._settle`). One created
with `background: true` answers at once (`queued`) and is generated afterwards; its usage shows
only when a later read (a poll, or a resumed stream) finds it finished. So:
- the create's reservation is held by the response's id (it still counts against the limit) until
  a read shows the response finished; then it is settled with that usage, in that minute;
- every read after that (polling a finished response, retrieving a stored one) costs nothing;
- a hold nobody settles within `HOLD_SECONDS` is charged its reservation.
The background ids charged lately are shared with the other instances (`lb.metering.share`), so a response
created through one instance and polled through another is charged once, by the first to see it
finished; the creating instance then lets its hold go.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from lb.metering.quota import Charge

TERMINAL = frozenset({"completed", "failed", "incomplete", "cancelled"})
KEEP_SECONDS = 3600.0  # how long a charged id is remembered (a retrieval after that is charged again)
SHARE_SECONDS = 600.0  # ids charged this recently go in this instance's shared row ...
SHARE_MAX = 1000  # ... at most this many, the newest (the row is written every second)
MAX_IDS = 200_000  # bound on remembered ids (oldest forgotten first)
HOLD_SECONDS = 3600.0  # a background response not seen finished within this is charged its reservation


@dataclass
class Held:
    """A background response's reservation, held until it is seen finished."""

    charge: Charge | None
    client: str
    backend: str
    deployment: str | None
    since: float


class ResponseBook:
    """Which responses were charged (here and elsewhere) and which reservations wait for one."""

    def __init__(self) -> None:
        self.charged_here: OrderedDict[str, float] = OrderedDict()  # id -> when charged
        self.charged_elsewhere: frozenset[str] = frozenset()  # as last read from the shared table
        self.held: dict[str, Held] = {}

    def charged(self, response_id: str) -> bool:
        return response_id in self.charged_here or response_id in self.charged_elsewhere

    def mark(self, response_id: str, now: float) -> None:
        self.charged_here[response_id] = now
        self.charged_here.move_to_end(response_id)
        while self.charged_here and (
            len(self.charged_here) > MAX_IDS or next(iter(self.charged_here.values())) < now - KEEP_SECONDS
        ):
            self.charged_here.popitem(last=False)

    def recent(self, now: float) -> list[str]:
        """Ids charged here within `SHARE_SECONDS` (the newest `SHARE_MAX`), newest last."""
        since = now - SHARE_SECONDS
        recent: list[str] = []
        for rid in reversed(self.charged_here):
            if self.charged_here[rid] < since or len(recent) >= SHARE_MAX:
                break
            recent.append(rid)
        return recent[::-1]

    def expired(self, now: float) -> list[tuple[str, Held]]:
        """Holds older than `HOLD_SECONDS`, taken out of the book."""
        old = [(rid, h) for rid, h in self.held.items() if now - h.since > HOLD_SECONDS]
        for rid, _ in old:
            del self.held[rid]
        return old

    def settled_elsewhere(self) -> list[tuple[str, Held]]:
        """Holds whose response another instance has charged, taken out of the book."""
        done = [(rid, h) for rid, h in self.held.items() if rid in self.charged_elsewhere]
        for rid, _ in done:
            del self.held[rid]
        return done

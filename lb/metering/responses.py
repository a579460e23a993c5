"""Background responses and Assistants runs are charged once: when the balancer first sees one finished.

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
finished; the creating instance then lets its hold go. Assistants runs are held and charged in this
same book, by their `run_...` ids (a run's hold may gather several reservations: its create's and
those of the calls that resume it with tool outputs).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from lb.metering.quota import Charge

TERMINAL = frozenset({"completed", "failed", "incomplete", "cancelled"})
KEEP_SECONDS = 3600.0  # how long a charged id is remembered (a retrieval after that is charged again)
SHARE_SECONDS = 600.0  # ids charged this recently go in this instance's shared row ...
SHARE_MAX = 1000  # ... at most this many, the newest (the row is written every second)
MAX_IDS = 200_000  # bound on remembered ids (oldest forgotten first)
HOLD_SECONDS = 3600.0  # a background response not seen finished within this is charged its reservation
MAX_HELD = 100_000  # holds at once: past this, a run's call is charged its reservation at once


@dataclass
class Held:
    """A background response's (or a run's) reservation, held until it is seen finished."""

    charge: Charge | None
    client: str
    backend: str
    deployment: str | None
    since: float
    run: bool = False  # an Assistants run's: its id is shared while held
    more: list[Charge] = field(default_factory=list)  # a run's: the calls that resumed it

    def charges(self) -> list[Charge]:
        """Every reservation held, the first call's first."""
        return [self.charge, *self.more] if self.charge is not None else list(self.more)


class ResponseBook:
    """Which responses were charged (here and elsewhere) and which reservations wait for one."""

    def __init__(self) -> None:
        self.charged_here: OrderedDict[str, float] = OrderedDict()  # id -> when charged
        self.charged_elsewhere: frozenset[str] = frozenset()  # as last read from the shared table
        self.held: dict[str, Held] = {}
        # Runs whose reservation another instance holds (run id -> that instance, the first by id if
        # several), as last read; runs seen finished here while held there, for the holder to settle
        # (run id -> (tokens, holder, when)); and what the others told this instance so (id -> tokens).
        self.runs_held_elsewhere: dict[str, str] = {}
        self.told: OrderedDict[str, tuple[int | None, str, float]] = OrderedDict()
        self.told_here: dict[str, int | None] = {}

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

    def runs_held(self) -> list[str]:
        """Ids of the runs held here (the newest `SHARE_MAX`), for the shared row."""
        held = [rid for rid, h in self.held.items() if h.run]
        return held[-SHARE_MAX:]

    def tell(self, run_id: str, tokens: int | None, holder: str, now: float) -> None:
        """A run held by `holder` was seen finished here, having spent `tokens` (None: not said)."""
        self.told[run_id] = (tokens, holder, now)
        while self.told and (len(self.told) > SHARE_MAX or next(iter(self.told.values()))[2] < now - SHARE_SECONDS):
            self.told.popitem(last=False)

    def telling(self, now: float) -> dict[str, list[int | str | None]]:
        """What `tell` said within `SHARE_SECONDS`, for the shared row: run id -> [tokens, holder]."""
        return {
            rid: [tokens, holder] for rid, (tokens, holder, when) in self.told.items() if when >= now - SHARE_SECONDS
        }

    def settled_by_others(self) -> list[tuple[str, Held, int | None]]:
        """Holds of runs another instance saw finished (with what they spent), taken out of the book."""
        done = [(rid, self.held[rid], tokens) for rid, tokens in self.told_here.items() if rid in self.held]
        for rid, _, _ in done:
            del self.held[rid]
        return done

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

"""Who holds which object: (pool, object id) -> backend and the client that created it.

A record is written once, from the answer to the call that created the object, and never
replaced: `create` inserts it only if no record of that id exists, and returns the one that holds.
Nothing else (a list, a retrieve, a look-up's answer) can change who owns an object.

`ObjectStore` keeps the records of this process (one instance; the base of the shared store,
`lb.objects.table`). A store that can't be read raises `RecordsUnavailable`: the caller refuses
the call (fail closed) rather than guess. Records expire with Azure's own retention: a stored response is kept 30 days
unless deleted ("By default, response data is retained for 30 days", Azure OpenAI Responses API,
learn.microsoft.com/azure/ai-foundry/openai/how-to/responses, "Delete response"). The other kinds
are kept as long; a record that outlives its object only costs the holder's own 404, and one that
expires before its object is found again by the look-up (`lb.objects.router`).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

RETENTION_SECONDS = 30 * 24 * 3600.0
# Per instance: about 16 MB at the cap. Past it, the client holding the most records loses its least
# recently used one, so a client's records are dropped only by its own making. A dropped record costs
# a point read with Table Storage; in memory only it is gone: its object is unknown (404 with several
# clients, looked up with one).
MAX_RECORDS = 50_000


class RecordsUnavailable(Exception):
    """The records can't be read now; whose an object is can't be told, so the call is refused."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("object records unavailable")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class ObjectRecord:
    backend: str
    client: str  # Client.id of its creator; "" when unknown (found by the look-up, not seen created)
    kind: str
    expires: float  # epoch seconds


class ObjectStore:
    """Records in this process's memory; the sync `known()` is all the hot path of a pinned call reads.

    At most `max_records`, each client's in its own least-recently-used order. Past the cap the
    client holding the most records (the one adding it, when it is among them) loses its least
    recently used record: a client that makes objects, or answers full of reasoning items, drops its
    own records, never those of a client holding fewer."""

    kind = "memory"

    def __init__(self, max_records: int = MAX_RECORDS) -> None:
        self.max_records = max_records
        self._records: dict[str, ObjectRecord] = {}
        self._lru: dict[str, OrderedDict[str, None]] = {}  # per client: its ids, least recently used first
        self._sizes = _Sizes()

    def known(self, object_id: str, now: float | None = None) -> ObjectRecord | None:
        record = self._records.get(object_id)
        if record is None:
            return None
        if record.expires <= (time.time() if now is None else now):
            self._drop(object_id)
            return None
        self._lru[record.client].move_to_end(object_id)
        return record

    async def find(self, object_id: str) -> ObjectRecord | None:
        """This instance's record, else the shared one (a shared store reads it once, then knows it).
        Raises RecordsUnavailable when the shared records can't be read."""
        return self.known(object_id)

    async def create(self, object_id: str, record: ObjectRecord) -> ObjectRecord:
        """Record a new object unless a record of that id exists; return the record that holds (a
        shared store writes it before the caller lets the id out)."""
        existing = self.known(object_id)
        if existing is not None:
            return existing
        self._keep(object_id, record)
        return record

    async def owned(self, client: str, kind: str) -> set[str]:
        """Ids of `kind` created by `client` (what its lists show). Raises RecordsUnavailable."""
        now = time.time()
        records = self._records
        return {i for i in self._lru.get(client, ()) if records[i].kind == kind and records[i].expires > now}

    def forget(self, object_id: str) -> None:
        """The object was deleted (or its holder no longer knows it)."""
        self._drop(object_id)

    def _keep(self, object_id: str, record: ObjectRecord) -> None:
        """Keep `record` (in place of one of the same id), then drop the heaviest client's oldest past the cap."""
        self._drop(object_id)
        self._records[object_id] = record
        self._lru.setdefault(record.client, OrderedDict())[object_id] = None
        self._sizes.add(record.client, 1)
        while len(self._records) > self.max_records:
            victim = self._sizes.heaviest(prefer=record.client)
            self._drop(next(iter(self._lru[victim])))

    def _drop(self, object_id: str) -> None:
        record = self._records.pop(object_id, None)
        if record is None:
            return
        ids = self._lru[record.client]
        del ids[object_id]
        if not ids:
            del self._lru[record.client]
        self._sizes.add(record.client, -1)

    def counts(self) -> dict[str, int]:
        """Records known to this instance by kind (what /lb/status shows)."""
        now = time.time()
        return dict(Counter(r.kind for r in self._records.values() if r.expires > now))

    async def start(self) -> None:
        """Open connections; called once before the first request."""

    async def close(self) -> None:
        """Wait for writes in flight and release connections."""

    def health(self) -> dict[str, Any]:
        return {"kind": self.kind, "healthy": True}


class _Sizes:
    """How many records each client holds, and who holds the most, each step in constant time."""

    def __init__(self) -> None:
        self.size: dict[str, int] = {}
        self.holding: dict[int, set[str]] = {}  # size -> clients holding that many
        self.most = 0

    def add(self, client: str, step: int) -> None:
        old = self.size.get(client, 0)
        new = old + step
        if old:
            self.holding[old].discard(client)
            if not self.holding[old]:
                del self.holding[old]
        if new:
            self.size[client] = new
            self.holding.setdefault(new, set()).add(client)
        else:
            del self.size[client]
        if new > self.most:
            self.most = new
        elif old == self.most and old not in self.holding:
            self.most = new  # it was the only one holding the most: now it holds one fewer
            while self.most and self.most not in self.holding:
                self.most -= 1

    def heaviest(self, prefer: str) -> str:
        """A client holding the most records: `prefer` if it is one (and holds more than the one just
        added), else another."""
        holders = self.holding[self.most]
        if prefer in holders and (self.most > 1 or len(holders) == 1):
            return prefer
        return next(c for c in holders if c != prefer)

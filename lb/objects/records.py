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
# Per instance, least recently used dropped first: about 16 MB at the cap. A dropped record costs a
# point read (Table) or a look-up (memory only) the next time its object is named.
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
    """Records in this process's memory; the sync `known()` is all the hot path of a pinned call reads."""

    kind = "memory"

    def __init__(self, max_records: int = MAX_RECORDS) -> None:
        self.max_records = max_records
        self._records: OrderedDict[str, ObjectRecord] = OrderedDict()

    def known(self, object_id: str, now: float | None = None) -> ObjectRecord | None:
        record = self._records.get(object_id)
        if record is None:
            return None
        if record.expires <= (time.time() if now is None else now):
            del self._records[object_id]
            return None
        self._records.move_to_end(object_id)
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
        return {i for i, r in self._records.items() if r.client == client and r.kind == kind and r.expires > now}

    def forget(self, object_id: str) -> None:
        """The object was deleted (or its holder no longer knows it)."""
        self._records.pop(object_id, None)

    def _keep(self, object_id: str, record: ObjectRecord) -> None:
        self._records[object_id] = record
        self._records.move_to_end(object_id)
        while len(self._records) > self.max_records:
            self._records.popitem(last=False)

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

"""Object records shared by every instance, in the cooldowns' Table Storage account and table.

Why it is built this way:
- Own partition (`{LB_POOL}|objects`), so the cooldowns' partition query never reads object rows
  and several pools can share one table. RowKey is the object id (ids are checked for Azure's
  shape before they get here, `lb.objects.routes`, so the table never refuses one as a key).
- Calls that name no object never reach this module. A call naming an id this instance does not
  know costs one point read; what it finds is kept in memory (the base `ObjectStore`), so the
  next call costs nothing.
- A new object's record is inserted (a Table insert, never an upsert: an existing owner is never
  replaced) before the client sees its id, so a follow-up sent to any instance finds it.
- Fail closed: while the table can't be read, an id this instance does not know raises
  `RecordsUnavailable` (the client gets 503 + Retry-After), never a look-up that could hand one
  client another's object. Only the table's own failures (timeouts, 5xx, no connection) mark it
  unhealthy; a refused key or entity is that record's problem, logged and dropped.
- A record that can't be written is kept in memory and retried in the background until the table
  takes it; other records are written as usual meanwhile.
- Table Storage has no TTL: a read of an expired row treats it as absent and deletes it, and a
  sweep deletes expired rows (a bounded number per SWEEP_SECONDS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from datetime import datetime, timezone
from typing import Any

from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError

from lb.config import StateSettings
from lb.objects.records import MAX_RECORDS, ObjectRecord, ObjectStore, RecordsUnavailable
from lb.state.health import TableHealth
from lb.state.table import TableOps, make_table_client, row_key

log = logging.getLogger("lb.state")

OP_TIMEOUT_SECONDS = 2.0
OUTAGE_RETRY_SECONDS = 5.0  # while the table is away, requests don't wait on it more often than this
SWEEP_SECONDS = 3600.0
SWEEP_MAX_DELETES = 200
CLOSE_SECONDS = 3.0


class TableObjectStore(ObjectStore):
    kind = "table"

    def __init__(
        self, settings: StateSettings, *, op_timeout: float = OP_TIMEOUT_SECONDS, max_records: int = MAX_RECORDS
    ) -> None:
        super().__init__(max_records)
        self.settings = settings
        self.partition = f"{settings.pool}|objects"
        self.op_timeout = op_timeout
        self.ops = TableOps()
        self.table_health = TableHealth("object table", log, OUTAGE_RETRY_SECONDS)
        self._unsaved: dict[str, ObjectRecord] = {}  # made while the table was away
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self._client, self._credential = make_table_client(settings, op_timeout, self.ops)

    # Lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=CLOSE_SECONDS)
        self._closed = True
        pending = [t for t in (*self._tasks, self._sweeper) if t is not None and not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=CLOSE_SECONDS)
        await self._client.close()
        if self._credential is not None:
            await self._credential.close()

    # Records -----------------------------------------------------------------------------------
    async def find(self, object_id: str) -> ObjectRecord | None:
        record = self.known(object_id)
        if record is not None:
            return record
        if not self._may_call():
            raise RecordsUnavailable(self._retry_in())
        try:
            row = await self._call(self._client.get_entity(self.partition, row_key(object_id, "")))
        except ResourceNotFoundError:  # no such row (or no table yet)
            self._ok()
            return None
        except Exception as exc:
            if _about_the_entity(exc):  # a key the table refuses: no record can have it
                return None
            self._fault(exc)
            raise RecordsUnavailable(self._retry_in()) from None
        self._ok()
        record = _record(row)
        if record is None or record.expires <= time.time():
            self._background(self._delete(object_id))
            return None
        self._keep(object_id, record)
        return record

    async def create(self, object_id: str, record: ObjectRecord) -> ObjectRecord:
        existing = self.known(object_id)
        if existing is not None:
            return existing
        self._keep(object_id, record)
        if not self._may_call():
            self._unsaved[object_id] = record
            return record
        return await self._insert(object_id, record)

    async def owned(self, client: str, kind: str) -> set[str]:
        if not self._may_call():
            raise RecordsUnavailable(self._retry_in())
        ids = {i for i, r in self._unsaved.items() if r.client == client and r.kind == kind}
        try:
            rows = self._client.query_entities(
                "PartitionKey eq @pk and client eq @client and kind eq @kind and expires gt @now",
                parameters={"pk": self.partition, "client": client, "kind": kind, "now": float(time.time())},
                select=["object_id"],
            )
            async for row in rows:
                if isinstance(row.get("object_id"), str):
                    ids.add(row["object_id"])
        except ResourceNotFoundError:
            self._ok()
            return ids
        except Exception as exc:
            self._fault(exc)
            raise RecordsUnavailable(self._retry_in()) from None
        self._ok()
        return ids

    def forget(self, object_id: str) -> None:
        super().forget(object_id)
        self._unsaved.pop(object_id, None)
        self._background(self._delete(object_id))

    # Table calls -------------------------------------------------------------------------------
    async def _insert(self, object_id: str, record: ObjectRecord) -> ObjectRecord:
        """Insert the row unless one exists; the record that holds (the existing owner, if any)."""
        entity = {
            "PartitionKey": self.partition,
            "RowKey": row_key(object_id, ""),
            "object_id": object_id,
            "backend": record.backend,
            "client": record.client,
            "kind": record.kind,
            "expires": float(record.expires),
            "expires_utc": datetime.fromtimestamp(record.expires, timezone.utc),
        }
        for _ in range(2):
            try:
                await self._call(self._client.create_entity(entity))
            except ResourceExistsError:  # already recorded (by another instance, or a retry of ours)
                self._unsaved.pop(object_id, None)
                self._ok()
                return await self._existing(object_id, record)
            except ResourceNotFoundError:  # the table does not exist yet: create it, insert again
                try:
                    with contextlib.suppress(ResourceExistsError):
                        await self._call(self._client.create_table())
                except Exception as exc:
                    return self._unwritten(object_id, record, exc)
                continue
            except Exception as exc:
                return self._unwritten(object_id, record, exc)
            self._unsaved.pop(object_id, None)
            self._ok()
            return record
        return self._unwritten(object_id, record, RuntimeError("the table was not created"))

    async def _existing(self, object_id: str, ours: ObjectRecord) -> ObjectRecord:
        """The row that won: kept in memory in place of ours (it may name another owner)."""
        try:
            row = await self._call(self._client.get_entity(self.partition, row_key(object_id, "")))
        except Exception as exc:  # read it again at the next call that names it
            self._fault(exc)
            self.forget_local(object_id)
            return ours
        record = _record(row)
        if record is None:
            self.forget_local(object_id)
            return ours
        self._keep(object_id, record)
        if record != ours:
            log.warning("object %s was already recorded; the first record stands", object_id)
        return record

    def forget_local(self, object_id: str) -> None:
        super().forget(object_id)

    def _unwritten(self, object_id: str, record: ObjectRecord, exc: BaseException) -> ObjectRecord:
        """Keep a record the table did not take, to be written once it does; only the table's own
        failure marks it unhealthy (a refused entity is this record's problem alone)."""
        if _about_the_entity(exc):
            log.warning("object %s: the table refused its record (%s); kept on this instance only", object_id, exc)
            return record
        self._fault(exc)
        self._unsaved[object_id] = record
        return record

    async def _delete(self, object_id: str) -> None:
        if not self._may_call():
            return
        try:
            with contextlib.suppress(ResourceNotFoundError):
                await self._call(self._client.delete_entity(self.partition, row_key(object_id, "")))
            self._ok()
        except Exception as exc:
            self._fault(exc)

    async def _sweep_forever(self) -> None:
        while not self._closed:
            await asyncio.sleep(SWEEP_SECONDS)
            await self.sweep()

    async def sweep(self) -> int:
        """Delete expired rows (at most SWEEP_MAX_DELETES); return how many."""
        if not self._may_call():
            return 0
        deleted = 0
        try:
            pages = self._client.query_entities(
                "PartitionKey eq @pk and expires lt @now",
                parameters={"pk": self.partition, "now": float(time.time())},
                select=["PartitionKey", "RowKey"],
            )
            async for row in pages:
                with contextlib.suppress(ResourceNotFoundError):
                    await self._call(self._client.delete_entity(row["PartitionKey"], row["RowKey"]))
                deleted += 1
                if deleted >= SWEEP_MAX_DELETES:
                    break
            self._ok()
        except Exception as exc:
            self._fault(exc)
        return deleted

    async def _call(self, operation: Any) -> Any:
        return await asyncio.wait_for(operation, self.op_timeout)

    def _background(self, coro: Any) -> None:
        if self._closed:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # Health ------------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.table_health.healthy

    def _may_call(self) -> bool:
        return not self._closed and self.table_health.may_call()

    def _fault(self, exc: BaseException) -> None:
        self.table_health.fault(exc, "objects this instance has not seen are refused (503) until it is back")

    def _ok(self) -> None:
        if self.table_health.ok(f"writing {len(self._unsaved)} records made meanwhile"):
            for object_id, record in list(self._unsaved.items()):
                self._background(self._insert(object_id, record))

    def _retry_in(self) -> float:
        return self.table_health.retry_in()

    def health(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "healthy": self.healthy,
            "table": self.settings.table,
            "partition": self.partition,
            "unsaved": len(self._unsaved),
            "last_error": self.table_health.last_error,
            "ops": dict(self.ops),
        }


def _about_the_entity(exc: BaseException) -> bool:
    """A 400 is the table refusing this key or entity, not the table failing."""
    return isinstance(exc, HttpResponseError) and exc.status_code == 400


def _record(row: Any) -> ObjectRecord | None:
    """A row as a record; None for one no instance of ours would write."""
    try:
        expires = float(row.get("expires") or 0.0)
    except (TypeError, ValueError):
        return None
    backend = row.get("backend")
    if not isinstance(backend, str) or not backend or not math.isfinite(expires):
        return None
    return ObjectRecord(backend, str(row.get("client") or ""), str(row.get("kind") or "object"), expires)

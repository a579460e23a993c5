"""Object records shared by every instance, in the cooldowns' Table Storage account and table.

Why it is built this way:
- Own partition (`{LB_POOL}|objects`), so the cooldowns' partition query never reads object rows
  and several pools can share one table. RowKey is the object id (escaped like cooldown keys).
- Calls that name no object never reach this module. A call naming an id this instance does not
  know costs one point read; what it finds is kept in memory (the base `ObjectStore`), so the
  next call costs nothing.
- A new object's record is written (one upsert) before the client sees its id, so a follow-up
  sent to any instance finds it; the write is bounded by OP_TIMEOUT_SECONDS.
- Table Storage has no TTL: a read of an expired row treats it as absent and deletes it, and a
  sweep deletes expired rows (a bounded number per SWEEP_SECONDS).
- A Table fault is not a proxy fault: memory records and the look-up keep routing, one warning
  per outage, the Table is tried again after OUTAGE_RETRY_SECONDS, and records made meanwhile are
  written once it is back.
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
from azure.data.tables import UpdateMode

from lb.config import StateSettings
from lb.objects.records import MAX_RECORDS, ObjectRecord, ObjectStore
from lb.state.table import TableOps, make_table_client, row_key

log = logging.getLogger("lb.state")

OP_TIMEOUT_SECONDS = 2.0
OUTAGE_RETRY_SECONDS = 5.0  # while the table is away, requests don't wait on it more often than this
SWEEP_SECONDS = 3600.0
SWEEP_MAX_DELETES = 200
CLOSE_SECONDS = 3.0
MAX_ID_LENGTH = 256


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
        self.healthy = True
        self.last_error: str | None = None
        self._retry_at = 0.0  # monotonic; before it, a faulty table is not asked
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
        if record is not None or not self._may_call() or not _plausible(object_id):
            return record
        try:
            row = await self._call(self._client.get_entity(self.partition, row_key(object_id, "")))
        except ResourceNotFoundError:  # no such row (or no table yet)
            self._ok()
            return None
        except HttpResponseError as exc:
            if exc.status_code == 400:  # a key the table refuses: no record can have it
                return None
            self._fault(exc)
            return None
        except Exception as exc:
            self._fault(exc)
            return None
        self._ok()
        record = _record(row)
        if record is None or record.expires <= time.time():
            self._background(self._delete(object_id))
            return None
        self._keep(object_id, record)
        return record

    async def remember(self, object_id: str, record: ObjectRecord) -> None:
        self._keep(object_id, record)
        if not self._may_call():
            self._unsaved[object_id] = record
            return
        await self._write(object_id, record)

    def forget(self, object_id: str) -> None:
        super().forget(object_id)
        self._unsaved.pop(object_id, None)
        self._background(self._delete(object_id))

    # Table calls -------------------------------------------------------------------------------
    async def _write(self, object_id: str, record: ObjectRecord) -> None:
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
        failure: BaseException | None = None
        for _ in range(2):
            try:
                await self._call(self._client.upsert_entity(entity, mode=UpdateMode.REPLACE))
            except ResourceNotFoundError as exc:  # the table does not exist yet: create it, write again
                failure = exc
                try:
                    with contextlib.suppress(ResourceExistsError):
                        await self._call(self._client.create_table())
                except Exception as create_exc:
                    failure = create_exc
                    break
                continue
            except Exception as exc:
                failure = exc
                break
            self._unsaved.pop(object_id, None)
            return self._ok()
        if failure is not None:
            self._fault(failure)
        self._unsaved[object_id] = record

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
    def _may_call(self) -> bool:
        return not self._closed and (self.healthy or time.monotonic() >= self._retry_at)

    def _fault(self, exc: BaseException) -> None:
        status = getattr(exc, "status_code", None)
        first_line = str(exc).splitlines()[0][:160] if str(exc) else ""
        self.last_error = f"{type(exc).__name__}{f' {status}' if status else ''}: {first_line}".rstrip(": ")
        self._retry_at = time.monotonic() + OUTAGE_RETRY_SECONDS
        if self.healthy:
            self.healthy = False
            log.warning("object table unreachable, routing on this instance's records: %s", self.last_error)

    def _ok(self) -> None:
        if self.healthy:
            return
        self.healthy = True
        log.info("object table reachable again; writing %d records made meanwhile", len(self._unsaved))
        for object_id, record in list(self._unsaved.items()):
            self._background(self._write(object_id, record))

    def health(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "healthy": self.healthy,
            "table": self.settings.table,
            "partition": self.partition,
            "unsaved": len(self._unsaved),
            "last_error": self.last_error,
            "ops": dict(self.ops),
        }


def _plausible(object_id: str) -> bool:
    """Ids Azure hands out are short printable ASCII; anything else is not read from the table."""
    return 0 < len(object_id) <= MAX_ID_LENGTH and object_id.isascii() and object_id.isprintable()


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

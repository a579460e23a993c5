"""What prompt-cache affinity shares through Table Storage: the pool's secret, and who is serving.

Why it is built this way:
- The ranking of backends per conversation is keyed with a secret (`lb.routing.affinity`). Every
  instance must use the same one, and no client may be able to work it out. It is a random
  32 bytes, inserted once into the table (if absent: the first instance wins, the others read
  it) and read at start-up. Until it is read (the table unreachable at start-up) each instance
  ranks with `local_secret` (a hash of the configuration with its API keys, alike on every
  instance; random per process for Entra-only backends, which have no key to hide it); the
  table's secret replaces it once read (conversations reshuffle once).
- The hard load bound is held by each instance on its own recent calls, and before an instance
  has seen enough calls it allows a backend a share of a small allowance; the allowances of all
  instances add up, so each needs to know how many instances there are. Each instance upserts
  its own row (its recent calls per backend) once per `LB_STATE_REFRESH_MS` at most, reads the
  partition (one query) and tells `Affinity` the number of live instances and the other
  instances' recent calls (what a quiet instance measures the bound against).
- Never a Table call on the request path; rows live in their own partition (`{LB_POOL}.affinity`),
  one per instance, written only by it (no ETag races) and deleted when it closes; a row silent
  for `LIVE_SECONDS` is no longer counted. An outage keeps the last view (an instance gone
  meanwhile still counts: the allowance only gets smaller), logged once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

from lb.config import StateSettings
from lb.routing.affinity import Affinity, RecentLoad
from lb.state.health import TableHealth
from lb.state.rows import read_partition, replace_row
from lb.state.table import TableOps, make_table_client

log = logging.getLogger("lb.state.affinity")

OP_TIMEOUT_SECONDS = 2.0
FIRST_LOAD_SECONDS = 2.0  # start-up waits this long at most for the secret and the pool's rows
LIVE_SECONDS = 15.0  # a row not rewritten for this long is an instance gone
SECRET_ROW = "secret"
SECRET_BYTES = 32
INSTANCE_PREFIX = "i|"


class AffinityShare:
    """This instance's row in the `{pool}.affinity` partition; the secret and the others' rows as last read."""

    def __init__(
        self,
        settings: StateSettings,
        affinity: Affinity,
        instance_id: str,
        *,
        interval: float | None = None,
        op_timeout: float = OP_TIMEOUT_SECONDS,
        live_seconds: float = LIVE_SECONDS,
        table_answers: Callable[[], bool] = lambda: True,
    ) -> None:
        self.affinity = affinity
        self.instance_id = instance_id
        self.partition = f"{settings.pool}.affinity"
        self.interval = max(0.05, settings.refresh_ms / 1000.0) if interval is None else interval
        self.op_timeout = op_timeout
        self.live_seconds = live_seconds
        self.ops = TableOps()
        self.table_health = TableHealth("affinity table", log)
        self.secret_source = "local"  # lb.routing.affinity.local_secret, until the table's secret is read
        affinity.shared_after = 2 * self.interval  # a call this long after the last: the pool's view is fresh
        self._client, self._credential = make_table_client(settings, op_timeout, self.ops)
        self._table_answers = table_answers  # False: the cooldown store just found the table out of reach
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # Lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None and not self._closed:
            if self._table_answers():  # else start-up has waited for that table once already
                try:  # the secret before the first request, if the Table answers quickly
                    await asyncio.wait_for(self.round(), FIRST_LOAD_SECONDS)
                except asyncio.TimeoutError as exc:
                    self._fault(exc)
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):  # gone: the others' allowances grow back at once
            await self._call(self._client.delete_entity(self.partition, INSTANCE_PREFIX + self.instance_id))
        await self._client.close()
        if self._credential is not None:
            await self._credential.close()

    async def _run(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.interval)
            await self.round()

    async def round(self) -> None:
        """The secret (until read), then one upsert of this row and one read of the partition."""
        now = time.time()
        try:
            if self.secret_source != "table":
                await self._load_secret()
            await self._write(now)
            rows = await read_partition(self._client, self.partition, self.op_timeout)
        except Exception as exc:
            self._fault(exc)
            return
        self._load(rows, now)
        self.table_health.ok("the load bound counts the pool's instances")

    # Table calls ------------------------------------------------------------------------------
    async def _load_secret(self) -> None:
        secret = await read_secret(self._client, self.partition, self.op_timeout, create=True)
        if secret is not None:
            self.affinity.secret = secret
            self.secret_source = "table"

    async def _write(self, now: float) -> None:
        entity = {
            "PartitionKey": self.partition,
            "RowKey": INSTANCE_PREFIX + self.instance_id,
            "updated": now,
            "served": json.dumps(
                self.affinity.served.snapshot(now) + self.affinity.calls.snapshot(now), separators=(",", ":")
            ),
        }
        await replace_row(self._client, entity, self.op_timeout)

    async def _call(self, operation: Any) -> Any:
        return await asyncio.wait_for(operation, self.op_timeout)

    def _load(self, rows: list[Any], now: float) -> None:
        """Count the live instances and sum the others' recent calls (decayed to now)."""
        others = RecentLoad(self.affinity.served.half_life)
        live = 1
        for row in rows:
            key = str(row.get("RowKey", ""))
            if not key.startswith(INSTANCE_PREFIX) or key == INSTANCE_PREFIX + self.instance_id:
                continue
            updated = row.get("updated")
            if not isinstance(updated, int | float) or now - updated > self.live_seconds:
                continue
            live += 1
            try:
                others.merge(json.loads(str(row.get("served", "{}"))), now)
            except (ValueError, TypeError, AttributeError):
                log.debug("affinity row %s unreadable: counted, its calls skipped", key)
        self.affinity.instances, self.affinity.others = live, others

    # Health -----------------------------------------------------------------------------------
    def _fault(self, exc: BaseException) -> None:
        """The last view is kept; only the first fault of an outage is logged."""
        meanwhile = (
            f"keeping the last view of the pool (instance {self.instance_id}, secret from the {self.secret_source})"
        )
        self.table_health.fault(exc, meanwhile)

    @property
    def healthy(self) -> bool:
        return self.table_health.healthy

    def health(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "instances": self.affinity.instances,
            "secret": self.secret_source,
            **({"error": self.table_health.last_error} if self.table_health.last_error else {}),
        }


async def read_secret(client: Any, partition: str, op_timeout: float, *, create: bool) -> bytes | None:
    """The pool's secret from its row; with `create`, a new random one inserted if there is none
    (insert-if-absent: when two instances race, both end up reading the one that won)."""
    for _ in range(2):
        try:
            row = await asyncio.wait_for(client.get_entity(partition, SECRET_ROW), op_timeout)
            return base64.b64decode(str(row["secret"]))
        except ResourceNotFoundError:
            if not create:
                return None
        entity = {
            "PartitionKey": partition,
            "RowKey": SECRET_ROW,
            "secret": base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode(),
        }
        try:
            await asyncio.wait_for(client.create_entity(entity), op_timeout)
        except ResourceNotFoundError:  # no table yet
            with contextlib.suppress(ResourceExistsError):
                await asyncio.wait_for(client.create_table(), op_timeout)
            with contextlib.suppress(ResourceExistsError):
                await asyncio.wait_for(client.create_entity(entity), op_timeout)
        except ResourceExistsError:
            pass  # another instance's won: read it
    return None

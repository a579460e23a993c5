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
from lb.state.rows import RowShare, read_partition, replace_row

log = logging.getLogger("lb.state.affinity")

OP_TIMEOUT_SECONDS = 2.0
LIVE_SECONDS = 15.0  # a row not rewritten for this long is an instance gone
SECRET_ROW = "secret"
SECRET_BYTES = 32
INSTANCE_PREFIX = "i|"


class AffinityShare(RowShare):
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
        super().__init__(
            settings,
            instance_id,
            f"{settings.pool}.affinity",
            interval=max(0.05, settings.refresh_ms / 1000.0) if interval is None else interval,
            op_timeout=op_timeout,
            health=TableHealth("affinity table", log),
            table_answers=table_answers,
        )
        self.affinity = affinity
        self.live_seconds = live_seconds
        self.secret_source = "local"  # lb.routing.affinity.local_secret, until the table's secret is read
        affinity.shared_after = 2 * self.interval  # a call this long after the last: the pool's view is fresh

    async def _leave(self) -> None:
        """This row goes: the others' allowances grow back at once."""
        await self._call(self._client.delete_entity(self.partition, INSTANCE_PREFIX + self.instance_id))

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

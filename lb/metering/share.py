"""Token and request counts shared by every instance through Table Storage, so quotas hold over the pool.

Why it is built this way:
- Never a Table call per request. Each instance counts in memory (`lb.metering`) and, once a
  second at most and only when something changed, writes its own row: its live buckets (the last
  60 one-second and 60 one-minute buckets per client and backend, `lb.metering.windows`). It then reads the
  partition (one query) and sums the other instances' rows into the limiter's `others` and the
  pool's totals. The limit is thus enforced on a view about a second old: a client can overshoot
  by what the pool admits for it in that second, which is what one write per second buys.
- One row per instance, written only by that instance: an unconditional upsert, no ETag races.
  Buckets carry their own times, so a row of a stopped instance simply ages out of the windows;
  rows silent for `FORGET_SECONDS` are deleted by whichever instance sees them.
- The row also names the background responses and Assistants runs charged here lately and the runs
  whose reservation is held here (`lb.metering.responses`, `lb.metering.runs`): the first instance
  to see one finished charges it, once over the pool.
- The counts live in their own partition (`{LB_POOL}.usage`) of the cooldown table, so the
  cooldown store's partition query never sees them.
- A Table outage keeps every limit per instance (the other instances' counts are dropped rather
  than trusted while they age), logged once; recovery is logged too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from azure.core import MatchConditions

from lb.config import StateSettings
from lb.metering.quota import WINDOW
from lb.metering.windows import Windows
from lb.state.health import TableHealth
from lb.state.rows import RowShare, read_partition, replace_row

if TYPE_CHECKING:
    from lb.metering import Metering

log = logging.getLogger("lb.metering.usage")  # apart from lb.state: its outage is the same Table's, its meaning not

SHARE_INTERVAL_SECONDS = 1.0
OP_TIMEOUT_SECONDS = 2.0
FORGET_SECONDS = 2 * 3600.0  # a row this old holds nothing for the hour window: delete it
HEARTBEAT_SECONDS = 5.0  # a row holding reservations is rewritten this often, changed or not
STALE_SECONDS = 20.0  # reservations of a row not rewritten for this long are not trusted (a stopped instance)
PART_CHARS = 30_000  # a Table string property holds 32K UTF-16 characters; the JSON is cut into parts
MAX_PARTS = 30


class UsageShare(RowShare):
    """This instance's row in the shared usage partition, and the sums of everyone else's."""

    def __init__(
        self,
        settings: StateSettings,
        metering: Metering,
        instance_id: str,
        *,
        interval: float = SHARE_INTERVAL_SECONDS,
        op_timeout: float = OP_TIMEOUT_SECONDS,
        table_answers: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__(
            settings,
            instance_id,
            f"{settings.pool}.usage",
            interval=interval,
            op_timeout=op_timeout,
            health=TableHealth("usage table", log),
            table_answers=table_answers,
        )
        self.settings = settings
        self.metering = metering
        self.pool_clients = Windows(metering.clients.width)  # the other instances' counts, as last read
        self.pool_backends = Windows(metering.backends.width)
        self.instances = 0  # rows with counts seen at the last read, this one's included
        self._deleting: set[asyncio.Task[None]] = set()
        self._written_version = 0  # the row is first written once something was counted
        self._written_at = 0.0

    async def _leave(self) -> None:
        """The last counts, so the pool's view is complete."""
        await self._write(time.time())

    async def round(self) -> None:
        """One write of this row (if anything changed) and one read of the partition."""
        now = time.time()
        try:
            holding = bool(self.metering.limiter.reserved or self.metering.responses.held)
            if self.metering.version != self._written_version or (
                holding and now - self._written_at >= HEARTBEAT_SECONDS
            ):
                await self._write(now)
            rows = await read_partition(self._client, self.partition, self.op_timeout)
        except Exception as exc:
            self._fault(exc)
            return
        self._load(rows, now)
        self.metering.tick(now)
        self.table_health.ok("client limits hold over the pool")

    # Table calls ------------------------------------------------------------------------------
    async def _write(self, now: float) -> None:
        version = self.metering.version
        data = json.dumps(
            {
                "q": self.metering.limiter.local.buckets(now, WINDOW),
                "r": self.metering.limiter.reserved,  # client -> [calls, tokens] in flight here
                "o": self.metering.responses.recent(now),  # responses and runs charged here lately
                "h": self.metering.responses.runs_held(),  # runs whose reservation is held here
                "f": self.metering.responses.telling(now),  # runs seen finished here, held elsewhere
                "c": self.metering.clients.buckets(now),
                "b": self.metering.backends.buckets(now),
            },
            separators=(",", ":"),
        )
        parts = [data[i : i + PART_CHARS] for i in range(0, len(data), PART_CHARS)][:MAX_PARTS]
        entity: dict[str, Any] = {
            "PartitionKey": self.partition,
            "RowKey": self.instance_id,
            "updated": now,
            "parts": len(parts),
            **{f"d{i}": part for i, part in enumerate(parts)},
        }
        await replace_row(self._client, entity, self.op_timeout)
        self._written_version, self._written_at = version, now

    def _load(self, rows: list[Any], now: float) -> None:
        """Sum the other instances' rows into fresh windows (a stopped instance's counts age out)."""
        quota = Windows(self.metering.limiter.local.width)
        clients, backends = Windows(self.pool_clients.width), Windows(self.pool_backends.width)
        reserved: dict[str, list[int]] = {}
        charged: set[str] = set()
        held_runs: dict[str, str] = {}  # run id -> the instance holding it (the first by id)
        told: dict[str, int | None] = {}  # runs held here that another instance saw finished -> tokens
        seen = 1
        for row in rows:
            if row.get("RowKey") == self.instance_id:
                continue
            updated = row.get("updated")
            if isinstance(updated, int | float) and now - updated > FORGET_SECONDS:
                task = asyncio.get_running_loop().create_task(self._delete(row))
                self._deleting.add(task)  # held until done: the loop keeps only weak references
                task.add_done_callback(self._deleting.discard)
                continue
            try:
                data = json.loads("".join(str(row.get(f"d{i}", "")) for i in range(int(row.get("parts", 0)))))
                quota.load(data.get("q", {}))
                clients.load(data.get("c", {}))
                backends.load(data.get("b", {}))
                charged.update(str(rid) for rid in data.get("o", ()))
                for rid, (tokens, holder) in data.get("f", {}).items():
                    if holder == self.instance_id:
                        told[str(rid)] = int(tokens) if tokens is not None else None
                if isinstance(updated, int | float) and now - updated <= STALE_SECONDS:  # a live instance's holds
                    for rid in data.get("h", ()):
                        held_runs[str(rid)] = min(held_runs.get(str(rid), row["RowKey"]), row["RowKey"])
                    for client, (calls, tokens) in data.get("r", {}).items():
                        held = reserved.setdefault(client, [0, 0])
                        held[0] += int(calls)
                        held[1] += int(tokens)
            except (ValueError, TypeError, AttributeError, IndexError):  # a malformed row counts for nothing
                log.debug("usage row %s unreadable: skipped", row.get("RowKey"))
                continue
            seen += 1
        self.metering.limiter.others = quota
        self.metering.limiter.others_reserved = reserved
        self.metering.limiter.synced(max(seen, 2))  # another may be serving before its first row
        self.metering.responses.charged_elsewhere = frozenset(charged)
        self.metering.responses.runs_held_elsewhere = held_runs
        self.metering.responses.told_here = told
        self.pool_clients, self.pool_backends, self.instances = clients, backends, seen

    async def _delete(self, row: Any) -> None:
        """ETag-guarded: a row its instance rewrote meanwhile stays (a lost race is no fault)."""
        with contextlib.suppress(Exception):
            etag = row.metadata["etag"]
            await self._call(
                self._client.delete_entity(
                    row["PartitionKey"], row["RowKey"], etag=etag, match_condition=MatchConditions.IfNotModified
                )
            )

    # Health -----------------------------------------------------------------------------------
    def _fault(self, exc: BaseException) -> None:
        """Limits fall back to this instance's counts; only the first fault of an outage is logged."""
        self.metering.limiter.others = Windows(self.metering.limiter.local.width)
        self.metering.limiter.others_reserved = {}
        self.metering.limiter.synced(1)
        meanwhile = f"client limits hold per instance meanwhile (instance {self.instance_id})"
        self.table_health.fault(exc, meanwhile)

    def pool_report(self, now: float, client: str | None = None) -> dict[str, Any]:
        """The pool's counts: this instance's own plus the others' as last read (about a second old);
        with `client`, that client's alone."""
        from lb.metering import windows_table  # lb.metering imports this module for typing only

        clients, backends = Windows(self.pool_clients.width), Windows(self.pool_backends.width)
        for target, mine, theirs in (
            (clients, self.metering.clients, self.pool_clients),
            (backends, self.metering.backends, self.pool_backends),
        ):
            target.load(mine.buckets(now))
            target.load(theirs.buckets(now))
        report: dict[str, Any] = {"instances": self.instances, "healthy": self.healthy}
        report["clients"] = windows_table(clients, now, client)
        if client is None:
            report.update(ops=dict(self.ops), backends=windows_table(backends, now))
        return report

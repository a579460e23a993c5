"""Shared counts: each instance replaces its own row and reads its partition, in the background.

Usage counts (`lb.metering.share`) and affinity's recent calls (`lb.state.affinity`) are shared the
same way: one row per instance, rewritten whole in the background, and one partition query a round;
nothing on the request path. `RowShare` is that lifecycle (a bounded first round at start-up, a
round every `interval`, a last act at close); the two shares differ only in what a round writes and
reads, what a fault means and what closing leaves behind. Every call is bounded by the store's
timeout; a table that is not there yet (a new account, Azurite restarted) is created by the first write.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.data.tables import UpdateMode

from lb.config import StateSettings
from lb.state.health import TableHealth
from lb.state.table import TableOps, make_table_client

if TYPE_CHECKING:
    from azure.data.tables.aio import TableClient

FIRST_LOAD_SECONDS = 2.0  # start-up waits this long at most for the pool's rows


class RowShare(abc.ABC):
    """One instance's row in `partition`, kept by a background round every `interval` seconds."""

    def __init__(
        self,
        settings: StateSettings,
        instance_id: str,
        partition: str,
        *,
        interval: float,
        op_timeout: float,
        health: TableHealth,
        table_answers: Callable[[], bool] = lambda: True,
    ) -> None:
        self.instance_id = instance_id
        self.partition = partition
        self.interval = interval
        self.op_timeout = op_timeout
        self.ops = TableOps()  # HTTP requests sent: what the figures count
        self.table_health = health
        self._client, self._credential = make_table_client(settings, op_timeout, self.ops)
        self._table_answers = table_answers  # False: the cooldown store just found the table out of reach
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @abc.abstractmethod
    async def round(self) -> None:
        """One write of this row and one read of the partition; a fault goes to `_fault`, never up."""

    @abc.abstractmethod
    def _fault(self, exc: BaseException) -> None:
        """The table failed: what the share falls back to meanwhile."""

    @abc.abstractmethod
    async def _leave(self) -> None:
        """The last Table call at close (errors are ignored: the instance is going anyway)."""

    async def start(self) -> None:
        if self._task is None and not self._closed:
            # The pool's view before the first request, if the Table answers quickly; not if start-up
            # has just waited for the same table once already (the cooldown store's first load).
            if self._table_answers():
                try:
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
        with contextlib.suppress(Exception):
            await self._leave()
        await self._client.close()
        if self._credential is not None:
            await self._credential.close()

    async def _run(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.interval)
            await self.round()

    async def _call(self, operation: Any) -> Any:
        return await asyncio.wait_for(operation, self.op_timeout)

    @property
    def healthy(self) -> bool:
        return self.table_health.healthy


async def replace_row(client: TableClient, entity: dict[str, Any], timeout: float) -> None:
    """Write `entity` whole over whatever row it replaces (only this instance writes its row)."""
    try:
        await asyncio.wait_for(client.upsert_entity(entity, mode=UpdateMode.REPLACE), timeout)
    except ResourceNotFoundError:
        with contextlib.suppress(ResourceExistsError):
            await asyncio.wait_for(client.create_table(), timeout)
        await asyncio.wait_for(client.upsert_entity(entity, mode=UpdateMode.REPLACE), timeout)


async def read_partition(client: TableClient, partition: str, timeout: float) -> list[Any]:
    """Every row of `partition` (none while the table is not there yet), in one bounded query."""

    async def run() -> list[Any]:
        pages = client.query_entities("PartitionKey eq @pk", parameters={"pk": partition})
        return [row async for row in pages]

    try:
        return await asyncio.wait_for(run(), timeout)
    except ResourceNotFoundError:
        return []

"""The Table calls of shared counts: each instance replaces its own row and reads its partition.

Usage counts (`lb.metering.share`) and affinity's recent calls (`lb.state.affinity`) are shared the
same way: one row per instance, rewritten whole in the background, and one partition query a round;
nothing on the request path. Every call is bounded by the store's timeout; a table that is not
there yet (a new account, Azurite restarted) is created by the first write.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.data.tables import UpdateMode

if TYPE_CHECKING:
    from azure.data.tables.aio import TableClient


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

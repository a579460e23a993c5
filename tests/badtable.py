"""A real, bad Table: a TCP relay in front of Azurite that can hold answers back, cut connections or go away.

A test puts stores behind a relay to give them a slow or unreachable Table while the emulator itself
runs on: stopping and restarting Azurite (tests/azurite.py) costs seconds of Node.js start-up each
time. `go_away` then `drop_table` then `come_back` is what a restarted in-memory Azurite looks like
to a client: connections refused for a while, then the account without the table.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from azure.data.tables.aio import TableServiceClient


class SlowRelay:
    """A TCP relay in front of Azurite that can hold answers back, cut connections or stop listening."""

    def __init__(self, table_url: str) -> None:
        parts = urlsplit(table_url)
        self.target, self.account = (parts.hostname or "127.0.0.1", parts.port or 80), parts.path
        self.delay = 0.0  # seconds each answer chunk is held
        self.only: bytes | None = None  # ... only chunks containing this (b'"value"': partition listings)
        self.down = False  # refuse connections
        self.server: asyncio.Server | None = None
        self.port = 0
        self._open: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.url

    @property
    def url(self) -> str:
        """The relayed table endpoint (once started)."""
        return f"http://127.0.0.1:{self.port}{self.account}"

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until `down` is cleared."""
        self.down = True
        for writer in self._open:
            writer.transport.abort()

    async def go_away(self) -> None:
        """Drop every open connection and stop listening: to a client, the emulator has stopped."""
        await self.close()

    async def come_back(self) -> None:
        """Listen again, on the same port."""
        self.down = False
        await self.start()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        if self.down:  # cut while we were connecting upstream (a loaded machine widens that window)
            up_writer.close()
            writer.transport.abort()
            return
        self._open.add(writer)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, slow: bool) -> None:
            try:
                while data := await src.read(65536):
                    if slow and self.delay and (self.only is None or self.only in data):
                        await asyncio.sleep(self.delay)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))
        finally:
            self._open.discard(writer)


async def drop_table(connection_string: str, table: str) -> None:
    """Delete `table` (past the relay, straight on Azurite), as an emulator restart loses it."""
    async with TableServiceClient.from_connection_string(connection_string) as service:
        await service.delete_table(table)

"""Cooldowns shared by every instance through one Azure Table Storage partition.

Why it is built this way:
- A calm pool costs requests nothing. They read the in-memory view (`CooldownStore`), a background
  poller refreshes it with one partition query per `LB_STATE_REFRESH_MS`, and a 429's cooldown is
  written in the background after the local view already routes around it.
- Under throttling, staleness is what costs: every call another instance sends before it reads a
  row is a doomed call to a backend that already said 429. So while the pool is under pressure a
  request whose view is older than `LB_STATE_HOT_REFRESH_MS` waits for a fresh partition query
  (one at a time, shared by every request that arrives meanwhile), at most `LB_STATE_CONFIRM_MS`;
  a query slower than that pauses the waiting for a while, so a slow Table cannot slow requests
  for long. Polling faster instead would cost the same queries on idle instances and still leave
  half an interval of staleness.
- A write never shortens another instance's longer cooldown: read, compare, then create-if-absent
  or replace with If-Match on the ETag; a lost race (409/412) re-reads and tries again, bounded.
- One row per (pool, backend, deployment) is reused, and rows expired for `keep_expired_seconds`
  are deleted (ETag-guarded) as refreshes see them, so the table does not grow.
- A Table fault is not a proxy fault: the view keeps serving, one warning per outage, one info on
  recovery, `health()` says degraded, and cooldowns written during the outage are re-sent after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from datetime import datetime, timezone
from typing import Any, NamedTuple

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import UpdateMode
from azure.data.tables.aio import TableClient

from lb.config import ConfigError, StateSettings
from lb.state import Cooldown, CooldownStore
from lb.state.health import TableHealth

log = logging.getLogger("lb.state")

OP_TIMEOUT_SECONDS = 2.0  # per Table call; the request path never waits for one anyway
FIRST_LOAD_SECONDS = 2.0  # the only wait a caller sees: start-up
WRITE_TRIES = 10  # read-compare-write rounds; n racing writers need about ln(n) + 1 on average
FAULT_TRIES = 3  # ... of which this many may fail on a Table fault
CLOSE_SECONDS = 3.0  # how long close() waits for writes still in flight
KEEP_EXPIRED_SECONDS = 300.0  # a pair throttled again soon reuses its row instead of delete + create
MAX_DELETES_PER_REFRESH = 20
OUTAGE_RETRY_SECONDS = 1.0  # while degraded, refresh attempts are at least this far apart
PRESSURE_LINGER_SECONDS = 60.0  # quota pressure comes back as windows reset: stay alert this long after
CONFIRM_PAUSE_SECONDS = 10.0  # after a query outlasted LB_STATE_CONFIRM_MS, requests stop waiting this long
IF_MATCH, REPLACE = MatchConditions.IfNotModified, UpdateMode.REPLACE
_FORBIDDEN_KEY_CHARS = set("/\\#?%|")  # Table keys forbid / \ # ?; % and | are our escape and separator


def row_key(backend: str, deployment: str) -> str:
    """`{backend}|{deployment}`, percent-escaping what Table keys forbid (so the mapping stays one-to-one)."""

    def esc(text: str) -> str:
        return "".join(
            f"%{ord(c):02X}" if c in _FORBIDDEN_KEY_CHARS or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F else c
            for c in text
        )

    return f"{esc(backend)}|{esc(deployment)}"


def default_instance_id() -> str:
    site = os.environ.get("WEBSITE_INSTANCE_ID", "")[:12]
    return f"{site or socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class TableOps(dict):
    """The HTTP requests a Table client sent, by kind: its `raw_request_hook`, so tests, figures and
    `/lb/status` count what went on the wire (SDK retries included)."""

    def __init__(self) -> None:
        super().__init__(queries=0, reads=0, writes=0, deletes=0)

    def __call__(self, request: Any) -> None:
        http = request.http_request
        if http.method == "GET":
            self["reads" if "RowKey=" in http.url.split("?")[0] else "queries"] += 1
        else:
            self["deletes" if http.method == "DELETE" else "writes"] += 1


def make_table_client(settings: StateSettings, op_timeout: float, hook: Any) -> tuple[TableClient, Any]:
    """A client of the state table (and its Entra ID credential, None with a connection string); every
    call bounded by `op_timeout`, never retried by the SDK, each HTTP request shown to `hook`."""
    options: dict[str, Any] = {
        "connection_timeout": op_timeout,
        "read_timeout": op_timeout,
        "retry_total": 0,  # our own loops retry; SDK backoff would only hold writes longer
        "raw_request_hook": hook,
    }
    if settings.connection_string:
        try:
            return TableClient.from_connection_string(settings.connection_string, settings.table, **options), None
        except ValueError:  # its message could echo the string; ours never does
            raise ConfigError("LB_STATE_CONNECTION_STRING: not a valid Storage connection string") from None
    from azure.identity.aio import DefaultAzureCredential  # only needed for Entra ID auth

    credential = DefaultAzureCredential()  # honours AZURE_CLIENT_ID (user-assigned identity)
    try:
        return TableClient(str(settings.table_endpoint), settings.table, credential=credential, **options), credential
    except ValueError as exc:  # e.g. an http:// endpoint: tokens are only sent over https
        raise ConfigError(f"LB_STATE_TABLE_ENDPOINT: {exc}") from None


class TableStore(CooldownStore):
    kind = "table"

    def __init__(
        self,
        settings: StateSettings,
        *,
        instance_id: str | None = None,
        op_timeout: float = OP_TIMEOUT_SECONDS,
        keep_expired_seconds: float = KEEP_EXPIRED_SECONDS,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.instance_id = instance_id or default_instance_id()
        self.op_timeout = op_timeout
        self.keep_expired_seconds = keep_expired_seconds
        self.ops = TableOps()
        self.table_health = TableHealth("state table", log)
        self._credential: Any = None
        self._client = self._make_client(settings)
        self._attempted_at = float("-inf")  # monotonic time of the last refresh attempt
        self._refreshed_at: float | None = None  # ... and of the last successful one
        self._view_as_of = float("-inf")  # monotonic start of the query the view last came from
        self._refreshing: asyncio.Task[None] | None = None  # the one partition query in flight
        self._confirm_paused_until = 0.0  # monotonic; see CONFIRM_PAUSE_SECONDS
        self._poller: asyncio.Task[None] | None = None
        self._cleanup_task: asyncio.Task[None] | None = None
        self._pending: dict[tuple[str, str], Cooldown] = {}  # newest cooldown waiting to be written, per pair
        self._writers: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._closed = False
        self._pressure_until = 0.0  # epoch second until which the pool counts as under throttling
        self._rows: dict[tuple[str, str], Known] = {}  # what the table holds, as last listed or written

    def _make_client(self, settings: StateSettings) -> TableClient:
        client, self._credential = make_table_client(settings, self.op_timeout, self.ops)
        return client

    # Lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Create the table if needed and load the partition, waiting FIRST_LOAD_SECONDS at most."""
        try:
            await asyncio.wait_for(self._refresh(), FIRST_LOAD_SECONDS)
        except asyncio.TimeoutError as exc:
            self._fault(exc)
        self._ensure_poller()

    async def close(self) -> None:
        writers = list(self._writers.values())
        if writers:
            await asyncio.wait(writers, timeout=CLOSE_SECONDS)
        self._closed = True  # from here on nothing starts a Table call
        tasks = [
            t
            for t in (*self._writers.values(), self._poller, self._refreshing, self._cleanup_task)
            if t and not t.done()
        ]
        for task in tasks:
            task.cancel()
        if tasks:  # let them end before the client below closes (bounded: wait_for can swallow a cancel)
            await asyncio.wait(tasks, timeout=CLOSE_SECONDS)
        await self._client.close()
        if self._credential is not None:
            await self._credential.close()

    # Refresh -------------------------------------------------------------------------------
    async def sync(self) -> None:
        """Called before each request is routed. Calm: returns at once. Under pressure: makes sure the
        view is no older than hot_refresh_ms, waiting confirm_ms at most (see the module docstring)."""
        self._ensure_poller()
        if self._closed or time.time() >= self._pressure_until or not self.healthy:
            return  # calm, or the table is away (the poller retries it at its own pace)
        now = time.monotonic()
        if now - self._view_as_of < self.settings.hot_refresh_ms / 1000:
            return
        refresh = self._shared_refresh()
        if self.settings.confirm_ms <= 0 or now < self._confirm_paused_until:
            return  # the refresh goes on without this request: it helps the next ones
        # asyncio.wait neither cancels the shared query on timeout nor raises if close() cancels it
        done, _ = await asyncio.wait({refresh}, timeout=self.settings.confirm_ms / 1000)
        if not done:
            self._confirm_paused_until = time.monotonic() + CONFIRM_PAUSE_SECONDS
            log.debug("state query slower than %d ms: requests stop waiting for it", self.settings.confirm_ms)

    def _shared_refresh(self) -> asyncio.Task[None]:
        """The partition query in flight, or a new one: never two at once from one instance."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        return self._refreshing

    def _ensure_poller(self) -> None:
        if not self._closed and (self._poller is None or self._poller.done()):
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        """One partition query per refresh_ms from start() to close(), busy or idle, so the view is
        never older than refresh_ms: a refresh started by a request would only help the next one, and
        an instance that was idle must not send its first requests to a backend another throttled.
        Any refresh, a request's included, restarts the interval."""
        while not self._closed:
            interval = self.settings.refresh_ms / 1000
            if not self.healthy:  # under pressure requests stop refreshing then: the poller retries soon
                pressed = time.time() < self._pressure_until
                interval = OUTAGE_RETRY_SECONDS if pressed else max(interval, OUTAGE_RETRY_SECONDS)
            wait = self._attempted_at + interval - time.monotonic()
            if wait > 0:  # naps, so a fault or pressure that starts meanwhile is seen within one
                await asyncio.sleep(min(wait, OUTAGE_RETRY_SECONDS))
            else:
                await self._shared_refresh()

    async def _refresh(self) -> None:
        started = self._attempted_at = time.monotonic()
        try:
            rows = await self._query()
        except ResourceNotFoundError:  # first start, or the table was deleted (e.g. Azurite restarted)
            try:
                await self._ensure_table()
                rows = await self._query()
            except Exception as exc:
                return self._fault(exc)
        except Exception as exc:
            return self._fault(exc)
        self._refreshed_at = time.monotonic()
        self._view_as_of = max(self._view_as_of, started)
        old = time.time() - self.keep_expired_seconds
        listed = {_pair(row) for row in rows}
        for key in [k for k, known in self._rows.items() if k not in listed and known.as_of <= started]:
            del self._rows[key]  # absent when listed, and not written since: a first write creates it
        expired = [row for row in rows if self._learn(row, started) < old]
        if expired and self._cleanup_task is None:
            self._cleanup_task = asyncio.create_task(self._delete_expired(expired[:MAX_DELETES_PER_REFRESH]))
        self._recovered()  # after the listing: a table that came back empty gets our cooldowns again

    def _merge(self, entry: Cooldown) -> Cooldown:
        """Any cooldown, ours or another instance's, puts the pool under pressure (see `sync`)."""
        merged = super()._merge(entry)
        self._pressure_until = max(self._pressure_until, merged.until + PRESSURE_LINGER_SECONDS)
        return merged

    def expect_throttling(self, now: float) -> None:
        """Counted as pressure from the moment a backend reports its quota nearly gone: the first
        429 of an episode is then shared as fast as the later ones (see `sync`)."""
        self._pressure_until = max(self._pressure_until, now + PRESSURE_LINGER_SECONDS)

    def _learn(self, row: Any, as_of: float) -> float:
        """Merge a row read at `as_of` (monotonic) into the view (the longer cooldown wins, expired ones
        are skipped); return its end. A listing that started before our own write of the row
        finished says nothing newer about it, so that write's ETag is kept."""
        until = _until(row)
        key = _pair(row)
        known = self._rows.get(key)
        if known is None or known.as_of <= as_of:
            self._rows[key] = Known(until, row.metadata.get("etag"), as_of)
        if until > time.time():
            self._merge(Cooldown(*key, until, str(row.get("reason", "")), str(row.get("instance", ""))))
        return until

    async def _query(self) -> list[Any]:
        async def run() -> list[Any]:
            pages = self._client.query_entities("PartitionKey eq @pk", parameters={"pk": self.settings.pool})
            return [row async for row in pages]

        return await self._call(run())

    async def _call(self, operation: Any) -> Any:
        """Every Table call is bounded: the SDK timeouts cover the socket, this covers the whole call."""
        return await asyncio.wait_for(operation, self.op_timeout)

    async def _ensure_table(self) -> None:
        with contextlib.suppress(ResourceExistsError):
            await self._call(self._client.create_table())

    async def _delete_expired(self, rows: list[Any]) -> None:
        """Remove rows nobody refreshed for a while; the ETag keeps a row another instance just reused."""
        try:
            for row in rows:
                pk, rk, etag = row["PartitionKey"], row["RowKey"], row.metadata["etag"]
                with contextlib.suppress(ResourceModifiedError, ResourceNotFoundError):
                    await self._call(self._client.delete_entity(pk, rk, etag=etag, match_condition=IF_MATCH))
                    key = _pair(row)
                    self._rows.pop(key, None)
        except Exception as exc:
            self._fault(exc)
        finally:
            self._cleanup_task = None

    # Writes --------------------------------------------------------------------------------
    def publish(self, entry: Cooldown) -> None:
        """Queue the cooldown for the table; one writer per pair coalesces bursts of 429s."""
        key = (entry.backend, entry.deployment)
        known = self._rows.get(key)
        if known is not None and known.until >= entry.until:
            return  # the table already holds this cooldown or a longer one
        waiting = self._pending.get(key)
        if waiting is None or waiting.until < entry.until:
            self._pending[key] = entry
        if key not in self._writers and not self._closed:
            try:
                task = asyncio.get_running_loop().create_task(self._write_pending(key))
            except RuntimeError:  # no event loop (a sync caller): the next publish in a loop will write it
                return
            self._writers[key] = task
            task.add_done_callback(lambda _t: self._writers.pop(key, None))

    async def flush(self) -> None:
        """Wait for the background writers `publish` started, and those they started meanwhile (unbounded,
        unlike `close`): what a caller about to read the table, from here or another instance, needs."""
        while self._writers:
            await asyncio.gather(*self._writers.values())

    async def _write_pending(self, key: tuple[str, str]) -> None:
        while (entry := self._pending.pop(key, None)) is not None:
            await self._write(entry)

    async def _write(self, entry: Cooldown) -> None:
        pk, rk = self.settings.pool, row_key(entry.backend, entry.deployment)
        fields = {
            "PartitionKey": pk,
            "RowKey": rk,
            "backend": entry.backend,
            "deployment": entry.deployment,
            "cooling_until": float(entry.until),
            "cooling_until_utc": datetime.fromtimestamp(entry.until, timezone.utc),
            "status": "cooling",
            "reason": entry.reason[:200],
            "instance": entry.instance,
        }
        key = (entry.backend, entry.deployment)
        # The last partition listing says what the row is (its ETag, or absent), so the first try
        # skips the read: the conditional write fails if the row changed since, and then we read.
        known = self._rows.get(key)
        guess, etag = self._refreshed_at is not None, known.etag if known is not None else None
        faults = 0
        for _ in range(WRITE_TRIES):
            try:
                if guess:
                    guess = False
                else:
                    current = None
                    with contextlib.suppress(ResourceNotFoundError):
                        current = await self._call(self._client.get_entity(pk, rk))
                    if current is not None and _until(current) >= entry.until:
                        self._learn(current, time.monotonic())  # someone else's longer cooldown wins; adopt it
                        return self._recovered()
                    etag = None if current is None else current.metadata["etag"]
                if etag is None:
                    written = await self._call(self._client.create_entity(fields))
                else:
                    written = await self._call(
                        self._client.update_entity(fields, REPLACE, etag=etag, match_condition=IF_MATCH)
                    )
                self._rows[key] = Known(entry.until, written.get("etag"), time.monotonic())
                return self._recovered()
            except (ResourceExistsError, ResourceModifiedError):
                continue  # another writer got there first: re-read and compare again
            except ResourceNotFoundError:  # create_entity into a missing table
                try:
                    await self._ensure_table()
                except Exception as exc:
                    self._fault(exc)
            except Exception as exc:
                self._fault(exc)
                faults += 1
                if faults >= FAULT_TRIES:
                    return  # the table is away; _recovered() re-sends what is still cooling
                await asyncio.sleep(0.2 * faults)
        log.debug("gave up writing cooldown %s|%s after %d tries", entry.backend, entry.deployment, WRITE_TRIES)

    # Health --------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.table_health.healthy

    def _fault(self, exc: BaseException) -> None:
        self.table_health.fault(exc, "serving on this instance's view")

    def _recovered(self) -> None:
        if not self.table_health.ok():
            return
        now = time.time()
        for c in self.active(now):  # share what this instance learned while the table was away
            if c.instance == self.instance_id:
                self.publish(c)

    def health(self) -> dict[str, Any]:
        age = None if self._refreshed_at is None else round(time.monotonic() - self._refreshed_at, 3)
        return {
            "kind": self.kind,
            "healthy": self.healthy,
            "table": self.settings.table,
            "pool": self.settings.pool,
            "instance": self.instance_id,
            "refresh_ms": self.settings.refresh_ms,
            "last_error": self.table_health.last_error,
            "last_refresh_age_s": age,
            "ops": dict(self.ops),
        }


class Known(NamedTuple):
    """What this instance knows one table row holds, so writes skip needless calls and reads."""

    until: float  # its cooling-until (epoch seconds)
    etag: str | None
    as_of: float  # monotonic time it was true: a listing's start, or a write's end


def _until(row: Any) -> float:
    """A row's cooling-until; 0.0 (expired) for a value no instance of ours would write."""
    try:
        until = float(row.get("cooling_until") or 0.0)
    except (TypeError, ValueError):
        return 0.0
    return until if math.isfinite(until) else 0.0


def _pair(row: Any) -> tuple[str, str]:
    """The (backend, deployment) a table row is about."""
    return str(row.get("backend", "")), str(row.get("deployment", ""))

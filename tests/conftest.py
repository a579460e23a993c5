"""Fixtures that start real things: simulated Azure OpenAI backends and the proxy, on sockets.

The suite has layers (see pyproject's markers): a test that uses `servers` (or `make_pool`) is
marked `e2e`, one that uses `azurite` is marked `azurite`, here, by the fixtures it asks for; a
test that starts processes or sockets some other way says so with its own marker. What is left is
the unit layer: `make test-unit`, no sockets, no servers, seconds. Waits poll (`wait_until`), never sleep a fixed time.
"""

from __future__ import annotations

import asyncio
import glob
import os
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import openai
import pytest
from hypothesis import settings

from lb.app import create_app
from lb.config import load_settings
from lb.objects.records import ObjectRecord
from lb.proxy import Proxy
from lb.sim import Servers, SimBackend, free_port
from tests.azurite import azurite_fixture  # noqa: F401  (the `azurite` fixture: a real Table Storage)
from tests.idp import LocalIdP

# Property tests draw the same examples on every run (CI included): a new failure is a change's doing,
# not a new draw. Explore further with `pytest --hypothesis-seed=N` or `HYPOTHESIS_PROFILE=explore`.
settings.register_profile("suite", derandomize=True, deadline=None)
settings.register_profile("explore", max_examples=5_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

CLIENT_KEY = "client-key-for-tests"
API_VERSION = "2024-10-21"
# One TLS context for the clients tests make: each new client would load the CA bundle into one of
# its own (tens of ms of CPU, the largest CPU cost of an end-to-end test), and tests speak plain HTTP.
TLS = ssl.create_default_context()


class SdkHttp(openai.DefaultHttpxClient):
    """The openai SDK's own default HTTP client, on the shared TLS context, closed when the test that
    made it ends (`close_sdk_connections`)."""

    made: ClassVar[list[SdkHttp]] = []

    def __init__(self) -> None:
        super().__init__(verify=TLS)
        SdkHttp.made.append(self)


@pytest.fixture(autouse=True)
def close_sdk_connections() -> Iterator[None]:
    """Close the SDK clients' connections a test made. An SDK client is a reference cycle: left to the
    garbage collector, its sockets may be finalized before it closes them, and each warns (later, in
    whichever test runs then)."""
    before = len(SdkHttp.made)
    yield
    while len(SdkHttp.made) > before:
        SdkHttp.made.pop().close()


def wait_until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll `condition` until it holds. A fixed sleep is too long on a fast machine and too short on a
    loaded one; this returns as soon as it can and fails naming what never happened."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.02)


async def eventually(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Whether `condition` holds within `seconds`, polled on the running event loop (what `wait_until`
    is to a test's thread): work in the background goes on meanwhile."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def waiting_for_a_cpu(*pids: int) -> float:
    """Seconds this thread (or, given `pids`, all threads of those processes together) has spent
    runnable but not running, a CPU being busy with other processes: the kernel's run-queue delay
    (/proc/thread-self/schedstat, /proc/PID/task/*/schedstat); 0.0 where the kernel does not say."""
    paths = [path for pid in pids for path in glob.glob(f"/proc/{pid}/task/*/schedstat")]
    waited = 0
    for path in paths if pids else ["/proc/thread-self/schedstat"]:
        try:
            with open(path) as f:
                waited += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that has ended, or a kernel without schedstats
    return waited / 1e9


class Stalls:
    """How long the current thread (an event loop's, a client's) waited for a CPU meanwhile: `with
    Stalls() as stalls:`. A loaded machine makes every timer of that loop, or every step of that
    client, late by as much, so a bound on when something came may allow its quiet-machine slack
    plus `stalls.seconds`: as tight as ever where the thread never waits (0), never failed by other
    processes alone. Time the code under test spends itself, computing or blocked, is not counted."""

    def __init__(self, *pids: int) -> None:
        # Given processes: all their threads' waits, added up (`Stalls(os.getpid())`: a client and the
        # servers' loop serving it; an `lb serve` process's pid: what that process waited too).
        self.pids = pids
        self.seconds = 0.0
        self._from = 0.0

    def __enter__(self) -> Stalls:
        self._from = waiting_for_a_cpu(*self.pids)
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = self.so_far()

    def so_far(self) -> float:
        """The wait up to now, inside the `with`."""
        return waiting_for_a_cpu(*self.pids) - self._from


class SendTimes:
    """An ASGI app (a simulated backend) that notes the time.perf_counter() at which it starts sending
    each part of a body, so a test can tell whether the client had a chunk before the next was sent:
    a check of order, which a loaded machine slows but does not fail as a bound on gaps would."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self.sent: list[float] = []

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        async def timed(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                self.sent.append(time.perf_counter())
            await send(message)

        await self.app(scope, receive, timed)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the environment: no test may see another's (or the developer's)."""
    for name in list(os.environ):
        if (
            name.startswith(("BACKEND_", "LB_", "AzureWebJobsStorage", "WEBSITE_", "APPLICATIONINSIGHTS_", "OTEL_"))
            or name == "HTTP_TIMEOUT_SECONDS"
        ):
            monkeypatch.delenv(name)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by the real things its fixtures start (see the module docstring)."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "servers" in fixtures or "own_servers" in fixtures:
            item.add_marker(pytest.mark.e2e)
        if "azurite" in fixtures:
            item.add_marker(pytest.mark.azurite)


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    """Simulated backends and proxies on sockets, shared by a test module."""
    s = Servers()
    yield s
    s.stop()


@pytest.fixture
def idp(servers: Servers) -> LocalIdP:
    """A local Entra ID stand-in (tests/idp.py) serving its OpenID configuration and keys on a socket."""
    provider = LocalIdP()
    port = free_port()
    provider.url = f"http://127.0.0.1:{port}"
    servers.start(provider, port)
    return provider


@pytest.fixture
def own_servers() -> Iterator[Servers]:
    """Servers of one test's own: stopping them shuts each proxy down (lifespan close, its Table
    pollers stopped) before the next test starts."""
    s = Servers()
    yield s
    s.stop()


@pytest.fixture
def table() -> str:
    """A table name of the test's own, so tests sharing one Azurite are independent."""
    return "t" + uuid.uuid4().hex[:20]


@dataclass
class Pool:
    backends: list[SimBackend]
    url: str
    proxy: Proxy

    def azure(self, key: str = CLIENT_KEY, **kwargs: object) -> openai.AzureOpenAI:
        return openai.AzureOpenAI(
            azure_endpoint=self.url,
            api_key=key,
            api_version=API_VERSION,
            max_retries=0,
            http_client=SdkHttp(),
            **kwargs,
        )

    def v1(self, key: str = CLIENT_KEY, **kwargs: object) -> openai.OpenAI:
        url = self.url + "/openai/v1"
        return openai.OpenAI(base_url=url, api_key=key, max_retries=0, http_client=SdkHttp(), **kwargs)

    def backend_calls(self) -> int:
        """Calls the simulated backends have had: unchanged across a call means it was refused here."""
        return sum(len(b.calls) for b in self.backends)

    def plant(self, object_id: str, kind: str, owner: str, backend: str = "1") -> None:
        """A record of an object the simulator cannot make (containers, evals): as if the key client
        `owner` had created it on `backend`."""
        record = ObjectRecord(backend, f"key:{owner}", kind, time.time() + 3600)
        asyncio.run(self.proxy.objects.records.create(object_id, record))


@pytest.fixture
def make_pool(servers: Servers) -> Callable[..., Pool]:
    """Start n simulated backends (keys key-1..key-n) and a proxy in front of them.

    Its one client key, CLIENT_KEY (`key1`), is an operator (LB_ADMIN_CLIENTS) unless `env` names keys.

    The proxy picks at random by weight (LB_AFFINITY=off) unless `env` turns affinity on: most
    tests send one prompt again and again and count where it went, and under prompt-cache
    affinity one prompt is one conversation that stays put (tests/test_affinity_e2e.py).
    """

    def make(n: int = 2, env: dict[str, str] | None = None, **backend_kwargs: object) -> Pool:
        backends = [SimBackend(f"sim{i}", api_key=f"key-{i}", **backend_kwargs) for i in range(1, n + 1)]
        settings_env = {"LB_CLIENT_KEYS": CLIENT_KEY, "LB_ADMIN_CLIENTS": "key1", "LB_AFFINITY": "off"}
        for i, backend in enumerate(backends, start=1):
            settings_env[f"BACKEND_{i}_URL"] = servers.start(backend)
            settings_env[f"BACKEND_{i}_APIKEY"] = backend.api_key or ""
        if "LB_CLIENT_KEYS" in (env or {}):
            del settings_env["LB_ADMIN_CLIENTS"]  # the default key (key1) is the operator; other keys name their own
        settings_env.update(env or {})
        app = create_app(load_settings(settings_env))
        return Pool(backends, servers.start(app), app.state.proxy)

    return make

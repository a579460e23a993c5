"""A pool as a hostile second client meets it: two `python -m lb serve` processes on one Azurite
table, in front of three simulated backends, and per test two named clients of their own (the
owner, alice, and bob), so one module-scoped pool serves every test without one test's objects or
records showing in another's lists.

`Watch` states the invariant the isolation tests share: bob never gets a 2xx carrying anything of
alice's (an id or a content of hers), nor any answer carrying something of hers he did not name
himself; alice keeps a 2xx on her own objects through both instances. Which 4xx/5xx bob gets is
the balancer's choice and not asserted.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

from lb.sim import Servers, SimBackend, free_port
from tests.azurite import Azurite
from tests.conftest import TLS, SdkHttp

ROOT = Path(__file__).resolve().parents[1]
PAIRS = 24  # (alice, bob) key pairs configured: one per test that asks for one
START_SECONDS = 30.0
START_TRIES = 3
OPERATOR_KEY = "key-ops"


@dataclass
class Client:
    name: str
    key: str
    urls: list[str]  # instance A, instance B
    _sdks: dict[int, openai.OpenAI] = field(default_factory=dict, repr=False)

    def sdk(self, instance: int) -> openai.OpenAI:
        """This client's SDK on `instance`: one per instance, reused (connections too) across its calls."""
        if instance not in self._sdks:
            url = self.urls[instance] + "/openai/v1"
            http = SdkHttp()
            self._sdks[instance] = openai.OpenAI(
                base_url=url, api_key=self.key, max_retries=0, timeout=20, http_client=http
            )
        return self._sdks[instance]

    def close(self) -> None:
        for sdk in self._sdks.values():
            sdk.close()

    def http(self, instance: int) -> httpx.Client:
        return httpx.Client(base_url=self.urls[instance], headers={"api-key": self.key}, timeout=20, verify=TLS)


@dataclass
class Pool:
    sims: list[SimBackend]
    urls: list[str]
    logs: list[Path]
    _pairs: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def pair(self) -> tuple[Client, Client]:
        """A fresh (alice, bob): clients no other test has used."""
        n = next(self._pairs)
        if n > PAIRS:
            raise RuntimeError(f"more than {PAIRS} tests asked for a client pair: raise PAIRS")
        return Client(f"alice{n}", f"key-alice-{n}", self.urls), Client(f"bob{n}", f"key-bob-{n}", self.urls)

    def holder(self, object_id: str) -> str:
        """The lb's name (x-lb-backend) of the backend holding the object."""
        for i, sim in enumerate(self.sims, start=1):
            held = sim.objects
            if object_id in {**held.responses, **held.files, **held.batches, **held.jobs}:
                return str(i)
        raise AssertionError(f"no backend holds {object_id}")

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}" for log in self.logs)


def start_pool(servers: Servers, azurite: Azurite) -> tuple[Pool, list[subprocess.Popen[bytes]]]:
    """Three simulated backends, then two `lb serve` processes sharing a new table (their logs go to
    files: a pipe nobody reads would block a long-lived process once it fills)."""
    sims = [SimBackend(f"sim{i}", api_key=f"backend-key-{i}") for i in (1, 2, 3)]
    keys = ",".join(f"alice{n}:key-alice-{n},bob{n}:key-bob-{n}" for n in range(1, PAIRS + 1))
    keys += f",ops:{OPERATOR_KEY}"  # an operator of no test's: reads /lb/status to know the server is ours
    env = {
        "LB_STATE_CONNECTION_STRING": azurite.connection_string,
        "LB_STATE_TABLE": "iso" + uuid.uuid4().hex[:16],
        "LB_POOL": "isolation",
        "LB_CLIENT_KEYS": keys,
        "LB_ADMIN_CLIENTS": "ops",
        "LB_AFFINITY": "off",
        "LB_LOG_LEVEL": "WARNING",
    }
    for i, sim in enumerate(sims, start=1):
        env[f"BACKEND_{i}_URL"] = servers.start(sim)
        env[f"BACKEND_{i}_APIKEY"] = sim.api_key or ""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BACKEND_", "LB_", "WEBSITE_"))}
    logdir = Path(tempfile.mkdtemp(prefix="lb-isolation-"))
    processes: list[subprocess.Popen[bytes]] = []
    urls, logs = [], []
    deadline = time.monotonic() + START_SECONDS
    for name in ("A", "B"):
        log = logdir / f"lb-{name}.log"
        for _ in range(START_TRIES):  # a free port may be taken by another test's server before we bind it
            process, url = _serve({**clean, **env}, log)
            if _ours(process, url, env["LB_STATE_TABLE"], deadline):
                break
            stop([process])
        else:
            stop(processes)
            raise AssertionError(f"lb serve did not start:\n{log.read_text(errors='replace')[-3000:]}")
        processes.append(process)
        urls.append(url)
        logs.append(log)
    return Pool(sims, urls, logs), processes


def _serve(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with log.open("ab") as out:
        command = [sys.executable, "-m", "lb", "serve", "--port", str(port)]
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def _ours(process: subprocess.Popen[bytes], url: str, table: str, deadline: float) -> bool:
    """Whether `process` serves `url`: its status names this pool's table (another test's server on
    the port would answer /healthz too), and it is still running (one that could not bind exits)."""
    with httpx.Client(verify=TLS) as http:
        while process.poll() is None and time.monotonic() < deadline:
            try:
                status = http.get(url + "/lb/status", headers={"api-key": OPERATOR_KEY})
                if status.status_code == 200 and table in status.text and process.poll() is None:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    return False


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def answer(call: Callable[..., Any], *args: Any, **kwargs: Any) -> httpx.Response:
    """The HTTP answer of an SDK `.with_raw_response` method called with these arguments, whatever its status."""
    try:
        return call(*args, **kwargs).http_response
    except openai.APIStatusError as exc:
        return exc.response


class Watch:
    """Alice's secrets (ids, contents), what bob saw of them, and what alice could no longer reach."""

    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}
        self.leaks: list[str] = []
        self.lost: list[str] = []

    def secret(self, label: str, value: str) -> str:
        self.secrets[label] = value
        return value

    def bob(self, label: str, response: httpx.Response, named: Iterable[str] = ()) -> httpx.Response:
        """A 2xx carrying any secret, or any answer carrying one bob did not name, is a leak."""
        body = _text(response)
        ok = 200 <= response.status_code < 300
        named = set(named)
        seen = [k for k, v in self.secrets.items() if v in body and (ok or not any(v in n for n in named))]
        if seen:
            self.leaks.append(f"{label}: {response.status_code} carries alice's {', '.join(seen)}: {body[:160]!r}")
        return response

    def alice(self, label: str, response: httpx.Response, *expected: str) -> httpx.Response:
        body = _text(response)
        if not 200 <= response.status_code < 300 or any(e not in body for e in expected):
            self.lost.append(f"{label}: {response.status_code} {body[:160]!r}")
        return response

    def verdict(self) -> str:
        lines = [f"bob saw alice's objects {len(self.leaks)} times:", *self.leaks[:12]]
        lines += [f"alice lost access {len(self.lost)} times:", *self.lost[:12]]
        return "\n".join(lines)

    def assert_isolated(self) -> None:
        assert not self.leaks and not self.lost, self.verdict()


def _text(response: httpx.Response) -> str:
    try:
        response.read()
    except httpx.HTTPError:
        return ""
    return response.content.decode("utf-8", "replace")

"""Azurite, the real Table Storage emulator, for the state-store tests and the throttle simulation.

A test that talks to Azurite tests the wire protocol we depend on (ETags, 404/409/412 codes, the
partition query) instead of our beliefs about it, so there is no mock of the Table client here.
`start_azurite()` is a plain function (the simulation script uses it); the session-scoped pytest
fixture `azurite` wraps it: import `azurite_fixture` (or the alias `azurite`) into a test module or
conftest. `.stop()` / `.start()` restart the emulator on the same port, so a test can cause an
outage and watch the store recover. Data is in memory: a restart loses every table, as a freshly
recreated account would.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = "devstoreaccount1"
# The emulator's documented, public well-known key (not a secret).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
START_TIMEOUT_SECONDS = 30.0


def connection_string(table_url: str) -> str:
    """`table_url` is the account's table endpoint, e.g. http://127.0.0.1:10002/devstoreaccount1."""
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"TableEndpoint={table_url.rstrip('/')};"
    )


def find_binary() -> str | None:
    local = ROOT / "node_modules" / ".bin" / "azurite-table"
    if local.exists():
        return str(local)
    return shutil.which("azurite-table")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_azurite(port: int) -> bool:
    """Whether Azurite's table service answers on `port` (its `Server` header names it)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{ACCOUNT}/Tables", timeout=2) as answer:
            server = answer.headers.get("Server", "")
    except urllib.error.HTTPError as answer:  # unsigned: Azurite refuses, and says who it is
        server = answer.headers.get("Server", "")
    except OSError:
        return False
    return "azurite" in server.lower()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Azurite:
    """One azurite-table process (or an external endpoint we only borrow, which we never stop)."""

    def __init__(self, binary: str | None = None, port: int | None = None, external_url: str | None = None) -> None:
        self.binary = binary
        self.external_url = external_url
        self.port = port or _free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None

    @property
    def table_url(self) -> str:
        return self.external_url or f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return connection_string(self.table_url)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.external_url:
            raise RuntimeError("Azurite at AZURITE_TABLE_URL is not ours to start or stop")
        if self.running:
            return
        self._workdir = self._workdir or tempfile.mkdtemp(prefix="azurite-")
        args = [
            self.binary or "azurite-table",
            "--inMemoryPersistence",
            "--tableHost",
            "127.0.0.1",
            "--tablePort",
            str(self.port),
            "--skipApiVersionCheck",
            "--loose",
            "--silent",
            "--disableTelemetry",
        ]
        # --location is refused together with --inMemoryPersistence; the temp cwd catches any stray file.
        self._proc = subprocess.Popen(
            args, cwd=self._workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        # Ours once it answers as Azurite: the free port was free when picked, and another process
        # (a proxy another test starts) may have taken it since; Azurite then exits, and the port
        # still accepts, but not for us.
        while not _is_azurite(self.port):
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RuntimeError(f"azurite-table exited with {self._proc.returncode}: {err.strip()[:500]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"azurite-table did not answer on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.external_url:
            raise RuntimeError("Azurite at AZURITE_TABLE_URL is not ours to start or stop")
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stderr:
            proc.stderr.close()
        deadline = time.monotonic() + 5
        while _accepts(self.port) and time.monotonic() < deadline:  # the port must really be closed
            time.sleep(0.05)

    def close(self) -> None:
        if not self.external_url:
            self.stop()
            if self._workdir:
                shutil.rmtree(self._workdir, ignore_errors=True)


def start_azurite() -> Azurite:
    """An Azurite table endpoint: the one at AZURITE_TABLE_URL, else a new process on a free port."""
    external = os.environ.get("AZURITE_TABLE_URL", "").strip()
    if external:
        return Azurite(external_url=external)
    binary = find_binary()
    if binary is None:
        raise RuntimeError(
            "azurite-table not found: run `npm install --no-save --no-audit --no-fund azurite@3` in the repo root "
            "(or set AZURITE_TABLE_URL to a running Azurite's table endpoint, or LB_SKIP_AZURITE=1 to skip)"
        )
    for attempt in range(3):  # a port taken between picking and binding: pick another
        azurite = Azurite(binary)
        try:
            azurite.start()
            return azurite
        except RuntimeError:
            azurite.close()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session", name="azurite")
def azurite_fixture() -> Iterator[Azurite]:
    """Import `azurite_fixture` (the fixture is named `azurite`), so test parameters don't shadow an import."""
    if os.environ.get("LB_SKIP_AZURITE") == "1" and not os.environ.get("AZURITE_TABLE_URL"):
        pytest.skip("LB_SKIP_AZURITE=1")
    try:
        emulator = start_azurite()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield emulator
    finally:
        emulator.close()


azurite = azurite_fixture  # the same fixture under its own name, for `from tests.azurite import azurite`

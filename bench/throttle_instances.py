"""Real `python -m lb serve` processes for the throttling simulation: instances share nothing but the table.

Each instance is its own process with a clean environment, so nothing from the developer's shell
leaks in and the only way one instance can learn of another's 429s is the shared Table.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lb.sim import free_port

ROOT = Path(__file__).resolve().parent.parent
CLIENT_KEY = "bench-key"
_SCRUBBED = ("BACKEND_", "LB_", "AzureWebJobsStorage", "HTTP_TIMEOUT_SECONDS", "WEBSITE_INSTANCE_ID")


def proxy_env(backend_urls: list[str], extra: dict[str, str]) -> dict[str, str]:
    """A clean environment: nothing from the developer's BACKEND_* / LB_* / AzureWebJobsStorage leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED)}
    env.update({"LB_CLIENT_KEYS": CLIENT_KEY, "LB_ADMIN_CLIENTS": "key1", "LB_LOG_LEVEL": "WARNING", **extra})
    for i, url in enumerate(backend_urls, start=1):
        env[f"BACKEND_{i}_URL"] = url
        env[f"BACKEND_{i}_APIKEY"] = f"key-{i}"
    return env


class Instances:
    """N `python -m lb serve` processes; their output goes to a log file shown if one fails."""

    def __init__(self, n: int, env: dict[str, str], logdir: str) -> None:
        self.ports = [free_port() for _ in range(n)]
        self.logs = [Path(logdir) / f"lb-{port}.log" for port in self.ports]
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "lb", "serve", "--port", str(port)],
                cwd=ROOT,
                env=env,
                stdout=log.open("wb"),
                stderr=subprocess.STDOUT,
            )
            for port, log in zip(self.ports, self.logs, strict=True)
        ]
        self.urls = [f"http://127.0.0.1:{port}" for port in self.ports]

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        for url, proc, log in zip(self.urls, self.procs, self.logs, strict=True):
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"proxy at {url} did not start:\n{log.read_text()[-2000:]}")
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)

    def table_ops(self) -> dict[str, int]:
        total = {"reads": 0, "writes": 0, "queries": 0}
        for url in self.urls:
            state = httpx.get(url + "/lb/status", headers={"api-key": CLIENT_KEY}, timeout=5).json()["state"]
            for k in total:
                total[k] += state.get("ops", {}).get(k, 0)
        return total

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

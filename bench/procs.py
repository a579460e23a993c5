"""Starting the benchmark's servers as child processes, and reading their CPU time from /proc.

Each server runs in its own process so its CPU time (utime + stime of all its threads, and of any
worker processes it forks) can be read from `/proc` and charged to it alone; `quiesce` uses the
finer schedstat counters to tell when a process has finished with a call. Everything listens on
127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_TICK = os.sysconf("SC_CLK_TCK")
# Settings a developer's shell may carry that would change what `lb serve` does in a benchmark.
_LB_PREFIXES = ("BACKEND_", "LB_", "HTTP_TIMEOUT_SECONDS", "AzureWebJobsStorage", "WEBSITE_INSTANCE_ID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # fields 14 and 15 of proc(5), counted after ")"


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants: a proxy that forks workers is charged for all of them."""
    pids, i = [pid], 0
    while i < len(pids):
        try:
            with open(f"/proc/{pids[i]}/task/{pids[i]}/children") as f:
                pids += [int(c) for c in f.read().split()]
        except OSError:
            pass
        i += 1
    return pids


def tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            total += cpu_seconds(p)
        except OSError:
            pass
    return total


def run_ns(pids: list[int]) -> int:
    """Nanoseconds on CPU so far of every thread of `pids` (/proc/<pid>/task/<tid>/schedstat).

    Unlike utime/stime (10 ms ticks) this moves by every microsecond of work, so it shows when a
    process has really finished with a call.
    """
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split(maxsplit=1)[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


def quiesce(pids: list[int], quiet: float = 0.001, cap: float = 0.05) -> float:
    """Return once `pids` have used no CPU for `quiet` seconds (at most `cap`); the seconds waited.

    Spins on /proc reads rather than sleeping, so the caller's own core never drops into a deep idle
    state, and the processes on the path are idle for only about `quiet` before the next call.
    """
    started = last_change = time.perf_counter()
    last = run_ns(pids)
    while True:
        now = time.perf_counter()
        if now - last_change >= quiet or now - started >= cap:
            return now - started
        current = run_ns(pids)
        if current != last:
            last, last_change = current, now


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def lb_command(checkout: str | None) -> list[str] | None:
    """`python -m lb` run from another checkout (e.g. main, to compare), for `Server(command=...)`: its
    args then start at `serve`. None: this checkout's, the default."""
    if checkout is None:
        return None
    boot = f"import sys; sys.path.insert(0, {checkout!r}); from lb.__main__ import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", boot]


class Server:
    """One child process serving HTTP on 127.0.0.1:`port`; stopped by `stop()` or the context exit."""

    def __init__(
        self,
        name: str,
        args: list[str],
        env: dict[str, str] | None = None,
        port: int | None = None,
        command: list[str] | None = None,
        start_timeout: float = 20.0,
        quiet: bool = False,
        wait: bool = True,
    ) -> None:
        """Runs `python -m <args> --host 127.0.0.1 --port N`, or `command + [--host, --port]` if given.

        `quiet` drops the child's stdout (banners), keeping stderr for its errors. `wait=False` returns
        at once (its URL is known): start several, then `wait_listening()` on each, and they start
        up side by side.
        """
        self.name = name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(_LB_PREFIXES)}
        full_env.update(env or {})
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, "-m"]), *args, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if quiet else None,
        )
        self.start_timeout = start_timeout
        if wait:
            self.wait_listening()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        return tree(self.pid)

    def cpu(self) -> float:
        return tree_cpu_seconds(self.pid)

    def rss(self) -> float:
        """RSS in MB of the process and its descendants."""
        return sum(rss_mb(p) for p in self.pids())

    def wait_listening(self) -> None:
        """Return once it accepts connections; stop it and raise if it exits or `start_timeout` passes first."""
        timeout = self.start_timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} during start-up")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen on port {self.port} within {timeout:g}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p90/p99 (and mean) of seconds, in milliseconds rounded to 3 decimals."""
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    values = {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98], "mean": statistics.fmean(samples)}
    return {k: round(v * 1000, 3) for k, v in values.items()}


def percentile_ms(samples: list[float], p: int) -> float | None:
    """The p-th percentile of seconds, in milliseconds rounded to 0.1; None without samples."""
    if len(samples) < 2:
        return round(samples[0] * 1000, 1) if samples else None
    return round(statistics.quantiles(samples, n=100, method="inclusive")[p - 1] * 1000, 1)


async def in_flight(n: int, concurrency: int, call: Callable[[int], Awaitable[None]]) -> None:
    """Await `call(i)` for i = n-1 down to 0, `concurrency` at a time: a closed loop, like that many clients."""
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call(left)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(obj: object, path: str | os.PathLike[str]) -> None:
    """Indented JSON, but a list of numbers on one line, so raw samples do not take a line each."""
    text = json.dumps(obj, indent=1)
    text = re.sub(r"\[[-0-9.,\s]+\]", lambda m: "[" + " ".join(m.group(0)[1:-1].split()) + "]", text)
    with open(path, "w") as f:
        f.write(text + "\n")

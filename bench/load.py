"""Load and fault tolerance: 1,000 concurrent clients through one `lb serve` for 60 s.

`python -m bench.load [--seconds 60] [--clients 1000]` starts, each in its own process on
127.0.0.1: a healthy simulated backend, one that throttles (a requests-per-minute quota, then 429 +
Retry-After), one that fails (503 at once, or 500 after a second), and the proxy in front of the
three. Then `--clients` aiohttp clients, each with its own connection, call it back to back for
`--seconds`, half streamed, half not. Every call is classified:

- ok: 2xx and complete (a JSON completion, or an SSE stream ending with `[DONE]`);
- well-formed error: 429 / 5xx with Azure OpenAI's `{"error": {"code", "message"}}`, or a stream
  that ends with an `error` event;
- lost: anything else (connection error, hang past the client timeout, truncated or malformed).

The proxy's open file descriptors (/proc/<pid>/fd) and RSS are sampled every second; the report
gives them before the load, at its start, middle and end, and after the clients went away.
This is a benchmark, not a test: it prints a Markdown report and exits non-zero if a call was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.procs import Server, cpu_seconds, markdown_table, rss_mb
from lb.sim import lifespan

CLIENT_KEY = "load-client-key"
BACKEND_KEY = "load-backend-key"
PATH = "/openai/deployments/chat/chat/completions?api-version=2024-10-21"
HEADERS = {"api-key": CLIENT_KEY, "content-type": "application/json"}
CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}
TIMEOUT_SECONDS = 30.0  # the proxy's HTTP_TIMEOUT_SECONDS; a client waits this + 15 s before calling it a hang


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)  # "ok" / "error 429" / "lost: ..."
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"plain": [], "stream": []})
    attempts: Counter[str] = field(default_factory=Counter)  # x-lb-attempts: >1 means a failover the client never saw
    served_by: Counter[str] = field(default_factory=Counter)  # x-lb-backend
    slowest: float = 0.0


async def one_call(session: aiohttp.ClientSession, url: str, stream: bool, tally: Tally) -> None:
    body = json.dumps({**CHAT, "stream": True} if stream else CHAT)
    started = time.perf_counter()
    kind = "stream" if stream else "plain"
    try:
        async with session.post(url + PATH, data=body, headers=HEADERS) as response:
            tally.statuses[response.status] += 1
            tally.attempts[response.headers.get("x-lb-attempts", "-")] += 1
            tally.served_by[response.headers.get("x-lb-backend", "-")] += 1
            if stream and response.status == 200:
                outcome = await _read_stream(response)
            else:
                outcome = _judge(response.status, await response.read())
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        outcome = f"lost: {type(exc).__name__}"
    elapsed = time.perf_counter() - started
    tally.slowest = max(tally.slowest, elapsed)
    tally.outcomes[outcome] += 1
    if outcome == "ok":
        tally.latencies[kind].append(elapsed)


async def _read_stream(response: aiohttp.ClientResponse) -> str:
    done = False
    async for line in response.content:
        if line.startswith(b"data: [DONE]"):
            done = True
        elif line.startswith(b"data: ") and b'"error"' in line:
            return "error: stream error event"
    return "ok" if done else "lost: stream ended without [DONE]"


def _judge(status: int, data: bytes) -> str:
    try:
        payload: Any = json.loads(data)
    except ValueError:
        return f"lost: {status} with a body that is not JSON"
    if 200 <= status < 300:
        return "ok" if isinstance(payload, dict) and payload.get("choices") else f"lost: {status} without choices"
    error = payload.get("error") if isinstance(payload, dict) else None
    if (status == 429 or status >= 500) and isinstance(error, dict) and {"code", "message"} <= set(error):
        return f"error: {status}"
    return f"lost: {status} not a well-formed error"


async def client(url: str, stop_at: float, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_SECONDS + 15)
    connector = aiohttp.TCPConnector(limit=1, force_close=False)  # one connection per client, like a real one
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        while time.monotonic() < stop_at:
            await one_call(session, url, rng.random() < 0.5, tally)


async def sample(pid: int, stop: asyncio.Event, samples: list[tuple[float, int, float]]) -> None:
    while not stop.is_set():
        samples.append((time.monotonic(), fd_count(pid), rss_mb(pid)))
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass


async def run_load(url: str, pid: int, clients: int, seconds: float) -> tuple[Tally, list[tuple[float, int, float]]]:
    tally = Tally()
    samples: list[tuple[float, int, float]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample(pid, stop, samples))
    stop_at = time.monotonic() + seconds
    await asyncio.gather(*(client(url, stop_at, tally, i) for i in range(clients)))
    stop.set()
    await sampler
    return tally, samples


# The failing backend --------------------------------------------------------------------------------------------
async def failing_backend(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """503 at once for most calls; one in ten waits a second, then 500: a backend that is down."""
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    while (await receive()).get("more_body"):
        pass
    status = 503
    if random.random() < 0.1:
        await asyncio.sleep(1.0)
        status = 500
    body = json.dumps({"error": {"code": str(status), "message": "Simulated outage."}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def serve_failing(argv: list[str]) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m bench.load --failing-backend")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(failing_backend, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


# Report ---------------------------------------------------------------------------------------------------------
def _ms(values: list[float], q: int) -> str:
    if len(values) < 2:
        return "-"
    return f"{statistics.quantiles(values, n=100, method='inclusive')[q - 1] * 1000:.0f}"


def report(
    tally: Tally,
    samples: list[tuple[float, int, float]],
    before: tuple[int, float],
    after: list[tuple[str, int, float]],
    seconds: float,
    clients: int,
) -> str:
    total = sum(tally.outcomes.values())
    lost = sum(n for o, n in tally.outcomes.items() if o.startswith("lost"))
    ok = tally.outcomes["ok"]
    lines = [
        f"{clients} clients, {seconds:g} s, {total} calls ({total / seconds:.0f}/s): {ok} ok, "
        f"{total - ok - lost} well-formed errors, **{lost} lost**; slowest call {tally.slowest:.2f} s",
        "",
        markdown_table(["outcome", "calls"], [[o, n] for o, n in sorted(tally.outcomes.items())]),
        "",
        markdown_table(["status", "calls"], [[s, n] for s, n in sorted(tally.statuses.items())]),
        "",
        markdown_table(
            ["ok calls", "count", "p50 ms", "p99 ms"],
            [[k, len(v), _ms(v, 50), _ms(v, 99)] for k, v in tally.latencies.items()],
        ),
        "",
    ]
    names = {"1": "healthy", "2": "throttling", "3": "failing", "-": "proxy itself"}
    lines += [
        markdown_table(["answered by", "calls"], [[names.get(b, b), n] for b, n in sorted(tally.served_by.items())]),
        "",
        markdown_table(["x-lb-attempts", "calls"], [[a, n] for a, n in sorted(tally.attempts.items())]),
        "",
    ]
    if samples:
        t0 = samples[0][0]

        def at(fraction: float) -> tuple[float, int, float]:
            return min(samples, key=lambda s: abs(s[0] - t0 - fraction * seconds))

        rows: list[list[object]] = [["before the load", before[0], f"{before[1]:.1f}"]]
        for label, fraction in (("10%", 0.1), ("50%", 0.5), ("95%", 0.95)):
            _, fds, rss = at(fraction)
            rows.append([f"{label} into the load", fds, f"{rss:.1f}"])
        rows.append(["max during the load", max(s[1] for s in samples), f"{max(s[2] for s in samples):.1f}"])
        rows += [[label, fds, f"{rss:.1f}"] for label, fds, rss in after]
        lines.append(markdown_table(["proxy process", "open fds", "RSS MB"], rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--failing-backend":
        return serve_failing(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rpm", type=int, default=1200, help="quota of the throttling backend, requests per minute")
    parser.add_argument("--log-level", default="WARNING", help="the proxy's LB_LOG_LEVEL (INFO: one line per failover)")
    parser.add_argument(
        "--settle", type=float, default=0.0, help="also sample this long after the load (65: past keep-alive expiry)"
    )
    args = parser.parse_args(argv)

    servers: list[Server] = []
    try:
        healthy = Server("healthy", ["bench.backend", "--name", "healthy", "--latency", "0.05", "--chunks", "20"])
        servers.append(healthy)
        throttling = Server(
            "throttling", ["bench.backend", "--name", "throttling", "--latency", "0.05", "--rpm", str(args.rpm)]
        )
        servers.append(throttling)
        failing = Server("failing", ["bench.load", "--failing-backend"])
        servers.append(failing)
        env = {
            "LB_CLIENT_KEYS": CLIENT_KEY,
            "LB_LOG_LEVEL": args.log_level,
            "HTTP_TIMEOUT_SECONDS": str(TIMEOUT_SECONDS),
        }
        for i, backend in enumerate((healthy, throttling, failing), start=1):
            env |= {f"BACKEND_{i}_URL": backend.url, f"BACKEND_{i}_APIKEY": BACKEND_KEY}
        proxy = Server("lb", ["lb", "serve"], env)
        servers.append(proxy)
        time.sleep(1)
        before = (fd_count(proxy.pid), rss_mb(proxy.pid))
        cpu_before = {s.name: s.cpu() for s in servers} | {"client": cpu_seconds(os.getpid())}
        tally, samples = asyncio.run(run_load(proxy.url, proxy.pid, args.clients, args.seconds))
        cpu = {s.name: s.cpu() - cpu_before[s.name] for s in servers}
        cpu["client (this process)"] = cpu_seconds(os.getpid()) - cpu_before["client"]
        time.sleep(3)
        after = [("clients gone (+3 s)", fd_count(proxy.pid), rss_mb(proxy.pid))]
        if args.settle:
            time.sleep(max(0.0, args.settle - 3))
            after.append((f"idle (+{args.settle:g} s)", fd_count(proxy.pid), rss_mb(proxy.pid)))
        if proxy.proc.poll() is not None:
            print(f"the proxy exited with status {proxy.proc.returncode}", file=sys.stderr)
            return 1
    finally:
        for server in reversed(servers):
            server.stop()
    print(report(tally, samples, before, after, args.seconds, args.clients))
    print("\nCPU seconds used during the load: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
    return 1 if any(o.startswith("lost") for o in tally.outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())

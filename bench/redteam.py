"""What one abusive request, a misconfigured backend or a slow one costs others.

`python -m bench redteam [--only abusive,reasoning,wrong_key,hanging,big_body,huge_head] [--lb-root DIR]`
(about 1 min) starts real `python -m lb serve` processes in front of
simulated backends (on this process's `lb.sim.Servers` thread) and prints:
- other clients' success rate while one client loops 500-provoking and slow streamed requests;
- a non-streamed call longer than LB_ATTEMPT_TIMEOUT_SECONDS: attempts and upstream calls;
- one backend with a wrong key among three: success rate and what /lb/status says;
- HTTP_TIMEOUT_SECONDS=6: the slowest of 1,500 concurrent calls to a hanging backend, and a call
  to a backend dripping its head one byte a second;
- a 26 MiB /openai/v1 body looped by one client: other clients' median, with and without it;
- a 200 MB request head: `lb serve`'s CPU time until it refuses it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import uvicorn

from bench.concurrency import run_loop
from bench.procs import ROOT, cpu_seconds, free_port
from lb.sim import Servers, SimBackend, read_body

KEY = "redteam-client-key"
API_VERSION = "2024-10-21"
MESSAGES = [{"role": "user", "content": "hi"}]


HANGING_CALLS = [1500]
LB_ROOT = [str(ROOT)]  # --lb-root: another checkout's lb (e.g. `git archive main lb | tar -x -C /tmp/main`)


OPERATOR_KEY = {"LB_CLIENT_KEYS": KEY, "LB_ADMIN_CLIENTS": "key1"}  # the one key reads /lb/status


@contextmanager
def lb_serve(env: dict[str, str]) -> Iterator[tuple[str, int]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "lb", "serve", "--port", str(port)],
        cwd=LB_ROOT[0],
        env={**_clean_env(), "PYTHONPATH": LB_ROOT[0], **OPERATOR_KEY, "LB_LOG_LEVEL": "ERROR", **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for(port, process)
    try:
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        process.wait(10)


def _wait_for(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{process.args} did not start") from None
            time.sleep(0.05)


def _clean_env() -> dict[str, str]:
    """This shell's environment minus any setting that would change what `lb serve` does."""
    prefixes = ("BACKEND_", "LB_", "HTTP_TIMEOUT_SECONDS", "AzureWebJobsStorage", "WEBSITE_INSTANCE_ID")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def backends_env(urls: list[str], keys: list[str] | None = None) -> dict[str, str]:
    env = {}
    for i, url in enumerate(urls, start=1):
        env[f"BACKEND_{i}_URL"] = url
        env[f"BACKEND_{i}_APIKEY"] = keys[i - 1] if keys else "k"
    return env


def provoked():
    """Fine, except for bodies containing "poison" (500) or "slow" (streams after 30 s)."""

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        if b"poison" in body:
            status, answer = 500, {"error": {"code": "InternalServerError", "message": "The server had an error."}}
        else:
            if b"slow" in body:
                await asyncio.sleep(30)
            status, answer = 200, _completion()
        data = json.dumps(answer).encode()
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": data})

    return app


async def fixed_backend(scope, receive, send) -> None:
    """Drains the body and answers one fixed completion: the backend of the big-body run, in its own
    process, so that neither its parsing nor this process's GIL is part of what is measured."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    data = json.dumps(_completion()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _completion() -> dict:
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "chat",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
    }


async def others(url: str, seconds: float, clients: int = 4) -> tuple[int, int, list[float]]:
    """`clients` well-behaved openai SDK clients calling in a loop: (ok, total, latencies)."""
    ok = total = 0
    latencies: list[float] = []
    end = time.monotonic() + seconds

    async def one() -> None:
        nonlocal ok, total
        client = openai.AsyncAzureOpenAI(azure_endpoint=url, api_key=KEY, api_version=API_VERSION, max_retries=0)
        while time.monotonic() < end:
            started = time.perf_counter()
            total += 1
            try:
                await client.chat.completions.create(model="chat", messages=MESSAGES)
                ok += 1
                latencies.append(time.perf_counter() - started)
            except openai.APIError:
                pass
        await client.close()

    await asyncio.gather(*(one() for _ in range(clients)))
    return ok, total, latencies


async def abusive(servers: Servers) -> None:
    urls = [servers.start(provoked()) for _ in range(3)]
    env = {**backends_env(urls), "HTTP_TIMEOUT_SECONDS": "4", "LB_ATTEMPT_TIMEOUT_SECONDS": "1"}
    with lb_serve(env) as (url, _):
        stop = time.monotonic() + 10
        sent = 0

        async def attacker(content: str, stream: bool) -> None:
            nonlocal sent
            body = {"messages": [{"role": "user", "content": content}], "stream": stream}
            async with httpx.AsyncClient(timeout=10) as client:
                while time.monotonic() < stop:
                    await client.post(
                        f"{url}/openai/deployments/chat/chat/completions?api-version={API_VERSION}",
                        json=body,
                        headers={"api-key": KEY},
                    )
                    sent += 1

        *_, (ok, total, _) = await asyncio.gather(attacker("poison", False), attacker("slow", True), others(url, 10))
        print(f"abusive client ({sent} 500-provoking / slow streamed calls in 10 s): others {ok}/{total} ok")


async def reasoning(servers: Servers) -> None:
    sims = [SimBackend(f"r{i}", latency=3.0) for i in range(3)]
    env = {**backends_env([servers.start(s) for s in sims]), "HTTP_TIMEOUT_SECONDS": "10"}
    env["LB_ATTEMPT_TIMEOUT_SECONDS"] = "1"
    with lb_serve(env) as (url, _):
        client = openai.AsyncAzureOpenAI(azure_endpoint=url, api_key=KEY, api_version=API_VERSION, max_retries=0)
        started = time.perf_counter()
        raw = await client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
        took = time.perf_counter() - started
        await client.close()
    calls = sum(len(s.calls) for s in sims)
    print(
        f"non-streamed 3 s call, attempt timeout 1 s: status {raw.http_response.status_code} in {took:.1f} s,"
        f" x-lb-attempts {raw.headers['x-lb-attempts']}, upstream calls {calls}"
    )


async def wrong_key(servers: Servers) -> None:
    sims = [SimBackend(f"k{i}", api_key=f"key-{i}") for i in range(1, 4)]
    env = backends_env([servers.start(s) for s in sims], ["key-1", "rotated-away", "key-3"])
    with lb_serve(env) as (url, _):
        ok, total, _ = await others(url, 3)
        async with httpx.AsyncClient() as client:
            status = (await client.get(f"{url}/lb/status", headers={"api-key": KEY})).json()
    named = [(b["name"], b["auth_failure"]) for b in status["backends"] if b.get("auth_failure")]
    print(f"one wrong key among three: {ok}/{total} ok ({100 * ok / total:.1f}%); /lb/status: {named}")


async def _hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.read()
    finally:
        writer.close()


async def _drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\r\n\r\n")
        for byte in b"HTTP/1.1 200 OK\r\n" + b"x-pad: " + b"a" * 100:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(1)
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _serve_raw(kind: str, port: int) -> None:
    server = await asyncio.start_server({"hang": _hang, "drip": _drip}[kind], "127.0.0.1", port, backlog=2048)
    await server.serve_forever()


async def hanging(servers: Servers) -> None:
    for name, kind, n in (("hanging backend", "hang", HANGING_CALLS[0]), ("byte-drip backend", "drip", 20)):
        port = free_port()
        backend = subprocess.Popen([sys.executable, "-m", "bench.redteam", "--raw-backend", kind, str(port)], cwd=ROOT)  # noqa: ASYNC220
        _wait_for(port, backend)
        env = {**backends_env([f"http://127.0.0.1:{port}"]), "HTTP_TIMEOUT_SECONDS": "6"}
        env["LB_SERVE_MAX_CONNECTIONS"] = "4000"
        with lb_serve(env) as (url, pid):
            cpu_before = cpu_seconds(pid)
            # Raw sockets, all connected first, each timed from its request's last byte: what is
            # measured is the proxy's wait, not a Python client's own time to set up 1,500 calls.
            host, port = url.removeprefix("http://").split(":")
            body = json.dumps({"messages": MESSAGES}).encode()
            request = (
                f"POST /openai/deployments/chat/chat/completions?api-version={API_VERSION} HTTP/1.1\r\n"
                f"host: lb\r\napi-key: {KEY}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            ).encode() + body
            streams = [await asyncio.open_connection(host, int(port)) for _ in range(n)]

            async def call(
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes = request
            ) -> tuple[float, int]:
                writer.write(request)
                await writer.drain()
                started = time.perf_counter()
                try:  # answered once its head and declared body are in, as an HTTP client sees it
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = next(
                        int(line.split(b":", 1)[1])
                        for line in head.lower().split(b"\r\n")
                        if line.startswith(b"content-length:")
                    )
                    await reader.readexactly(length)
                    status = int(head.split(b" ", 2)[1])
                except (ConnectionError, asyncio.IncompleteReadError, StopIteration):
                    status = 0
                elapsed = time.perf_counter() - started
                writer.close()
                return elapsed, status

            results = await asyncio.gather(*(call(r, w) for r, w in streams))
            cpu = cpu_seconds(pid) - cpu_before
        statuses = sorted({s for _, s in results})
        backend.terminate()
        times = sorted(t for t, _ in results)
        print(
            f"HTTP_TIMEOUT_SECONDS=6, {n} calls to a {name}: fastest {times[0]:.2f} s, median"
            f" {times[len(times) // 2]:.2f} s, slowest {times[-1]:.2f} s, statuses {statuses}; lb serve CPU {cpu:.2f} s"
        )


async def big_body(servers: Servers) -> None:
    port = free_port()
    backend = subprocess.Popen([sys.executable, "-m", "bench.redteam", "--fixed-backend", str(port)], cwd=ROOT)  # noqa: ASYNC220
    _wait_for(port, backend)
    env = backends_env([f"http://127.0.0.1:{port}"])
    env["LB_MAX_BODY_BYTES"] = str(64 * 1024 * 1024)
    messages = [{"role": "user", "content": f"message number {i}"} for i in range(520_000)]
    body = json.dumps({"messages": messages, "model": "chat"}).encode()
    try:
        with lb_serve(env) as (url, _):
            await others(url, 1, clients=2)  # warm up
            _, _, alone = await others(url, 5, clients=2)
            stop = time.monotonic() + 5
            sent = 0

            async def attacker() -> None:
                nonlocal sent
                async with httpx.AsyncClient(timeout=30) as client:
                    while time.monotonic() < stop:
                        await client.post(
                            f"{url}/openai/v1/chat/completions",
                            content=body,
                            headers={"api-key": KEY, "content-type": "application/json"},
                        )
                        sent += 1

            _, (_, _, beside) = await asyncio.gather(attacker(), others(url, 5, clients=2))
    finally:
        backend.terminate()
    alone_ms, beside_ms = statistics.median(alone) * 1000, statistics.median(beside) * 1000
    worst = sorted(beside)
    print(
        f"{len(body) / 2**20:.0f} MiB /openai/v1 body, sent {sent} times in 5 s: others' median {alone_ms:.1f} ms"
        f" alone, {beside_ms:.1f} ms beside it (+{beside_ms - alone_ms:.1f} ms); beside it p99"
        f" {worst[int(len(worst) * 0.99)] * 1000:.0f} ms, max {worst[-1] * 1000:.0f} ms"
    )


def huge_head(servers: Servers) -> None:
    with lb_serve(backends_env([servers.start(SimBackend("h"))])) as (url, pid):
        before = cpu_seconds(pid)
        sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        sock.sendall(b"POST /openai/v1/chat/completions HTTP/1.1\r\nhost: lb\r\nx-big: ")
        sent = 0
        chunk = b"a" * 1024 * 1024
        try:
            while sent < 200 * 1024 * 1024:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        try:
            answer = sock.recv(200).split(b" ")[1].decode()
        except (OSError, IndexError):
            answer = "a reset"
        sock.close()
        time.sleep(0.2)
        cpu = cpu_seconds(pid) - before
    print(f"200 MB request head: refused with {answer} after {sent / 2**20:.0f} MiB sent; lb serve CPU {cpu:.3f} s")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        print("\nOptions: --only SCENARIOS (comma-separated), --lb-root DIR, --hanging-calls N (default 1500).")
        return 0
    if argv[:1] == ["--raw-backend"]:
        run_loop(_serve_raw(argv[1], int(argv[2])))
        return 0
    if argv[:1] == ["--fixed-backend"]:
        uvicorn.run(fixed_backend, host="127.0.0.1", port=int(argv[1]), log_level="warning", access_log=False)
        return 0
    if "--lb-root" in argv:
        LB_ROOT[0] = argv[argv.index("--lb-root") + 1]
    only = argv[argv.index("--only") + 1].split(",") if "--only" in argv else None
    if "--hanging-calls" in argv:
        HANGING_CALLS[0] = int(argv[argv.index("--hanging-calls") + 1])
    servers = Servers()
    try:
        for scenario in (abusive, reasoning, wrong_key, hanging, big_body, huge_head):
            if only and scenario.__name__ not in only:
                continue
            if asyncio.iscoroutinefunction(scenario):
                run_loop(scenario(servers))  # uvloop, as lb serve: the client's own cost stays small
            else:
                scenario(servers)
    finally:
        servers.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

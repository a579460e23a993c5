"""`python -m lb serve`'s own limits, on a real process: a client can't buffer, hold or exhaust it."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from lb.serving import HeldHead
from lb.sim import SimBackend
from tests.conftest import API_VERSION, CLIENT_KEY, Stalls, wait_until
from tests.test_cli import serve_lb

HEAD = f"POST /openai/deployments/chat/chat/completions?api-version={API_VERSION} HTTP/1.1\r\nhost: lb\r\n"


class Firehose:
    """A backend streaming events as fast as it can be read, for ever; notes when its caller hangs up."""

    def __init__(self) -> None:
        self.closed: list[float] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        event = b"data: " + b"x" * 65536 + b"\n\n"
        try:
            while True:
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
        except ConnectionError:
            self.closed.append(time.monotonic())
        finally:
            writer.close()


@pytest.fixture(scope="module")
def backend() -> SimBackend:
    """The `chat` deployment's backend of the module's `lb serve`; a test may change its fields (monkeypatch)."""
    return SimBackend("a", api_key="k")


@pytest.fixture(scope="module")
def firehose() -> Firehose:
    """The `firehose` deployment's backend of the module's `lb serve`."""
    return Firehose()


@pytest.fixture(scope="module")
def lb_url(servers, backend, firehose) -> Iterator[tuple[str, int, int]]:
    """One `lb serve` process for the module, as starting one is the slow part: (host, port, pid)."""
    env = {
        "BACKEND_1_URL": servers.start(backend),
        "BACKEND_1_APIKEY": "k",
        "BACKEND_1_DEPLOYMENTS": "chat",
        "BACKEND_2_URL": servers.start_tcp(firehose),
        "BACKEND_2_APIKEY": "k",
        "BACKEND_2_DEPLOYMENTS": "firehose",
        "LB_CLIENT_KEYS": CLIENT_KEY,
        "HTTP_TIMEOUT_SECONDS": "0.5",
        "LB_SERVE_HEAD_TIMEOUT_SECONDS": "0.5",
        "LB_SERVE_MAX_CONNECTIONS": "20",
    }
    yield from lb_serve(env)


def lb_serve(env: dict[str, str]) -> Iterator[tuple[str, int, int]]:
    process, url = serve_lb(env)
    yield "127.0.0.1", int(url.rsplit(":", 1)[1]), process.pid
    process.terminate()
    out, err = process.communicate(timeout=10)
    assert "Traceback" not in out + err


def connect(lb_url) -> socket.socket:
    sock = socket.create_connection(lb_url[:2], timeout=5)
    return sock


def answer(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_huge_request_head_is_refused_with_431_before_it_is_buffered(lb_url):
    before = cpu_seconds(lb_url[2])
    sock = connect(lb_url)
    sock.sendall(HEAD.encode() + b"x-big: ")
    sent = 0
    try:
        while sent < 50 * 1024 * 1024:  # the server hangs up long before
            sock.sendall(b"a" * 65536)
            sent += 65536
    except OSError:
        pass
    status, body = answer(sock)
    sock.close()
    assert status == 431 and body["error"]["code"] == "RequestHeaderFieldsTooLarge"
    assert sent < 10 * 1024 * 1024
    assert cpu_seconds(lb_url[2]) - before < 0.1


def test_more_than_100_headers_are_refused_with_431(lb_url):
    with connect(lb_url) as sock:
        sock.sendall(HEAD.encode() + b"".join(b"x-h%d: 1\r\n" % i for i in range(150)) + b"\r\n")
        status, body = answer(sock)
    assert status == 431 and body["error"]["code"] == "RequestHeaderFieldsTooLarge"


def test_a_head_that_never_completes_gets_408_and_an_idle_connection_is_closed(lb_url):
    with connect(lb_url) as slow, connect(lb_url) as idle:
        slow.sendall(HEAD.encode())  # ... and never the blank line
        started = time.monotonic()
        status, body = answer(slow)
        assert status == 408 and body["error"]["code"] == "RequestTimeout"
        assert idle.recv(10) == b""  # closed without a word: nothing was asked
        assert time.monotonic() - started < 2


def test_a_body_that_stalls_gets_408_at_the_deadline(lb_url):
    with connect(lb_url) as sock:
        sock.sendall(HEAD.encode() + f"api-key: {CLIENT_KEY}\r\ncontent-length: 100\r\n\r\n".encode() + b"{")
        started = time.monotonic()
        status, body = answer(sock)
    assert status == 408 and body["error"]["code"] == "RequestTimeout"
    assert time.monotonic() - started < 2


def test_connections_past_the_cap_get_a_503_and_the_rest_are_served(lb_url):
    held = [connect(lb_url) for _ in range(20)]
    try:
        time.sleep(0.1)
        with connect(lb_url) as extra:
            extra.sendall(HEAD.encode() + b"\r\n")
            status, body = answer(extra)
        assert status == 503 and body["error"]["code"] == "ServiceUnavailable"
    finally:
        for sock in held:
            sock.close()
    request = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    deadline = time.monotonic() + 5  # the server counts the closes in its own time: asked again, not slept on
    while True:
        with connect(lb_url) as sock:
            sock.sendall(
                HEAD.encode() + f"api-key: {CLIENT_KEY}\r\ncontent-length: {len(request)}\r\n\r\n".encode() + request
            )
            status, body = answer(sock)
        if status != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == 200 and body["choices"]


@pytest.mark.e2e  # its own `lb serve` process
def test_the_deadline_runs_from_the_request_s_first_byte_not_from_its_handler():
    """A request waits in the event loop (behind a burst of others, or for its head to come in)
    before its handler runs; the client has been waiting since its first byte, so the deadline
    counts from there. Here the head takes 0.8 s of a 1 s deadline to arrive."""
    hanging = socket.create_server(("127.0.0.1", 0), backlog=16)  # connections queue; nothing ever answers
    env = {
        "BACKEND_1_URL": f"http://127.0.0.1:{hanging.getsockname()[1]}",
        "BACKEND_1_APIKEY": "k",
        "LB_CLIENT_KEYS": CLIENT_KEY,
        "HTTP_TIMEOUT_SECONDS": "1",
        "LB_SERVE_HEAD_TIMEOUT_SECONDS": "5",
    }
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    request = HEAD.encode() + f"api-key: {CLIENT_KEY}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body
    try:
        for url in lb_serve(env):
            with connect(url) as sock, Stalls(os.getpid(), url[2]) as stalls:  # here and lb serve: CPU waits
                started = time.monotonic()
                sock.sendall(request[:20])
                time.sleep(0.8)
                sock.sendall(request[20:])
                status, answered = answer(sock)
                elapsed = time.monotonic() - started
            assert status == 504 and answered["error"]["code"] == "GatewayTimeout"
            assert 1 <= elapsed < 1.6 + stalls.seconds  # from the handler's start it would be 1.8 s
    finally:
        hanging.close()


def test_a_stream_flowing_longer_than_http_timeout_seconds_passes_whole_through_lb_serve(lb_url, backend, monkeypatch):
    """Neither the guard's timers nor the relay cut an answer that keeps coming: 1 s of events
    0.2 s apart under HTTP_TIMEOUT_SECONDS=0.5 and LB_SERVE_HEAD_TIMEOUT_SECONDS=0.5 (3 words, the
    finish, the usage the proxy asks for and [DONE]), last one and [DONE] included."""
    monkeypatch.setattr(backend, "chunks", 3)
    monkeypatch.setattr(backend, "chunk_gap", 0.2)
    disconnects = backend.disconnects
    host, port, _ = lb_url
    started = time.monotonic()
    with httpx.stream(
        "POST",
        f"http://{host}:{port}/openai/deployments/chat/chat/completions?api-version={API_VERSION}",
        headers={"api-key": CLIENT_KEY},
        json={"messages": [{"role": "user", "content": "hi"}], "stream": True},
        timeout=10,
    ) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert time.monotonic() - started >= 1.0
    assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)
    assert len(events) >= 5 and backend.disconnects == disconnects


def test_a_client_that_stops_reading_its_answer_is_cut_off_and_the_upstream_call_closed(lb_url, firehose):
    """The relay bounds a backend's silence; this bounds the client's: a stream nobody reads would
    otherwise hold its backend connection for ever, since its relay waits on the client."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    head = HEAD.replace("/deployments/chat/", "/deployments/firehose/")
    request = head.encode() + f"api-key: {CLIENT_KEY}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(lb_url[:2])
    sock.sendall(request)
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    stopped = time.monotonic()  # and reads no more
    wait_until(lambda: firehose.closed, "the backend connection to be closed")
    assert firehose.closed[0] - stopped < 0.5 + 1.5  # HTTP_TIMEOUT_SECONDS once the send buffer is full
    sock.close()


class Transport:
    """Records what goes out, one entry per send."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def writelines(self, data: tuple[bytes, ...]) -> None:
        self.sent.append(b"".join(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str) -> str:
        return f"extra {name}"


def test_an_answer_s_head_leaves_with_what_follows_it_in_one_send():
    asyncio.run(_head_held())


async def _head_held() -> None:
    loop = asyncio.get_running_loop()
    transport = Transport()
    held = HeldHead(transport, loop)  # a JSON answer: head, then body, in one turn of the loop
    held.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert transport.sent == []
    held.write(b"{}")
    held.write(b"more")  # after the head, writes pass straight through
    assert transport.sent == [b"HTTP/1.1 200 OK\r\n\r\n{}", b"more"]
    await asyncio.sleep(0)  # the scheduled flush finds nothing left to send
    assert transport.sent == [b"HTTP/1.1 200 OK\r\n\r\n{}", b"more"]

    transport = Transport()
    held = HeldHead(transport, loop)  # a stream whose first event is not in yet: the head goes at the turn's end
    held.write(b"HTTP/1.1 200 OK\r\n\r\n")
    await asyncio.sleep(0)
    assert transport.sent == [b"HTTP/1.1 200 OK\r\n\r\n"]
    held.write(b"data: 1\n\n")
    assert transport.sent == [b"HTTP/1.1 200 OK\r\n\r\n", b"data: 1\n\n"]
    assert held.get_extra_info("peername") == "extra peername"

    transport = Transport()
    held = HeldHead(transport, loop)  # closed at once: what was held goes first
    held.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
    held.close()
    assert transport.sent == [b"HTTP/1.1 500 Internal Server Error\r\n\r\n"] and transport.closed
    await asyncio.sleep(0)
    assert len(transport.sent) == 1

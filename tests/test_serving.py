"""`python -m lb serve`'s own limits, on a real process: a client can't buffer, hold or exhaust it."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator

import pytest

from lb.sim import SimBackend, free_port
from tests.conftest import API_VERSION, CLIENT_KEY
from tests.test_cli import run_lb

HEAD = f"POST /openai/deployments/chat/chat/completions?api-version={API_VERSION} HTTP/1.1\r\nhost: lb\r\n"


@pytest.fixture(scope="module")
def lb_url(servers) -> Iterator[tuple[str, int, int]]:
    port = free_port()
    env = {
        "BACKEND_1_URL": servers.start(SimBackend("a", api_key="k")),
        "BACKEND_1_APIKEY": "k",
        "LB_CLIENT_KEYS": CLIENT_KEY,
        "HTTP_TIMEOUT_SECONDS": "1",
        "LB_SERVE_HEAD_TIMEOUT_SECONDS": "0.5",
        "LB_SERVE_MAX_CONNECTIONS": "20",
    }
    process = run_lb(env, "serve", "--port", str(port))
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
            time.sleep(0.1)
    yield "127.0.0.1", port, process.pid
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
    sock = connect(lb_url)
    sock.sendall(HEAD.encode() + b"".join(b"x-h%d: 1\r\n" % i for i in range(150)) + b"\r\n")
    status, body = answer(sock)
    assert status == 431 and body["error"]["code"] == "RequestHeaderFieldsTooLarge"


def test_a_head_that_never_completes_gets_408_and_an_idle_connection_is_closed(lb_url):
    slow, idle = connect(lb_url), connect(lb_url)
    slow.sendall(HEAD.encode())  # ... and never the blank line
    started = time.monotonic()
    status, body = answer(slow)
    assert status == 408 and body["error"]["code"] == "RequestTimeout"
    assert idle.recv(10) == b""  # closed without a word: nothing was asked
    assert time.monotonic() - started < 2


def test_a_body_that_stalls_gets_408_at_the_deadline(lb_url):
    sock = connect(lb_url)
    sock.sendall(HEAD.encode() + f"api-key: {CLIENT_KEY}\r\ncontent-length: 100\r\n\r\n".encode() + b"{")
    started = time.monotonic()
    status, body = answer(sock)
    assert status == 408 and body["error"]["code"] == "RequestTimeout"
    assert time.monotonic() - started < 2


def test_connections_past_the_cap_get_a_503_and_the_rest_are_served(lb_url):
    held = [connect(lb_url) for _ in range(20)]
    time.sleep(0.1)
    extra = connect(lb_url)
    extra.sendall(HEAD.encode() + b"\r\n")
    status, body = answer(extra)
    assert status == 503 and body["error"]["code"] == "ServiceUnavailable"
    for sock in held:
        sock.close()
    time.sleep(0.2)
    sock = connect(lb_url)
    request = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    sock.sendall(HEAD.encode() + f"api-key: {CLIENT_KEY}\r\ncontent-length: {len(request)}\r\n\r\n".encode() + request)
    status, body = answer(sock)
    assert status == 200 and body["choices"]

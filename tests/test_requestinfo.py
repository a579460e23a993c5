"""Path, header and body safety: what a client may send, and what reaches a backend."""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import time
from urllib.parse import quote, unquote

import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from lb import bodyscan
from lb.errors import BadRequest, ProxyError, RouteNotFound
from lb.requestinfo import check_path, described
from tests.conftest import API_VERSION, CLIENT_KEY, TLS

# httpx's one-call helpers on the shared TLS context (each call builds a client, which would load the CA bundle)
get = functools.partial(httpx.get, verify=TLS)
post = functools.partial(httpx.post, verify=TLS)
request = functools.partial(httpx.request, verify=TLS)

CHAT = f"/openai/deployments/chat/chat/completions?api-version={API_VERSION}"
BODY = b'{"messages": [{"role": "user", "content": "hi"}]}'


@pytest.mark.parametrize(
    "path",
    [
        "/openai/deployments/chat/chat/completions",
        "/openai/deployments/gpt-4o.mini_2/embeddings",
        "/openai/v1/chat/completions",
        "/openai/v1/files/file-abc123/content",
        "/openai/deployments/my%20deployment/completions",
        "/openai/deployments/a..b/chat",
    ],
)
def test_paths_the_sdks_send_are_accepted(path):
    check_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "/openai/../admin",
        "/openai/deployments/./chat",
        "/openai/deployments/chat/",
        "/openai//deployments/chat",
        "/openai/%2e%2e/admin",
        "/openai/%2E%2e%2Fadmin",
        "/openai/%252e%252e/admin",
        "/openai/%25252e%25252e/admin",
        "/openai/deployments%2f%2fchat",
        "/openai/a\\b",
        "/openai/a%5cb",
        "/openai/a%00b",
        "/openai/a%0d%0aInjected: 1",
        "/openai/a\x7fb",
        "/openai/a%23frag",
        "/openai/http://evil.example/x",
        "/openai/%ff",
        "/openai/%" + "25" * 6 + "2e",  # "." encoded seven times over
    ],
)
def test_unsafe_paths_are_bad_requests(path):
    with pytest.raises(BadRequest):
        check_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "/openai/deployments/chat%2Fchat/completions",  # one router's deployment `chat/chat`, another's `chat`
        "/openai/v1%2fchat/completions",
        "/openai/deployments/ch%2561t/chat/completions",  # `ch%61t` decoded once, `chat` twice
        "/openai/v1/chat/c%256Fmpletions",
        "/openai/deployments/a%%32%66b/chat/completions",  # a second decoding makes an encoded '/'
    ],
)
def test_a_path_two_routers_could_read_two_ways_is_refused(path: str) -> None:
    with pytest.raises(BadRequest):
        check_path(path)


@pytest.mark.parametrize("path", ["/", "/admin/host/status", "/openai", "/OPENAI/v1/x", "//evil.example/openai/x"])
def test_only_openai_paths_are_proxied(path):
    with pytest.raises(RouteNotFound):
        check_path(path)


def _layers(path: str):
    for _ in range(10):
        yield path
        decoded = unquote(path)
        if decoded == path:
            return
        path = decoded


_TRICKY = st.sampled_from([*"/.%25abc\\\x00\n#2eEfF5:", "%2e", "%2E", "%2f", "%5c", "%25", "%00", "%0a"])


@given(st.lists(_TRICKY, max_size=30).map("".join))
@example("/%2e%2e")
@example("/%252e%252e/x")
def test_an_accepted_path_has_no_unsafe_segment_at_any_decoding_depth(tail):
    path = "/openai/x" + tail
    try:
        check_path(path)
    except ProxyError:
        return
    for layer in _layers(path):
        assert not any(c in layer for c in "\\\x00\n#")
        assert all(seg not in ("", ".", "..") for seg in layer.split("/")[1:]), layer


@given(st.text(max_size=40))
def test_any_path_keeps_the_configured_backend_host(tail):
    path = "/openai/" + tail
    try:
        check_path(path)
    except ProxyError:
        return
    url = httpx.URL("https://acct.openai.azure.com" + path)
    assert url.host == "acct.openai.azure.com" and url.port is None and url.scheme == "https"
    assert url.path.startswith("/openai/")


_SEGMENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.~", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)


@given(st.lists(_SEGMENT, min_size=1, max_size=6))
def test_paths_of_ordinary_segments_are_never_refused(segments):
    check_path("/openai/" + "/".join(quote(s) for s in segments))


# Through the real runner ------------------------------------------------------------------------------------
def raw_request(url: str, head: str, body: bytes = b"", read_timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    """Send bytes exactly as given (no client normalises the path) and read the answer."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as s:
        s.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head_bytes, rest = data.split(b"\r\n\r\n", 1)
        lines = head_bytes.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", 0))
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    return int(lines[0].split()[1]), headers, rest


PROBES = [
    # (request line target, extra headers, body)
    ("/openai/deployments/%2e%2e/chat/completions", "", BODY),
    ("/openai/deployments/..%2fchat/completions", "", BODY),
    ("/openai/deployments/%252e%252e/x", "", BODY),
    ("/openai/deployments/chat//chat/completions", "", BODY),
    ("/openai/deployments/chat/chat/completions/", "", BODY),
    ("/openai/deployments/a%5cb/chat", "", BODY),
    ("/openai/deployments/a%00b/chat", "", BODY),
    ("/openai/deployments/a%0d%0aX-Injected:%201/chat", "", BODY),
    ("/openai/./deployments/chat/chat/completions", "", BODY),
    ("/admin/host/status", "", b""),
    ("/lb/../openai/v1/models", "", b""),
    ("/openai", "", b""),
    ("/openai/v1/chat/completions", "Content-Type: application/json\r\n", b"{not json"),
    ("/openai/v1/chat/completions", "Content-Type: application/json\r\n", b'{"model": "a\\nb"}'),
    ("/openai/v1/chat/completions", "Content-Type: application/json\r\n", b"\xff\xfe"),
    ("/openai/deployments/chat/chat/completions", "", b"x" * 2000),
    ("/openai/deployments/a%E2%80%A8b/chat", "", BODY),  # U+2028 LINE SEPARATOR: a log line break
    ("/openai/deployments/a%C2%85b/chat", "", BODY),  # U+0085 NEXT LINE
    ("/openai/v1/chat/completions", "Content-Type: application/json\r\n", '{"model": "a\u2029b"}'.encode()),
    ("/openai/v1/chat/completions", "Content-Type: application/json\r\n", b'{"model": "a\\u0085b"}'),
]


def test_every_path_and_body_probe_is_a_json_4xx_that_reaches_no_backend(make_pool):
    pool = make_pool(1, env={"LB_MAX_BODY_BYTES": "1000"})
    for target, extra, body in PROBES:
        head = (
            f"POST {target} HTTP/1.1\r\nHost: lb\r\napi-key: {CLIENT_KEY}\r\n{extra}"
            f"Content-Length: {len(body)}\r\nConnection: close"
        )
        status, headers, answer = raw_request(pool.url, head, body)
        assert 400 <= status < 500, (target, status, answer)
        error = json.loads(answer)["error"]
        assert set(error) == {"code", "message"} and error["message"], target
        assert headers["content-type"].startswith("application/json"), target
    assert pool.backends[0].calls == []


def test_auth_probes_are_json_401s_that_reach_no_backend(make_pool):
    pool = make_pool(1)
    for credential in (
        "",
        "api-key: wrong",
        "Authorization: Bearer wrong",
        "Authorization: Basic Y2xpZW50",
        "api-key: ",
    ):
        line = f"\r\n{credential}" if credential else ""
        status, headers, answer = raw_request(
            pool.url,
            f"POST {CHAT} HTTP/1.1\r\nHost: lb{line}\r\nContent-Length: {len(BODY)}\r\nConnection: close",
            BODY,
        )
        assert status == 401, credential
        assert headers["www-authenticate"].startswith("Bearer ")
        assert set(json.loads(answer)["error"]) == {"code", "message"}
    assert pool.backends[0].calls == []


def test_oversized_body_is_refused_before_it_is_sent(make_pool):
    pool = make_pool(1, env={"LB_MAX_BODY_BYTES": "1000"})
    started = time.perf_counter()
    head = f"POST {CHAT} HTTP/1.1\r\nHost: lb\r\napi-key: {CLIENT_KEY}\r\nContent-Length: {100 * 2**20}"
    status, _, answer = raw_request(pool.url, head, b"x" * 1000)  # declares 100 MiB, sends 1 KB, then waits
    assert status == 413 and json.loads(answer)["error"]["code"] == "PayloadTooLarge"
    assert time.perf_counter() - started < 2

    def chunks():
        for _ in range(10):
            yield b"x" * 500

    chunked = post(pool.url + CHAT, content=chunks(), headers={"api-key": CLIENT_KEY})  # no Content-Length
    assert chunked.status_code == 413
    assert pool.backends[0].calls == []


def test_too_many_or_too_large_headers_are_431_without_a_backend_call(make_pool):
    pool = make_pool(1)
    big = post(pool.url + CHAT, content=BODY, headers={"api-key": CLIENT_KEY, "x-big": "a" * 40_000})
    many = post(pool.url + CHAT, content=BODY, headers={"api-key": CLIENT_KEY, **{f"x-{i}": "1" for i in range(120)}})
    for response in (big, many):
        assert response.status_code == 431 and response.json()["error"]["code"] == "RequestHeaderFieldsTooLarge"
    assert pool.backends[0].calls == []
    assert post(pool.url + CHAT, content=BODY, headers={"api-key": CLIENT_KEY, "x-ok": "a" * 8000}).status_code == 200


def test_unknown_route_and_method_get_json_errors(make_pool):
    pool = make_pool(1)
    missing = get(pool.url + "/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "NotFound"
    wrong_method = post(pool.url + "/healthz")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "MethodNotAllowed"
    trace = request("TRACE", pool.url + CHAT, headers={"api-key": CLIENT_KEY})  # not one the proxy relays
    assert trace.status_code == 405 and trace.json()["error"]["code"] == "MethodNotAllowed"
    assert pool.backends[0].calls == []


def test_upstream_host_is_the_backends_whatever_host_headers_or_absolute_url_say(make_pool):
    pool = make_pool(1)
    backend_host = pool.proxy.settings.backends[0].host
    head = (
        f"POST http://evil.example{CHAT} HTTP/1.1\r\nHost: evil.example\r\nX-Forwarded-Host: evil.example\r\n"
        f"Forwarded: host=evil.example\r\napi-key: {CLIENT_KEY}\r\nContent-Length: {len(BODY)}\r\nConnection: close"
    )
    status, _, _ = raw_request(pool.url, head, BODY)
    assert status == 200  # uvicorn reduces the absolute form to its path; the backend is still ours
    (call,) = pool.backends[0].calls
    assert call.headers["host"] == backend_host
    assert "evil.example" not in json.dumps(call.headers)


def test_hop_by_hop_headers_are_not_forwarded_and_forwarding_headers_are_set(make_pool):
    pool = make_pool(1)
    response = post(
        pool.url + CHAT,
        content=BODY,
        headers={
            "api-key": CLIENT_KEY,
            "connection": "keep-alive, x-hop",
            "x-hop": "secret",
            "keep-alive": "timeout=5",
            "te": "trailers",
            "trailer": "x-checksum",
            "upgrade": "h2c",
            "proxy-authorization": "Basic eDp5",
            "proxy-anything": "1",
            "x-request-id": "client-req-42",
            "x-kept": "yes",
            "x-forwarded-for": "10.1.2.3",
        },
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "client-req-42"
    (call,) = pool.backends[0].calls
    for name in ("x-hop", "keep-alive", "te", "trailer", "upgrade", "proxy-authorization", "proxy-anything"):
        assert name not in call.headers, name
    assert call.headers.get("connection", "keep-alive") == "keep-alive"  # httpx's own, not the client's
    assert call.headers["x-kept"] == "yes" and call.headers["x-request-id"] == "client-req-42"
    # The client's chain, then the address it reached us from (which this test server, trusting
    # loopback's X-Forwarded-For as uvicorn does by default, takes from that header too).
    assert call.headers["x-forwarded-for"].startswith("10.1.2.3, ") and call.headers["x-forwarded-proto"] == "http"


def test_a_request_id_is_made_when_the_client_sends_none_and_given_to_the_backend(make_pool):
    pool = make_pool(1)
    response = post(pool.url + CHAT, content=BODY, headers={"api-key": CLIENT_KEY})
    made = response.headers["x-request-id"]
    assert len(made) == 36 and pool.backends[0].calls[0].headers["x-request-id"] == made
    unsafe = post(pool.url + CHAT, content=BODY, headers={"api-key": CLIENT_KEY, "x-request-id": "a b\tc" * 50})
    assert unsafe.headers["x-request-id"] != "a b\tc" * 50  # not a safe token: a fresh id is logged instead
    assert post(pool.url + CHAT, content=b"", headers={"x-request-id": "r-401"}).headers["x-request-id"] == "r-401"


async def _hop_backend(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    headers = [
        (b"content-type", b"application/json"),
        (b"connection", b"x-hop-resp"),
        (b"x-hop-resp", b"secret"),
        (b"proxy-authenticate", b"Basic"),
        (b"proxy-foo", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"x-request-id", b"backend-id"),
        (b"x-kept", b"yes"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"{}"})


def test_hop_by_hop_headers_of_the_backend_are_not_returned(servers):
    from lb.app import create_app
    from lb.config import load_settings

    app = create_app(load_settings({"BACKEND_1_URL": servers.start(_hop_backend), "BACKEND_1_APIKEY": "k"}))
    url = servers.start(app)
    response = post(url + CHAT, content=BODY, headers={"x-request-id": "client-id"})
    assert response.status_code == 200
    for name in ("x-hop-resp", "proxy-authenticate", "proxy-foo", "keep-alive"):
        assert name not in response.headers, name
    assert response.headers["x-kept"] == "yes"
    assert response.headers.get_list("x-request-id") == ["backend-id"]  # the backend's own id wins, once


def test_a_missing_deployment_gets_the_backends_own_404_untouched(make_pool):
    pool = make_pool(2)
    for backend in pool.backends:
        backend.fail_status = 404
    response = post(pool.url + CHAT, content=BODY, headers={"api-key": CLIENT_KEY})
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Simulated failure."  # the backend's body, not ours
    assert response.headers["x-lb-attempts"] == "1"


def test_json_that_python_refuses_to_build_is_a_400_not_a_500(make_pool):
    pool = make_pool(1)
    for body in (b"[" * 30_000 + b"]" * 30_000, b'{"model": "chat", "n": ' + b"9" * 5000 + b"}"):
        response = post(
            pool.url + "/openai/v1/chat/completions",
            content=body,
            headers={"api-key": CLIENT_KEY, "content-type": "application/json"},
        )
        assert response.status_code == 400 and response.json()["error"]["code"] == "BadRequest"
    assert pool.backends[0].calls == []


def test_a_5000_digit_max_tokens_under_the_headroom_policy_is_forwarded_not_a_500(make_pool):
    pool = make_pool(1, env={"LB_POLICY": "headroom"})
    body = b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}"
    response = post(pool.url + CHAT, content=body, headers={"api-key": CLIENT_KEY})
    assert response.status_code == 200  # the backend judges it; the proxy's estimate just saturates


@pytest.mark.parametrize(
    ("payload", "deployment"),
    [
        ({"messages": [{"role": "user", "content": "x" * 100}] * 2000, "model": "big"}, "big"),
        (
            {
                "tools": [{"function": {"parameters": {"properties": {"model": {"type": "string"}}}}}] * 2,
                "messages": [{"role": "user", "content": '"model": "fake" \\"model\\": "x"' * 5000}],
                "model": "real",
            },
            "real",
        ),
        ({"input": "y" * 100_000, "metadata": {"model": "nested"}, "model": "topé"}, "topé"),
        ({"input": "y" * 100_000, "model": "gpt\u002d4".encode().decode("unicode_escape")}, "gpt-4"),
    ],
)
def test_a_large_v1_body_is_routed_by_its_top_level_model_without_being_parsed(make_pool, payload, deployment):
    pool = make_pool(1)
    body = json.dumps(payload).encode()
    assert len(body) > 64 * 1024
    response = post(
        pool.url + "/openai/v1/chat/completions",
        content=body,
        headers={"api-key": CLIENT_KEY, "content-type": "application/json"},
    )
    assert response.status_code == 200
    assert pool.backends[0].calls[0].deployment == deployment


def test_an_api_key_in_the_query_is_not_forwarded(servers):
    from lb.app import create_app
    from lb.config import load_settings

    queries: list[bytes] = []

    async def backend(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        queries.append(scope["query_string"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = create_app(load_settings({"BACKEND_1_URL": servers.start(backend), "BACKEND_1_APIKEY": "k"}))
    url = servers.start(app)
    encoded = ("api%2Dkey=leak&api-version=1", "api-version=1&%61pi-key=leak", "api-version=1&API%2dKEY=leak")
    for query in (
        "api-key=leak&api-version=1",
        "api-version=1&API-KEY=leak",
        "api-version=1&api-key=leak&x=2",
        *encoded,
    ):
        assert post(f"{url}/openai/deployments/chat/chat/completions?{query}", content=BODY).status_code == 200
    assert queries == [b"api-version=1", b"api-version=1", b"api-version=1&x=2", *[b"api-version=1"] * 3]


def test_routing_override_headers_are_not_forwarded_and_forwarded_proto_is_ours(make_pool):
    pool = make_pool(1)
    overrides = {
        "x-original-url": "/admin",
        "x-rewrite-url": "/admin",
        "x-http-method-override": "DELETE",
        "x-http-method": "DELETE",
        "x-method-override": "DELETE",
        "x-forwarded-proto": "https",
        "x-forwarded-port": "443",
        "x-forwarded-prefix": "/other",
        "expect": "100-continue",
    }
    response = post(pool.url + CHAT, content=BODY, headers={"api-key": CLIENT_KEY, **overrides})
    assert response.status_code == 200
    (call,) = pool.backends[0].calls
    for name in overrides:
        if name != "x-forwarded-proto":
            assert name not in call.headers, name


def test_the_clients_forwarded_proto_is_replaced_by_how_it_reached_us():
    from starlette.requests import Request

    from lb.headers import forwarded

    scope = {
        "type": "http",
        "method": "POST",
        "scheme": "http",
        "path": "/openai/x",
        "headers": [(b"x-forwarded-proto", b"https"), (b"host", b"lb")],
        "client": ("10.0.0.1", 1234),
        "server": ("lb", 80),
    }
    assert [v for k, v in forwarded(Request(scope), None) if k == b"x-forwarded-proto"] == [b"http"]


def _pointing_backend(base: list[str]):
    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        own = base[0]
        headers = [
            (b"content-type", b"application/json"),
            (b"operation-location", f"{own}/openai/operations/images/op-1?api-version=2024-02-01".encode()),
            (b"location", f"{own}/openai/x".encode()),
            (b"content-location", f"{own}/elsewhere/secret".encode()),  # the backend's, outside /openai: dropped
        ]
        await send({"type": "http.response.start", "status": 202, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


def test_headers_pointing_at_the_backend_point_at_the_proxy_instead(servers):
    from lb.app import create_app
    from lb.config import load_settings

    base: list[str] = []
    backend_url = servers.start(_pointing_backend(base))
    base.append(backend_url)
    app = create_app(load_settings({"BACKEND_1_URL": backend_url, "BACKEND_1_APIKEY": "k"}))
    url = servers.start(app)
    response = post(url + CHAT, content=BODY)
    assert response.status_code == 202
    assert response.headers["operation-location"] == f"{url}/openai/operations/images/op-1?api-version=2024-02-01"
    assert response.headers["location"] == f"{url}/openai/x"
    assert "content-location" not in response.headers
    assert backend_url.rsplit(":", 1)[1] not in response.headers["operation-location"]


def _info(path: str, body: bytes, content_type: str = "application/json"):
    from starlette.requests import Request

    from lb.requestinfo import read_request

    chunks = [body]

    async def receive() -> dict:
        return {"type": "http.request", "body": chunks.pop() if chunks else b"", "more_body": False}

    raw, _, query = path.partition("?")
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "method": "POST", "path": raw, "raw_path": raw.encode(), "query_string": query.encode()}
    return asyncio.run(read_request(Request({**scope, "headers": headers, "scheme": "http"}, receive), 1 << 20))


@pytest.mark.parametrize(
    ("path", "deployment"),
    [
        (f"/openai/responses?api-version={API_VERSION}", "chat"),  # the AzureOpenAI client's Responses path
        (f"/openai/Responses?api-version={API_VERSION}", "chat"),  # Azure matches routes whatever their case
        ("/openai/v1/responses", "chat"),
        ("/openai/responses/resp_abc/cancel", "chat"),
        (f"/openai/files?api-version={API_VERSION}", None),  # the body's model names no deployment there
        (f"/openai/deployments/other/chat/completions?api-version={API_VERSION}", "other"),  # the path wins
    ],
)
def test_the_deployment_is_the_body_model_on_v1_and_on_the_responses_path(path, deployment):
    info = _info(path, b'{"model": "chat", "input": "hi", "stream": true}')
    assert info.deployment == deployment and info.stream is True


def test_a_large_responses_body_is_scanned_for_its_model_not_parsed():
    body = json.dumps({"input": "x" * 100_000, "model": "chat"}).encode()
    info = _info(f"/openai/responses?api-version={API_VERSION}", body)
    assert info.deployment == "chat"


@pytest.mark.parametrize(
    "first", [b'"max_tokens": 77', b'"stream": true', b'"stream_options": {"include_usage": true}']
)
def test_a_large_bodys_marks_are_found_wherever_its_slices_end(first):
    """Read a slice at a time (the loop gets a turn between slices), a key across two slices still counts."""
    members = [b'"max_tokens": 77', b'"stream": true', b'"stream_options": {"include_usage": true}']
    tail = b", ".join([first, *(m for m in members if m != first)]) + b"}"
    step = bodyscan.WINDOW_BYTES // 6
    for offset in (*range(-2, 16), 40):  # the first key starts this far before a slice's end
        head = b'{"input": "'
        filler = b"x" * (7 * step - offset - len(head) - 3)
        body = head + filler + b'", ' + tail
        assert body.index(first) == 7 * step - offset and len(body) > bodyscan.WINDOW_BYTES
        assert asyncio.run(bodyscan.marks(body)) == bodyscan.Marks(True, True, True, 77), offset
        assert asyncio.run(bodyscan.include_usage(body)), offset
    assert bodyscan.read_marks(b'{"x": "\\"stream\\": true, \\"max_tokens\\": 5"}') == bodyscan.NO_MARKS


def test_the_one_read_finds_where_the_body_names_its_deployment_only_when_it_does():
    on_v1 = asyncio.run(described("/openai/v1/responses", b'{"input": "hi", "model": "chat", "max_tokens": 3}'))
    assert on_v1.deployment == "chat" and on_v1.model_spans == ((25, 31),) and on_v1.tokens == 50 // 4 + 3
    in_path = asyncio.run(described(CHAT, b'{"model": "chat"}'))
    assert in_path.deployment == "chat" and in_path.model_spans is None


def test_the_one_read_looks_only_for_what_will_be_read():
    body = b'{"messages": [], "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 7}'
    unlimited = asyncio.run(described(CHAT, body, tokens=False))  # no quota, no headroom policy: no max-tokens search
    assert unlimited.marks == bodyscan.Marks(True, True, True, None) and unlimited.stream
    assert asyncio.run(described(CHAT, body)).marks.max_tokens == 7
    plain = asyncio.run(described("/openai/v1/chat/completions", body.replace(b"true", b"false")))
    assert plain.marks == bodyscan.Marks(False, True, False, 7)  # the usage flag is read in streams only


COMPLETIONS = f"/openai/deployments/instruct/completions?api-version={API_VERSION}"


@pytest.mark.parametrize(
    ("path", "body", "choices"),
    [
        # read from the bytes: the deployment in the path, the body not parsed
        (CHAT, b'{"messages": [], "n": 5, "max_tokens": 10}', 5),
        (CHAT, b'{"messages": [], "n" :\n12}', 12),
        (CHAT, b'{"messages": [], "best_of": 9}', 1),  # chat has no best_of
        (COMPLETIONS, b'{"prompt": "x", "best_of": 9, "n": 2}', 9),
        (COMPLETIONS, b'{"prompt": "x", "best_of": 1, "n": 3}', 3),
        (f"/openai/deployments/d/images/generations?api-version={API_VERSION}", b'{"prompt": "x", "n": 4}', 4),
        (f"/openai/deployments/d/embeddings?api-version={API_VERSION}", b'{"input": "x", "n": 4}', 1),
        # read from the parsed body (/openai/v1/), whatever spells its keys
        ("/openai/v1/chat/completions", b'{"model": "chat", "messages": [], "n": 6}', 6),
        ("/openai/v1/chat/completions", b'{"model": "chat", "messages": [], "\\u006e": 7}', 7),
        ("/openai/v1/completions", b'{"model": "i", "prompt": "x", "best_\\u006ff": 8}', 8),
        ("/openai/v1/responses", b'{"model": "chat", "input": "x", "n": 6}', 1),  # no choices there
        # a nested key of that name is no count of the call's (a tool's schema, a quoted one)
        (CHAT, b'{"tools": [{"function": {"parameters": {"properties": {"n": {"type": "integer"}}}}}]}', 1),
        (CHAT, b'{"messages": [{"role": "user", "content": "{\\"n\\": 50}"}]}', 1),
        (CHAT, b'{"metadata": {"n": "50"}}', 1),
    ],
)
def test_the_number_of_choices_is_read_from_the_parsed_body_or_its_bytes(path, body, choices):
    info = asyncio.run(described(path, body))
    assert info.marks.choices == choices
    assert info.tokens == len(body) // 4 + (info.marks.max_tokens or 0) * choices
    assert asyncio.run(described(path, body, tokens=False)).marks.choices == 1  # not looked for: nothing reads it


@pytest.mark.parametrize(
    ("value", "choices"),
    [
        (b"null", 1),  # the default
        (b"0", 1),  # refused by the backend (400): charges nothing, whatever was reserved
        (b"128", 128),
        (b"500", 128),  # refused too; never more than any call can ask
        (b"9" * 40, 128),  # no int() of a huge number
        (b"-1", 128),  # not a count: counted as the most there can be
        (b"2.0", 128),
        (b"1e3", 128),
    ],
)
def test_a_choices_value_that_is_no_plain_count_counts_as_the_most_a_call_can_ask(value, choices):
    bytes_read = asyncio.run(described(CHAT, b'{"messages": [], "n": ' + value + b"}")).marks.choices
    parsed = asyncio.run(described("/openai/v1/chat/completions", b'{"model": "m", "n": ' + value + b"}"))
    assert bytes_read == parsed.marks.choices == choices


@pytest.mark.parametrize("value", ['"50"', "true", "[2]", '{"n": 2}'])
def test_a_top_level_choices_value_of_another_type_counts_as_the_most_when_the_body_was_parsed(value):
    """Parsed, the key is known to be the call's own: a value the backend would refuse, unless it read
    it anyway, counts as 128 (in the bytes, a non-number is taken for a nested key's and skipped)."""
    body = b'{"model": "m", "n": ' + value.encode() + b"}"
    assert asyncio.run(described("/openai/v1/chat/completions", body)).marks.choices == bodyscan.MAX_CHOICES


def test_a_large_bodys_choices_are_found_wherever_its_slices_end():
    step = bodyscan.WINDOW_BYTES // 4  # a slice per search: "stream, "include_usage", "max_, "n"
    for offset in (*range(-2, 8), 40):
        head = b'{"messages": [{"role": "user", "content": "'
        filler = b"x" * (5 * step - offset - len(head) - 5)
        body = head + filler + b'"}], "n": 17, "stream": true}'
        assert body.index(b'"n"') == 5 * step - offset and len(body) > bodyscan.WINDOW_BYTES
        assert asyncio.run(bodyscan.marks(body, choices=(bodyscan.N,))).choices == 17, offset
    assert asyncio.run(described(CHAT, body)).marks.choices == 17


def test_a_body_naming_the_choices_key_more_often_than_any_request_counts_the_most_choices():
    """Each occurrence is looked at in Python: past `MAX_KEYS` the body is no request's (one `n`, a
    few more in tool schemas), and counts as the most choices (or tokens) instead of costing more."""
    many = b'{"messages": [], "x": [' + b", ".join([b'{"n": 1}'] * bodyscan.MAX_KEYS) + b"]}"
    assert asyncio.run(described(CHAT, many)).marks.choices == 1
    more = many.replace(b"[{", b'[{"n": 1}, {', 1)
    assert asyncio.run(described(CHAT, more)).marks.choices == bodyscan.MAX_CHOICES
    tokens = many.replace(b'"n"', b'"max_tokens"')
    assert asyncio.run(described(CHAT, tokens)).marks.max_tokens == 1
    assert asyncio.run(described(CHAT, tokens.replace(b"[{", b'[{"max_tokens": 1}, {', 1))).marks.max_tokens == 10**15


def test_a_forms_bytes_are_not_searched_for_choices():
    """An image edit sent as a form names `n` as a field, which is not read: its upload is not searched."""
    form = b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n{"n": 9}\r\n--b--\r\n'
    edits = f"/openai/deployments/d/images/edits?api-version={API_VERSION}"
    assert asyncio.run(described(edits, form, "multipart/form-data; boundary=b")).marks.choices == 1
    assert asyncio.run(described(edits, b'{"prompt": "x", "n": 9}')).marks.choices == 9

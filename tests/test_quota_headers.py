"""With several clients, no answer of any kind carries a backend's `x-ratelimit-*` headers.

They count every client's spend on that backend (docs/security.md, "Isolation between clients"):
one read by bob tells him how much alice just spent. The answers leave by different paths: streamed
(`lb.relay.UpstreamResponse`), read whole and relayed (`lb.attempt.buffered`: a 401/403 about the
client's call, an object look-up's "not found"), a backend's own error relayed as the last word, and
the balancer's own errors. `lb.proxy` strips them from every one, in one place; a limited client gets
its own remaining quota instead (`lb.metering`).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from lb.app import create_app
from lb.config import load_settings
from lb.sim import SimBackend, replayed

ALICE, BOB = "key-a", "key-b"  # bob has a quota of his own: his x-ratelimit-remaining-* are his
BACKENDS = {b"x-ratelimit-remaining-tokens": b"4242", b"x-ratelimit-remaining-requests": b"77"}
QUOTA = [
    *BACKENDS.items(),
    (b"x-ratelimit-limit-tokens", b"10000"),
    (b"x-ratelimit-reset-requests", b"1s"),
    (b"X-RateLimit-Reset-Tokens", b"2s"),  # as a gateway may spell it
]
HTML_403 = b"<html><body><h1>403 Forbidden</h1>Microsoft-Azure-Application-Gateway/v2</body></html>"


class Quoting:
    """A simulated backend whose every answer carries its quota headers; a prompt holding `<script>`
    is refused by its WAF (403, HTML), one holding `fail-me` is its 500, one holding `busy-me` its 429."""

    def __init__(self) -> None:
        self.sim = SimBackend("q", api_key="key-1")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.sim(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        for trigger, status, content_type, content in (
            (b"<script>", 403, b"text/html", HTML_403),
            (b"fail-me", 500, b"application/json", b'{"error": {"code": "500", "message": "Internal error."}}'),
            (b"busy-me", 429, b"application/json", b'{"error": {"code": "429", "message": "Retry after 1 s."}}'),
        ):
            if trigger in body:
                head = [(b"content-type", content_type), (b"retry-after", b"1"), *QUOTA]
                await send({"type": "http.response.start", "status": status, "headers": head})
                await send({"type": "http.response.body", "body": content})
                return

        async def with_quota(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message["headers"] if not k.lower().startswith(b"x-ratelimit-")]
                message = {**message, "headers": kept + QUOTA}
            await send(message)

        await self.sim(scope, replayed(body), with_quota)


def balancer(servers) -> str:
    settings = {
        "LB_AFFINITY": "off",
        "LB_CLIENT_KEYS": f"alice:{ALICE},bob:{BOB}",
        "LB_CLIENT_LIMITS": "bob=1000000tpm",
        "LB_OBJECT_LOOKUP": "on",  # an id without a record is looked up: the backend's 404 is read whole
        "BACKEND_1_URL": servers.start(Quoting()),
        "BACKEND_1_APIKEY": "key-1",
    }
    return servers.start(create_app(load_settings(settings)))


def chat(content: str, **more: Any) -> dict[str, Any]:
    return {"model": "chat", "messages": [{"role": "user", "content": content}], **more}


CHATS = "/openai/v1/chat/completions"
ANSWERS = {
    # kind: (method, path, body, the status it must be, relayed from the backend (x-lb-backend) or the balancer's)
    "streamed": ("POST", CHATS, chat("hi", stream=True), 200, True),
    "a JSON answer": ("POST", CHATS, chat("hi"), 200, True),
    "a refusal read whole": ("POST", CHATS, chat("<script>"), 403, True),
    "a look-up's 404 read whole": ("GET", "/openai/v1/responses/resp_" + "0" * 32, None, 404, True),
    "the backend's 500 as the last word": ("POST", CHATS, chat("fail-me"), 500, True),
    "the balancer's own 429": ("POST", "/openai/deployments/b/chat/completions", chat("busy-me"), 429, False),
    "the balancer's own 400": ("POST", CHATS, "not json", 400, False),
}


@pytest.mark.parametrize("key", [ALICE, BOB], ids=["alice", "bob (limited)"])
@pytest.mark.parametrize("kind", list(ANSWERS))
def test_no_answer_carries_the_backends_quota_headers(servers, kind, key):
    url = balancer(servers)
    method, path, body, status, relayed = ANSWERS[kind]
    content = (body if isinstance(body, str) else json.dumps(body)).encode() if body is not None else None
    headers = {"api-key": key, "content-type": "application/json"}
    answer = httpx.request(method, url + path, content=content, headers=headers, timeout=20)
    assert answer.status_code == status, answer.text[:200]
    assert ("x-lb-backend" in answer.headers) is relayed, dict(answer.headers)
    if kind == "streamed":
        assert answer.headers["content-type"].startswith("text/event-stream")
    quota = {name: value for name, value in answer.headers.items() if name.startswith("x-ratelimit-")}
    if key == ALICE:
        assert quota == {}, f"{kind}: {quota}"
    else:  # bob's own, never the backend's figures
        assert set(quota) <= {"x-ratelimit-remaining-tokens", "x-ratelimit-remaining-requests"}, quota
        assert quota and all(value.encode() not in BACKENDS.values() for value in quota.values()), quota

"""A simulated Azure OpenAI endpoint, for the demo, the end-to-end tests and the benchmarks.

It answers the routes the openai SDK calls (both URL shapes) with Azure OpenAI's bodies and
headers: chat completions, embeddings and the Responses API (`POST /openai/v1/responses`), each
streamed as SSE when asked (the Responses API with the full event sequence, `response.created` to
`response.completed`, that the SDK's `responses.stream` helper checks), and the objects a resource
keeps (lb.sim.objects; Assistants threads and their runs, polled or streamed: lb.sim.threads). It
checks the `api-key` it expects, records what it was sent, and can be told to misbehave: a
requests- and tokens-per-window quota (429 + Retry-After beyond it, with `x-ratelimit-remaining-*`
on every answer), forced 429s or 5xx, latency, or never answering. Like Azure OpenAI it charges a
call's tokens at admission, from the prompt's length (4 characters a token) plus `max_tokens` (or
`max_output_tokens`), and sends no limit or reset header on a 200. Usage (`prompt_tokens`, the
Responses API's `input_tokens`) uses the same 4-characters rule, and `cached_tokens` comes from a
model of Azure's prompt cache per backend and deployment (lb.sim.cache).
It is a bare ASGI app so it costs little CPU next to the proxy being measured.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from lb.sim.cache import PromptCache, prompt_text, tokens
from lb.sim.objects import SimObjects, Stream

# The prompt-cache hit of the call this task is answering, for the Responses API paths served by
# lb.sim.objects (their response body is built there, from `_response`).
_CACHED_TOKENS: ContextVar[int] = ContextVar("cached_tokens", default=0)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class Call:
    method: str
    path: str
    deployment: str | None
    headers: dict[str, str]
    body: bytes


@dataclass
class SimBackend:
    """One fake Azure OpenAI account. Mutate its fields from a test to change its behaviour."""

    name: str
    api_key: str | None = None
    latency: float = 0.0  # seconds before the answer (before the first chunk when streaming)
    chunks: int = 5  # SSE chunks of a streamed answer
    chunk_gap: float = 0.0  # seconds between chunks
    requests_per_window: int | None = None  # quota; None = unlimited
    window_seconds: float = 60.0
    tokens_per_request: int = (
        30  # charged when the call names no max_tokens / the remaining-tokens step without a tokens quota
    )
    tokens_per_window: int | None = None  # tokens quota; None = only requests are limited
    throttle_next: int = 0  # answer this many calls with 429 regardless of quota
    retry_after: float = 2.0  # seconds announced by forced 429s
    fail_status: int | None = None  # answer every call with this status
    hang: bool = False  # accept, then never answer
    break_stream_after: int | None = None  # drop the connection after this many chunks
    calls: list[Call] = field(default_factory=list)
    answered: dict[int, int] = field(default_factory=dict)  # status -> count
    disconnects: int = 0  # streams the caller abandoned before the end
    cache: PromptCache = field(default_factory=PromptCache)  # prompt prefixes it served (lb.sim.cache)
    prefill_per_1k: float = 0.0  # extra seconds before the answer per 1,000 prompt tokens not cached
    prompt_tokens: int = 0  # totals over the calls it answered 200 (chat and responses)
    cached_tokens: int = 0
    objects: SimObjects = field(default_factory=SimObjects)  # stored responses, files, batches: this backend's own
    _window_start: float = 0.0
    _window_used: int = 0
    _window_tokens: int = 0
    _window_throttled: bool = False

    # Quota ------------------------------------------------------------------------------------
    def _take_quota(self, now: float, tokens: int) -> tuple[bool, float, int, int]:
        """(allowed, seconds until the window resets, requests left, tokens left)."""
        if self.requests_per_window is None and self.tokens_per_window is None:
            return True, 0.0, 1000, 1000 * self.tokens_per_request
        if now - self._window_start >= self.window_seconds:
            self._window_start, self._window_used, self._window_tokens = now, 0, 0
            self._window_throttled = False
        reset = self._window_start + self.window_seconds - now
        requests_left = (self.requests_per_window or 10**9) - self._window_used
        tokens_left = self.tokens_per_window - self._window_tokens if self.tokens_per_window is not None else None
        if requests_left <= 0 or (tokens_left is not None and tokens_left < tokens):
            self._window_throttled = True
            return False, reset, 0, 0
        self._window_used += 1
        requests_left -= 1
        if tokens_left is None:
            return True, reset, requests_left, requests_left * self.tokens_per_request
        self._window_tokens += tokens
        return True, reset, requests_left, tokens_left - tokens

    def recovers_at(self, now: float, tokens: int | None = None) -> float:
        """Monotonic second this backend recovers: `now` if it is not throttled.

        Without `tokens`: the refill of a window in which it has answered 429. With `tokens`: when
        its quota would admit a call charged that many (a backend that refused a big call may still
        take a small one).
        """
        end = self._window_start + self.window_seconds
        if end <= now:
            return now
        if tokens is None:
            return end if self._window_throttled else now
        requests_ok = self.requests_per_window is None or self._window_used < self.requests_per_window
        tokens_ok = self.tokens_per_window is None or self.tokens_per_window - self._window_tokens >= tokens
        return now if requests_ok and tokens_ok else end

    def reset_quota(self) -> None:
        self._window_start, self._window_used, self._window_tokens, self._window_throttled = 0.0, 0, 0, False

    def _charge(self, payload: Any) -> int:
        """Tokens taken at admission: prompt characters / 4 plus max_tokens, as Azure OpenAI estimates."""
        if not isinstance(payload, dict):
            return self.tokens_per_request
        limit = payload.get("max_completion_tokens", payload.get("max_tokens", payload.get("max_output_tokens")))
        completion = limit if isinstance(limit, int) else self.tokens_per_request
        return math.ceil(_prompt_chars(payload) / 4) + completion

    def count(self, status: int = 200) -> int:
        return self.answered.get(status, 0)

    def create_response(self, request: dict[str, Any]) -> dict[str, Any]:
        """Store a response made on this backend alone, as a client calling it directly (not through a
        balancer) would: the balancer has no record of it. Not counted in `calls` or `answered`."""
        answer = self.objects.create_response(self, request)
        if isinstance(answer, Stream) or answer[0] != 200:
            raise ValueError(f"{self.name} did not create the response: {answer!r}")
        body: dict[str, Any] = answer[1]
        return body

    # ASGI -------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        body = await read_body(receive)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        payload = _json(body)
        deployment = _deployment(path, payload)
        self.calls.append(Call(scope["method"], path, deployment, headers, body))

        if self.hang:
            await asyncio.Event().wait()
        if self.api_key is not None and headers.get("api-key") != self.api_key:
            return await self._error(send, 401, "401", "Access denied due to invalid subscription key.")
        if self.fail_status is not None:
            return await self._error(send, self.fail_status, "InternalServerError", "Simulated failure.")
        now = time.monotonic()
        if self.throttle_next > 0:
            self.throttle_next -= 1
            return await self._throttled(send, self.retry_after)
        allowed, reset, left, tokens_left = self._take_quota(now, self._charge(payload))
        if not allowed:
            return await self._throttled(send, reset)
        usage = self._prompt_usage(path, deployment, payload, now)
        if self.latency or self.prefill_per_1k:
            await asyncio.sleep(self.latency + self.prefill_per_1k * (usage[0] - usage[1]) / 1000)
        rate = [
            (b"x-ratelimit-remaining-requests", str(left).encode()),
            (b"x-ratelimit-remaining-tokens", str(tokens_left).encode()),
            (b"apim-request-id", str(uuid.uuid4()).encode()),
        ]
        stream = isinstance(payload, dict) and payload.get("stream") is True
        if (segments := self.objects.handles(path)) is not None:
            query = scope.get("query_string", b"").decode("latin-1")
            return await self.objects.serve(
                self, scope["method"], segments, headers, body, payload, rate, receive, send, query
            )
        if "embeddings" in path:
            return await self._json(send, 200, _embedding(deployment, payload), rate)
        if path.rstrip("/").endswith("/responses"):
            response, pieces = _response(self.name, deployment, payload, self.chunks)
            if stream:
                return await self._stream(receive, send, rate, _response_events(response, pieces))
            return await self._json(send, 200, response, rate)
        refusal, note = self.objects.chat_files(payload)  # file inputs: only this backend's own files
        if refusal is not None:
            return await self._json(send, *refusal, rate)
        if stream:
            return await self._stream(receive, send, rate, self._chat_events(deployment, payload, *usage, note=note))
        completion = _completion(self.name, deployment, *usage)
        completion["choices"][0]["message"]["content"] += note
        return await self._json(send, 200, completion, rate)

    def _prompt_usage(self, path: str, deployment: str | None, payload: Any, now: float) -> tuple[int, int]:
        """(prompt tokens, of which cached) of an admitted chat or Responses call; the cache learns its prefixes."""
        if "embeddings" in path:
            return 0, 0
        text = prompt_text(payload)
        prompt, cached = tokens(text), self.cache.serve(deployment, text, now)
        self.prompt_tokens += prompt
        self.cached_tokens += cached
        _CACHED_TOKENS.set(cached)  # each ASGI call is its own task: stored-response paths read it there
        return prompt, cached

    async def _json(self, send: Send, status: int, body: Any, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})
        self.answered[status] = self.answered.get(status, 0) + 1

    async def _error(self, send: Send, status: int, code: str, message: str) -> None:
        await self._json(send, status, {"error": {"code": code, "message": message}})

    async def _throttled(self, send: Send, seconds: float) -> None:
        whole = max(1, math.ceil(seconds))
        message = f"Requests have exceeded the rate limit of your current pricing tier. Retry after {whole} seconds."
        headers = [
            (b"retry-after", str(whole).encode()),
            (b"retry-after-ms", str(max(1, int(seconds * 1000))).encode()),
            (b"x-ratelimit-remaining-requests", b"0"),
            (b"x-ratelimit-remaining-tokens", b"0"),
        ]
        await self._json(send, 429, {"error": {"code": "429", "message": message}}, headers)

    async def _stream(self, receive: Receive, send: Send, rate: list[tuple[bytes, bytes]], events: list[bytes]) -> None:
        gone = asyncio.ensure_future(receive())  # the next message can only be http.disconnect
        try:
            await self._send_events(send, rate, events, gone)
        finally:
            gone.cancel()

    async def _send_events(
        self, send: Send, rate: list[tuple[bytes, bytes]], events: list[bytes], gone: asyncio.Future
    ) -> None:
        """Send SSE events, `chunk_gap` apart; `break_stream_after` drops the connection after that many."""
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"), *rate]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i, event in enumerate(events):
            if self.break_stream_after is not None and i >= self.break_stream_after:
                raise ConnectionAbortedError("simulated mid-stream failure")  # uvicorn drops the connection
            if i and self.chunk_gap:
                await asyncio.wait([gone], timeout=self.chunk_gap)
            if gone.done():
                self.disconnects += 1
                return
            await send({"type": "http.response.body", "body": event, "more_body": i < len(events) - 1})
        self.answered[200] = self.answered.get(200, 0) + 1

    def _chat_events(
        self, deployment: str | None, payload: Any, prompt: int = 20, cached: int = 0, note: str = ""
    ) -> list[bytes]:
        """`chunks` content chunks, then the finish chunk and `[DONE]`, as Azure OpenAI streams a chat;
        with `stream_options.include_usage` every chunk says `"usage":null` and a last one, with no
        choices, carries the usage."""
        cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        options = payload.get("stream_options") if isinstance(payload, dict) else None
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        chunks = [_chunk(cid, deployment, f"{self.name if i == 0 else ''} tok{i}", None) for i in range(self.chunks)]
        if note:  # what it read of the chat's files, after the first words
            chunks.insert(1, _chunk(cid, deployment, note, None))
        chunks.append(_chunk(cid, deployment, None, "stop"))
        if include_usage:
            for chunk in chunks:
                chunk["usage"] = None
            chunks.append({**chunks[-1], "choices": [], "usage": _chat_usage(prompt, cached, self.chunks)})
        return [*(_sse(c) for c in chunks), b"data: [DONE]\n\n"]


def _json(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except (ValueError, RecursionError):  # nested deeper than Python builds: not JSON to us, not a crash
        return None


def _prompt_chars(payload: dict[str, Any]) -> int:
    """Characters of prompt text: chat `messages`, or the Responses API's `instructions` and `input`."""
    return len(prompt_text(payload))


def _deployment(path: str, payload: Any) -> str | None:
    parts = path.split("/")
    if len(parts) > 3 and parts[2].lower() == "deployments":  # matched in any case, as ASP.NET Core routes
        return parts[3]
    return payload.get("model") if isinstance(payload, dict) else None


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _chat_usage(prompt: int, cached: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _completion(backend: str, deployment: str | None, prompt: int = 20, cached: int = 0) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": deployment or "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": f"Hello from {backend}."},
            }
        ],
        "usage": _chat_usage(prompt, cached, 10),
    }


def _chunk(cid: str, deployment: str | None, content: str | None, finish: str | None) -> dict[str, Any]:
    delta = {"content": content} if content is not None else {}
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": deployment or "gpt-4o-mini",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _response(
    backend: str, deployment: str | None, payload: Any, words: int, cached: int | None = None
) -> tuple[dict[str, Any], list[str]]:
    """A completed Responses API object (one assistant message) and its text as `words` stream deltas.

    `cached`: the prompt-cache hit; by default the one of the call being answered (its task's)."""
    cached = _CACHED_TOKENS.get() if cached is None else cached
    request = payload if isinstance(payload, dict) else {}
    pieces = [f"{backend if i == 0 else ''} tok{i}" for i in range(max(1, words))]
    text = "".join(pieces)
    input_tokens = max(1, math.ceil(_prompt_chars(request) / 4))
    message = {
        "id": f"msg_{uuid.uuid4().hex}",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }
    response = {
        "id": f"resp_{uuid.uuid4().hex}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": deployment or "gpt-5.4-mini",
        "instructions": request.get("instructions"),
        "previous_response_id": request.get("previous_response_id"),
        "store": request.get("store", True),
        "output": [message],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "text": {"format": {"type": "text"}},
        "error": None,
        "incomplete_details": None,
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": len(pieces) * 2,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + len(pieces) * 2,
        },
    }
    return response, pieces


def _response_events(response: dict[str, Any], pieces: list[str]) -> list[bytes]:
    """The Responses API's SSE sequence for one text message, each event with its sequence_number."""
    message = response["output"][0]
    part = message["content"][0]
    started = {**response, "status": "in_progress", "output": [], "usage": None}
    item_ref = {"item_id": message["id"], "output_index": 0}
    part_ref = {**item_ref, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**message, "status": "in_progress", "content": []},
        },
        {"type": "response.content_part.added", **part_ref, "part": {**part, "text": ""}},
        *({"type": "response.output_text.delta", **part_ref, "delta": p, "logprobs": []} for p in pieces),
        {"type": "response.output_text.done", **part_ref, "text": part["text"], "logprobs": []},
        {"type": "response.content_part.done", **part_ref, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": message},
        {"type": "response.completed", "response": response},
    ]
    return [f"event: {e['type']}\n".encode() + _sse({**e, "sequence_number": n}) for n, e in enumerate(events)]


def _embedding(deployment: str | None, payload: Any = None) -> dict[str, Any]:
    """One vector per input, `dimensions` long when the call asks (as text-embedding-3 models allow)."""
    request = payload if isinstance(payload, dict) else {}
    inputs = request.get("input")
    count = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
    size = request.get("dimensions")
    vector = [0.1, 0.2, 0.3, 0.4]
    if isinstance(size, int) and 0 < size <= 3072:
        vector = [round(0.1 + (i % 10) / 100, 2) for i in range(size)]
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": vector} for i in range(count)],
        "model": deployment or "text-embedding-3-small",
        "usage": {"prompt_tokens": 4 * count, "total_tokens": 4 * count},
    }


# Running servers --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# How long `Servers.stop` lets requests still in flight finish before cancelling them: a simulated
# backend told never to answer would otherwise hold uvicorn's graceful shutdown forever.
STOP_GRACE_SECONDS = 1  # whole seconds: uvicorn types it as int


class Servers:
    """Runs ASGI apps under uvicorn on 127.0.0.1 in one background thread with its own loop.

    Tests and benchmarks drive the apps over real sockets from the main thread.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="lb-servers", daemon=True)
        self._thread.start()
        self._servers: list[Any] = []
        self._done: list[Any] = []
        self._tcp: list[asyncio.Server] = []

    def start(self, app: Any, port: int | None = None) -> str:
        """Serve `app`; return its base URL once it accepts connections."""
        import uvicorn

        port = port or free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="critical",
            access_log=False,
            timeout_graceful_shutdown=STOP_GRACE_SECONDS,
        )
        server = uvicorn.Server(config)
        self._done.append(asyncio.run_coroutine_threadsafe(server.serve(), self.loop))
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline:
                raise RuntimeError(f"server on port {port} did not start")
            time.sleep(0.01)
        self._servers.append(server)
        return f"http://127.0.0.1:{port}"

    def start_tcp(self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> str:
        """Serve raw TCP, each connection handled by `handler`, for answers no HTTP framework would
        produce; return its base URL. `stop` closes it, and a connection once its handler ends."""

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer)
            except asyncio.CancelledError:
                pass  # `stop` ended it: the connection's end, not an error for asyncio to log
            finally:  # asyncio closes nothing a handler leaves open, not even when cancelled
                writer.close()

        async def start() -> int:
            server = await asyncio.start_server(serve, "127.0.0.1", 0)
            self._tcp.append(server)
            return int(server.sockets[0].getsockname()[1])

        return f"http://127.0.0.1:{self.run(start())}"

    def run(self, coro: Awaitable[Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    async def _close_leftovers(self) -> None:
        """Close what the servers' shutdown left open (connections of answers cut at the grace, raw
        servers and their connections' tasks), so the garbage collector finds no socket to warn about."""
        for tcp in self._tcp:
            tcp.close()
        for server in self._servers:
            for connection in list(server.server_state.connections):
                connection.transport.close()
        for _ in range(3):  # a connection accepted meanwhile (a raw server's) starts a task of its own
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(0)  # closed transports release their sockets on the next turn

    def stop(self) -> None:
        for server in self._servers:
            server.should_exit = True
        for done in self._done:
            try:
                done.result(10)
            except Exception:  # a server that failed to stop cleanly must not fail the caller
                pass
        try:
            self.run(self._close_leftovers(), timeout=5)
        except Exception:  # as above: stopping is best effort
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


async def read_body(receive: Receive) -> bytes:
    """A request's whole body, from the ASGI messages it came in (simulated backends are small)."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def replayed(body: bytes) -> Receive:
    """A `receive` that gives `body` again (once whole, then a disconnect): a test's backend in front of
    the simulator reads the call, then hands it on as it came."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge an ASGI lifespan: an app with nothing to start or stop still answers uvicorn."""
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return

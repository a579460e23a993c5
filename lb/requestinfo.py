"""What the proxy needs to know about an incoming call before it picks a backend.

Azure OpenAI has two URL shapes, and both route by deployment:
- `/openai/deployments/{deployment}/...?api-version=...` (AzureOpenAI client): the path says it;
- `/openai/v1/...` (OpenAI client with base_url=<proxy>/openai/v1): the JSON body's `"model"` says it.
The body is read whole (bounded) because a failover must be able to send it again.

The path is relayed as the client encoded it, appended to the backend's base URL, so the upstream
host is always the configured one. It is refused unless it is a plain `/openai/...` path: a dot or
empty segment, a backslash, a control character or a scheme could make the backend (or a
normaliser between us and it) resolve another path than the one we routed and authorised on, and
percent-encoding is peeled off layer by layer so `%2e%2e`, `%252e%252e` or `%2f%2f` hide nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import unquote

from starlette.requests import Request

from lb.errors import BadRequest, HeadersTooLarge, PayloadTooLarge, RouteNotFound

PREFIX = "/openai/"
# Kestrel's limits (what the Functions host enforces in front of us); uvicorn + httptools has none of its own.
MAX_HEADER_COUNT = 100
MAX_HEADER_BYTES = 32 * 1024
MAX_DECODE_ROUNDS = 4  # a path still changing after this many percent-decodings is hiding something
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\#]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class RequestInfo:
    raw_path: str  # path + query, exactly as the client encoded them
    deployment: str | None
    body: bytes


async def read_request(request: Request, max_body_bytes: int) -> RequestInfo:
    raw_path = _checked_path(request)
    body = await _read_body(request, max_body_bytes)
    return RequestInfo(raw_path=raw_path, deployment=_deployment(raw_path, body, request), body=body)


def check_headers(request: Request) -> None:
    """Refuse header sets no Azure OpenAI client sends, before spending anything on them."""
    raw = request.scope.get("headers", [])
    if len(raw) > MAX_HEADER_COUNT:
        raise HeadersTooLarge(f"The request has more than {MAX_HEADER_COUNT} headers.")
    if sum(len(k) + len(v) + 4 for k, v in raw) > MAX_HEADER_BYTES:
        raise HeadersTooLarge(f"The request headers are larger than {MAX_HEADER_BYTES} bytes.")


def check_path(path: str) -> None:
    """Raise unless `path` (no query, as sent) is an `/openai/...` path that is safe to relay."""
    if not path.startswith(PREFIX):
        raise RouteNotFound("Only /openai/deployments/{deployment}/... and /openai/v1/... paths are proxied.")
    if "://" in path:
        raise BadRequest("The request path must not be an absolute URL.")
    current = path
    for _ in range(MAX_DECODE_ROUNDS):
        if _BAD_CHARS.search(current):
            raise BadRequest("The request path contains a control character, a backslash or '#'.")
        if any(segment in ("", ".", "..") for segment in current.split("/")[1:]):
            raise BadRequest("The request path contains an empty, '.' or '..' segment.")
        try:
            decoded = unquote(current, errors="strict") if "%" in current else current
        except UnicodeDecodeError:
            raise BadRequest("The request path is not valid percent-encoded UTF-8.") from None
        if decoded == current:
            return
        current = decoded
    raise BadRequest("The request path is percent-encoded too many times.")


def _checked_path(request: Request) -> str:
    raw = request.scope.get("raw_path") or request.scope["path"].encode()
    path = raw.decode("latin-1").split("?", 1)[0]
    check_path(path)
    query = request.scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")  # refused before reading any of it
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def _deployment(raw_path: str, body: bytes, request: Request) -> str | None:
    segments = raw_path.split("?", 1)[0].split("/")  # ["", "openai", ...]
    if len(segments) > 3 and segments[2] == "deployments":
        return unquote(segments[3]) or None
    if len(segments) > 2 and segments[2] == "v1" and body:
        if "json" not in request.headers.get("content-type", "application/json"):
            return None  # multipart uploads (audio, files): any backend may take them
        try:
            payload = json.loads(body)
        except json.JSONDecodeError as exc:
            raise BadRequest(
                f"The request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})."
            ) from None
        except UnicodeDecodeError:
            raise BadRequest("The request body is not valid JSON (not UTF-8 text).") from None
        model = payload.get("model") if isinstance(payload, dict) else None
        if isinstance(model, str) and _CONTROL.search(model):
            raise BadRequest("The 'model' in the request body contains a control character.")
        return model if isinstance(model, str) and model else None
    return None

"""What the proxy needs to know about an incoming call before it picks a backend.

Azure OpenAI has two URL shapes, and both route by deployment:
- `/openai/deployments/{deployment}/...?api-version=...` (AzureOpenAI client): the path says it;
- `/openai/v1/...` (OpenAI client with base_url=<proxy>/openai/v1): the JSON body's `"model"` says it.
The body is read whole (bounded) because a failover must be able to send it again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import unquote

from starlette.requests import Request

from lb.errors import BadRequest, NotFound, PayloadTooLarge

# Control characters, backslashes and dot / empty segments could make a backend (or a path
# normaliser between us and it) resolve a different path than the one we routed on.
_BAD_PATH = re.compile(r"[\x00-\x1f\x7f\\]|//|(^|/)\.{1,2}(/|$)")


@dataclass(frozen=True)
class RequestInfo:
    raw_path: str  # path + query, exactly as the client encoded them
    deployment: str | None
    body: bytes


async def read_request(request: Request, max_body_bytes: int) -> RequestInfo:
    raw_path = _checked_path(request)
    body = await _read_body(request, max_body_bytes)
    return RequestInfo(raw_path=raw_path, deployment=_deployment(raw_path, body, request), body=body)


def _checked_path(request: Request) -> str:
    raw = request.scope.get("raw_path") or request.scope["path"].encode()
    path = raw.decode("latin-1").split("?", 1)[0]
    if not path.startswith("/openai/"):
        raise NotFound("Only /openai/... paths are proxied.")
    if _BAD_PATH.search(path) or _BAD_PATH.search(unquote(path)):
        raise BadRequest("The request path is not a valid Azure OpenAI path.")
    query = request.scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
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
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("The request body is not valid JSON.") from None
        model = payload.get("model") if isinstance(payload, dict) else None
        return model if isinstance(model, str) and model else None
    return None

"""What the proxy needs to know about an incoming call before it picks a backend.

Azure OpenAI has two URL shapes, and both route by deployment:
- `/openai/deployments/{deployment}/...?api-version=...` (AzureOpenAI client): the path says it;
- `/openai/v1/...` (OpenAI client with base_url=<proxy>/openai/v1): the JSON body's `"model"` says it.
The Responses API keeps a third: `/openai/responses?api-version=...`, what the AzureOpenAI client
(and LangChain's, LlamaIndex's, Semantic Kernel's and the Agents SDK's Azure classes on top of it)
sends for `responses.create`. Its deployment is the body's `"model"` too, so it is read as on v1.
The body is read whole (bounded) because a failover must be able to send it again.

The path is read once (`lb.apipath.split_path`, held as `RequestInfo.path`): its shape, the
deployment it names and its route (`operation`, lower-cased and decoded as a loose router matches
it), so the deployment, metering and isolation all read `/openai/Deployments/ch%61t/Chat/Completions`
as the chat call to `chat` it may be to the backend.

The path is relayed as the client encoded it, appended to the backend's base URL, so the upstream
host is always the configured one. It is refused unless it is a plain `/openai/...` path: a dot or
empty segment, a backslash, a control character or a scheme could make the backend (or a
normaliser between us and it) resolve another path than the one we routed and authorised on, and
it is checked decoded too, so `%2e%2e` hides nothing. A path that reads two ways is refused as well:
an encoded `/` (`%2F`), which one router decodes into a separator where another keeps it in its
segment, and a path encoded more than once (`%252e`), which routers decode a different number of
times. What is left decodes once, to the one path `lb.apipath` reads.
Unicode line breaks (U+0085, U+2028, U+2029) count as control characters: a log viewer splits lines
on them, so a deployment name carrying one could forge a log line. A credential in the query
(`api-key`, `subscription-key`, `Authorization`) is the client's: never forwarded (a backend or a
gateway in front of it reads each, and its refusal would be taken as the balancer's own key refused).

A body the balancer cannot read is not sent: a request `Content-Encoding` other than `identity` is
refused (415). The deployment, the token estimate and the object scan all read the body's bytes, and
a compressed body would hide from each what the backend, decoding it, acts on.

Nothing a client sends may hold the event loop: a body is parsed as JSON only up to
`PARSE_LIMIT_BYTES`; past it, `lb.bodyscan` finds `"model"` in slices that yield to the loop. The
same read finds what the policies need in the body's bytes (`lb.bodyscan.Marks`: the stream flag,
the usage flag, the max-tokens fields, the number of choices) and where the body names its
deployment, once per request. The number of choices (`n`, and completions' `best_of`: each choice
may run to the stated maximum, and every one is billed) is taken from the parsed body when the
body was parsed to route it, else from its bytes in the same pass as the max-tokens fields.
JSON that Python refuses to build (nesting deeper than the recursion limit, an integer of more
than 4,300 digits) is a 400, like any other invalid JSON.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field, replace
from urllib.parse import unquote, unquote_plus

from starlette.requests import Request

from lb import bodyscan
from lb.apipath import DEPLOYMENTS, ApiPath, split_path
from lb.errors import BadRequest, HeadersTooLarge, PayloadTooLarge, RouteNotFound, UnsupportedMediaType

PREFIX = "/openai/"
# Kestrel's limits (what the Functions host enforces in front of us); uvicorn + httptools has none of its own.
MAX_HEADER_COUNT = 100
MAX_HEADER_BYTES = 32 * 1024
PARSE_LIMIT_BYTES = 64 * 1024  # bodies up to this are parsed whole on the loop (~1 ms at worst); larger are scanned
_LINE_BREAKS = r"\x80-\x9f\u2028\u2029"  # C1 controls (U+0085 NEL among them), Unicode line/paragraph separators
_BAD_CHARS = re.compile(rf"[\x00-\x1f\x7f{_LINE_BREAKS}\\#]")
_CONTROL = re.compile(rf"[\x00-\x1f\x7f{_LINE_BREAKS}]")
ARRIVED = "lb.arrived"  # scope key: time.monotonic() when `lb serve` read the request's first byte
NOT_PARSED = object()  # RequestInfo.payload when the body was not parsed (too large, not JSON, not needed)
_UNSPLIT = ApiPath("", None, "", ())  # RequestInfo.path until __post_init__ splits raw_path
# Query parameters that carry a credential somewhere in front of a model: Azure OpenAI's `api-key`,
# the `Authorization` its realtime WebSocket clients put in the URL, API Management's and Azure AI
# services' `subscription-key` (the query twin of the Ocp-Apim-Subscription-Key header).
QUERY_CREDENTIALS = ("api-key", "subscription-key", "authorization")
# Routes whose body says how many completions the model generates (`lb.bodyscan.Marks.choices`):
# chat's and images' `n`, and completions' `n` and `best_of`.
CHOICE_KEYS: dict[str, tuple[bytes, ...]] = {
    "chat/completions": (bodyscan.N,),
    "extensions/chat/completions": (bodyscan.N,),
    "completions": (bodyscan.N, bodyscan.BEST_OF),
    "images/generations": (bodyscan.N,),
    "images/edits": (bodyscan.N,),
    "images/variations": (bodyscan.N,),
}


@dataclass(frozen=True)
class RequestInfo:
    """One call as the policies see it, read from the path and body once (`read_request`): each policy
    takes its field here, and none searches the body again."""

    raw_path: str  # path + query, exactly as the client encoded them (minus any api-key parameter)
    deployment: str | None
    body: bytes
    stream: bool = False  # the body asks for a streamed answer ("stream": true)
    # The body as parsed while routing it (bodies up to PARSE_LIMIT_BYTES on /openai/v1/ and
    # /openai/responses), for whoever needs it next: parsed once per request, never again.
    payload: object = field(default=NOT_PARSED, compare=False, repr=False)
    # Where the body's top-level "model" string is (quotes included) on calls that name their
    # deployment in the body: what a backend that calls the deployment by another name replaces
    # (`lb.routing.deployments`). None: not looked for (the deployment is in the path, or the body was
    # rewritten by re-serialising it).
    model_spans: tuple[tuple[int, int], ...] | None = field(default=None, compare=False, repr=False)
    # `"stream_options"` / `"include_usage"` in the body as the client sent it (metering's usage flag),
    # the largest max_*tokens it states and its number of choices (quotas' reservation, the headroom
    # policy's demand).
    marks: bodyscan.Marks = field(default=bodyscan.NO_MARKS, compare=False, repr=False)
    # The path's shape, deployment and route (`lb.apipath`): split once per request, in `described`.
    path: ApiPath = field(default=_UNSPLIT, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.path is _UNSPLIT:  # built from a path alone (tests, tools): split it here
            object.__setattr__(self, "path", split_path(self.raw_path))

    @property
    def operation(self) -> str:
        """What the call does: its route, decoded and lower-cased (`ApiPath.operation`)."""
        return self.path.operation

    @property
    def tokens(self) -> int:
        """What Azure OpenAI will charge against the tokens quota at admission, roughly: the prompt
        (about 4 characters per token; the body's length stands in for it, JSON syntax and tool
        definitions making it an overestimate that errs on the safe side) plus the stated maximum
        output, once per choice (`n`, `best_of`: each may run to the maximum). Per-client quotas
        (lb.metering.quota) and the headroom policy charge this same figure."""
        assert self.marks.max_tokens is not None, "read with tokens=False"
        return len(self.body) // 4 + self.marks.max_tokens * self.marks.choices


def arrived(request: Request) -> float:
    """When the request began, on the monotonic clock: its first byte as `lb serve` read it, else
    now (the Functions host passes no such time). A burst of requests waits in the event loop before
    each handler runs; the client's wait started at its first byte, so its deadline does too."""
    return request.scope.get(ARRIVED) or time.monotonic()


async def read_request(request: Request, max_body_bytes: int, *, tokens: bool = True) -> RequestInfo:
    # A body that stalls is the server's to cut (`lb.serving`; Kestrel's minimum data rate behind
    # Functions): a timer here would cost every request, for the rare slow one.
    raw_path = _checked_path(request)
    check_encoding(request)
    body = await _read_body(request, max_body_bytes)
    return await described(raw_path, body, request.headers.get("content-type", "application/json"), tokens=tokens)


async def described(
    raw_path: str, body: bytes, content_type: str = "application/json", *, tokens: bool = True
) -> RequestInfo:
    """The one read of a call's (checked) path and body: everything the policies take from them.
    `tokens`: whether anything will read `RequestInfo.tokens` (a limited client, the headroom policy);
    the usage flag is looked for only in a stream, where metering reads it."""
    path = split_path(raw_path)
    deployment, stream, payload, spans = await _deployment(path, body, content_type)
    # The usage flag is read in streams only; a body in one window is searched for it in the same go.
    usage = stream is True or (stream is None and len(body) <= bodyscan.WINDOW_BYTES)
    # a form's `n` is a field, not JSON: not read (docs/metering.md), so its bytes are not searched
    form = "multipart/" in content_type.lower()
    keys = CHOICE_KEYS.get(path.operation, ()) if tokens and body and not form else ()
    if not body:
        marks = bodyscan.NO_MARKS
    elif stream is False and not tokens:  # parsed, no stream: nothing will read a mark
        marks = bodyscan.Marks(max_tokens=None)
    else:
        marks = await bodyscan.marks(
            body, usage=usage, tokens=tokens, choices=() if isinstance(payload, dict) else keys
        )
    if keys and isinstance(payload, dict):  # the parsed body says it exactly, however its keys are spelled
        count = bodyscan.choices_in(payload, keys)
        marks = replace(marks, choices=count) if count != 1 else marks
    if stream is None and marks.stream and not usage:  # a large stream only the bytes say is one
        marks = replace(marks, include_usage=await bodyscan.include_usage(body))
    return RequestInfo(
        raw_path=raw_path,
        deployment=deployment,
        body=body,
        stream=marks.stream if stream is None else stream,
        payload=payload,
        model_spans=spans,
        marks=marks,
        path=path,
    )


def check_headers(request: Request) -> None:
    """Refuse header sets no Azure OpenAI client sends, before spending anything on them."""
    raw = request.scope.get("headers", [])
    if len(raw) > MAX_HEADER_COUNT:
        raise HeadersTooLarge(f"The request has more than {MAX_HEADER_COUNT} headers.")
    if sum(len(k) + len(v) + 4 for k, v in raw) > MAX_HEADER_BYTES:
        raise HeadersTooLarge(f"The request headers are larger than {MAX_HEADER_BYTES} bytes.")
    if len(request.headers.getlist("content-type")) > 1:  # servers differ on which one counts: first, last, joined
        raise BadRequest("The request has more than one Content-Type header.")


def check_encoding(request: Request) -> None:
    """Refuse a body sent compressed (`Content-Encoding` other than `identity`), before reading it."""
    encoding = ",".join(request.headers.getlist("content-encoding"))  # every header: a server may read any of them
    if any(c.strip().lower() not in ("identity", "") for c in encoding.split(",")):
        raise UnsupportedMediaType(
            "The request's Content-Encoding is not supported: send the body uncompressed (identity)."
        )


def check_path(path: str) -> None:
    """Raise unless `path` (no query, as sent) is an `/openai/...` path that is safe to relay and that
    every router reads one way: decoded once (as `lb.apipath` reads it), it decodes no further."""
    if not path.startswith(PREFIX):
        raise RouteNotFound("Only /openai/deployments/{deployment}/... and /openai/v1/... paths are proxied.")
    if "://" in path:
        raise BadRequest("The request path must not be an absolute URL.")
    layers: tuple[str, ...] = (path,)
    if "%" in path:
        if "%2f" in path.lower():
            raise BadRequest(
                "The request path contains an encoded '/' (%2F): routers differ on decoding it, so it could"
                " reach the backend as another path than the one the load balancer read."
            )
        try:
            decoded = unquote(path, errors="strict")
        except UnicodeDecodeError:
            raise BadRequest("The request path is not valid percent-encoded UTF-8.") from None
        if "%" in decoded and unquote(decoded) != decoded:
            raise BadRequest(
                "The request path is percent-encoded more than once: routers differ on how many times"
                " they decode it, so it could reach the backend as another path."
            )
        layers = (path, decoded)
    for layer in layers:
        if _BAD_CHARS.search(layer):
            raise BadRequest("The request path contains a control character, a backslash or '#'.")
        if any(segment in ("", ".", "..") for segment in layer.split("/")[1:]):
            raise BadRequest("The request path contains an empty, '.' or '..' segment.")


def _checked_path(request: Request) -> str:
    raw = request.scope.get("raw_path") or request.scope["path"].encode()
    path = raw.decode("latin-1").split("?", 1)[0]
    check_path(path)
    query = request.scope.get("query_string", b"").decode("latin-1")
    lowered = query.lower()  # "key": api-key, subscription-key (QUERY_CREDENTIALS), one search on every call
    if "%" in query or "key" in lowered or "authorization" in lowered:  # the client's: never forwarded
        query = _without_credentials(query)
    return f"{path}?{query}" if query else path


def _without_credentials(query: str) -> str:
    """The query without its credential parameters (`QUERY_CREDENTIALS`), however their name is
    encoded or cased (`api%2Dkey`, `%61pi-key`, `Subscription-Key`): the backend decodes the name
    before it matches it, so we do too."""
    kept = [p for p in query.split("&") if unquote_plus(p.split("=", 1)[0]).lower() not in QUERY_CREDENTIALS]
    return "&".join(p for p in kept if p)


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


async def _deployment(
    path: ApiPath, body: bytes, content_type: str
) -> tuple[str | None, bool | None, object, tuple[tuple[int, int], ...] | None]:
    """The deployment the call names, whether it asks for a stream (None: as the body's bytes say,
    `bodyscan.Marks.stream`), the body if it was parsed, and where the body names the deployment."""
    if path.prefix == DEPLOYMENTS:
        return path.deployment, None, NOT_PARSED, None
    if path.model_in_body and body:
        if "json" not in content_type:
            return None, False, NOT_PARSED, None  # multipart uploads (audio, files): any backend may take them
        if len(body) > PARSE_LIMIT_BYTES:
            model = _checked_model(await bodyscan.top_level_string(body, b"model"))
            return model, None, NOT_PARSED, await _spans(body, model)
        payload = parse_json(body)
        if not isinstance(payload, dict):
            return None, False, payload, None
        model = _checked_model(payload.get("model"))
        return model, payload.get("stream") is True, payload, await _spans(body, model)
    return None, None, NOT_PARSED, None


async def _spans(body: bytes, model: str | None) -> tuple[tuple[int, int], ...] | None:
    return tuple(await bodyscan.top_level_spans(body, b"model")) if model is not None else None


def parse_json(body: bytes) -> object:
    """The body parsed, or a 400 in Azure OpenAI's shape: anything Python refuses to build included."""
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"The request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})."
        ) from None
    except UnicodeDecodeError:
        raise BadRequest("The request body is not valid JSON (not UTF-8 text).") from None
    except RecursionError:
        raise BadRequest("The request body is not valid JSON (nested too deeply).") from None
    except ValueError:  # e.g. an integer of more than 4,300 digits
        raise BadRequest("The request body is not valid JSON (a value is out of range).") from None


def _checked_model(model: object) -> str | None:
    if isinstance(model, str) and _CONTROL.search(model):
        raise BadRequest("The 'model' in the request body contains a control character.")
    return model if isinstance(model, str) and model else None

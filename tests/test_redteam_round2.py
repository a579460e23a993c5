"""Red team, round 2: a hostile second client (bob) against the first one's (alice's) objects, usage and
quota, and against the pool, through what round 1's fixes left open.

Each test whose docstring describes a hole failed at 41be29d, where it was written as a strict xfail;
the fixes that followed made every one a plain pass. Its docstring says why it was a hole (in terms
of the code then) and what the right answer is (status and Azure error code). "Refused" means no backend was called: the
simulator does not know every route, so its answer alone proves nothing. The unmarked tests are
forms bob tried that hold, kept so they keep holding. docs/security.md ("Isolation between clients")
is the rule every test holds the balancer to.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from lb.app import create_app
from lb.config import load_settings
from lb.metering import Metering
from lb.metering.quota import ClientQuotaExceeded, parse_limits
from lb.objects.records import ObjectRecord
from lb.proxy import Proxy
from lb.requestinfo import described
from lb.sim import SimBackend, read_body, replayed
from lb.telemetry import Telemetry

KEYS = "alice:key-a,bob:key-b"
ENV = {"LB_CLIENT_KEYS": KEYS}
BOUNDARY = "round2boundary"
FORM = f"multipart/form-data; boundary={BOUNDARY}"
JSON = "application/json"
DEPLOYMENT_CHAT = "/openai/deployments/chat/chat/completions?api-version=2024-10-21"


@pytest.fixture
def pool(make_pool):
    """One backend: alice's objects and bob's calls meet there, so nothing is hidden by a wrong holder."""
    return make_pool(1, env=ENV)


def bob(pool) -> httpx.Client:
    return httpx.Client(base_url=pool.url, headers={"api-key": "key-b"}, timeout=20)


def alices_file(pool, contents: bytes = b"alice's secret") -> str:
    return pool.v1("key-a").files.create(file=("a.txt", io.BytesIO(contents)), purpose="assistants").id


def form(*parts: tuple[str, bytes], boundary: str = BOUNDARY) -> bytes:
    """A multipart body of (Content-Disposition parameters, contents) parts."""
    body = b"".join(
        f"--{boundary}\r\nContent-Disposition: form-data; {head}\r\n\r\n".encode() + data + b"\r\n"
        for head, data in parts
    )
    return body + f"--{boundary}--\r\n".encode()


def plant(proxy: Proxy, object_id: str, kind: str, owner: str, backend: str = "1") -> None:
    """`Pool.plant` for a proxy built here (custom backends)."""
    record = ObjectRecord(backend, f"key:{owner}", kind, time.time() + 3600)
    asyncio.run(proxy.objects.records.create(object_id, record))


def custom_pool(servers, backend: Any, **env: str) -> tuple[str, Proxy]:
    """A proxy with one backend of the test's own (an ASGI app), alice and bob as clients."""
    settings = {
        "LB_AFFINITY": "off",
        "LB_CLIENT_KEYS": KEYS,
        "BACKEND_1_URL": servers.start(backend),
        "BACKEND_1_APIKEY": "key-1",
        **env,
    }
    app = create_app(load_settings(settings))
    return servers.start(app), app.state.proxy


class Gateway:
    """A backend behind a gateway (API Management, Application Gateway's WAF): answers `status` with
    `body` when the request body holds `trigger`, else passes the call to a simulated Azure OpenAI.
    Keeps every call's headers."""

    def __init__(self, status: int, body: bytes, content_type: bytes, trigger: bytes | None = None) -> None:
        self.sim = SimBackend("s", api_key="key-1")
        self.status, self.body, self.content_type, self.trigger = status, body, content_type, trigger
        self.headers: list[list[tuple[bytes, bytes]]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.sim(scope, receive, send)
        self.headers.append(list(scope["headers"]))
        body = await read_body(receive)
        if self.trigger is None or self.trigger in body:
            head = [
                (b"content-type", self.content_type),
                (b"x-ratelimit-remaining-tokens", b"4242"),  # every client's spend on this backend
                (b"x-ratelimit-remaining-requests", b"77"),
            ]
            await send({"type": "http.response.start", "status": self.status, "headers": head})
            await send({"type": "http.response.body", "body": self.body})
            return
        await self.sim(scope, replayed(body), send)


# 1. A stateless route's body sent as multipart/form-data is never read ---------------------------
@pytest.mark.parametrize("path", [DEPLOYMENT_CHAT, "/openai/v1/chat/completions"])
@pytest.mark.parametrize("content_type", [FORM, "multipart/form-data"])
def test_a_json_chat_labelled_multipart_is_read_or_refused(pool, path, content_type):
    """`_stateless_markers` returns None for any multipart Content-Type, so a chat's JSON body naming
    alice's file is sent unread when bob labels it `multipart/form-data`. A backend that reads the
    body as JSON whatever its label (the simulator does; so do servers that parse `request.json()`)
    reads alice's file into bob's answer: here bob gets "alice's secret" back. Chat completions,
    completions, embeddings, moderations, images/generations and audio/speech take JSON only.
    Right answer: 415 `UnsupportedMediaType` (the rule object routes already follow), or the body read
    as JSON and 404 for alice's file; no backend call either way."""
    secret = alices_file(pool)
    chat = {"model": "chat", "messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": secret}}]}]}
    before = pool.backend_calls()
    with bob(pool) as http:
        sent = http.post(path, content=json.dumps(chat).encode(), headers={"content-type": content_type})
    assert "alice's secret" not in sent.text
    assert pool.backend_calls() == before, f"bob's chat naming alice's file was sent ({sent.status_code})"
    assert sent.status_code in (400, 404, 415)


def test_an_image_edit_form_naming_alices_file_is_refused(pool):
    """The multipart twin of round 1's JSON image edit (tests/test_redteam_objects.py): the form
    fields `images[0][file_id]` and `mask[file_id]` are the JSON body's `images[].file_id` and
    `mask.file_id` in the bracket notation the openai SDK uses for nested form fields (and that the
    balancer itself reads on `/containers/{id}/files`). On a stateless route a form is never read.
    Right answer: the form read by `lb.objects.forms` like a container file's: 404 (alice's file is
    not bob's), no backend call."""
    secret = alices_file(pool)
    body = form(
        ('name="model"', b"chat"),
        ('name="prompt"', b"the same picture"),
        ('name="images[0][file_id]"', secret.encode()),
        ('name="mask[file_id]"', secret.encode()),
    )
    before = pool.backend_calls()
    with bob(pool) as http:
        sent = http.post("/openai/v1/images/edits", content=body, headers={"content-type": FORM})
    assert pool.backend_calls() == before, f"bob's image edit form naming alice's file was sent ({sent.status_code})"
    assert sent.status_code in (400, 403, 404)


# 2. Multipart forms two parsers read differently ------------------------------------------------
CONTAINER = "cntr_" + "b" * 32  # bob's container, planted on the one backend


def send_container_form(pool, body: bytes, content_type: str = FORM) -> tuple[httpx.Response, int]:
    pool.plant(CONTAINER, "container", "bob")
    before = pool.backend_calls()
    with bob(pool) as http:
        sent = http.post(
            f"/openai/v1/containers/{CONTAINER}/files", content=body, headers={"content-type": content_type}
        )
    return sent, pool.backend_calls() - before


@pytest.mark.parametrize("way", ["name*0", "name*0*", "boundary*"])
def test_a_form_named_by_rfc_2231_parameters_is_refused(pool, way):
    """`lb.objects.forms` refuses `name*=` but not its continuations: `name="x"; name*0="file_id"`
    is read as a field `x` (not read), while Go's mime.ParseMediaType (behind
    multipart.Part.FormName) assembles `name*0`, `name*1`... and lets them replace `name`: the backend
    reads `file_id`. Likewise `boundary*=utf-8''B` beside `boundary=A` in the Content-Type: the
    balancer splits the body on A (one file part, never read), Go on B, where the part is `file_id`.
    Right answer: 400 `invalid_multipart` (any `*` parameter of Content-Disposition but .NET's
    `filename*=utf-8''...`, any `boundary*`), no backend call."""
    secret = "file-" + "a" * 32  # alice's, as far as bob knows: never sent is the point
    content_type = FORM
    if way == "boundary*":
        inner = form(('name="file_id"', secret.encode()), boundary="innerBBBBBB")
        body = form(('name="file"; filename="x.txt"', inner.rstrip(b"\r\n")), boundary="outerAAAAAA")
        content_type = "multipart/form-data; boundary=outerAAAAAA; boundary*=utf-8''innerBBBBBB"
    elif way == "name*0":
        body = form(('name="note"; name*0="file_id"', secret.encode()))
    else:
        body = form(("name=\"note\"; name*0*=utf-8''file_id", secret.encode()))
    sent, calls = send_container_form(pool, body, content_type)
    assert calls == 0, f"a form a Go backend reads as file_id={secret} was sent ({sent.status_code})"
    assert sent.status_code == 400 and sent.json()["error"]["code"] == "invalid_multipart"


@pytest.mark.parametrize(
    "value",
    [
        b'[{"type": "file_search", "vector_store_ids": ["vs_' + b"a" * 32 + b'"],}]',  # trailing comma
        b'[{"type": "file_search", /* c */ "vector_store_ids": ["vs_' + b"a" * 32 + b'"]}]',  # a comment
        b'\xef\xbb\xbf[{"type": "file_search", "vector_store_ids": ["vs_' + b"a" * 32 + b'"]}]',  # a UTF-8 BOM
    ],
    ids=["trailing-comma", "comment", "bom"],
)
def test_a_form_fields_json_that_python_refuses_is_refused(pool, value):
    """`forms._json_value` reads a field of another name whose value is JSON naming objects ("a backend
    may parse a field's JSON"), but returns None, "a string", when `json.loads` fails: a trailing
    comma or a comment (Json.NET accepts both by default), or a UTF-8 BOM before the `[` (Python's
    `json.loads(bytes)` and .NET's JsonDocument skip it; `_JSON_START` does not match it). The one
    form field the balancer decided to read is then sent unread. Right answer: a field value that
    starts like JSON (BOM and whitespace aside) and holds a marker but does not parse is a 400
    `invalid_multipart`, no backend call."""
    sent, calls = send_container_form(pool, form(('name="tools"', value)))
    assert calls == 0, f"a tools field naming alice's vector store was sent ({sent.status_code})"
    assert sent.status_code in (400, 404)


@pytest.mark.parametrize("name", ["", ".", "[]"])
def test_a_form_field_without_a_name_is_a_400_not_a_500(pool, name):
    """`forms.fields` splits the name into segments and takes `segments[-1]`; a name with none (`""`,
    `"."`, `"[]"`) whose value is JSON naming an object raises IndexError: the catch-all answers 500
    "The load balancer failed to handle the request." and logs a stack trace per request (bob can
    fill the log, and the 500s count as the balancer's failures in telemetry). No detail leaks to the
    client. Right answer: 400 `invalid_multipart` ("a field name must name a field")."""
    sent, calls = send_container_form(pool, form((f'name="{name}"', b'{"file_id": "file-' + b"a" * 32 + b'"}')))
    assert calls == 0
    assert sent.status_code == 400 and sent.json()["error"]["code"] == "invalid_multipart"


# 3. Headers read once, relayed as many --------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-type", b"application/json"), (b"content-encoding", b"identity"), (b"content-encoding", b"gzip")],
        [(b"content-type", b"application/json"), (b"content-encoding", b""), (b"content-encoding", b"gzip")],
        [(b"content-type", b"application/json"), (b"content-type", b"text/plain")],
    ],
    ids=["identity-then-gzip", "empty-then-gzip", "two-content-types"],
)
def test_a_repeated_content_encoding_or_content_type_is_refused(pool, headers):
    """`requestinfo.check_encoding` reads `request.headers.get("content-encoding")`: the first header.
    `Content-Encoding: identity` then `Content-Encoding: gzip` passes the 415 and both are relayed: the
    simulator sees `gzip` (its header dict keeps the last), a WSGI server joins them to
    "identity,gzip". On embeddings (whose body is never searched) the gzipped body goes out as is, and
    its reservation is the compressed size (a 60 KB prompt of repeated words is 144 bytes: the
    quota's admission sees almost nothing). The same holds for Content-Type: the balancer reads the
    first, gunicorn's WSGI environ keeps the last (`CONTENT_TYPE` is overwritten per header). Right
    answer: a repeated Content-Encoding is read whole (415 `UnsupportedMediaType` unless every value
    is identity), a repeated Content-Type is a 400 `BadRequest`; no backend call."""
    body = json.dumps({"input": "word " * 12_000}).encode()
    if any(v == b"gzip" for _, v in headers):
        body = gzip.compress(body)
    before = pool.backend_calls()
    sent = httpx.post(
        pool.url + "/openai/deployments/emb/embeddings?api-version=2024-10-21",
        content=body,
        headers=[(b"api-key", b"key-b"), *headers],
    )
    assert pool.backend_calls() == before, f"a body with repeated {headers[-1][0]!r} was sent ({sent.status_code})"
    assert sent.status_code in (400, 415)


def test_backend_quota_headers_are_not_relayed_on_a_refusal(servers):
    """Was: with several clients `Metering.observe` stripped `x-ratelimit-*` from `UpstreamResponse`s
    only; a 401/403 about the client's own call is relayed by `lb.attempt.buffered`, a plain Response,
    with every backend header (now stripped from every answer by `lb.proxy`). A backend or gateway
    that puts its remaining quota on a refusal (API Management's token-limit policy does on every
    answer) hands bob the pool's spend on that backend: one refused call a second reads how much
    alice just spent. Right answer: no `x-ratelimit-*`
    header on any answer while several clients share the pool (a limited client gets its own)."""
    refusal = b'{"error": {"code": "PermissionDenied", "message": "The principal lacks the data action."}}'
    url, _ = custom_pool(servers, Gateway(403, refusal, b"application/json"))
    sent = httpx.get(url + "/openai/v1/models", headers={"api-key": "key-b"})
    assert sent.status_code == 403
    assert not [h for h in sent.headers if h.startswith("x-ratelimit-")], dict(sent.headers)


def test_credential_headers_spelled_with_underscores_are_not_forwarded(servers):
    """`lb.headers.forwarded` drops `api-key`, `authorization`, `ocp-apim-subscription-key`,
    `x-functions-key` by exact name; `api_key` and `Ocp_Apim_Subscription_Key` go through. A WSGI
    server names both spellings `HTTP_API_KEY` and joins repeated ones with "," (gunicorn's
    `wsgi.create` before 22.0, which now drops underscored names by default for this very reason;
    the WSGI adapters of engineio and others still join): the client's value meets the balancer's own
    key, "bobs-garbage,key-1" is an invalid key, the 401 "invalid subscription key" is taken as the
    balancer's credential refused, and the backend is cooled for everyone (docs/robustness.md): the
    header twin of the `subscription-key` query round 1 fixed. Right answer: a header whose name,
    `_` read as `-`, is a credential is dropped."""
    gateway = Gateway(200, b"{}", b"application/json", trigger=b"\x00never")
    url, _ = custom_pool(servers, gateway)
    chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    headers = {
        "api-key": "key-b",
        "api_key": "bobs-garbage",
        "Ocp_Apim_Subscription_Key": "bobs",
        "x_functions_key": "b",
    }
    assert httpx.post(url + "/openai/v1/chat/completions", json=chat, headers=headers).status_code == 200
    names = [name for name, _ in gateway.headers[-1]]
    leaked = [
        n for n in names if n.replace(b"_", b"-") in (b"api-key", b"ocp-apim-subscription-key", b"x-functions-key")
    ]
    assert leaked == [b"api-key"], f"client credential headers reached the backend: {leaked}"


# 4. One client taking a backend out of rotation for everyone -------------------------------------
APP_GATEWAY_403 = (
    b"<html><head><title>403 Forbidden</title></head><body><center><h1>403 Forbidden</h1></center>"
    b"<hr><center>Microsoft-Azure-Application-Gateway/v2</center></body></html>"
)


def test_a_waf_refusing_bobs_prompt_does_not_take_the_backend_away_from_alice(servers):
    """Was `lb.auth.refusals`: "an inference call whose refusal can't be read is taken as ours" (now
    only if a probe with no client content is refused too: tests/test_refusals.py). A backend
    behind Application Gateway's WAF (or Front Door's) answers a prompt its rules match
    (`<script>`, `' OR 1=1`) with a 403 and an HTML page: unreadable, so the balancer cools that
    backend for LB_AUTH_COOLDOWN_SECONDS (300 s) for every client. One chat from bob; alice then
    gets 502 `BackendAuthenticationFailed` for five minutes. Right answer: bob gets the 403 (it is
    about his request); the backend stays in rotation and alice gets 200. (A refusal is the
    balancer's only when Azure's words say so, or when a call that carries no client content, such
    as a probe of `GET /openai/models`, is refused too.)"""
    gateway = Gateway(403, APP_GATEWAY_403, b"text/html", trigger=b"<script>")
    url, _ = custom_pool(servers, gateway)
    bad = {"model": "chat", "messages": [{"role": "user", "content": "explain <script>alert(1)</script>"}]}
    bobs = httpx.post(url + "/openai/v1/chat/completions", json=bad, headers={"api-key": "key-b"})
    assert bobs.status_code == 403, bobs.text[:200]
    good = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}
    alices = httpx.post(url + "/openai/v1/chat/completions", json=good, headers={"api-key": "key-a"})
    assert alices.status_code == 200, f"alice after bob's prompt: {alices.status_code} {alices.text[:160]}"


# 5. Records: one client evicting another's --------------------------------------------------------
class EchoingResponses:
    """A Responses API that echoes the request's `tools` and `metadata` in the response object, as
    Azure's does (the Response object carries both)."""

    def __init__(self) -> None:
        self.made = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = json.loads(await read_body(receive) or b"{}")
        self.made += 1
        answer = {
            "id": f"resp_{self.made:032d}",
            "object": "response",
            "status": "completed",
            "output": [],
            "tools": request.get("tools", []),
            "metadata": request.get("metadata", {}),
            "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2},
        }
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})


def test_one_responses_call_cannot_make_thousands_of_records(servers):
    """`ObjectRouter._after` records, for its caller, every `"id": "rs_..."` found anywhere in a
    Responses answer (`watch_all(REASONING_ID)`), meant for the output's reasoning items. The answer
    echoes the request's `tools` (function `parameters` are any JSON Schema, and `id` is a keyword of
    it) and `metadata`: bob's one call with 3,000 schema properties each carrying an `id` makes
    3,000 records. In memory (no Table settings) the records are capped at 50,000, least recently
    used dropped: 17 such calls drop every other client's records, and with several clients an id
    without a record is a 404, so alice loses every object she has (next test). With Table Storage
    each is an insert awaited before the answer's next bytes: 3,000 round trips per call, rows kept
    30 days. Right answer: only the ids of `output[]` items of type `reasoning` are recorded (a
    handful per answer), whatever else the answer echoes."""
    backend = EchoingResponses()
    url, proxy = custom_pool(servers, backend)
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string", "id": f"rs_{i:030d}"} for i in range(3000)}}
    tool = {"type": "function", "name": "f", "parameters": schema, "strict": False}
    body = {"model": "chat", "input": "hi", "tools": [tool], "metadata": {"id": "rs_metadata"}}
    sent = httpx.post(url + "/openai/v1/responses", json=body, headers={"api-key": "key-b"}, timeout=30)
    assert sent.status_code == 200
    made = proxy.objects.records.counts().get("reasoning", 0)
    assert made <= 10, f"one call made {made} reasoning records"


def test_bobs_new_objects_do_not_evict_alices_records(pool):
    """Memory-only records are one LRU of `max_records` (50,000) over every client. docs/stateful.md:
    "a dropped one costs a point read, or a look-up in memory-only mode", but with several clients
    look-ups are off, so a dropped record is a 404 for its owner, for good. Bob creating more
    objects than the cap (here the cap is lowered to 5; the test above makes 3,000 records per
    call) leaves alice's file unreachable: alice gets 404 for her own file. Right answer: alice
    keeps her object (200): a client's records evict only that client's own (or the reasoning
    records nobody names first), never another client's."""
    secret = alices_file(pool)
    pool.proxy.objects.records.max_records = 5
    mine = pool.v1("key-b")
    for _ in range(6):
        mine.files.create(file=("b.txt", io.BytesIO(b"bob")), purpose="assistants")
    with httpx.Client(base_url=pool.url, headers={"api-key": "key-a"}, timeout=10) as alice:
        kept = alice.get(f"/openai/v1/files/{secret}")
    assert kept.status_code == 200, f"alice lost her file after bob's uploads: {kept.status_code}"


# 6. Quotas --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "extra"),
    [("/openai/v1/chat/completions", {"n": 50}), ("/openai/v1/completions", {"best_of": 50, "n": 1})],
)
def test_a_reservation_counts_every_choice(path, extra):
    """`Metering.reservation` is the prompt plus `max_tokens`, whatever `n` (chat) or `best_of`
    (completions) asks: "you will be charged based on the number of generated tokens across all of
    the choices" (OpenAI API reference, `n`). With a 5,000 tpm limit bob's concurrent calls with
    `max_tokens: 1000, n: 50` each reserve about 1,024: four are admitted at once, and may spend
    200,000 tokens in one window (40x the limit; the usage is charged when they end, too late).
    Right answer: the output reserved is max_tokens x n (x best_of): the first call passes on an
    empty window (as any call larger than the limit does), the second is a 429
    `ClientQuotaExceeded`."""
    metering = Metering(parse_limits("bob=5000tpm"), Telemetry())
    body = {
        "model": "chat",
        "messages": [{"role": "user", "content": "hi"}],
        "prompt": "hi",
        "max_tokens": 1000,
        **extra,
    }
    info = asyncio.run(described(path, json.dumps(body).encode()))
    metering.admit("bob", info)
    with pytest.raises(ClientQuotaExceeded):
        metering.admit("bob", info)


def over_limit(url: str) -> None:
    """Bob spends more than his 100 tokens a minute in one chat; the next chat is refused."""
    chat = {"model": "chat", "messages": [{"role": "user", "content": "word " * 800}], "max_tokens": 10}
    assert httpx.post(url + "/openai/v1/chat/completions", json=chat, headers={"api-key": "key-b"}).status_code == 200
    deadline = time.monotonic() + 5
    while httpx.get(url + "/lb/usage", headers={"api-key": "key-b"}).json()["limits"]["bob"]["reserved"]["calls"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    refused = httpx.post(url + "/openai/v1/chat/completions", json=chat, headers={"api-key": "key-b"})
    assert refused.status_code == 429


RUNS = {
    "create-and-run": ("/openai/v1/threads/runs", {"assistant_id": "asst_" + "b" * 32, "thread": {"messages": []}}),
    "thread-run": (f"/openai/v1/threads/thread_{'b' * 32}/runs", {"assistant_id": "asst_" + "b" * 32}),
    "eval-run": (
        f"/openai/v1/evals/eval_{'b' * 32}/runs",
        {
            "name": "r",
            "data_source": {
                "type": "completions",
                "model": "chat",
                "source": {"type": "file_content", "content": [{"item": {"q": "word " * 200}}]},
                "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.q}}"}]},
            },
        },
    ),
}


@pytest.mark.parametrize("way", sorted(RUNS))
def test_a_client_over_its_quota_cannot_spend_through_runs(servers, way):
    """`lb.metering.TOKEN_OPERATIONS` lists chat, completions, responses, images, audio and embeddings;
    an Assistants run (`threads/runs`, `threads/{id}/runs`) and an eval run (`evals/{id}/runs`) have
    the model generate on the deployment (the run's `usage`; an eval samples every item) but reserve
    0, and "a call that reserves nothing is not refused for tokens": bob, over his 100 tokens a
    minute, starts as many as he likes. Batches, which also spend outside the call, are held to
    `bph`; these are not held at all. Right answer: 429 `ClientQuotaExceeded` while he is over (a
    reservation of the deployment's default, like a generating call naming no maximum), or 403
    like batches without an allowance; no backend call."""
    backend = SimBackend("s", api_key="key-1")
    url, proxy = custom_pool(servers, backend, LB_CLIENT_LIMITS="bob=100tpm")
    for object_id, kind in (
        ("asst_" + "b" * 32, "assistant"),
        ("thread_" + "b" * 32, "thread"),
        ("eval_" + "b" * 32, "eval"),
    ):
        plant(proxy, object_id, kind, "bob")
    over_limit(url)
    path, body = RUNS[way]
    before = len(backend.calls)
    sent = httpx.post(url + path, json=body, headers={"api-key": "key-b"})
    assert len(backend.calls) == before, f"bob, over his quota, started a run ({sent.status_code})"
    assert sent.status_code in (403, 429)


# 7. Routes without a rule for their method ---------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("HEAD", "/openai/v1/files"),
        ("GET", "/openai/v1/threads"),
        ("GET", "/openai/v1/responses"),
        ("GET", "/openai/v1/conversations"),
        ("DELETE", "/openai/v1/files"),
        ("PUT", "/openai/v1/batches"),
    ],
)
def test_a_collections_root_with_an_unknown_method_is_not_forwarded(pool, method, path):
    """`routes.classify` gives a collection's root (no id) an ObjectCall with no id for every method,
    and the router sends it to one backend as a plain call: only POST (create) and a listable
    collection's GET (merged, per client) are read. `HEAD /files` is the backend's unfiltered list
    (the simulator answers with every client's files' length); a `GET` on a collection that does not
    list here (responses, conversations, threads) is whatever the backend lists, every client's;
    `DELETE`/`PUT` on a root is no operation the table knows. round 1 closed this for stateless
    routes (STATELESS's methods); collections have no such table. Right answer: 403
    `RouteNotIsolated` naming the method (a HEAD on a listable collection may instead be answered
    from the merged list), and the backend never sees that method there."""
    alices_file(pool)
    before = [len(b.calls) for b in pool.backends]
    with bob(pool) as http:
        sent = http.request(method, path)
    new = [c for b, n in zip(pool.backends, before, strict=True) for c in b.calls[n:]]
    assert not [c for c in new if c.method == method], f"{method} {path} reached a backend ({sent.status_code})"


# 8. Bodies only a lenient parser reads ------------------------------------------------------------
def test_a_chat_with_single_quoted_keys_naming_a_file_is_refused(pool):
    """The chat hot path searches for `"file_id"` and `"audio"` with their quotes; on the deployment URL
    form the body is not parsed for a model either. A body with single-quoted (or unquoted) keys is
    no JSON, but Json.NET, JSON5 and other lenient readers take it, and read `file_id`. Right answer:
    the markers searched without quotes (`file_id`, `audio`), so such a body is parsed, and refused
    as not JSON (400 `BadRequest`); no backend call."""
    secret = alices_file(pool)
    part = "{'type': 'file', 'file': {'file_id': '" + secret + "'}}"
    body = "{'messages': [{'role': 'user', 'content': [" + part + "]}]}"
    before = pool.backend_calls()
    with bob(pool) as http:
        sent = http.post(DEPLOYMENT_CHAT, content=body.encode(), headers={"content-type": JSON})
    assert pool.backend_calls() == before, f"a chat only a lenient parser reads was sent ({sent.status_code})"
    assert sent.status_code == 400


def test_an_eval_run_over_an_items_file_naming_alices_file_is_refused(pool):
    """Batch input files are read line by line because their lines are calls made later; an eval run's
    items file (`purpose=evals`) is the same: with `input_messages: {"type": "item_reference",
    "item_reference": "item.messages"}` each item's messages are what the sampler sends, and a message
    can carry an `input_file` by `file_id` (the run's body is read; the file it names is not). Not
    verified against Azure's evals (which content types its sampler accepts from items); the shape is
    OpenAI's. Right answer: an evals file read like a batch file (404 naming the line for alice's
    file), or the run refused (403 `RouteNotIsolated`) while its items come from a file; either way
    the run that would read alice's file is never sent."""
    secret = alices_file(pool)
    item = {"item": {"messages": [{"role": "user", "content": [{"type": "input_file", "file_id": secret}]}]}}
    with bob(pool) as http:
        upload = http.post(
            "/openai/v1/files",
            content=form(('name="purpose"', b"evals"), ('name="file"; filename="i.jsonl"', json.dumps(item).encode())),
            headers={"content-type": FORM},
        )
        if upload.status_code >= 400:
            return  # refused at upload: held
        eval_id = "eval_" + "b" * 32
        pool.plant(eval_id, "eval", "bob")
        run = {
            "name": "r",
            "data_source": {
                "type": "responses",
                "model": "chat",
                "source": {"type": "file_id", "id": upload.json()["id"]},
                "input_messages": {"type": "item_reference", "item_reference": "item.messages"},
            },
        }
        before = pool.backend_calls()
        sent = http.post(f"/openai/v1/evals/{eval_id}/runs", json=run)
    assert pool.backend_calls() == before, (
        f"bob's eval run over an items file naming alice's file was sent ({sent.status_code})"
    )


# Forms bob tried that hold ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/openai/v1/files/{f};x=1/content"),  # ;params in an id: 400 invalid_id
        ("GET", "/openai/v1/files;x/{f}"),  # ;params on the collection: 403, not the files route
        ("GET", "/openai/v1/files/{f}/"),  # trailing slash: an empty segment, 400
        ("GET", "/openai/v1//files/{f}"),  # //: 400
        ("GET", "/openai/v1/files%2F{f}"),  # %2F: 403 (no route), never the object
        ("GET", "/openai/v1/files/{f}%2Fcontent"),  # 400 invalid_id
        ("GET", "/openai/v1/files/{F}"),  # the id in capitals: 400 (no such prefix), not a look-up
        ("POST", "/openai/v1/chat/completions;x=1"),  # 403 RouteNotIsolated
        ("OPTIONS", "/openai/v1/chat/completions"),  # 403
        ("GET", "/openai/fine-tunes?api-version=2023-05-15"),  # the legacy fine-tunes API: 403
        ("GET", "/openai/deployments/chat/files/{f}?api-version=2024-10-21"),  # 403
        # a chat call to `chat` (`lb.apipath`): its body is read for ids, alice's file a 404
        ("POST", "/openai/Deployments/chat/chat/completions?api-version=2024-10-21"),
        ("POST", "/openai/d%65ployments/chat/chat/c%6Fmpletions?api-version=2024-10-21"),
    ],
)
def test_path_spellings_reach_nothing_of_alices(pool, method, path):
    secret = alices_file(pool)
    before = pool.backend_calls()
    naming = {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": secret}}]}]}
    with bob(pool) as http:
        sent = http.request(method, path.format(f=secret, F=secret.upper()), json=naming if method == "POST" else None)
    assert pool.backend_calls() == before and sent.status_code in (400, 403, 404), sent.status_code


def test_bodies_parsers_read_differently_are_refused(pool):
    """A comment, one id field in two cases, a BOM, NaN, nesting deeper than Python's limit: each a
    4xx with no backend call (the Responses body is parsed for its model first, then for ids)."""
    response = pool.v1("key-a").responses.create(model="chat", input="alice's secret").id.encode()
    bodies = [
        b'{"model":"chat","input":"x","previous_response_id":"%s", /* c */ "a":1}' % response,
        b'{"model":"chat","input":"x","Previous_Response_Id":"resp_b","previous_response_id":"%s"}' % response,
        b'\xef\xbb\xbf{"model":"chat","input":"x","previous_response_id":"%s"}' % response,
        b'{"model":"chat","input":"x","previous_response_id":"%s","temperature":NaN}' % response,
        b'{"model":"chat","input":' + b"[" * 100_000 + b"]" * 100_000 + b',"previous_response_id":"%s"}' % response,
    ]
    before = pool.backend_calls()
    with bob(pool) as http:
        for body in bodies:
            sent = http.post("/openai/v1/responses", content=body, headers={"content-type": JSON})
            assert sent.status_code in (400, 404), (body[:60], sent.status_code)
    assert pool.backend_calls() == before


def test_a_chunked_body_naming_alices_file_is_read_like_any_other(pool):
    """No Content-Length, the body in two chunks split inside the id's object: read whole, 404."""
    secret = alices_file(pool)

    def chunks() -> Iterator[bytes]:
        yield b'{"messages":[{"role":"user","content":[{"type":"file","file":'
        yield b'{"file_id":"' + secret.encode() + b'"}}]}]}'

    before = pool.backend_calls()
    with bob(pool) as http:
        sent = http.post(DEPLOYMENT_CHAT, content=chunks(), headers={"content-type": JSON})
    assert sent.status_code == 404 and pool.backend_calls() == before


def test_a_compressed_chat_is_refused_whatever_content_encoding_says(pool):
    """A deflated chat body on the deployment form, said to be `identity`: its bytes are not ASCII, so
    the chat is parsed, and refused as not UTF-8 JSON (the 415 is not the only guard on chat)."""
    secret = alices_file(pool)

    chat = {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": secret}}]}]}
    before = pool.backend_calls()
    with bob(pool) as http:
        sent = http.post(
            DEPLOYMENT_CHAT,
            content=zlib.compress(json.dumps(chat).encode()),
            headers=[(b"content-type", b"application/json"), (b"content-encoding", b"identity")],
        )
    assert sent.status_code == 400 and pool.backend_calls() == before

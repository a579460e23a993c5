"""Per-backend deployment names: the call as this backend must receive it.

Clients name a deployment once (`chat`); each backend may know it by its own name
(`BACKEND_X_DEPLOYMENTS=chat=gpt4o-eastus`, or openai-aca-lb's `BACKEND_X_DEPLOYMENT_NAME`). The name
sits in the path on `/openai/deployments/{name}/...` calls and in the JSON body's `model` on
`/openai/v1/...` and `/openai/responses` calls, so exactly that part is replaced, per attempt (a
failover may go to a backend with another name). When the name does not change, the path and the
body's bytes pass untouched: the stateless path pays one attribute read.

The body is never parsed for it: the request's one read (`lb.requestinfo`) finds the top-level
`model` value's bytes (in slices that yield to the loop, `lb.bodyscan`), and each attempt splices
the backend's name in. Nothing here can fail inside an attempt, so nothing of ours is ever
booked against a backend.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from lb.apipath import DEPLOYMENTS
from lb.config import Backend
from lb.requestinfo import RequestInfo


def upstream_call(backend: Backend, info: RequestInfo) -> tuple[str, bytes]:
    """(path + query, body) to send to `backend` for the client's call `info`."""
    deployment = info.deployment
    if deployment is None:
        return info.raw_path, info.body
    name = backend.upstream_name(deployment)
    if name == deployment:
        return info.raw_path, info.body
    if info.path.prefix == DEPLOYMENTS:  # in whatever case the client spelled it (`lb.apipath`)
        path, sep, query = info.raw_path.partition("?")
        segments = path.split("/", 4)  # ["", "openai", "deployments", "{name}", "{route}"]
        segments[3] = quote(name, safe="")
        return "/".join(segments) + sep + query, info.body
    return info.raw_path, _with_model(info.body, info.model_spans or (), name)


def _with_model(body: bytes, spans: tuple[tuple[int, int], ...], name: str) -> bytes:
    """The body with each located `model` value replaced by `name`; sent as it came when there is none
    (not JSON, no top-level `model` string: the backend answers that with its own 400)."""
    value = json.dumps(name).encode()
    view = memoryview(body)  # slices of a view are not copies: the body is copied once, by the join
    parts: list[bytes | memoryview] = []
    at = 0
    for start, end in spans:
        parts += (view[at:start], value)
        at = end
    return b"".join([*parts, view[at:]]) if spans else body

"""Per-backend deployment names: the call as this backend must receive it.

Clients name a deployment once (`chat`); each backend may know it by its own name
(`BACKEND_X_DEPLOYMENTS=chat=gpt4o-eastus`, or openai-aca-lb's `BACKEND_X_DEPLOYMENT_NAME`). The name
sits in the path on `/openai/deployments/{name}/...` calls and in the JSON body's `model` on
`/openai/v1/...` calls, so exactly that part is replaced, per attempt (a failover may go to a backend
with another name). When the name does not change, the path and the body's bytes pass untouched: the
stateless path pays one attribute read.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote

from lb.config import Backend
from lb.requestinfo import RequestInfo

PARSE_LIMIT_BYTES = 64 * 1024  # above this a body's model is replaced in place, not by a parse


def upstream_call(backend: Backend, info: RequestInfo) -> tuple[str, bytes]:
    """(path + query, body) to send to `backend` for the client's call `info`."""
    deployment = info.deployment
    if deployment is None:
        return info.raw_path, info.body
    name = backend.upstream_name(deployment)
    if name == deployment:
        return info.raw_path, info.body
    path, sep, query = info.raw_path.partition("?")
    segments = path.split("/")  # ["", "openai", "deployments", "{name}", ...] or ["", "openai", "v1", ...]
    if len(segments) > 3 and segments[2] == "deployments":
        segments[3] = quote(name, safe="")
        return "/".join(segments) + sep + query, info.body
    return info.raw_path, _with_model(info.body, deployment, name)


def _with_model(body: bytes, deployment: str, name: str) -> bytes:
    """The JSON body with `model` replaced; anything else (not JSON, no `model`) is sent as it came.

    A large body is not parsed on the event loop (see `lb.bodyscan`): when `"model": "<deployment>"`
    occurs exactly once, that value is replaced in place; only otherwise is the body parsed."""
    if len(body) > PARSE_LIMIT_BYTES:
        pattern = re.compile(rb'("model"\s*:\s*")' + re.escape(json.dumps(deployment)[1:-1].encode()) + rb'"')
        matches = pattern.findall(body, 0, len(body))
        if len(matches) == 1:
            return pattern.sub(lambda m: m.group(1) + name.encode() + b'"', body, count=1)
    try:
        payload: Any = json.loads(body)
    except ValueError:
        return body
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), str):
        return body
    payload["model"] = name
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()

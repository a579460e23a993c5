"""Whose problem a backend's 401/403 is: the balancer's credential, or what this client asked.

Azure OpenAI answers both with the same statuses. Only the first is worth failing over and taking
the backend out of rotation for everyone (`LB_AUTH_COOLDOWN_SECONDS`); the second is the client's
answer. Taking the client's answer for ours lets one client shut a backend for all: an RBAC denial
of one data action (fine-tuning with only the "Cognitive Services OpenAI User" role), or a gateway in
front of the backend refusing one prompt (Application Gateway's or Front Door's WAF: 403 and an HTML
page; API Management's `llm-content-safety`: 403) (docs/robustness.md).

`judged` reads the refusal:

- "ours": Azure says in words that the credential or network the balancer uses is refused. A bad
  key: `{"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong
  API endpoint. ..."}}` (API Management: `{"statusCode": 401, "message": "Access denied due to
  invalid subscription key. ..."}`, or "missing subscription key"); a bad token: `{"statusCode": 401,
  "message": "Unauthorized. Access token is missing, invalid, audience is incorrect
  (https://cognitiveservices.azure.com), or have expired."}`; keys turned off: 403 `{"error":
  {"code": "AuthenticationTypeDisabled", "message": "Key based authentication is disabled for this
  resource."}}`; the network: "Access denied due to Virtual Network/Firewall rules.", "Public access
  is disabled. Please configure private endpoint". The client's own credentials never reach a
  backend (`lb.headers`), so these can't be about what it sent.
- "unsure": `PermissionDenied` on a call any OpenAI User role may make (chat, completions,
  embeddings, responses, audio, images; known by the request's one reading of its path,
  `lb.apipath`, so `/openai/Deployments/d/Chat/Completions` is the chat it is to a backend matching
  routes in any case): our identity may lack the role, or this one call may need a data action it
  lacks; or no words at all (an HTML page, an empty body), on any route. The client's request
  alone decides nothing: `lb.attempt` asks the backend a call that carries no client content
  (`PROBE_PATH`) and cools it only if that is refused too.
- "theirs": any other refusal (readable words about something else, `PermissionDenied` on a data
  action beyond the least role): relayed to the client, nothing cooled.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from lb.apipath import ApiPath, split_path

Judgement = Literal["ours", "theirs", "unsure"]

# Lower-case fragments of Azure's own messages about the credential (or network) the balancer uses.
CREDENTIAL_REFUSED = (
    "invalid subscription key",
    "wrong api endpoint",
    "missing subscription key",
    "access token is missing",
    "audience is incorrect",
    "token is expired",
    "key based authentication is disabled",
    "virtual network/firewall rules",
    "public access is disabled",
)
CREDENTIAL_CODES = frozenset({"authenticationtypedisabled"})
# The probe: Models - List, a read every OpenAI role may make (`OpenAI/*/read`), with no client content.
PROBE_PATH = "/openai/models?api-version=2024-10-21"
PROBE_SECONDS = 5.0  # at most, and never past the client's deadline
PROBE_FRESH_SECONDS = 10.0  # a probe's answer stands this long: a burst of unsure refusals asks once
# What the least role ("Cognitive Services OpenAI User") may call: a PermissionDenied there may be about
# us. Routes after /openai/deployments/{d}/ or /openai/v1/, and (unprefixed) the AzureOpenAI client's
# Responses path, each with the routes under it.
INFERENCE = ("chat/completions", "completions", "embeddings", "responses", "audio", "images")
UNPREFIXED_INFERENCE = ("responses",)


def judged(path: ApiPath | str, body: bytes) -> Judgement:
    """Whose a backend's 401/403 with this body, for this path (`RequestInfo.path`, or a raw path
    split here), is (see the module docstring)."""
    code, message = _error(body)
    if code.lower() in CREDENTIAL_CODES or any(fragment in message.lower() for fragment in CREDENTIAL_REFUSED):
        return "ours"
    if not (code or message):
        return "unsure"
    if code.lower() == "permissiondenied" and is_inference(split_path(path) if isinstance(path, str) else path):
        return "unsure"
    return "theirs"


class Probes:
    """The last probe's answer per backend, and one probe at a time per backend: a burst of unsure
    refusals (a key rotated under load, or one client's flood of prompts a WAF matches) costs the
    backend one call per `PROBE_FRESH_SECONDS`, not one per refusal."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._answers: dict[str, tuple[float, bool]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def refused(self, backend: str, probe: Callable[[], Awaitable[bool]]) -> bool:
        """Whether `backend` refuses a call that carries no client content; `probe` asks it."""
        async with self._locks.setdefault(backend, asyncio.Lock()):
            known = self._answers.get(backend)
            if known is not None and self.clock() - known[0] < PROBE_FRESH_SECONDS:
                return known[1]
            answer = await probe()
            self._answers[backend] = (self.clock(), answer)
            return answer


def is_inference(path: ApiPath) -> bool:
    """Whether the call is one the least role may make (`INFERENCE`): the route or one under it."""
    routes = INFERENCE if path.prefix else UNPREFIXED_INFERENCE
    operation = path.operation
    return any(operation == r or operation.startswith(r + "/") for r in routes)


def _error(body: bytes) -> tuple[str, str]:
    """(code, message) of either shape Azure answers a refusal in; empty strings when unreadable."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return "", ""
    if not isinstance(data, dict):
        return "", ""
    error = data.get("error")
    if not isinstance(error, dict):
        error = data
    code = error.get("code", data.get("statusCode", ""))
    message = error.get("message", "")
    return str(code or ""), message if isinstance(message, str) else ""

"""Whose problem a backend's 401/403 is: the balancer's credential, or what this client asked.

Azure OpenAI answers both with the same statuses. Only the first is worth failing over and taking
the backend out of rotation for everyone (`LB_AUTH_COOLDOWN_SECONDS`); the second is the client's
answer: an RBAC denial of one data action (fine-tuning, files, batches, ... with only the
"Cognitive Services OpenAI User" role) says nothing about the next client's chat call, and cooling
on it would let any one client shut a deployment for all (docs/robustness.md).

The balancer's credential is refused when Azure says so in words:

- a bad key: `{"error": {"code": "401", "message": "Access denied due to invalid subscription key or
  wrong API endpoint. ..."}}` (also seen as `{"statusCode": 401, "message": "Access denied due to
  invalid subscription key. ..."}`);
- a bad token: `{"statusCode": 401, "message": "Unauthorized. Access token is missing, invalid,
  audience is incorrect (https://cognitiveservices.azure.com), or have expired."}`;
- the balancer's network refused: `{"error": {"code": "403", "message": "Access denied due to Virtual
  Network/Firewall rules."}}`;

or when it is `PermissionDenied` on an inference call that any OpenAI User role may make (chat,
completions, embeddings, responses, audio, images): then the balancer's identity lacks the role
altogether. An inference call whose refusal can't be read is taken as ours too, as before.
"""

from __future__ import annotations

import json
import re

# Lower-case fragments of Azure's own messages about the credential (or network) the balancer uses.
CREDENTIAL_REFUSED = (
    "invalid subscription key",
    "wrong api endpoint",
    "access token is missing",
    "audience is incorrect",
    "token is expired",
    "virtual network/firewall rules",
)
# What the least role ("Cognitive Services OpenAI User") may call: a refusal here is about us.
_INFERENCE = re.compile(
    r"^/openai/(?:(?:deployments/[^/?]+|v1)/(?:chat/completions|completions|embeddings|responses|audio|images)"
    r"|responses)(?:[/?]|$)"  # /openai/responses?api-version=: the AzureOpenAI client's Responses path
)


def refuses_our_credential(raw_path: str, body: bytes) -> bool:
    """Whether a backend's 401/403 with this body, for this path, refuses the balancer itself."""
    code, message = _error(body)
    if any(fragment in message.lower() for fragment in CREDENTIAL_REFUSED):
        return True
    if not is_inference(raw_path):
        return False
    return code.lower() == "permissiondenied" or not (code or message)


def is_inference(raw_path: str) -> bool:
    return _INFERENCE.match(raw_path) is not None


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

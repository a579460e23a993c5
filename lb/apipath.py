"""The one reading of a call's URL path: its API shape, the deployment it names, and its route.

After `/openai/`, Azure OpenAI's paths come in three shapes:
- `deployments/{deployment}/{route}` (the AzureOpenAI client): the path names the deployment;
- `v1/{route}` (the OpenAI client with base_url=<proxy>/openai/v1): the body's `"model"` names it;
- `{route}` alone (`/openai/responses`, `/openai/files`, ...): Responses calls name it in the body too.

The shape decides the deployment (which backends may serve the call, the name each calls it by),
the route decides what the call costs (metering, quotas) and whether it names stored objects
(isolation). `split_path` reads all of it once per request (`RequestInfo.path`), so no policy can
read a path another way than the others.

It reads the path as the backend may route it. ASP.NET Core's routing documents that "text matching
is case-insensitive and based on the decoded representation of the URL's path"
(learn.microsoft.com/aspnet/core/fundamentals/routing, Route templates); the Azure REST API
guidelines ask a service to treat its own path segments as case-sensitive and answer 404 otherwise
(github.com/microsoft/api-guidelines, azure/Guidelines.md, `http-url-case-sensitivity`). Which of
the two an Azure OpenAI front end follows is not documented, so the balancer reads the union: the
shape's and the route's words match in any case, percent-decoded once, and
`/openai/Deployments/ch%61t/Chat/Completions` is a chat call to deployment `chat`. A backend that
matches strictly answers it 404 and spends nothing; one that matches loosely gets the call renamed,
routed, metered and isolated as the balancer read it. The deployment's name is decoded but keeps its
case (names are compared as the operator configured them). `/openai/` itself is matched as every
SDK sends it, and what two routers could read two ways (an encoded `/`, a second layer of
encoding) is refused before this reading: both in `lb.requestinfo.check_path`.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

DEPLOYMENTS = "deployments"  # /openai/deployments/{deployment}/{route}
V1 = "v1"  # /openai/v1/{route}
# First words of an unprefixed route whose calls name their deployment in the body (`/openai/responses`).
MODEL_IN_BODY = frozenset({"responses"})


@dataclass(frozen=True, slots=True)
class ApiPath:
    """A path as `split_path` reads it."""

    prefix: str  # DEPLOYMENTS, V1, or "" (`/openai/{route}`)
    deployment: str | None  # the path's deployment name (DEPLOYMENTS only), decoded, its case kept
    operation: str  # the route, decoded and lower-cased: "chat/completions", "responses/resp_1/cancel"
    segments: tuple[str, ...]  # the route's segments as sent (case and encoding kept): object ids are read here
    encoded: bool = False  # the path holds a percent-encoding somewhere

    @property
    def model_in_body(self) -> bool:
        """Whether the call names its deployment in the body's `"model"`: `/openai/v1/...`, `/openai/responses`."""
        return self.prefix == V1 or (not self.prefix and self.operation.partition("/")[0] in MODEL_IN_BODY)


def split_path(raw_path: str) -> ApiPath:
    """`raw_path` (path and query as sent; what precedes its second `/` is taken as `/openai`) as
    the backend may route it: `ApiPath(DEPLOYMENTS, "chat", "chat/completions", ("Chat", "Completions"))`
    for `/openai/Deployments/ch%61t/Chat/Completions?api-version=2024-10-21`."""
    path = raw_path.partition("?")[0]
    sent = path.split("/")[2:]  # after "" and "openai"
    encoded = "%" in path
    read = [unquote(s) for s in sent] if encoded else sent
    first = read[0].lower() if read else ""
    if first == DEPLOYMENTS and len(read) > 1:
        return ApiPath(DEPLOYMENTS, read[1] or None, "/".join(read[2:]).lower(), tuple(sent[2:]), encoded)
    if first == V1:
        return ApiPath(V1, None, "/".join(read[1:]).lower(), tuple(sent[1:]), encoded)
    return ApiPath("", None, "/".join(read).lower(), tuple(sent), encoded)

"""Answers the proxy makes itself, all in Azure OpenAI's error shape.

    ProxyError                      -> {"error": {"code", "message"}} with .status
     +-- Unauthorized        401     missing / wrong client key, invalid Entra ID token
     +-- Forbidden           403     a client not in LB_ADMIN_CLIENTS asks for an operator view (/lb/status)
     +-- BadRequest          400     unreadable body, missing "model" on the v1 shape
     +-- NotFound            404     no backend serves the deployment
     +-- RouteNotFound       404     not /openai/..., /healthz, /lb/status or /lb/usage
     +-- ClientQuotaExceeded 429     (lb.metering.quota) the client's own LB_CLIENT_LIMITS quota is used up
     +-- MethodNotAllowed    405     a method the route does not take
     +-- PayloadTooLarge     413     body above LB_MAX_BODY_BYTES
     +-- UnsupportedMediaType 415    a request body sent compressed (Content-Encoding other than identity)
     +-- HeadersTooLarge     431     more request headers, or longer, than any Azure OpenAI call needs
     +-- RequestTimeout      408     `lb serve`: a request head or body that does not arrive in time
     +-- AllBackendsCooling  429     every candidate is throttled: Retry-After of the soonest recovery
     +-- BadGateway          502     connect error / protocol error on the last attempt
          +-- BackendBrokeOff    --     mid-body, the backend's answer broke off (reset, truncated)
     +-- BackendAuthFailed   502     every backend refuses the proxy's own credential (401/403)
     +-- Overloaded          503     `lb serve` holds LB_SERVE_MAX_CONNECTIONS connections already
     +-- BackendCredentialUnavailable 503  no Entra ID token of its own for keyless backends (fetch failed, slow)
     +-- GatewayTimeout      504     no answer's head within the deadline (HTTP_TIMEOUT_SECONDS)
          +-- AnswerCut          --     mid-body, the balancer's own limit ended the answer: silence
                                        (HTTP_TIMEOUT_SECONDS) or the optional total (LB_TOTAL_TIMEOUT_SECONDS)

`upstream_error()` is the one place that maps httpx's exceptions onto these. The two mid-body
errors reach the client as the last event of an SSE answer (`sse_event()`), since its head has gone
out already: the openai SDK raises `openai.APIError` on an event whose data carries "error", with
its message. Any other answer can only be closed short.
"""

from __future__ import annotations

import json
import math

import httpx
from starlette.responses import Response


class ProxyError(Exception):
    status = 500
    code = "InternalServerError"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def response(self, extra_headers: dict[str, str] | None = None) -> Response:
        body = json.dumps({"error": {"code": self.code, "message": self.message}})
        headers = {**self.headers, **(extra_headers or {})}
        return Response(body, status_code=self.status, headers=headers, media_type="application/json")


class Unauthorized(ProxyError):
    status = 401
    code = "401"

    def __init__(self, message: str, error: str | None = None) -> None:
        # RFC 6750: "invalid_token" when a credential was presented but refused, nothing when none was.
        challenge = 'Bearer realm="lb", charset="UTF-8"'
        if error:
            description = message.replace("\\", "").replace('"', "'")
            challenge += f', error="{error}", error_description="{description}"'
        super().__init__(message, {"WWW-Authenticate": challenge})


class Forbidden(ProxyError):
    status = 403
    code = "PermissionDenied"  # what Azure OpenAI answers a principal its role does not allow


class BadRequest(ProxyError):
    status = 400
    code = "BadRequest"


class NotFound(ProxyError):
    status = 404
    code = "DeploymentNotFound"


class RouteNotFound(ProxyError):
    status = 404
    code = "NotFound"


class MethodNotAllowed(ProxyError):
    status = 405
    code = "MethodNotAllowed"


class PayloadTooLarge(ProxyError):
    status = 413
    code = "PayloadTooLarge"


class UnsupportedMediaType(ProxyError):
    status = 415
    code = "UnsupportedMediaType"


class HeadersTooLarge(ProxyError):
    status = 431
    code = "RequestHeaderFieldsTooLarge"


class RequestTimeout(ProxyError):
    status = 408
    code = "RequestTimeout"


class AllBackendsCooling(ProxyError):
    status = 429
    code = "429"

    def __init__(self, deployment: str | None, seconds: float) -> None:
        seconds = max(seconds, 0.001)
        whole = max(1, math.ceil(seconds))
        what = f"deployment '{deployment}'" if deployment else "this request"
        super().__init__(
            f"Every backend for {what} is throttled. Please retry after {whole} second{'s' if whole != 1 else ''}.",
            {"Retry-After": str(whole), "retry-after-ms": str(max(1, math.ceil(seconds * 1000)))},
        )


class BadGateway(ProxyError):
    status = 502
    code = "BadGateway"


class BackendAuthFailed(ProxyError):
    """Not the client's key: the backends refuse the credential the proxy sends them."""

    status = 502
    code = "BackendAuthenticationFailed"

    def __init__(self, deployment: str | None) -> None:
        what = f"deployment '{deployment}'" if deployment else "this request"
        super().__init__(
            f"The load balancer could not authenticate to any backend for {what}: they refuse its own"
            " credential (its operator can see why in /lb/status). Your key was accepted."
        )


class BackendCredentialUnavailable(ProxyError):
    """Not the client's key, nor the backend: the proxy could not get its own Entra ID token for them."""

    status = 503
    code = "BackendCredentialUnavailable"


class Overloaded(ProxyError):
    status = 503
    code = "ServiceUnavailable"


class GatewayTimeout(ProxyError):
    status = 504
    code = "GatewayTimeout"


class AnswerCut(GatewayTimeout):
    """The balancer, not the backend, ended an answer mid-body: the message names the limit and its setting."""

    @classmethod
    def silence(cls, seconds: float) -> AnswerCut:
        return cls(
            f"The load balancer ended this answer: the backend sent nothing for {seconds:g} seconds"
            " (its limit on silence, HTTP_TIMEOUT_SECONDS)."
        )

    @classmethod
    def total(cls, seconds: float) -> AnswerCut:
        return cls(
            f"The load balancer ended this answer at its limit of {seconds:g} seconds per call"
            " (LB_TOTAL_TIMEOUT_SECONDS)."
        )


class BackendBrokeOff(BadGateway):
    """The backend's answer broke off mid-body (a reset, a truncated body): the backend's failure, named so."""

    def __init__(self, cause: str) -> None:
        super().__init__(f"The backend stream ended unexpectedly ({cause}).")


def sse_event(error: ProxyError) -> bytes:
    """`error` as an SSE event in Azure OpenAI's error shape, the last of a stream that was cut."""
    return b"data: %s\n\n" % json.dumps({"error": {"code": error.code, "message": error.message}}).encode()


def upstream_error(exc: Exception, backend: str) -> ProxyError:
    """Map a failed upstream call to the answer the client gets if it was the last attempt."""
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return GatewayTimeout(f"Backend '{backend}' did not answer in time.")
    if isinstance(exc, httpx.ConnectError):
        return BadGateway(f"Backend '{backend}' could not be reached.")
    return BadGateway(f"Backend '{backend}' failed: {type(exc).__name__}.")

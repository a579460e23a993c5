"""The request id every log line of a request carries, so one call can be followed through the logs.

A client's `x-request-id` (or `apim-request-id`) is kept when it is a sane token; otherwise one is
made. It lives in a contextvar: the tasks a request starts (its streamed body) inherit it, and
`RequestIdFilter` copies it onto each log record as `request_id` ("-" outside a request).
Ids from clients are restricted to a short safe alphabet so they cannot forge log lines.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

from starlette.datastructures import Headers

REQUEST_ID_HEADERS = ("x-request-id", "apim-request-id")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"

_SAFE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

current_request_id: ContextVar[str | None] = ContextVar("lb_request_id", default=None)


def request_id_from(headers: Headers) -> str:
    """The client's id when it sent a usable one, else a new UUID."""
    for name in REQUEST_ID_HEADERS:
        value = headers.get(name)
        if value and _SAFE_ID.fullmatch(value):
            return value
    return str(uuid.uuid4())


def bind(request_id: str) -> None:
    """Make `request_id` the id of everything this task (and the tasks it starts) logs."""
    current_request_id.set(request_id)


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id`; put it on a handler so records of every logger get it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id.get() or "-"
        return True


def install(handler: logging.Handler | None = None) -> None:
    """Give `handler` (default: every root handler) the filter and a format showing the id."""
    handlers = [handler] if handler is not None else logging.getLogger().handlers
    for h in handlers:
        if not any(isinstance(f, RequestIdFilter) for f in h.filters):
            h.addFilter(RequestIdFilter())
        h.setFormatter(logging.Formatter(LOG_FORMAT))


class RequestIdPrefix(logging.Filter):
    """For hosts whose log format we don't set (the Functions worker): the id goes into the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = current_request_id.get()
        if request_id and not getattr(record, "lb_prefixed", False):
            record.msg = f"[{request_id}] {record.msg}"
            record.lb_prefixed = True
        return True


def prefix_messages(*logger_names: str) -> None:
    for name in logger_names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RequestIdPrefix) for f in logger.filters):
            logger.addFilter(RequestIdPrefix())

"""Every log line of a request names it, under `lb serve`'s format and under the Functions worker's."""

from __future__ import annotations

import asyncio
import logging

import httpx
from starlette.datastructures import Headers

from lb import logctx
from lb.app import create_proxy
from lb.config import load_settings
from tests.conftest import CLIENT_KEY


def test_each_log_line_of_a_request_carries_the_clients_request_id(make_pool, caplog):
    caplog.set_level(logging.DEBUG)
    caplog.handler.addFilter(logctx.RequestIdFilter())
    pool = make_pool(2)
    pool.backends[0].throttle_next = pool.backends[1].throttle_next = 1  # two logged failovers
    response = httpx.post(
        f"{pool.url}/openai/deployments/chat/chat/completions?api-version=1",
        json={"messages": []},
        headers={"api-key": CLIENT_KEY, "x-request-id": "trace-me-7"},
    )
    assert response.status_code == 429 and response.headers["x-request-id"] == "trace-me-7"
    mine = [r for r in caplog.records if r.name.startswith("lb") and "attempt" in r.getMessage()]
    assert len(mine) == 2 and all(r.request_id == "trace-me-7" for r in mine)


def test_lines_outside_a_request_say_dash_and_unsafe_ids_are_replaced():
    record = logging.LogRecord("lb", logging.INFO, __file__, 1, "start", None, None)
    logctx.RequestIdFilter().filter(record)
    assert record.request_id == "-"
    assert logctx.request_id_from(Headers({"x-request-id": "ok-1"})) == "ok-1"
    assert logctx.request_id_from(Headers({"apim-request-id": "apim-2"})) == "apim-2"
    assert logctx.request_id_from(Headers({"x-request-id": "forged] INFO lb: ok"})) != "forged] INFO lb: ok"


def test_under_the_functions_worker_the_id_is_put_into_the_message():
    async def in_request() -> logging.LogRecord:
        logctx.bind("fn-req-1")
        record = logging.LogRecord("lb", logging.INFO, __file__, 1, "attempt %s", ("x",), None)
        logctx.RequestIdPrefix().filter(record)
        logctx.RequestIdPrefix().filter(record)  # a second filter on the way does not prefix twice
        return record

    assert asyncio.run(in_request()).getMessage() == "[fn-req-1] attempt x"


def test_anonymous_access_is_announced_loudly(caplog):
    caplog.set_level(logging.WARNING, logger="lb")
    create_proxy(load_settings({"BACKEND_1_URL": "https://a.openai.azure.com"}))
    assert any("ANONYMOUS ACCESS" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)

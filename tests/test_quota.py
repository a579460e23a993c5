from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest

from lb.config import ConfigError, load_settings
from lb.metering import Metering
from lb.metering.quota import (
    BatchesNotAllowed,
    ClientQuotaExceeded,
    Limit,
    Limiter,
    parse_limits,
    parse_reservations,
)
from lb.requestinfo import RequestInfo, described
from lb.telemetry import Telemetry

GUID = "0b3c5a6e-1f2d-4c8b-9a7e-2d4f6b8c0a1e"
BACKEND = {"BACKEND_1_URL": "https://one.openai.azure.com"}


def test_limits_parse_tokens_and_requests_per_minute() -> None:
    assert parse_limits("chatapp=200000tpm/600rpm, batch=50000TPM,ops=5rpm") == {
        "chatapp": Limit(200000, 600),
        "batch": Limit(50000, None),
        "ops": Limit(None, 5),
    }
    assert parse_limits("") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("chatapp", "is not client="),
        ("chatapp=fast", "'fast'"),
        ("chatapp=10tpm/5tpm", "two tpm"),
        ("chatapp=0rpm", "at least 1"),
        ("a=1rpm,a=2rpm", "listed twice"),
        ("=5rpm", "is not client="),
    ],
)
def test_unparseable_limit_stops_start_up_naming_the_setting(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^LB_CLIENT_LIMITS: .*{message}"):
        load_settings({**BACKEND, "LB_CLIENT_LIMITS": text})


def test_limit_for_a_client_nobody_can_be_stops_start_up() -> None:
    with pytest.raises(ConfigError, match=r"^LB_CLIENT_LIMITS: no client can be named 'ghost'"):
        load_settings({**BACKEND, "LB_CLIENT_KEYS": "k1", "LB_CLIENT_LIMITS": "ghost=5rpm"})
    entra = {**BACKEND, "LB_ENTRA_TENANT_ID": GUID, "LB_ENTRA_ALLOWED_CLIENTS": GUID}
    other = "1b3c5a6e-1f2d-4c8b-9a7e-2d4f6b8c0a1e"
    with pytest.raises(ConfigError, match=r"^LB_CLIENT_LIMITS: '1b3c.*' is not one of LB_ENTRA_ALLOWED_CLIENTS"):
        load_settings({**entra, "LB_CLIENT_LIMITS": f"{other}=5rpm"})
    limits = load_settings({**entra, "LB_CLIENT_LIMITS": f"{GUID.upper()}=5rpm"}).client_limits
    assert limits == {GUID: Limit(None, 5)}  # app ids are compared lower-cased, as tokens name them
    keyed = load_settings({**BACKEND, "LB_CLIENT_KEYS": "k1,k2", "LB_CLIENT_LIMITS": "key2=5rpm"}).client_limits
    assert keyed == {"key2": Limit(None, 5)}  # an unnamed key is named by its position


def test_requests_per_minute_refuse_until_the_oldest_call_leaves_the_window() -> None:
    limiter = Limiter({"app": Limit(None, 3)})
    for t in (1000.0, 1010.0, 1020.0):
        assert limiter.admit("app", 0, t) is not None
    with pytest.raises(ClientQuotaExceeded) as refused:
        limiter.admit("app", 0, 1030.5)
    exc = refused.value
    assert exc.status == 429 and exc.code == "ClientQuotaExceeded"
    assert exc.headers["retry-after-ms"] == "30500"  # the call of second 1000 leaves at 1061
    assert exc.headers["Retry-After"] == "31"
    assert exc.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(ClientQuotaExceeded):
        limiter.admit("app", 0, 1060.999)  # window edge: still in (a charge counts for at least 60 s)
    assert limiter.admit("app", 0, 1061.0) is not None  # ... and out one second later


def test_a_client_without_limit_is_never_charged_and_unaffected_by_another() -> None:
    limiter = Limiter({"app": Limit(None, 1)})
    limiter.admit("app", 0, 5.0)
    with pytest.raises(ClientQuotaExceeded):
        limiter.admit("app", 0, 6.0)
    assert limiter.admit("other", 0, 6.0) is None


def test_tokens_are_reserved_until_the_call_settles_with_its_usage() -> None:
    limiter = Limiter({"app": Limit(1000, None)})
    charge = limiter.admit("app", 600, 100.0)
    assert charge is not None and charge.tokens == 600
    assert charge.headers["x-ratelimit-remaining-tokens"] == "400"
    with pytest.raises(ClientQuotaExceeded, match="1000 tokens per minute"):  # the reservation does not fit
        limiter.admit("app", 600, 101.0)
    assert limiter.used("app", 500.0) == [0, 600]  # held, however long the call takes
    limiter.settle(charge, 120, 500.0)  # the answer's usage said 120, when it ended
    assert limiter.used("app", 501.0) == [0, 120]  # charged in the minute it ended
    assert limiter.reserved == {}
    assert limiter.admit("app", 600, 501.0) is not None


def test_a_call_larger_than_the_whole_limit_passes_alone_on_an_empty_window() -> None:
    limiter = Limiter({"app": Limit(100, None)})
    assert limiter.admit("app", 1000, 0.0) is not None
    with pytest.raises(ClientQuotaExceeded):
        limiter.admit("app", 10, 1.0)


def test_refund_gives_back_request_and_tokens() -> None:
    limiter = Limiter({"app": Limit(1000, 1)})
    charge = limiter.admit("app", 10, 10.0)
    limiter.settle(charge, 0, 10.0, requests=0)
    assert limiter.used("app", 10.0) == [0, 0]
    assert limiter.admit("app", 10, 10.0) is not None


def test_other_instances_counts_share_the_window() -> None:
    limiter = Limiter({"app": Limit(None, 4)})
    limiter.others.add("app", 50.0, (3, 0, 0))
    limiter.admit("app", 0, 55.0)
    with pytest.raises(ClientQuotaExceeded) as refused:
        limiter.admit("app", 0, 56.0)
    assert refused.value.headers["Retry-After"] == "55"  # the others' calls of second 50 free first


def test_batches_per_hour_parse_and_a_token_limit_alone_allows_no_batches() -> None:
    limits = parse_limits("a=100tpm,b=100tpm/2bph,c=5rpm,d=0bph")
    assert [limits[n].batch_allowance() for n in "abcd"] == [0, 2, None, 0]
    limiter = Limiter(limits)
    with pytest.raises(BatchesNotAllowed):
        limiter.admit("a", 10, 0.0, batch=True)
    limiter.admit("b", 10, 0.0, batch=True)
    limiter.admit("b", 10, 100.0, batch=True)
    with pytest.raises(ClientQuotaExceeded, match="2 batches per hour") as refused:
        limiter.admit("b", 10, 200.0, batch=True)
    assert int(refused.value.headers["Retry-After"]) == 3600 - 200  # the first batch's minute leaves the hour
    assert limiter.admit("b", 10, 3601.0, batch=True) is not None
    assert limiter.admit("c", 10, 0.0, batch=True) is not None  # no token limit: batches are not limited


def test_reserve_tokens_parse_per_deployment_and_stop_start_up_when_malformed() -> None:
    assert parse_reservations("") == {}
    assert parse_reservations("4096") == {"*": 4096}
    assert parse_reservations("chat=2000, gpt5=16000,*=512") == {"chat": 2000, "gpt5": 16000, "*": 512}
    assert load_settings({**BACKEND, "LB_RESERVE_TOKENS": "chat=10"}).reserve_tokens == {"chat": 10}
    for bad in ("lots", "chat=", "chat=1,chat=2", "=5"):
        with pytest.raises(ConfigError, match=r"^LB_RESERVE_TOKENS: "):
            load_settings({**BACKEND, "LB_RESERVE_TOKENS": bad})


def info(path: str, payload: dict | None, deployment: str = "chat") -> RequestInfo:
    body = json.dumps(payload).encode() if payload else b""
    return replace(asyncio.run(described(path, body)), deployment=deployment)


def test_a_call_reserves_its_prompt_and_its_stated_or_default_output() -> None:
    metering = Metering({}, Telemetry(), reserve={"chat": 2000, "*": 700})
    chat = {"model": "chat", "messages": [{"role": "user", "content": "x" * 400}]}
    size = len(json.dumps(chat)) // 4
    assert metering.reservation(info("/openai/v1/chat/completions", chat)) == size + 2000
    assert metering.reservation(info("/openai/v1/chat/completions", chat, "other")) == size + 700
    stated = {**chat, "max_completion_tokens": 50}
    assert metering.reservation(info("/openai/v1/chat/completions", stated)) == len(json.dumps(stated)) // 4 + 50
    assert metering.reservation(info("/openai/v1/responses?x=1", chat)) == size + 2000
    assert metering.reservation(info("/openai/v1/embeddings", chat)) == size  # generates no output
    assert metering.reservation(info("/openai/v1/responses/resp_1", None)) == 0  # a read
    assert metering.reservation(info("/openai/v1/files", chat)) == 0  # an upload spends no tokens
    assert metering.reservation(info("/openai/v1/batches", chat)) == 0  # a batch: `bph`, not tokens
    assert Metering({}, Telemetry()).reservation(info("/openai/v1/chat/completions", chat)) == size + 1024


def test_a_call_reserves_its_output_once_per_choice() -> None:
    metering = Metering({}, Telemetry(), reserve={"*": 700})
    chat = {"model": "chat", "messages": [{"role": "user", "content": "x" * 400}], "n": 3}
    size = len(json.dumps(chat)) // 4
    assert metering.reservation(info("/openai/v1/chat/completions", chat)) == size + 3 * 700
    stated = {**chat, "max_tokens": 50}
    assert (
        metering.reservation(info("/openai/deployments/chat/chat/completions", stated))
        == len(json.dumps(stated)) // 4 + 3 * 50
    )  # read from the bytes: the same figure
    best_of = {"prompt": "x" * 400, "max_tokens": 50, "n": 2, "best_of": 5}  # 5 generated, 2 returned
    assert (
        metering.reservation(info("/openai/deployments/i/completions", best_of))
        == len(json.dumps(best_of)) // 4 + 5 * 50
    )
    images = {"model": "image", "prompt": "a cat", "n": 4}
    assert metering.reservation(info("/openai/v1/images/generations", images)) == len(json.dumps(images)) // 4 + 4 * 700
    responses = {"model": "chat", "input": "x" * 400, "n": 3}  # the Responses API makes one output
    assert metering.reservation(info("/openai/v1/responses", responses)) == len(json.dumps(responses)) // 4 + 700


@pytest.mark.parametrize("options", [{}, {"stream_options": {"include_usage": False}}])
def test_a_stream_asked_for_its_usage_keeps_its_number_of_choices(options) -> None:
    """A chat stream's body is rewritten to ask for the usage chunk (bytes inserted, or re-serialised
    when it names stream_options): what it reserves is read from the body as the client sent it."""
    metering = Metering({}, Telemetry())
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "n": 4, "max_tokens": 30, **options}
    sent = asyncio.run(described("/openai/deployments/chat/chat/completions", json.dumps(body).encode()))
    prepared = asyncio.run(metering.prepare(sent))
    assert prepared.body != sent.body and prepared.marks.choices == 4 and prepared.marks.max_tokens == 30


def test_a_call_that_starts_a_run_for_later_reserves_like_a_generating_call() -> None:
    metering = Metering({}, Telemetry(), reserve={"*": 700})
    thread = "/openai/v1/threads/thread_abc"
    run = {"assistant_id": "asst_abc"}
    size = len(json.dumps(run)) // 4
    assert metering.reservation(info("/openai/v1/threads/runs", run)) == size + 700  # create thread and run
    assert metering.reservation(info(f"{thread}/runs", run)) == size + 700
    assert (
        metering.reservation(info("/openai/Threads/thread_abc/Runs?api-version=2024-05-01-preview", run)) == size + 700
    )
    outputs = {"tool_outputs": [{"tool_call_id": "call_1", "output": "42"}]}
    assert (
        metering.reservation(info(f"{thread}/runs/run_abc/submit_tool_outputs", outputs))
        == len(json.dumps(outputs)) // 4 + 700
    )  # the run goes on generating
    capped = {**run, "max_completion_tokens": 90}  # a run's own cap over all its steps
    assert metering.reservation(info(f"{thread}/runs", capped)) == len(json.dumps(capped)) // 4 + 90
    evaluation = {"name": "r", "data_source": {"type": "completions", "model": "chat"}}
    assert (
        metering.reservation(info("/openai/v1/evals/eval_abc/runs", evaluation))
        == len(json.dumps(evaluation)) // 4 + 700
    )
    assert metering.reservation(info(f"{thread}/runs", None)) == 0  # listing runs
    assert metering.reservation(info(f"{thread}/runs/run_abc", {"metadata": {"k": "v"}})) == 0  # updating one
    assert metering.reservation(info(f"{thread}/runs/run_abc/cancel", {"x": 1})) == 0
    assert metering.reservation(info("/openai/v1/evals/eval_abc/runs/run_abc", {"x": 1})) == 0  # cancelling one
    assert metering.reservation(info(f"{thread}/messages", {"role": "user", "content": "hi"})) == 0


def test_a_client_over_its_tokens_cannot_start_a_run_and_is_told_so() -> None:
    metering = Metering(parse_limits("bob=1000tpm"), Telemetry())
    metering.admit("bob", info("/openai/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 40}]}))
    with pytest.raises(ClientQuotaExceeded) as refused:
        metering.admit("bob", info("/openai/v1/threads/thread_abc/runs", {"assistant_id": "asst_abc"}))
    assert refused.value.status == 429 and refused.value.code == "ClientQuotaExceeded"


def test_a_call_longer_than_the_window_is_charged_in_the_minute_it_ends() -> None:
    limiter = Limiter({"app": Limit(1000, None)})
    charge = limiter.admit("app", 300, 0.0)
    assert limiter.used("app", 90.0) == [0, 300]  # still reserved 90 s later
    limiter.settle(charge, 800, 90.0)
    assert limiter.used("app", 100.0) == [0, 800]
    with pytest.raises(ClientQuotaExceeded):
        limiter.admit("app", 300, 100.0)
    assert limiter.used("app", 151.0) == [0, 0]  # 61 s later


def test_other_instances_reservations_count_against_the_limit() -> None:
    limiter = Limiter({"app": Limit(1000, None)})
    limiter.others_reserved = {"app": [1, 900]}
    assert limiter.used("app", 0.0) == [0, 900]
    with pytest.raises(ClientQuotaExceeded):
        limiter.admit("app", 200, 0.0)
    limiter.others_reserved = {}  # its call settled there
    assert limiter.admit("app", 200, 0.0) is not None


def test_usage_report_for_one_client_has_only_its_own_counts_and_limits() -> None:
    metering = Metering({"a": Limit(1000, None), "b": Limit(None, 5)}, Telemetry(), clock=lambda: 100.0)
    metering.record("a", "east", "chat", None, answered=True)
    metering.record("b", "east", "chat", None, answered=True)
    metering.limiter.admit("a", 300, 100.0)
    everything = metering.report()
    assert set(everything["clients"]) == {"a", "b"} and set(everything["limits"]) == {"a", "b"}
    assert "backends" in everything
    mine = metering.report(client="a")
    assert set(mine["clients"]) == {"a"} and set(mine["limits"]) == {"a"} and "backends" not in mine
    assert mine["limits"]["a"]["reserved"] == {"calls": 1, "tokens": 300}
    assert mine["limits"]["a"]["unknown_usage_last_minute"] == 1
    assert metering.report(client="nobody")["clients"] == {}


def test_a_read_reserving_nothing_passes_while_the_tokens_are_spent() -> None:
    limiter = Limiter({"app": Limit(1000, None)})
    limiter.settle(limiter.admit("app", 900, 0.0), 1500, 1.0)  # a response larger than the limit
    with pytest.raises(ClientQuotaExceeded):
        limiter.admit("app", 10, 2.0)
    assert limiter.admit("app", 0, 2.0) is not None  # polling or reading it still works


def test_between_share_rounds_an_instance_reserves_only_its_share_of_what_is_left() -> None:
    limiter = Limiter({"app": Limit(3000, None)})
    limiter.synced(2)
    assert limiter.admit("app", 1000, 0.0) is not None  # the round's first call: up to all that is left
    with pytest.raises(ClientQuotaExceeded) as refused:
        limiter.admit("app", 1000, 0.1)  # 2,000 of 3,000 would leave the other instance nothing
    assert refused.value.headers["Retry-After"] == "1"  # the next round
    limiter.synced(2)  # the other instance may not have read the first call yet: it still counts
    with pytest.raises(ClientQuotaExceeded):
        limiter.admit("app", 900, 0.2)
    limiter.synced(2)
    assert limiter.admit("app", 900, 0.3) is not None  # 2,000 left: 900 <= 1,000
    alone = Limiter({"app": Limit(3000, None)})
    assert alone.admit("app", 1000, 0.0) and alone.admit("app", 1000, 0.1)  # one instance: no split

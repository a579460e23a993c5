"""The simulated backend answers the Responses API as the openai SDK expects it (directly, no proxy)."""

from __future__ import annotations

import asyncio
import gc
import socket
import warnings
from collections.abc import Iterator

import openai
import pytest

from lb.sim import Servers, SimBackend
from tests.conftest import wait_until


@pytest.fixture
def backend(servers: Servers) -> Iterator[tuple[SimBackend, openai.OpenAI]]:
    sim = SimBackend("simR", api_key="k", chunks=3)
    url = servers.start(sim)
    yield sim, openai.OpenAI(base_url=url + "/openai/v1", api_key="unused", default_headers={"api-key": "k"})


def test_responses_create_returns_a_completed_response_with_usage_from_the_prompt(backend) -> None:
    sim, client = backend
    response = client.responses.create(model="chat", input="x" * 40, instructions="y" * 8)
    assert response.id.startswith("resp_")
    assert response.status == "completed"
    assert response.model == "chat"
    assert response.output_text == "simR tok0 tok1 tok2"
    assert response.usage is not None
    assert response.usage.input_tokens == 12  # (40 + 8) characters / 4
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert sim.calls[-1].deployment == "chat"


def test_responses_stream_sends_the_whole_event_sequence_the_sdk_helper_checks(backend) -> None:
    _, client = backend
    with client.responses.stream(model="chat", input=[{"role": "user", "content": "hi"}], store=False) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types.count("response.output_text.delta") == 3
    assert types[-1] == "response.completed"
    assert final.output_text == "simR tok0 tok1 tok2"
    assert final.usage is not None and final.usage.output_tokens > 0


def test_responses_api_is_throttled_by_the_same_quota_as_chat(backend) -> None:
    sim, client = backend
    sim.requests_per_window = 1
    client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError) as caught:
        client.with_options(max_retries=0).responses.create(model="chat", input="hi")
    assert caught.value.response.headers["retry-after"]


def test_a_streamed_chat_still_ends_with_a_finish_chunk_and_done(backend) -> None:
    _, client = backend
    chunks = list(
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], stream=True)
    )
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, None, "stop"]


def test_a_body_nested_too_deeply_for_python_is_not_json_to_the_sim_not_a_crash(backend) -> None:
    import httpx

    sim, client = backend
    deep = b'{"model": "chat", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    answer = httpx.post(f"{client.base_url}responses", content=deep, headers={"api-key": "k"}, timeout=10)
    assert answer.status_code < 500 and sim.calls[-1].body == deep


@pytest.mark.e2e  # servers of its own, on sockets
def test_stopping_the_servers_closes_a_raw_tcp_server_and_its_connections() -> None:
    servers = Servers()

    held_by_server: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held_by_server.append(writer)
        await reader.read()  # until the caller hangs up: here, until `stop` cancels it

    port = int(servers.start_tcp(hold).rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as held, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        wait_until(lambda: held_by_server, "the raw server to take the connection")
        servers.stop()
        gc.collect()
        assert held.recv(1) == b""  # its connection closed, not left for the garbage collector
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)  # nor its listening socket
    assert [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)] == []

"""Assistants runs are charged their usage once, however often they are polled, listed or streamed.

End to end: the openai SDK's `beta` helpers through `lb` on sockets, in front of a simulated
backend that keeps assistants, threads and runs (lb.sim.threads); two limited clients, so one
client's reads never charge the other. Then the rules a socket test can't reach in time (a run
that ended long ago, holds over the pool), driven on `Metering` with a clock of the test's own.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from lb.metering import Metering
from lb.metering.quota import Charge, parse_limits
from lb.metering.responses import HOLD_SECONDS, SHARE_SECONDS
from lb.relay import UpstreamResponse
from lb.requestinfo import described
from lb.sim import SimBackend
from lb.telemetry import Telemetry
from tests.azurite import azurite_fixture  # noqa: F401
from tests.test_quota_evasion import ALICE, BOB, KEYS, limit_of, settled, start, start_instance, until, v1

# The SDK marks the whole Assistants API deprecated (in favour of the Responses API: "deprecated" on
# some methods, "The Assistants API is deprecated ..." on others); Azure still serves it and clients
# still poll runs: the warning is the SDK's, not a fault of ours.
pytestmark = pytest.mark.filterwarnings("ignore:(deprecated$|The Assistants API is deprecated):DeprecationWarning")

BOTH = "bob=100000tpm,alice=100000tpm"
POLLS = 5


def usage_of(url: str, client: str, key: str) -> dict[str, int]:
    return httpx.get(url + "/lb/usage", headers={"api-key": key}).json()["clients"][client]["last_minute"]


def tool(name: str = "lookup") -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}


def test_a_run_polled_and_listed_is_charged_its_usage_once_and_only_to_its_client(servers) -> None:
    backend = SimBackend("s", api_key="key-1")
    backend.objects.threads.steps = 3  # queued, in progress, in progress, completed
    url = start(servers, backend, BOTH)
    made = {}
    for key, text in ((BOB, "a short question"), (ALICE, "a much longer question " * 40)):
        sdk = v1(url, key)
        assistant = sdk.beta.assistants.create(model="chat", instructions="Answer briefly.")
        thread = sdk.beta.threads.create(messages=[{"role": "user", "content": text}])
        run = sdk.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id)
        assert run.status == "queued" and run.usage is None
        made[key] = (sdk, thread.id, run.id)
    final = {}
    for _ in range(POLLS):  # both poll, turn about, well past the end
        for key, (sdk, thread_id, run_id) in made.items():
            final[key] = sdk.beta.threads.runs.retrieve(run_id, thread_id=thread_id)
    for _ in range(3):  # and list their thread's runs, as a UI refreshing a thread does
        for key, (sdk, thread_id, _) in made.items():
            assert [r.usage for r in sdk.beta.threads.runs.list(thread_id=thread_id)] == [final[key].usage]
    _, alices_thread, alices_run = made[ALICE]
    with pytest.raises(openai.APIStatusError):  # bob reading alice's run: refused, charges nobody
        made[BOB][0].beta.threads.runs.retrieve(alices_run, thread_id=alices_thread)
    bob, alice = (final[key].usage.total_tokens for key in (BOB, ALICE))
    assert {final[key].status for key in made} == {"completed"} and bob != alice
    for client, key, spent in (("bob", BOB, bob), ("alice", ALICE, alice)):
        report = settled(url, client, key)
        calls = 3 + POLLS + 3  # bob's refused read reached no backend: its request was given back
        assert report["used_last_minute"] == {"requests": calls, "tokens": spent}  # not the reservation too
        assert report["charged_last_minute"] == spent
        assert usage_of(url, client, key)["total_tokens"] == spent


def test_create_and_poll_then_reads_of_the_run_and_its_steps_cost_nothing_more(servers) -> None:
    url = start(servers, SimBackend("s", api_key="key-1"), BOTH)
    sdk = v1(url)
    assistant = sdk.beta.assistants.create(model="chat")
    thread = sdk.beta.threads.create(messages=[{"role": "user", "content": "hello"}])
    run = sdk.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=5)
    assert run.status == "completed"
    for _ in range(POLLS):
        sdk.beta.threads.runs.retrieve(run.id, thread_id=thread.id)
    steps = list(sdk.beta.threads.runs.steps.list(run_id=run.id, thread_id=thread.id))  # each with its usage
    assert [s.usage.total_tokens for s in steps] == [run.usage.total_tokens]
    assert settled(url)["used_last_minute"]["tokens"] == run.usage.total_tokens
    assert usage_of(url, "bob", BOB)["total_tokens"] == run.usage.total_tokens


def test_a_streamed_run_is_charged_by_its_stream_and_not_again_when_read(servers) -> None:
    url = start(servers, SimBackend("s", api_key="key-1"), BOTH)
    sdk = v1(url)
    assistant = sdk.beta.assistants.create(model="chat")
    thread = sdk.beta.threads.create(messages=[{"role": "user", "content": "hello"}])
    with sdk.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id) as events:
        events.until_done()
        run = events.get_final_run()
    assert run.status == "completed" and run.usage.total_tokens > 0
    for _ in range(POLLS):
        sdk.beta.threads.runs.retrieve(run.id, thread_id=thread.id)
    sdk.beta.threads.runs.list(thread_id=thread.id)
    assert settled(url)["used_last_minute"]["tokens"] == run.usage.total_tokens
    assert usage_of(url, "bob", BOB)["total_tokens"] == run.usage.total_tokens


@pytest.mark.parametrize("streamed", [False, True], ids=["polled", "streamed"])
def test_a_run_resumed_with_tool_outputs_is_charged_its_whole_usage_once(servers, streamed: bool) -> None:
    """Its create and its submit both reserve; both are held by the run and settled against its usage
    (which covers both passes of the model), not charged on top of it."""
    url = start(servers, SimBackend("s", api_key="key-1"), BOTH)
    sdk = v1(url)
    assistant = sdk.beta.assistants.create(model="chat", tools=[tool()])
    thread = sdk.beta.threads.create(messages=[{"role": "user", "content": "look it up"}])
    if streamed:
        with sdk.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id) as events:
            events.until_done()
            run = events.get_final_run()
    else:
        run = sdk.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=5)
    assert run.status == "requires_action" and run.usage is None
    assert limit_of(url)["reserved"]["calls"] == 1  # the create's reservation waits for the run
    outputs = [{"tool_call_id": run.required_action.submit_tool_outputs.tool_calls[0].id, "output": "42"}]
    if streamed:
        with sdk.beta.threads.runs.submit_tool_outputs_stream(
            run_id=run.id, thread_id=thread.id, tool_outputs=outputs
        ) as events:
            events.until_done()
            run = events.get_final_run()
    else:
        run = sdk.beta.threads.runs.submit_tool_outputs_and_poll(
            run_id=run.id, thread_id=thread.id, tool_outputs=outputs, poll_interval_ms=5
        )
    assert run.status == "completed"
    for _ in range(POLLS):
        sdk.beta.threads.runs.retrieve(run.id, thread_id=thread.id)
    assert settled(url)["used_last_minute"]["tokens"] == run.usage.total_tokens


def test_a_run_created_through_one_instance_and_polled_through_another_is_charged_once(servers, azurite) -> None:
    backend = SimBackend("s", api_key="key-1")
    env = {
        "LB_CLIENT_KEYS": KEYS,
        "LB_CLIENT_LIMITS": BOTH,
        "BACKEND_1_URL": servers.start(backend),
        "BACKEND_1_APIKEY": "key-1",
        "LB_STATE_CONNECTION_STRING": azurite.connection_string,
        "LB_STATE_TABLE": "q" + uuid.uuid4().hex[:12],
    }
    a, b = (start_instance(servers, env) for _ in range(2))
    assistant = v1(a).beta.assistants.create(model="chat")
    thread = v1(a).beta.threads.create(messages=[{"role": "user", "content": "hello"}])
    run = v1(a).beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id)
    until(lambda: limit_of(b)["reserved"]["calls"] == 1)  # a's hold, seen by b
    while run.status != "completed":
        run = v1(b).beta.threads.runs.retrieve(run.id, thread_id=thread.id)

    def settled_on(url: str) -> bool:  # the run's usage charged once, and no hold left for it
        shown = limit_of(url)
        return shown["used_last_minute"]["tokens"] == run.usage.total_tokens and shown["reserved"]["calls"] == 0

    def settle() -> None:
        deadline = time.monotonic() + 10
        while not (settled_on(a) and settled_on(b)):
            assert time.monotonic() < deadline, (
                f"not settled: usage {run.usage.total_tokens}, a {limit_of(a)}, b {limit_of(b)}"
            )
            time.sleep(0.1)

    # a settles its hold with what b saw, and b reads a's row; a read through a within the same share
    # round could charge it again (docs/metering.md: a run seen finished on two instances in one second)
    settle()
    for instance in (a, b, a, b):  # later reads through either instance cost nothing
        v1(instance).beta.threads.runs.retrieve(run.id, thread_id=thread.id)
        v1(instance).beta.threads.runs.list(thread_id=thread.id)
    time.sleep(1.5)  # a share round or more: a second charge anywhere would show on both
    settle()
    for instance in (a, b):  # and it stays so: nothing charged twice
        assert limit_of(instance)["used_last_minute"]["tokens"] == run.usage.total_tokens


# The rules in time, on Metering alone ----------------------------------------------------------
RUN_PATH = "/openai/v1/threads/thread_1/runs"


class Body(httpx.AsyncByteStream):
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def a_run(status: str, ended: float | None = None, total: int = 500, rid: str = "run_1") -> dict[str, Any]:
    usage = {"prompt_tokens": total - 100, "completion_tokens": 100, "total_tokens": total} if ended else None
    return {"id": rid, "object": "thread.run", "status": status, "completed_at": ended, "usage": usage}


def answer(metering: Metering, client: str, path: str, shown: Any, body: Any = None) -> Charge | None:
    """One call through `metering`: admitted (`body` None: a read), answered `shown`, read to its end."""
    raw = json.dumps(body).encode() if body is not None else b""
    info = asyncio.run(described(path, raw))
    charge = metering.admit(client, info)
    upstream = httpx.Response(
        200, headers={"content-type": "application/json"}, stream=Body(json.dumps(shown).encode())
    )
    response = metering.observe(UpstreamResponse(upstream, "east", 1, lambda _: None), client, info, charge)

    async def drain() -> None:
        async for _ in response.body_iterator:
            pass

    asyncio.run(drain())
    return charge


def charged(metering: Metering, client: str = "bob") -> int:
    return metering.report(client)["limits"][client]["used_last_minute"]["tokens"]


def test_a_finished_run_first_seen_long_after_it_ended_and_held_nowhere_is_not_charged() -> None:
    """Its id may have been forgotten here (an hour) or never shared (another instance charged it
    more than SHARE_SECONDS ago): a thread's old runs, listed again, cost nothing."""
    clock = Clock()
    metering = Metering(parse_limits("bob=100000tpm"), Telemetry(), clock=clock)
    old = a_run("completed", ended=clock.now - SHARE_SECONDS)
    recent = a_run("completed", ended=clock.now - 30, total=700, rid="run_2")
    answer(metering, "bob", RUN_PATH, {"object": "list", "data": [recent, old]})
    assert charged(metering) == 700  # the recent one only: held nowhere, first seen here
    answer(metering, "bob", RUN_PATH, {"object": "list", "data": [recent, old]})
    assert charged(metering) == 700


def test_a_run_held_by_another_instance_is_settled_by_that_one_whoever_sees_it_finished() -> None:
    """The instance that sees a run finished while another holds its reservation charges nothing
    itself, and tells the holder (through the shared rows) what the run spent: the holder settles
    its hold with that, so a run polled through several instances is charged once, however late."""
    clock = Clock()
    holder, reader = (Metering(parse_limits("bob=100000tpm"), Telemetry(), clock=clock) for _ in range(2))
    create = answer(holder, "bob", RUN_PATH, a_run("queued"), body={"assistant_id": "asst_1"})
    assert create is not None
    reader.responses.runs_held_elsewhere = {"run_1": "instance-a"}  # as read from the holder's row
    answer(reader, "bob", f"{RUN_PATH}/run_1", a_run("completed", ended=clock.now - 3 * SHARE_SECONDS))
    assert charged(reader) == 0
    assert reader.responses.telling(clock.now) == {"run_1": [500, "instance-a"]}
    holder.responses.told_here = {"run_1": 500}  # the holder reads the reader's row
    holder.tick(clock.now)
    assert charged(holder) == 500 and holder.report("bob")["limits"]["bob"]["reserved"]["calls"] == 0
    answer(holder, "bob", f"{RUN_PATH}/run_1", a_run("completed", ended=clock.now - 5))
    assert charged(holder) == 500


def test_a_hold_never_seen_finished_is_charged_every_reservation_it_gathered() -> None:
    clock = Clock()
    metering = Metering(parse_limits("bob=100000tpm"), Telemetry(), clock=clock)
    create = answer(metering, "bob", RUN_PATH, a_run("queued"), body={"assistant_id": "asst_1"})
    submit = answer(
        metering,
        "bob",
        f"{RUN_PATH}/run_1/submit_tool_outputs",
        a_run("queued"),
        body={"tool_outputs": [{"tool_call_id": "call_1", "output": "x"}]},
    )
    assert create is not None and submit is not None
    assert metering.report("bob")["limits"]["bob"]["reserved"] == {"calls": 2, "tokens": create.tokens + submit.tokens}
    clock.now += HOLD_SECONDS + 1
    metering.tick(clock.now)
    assert charged(metering) == create.tokens + submit.tokens  # the run's usage never showed: what it reserved
    answer(metering, "bob", f"{RUN_PATH}/run_1", a_run("completed", ended=clock.now - 5))
    assert charged(metering) == create.tokens + submit.tokens  # charged once: not again when it shows up

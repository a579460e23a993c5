"""Stateful calls through a pool: 3 simulated backends, 2 `lb serve` instances sharing one Azurite table.

`python -m bench stateful [--code PATH] [--conversations N]`. The client is the openai SDK; each
call goes to the next instance in turn, as a load balancer in front of two Function instances
would send it. The calls: multi-turn Responses conversations (previous_response_id), retrievals,
input items, background responses polled to completion, deletes, and files uploaded then batches
made from them, polled, and their output read. Every backend keeps its own objects and answers
as Azure does for one it does not hold, so a call that reaches the wrong backend fails.

`--code /work/main` runs the proxies from another checkout (the backends stay this one's), to
compare with the balancer before object routing. Prints the calls made and failed, and the
object-table operations each instance made.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections import Counter
from typing import Any

import httpx
import openai

from bench.procs import Server, lb_command
from tests.azurite import start_azurite

KEY = "bench-stateful-key"
JSONL = b'{"custom_id": "1", "method": "POST", "url": "/chat/completions", "body": {"model": "chat", "messages": []}}\n'


class Tally:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    def call(self, kind: str, fn: Any) -> Any:
        self.calls[kind] += 1
        try:
            return fn()
        except openai.APIError as exc:
            self.failed[kind] += 1
            self.errors[f"{getattr(exc, 'status_code', '?')} {type(exc).__name__}"] += 1
            return None


def run(clients: list[openai.OpenAI], conversations: int, turns: int) -> Tally:
    tally = Tally()
    nxt = itertools.cycle(clients).__next__
    for _ in range(conversations):  # multi-turn conversations, each turn on the next instance
        previous = None
        for turn in range(turns):
            response = tally.call(
                "conversation turn",
                lambda p=previous, t=turn: nxt().responses.create(
                    model="chat", input=f"turn {t}", previous_response_id=p
                ),
            )
            previous = response.id if response is not None else previous
        if previous is None:
            continue
        for _ in range(3):
            tally.call("retrieve", lambda p=previous: nxt().responses.retrieve(p))
        tally.call("input items", lambda p=previous: nxt().responses.input_items.list(p))
        tally.call("delete", lambda p=previous: nxt().responses.delete(p))
    for _ in range(max(1, conversations // 2)):  # background responses polled to completion
        response = tally.call(
            "background", lambda: nxt().responses.create(model="chat", input="think", background=True)
        )
        for _ in range(10):
            if response is None or response.status not in ("queued", "in_progress"):
                break
            response = tally.call("background poll", lambda r=response: nxt().responses.retrieve(r.id))
    for _ in range(max(1, conversations // 2)):  # a file, a batch made from it, polled, its output read
        uploaded = tally.call("file upload", lambda: nxt().files.create(file=("in.jsonl", JSONL), purpose="batch"))
        if uploaded is None:
            continue
        batch = tally.call(
            "batch create",
            lambda u=uploaded: nxt().batches.create(
                input_file_id=u.id, endpoint="/chat/completions", completion_window="24h"
            ),
        )
        for _ in range(10):
            if batch is None or batch.status in ("completed", "failed", "cancelled"):
                break
            batch = tally.call("batch poll", lambda b=batch: nxt().batches.retrieve(b.id))
        if batch is not None and batch.output_file_id:
            tally.call("batch output", lambda b=batch: nxt().files.content(b.output_file_id).read())
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench stateful")
    parser.add_argument("--code", default=None, help="run the proxies from this checkout (e.g. /work/main)")
    parser.add_argument("--conversations", type=int, default=30)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument(
        "--clients", type=int, default=1, help="named keys sharing the pool (2+: each one's objects are its own)"
    )
    args = parser.parse_args(argv)
    keys = [KEY] if args.clients == 1 else [f"{KEY}-{i}" for i in range(1, args.clients + 1)]

    azurite = start_azurite()
    servers: list[Server] = []
    try:
        backends = [Server(f"backend{i}", ["bench.backend", "--name", f"sim{i}"]) for i in (1, 2, 3)]
        servers += backends
        names = ",".join(f"c{i}:{key}" for i, key in enumerate(keys, start=1))
        env = {"LB_CLIENT_KEYS": names, "LB_ADMIN_CLIENTS": "c1", "LB_LOG_LEVEL": "WARNING"}
        env["LB_STATE_TABLE"] = f"stateful{int(time.time())}"
        env["LB_STATE_CONNECTION_STRING"] = azurite.connection_string
        env["BACKEND_2_DEPLOYMENT_NAME"] = "gpt-4o"  # an openai-aca-lb setting, taken as it is
        for i, backend in enumerate(backends, start=1):
            env[f"BACKEND_{i}_URL"], env[f"BACKEND_{i}_APIKEY"] = backend.url, "bench-backend-key"
        serve = ["serve"] if args.code else ["lb", "serve"]
        proxies = []
        for i in (1, 2):
            proxies.append(Server(f"lb{i}", serve, env, command=lb_command(args.code)))
            servers.append(proxies[-1])
        started = time.perf_counter()
        tally = Tally()
        for key in keys:  # each client's whole mix in turn, through both instances
            clients = [
                openai.OpenAI(base_url=p.url + "/openai/v1", api_key=key, max_retries=0, timeout=30) for p in proxies
            ]
            one = run(clients, args.conversations, args.turns)
            tally.calls.update(one.calls)
            tally.failed.update(one.failed)
            tally.errors.update(one.errors)
        seconds = time.perf_counter() - started
        statuses = [httpx.get(p.url + "/lb/status", headers={"api-key": keys[0]}).json() for p in proxies]
    finally:
        for server in servers:
            server.stop()
        azurite.stop()

    total, failed = sum(tally.calls.values()), sum(tally.failed.values())
    who = f"{args.clients} clients" if args.clients > 1 else "1 client"
    print(f"## Stateful calls: 3 backends, 2 instances sharing Azurite, {who} ({args.code or 'this checkout'})\n")
    print("| call | made | failed |\n|---|---:|---:|")
    for kind, count in tally.calls.items():
        print(f"| {kind} | {count} | {tally.failed[kind]} |")
    print(f"| **all** | **{total}** | **{failed}** |\n")
    print(f"{failed} failed of {total} stateful calls ({failed / total:.0%}) in {seconds:.1f} s")
    if tally.errors:
        print("errors: " + ", ".join(f"{k} x{v}" for k, v in tally.errors.most_common()))
    for i, status in enumerate(statuses, start=1):
        objects = status.get("objects")
        if objects:
            ops = objects["store"].get("ops")
            print(f"instance {i}: records {objects['records']}, calls {objects['calls']}, object table ops {ops}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

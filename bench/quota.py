"""Token metering and per-client quotas, measured: `python -m bench quota [limit|accuracy|overhead|all]`.

- `accuracy`: 1,000 mixed calls through `lb serve` with the openai SDK (chat and Responses, JSON
  and streamed, random prompt sizes); the tokens `/lb/usage` counted must equal the sums of the
  `usage` the backend sent (relayed untouched, so the SDK reads the backend's own figures).
- `limit`: 4 `lb serve` instances on one Azurite table in front of one simulated backend; client
  `limited` (60 rpm) asks for twice that, spread over the instances, for 3 minutes; client `free`
  (600 rpm) asks for 60 rpm. Prints what `limited` was served per minute (goal 0.9x-1.1x its limit),
  the 429s `free` got (goal none) and the Table writes per instance per second (goal <= 1).
- `evasion`: client `bob` trying each way around its token limit, alone and combined,
  through 2 instances on one Azurite table, beside an honest client (`bench.quota_evasion`).
- `streamend`: a streamed chat's last byte through this branch and `--main`, with and without
  the client asking for usage (the balancer now always asks the backend).
- `overhead`: the hot path of this branch next to another checkout's (`--main`, default /work/main),
  and of this branch with a limit on the caller (Table state, counts shared), interleaved in one run
  with bench.overhead's pacing: added p50 over direct and CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from bench import overhead
from bench.procs import ROOT, Server, lb_command, markdown_table, percentiles, write_json
from tests.azurite import start_azurite

LIMITED_KEY, FREE_KEY = "limited-client-key", "free-client-key"
KEYS = f"limited:{LIMITED_KEY},free:{FREE_KEY}"
BACKEND_KEY = "bench-backend-key"


# accuracy ---------------------------------------------------------------------------------------
def accuracy(calls: int) -> dict[str, Any]:
    from openai import OpenAI

    with Server("backend", ["bench.backend", "--chunks", "8", "--chunk-gap", "0"]) as backend:
        env = {"BACKEND_1_URL": backend.url, "BACKEND_1_APIKEY": BACKEND_KEY, "LB_CLIENT_KEYS": FREE_KEY}
        env["LB_ADMIN_CLIENTS"] = "key1"  # the one key reads every count of /lb/usage
        with Server("lb", ["lb", "serve"], {**env, "LB_LOG_LEVEL": "WARNING"}) as lb:
            client = OpenAI(base_url=lb.url + "/openai/v1", api_key=FREE_KEY, max_retries=0)
            rng = random.Random(15)
            sent = {"prompt": 0, "completion": 0, "total": 0, "cached": 0}
            kinds = {"chat": 0, "chat-stream": 0, "responses": 0, "responses-stream": 0}
            for i in range(calls):
                text = "word " * rng.randint(1, 2000)
                kind = list(kinds)[i % 4]
                kinds[kind] += 1
                if kind == "chat":
                    u = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": text}]).usage
                    got = (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.prompt_tokens_details.cached_tokens)
                elif kind == "chat-stream":
                    stream = client.chat.completions.create(
                        model="chat",
                        messages=[{"role": "user", "content": text}],
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                    (u,) = [c.usage for c in stream if c.usage is not None]
                    got = (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.prompt_tokens_details.cached_tokens)
                elif kind == "responses":
                    r = client.responses.create(model="chat", input=text).usage
                    got = (r.input_tokens, r.output_tokens, r.total_tokens, r.input_tokens_details.cached_tokens)
                else:
                    with client.responses.stream(model="chat", input=text) as events:
                        r = events.get_final_response().usage
                    got = (r.input_tokens, r.output_tokens, r.total_tokens, r.input_tokens_details.cached_tokens)
                for name, value in zip(sent, got, strict=True):
                    sent[name] += value
            counted = httpx.get(lb.url + "/lb/usage", headers={"api-key": FREE_KEY}).json()
    (hour,) = [c["last_hour"] for c in counted["clients"].values()]  # one client: the one key
    metered = {k: hour[f"{k}_tokens"] for k in sent}
    return {
        "calls": calls,
        "kinds": kinds,
        "backend_usage": sent,
        "metered": metered,
        "unknown": hour["unknown_usage"],
        "equal": metered == sent,
    }


# limit ------------------------------------------------------------------------------------------
async def drive(urls: list[str], key: str, per_second: float, seconds: float, log: list[tuple[float, int]]) -> None:
    """Open-loop calls at `per_second`, round-robin over the instances; (time, status) of each."""
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=30, headers={"api-key": key}) as client:

        async def one(url: str) -> None:
            at = time.monotonic() - started
            response = await client.post(url + "/openai/v1/chat/completions", json=body)
            log.append((at, response.status_code))

        tasks = []
        n = 0
        while (elapsed := time.monotonic() - started) < seconds:
            due = n / per_second
            if due > elapsed:
                await asyncio.sleep(due - elapsed)
            tasks.append(asyncio.create_task(one(urls[n % len(urls)])))
            n += 1
        await asyncio.gather(*tasks)


def limit(instances: int, rpm: int, minutes: int) -> dict[str, Any]:
    azurite = start_azurite()
    servers: list[Server] = []
    try:
        backend = Server("backend", ["bench.backend", "--chunks", "2", "--chunk-gap", "0"])
        servers.append(backend)
        env = {
            "BACKEND_1_URL": backend.url,
            "BACKEND_1_APIKEY": BACKEND_KEY,
            "LB_CLIENT_KEYS": KEYS,
            "LB_ADMIN_CLIENTS": "free",  # reads both clients' pool counts
            "LB_CLIENT_LIMITS": f"limited={rpm}rpm,free={10 * rpm}rpm",
            "LB_STATE_CONNECTION_STRING": azurite.connection_string,
            "LB_STATE_TABLE": f"benchquota{int(time.time())}",
            "LB_LOG_LEVEL": "WARNING",
        }
        lbs = [Server(f"lb{i}", ["lb", "serve"], env) for i in range(instances)]
        servers.extend(lbs)
        urls = [s.url for s in lbs]
        limited: list[tuple[float, int]] = []
        free: list[tuple[float, int]] = []
        seconds = 60.0 * minutes
        started = time.monotonic()

        async def both() -> None:
            await asyncio.gather(
                drive(urls, LIMITED_KEY, 2 * rpm / 60, seconds, limited),
                drive(urls, FREE_KEY, rpm / 60, seconds, free),
            )

        asyncio.run(both())
        elapsed = time.monotonic() - started
        reports = [httpx.get(u + "/lb/usage", headers={"api-key": FREE_KEY}).json() for u in urls]
    finally:
        for server in servers:
            server.stop()
        azurite.close()
    per_minute = [sum(1 for at, s in limited if s == 200 and m * 60 <= at < (m + 1) * 60) for m in range(minutes)]
    writes = [r["pool"]["ops"]["writes"] for r in reports]
    return {
        "instances": instances,
        "limit_rpm": rpm,
        "limited_asked": len(limited),
        "limited_served_per_minute": per_minute,
        "ratio_per_minute": [round(n / rpm, 3) for n in per_minute],
        "limited_429": sum(1 for _, s in limited if s == 429),
        "limited_other": sum(1 for _, s in limited if s not in (200, 429)),
        "free_asked": len(free),
        "free_429": sum(1 for _, s in free if s == 429),
        "free_other": sum(1 for _, s in free if s not in (200, 429)),
        "table_writes_per_instance_per_second": [round(w / elapsed, 3) for w in writes],
    }


# overhead ---------------------------------------------------------------------------------------
class Targets(overhead.Targets):
    """bench.overhead's targets, with `lb` from this branch, another checkout's, and this one limited."""

    def __init__(self, main: Path, azurite_cs: str) -> None:
        def start(servers: dict[str, Server], backend: Server) -> None:
            base = {"BACKEND_1_URL": backend.url, "BACKEND_1_APIKEY": BACKEND_KEY, "LB_LOG_LEVEL": "WARNING"}
            plain = {**base, "LB_CLIENT_KEYS": overhead.CLIENT_KEY}
            limited = {
                **base,
                "LB_CLIENT_KEYS": f"bench:{overhead.CLIENT_KEY}",
                "LB_ADMIN_CLIENTS": "bench",
                "LB_CLIENT_LIMITS": "bench=1000000000tpm/1000000rpm",
                "LB_STATE_CONNECTION_STRING": azurite_cs,
                "LB_STATE_TABLE": f"benchover{int(time.time())}",
            }
            servers["lb"] = Server("lb", ["lb", "serve"], plain)
            servers["lb@main"] = Server("lb@main", ["serve"], plain, command=lb_command(str(main)))
            servers["lb+limit"] = Server("lb+limit", ["lb", "serve"], limited)

        self._start(20, 0.02, start)


def hot_path(main: Path, calls: int, cpu_calls: int, stream_calls: int) -> dict[str, Any]:
    azurite = start_azurite()
    try:
        t = Targets(main, azurite.connection_string)
        try:
            started = time.monotonic()
            seq = overhead.sequential(t, calls, 30)
            cpu = overhead.cpu_alone(t, cpu_calls)
            stream = overhead.streaming(t, stream_calls)
            elapsed = time.monotonic() - started
            usage = httpx.get(t.urls["lb+limit"] + "/lb/usage", headers={"api-key": overhead.CLIENT_KEY}).json()
        finally:
            t.stop()
    finally:
        azurite.close()
    p50 = {name: percentiles(s)["p50"] for name, s in seq.items()}
    first = {name: percentiles(s["first"])["p50"] for name, s in stream.items()}
    return {
        "added_p50_ms": {p: round(p50[p] - p50["direct"], 3) for p in t.proxies},
        "added_first_chunk_p50_ms": {p: round(first[p] - first["direct"], 3) for p in t.proxies},
        "cpu_ms_per_request": {p: round(v * 1000, 3) for p, v in cpu.items()},
        "limit_table_writes_per_second": round(usage["pool"]["ops"]["writes"] / elapsed, 3),
    }


def stream_end(main: Path, calls: int) -> dict[str, Any]:
    """Last-byte time of a streamed chat through this branch and `main`, the client asking for usage
    or not: what the balancer's own request for the usage chunk costs a client that did not ask."""
    backend = Server("backend", ["bench.backend", "--chunks", "20", "--chunk-gap", "0.02"])
    env = {"BACKEND_1_URL": backend.url, "BACKEND_1_APIKEY": BACKEND_KEY, "LB_CLIENT_KEYS": FREE_KEY}
    targets = {"direct": backend}
    try:
        targets["lb"] = Server("lb", ["lb", "serve"], {**env, "LB_LOG_LEVEL": "WARNING"})
        targets["lb@main"] = Server("lb@main", ["serve"], env, command=lb_command(str(main)))
        results: dict[str, Any] = {}
        with httpx.Client(timeout=30, headers={"api-key": FREE_KEY}) as http:
            for asked in (False, True):
                body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
                if asked:
                    body["stream_options"] = {"include_usage": True}
                times: dict[str, list[float]] = {name: [] for name in targets}
                for _ in range(calls):
                    for name, server in targets.items():  # interleaved: noise hits each alike
                        started = time.perf_counter()
                        http.post(server.url + "/openai/v1/chat/completions", json=body).read()
                        times[name].append(time.perf_counter() - started)
                key = "client asks usage" if asked else "client does not ask"
                results[key] = {name: round(percentiles(t)["p50"], 2) for name, t in times.items()}
    finally:
        for server in targets.values():
            server.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench quota", description=__doc__)
    modes = ("limit", "accuracy", "overhead", "evasion", "streamend", "all")
    p.add_argument("what", nargs="?", choices=modes, default="limit")
    p.add_argument("--calls", type=int, default=1000, help="accuracy: mixed calls")
    p.add_argument("--instances", type=int, default=4)
    p.add_argument("--rpm", type=int, default=60)
    p.add_argument("--minutes", type=int, default=3)
    p.add_argument("--main", type=Path, default=Path("/work/main"), help="overhead: the checkout to compare with")
    p.add_argument("--seq-calls", type=int, default=300)
    p.add_argument("--cpu-calls", type=int, default=1000)
    p.add_argument("--stream-calls", type=int, default=60)
    p.add_argument("--seconds-each", type=float, default=300, help="evasion: seconds per way alone (0: skip)")
    p.add_argument("--seconds-combined", type=float, default=300, help="evasion: seconds of all ways at once")
    p.add_argument("--lb-root", default=None, help="evasion: run this checkout's lb (e.g. main's) instead")
    p.add_argument("--ways", default=None, help="evasion: comma list (no_usage,background,concurrent,cut,gzip)")
    args = p.parse_args(argv)
    results: dict[str, Any] = {}
    if args.what in ("accuracy", "all"):
        results["accuracy"] = accuracy(args.calls)
        print("## Metered tokens vs the backend's usage\n\n" + json.dumps(results["accuracy"], indent=1))
    if args.what in ("limit", "all"):
        results["limit"] = r = limit(args.instances, args.rpm, args.minutes)
        print(f"\n## {r['instances']} instances, one Azurite table, client 'limited' at {r['limit_rpm']} rpm\n")
        rows = [[m + 1, n, f"{n / r['limit_rpm']:.2f}x"] for m, n in enumerate(r["limited_served_per_minute"])]
        print(markdown_table(["minute", "limited served", "of its limit"], rows))
        print(f"\nlimited: asked {r['limited_asked']}, 429 {r['limited_429']}, other errors {r['limited_other']}")
        print(f"free (under its limit): asked {r['free_asked']}, 429 {r['free_429']}, other errors {r['free_other']}")
        print(f"Table writes per instance per second: {r['table_writes_per_instance_per_second']}")
    if args.what in ("overhead", "all"):
        results["overhead"] = o = hot_path(args.main, args.seq_calls, args.cpu_calls, args.stream_calls)
        print("\n## Hot path: this branch, --main's code, this branch with a limit (Table)\n")
        rows = [
            [t, o["added_p50_ms"][t], o["added_first_chunk_p50_ms"][t], o["cpu_ms_per_request"][t]]
            for t in o["cpu_ms_per_request"]
        ]
        print(markdown_table(["target", "added p50 ms", "added first-chunk p50 ms", "CPU ms/req"], rows))
        print(f"\nTable writes per second with the limit on: {o['limit_table_writes_per_second']}")
    if args.what == "streamend":
        results["streamend"] = r = stream_end(args.main, args.stream_calls)
        print("## Streamed chat, 20 chunks 20 ms apart: last byte p50 (ms)\n\n" + json.dumps(r, indent=1))
    if args.what == "evasion":
        from bench.quota_evasion import evasion

        ways = args.ways.split(",") if args.ways else None
        results["evasion"] = {"runs": evasion(args.seconds_each, args.seconds_combined, args.lb_root, ways)}
    for part, result in results.items():
        out = ROOT / "bench" / "results" / f"quota-{part}.json"
        write_json({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **result}, out)
        print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

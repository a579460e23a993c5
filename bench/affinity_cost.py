"""What prompt-cache affinity costs the proxy per request: the same checkout with LB_AFFINITY on and off.

    python -m bench.affinity_cost [--calls 4000] [--backends 3] [--base CHECKOUT]

Two `python -m lb serve` processes from this checkout, differing only in LB_AFFINITY, in front of
the same simulated backend (named `--backends` times, so the pick has a choice and the key is
read); the chat of `bench overhead` sent sequentially in alternating blocks, and each process's
CPU time (utime + stime from /proc) divided by its calls. A before/after of one setting, so the
difference is affinity's alone, not another commit's. `--base` instead runs this checkout and
another (e.g. main), both with the default settings, the same way: a before/after of a commit.
"""

from __future__ import annotations

import argparse
import json
import sys

import httpx

from bench.procs import Server, lb_command

PATH = "/openai/deployments/chat/chat/completions?api-version=2024-10-21"
BODY = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}).encode()
HEADERS = {"api-key": "bench-client-key", "content-type": "application/json"}


def measure(calls: int, backends: int, blocks: int = 8, base: str | None = None, warmup: int = 100) -> dict[str, float]:
    """CPU ms per request of `lb serve` with LB_AFFINITY=on and =off (`base`: of this checkout and `base`),
    after `warmup` calls through each that are not counted."""
    backend = Server("backend", ["bench.backend", "--chunks", "5", "--chunk-gap", "0"], wait=False)
    env = {"LB_CLIENT_KEYS": HEADERS["api-key"], "LB_LOG_LEVEL": "WARNING"}
    for i in range(1, backends + 1):
        env |= {f"BACKEND_{i}_URL": backend.url, f"BACKEND_{i}_APIKEY": "bench-backend-key"}
    if base:
        proxies = {
            "this": Server("lb-this", ["lb", "serve"], env, wait=False),
            "base": Server("lb-base", ["serve"], env, command=lb_command(base), wait=False),
        }
    else:
        proxies = {
            mode: Server(f"lb-{mode}", ["lb", "serve"], env | {"LB_AFFINITY": mode}, wait=False)
            for mode in ("on", "off")
        }
    spent = dict.fromkeys(proxies, 0.0)
    per_block = max(1, calls // blocks)
    try:
        for server in (backend, *proxies.values()):  # started side by side: none needs another to start
            server.wait_listening()
        with httpx.Client(timeout=30, trust_env=False) as client:
            for server in proxies.values():  # warm-up: connections, imports, first-call caches
                for _ in range(warmup):
                    client.post(server.url + PATH, content=BODY, headers=HEADERS).raise_for_status()
            for block in range(blocks):
                order = list(proxies.items()) if block % 2 == 0 else list(reversed(proxies.items()))
                for mode, server in order:
                    before = server.cpu()
                    for _ in range(per_block):
                        client.post(server.url + PATH, content=BODY, headers=HEADERS).raise_for_status()
                    spent[mode] += server.cpu() - before
    finally:
        for server in (*proxies.values(), backend):
            server.stop()
    return {mode: round(seconds / (per_block * blocks) * 1000, 3) for mode, seconds in spent.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.affinity_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4000, help="sequential calls through each process")
    parser.add_argument("--backends", type=int, default=3, help="backends named (all the one simulated backend)")
    parser.add_argument("--base", default=None, help="compare this checkout with that one (both default settings)")
    args = parser.parse_args(argv)
    cpu = measure(args.calls, args.backends, base=args.base)
    print(f"CPU ms per request, {args.calls} calls each, {args.backends} backends: {cpu}")
    first, second = ("this", "base") if args.base else ("on", "off")
    label = "this - base" if args.base else "affinity on - off"
    print(f"{label}: {cpu[first] - cpu[second]:+.3f} ms ({cpu[first] / cpu[second] - 1:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

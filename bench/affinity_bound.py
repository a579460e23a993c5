"""Where prompt-cache affinity applies, and the load bound no client can steer.

    python -m bench.affinity_bound [--instances 1 4] [--state table|memory] [--base CHECKOUT]

Through real `python -m lb serve` processes (3 simulated backends, weights 1:1:1, default settings
but for `LB_AFFINITY` where named), on one Azurite table (`--state memory`: each instance alone),
a fresh pool (`LB_POOL`) per run, each call to a random instance:
- 60 identical short calls ("Hello", 16 max tokens), with affinity on (the default) and off:
  calls per backend.
- 300 calls with a long prompt (a 1,100-token system prompt, over Azure's 1,024-token caching
  minimum) whose `prompt_cache_key`s a client chose:
  - `crafted offline`: keys the public hash ranks backend 1 first and whose draw keeps them there
    (what a client could find without the pool's secret);
  - `crafted with the secret`: keys the pool's own, secret-keyed ranking puts on backend 1 (a client
    that learnt them by probing: the worst case; the secret read from the pool's table once its
    instances started; with --base, the secret main derived from the configuration; not run with
    --state memory);
  - `one fixed key` for every call, and `a key per call` for comparison.
  For each: calls per backend, and the most any backend served of its fair share over every
  prefix of the run from the 30th call on (the issue's goal: at most 1.35x).
`--base` runs the proxy of another checkout (e.g. main) instead, with this checkout's clients.
Writes bench/results/affinity-bound.json (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # also runnable as `python bench/affinity_bound.py`

from bench.procs import Server, lb_command  # noqa: E402
from bench.throttle_instances import CLIENT_KEY, proxy_env  # noqa: E402
from lb.config import load_settings  # noqa: E402
from lb.routing.affinity import Affinity, _draw, conversation_key, pool_secret, rank  # noqa: E402
from lb.sim import Servers, SimBackend  # noqa: E402
from lb.state.affinity import read_secret  # noqa: E402
from lb.state.table import make_table_client  # noqa: E402
from tests.azurite import start_azurite  # noqa: E402

OUT = ROOT / "bench" / "results" / "affinity-bound.json"
API_VERSION = "2024-10-21"
BACKENDS = 3
SYSTEM = "You answer from the manual below, and only from it.\n" + "Manual text, section by section. " * 140
HELLO = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}
AFTER = 30  # the bound is checked from this many calls on
GOAL = 1.35  # no backend above this multiple of its fair share from AFTER calls on
SETTLE_SECONDS = 2.5  # after the last instance started: every instance has read the others' rows (LB_STATE_REFRESH_MS)


def long_body(key: str) -> dict[str, Any]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "q"}]
    return {"messages": messages, "prompt_cache_key": key}


def crafted_offline(n: int, names: list[str]) -> list[str]:
    """Keys the public hash ranks first on backend 1, with a draw that keeps them (as found against main)."""
    backends = [_Named(name) for name in names]
    keys: list[str] = []
    i = 0
    while len(keys) < n:
        key = conversation_key(json.dumps(long_body(f"c{i}")).encode())
        assert key is not None
        if rank(key, backends)[0] == 0 and _draw(key, backends[0]) > 0.7:  # type: ignore[arg-type]
            keys.append(f"c{i}")
        i += 1
    return keys


def crafted_with_secret(n: int, env: dict[str, str], derived: bool = False) -> list[str]:
    """Keys the pool's own, secret-keyed ranking puts first on backend 1: the worst a client can do.

    `derived`: the secret main derived from the configuration (names, URLs, API keys), for --base.
    """
    settings = load_settings(env)
    backends = list(settings.backends)
    affinity = Affinity(pool_secret(backends) if derived else table_secret(settings.state))
    first = next(i for i, b in enumerate(backends) if b.name == "1")
    keys: list[str] = []
    i = 0
    while len(keys) < n:
        key = conversation_key(json.dumps(long_body(f"s{i}")).encode())
        assert key is not None
        if affinity.order(key, backends)[0] == first:
            keys.append(f"s{i}")
        i += 1
    return keys


def table_secret(state: Any) -> bytes:
    """The pool's secret as its instances read it from the table."""

    async def read() -> bytes | None:
        client, _ = make_table_client(state, 5.0, lambda request: None)
        async with client:
            return await read_secret(client, f"{state.pool}.affinity", 5.0, create=False)

    secret = asyncio.run(read())
    if secret is None:
        raise RuntimeError("the pool's instances wrote no secret")
    return secret


class _Named:
    """Just enough of a Backend for the public `rank` (equal weights)."""

    def __init__(self, name: str) -> None:
        self.name, self.weight = name, 1.0


def worst_share(picks: list[str], after: int = AFTER) -> float:
    """The most any backend served of its fair share, over every prefix of `picks` from `after` calls on."""
    counts: Counter[str] = Counter()
    worst = 0.0
    for n, name in enumerate(picks, start=1):
        counts[name] += 1
        if n >= after:
            worst = max(worst, max(counts.values()) / (n / BACKENDS))
    return round(worst, 3)


def holds_from(picks: list[str], goal: float = GOAL) -> int | None:
    """The first call count from which no backend is ever above `goal` times its fair share; None: never."""
    counts: Counter[str] = Counter()
    last_over = 0
    for n, name in enumerate(picks, start=1):
        counts[name] += 1
        if max(counts.values()) > goal * n / BACKENDS:
            last_over = n
    return last_over + 1 if last_over < len(picks) else None


def send(urls: list[str], bodies: list[dict[str, Any]], seed: int) -> list[str]:
    """Each body, in turn, to a random instance; the backend that served each."""
    rng = random.Random(seed)
    served = []
    with httpx.Client(timeout=30, headers={"api-key": CLIENT_KEY}) as client:
        for body in bodies:
            url = f"{rng.choice(urls)}/openai/deployments/chat/chat/completions?api-version={API_VERSION}"
            answer = client.post(url, json=body)
            answer.raise_for_status()
            served.append(answer.headers["x-lb-backend"])
    return served


Bodies = Callable[[dict[str, str]], list[dict[str, Any]]]


def run(instances: int, env: dict[str, str], bodies: Bodies, base: str | None, seed: int) -> list[str]:
    """Starts `instances` proxies (a fresh pool of the table), then sends what `bodies(env)` makes."""
    command = lb_command(base)
    args = ["serve"] if command else ["lb", "serve"]
    if "LB_STATE_CONNECTION_STRING" in env:
        env = {**env, "LB_POOL": f"p{time.time_ns()}"}
    servers = [Server(f"lb-{i}", args, env=env, command=command, quiet=True) for i in range(instances)]
    try:
        if "LB_STATE_CONNECTION_STRING" in env:
            time.sleep(SETTLE_SECONDS)
        return send([s.url for s in servers], bodies(env), seed)
    finally:
        for server in servers:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.affinity_bound", description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--base", default=None, help="run this checkout's proxy instead (e.g. main's)")
    parser.add_argument("--state", choices=["table", "memory"], default="table")
    parser.add_argument("--only", default="", help="run only the scenarios whose name contains this")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    sims = Servers()
    urls = [sims.start(SimBackend(f"sim{i}", api_key=f"key-{i}", latency=0.005)) for i in range(1, BACKENDS + 1)]
    rows: list[dict[str, Any]] = []
    azurite = start_azurite() if args.state == "table" else None
    try:
        state = (
            {"LB_STATE_CONNECTION_STRING": azurite.connection_string, "LB_STATE_TABLE": "affbound"} if azurite else {}
        )
        on, off = proxy_env(urls, state), proxy_env(urls, {**state, "LB_AFFINITY": "off"})
        on.pop("LB_AFFINITY", None)  # the default, as a new user has it
        names = [str(i) for i in range(1, BACKENDS + 1)]
        offline = [long_body(k) for k in crafted_offline(args.calls, names)]
        scenarios: list[tuple[str, dict[str, str], Bodies]] = [
            ("60 identical short calls, default", on, lambda env: [HELLO] * 60),
            ("60 identical short calls, LB_AFFINITY=off", off, lambda env: [HELLO] * 60),
            ("crafted offline", on, lambda env: offline),
        ]
        if azurite is not None:  # --base: main's secret, derived from the configuration
            derived = args.base is not None
            scenarios.append(
                (
                    "crafted with the secret",
                    on,
                    lambda env: [long_body(k) for k in crafted_with_secret(args.calls, env, derived)],
                )
            )
        scenarios += [
            ("one fixed key", on, lambda env: [long_body("everyone")] * args.calls),
            ("a key per call", on, lambda env: [long_body(f"u{i}") for i in range(args.calls)]),
        ]
        print(
            f"{'scenario':42} {'instances':>9}  calls per backend  most of fair share from call {AFTER}"
            f"  {GOAL}x holds from call"
        )
        for n in args.instances:
            for name, env, bodies in scenarios:
                if args.only not in name:
                    continue
                picks = run(n, env, bodies, args.base, args.seed)
                counts = Counter(picks)
                row = {
                    "scenario": name,
                    "instances": n,
                    "calls": len(picks),
                    "per_backend": {b: counts.get(b, 0) for b in names},
                    "worst_share": worst_share(picks) if len(picks) >= AFTER else None,
                    "bound_holds_from_call": holds_from(picks),
                }
                rows.append(row)
                spread = " ".join(f"{b}:{row['per_backend'][b]:3}" for b in names)
                print(
                    f"{name:42} {n:9}  {spread}   {row['worst_share']:<38} {row['bound_holds_from_call']}", flush=True
                )
    finally:
        sims.stop()
        if azurite is not None:
            azurite.close()
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(args.base or str(ROOT)),
        "base": args.base,
        "state": args.state,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def _commit(checkout: str) -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


if __name__ == "__main__":
    sys.exit(main())

"""The affinity benchmark's conversations through the pick alone, in simulated time: seconds, not minutes.

    python -m bench.affinity_model [--factors 0.95 1.0 1.05] [--seeds 16 17 18 19] [--instances 1 4]
    python -m bench.affinity_model --throttled [--seeds 16 17 18 19]

No server, no socket: each call's key is computed from its body, `lb.routing.affinity.Affinity.choose` (one
per instance, each call to a random instance) picks among 3 equal backends at the call's simulated
time, and one `lb.sim.cache.PromptCache` per backend says what was cached. This is how the bounded
load's factor was chosen (docs/affinity.md); `python -m bench affinity` then measures the chosen
one through real `lb serve` processes.

`--throttled` takes backend 1 out for 3 s of every 10 (as the benchmark's 429 spells do, the
failover then being instant) and compares random, affinity and two routers no proxy can be:
`sticky` (affinity, but a conversation moved by a spell stays where it went, remembered per
conversation across the pool) and `oracle` (each call to the available backend holding the longest
prefix of it: the most any router can cache, ignoring load).
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys

from bench.affinity_load import Conversation, conversations
from lb.config import Backend
from lb.routing.affinity import Affinity, conversation_key
from lb.sim.cache import PromptCache, _idle, prefix_hashes, prompt_text, tokens

ANSWER_SECONDS = 0.05  # simulated time a call takes


PERIOD, SPELL = 10.0, 3.0  # --throttled: backend 1 out for the last SPELL seconds of every PERIOD


def replay(
    convs: list[Conversation],
    instances: int,
    factor: float | None,
    seed: int = 1,
    throttled: bool = False,
    router: str = "affinity",
) -> tuple[float, list[float]]:
    """(cached share of prompt tokens, share of calls per backend); `factor` None: weighted random."""
    backends = [Backend(str(i), f"http://sim{i}") for i in (1, 2, 3)]
    picks = [Affinity(b"model", factor=factor or 1.0) for _ in range(instances)]
    caches = [PromptCache() for _ in backends]
    rng = random.Random(seed)
    events = [(c.start, i, 0) for i, c in enumerate(convs)]
    heapq.heapify(events)
    cached = prompt = 0
    served = [0] * len(backends)
    moved: dict[int, int] = {}  # sticky: conversation -> backend a spell moved it to
    while events:
        now, i, turn = heapq.heappop(events)
        body = convs[i].body(turn)
        text = prompt_text(body)
        out = throttled and now % PERIOD >= PERIOD - SPELL
        members = backends[1:] if out else backends
        if factor is None:
            b = backends.index(rng.choice(members))
        elif router == "oracle":  # affinity's choice unless another holds a longer prefix
            key = conversation_key(json.dumps(body).encode())
            assert key is not None
            first = backends.index(rng.choice(picks).choose(key, "chat", members, [1.0] * len(members), now))
            b = max((backends.index(m) for m in members), key=lambda j: (_held(caches[j], text, now), j == first))
        else:
            key = conversation_key(json.dumps(body).encode())
            assert key is not None
            b = backends.index(rng.choice(picks).choose(key, "chat", members, [1.0] * len(members), now))
            if router == "sticky":
                if out and picks[0].order(key, backends)[0] == 0:
                    moved.setdefault(i, b)
                b = moved.get(i, b)
        cached += caches[b].serve("chat", text, now)
        prompt += tokens(text)
        served[b] += 1
        if turn + 1 < convs[i].turns:
            heapq.heappush(events, (now + ANSWER_SECONDS + convs[i].think[turn], i, turn + 1))
    return cached / prompt, [n / sum(served) for n in served]


def _held(cache: PromptCache, text: str, now: float) -> int:
    """Cached tokens `cache` would give `text` now, without remembering it."""
    cached = 0
    for size, digest in prefix_hashes(text):
        last = cache._seen.get(("chat", digest))
        if last is None or now - last > _idle(digest):
            break
        cached = size
    return cached


def most(convs: list[Conversation]) -> float:
    """The cached share had one backend served every call."""
    cache = PromptCache()
    calls = []
    for i, conv in enumerate(convs):
        at = conv.start
        for turn in range(conv.turns):
            calls.append((at, i, turn))
            at += ANSWER_SECONDS + conv.think[turn]
    cached = prompt = 0
    for at, i, turn in sorted(calls):
        text = prompt_text(convs[i].body(turn))
        cached += cache.serve("chat", text, at)
        prompt += tokens(text)
    return cached / prompt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.affinity_model", description=__doc__.splitlines()[0])
    parser.add_argument("--factors", type=float, nargs="+", default=[0.95, 1.0, 1.05])
    parser.add_argument("--seeds", type=int, nargs="+", default=[16, 17, 18, 19])
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--throttled", action="store_true", help="backend 1 out 3 s of every 10: four routers")
    args = parser.parse_args(argv)
    if args.throttled:
        return _throttled(args.seeds, args.conversations)
    print("seed instances factor   cached  of-most  x-random  load per backend    off share")
    for seed in args.seeds:
        convs = conversations(args.conversations, 20.0, (0.5, 1.5), seed)
        bound = most(convs)
        random_share, _ = replay(convs, 1, None)
        for n in args.instances:
            for factor in args.factors:
                share, load = replay(convs, n, factor)
                off = max(abs(s * len(load) - 1) for s in load)
                print(
                    f"{seed:4} {n:9} {factor:6} {share:8.3f} {share / bound:8.3f} {share / random_share:9.2f}  "
                    + " ".join(f"{s:.3f}" for s in load)
                    + f"  {off:9.3f}",
                    flush=True,
                )
    return 0


def _throttled(seeds: list[int], n: int) -> int:
    print(
        "seed  most   random(healthy)  random  affinity  sticky  oracle   affinity/random  sticky/random  oracle/random"
    )
    for seed in seeds:
        convs = conversations(n, 20.0, (0.5, 1.5), seed)
        healthy, _ = replay(convs, 1, None)
        rand, _ = replay(convs, 1, None, throttled=True)
        runs = [replay(convs, 1, 0.95, throttled=True, router=r) for r in ("affinity", "sticky", "oracle")]
        shares = [share for share, _ in runs]
        print(
            f"{seed:4} {most(convs):6.3f} {healthy:10.3f} {rand:12.3f} "
            + " ".join(f"{x:8.3f}" for x in shares)
            + "   "
            + "  ".join(f"{x / rand:13.2f}" for x in shares)
            + "   load: "
            + " | ".join(" ".join(f"{s:.2f}" for s in load) for _, load in runs),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The affinity benchmark's conversations through the pick alone, in simulated time: seconds, not minutes.

    python -m bench.affinity_model [--factors 0.95 1.0 1.05] [--seeds 16 17 18 19] [--instances 1 4]

No server, no socket: each call's key is computed from its body, `lb.routing.affinity.Affinity.choose` (one
per instance, each call to a random instance) picks among 3 equal backends at the call's simulated
time, and one `lb.sim.cache.PromptCache` per backend says what was cached. This is how the bounded
load's factor was chosen (docs/affinity.md); `python -m bench affinity` then measures the chosen
one through real `lb serve` processes.
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
from lb.sim.cache import PromptCache, prompt_text, tokens

ANSWER_SECONDS = 0.05  # simulated time a call takes


def replay(convs: list[Conversation], instances: int, factor: float | None, seed: int = 1) -> tuple[float, list[float]]:
    """(cached share of prompt tokens, share of calls per backend); `factor` None: weighted random."""
    backends = [Backend(str(i), f"http://sim{i}") for i in (1, 2, 3)]
    picks = [Affinity(factor=factor or 1.0) for _ in range(instances)]
    caches = [PromptCache() for _ in backends]
    rng = random.Random(seed)
    events = [(c.start, i, 0) for i, c in enumerate(convs)]
    heapq.heapify(events)
    cached = prompt = 0
    served = [0] * len(backends)
    while events:
        now, i, turn = heapq.heappop(events)
        body = convs[i].body(turn)
        if factor is None:
            b = rng.randrange(len(backends))
        else:
            key = conversation_key(json.dumps(body).encode())
            assert key is not None
            b = backends.index(rng.choice(picks).choose(key, "chat", backends, [1.0] * len(backends), now))
        text = prompt_text(body)
        cached += caches[b].serve("chat", text, now)
        prompt += tokens(text)
        served[b] += 1
        if turn + 1 < convs[i].turns:
            heapq.heappush(events, (now + ANSWER_SECONDS + convs[i].think[turn], i, turn + 1))
    return cached / prompt, [n / sum(served) for n in served]


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
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())

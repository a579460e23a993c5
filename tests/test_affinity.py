from __future__ import annotations

import itertools
import json
import random
import time
from collections import Counter

import pytest

from lb.config import Backend
from lb.requestinfo import RequestInfo
from lb.routing.affinity import (
    HEAD_BYTES,
    Affinity,
    RecentLoad,
    _draw,
    cacheable,
    conversation_key,
    pool_secret,
    prompt_tokens,
    rank,
)
from lb.routing.balancer import Balancer, Demand
from lb.state import MemoryStore

NOW = 1_000.0
SYSTEM = {"role": "system", "content": "You answer from the sources. " * 150}  # 1,088 tokens: Azure caches it
SHORT = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}).encode()


def asked(body: bytes) -> RequestInfo:
    """A chat call carrying `body`, as the balancer is handed it."""
    return RequestInfo("/openai/v1/chat/completions", "chat", body)


def chat(*turns: str, **extra: object) -> bytes:
    """A chat body: the system message, then user / assistant turns alternating."""
    messages = [SYSTEM]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return json.dumps({"messages": messages, **extra}).encode()


def balancer(*backends: Backend, policy: str = "random", secret: bytes = b"the pool's") -> Balancer:
    """With a fixed secret, as every instance of a pool has (the table's); alone a process draws its own."""
    lb = Balancer(backends, MemoryStore(), rng=random.Random(7), policy=policy, affinity=True)
    assert lb.affinity is not None
    lb.affinity.secret = secret
    return lb


def three(**weights: float) -> tuple[Backend, ...]:
    return tuple(Backend(n, f"https://{n}", weight=weights.get(n, 1.0)) for n in ("a", "b", "c"))


# The key -----------------------------------------------------------------------------------------
def test_every_turn_of_a_conversation_has_the_key_of_its_first():
    first = conversation_key(chat("What is in the contract?"))
    assert first is not None
    assert conversation_key(chat("What is in the contract?", "It says ...", "And the deadline?")) == first
    assert conversation_key(chat("What is in the invoice?")) != first


def test_the_key_survives_compact_and_spaced_json_alike_within_one_client():
    messages = [SYSTEM, {"role": "user", "content": "q"}]
    compact = json.dumps({"messages": messages}, separators=(",", ":")).encode()
    later = json.dumps({"messages": [*messages, {"role": "assistant", "content": "a"}]}, separators=(",", ":"))
    assert conversation_key(compact) == conversation_key(later.encode())


def test_prompt_cache_key_then_user_name_the_conversation_when_sent():
    assert conversation_key(chat("x", prompt_cache_key="conv-1")) == conversation_key(
        chat("y", prompt_cache_key="conv-1")
    )
    assert conversation_key(chat("x", user="alice")) == conversation_key(chat("y", user="alice"))
    assert conversation_key(chat("x", user="alice", prompt_cache_key="k")) == conversation_key(
        chat("z", user="bob", prompt_cache_key="k")
    )
    assert conversation_key(chat("x", user="alice")) != conversation_key(chat("x", user="bob"))


def test_the_word_user_as_a_role_or_inside_text_is_not_a_user_field():
    quoted = chat('He wrote "user": "mallory" in the form')
    assert conversation_key(quoted) == conversation_key(chat('He wrote "user": "mallory" in the form', "ok"))
    assert conversation_key(quoted) != conversation_key(chat("x", user="mallory"))


def test_responses_api_keys_on_instructions_and_the_first_user_input():
    def body(*items: dict, instructions: str = "Be brief.") -> bytes:
        return json.dumps({"model": "chat", "input": list(items), "instructions": instructions}).encode()

    q = {"role": "user", "content": [{"type": "input_text", "text": "Where is my parcel?"}]}
    a = {"role": "assistant", "content": "In Lyon."}
    assert conversation_key(body(q)) == conversation_key(body(q, a, {"role": "user", "content": "When?"}))
    assert conversation_key(body(q)) != conversation_key(body(q, instructions="Be long."))
    text = json.dumps({"model": "chat", "input": "Hello there", "instructions": "Be brief.", "store": False})
    assert conversation_key(text.encode()) is not None


def test_bodies_that_name_no_conversation_have_no_key():
    assert conversation_key(b"") is None
    assert conversation_key(b"not json at all") is None
    assert conversation_key(b'{"input": ["a", "b"], "model": "embedding"}') is None  # embeddings: no user message
    assert conversation_key(json.dumps({"messages": [{"role": "system", "content": "s"}]}).encode()) is None
    assert conversation_key(b'{"messages": [{"role": "user", "content": "unterminated') is not None  # a head is a head


def test_a_huge_prompt_is_keyed_by_its_head_in_bounded_time():
    big = chat("q" * 20_000_000, user=None)  # ~20 MB, `user` null: no key field
    other = chat("q" * 20_000_000 + "different tail")
    elapsed = []
    for _ in range(3):  # the best of three: the machine's other work is not the key's cost
        started = time.perf_counter()
        key = conversation_key(big)
        elapsed.append(time.perf_counter() - started)
    assert key is not None and key == conversation_key(other)  # only the head is read
    assert min(elapsed) < 0.02  # a json.loads of these 20 MB takes about 0.1 s


def test_the_first_user_message_is_read_only_as_far_as_its_head():
    long_user = "u" * (3 * HEAD_BYTES)
    assert conversation_key(chat(long_user)) == conversation_key(chat(long_user + "more"))


# The order ---------------------------------------------------------------------------------------
def test_rank_is_the_same_everywhere_and_removing_a_backend_moves_only_its_keys():
    backends = three()
    keys = range(2000)
    before = {k: backends[rank(k, backends)[0]].name for k in keys}
    assert before == {k: backends[rank(k, list(backends))[0]].name for k in keys}
    without_b = (backends[0], backends[2])
    after = {k: without_b[rank(k, without_b)[0]].name for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != "b")


def test_first_choices_spread_over_keys_by_weight():
    backends = three(a=2.0)
    counts = Counter(backends[rank(k, backends)[0]].name for k in range(20_000))
    assert 0.47 < counts["a"] / 20_000 < 0.53  # weight 2 of 4
    assert 0.22 < counts["b"] / 20_000 < 0.28 and 0.22 < counts["c"] / 20_000 < 0.28


# The pick ----------------------------------------------------------------------------------------
def test_the_same_conversation_gets_the_same_backend_turn_after_turn():
    lb = balancer(*three())
    body = chat("Plan my trip")
    picks = {lb.pick("chat", NOW + i, need=lb.demand(asked(body))).name for i in range(5)}
    picks |= {lb.pick("chat", NOW + 5, need=lb.demand(asked(chat("Plan my trip", "Where to?", "Rome")))).name}
    assert len(picks) == 1


def test_every_instance_with_the_pools_secret_picks_alike_without_sharing_counts():
    body = chat("Summarise the report")
    first = {balancer(*three()).pick("chat", NOW, need=balancer(*three()).demand(asked(body))).name for _ in range(10)}
    assert len(first) == 1


def local_secrets(backends: tuple[Backend, ...]) -> set[bytes]:
    found = set()
    for _ in range(5):
        affinity = Balancer(backends, MemoryStore(), affinity=True).affinity
        assert affinity is not None
        found.add(affinity.secret)
    return found


def test_entra_only_backends_have_no_key_to_hide_the_ranking_so_each_process_draws_a_secret():
    """A secret derived from names and URLs alone would be predictable (as it was on main)."""
    entra_only = tuple(Backend(n, f"https://{n}") for n in ("a", "b", "c"))
    found = local_secrets(entra_only)
    assert len(found) == 5 and all(len(s) == 32 for s in found)
    assert pool_secret(entra_only) not in found


def test_with_api_keys_every_process_derives_one_secret_no_client_can():
    with_keys = tuple(Backend(n, f"https://{n}", api_key=f"key-{n}") for n in ("a", "b", "c"))
    assert local_secrets(with_keys) == {pool_secret(with_keys)}


def test_a_cooling_backend_passes_the_conversation_to_its_next_and_gets_it_back():
    lb = balancer(*three())
    demand = lb.demand(asked(chat("Translate this")))
    assert demand.key is not None
    order = [three()[i].name for i in lb.affinity.order(demand.key, three())]
    assert lb.pick("chat", NOW, need=demand).name == order[0]
    lb.store.mark(order[0], "chat", NOW + 10, "429")
    assert {lb.pick("chat", NOW + 1 + i / 10, need=demand).name for i in range(5)} == {order[1]}
    assert lb.pick("chat", NOW + 1, tried={order[1]}, need=demand).name == order[2]  # failover: the next in order
    assert lb.pick("chat", NOW + 11, need=demand).name == order[0]


def crowd(affinity: Affinity, backends: tuple[Backend, ...], first: Backend, calls: int) -> None:
    """`calls` recent calls whose conversations all want `first`."""
    for _ in range(calls):
        affinity.calls.add("", "chat", NOW)
        affinity.offered.add(first.name, "chat", NOW)


def test_an_overloaded_backend_sheds_a_fixed_set_of_its_conversations_to_their_next():
    backends = three()
    hot = backends[0]
    affinity = Affinity()
    keys = list(itertools.islice((k for k in range(3000) if backends[affinity.order(k, backends)[0]] is hot), 600))
    crowd(affinity, backends, hot, 90)  # all 90 recent calls wanted `hot`: it may keep 0.95 x 30
    moved = {k for k in keys if affinity.choose(k, "chat", backends, [1.0, 1.0, 1.0], NOW, charge=False) is not hot}
    assert 0.6 < len(moved) / len(keys) < 0.8  # about 1 - 28.5 / 90 of them
    for k in moved:  # each to the next in its own order
        assert (
            affinity.choose(k, "chat", backends, [1.0, 1.0, 1.0], NOW, charge=False)
            is backends[affinity.order(k, backends)[1]]
        )
    again = {k for k in keys if affinity.choose(k, "chat", backends, [1.0, 1.0, 1.0], NOW, charge=False) is not hot}
    assert again == moved  # the same ones every time: they settle where they went


def test_a_backend_within_its_share_keeps_all_its_conversations():
    backends = three()
    affinity = Affinity()
    for b in backends:
        crowd(affinity, backends, b, 30)  # 30 of 90 recent calls each
    for _ in range(10):  # ... of 100 (10 went to no conversation): each is offered under 0.95 x its third
        affinity.calls.add("", "chat", NOW)
    keep = [affinity.choose(k, "chat", backends, [1.0, 1.0, 1.0], NOW, charge=False) for k in range(200)]
    assert keep == [backends[affinity.order(k, backends)[0]] for k in range(200)]


def test_a_lone_conversation_stays_home_until_it_is_a_crowd_then_its_overflow_goes_down_its_order():
    lb = balancer(*three())
    demand = lb.demand(asked(chat("Run the agent loop")))
    assert demand.key is not None
    order = [three()[i].name for i in lb.affinity.order(demand.key, three())]
    picks = [lb.pick("chat", NOW + i / 10, need=demand).name for i in range(300)]
    assert picks[:13] == [order[0]] * 13  # a handful of recent calls: no overload, it keeps its cache
    assert picks.index(order[1]) < picks.index(order[2])  # overflow goes down its own order
    counts = Counter(picks)
    assert max(counts.values()) <= 1.3 * 300 / 3 + 1, counts


def test_recent_calls_fade_with_their_half_life():
    load = RecentLoad(half_life=10.0)
    load.add("a", "chat", NOW)
    load.add("a", "chat", NOW)
    assert load.get("a", "chat", NOW + 10) == pytest.approx(1.0)
    assert load.get("b", "chat", NOW) == 0.0


@pytest.mark.parametrize("secret", ["k1", "k2", "k3", "k4"])
def test_many_conversations_load_backends_by_weight_within_fifteen_percent(secret: str):
    """Each pool secret is another draw of which conversations go where: 2-13% off over eight of them."""
    backends = three(a=2.0)
    lb = balancer(*backends, secret=secret.encode())
    rng = random.Random(3)
    counts: Counter[str] = Counter()
    now = NOW
    conversations = [chat(f"conversation {i}") for i in range(300)]
    lengths = [rng.randint(3, 10) for _ in conversations]
    for _ in range(max(lengths)):
        for body, turns in zip(conversations, lengths, strict=True):
            if turns:
                now += 0.01
                counts[lb.pick("chat", now, need=lb.demand(asked(body))).name] += 1
        lengths = [t - 1 if t else 0 for t in lengths]
    total = sum(counts.values())
    for backend in backends:
        share = backend.weight / 4
        assert abs(counts[backend.name] / total - share) <= 0.15 * share, counts


def test_headroom_exhaustion_still_wins_over_affinity():
    lb = balancer(*three(), policy="headroom")
    demand = lb.demand(asked(chat("Hello")))
    home = lb.pick("chat", NOW, need=demand).name
    lb.headroom.record(home, "chat", {"x-ratelimit-remaining-requests": "0", "x-ratelimit-remaining-tokens": "0"}, NOW)
    assert lb.pick("chat", NOW + 0.1, need=demand).name != home


def test_without_a_key_or_with_affinity_off_the_pick_is_weighted_random():
    on = balancer(*three())
    assert len({on.pick("chat", NOW, need=on.demand(asked(b"not json"))).name for _ in range(60)}) == 3
    off = Balancer(three(), MemoryStore(), rng=random.Random(1))
    body = chat("same conversation")
    assert off.demand(asked(body)) == Demand(0, b"")
    assert len({off.pick("chat", NOW, need=off.demand(asked(body))).name for _ in range(60)}) == 3


# Which calls, and a bound no client can steer -----------------------------------------------------
def test_prompts_under_azures_1024_token_minimum_are_not_cacheable():
    assert not cacheable(SHORT) and prompt_tokens(SHORT) < 30
    assert cacheable(chat("q"))  # the 1,088-token system prompt
    assert not cacheable(json.dumps({"messages": [{"role": "user", "content": "x" * 3900}]}).encode())
    assert cacheable(json.dumps({"messages": [{"role": "user", "content": "x" * 4100}]}).encode())
    cjk = json.dumps({"messages": [{"role": "user", "content": "語" * 1100}]}, ensure_ascii=False).encode()
    assert len(cjk) < 4096 and cacheable(cjk)  # 3 bytes a character, about a token each


def test_identical_short_calls_are_drawn_exactly_as_with_affinity_off():
    on = balancer(*three())
    off = Balancer(three(), MemoryStore(), rng=random.Random(7))
    picks = [on.pick("chat", NOW + i, need=on.demand(asked(SHORT))).name for i in range(60)]
    assert picks == [off.pick("chat", NOW + i, need=off.demand(asked(SHORT))).name for i in range(60)]
    assert min(Counter(picks).values()) >= 8, Counter(picks)


def worst_share(picks: list[str], backends: int = 3, after: int = 30) -> float:
    """The most any backend served of its fair share, over every prefix of `picks` from `after` calls on."""
    counts: Counter[str] = Counter()
    worst = 0.0
    for n, name in enumerate(picks, start=1):
        counts[name] += 1
        if n >= after:
            worst = max(worst, max(counts.values()) / (n / backends))
    return worst


def long_calls(lb: Balancer, keys: list[str]) -> list[str]:
    """300 long-prompt calls, ten a second, with these `prompt_cache_key`s in turn."""
    return [
        lb.pick("chat", NOW + i / 10, need=lb.demand(asked(chat("q", prompt_cache_key=keys[i % len(keys)])))).name
        for i in range(300)
    ]


def test_keys_crafted_offline_to_rank_one_backend_first_and_stay_are_spread():
    backends = three()
    crafted = []  # what a client can find with the hash alone: first choice `a`, and a draw that keeps it
    for i in range(100_000):
        key = conversation_key(chat("q", prompt_cache_key=f"c{i}"))
        assert key is not None
        if rank(key, backends)[0] == 0 and _draw(key, backends[0]) > 0.7:
            crafted.append(f"c{i}")
        if len(crafted) == 300:
            break
    picks = long_calls(balancer(*backends), crafted)
    assert worst_share(picks) <= 1.35, Counter(picks)


def test_keys_crafted_with_the_pools_own_order_still_keep_every_backend_under_its_bound():
    lb = balancer(*three())
    assert lb.affinity is not None
    crafted = []  # a client that learnt, call by call, which keys land on `a`
    for i in range(100_000):
        key = conversation_key(chat("q", prompt_cache_key=f"c{i}"))
        if key is not None and lb.affinity.order(key, three())[0] == 0:
            crafted.append(f"c{i}")
        if len(crafted) == 300:
            break
    picks = long_calls(lb, crafted)
    assert worst_share(picks) <= 1.35, Counter(picks)
    assert min(Counter(picks).values()) >= 50


def test_one_heavy_prompt_cache_key_spreads_its_overflow():
    picks = long_calls(balancer(*three()), ["everyone"])
    assert worst_share(picks) <= 1.35, Counter(picks)


def test_the_configurations_stand_in_secret_is_alike_everywhere_and_not_the_public_order():
    pool = three()
    same = tuple(Backend(b.name, b.url) for b in pool)
    rotated = tuple(Backend(b.name, b.url, api_key="new") for b in pool)
    assert pool_secret(pool) == pool_secret(same) != pool_secret(rotated)
    first, second = Affinity(pool_secret(pool)), Affinity(pool_secret(rotated))
    keys = range(300)
    assert [first.order(k, pool) for k in keys] == [Affinity(pool_secret(same)).order(k, pool) for k in keys]
    assert sum(first.order(k, pool) != rank(k, pool) for k in keys) > 150  # not the public hash's order
    assert sum(first.order(k, pool) != second.order(k, pool) for k in keys) > 150


# Several instances --------------------------------------------------------------------------------
def pool_of(instances: int, seed: int) -> list[Affinity]:
    """`instances` instances as lb.state.affinity leaves them: one secret, each knowing how many they are."""
    return [Affinity(b"the pool's", instances=instances, _rng=random.Random(seed * 10 + i)) for i in range(instances)]


def spread_calls(pool: list[Affinity], keys: list[int], seed: int, gap: float = 0.015) -> list[str]:
    """Each call to a random instance, `gap` seconds apart (a burst: no instance is quiet)."""
    backends, rng, picks = three(), random.Random(seed), []
    for i, key in enumerate(keys):
        picks.append(rng.choice(pool).choose(key, "chat", backends, [1.0, 1.0, 1.0], NOW + i * gap).name)
    return picks


@pytest.mark.parametrize("instances", [2, 3, 4])
def test_keys_that_all_rank_one_backend_first_stay_under_the_bound_over_several_instances(instances: int):
    """Each instance counts only its own calls: their allowances add up unless split (3x on main at 4)."""
    one = Affinity(b"the pool's")
    crafted = list(itertools.islice((k for k in range(20_000) if one.order(k, three())[0] == 0), 300))
    for seed in range(20):
        for keys in (crafted, [12345] * 300):  # keys crafted with the secret, and one fixed key
            picks = spread_calls(pool_of(instances, seed), keys, seed)
            assert worst_share(picks) <= 1.35, (seed, Counter(picks[:30]), Counter(picks))


def test_each_instance_gets_a_part_of_the_allowance_of_a_quiet_pool():
    assert [Affinity(instances=n).allowance for n in (1, 2, 4)] == [30.0, 7.5, 1.875]


def test_a_quiet_instance_measures_the_bound_against_the_pools_counts():
    backends, affinity = three(), Affinity(b"the pool's", instances=2, shared_after=2.0)
    key = next(k for k in range(1000) if affinity.order(k, backends)[0] == 0)
    others = RecentLoad()
    for _ in range(13):  # the other instance put 13 of the pool's 13 recent calls on `a`: 1.3 x a third of 30
        others.add("a", "chat", NOW)
        others.add("", "chat", NOW)
    affinity.others = RecentLoad()
    assert affinity.choose(key, "chat", backends, [1.0] * 3, NOW, charge=False).name == "a"
    affinity.others = others
    assert affinity.choose(key, "chat", backends, [1.0] * 3, NOW, charge=False).name != "a"


def test_a_lone_conversation_keeps_its_backend_in_a_quiet_pool_of_four_sharing_counts():
    backends, pool = three(), pool_of(4, 1)
    for affinity in pool:
        affinity.shared_after = 2.0
    rng, picks = random.Random(1), []
    for turn in range(12):  # a turn every 5 s, each to a random instance, counts shared between turns
        now = NOW + 5 * turn
        for i, affinity in enumerate(pool):
            affinity.others = RecentLoad()
            for other in pool[:i] + pool[i + 1 :]:
                affinity.others.merge(other.served.snapshot(now) + other.calls.snapshot(now), now)
        picks.append(rng.choice(pool).choose(77, "chat", backends, [1.0] * 3, now).name)
    assert len(set(picks)) == 1, picks


def test_recent_counts_travel_as_a_snapshot_and_add_up():
    mine, theirs = RecentLoad(half_life=10.0), RecentLoad(half_life=10.0)
    mine.add("a", "chat", NOW)
    theirs.add("a", "chat", NOW)
    theirs.add("b", "chat", NOW - 1000)  # faded to nothing: not sent
    theirs.merge(mine.snapshot(NOW + 10), NOW + 10)
    assert theirs.get("a", "chat", NOW + 10) == pytest.approx(1.0)
    assert [row[:2] for row in theirs.snapshot(NOW + 10)] == [["a", "chat"]]

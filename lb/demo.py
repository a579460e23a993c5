"""`python -m lb demo`: both scenarios on this machine, with the real openai SDK.

Three simulated Azure OpenAI backends (one with a small quota that answers 429 + Retry-After once
spent), the proxy in front of them on a local port, and clients that know only the proxy's URL: an
AzureOpenAI client for chat, streamed chat and embeddings, and an OpenAI client on `/openai/v1` for
the Responses API (created and streamed), as the official quickstart chat app calls it.
Ends by itself; exits non-zero if any client call failed. `--quick` makes the same calls with no
simulated latency and a shorter quota window: the whole story in a few seconds (the test suite's run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from lb.app import create_app
from lb.config import load_settings
from lb.sim import Servers, SimBackend

CLIENT_KEY = "demo-client-key"
API_VERSION = "2024-10-21"
KINDS = ("chat", "chat (streamed)", "embeddings", "responses", "responses (streamed)")


@dataclass
class Tally:
    calls: int = 0
    ok: int = 0
    absorbed_429s: int = 0
    served: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, list[int]] = field(default_factory=dict)  # kind -> [answered 200, calls]


@dataclass(frozen=True)
class Pace:
    """The demo's timings: the calls and what they show are the same at any pace."""

    latency: float = 0.02  # seconds each simulated backend takes to answer, and between stream chunks
    window: float = 3.0  # backend-1's quota window in the throttled scenario, so the wait for it to pass
    pause: float = 0.05  # between the throttled scenario's calls, spreading them over the window


# No simulated latency, and a window the throttled scenario's calls fit in at that speed: one window
# with every call in it is the surest to see backend-1 refuse one (more windows, fewer calls each).
QUICK = Pace(latency=0.0, window=1.0, pause=0.0)


def run_demo(pace: Pace = Pace()) -> int:
    import openai

    backends = [
        SimBackend(f"backend-{i}", api_key=f"key-{i}", latency=pace.latency, chunks=4, chunk_gap=pace.latency)
        for i in (1, 2, 3)
    ]
    servers = Servers()
    try:
        # Default settings: the same short "hello" every call is too short for Azure to cache, so
        # prompt-cache affinity leaves it to the random pick; cached_conversation shows affinity at work.
        env = {"LB_CLIENT_KEYS": CLIENT_KEY, "LB_MAX_COOLDOWN_SECONDS": "10"}
        for i, backend in enumerate(backends, start=1):
            env[f"BACKEND_{i}_URL"] = servers.start(backend)
            env[f"BACKEND_{i}_APIKEY"] = backend.api_key or ""
        proxy_url = servers.start(create_app(load_settings(env)))
        print(f"proxy on {proxy_url} in front of 3 simulated Azure OpenAI backends\n")
        clients = {
            "azure": openai.AzureOpenAI(
                azure_endpoint=proxy_url, api_key=CLIENT_KEY, api_version=API_VERSION, max_retries=0, timeout=10
            ),
            "v1": openai.OpenAI(base_url=f"{proxy_url}/openai/v1", api_key=CLIENT_KEY, max_retries=0, timeout=10),
        }

        print("== normal scenario: every backend healthy, each call goes to a random one")
        normal = _traffic(clients, backends, "normal", 15)

        window = f"{pace.window:g} s"
        print(f"\n== throttled scenario: backend-1's quota is 2 calls per {window}, beyond it: 429 + Retry-After")
        backends[0].requests_per_window, backends[0].window_seconds = 2, pace.window
        backends[0].reset_quota()
        # Picks are random: backend-1 may be spared its third call in a window for a while, so the
        # scenario goes on, a round of every kind at a time, until a 429 was absorbed (100 calls at most).
        throttled = _traffic(clients, backends, "throttled", 25, pause=pace.pause, until_429=100)
        print(f"   backend-1 answered {backends[0].count(429)} x 429; each time the proxy retried elsewhere at once")
        print(f"   waiting {window} for backend-1's Retry-After to pass ...")
        time.sleep(pace.window + 0.1)
        after = _traffic(clients, backends, "recovered", 10)
        back = after.served.get("1", 0)
        print(f"   backend-1 is back in rotation: served {back} of the last 10 calls")
        backends[0].requests_per_window = None  # its quota lifted: the next scenario is about routing
        conversation = _conversation(proxy_url)
        cached_ok = cached_conversation(servers, env)
    finally:
        servers.stop()

    total = [normal, throttled, after, conversation]
    failed = sum(t.calls - t.ok for t in total)
    print("\n== summary")
    print(f"   normal:    {normal.ok}/{normal.calls} calls answered 200, served by backends {_share(normal)}")
    print(
        f"   throttled: {throttled.ok}/{throttled.calls} calls answered 200, "
        f"{absorbed(throttled.absorbed_429s)}, served by backends {_share(throttled)}"
    )
    print(
        f"   recovered: {after.ok}/{after.calls} calls answered 200, "
        f"{absorbed(after.absorbed_429s)}, served by backends {_share(after)}"
    )
    print(
        f"   stateful:  {conversation.ok}/{conversation.calls} Responses calls answered,"
        f" served by backend {_share(conversation)}"
    )
    kinds = {kind: [sum(t.by_kind.get(kind, [0, 0])[j] for t in total) for j in (0, 1)] for kind in KINDS}
    print("   by kind:   " + ", ".join(f"{kind} {ok}/{calls}" for kind, (ok, calls) in kinds.items()))
    print(f"   client-visible failures: {failed}")
    return 1 if failed or throttled.absorbed_429s == 0 or not cached_ok else 0


def absorbed(n: int) -> str:
    return f"{n} upstream 429{'' if n == 1 else 's'} absorbed"


def _traffic(
    clients: dict[str, Any],
    backends: list[SimBackend],
    label: str,
    n: int,
    pause: float = 0.0,
    until_429: int = 0,
) -> Tally:
    """`n` calls, cycling through KINDS; with `until_429`, more rounds of KINDS until one upstream
    429 was absorbed or `until_429` calls were made."""
    import openai

    tally = Tally()
    i = 0
    while i < n or (until_429 and (i % len(KINDS) or (tally.absorbed_429s == 0 and i < until_429))):
        i += 1
        kind = KINDS[(i - 1) % len(KINDS)]
        before = sum(b.count(429) for b in backends)
        tally.calls += 1
        counts = tally.by_kind.setdefault(kind, [0, 0])
        counts[1] += 1
        try:
            raw = _call(clients, kind)
        except openai.APIError as exc:
            print(f"   [{label}] #{i:<2} {kind:<20} FAILED: {exc}")
            continue
        absorbed = sum(b.count(429) for b in backends) - before
        backend = raw.headers.get("x-lb-backend", "?")
        tally.ok += raw.status_code == 200
        counts[0] += raw.status_code == 200
        tally.absorbed_429s += absorbed
        tally.served[backend] = tally.served.get(backend, 0) + 1
        note = f"  ({absorbed} x 429 absorbed, {raw.headers.get('x-lb-attempts')} attempts)" if absorbed else ""
        print(f"   [{label}] #{i:<2} {kind:<20} -> backend-{backend}  {raw.status_code}{note}")
        if pause:
            time.sleep(pause)
    return tally


def _call(clients: dict[str, Any], kind: str) -> Any:
    """One call of `kind`, read to the end (every chunk or event of a stream); the raw response."""
    import openai

    azure, v1 = clients["azure"], clients["v1"]
    messages = [{"role": "user", "content": "hello"}]
    if kind == "embeddings":
        raw = azure.embeddings.with_raw_response.create(model="embedding", input="hello")
        raw.parse()
    elif kind == "chat":
        raw = azure.chat.completions.with_raw_response.create(model="chat", messages=messages)
        raw.parse()
    elif kind == "chat (streamed)":
        raw = azure.chat.completions.with_raw_response.create(model="chat", messages=messages, stream=True)
        list(raw.parse())
    elif kind == "responses":
        raw = v1.responses.with_raw_response.create(model="chat", input="hello", store=False)
        raw.parse()
    else:  # the Responses API streamed: created, deltas, completed (the events `responses.stream` reads)
        raw = v1.responses.with_raw_response.create(model="chat", input=messages, store=False, stream=True)
        events = [event.type for event in raw.parse()]
        if not events or events[-1] != "response.completed":
            raise openai.APIError(f"stream ended with {events[-1:]}", raw.http_request, body=None)
    return raw


def _share(tally: Tally) -> str:
    return ", ".join(f"{name}: {count}" for name, count in sorted(tally.served.items()))


def cached_conversation(servers: Servers, env: dict[str, str], turns: int = 5) -> bool:
    """A chat with a long system prompt through a second proxy with prompt-cache affinity (the default):
    every turn goes to the backend holding the conversation's prefix, so its cached tokens rise."""
    import openai

    proxy_url = servers.start(create_app(load_settings(env)))
    client = openai.AzureOpenAI(
        azure_endpoint=proxy_url, api_key=CLIENT_KEY, api_version=API_VERSION, max_retries=0, timeout=10
    )
    print(f"\n== prompt-cache affinity: a {turns}-turn chat with a long system prompt (proxy on {proxy_url})")
    system = "You are Contoso's support assistant. Answer from this manual:\n" + "Reset: hold the button. " * 300
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "My router is offline."}]
    prompt = cached = 0
    for turn in range(1, turns + 1):
        raw = client.chat.completions.with_raw_response.create(model="chat", messages=messages)
        completion = raw.parse()
        usage = completion.usage
        hit = usage.prompt_tokens_details.cached_tokens if usage and usage.prompt_tokens_details else 0
        tokens = usage.prompt_tokens if usage else 0
        prompt, cached = prompt + tokens, cached + (hit or 0)
        print(f"   turn {turn} -> backend-{raw.headers.get('x-lb-backend')}  prompt {tokens} tokens, {hit} cached")
        reply = (completion.choices[0].message.content or "") + " Try this next. " * 40
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": f"Still offline ({turn})."}]
    print(f"   cached share of prompt tokens: {cached / max(prompt, 1):.0%} ({cached} of {prompt})")
    return cached > 0


def _conversation(proxy_url: str, turns: int = 5) -> Tally:
    """A multi-turn Responses API conversation through the pool: each turn names the previous one
    (`previous_response_id`), which lives only in the backend that answered it, so the proxy sends
    every turn there; then the last answer is retrieved and deleted."""
    import openai

    print(f"\n== stateful scenario: a {turns}-turn Responses conversation (previous_response_id) through the pool")
    client = openai.OpenAI(base_url=proxy_url + "/openai/v1", api_key=CLIENT_KEY, max_retries=0, timeout=10)
    tally = Tally()
    previous = None
    for turn in range(1, turns + 2):
        tally.calls += 1
        try:
            if turn <= turns:
                raw = client.responses.with_raw_response.create(
                    model="chat", input=f"turn {turn}", previous_response_id=previous
                )
                previous, what = raw.parse().id, f"turn {turn}"
            else:
                assert previous is not None  # the turns above set it
                raw = client.responses.with_raw_response.retrieve(previous)
                raw.parse()
                what = "retrieve"
        except openai.APIError as exc:
            print(f"   [conversation] {turn}: FAILED: {exc}")
            continue
        backend = raw.headers.get("x-lb-backend", "?")
        tally.ok += 1
        tally.served[backend] = tally.served.get(backend, 0) + 1
        print(f"   [conversation] {what:<9} {previous} -> backend-{backend}  {raw.status_code}")
    if previous:
        client.responses.delete(previous)
    return tally

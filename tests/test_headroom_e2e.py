"""End to end with LB_POLICY=headroom: the openai SDK -> the local runner -> simulated backends with token quotas."""

from __future__ import annotations

from collections import Counter

import httpx

from tests.conftest import API_VERSION, CLIENT_KEY

MESSAGES = [{"role": "user", "content": "hi"}]
QUOTA = 100_000  # tokens per window, each backend


def test_a_backend_reporting_low_headroom_gets_measurably_less_traffic_and_nothing_is_throttled(make_pool):
    pool = make_pool(3, env={"LB_POLICY": "headroom"}, tokens_per_window=QUOTA, window_seconds=600)
    client = pool.azure()
    for _ in range(100):  # until the proxy has heard each backend's quota once
        client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=50)
        if all(b.count(200) for b in pool.backends):
            break
    # Another app on the same Azure OpenAI account spends 90% of backend 1's quota.
    url = pool.proxy.settings.backends[0].url + f"/openai/deployments/chat/chat/completions?api-version={API_VERSION}"
    other_app = {"messages": MESSAGES, "max_tokens": int(QUOTA * 0.9)}
    assert httpx.post(url, json=other_app, headers={"api-key": "key-1"}).status_code == 200

    served = Counter(
        client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES, max_tokens=50).headers[
            "x-lb-backend"
        ]
        for _ in range(90)
    )
    assert served["1"] < 12  # random would send ~30; 10% vs 100% left gives ~4
    # The other two split the rest evenly, at least 86 calls: either getting 20 or fewer by chance has
    # P < 2 * P(Bin(86, 0.5) <= 20) = 6.7e-7.
    assert served["2"] > 20 and served["3"] > 20
    assert sum(b.count(429) for b in pool.backends) == 0

    status = httpx.get(pool.url + "/lb/status", headers={"api-key": CLIENT_KEY}).json()
    assert status["policy"] == "headroom"
    low = status["backends"][0]["headroom"][0]
    assert low["deployment"] == "chat" and low["remaining_tokens"] < QUOTA * 0.1 and low["stale"] is False


def test_the_random_policy_still_spreads_evenly_over_the_same_pool(make_pool):
    """The control: without LB_POLICY the low backend gets its full share (and headroom is still shown)."""
    pool = make_pool(3, tokens_per_window=QUOTA, window_seconds=600)
    url = pool.proxy.settings.backends[0].url + f"/openai/deployments/chat/chat/completions?api-version={API_VERSION}"
    other_app = {"messages": MESSAGES, "max_tokens": int(QUOTA * 0.9)}
    assert httpx.post(url, json=other_app, headers={"api-key": "key-1"}).status_code == 200
    client = pool.azure()
    served = Counter(
        client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES, max_tokens=50).headers[
            "x-lb-backend"
        ]
        for _ in range(90)
    )
    # Its full share: Binomial(90, 1/3), mean 30; 9 or fewer by chance has P = 2.5e-7. The headroom
    # policy above leaves it fewer than 12 (2 on average).
    assert served["1"] > 9
    status = httpx.get(pool.url + "/lb/status", headers={"api-key": CLIENT_KEY}).json()
    assert status["policy"] == "random" and status["backends"][0]["headroom"][0]["remaining_tokens"] < QUOTA * 0.1

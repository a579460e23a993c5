"""Happy-path cost of Table state: `lb serve` with in-memory state vs with a Table (Azurite), side by side.

Both proxies front the same simulated backend; one client calls them interleaved, so noise hits
both alike. With nothing throttled the Table store must add no Table call per request, so the two
latency columns should match (issue goal: within 0.2 ms at p50).
"""

from __future__ import annotations

import sys
import time

import httpx

from bench.procs import Server, markdown_table, percentiles
from tests.azurite import start_azurite

CALLS = 500
BODY = {"messages": [{"role": "user", "content": "hi"}]}
PATH = "/openai/deployments/chat/chat/completions?api-version=2024-10-21"


def main(argv: list[str] | None = None) -> int:
    azurite = start_azurite()
    try:
        with Server("backend", ["bench.backend"]) as backend:
            base = {
                "BACKEND_1_URL": backend.url,
                "BACKEND_1_APIKEY": "b",
                "LB_CLIENT_KEYS": "k",
                "LB_ADMIN_CLIENTS": "key1",
                "LB_LOG_LEVEL": "WARNING",
            }
            table = {**base, "LB_STATE_CONNECTION_STRING": azurite.connection_string, "LB_STATE_TABLE": "benchhappy"}
            with Server("memory", ["lb", "serve"], base) as memory, Server("table", ["lb", "serve"], table) as tbl:
                targets = {"memory": memory, "table": tbl}
                samples: dict[str, list[float]] = {name: [] for name in targets}
                cpu_before = {name: s.cpu() for name, s in targets.items()}
                with httpx.Client(headers={"api-key": "k"}) as client:
                    for i in range(CALLS + 50):
                        for name, server in targets.items():
                            started = time.perf_counter()
                            response = client.post(server.url + PATH, json=BODY)
                            elapsed = time.perf_counter() - started
                            assert response.status_code == 200, response.text
                            if i >= 50:  # warm-up
                                samples[name].append(elapsed)
                cpu = {name: (s.cpu() - cpu_before[name]) / (CALLS + 50) * 1000 for name, s in targets.items()}
                status = httpx.get(tbl.url + "/lb/status", headers={"api-key": "k"}).json()["state"]
    finally:
        azurite.stop()
    rows = []
    for name, values in samples.items():
        p = percentiles(values)
        rows.append([name, p["p50"], p["p90"], p["p99"], round(cpu[name], 3)])
    print(f"## Happy path, memory vs Table state ({CALLS} interleaved calls each)\n")
    print(markdown_table(["state", "p50 ms", "p90 ms", "p99 ms", "CPU ms/req"], rows))
    print(f"\nadded p50 with Table state: {rows[1][1] - rows[0][1]:+.3f} ms; Table operations: {status.get('ops')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

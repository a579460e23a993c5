"""`python -m bench <name> [args]` runs one benchmark; `python -m bench all` runs every one in turn.

Each benchmark is a module of this package with `main(argv: list[str] | None) -> int`. A benchmark
listed here whose module is not there yet is skipped by `all` with a note.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "overhead": "bench.overhead",  # latency, CPU, streaming, throughput: direct vs yardstick vs lb
    "throttle": "bench.throttle_sim",  # pools under quota pressure, 1-8 instances, memory vs Table state
    "table": "bench.table_overhead",  # happy path: in-memory vs Table state, side by side
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in (*BENCHMARKS, "all"):
        print(f"usage: python -m bench {{{','.join([*BENCHMARKS, 'all'])}}} [args]", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name != "all":
        return importlib.import_module(BENCHMARKS[name]).main(rest)
    status = 0
    for bench, module in BENCHMARKS.items():
        try:
            entry = importlib.import_module(module).main
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            print(f"({bench}: {module} not there yet, skipped)")
            continue
        print(f"# {bench}\n", flush=True)
        status = max(status, entry([]) or 0)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

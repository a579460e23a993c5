"""`python -m bench <name> [args]` runs one benchmark; `python -m bench all [--quick] [--with-load]` runs them in turn.

Each benchmark is a module of this package with `main(argv: list[str] | None) -> int`. A benchmark
listed here whose module is not there yet is skipped by `all` with a note. `all` passes `--quick`
on to the benchmarks that take it (smoke-sized runs, results in `*.quick.json`, docs untouched);
a full `all` ends with `report`, which redraws docs/benchmarks.md and its plots from the results.
`load` (a fixed 60 s soak) runs only with `--with-load`, to keep `all` near 15 minutes here.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "overhead": "bench.overhead",  # latency, CPU, streaming, throughput: direct vs yardstick vs lb vs LiteLLM
    "memory": "bench.memory",  # RSS of each proxy after 1k-10k requests
    "profile": "bench.profile",  # where lb's CPU time per request goes (py-spy)
    "throttle": "bench.throttle_sim",  # pools under quota pressure, 1-8 instances, memory vs Table state
    "table": "bench.table_overhead",  # happy path: in-memory vs Table state, side by side
    "load": "bench.load",  # sustained load (60 s)
    "pacing": "bench.pacing",  # why sequential calls wait for a quiet path (evidence, not in `all`)
    "peer": "bench.peer",  # only builds LiteLLM's venv and prints its version
    "report": "bench.docs",  # docs/benchmarks.md + PNG plots from bench/results/*.json
}
QUICK = {"overhead", "memory", "profile"}  # the ones that take --quick
NOT_IN_ALL = {"peer", "pacing"}  # `overhead` builds the venv anyway; pacing is a one-off check
ONLY_WITH_FLAG = {"load": "--with-load"}


def run_all(flags: list[str]) -> int:
    quick = "--quick" in flags
    status = 0
    for bench, module in BENCHMARKS.items():
        if bench in NOT_IN_ALL or (bench in ONLY_WITH_FLAG and ONLY_WITH_FLAG[bench] not in flags):
            continue
        if bench == "report" and quick:
            print("(report: skipped with --quick; the docs are drawn from full runs only)")
            continue
        try:
            entry = importlib.import_module(module).main
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            print(f"({bench}: {module} not there yet, skipped)")
            continue
        print(f"# {bench}\n", flush=True)
        status = max(status, entry(["--quick"] if quick and bench in QUICK else []) or 0)
    return status


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in (*BENCHMARKS, "all"):
        print(f"usage: python -m bench {{{','.join([*BENCHMARKS, 'all'])}}} [args]", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name == "all":
        return run_all(rest)
    return importlib.import_module(BENCHMARKS[name]).main(rest) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

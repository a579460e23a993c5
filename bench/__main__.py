"""`python -m bench <name> [args]` runs one benchmark; `python -m bench all [--quick] [--no-load]` runs them in turn.

Each benchmark is a module of this package with `main(argv: list[str] | None) -> int`. A benchmark
listed here whose module is not there yet is skipped by `all` with a note. A full `all` takes about
11-15 minutes on the project's 2-core machine (the 60 s `load` soak included; `--no-load` skips it) and
ends with `report`, which redraws docs/benchmarks.md and its plots from bench/results/*.json.
`--quick` is a smoke run of a few minutes: smaller counts for the benchmarks that take `--quick`,
results in `*.quick.json` (gitignored), no `load`, docs untouched.
"""

from __future__ import annotations

import importlib
import sys
import traceback

BENCHMARKS = {
    "overhead": "bench.overhead",  # latency, CPU, streaming, throughput: direct vs yardstick vs lb vs LiteLLM
    "memory": "bench.memory",  # RSS of each proxy after 1k-10k requests
    "profile": "bench.profile",  # where lb's CPU time per request goes (py-spy)
    "throttle": "bench.throttle_sim",  # pools under quota pressure, 1-8 instances, memory vs Table state
    "affinity": "bench.affinity",  # prompt-cache affinity vs random: cached share, load, success
    "load": "bench.load",  # sustained load (60 s)
    "concurrency": "bench.concurrency",  # long streams held at once by one lb process: sets perInstanceConcurrency
    "responses": "bench.responses",  # Responses API: success with a throttling backend, first event added
    "quota": "bench.quota",  # metering exactness, per-client limits over 4 instances, hot path vs main
    "peer": "bench.peer",  # only builds LiteLLM's venv and prints its version
    "stateful": "bench.stateful",  # stored responses, files, batches over 3 backends and 2 instances
    "redteam": "bench.redteam",  # abusive client, wrong key, hanging backends, huge bodies
    "report": "bench.docs",  # docs/benchmarks.md + PNG plots from bench/results/*.json
}
QUICK = {"overhead", "memory", "profile", "throttle", "concurrency", "responses", "affinity"}  # these take --quick
NOT_IN_ALL = {  # `overhead` builds the venv anyway; quota: 4+ min
    "peer",
    "stateful",
    "redteam",
    "quota",
}
SKIPPED_BY = {"load": ("--no-load", "--quick")}  # any of these flags skips it


def run_all(flags: list[str]) -> int:
    quick = "--quick" in flags
    status = 0
    for bench, module in BENCHMARKS.items():
        if bench in NOT_IN_ALL or any(flag in flags for flag in SKIPPED_BY.get(bench, ())):
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
        try:
            status = max(status, entry(["--quick"] if quick and bench in QUICK else []) or 0)
        except Exception as exc:  # one broken benchmark must not cost the others' results
            traceback.print_exc()
            print(f"({bench} failed: {exc!r}; going on)", flush=True)
            status = 1
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

"""One simulated Azure OpenAI backend (`lb.sim.SimBackend`) under uvicorn, in its own process.

`python -m bench.backend --port 8001 --latency 0 --chunks 20 --chunk-gap 0.02`. It keeps no record
of the calls it answers, so its memory stays flat however long a benchmark runs.
"""

from __future__ import annotations

import argparse

import uvicorn

from lb.sim import SimBackend


class _Forget(list):  # type: ignore[type-arg]
    """A `SimBackend.calls` that records nothing."""

    def append(self, item: object) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.backend")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--name", default="sim")
    parser.add_argument("--api-key", default=None, help="key the backend expects as api-key (default: any)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before the answer / first chunk")
    parser.add_argument("--chunks", type=int, default=20, help="SSE chunks of a streamed answer")
    parser.add_argument("--chunk-gap", type=float, default=0.02, help="seconds between chunks")
    parser.add_argument("--rpm", type=int, default=None, help="requests per minute before 429 (default: unlimited)")
    parser.add_argument(
        "--keep-alive", type=float, default=5.0, help="seconds an idle connection stays open (uvicorn's default: 5)"
    )
    args = parser.parse_args(argv)
    sim = SimBackend(
        args.name,
        api_key=args.api_key,
        latency=args.latency,
        chunks=args.chunks,
        chunk_gap=args.chunk_gap,
        requests_per_window=args.rpm,
        calls=_Forget(),
    )
    uvicorn.run(
        sim,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_keep_alive=args.keep_alive,
    )


if __name__ == "__main__":
    main()

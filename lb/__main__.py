"""`python -m lb serve` runs the proxy locally; `python -m lb demo` shows it working on simulated backends."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lb import logctx
from lb.config import ConfigError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lb", description="Azure OpenAI load balancer")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the proxy (same handler as the Function) with uvicorn")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=7071)
    demo = sub.add_parser("demo", help="run both scenarios against simulated backends, then exit")
    demo.add_argument("--quick", action="store_true", help="the same calls without simulated latency, in seconds")
    args = parser.parse_args(argv)

    default_level = "WARNING" if args.command == "demo" else "INFO"  # the demo prints its own story
    level = os.environ.get("LB_LOG_LEVEL", default_level).upper()
    logging.basicConfig(level=level)
    logctx.install()  # every line shows the request it belongs to
    for noisy in ("httpx", "httpx2", "httpcore", "azure"):  # one line per request is the proxy's job, not theirs
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))

    if args.command == "demo":
        from lb.demo import QUICK, Pace, run_demo

        return run_demo(QUICK if args.quick else Pace())

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    from lb.app import create_app
    from lb.serving import serve_options

    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        **serve_options(settings),  # head size, header count, head timeout, connection cap
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

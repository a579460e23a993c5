"""Experiment hook: `PYTHONPATH=bench/aiohttp_xp:. python -m bench overhead` makes every `lb` process send
upstream through `AiohttpTransport` (an httpx transport over aiohttp) without editing lb/."""

from __future__ import annotations

from typing import Any

from aiohttp_transport import AiohttpTransport

import lb.upstream as _upstream

_create_client = _upstream.create_client


def create_client(settings: Any, transport: Any = None) -> Any:
    return _create_client(settings, transport or AiohttpTransport())


_upstream.create_client = create_client

"""Telemetry hooks the proxy calls; a no-op unless Application Insights is configured.

`Telemetry` is the interface and the default: it does nothing, costs one method call, and imports
nothing. `create_telemetry()` returns an exporting implementation only when
`APPLICATIONINSIGHTS_CONNECTION_STRING` is set, so start-up stays fast everywhere else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lb.metering.usage import Usage


class Telemetry:
    def attempt(
        self,
        backend: str,
        deployment: str | None,
        status: int | str,
        started: float,
        seconds: float,
        cooldown: float | None,
    ) -> None:
        """One upstream attempt: `started` is epoch seconds, `seconds` its duration, `cooldown` if one was set."""

    def request(self, deployment: str | None, status: int, attempts: int, upstream_429s: int) -> None:
        """One client request answered with `status` after `attempts` upstream attempts."""

    def all_cooling(self, deployment: str | None) -> None:
        """A request answered 429 at once because every candidate was cooling."""

    def tokens(self, client: str, backend: str, deployment: str | None, usage: Usage | None) -> None:
        """One backend answer's tokens (`usage` None: it carried no readable usage); names only, never keys."""

    def object_call(self, outcome: str) -> None:
        """A call naming a stored object: `pinned` to its holder, `lookups` for an unknown id, `found`
        by that look-up, or `refused` (another client's object)."""

    def close(self) -> None:
        """Flush what is buffered."""


def create_telemetry(environ: Mapping[str, str] | None = None) -> Telemetry:
    env = os.environ if environ is None else environ
    if not env.get("APPLICATIONINSIGHTS_CONNECTION_STRING", "").strip():
        return Telemetry()
    from lb.telemetry_azure import AzureMonitorTelemetry  # the exporter is imported only when used

    return AzureMonitorTelemetry(env)

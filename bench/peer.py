"""The peer: LiteLLM's proxy, in its own virtualenv, configured with the same backend as `lb`.

LiteLLM pins dependencies that clash with this project's, so it never goes into the project's venv:
`ensure_venv()` creates `bench/.peer-venv/` (gitignored; or `$BENCH_PEER_VENV`) on first use and
installs exactly `litellm[proxy]==1.80.0` (releases 1.82.7 and 1.82.8 were compromised; never
float this pin). It runs offline (`LITELLM_LOCAL_MODEL_COST_MAP=True`, telemetry off) with one
uvicorn worker, the same process count as `lb serve`, and no database, as its docs' minimal proxy.
`python -m bench peer` only builds the venv and prints LiteLLM's version.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.procs import ROOT, Server

PIN = "litellm[proxy]==1.80.0"
VENV = Path(os.environ.get("BENCH_PEER_VENV", ROOT / "bench" / ".peer-venv"))
API_VERSION = "2024-10-21"
_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no download of the price list at start-up
    "LITELLM_LOG": "ERROR",
    "LITELLM_TELEMETRY": "False",
    "NO_PROXY": "*",
}


def executable() -> Path:
    return VENV / "bin" / "litellm"


def ensure_venv(python: str | None = None) -> Path:
    """The `litellm` executable, installing it into its own venv first if missing (takes minutes)."""
    exe = executable()
    if exe.exists():
        return exe
    print(f"(installing {PIN} into {VENV}; once, takes a few minutes)", flush=True)
    subprocess.run([python or sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, PIN], check=True)
    return exe


def config_yaml(backend_url: str, backend_key: str, deployments: tuple[str, ...] = ("chat",)) -> str:
    """One model per deployment, each on the same Azure-shaped backend `lb` is given."""
    lines = ["model_list:"]
    for name in deployments:
        lines += [
            f"  - model_name: {name}",
            "    litellm_params:",
            f"      model: azure/{name}",
            f"      api_base: {backend_url}",
            f"      api_key: {backend_key}",
            f'      api_version: "{API_VERSION}"',  # quoted, or YAML reads a date
            "    model_info:",  # else LiteLLM logs an error per request that it cannot price the model
            "      base_model: azure/gpt-4o-mini",
        ]
    lines += ["litellm_settings:", "  telemetry: false", "  drop_params: true"]
    return "\n".join(lines) + "\n"


# uvicorn's logging with the access log silenced: `lb serve` runs with `access_log=False`, and a line
# per request to stderr would be charged to LiteLLM's CPU time for no reason of its own.
_LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}},
    "loggers": {
        "uvicorn": {"handlers": ["stderr"], "level": "WARNING"},
        "uvicorn.access": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
    },
}


def start(backend_url: str, backend_key: str) -> Server:
    """LiteLLM's proxy on a free port of 127.0.0.1 with one worker; stop it with `.stop()`."""
    exe = ensure_venv()
    folder = Path(tempfile.mkdtemp(prefix="bench-litellm-"))
    (folder / "config.yaml").write_text(config_yaml(backend_url, backend_key))
    (folder / "log.json").write_text(json.dumps(_LOG_CONFIG))
    args = ["--config", str(folder / "config.yaml"), "--num_workers", "1", "--telemetry", "False"]
    args += ["--log_config", str(folder / "log.json")]
    return Server("litellm", args, _ENV, command=[str(exe)], start_timeout=120, quiet=True)


def main(argv: list[str] | None = None) -> int:
    exe = ensure_venv()
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, env={**os.environ, **_ENV})
    print((out.stdout or out.stderr).strip().splitlines()[-1] if (out.stdout or out.stderr) else exe)
    return out.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

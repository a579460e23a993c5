"""infra/hooks/preprovision.sh run for real, with a stand-in `az` on PATH (or none at all).

The stand-in answers `az account show` (logged in or not) and `az cognitiveservices model list
--location X --query ... --output tsv` from a per-region table, in the shape the hook's query asks
for (name, version, SKUs, lifecycle status), and records every call.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

HOOK = Path(__file__).resolve().parent.parent / "infra" / "hooks" / "preprovision.sh"
SH = shutil.which("sh")

STAND_IN_AZ = """#!/bin/sh
echo "$*" >> "$FAKE_AZ_DIR/calls"
sub=""; prev=""
for arg in "$@"; do [ "$prev" = "--subscription" ] && sub=$arg; prev=$arg; done
if [ -n "$sub" ] && ! grep -qx "$sub" "$FAKE_AZ_DIR/subscriptions" 2>/dev/null; then
  echo "ERROR: Subscription '$sub' not found." >&2; exit 1
fi
case "$1 $2" in
  "account show") [ -f "$FAKE_AZ_DIR/logged-in" ] && exit 0; echo "Please run 'az login'" >&2; exit 1 ;;
  "cognitiveservices model")
    loc=""; prev=""
    for arg in "$@"; do [ "$prev" = "--location" ] && loc=$arg; prev=$arg; done
    if [ -f "$FAKE_AZ_DIR/models-$loc.tsv" ]; then cat "$FAKE_AZ_DIR/models-$loc.tsv"; exit 0; fi
    echo "ERROR: (LocationNotAvailableForResourceType) '$loc' is not available" >&2; exit 1 ;;
esac
echo "stand-in az: unexpected call: $*" >&2
exit 2
"""


def in_days(days: int) -> str:
    """A retirement date as the Models API gives it, `days` from today (UTC)."""
    return (datetime.now(UTC) + timedelta(days=days)).strftime("%Y-%m-%dT00:00:00Z")


TODAY = [  # name, version, SKUs, lifecycle, inference retirement: what a region offers in this test's world
    ("gpt-5.4-mini", "2026-03-17", "GlobalStandard,DataZoneStandard", "GenerallyAvailable", in_days(288)),
    ("gpt-5.4", "2026-03-05", "GlobalStandard", "GenerallyAvailable", in_days(269)),
    ("gpt-4o-mini", "2024-07-18", "GlobalStandard,Standard", "Deprecated", in_days(128)),
    ("text-embedding-3-large", "1", "GlobalStandard,Standard", "GenerallyAvailable", in_days(429)),
    ("text-embedding-3-small", "1", "Standard", "GenerallyAvailable", ""),
]

pytestmark = pytest.mark.skipif(SH is None, reason="no POSIX sh")


class World:
    """A temporary PATH with (or without) the stand-in az, and the regions it knows."""

    def __init__(self, root: Path, with_az: bool = True, logged_in: bool = True) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir()
        if with_az:
            az = self.bin / "az"
            az.write_text(STAND_IN_AZ)
            az.chmod(0o755)
        if logged_in:
            (root / "logged-in").touch()

    def region(self, name: str, models: list[tuple[str, ...]] = TODAY) -> None:
        (self.root / f"models-{name}.tsv").write_text("".join("\t".join(m) + "\n" for m in models))

    def subscriptions(self, *ids: str) -> None:
        (self.root / "subscriptions").write_text("".join(f"{i}\n" for i in ids))

    def calls(self) -> list[str]:
        path = self.root / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def run(self, **env: str) -> subprocess.CompletedProcess[str]:
        # Only this PATH: the machine's own az (if any) must not answer. sh, awk, tr come from /usr/bin:/bin.
        base = {"PATH": f"{self.bin}:/usr/bin:/bin", "FAKE_AZ_DIR": str(self.root), "HOME": str(self.root)}
        return subprocess.run([SH, str(HOOK)], env={**base, **env}, capture_output=True, text=True, timeout=30)


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    for region in ("eastus", "northcentralus", "eastus2"):
        w.region(region)
    return w


def test_without_az_the_check_says_it_skipped_and_lets_azd_go_on(tmp_path: Path):
    if any((Path(d) / "az").exists() for d in ("/usr/bin", "/bin")):
        pytest.skip("this machine has az in /usr/bin or /bin")
    result = World(tmp_path, with_az=False).run()
    assert result.returncode == 0
    assert "az" in result.stdout and "skipped" in result.stdout


def test_logged_out_az_skips_with_a_hint(tmp_path: Path):
    w = World(tmp_path, logged_in=False)
    result = w.run()
    assert result.returncode == 0
    assert "not logged in" in result.stdout and "az login" in result.stdout
    assert not [c for c in w.calls() if c.startswith("cognitiveservices")]


def test_the_defaults_pass_after_checking_every_region(world: World):
    result = world.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gpt-5.4-mini 2026-03-17 GlobalStandard" in result.stdout
    listed = [c for c in world.calls() if c.startswith("cognitiveservices model list")]
    assert [c.split("--location ")[1].split()[0] for c in listed] == ["eastus", "northcentralus", "eastus2"]
    assert all("--output tsv" in c and "--query" in c for c in listed)


def test_a_retired_chat_model_stops_with_one_line_naming_it_and_what_is_offered(world: World):
    result = world.run(
        AZURE_OPENAI_CHATGPT_MODEL="gpt-4o-mini",
        AZURE_OPENAI_CHATGPT_DEPLOYMENT_VERSION="2024-07-18",
        LB_OPENAI_LOCATIONS="eastus",
    )
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert "gpt-4o-mini 2024-07-18 GlobalStandard" in line and "eastus" in line and "deprecated" in line
    assert "offered instead: " in line and "gpt-5.4-mini 2026-03-17" in line
    assert "AZURE_OPENAI_CHATGPT_MODEL" in line


def test_an_unknown_model_name_is_named_with_the_family_offered(world: World):
    result = world.run(AZURE_OPENAI_CHATGPT_MODEL="gpt-4o-mimi", LB_OPENAI_LOCATIONS="eastus2")
    assert result.returncode == 1
    assert "gpt-4o-mimi" in result.stdout and "model not offered there" in result.stdout
    assert "gpt-5.4-mini 2026-03-17" in result.stdout and "gpt-4o-mini" not in result.stdout.split("instead:")[1]


def test_an_unknown_sku_is_named_with_the_skus_offered(world: World):
    result = world.run(AZURE_OPENAI_EMB_DEPLOYMENT_SKU="GlobalStandrd", LB_OPENAI_LOCATIONS="eastus")
    assert result.returncode == 1
    line = result.stdout.strip()
    assert "text-embedding-3-large 1 GlobalStandrd" in line and "not offered as GlobalStandrd" in line
    assert "text-embedding-3-large 1 (GlobalStandard,Standard)" in line


def test_a_model_missing_in_one_region_of_the_pool_names_that_region(world: World):
    world.region("northcentralus", [m for m in TODAY if not m[0].startswith("text-embedding-3-large")])
    result = world.run()
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "northcentralus" in lines[0] and "text-embedding-3-large" in lines[0]


def test_an_unknown_region_stops_with_az_s_reason(world: World):
    result = world.run(LB_OPENAI_LOCATIONS="eastus,mars")
    assert result.returncode == 1
    assert "'mars'" in result.stdout and "not available" in result.stdout


def test_existing_endpoints_skip_the_check_without_calling_az(world: World):
    result = world.run(LB_EXISTING_OPENAI_ENDPOINTS="https://a.openai.azure.com")
    assert result.returncode == 0 and "skipped" in result.stdout
    assert world.calls() == []


def test_the_hook_is_posix_sh_not_bash():
    """azd runs it with `sh`, which is dash on Debian/Ubuntu: dash must parse it."""
    dash = shutil.which("dash")
    if dash is None:
        pytest.skip("dash not installed")
    result = subprocess.run([dash, "-n", str(HOOK)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(HOOK, os.X_OK)


def test_the_example_line_in_the_deployment_docs_is_what_the_hook_prints(world: World):
    docs = (HOOK.parents[2] / "docs" / "deployment.md").read_text()
    example = " ".join(docs.split("`preprovision: chat model gpt-4o-mini", 1)[1].split("...`", 1)[0].split())
    result = world.run(
        AZURE_OPENAI_CHATGPT_MODEL="gpt-4o-mini",
        AZURE_OPENAI_CHATGPT_DEPLOYMENT_VERSION="2024-07-18",
        LB_OPENAI_LOCATIONS="eastus",
    )
    assert result.stdout.startswith("preprovision: chat model gpt-4o-mini " + example)


def _with(model: str, **changes: str) -> list[tuple[str, ...]]:
    """TODAY with `model`'s lifecycle and/or retirement changed."""
    out = []
    for row in TODAY:
        if row[0] == model:
            row = (*row[:3], changes.get("lifecycle", row[3]), changes.get("retire", row[4]))
        out.append(row)
    return out


def test_azds_subscription_is_the_one_checked_not_azs_default(world: World):
    world.subscriptions("sub-of-azd")
    result = world.run(AZURE_SUBSCRIPTION_ID="sub-of-azd")
    assert result.returncode == 0, result.stdout + result.stderr
    listed = [c for c in world.calls() if c.startswith("cognitiveservices model list")]
    assert len(listed) == 3 and all(c.endswith("--subscription sub-of-azd") for c in listed)


def test_a_subscription_az_cannot_see_skips_the_check_and_names_it(world: World):
    world.subscriptions("another-one")
    result = world.run(AZURE_SUBSCRIPTION_ID="sub-of-azd")
    assert result.returncode == 0
    assert "sub-of-azd" in result.stdout and "AZURE_SUBSCRIPTION_ID" in result.stdout and "skipped" in result.stdout
    assert not [c for c in world.calls() if c.startswith("cognitiveservices")]


def test_a_model_retiring_within_90_days_is_one_warning_not_a_stop(world: World):
    for region in ("eastus", "northcentralus", "eastus2"):
        world.region(region, _with("gpt-5.4-mini", retire=in_days(30)))
    result = world.run()
    assert result.returncode == 0, result.stdout
    warnings = [line for line in result.stdout.splitlines() if "warning" in line]
    assert len(warnings) == 1, warnings  # once, not once per region
    assert "chat model gpt-5.4-mini 2026-03-17 retires on" in warnings[0] and "(30 days)" in warnings[0]
    assert "AZURE_OPENAI_CHATGPT_MODEL" in warnings[0]


def test_a_retirement_further_than_90_days_says_nothing(world: World):
    for region in ("eastus", "northcentralus", "eastus2"):
        world.region(region, _with("gpt-5.4-mini", retire=in_days(91)))
    result = world.run()
    assert result.returncode == 0 and "warning" not in result.stdout


def test_a_deprecating_model_warns_and_lets_a_subscription_that_still_deploys_it_go_on(world: World):
    world.region("eastus", _with("text-embedding-3-large", lifecycle="Deprecating", retire=in_days(200)))
    result = world.run(LB_OPENAI_LOCATIONS="eastus")
    assert result.returncode == 0, result.stdout
    (warning,) = [line for line in result.stdout.splitlines() if "warning" in line]
    assert "embedding model text-embedding-3-large 1 is Deprecating in eastus" in warning
    assert "existing customers only" in warning and "AZURE_OPENAI_EMB_MODEL_NAME" in warning


def test_a_deprecated_model_still_stops(world: World):
    world.region("eastus", _with("text-embedding-3-large", lifecycle="Deprecated"))
    result = world.run(LB_OPENAI_LOCATIONS="eastus")
    assert result.returncode == 1 and "deprecated there: no new deployments" in result.stdout

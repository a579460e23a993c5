"""README and docs/: links that resolve, the settings reference complete, a README a newcomer reads in minutes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lb.config import SETTING_NAMES

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_that_exist(page: Path):
    for target in LINK_RE.findall(page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        path = target.split("#", 1)[0]
        assert (page.parent / path).exists(), f"{page.name} links to {target}, which does not exist"


def test_every_balancer_setting_is_in_the_configuration_reference():
    reference = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    ours = {n for n in SETTING_NAMES if n.startswith(("LB_", "HTTP_", "AZURE_CLIENT_ID"))}
    missing = sorted(n for n in ours if f"`{n}`" not in reference and n not in reference)
    assert not missing, f"docs/configuration.md does not describe {missing}"


def test_readme_is_short_and_keeps_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 260
    assert "make demo" in text and "make test" in text
    for heading in ("## Run locally", "## Deploy to Azure", "## Connect a chat app", "## Documentation"):
        assert heading in text, heading


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unfilled_placeholders_and_urls_with_a_query_are_quoted_for_the_shell(page: Path):
    text = page.read_text(encoding="utf-8")
    prose = re.sub(r"```.*?```|`[^`\n]*`", "", text, flags=re.S)  # `{LB_POOL}|objects` in code is meant
    assert not re.search(r"\{[A-Z][A-Z0-9_]+\}", prose), "an unfilled {PLACEHOLDER}"
    for line in text.splitlines():
        if re.match(r"\s*curl\s", line) and "?" in line:
            assert re.search(r"curl\s+(-\S+\s+)*[\"']https?://[^\"']*\?", line), f"unquoted URL: {line.strip()}"


def test_the_code_map_names_every_module_and_package_of_lb():
    page = (ROOT / "docs" / "how-a-call-is-handled.md").read_text(encoding="utf-8")
    lb = ROOT / "lb"
    modules = [f"lb.{p.stem}" for p in lb.glob("*.py") if not p.stem.startswith("__")]
    packages = [f"lb/{p.name}/" for p in lb.iterdir() if (p / "__init__.py").exists()]
    missing = [name for name in (*modules, *packages) if name not in page]
    assert not missing, f"docs/how-a-call-is-handled.md's code map misses {missing}"


def test_no_page_says_a_silent_backend_is_cooled_at_the_attempt_timeout():
    security = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    assert "above your longest legitimate generation" not in security
    assert "robustness.md" in security
    handled = (ROOT / "docs" / "how-a-call-is-handled.md").read_text(encoding="utf-8")
    assert "circuit-breaker evidence" in handled and "pinned" in handled
    configuration = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    row = next(line for line in configuration.splitlines() if line.startswith("| `BACKEND_{X}_DEPLOYMENT_NAME`"))
    assert "not mapped explicitly" in row and "bare name" in row

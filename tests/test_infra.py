"""Static checks of the deployment files: the Bicep CLI is not available here, so these read the text.

They catch the mistakes that only show up after a 10-minute `azd up`: a setting name lb never reads,
a role GUID for the wrong role, a Flex-rejected setting, a module path typo, an unbalanced brace.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lb.config import BACKEND_SETTING_RE, DEFAULT_STATE_TABLE, SETTING_NAMES

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"

BICEP_FILES = sorted(INFRA.rglob("*.bicep"))

ROLES = {  # role definition GUID -> (module that assigns it, words its variable name must contain)
    "b7e6dc6d-f1e8-4753-8033-0f276bb0955b": ("storage.bicep", "blobdataowner"),
    "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3": ("storage.bicep", "tabledatacontributor"),
    "5e0bd9bd-7b93-4f28-af87-19fc36ad61bd": ("openai.bicep", "openaiuser"),
    "3913510d-42f4-4e42-8a64-420c390055eb": ("monitoring.bicep", "metricspublisher"),
}
REQUIRED_SETTINGS = {
    "BACKEND_1_URL",
    "AZURE_CLIENT_ID",
    "PYTHON_ENABLE_INIT_INDEXING",
    "LB_STATE_TABLE_ENDPOINT",
    "LB_CLIENT_KEYS",
}
# Flex Consumption refuses these: runtime and package location live in functionAppConfig instead.
FLEX_REJECTED = {
    "FUNCTIONS_WORKER_RUNTIME",
    "FUNCTIONS_EXTENSION_VERSION",
    "WEBSITE_RUN_FROM_PACKAGE",
    "SCM_DO_BUILD_DURING_DEPLOYMENT",
    "WEBSITE_CONTENTSHARE",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
}
GUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def strip_bicep(text: str, *, keep_strings: bool = False) -> str:
    """Drop comments (and string contents unless keep_strings), so checks see only code."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "'":
            j = i + 1
            while j < n and text[j] != "'":
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1] if keep_strings else "''")
            i = j + 1
        elif text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
        elif text.startswith("/*", i):
            i = text.index("*/", i) + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def is_setting_name(name: str) -> bool:
    return name in SETTING_NAMES or BACKEND_SETTING_RE.match(name) is not None


def bicep_app_settings() -> set[str]:
    """Names of the app settings the Bicep writes, read from the `// <app-settings>` blocks."""
    names: set[str] = set()
    blocks = 0
    for path in BICEP_FILES:
        for block in re.findall(r"// <app-settings>(.*?)// </app-settings>", read(path), re.DOTALL):
            blocks += 1
            code = strip_bicep(block, keep_strings=True)
            keys = re.findall(r"'([^'\n]+)'\s*:", code) + re.findall(r"^\s*([A-Za-z_]\w*)\s*:", code, re.MULTILINE)
            for key in keys:
                key = re.sub(r"\$\{[^}]*\}", "1", key)  # BACKEND_${i + 1}_URL -> BACKEND_1_URL
                if not key.islower():  # Bicep's own property names (properties, name) are lower case
                    names.add(key)
    assert blocks >= 2, "expected app-settings blocks in main.bicep and app/api.bicep"
    return names


def params_of(path: Path) -> dict[str, str]:
    """param name -> the rest of its declaration line."""
    return dict(re.findall(r"^param\s+(\w+)\s+(.*)$", read(path), re.MULTILINE))


# ---- azure.yaml ----


def load_yaml(path: Path) -> dict:
    try:
        import yaml
    except ImportError:  # tiny fallback for `key: value` nesting by indentation, enough for azure.yaml
        root: dict = {}
        stack = [(-1, root)]
        for line in read(path).splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            indent = len(line) - len(line.lstrip())
            key, _, value = line.strip().partition(":")
            while stack[-1][0] >= indent:
                stack.pop()
            value = value.strip().strip("'\"")
            child: dict | str = value if value else {}
            stack[-1][1][key] = child
            if isinstance(child, dict):
                stack.append((indent, child))
        return root
    return yaml.safe_load(read(path))


def test_azure_yaml_has_one_python_function_service_named_api():
    doc = load_yaml(ROOT / "azure.yaml")
    assert list(doc["services"]) == ["api"]
    api = doc["services"]["api"]
    assert (api["host"], api["language"], str(api["project"])) == (
        "function",
        "python",
        ".",
    )


def test_function_app_is_tagged_with_the_azure_yaml_service_name():
    api = read(INFRA / "app" / "api.bicep")
    assert "param serviceName string = 'api'" in api
    assert "'azd-service-name': serviceName" in api


# ---- Bicep structure ----


@pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_bicep_brackets_balance(path: Path):
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for line_no, line in enumerate(strip_bicep(read(path)).splitlines(), 1):
        for c in line:
            if c in "([{":
                stack.append(c)
            elif c in pairs:
                assert stack and stack.pop() == pairs[c], f"{path.name}:{line_no}: unexpected {c!r}"
    assert not stack, f"{path.name}: unclosed {''.join(stack)}"


@pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_bicep_module_paths_exist(path: Path):
    for ref in re.findall(r"^\s*module\s+\w+\s+'([^']+)'", read(path), re.MULTILINE):
        if not ref.startswith("br"):  # registry modules are fetched by bicep, not files
            assert (path.parent / ref).is_file(), f"{path.name}: module {ref} not found"


def test_infra_has_the_expected_modules():
    names = {p.relative_to(INFRA).as_posix() for p in BICEP_FILES}
    assert {
        "main.bicep",
        "app/api.bicep",
        "app/storage.bicep",
        "app/openai.bicep",
        "app/monitoring.bicep",
    } <= names


def test_role_guids_name_the_right_roles_in_the_right_modules():
    for guid, (module, words) in ROLES.items():
        text = read(INFRA / "app" / module)
        declared = re.findall(rf"^var\s+(\w+)\s*=\s*'{guid}'", text, re.MULTILINE)
        assert declared, f"{module} does not declare role {guid}"
        assert words in declared[0].lower(), f"{guid} is held by a variable named {declared[0]}"
        assert re.search(rf"roleDefinitions',\s*{declared[0]}\)", text), f"{declared[0]} is never assigned"


def test_no_other_role_guids_are_used():
    for path in BICEP_FILES:
        unknown = {g.lower() for g in GUID_RE.findall(read(path))} - set(ROLES)
        assert not unknown, f"{path.name}: unexpected GUIDs {unknown}"


def test_nothing_uses_shared_keys():
    for path in BICEP_FILES:
        text = read(path)
        assert "listKeys(" not in text and "listkeys(" not in text.lower(), path.name
        assert "AccountKey" not in text, path.name
    assert "allowSharedKeyAccess: false" in read(INFRA / "app" / "storage.bicep")
    assert "disableLocalAuth: true" in read(INFRA / "app" / "openai.bicep")
    monitoring = read(INFRA / "app" / "monitoring.bicep")
    assert "DisableLocalAuth: true" in monitoring and "disableLocalAuth: true" in monitoring


def test_function_app_is_python_311_on_flex_consumption_with_identity_deployment():
    api = read(INFRA / "app" / "api.bicep")
    for needle in (
        "name: 'FC1'",
        "tier: 'FlexConsumption'",
        "kind: 'functionapp,linux'",
        "name: 'python'",
        "param pythonVersion string = '3.11'",
        "type: 'blobContainer'",
        "type: 'UserAssignedIdentity'",
        "scaleAndConcurrency",
    ):
        assert needle in api, needle


def test_openai_deployments_are_created_one_at_a_time():
    text = read(INFRA / "app" / "openai.bicep")
    assert re.search(
        r"@batchSize\(1\)\s*\nresource \w+ 'Microsoft\.CognitiveServices/accounts/deployments@",
        text,
    )


def test_main_defaults_match_the_issue_and_lb():
    params = params_of(INFRA / "main.bicep")
    assert params["openAiLocations"] == "array = ['eastus', 'northcentralus', 'eastus2']"
    assert params["existingOpenAiEndpoints"] == "array = []"
    assert params["stateTableName"] == f"string = '{DEFAULT_STATE_TABLE}'"
    assert params["chatModelName"] == "string = 'gpt-4o-mini'"
    assert params["embeddingModelName"] == "string = 'text-embedding-3-small'"
    assert "storage.bicep" in read(INFRA / "main.bicep")
    assert re.search(r"resource cooldowns 'tables'", read(INFRA / "app" / "storage.bicep"))


# ---- app settings ----


def test_every_app_setting_in_bicep_is_one_lb_reads():
    unknown = {name for name in bicep_app_settings() if not is_setting_name(name)}
    assert not unknown, f"Bicep sets settings lb does not read: {sorted(unknown)}"


def test_bicep_sets_every_required_setting():
    names = bicep_app_settings()
    assert REQUIRED_SETTINGS <= names, sorted(REQUIRED_SETTINGS - names)
    assert {
        "BACKEND_1_PRIORITY",
        "BACKEND_1_WEIGHT",
        "BACKEND_1_DEPLOYMENTS",
        "LB_STATE_TABLE",
    } <= names
    assert {
        "AzureWebJobsStorage__accountName",
        "AzureWebJobsStorage__credential",
        "AzureWebJobsStorage__clientId",
    } <= names
    assert {
        "APPLICATIONINSIGHTS_CONNECTION_STRING",
        "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
    } <= names


def test_bicep_sets_no_setting_flex_consumption_rejects():
    for path in BICEP_FILES:
        code = strip_bicep(read(path), keep_strings=True)
        found = {name for name in FLEX_REJECTED if name in code}
        assert not found, f"{path.name} sets {sorted(found)}"


def test_outputs_hold_no_secret():
    text = read(INFRA / "main.bicep")
    secrets = set(re.findall(r"@secure\(\)\s*\n(?:@.*\n)*param\s+(\w+)", text))
    assert {"clientKey", "generatedClientKey"} <= secrets
    # Variables computed from a secret are secret too.
    for name, expr in re.findall(r"^var\s+(\w+)\s*=\s*(.*)$", text, re.MULTILINE):
        if any(re.search(rf"\b{s}\b", expr) for s in secrets):
            secrets.add(name)
    for path in BICEP_FILES:
        for line in strip_bicep(read(path)).splitlines():
            if line.startswith("output "):
                leaked = {s for s in secrets if re.search(rf"\b{s}\b", line)}
                assert not leaked, f"{path.name}: output uses {leaked}"
                assert not re.search(r"(?i)key\b", line.split("=", 1)[1]), f"{path.name}: {line}"


# ---- parameters, host.json, local settings ----


def test_parameters_file_sets_only_declared_params_and_every_required_one():
    doc = json.loads(read(INFRA / "main.parameters.json"))
    declared = params_of(INFRA / "main.bicep")
    given = doc["parameters"]
    assert set(given) <= set(declared), sorted(set(given) - set(declared))
    without_default = {name for name, rest in declared.items() if "=" not in rest}
    assert without_default <= set(given), f"azd would prompt for {sorted(without_default - set(given))}"
    assert given["environmentName"]["value"] == "${AZURE_ENV_NAME}"
    assert given["location"]["value"] == "${AZURE_LOCATION}"
    assert given["principalId"]["value"] == "${AZURE_PRINCIPAL_ID}"


def test_host_json_routes_at_the_root():
    host = json.loads(read(ROOT / "host.json"))
    assert host["version"] == "2.0"
    assert host["extensions"]["http"]["routePrefix"] == ""


def test_local_settings_sample_has_what_func_start_needs():
    doc = json.loads(read(ROOT / "local.settings.sample.json"))
    assert doc["IsEncrypted"] is False
    values = doc["Values"]
    assert all(isinstance(v, str) for v in values.values()), "func start wants string values"
    assert values["AzureWebJobsStorage"] == "UseDevelopmentStorage=true"
    assert values["FUNCTIONS_WORKER_RUNTIME"] == "python"
    assert values["PYTHON_ENABLE_INIT_INDEXING"] == "1"
    assert values["LB_STATE_CONNECTION_STRING"] == "UseDevelopmentStorage=true"
    assert {"BACKEND_1_URL", "LB_CLIENT_KEYS"} <= set(values)
    unknown = {name for name in values if not is_setting_name(name)}
    assert not unknown, f"settings lb does not read: {sorted(unknown)}"


def test_local_settings_json_is_ignored_by_git_and_func():
    assert "local.settings.json" in read(ROOT / ".gitignore").split()
    funcignore = read(ROOT / ".funcignore").split()
    assert {"local.settings.json", "tests/", "infra/", ".venv/"} <= set(funcignore)

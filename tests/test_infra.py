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


def test_main_defaults_are_current_models_and_lb_names():
    params = params_of(INFRA / "main.bicep")
    assert params["openAiLocations"] == "array = ['eastus', 'northcentralus', 'eastus2']"
    assert params["existingOpenAiEndpoints"] == "array = []"
    assert params["stateTableName"] == f"string = '{DEFAULT_STATE_TABLE}'"
    # Not retired before 2027 in Microsoft Learn's schedule (docs/deployment.md); gpt-4o-mini retired 2026-10-01.
    assert params["chatModelName"] == "string = 'gpt-5.4-mini'"
    assert params["chatModelVersion"] == "string = '2026-03-17'"
    assert params["chatSkuName"] == "string = 'GlobalStandard'"
    assert params["embeddingModelName"] == "string = 'text-embedding-3-large'"
    assert params["embeddingSkuName"] == "string = 'GlobalStandard'"
    assert params["embeddingDimensions"] == "int = 3072"  # what text-embedding-3-large gives and the RAG app asks
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


def test_local_settings_sample_has_what_func_start_needs_and_nothing_redundant():
    doc = json.loads(read(ROOT / "local.settings.sample.json"))
    assert doc["IsEncrypted"] is False
    values = doc["Values"]
    assert all(isinstance(v, str) for v in values.values()), "func start wants string values"
    assert values["AzureWebJobsStorage"] == "UseDevelopmentStorage=true"
    assert values["FUNCTIONS_WORKER_RUNTIME"] == "python"
    assert values["PYTHON_ENABLE_INIT_INDEXING"] == "1"
    assert {"BACKEND_1_URL", "LB_CLIENT_KEYS"} <= set(values)
    # The cooldown table falls back to AzureWebJobsStorage (the same Azurite), and worker indexing is
    # the host's default since v4.28: either line would only repeat a default.
    assert "LB_STATE_CONNECTION_STRING" not in values
    assert "AzureWebJobsFeatureFlags" not in values
    unknown = {name for name in values if not is_setting_name(name)}
    assert not unknown, f"settings lb does not read: {sorted(unknown)}"


def test_local_settings_json_is_ignored_by_git_and_func():
    assert "local.settings.json" in read(ROOT / ".gitignore").split()
    funcignore = read(ROOT / ".funcignore").split()
    assert {"local.settings.json", "tests/", "infra/", ".venv/"} <= set(funcignore)


def test_funcignore_ships_only_the_runtime():
    """Everything at the top level except what the Function runs is left out of the package."""
    ignored = {line.rstrip("/") for line in read(ROOT / ".funcignore").splitlines() if line and line[0] != "#"}
    runtime = {"function_app.py", "host.json", "requirements.txt", "lb"}
    for entry in ROOT.iterdir():
        name = entry.name
        if name in runtime or name in {".git"} or (name.startswith(".git") and ".git*" in ignored):
            continue
        assert name in ignored or any(p.endswith("*") and name.startswith(p[:-1]) for p in ignored), (
            f"{name} would be deployed"
        )
    assert not runtime & ignored
    assert {"requirements-bench.txt", "requirements-dev.txt", "docs", "bench", "tests", "node_modules"} <= ignored


@pytest.mark.e2e  # imports the package in a Python process of its own
def test_the_deployment_package_is_what_the_function_imports_and_nothing_else(tmp_path: Path):
    """Built as azd and Core Tools build it (the folder minus `.funcignore`), then imported on its own."""
    import shutil
    import subprocess
    import sys

    from tests.test_funchost import deployment_files

    files = deployment_files()
    assert {f.parts[0] for f in files} == {"function_app.py", "host.json", "requirements.txt", "lb"}
    shipped = {f.as_posix() for f in files}
    assert not {f for f in shipped if f.startswith("lb/sim/") or "__pycache__" in f or f.endswith(".pyc")}
    assert "lb/demo.py" not in shipped and "lb/proxy.py" in shipped
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)
    probe = "import json, sys, function_app; print(json.dumps([m for m in sys.modules if m.split('.')[0] == 'lb']))"
    env = {"PATH": "/usr/bin:/bin", "BACKEND_1_URL": "https://one.openai.azure.com", "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    imported = {m.replace(".", "/") for m in json.loads(result.stdout)}
    assert all(f"{m}.py" in shipped or f"{m}/__init__.py" in shipped for m in imported)


# ---- azd: parameters settable with `azd env set`, hooks, versions ----

AZD_VARIABLES = {  # main.bicep parameter -> the azd environment variable main.parameters.json maps to it
    "openAiLocationsCsv": "LB_OPENAI_LOCATIONS",
    "chatDeploymentName": "AZURE_OPENAI_CHATGPT_DEPLOYMENT",
    "chatModelName": "AZURE_OPENAI_CHATGPT_MODEL",
    "chatModelVersion": "AZURE_OPENAI_CHATGPT_DEPLOYMENT_VERSION",
    "chatSkuName": "AZURE_OPENAI_CHATGPT_DEPLOYMENT_SKU",
    "chatCapacity": "AZURE_OPENAI_CHATGPT_DEPLOYMENT_CAPACITY",
    "embeddingDeploymentName": "AZURE_OPENAI_EMB_DEPLOYMENT",
    "embeddingModelName": "AZURE_OPENAI_EMB_MODEL_NAME",
    "embeddingModelVersion": "AZURE_OPENAI_EMB_DEPLOYMENT_VERSION",
    "embeddingSkuName": "AZURE_OPENAI_EMB_DEPLOYMENT_SKU",
    "embeddingCapacity": "AZURE_OPENAI_EMB_DEPLOYMENT_CAPACITY",
    "embeddingDimensions": "AZURE_OPENAI_EMB_DIMENSIONS",
    "maximumInstanceCount": "LB_MAXIMUM_INSTANCE_COUNT",
    "instanceMemoryMB": "LB_INSTANCE_MEMORY_MB",
    "perInstanceConcurrency": "LB_PER_INSTANCE_CONCURRENCY",
    "alwaysReadyInstances": "LB_ALWAYS_READY_INSTANCES",
    "existingOpenAiEndpointsCsv": "LB_EXISTING_OPENAI_ENDPOINTS",
    "entraAllowedClients": "LB_ENTRA_ALLOWED_CLIENTS",
    "adminClients": "LB_ADMIN_CLIENTS",
    "clientKey": "LB_CLIENT_KEY",
}
HOOKS = INFRA / "hooks"


def parameter_file_variables() -> dict[str, tuple[str, str | None]]:
    """parameter -> (azd variable, its `${VAR=default}` default or None)."""
    out: dict[str, tuple[str, str | None]] = {}
    for name, spec in json.loads(read(INFRA / "main.parameters.json"))["parameters"].items():
        m = re.fullmatch(r"\$\{(\w+)(?:=([^}]*))?\}", spec["value"])
        assert m, f"{name}: {spec['value']!r} is not an azd ${{VAR}} reference"
        out[name] = (m.group(1), m.group(2))
    return out


def bicep_default(rest: str) -> str:
    """`string = 'x'` -> x, `int = 30` -> 30."""
    value = rest.split("=", 1)[1].strip()
    return value.strip("'")


def test_every_model_and_scale_parameter_is_settable_with_azd_env_set():
    mapped = parameter_file_variables()
    for param, variable in AZD_VARIABLES.items():
        assert mapped[param][0] == variable, f"{param} should read {variable}, reads {mapped[param][0]}"


def test_parameter_file_defaults_equal_the_bicep_defaults():
    """A value azd substitutes when the variable is unset must be the template's own default."""
    declared = params_of(INFRA / "main.bicep")
    for param, (variable, default) in parameter_file_variables().items():
        if default is not None:
            assert bicep_default(declared[param]) == default, f"{variable}: {default!r} vs {declared[param]!r}"


def hook_defaults(path: Path) -> dict[str, str]:
    text = read(path)
    found = dict(re.findall(r"\$\{(\w+):-([^}]*)\}", text))  # sh: ${VAR:-default}
    found |= dict(re.findall(r"Get-Setting '(\w+)' '([^']*)'", text))  # PowerShell
    return found


@pytest.mark.parametrize("hook", ["preprovision.sh", "preprovision.ps1"])
def test_hook_defaults_equal_the_parameter_file_defaults(hook: str):
    defaults = {variable: default for variable, default in parameter_file_variables().values() if default}
    locations = params_of(INFRA / "main.bicep")["openAiLocations"]
    defaults["LB_OPENAI_LOCATIONS"] = ",".join(re.findall(r"'([a-z0-9]+)'", locations))
    in_hook = hook_defaults(HOOKS / hook)
    checked = {
        "AZURE_OPENAI_CHATGPT_MODEL",
        "AZURE_OPENAI_CHATGPT_DEPLOYMENT_VERSION",
        "AZURE_OPENAI_CHATGPT_DEPLOYMENT_SKU",
        "AZURE_OPENAI_EMB_MODEL_NAME",
        "AZURE_OPENAI_EMB_DEPLOYMENT_VERSION",
        "AZURE_OPENAI_EMB_DEPLOYMENT_SKU",
        "LB_OPENAI_LOCATIONS",
    }
    for variable in checked:
        assert in_hook.get(variable) == defaults[variable], f"{hook}: {variable}"


def test_azure_yaml_runs_the_preprovision_hook_on_both_shells_and_pins_azd():
    doc = load_yaml(ROOT / "azure.yaml")
    hook = doc["hooks"]["preprovision"]
    assert hook["posix"]["shell"] == "sh" and hook["posix"]["run"] == "./infra/hooks/preprovision.sh"
    assert hook["windows"]["shell"] == "pwsh" and hook["windows"]["run"] == "./infra/hooks/preprovision.ps1"
    for side in ("posix", "windows"):
        assert hook[side].get("continueOnError") in (False, "false"), "a missing model must stop azd"
        assert (ROOT / hook[side]["run"]).is_file()
    assert (HOOKS / "preprovision.sh").stat().st_mode & 0o111, "azd runs the sh hook directly"
    assert re.fullmatch(r">=\s*1\.\d+\.\d+", str(doc["requiredVersions"]["azd"]))


def test_powershell_hook_checks_the_same_things():
    ps = read(HOOKS / "preprovision.ps1")
    for needle in (
        "az cognitiveservices model list --location",
        "az account show",
        "Get-Command az",
        "LB_EXISTING_OPENAI_ENDPOINTS",
        "skipped",
        "exit 1",
        "offered instead",
        "AZURE_SUBSCRIPTION_ID",
        "@subscriptionArgs",
        "'Deprecating'",
        "$warnDays = 90",
        "model.deprecation.inference",
    ):
        assert needle in ps, needle


# ---- Flex Consumption scale ----


def test_http_concurrency_is_set_for_the_python_app():
    """Flex gives a Python app 1 HTTP request per instance unless perInstanceConcurrency is set."""
    api = strip_bicep(read(INFRA / "app" / "api.bicep"))
    assert re.search(r"triggers:\s*\{\s*http:\s*\{\s*perInstanceConcurrency:\s*perInstanceConcurrency", api)
    main = read(INFRA / "main.bicep")
    assert re.search(
        r"@minValue\(1\)\s*@maxValue\(1000\)\s*(@description\(.*\)\s*)?param perInstanceConcurrency int = \d+", main
    )
    assert "perInstanceConcurrency: perInstanceConcurrency" in main


def test_maximum_instance_count_is_bounded_to_what_flex_accepts():
    main = read(INFRA / "main.bicep")
    assert re.search(
        r"@minValue\(40\)\s*@maxValue\(1000\)\s*(@description\(.*\)\s*)?param maximumInstanceCount int", main
    )


def test_always_ready_instances_are_an_azd_setting_off_by_default():
    """0 keeps scale-to-zero; any other count pins that many instances to the HTTP group (billed while idle)."""
    main = read(INFRA / "main.bicep")
    declared = r"@minValue\(0\)\s*@maxValue\(1000\)\s*(@description\(.*\)\s*)?param alwaysReadyInstances int = 0"
    assert re.search(declared, main)
    assert "alwaysReadyInstances: alwaysReadyInstances" in main
    api = strip_bicep(read(INFRA / "app" / "api.bicep"), keep_strings=True)
    assert "alwaysReady: alwaysReadyInstances > 0 ? [{ name: 'http', instanceCount: alwaysReadyInstances }] : []" in api


def test_microsoft_web_resources_use_one_current_ga_api_version():
    api = read(INFRA / "app" / "api.bicep")
    versions = set(re.findall(r"'Microsoft\.Web/\w+@([\d-]+)'", api))
    assert versions == {"2026-03-15"}, versions


def test_location_is_limited_to_flex_consumption_regions():
    main = read(INFRA / "main.bicep")
    block = re.search(
        r"@allowed\(\[(.*?)\]\)\s*@metadata\(\{ azd: \{ type: 'location' \} \}\)\s*param location", main, re.S
    )
    assert block, "location has no @allowed list"
    regions = re.findall(r"'([a-z0-9]+)'", block.group(1))
    assert {"eastus", "eastus2", "swedencentral", "westeurope"} <= set(regions)
    assert not [r for r in regions if "euap" in r], "canary regions are not for users"
    assert len(regions) == len(set(regions))


def test_outputs_give_each_chat_app_its_url_form_and_the_embedding_dimensions():
    main = read(INFRA / "main.bicep")
    assert "output AZURE_OPENAI_CUSTOM_URL string = '${api.outputs.uri}/openai/v1'" in main
    assert "output LB_URL string = api.outputs.uri" in main
    assert "output AZURE_OPENAI_EMB_DIMENSIONS int = embeddingDimensions" in main
    assert "output AZURE_OPENAI_CHAT_DEPLOYMENT string = chatDeploymentName" in main


def test_per_instance_concurrency_default_is_the_measured_figure_with_margin():
    """The default comes from `python -m bench concurrency`: below what one process held within budget."""
    default = int(re.search(r"param perInstanceConcurrency int = (\d+)", read(INFRA / "main.bicep")).group(1))
    assert f"`perInstanceConcurrency` = **{default}**" in read(ROOT / "docs" / "performance.md")
    held = json.loads(read(ROOT / "bench" / "results" / "concurrency-50-75.json"))["most_streams_within_budget"]
    assert held is not None and 1 < default < held

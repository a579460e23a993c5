from __future__ import annotations

import pytest

from lb.config import BACKEND_SETTING_RE, ConfigError, load_settings

ONE = {"BACKEND_1_URL": "https://one.openai.azure.com/"}
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"


def test_backends_are_read_in_numeric_order_with_defaults():
    settings = load_settings(
        {
            "BACKEND_10_URL": "https://ten.openai.azure.com",
            "BACKEND_2_URL": "https://two.openai.azure.com",
            "BACKEND_2_PRIORITY": "2",
            "BACKEND_2_WEIGHT": "0.5",
            "BACKEND_2_APIKEY": "secret",
            "BACKEND_2_DEPLOYMENTS": "chat, embedding,",
            "BACKEND_east_URL": "https://east.openai.azure.com",
        }
    )
    assert [b.name for b in settings.backends] == ["2", "10", "east"]
    two = settings.backends[0]
    assert (two.priority, two.weight, two.api_key) == (2, 0.5, "secret")
    assert two.deployments == {"chat": "chat", "embedding": "embedding"}
    ten = settings.backends[1]
    assert (ten.priority, ten.weight, ten.api_key, ten.deployments) == (1, 1.0, None, None)
    assert settings.max_attempts == 3 and settings.timeout_seconds == 100
    assert settings.state.kind == "memory"


def test_trailing_slash_is_dropped_and_keys_are_masked():
    settings = load_settings({**ONE, "BACKEND_1_APIKEY": "topsecret", "LB_CLIENT_KEYS": "a, b"})
    assert settings.backends[0].url == "https://one.openai.azure.com"
    assert "topsecret" not in repr(settings) and "********" in repr(settings.backends[0])
    assert [(k.name, k.key) for k in settings.client_keys] == [("key1", "a"), ("key2", "b")]
    assert "'a'" not in repr(settings) and "'a'" not in repr(settings.client_keys)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, r"^BACKEND_1_URL: no backend configured"),
        ({"BACKEND_1_URL": "one.openai.azure.com"}, r"^BACKEND_1_URL: .*https://"),
        ({"BACKEND_1_URL": "ftp://one.openai.azure.com"}, r"^BACKEND_1_URL: .*https://"),
        ({"BACKEND_1_URL": "https://"}, r"^BACKEND_1_URL: .*no host"),
        ({"BACKEND_1_URL": ""}, r"^BACKEND_1_URL: is empty"),
        ({"BACKEND_1_URL": "https://a.b:99999"}, r"^BACKEND_1_URL: .*port"),
        ({**ONE, "BACKEND_1_PRIORITY": "high"}, r"^BACKEND_1_PRIORITY: 'high' is not a whole number"),
        ({**ONE, "BACKEND_1_WEIGHT": "-1"}, r"^BACKEND_1_WEIGHT: .*at least 0"),
        ({**ONE, "BACKEND_1_WEIGHT": "0"}, r"^BACKEND_1_WEIGHT: every backend has weight 0"),
        ({**ONE, "HTTP_TIMEOUT_SECONDS": "soon"}, r"^HTTP_TIMEOUT_SECONDS: 'soon' is not a number"),
        ({**ONE, "HTTP_TIMEOUT_SECONDS": "nan"}, r"^HTTP_TIMEOUT_SECONDS: .*finite"),
        ({**ONE, "LB_ATTEMPT_TIMEOUT_SECONDS": "0"}, r"^LB_ATTEMPT_TIMEOUT_SECONDS: "),
        ({**ONE, "LB_MAX_ATTEMPTS": "0"}, r"^LB_MAX_ATTEMPTS: .*at least 1"),
        ({**ONE, "LB_DEFAULT_COOLDOWN_SECONDS": "90"}, r"^LB_DEFAULT_COOLDOWN_SECONDS: .*above LB_MAX_COOLDOWN"),
        ({**ONE, "LB_STATE_TABLE_ENDPOINT": "table.core.windows.net"}, r"^LB_STATE_TABLE_ENDPOINT: "),
        ({**ONE, "LB_STATE_TABLE": "bad-name"}, r"^LB_STATE_TABLE: "),
        ({**ONE, "LB_STATE_HOT_REFRESH_MS": "0"}, r"^LB_STATE_HOT_REFRESH_MS: .*at least 1"),
        ({**ONE, "LB_STATE_CONFIRM_MS": "-5"}, r"^LB_STATE_CONFIRM_MS: .*at least 0"),
        ({**ONE, "LB_STATE_CONFIRM_MS": "0.5"}, r"^LB_STATE_CONFIRM_MS: '0.5' is not a whole number"),
        ({**ONE, "WEBSITE_INSTANCE_ID": "abc"}, r"^LB_CLIENT_KEYS: required when running on Azure"),
        ({**ONE, "LB_ENTRA_TENANT_ID": "contoso.onmicrosoft.com"}, r"^LB_ENTRA_TENANT_ID: .*not a tenant id"),
        ({**ONE, "LB_ENTRA_AUDIENCES": "api://lb"}, r"^LB_ENTRA_AUDIENCES: needs LB_ENTRA_TENANT_ID"),
        ({**ONE, "LB_ENTRA_TENANT_ID": TENANT, "LB_ENTRA_ALLOWED_CLIENTS": "chat-app"}, r"^LB_ENTRA_ALLOWED_CLIENTS: "),
        ({**ONE, "LB_ENTRA_TENANT_ID": TENANT, "LB_ENTRA_AUTHORITY": "login.example"}, r"^LB_ENTRA_AUTHORITY: "),
        ({**ONE, "BACKEND_1_API_KEY": "k"}, r"^BACKEND_1_API_KEY: unknown backend setting"),
        ({**ONE, "BACKEND_2_KEY": "k"}, r"^BACKEND_2_KEY: unknown backend setting"),
        ({**ONE, "BACKEND_1_DEPLOYMENTS": "chat=,emb"}, r"^BACKEND_1_DEPLOYMENTS: 'chat=' is not"),
        ({**ONE, "BACKEND_1_DEPLOYMENTS": "chat=a/b"}, r"^BACKEND_1_DEPLOYMENTS: 'chat=a/b' is not"),
        ({**ONE, "BACKEND_1_DEPLOYMENTS": "chat=a=b"}, r"^BACKEND_1_DEPLOYMENTS: 'chat=a=b' is not"),
        ({**ONE, "BACKEND_1_DEPLOYMENTS": "chat=a,chat=b"}, r"^BACKEND_1_DEPLOYMENTS: 'chat' is mapped twice"),
        ({**ONE, "BACKEND_1_DEPLOYMENT_NAME": "gpt 4o"}, r"^BACKEND_1_DEPLOYMENT_NAME: "),
        ({**ONE, "LB_CLIENT_KEYS": "chat app:k1"}, r"^LB_CLIENT_KEYS: item 1 is not"),
        ({**ONE, "LB_CLIENT_KEYS": "a:k1,b:"}, r"^LB_CLIENT_KEYS: item 2 is not"),
        ({**ONE, "LB_CLIENT_KEYS": "a:k1,a:k2"}, r"^LB_CLIENT_KEYS: the name 'a' is used twice"),
    ],
)
def test_bad_configuration_names_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(env)


def test_anonymous_on_azure_only_when_explicitly_allowed():
    settings = load_settings({**ONE, "WEBSITE_INSTANCE_ID": "abc", "LB_ALLOW_ANONYMOUS": "true"})
    assert settings.anonymous and settings.on_azure


def test_entra_alone_is_enough_auth_on_azure_with_the_cognitive_services_and_ai_audiences_by_default():
    settings = load_settings({**ONE, "WEBSITE_INSTANCE_ID": "abc", "LB_ENTRA_TENANT_ID": TENANT.upper()})
    assert not settings.anonymous and settings.entra is not None
    assert settings.entra.tenant_id == TENANT
    assert settings.entra.audiences == ("https://cognitiveservices.azure.com", "https://ai.azure.com")
    assert settings.entra.allowed_clients is None
    assert settings.entra.issuers == (
        f"https://sts.windows.net/{TENANT}/",
        f"https://login.microsoftonline.com/{TENANT}/v2.0",
    )
    assert settings.entra.openid_configuration_url.startswith(f"https://login.microsoftonline.com/{TENANT}/v2.0/")


@pytest.mark.parametrize(
    ("env", "kind", "endpoint"),
    [
        ({"LB_STATE_CONNECTION_STRING": "UseDevelopmentStorage=true"}, "table", None),
        ({"AzureWebJobsStorage": "UseDevelopmentStorage=true"}, "table", None),
        (
            {"LB_STATE_TABLE_ENDPOINT": "https://acct.table.core.windows.net"},
            "table",
            "https://acct.table.core.windows.net",
        ),
        ({"AzureWebJobsStorage__accountName": "acct"}, "table", "https://acct.table.core.windows.net"),
        (
            {"AzureWebJobsStorage__tableServiceUri": "https://acct.table.core.windows.net"},
            "table",
            "https://acct.table.core.windows.net",
        ),
        ({}, "memory", None),
    ],
)
def test_state_store_is_chosen_from_settings(env, kind, endpoint):
    state = load_settings({**ONE, **env}).state
    assert state.kind == kind
    assert state.table_endpoint == endpoint
    assert (state.table, state.pool, state.refresh_ms) == ("lbcooldowns", "default", 1000)
    assert (state.hot_refresh_ms, state.confirm_ms) == (20, 50)


def test_under_throttling_requests_can_be_told_never_to_wait_for_the_table():
    settings = load_settings(
        {**ONE, "LB_STATE_CONNECTION_STRING": "UseDevelopmentStorage=true", "LB_STATE_CONFIRM_MS": "0"}
    )
    assert settings.state.confirm_ms == 0


def test_backend_setting_names_match_the_contract():
    assert BACKEND_SETTING_RE.match("BACKEND_1_URL")
    assert BACKEND_SETTING_RE.match("BACKEND_east_DEPLOYMENTS")
    assert BACKEND_SETTING_RE.match("BACKEND_2_DEPLOYMENT_NAME")
    assert not BACKEND_SETTING_RE.match("BACKEND_1_KEY")


def test_deployments_map_client_names_to_each_backends_own_names():
    settings = load_settings({**ONE, "BACKEND_1_DEPLOYMENTS": "chat=gpt4o-eastus, embedding=emb3,other"})
    backend = settings.backends[0]
    assert backend.deployments == {"chat": "gpt4o-eastus", "embedding": "emb3", "other": "other"}
    assert [backend.upstream_name(d) for d in ("chat", "embedding", "other")] == ["gpt4o-eastus", "emb3", "other"]
    assert backend.serves("chat") and not backend.serves("gpt4o-eastus")
    assert backend.renamed() == {"chat": "gpt4o-eastus", "embedding": "emb3"}


def test_openai_aca_lb_deployment_name_is_used_for_every_call_to_that_backend():
    settings = load_settings({**ONE, "BACKEND_2_URL": "https://two.example", "BACKEND_2_DEPLOYMENT_NAME": "gpt-4o"})
    one, two = settings.backends
    assert one.upstream_name("chat") == "chat" and one.renamed() == {}
    assert two.serves("chat") and two.upstream_name("chat") == "gpt-4o" and two.upstream_name("x") == "gpt-4o"
    assert two.renamed() == {"*": "gpt-4o"}
    # with a filter, its bare names are called by DEPLOYMENT_NAME and an explicit alias wins
    both = {**ONE, "BACKEND_1_DEPLOYMENT_NAME": "gpt-4o", "BACKEND_1_DEPLOYMENTS": "chat,mini=gpt-4o-mini"}
    backend = load_settings(both).backends[0]
    assert backend.deployments == {"chat": "gpt-4o", "mini": "gpt-4o-mini"} and not backend.serves("other")


def test_client_keys_carry_names_and_unnamed_keys_are_named_by_position():
    keys = load_settings({**ONE, "LB_CLIENT_KEYS": "chatapp:KEY1, KEY2 ,batch:KEY:3"}).client_keys
    assert [(k.name, k.key) for k in keys] == [("chatapp", "KEY1"), ("key2", "KEY2"), ("batch", "KEY:3")]


def test_one_attempt_may_take_half_the_deadline_unless_configured():
    assert load_settings({**ONE, "HTTP_TIMEOUT_SECONDS": "30"}).attempt_timeout_seconds == 15
    settings = load_settings({**ONE, "HTTP_TIMEOUT_SECONDS": "30", "LB_ATTEMPT_TIMEOUT_SECONDS": "20"})
    assert settings.attempt_timeout_seconds == 20


OID = "aaaaaaaa-0000-4000-8000-000000000001"  # an Entra object id (a managed identity's principal id)
OTHER_OID = "bbbbbbbb-0000-4000-8000-000000000002"
ENTRA = {**ONE, "LB_ENTRA_TENANT_ID": TENANT, "LB_ENTRA_ALLOWED_CLIENTS": OID}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"LB_CLIENT_KEYS": "ops:k1", "LB_ADMIN_CLIENTS": "ops,ghost"},
            r"^LB_ADMIN_CLIENTS: no client can be named 'ghost' \(not a key name of LB_CLIENT_KEYS\)$",
        ),
        (
            {"LB_CLIENT_KEYS": "k1", "LB_ADMIN_CLIENTS": OID},
            r"^LB_ADMIN_CLIENTS: no client can be named 'aaaa.*' \(not a key name",  # Entra is off
        ),
        (
            {"LB_ADMIN_CLIENTS": "ops"},
            r"^LB_ADMIN_CLIENTS: no client can be named 'ops' \(.*every caller is anonymous\)$",
        ),
        (
            {**ENTRA, "LB_ADMIN_CLIENTS": OTHER_OID},
            r"^LB_ADMIN_CLIENTS: 'bbbb.*' is not one of LB_ENTRA_ALLOWED_CLIENTS",
        ),
        (
            {**ENTRA, "LB_ADMIN_CLIENTS": "chat-app"},
            r"^LB_ADMIN_CLIENTS: no client can be named 'chat-app' \(neither .* nor an Entra object id, oid\)$",
        ),
        (
            {**ENTRA, "LB_CLIENT_LIMITS": f"{OTHER_OID}=5rpm"},
            r"^LB_CLIENT_LIMITS: 'bbbb.*' is not one of LB_ENTRA_ALLOWED_CLIENTS",
        ),
        ({**ENTRA, "LB_CLIENT_LIMITS": "chat-app=5rpm"}, r"^LB_CLIENT_LIMITS: no client can be named 'chat-app'"),
        (
            {**ENTRA, "LB_ENTRA_ALLOWED_CLIENTS": f"{OID},chat-app"},
            r"^LB_ENTRA_ALLOWED_CLIENTS: 'chat-app' is not an object id \(oid, a GUID\)$",
        ),
        (
            {**ENTRA, "LB_CLIENT_KEYS": f"{OTHER_OID}:k1"},
            r"^LB_CLIENT_KEYS: the name 'bbbb.*' is shaped like an Entra object id",
        ),
    ],
)
def test_a_client_name_nobody_can_have_stops_start_up_naming_the_variable_and_the_name(env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings({**ONE, **env})


def test_operators_are_named_as_clients_are_keys_by_name_entra_identities_by_lower_cased_oid():
    settings = load_settings({**ENTRA, "LB_CLIENT_KEYS": "ops:k1,app:k2", "LB_ADMIN_CLIENTS": f" ops , {OID.upper()}"})
    assert settings.admin_clients == {"ops", OID}
    assert load_settings({**ENTRA, "LB_CLIENT_LIMITS": f"{OID.upper()}=5rpm"}).client_limits.keys() == {OID}
    assert load_settings(ONE).admin_clients == frozenset()
    open_entra = {**ENTRA, "LB_ENTRA_ALLOWED_CLIENTS": ""}  # any identity of the tenant: any oid may be named
    assert load_settings({**open_entra, "LB_ADMIN_CLIENTS": OTHER_OID}).admin_clients == {OTHER_OID}
    assert load_settings({**ONE, "LB_CLIENT_KEYS": f"{OID}:k1"}).client_keys[0].name == OID  # no Entra: any name

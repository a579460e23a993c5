"""Who a client is, and what it may see of the pool: Entra clients named by their token's `oid`,
operator views (`/lb/status`, every client's `/lb/usage`) for `LB_ADMIN_CLIENTS` only."""

from __future__ import annotations

import httpx
import openai
import pytest

from lb.metering import Metering
from lb.metering.usage import Usage
from lb.sim import SimBackend
from lb.telemetry import Telemetry
from tests.conftest import TLS, SdkHttp
from tests.idp import APP_ID, LocalIdP, entra_env
from tests.test_cli import run_lb, serve_lb

USER_A = "aaaaaaaa-1111-4111-8111-00000000000a"  # two users signed in to one app: same appid, two oids
USER_B = "bbbbbbbb-2222-4222-8222-00000000000b"
MESSAGES = [{"role": "user", "content": "hi"}]


def user_token(idp: LocalIdP, oid: str | None) -> str:
    """A delegated token as Entra issues it to one app on a user's behalf: the app's id, the user's oid."""
    return idp.token(v2=True, oid=oid, idtyp="user", scp="user_impersonation")


def v1(url: str, credential: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/openai/v1", api_key=credential, max_retries=0, http_client=SdkHttp())


def chat(client: openai.OpenAI) -> None:
    client.chat.completions.create(model="chat", messages=MESSAGES)


# Entra identities ------------------------------------------------------------------------------------
def test_two_users_of_one_app_are_two_clients_and_neither_reads_the_others_stored_response(servers, idp):
    """Through `python -m lb serve`: user B of the same app gets a 404 for user A's response; A keeps it."""
    env = entra_env(idp, LB_ENTRA_ALLOWED_CLIENTS=f"{USER_A},{USER_B}")
    for i in (1, 2):
        env[f"BACKEND_{i}_URL"] = servers.start(SimBackend(f"s{i}", api_key=f"key-{i}"))
        env[f"BACKEND_{i}_APIKEY"] = f"key-{i}"
    process, url = serve_lb(env)
    try:
        alice, bob = v1(url, user_token(idp, USER_A)), v1(url, user_token(idp, USER_B))
        created = alice.responses.create(model="chat", input="my private notes")
        with pytest.raises(openai.NotFoundError):
            bob.responses.retrieve(created.id)
        with pytest.raises(openai.NotFoundError):
            bob.responses.create(model="chat", input="go on", previous_response_id=created.id)
        assert alice.responses.retrieve(created.id).id == created.id
        assert alice.responses.create(model="chat", input="go on", previous_response_id=created.id).id
    finally:
        process.terminate()
        process.communicate(timeout=10)


def test_a_limit_keyed_by_an_allow_listed_object_id_applies_to_that_identity_alone(make_pool, idp):
    env = entra_env(idp, LB_CLIENT_KEYS="", LB_ENTRA_ALLOWED_CLIENTS=f"{USER_A},{USER_B}")
    pool = make_pool(1, env={**env, "LB_CLIENT_LIMITS": f"{USER_A.upper()}=2rpm"})
    alice, bob = v1(pool.url, user_token(idp, USER_A)), v1(pool.url, user_token(idp, USER_B))
    chat(alice)
    chat(alice)
    with pytest.raises(openai.RateLimitError) as refused:
        chat(alice)
    assert refused.value.code == "ClientQuotaExceeded" and USER_A in refused.value.message
    for _ in range(3):
        chat(bob)  # the same app, another user: not limited by alice's quota
    assert len(pool.backends[0].calls) == 5


def test_a_token_without_an_object_id_is_refused_with_a_401_that_says_so(make_pool, idp):
    pool = make_pool(1, env=entra_env(idp, LB_CLIENT_KEYS=""))
    with pytest.raises(openai.AuthenticationError, match="no 'oid' claim") as refused:
        chat(v1(pool.url, user_token(idp, None)))
    assert refused.value.response.headers["www-authenticate"].startswith("Bearer ")
    assert pool.backends[0].calls == []


def test_an_allow_listed_app_id_admits_none_of_its_identities_and_the_refusal_says_to_list_the_oid(make_pool, idp):
    pool = make_pool(1, env=entra_env(idp, LB_CLIENT_KEYS="", LB_ENTRA_ALLOWED_CLIENTS=APP_ID))
    with pytest.raises(openai.AuthenticationError, match="list the identity's object id, oid, instead"):
        chat(v1(pool.url, user_token(idp, USER_A)))
    assert pool.backends[0].calls == []


# Operator views ----------------------------------------------------------------------------------------
KEYS = {"LB_CLIENT_KEYS": "ops:k-ops,app:k-app,batch:k-batch", "LB_ADMIN_CLIENTS": "ops"}


def get(url: str, credential: str | None = None) -> httpx.Response:
    return httpx.get(url, headers={"api-key": credential} if credential else {}, verify=TLS)


def test_status_needs_an_operator_key_and_anyone_else_gets_a_403_in_azures_shape(make_pool):
    pool = make_pool(2, env=KEYS)
    assert get(pool.url + "/lb/status").status_code == 401
    assert get(pool.url + "/lb/status", "wrong").status_code == 401
    refused = get(pool.url + "/lb/status", "k-app")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "PermissionDenied"
    assert "LB_ADMIN_CLIENTS" in refused.json()["error"]["message"]
    assert "127.0.0.1" not in refused.text  # no backend host
    status = get(pool.url + "/lb/status", "k-ops")
    assert status.status_code == 200 and [b["name"] for b in status.json()["backends"]] == ["1", "2"]


def test_usage_shows_a_client_its_own_counts_and_limit_and_an_operator_everyones(make_pool):
    pool = make_pool(1, env={**KEYS, "LB_CLIENT_LIMITS": "app=1000rpm,batch=1000rpm"})
    for key, calls in (("k-app", 2), ("k-batch", 3), ("k-ops", 1)):
        client = v1(pool.url, key)
        for _ in range(calls):
            chat(client)
    own = get(pool.url + "/lb/usage", "k-app")
    assert own.status_code == 200
    report = own.json()
    assert report["clients"].keys() == {"app"} and report["clients"]["app"]["last_minute"]["requests"] == 2
    assert report["limits"].keys() == {"app"}
    assert "backends" not in report
    assert '"batch"' not in own.text and '"ops"' not in own.text  # no other client's name, anywhere
    everyone = get(pool.url + "/lb/usage", "k-ops").json()
    assert {k: v["last_minute"]["requests"] for k, v in everyone["clients"].items()} == {"app": 2, "batch": 3, "ops": 1}
    assert everyone["limits"].keys() == {"app", "batch"} and everyone["backends"]["1"]["last_minute"]["requests"] == 6
    assert get(pool.url + "/lb/usage").status_code == 401


def test_an_entra_identity_is_an_operator_by_its_object_id(make_pool, idp):
    env = entra_env(idp, LB_CLIENT_KEYS="", LB_ENTRA_ALLOWED_CLIENTS=f"{USER_A},{USER_B}", LB_ADMIN_CLIENTS=USER_A)
    pool = make_pool(1, env=env)

    def status(oid: str) -> int:
        return httpx.get(
            pool.url + "/lb/status", headers={"authorization": f"Bearer {user_token(idp, oid)}"}
        ).status_code

    assert (status(USER_A), status(USER_B)) == (200, 403)


def test_without_any_client_auth_both_views_stay_open(make_pool):
    pool = make_pool(1, env={"LB_CLIENT_KEYS": ""})
    chat(v1(pool.url, "anything"))
    assert get(pool.url + "/lb/status").status_code == 200
    usage = get(pool.url + "/lb/usage").json()
    assert usage["clients"]["anonymous"]["last_minute"]["requests"] == 1 and "backends" in usage


def test_a_clients_report_keeps_only_its_own_entries_of_the_pools_counts_too():
    metering = Metering({}, Telemetry(), clock=lambda: 1_000.0)
    for client in ("app", "batch"):
        metering.record(client, "1", "chat", Usage(prompt=5, completion=5, total=10), answered=True)
    seen: list[str | None] = []

    class Share:  # the shared-table view: lb.metering.share filters its own counts by client
        pool_clients = None

        def pool_report(self, now: float, client: str | None = None) -> dict:
            seen.append(client)
            return {"instances": 2, "clients": {"app": {}, "batch": {}} if client is None else {client: {}}}

    metering.share = Share()  # type: ignore[assignment]
    assert metering.report()["pool"]["clients"].keys() == {"app", "batch"}
    own = metering.report(client="app")
    assert own["clients"].keys() == {"app"} and own["pool"]["clients"].keys() == {"app"} and "backends" not in own
    assert seen == [None, "app"]


@pytest.mark.e2e  # starts `lb serve`
def test_lb_serve_stops_at_start_up_naming_the_operator_nobody_can_be():
    process = run_lb(
        {"BACKEND_1_URL": "https://a.openai.azure.com", "LB_CLIENT_KEYS": "ops:k1", "LB_ADMIN_CLIENTS": "opz"}, "serve"
    )
    _, err = process.communicate(timeout=30)
    assert process.returncode != 0
    assert "LB_ADMIN_CLIENTS: no client can be named 'opz' (not a key name of LB_CLIENT_KEYS)" in err
    assert "Traceback" not in err

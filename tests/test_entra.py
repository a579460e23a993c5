"""Entra ID bearer tokens: validated against a local tenant (key pair + JWKS on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import jwt
import openai
import pytest

from lb.auth.entra import EntraValidator, InvalidToken, looks_like_jwt
from lb.config import load_settings
from lb.errors import Unauthorized
from tests.conftest import API_VERSION, CLIENT_KEY, SdkHttp, Stalls, eventually
from tests.idp import APP_ID, AUDIENCE, OBJECT_ID, OTHER_TENANT, TENANT, LocalIdP, SigningKey, entra_env

MESSAGES = [{"role": "user", "content": "hi"}]


def validator(idp: LocalIdP, **env: str) -> EntraValidator:
    settings = load_settings({"BACKEND_1_URL": "https://a.openai.azure.com", **entra_env(idp, **env)})
    assert settings.entra is not None
    return EntraValidator(settings.entra)


def validate(v: EntraValidator, token: str) -> dict:
    return asyncio.run(v.validate(token))


def test_a_managed_identity_v1_token_and_an_app_v2_token_are_accepted(idp):
    v = validator(idp)
    assert validate(v, idp.token())["appid"] == APP_ID
    assert validate(v, idp.token(v2=True))["azp"] == APP_ID
    assert validate(v, idp.token(aud=AUDIENCE + "/"))["tid"] == TENANT  # aud with a trailing slash too


def _none_alg(idp: LocalIdP) -> str:
    return jwt.encode({"aud": AUDIENCE, "exp": time.time() + 60}, None, algorithm="none", headers={"kid": "key-1"})


def _hmac_with_public_key(idp: LocalIdP) -> str:
    # The classic key-confusion attack: HS256 keyed with the public key the tenant publishes.
    return jwt.encode(
        {"aud": AUDIENCE}, "a-public-key-used-as-an-hmac-secret-here", algorithm="HS256", headers={"kid": "key-1"}
    )


def _tampered(idp: LocalIdP) -> str:
    header, _, signature = idp.token().split(".")
    forged = jwt.utils.base64url_encode(b'{"aud":"https://cognitiveservices.azure.com","exp":9999999999}').decode()
    return f"{header}.{forged}.{signature}"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda idp: idp.token(exp=int(time.time()) - 600), "expired"),
        (lambda idp: idp.token(nbf=int(time.time()) + 600), "not valid yet"),
        (lambda idp: idp.token(aud="https://management.azure.com"), "another audience"),
        (lambda idp: idp.token(iss=f"https://sts.windows.net/{OTHER_TENANT}/"), "another issuer"),
        (lambda idp: idp.token(iss="https://evil.example/"), "another issuer"),
        (lambda idp: idp.token(tid=OTHER_TENANT), "another tenant"),
        (lambda idp: idp.token(exp=None), "'exp'"),
        (lambda idp: idp.token(SigningKey("key-1")), "signature does not verify"),  # same kid, other key
        (lambda idp: idp.token(SigningKey("unpublished")), "does not publish"),
        (_none_alg, "RS256"),
        (_hmac_with_public_key, "RS256"),
        (_tampered, "signature does not verify"),
        (lambda idp: "eyJ.not.ajwt", "well-formed"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_tokens_that_must_be_refused(idp, make, reason):
    with pytest.raises(InvalidToken, match=reason):
        validate(validator(idp), make(idp))


def test_allowed_clients_match_the_object_id_only(idp):
    allowed = "aaaaaaaa-0000-0000-0000-000000000001"
    v = validator(idp, LB_ENTRA_ALLOWED_CLIENTS=f"{allowed.upper()}, bbbbbbbb-0000-0000-0000-000000000002")
    assert validate(v, idp.token(oid=allowed))
    assert validate(v, idp.token(v2=True, oid=allowed))
    with pytest.raises(InvalidToken, match=r"object id \(oid\) is not in LB_ENTRA_ALLOWED_CLIENTS\.$"):
        validate(v, idp.token())  # the default identity is not on the list
    for claim in ("appid", "azp"):  # an allow-listed app id lets none of the app's identities in, and says so
        with pytest.raises(InvalidToken, match="its app id is: list the identity's object id, oid, instead"):
            validate(v, idp.token(**{claim: allowed}))


@pytest.mark.parametrize("oid", [None, "", "not-a-guid", 42])
def test_a_token_without_an_object_id_is_refused(idp, oid):
    with pytest.raises(InvalidToken, match="has no 'oid' claim"):
        validate(validator(idp, LB_ENTRA_ALLOWED_CLIENTS=APP_ID), idp.token(oid=oid, sub=APP_ID))


def test_concurrent_first_requests_share_one_key_fetch(idp):
    v = validator(idp)
    tokens = [idp.token() for _ in range(50)]

    async def all_at_once() -> None:
        await asyncio.gather(*(v.validate(t) for t in tokens))

    asyncio.run(all_at_once())
    assert idp.key_fetches() == 1


def test_a_flood_of_unknown_kids_fetches_keys_at_most_once_per_interval(idp):
    now = [1000.0]
    settings = load_settings({"BACKEND_1_URL": "https://a", **entra_env(idp)}).entra
    v = EntraValidator(settings, refetch_interval=60, clock=lambda: now[0])
    validate(v, idp.token())
    with pytest.raises(InvalidToken):
        validate(v, idp.token(SigningKey("too-soon")))
    assert idp.key_fetches() == 1  # within the interval of the first fetch: no refetch at all
    now[0] += 61
    bogus = [idp.token(SigningKey(f"bogus-{i}")) for i in range(3)]

    async def flood() -> list[object]:
        return await asyncio.gather(*(v.validate(bogus[i % 3]) for i in range(300)), return_exceptions=True)

    results = asyncio.run(flood())
    assert all(isinstance(r, InvalidToken) for r in results)
    assert idp.key_fetches() == 2  # the first unknown kid refetched once; the rest waited for the interval


def test_a_rotated_key_is_picked_up_on_its_first_token(idp):
    now = [1000.0]
    settings = load_settings({"BACKEND_1_URL": "https://a", **entra_env(idp)}).entra
    v = EntraValidator(settings, refetch_interval=60, clock=lambda: now[0])
    validate(v, idp.token())
    new = SigningKey("key-2")
    idp.keys.append(new)
    now[0] += 61
    assert validate(v, idp.token(new))
    assert validate(v, idp.token())  # the old key still works
    assert idp.key_fetches() == 2


def test_keys_already_known_keep_working_while_the_idp_is_down(idp):
    now = [1000.0]
    settings = load_settings({"BACKEND_1_URL": "https://a", **entra_env(idp)}).entra
    v = EntraValidator(settings, refetch_interval=60, clock=lambda: now[0])

    async def scenario() -> None:
        await v.validate(idp.token())
        idp.down = True
        now[0] += 1.5 * 24 * 3600  # keys are stale: a refresh is tried and fails
        assert await v.validate(idp.token())
        await asyncio.sleep(0.3)
        with pytest.raises(InvalidToken, match="does not publish"):
            await v.validate(idp.token(SigningKey("new-while-down")))
        fetches = idp.key_fetches()
        idp.down = False
        now[0] += 61  # a failed refresh is retried after the interval, not a day later
        await v.validate(idp.token())
        assert await eventually(lambda: idp.key_fetches() > fetches)  # in the background: polled, not slept
        assert idp.key_fetches() == fetches + 1

    asyncio.run(scenario())


def test_day_old_keys_are_refreshed_in_the_background_while_requests_use_them(idp):
    now = [1000.0]
    settings = load_settings({"BACKEND_1_URL": "https://a", **entra_env(idp)}).entra
    v = EntraValidator(settings, refetch_interval=60, clock=lambda: now[0])
    rotated = SigningKey("key-2")

    async def scenario() -> None:
        await v.validate(idp.token())
        idp.delay = 1.0  # a slow tenant: nobody may wait for it
        idp.keys.append(rotated)
        now[0] += 23.5 * 3600
        for _ in range(20):
            started = time.perf_counter()
            with Stalls() as stalls:  # this thread's waits for a CPU: a loaded machine's, not the validator's
                assert await v.validate(idp.token())
            assert time.perf_counter() - started < 0.2 + stalls.seconds
        await asyncio.sleep(1.5)
        assert idp.key_fetches() == 2  # one refresh in the background, shared by all 20
        assert await v.validate(idp.token(rotated))  # the refresh brought the new key, no fetch needed
        assert idp.key_fetches() == 2

    asyncio.run(scenario())


def test_a_failing_refresh_keeps_the_keys_for_a_bounded_grace_and_is_logged_once(idp, caplog):
    now = [1000.0]
    settings = load_settings({"BACKEND_1_URL": "https://a", **entra_env(idp)}).entra
    v = EntraValidator(settings, refetch_interval=60, clock=lambda: now[0])

    async def scenario() -> None:
        await v.validate(idp.token())
        idp.down = True
        for _ in range(10):  # every minute for ten minutes, a day on
            now[0] += 24 * 3600 if _ == 0 else 61
            started = time.perf_counter()
            with Stalls() as stalls:  # this thread's waits for a CPU: a loaded machine's, not the validator's
                assert await v.validate(idp.token())
            assert time.perf_counter() - started < 0.2 + stalls.seconds
            await asyncio.sleep(0.05)
        assert idp.key_fetches() >= 3  # retried each interval (when the last try has ended)
        now[0] += 24 * 3600  # past the grace: the keys may have been withdrawn meanwhile
        with pytest.raises(InvalidToken, match="could not be fetched"):
            await v.validate(idp.token())

    with caplog.at_level(logging.WARNING, logger="lb"):
        asyncio.run(scenario())
    assert sum("could not be fetched" in r.getMessage() for r in caplog.records) == 1


def test_an_unreachable_idp_refuses_tokens_and_says_so(idp):
    idp.down = True
    with pytest.raises(InvalidToken, match="could not be fetched"):
        validate(validator(idp), idp.token())


def test_only_jwt_shaped_bearers_are_treated_as_tokens():
    assert looks_like_jwt("eyJhbGciOiJSUzI1NiJ9.eyJhIjoxfQ.c2ln")
    assert not looks_like_jwt("0123456789abcdef0123456789abcdef")
    assert not looks_like_jwt("a.b.c")


# Through the real runner, as a new user would call it ----------------------------------------------
def test_openai_sdk_with_an_entra_token_or_a_key_both_get_through(make_pool, idp):
    pool = make_pool(2, env=entra_env(idp))
    token_client = openai.AzureOpenAI(
        azure_endpoint=pool.url,
        azure_ad_token_provider=idp.token,
        api_version=API_VERSION,
        max_retries=0,
        http_client=SdkHttp(),
    )
    assert token_client.chat.completions.create(model="chat", messages=MESSAGES).choices[0].message.content
    streamed = token_client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    assert "tok4" in "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    v1 = openai.OpenAI(
        base_url=pool.url + "/openai/v1", api_key=idp.token(v2=True), max_retries=0, http_client=SdkHttp()
    )
    assert v1.embeddings.create(model="embedding", input="x").data
    assert pool.azure().chat.completions.create(model="chat", messages=MESSAGES).choices  # the key still works
    for backend in pool.backends:
        for call in backend.calls:  # the client's token never reaches a backend
            assert "authorization" not in call.headers and call.headers["api-key"].startswith("key-")


def test_a_refused_token_is_401_with_a_bearer_challenge_and_no_backend_call(make_pool, idp):
    pool = make_pool(1, env=entra_env(idp))
    url = f"{pool.url}/openai/deployments/chat/chat/completions?api-version={API_VERSION}"
    for token in (idp.token(exp=int(time.time()) - 600), idp.token(SigningKey("key-1")), "eyJ.x.y"):
        response = httpx.post(url, json={"messages": MESSAGES}, headers={"authorization": f"Bearer {token}"})
        assert response.status_code == 401
        assert set(response.json()["error"]) == {"code", "message"}
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge
        assert token not in response.text + challenge
    client = openai.AzureOpenAI(
        azure_endpoint=pool.url,
        azure_ad_token=idp.token(aud="api://other"),
        api_version=API_VERSION,
        max_retries=0,
        http_client=SdkHttp(),
    )
    with pytest.raises(openai.AuthenticationError, match="another audience"):
        client.chat.completions.create(model="chat", messages=MESSAGES)
    assert httpx.post(url, json={}).status_code == 401  # nothing presented
    assert pool.backends[0].calls == []


def test_entra_only_pool_refuses_keys(make_pool, idp):
    pool = make_pool(1, env={**entra_env(idp), "LB_CLIENT_KEYS": ""})
    with pytest.raises(openai.AuthenticationError, match="not an Entra ID access token"):
        pool.azure(key=CLIENT_KEY).chat.completions.create(model="chat", messages=MESSAGES)
    assert pool.backends[0].calls == []


def test_an_entra_client_is_named_by_its_object_id(idp):
    from lb.auth import ClientAuth

    auth = ClientAuth((), validator(idp))
    assert asyncio.run(auth.check(None, f"Bearer {idp.token()}")).id == f"entra:{OBJECT_ID}"
    assert asyncio.run(auth.check(None, f"Bearer {idp.token(v2=True)}")).id == f"entra:{OBJECT_ID}"
    user = asyncio.run(auth.check(None, f"Bearer {idp.token(oid=OBJECT_ID.upper(), idtyp='user', scp='x')}"))
    assert user.id == f"entra:{OBJECT_ID}"  # lower-cased, as LB_ENTRA_ALLOWED_CLIENTS and the limits are
    other = asyncio.run(auth.check(None, f"Bearer {idp.token(oid='dddddddd-0000-0000-0000-000000000004')}"))
    assert other.id == "entra:dddddddd-0000-0000-0000-000000000004"  # same app id, another identity
    with pytest.raises(Unauthorized, match="no 'oid' claim"):
        asyncio.run(auth.check(None, f"Bearer {idp.token(oid=None)}"))


# LlamaIndex's `use_azure_ad=True` and Learn's v1 audience, through `python -m lb serve` -------------
def test_a_token_sent_as_both_api_key_and_bearer_is_a_token_and_the_key_check_is_not_weakened(servers, idp):
    """LlamaIndex's Azure classes with `use_azure_ad=True` pass the token as `api_key` and a token provider
    too, so the request carries the JWT as `api-key` and as `Authorization: Bearer`. This openai SDK refuses
    both arguments at once; the same two headers are sent here as a default header plus the provider."""
    from lb.sim import SimBackend
    from tests.test_cli import serve_lb

    backend = SimBackend("b", api_key="backend-key")
    env = {**entra_env(idp), "LB_CLIENT_KEYS": "app:client-key", "LB_AFFINITY": "off"}
    env.update({"BACKEND_1_URL": servers.start(backend), "BACKEND_1_APIKEY": "backend-key"})
    process, url = serve_lb(env)
    chat = f"{url}/openai/deployments/chat/chat/completions?api-version={API_VERSION}"
    token = idp.token()
    try:
        llamaindex_like = openai.AzureOpenAI(
            azure_endpoint=url,
            azure_ad_token_provider=lambda: token,
            default_headers={"api-key": token},
            api_version=API_VERSION,
            max_retries=0,
            http_client=SdkHttp(),
        )
        answer = llamaindex_like.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
        sent = answer.http_request.headers
        assert sent["api-key"] == token and sent["authorization"] == f"Bearer {token}"  # the shape under test
        assert answer.status_code == 200
        assert llamaindex_like.responses.create(model="chat", input="hi").status == "completed"
        learn_v1 = idp.token(aud="https://ai.azure.com")
        v1_token = openai.OpenAI(base_url=url + "/openai/v1", api_key=learn_v1, max_retries=0, http_client=SdkHttp())
        assert v1_token.embeddings.create(model="embedding", input="x").data  # Learn's v1 samples' audience
        refused = {
            "the same expired token twice": {"api-key": (old := idp.token(exp=int(time.time()) - 600)), "bearer": old},
            "a valid token beside a wrong key": {"api-key": "wrong-key", "bearer": token},
            "a valid token beside a different token": {"api-key": idp.token(sub="other"), "bearer": token},
        }
        for why, sent in refused.items():
            headers = {"api-key": sent["api-key"], "authorization": f"Bearer {sent['bearer']}"}
            assert httpx.post(chat, json={"messages": MESSAGES}, headers=headers).status_code == 401, why
        key_beside_token = {"api-key": "client-key", "authorization": f"Bearer {token}"}
        assert httpx.post(chat, json={"messages": MESSAGES}, headers=key_beside_token).status_code == 200
    finally:
        process.terminate()
        process.communicate(timeout=20)
    assert len(backend.calls) == 4 and all(c.headers["api-key"] == "backend-key" for c in backend.calls)
    assert all("authorization" not in c.headers for c in backend.calls)

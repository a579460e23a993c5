"""Both official chat apps, with their OpenAI clients built exactly as their current code builds them.

openai-chat-app-quickstart (src/quartapp/chat.py): `AsyncOpenAI(base_url=f"{AZURE_OPENAI_ENDPOINT
.rstrip('/')}/openai/v1/", api_key=<async Entra token provider>)`, then `client.responses.stream(
model=<deployment>, input=<messages>, store=False)`, each event serialised with `model_dump()`.

azure-search-openai-demo with OPENAI_HOST=azure_custom (app/backend/prepdocslib/servicesetup.py):
`AsyncOpenAI(base_url=AZURE_OPENAI_CUSTOM_URL, api_key=AZURE_OPENAI_API_KEY_OVERRIDE or <async Entra
token provider>)`; streamed chat completions and embeddings with `dimensions` (embeddings.py). Its
ingestion can't start on azure_custom (no endpoint for setup_embeddings_service), so it runs with
OPENAI_HOST=azure against one account of the pool, as docs/chat-apps.md says.

The URLs are the ones docs/chat-apps.md tells the user to set: the quickstart's AZURE_OPENAI_ENDPOINT
is the balancer's base URL (the LB_URL output), the RAG app's AZURE_OPENAI_CUSTOM_URL is
`<balancer>/openai/v1` (the AZURE_OPENAI_CUSTOM_URL output). The token provider returns a token the
local identity provider (tests/idp.py) signed, as Entra signs a managed identity's token.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import openai
import pytest
from openai import AsyncOpenAI

from tests.conftest import CLIENT_KEY
from tests.idp import OBJECT_ID, LocalIdP, entra_env

DIMENSIONS = 3072  # the RAG app's default AZURE_OPENAI_EMB_DIMENSIONS, and our text-embedding-3-large default
CHAT, EMBEDDING = "chat", "embedding"  # the deployment names infra/main.bicep creates

# The quickstart's `event.model_dump()` makes pydantic warn about the SDK's own union types.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def token_provider(idp: LocalIdP) -> Callable[[], Awaitable[str]]:
    """Stands in for azure.identity.aio.get_bearer_token_provider(credential, ".../.default")."""
    calls = {"n": 0}

    async def provide() -> str:
        calls["n"] += 1
        return idp.token()  # v1 token of a managed identity: oid = OBJECT_ID, aud = cognitiveservices

    provide.calls = calls  # type: ignore[attr-defined]
    return provide


def keyless_pool(
    make_pool, idp: LocalIdP, n: int = 2, extra_env: dict[str, str] | None = None, **backend_kwargs: object
):
    """Balancer accepting only the chat app's Entra identity: LB_ENTRA_ALLOWED_CLIENTS, no client keys."""
    env = entra_env(idp, LB_ENTRA_ALLOWED_CLIENTS=OBJECT_ID, LB_CLIENT_KEYS="", **(extra_env or {}))
    return make_pool(n, env=env, **backend_kwargs)


# ---- openai-chat-app-quickstart ----


async def quickstart_chat(endpoint: str, api_key: Callable[[], Awaitable[str]], deployment: str) -> list[dict]:
    """What the quickstart's /chat/stream handler does, returning the NDJSON lines it would send."""
    client = AsyncOpenAI(base_url=f"{endpoint.rstrip('/')}/openai/v1/", api_key=api_key)
    lines: list[dict] = []
    try:
        async with client.responses.stream(
            model=deployment, input=[{"role": "user", "content": "What is Azure OpenAI?"}], store=False
        ) as stream:
            async for event in stream:
                lines.append(json.loads(json.dumps(event.model_dump(), ensure_ascii=False)))
    finally:
        await client.close()
    return lines


def test_quickstart_streams_a_response_through_the_balancer_with_its_managed_identity(make_pool, idp):
    pool = keyless_pool(make_pool, idp, chunks=4)
    provider = token_provider(idp)
    lines = asyncio.run(quickstart_chat(pool.url, provider, CHAT))
    types = [line["type"] for line in lines]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == 4
    text = "".join(line["delta"] for line in lines if line["type"] == "response.output_text.delta")
    assert text == lines[-1]["response"]["output"][0]["content"][0]["text"]
    assert provider.calls["n"] >= 1  # the token came from the provider, per call
    calls = [c for b in pool.backends for c in b.calls]
    assert len(calls) == 1
    call = calls[0]
    assert call.path == "/openai/v1/responses" and call.deployment == CHAT
    assert json.loads(call.body)["store"] is False
    assert "authorization" not in call.headers  # the chat app's token never reaches the backend
    assert call.headers["api-key"].startswith("key-")  # the balancer's own backend credential


def test_quickstart_with_a_token_of_another_identity_gets_401(make_pool, idp):
    pool = keyless_pool(make_pool, idp)

    async def stranger() -> str:
        return idp.token(appid="11111111-0000-0000-0000-000000000000", oid="22222222-0000-0000-0000-000000000000")

    with pytest.raises(openai.AuthenticationError):
        asyncio.run(quickstart_chat(pool.url, stranger, CHAT))
    assert not [c for b in pool.backends for c in b.calls]


def test_quickstart_stream_survives_a_throttled_backend(make_pool, idp):
    # Backend 3 is the fallback group, so the first call meets both throttled ones before it.
    pool = keyless_pool(make_pool, idp, n=3, extra_env={"BACKEND_3_PRIORITY": "2"})
    for backend in pool.backends[:2]:
        backend.throttle_next = 1
    provider = token_provider(idp)
    for _ in range(4):
        lines = asyncio.run(quickstart_chat(pool.url, provider, CHAT))
        assert lines[-1]["type"] == "response.completed"
    assert [b.count(429) for b in pool.backends] == [1, 1, 0]


# ---- azure-search-openai-demo (OPENAI_HOST=azure_custom) ----


def rag_client(custom_url: str, api_key: str | Callable[[], Awaitable[str]]) -> AsyncOpenAI:
    """servicesetup.setup_openai_client for AZURE_CUSTOM: base_url is AZURE_OPENAI_CUSTOM_URL as given."""
    return AsyncOpenAI(base_url=custom_url, api_key=api_key)


async def rag_turn(client: AsyncOpenAI) -> tuple[str, list[list[float]]]:
    """One RAG turn: embed the sections (batch, with dimensions), then stream the answer."""
    try:
        embedded = await client.embeddings.create(
            model=EMBEDDING, input=["section one", "section two", "section three"], dimensions=DIMENSIONS
        )
        stream = await client.chat.completions.create(
            model=CHAT,
            messages=[{"role": "system", "content": "Answer from the sources."}, {"role": "user", "content": "hi"}],
            stream=True,
            temperature=0.3,
            max_tokens=200,
            stream_options={"include_usage": True},
        )
        answer = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    finally:
        await client.close()
    return answer, [d.embedding for d in embedded.data]


@pytest.mark.parametrize("auth", ["entra", "key"])
def test_rag_app_chat_and_embeddings_with_dimensions(make_pool, idp, auth):
    """Keyless (its managed identity) or AZURE_OPENAI_API_KEY_OVERRIDE = one of LB_CLIENT_KEYS."""
    if auth == "entra":
        pool = keyless_pool(make_pool, idp, chunks=3)
        api_key: str | Callable[[], Awaitable[str]] = token_provider(idp)
    else:
        pool = make_pool(2, chunks=3)
        api_key = CLIENT_KEY
    custom_url = f"{pool.url}/openai/v1"  # the AZURE_OPENAI_CUSTOM_URL output
    answer, vectors = asyncio.run(rag_turn(rag_client(custom_url, api_key)))
    assert "tok0" in answer and "tok2" in answer
    assert len(vectors) == 3 and all(len(v) == DIMENSIONS for v in vectors)
    calls = [c for b in pool.backends for c in b.calls]
    paths = sorted(c.path for c in calls)
    assert paths == ["/openai/v1/chat/completions", "/openai/v1/embeddings"]
    embedding_call = next(c for c in calls if c.path.endswith("/embeddings"))
    assert embedding_call.deployment == EMBEDDING and json.loads(embedding_call.body)["dimensions"] == DIMENSIONS
    assert all("authorization" not in c.headers for c in calls)


async def ingest(base_url: str, account_key: str) -> list[list[float]]:
    """prepdocs with OPENAI_HOST=azure: embeddings of the sections from `https://<account>.openai.azure.com/openai/v1`.
    It sends the developer's token as Bearer; the simulated account checks an `api-key` instead."""
    client = AsyncOpenAI(base_url=base_url, api_key="developer-token", default_headers={"api-key": account_key})
    try:
        embedded = await client.embeddings.create(model=EMBEDDING, input=["section one", "two"], dimensions=DIMENSIONS)
    finally:
        await client.close()
    return [d.embedding for d in embedded.data]


def test_rag_ingestion_goes_straight_to_one_account_and_the_app_then_reads_through_the_balancer(make_pool, idp):
    """docs/chat-apps.md: ingestion can't start on azure_custom, so it runs against one account of the pool
    (same deployment, same dimensions); the deployed app then sends every call to the balancer."""
    pool = keyless_pool(make_pool, idp)
    account, other = pool.backends
    account_url = pool.proxy.settings.backends[0].url  # AZURE_OPENAI_SERVICE=<the first account>
    indexed = asyncio.run(ingest(f"{account_url}/openai/v1", account.api_key or ""))
    assert [c.path for c in account.calls] == ["/openai/v1/embeddings"] and not other.calls
    assert account.calls[0].deployment == EMBEDDING and all(len(v) == DIMENSIONS for v in indexed)
    answer, queried = asyncio.run(rag_turn(rag_client(f"{pool.url}/openai/v1", token_provider(idp))))
    assert answer and len(queried[0]) == len(indexed[0])  # the app's query vectors match the index
    through_balancer = [c for b in pool.backends for c in b.calls][1:]
    assert through_balancer and all(c.headers["api-key"].startswith("key-") for c in through_balancer)


@pytest.mark.parametrize("wrong", ["", "/v1"])
def test_a_chat_app_given_the_wrong_url_form_gets_a_404_naming_the_forms_served(make_pool, wrong):
    """The old instructions gave the bare host as AZURE_OPENAI_CUSTOM_URL: calls went to /chat/completions."""
    pool = make_pool(1)

    async def ask() -> None:
        async with rag_client(pool.url + wrong, CLIENT_KEY) as client:  # closed on its loop, as the app does
            await client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}])

    with pytest.raises(openai.NotFoundError) as caught:
        asyncio.run(ask())
    body = caught.value.response.json()
    message = body["error"]["message"]
    assert body["error"]["code"] == "NotFound"
    assert "/chat/completions is not served" in message
    assert "/openai/deployments/" in message and "/openai/v1/" in message
    assert not pool.backends[0].calls

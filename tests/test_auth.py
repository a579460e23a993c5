from __future__ import annotations

import asyncio
import time

import pytest
from azure.core.credentials import AccessToken

from lb.auth import BackendAuth, ClientAuth
from lb.config import Backend, ClientKey
from lb.errors import Unauthorized


class CountingCredential:
    """Stands in for DefaultAzureCredential: counts token fetches."""

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self.fetches = 0

    async def get_token(self, *scopes: str) -> AccessToken:
        assert scopes == ("https://cognitiveservices.azure.com/.default",)
        self.fetches += 1
        await asyncio.sleep(0.01)
        return AccessToken(f"token-{self.fetches}", int(time.time() + self.lifetime))

    async def close(self) -> None:
        pass


def test_entra_token_is_fetched_once_and_shared_by_concurrent_requests():
    credential = CountingCredential(lifetime=3600)
    auth = BackendAuth(credential)
    keyless = Backend("a", "https://a")

    async def many() -> list[dict[str, str]]:
        return await asyncio.gather(*(auth.headers(keyless) for _ in range(50)))

    headers = asyncio.run(many())
    assert credential.fetches == 1
    assert all(h == {"authorization": "Bearer token-1"} for h in headers)


def test_entra_token_is_refreshed_shortly_before_expiry():
    credential = CountingCredential(lifetime=200)  # inside the 5-minute refresh margin
    auth = BackendAuth(credential)

    async def twice() -> None:
        await auth.headers(Backend("a", "https://a"))
        await auth.headers(Backend("a", "https://a"))

    asyncio.run(twice())
    assert credential.fetches == 2


def test_backend_key_is_used_without_touching_entra():
    credential = CountingCredential(lifetime=3600)
    headers = asyncio.run(BackendAuth(credential).headers(Backend("a", "https://a", api_key="k")))
    assert headers == {"api-key": "k"} and credential.fetches == 0


@pytest.mark.parametrize(
    ("api_key", "authorization"),
    [("k2", None), (None, "Bearer k1"), (None, "bearer k2")],
)
def test_client_key_accepted_as_api_key_or_bearer(api_key, authorization):
    asyncio.run(ClientAuth(("k1", "k2")).check(api_key, authorization))


@pytest.mark.parametrize(
    ("api_key", "authorization"),
    [(None, None), ("wrong", None), (None, "Bearer wrong"), (None, "Basic k1"), ("", None), ("k1x", None)],
)
def test_client_key_rejected(api_key, authorization):
    with pytest.raises(Unauthorized):
        asyncio.run(ClientAuth(("k1", "k2")).check(api_key, authorization))


def test_no_client_keys_means_anonymous():
    asyncio.run(ClientAuth(()).check(None, None))


def test_the_client_is_named_by_the_key_it_sent():
    auth = ClientAuth((ClientKey("chatapp", "k1"), ClientKey("batch", "k2"), "k3"))
    assert asyncio.run(auth.check("k1", None)).id == "key:chatapp"
    assert asyncio.run(auth.check(None, "Bearer k2")).name == "batch"
    assert asyncio.run(auth.check("k3", None)).name == "key3"
    assert asyncio.run(ClientAuth(()).check(None, None)).id == "anonymous:anonymous"

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError

from lb.auth import BackendAuth, ClientAuth
from lb.config import Backend, ClientKey
from lb.errors import BackendCredentialUnavailable, Unauthorized


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


JWT_SHAPED = "eyJhbGciOiJSUzI1NiJ9.eyJhIjoxfQ.c2lnbmF0dXJl"


def test_a_key_sent_as_both_api_key_and_bearer_is_still_a_key():
    assert asyncio.run(ClientAuth(("k1",)).check("k1", "Bearer k1")).name == "key1"


def test_without_entra_a_jwt_sent_twice_is_checked_as_a_key_and_refused():
    """Only an Entra-enabled pool validates tokens; a keys-only pool never lets a JWT past its key check."""
    with pytest.raises(Unauthorized, match="invalid subscription key"):
        asyncio.run(ClientAuth(("k1",)).check(JWT_SHAPED, f"Bearer {JWT_SHAPED}"))


def test_no_client_keys_means_anonymous():
    asyncio.run(ClientAuth(()).check(None, None))


def test_the_client_is_named_by_the_key_it_sent():
    auth = ClientAuth((ClientKey("chatapp", "k1"), ClientKey("batch", "k2"), "k3"))
    assert asyncio.run(auth.check("k1", None)).id == "key:chatapp"
    assert asyncio.run(auth.check(None, "Bearer k2")).name == "batch"
    assert asyncio.run(auth.check("k3", None)).name == "key3"
    assert asyncio.run(ClientAuth(()).check(None, None)).id == "anonymous:anonymous"


class FakeCredential:
    """An AsyncTokenCredential whose fetches take `delay` seconds, and fail while `fail` is set."""

    def __init__(self, lifetime: float = 3600, delay: float = 0.0, fail: bool = False) -> None:
        self.lifetime, self.delay, self.fail = lifetime, delay, fail
        self.fetches = 0

    async def get_token(self, *scopes: str) -> AccessToken:
        self.fetches += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ClientAuthenticationError("ManagedIdentityCredential: no identity assigned")
        return AccessToken(f"token-{self.fetches}", int(time.time() + self.lifetime))

    async def close(self) -> None:
        pass


KEYLESS = Backend("a", "https://a")


def test_a_token_near_expiry_is_served_at_once_while_a_new_one_is_fetched_in_the_background():
    credential = FakeCredential(lifetime=200)  # inside the 5-minute refresh margin

    async def run() -> None:
        auth = BackendAuth(credential)
        assert await auth.headers(KEYLESS) == {"authorization": "Bearer token-1"}  # the first fetch is waited on
        credential.delay = 5
        started = time.monotonic()
        assert await auth.headers(KEYLESS) == {"authorization": "Bearer token-1"}  # not waiting on the refresh
        await asyncio.sleep(0)  # the refresh task starts
        assert time.monotonic() - started < 0.5 and credential.fetches == 2
        credential.delay = 0
        await auth.close()

    asyncio.run(run())


def test_the_first_token_fetch_is_bounded_by_the_request_deadline():
    async def run() -> float:
        auth = BackendAuth(FakeCredential(delay=5))
        started = time.monotonic()
        with pytest.raises(BackendCredentialUnavailable):
            await auth.headers(KEYLESS, deadline=started + 0.2)
        await auth.close()
        return time.monotonic() - started

    assert asyncio.run(run()) < 1


def test_a_failing_fetch_is_logged_once_and_retried_only_after_a_pause(caplog):
    credential = FakeCredential(fail=True)

    async def run() -> None:
        auth = BackendAuth(credential)
        for _ in range(5):
            with pytest.raises(BackendCredentialUnavailable, match="ClientAuthenticationError"):
                await auth.headers(KEYLESS, deadline=time.monotonic() + 1)

    with caplog.at_level(logging.ERROR, logger="lb"):
        asyncio.run(run())
    assert credential.fetches == 1  # the calls after it fail at once instead of each waiting on Entra
    assert sum("Entra ID token for the backends could not be fetched" in r.getMessage() for r in caplog.records) == 1

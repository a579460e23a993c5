"""Records of objects whose sub-resources are deleted or missing, multipart forms and batch input
files naming objects: the cases around the red-team findings in tests/test_redteam_objects.py.

With several clients (docs/security.md, "Isolation between clients") an upload's form fields and a
batch input file's lines are read by the rules of a direct call, and what can't be read is refused.
"""

from __future__ import annotations

import time

import httpx
import pytest

from lb.objects.records import ObjectRecord

KEYS = {"LB_CLIENT_KEYS": "alice:key-a,bob:key-b"}


@pytest.fixture
def pool(make_pool):
    return make_pool(1, env=KEYS)


def plant(pool, object_id: str, kind: str, owner: str) -> None:
    record = ObjectRecord("1", f"key:{owner}", kind, time.time() + 3600)
    pool.proxy.objects.records._keep(object_id, record)


# Records ------------------------------------------------------------------------------------------
def test_a_404_on_a_sub_path_keeps_the_record_and_one_on_the_object_drops_it(pool):
    response = "resp_" + "a" * 32  # recorded as alice's; the backend does not have it
    plant(pool, response, "response", "alice")
    with httpx.Client(base_url=pool.url, headers={"api-key": "key-a"}, timeout=10) as http:
        assert http.get(f"/openai/v1/responses/{response}/input_items").status_code == 404
        assert pool.proxy.objects.records.known(response) is not None  # a sub-path's 404 is not the object's
        assert http.get(f"/openai/v1/responses/{response}").status_code == 404
    assert pool.proxy.objects.records.known(response) is None  # the holder has no such object


def test_deleting_the_object_itself_drops_its_record(pool):
    store = "vs_" + "a" * 32
    plant(pool, store, "vector_store", "alice")
    with httpx.Client(base_url=pool.url, headers={"api-key": "key-a"}, timeout=10) as http:
        assert http.delete(f"/openai/v1/vector_stores/{store}").status_code == 200
    assert pool.proxy.objects.records.known(store) is None

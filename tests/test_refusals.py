from __future__ import annotations

import json

import pytest

from lb.auth.refusals import refuses_our_credential

CHAT = "/openai/deployments/chat/chat/completions?api-version=2024-10-21"
FINE_TUNING = "/openai/v1/fine_tuning/jobs"
BAD_KEY = {"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint."}}
BAD_TOKEN = {
    "statusCode": 401,
    "message": "Unauthorized. Access token is missing, invalid, audience is incorrect"
    " (https://cognitiveservices.azure.com), or have expired.",
}
DENIED = {"error": {"code": "PermissionDenied", "message": "Principal does not have access to API/Operation."}}


@pytest.mark.parametrize("path", [CHAT, FINE_TUNING, "/openai/v1/files"])
@pytest.mark.parametrize("body", [BAD_KEY, BAD_TOKEN])
def test_a_bad_key_or_token_refuses_the_balancer_whatever_was_asked(path, body):
    assert refuses_our_credential(path, json.dumps(body).encode())


@pytest.mark.parametrize(
    "path",
    [
        CHAT,
        "/openai/v1/responses",
        "/openai/v1/embeddings",
        "/openai/deployments/d/audio/speech",
        "/openai/v1/images/generations",
    ],
)
def test_permission_denied_on_an_inference_call_means_our_identity_lacks_the_role(path):
    assert refuses_our_credential(path, json.dumps(DENIED).encode())


@pytest.mark.parametrize("path", [FINE_TUNING, "/openai/v1/files", "/openai/v1/batches", "/openai/v1/vector_stores"])
def test_permission_denied_on_anything_else_is_the_clients_answer(path):
    assert not refuses_our_credential(path, json.dumps(DENIED).encode())


def test_an_unreadable_refusal_is_ours_on_inference_and_the_clients_elsewhere():
    assert refuses_our_credential(CHAT, b"")
    assert not refuses_our_credential(FINE_TUNING, b"<html>")

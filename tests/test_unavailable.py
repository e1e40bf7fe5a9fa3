"""Redis down: the requests that need it answer 503 with a clear message, never 500."""

from __future__ import annotations

import json

import pytest
import redis
from axes.handlers.proxy import AxesProxyHandler
from django.test import Client

from controlplane.middleware import DependencyUnavailableMiddleware
from conversations.streams import StreamUnavailable


@pytest.fixture
def redis_down(settings):
    original = settings.CACHES
    settings.CACHES = {
        "default": {**settings.CACHES["default"], "LOCATION": "redis://127.0.0.1:1/0"}
    }
    AxesProxyHandler.get_implementation(force=True)  # it keeps the cache it saw first
    yield
    settings.CACHES = original
    AxesProxyHandler.get_implementation(force=True)


def test_a_page_that_needs_redis_says_to_come_back_instead_of_failing(world_a, redis_down):
    # Login throttling counts failed logins in the cache (Redis).
    client = Client(raise_request_exception=False)
    response = client.post("/login/", {"username": world_a.member.email, "password": "wrong"})
    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    assert "unavailable for a moment" in response.content.decode()
    assert "Nothing was lost" in response.content.decode()


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ConnectionError("Connection refused"),
        redis.exceptions.TimeoutError("Timeout reading from socket"),
        StreamUnavailable("The event stream of run x is unavailable"),
    ],
)
def test_the_api_answers_redis_failures_with_its_error_envelope(rf, error):
    middleware = DependencyUnavailableMiddleware(lambda request: None)  # type: ignore[arg-type,return-value]
    response = middleware.process_exception(rf.get("/api/v1/threads"), error)
    assert response is not None and response.status_code == 503
    assert response["Content-Type"] == "application/json"
    body = json.loads(response.content)
    assert body["code"] == "unavailable" and "try again" in body["message"]


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ConnectionError("Connection refused"),
        redis.exceptions.TimeoutError("Timeout reading from socket"),
        StreamUnavailable("The event stream of run x is unavailable"),
    ],
)
def test_an_api_endpoint_that_hits_a_redis_failure_answers_503(world_a, monkeypatch, error):
    from usage import selectors

    def down(**kwargs):
        raise error

    monkeypatch.setattr(selectors, "price_list", down)
    client = Client(
        HTTP_AUTHORIZATION=f"Bearer {world_a.read_key_raw}", raise_request_exception=False
    )
    response = client.get("/api/v1/prices")
    assert response.status_code == 503 and response["Retry-After"] == "5"
    assert response.json()["code"] == "unavailable"
    monkeypatch.setattr(selectors, "price_list", lambda **kwargs: 1 / 0)
    assert client.get("/api/v1/prices").status_code == 500  # a bug is still a 500


def test_other_errors_are_left_to_the_500_handler(rf):
    middleware = DependencyUnavailableMiddleware(lambda request: None)  # type: ignore[arg-type,return-value]
    assert middleware.process_exception(rf.get("/api/v1/threads"), ValueError("bug")) is None

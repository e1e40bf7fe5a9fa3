"""A dependency that is down answers 503, never 500.

Redis holds only ephemeral state (DESIGN.md): while it is down, PostgreSQL still has every
fact, so a request that needed Redis gets a clear 503 with `Retry-After`, in the API's error
envelope under /api/ and as a friendly page elsewhere, and the reader can simply try again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from controlplane.errors import envelope

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5
MESSAGE = (
    "A part of the service (Redis) is unavailable for a moment. Nothing was lost; "
    "please try again in a few seconds."
)


def _unavailable(exc: BaseException) -> bool:
    from conversations.streams import StreamUnavailable

    current: BaseException | None = exc
    for _ in range(10):
        if current is None:
            return False
        if isinstance(
            current, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        ) or isinstance(current, StreamUnavailable):
            return True
        current = current.__cause__ or current.__context__
    return False


class DependencyUnavailableMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        return unavailable_response(request, exception)


def unavailable_response(request: HttpRequest, exception: BaseException) -> HttpResponse | None:
    """The 503 (with Retry-After) for an error caused by Redis being unreachable, else None.
    Pages get it from the middleware; the API's catch-all handler asks here first, since
    django-ninja handles an endpoint's exceptions before any middleware sees them."""
    if not _unavailable(exception):
        return None
    log.warning("%s %s: Redis is unavailable: %s", request.method, request.path, exception)
    response: HttpResponse
    if request.path.startswith("/api/"):
        response = JsonResponse(envelope("unavailable", MESSAGE), status=503)
    else:
        response = render(
            request,
            "errors/error.html",
            {"title": "Back in a moment", "message": MESSAGE},
            status=503,
        )
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response

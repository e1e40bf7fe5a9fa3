"""The one authentication path for API keys.

`Authorization: Bearer <key>` and `X-Api-Key: <key>` are two spellings of the same credential; both
go through `ApiKeyAuth.__call__` and `services.api_key_authenticate`, so no restriction can be
skipped by sending the key the other way. Nothing else runs before it on a protected route.
"""

from __future__ import annotations

from typing import cast

from django.http import HttpRequest
from ninja.security.base import AuthBase

from controlplane.errors import AuthenticationFailed, PermissionDenied
from tenants import limits, services
from tenants.actors import Actor
from tenants.models import ApiKey
from tenants.requests import ApiRequest


def extract_key(request: HttpRequest) -> str | None:
    header = request.headers.get("Authorization", "")
    bearer = None
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthenticationFailed(
                "Use `Authorization: Bearer <key>` (or the X-Api-Key header)."
            )
        bearer = value.strip()
    x_key = request.headers.get("X-Api-Key", "").strip() or None
    if bearer and x_key and bearer != x_key:
        raise AuthenticationFailed("Two different API keys were sent; send one.")
    return bearer or x_key


class ApiKeyAuth(AuthBase):
    """django-ninja auth callable. Sets request.tenant, request.api_key and request.actor."""

    openapi_type = "http"
    openapi_scheme = "bearer"
    openapi_description = (
        "A tenant API key, as `Authorization: Bearer <key>` or `X-Api-Key: <key>`."
    )

    def __call__(self, request: HttpRequest) -> ApiKey | None:
        raw = extract_key(request)
        if raw is None:
            raise AuthenticationFailed(
                "An API key is required: send `Authorization: Bearer <key>` or `X-Api-Key: <key>`."
            )
        key = services.api_key_authenticate(raw=raw)
        limits.api_request(key=key)  # every request of a key counts; 429 past its limit
        api_request = cast(ApiRequest, request)
        api_request.tenant = key.tenant
        api_request.api_key = key
        api_request.actor = Actor(api_key=key, ip_address=request.META.get("REMOTE_ADDR"))
        return key


def require_scope(request: ApiRequest, scope: str) -> None:
    key = request.auth
    if scope not in key.scopes and "admin" not in key.scopes:
        raise PermissionDenied(f"This API key lacks the `{scope}` scope.", required_scope=scope)

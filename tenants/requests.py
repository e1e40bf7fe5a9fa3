"""Typed views of the request objects that `tenant_view` and `ApiKeyAuth` fill in."""

from __future__ import annotations

from django.http import HttpRequest
from django_htmx.middleware import HtmxDetails

from tenants.actors import Actor
from tenants.models import ApiKey, Membership, Tenant, User


class AuthenticatedRequest(HttpRequest):
    user: User  # type: ignore[assignment]
    htmx: HtmxDetails


class TenantRequest(AuthenticatedRequest):
    """A dashboard request whose `/t/<slug>/` was checked against the user's membership."""

    tenant: Tenant
    membership: Membership
    actor: Actor


class ApiRequest(HttpRequest):
    """An API request authenticated by `ApiKeyAuth`: the key decides the tenant."""

    auth: ApiKey
    api_key: ApiKey
    tenant: Tenant
    actor: Actor

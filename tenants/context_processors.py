"""Navigation for the dashboard shell: the tenant switcher and the current tenant, if any."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest

from tenants import selectors


def navigation(request: HttpRequest) -> dict[str, Any]:
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {"signup_enabled": settings.SIGNUP_ENABLED}

    def memberships():  # evaluated only by templates that render the switcher
        return selectors.membership_list_for_user(user=user)

    return {
        "signup_enabled": settings.SIGNUP_ENABLED,
        "nav_memberships": memberships,
        "current_tenant": getattr(request, "tenant", None),
        "current_membership": getattr(request, "membership", None),
    }

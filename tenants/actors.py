"""Who is acting: a signed-in member or an API key. Services take an `Actor`, never a request."""

from __future__ import annotations

from dataclasses import dataclass

from tenants.models import ApiKey, ApiKeyScope, Membership, Role, User


@dataclass(frozen=True)
class Actor:
    user: User | None = None
    membership: Membership | None = None
    api_key: ApiKey | None = None
    ip_address: str | None = None

    @property
    def label(self) -> str:
        if self.user is not None:
            return self.user.email
        if self.api_key is not None:
            return f"API key {self.api_key.name} ({self.api_key.prefix}…)"
        return "system"

    def can_manage(self) -> bool:
        """Owners and admins manage the tenant; so does an API key with the admin scope."""
        if self.membership is not None:
            return self.membership.role in (Role.OWNER, Role.ADMIN)
        if self.api_key is not None:
            return ApiKeyScope.ADMIN in self.api_key.scopes
        return False

    @property
    def is_owner(self) -> bool:
        return self.membership is not None and self.membership.role == Role.OWNER


SYSTEM = Actor()

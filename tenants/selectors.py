"""Reads for tenants, members, invitations, API keys and the audit log. All scoped to one tenant."""

from __future__ import annotations

from datetime import datetime

from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.utils import timezone

from controlplane.errors import NotFound
from tenants.models import ApiKey, AuditEvent, Invitation, Membership, Tenant, User


def membership_for(*, slug: str, user: User) -> Membership:
    """The user's membership of the tenant at `slug`. NotFound if no such tenant or not a member:
    the two are indistinguishable, so a slug is not an oracle."""
    if not user.is_authenticated:
        raise NotFound("No such tenant.")
    try:  # unique per (tenant, user): `get` needs no ORDER BY, as `first` would
        return Membership.objects.select_related("tenant", "user").get(tenant__slug=slug, user=user)
    except Membership.DoesNotExist:
        raise NotFound("No such tenant.") from None


def user_exists(*, email: str) -> bool:
    return User.objects.filter(email__iexact=email.strip()).exists()


def membership_list_for_user(*, user: User) -> list[Membership]:
    """Every tenant the user belongs to, for the tenant switcher."""
    return list(
        # tenant-scope: a user lists their own memberships, which span tenants
        Membership.objects.unscoped("the tenant switcher shows every tenant of the signed-in user")
        .filter(user=user)
        .select_related("tenant")
        .order_by("tenant__name")
    )


def membership_list(*, tenant: Tenant) -> QuerySet[Membership]:
    return Membership.objects.for_tenant(tenant).select_related("user").order_by("user__email")


def membership_get(*, tenant: Tenant, membership_id) -> Membership:
    try:
        return Membership.objects.for_tenant(tenant).select_related("user").get(pk=membership_id)
    except (Membership.DoesNotExist, ValueError, ValidationError):
        raise NotFound("No such member.")


def invitation_list_pending(*, tenant: Tenant) -> QuerySet[Invitation]:
    return (
        Invitation.objects.for_tenant(tenant)
        .filter(accepted_at__isnull=True, revoked_at__isnull=True, expires_at__gt=timezone.now())
        .select_related("invited_by")
        .order_by("-created_at")
    )


def api_key_list(*, tenant: Tenant, include_revoked: bool = True) -> QuerySet[ApiKey]:
    qs = (
        ApiKey.objects.for_tenant(tenant)
        .select_related("created_by")
        .order_by("revoked_at", "-created_at")
    )
    return qs if include_revoked else qs.filter(revoked_at__isnull=True)


def api_key_get(*, tenant: Tenant, api_key_id) -> ApiKey:
    try:
        return ApiKey.objects.for_tenant(tenant).select_related("created_by").get(pk=api_key_id)
    except (ApiKey.DoesNotExist, ValueError, ValidationError):
        raise NotFound("No such API key.")


def audit_event_list(
    *,
    tenant: Tenant,
    action: str = "",
    actor: str = "",
    target_type: str = "",
    since: datetime | None = None,
    until: datetime | None = None,
) -> QuerySet[AuditEvent]:
    """Newest first. `action` matches a prefix (`member.` finds every member event)."""
    qs = AuditEvent.objects.for_tenant(tenant).order_by("-created_at")
    if action:
        qs = qs.filter(action__startswith=action)
    if actor:
        qs = qs.filter(actor_label__icontains=actor)
    if target_type:
        qs = qs.filter(target_type=target_type)
    if since:
        qs = qs.filter(created_at__gte=since)
    if until:
        qs = qs.filter(created_at__lt=until)
    return qs


def audit_actions(*, tenant: Tenant) -> list[str]:
    return list(
        AuditEvent.objects.for_tenant(tenant)
        .order_by("action")
        .values_list("action", flat=True)
        .distinct()
    )

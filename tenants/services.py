"""Writes for tenants, members, invitations and API keys.

Every service takes `tenant` first (where there is one) and an `Actor`, checks the actor may do it,
writes in one transaction with its audit event, and notifies open connections on commit.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timedelta
from functools import partial

from django.conf import settings
from django.core import signing
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.text import slugify

from controlplane.errors import AuthenticationFailed, NotFound, PermissionDenied, ValidationFailed
from tenants import limits, realtime
from tenants.actors import Actor
from tenants.audit import audit_changes, audit_record, changes
from tenants.models import (
    ApiKey,
    ApiKeyScope,
    Invitation,
    Membership,
    Role,
    Tenant,
    User,
)

RESERVED_SLUGS = frozenset({"new", "admin", "api", "static", "ws", "login", "logout", "signup"})
API_KEY_PREFIX = "cp"


def _require_manager(actor: Actor) -> None:
    if not actor.can_manage():
        raise PermissionDenied("Only owners and admins can manage this tenant.")


def _validate_slug(slug: str, *, exclude: Tenant | None = None) -> str:
    slug = slugify(slug)[:50]
    if not slug or len(slug) < 2:
        raise ValidationFailed(
            "The address is too short.", fields={"slug": "Use at least 2 letters or digits."}
        )
    if slug in RESERVED_SLUGS:
        raise ValidationFailed(
            "That address is reserved.", fields={"slug": f"“{slug}” is reserved."}
        )
    taken = Tenant.objects.filter(slug=slug)
    if exclude is not None:
        taken = taken.exclude(pk=exclude.pk)
    if taken.exists():
        raise ValidationFailed(
            "That address is taken.", fields={"slug": f"“{slug}” is already taken."}
        )
    return slug


def _unique_slug(name: str) -> str:
    base = slugify(name)[:40] or "team"
    if base in RESERVED_SLUGS or len(base) < 2:
        base = f"{base}-team"
    slug, n = base, 2
    while Tenant.objects.filter(slug=slug).exists():
        slug, n = f"{base}-{n}", n + 1
    return slug


# --- Tenants ----------------------------------------------------------------------------------


@transaction.atomic
def tenant_create(
    *, user: User, name: str, slug: str = "", ip_address: str | None = None
) -> Tenant:
    """Create a tenant with `user` as its owner. Raises ValidationFailed for a bad or taken slug."""
    name = name.strip()
    if not name:
        raise ValidationFailed("A name is required.", fields={"name": "Give the tenant a name."})
    slug = _validate_slug(slug) if slug.strip() else _unique_slug(name)
    try:
        with transaction.atomic():
            tenant = Tenant.objects.create(name=name[:100], slug=slug, created_by=user)
    except IntegrityError:
        raise ValidationFailed(
            "That address is taken.", fields={"slug": f"“{slug}” is already taken."}
        )
    membership = Membership.objects.create(tenant=tenant, user=user, role=Role.OWNER)
    actor = Actor(user=user, membership=membership, ip_address=ip_address)
    audit_record(
        tenant=tenant,
        actor=actor,
        action="tenant.created",
        target=tenant,
        change_set=changes({}, {"name": tenant.name, "slug": tenant.slug}),
    )
    return tenant


@transaction.atomic
def tenant_update(*, tenant: Tenant, actor: Actor, name: str, slug: str) -> Tenant:
    """Rename a tenant or change its address. Owners and admins only."""
    _require_manager(actor)
    name = name.strip()
    if not name:
        raise ValidationFailed("A name is required.", fields={"name": "Give the tenant a name."})
    new_slug = _validate_slug(slug, exclude=tenant) if slug != tenant.slug else slug
    before = {"name": tenant.name, "slug": tenant.slug}
    tenant.name, tenant.slug = name[:100], new_slug
    tenant.save(update_fields=["name", "slug"])
    audit_changes(
        tenant=tenant,
        actor=actor,
        action="tenant.updated",
        target=tenant,
        before=before,
        after={"name": tenant.name, "slug": tenant.slug},
    )
    return tenant


@transaction.atomic
def tenant_limits_update(*, tenant: Tenant, actor: Actor, **values: int | None) -> Tenant:
    """Set the tenant's rate limits (tenants/limits.py): None for the operator's default, 0 for
    no limit. Owners and admins only; ValidationFailed names each bad field. Takes effect for
    the next request (open chats: the next time they connect)."""
    _require_manager(actor)
    unknown = sorted(set(values) - set(limits.TENANT_DEFAULTS))
    if unknown:
        raise ValidationFailed("Unknown limits.", fields={f: "Not a limit." for f in unknown})
    clean = limits.validate(values)

    def effective(field: str) -> int:
        value = clean[field] if field in clean else getattr(tenant, field)
        return limits.default(field) if value is None else value

    per_minute, per_hour = (
        effective("end_user_runs_per_minute"),
        effective("end_user_runs_per_hour"),
    )
    if per_minute and per_hour and per_hour < per_minute:
        raise ValidationFailed(
            "The hourly limit is below the per-minute one.",
            fields={
                "end_user_runs_per_hour": f"Lower than the {per_minute:,} per minute, which it "
                f"would override. Make it at least {per_minute:,}, or 0 for no hourly limit."
            },
        )
    before = {field: getattr(tenant, field) for field in clean}
    for field, value in clean.items():
        setattr(tenant, field, value)
    tenant.save(update_fields=list(clean))
    audit_changes(
        tenant=tenant,
        actor=actor,
        action="tenant.limits_updated",
        target=tenant,
        before=before,
        after=clean,
    )
    return tenant


@transaction.atomic
def signup(
    *, email: str, password: str, name: str, tenant_name: str, ip_address: str | None = None
) -> tuple[User, Tenant]:
    """Create an account and its first tenant. Raises ValidationFailed if the e-mail is taken."""
    user = _user_create(email=email, password=password, name=name, taken="log in instead.")
    tenant = tenant_create(user=user, name=tenant_name, ip_address=ip_address)
    return user, tenant


def _user_create(*, email: str, password: str, name: str, taken: str) -> User:
    email = email.strip().lower()
    message = f"An account with this e-mail exists: {taken}"
    if User.objects.filter(email__iexact=email).exists():
        raise ValidationFailed("That e-mail is already registered.", fields={"email": message})
    try:
        with transaction.atomic():
            return User.objects.create_user(email=email, password=password, name=name.strip())
    except IntegrityError:  # registered concurrently, between the check and the insert
        raise ValidationFailed("That e-mail is already registered.", fields={"email": message})


# --- Members ----------------------------------------------------------------------------------


def _membership_for_update(*, tenant: Tenant, membership_id) -> Membership:
    try:
        return (
            Membership.objects.for_tenant(tenant)
            .select_for_update()
            .select_related("user")
            .get(pk=membership_id)
        )
    except (Membership.DoesNotExist, ValueError, ValidationError):
        raise NotFound("No such member.")


def _other_owners_exist(*, tenant: Tenant, excluding: Membership) -> bool:
    # Lock every owner row so two concurrent demotions cannot both see "another owner exists".
    owners = list(
        Membership.objects.for_tenant(tenant)
        .select_for_update()
        .filter(role=Role.OWNER)
        .values_list("pk", flat=True)
    )
    return any(pk != excluding.pk for pk in owners)


@transaction.atomic
def membership_change_role(*, tenant: Tenant, actor: Actor, membership_id, role: str) -> Membership:
    """Change a member's role. Only owners grant or take away ownership; the last owner stays."""
    _require_manager(actor)
    if role not in Role.values:
        raise ValidationFailed(
            "Unknown role.", fields={"role": f"Choose one of: {', '.join(Role.values)}."}
        )
    membership = _membership_for_update(tenant=tenant, membership_id=membership_id)
    if membership.role == role:
        return membership
    if Role.OWNER in (role, membership.role) and not actor.is_owner:
        raise PermissionDenied("Only an owner can grant or remove the owner role.")
    if membership.role == Role.OWNER and not _other_owners_exist(
        tenant=tenant, excluding=membership
    ):
        raise ValidationFailed(
            "A tenant needs at least one owner.",
            fields={"role": "Make someone else an owner first."},
        )
    before = membership.role
    membership.role = role
    membership.save(update_fields=["role"])
    audit_record(
        tenant=tenant,
        actor=actor,
        action="member.role_changed",
        target=membership,
        target_label=membership.user.email,
        change_set=changes({"role": before}, {"role": role}),
    )
    transaction.on_commit(partial(realtime.publish, tenant.pk, {"kind": "members"}))
    transaction.on_commit(partial(realtime.role_changed, membership.pk, role))
    return membership


@transaction.atomic
def membership_remove(*, tenant: Tenant, actor: Actor, membership_id) -> None:
    """Remove a member (or leave, for yourself). Their open websockets are closed on commit."""
    membership = _membership_for_update(tenant=tenant, membership_id=membership_id)
    leaving = actor.membership is not None and actor.membership.pk == membership.pk
    if not leaving:
        _require_manager(actor)
        if membership.role == Role.OWNER and not actor.is_owner:
            raise PermissionDenied("Only an owner can remove another owner.")
    if membership.role == Role.OWNER and not _other_owners_exist(
        tenant=tenant, excluding=membership
    ):
        raise ValidationFailed(
            "The last owner cannot be removed.",
            fields={"role": "Make someone else an owner first."},
        )
    audit_record(
        tenant=tenant,
        actor=actor,
        action="member.left" if leaving else "member.removed",
        target=membership,
        target_label=membership.user.email,
        change_set=changes({"role": membership.role}, {"role": None}),
    )
    group = realtime.membership_group(membership.pk)
    membership.delete()
    transaction.on_commit(partial(realtime.close_connections, group, reason="membership removed"))
    transaction.on_commit(partial(realtime.publish, tenant.pk, {"kind": "members"}))


# --- Invitations ------------------------------------------------------------------------------

INVITE_SALT = "tenants.invitation"


class InvitationInvalid(ValidationFailed):
    """The link is unusable; `reason` is one of tampered, expired, used, revoked, wrong_user."""

    def __init__(self, message: str, *, reason: str):
        super().__init__(message, reason=reason)
        self.reason = reason


def invitation_token(invitation: Invitation) -> str:
    return signing.dumps({"i": str(invitation.pk)}, salt=INVITE_SALT, compress=False)


def invitation_link(invitation: Invitation, *, base_url: str | None = None) -> str:
    from django.urls import reverse

    path = reverse("invitation-accept", kwargs={"token": invitation_token(invitation)})
    return f"{(base_url or settings.SITE_URL).rstrip('/')}{path}"


def _send_invitation(
    *, email: str, tenant_name: str, inviter: str, link: str, expires: datetime
) -> None:
    send_mail(
        subject=f"You are invited to {tenant_name}",
        message=(
            f"{inviter} invited you to join {tenant_name} on Control Plane.\n\n"
            f"Accept the invitation: {link}\n\n"
            f"The link works once and expires on {expires:%Y-%m-%d %H:%M} UTC."
        ),
        from_email=None,
        recipient_list=[email],
        fail_silently=True,
    )


@transaction.atomic
def invitation_create(
    *, tenant: Tenant, actor: Actor, email: str, role: str, base_url: str | None = None
) -> tuple[Invitation, str]:
    """Invite `email` with `role`; returns the invitation and its link (also e-mailed on commit).

    A new invitation to the same address replaces a pending one.
    """
    _require_manager(actor)
    email = email.strip().lower()
    if role not in Role.values:
        raise ValidationFailed(
            "Unknown role.", fields={"role": f"Choose one of: {', '.join(Role.values)}."}
        )
    if role == Role.OWNER and not actor.is_owner:
        raise ValidationFailed(
            "Only an owner can invite an owner.", fields={"role": "Choose admin or member."}
        )
    if Membership.objects.for_tenant(tenant).filter(user__email__iexact=email).exists():
        raise ValidationFailed(
            "Already a member.", fields={"email": f"{email} is already a member."}
        )
    now = timezone.now()
    Invitation.objects.for_tenant(tenant).filter(
        email=email, accepted_at__isnull=True, revoked_at__isnull=True
    ).update(revoked_at=now)
    invitation = Invitation.objects.create(
        tenant=tenant,
        email=email,
        role=role,
        invited_by=actor.user,
        expires_at=now + settings.INVITATION_MAX_AGE,
    )
    audit_record(
        tenant=tenant,
        actor=actor,
        action="invitation.created",
        target=invitation,
        target_label=email,
        change_set=changes({}, {"email": email, "role": role}),
    )
    link = invitation_link(invitation, base_url=base_url)
    transaction.on_commit(
        partial(
            _send_invitation,
            email=email,
            tenant_name=tenant.name,
            inviter=actor.label,
            link=link,
            expires=invitation.expires_at,
        )
    )
    return invitation, link


@transaction.atomic
def invitation_revoke(*, tenant: Tenant, actor: Actor, invitation_id) -> None:
    _require_manager(actor)
    try:
        invitation = (
            Invitation.objects.for_tenant(tenant)
            .select_for_update()
            .get(pk=invitation_id, accepted_at__isnull=True, revoked_at__isnull=True)
        )
    except (Invitation.DoesNotExist, ValueError, ValidationError):
        raise NotFound("No such pending invitation.")
    invitation.revoked_at = timezone.now()
    invitation.save(update_fields=["revoked_at"])
    audit_record(
        tenant=tenant,
        actor=actor,
        action="invitation.revoked",
        target=invitation,
        target_label=invitation.email,
    )


def invitation_from_token(token: str, *, for_update: bool = False) -> Invitation:
    """The invitation a link points at, if it can still be accepted. Raises InvitationInvalid."""
    try:
        data = signing.loads(
            token, salt=INVITE_SALT, max_age=settings.INVITATION_MAX_AGE + timedelta(minutes=5)
        )
        # tenant-scope: the signed link is the credential and names one invitation
        qs = Invitation.objects.unscoped(
            "an invitation link is the credential; its tenant is read from the row"
        )
        if for_update:
            qs = qs.select_for_update()
        invitation = qs.select_related("tenant").get(pk=data["i"])
    except signing.SignatureExpired:
        raise InvitationInvalid("This invitation has expired. Ask for a new one.", reason="expired")
    except (
        signing.BadSignature,
        KeyError,
        TypeError,
        ValueError,
        ValidationError,
        Invitation.DoesNotExist,
    ):
        raise InvitationInvalid(
            "This invitation link is not valid. Check that you copied all of it.", reason="tampered"
        )
    if invitation.accepted_at:
        raise InvitationInvalid("This invitation has already been used.", reason="used")
    if invitation.revoked_at:
        raise InvitationInvalid(
            "This invitation was withdrawn or replaced by a newer one.", reason="revoked"
        )
    if invitation.expires_at <= timezone.now():
        raise InvitationInvalid("This invitation has expired. Ask for a new one.", reason="expired")
    return invitation


@transaction.atomic
def invitation_accept(*, token: str, user: User, ip_address: str | None = None) -> Membership:
    """Accept an invitation as `user` (whose e-mail must match). Creates the membership once."""
    invitation = invitation_from_token(token, for_update=True)
    if invitation.email.lower() != user.email.lower():
        raise InvitationInvalid(
            f"This invitation is for {invitation.email}, but you are signed in as {user.email}.",
            reason="wrong_user",
        )
    tenant = invitation.tenant
    membership, _created = Membership.objects.for_tenant(tenant).get_or_create(
        tenant=tenant, user=user, defaults={"role": invitation.role}
    )
    invitation.accepted_at = timezone.now()
    invitation.accepted_by = user
    invitation.save(update_fields=["accepted_at", "accepted_by"])
    actor = Actor(user=user, membership=membership, ip_address=ip_address)
    audit_record(
        tenant=tenant,
        actor=actor,
        action="member.joined",
        target=membership,
        target_label=user.email,
        change_set=changes({}, {"role": membership.role}),
    )
    transaction.on_commit(partial(realtime.publish, tenant.pk, {"kind": "members"}))
    return membership


@transaction.atomic
def signup_with_invitation(
    *, token: str, password: str, name: str, ip_address: str | None = None
) -> tuple[User, Membership]:
    """Create the account an invitation was sent to and accept it, even when sign-up is closed."""
    invitation = invitation_from_token(token)
    user = _user_create(
        email=invitation.email,
        password=password,
        name=name,
        taken="log in to accept the invitation.",
    )
    return user, invitation_accept(token=token, user=user, ip_address=ip_address)


# --- API keys ---------------------------------------------------------------------------------


def _hash_key(raw: str) -> str:
    # Keys carry 190+ bits of randomness, so a fast hash is right here (a slow one would only
    # make every request slower); the lookup is by prefix, the comparison constant-time.
    return hashlib.sha256(raw.encode()).hexdigest()


@transaction.atomic
def api_key_create(
    *,
    tenant: Tenant,
    actor: Actor,
    name: str,
    scopes: list[str],
    expires_at: datetime | None = None,
    requests_per_minute: int | None = None,
    runs_per_minute: int | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; returns it with the raw secret, which is never stored or shown again.
    Its rate limits: None for the tenant's, 0 for none."""
    _require_manager(actor)
    name = name.strip()
    errors: dict[str, str] = {}
    try:
        key_limits = limits.validate(
            {"requests_per_minute": requests_per_minute, "runs_per_minute": runs_per_minute}
        )
    except ValidationFailed as exc:
        errors.update(exc.fields)
    if not name:
        errors["name"] = "Give the key a name that says where it is used."
    unknown = sorted(set(scopes) - set(ApiKeyScope.values))
    if unknown:
        errors["scopes"] = f"Unknown scope(s): {', '.join(unknown)}."
    elif not scopes:
        errors["scopes"] = "Choose at least one scope."
    if expires_at is not None and expires_at <= timezone.now():
        errors["expires_at"] = "The expiry must be in the future."
    if errors:
        raise ValidationFailed("The key could not be created.", fields=errors)
    prefix = secrets.token_hex(4)
    raw = f"{API_KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey.objects.create(
        tenant=tenant,
        name=name[:100],
        prefix=prefix,
        key_hash=_hash_key(raw),
        scopes=sorted(set(scopes)),
        created_by=actor.user,
        expires_at=expires_at,
        **key_limits,
    )
    audit_record(
        tenant=tenant,
        actor=actor,
        action="api_key.created",
        target=key,
        change_set=changes(
            {},
            {"name": key.name, "scopes": key.scopes, "expires_at": key.expires_at, **key_limits},
        ),
    )
    return key, raw


@transaction.atomic
def api_key_limits_update(
    *,
    tenant: Tenant,
    actor: Actor,
    api_key_id,
    requests_per_minute: int | None,
    runs_per_minute: int | None,
) -> ApiKey:
    """Set a key's rate limits: None for the tenant's, 0 for none. Owners and admins only; another
    tenant's key is NotFound. Takes effect with the key's next request."""
    _require_manager(actor)
    try:
        key = ApiKey.objects.for_tenant(tenant).select_for_update().get(pk=api_key_id)
    except (ApiKey.DoesNotExist, ValueError, ValidationError):
        raise NotFound("No such API key.")
    clean = limits.validate(
        {"requests_per_minute": requests_per_minute, "runs_per_minute": runs_per_minute}
    )
    before = {field: getattr(key, field) for field in clean}
    for field, value in clean.items():
        setattr(key, field, value)
    key.save(update_fields=list(clean))
    audit_changes(
        tenant=tenant,
        actor=actor,
        action="api_key.limits_updated",
        target=key,
        before=before,
        after=clean,
    )
    return key


@transaction.atomic
def api_key_revoke(*, tenant: Tenant, actor: Actor, api_key_id) -> ApiKey:
    """Revoke a key at once; streams opened with it are closed on commit."""
    _require_manager(actor)
    try:
        key = ApiKey.objects.for_tenant(tenant).select_for_update().get(pk=api_key_id)
    except (ApiKey.DoesNotExist, ValueError, ValidationError):
        raise NotFound("No such API key.")
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.revoked_by = actor.user
        key.save(update_fields=["revoked_at", "revoked_by"])
        audit_record(
            tenant=tenant,
            actor=actor,
            action="api_key.revoked",
            target=key,
            change_set=changes({"status": "active"}, {"status": "revoked"}),
        )
        transaction.on_commit(
            partial(
                realtime.close_connections, realtime.api_key_group(key.pk), reason="API key revoked"
            )
        )
    return key


def api_key_authenticate(*, raw: str) -> ApiKey:
    """The one check behind every accepted header form. Raises AuthenticationFailed saying why."""
    parts = raw.strip().split("_", 2)
    if len(parts) != 3 or parts[0] != API_KEY_PREFIX or not parts[1] or not parts[2]:
        raise AuthenticationFailed("The API key is malformed: expected cp_<prefix>_<secret>.")
    key = (
        ApiKey.objects.unscoped(  # tenant-scope: the key itself is what tells us the tenant
            "authenticating an API key by its unique prefix"
        )
        .select_related("tenant")
        .filter(prefix=parts[1])
        .first()
    )
    if key is None or not hmac.compare_digest(key.key_hash, _hash_key(raw.strip())):
        raise AuthenticationFailed("The API key is not valid.")
    if key.revoked_at is not None:
        raise AuthenticationFailed("The API key has been revoked.")
    now = timezone.now()
    if key.expires_at is not None and key.expires_at <= now:
        raise AuthenticationFailed("The API key has expired.")
    if key.last_used_at is None or now - key.last_used_at > settings.API_KEY_LAST_USED_RESOLUTION:
        # At most one write a minute per key, so a busy key does not turn every read into a write.
        ApiKey.objects.for_tenant(key.tenant).filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return key

from datetime import timedelta

import pytest
from django.core import mail, signing
from django.test import override_settings
from django.utils import timezone

from controlplane.errors import AuthenticationFailed, NotFound, PermissionDenied, ValidationFailed
from tenants import selectors, services
from tenants.actors import Actor
from tenants.models import ApiKey, AuditEvent, Invitation, Membership, Role, User
from tests.conftest import PASSWORD

# --- Tenants ----------------------------------------------------------------------------------


def test_creating_a_tenant_makes_the_creator_its_owner_and_audits_it(db):
    user = User.objects.create_user("zoe@example.test", PASSWORD)
    tenant = services.tenant_create(user=user, name="Zoe & Co")
    assert tenant.slug == "zoe-co"
    membership = Membership.objects.for_tenant(tenant).get()
    assert (membership.user, membership.role) == (user, Role.OWNER)
    event = AuditEvent.objects.for_tenant(tenant).get()
    assert event.action == "tenant.created"
    assert event.changes == {"name": [None, "Zoe & Co"], "slug": [None, "zoe-co"]}


def test_slugs_are_unique_and_reserved_ones_refused(world_a):
    with pytest.raises(ValidationFailed) as exc:
        services.tenant_create(user=world_a.owner, name="Other", slug="acme")
    assert "slug" in exc.value.fields
    with pytest.raises(ValidationFailed) as exc:
        services.tenant_create(user=world_a.owner, name="Api", slug="api")
    assert "reserved" in exc.value.fields["slug"]
    # a derived slug steps around a taken one instead of failing
    assert services.tenant_create(user=world_a.owner, name="Acme").slug == "acme-2"


def test_members_cannot_change_tenant_settings(world_a):
    with pytest.raises(PermissionDenied):
        services.tenant_update(
            tenant=world_a.tenant, actor=world_a.actor(world_a.member), name="Hacked", slug="acme"
        )
    world_a.tenant.refresh_from_db()
    assert world_a.tenant.name == "Acme"


# --- Members ----------------------------------------------------------------------------------


def test_the_last_owner_can_be_neither_demoted_nor_removed(world_a):
    actor = world_a.actor(world_a.owner)
    with pytest.raises(ValidationFailed, match="at least one owner"):
        services.membership_change_role(
            tenant=world_a.tenant,
            actor=actor,
            membership_id=world_a.owner_membership.pk,
            role=Role.ADMIN,
        )
    with pytest.raises(ValidationFailed, match="last owner"):
        services.membership_remove(
            tenant=world_a.tenant, actor=actor, membership_id=world_a.owner_membership.pk
        )
    # once there is a second owner, the first may step down
    services.membership_change_role(
        tenant=world_a.tenant,
        actor=actor,
        membership_id=world_a.admin_membership.pk,
        role=Role.OWNER,
    )
    services.membership_change_role(
        tenant=world_a.tenant,
        actor=actor,
        membership_id=world_a.owner_membership.pk,
        role=Role.ADMIN,
    )
    roles = dict(
        selectors.membership_list(tenant=world_a.tenant).values_list("user__email", "role")
    )
    assert roles["owner@acme.test"] == "admin" and roles["admin@acme.test"] == "owner"


def test_admins_cannot_touch_owners_and_members_cannot_manage(world_a):
    admin = world_a.actor(world_a.admin)
    with pytest.raises(PermissionDenied):
        services.membership_change_role(
            tenant=world_a.tenant,
            actor=admin,
            membership_id=world_a.member_membership.pk,
            role=Role.OWNER,
        )
    with pytest.raises(PermissionDenied):
        services.membership_remove(
            tenant=world_a.tenant, actor=admin, membership_id=world_a.owner_membership.pk
        )
    with pytest.raises(PermissionDenied):
        services.membership_remove(
            tenant=world_a.tenant,
            actor=world_a.actor(world_a.member),
            membership_id=world_a.admin_membership.pk,
        )
    # an admin may still manage members
    services.membership_change_role(
        tenant=world_a.tenant,
        actor=admin,
        membership_id=world_a.member_membership.pk,
        role=Role.ADMIN,
    )


def test_another_tenants_member_is_not_found(world_a, world_b):
    with pytest.raises(NotFound):
        services.membership_remove(
            tenant=world_a.tenant, actor=world_a.actor(), membership_id=world_b.member_membership.pk
        )
    assert (
        Membership.objects.for_tenant(world_b.tenant)
        .filter(pk=world_b.member_membership.pk)
        .exists()
    )


def test_a_member_can_leave(world_a):
    services.membership_remove(
        tenant=world_a.tenant,
        actor=world_a.actor(world_a.member),
        membership_id=world_a.member_membership.pk,
    )
    assert not Membership.objects.for_tenant(world_a.tenant).filter(user=world_a.member).exists()
    event = AuditEvent.objects.for_tenant(world_a.tenant).get(action="member.left")
    assert event.actor_label == "member@acme.test"


# --- Invitations ------------------------------------------------------------------------------


def _invite(world, email="new@example.test", role=Role.MEMBER):
    return services.invitation_create(
        tenant=world.tenant, actor=world.actor(), email=email, role=role
    )


def test_an_invitation_is_mailed_and_accepting_it_creates_the_membership_once(
    world_a, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        invitation, link = _invite(world_a, "New@Example.test", Role.ADMIN)
    assert invitation.email == "new@example.test"
    assert len(mail.outbox) == 1 and link in mail.outbox[0].body
    token = link.rstrip("/").rsplit("/", 1)[1]
    user = User.objects.create_user("new@example.test", PASSWORD)
    membership = services.invitation_accept(token=token, user=user)
    assert membership.role == Role.ADMIN and membership.tenant == world_a.tenant
    with pytest.raises(services.InvitationInvalid) as exc:
        services.invitation_accept(token=token, user=user)
    assert exc.value.reason == "used"
    assert Membership.objects.for_tenant(world_a.tenant).filter(user=user).count() == 1


def test_tampered_expired_revoked_and_foreign_invitations_create_nothing(world_a):
    invitation, link = _invite(world_a)
    token = link.rstrip("/").rsplit("/", 1)[1]
    user = User.objects.create_user("new@example.test", PASSWORD)
    stranger = User.objects.create_user("stranger@example.test", PASSWORD)

    for bad in (token[:-2] + "xx", "garbage", token.replace(":", ":A", 1)):
        with pytest.raises(services.InvitationInvalid) as exc:
            services.invitation_accept(token=bad, user=user)
        assert exc.value.reason == "tampered"

    with pytest.raises(services.InvitationInvalid) as exc:
        services.invitation_accept(token=token, user=stranger)
    assert exc.value.reason == "wrong_user"

    Invitation.objects.for_tenant(world_a.tenant).filter(pk=invitation.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    with pytest.raises(services.InvitationInvalid) as exc:
        services.invitation_accept(token=token, user=user)
    assert exc.value.reason == "expired"

    invitation2, link2 = _invite(world_a, "other@example.test")
    services.invitation_revoke(
        tenant=world_a.tenant, actor=world_a.actor(), invitation_id=invitation2.pk
    )
    other = User.objects.create_user("other@example.test", PASSWORD)
    with pytest.raises(services.InvitationInvalid) as exc:
        services.invitation_accept(token=link2.rstrip("/").rsplit("/", 1)[1], user=other)
    assert exc.value.reason == "revoked"
    assert Membership.objects.for_tenant(world_a.tenant).count() == 3


def test_a_signature_older_than_the_maximum_age_is_expired(world_a):
    invitation, _ = _invite(world_a)
    with override_settings(INVITATION_MAX_AGE=timedelta(seconds=-600)):
        token = signing.dumps({"i": str(invitation.pk)}, salt=services.INVITE_SALT)
        with pytest.raises(services.InvitationInvalid) as exc:
            services.invitation_from_token(token)
    assert exc.value.reason == "expired"


def test_a_new_invitation_replaces_the_pending_one(world_a):
    _first, first_link = _invite(world_a)
    second, _ = _invite(world_a)
    assert [i.pk for i in selectors.invitation_list_pending(tenant=world_a.tenant)] == [second.pk]
    with pytest.raises(services.InvitationInvalid):
        services.invitation_from_token(first_link.rstrip("/").rsplit("/", 1)[1])


def test_inviting_an_existing_member_or_an_owner_as_admin_is_refused(world_a):
    with pytest.raises(ValidationFailed) as exc:
        _invite(world_a, "member@acme.test")
    assert "email" in exc.value.fields
    with pytest.raises(ValidationFailed) as exc:
        services.invitation_create(
            tenant=world_a.tenant,
            actor=world_a.actor(world_a.admin),
            email="x@example.test",
            role=Role.OWNER,
        )
    assert "role" in exc.value.fields


# --- API keys ---------------------------------------------------------------------------------


def test_a_key_is_stored_hashed_and_authenticates(world_a):
    key, raw = services.api_key_create(
        tenant=world_a.tenant, actor=world_a.actor(), name="CI", scopes=["read"]
    )
    assert raw.startswith(f"cp_{key.prefix}_") and len(raw) > 40
    stored = ApiKey.objects.for_tenant(world_a.tenant).get(pk=key.pk)
    assert raw not in (stored.key_hash, stored.prefix, stored.name)
    assert services.api_key_authenticate(raw=raw).pk == key.pk
    assert ApiKey.objects.for_tenant(world_a.tenant).get(pk=key.pk).last_used_at is not None


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda raw: raw[:-1] + ("A" if raw[-1] != "A" else "B"), "not valid"),
        (lambda raw: "cp_deadbeef_" + raw.split("_", 2)[2], "not valid"),
        (lambda raw: "sk-" + raw, "malformed"),
        (lambda raw: "", "malformed"),
    ],
)
def test_wrong_keys_are_refused_with_a_reason(world_a, mangle, message):
    with pytest.raises(AuthenticationFailed, match=message):
        services.api_key_authenticate(raw=mangle(world_a.read_key_raw))


def test_revoked_and_expired_keys_are_refused(world_a):
    services.api_key_revoke(
        tenant=world_a.tenant, actor=world_a.actor(), api_key_id=world_a.read_key.pk
    )
    with pytest.raises(AuthenticationFailed, match="revoked"):
        services.api_key_authenticate(raw=world_a.read_key_raw)
    ApiKey.objects.for_tenant(world_a.tenant).filter(pk=world_a.admin_key.pk).update(
        expires_at=timezone.now() - timedelta(minutes=1)
    )
    with pytest.raises(AuthenticationFailed, match="expired"):
        services.api_key_authenticate(raw=world_a.admin_key_raw)


def test_key_input_is_validated_field_by_field(world_a):
    with pytest.raises(ValidationFailed) as exc:
        services.api_key_create(
            tenant=world_a.tenant,
            actor=world_a.actor(),
            name=" ",
            scopes=["root"],
            expires_at=timezone.now() - timedelta(days=1),
        )
    assert set(exc.value.fields) == {"name", "scopes", "expires_at"}
    with pytest.raises(PermissionDenied):
        services.api_key_create(
            tenant=world_a.tenant, actor=world_a.actor(world_a.member), name="mine", scopes=["read"]
        )


def test_an_admin_key_can_manage_but_a_read_key_cannot(world_a):
    admin = Actor(api_key=world_a.admin_key)
    key, _ = services.api_key_create(
        tenant=world_a.tenant, actor=admin, name="made by key", scopes=["run"]
    )
    event = AuditEvent.objects.for_tenant(world_a.tenant).filter(target_id=str(key.pk)).get()
    assert event.actor_label.startswith("API key Acme admin key")
    with pytest.raises(PermissionDenied):
        services.api_key_revoke(
            tenant=world_a.tenant, actor=Actor(api_key=world_a.read_key), api_key_id=key.pk
        )


def test_the_audit_log_never_holds_a_secret(world_a):
    key, raw = services.api_key_create(
        tenant=world_a.tenant, actor=world_a.actor(), name="secret test", scopes=["read", "run"]
    )
    services.api_key_revoke(tenant=world_a.tenant, actor=world_a.actor(), api_key_id=key.pk)
    dump = repr(list(AuditEvent.objects.for_tenant(world_a.tenant).values()))
    assert raw not in dump and key.key_hash not in dump and raw.split("_", 2)[2] not in dump


def test_audit_filters(world_a, world_b):
    _invite(world_a)
    events = selectors.audit_event_list(tenant=world_a.tenant, action="invitation.")
    assert [e.action for e in events] == ["invitation.created"]
    assert selectors.audit_event_list(tenant=world_a.tenant, actor="nobody").count() == 0
    assert all(
        e.tenant_id == world_a.tenant.pk for e in selectors.audit_event_list(tenant=world_a.tenant)
    )

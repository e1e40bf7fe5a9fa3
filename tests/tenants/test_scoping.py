import pytest

from tenants.models import ApiKey, Membership
from tenants.scoping import UnscopedQuery


def test_an_unscoped_query_fails_loudly(world_a):
    with pytest.raises(UnscopedQuery, match="tenant-owned"):
        list(Membership.objects.all())
    with pytest.raises(UnscopedQuery):
        Membership.objects.filter(role="owner").count()
    with pytest.raises(UnscopedQuery):
        Membership.objects.get(user=world_a.owner)
    with pytest.raises(UnscopedQuery):
        ApiKey.objects.filter(name__startswith="Acme").update(name="x")
    with pytest.raises(UnscopedQuery):
        ApiKey.objects.all().delete()
    # nothing was changed by the refused writes
    assert ApiKey.objects.for_tenant(world_a.tenant).filter(name="x").count() == 0


def test_for_tenant_returns_only_that_tenants_rows(world_a, world_b):
    a_users = set(
        Membership.objects.for_tenant(world_a.tenant).values_list("user__email", flat=True)
    )
    assert a_users == {"owner@acme.test", "admin@acme.test", "member@acme.test"}
    assert set(world_b.tenant.memberships.values_list("user__email", flat=True)) == {
        "owner@globex.test",
        "admin@globex.test",
        "member@globex.test",
    }


def test_a_relation_that_crosses_tenants_needs_a_reason(world_a, world_b):
    with pytest.raises(UnscopedQuery):
        list(world_a.owner.memberships.all())
    with pytest.raises(UnscopedQuery, match="reason"):
        Membership.objects.unscoped("  ")
    rows = Membership.objects.unscoped("test of the escape hatch").filter(user=world_a.owner)
    assert [m.tenant_id for m in rows] == [world_a.tenant.pk]


def test_for_tenant_refuses_a_missing_tenant(db):
    with pytest.raises(UnscopedQuery):
        Membership.objects.for_tenant(None)

"""Fail-closed tenant scoping (DESIGN.md "Tenancy").

Every tenant-owned model inherits `TenantOwned`. Its default manager hands out querysets that refuse
to run until they are restricted to a tenant:

    Agent.objects.for_tenant(tenant).filter(...)        # the normal way
    tenant.agents.all()                                  # reverse relation from the tenant
    Agent.objects.filter(tenant=tenant)                  # any filter on the tenant scopes it
    Agent.objects.unscoped("the sweeper looks at every tenant's runs")  # tenant-scope: ...

Anything else raises `UnscopedQuery` the moment it would hit the database, so a forgotten filter
is a loud failure in tests, never a silent leak in production. `tests/architecture/` also scans the
source so that every `unscoped(...)` carries a `# tenant-scope:` reason beside it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

from django.db import models

if TYPE_CHECKING:
    from tenants.models import Tenant


class UnscopedQuery(RuntimeError):
    """A tenant-owned table was queried without a tenant. This is always a bug."""


def _names_tenant(key: str) -> bool:
    return key.split("__", 1)[0] in ("tenant", "tenant_id")


class TenantScopedQuerySet(models.QuerySet):
    _tenant_scoped = False

    def _clone(self) -> Self:
        clone = super()._clone()  # type: ignore[misc]
        clone._tenant_scoped = self._tenant_scoped
        return clone

    def _mark(self) -> Self:
        self._tenant_scoped = True
        return self

    def for_tenant(self, tenant: Tenant) -> Self:
        if tenant is None or getattr(tenant, "pk", None) is None:
            raise UnscopedQuery(f"{self.model.__name__}: for_tenant() needs a saved tenant")
        return self.filter(tenant=tenant)

    def unscoped(self, reason: str) -> Self:
        """The named escape hatch. `reason` says why crossing tenants is right here."""
        if not reason or not reason.strip():
            raise UnscopedQuery("unscoped() needs a reason")
        return self._clone()._mark()

    def filter(self, *args: Any, **kwargs: Any) -> Self:
        qs = super().filter(*args, **kwargs)
        if any(_names_tenant(k) for k in kwargs):
            qs._tenant_scoped = True
        return qs

    def _check(self) -> None:
        if not self._tenant_scoped:
            raise UnscopedQuery(
                f"{self.model.__name__} is tenant-owned: query it with .for_tenant(tenant) "
                "or an explicit .unscoped(reason)"
            )

    # Every path to the database goes through one of these.
    def _fetch_all(self) -> None:
        if self._result_cache is None:
            self._check()
        super()._fetch_all()

    def count(self) -> int:
        self._check()
        return super().count()

    def exists(self) -> bool:
        self._check()
        return super().exists()

    def aggregate(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self._check()
        return super().aggregate(*args, **kwargs)

    def update(self, **kwargs: Any) -> int:
        self._check()
        return super().update(**kwargs)

    def delete(self) -> tuple[int, dict[str, int]]:
        self._check()
        return super().delete()

    def iterator(self, chunk_size: int | None = None):  # type: ignore[override]
        self._check()
        return super().iterator(chunk_size=chunk_size)

    async def acount(self) -> int:
        self._check()
        return await super().acount()

    async def aexists(self) -> bool:
        self._check()
        return await super().aexists()


class TenantScopedManager(models.Manager.from_queryset(TenantScopedQuerySet)):  # type: ignore[misc]
    # Related managers (tenant.memberships, user.memberships) derive from the default manager; the
    # ones reached from the tenant are scoped by their filter on `tenant`, the others need a reason.
    use_in_migrations = False


class TenantOwned(models.Model):
    """Base of every tenant-owned model: a non-null tenant and the fail-closed default manager."""

    tenant = models.ForeignKey(
        "tenants.Tenant", on_delete=models.CASCADE, related_name="%(class)ss", editable=False
    )

    objects = TenantScopedManager()

    class Meta:
        abstract = True

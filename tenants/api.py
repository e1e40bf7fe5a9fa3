"""REST endpoints for the tenant of the calling API key: its members, keys and audit log."""

from datetime import datetime
from uuid import UUID

from ninja import Field, Query, Router, Schema, Status
from ninja.pagination import LimitOffsetPagination, paginate

from tenants import limits, selectors, services
from tenants.auth import require_scope
from tenants.requests import ApiRequest

router = Router(tags=["tenant"])


class TenantOut(Schema):
    id: UUID
    name: str
    slug: str
    created_at: datetime


def _limit_field(description: str):
    return Field(None, ge=0, le=limits.MAX_LIMIT, description=description)


class TenantLimitsIn(Schema):
    """The tenant's rate limits (docs/rate-limits.md): null uses the operator's default, 0 means
    no limit."""

    end_user_runs_per_minute: int | None = _limit_field("Runs one end user may start a minute.")
    end_user_runs_per_hour: int | None = _limit_field("Runs one end user may start an hour.")
    api_key_requests_per_minute: int | None = _limit_field(
        "Requests one API key may make a minute (unless the key has its own limit)."
    )
    api_key_runs_per_minute: int | None = _limit_field(
        "Runs one API key may start a minute (unless the key has its own limit)."
    )


class TenantLimitsOut(TenantLimitsIn):
    effective: dict[str, int] = Field(
        description="The limits in force, defaults filled in (0: no limit)."
    )


class MemberOut(Schema):
    id: UUID
    email: str = Field(alias="user.email")
    name: str = Field(alias="user.name")
    role: str
    created_at: datetime


class ApiKeyOut(Schema):
    id: UUID
    name: str
    prefix: str
    scopes: list[str]
    status: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    requests_per_minute: int | None = Field(
        description="The key's request limit; null: the tenant's limit for keys. 0: none."
    )
    runs_per_minute: int | None = Field(
        description="The key's run-start limit; null: the tenant's limit for keys. 0: none."
    )


class ApiKeyLimitsIn(Schema):
    requests_per_minute: int | None = Field(
        None,
        ge=0,
        le=limits.MAX_LIMIT,
        description="Requests per minute; null: the tenant's limit, 0: none.",
    )
    runs_per_minute: int | None = Field(
        None,
        ge=0,
        le=limits.MAX_LIMIT,
        description="Runs started per minute; null: the tenant's limit, 0: none.",
    )


class ApiKeyCreateIn(ApiKeyLimitsIn):
    name: str = Field(min_length=1, max_length=100)
    scopes: list[str] = Field(min_length=1, examples=[["read", "run"]])
    expires_at: datetime | None = None


class ApiKeyCreatedOut(ApiKeyOut):
    key: str = Field(description="The secret. It is shown this once and never again.")


class AuditEventOut(Schema):
    id: UUID
    created_at: datetime
    actor: str = Field(alias="actor_label")
    action: str
    target_type: str
    target_id: str
    target_label: str
    changes: dict


class AuditFilter(Schema):
    action: str = Field("", max_length=64, description="Action prefix, e.g. `member.`")
    actor: str = Field("", max_length=255)
    target_type: str = Field("", max_length=64)
    since: datetime | None = None
    until: datetime | None = None


@router.get("/tenant", response=TenantOut)
def get_tenant(request: ApiRequest):
    require_scope(request, "read")
    return request.tenant


def _limits_out(tenant) -> dict:
    own = {field: getattr(tenant, field) for field in limits.TENANT_DEFAULTS}
    effective = {field: limits.tenant_limit(tenant, field) for field in limits.TENANT_DEFAULTS}
    return {**own, "effective": effective}


@router.get("/tenant/limits", response=TenantLimitsOut)
def get_tenant_limits(request: ApiRequest):
    require_scope(request, "read")
    return _limits_out(request.tenant)


@router.put("/tenant/limits", response=TenantLimitsOut)
def set_tenant_limits(request: ApiRequest, payload: TenantLimitsIn):
    """Set all four limits (an omitted or null one uses the operator's default)."""
    require_scope(request, "admin")
    tenant = services.tenant_limits_update(
        tenant=request.tenant, actor=request.actor, **payload.dict()
    )
    return _limits_out(tenant)


@router.get("/members", response=list[MemberOut])
def list_members(request: ApiRequest):
    require_scope(request, "read")
    return selectors.membership_list(tenant=request.tenant)


@router.get("/api-keys", response=list[ApiKeyOut])
def list_api_keys(request: ApiRequest):
    require_scope(request, "admin")
    return selectors.api_key_list(tenant=request.tenant)


@router.post("/api-keys", response={201: ApiKeyCreatedOut})
def create_api_key(request: ApiRequest, payload: ApiKeyCreateIn):
    require_scope(request, "admin")
    key, raw = services.api_key_create(
        tenant=request.tenant,
        actor=request.actor,
        name=payload.name,
        scopes=payload.scopes,
        expires_at=payload.expires_at,
        requests_per_minute=payload.requests_per_minute,
        runs_per_minute=payload.runs_per_minute,
    )
    created = ApiKeyOut.from_orm(key).model_dump()
    return Status(201, ApiKeyCreatedOut(**created, key=raw))


@router.get("/api-keys/{key_id}", response=ApiKeyOut)
def get_api_key(request: ApiRequest, key_id: UUID):
    require_scope(request, "admin")
    return selectors.api_key_get(tenant=request.tenant, api_key_id=key_id)


@router.post("/api-keys/{key_id}/revoke", response=ApiKeyOut)
def revoke_api_key(request: ApiRequest, key_id: UUID):
    require_scope(request, "admin")
    return services.api_key_revoke(
        tenant=request.tenant,
        actor=request.actor,
        api_key_id=key_id,
    )


@router.put("/api-keys/{key_id}/limits", response=ApiKeyOut)
def set_api_key_limits(request: ApiRequest, key_id: UUID, payload: ApiKeyLimitsIn):
    """Set the key's rate limits (both; null uses the tenant's limit for keys)."""
    require_scope(request, "admin")
    return services.api_key_limits_update(
        tenant=request.tenant, actor=request.actor, api_key_id=key_id, **payload.dict()
    )


@router.get("/audit-events", response=list[AuditEventOut])
@paginate(LimitOffsetPagination)
def list_audit_events(request: ApiRequest, filters: Query[AuditFilter]):
    require_scope(request, "admin")
    return selectors.audit_event_list(tenant=request.tenant, **filters.dict())

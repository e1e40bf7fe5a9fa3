"""Management API for usage, prices and the monthly budget (read-scoped keys read, admin-scoped
keys write). Amounts are US dollars, sent as decimal strings so that no precision is lost."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from ninja import Field, Query, Router, Schema, Status

from tenants.auth import require_scope
from tenants.requests import ApiRequest
from usage import export, selectors, services
from usage.models import COST_LIMIT_MAX, TOKEN_LIMIT_MAX

router = Router(tags=["usage"])


class UsageFilter(Schema):
    group_by: str = Field("day", description="day, agent, model, end_user or api_key")
    period: str = Field(
        "", description="this_month (default), last_month, last_7_days, last_30_days or custom"
    )
    since: date | None = Field(None, description="First day (UTC), inclusive")
    until: date | None = Field(None, description="Last day (UTC), inclusive")


class UsageTotals(Schema):
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    total_tokens: int
    cost: Decimal = Field(description="USD of the priced calls")
    unpriced_tokens: int = Field(description="Tokens of calls whose model had no price")
    calls: int


class UsageGroup(UsageTotals):
    key: str = Field(description="The day (ISO), or the id of the agent, end user or key")
    label: str


class UnpricedModel(Schema):
    model: str
    provider: str
    tokens: int
    calls: int


class UsageOut(Schema):
    since: date
    until: date
    group_by: str
    currency: str = "USD"
    totals: UsageTotals
    groups: list[UsageGroup]
    unpriced_models: list[UnpricedModel]


class PriceOut(Schema):
    id: UUID
    model: str
    provider_id: UUID | None
    input_per_million: Decimal
    cached_input_per_million: Decimal | None
    output_per_million: Decimal
    note: str
    currency: str = "USD"
    updated_at: datetime


class PriceIn(Schema):
    model: str = Field(min_length=1, max_length=200)
    provider_id: UUID | None = Field(None, description="Only at this provider; omit for any")
    input_per_million: Decimal = Field(ge=0, max_digits=12, decimal_places=6)
    cached_input_per_million: Decimal | None = Field(
        None, ge=0, max_digits=12, decimal_places=6, description="Omit: the same as input"
    )
    output_per_million: Decimal = Field(ge=0, max_digits=12, decimal_places=6)
    note: str = Field("", max_length=200)


class BudgetIn(Schema):
    token_limit: int | None = Field(
        None, ge=1, le=TOKEN_LIMIT_MAX, description="Tokens per month; null: no limit"
    )
    cost_limit: Decimal | None = Field(
        None,
        gt=0,
        le=COST_LIMIT_MAX,
        max_digits=14,
        decimal_places=2,
        description="USD per month; null: no limit",
    )
    warn_percent: int = Field(80, ge=1, le=100)


class BudgetOut(Schema):
    token_limit: int | None
    cost_limit: Decimal | None
    warn_percent: int
    month: date
    used_tokens: int
    used_cost: Decimal
    percent: int = Field(description="Share of the tighter limit used this month")
    status: str = Field(description="none (no limit), ok, warning or exhausted")
    resets_on: date


def _budget_out(request: ApiRequest) -> dict[str, Any]:
    state = selectors.budget_state(tenant=request.tenant)
    if state is None:
        month, tokens, cost = selectors.month_usage(tenant=request.tenant)
        return {
            "token_limit": None,
            "cost_limit": None,
            "warn_percent": 80,
            "month": month,
            "used_tokens": tokens,
            "used_cost": cost,
            "percent": 0,
            "status": "none",
            "resets_on": selectors.next_month(month),
        }
    status = (
        "exhausted"
        if state.exhausted
        else "warning"
        if state.warning
        else "ok"
        if state.has_limit
        else "none"
    )
    return {
        "token_limit": state.budget.token_limit,
        "cost_limit": state.budget.cost_limit,
        "warn_percent": state.budget.warn_percent,
        "month": state.month,
        "used_tokens": state.used_tokens,
        "used_cost": state.used_cost,
        "percent": state.percent,
        "status": status,
        "resets_on": state.resets_on,
    }


@router.get("/usage", response=UsageOut)
def get_usage(request: ApiRequest, filters: Query[UsageFilter]):
    """Tokens and cost of the tenant's model calls over a period, grouped by day, agent, model,
    end user or API key (largest first; days in order)."""
    require_scope(request, "read")
    period = selectors.period_for(preset=filters.period, since=filters.since, until=filters.until)
    tenant = request.tenant
    groups = selectors.usage_by(tenant=tenant, period=period, group=filters.group_by)
    return {
        "since": period.first,
        "until": period.last,
        "group_by": filters.group_by,
        "totals": selectors.usage_totals(tenant=tenant, period=period),
        "groups": groups,
        "unpriced_models": [
            {**m, "provider": m["provider_name"]}
            for m in selectors.unpriced_models(tenant=tenant, period=period)
        ],
    }


@router.get(
    "/usage/records",
    response={200: None},
    openapi_extra={
        "responses": {
            200: {"description": "CSV, one model call per row", "content": {"text/csv": {}}}
        }
    },
)
def export_usage_records(request: ApiRequest, filters: Query[UsageFilter]):
    """Every usage record of the period as CSV, streamed: time, source, agent, version, model,
    provider, end user, API key prefix, user, run, thread, tokens and `cost_usd` (US dollars with
    8 decimal places, e.g. 0.00000000; empty when the model had no price). The id cells of a run,
    thread, agent, end user, key or user deleted since are empty. `group_by` is ignored."""
    require_scope(request, "read")
    period = selectors.period_for(preset=filters.period, since=filters.since, until=filters.until)
    return export.csv_response(tenant=request.tenant, period=period)


@router.get("/prices", response=list[PriceOut])
def list_prices(request: ApiRequest):
    require_scope(request, "read")
    return selectors.price_list(tenant=request.tenant)


@router.post("/prices", response={201: PriceOut})
def create_price(request: ApiRequest, payload: PriceIn):
    require_scope(request, "admin")
    price = services.price_create(tenant=request.tenant, actor=request.actor, **payload.dict())
    return Status(201, price)


@router.get("/prices/{price_id}", response=PriceOut)
def get_price(request: ApiRequest, price_id: UUID):
    require_scope(request, "read")
    return selectors.price_get(tenant=request.tenant, price_id=price_id)


@router.put("/prices/{price_id}", response=PriceOut)
def update_price(request: ApiRequest, price_id: UUID, payload: PriceIn):
    require_scope(request, "admin")
    return services.price_update(
        tenant=request.tenant, actor=request.actor, price_id=price_id, **payload.dict()
    )


@router.delete("/prices/{price_id}", response={204: None})
def delete_price(request: ApiRequest, price_id: UUID):
    require_scope(request, "admin")
    services.price_delete(tenant=request.tenant, actor=request.actor, price_id=price_id)
    return Status(204, None)


@router.get("/budget", response=BudgetOut)
def get_budget(request: ApiRequest):
    """The monthly budget and this month's use of it."""
    require_scope(request, "read")
    return _budget_out(request)


@router.put("/budget", response=BudgetOut)
def set_budget(request: ApiRequest, payload: BudgetIn):
    require_scope(request, "admin")
    services.budget_set(tenant=request.tenant, actor=request.actor, **payload.dict())
    return _budget_out(request)

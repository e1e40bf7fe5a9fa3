"""Writes of the usage app: prices, the budget, and the usage of finished runs.

`record_run` and `record_playground` are called inside the transaction that stores a run's
outcome, so usage lands exactly when the outcome does: a superseded attempt (which writes no
outcome) counts nothing, and a run is never counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from ai_agents.runtime.trace import model_calls
from controlplane import rows
from controlplane.errors import PermissionDenied, ValidationFailed
from tenants.actors import SYSTEM, Actor
from tenants.audit import audit_changes, audit_record, changes
from tenants.models import Tenant
from usage import catalog, selectors
from usage.errors import BudgetExhausted
from usage.models import (
    COST_LIMIT_MAX,
    TOKEN_LIMIT_MAX,
    Budget,
    ModelPrice,
    MonthlyUsage,
    UsageRecord,
    UsageSource,
)

if TYPE_CHECKING:
    from ai_agents.models import PlaygroundRun
    from conversations.models import Run

MILLION = Decimal(1_000_000)
COST_QUANTUM = Decimal("0.00000001")
BUILTIN = "builtin"  # the provider name of the built-in offline model, which costs nothing


# --- Cost ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rates:
    input: Decimal
    cached_input: Decimal
    output: Decimal


FREE = Rates(Decimal(0), Decimal(0), Decimal(0))


def cost_of(call: dict[str, Any], rates: Rates | None) -> Decimal | None:
    """USD for one model call at `rates` (per 1M tokens); None when there is no price."""
    if rates is None:
        return None
    cached = min(int(call.get("cached_input_tokens", 0) or 0), int(call.get("input_tokens", 0)))
    uncached = int(call.get("input_tokens", 0)) - cached
    output = int(call.get("output_tokens", 0))
    amount = uncached * rates.input + cached * rates.cached_input + output * rates.output
    return (amount / MILLION).quantize(COST_QUANTUM)


_PRICES = f"""
    SELECT model, provider_id, input_per_million, cached_input_per_million, output_per_million
    FROM {ModelPrice._meta.db_table}
    WHERE tenant_id = %s AND model = ANY(%s)
"""  # noqa: S608 (the table name from the model; the values are parameters)


def rates_for(tenant: Tenant, calls: list[dict[str, Any]]) -> dict[tuple[str | None, str], Rates]:
    """The price of every (provider id, model) in `calls`: the provider's own price for the model
    if there is one, else the model's general price; the offline model is free. Missing: no price.
    One query (none when only the offline model was called)."""
    wanted = {
        (c.get("provider_id"), c.get("model", "")) for c in calls if c.get("provider") != BUILTIN
    }
    found: dict[tuple[str | None, str], Rates] = {}
    if wanted:
        # Plain SQL: read as every run finishes, and the ORM spent more compiling it than
        # PostgreSQL spends answering it.
        # tenant-scope: the statement names the tenant
        with connection.cursor() as cursor:
            cursor.execute(_PRICES, [tenant.pk, sorted({m for _, m in wanted})])
            prices = cursor.fetchall()
        general: dict[str, Rates] = {}
        specific: dict[tuple[str, str], Rates] = {}
        for model, provider_id, input_rate, cached_rate, output_rate in prices:
            rates = Rates(
                input_rate, input_rate if cached_rate is None else cached_rate, output_rate
            )
            if provider_id is None:
                general[model] = rates
            else:
                specific[(str(provider_id), model)] = rates
        for provider_id, model in wanted:
            hit = specific.get((str(provider_id), model)) or general.get(model)
            if hit is not None:
                found[(provider_id, model)] = hit
    return found


# --- Recording usage ----------------------------------------------------------------------------


def month_of(moment: datetime) -> date:
    """The first day of the calendar month (UTC) of `moment`."""
    return moment.astimezone(UTC).date().replace(day=1)


def _records(
    tenant: Tenant, spans: list[dict[str, Any]], now: datetime, **attribution: Any
) -> list[UsageRecord]:
    calls = model_calls(spans)
    if not calls:
        return []
    rates = rates_for(tenant, calls)
    records = []
    for call in calls:
        builtin = call.get("provider") == BUILTIN
        price = FREE if builtin else rates.get((call.get("provider_id"), call.get("model", "")))
        records.append(
            UsageRecord(
                tenant=tenant,
                created_at=now,
                provider_id=call.get("provider_id"),
                provider_name=(call.get("provider") or "")[:100],
                model=(call.get("model") or "unknown")[:200],
                called_agent=(call.get("agent") or "")[:100],
                input_tokens=int(call.get("input_tokens", 0)),
                cached_input_tokens=int(call.get("cached_input_tokens", 0) or 0),
                output_tokens=int(call.get("output_tokens", 0)),
                total_tokens=int(call.get("total_tokens", 0)),
                cost=cost_of(call, price),
                **attribution,
            )
        )
    return records


_RECORD = rows.Insert(UsageRecord)  # its serial key is left to PostgreSQL


@lru_cache(maxsize=16)
def _usage_sql(calls: int) -> str:
    """The statement that stores `calls` usage records and adds them to the month's total."""
    return f"""
        WITH stored AS (
            INSERT INTO {_RECORD.table} ({_RECORD.columns})
            VALUES {", ".join([_RECORD.placeholders()] * calls)}
            RETURNING id
        ), total AS (
            INSERT INTO {MonthlyUsage._meta.db_table}
                (tenant_id, month, total_tokens, cost, unpriced_tokens, calls)
            VALUES (%s, %s, %s, %s, %s, %s)
            ON CONFLICT ON CONSTRAINT monthlyusage_once DO UPDATE SET
                total_tokens = usage_monthlyusage.total_tokens + EXCLUDED.total_tokens,
                cost = usage_monthlyusage.cost + EXCLUDED.cost,
                unpriced_tokens = usage_monthlyusage.unpriced_tokens + EXCLUDED.unpriced_tokens,
                calls = usage_monthlyusage.calls + EXCLUDED.calls
            RETURNING total_tokens, cost, warned_at, exhausted_at
        )
        SELECT (SELECT array_agg(id ORDER BY id) FROM stored),
               total.total_tokens, total.cost, total.warned_at, total.exhausted_at,
               {selectors.BUDGET.sql}
        FROM total LEFT JOIN usage_budget budget ON budget.tenant_id = %s
    """  # noqa: S608 (table and column names from the models; the values are parameters)


def _store(tenant: Tenant, records: list[UsageRecord], now: datetime) -> None:
    """Store `records` and add them to the month's running total (one statement, atomic under
    concurrency: the ORM has no form for an upsert with increments, and on every run's path its
    bulk insert cost more to compile than to execute) and, on the way over the warning threshold
    or the limit, write the audit event once a month."""
    tokens = sum(r.total_tokens for r in records)
    cost = sum((r.cost for r in records if r.cost is not None), Decimal(0))
    unpriced = sum(r.total_tokens for r in records if r.cost is None)
    month = month_of(now)
    values = [value for record in records for value in _RECORD.values(record)]
    # tenant-scope: every record carries the tenant, and the statement names it.
    # The tenant's budget comes back with the new total (one round trip, not three).
    with connection.cursor() as cursor:
        cursor.execute(
            _usage_sql(len(records)),
            [*values, tenant.pk, month, tokens, cost, unpriced, len(records), tenant.pk],
        )
        row = cursor.fetchone()
    keys, used_tokens, used_cost, warned_at, exhausted_at = row[:5]
    for record, key in zip(records, keys, strict=True):
        record.pk = key
        record._state.adding = False
    budget = selectors.budget_from_row(tenant, row[5:])
    if budget is None:
        return
    state = selectors.BudgetState.of(budget, used_tokens, used_cost, month)
    this_month = MonthlyUsage.objects.for_tenant(tenant).filter(month=month)
    if state.exhausted and exhausted_at is None:
        if this_month.filter(exhausted_at__isnull=True).update(exhausted_at=now, warned_at=now):
            audit_record(
                tenant=tenant,
                actor=SYSTEM,
                action="budget.exhausted",
                target=budget,
                target_label=f"Monthly budget used up: {state.summary}; new runs are refused",
            )
    elif state.warning and warned_at is None:
        if this_month.filter(warned_at__isnull=True).update(warned_at=now):
            audit_record(
                tenant=tenant,
                actor=SYSTEM,
                action="budget.warning",
                target=budget,
                target_label=f"Monthly budget at {state.percent}%: {state.summary}",
            )


def record_run(run: Run, trace: list[dict[str, Any]]) -> list[UsageRecord]:
    """Record the model calls of a finished run and set `run.cost` (the caller saves the run):
    `price_run`, then `save_run_usage`.

    Call it inside the transaction that writes the run's outcome. Failed, cancelled and timed-out
    runs count the calls they completed. Two queries: the prices, then one statement that stores
    the records and adds them to the month's total, reading the budget too."""
    records = price_run(run, trace)
    save_run_usage(run.tenant, records)
    return records


def price_run(run: Run, trace: list[dict[str, Any]]) -> list[UsageRecord]:
    """The usage records of the run's model calls, priced, and `run.cost` (of the priced
    calls) and `run.unpriced_tokens` (of the calls without a price) set; nothing is
    written (one query, the prices, and none when no priced model was called). The version and
    agent name the records carry come from `run.version` (read with the run by the worker)."""
    if not model_calls(trace):  # e.g. stopped before the model answered: nothing to count
        run.cost, run.unpriced_tokens = Decimal(0), 0
        return []
    number, agent_name = run.version.number, run.version.agent.name
    records = _records(
        run.tenant,
        trace,
        timezone.now(),
        source=run.source,
        agent_id=run.agent_id,
        agent_name=agent_name,
        version_id=run.version_id,
        version_number=number,
        end_user_id=run.end_user_id,
        api_key_id=run.api_key_id,
        user_id=run.created_by_id,
        run_id=run.pk,
        thread_id=run.thread_id,
    )
    run.cost = sum((r.cost for r in records if r.cost is not None), Decimal(0))
    run.unpriced_tokens = sum(r.total_tokens for r in records if r.cost is None)
    return records


def save_run_usage(tenant: Tenant, records: list[UsageRecord]) -> None:
    """Store `price_run`'s records and add them to the month's total, in one statement (inside
    the transaction that writes the run's outcome, so usage lands exactly when the outcome
    does)."""
    if records:
        _store(tenant, records, records[0].created_at)


def record_playground(*, tenant: Tenant, actor: Actor, run: PlaygroundRun) -> list[UsageRecord]:
    """Record the model calls of a playground or draft run, attributed to who started it."""
    now = timezone.now()
    records = _records(
        tenant,
        run.trace,
        now,
        source=UsageSource.PLAYGROUND,
        agent_id=run.agent_id,
        agent_name=run.agent.name,
        version_id=run.version_id,
        version_number=run.version_number,
        api_key=actor.api_key,
        user=actor.user,
        playground_run=run,
    )
    if records:
        _store(tenant, records, now)
    return records


# --- The budget ---------------------------------------------------------------------------------


def budget_check(*, tenant: Tenant) -> None:
    """Refuse a new run when the month's budget is used up (BudgetExhausted: its message for
    the API, `message_for(role, ...)` for a member of the tenant). One query. Runs already
    under way finish, so a month can end a little over its limit."""
    state = selectors.budget_state(tenant=tenant)
    if state is not None and state.exhausted:
        resets = state.resets_on
        raise BudgetExhausted(
            f"This tenant has used its monthly budget ({state.summary}); it resets on "
            f"{resets.day} {resets:%B}.",
            resets_on=resets.isoformat(),
        )


def _budget_state(budget: Budget) -> dict[str, Any]:
    return {
        "token_limit": budget.token_limit,
        "cost_limit": budget.cost_limit,
        "warn_percent": budget.warn_percent,
    }


CENT = Decimal("0.01")


def budget_errors(
    *, token_limit: int | None, cost_limit: Decimal | None, warn_percent: int | None
) -> dict[str, str]:
    """What is wrong with a budget, one plain sentence per field that names it (empty: nothing).
    None is no limit of that kind, and no threshold given. The dashboard form shows these next
    to its fields; `budget_set` refuses the same."""
    fields: dict[str, str] = {}
    if token_limit is not None and token_limit < 1:
        fields["token_limit"] = "The token limit must be at least 1 token, or empty for no limit."  # noqa: S105
    elif token_limit is not None and token_limit > TOKEN_LIMIT_MAX:
        fields["token_limit"] = f"The token limit can be at most {TOKEN_LIMIT_MAX:,} tokens."
    if cost_limit is not None and not cost_limit.is_finite():
        fields["cost_limit"] = "The cost limit is an amount in dollars, or empty for no limit."
    elif cost_limit is not None and cost_limit <= 0:
        fields["cost_limit"] = "The cost limit must be more than $0, or empty for no limit."
    elif cost_limit is not None and cost_limit > COST_LIMIT_MAX:
        fields["cost_limit"] = f"The cost limit can be at most ${COST_LIMIT_MAX:,}."
    elif cost_limit is not None and cost_limit != cost_limit.quantize(CENT):  # 12.340 is fine
        fields["cost_limit"] = "The cost limit is in dollars and cents: at most two decimal places."
    if warn_percent is not None and not 1 <= warn_percent <= 100:
        fields["warn_percent"] = "The warning threshold is a percentage from 1 to 100."
    return fields


def budget_set(
    *,
    tenant: Tenant,
    actor: Actor,
    token_limit: int | None,
    cost_limit: Decimal | None,
    warn_percent: int,
) -> Budget:
    """Set the monthly budget (owners in the dashboard, admin-scoped API keys). None means no
    limit of that kind. Audited. Raising a limit lets runs through at once; crossing the warning
    threshold again in the same month does not warn twice."""
    if not (actor.is_owner or (actor.membership is None and actor.can_manage())):
        raise PermissionDenied("Only owners can change the budget.")
    fields = budget_errors(
        token_limit=token_limit, cost_limit=cost_limit, warn_percent=warn_percent
    )
    if fields:
        raise ValidationFailed("The budget is not valid.", fields=fields)
    with transaction.atomic():
        budget = Budget.objects.for_tenant(tenant).select_for_update().first()
        before = _budget_state(budget) if budget is not None else {}
        if budget is None:
            budget = Budget(tenant=tenant)
        budget.token_limit, budget.cost_limit = token_limit, cost_limit
        budget.warn_percent = warn_percent
        budget.updated_at, budget.updated_by = timezone.now(), actor.user
        budget.save()
        audit_changes(
            tenant=tenant,
            actor=actor,
            action="budget.updated",
            target=budget,
            before=before,
            after=_budget_state(budget),
        )
    return budget


# --- Prices -------------------------------------------------------------------------------------


def _require_manager(actor: Actor) -> None:
    if not actor.can_manage():
        raise PermissionDenied("Only owners and admins can edit prices.")


def _price_state(p: ModelPrice) -> dict[str, Any]:
    return {
        "model": p.model,
        "provider": p.provider_id,
        "input_per_million": p.input_per_million,
        "cached_input_per_million": p.cached_input_per_million,
        "output_per_million": p.output_per_million,
        "note": p.note,
    }


def _price_apply(
    tenant: Tenant,
    price: ModelPrice,
    *,
    model: str,
    provider_id: Any,
    input_per_million: Decimal,
    cached_input_per_million: Decimal | None,
    output_per_million: Decimal,
    note: str,
) -> None:
    from ai_agents import selectors as agent_selectors

    fields: dict[str, str] = {}
    model = model.strip()
    if not model:
        fields["model"] = "Name the model exactly as the provider is asked for it, e.g. gpt-4o."
    for name, value in (
        ("input_per_million", input_per_million),
        ("cached_input_per_million", cached_input_per_million),
        ("output_per_million", output_per_million),
    ):
        if value is not None and value < 0:
            fields[name] = "A price cannot be negative."
    if fields:
        raise ValidationFailed("The price is not valid.", fields=fields)
    price.provider = (
        agent_selectors.provider_get(tenant=tenant, provider_id=provider_id)
        if provider_id
        else None
    )
    price.model = model
    price.input_per_million = input_per_million
    price.cached_input_per_million = cached_input_per_million
    price.output_per_million = output_per_million
    price.note = note.strip()
    price.updated_at = timezone.now()
    try:
        with transaction.atomic():
            price.save()
    except IntegrityError:
        where = f" at {price.provider.name}" if price.provider else ""
        raise ValidationFailed(
            f"There is already a price for {model}{where}.",
            fields={"model": f"There is already a price for {model}{where}: edit that one."},
        )


@transaction.atomic
def price_create(*, tenant: Tenant, actor: Actor, **values: Any) -> ModelPrice:
    """Add a price (owners, admins, admin-scoped keys). ValidationFailed names the field; a
    provider of another tenant is NotFound. Audited."""
    _require_manager(actor)
    price = ModelPrice(tenant=tenant)
    _price_apply(tenant, price, **values)
    audit_record(
        tenant=tenant,
        actor=actor,
        action="price.created",
        target=price,
        change_set=changes({}, audit_plain(_price_state(price))),
    )
    return price


def audit_plain(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Decimal) else v) for k, v in state.items()}


@transaction.atomic
def price_update(*, tenant: Tenant, actor: Actor, price_id: Any, **values: Any) -> ModelPrice:
    """Change a price. Calls already recorded keep the cost they had. Audited."""
    _require_manager(actor)
    price = selectors.price_get(tenant=tenant, price_id=price_id, for_update=True)
    before = audit_plain(_price_state(price))
    _price_apply(tenant, price, **values)
    audit_changes(
        tenant=tenant,
        actor=actor,
        action="price.updated",
        target=price,
        before=before,
        after=audit_plain(_price_state(price)),
    )
    return price


@transaction.atomic
def price_delete(*, tenant: Tenant, actor: Actor, price_id: Any) -> None:
    """Remove a price: later calls of that model have no price. Audited."""
    _require_manager(actor)
    price = selectors.price_get(tenant=tenant, price_id=price_id, for_update=True)
    audit_record(tenant=tenant, actor=actor, action="price.deleted", target=price)
    price.delete()


@transaction.atomic
def price_add_list_prices(*, tenant: Tenant, actor: Actor) -> list[ModelPrice]:
    """Add OpenAI's list prices (usage.catalog) for the models that have no general price yet,
    labelled as list prices to check. Existing prices are left alone. Audited per price."""
    _require_manager(actor)
    have = set(
        ModelPrice.objects.for_tenant(tenant)
        .filter(provider__isnull=True)
        .values_list("model", flat=True)
    )
    added = []
    for model, (inp, cached, out) in catalog.OPENAI_LIST_PRICES.items():
        if model in have:
            continue
        added.append(
            price_create(
                tenant=tenant,
                actor=actor,
                model=model,
                provider_id=None,
                input_per_million=inp,
                cached_input_per_million=cached,
                output_per_million=out,
                note=catalog.LIST_PRICE_NOTE,
            )
        )
    return added

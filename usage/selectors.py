"""Reads of the usage app: prices, the budget and its state, and aggregates of usage records over
a period. Every read is restricted to one tenant."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.db import connection
from django.db.models import Case, Count, F, Q, QuerySet, Sum, Value, When
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from controlplane import rows
from controlplane.errors import NotFound, ValidationFailed
from tenants.models import Tenant
from usage.models import Budget, ModelPrice, MonthlyUsage, UsageRecord

MAX_PERIOD_DAYS = 366


# --- Prices -------------------------------------------------------------------------------------


def price_list(*, tenant: Tenant) -> QuerySet[ModelPrice]:
    return (
        ModelPrice.objects.for_tenant(tenant)
        .select_related("provider")
        .order_by("model", F("provider__name").asc(nulls_first=True))
    )


def price_get(*, tenant: Tenant, price_id: Any, for_update: bool = False) -> ModelPrice:
    qs = ModelPrice.objects.for_tenant(tenant).select_related("provider")
    if for_update:
        qs = qs.select_for_update(of=("self",))
    try:
        return qs.get(pk=price_id)
    except (ModelPrice.DoesNotExist, ValueError, ValidationError):
        raise NotFound("No such price.")


# --- Budget -------------------------------------------------------------------------------------


def budget_get(*, tenant: Tenant) -> Budget | None:
    return Budget.objects.for_tenant(tenant).first()


def next_month(month: date) -> date:
    return (month.replace(day=28) + timedelta(days=4)).replace(day=1)


def _tokens(n: int) -> str:
    return f"{n:,} tokens"


def _usd(amount: Decimal) -> str:
    return f"${amount:,.2f}"


@dataclass(frozen=True)
class BudgetState:
    """The month's use against the budget. `percent` is of the tighter limit."""

    budget: Budget
    month: date
    used_tokens: int
    used_cost: Decimal

    @classmethod
    def of(cls, budget: Budget, tokens: int | None, cost: Decimal | None, month: date):  # type: ignore[no-untyped-def]
        return cls(budget, month, int(tokens or 0), Decimal(cost or 0))

    @property
    def token_percent(self) -> float | None:
        limit = self.budget.token_limit
        return None if limit is None else 100.0 * self.used_tokens / limit

    @property
    def cost_percent(self) -> float | None:
        limit = self.budget.cost_limit
        return None if limit is None else float(100 * self.used_cost / limit)

    @property
    def percent(self) -> int:
        shares = [p for p in (self.token_percent, self.cost_percent) if p is not None]
        return int(max(shares)) if shares else 0

    @property
    def has_limit(self) -> bool:
        return self.budget.token_limit is not None or self.budget.cost_limit is not None

    @property
    def exhausted(self) -> bool:
        b = self.budget
        return (b.token_limit is not None and self.used_tokens >= b.token_limit) or (
            b.cost_limit is not None and self.used_cost >= b.cost_limit
        )

    @property
    def warning(self) -> bool:
        return self.has_limit and not self.exhausted and self.percent >= self.budget.warn_percent

    @property
    def resets_on(self) -> date:
        return next_month(self.month)

    @property
    def summary(self) -> str:
        b = self.budget
        parts = []
        if b.token_limit is not None:
            parts.append(f"{_tokens(self.used_tokens)} of {b.token_limit:,}")
        if b.cost_limit is not None:
            parts.append(f"{_usd(self.used_cost)} of {_usd(b.cost_limit)}")
        return "; ".join(parts)


# The budget's columns, for plain SQL that reads the budget along with something else (here
# and in `services._store`), aliased `budget`; `budget_from_row` builds it back.
BUDGET = rows.Columns(Budget, "budget")
_BUDGET_KEY = BUDGET.names.index("id")  # NULL when an outer join found no budget


def budget_from_row(tenant: Tenant, row: Sequence[Any]) -> Budget | None:
    """The Budget that BUDGET's columns read, from the start of `row` (None: the tenant has
    none, the columns of an outer join came back empty)."""
    if row[_BUDGET_KEY] is None:
        return None
    budget = BUDGET.build(row[: len(BUDGET)])
    budget.tenant = tenant
    return budget


def budget_state(*, tenant: Tenant, now: datetime | None = None) -> BudgetState | None:
    """The budget and this month's running total in one query; None without a budget."""
    from usage.services import month_of

    month = month_of(now or timezone.now())
    # Every run's start asks this (`budget_check`): plain SQL, since compiling the same query
    # with the ORM's subqueries cost more than running it (docs/benchmark.md).
    # tenant-scope: the statement names the tenant
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT {BUDGET.sql}, month.total_tokens, month.cost
            FROM usage_budget budget
            LEFT JOIN usage_monthlyusage month
                   ON month.tenant_id = budget.tenant_id AND month.month = %s
            WHERE budget.tenant_id = %s
            """,  # noqa: S608 (column names from the model; the values are parameters)
            [month, tenant.pk],
        )
        row = cursor.fetchone()
    budget = None if row is None else budget_from_row(tenant, row)
    if budget is None:
        return None
    return BudgetState.of(budget, row[len(BUDGET)], row[len(BUDGET) + 1], month)


def month_usage(*, tenant: Tenant) -> tuple[date, int, Decimal]:
    """This month, its tokens and its cost so far, from the running total (one query)."""
    from usage.services import month_of

    month = month_of(timezone.now())
    row = (
        MonthlyUsage.objects.for_tenant(tenant)
        .filter(month=month)
        .values_list("total_tokens", "cost")
        .first()
    )
    return month, *(row or (0, Decimal(0)))


# --- Periods and aggregates ---------------------------------------------------------------------

PRESETS = {
    "this_month": "This month",
    "last_month": "Last month",
    "last_7_days": "Last 7 days",
    "last_30_days": "Last 30 days",
    "custom": "Custom",
}
GROUPS = {
    "day": "Day",
    "agent": "Agent",
    "model": "Model",
    "end_user": "End user",
    "api_key": "API key",
}


@dataclass(frozen=True)
class Period:
    """Whole UTC days, `first` to `last` inclusive."""

    first: date
    last: date
    preset: str = "custom"

    @property
    def start(self) -> datetime:
        return timezone.make_aware(datetime.combine(self.first, time.min), UTC)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(days=self.days)

    @property
    def days(self) -> int:
        return (self.last - self.first).days + 1

    def dates(self) -> list[date]:
        return [self.first + timedelta(days=i) for i in range(self.days)]

    @property
    def label(self) -> str:
        if self.preset != "custom":
            return PRESETS[self.preset]
        return f"{self.first:%-d %b %Y} – {self.last:%-d %b %Y}"

    @property
    def phrase(self) -> str:
        """The label inside a sentence: "in this month", "in 1 Nov 2026 – 3 Nov 2026"."""
        return self.label if self.preset == "custom" else self.label.lower()


def period_for(
    *,
    preset: str = "",
    since: date | None = None,
    until: date | None = None,
    today: date | None = None,
) -> Period:
    """The period a page or API call asks for: a preset, or `since`..`until` (inclusive, either
    may be left out), this month by default. ValidationFailed names the wrong field."""
    today = today or timezone.now().astimezone(UTC).date()
    if preset and preset not in PRESETS:
        raise ValidationFailed("Unknown period.", fields={"period": f"One of {list(PRESETS)}."})
    if not preset or preset == "custom":
        if since is None and until is None:
            preset = "this_month"
        else:
            first = since or (until or today).replace(day=1)
            last = until or today
            if last >= date.max:  # the period ends at midnight after `last`: past the calendar
                raise ValidationFailed(
                    "The period ends too late.",
                    fields={"until": f"Pick a day before {date.max.isoformat()}."},
                )
            if last < first:
                raise ValidationFailed(
                    "The period ends before it starts.",
                    fields={"until": "Pick a day on or after the start."},
                )
            if (last - first).days + 1 > MAX_PERIOD_DAYS:
                raise ValidationFailed(
                    "The period is too long.",
                    fields={"since": f"At most {MAX_PERIOD_DAYS} days at a time."},
                )
            return Period(first, last, "custom")
    month = today.replace(day=1)
    if preset == "this_month":
        return Period(month, today, preset)
    if preset == "last_month":
        previous = (month - timedelta(days=1)).replace(day=1)
        return Period(previous, month - timedelta(days=1), preset)
    days = 7 if preset == "last_7_days" else 30
    return Period(today - timedelta(days=days - 1), today, preset)


def records_in(*, tenant: Tenant, period: Period) -> QuerySet[UsageRecord]:
    return UsageRecord.objects.for_tenant(tenant).filter(
        created_at__gte=period.start, created_at__lt=period.end
    )


SUMS = (
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "total_tokens",
    "cost",
    "unpriced_tokens",
    "calls",
)


def _sums() -> dict[str, Any]:
    # Annotated under other names: an annotation may not shadow the field it sums.
    return {
        "sum_input_tokens": Coalesce(Sum("input_tokens"), 0),
        "sum_cached_input_tokens": Coalesce(Sum("cached_input_tokens"), 0),
        "sum_output_tokens": Coalesce(Sum("output_tokens"), 0),
        "sum_total_tokens": Coalesce(Sum("total_tokens"), 0),
        "sum_cost": Coalesce(Sum("cost"), Decimal(0)),
        "sum_unpriced_tokens": Coalesce(Sum("total_tokens", filter=Q(cost__isnull=True)), 0),
        "sum_calls": Count("id"),
    }


def _named(row: dict[str, Any]) -> dict[str, Any]:
    for name in SUMS:
        row[name] = row.pop(f"sum_{name}")
    return row


def usage_totals(*, tenant: Tenant, period: Period) -> dict[str, Any]:
    """Tokens, cost and calls of the period, plus the number of runs they came from."""
    return _named(
        records_in(tenant=tenant, period=period).aggregate(
            **_sums(),
            runs=Count("run", distinct=True) + Count("playground_run", distinct=True),
        )
    )


# Per group: the columns that identify a row, and how to label it. An agent is one group
# however often it was renamed (records keep the name it had at the time), labelled with its
# name now; the records of a deleted agent (agent_id NULL) are grouped by the name they kept.
_GROUP_FIELDS: dict[str, list[str]] = {
    "day": ["day"],
    "agent": ["agent_id", "deleted_agent", "agent__name"],
    "model": ["model", "provider_name"],
    "end_user": [
        "end_user_id",
        "end_user__display_name",
        "end_user__external_id",
        "end_user__user__email",
    ],
    "api_key": ["api_key_id", "api_key__name", "api_key__prefix"],
}


def _label(group: str, row: dict[str, Any]) -> tuple[str, str]:
    """(key, label) of an aggregate row."""
    if group == "day":
        return row["day"].isoformat(), row["day"].isoformat()
    if group == "agent":
        if row["agent_id"] is not None:
            return str(row["agent_id"]), row["agent__name"]
        name = row["deleted_agent"]
        return f"deleted:{name}", f"{name or '(unnamed agent)'} (deleted)"
    if group == "model":
        provider = row["provider_name"]
        label = "offline (built-in)" if provider == "builtin" else row["model"]
        if provider and provider != "builtin":
            label = f"{row['model']} · {provider}"
        return f"{provider}/{row['model']}", label
    if group == "end_user":
        if row["end_user_id"] is None:
            return "", "No end user (playground)"
        name = (
            row["end_user__display_name"]
            or row["end_user__external_id"]
            or row["end_user__user__email"]
        )
        return str(row["end_user_id"]), name or str(row["end_user_id"])
    if row["api_key_id"] is None:
        return "", "No API key (dashboard, chat, schedules)"
    return str(row["api_key_id"]), f"{row['api_key__name']} ({row['api_key__prefix']}…)"


def _grouped(qs: QuerySet[UsageRecord], group: str) -> Any:  # a values() queryset of dicts
    if group not in GROUPS:
        raise ValidationFailed("Unknown grouping.", fields={"group_by": f"One of {list(GROUPS)}."})
    if group == "day":
        qs = qs.annotate(day=TruncDate("created_at", tzinfo=UTC))
    if group == "agent":
        qs = qs.annotate(
            deleted_agent=Case(When(agent_id__isnull=True, then=F("agent_name")), default=Value(""))
        )
    return qs.values(*_GROUP_FIELDS[group])


def usage_by(
    *,
    tenant: Tenant,
    period: Period,
    group: str,
    metric: str = "total_tokens",
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Aggregates of the period per `group` (day, agent, model, end_user, api_key), largest
    `metric` first (days in order); each row has `key` and `label`. One query."""
    qs = _grouped(records_in(tenant=tenant, period=period), group).annotate(**_sums())
    qs = (
        qs.order_by("day")
        if group == "day"
        else qs.order_by(f"-sum_{metric}", *_GROUP_FIELDS[group])
    )
    rows: list[dict[str, Any]] = list(qs[:limit] if limit else qs)
    for row in rows:
        _named(row)
        row["key"], row["label"] = _label(group, row)
    return rows


def usage_presence(*, tenant: Tenant, period: Period) -> dict[str, int]:
    """The number of calls in the period and of those that had a price (one query): what an
    empty cost chart says, since a day of free calls and a day of none both sum to $0."""
    return records_in(tenant=tenant, period=period).aggregate(
        calls=Count("id"), priced_calls=Count("id", filter=Q(cost__isnull=False))
    )


def unpriced_models(*, tenant: Tenant, period: Period) -> list[dict[str, Any]]:
    """The models called in the period without a price: name, provider and tokens. Calls that
    used no tokens cost nothing, priced or not: a model with only those is not listed (the
    totals say "every call priced" then, and so does this)."""
    rows: Any = (
        records_in(tenant=tenant, period=period)
        .filter(cost__isnull=True, total_tokens__gt=0)
        .values("model", "provider_name")
        .annotate(tokens=Sum("total_tokens"), calls=Count("id"))
        .order_by("-tokens")
    )
    return list(rows)


@dataclass
class Series:
    key: str
    label: str
    values: list[Any]  # one per day of the period


def usage_series(
    *, tenant: Tenant, period: Period, group: str, metric: str, top: int = 5
) -> list[Series]:
    """Per day of the period, `metric` (total_tokens or cost) of the `top` largest groups and of
    the rest together ("Other"). Two queries."""
    if metric not in ("total_tokens", "cost"):
        raise ValidationFailed("Unknown metric.", fields={"metric": "total_tokens or cost."})
    zero: Any = Decimal(0) if metric == "cost" else 0
    dates = period.dates()
    index = {d: i for i, d in enumerate(dates)}
    if group == "day":
        values = [zero] * len(dates)
        for row in usage_by(tenant=tenant, period=period, group="day"):
            values[index[row["day"]]] = row[metric]
        return [Series("all", "All usage", values)]
    leaders = usage_by(tenant=tenant, period=period, group=group, metric=metric, limit=top)
    keys = [row["key"] for row in leaders]
    series = {row["key"]: Series(row["key"], row["label"], [zero] * len(dates)) for row in leaders}
    other = Series("other", "Other", [zero] * len(dates))
    qs = _grouped(records_in(tenant=tenant, period=period), group).annotate(
        day=TruncDate("created_at", tzinfo=UTC), amount=Coalesce(Sum(metric), zero)
    )
    for row in qs.order_by():
        key, _ = _label(group, row)
        target = series[key] if key in keys else other
        target.values[index[row["day"]]] += row["amount"]
    out = [series[k] for k in keys]
    if any(other.values):
        out.append(other)
    return out

"""Dashboard pages of the usage app: the usage page and its CSV export, the price table, and the
monthly budget. Owners and admins only (`tenant_view(manage=True)`); the budget is changed by
owners."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

from django.contrib import messages
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, HttpResponse, QueryDict
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from ai_agents import selectors as agent_selectors
from controlplane.errors import NotFound, PermissionDenied, ValidationFailed
from tenants.forms import apply_domain_errors
from tenants.requests import TenantRequest
from tenants.views import tenant_view
from usage import charts, export, forms, selectors, services

TOP_N = 10


def not_found_is_404(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """A selector's NotFound (missing, or another tenant's) is the 404 page."""

    @wraps(view)
    def wrapper(request: TenantRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            return view(request, *args, **kwargs)
        except NotFound as exc:
            raise Http404(exc.message)

    return wrapper


@dataclass(frozen=True)
class PeriodChoice:
    """What the period form asked for. `period` is None when the form has errors: then no
    figures are shown, and `preset`, `since` and `until` are what the user entered, shown back
    next to the errors (never the days of a default period put in their place)."""

    form: forms.PeriodForm
    period: selectors.Period | None
    preset: str  # the option the Period select shows
    since: str  # what the From and To fields show
    until: str
    by: str
    metric: str


def _period(request: TenantRequest) -> PeriodChoice:
    form = forms.PeriodForm(request.GET or None)
    data: dict[str, Any] = {}
    if form.is_bound:  # unbound (no query): the default period
        form.is_valid()
        data = form.cleaned_data
    by, metric = data.get("by") or "agent", data.get("metric") or "total_tokens"
    # `by`, `metric` and `shown` come from links and hidden fields, never typed: an edited or
    # stale value falls back to the default instead of an error with no field to show it at.
    for hidden in ("by", "metric", "shown"):
        form.errors.pop(hidden, None)
    preset, since, until = data.get("period") or "", data.get("since"), data.get("until")
    if not form.errors:
        # The form always sends the From/To dates along with the Period select. They are the
        # choice only if they were changed from the days on screen (those of `shown`, else of
        # the preset); otherwise the select is, so that picking a preset shows that preset.
        on_screen = data.get("shown") or preset
        if preset and preset != "custom" and (since or until) and on_screen != "custom":
            shown = selectors.period_for(preset=on_screen)
            if (since or shown.first, until or shown.last) != (shown.first, shown.last):
                preset = "custom"
        try:
            period = selectors.period_for(preset=preset, since=since, until=until)
        except ValidationFailed as exc:
            apply_domain_errors(form, exc)
        else:
            first, last = period.first.isoformat(), period.last.isoformat()
            return PeriodChoice(form, period, period.preset, first, last, by, metric)
    typed_since, typed_until = form.data.get("since", ""), form.data.get("until", "")
    if preset not in selectors.PRESETS:
        preset = "custom" if typed_since or typed_until else form.data.get("period", "")
    return PeriodChoice(form, None, preset, typed_since, typed_until, by, metric)


def _bad_period(form: forms.PeriodForm) -> HttpResponse:
    """A 400 naming the fields of a period that is not valid (the export, the chart alone)."""
    return HttpResponse(
        "; ".join(f"{k}: {' '.join(str(e) for e in v)}" for k, v in form.errors.items()),
        status=400,
        content_type="text/plain",
    )


def _chart(request: TenantRequest, period: selectors.Period, by: str, metric: str) -> Any:
    series = selectors.usage_series(tenant=request.tenant, period=period, group=by, metric=metric)
    return charts.stacked_bars(period.dates(), series, metric)


def _period_query(period: selectors.Period) -> QueryDict:
    """The query string that asks for `period` again: a preset by name (so a shared link to
    "last 7 days" keeps moving), a custom period by its days."""
    query = QueryDict(mutable=True)
    query["period"] = period.preset
    if period.preset == "custom":
        query["since"], query["until"] = period.first.isoformat(), period.last.isoformat()
    return query


@tenant_view(manage=True)
def usage_page(request: TenantRequest) -> HttpResponse:
    choice = _period(request)
    period, by, metric = choice.period, choice.by, choice.metric
    fragment = bool(request.htmx) and request.GET.get("fragment") == "chart"
    context: dict[str, Any] = {"form": choice.form, "choice": choice, "period": period}
    if period is None:
        if fragment:
            return _bad_period(choice.form)
        # The form with what was entered and its errors, the budget (always this month's),
        # and no figures: none of them would be for the period on screen.
        context["budget"] = selectors.budget_state(tenant=request.tenant)
        return render(request, "usage/usage.html", context, status=400)
    # Links (the export, the chart's options) ask for the period shown, not the raw form.
    base = _period_query(period)
    query = base.copy()
    query["by"], query["metric"] = by, metric
    chart = _chart(request, period, by, metric)
    groups = [
        ("agent", "agent"),
        ("model", "model"),
        ("end_user", "end user"),
        ("api_key", "API key"),
    ]
    by_label = dict(groups)[by]
    context.update(
        by=by,
        by_label=by_label,
        # The chart's accessible name, and its table's caption.
        chart_name=f"{'Cost' if metric == 'cost' else 'Tokens'} per day, by {by_label}",
        metric=metric,
        groups=groups,
        chart=chart,
        # An empty cost chart says why: no calls, no priced calls, or priced calls of $0.
        presence=(
            selectors.usage_presence(tenant=request.tenant, period=period)
            if chart.empty and metric == "cost"
            else None
        ),
        metrics=[("total_tokens", "Tokens"), ("cost", "Cost")],
        query=query.urlencode(),
        base_query=base.urlencode(),
    )
    if fragment:
        return render(request, "usage/usage.html#usage-chart", context)
    tenant = request.tenant
    context.update(
        totals=selectors.usage_totals(tenant=tenant, period=period),
        unpriced=selectors.unpriced_models(tenant=tenant, period=period),
        tables=[
            (label, selectors.usage_by(tenant=tenant, period=period, group=key, limit=TOP_N))
            for key, label in (
                ("agent", "Agents"),
                ("model", "Models"),
                ("end_user", "End users"),
                ("api_key", "API keys"),
            )
        ],
        budget=selectors.budget_state(tenant=tenant),
    )
    return render(request, "usage/usage.html", context)


@tenant_view(manage=True)
def usage_export(request: TenantRequest) -> HttpResponse:
    """Every usage record of the period, as CSV, streamed. A cost cell is empty when the model
    had no price."""
    choice = _period(request)
    if choice.period is None:
        return _bad_period(choice.form)
    return export.csv_response(tenant=request.tenant, period=choice.period)  # type: ignore[return-value]


# --- Prices -------------------------------------------------------------------------------------


def _providers(request: TenantRequest) -> Any:
    return agent_selectors.provider_list(tenant=request.tenant)


def _prices_context(request: TenantRequest, form: forms.PriceForm | None = None) -> dict:
    return {
        "prices": selectors.price_list(tenant=request.tenant),
        "form": form or forms.PriceForm(providers=_providers(request)),
    }


@tenant_view(manage=True)
def price_list(request: TenantRequest) -> HttpResponse:
    """The price table; POST adds a price (htmx swaps the section, errors next to the fields)."""
    form = None
    if request.method == "POST":
        form = forms.PriceForm(request.POST, providers=_providers(request))
        if form.is_valid():
            try:
                price = services.price_create(
                    tenant=request.tenant, actor=request.actor, **form.values()
                )
            except ValidationFailed as exc:
                apply_domain_errors(form, exc)
            else:
                messages.success(request, f"Price for {price.model} added.")
                form = None
                if not request.htmx:
                    return redirect("price-list", tenant_slug=request.tenant.slug)
    context = _prices_context(request, form)
    if request.htmx and not request.htmx.boosted:
        return render(request, "usage/prices.html#price-section", context)
    return render(request, "usage/prices.html", context, status=400 if form else 200)


@tenant_view(manage=True)
@not_found_is_404
def price_detail(request: TenantRequest, price_id: str) -> HttpResponse:
    price = selectors.price_get(tenant=request.tenant, price_id=price_id)
    initial = {
        "model": price.model,
        "provider": str(price.provider_id or ""),
        # The digits the price table shows (0.15, not 0.150000 as the column stores them).
        "input_per_million": charts.price_digits(price.input_per_million),
        "cached_input_per_million": (
            None
            if price.cached_input_per_million is None
            else charts.price_digits(price.cached_input_per_million)
        ),
        "output_per_million": charts.price_digits(price.output_per_million),
        "note": price.note,
    }
    form = forms.PriceForm(request.POST or None, initial=initial, providers=_providers(request))
    if request.method == "POST" and form.is_valid():
        try:
            services.price_update(
                tenant=request.tenant, actor=request.actor, price_id=price.pk, **form.values()
            )
        except ValidationFailed as exc:
            apply_domain_errors(form, exc)
        else:
            messages.success(request, f"Price for {form.cleaned_data['model']} saved.")
            return redirect("price-list", tenant_slug=request.tenant.slug)
    return render(request, "usage/price_detail.html", {"price": price, "form": form})


@tenant_view(manage=True)
@require_POST
@not_found_is_404
def price_delete(request: TenantRequest, price_id: str) -> HttpResponse:
    price = selectors.price_get(tenant=request.tenant, price_id=price_id)
    services.price_delete(tenant=request.tenant, actor=request.actor, price_id=price.pk)
    messages.success(request, f"Price for {price.model} removed: its calls now have no price.")
    return redirect("price-list", tenant_slug=request.tenant.slug)


@tenant_view(manage=True)
@require_POST
def price_list_prices(request: TenantRequest) -> HttpResponse:
    added = services.price_add_list_prices(tenant=request.tenant, actor=request.actor)
    if added:
        messages.success(
            request,
            f"Added OpenAI list prices for {len(added)} models. Check them against your contract.",
        )
    else:
        messages.info(request, "Every model of the list already has a price.")
    return redirect("price-list", tenant_slug=request.tenant.slug)


# --- Budget -------------------------------------------------------------------------------------


@tenant_view(manage=True)
def budget_settings(request: TenantRequest) -> HttpResponse:
    """The monthly budget: owners change it, admins see it."""
    state = selectors.budget_state(tenant=request.tenant)
    budget = state.budget if state else None
    initial = {
        "token_limit": budget.token_limit if budget else None,
        "cost_limit": budget.cost_limit if budget else None,
        "warn_percent": budget.warn_percent if budget else 80,
    }
    form = forms.BudgetForm(request.POST or None, initial=initial)
    if request.method == "POST":
        if not request.actor.is_owner:
            raise DjangoPermissionDenied("Only owners can change the budget.")
        if form.is_valid():
            try:
                services.budget_set(tenant=request.tenant, actor=request.actor, **form.cleaned_data)
            except ValidationFailed as exc:
                apply_domain_errors(form, exc)
            except PermissionDenied as exc:
                raise DjangoPermissionDenied(exc.message)
            else:
                messages.success(request, "Budget saved.")
                return redirect("budget-settings", tenant_slug=request.tenant.slug)
    return render(request, "usage/budget.html", {"form": form, "state": state})

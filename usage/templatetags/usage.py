"""`{% budget_banner %}`: the dashboard's budget warning for owners and admins; members see it
once the budget is used up, before they type a message that would be refused."""

from __future__ import annotations

from typing import Any

from django import template

from usage import selectors

register = template.Library()


@register.inclusion_tag("usage/budget_banner.html", takes_context=True)
def budget_banner(context: dict[str, Any]) -> dict[str, Any]:
    tenant = context.get("current_tenant")
    membership = context.get("current_membership")
    if tenant is None or membership is None:
        return {}
    state = selectors.budget_state(tenant=tenant)  # one query
    if state is None or not (state.warning or state.exhausted):
        return {}
    if not membership.can_manage and not state.exhausted:
        return {}  # a member hears of the budget only when it stops their messages
    return {"state": state, "tenant": tenant, "manager": membership.can_manage}


@register.filter
def amount(value: Any, metric: str = "total_tokens") -> str:
    from usage.charts import amount as fmt

    return fmt(value or 0, metric)


@register.filter
def exact(value: Any) -> str:
    """An exact amount with thousands separators: 4,410 tokens, $12.50."""
    from decimal import Decimal

    if isinstance(value, Decimal):
        return f"${value:,.2f}"
    return f"{int(value or 0):,}"


@register.filter
def price(value: Any) -> str:
    """A price per million tokens: $0.15, $1.00, $0.075, $1,250.00."""
    from usage.charts import price_digits

    return f"${price_digits(value, grouped=True)}"

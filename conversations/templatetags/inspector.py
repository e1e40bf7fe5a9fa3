"""Presentation filters of the run inspector: durations in words a person reads at a glance."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from django import template

from usage.charts import sub_cent

register = template.Library()


@register.filter
def ms(value: Any) -> str:
    """850 → "850 ms", 1234.5 → "1.23 s", 95000 → "1 min 35 s"; "" for nothing."""
    if value is None or value == "":
        return ""
    try:
        millis = float(value)
    except (TypeError, ValueError):
        return ""
    # Each unit is chosen by the value as it will be written, so 999.7 ms (written "1000 ms")
    # is "1.00 s", and 59.97 s (written "60.0 s") is "1 min".
    if round(millis, 1) < 10:
        return f"{millis:.1f} ms".replace(".0 ms", " ms")
    if round(millis) < 1000:
        return f"{millis:.0f} ms"
    seconds = millis / 1000
    if round(seconds, 2) < 10:
        return f"{seconds:.2f} s"
    if round(seconds, 1) < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


@register.filter
def ms_between(start: datetime | None, end: datetime | None) -> str:
    """The time from `start` to `end` (see `ms`); "" when either is missing."""
    if start is None or end is None:
        return ""
    return ms(max((end - start).total_seconds() * 1000, 0))


@register.filter
def cost(value: Decimal | float | None) -> str:
    """A cost in dollars: the cents always ($0.10, $1,234.50, as the usage page writes them),
    and the digits a small amount has below a dollar ($0.0123) or a cent ($0.0042)."""
    if value is None:
        return ""
    amount = Decimal(value)
    if amount == 0:
        return "$0"
    if amount < Decimal("0.01"):
        return sub_cent(amount)
    kept = amount.quantize(Decimal("0.0001") if amount < 1 else Decimal("0.01"))
    places = max(2, -kept.normalize().as_tuple().exponent)  # type: ignore[operator]
    return f"${kept:,.{places}f}"


def _run_cost_parts(run: Any) -> tuple[str, str]:
    """The amount and, when some of the run's tokens had no price, what is not in it."""
    unpriced = run.unpriced_tokens
    if not unpriced:
        return cost(run.cost), ""
    if not run.cost and unpriced >= run.total_tokens:
        return "no price", ""
    return cost(run.cost), f"+ {unpriced:,} tokens with no price"


@register.filter
def run_cost(run: Any) -> str:
    """What a run cost, never a silent $0 for a model without a price: "no price" when none of
    its tokens had one, "$0.01 + 120 tokens with no price" when some did not."""
    return " ".join(part for part in _run_cost_parts(run) if part)


@register.inclusion_tag("conversations/_run_cost_cell.html")
def run_cost_cell(run: Any) -> dict[str, str]:
    """The runs table's cost: the amount on one line, the tokens without a price under it (on
    one line with it, the cell was wider than any other and pushed the last columns out of a
    laptop's screen)."""
    amount, unpriced = _run_cost_parts(run)
    return {"amount": amount, "unpriced": unpriced}

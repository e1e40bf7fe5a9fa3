"""Server-rendered SVG charts for the usage page.

Why SVG from the server rather than a JavaScript chart library: the page's CSP allows no inline
scripts or styles, the data is already aggregated on the server, and a stacked bar per day needs
only rectangles. Geometry is computed here and written as SVG attributes (which the CSP does not
restrict); colours come from classes in static/css/usage.css; each bar carries a <title> that
browsers show on hover and screen readers read. Nothing to vendor or keep up to date.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Any

from usage.selectors import Series

WIDTH, HEIGHT = 760, 240
LEFT, RIGHT, TOP, BOTTOM = 64, 8, 10, 26


COST_PLACES = Decimal("1e-8")  # costs are kept to 8 decimal places


def sub_cent(value: Decimal) -> str:
    """An amount below a cent with the digits it has: $0.0042, $0.0000004 (never "$0.")."""
    kept = value.quantize(COST_PLACES)  # a float's binary tail is not a digit of the cost
    if not kept:
        return "$0" if not value else "less than $0.00000001"
    return f"${kept.normalize():f}"


def amount(value: Any, metric: str) -> str:
    """Tokens as 1.2k / 3.4M, cost in dollars with the cents (or more digits below a cent)."""
    if metric == "cost":
        v = Decimal(value)
        if v == 0:
            return "$0"
        return f"${v:,.2f}" if abs(v) >= Decimal("0.01") else sub_cent(v)
    n = float(value)
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}".rstrip("0").rstrip(".") + unit
    return f"{int(n)}"


def price_digits(value: Decimal, *, grouped: bool = False) -> str:
    """A price per million tokens as digits: the cents always, more places only when the price
    has them (0.15, 1.00, 0.075), so a column of prices reads alike. `grouped` adds thousands
    separators (1,250.00) for reading; without them the digits fit a number input."""
    v = Decimal(value).normalize()
    places = max(2, -v.as_tuple().exponent)  # type: ignore[operator]
    return f"{v:{',' if grouped else ''}.{places}f}"


def _nice_ceiling(value: float) -> float:
    """The top of the axis: four gridline steps of a round size (1, 1.5, 2, 2.5, 3, 4, 5, ...)."""
    if value <= 0:
        return 4.0
    step = value / 4
    exponent = math.floor(math.log10(step))
    for size in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        candidate = size * 10**exponent
        if candidate >= step:
            return 4 * candidate
    return 4 * 10 ** (exponent + 1)


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    css: str
    title: str


@dataclass
class Chart:
    width: int = WIDTH
    height: int = HEIGHT
    bars: list[Bar] = field(default_factory=list)
    gridlines: list[dict[str, Any]] = field(default_factory=list)
    xlabels: list[dict[str, Any]] = field(default_factory=list)
    legend: list[dict[str, Any]] = field(default_factory=list)
    empty: bool = True
    plot_left: int = LEFT
    plot_right: int = WIDTH - RIGHT
    baseline: float = HEIGHT - BOTTOM


def stacked_bars(dates: list[date], series: list[Series], metric: str) -> Chart:
    """One stacked bar per day; series in order, bottom up, coloured s0..s5 ("Other" is s5)."""
    chart = Chart()
    totals = [sum((s.values[i] for s in series), Decimal(0)) for i in range(len(dates))]
    top = _nice_ceiling(float(max(totals, default=0)))
    chart.empty = not any(totals)
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    slot = plot_w / max(len(dates), 1)
    bar_w = max(1.0, slot * 0.72)
    for step in range(5):
        value = top * step / 4
        y = TOP + plot_h - plot_h * step / 4
        chart.gridlines.append({"y": round(y, 1), "label": amount(value, metric)})
    every = max(1, math.ceil(len(dates) / 10))
    for i, day in enumerate(dates):
        if i % every == 0:
            chart.xlabels.append(
                {"x": round(LEFT + slot * i + slot / 2, 1), "label": f"{day:%-d %b}"}
            )
    css = {s.key: f"s{5 if s.key == 'other' else n % 5}" for n, s in enumerate(series)}
    for i, day in enumerate(dates):
        y = TOP + plot_h
        x = LEFT + slot * i + (slot - bar_w) / 2
        for s in series:
            value = s.values[i]
            if not value:
                continue
            h = plot_h * float(value) / top
            y -= h
            chart.bars.append(
                Bar(
                    round(x, 1),
                    round(y, 1),
                    round(bar_w, 1),
                    round(max(h, 0.5), 1),
                    css[s.key],
                    f"{day:%-d %b %Y} · {s.label}: {amount(value, metric)}",
                )
            )
    chart.legend = [
        {"label": s.label, "css": css[s.key], "total": amount(sum(s.values), metric)}
        for s in series
    ]
    return chart

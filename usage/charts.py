"""Server-rendered SVG charts for the usage page.

Why SVG from the server rather than a JavaScript chart library: the page's CSP allows no inline
scripts or styles, the data is already aggregated on the server, and a stacked bar per day needs
only rectangles. Geometry is computed here and written as SVG attributes (which the CSP does not
restrict); colours come from classes in static/css/usage.css; each bar carries a <title> that
browsers show on hover. Nothing to vendor or keep up to date.

A screen reader reads the chart (role="img") by its name only, never the titles of its bars, so
the same figures are also a table (`Chart.rows`, under "Show as table" on the page): a row per
day, a column per series. The bars' titles and the table's cells are the same strings.

Why not one SVG scaled by a viewBox: scaling it to a phone's width scaled its text with it, to
under 5 px. So nothing is scaled: the value axis is an SVG sized in CSS pixels, and the
plot beside it takes the rest of the width with its horizontal geometry in percentages of it (SVG
takes them in attributes) and its vertical geometry in pixels. Text stays at its CSS size at every
width; a narrow chart (a container query in usage.css) hides the day labels marked `minor`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Any

from usage.selectors import Series

HEIGHT = 240  # CSS px, at every width
AXIS_GAP, DIGIT_WIDTH = 6, 7.5  # px: between the value labels and the plot; a character at 12 px
TOP, BOTTOM = 10, 26
DAY_LABELS, FEW_DAY_LABELS = 10, 4  # at most, on a wide chart and on a narrow one


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


STEP_SIZES = tuple(Decimal(s) for s in ("1", "1.5", "2", "2.5", "3", "4", "5", "6", "8"))
CENT = Decimal("0.01")


def _writable(step: Decimal, metric: str) -> bool:
    """Whether every gridline of four `step`s is written exactly by `amount`: tokens are whole,
    an amount of a cent or more is written to the cent, and a smaller one to 8 places."""
    if metric != "cost":
        return step >= 1 and step % 1 == 0
    return step >= COST_PLACES and (4 * step <= CENT or step % CENT == 0)


def axis_steps(peak: Decimal, metric: str) -> tuple[Decimal, int]:
    """The gridlines' step and how many steps reach the tallest bar (`peak`): four steps of a
    round size (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 times a power of ten) whose labels are distinct
    and exact. When the step had to be made larger to be written (1 token, a cent), fewer steps
    may reach the top: 3 tokens are 0, 1, 2, 3, not 0, 1, 2, 3, 4."""
    if peak <= 0:
        return (Decimal(1) if metric != "cost" else CENT), 4
    target = peak / 4
    exponent = target.adjusted()  # target < 10 ** (exponent + 1)
    raised = False
    while True:
        for size in STEP_SIZES:
            step = size.scaleb(exponent)
            if step < target:
                continue
            if not _writable(step, metric):
                raised = True
                continue
            return step, max(1, math.ceil(peak / step)) if raised else 4
        exponent += 1


@dataclass
class Bar:
    x: float  # % of the plot's width
    y: float
    width: float  # % of the plot's width
    height: float
    css: str
    title: str


@dataclass
class Row:
    """A day of the chart in its table: the amounts its bars' titles give, and their sum."""

    day: date
    label: str  # "1 Nov 2026", as in the bars' titles
    cells: list[str]  # one per series, in the legend's order ("0" where it has no bar)
    total: str


@dataclass
class Chart:
    height: int = HEIGHT
    axis_width: int = 40  # as wide as its longest label
    bars: list[Bar] = field(default_factory=list)
    gridlines: list[dict[str, Any]] = field(default_factory=list)
    xlabels: list[dict[str, Any]] = field(default_factory=list)
    legend: list[dict[str, Any]] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)  # the days with a bar, as a table
    total: str = ""  # of the whole period
    empty: bool = True
    baseline: float = HEIGHT - BOTTOM


def stacked_bars(dates: list[date], series: list[Series], metric: str) -> Chart:
    """One stacked bar per day; series in order, bottom up, coloured s0..s5 ("Other" is s5)."""
    chart = Chart()
    totals = [sum((s.values[i] for s in series), Decimal(0)) for i in range(len(dates))]
    step, steps = axis_steps(Decimal(max(totals, default=0)), metric)
    top = float(step * steps)
    chart.empty = not any(totals)
    plot_h = HEIGHT - TOP - BOTTOM
    slot = 100 / max(len(dates), 1)  # % of the plot's width
    bar_w = slot * 0.72
    for n in range(steps + 1):
        y = TOP + plot_h - plot_h * n / steps
        chart.gridlines.append({"y": round(y, 1), "label": amount(step * n, metric)})
    longest = max(len(g["label"]) for g in chart.gridlines)
    chart.axis_width = max(chart.axis_width, math.ceil(AXIS_GAP + DIGIT_WIDTH * longest))
    # A narrow chart keeps every few of the labels (the others are `minor`), so that the ones
    # it shows stay evenly spaced.
    every = max(1, math.ceil(len(dates) / DAY_LABELS))
    few = every * math.ceil(math.ceil(len(dates) / FEW_DAY_LABELS) / every)
    for i, day in enumerate(dates):
        if i % every == 0:
            chart.xlabels.append(
                {
                    "x": round(slot * i + slot / 2, 3),
                    "label": f"{day:%-d %b}",
                    "minor": i % few != 0,
                }
            )
    css = {s.key: f"s{5 if s.key == 'other' else n % 5}" for n, s in enumerate(series)}
    for i, day in enumerate(dates):
        y = TOP + plot_h
        x = slot * i + (slot - bar_w) / 2
        label = f"{day:%-d %b %Y}"
        cells = [amount(s.values[i], metric) for s in series]
        for s, cell in zip(series, cells, strict=True):
            value = s.values[i]
            if not value:
                continue
            h = plot_h * float(value) / top
            y -= h
            chart.bars.append(
                Bar(
                    round(x, 3),
                    round(y, 1),
                    round(bar_w, 3),
                    round(max(h, 0.5), 1),
                    css[s.key],
                    f"{label} · {s.label}: {cell}",
                )
            )
        if totals[i]:  # a day without a bar has no row (the table says so)
            chart.rows.append(Row(day, label, cells, amount(totals[i], metric)))
    chart.legend = [
        {"label": s.label, "css": css[s.key], "total": amount(sum(s.values), metric)}
        for s in series
    ]
    chart.total = amount(sum(totals), metric)
    return chart

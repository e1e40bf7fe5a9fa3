"""The usage page in headless Chromium: its vertical rhythm and its chart's labels at a laptop's
and a phone's width, the page fitting the window at every width from 320 to 1600 px, and the
chart's figures as a table in the accessibility tree.

The page is rendered by Django's test client and handed to the browser through request routing
(its static files read from the static folders), so no server is started.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.staticfiles import finders
from django.utils import timezone
from playwright.sync_api import Browser, Route, expect

from tests.browser.conftest import ARTIFACTS, in_chromium
from tests.usage.test_usage import _call, _finished_run, setup, used  # noqa: F401 (fixtures)

pytestmark = pytest.mark.browser

ORIGIN = "http://testserver"
WIDTHS = {"laptop": 1280, "phone": 390}

# The page's top-level blocks, grouped into rows (the cells of one grid row share their top),
# top to bottom, with the space between each row and the next.
ROW_GAPS = """() => {
  const picked = [...document.querySelectorAll("main .card, main .stats, main .alert")];
  const blocks = picked.filter((el) => !picked.some((o) => o !== el && o.contains(el)));
  const rows = new Map();
  for (const el of blocks) {
    const r = el.getBoundingClientRect();
    const top = Math.round(r.top + window.scrollY);
    const label = (el.querySelector("h2") || el).textContent.trim().split("\\n")[0].slice(0, 30);
    const row = rows.get(top) || { top, bottom: 0, labels: [] };
    row.bottom = Math.max(row.bottom, r.bottom + window.scrollY);
    row.labels.push(label);
    rows.set(top, row);
  }
  const sorted = [...rows.values()].sort((a, b) => a.top - b.top);
  return sorted.slice(1).map((row, i) => ({
    above: sorted[i].labels.join(" | "),
    below: row.labels.join(" | "),
    gap: row.top - sorted[i].bottom,
  }));
}"""


def _serve(html: str, fragments: dict[str, str] | None = None):
    """Answer the browser with the static files, `html` for the page, and for an htmx request
    the first of `fragments` whose key is in its URL."""

    def handle(route: Route) -> None:
        url = route.request.url.removeprefix(ORIGIN)
        path = url.split("?", 1)[0]
        if path.startswith(settings.STATIC_URL):
            found = finders.find(path.removeprefix(settings.STATIC_URL))
            if found:
                kind = "text/css" if path.endswith(".css") else "application/javascript"
                route.fulfill(body=Path(str(found)).read_bytes(), content_type=kind)
                return
            route.fulfill(status=404, body="")
            return
        if route.request.headers.get("hx-request"):
            body = next((f for key, f in (fragments or {}).items() if key in url), None)
            if body is None:
                route.fulfill(status=404, body="")
                return
            route.fulfill(body=body, content_type="text/html; charset=utf-8")
            return
        route.fulfill(body=html, content_type="text/html; charset=utf-8")

    return handle


def _row_gaps(html: str) -> dict[str, list[dict[str, Any]]]:
    """Each width's row gaps, measured in Chromium."""

    def measure(browser: Browser) -> dict[str, list[dict[str, Any]]]:
        out = {}
        for name, width in WIDTHS.items():
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.route("**/*", _serve(html))
            page.goto(f"{ORIGIN}/usage/", wait_until="load")
            out[name] = page.evaluate(ROW_GAPS)
            page.close()
        return out

    return in_chromium(measure, "usage-layout")


def test_every_block_of_the_usage_page_is_as_far_from_the_next(used):  # noqa: F811
    world, *_ = used
    html = world.client_for(world.owner).get(f"/t/{world.tenant.slug}/usage/").content.decode()
    cards_margin = 1.2 * 16  # app.css: .card { margin-bottom: 1.2rem }
    for width, gaps in _row_gaps(html).items():
        labels = [g["below"] for g in gaps]
        assert any(label.startswith("Monthly budget") for label in labels), (width, labels)
        wrong = [g for g in gaps if abs(g["gap"] - cards_margin) > 0.5]
        assert wrong == [], (width, wrong)


# The chart's axis labels as the reader sees them: their size on screen (the CSS font size times
# any scaling of the SVG), their boxes, and whether the chart stays inside its card and the page.
CHART_LABELS = """() => {
  const chart = document.querySelector("#usage-chart .chart");
  const card = chart.closest(".card").getBoundingClientRect();
  const shown = [...chart.querySelectorAll("text")].filter(
    (t) => getComputedStyle(t).display !== "none" && t.getBoundingClientRect().width > 0
  );
  const labels = shown.map((t) => {
    const r = t.getBoundingClientRect();
    const px = parseFloat(getComputedStyle(t).fontSize) * t.getScreenCTM().a;
    return { text: t.textContent, px, left: r.left, right: r.right, top: r.top, bottom: r.bottom };
  });
  const box = chart.getBoundingClientRect();
  return {
    labels,
    chart: { left: box.left, right: box.right },
    card: { left: card.left, right: card.right },
    pageOverflow: document.documentElement.scrollWidth - window.innerWidth,
  };
}"""


def _chart_labels(html: str) -> dict[str, dict[str, Any]]:
    def measure(browser: Browser) -> dict[str, dict[str, Any]]:
        out = {}
        for name, width in WIDTHS.items():
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.route("**/*", _serve(html))
            page.goto(f"{ORIGIN}/usage/", wait_until="load")
            out[name] = page.evaluate(CHART_LABELS)
            if os.environ.get("BROWSER_SCREENSHOTS") == "all":
                ARTIFACTS.mkdir(exist_ok=True)
                page.locator("#usage-chart").screenshot(path=ARTIFACTS / f"usage-chart-{name}.png")
            page.close()
        return out

    return in_chromium(measure, "usage-chart")


def test_the_charts_labels_stay_readable_and_apart_on_a_phone(used):  # noqa: F811
    world, *_ = used
    url = f"/t/{world.tenant.slug}/usage/?period=last_30_days"
    html = world.client_for(world.owner).get(url).content.decode()
    for width, seen in _chart_labels(html).items():
        labels = seen["labels"]
        days = [label for label in labels if " " in label["text"]]  # "31 Oct"
        assert len(days) >= 4, (width, [label["text"] for label in labels])
        # Written at the page's small print size, never scaled down with the chart.
        small = [(label["text"], round(label["px"], 1)) for label in labels if label["px"] < 11]
        assert small == [], (width, small)
        overlapping = [
            (a["text"], b["text"])
            for i, a in enumerate(labels)
            for b in labels[i + 1 :]
            if a["left"] < b["right"]
            and b["left"] < a["right"]
            and a["top"] < b["bottom"]
            and b["top"] < a["bottom"]
        ]
        assert overlapping == [], (width, overlapping)
        outside = [
            label["text"]
            for label in labels
            if label["left"] < seen["card"]["left"] or label["right"] > seen["card"]["right"]
        ]
        assert outside == [], (width, outside)
        assert seen["card"]["left"] <= seen["chart"]["left"], width
        assert seen["chart"]["right"] <= seen["card"]["right"], width
        assert seen["pageOverflow"] <= 0, width


# Widths from a small phone to a wide screen; 861 to 980 px (the sidebar beside two tables) is
# where the top tables used to be wider than the window.
SIDEWAYS_WIDTHS = (320, 390, 760, 860, 861, 880, 920, 960, 980, 1024, 1100, 1240, 1280, 1600)
# A fine-tuned model's name: one long word, as such names are.
LONG_MODEL = "ft:gpt-4o-mini-2024-07-18:acme-corp:support-triage:9xYzAbCd"

# Whether the page scrolls sideways; each cell of the top tables that is shown but not wholly on
# screen: outside its card, outside the window, or its text wider than the cell; and the words of
# up to 20 characters that the cells split over two lines.
TOP_TABLES = """() => {
  const doc = document.documentElement;
  const cells = [...document.querySelectorAll(".usage-tables .card")].flatMap((card) => {
    const c = card.getBoundingClientRect();
    return [...card.querySelectorAll("th, td")].map((cell) => ({ cell, c }));
  });
  const shown = cells.filter(({ cell }) => cell.getClientRects().length > 0);
  const cut = shown.filter(({ cell, c }) => {
    const r = cell.getBoundingClientRect();
    return r.left < Math.max(c.left, 0) - 0.5
      || r.right > Math.min(c.right, window.innerWidth) + 0.5
      || cell.scrollWidth > cell.clientWidth + 1;
  });
  const split = [];
  for (const { cell } of shown) {
    const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
    for (let node; (node = walker.nextNode()); ) {
      for (const m of node.data.matchAll(/\\S+/g)) {
        if (m[0].length > 20) continue;  // a name longer than a column may break
        const range = document.createRange();
        range.setStart(node, m.index);
        range.setEnd(node, m.index + m[0].length);
        const lines = new Set([...range.getClientRects()].map((b) => Math.round(b.top)));
        if (lines.size > 1) split.push(m[0]);
      }
    }
  }
  return {
    overflow: doc.scrollWidth - doc.clientWidth,
    cells: shown.length,
    cut: cut.map(({ cell }) => cell.textContent.trim().slice(0, 40)),
    split,
  };
}"""


def test_the_usage_page_fits_the_window_at_every_width(used):  # noqa: F811
    world, provider, agent, member, _external = used
    _finished_run(world, agent, member, [_call(LONG_MODEL, provider, inp=40, out=2)])
    html = world.client_for(world.owner).get(f"/t/{world.tenant.slug}/usage/").content.decode()
    assert LONG_MODEL in html

    def measure(browser: Browser) -> dict[int, dict[str, Any]]:
        out = {}
        for width in SIDEWAYS_WIDTHS:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.route("**/*", _serve(html))
            page.goto(f"{ORIGIN}/usage/", wait_until="load")
            out[width] = page.evaluate(TOP_TABLES)
            if os.environ.get("BROWSER_SCREENSHOTS") == "all":
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=ARTIFACTS / f"usage-{width}.png", full_page=True)
            page.close()
        return out

    seen = in_chromium(measure, "usage-widths")
    scrolls = {width: s["overflow"] for width, s in seen.items() if s["overflow"] > 0}
    assert scrolls == {}, f"the page scrolls sideways by this many px at these widths: {scrolls}"
    cut = {width: s["cut"] for width, s in seen.items() if s["cut"]}
    assert cut == {}, f"cells of the top tables not wholly on screen: {cut}"
    split = {width: s["split"] for width, s in seen.items() if s["split"]}
    assert split == {}, f"short words split over two lines: {split}"
    # Every row of the four tables was measured: 8 rows of 4 cells (and the headers when shown).
    assert all(s["cells"] >= 4 * 2 * 4 for s in seen.values()), seen


LABELS = """() => [...document.querySelectorAll(".usage-tables tbody tr")].map((row) =>
  [...row.querySelectorAll("td.num")].map((cell) => {
    const label = getComputedStyle(cell, "::before").content;
    return label === "none" || label === "normal" ? "" : label.replace(/"/g, "");
  }))"""


def test_on_a_phone_each_figure_of_the_top_tables_says_what_it_is(used):  # noqa: F811
    """On a phone the top tables' rows stack and their header row is hidden: each figure
    carries its column's name (Tokens, Cost, Calls); on a laptop the header row names them."""
    world, provider, agent, member, _external = used
    _finished_run(world, agent, member, [_call(LONG_MODEL, provider, inp=40, out=2)])
    html = world.client_for(world.owner).get(f"/t/{world.tenant.slug}/usage/").content.decode()

    def labels(browser: Browser) -> dict[int, list[list[str]]]:
        out = {}
        for width in (390, 1280):
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.route("**/*", _serve(html))
            page.goto(f"{ORIGIN}/usage/", wait_until="load")
            out[width] = page.evaluate(LABELS)
            page.close()
        return out

    seen = in_chromium(labels, "usage-labels")
    assert seen[390] and all(row == ["Tokens", "Cost", "Calls"] for row in seen[390]), seen[390]
    assert all(row == ["", "", ""] for row in seen[1280]), seen[1280]


def test_the_charts_options_keep_the_keyboard_where_it_was(used):  # noqa: F811
    """A keyboard user picks "By model": the chart and its options are replaced, and the focus
    is on the new "By model", not back at the page's start."""
    world, *_ = used
    owner = world.client_for(world.owner)
    url = f"/t/{world.tenant.slug}/usage/"
    html = owner.get(url).content.decode()
    by_model = owner.get(
        f"{url}?period=this_month&by=model&metric=total_tokens&fragment=chart",
        HTTP_HX_REQUEST="true",
    ).content.decode()

    def flow(browser: Browser) -> None:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.route("**/*", _serve(html, {"by=model": by_model}))
        page.goto(f"{ORIGIN}{url}", wait_until="load")
        options = page.get_by_role("navigation", name="Chart options")
        options.get_by_role("link", name="By model").focus()
        page.keyboard.press("Enter")
        expect(options.get_by_role("link", name="By model")).to_have_attribute(
            "aria-current", "true"
        )
        expect(options.get_by_role("link", name="By model")).to_be_focused()

    in_chromium(flow, "usage-chart-focus")


def test_a_screen_reader_gets_the_charts_figures_from_its_table(used):  # noqa: F811
    """What Chromium gives a screen reader: the chart is an image with a name and nothing more
    (the titles of its bars are not read); "Show as table" opens a table of the same figures,
    which stays open when the chart shows another grouping, and fits a phone's screen."""
    world, *_ = used
    owner = world.client_for(world.owner)
    url = f"/t/{world.tenant.slug}/usage/"
    html = owner.get(url).content.decode()
    by_model = owner.get(
        f"{url}?period=this_month&by=model&metric=total_tokens&fragment=chart",
        HTTP_HX_REQUEST="true",
    ).content.decode()
    today = f"{timezone.now():%-d %b %Y}"

    def flow(browser: Browser) -> None:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.route("**/*", _serve(html, {"by=model": by_model}))
        page.goto(f"{ORIGIN}{url}", wait_until="load")
        chart = page.get_by_role("img", name="Tokens per day, by agent")
        expect(chart).to_be_visible()
        assert chart.aria_snapshot() == '- img "Tokens per day, by agent"'
        expect(page.get_by_role("table", name=re.compile("^Tokens per day"))).to_have_count(0)

        page.get_by_text("Show as table").click()
        table = page.get_by_role("table", name=re.compile("^Tokens per day, by agent"))
        expect(table).to_be_visible()
        expect(table).to_match_aria_snapshot(
            f"""
            - table:
              - rowgroup:
                - row:
                  - columnheader "Day"
                  - columnheader "Helper"
                  - columnheader "Total"
              - rowgroup:
                - row:
                  - rowheader "{today}"
                  - cell "2.2k"
                  - cell "2.2k"
              - rowgroup:
                - row:
                  - rowheader "Total"
                  - cell "2.2k"
                  - cell "2.2k"
            """
        )

        # The chart's options swap the chart and its table; the table stays open.
        page.get_by_role("link", name="By model").click()
        table = page.get_by_role("table", name=re.compile("^Tokens per day, by model"))
        expect(table).to_be_visible()
        expect(table.get_by_role("row", name=re.compile(f"^{today} "))).to_have_text(
            re.compile(r"2\.2k\s*10\s*2\.2k")
        )

        page.set_viewport_size({"width": 320, "height": 800})
        expect(table).to_be_visible()
        overflow = page.evaluate(
            "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, overflow
        page.close()

    in_chromium(flow, "usage-chart-table")


# The chart card's heading and its options: the heading on one line, and the options beside it
# or under it, never overlapping it, and inside the card.
CHART_HEAD = """() => {
  const head = document.querySelector("#usage-chart .card-head");
  const h2 = head.querySelector("h2");
  const nav = head.querySelector("nav");
  const range = document.createRange();
  range.selectNodeContents(h2);
  const lines = new Set([...range.getClientRects()].map((r) => Math.round(r.top))).size;
  const h = h2.getBoundingClientRect(), n = nav.getBoundingClientRect();
  const card = head.closest(".card").getBoundingClientRect();
  const overlap = h.left < n.right && n.left < h.right && h.top < n.bottom && n.top < h.bottom;
  return {
    lines,
    overlap,
    under: n.top >= h.bottom - 0.5,
    inside: card.left <= n.left + 0.5 && n.right <= card.right + 0.5,
  };
}"""


def test_the_charts_heading_keeps_to_one_line_beside_or_above_its_options(used):  # noqa: F811
    world, *_ = used
    html = world.client_for(world.owner).get(f"/t/{world.tenant.slug}/usage/").content.decode()

    def measure(browser: Browser) -> dict[int, dict[str, Any]]:
        out = {}
        for width in (320, 360, 390, 760, 1280):
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.route("**/*", _serve(html))
            page.goto(f"{ORIGIN}/usage/", wait_until="load")
            out[width] = page.evaluate(CHART_HEAD)
            page.close()
        return out

    seen = in_chromium(measure, "usage-chart-head")
    wrong = {
        width: s for width, s in seen.items() if s["lines"] != 1 or s["overlap"] or not s["inside"]
    }
    assert wrong == {}, "the heading wraps, or the options overlap it or leave the card"
    assert seen[320]["under"], "on a small phone the options go under the heading"
    assert not seen[1280]["under"], "on a laptop they stay beside it"

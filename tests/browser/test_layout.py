"""The pages on a phone (390 px) and a laptop (1280 px): long words wrap instead of widening the
page, the runs table labels its cells once its headers are hidden, words break only between each
other, the conversation list keeps its row actions in one column, and a long conversation fills
the window: only its messages scroll, the composer and the status stay in view under a compact
navigation, and the message box keeps most of the composer's width while a reply runs."""

from __future__ import annotations

import os
import re
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from conversations import services
from conversations.models import Item, RunStatus
from tests.browser.test_chat import (  # noqa: F401 (fixtures)
    _published_agent,
    asgi_site,
    site,
)
from tests.browser.test_dashboard import log_in
from tests.conftest import make_world
from tests.conversations.test_inspector import _agent, _run

# Served by the real ASGI app (uvicorn), as in production: the chat page opens its websocket.
pytestmark = [
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("asgi_site"),
]

PHONE = {"width": 390, "height": 844}
LAPTOP = {"width": 1280, "height": 900}
LONG_WORD = "Pneumonoultramicroscopicsilicovolcanoconiosis" * 2
LONG_URL = "https://docs.example.test/" + "/".join(["a-rather-long-path-segment"] * 4)
NAV_LINKS = [
    "Overview",
    "Chat",
    "Agents",
    "Runs",
    "Model providers",
    "MCP servers",
    "Members",
    "API keys",
    "Usage",
    "Audit log",
    "Settings",
]
RUN_COLUMNS = [
    "Started",
    "Agent",
    "End user",
    "Status",
    "Duration",
    "First token",
    "Tokens",
    "Cost",
    "Attempts",
    "Error",
]


def _shot(page: Page, name: str) -> None:
    """Screenshots to look at by eye, when LAYOUT_SCREENSHOTS names a folder."""
    folder = os.environ.get("LAYOUT_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=f"{folder}/{name}.png", full_page=True)


def _scrolls_sideways(page: Page) -> bool:
    return page.evaluate("() => document.documentElement.scrollWidth > window.innerWidth")


def _member_threads(world, titles: list[str]):
    agent = _published_agent(world)
    end_user = services.end_user_for_member(tenant=world.tenant, user=world.member)
    threads = []
    for title in titles:
        thread = services.thread_create(tenant=world.tenant, end_user=end_user, agent_id=agent.pk)
        threads.append(
            services.thread_rename(
                tenant=world.tenant, end_user=end_user, thread_id=thread.pk, title=title
            )
        )
    return threads


def test_a_long_word_title_and_message_do_not_widen_the_chat_pages_on_a_phone(run_in_browser):
    world = make_world("Acme")
    thread, _short, _url = _member_threads(world, [LONG_WORD, "Weekly report", LONG_URL])
    Item.objects.bulk_create(
        Item(tenant=world.tenant, thread=thread, data=d)
        for d in [
            {"role": "user", "content": f"What is {LONG_WORD}? See {LONG_URL}"},
            {
                "type": "message",
                "role": "assistant",
                "content": [
                    {"type": "output_text", "text": f"`{LONG_WORD}` is a word; see <{LONG_URL}>."}
                ],
            },
        ]
    )

    def flow(new_context) -> None:
        page = new_context().new_page()
        page.set_viewport_size(PHONE)
        log_in(page, world.member.email)
        expect(page).to_have_url(re.compile(r"/t/acme/$"))

        page.goto("/t/acme/chat/")
        expect(page.get_by_role("link", name=LONG_WORD)).to_be_visible()
        _shot(page, "chat-home-390")
        assert not _scrolls_sideways(page), "the chat home scrolls sideways"

        page.goto(f"/t/acme/chat/{thread.pk}/")
        heading = page.get_by_role("heading", level=1)
        expect(heading).to_have_text(LONG_WORD)
        expect(page.locator(".msg-assistant .bubble")).to_contain_text("is a word")
        _shot(page, "chat-thread-390")
        assert not _scrolls_sideways(page), "the conversation page scrolls sideways"
        # Nothing is cut off: the heading and every message end inside the screen.
        for box in [heading, *page.locator(".bubble").all()]:
            right = box.evaluate("e => e.getBoundingClientRect().right")
            assert right <= PHONE["width"], (box, right)

    run_in_browser(flow)


def test_a_long_search_that_finds_nothing_does_not_widen_the_chat_home_on_a_phone(run_in_browser):
    world = make_world("Acme")
    _member_threads(world, ["Weekly report"])

    def flow(new_context) -> None:
        page = new_context().new_page()
        page.set_viewport_size(PHONE)
        log_in(page, world.member.email)
        expect(page).to_have_url(re.compile(r"/t/acme/$"))
        page.goto("/t/acme/chat/")
        page.get_by_label("Search by title").press_sequentially(LONG_WORD)
        empty = page.locator("#thread-list .empty")
        expect(empty).to_have_text(f'No conversation has "{LONG_WORD}" in its title. Show all')
        _shot(page, "chat-home-search-390")
        assert not _scrolls_sideways(page), "the chat home scrolls sideways"
        assert empty.evaluate("e => e.getBoundingClientRect().right") <= PHONE["width"]
        expect(empty.get_by_role("link", name="Show all")).to_be_in_viewport()

    run_in_browser(flow)


CODE_REPLY = """Run this:

```
pip install control-plane
```
"""


def test_a_long_title_and_a_code_block_stay_tidy_on_a_phone(run_in_browser):
    """A 200-character title takes three lines of the conversation list, not eighteen (its
    whole text is still the link's name); a code block in a reply is one block, its code not a
    highlighted span inside it."""
    world = make_world("Acme")
    long_title = " ".join(["quarterly"] * 20)[:200]
    _, coded = _member_threads(world, [long_title, "Install"])
    Item.objects.bulk_create(
        Item(tenant=world.tenant, thread=coded, data=d)
        for d in [
            {"role": "user", "content": "How do I install it?"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": CODE_REPLY}],
            },
        ]
    )

    def flow(new_context) -> None:
        page = new_context().new_page()
        page.set_viewport_size(PHONE)
        log_in(page, world.member.email)
        expect(page).to_have_url(re.compile(r"/t/acme/$"))
        page.goto("/t/acme/chat/")
        link = page.get_by_role("link", name=long_title)
        expect(link).to_be_visible()
        line = float(link.evaluate("e => parseFloat(getComputedStyle(e).lineHeight)"))
        assert link.evaluate("e => e.getBoundingClientRect().height") <= 3 * line + 1
        page.goto(f"/t/acme/chat/{coded.pk}/")
        code = page.locator(".msg-assistant pre code")
        expect(code).to_have_text(re.compile("pip install control-plane"))
        assert code.evaluate("e => getComputedStyle(e).backgroundColor") == "rgba(0, 0, 0, 0)"

    run_in_browser(flow)


TABLE_REPLY = """Here are the plans:

| Plan | Monthly price | What it includes | Support |
|------|--------------:|------------------|---------|
| Starter | $9 | One workspace, five agents and the community forum | Community forum |
| Business | $49 | Unlimited workspaces, SSO and an audit log | Next business day |
"""


def test_a_table_in_a_reply_is_a_table_that_scrolls_inside_its_bubble_on_a_phone(run_in_browser):
    world = make_world("Acme")
    (thread,) = _member_threads(world, ["Plans"])
    Item.objects.bulk_create(
        Item(tenant=world.tenant, thread=thread, data=d)
        for d in [
            {"role": "user", "content": "Compare the plans in a table"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": TABLE_REPLY}],
            },
        ]
    )

    def flow(new_context) -> None:
        page = new_context().new_page()
        page.set_viewport_size(PHONE)
        log_in(page, world.member.email)
        expect(page).to_have_url(re.compile(r"/t/acme/$"))
        page.goto(f"/t/acme/chat/{thread.pk}/")
        table = page.locator(".msg-assistant").get_by_role("table")
        expect(table.get_by_role("columnheader")).to_have_text(
            ["Plan", "Monthly price", "What it includes", "Support"]
        )
        expect(table.get_by_role("row").nth(2).get_by_role("cell")).to_have_text(
            ["Business", "$49", "Unlimited workspaces, SSO and an audit log",
             "Next business day"]
        )  # fmt: skip
        # The price column is aligned as the reply asked (`--:`), right.
        price = table.get_by_role("cell", name="$49")
        assert price.evaluate("e => getComputedStyle(e).textAlign") == "right"
        _shot(page, "chat-table-390")
        # Wider than the bubble, it scrolls inside it: the page does not, and no word is split.
        assert not _scrolls_sideways(page), "the conversation page scrolls sideways"
        assert table.evaluate("e => e.scrollWidth > e.clientWidth")
        assert table.evaluate("e => e.getBoundingClientRect().right") <= PHONE["width"]
        assert _broken_words(table) == []

    run_in_browser(flow)


def _labels(page: Page) -> list[list[str]]:
    """What each cell of the runs table shows before its content, row by row."""
    return page.evaluate(
        """() => [...document.querySelectorAll('#run-table tbody tr')].map(tr =>
             [...tr.cells].map(td => {
               const c = getComputedStyle(td, '::before').content;
               return c === 'none' || c === 'normal' ? '' : c.replace(/^"|"$/g, '');
             }))"""
    )


def _broken_words(locator) -> list[str]:
    """The words of `locator`'s text that the browser split over two lines."""
    return locator.evaluate(
        """e => {
             const walker = document.createTreeWalker(e, NodeFilter.SHOW_TEXT);
             const broken = [];
             for (let node; (node = walker.nextNode()); ) {
               for (const m of node.data.matchAll(/\\S+/g)) {
                 const r = document.createRange();
                 r.setStart(node, m.index);
                 r.setEnd(node, m.index + m[0].length);
                 const lines = new Set([...r.getClientRects()].map(b => Math.round(b.top)));
                 if (lines.size > 1) broken.push(m[0]);
               }
             }
             return broken;
           }"""
    )


def _placeholder_fits(locator) -> bool:
    return locator.evaluate(
        """e => {
             const s = getComputedStyle(e);
             const ctx = document.createElement('canvas').getContext('2d');
             ctx.font = s.font;
             const room = e.clientWidth - parseFloat(s.paddingLeft) - parseFloat(s.paddingRight);
             return ctx.measureText(e.placeholder).width <= room;
           }"""
    )


def test_the_runs_table_labels_its_cells_on_a_phone_and_breaks_words_only_between_them(
    run_in_browser,
):
    world = make_world("Acme")
    agent = _agent(world, name="Customer support triage")
    # A long external id in a mono font: the widest cell of the table squeezes the others.
    customer = services.end_user_for_external(
        tenant=world.tenant, external_id="crm-contact-8f2b2f73-8978-421b-a2e2-45cfc2fee5d3"
    )
    _run(world, agent, ago=timedelta(minutes=3), total_tokens=1000)
    _run(world, agent, status=RunStatus.CANCELLED, ago=timedelta(minutes=2), error="Stopped.")
    _run(
        world,
        agent,
        end_user=customer,
        status=RunStatus.ERROR,
        ago=timedelta(minutes=1),
        error="The model provider refused the API key (401).",
    )
    _run(
        world,
        agent,
        status=RunStatus.ERROR,
        ago=timedelta(seconds=30),
        error=f"No route to {LONG_URL}",
    )

    def flow(new_context) -> None:
        page = new_context().new_page()
        log_in(page, world.admin.email)
        expect(page).to_have_url(re.compile(r"/t/acme/$"))
        page.goto("/t/acme/runs/")
        rows = page.locator("#run-table tbody tr")
        expect(rows).to_have_count(4)
        user_filter = page.get_by_label("End user")

        # On a laptop the header row names the columns; the cells carry no labels of their own.
        expect(page.locator("#run-table thead")).to_be_visible()
        assert _labels(page) == [[""] * len(RUN_COLUMNS)] * 4
        _shot(page, "runs-1280")
        # A table wider than the card scrolls inside it; the page itself never does.
        assert not _scrolls_sideways(page), "the runs page scrolls sideways"
        # Short words stay whole (the newest run's URL is longer than any column: it may break).
        errors = page.locator("#run-table .runs-error")
        for i in range(1, 4):
            assert _broken_words(errors.nth(i)) == []
        assert _placeholder_fits(user_filter), "the End user placeholder is cut off"

        # On a phone each run is a card whose every value says what it is.
        page.set_viewport_size(PHONE)
        expect(page.locator("#run-table thead")).to_be_hidden()
        _shot(page, "runs-390")
        labels = _labels(page)
        assert labels == [RUN_COLUMNS] * 4
        assert not _scrolls_sideways(page), "the runs page scrolls sideways"
        for i in range(1, 4):
            assert _broken_words(errors.nth(i)) == []
        assert _placeholder_fits(user_filter), "the End user placeholder is cut off"

    run_in_browser(flow)


def test_a_runs_tokens_without_a_price_do_not_widen_the_runs_table_on_a_laptop(run_in_browser):
    # Two tenants with the same run, priced in one, partly without a price in the other.
    worlds = {}
    for name, unpriced in (("Acme", 0), ("Beta", 27_202)):
        world = make_world(name)
        _run(
            world,
            _agent(world, name="Customer support triage"),
            status=RunStatus.ERROR,
            total_tokens=48_211,
            cost=Decimal("0.002257"),
            unpriced_tokens=unpriced,
            error="The model provider refused the API key (401).",
        )
        worlds[name.lower()] = world

    def table_width(new_context, slug: str) -> int:
        page = new_context().new_page()  # 1280 px wide
        log_in(page, worlds[slug].admin.email)
        expect(page).to_have_url(re.compile(rf"/t/{slug}/$"))
        page.goto(f"/t/{slug}/runs/")
        expect(page.locator("#run-table tbody td[data-label=Cost]")).to_contain_text("$0.002257")
        _shot(page, f"runs-cost-{slug}-1280")
        return page.evaluate("() => document.querySelector('#run-table table').scrollWidth")

    def flow(new_context) -> tuple[int, int]:
        return table_width(new_context, "acme"), table_width(new_context, "beta")

    priced, unpriced = run_in_browser(flow)
    # The tokens without a price go under the amount, no wider than a short word more: on one
    # line with it, they pushed the Attempts and Error columns out of the card.
    assert unpriced <= priced + 32, (priced, unpriced)


def test_the_conversation_list_keeps_rename_and_delete_in_one_column(run_in_browser):
    world = make_world("Acme")
    _member_threads(
        world,
        [
            "Hi",
            "Weekly report",
            "Planning the quarterly review of every agent the support team runs in production",
            LONG_URL,
        ],
    )

    def flow(new_context) -> None:
        page = new_context().new_page()
        log_in(page, world.member.email)
        expect(page).to_have_url(re.compile(r"/t/acme/$"))
        for viewport in (LAPTOP, PHONE):
            page.set_viewport_size(viewport)
            page.goto("/t/acme/chat/")
            rows = page.locator(".chat-thread-row")
            expect(rows).to_have_count(4)
            _shot(page, f"chat-list-{viewport['width']}")
            for name in ("Rename", "Delete"):
                edges = {
                    (round(b["x"]), round(b["x"] + b["width"]))
                    for b in (
                        row.get_by_text(name, exact=True).bounding_box() for row in rows.all()
                    )
                }
                assert len(edges) == 1, (viewport, name, edges)
            # The titles use the room left of the actions, and stay out of their way.
            rename_x = rows.first.get_by_text("Rename", exact=True).bounding_box()["x"]
            for row in rows.all():
                title = row.locator("a").first.bounding_box()
                assert title["x"] + title["width"] <= rename_x, (viewport, title)
            assert not _scrolls_sideways(page), viewport

            # Opening Rename shows the title field on screen and moves no button.
            delete = rows.nth(1).get_by_text("Delete", exact=True)
            before = delete.bounding_box()
            rows.nth(1).get_by_text("Rename", exact=True).click()
            field = rows.nth(1).get_by_label("Title")
            expect(field).to_be_visible()
            _shot(page, f"chat-rename-{viewport['width']}")
            after = delete.bounding_box()  # y may differ: the click scrolls the row into view
            assert (after["x"], after["width"]) == (before["x"], before["width"]), viewport
            box = field.bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"], box
            assert not _scrolls_sideways(page), viewport

    run_in_browser(flow)


def _long_conversation(world, pairs: int = 30):
    """The owner's conversation with more messages than any screen holds."""
    agent = _published_agent(world)
    end_user = services.end_user_for_member(tenant=world.tenant, user=world.owner)
    thread = services.thread_create(tenant=world.tenant, end_user=end_user, agent_id=agent.pk)
    thread = services.thread_rename(
        tenant=world.tenant, end_user=end_user, thread_id=thread.pk, title="Quarterly numbers"
    )
    Item.objects.bulk_create(
        Item(tenant=world.tenant, thread=thread, data=d)
        for n in range(pairs)
        for d in [
            {"role": "user", "content": f"Question {n}: what was the revenue of month {n}?"},
            {
                "type": "message",
                "role": "assistant",
                "content": [
                    {
                        "type": "output_text",
                        "text": f"Answer {n}: the revenue of month {n} was {n * 1000} euros, "
                        "a little more than the month before.",
                    }
                ],
            },
        ]
    )
    return thread


def _box(locator) -> dict:
    """Where `locator` is in the window (not in the page): what a user sees without scrolling."""
    return locator.evaluate(
        "e => { const r = e.getBoundingClientRect();"
        " return {top: r.top, bottom: r.bottom, left: r.left, right: r.right,"
        " width: r.width, height: r.height}; }"
    )


def _on_screen(page: Page, locator) -> bool:
    box, view = _box(locator), page.viewport_size
    return (
        box["height"] > 0
        and box["top"] >= 0
        and box["left"] >= 0
        and box["bottom"] <= view["height"]
        and box["right"] <= view["width"]
    )


def _page_scrolls(page: Page) -> bool:
    """Whether the page itself scrolls (a second scrolling area besides the message list)."""
    return page.evaluate(
        "() => document.scrollingElement.scrollHeight > window.innerHeight"
        " || document.scrollingElement.scrollWidth > window.innerWidth"
    )


def _tab_through_sidebar(page: Page) -> list[tuple[str, dict]]:
    """Each control of the navigation as Tab reaches it from the brand: its text, and where it
    is in the window while it has the focus."""
    page.get_by_role("link", name="Control Plane").focus()
    reached = []
    for _ in range(40):
        focused = page.evaluate(
            """() => { const e = document.activeElement;
                 if (!e.closest('#sidebar')) return null;
                 const r = e.getBoundingClientRect();
                 return [e.textContent.replace(/[\\s▾]+/g, ' ').trim(),
                   {top: r.top, bottom: r.bottom, left: r.left, right: r.right}]; }"""
        )
        if focused is None:
            return reached
        reached.append((focused[0], focused[1]))
        page.keyboard.press("Tab")
    raise AssertionError(f"Tab never left the navigation: {reached}")


def _reply_running(page: Page) -> None:
    """What the page shows while a reply is being written: the strategy and Stop."""
    page.evaluate(
        "() => { document.getElementById('chat-strategy').hidden = false;"
        " document.getElementById('chat-stop').hidden = false; }"
    )


def _composer_fits(page: Page) -> None:
    """The message box keeps most of the composer's row, every control on screen."""
    composer = page.locator("#chat-composer")
    field, send = page.get_by_label("Message"), page.get_by_role("button", name="Send")
    stop, strategy = page.get_by_role("button", name="Stop"), page.locator("#chat-strategy")
    controls = [field, send] + ([stop, strategy] if stop.is_visible() else [])
    for control in controls:
        assert _on_screen(page, control), (control, _box(control))
    width = _box(field)["width"]
    assert width >= 0.6 * _box(composer)["width"], (width, _box(composer))
    for button in controls[1:3]:
        assert _box(button)["height"] >= 44, (button, _box(button))  # a finger's touch target
    if stop.is_visible():
        # The strategy has a line of its own: it never squeezes the message box.
        assert _box(strategy)["bottom"] <= _box(field)["top"], (_box(strategy), _box(field))


def _open_long_conversation(new_context, world, thread, viewport, shot: str):
    """The owner's page of `thread` at `viewport`, its newest answer drawn; and its list."""
    page = new_context().new_page()
    page.set_viewport_size(viewport)
    log_in(page, world.owner.email)
    expect(page).to_have_url(re.compile(r"/t/acme/$"))
    page.goto(f"/t/acme/chat/{thread.pk}/")
    log = page.locator("#chat-log")
    expect(log.locator(".msg-assistant").last).to_contain_text("Answer 29")
    _shot(page, shot)
    return page, log


def test_a_long_conversation_on_a_phone_keeps_the_composer_and_status_on_screen(run_in_browser):
    world = make_world("Acme")
    thread = _long_conversation(world)

    def flow(new_context) -> None:
        page, log = _open_long_conversation(new_context, world, thread, PHONE, "chat-long-390")

        # One scrolling area, the message list: the page itself fits the window.
        assert not _page_scrolls(page), "the conversation page scrolls"
        assert log.evaluate("e => e.scrollHeight > e.clientHeight"), "the list does not scroll"
        # The navigation is compact: the conversation starts in the top quarter of the screen.
        heading = _box(page.get_by_role("heading", level=1))
        assert heading["top"] < PHONE["height"] / 4, heading
        # The newest message is in view, above the composer, which is on screen.
        composer = _box(page.locator("#chat-composer"))
        newest = _box(log.locator(".msg-assistant").last)
        assert newest["bottom"] <= composer["top"] and newest["top"] >= heading["bottom"], newest
        _composer_fits(page)

        # A status ("Trying again…") shows between the list and the composer, on screen.
        page.evaluate(
            "() => { const s = document.getElementById('chat-status');"
            " s.className = 'chat-status chat-status-warn';"
            " s.textContent = 'The model provider is busy. Trying again\\u2026';"
            " s.hidden = false; }"
        )
        status = page.get_by_role("status")
        assert _on_screen(page, status), _box(status)
        assert _box(status)["bottom"] <= _box(page.locator("#chat-composer"))["top"]
        assert not _page_scrolls(page), "the page scrolls with a status"

        # While a reply runs, the strategy and Stop take a line of their own above the box.
        _reply_running(page)
        _shot(page, "chat-long-running-390")
        _composer_fits(page)
        assert _on_screen(page, status), _box(status)
        assert not _page_scrolls(page), "the page scrolls while a reply runs"

        # Every link of the top bar is reached with Tab, and is in view once it has the focus
        # (Chromium scrolls the row only to a link out of view: one cut by its edge stays so).
        reached = _tab_through_sidebar(page)
        assert [name for name, _box in reached] == [
            "Control Plane",
            "Tenant Acme",
            *NAV_LINKS,
            "Password",
            "API docs",
            "Log out",
        ]
        for name, box in reached:
            in_view = min(box["right"], PHONE["width"]) - max(box["left"], 0)
            assert in_view >= min(box["right"] - box["left"], 20), (name, box)
            assert box["top"] >= 0 and box["bottom"] <= PHONE["height"], (name, box)

    run_in_browser(flow)


def test_a_long_conversation_fills_a_laptop_screen(run_in_browser):
    world = make_world("Acme")
    thread = _long_conversation(world)

    def flow(new_context) -> None:
        page, _log = _open_long_conversation(new_context, world, thread, LAPTOP, "chat-long-1280")

        assert not _page_scrolls(page), "the conversation page scrolls"
        # The list takes the height the window has: the composer sits at its bottom.
        composer = _box(page.locator("#chat-composer"))
        assert LAPTOP["height"] - 48 <= composer["bottom"] <= LAPTOP["height"], composer
        # Every link of the sidebar is on screen.
        sidebar = page.locator("#sidebar")
        links = [*sidebar.get_by_role("link").all(), sidebar.get_by_role("button", name="Log out")]
        assert len(links) == len(NAV_LINKS) + 4  # the brand, Password, API docs, Log out
        for link in links:
            assert _on_screen(page, link), (link, _box(link))
        _composer_fits(page)

        _reply_running(page)
        _shot(page, "chat-long-running-1280")
        _composer_fits(page)
        assert not _page_scrolls(page), "the page scrolls while a reply runs"

    run_in_browser(flow)


def test_the_first_tab_offers_to_skip_the_navigation(run_in_browser):
    world = make_world("Acme")

    def flow(new_context) -> None:
        page = new_context().new_page()
        log_in(page, world.owner.email)
        page.goto("/t/acme/runs/")
        page.keyboard.press("Tab")
        skip = page.get_by_role("link", name="Skip to content")
        expect(skip).to_be_focused()
        assert skip.bounding_box()["y"] >= 0  # seen when focused
        page.keyboard.press("Enter")
        page.keyboard.press("Tab")
        # The next stop is in the page, not the first link of the navigation.
        assert page.evaluate("() => !!document.activeElement.closest('#main')")

    run_in_browser(flow)

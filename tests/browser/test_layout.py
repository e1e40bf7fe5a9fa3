"""The pages on a phone (390 px) and a laptop (1280 px): long words wrap instead of widening the
page, the runs table labels its cells once its headers are hidden, words break only between each
other, and the conversation list keeps its row actions in one column."""

from __future__ import annotations

import os
import re
from datetime import timedelta
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

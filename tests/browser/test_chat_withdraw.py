""" "Don't send" in a real browser: a message waiting in line behind the reply being written is
taken back with the keyboard. It leaves the page, in every tab open on the conversation; its
text comes back to the message box when the box is empty, and the box is left alone otherwise.
The agent never gets it and the history never shows it."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from conversations import services
from conversations.models import Item, Run, RunStatus
from tests.browser.test_chat import (  # noqa: F401 (fixtures)
    LONG,
    _member_thread,
    asgi_site,
    chat_socket,
    off_the_loop,
    site,
    unstarted,
)
from tests.browser.test_dashboard import log_in
from tests.conftest import make_world

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

FIRST, SECOND = "And what is 2 + 3?", "And 4 + 5?"
DONT_SEND = "Don't send this message"


def _open(new_context, world, thread) -> Page:
    page = new_context().new_page()
    log_in(page, world.member.email)
    expect(page).to_have_url(re.compile(r"/t/acme/$"))
    with page.expect_websocket(chat_socket) as opened:
        page.goto(f"/t/acme/chat/{thread.pk}/")
    opened.value.wait_for_event("framereceived")  # the server's hello: the socket is up
    return page


def _queue(page: Page, text: str) -> None:
    page.get_by_label("While a reply is being written").select_option(label="Send after this reply")
    page.get_by_label("Message").fill(text)
    page.get_by_role("button", name="Send", exact=True).click()
    expect(page.locator(".msg-waiting", has_text=text)).to_contain_text("Queued", timeout=LONG)


@pytest.mark.usefixtures("unstarted")
def test_dont_send_takes_a_waiting_message_back_in_every_tab(run_in_browser):
    world = make_world("Acme")
    thread = _member_thread(world)

    def reply_being_written():  # no worker takes it: it stays the reply being written
        return services.run_create(
            tenant=world.tenant, end_user=thread.end_user, thread_id=thread.pk, input="go"
        )

    active = off_the_loop(reply_being_written)

    def flow(new_context) -> None:
        page = _open(new_context, world, thread)
        box = page.get_by_label("Message")
        _queue(page, FIRST)
        _queue(page, SECOND)
        other = _open(new_context, world, thread)  # shows both waiting, from the server
        for tab in (page, other):
            expect(tab.get_by_role("button", name=DONT_SEND)).to_have_count(2)

        # With the keyboard, the box empty: the first goes, in both tabs, and is back in the box.
        # The other tab, its keyboard on that same button, says so and keeps its keyboard.
        other.locator(".msg-user", has_text=FIRST).get_by_role("button", name=DONT_SEND).focus()
        first = page.locator(".msg-user", has_text=FIRST).get_by_role("button", name=DONT_SEND)
        first.focus()
        page.keyboard.press("Enter")
        for tab in (page, other):
            expect(tab.locator(".msg-user", has_text=FIRST)).to_have_count(0, timeout=LONG)
        expect(box).to_have_value(FIRST)
        expect(box).to_be_focused()
        expect(page.get_by_role("status")).to_have_text(re.compile("Not sent"))
        expect(other.get_by_role("status")).to_have_text(re.compile("taken back in another tab"))
        expect(other.get_by_label("Message")).to_be_focused()
        expect(other.get_by_label("Message")).to_have_value("")  # the text goes to the asker's

        # The box has text now: the second goes too, and the box is left as it is.
        page.locator(".msg-user", has_text=SECOND).get_by_role("button", name=DONT_SEND).click()
        for tab in (page, other):
            expect(tab.locator(".msg-user", has_text=SECOND)).to_have_count(0, timeout=LONG)
            expect(tab.get_by_role("button", name=DONT_SEND)).to_have_count(0)
        expect(box).to_have_value(FIRST)
        expect(page.locator(".msg-user .bubble")).to_have_text(["go"])

        # The reply goes on, and once it is stopped, nothing follows it.
        page.get_by_role("button", name="Stop").click()
        expect(page.get_by_role("button", name="Stop")).to_be_hidden(timeout=LONG)
        for tab in (page, other):
            tab.reload()
            expect(tab.locator(".msg-user .bubble")).to_have_text(["go"])
            expect(tab.locator(".chat-run-stopped")).to_have_text(["Stopped."])

    run_in_browser(flow)

    runs = list(Run.objects.for_tenant(world.tenant).order_by("created_at"))
    assert [(r.pk == active.pk, r.status, r.withdrawn) for r in runs] == [
        (True, RunStatus.CANCELLED, False),
        (False, RunStatus.CANCELLED, True),
        (False, RunStatus.CANCELLED, True),
    ]
    questions = [
        i.data.get("content")
        for i in Item.objects.for_tenant(world.tenant).filter(thread=thread)
        if i.data.get("role") == "user"
    ]
    assert questions == ["go"]

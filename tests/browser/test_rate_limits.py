"""The chat in a real browser when a member reaches the rate limit: the message they typed stays
in the composer, the page says in plain words when they can send it, and nothing is sent."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from conversations.models import Item, Run
from tenants import services as tenant_services
from tests.browser.test_chat import (  # noqa: F401 (fixtures)
    LONG,
    QUESTION,
    REPLY,
    _published_agent,
    asgi_site,
    chat_socket,
    site,
)
from tests.browser.test_dashboard import log_in
from tests.conftest import make_world

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.mark.usefixtures("asgi_site")
def test_a_refused_message_stays_in_the_composer_with_when_to_send_it(settings, run_in_browser):
    settings.OFFLINE_MODEL_WORD_DELAY = 0
    world = make_world("Acme")
    agent = _published_agent(world)
    tenant_services.tenant_limits_update(
        tenant=world.tenant, actor=world.actor(), end_user_runs_per_minute=1
    )
    from conversations import services

    end_user = services.end_user_for_member(tenant=world.tenant, user=world.member)
    thread = services.thread_create(tenant=world.tenant, end_user=end_user, agent_id=agent.pk)
    second = "And what is 13 * 13?"

    def flow(new_context) -> None:
        page = new_context().new_page()
        log_in(page, world.member.email)
        expect(page).to_have_url(re.compile(r"/t/acme/$"))
        with page.expect_websocket(chat_socket) as opened:
            page.goto(f"/t/acme/chat/{thread.pk}/")
        opened.value.wait_for_event("framereceived")
        page.get_by_label("Message").fill(QUESTION)
        page.get_by_role("button", name="Send").click()
        expect(page.locator(".msg-assistant[data-item-id]")).to_have_text(REPLY, timeout=LONG)

        page.get_by_label("Message").fill(second)
        page.get_by_role("button", name="Send").click()
        status = page.locator("#chat-status")
        expect(status).to_contain_text("you can send 1 message per minute", timeout=LONG)
        expect(status).to_have_text(
            re.compile(r"You can send it again in \d+ seconds\.$"), timeout=LONG
        )
        # Said once to a screen reader: the countdown's later seconds are not announced.
        expect(status).to_have_attribute("aria-live", "off", timeout=LONG)
        expect(page.get_by_label("Message")).to_have_value(second)
        expect(page.get_by_role("button", name="Send")).to_be_disabled()
        expect(page.locator(".msg-user")).to_have_count(1)  # the refused bubble is taken back
        # Enter does not send it either while the limit lasts.
        page.get_by_label("Message").press("Enter")
        expect(page.get_by_label("Message")).to_have_value(second)

    run_in_browser(flow)

    assert Run.objects.for_tenant(world.tenant).count() == 1
    assert not Item.objects.for_tenant(world.tenant).filter(data__content=second).exists()

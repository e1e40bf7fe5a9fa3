"""The run inspector in a real browser: an admin filters the runs without a page reload, opens a
failed run's timeline and a tool call's arguments, and stops an active run. The strict CSP must
not block anything on these pages."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from playwright.sync_api import expect

from conversations.models import RunStatus
from tests.browser.test_dashboard import log_in, nav
from tests.conftest import make_world
from tests.conversations.test_inspector import _agent, _run

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_admin_filters_runs_opens_a_timeline_and_stops_a_run(run_in_browser):
    world = make_world("Acme")
    agent = _agent(world)
    ok = _run(world, agent, ago=timedelta(minutes=3))
    failed = _run(
        world,
        agent,
        status=RunStatus.ERROR,
        ago=timedelta(minutes=2),
        error="The model provider refused the API key (401).",
        trace=[
            {"kind": "model_call", "at_ms": 300.0, "duration_ms": 280.0, "model": "gpt-test"},
            {
                "kind": "tool_call",
                "at_ms": 520.0,
                "duration_ms": 200.0,
                "tool": "calculator",
                "arguments": '{"expression": "6 * 7"}',
                "output": "42",
            },
            {"kind": "retry", "at_ms": 600.0, "reason": "rate limited", "attempt": 2},
            {"kind": "end", "at_ms": 610.0, "status": "error", "message": "refused"},
        ],
    )
    active = _run(world, agent, status=RunStatus.RUNNING, ago=timedelta(seconds=30))
    slug = world.tenant.slug

    def flow(new_context) -> None:
        page = new_context().new_page()
        blocked: list[str] = []
        page.on(
            "console",
            lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None,
        )
        log_in(page, world.admin.email)
        nav(page).get_by_role("link", name="Runs").click()
        expect(page).to_have_url(re.compile(rf"/t/{slug}/runs/$"))
        rows = page.locator("#run-table tbody tr")
        expect(rows).to_have_count(3)

        # Filtering swaps the table in place and puts the filter in the address bar.
        page.evaluate("window.notReloaded = true")
        page.get_by_label("Status").select_option(label="Error")
        expect(page).to_have_url(re.compile(r"status=error"))
        expect(rows).to_have_count(1)
        expect(rows.first).to_contain_text("The model provider refused the API key")
        assert page.evaluate("window.notReloaded") is True

        # The failed run: the error in plain words, and a timeline whose steps open up.
        rows.first.get_by_role("link").first.click()
        expect(page).to_have_url(re.compile(rf"/runs/{failed.pk}/$"))
        expect(page.get_by_role("alert")).to_contain_text("refused the API key (401)")
        steps = page.locator(".waterfall > li[data-kind]")
        expect(steps).to_have_count(4)
        tool = steps.filter(has_text="Tool · calculator")
        expect(tool.get_by_text('"expression": "6 * 7"')).to_be_hidden()
        tool.locator("summary").click()
        expect(tool.get_by_text('"expression": "6 * 7"')).to_be_visible()
        expect(steps.filter(has_text="Retry")).to_contain_text("rate limited")

        # An active run can be stopped; the page shows the outcome without a reload.
        page.goto(f"/t/{slug}/runs/{active.pk}/")
        expect(page.locator(".run-summary .run-status")).to_have_text("Running")
        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_role("button", name="Stop run").click()
        expect(page.get_by_text("The run is stopped.")).to_be_visible()
        expect(page.locator(".run-summary .run-status")).to_have_text("Cancelled")
        expect(page.get_by_role("button", name="Stop run")).to_have_count(0)
        assert blocked == [], blocked

    run_in_browser(flow)
    active.refresh_from_db()
    assert active.status == RunStatus.CANCELLED
    ok.refresh_from_db()
    assert ok.status == RunStatus.SUCCESS

"""The pages laid out in two columns (`.grid-2`: the agent editor, a provider, an MCP server, the
members, the agents page before the first agent, a run and a playground run) at every width from
a small phone to a wide screen: the page never scrolls sideways and nothing sticks out of a card.

As in tests/usage/test_usage_layout.py, each page is rendered by Django's test client and handed
to the browser through request routing (its static files read from the static folders).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from django.urls import reverse
from playwright.sync_api import Browser

from ai_agents import services as agent_services
from conversations.models import RunStatus
from tenants import services as tenant_services
from tenants.models import Membership, Role, User
from tests.browser.conftest import ARTIFACTS, in_chromium
from tests.conftest import PASSWORD, make_world
from tests.conversations.test_inspector import _agent, _run
from tests.usage.test_usage_layout import ORIGIN, SIDEWAYS_WIDTHS, _serve

pytestmark = [pytest.mark.browser, pytest.mark.django_db]

# Names as people and providers write them: one long word at times.
LONG_EMAIL = "margaret.hamilton-oconnell@engineering.example-university.edu"
LONG_MODEL = "ft:gpt-4o-mini-2024-07-18:acme-corp:support-triage:9xYzAbCd"
LONG_URL = "https://generativelanguage.googleapis.com/v1beta/openai/"
REPLY = (
    "Here is the summary you asked for, with the source: "
    "https://docs.example.test/" + "/".join(["a-rather-long-path-segment"] * 4) + "\n\n"
    "| Plan | Price | Includes |\n| --- | --: | --- |\n"
    "| Starter | $9 | One workspace, five agents and the community forum |\n"
    "| Business | $49 | Unlimited workspaces, SSO and an audit log |\n\n"
    "```\n"
    + "SELECT id, name, created_at FROM agents WHERE tenant_id = 42 ORDER BY 1;" * 2
    + "\n```\n"
)

# Whether the page scrolls sideways (and the outermost elements of the page past the window,
# which widen it); each card of the page's .grid-2 that is wider than its grid or the window, or
# whose content reaches past its padding (what a box that scrolls sideways inside it, such as a
# reply's wide table, clips is on screen by scrolling it, and does not count); and whether each
# grid shows its columns side by side.
MEASURE = """() => {
  const grids = [...document.querySelectorAll(".grid-2")];
  const name = (el) => el.tagName.toLowerCase() + [...el.classList].map((c) => "." + c).join("");
  const scrolled = (el, within) => {
    for (let up = el.parentElement; up && up !== within; up = up.parentElement)
      if (getComputedStyle(up).overflowX !== "visible") return true;
    return false;
  };
  const past = (within, right) => {
    const found = [...within.querySelectorAll("*")].filter(
      (el) => el.getBoundingClientRect().right > right + 0.5 && !scrolled(el, within)
    );
    return found.filter((el) => !found.includes(el.parentElement)).map(name).slice(0, 3);
  };
  const cut = [];
  for (const grid of grids) {
    const g = grid.getBoundingClientRect();
    for (const card of grid.querySelectorAll(".card")) {
      const c = card.getBoundingClientRect();
      const label = (card.querySelector("h2") || card).textContent.trim().slice(0, 30);
      if (c.right > Math.min(g.right, innerWidth) + 0.5 || c.left < Math.max(g.left, 0) - 0.5)
        cut.push(`${label}: wider than its grid or the window`);
      const content = past(card, c.right - parseFloat(getComputedStyle(card).paddingRight));
      if (content.length) cut.push(`${label}: past the card's padding: ${content}`);
    }
  }
  const tops = (grid) => [...grid.children].map((c) => Math.round(c.getBoundingClientRect().top));
  return {
    grids: grids.length,
    overflow: document.documentElement.scrollWidth - innerWidth,
    widest: past(document.querySelector("main"), innerWidth),
    cut,
    side_by_side: grids.every((grid) => new Set(tops(grid)).size === 1),
  };
}"""


def _pages(world) -> dict[str, str]:
    """Each page that uses .grid-2, as its owner sees it, by name."""
    tenant, actor = world.tenant, world.actor()
    slug = tenant.slug
    owner = world.client_for(world.owner)

    def get(url: str) -> str:
        response = owner.get(url)
        assert response.status_code == 200, (url, response.status_code)
        return response.content.decode()

    pages = {"agents": get(reverse("agent-list", args=[slug]))}  # before the first agent
    user = User.objects.create_user(LONG_EMAIL, PASSWORD, name="Margaret Hamilton-O'Connell")
    Membership.objects.create(tenant=tenant, user=user, role=Role.ADMIN)
    tenant_services.invitation_create(
        tenant=tenant, actor=actor, email="j.doe-" + LONG_EMAIL, role=Role.MEMBER
    )
    provider = agent_services.provider_create(
        tenant=tenant, actor=actor, name="Gemini (OpenAI-compatible endpoint)",
        base_url=LONG_URL, default_model=LONG_MODEL, api_key="sk-test-1234",
    )  # fmt: skip
    server = agent_services.mcp_server_create(
        tenant=tenant, actor=actor, name="Knowledge base search",
        url="https://mcp.knowledge-base.example-corporation.test/streamable-http/endpoint",
    )  # fmt: skip
    agent = _agent(world, name="Customer support triage")
    question = "Summarise " + LONG_URL * 2
    run = _run(
        world, agent, status=RunStatus.SUCCESS, output=REPLY,
        input=[{"role": "user", "content": question}],
    )  # fmt: skip
    played = agent_services.playground_run(
        tenant=tenant, actor=actor, agent_id=agent.pk, input=question
    )
    return pages | {
        "members": get(reverse("member-list", args=[slug])),
        "provider": get(reverse("provider-detail", args=[slug, provider.pk])),
        "mcp server": get(reverse("mcp-server-detail", args=[slug, server.pk])),
        "agent editor": get(reverse("agent-detail", args=[slug, agent.pk])),
        "run": get(reverse("run-detail", args=[slug, run.pk])),
        "playground run": get(reverse("playground-run-detail", args=[slug, played.pk])),
    }


def test_every_two_column_page_fits_the_window_at_every_width(settings):
    settings.OFFLINE_MODEL_WORD_DELAY = 0
    world = make_world("Acme")
    pages = _pages(world)

    def measure(browser: Browser) -> dict[str, dict[int, dict[str, Any]]]:
        out: dict[str, dict[int, dict[str, Any]]] = {}
        for name, html in pages.items():
            out[name] = {}
            for width in SIDEWAYS_WIDTHS:
                page = browser.new_page(viewport={"width": width, "height": 900})
                page.route("**/*", _serve(html))
                page.goto(f"{ORIGIN}/page/", wait_until="load")
                out[name][width] = page.evaluate(MEASURE)
                if os.environ.get("BROWSER_SCREENSHOTS") == "all":
                    ARTIFACTS.mkdir(exist_ok=True)
                    shot = ARTIFACTS / f"grid-{name.replace(' ', '-')}-{width}.png"
                    page.screenshot(path=shot, full_page=True)
                page.close()
        return out

    seen = in_chromium(measure, "grid-pages")
    assert all(s["grids"] for by_width in seen.values() for s in by_width.values()), seen
    scrolls = {
        (name, width): (s["overflow"], s["widest"])
        for name, by_width in seen.items()
        for width, s in by_width.items()
        if s["overflow"] > 0
    }
    assert scrolls == {}, "the page scrolls sideways by (px, because of)"
    cut = {
        (name, width): s["cut"]
        for name, by_width in seen.items()
        for width, s in by_width.items()
        if s["cut"]
    }
    assert cut == {}, "content sticking out of its card"
    # Not one column everywhere: a wide screen has room for both.
    stacked = [name for name, by_width in seen.items() if not by_width[1600]["side_by_side"]]
    assert stacked == [], "one column on a wide screen"

"""The dashboard pages of agents, versions, the playground, model providers and MCP servers.

Pages are driven like a browser would: the editor's form is read from the page, changed and posted
back, and what the selectors return afterwards is what counts. Another tenant's 404s are proved
for every route in tests/architecture/test_routes.py. The fake LLM, the loopback MCP server and the
egress allowance for loopback come from tests/ai_agents/conftest.py.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from django.test import Client

from ai_agents import selectors, services
from ai_agents.models import Agent, McpServer, ModelProvider
from tests.conftest import World

SECRET = "sk-test-SECRET-123456"
HEADER_SECRET = "mcp-SECRET-header-value-987"


@pytest.fixture(autouse=True)
def _instant_offline_model(settings):
    # The brief's OFFLINE_MODEL_TOKEN_DELAY is now called OFFLINE_MODEL_WORD_DELAY.
    settings.OFFLINE_MODEL_WORD_DELAY = 0


@pytest.fixture
def owner(world_a: World) -> Client:
    return world_a.client_for(world_a.owner)


def _agent(world: World, name: str = "Support", **config: Any) -> Agent:
    return services.agent_create(tenant=world.tenant, actor=world.actor(), name=name, config=config)


def _publish(world: World, agent: Agent, note: str = ""):
    return services.agent_publish(
        tenant=world.tenant, actor=world.actor(), agent_id=agent.pk, note=note
    )


def _draft(world: World, agent: Agent, **config: Any):
    return services.draft_save(
        tenant=world.tenant, actor=world.actor(), agent_id=agent.pk, config=config
    )


def _provider(world: World, name: str = "OpenAI", key: str = SECRET, **kw: Any) -> ModelProvider:
    return services.provider_create(
        tenant=world.tenant,
        actor=world.actor(),
        name=name,
        base_url=kw.pop("base_url", "https://api.example.com/v1"),
        default_model=kw.pop("default_model", "gpt-test"),
        api_key=key,
        **kw,
    )


def _server(world: World, name: str = "Tools", **kw: Any) -> McpServer:
    return services.mcp_server_create(
        tenant=world.tenant,
        actor=world.actor(),
        name=name,
        url=kw.pop("url", "https://mcp.example.com/mcp"),
        **kw,
    )


def _working(world: World, agent: Agent) -> dict[str, Any]:
    version = selectors.working_version(tenant=world.tenant, agent=agent)
    assert version is not None
    return version.config


def _editor_data(response) -> dict[str, Any]:
    """What the browser would post back from the editor page, unchanged."""
    editor = response.context["editor"]
    data: dict[str, Any] = {}

    def put(form) -> None:
        for bound in form:
            value = bound.value()
            if value is None or value is False or value == []:
                continue
            data[bound.html_name] = "on" if value is True else value

    put(editor.form)
    for formset in editor.guardrails.values():
        put(formset.management_form)
        for row in formset.forms:
            put(row)
    return data


def _errors(response) -> dict[str, list[str]]:
    return dict(response.context["editor"].form.errors)


# --- Access -----------------------------------------------------------------------------------


def _everything(world: World) -> dict[str, Any]:
    provider = _provider(world)
    server = _server(world)
    agent = _agent(world, instructions="v1")
    v1 = _publish(world, agent)
    _draft(world, agent, instructions="draft")
    return {"agent": agent, "version": v1, "provider": provider, "server": server}


def _pages(world: World, o: dict[str, Any]) -> list[str]:
    a, p, s = o["agent"].pk, o["provider"].pk, o["server"].pk
    return [
        "/t/acme/agents/",
        f"/t/acme/agents/{a}/",
        f"/t/acme/agents/{a}/versions/",
        f"/t/acme/agents/{a}/compare/",
        f"/t/acme/agents/{a}/compare/?a={o['version'].pk}&b={o['version'].pk}",
        "/t/acme/providers/",
        f"/t/acme/providers/{p}/",
        "/t/acme/mcp-servers/",
        f"/t/acme/mcp-servers/{s}/",
    ]


def _actions(o: dict[str, Any]) -> list[str]:
    a, v, p, s = o["agent"].pk, o["version"].pk, o["provider"].pk, o["server"].pk
    return [
        "/t/acme/agents/create/",
        f"/t/acme/agents/{a}/",
        f"/t/acme/agents/{a}/details/",
        f"/t/acme/agents/{a}/publish/",
        f"/t/acme/agents/{a}/delete/",
        f"/t/acme/agents/{a}/playground/",
        f"/t/acme/agents/{a}/versions/{v}/restore/",
        "/t/acme/providers/create/",
        f"/t/acme/providers/{p}/",
        f"/t/acme/providers/{p}/delete/",
        f"/t/acme/providers/{p}/test/",
        "/t/acme/mcp-servers/create/",
        f"/t/acme/mcp-servers/{s}/",
        f"/t/acme/mcp-servers/{s}/delete/",
        f"/t/acme/mcp-servers/{s}/tools/",
    ]


def test_every_page_renders_for_owners_and_admins(world_a):
    objects = _everything(world_a)
    for user in (world_a.owner, world_a.admin):
        client = world_a.client_for(user)
        for url in _pages(world_a, objects):
            response = client.get(url)
            assert response.status_code == 200, url
            assert b"Model providers" in response.content  # the navigation


def test_members_are_refused_every_page_and_action(world_a):
    objects = _everything(world_a)
    member = world_a.client_for(world_a.member)
    for url in _pages(world_a, objects):
        assert member.get(url).status_code == 403, url
    for url in _actions(objects):
        response = member.post(url, {"name": "x", "message": "hi", "instructions": "pwned"})
        assert response.status_code == 403, url
    assert _working(world_a, objects["agent"])["instructions"] == "draft"
    assert selectors.agent_get(tenant=world_a.tenant, agent_id=objects["agent"].pk)
    # and the navigation does not offer them the pages
    overview = member.get("/t/acme/").content.decode()
    assert "/t/acme/agents/" not in overview and "/t/acme/providers/" not in overview


# --- Agents list and creation -----------------------------------------------------------------


def test_an_empty_agent_list_says_what_to_do(owner):
    page = owner.get("/t/acme/agents/").content.decode()
    assert "Create your first agent" in page
    assert 'action="/t/acme/agents/create/"' in page


def test_the_list_shows_status_and_live_version(world_a, owner):
    live = _agent(world_a, "Billing")
    _publish(world_a, live)
    _draft(world_a, live, instructions="2")
    _publish(world_a, live)
    _agent(world_a, "Researcher")
    page = owner.get("/t/acme/agents/").content.decode()
    assert "Billing" in page and "billing" in page and "v2" in page and "Active" in page
    assert "Researcher" in page and "Draft" in page and "not published" in page


def test_creating_an_agent_opens_its_editor(world_a, owner):
    response = owner.post(
        "/t/acme/agents/create/", {"name": "Support bot", "description": "Helps customers"}
    )
    agent = selectors.agent_get_by_slug(tenant=world_a.tenant, slug="support-bot")
    assert response.status_code == 302
    assert response["Location"] == f"/t/acme/agents/{agent.pk}/"
    assert agent.description == "Helps customers"
    page = owner.get(response["Location"]).content.decode()
    assert "Not published yet" in page and "Publish v1" in page


def test_a_nameless_agent_is_refused_next_to_the_name(world_a, owner):
    response = owner.post("/t/acme/agents/create/", {"name": "  ", "description": "x"})
    assert response.status_code == 422
    assert "name" in response.context["form"].errors
    assert not selectors.agent_list(tenant=world_a.tenant).exists()


# --- Editor -----------------------------------------------------------------------------------


def test_the_editor_saves_the_whole_configuration(world_a, owner):
    provider = _provider(world_a)
    server = _server(world_a)
    billing = _agent(world_a, "Billing")
    agent = _agent(world_a, "Support")
    _draft(world_a, agent, memory={"enabled": True})  # a setting the editor does not show
    page = owner.get(f"/t/acme/agents/{agent.pk}/")
    assert page.status_code == 200
    data = _editor_data(page)
    data.update(
        {
            "instructions": "You help Acme's customers.\nBe brief.",
            "provider": str(provider.pk),
            "model": "gpt-test-large",
            "temperature": "0.3",
            "top_p": "0.9",
            "max_output_tokens": "800",
            "max_turns": "6",
            "tools": ["calculator", "http_get"],
            "tool__http_get__allowed_domains": "acme.com, docs.acme.com",
            "tool__http_get__timeout_seconds": "5",
            "mcp_servers": [str(server.pk)],
            "mcp_required": [str(server.pk)],
            "handoffs": [str(billing.pk)],
            "input_guardrails-0-kind": "blocked_words",
            "input_guardrails-0-value": "password, secret",
            "input_guardrails-0-message": "I can't help with that.",
            "output_guardrails-0-kind": "max_length",
            "output_guardrails-0-value": "2000",
            "output_schema": '{"type": "object", "properties": {"answer": {"type": "string"}}}',
        }
    )
    response = owner.post(f"/t/acme/agents/{agent.pk}/", data)
    assert response.status_code == 302, _errors(response)
    config = _working(world_a, agent)
    assert config["instructions"] == "You help Acme's customers.\nBe brief."
    assert config["provider_id"] == str(provider.pk) and config["model"] == "gpt-test-large"
    assert config["model_settings"] == {
        "temperature": 0.3,
        "top_p": 0.9,
        "max_output_tokens": 800,
    }
    assert config["max_turns"] == 6
    tools = {t["name"]: t["settings"] for t in config["tools"]}
    assert set(tools) == {"calculator", "http_get"}
    assert tools["http_get"]["allowed_domains"] == ["acme.com", "docs.acme.com"]
    assert tools["http_get"]["timeout_seconds"] == 5.0
    assert config["mcp_servers"] == [{"server_id": str(server.pk), "required": True}]
    assert config["handoffs"] == [str(billing.pk)]
    assert config["input_guardrails"][0]["words"] == ["password", "secret"]
    assert config["input_guardrails"][0]["message"] == "I can't help with that."
    assert config["output_guardrails"][0]["max_chars"] == 2000
    assert config["output_schema"]["properties"] == {"answer": {"type": "string"}}
    assert config["memory"]["enabled"] is True  # kept

    # Read back, the page shows the same values; posting it unchanged changes nothing.
    again = owner.get(f"/t/acme/agents/{agent.pk}/")
    assert owner.post(f"/t/acme/agents/{agent.pk}/", _editor_data(again)).status_code == 302
    assert _working(world_a, agent) == config

    # A guardrail row whose kind is set to "none" is removed.
    data = _editor_data(owner.get(f"/t/acme/agents/{agent.pk}/"))
    data["input_guardrails-0-kind"] = ""
    assert owner.post(f"/t/acme/agents/{agent.pk}/", data).status_code == 302
    assert _working(world_a, agent)["input_guardrails"] == []


def test_an_agent_cannot_be_its_own_handoff_target(world_a, owner):
    agent = _agent(world_a)
    page = owner.get(f"/t/acme/agents/{agent.pk}/")
    choices = dict(page.context["editor"].form.fields["handoffs"].choices)
    assert str(agent.pk) not in choices
    data = {**_editor_data(page), "handoffs": [str(agent.pk)]}
    response = owner.post(f"/t/acme/agents/{agent.pk}/", data)
    assert response.status_code == 422 and "handoffs" in _errors(response)


def test_the_services_errors_stand_next_to_their_fields(world_a, owner):
    agent = _agent(world_a, instructions="before")
    data = _editor_data(owner.get(f"/t/acme/agents/{agent.pk}/"))
    data.update(
        {
            "instructions": "after",
            "temperature": "5",
            "output_schema": '{"type": "array"}',
            "input_guardrails-0-kind": "pattern",
            "input_guardrails-0-value": "(unclosed",
            "output_guardrails-0-kind": "classifier",
            "output_guardrails-0-value": "",
        }
    )
    response = owner.post(f"/t/acme/agents/{agent.pk}/", data)
    assert response.status_code == 422
    errors = _errors(response)
    assert "less than or equal to 2" in errors["temperature"][0]
    assert '"type": "object"' in errors["output_schema"][0]
    editor = response.context["editor"]
    assert "not a valid regular expression" in editor.input_guardrails.forms[0].errors["value"][0]
    assert "yes/no question" in editor.output_guardrails.forms[0].errors["value"][0]
    page = response.content.decode()
    assert 'id="id_temperature-error"' in page  # rendered right under the field
    assert 'id="id_input_guardrails-0-value-error"' in page
    assert "The draft was not saved" in page
    assert "(unclosed" in page  # what was typed is kept for fixing
    assert _working(world_a, agent)["instructions"] == "before"


def test_the_forms_own_parsing_errors_stand_next_to_their_fields(world_a, owner):
    agent = _agent(world_a)
    data = _editor_data(owner.get(f"/t/acme/agents/{agent.pk}/"))
    data.update(
        {
            "tools": ["http_get"],
            "tool__http_get__max_bytes": "5",
            "output_schema": "{not json",
            "max_turns": "many",
            "input_guardrails-0-kind": "max_length",
            "input_guardrails-0-value": "long",
        }
    )
    response = owner.post(f"/t/acme/agents/{agent.pk}/", data)
    assert response.status_code == 422
    errors = _errors(response)
    assert "greater than or equal to 1000" in errors["tool__http_get__max_bytes"][0]
    assert "not valid JSON" in errors["output_schema"][0]
    assert "max_turns" in errors
    row = response.context["editor"].input_guardrails.forms[0]
    assert "whole number" in row.errors["value"][0]
    # A schema the runtime could not compile is refused (by AgentConfig), next to the field.
    data.update(
        {
            "tools": [],
            "max_turns": "10",
            "input_guardrails-0-kind": "",
            "output_schema": '{"type": "object", "properties": {"a": {"type": "nope"}}}',
        }
    )
    response = owner.post(f"/t/acme/agents/{agent.pk}/", data)
    assert response.status_code == 422
    assert "not a valid JSON schema" in _errors(response)["output_schema"][0]


def test_name_and_description_change_without_a_new_version(world_a, owner):
    agent = _agent(world_a, "Support")
    _publish(world_a, agent)
    response = owner.post(
        f"/t/acme/agents/{agent.pk}/details/", {"name": "Helpdesk", "description": "New"}
    )
    assert response.status_code == 302
    agent = selectors.agent_get(tenant=world_a.tenant, agent_id=agent.pk)
    assert (agent.name, agent.description) == ("Helpdesk", "New")
    assert selectors.draft_get(tenant=world_a.tenant, agent=agent) is None
    response = owner.post(f"/t/acme/agents/{agent.pk}/details/", {"name": ""})
    assert response.status_code == 422 and "name" in response.context["details"].errors


# --- Publishing and versions ------------------------------------------------------------------


def test_publishing_and_whether_the_draft_differs(world_a, owner):
    agent = _agent(world_a, instructions="one")
    url = f"/t/acme/agents/{agent.pk}/"
    response = owner.post(f"{url}publish/", {"note": "First release"})
    assert response.status_code == 302
    live = selectors.agent_get(tenant=world_a.tenant, agent_id=agent.pk).published_version
    assert (live.number, live.note, live.config["instructions"]) == (1, "First release", "one")
    page = owner.get(url).content.decode()
    assert "v1 is live" in page and "No unpublished changes" in page

    data = {**_editor_data(owner.get(url)), "instructions": "two", "temperature": "0.5"}
    assert owner.post(url, data).status_code == 302
    page = owner.get(url).content.decode()
    assert "Unpublished changes" in page and "in 2 fields" in page
    assert ">instructions<" in page and ">model_settings.temperature<" in page
    assert "Publish as v2" in page

    owner.post(f"{url}publish/", {"note": ""})
    agent = selectors.agent_get(tenant=world_a.tenant, agent_id=agent.pk)
    assert agent.published_version.number == 2
    assert agent.published_version.config["instructions"] == "two"


def test_publishing_without_a_draft_says_why(world_a, owner):
    agent = _agent(world_a)
    _publish(world_a, agent)
    response = owner.post(f"/t/acme/agents/{agent.pk}/publish/", {}, follow=True)
    assert "There is no draft to publish" in response.content.decode()
    agent = selectors.agent_get(tenant=world_a.tenant, agent_id=agent.pk)
    assert agent.published_version.number == 1


def test_versions_restore_and_compare(world_a, owner):
    agent = _agent(world_a, instructions="first")
    v1 = _publish(world_a, agent, "Launch")
    _draft(world_a, agent, instructions="second", max_turns=3)
    v2 = _publish(world_a, agent, "Shorter")
    _draft(world_a, agent, instructions="work in progress")
    base = f"/t/acme/agents/{agent.pk}"

    page = owner.get(f"{base}/versions/").content.decode()
    assert "Launch" in page and "Shorter" in page and "Draft" in page
    assert page.count(">live<") == 1
    assert "hx-confirm=" in page and f"{base}/versions/{v1.pk}/restore/" in page

    compare = owner.get(f"{base}/compare/?a={v1.pk}&b={v2.pk}")
    assert compare.status_code == 200
    rows = {field: (a["text"], b["text"]) for field, a, b in compare.context["rows"]}
    assert rows == {"instructions": ("first", "second"), "max_turns": ("10", "3")}
    assert "v1 → v2" in compare.content.decode()

    response = owner.post(f"{base}/versions/{v1.pk}/restore/", HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    assert "Restored from v1: v3 is live." in response.content.decode()
    agent = selectors.agent_get(tenant=world_a.tenant, agent_id=agent.pk)
    assert agent.published_version.number == 3
    assert agent.published_version.config["instructions"] == "first"
    assert selectors.draft_get(tenant=world_a.tenant, agent=agent) is None  # restore discards it
    versions = selectors.version_list(tenant=world_a.tenant, agent=agent)
    assert [v.number for v in versions] == [3, 2, 1]


def test_a_version_of_another_agent_is_not_found(world_a, owner):
    first, second = _agent(world_a, "First"), _agent(world_a, "Second")
    v1 = _publish(world_a, first)
    own = _publish(world_a, second)
    assert owner.get(f"/t/acme/agents/{second.pk}/compare/?a={v1.pk}&b={own.pk}").status_code == 404
    response = owner.post(f"/t/acme/agents/{second.pk}/versions/{v1.pk}/restore/")
    assert response.status_code == 404
    assert owner.get(f"/t/acme/agents/{second.pk}/compare/?a=nonsense&b=x").status_code == 404


def test_deleting_an_agent_that_others_hand_off_to_says_why(world_a, owner):
    billing = _agent(world_a, "Billing")
    _agent(world_a, "Support", handoffs=[str(billing.pk)])
    response = owner.post(f"/t/acme/agents/{billing.pk}/delete/", follow=True)
    assert "is a handoff target of Support" in response.content.decode()
    assert selectors.agent_get(tenant=world_a.tenant, agent_id=billing.pk)
    lone = _agent(world_a, "Lone")
    response = owner.post(f"/t/acme/agents/{lone.pk}/delete/")
    assert response.status_code == 302 and response["Location"] == "/t/acme/agents/"
    assert not selectors.agent_list(tenant=world_a.tenant).filter(pk=lone.pk).exists()


# --- Playground -------------------------------------------------------------------------------


def _play(client: Client, agent: Agent, message: str, htmx: bool = True):
    headers = {"HTTP_HX_REQUEST": "true"} if htmx else {}
    return client.post(f"/t/acme/agents/{agent.pk}/playground/", {"message": message}, **headers)


def test_the_playground_runs_the_draft_on_the_offline_model(world_a, owner):
    agent = _agent(world_a, instructions="Start every answer with Ahoy.")
    response = _play(owner, agent, "Hello there")
    assert response.status_code == 200
    page = response.content.decode()
    assert 'id="playground"' in page and "<html" not in page  # the fragment only
    run = response.context["run"]
    assert run["status"] == "success" and "Hello there" in run["text"]
    assert "built-in offline model" in page and "Answered" in page
    assert run["usage"]["requests"] == 1 and run["usage"]["total_tokens"] > 0
    assert f"{run['usage']['total_tokens']}</strong> tokens" in page
    # the run is kept with its trace, as the API's draft runs are
    kept = selectors.playground_run_list(tenant=world_a.tenant, agent=agent)
    assert [(k.input, k.status, k.version_number) for k in kept] == [
        ("Hello there", "success", None)
    ]


def test_the_playground_shows_tool_calls_and_handoffs(world_a, owner):
    billing = _agent(world_a, "Billing")
    _publish(world_a, billing)
    agent = _agent(
        world_a, "Front desk", tools=[{"name": "calculator"}], handoffs=[str(billing.pk)]
    )
    run = _play(owner, agent, "Use the calculator to compute 17 * 23").context["run"]
    assert [c["tool"] for c in run["tool_calls"]] == ["calculator"]
    assert (
        "17 * 23" in run["tool_calls"][0]["arguments"] and run["tool_calls"][0]["output"] == "391"
    )
    assert "391" in run["text"]

    response = _play(owner, agent, "Transfer me to Billing")
    run = response.context["run"]
    assert run["handoffs"] == [
        {
            "kind": "handoff",
            "at_ms": run["handoffs"][0]["at_ms"],
            "from_agent": "Front desk",
            "to_agent": "Billing",
        }
    ]
    page = response.content.decode()
    assert "by Billing, after a handoff" in page and "Front desk → <strong>Billing</strong>" in page


def test_the_playground_escapes_what_the_model_says(world_a, owner):
    agent = _agent(world_a)
    page = _play(owner, agent, '<img src=x onerror="alert(1)">').content.decode()
    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=" in page


def test_a_tripped_guardrail_says_so(world_a, owner):
    agent = _agent(
        world_a,
        input_guardrails=[
            {"kind": "blocked_words", "words": ["refund"], "message": "Ask the billing team."}
        ],
    )
    response = _play(owner, agent, "I want a refund now")
    run = response.context["run"]
    assert run["status"] == "guardrail" and run["usage"]["requests"] == 0
    page = response.content.decode()
    assert "Stopped by a guardrail" in page and "Ask the billing team." in page
    assert "blocked word" in page  # which guardrail and why


def test_structured_output_is_pretty_printed(world_a, owner):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}, "score": {"type": "integer"}},
        "required": ["answer", "score"],
    }
    agent = _agent(world_a, output_schema=schema)
    response = _play(owner, agent, "Rate this")
    run = response.context["run"]
    assert run["status"] == "success", run["message"]
    value = json.loads(run["structured"])
    assert set(value) == {"answer", "score"}
    page = response.content.decode()
    assert '<pre class="mono tag">{\n  &quot;' in page  # indented, escaped
    assert "&quot;score&quot;: " in page


def test_an_unreachable_mcp_server_is_reported(world_a, owner, dead_port):
    down = f"http://127.0.0.1:{dead_port}/mcp"
    optional = _server(world_a, "Optional tools", url=down)
    agent = _agent(world_a, mcp_servers=[{"server_id": str(optional.pk), "required": False}])
    response = _play(owner, agent, "hello")
    run = response.context["run"]
    assert run["status"] == "success"
    assert (
        run["mcp_servers"][0]["name"] == "Optional tools" and not run["mcp_servers"][0]["connected"]
    )
    assert "Skipped, not reachable" in response.content.decode()

    required = _server(world_a, "Required tools", url=down)
    agent = _agent(
        world_a, "Strict", mcp_servers=[{"server_id": str(required.pk), "required": True}]
    )
    response = _play(owner, agent, "hello")
    assert response.context["run"]["status"] == "error"
    page = response.content.decode()
    assert "The run failed." in page and "Required tools is required by this agent" in page


def test_the_playground_needs_a_message(world_a, owner):
    agent = _agent(world_a)
    response = _play(owner, agent, "  ")
    assert response.status_code == 200  # an htmx fragment: htmx does not swap a 422
    assert "Type a message" in response.content.decode() and response.context["run"] is None
    assert _play(owner, agent, "", htmx=False).status_code == 422


def test_the_playground_says_the_monthly_budget_is_used_up(world_a, owner):
    from usage import services as usage_services

    usage_services.budget_set(
        tenant=world_a.tenant, actor=world_a.actor(), token_limit=1, cost_limit=None,
        warn_percent=80,
    )  # fmt: skip
    agent = _agent(world_a)
    assert _play(owner, agent, "Hello").context["run"]["status"] == "success"  # now over
    response = _play(owner, agent, "Hello again")
    assert response.status_code == 200 and response.context["run"] is None
    page = response.content.decode()
    assert "This tenant has used its monthly budget" in page
    assert "You can raise it in Settings → Monthly budget." in page  # said to an owner
    admin = world_a.client_for(world_a.admin)  # who sees the budget but cannot change it
    said = _play(admin, agent, "Hello again").content.decode()
    assert "An owner can raise it; see Settings → Monthly budget." in said
    whole = _play(owner, agent, "Hello again", htmx=False)
    assert whole.status_code == 402 and "<html" in whole.content.decode()
    assert len(selectors.playground_run_list(tenant=world_a.tenant, agent=agent)) == 1


def test_the_playground_without_htmx_renders_the_whole_page(world_a, owner):
    agent = _agent(world_a, "Support")
    response = _play(owner, agent, "Hello", htmx=False)
    assert response.status_code == 200
    page = response.content.decode()
    assert "<html" in page and "Hello" in response.context["run"]["text"]


# --- Model providers --------------------------------------------------------------------------


def test_a_provider_key_is_never_rendered(world_a, owner):
    pages = []
    response = owner.post(
        "/t/acme/providers/create/",
        {
            "name": "OpenAI",
            "base_url": "ftp://nope",
            "api": "chat_completions",
            "default_model": "gpt-test",
            "timeout_seconds": "30",
            "api_key": SECRET,
        },
    )
    assert response.status_code == 422 and "base_url" in response.context["form"].errors
    pages.append(response)
    response = owner.post(
        "/t/acme/providers/create/",
        {
            "name": "OpenAI",
            "base_url": "https://api.example.com/v1",
            "api": "responses",
            "default_model": "gpt-test",
            "timeout_seconds": "30",
            "api_key": SECRET,
        },
    )
    assert response.status_code == 302
    provider = selectors.provider_list(tenant=world_a.tenant).get()
    assert (provider.api, provider.api_key_last4) == ("responses", "3456")
    agent = _agent(world_a, provider_id=str(provider.pk))
    detail = f"/t/acme/providers/{provider.pk}/"
    pages += [owner.get(detail), owner.get("/t/acme/providers/")]
    pages.append(owner.post(detail, {"name": "", "api_key": SECRET}))  # an invalid edit
    pages += [
        owner.get(f"/t/acme/agents/{agent.pk}/"),
        owner.get("/t/acme/audit/"),
        owner.get("/t/acme/"),
    ]
    for page in pages:
        assert SECRET not in page.content.decode()
        assert SECRET[:-4] not in page.content.decode()
    assert "•••• 3456" in pages[1].content.decode() and "3456" in pages[2].content.decode()
    assert pages[1]["Cache-Control"] == "no-store"
    assert "built-in offline model needs no provider" in pages[2].content.decode()


def test_editing_a_provider_keeps_replaces_or_removes_the_key(world_a, owner):
    provider = _provider(world_a)
    url = f"/t/acme/providers/{provider.pk}/"
    form = {
        "name": "Renamed",
        "base_url": "https://api.example.com/v2",
        "api": "chat_completions",
        "default_model": "gpt-other",
        "timeout_seconds": "20",
    }
    assert owner.post(url, {**form, "api_key": ""}).status_code == 302
    provider.refresh_from_db()
    assert (provider.name, provider.default_model, provider.timeout_seconds) == (
        "Renamed",
        "gpt-other",
        20.0,
    )
    assert provider.api_key_last4 == "3456" and provider.has_api_key  # blank keeps it
    owner.post(url, {**form, "api_key": "sk-new-key-7777"})
    provider.refresh_from_db()
    assert provider.api_key_last4 == "7777"
    owner.post(url, {**form, "remove_key": "on"})
    provider.refresh_from_db()
    assert not provider.has_api_key and provider.api_key_last4 == ""
    assert "No key stored" in owner.get(url).content.decode()


def test_provider_errors_stand_next_to_their_fields(world_a, owner):
    _provider(world_a, "Taken")
    provider = _provider(world_a, "Mine")
    response = owner.post(
        f"/t/acme/providers/{provider.pk}/",
        {
            "name": "Taken",
            "base_url": "https://api.example.com/v1",
            "api": "chat_completions",
            "default_model": "m",
            "timeout_seconds": "5000",
        },
    )
    assert response.status_code == 422
    assert "Between 1 and 600 seconds" in response.context["form"].errors["timeout_seconds"][0]
    provider.refresh_from_db()
    assert provider.name == "Mine"


def test_testing_a_provider_reports_in_plain_words(world_a, owner, provider, fake_llm):
    response = owner.post(f"/t/acme/providers/{provider.pk}/test/", HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    page = response.content.decode()
    assert "Connected: fake-model answered." in page and "alert-success" in page
    wrong = _provider(world_a, "Wrong key", base_url=fake_llm.base_url, key="sk-wrong-0000")
    page = owner.post(f"/t/acme/providers/{wrong.pk}/test/", HTTP_HX_REQUEST="true")
    assert "refused the API key" in page.content.decode()
    assert "alert-error" in page.content.decode()
    # without htmx: back to the provider's page, with the answer
    response = owner.post(f"/t/acme/providers/{provider.pk}/test/", follow=True)
    assert "Connected" in response.content.decode()
    assert "sk-fake-provider-key" not in response.content.decode()


def test_deleting_a_provider_in_use_says_where(world_a, owner):
    provider = _provider(world_a)
    agent = _agent(world_a, "Support", provider_id=str(provider.pk))
    response = owner.post(f"/t/acme/providers/{provider.pk}/delete/", follow=True)
    assert "is used by Support" in response.content.decode()
    assert selectors.provider_list(tenant=world_a.tenant).exists()
    _draft(world_a, agent)  # back to the offline model
    response = owner.post(f"/t/acme/providers/{provider.pk}/delete/")
    assert response["Location"] == "/t/acme/providers/"
    assert not selectors.provider_list(tenant=world_a.tenant).exists()


# --- MCP servers ------------------------------------------------------------------------------


def test_mcp_header_values_are_never_rendered(world_a, owner):
    form = {
        "name": "GitHub",
        "url": "https://mcp.example.com/mcp",
        "transport": "streamable_http",
        "tool_allowlist": "search, fetch_issue",
        "timeout_seconds": "15",
    }
    bad_line = owner.post(
        "/t/acme/mcp-servers/create/", {**form, "headers": f"Bearer {HEADER_SECRET}"}
    )
    assert bad_line.status_code == 422
    assert "Line 1" in bad_line.context["form"].errors["headers"][0]
    response = owner.post(
        "/t/acme/mcp-servers/create/",
        {**form, "headers": f"Authorization: Bearer {HEADER_SECRET}\nX-Team: acme"},
    )
    assert response.status_code == 302
    server = selectors.mcp_server_list(tenant=world_a.tenant).get()
    assert server.header_names == ["Authorization", "X-Team"]
    assert server.tool_allowlist == ["fetch_issue", "search"]
    assert services.mcp_headers(server)["Authorization"] == f"Bearer {HEADER_SECRET}"
    url = f"/t/acme/mcp-servers/{server.pk}/"
    invalid_edit = owner.post(url, {**form, "url": "ftp://x", "headers": f"A: {HEADER_SECRET}"})
    assert invalid_edit.status_code == 422 and "url" in invalid_edit.context["form"].errors
    pages = [bad_line, invalid_edit, owner.get(url), owner.get("/t/acme/mcp-servers/")]
    for page in pages:
        assert HEADER_SECRET not in page.content.decode()
    assert "Authorization" in pages[2].content.decode() and "X-Team" in pages[3].content.decode()

    # Blank keeps the headers; the checkbox removes them.
    assert owner.post(url, {**form, "name": "GitHub tools"}).status_code == 302
    server.refresh_from_db()
    assert server.name == "GitHub tools" and services.mcp_headers(server)["X-Team"] == "acme"
    owner.post(url, {**form, "remove_headers": "on"})
    server.refresh_from_db()
    assert server.header_names == [] and services.mcp_headers(server) == {}


def test_there_is_no_stdio_transport_and_the_page_says_why(world_a, owner):
    page = owner.get("/t/acme/mcp-servers/")
    choices = dict(page.context["form"].fields["transport"].choices)
    assert set(choices) == {"streamable_http", "sse"}
    assert "There is no stdio" in page.content.decode()
    response = owner.post(
        "/t/acme/mcp-servers/create/",
        {
            "name": "Local",
            "url": "https://x.example.com",
            "transport": "stdio",
            "timeout_seconds": "10",
        },
    )
    assert response.status_code == 422 and "transport" in response.context["form"].errors
    assert not selectors.mcp_server_list(tenant=world_a.tenant).exists()


def test_listing_the_tools_of_a_server(world_a, owner, mcp_loopback):
    server = _server(world_a, "Loopback", url=mcp_loopback.url, tool_allowlist=["add"])
    response = owner.post(f"/t/acme/mcp-servers/{server.pk}/tools/", HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    page = response.content.decode()
    # after the allow-list: `add`, not `shout`
    assert "<strong>add</strong>" in page and "Add two integers." in page and "shout" not in page
    assert "1 tool an agent would get, after the allow-list." in page


def test_listing_tools_of_an_unreachable_server_says_why(world_a, owner, dead_port):
    server = _server(world_a, "Down", url=f"http://127.0.0.1:{dead_port}/mcp")
    response = owner.post(f"/t/acme/mcp-servers/{server.pk}/tools/", HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    page = response.content.decode()
    assert 'id="mcp-tools"' in page and "<html" not in page
    assert "Could not list the tools of Down" in page and "alert-error" in page


def test_listing_tools_of_a_server_that_never_answers_says_so_within_its_timeout(
    world_a, owner, silent_server
):
    """The server takes the connection and never answers: the admin reads why once the
    server's timeout of 1 s has run out. The page used to take 11 s to say it (the MCP client
    waited 10 s for a first probe before it tried the handshake), and named no time limit."""
    server = _server(world_a, "Slow", url=silent_server.url, timeout_seconds=1)
    start = time.monotonic()
    response = owner.post(f"/t/acme/mcp-servers/{server.pk}/tools/", HTTP_HX_REQUEST="true")
    took = time.monotonic() - start
    assert took < 4, f"the page took {took:.1f} s"  # slack for a loaded machine; it was 11 s
    page = response.content.decode()
    assert "Could not list the tools of Slow: the server did not answer within 1 second" in page


def test_deleting_an_mcp_server_in_use_says_where(world_a, owner):
    server = _server(world_a)
    agent = _agent(world_a, "Support", mcp_servers=[{"server_id": str(server.pk)}])
    response = owner.post(f"/t/acme/mcp-servers/{server.pk}/delete/", follow=True)
    assert "is used by Support" in response.content.decode()
    _draft(world_a, agent)
    response = owner.post(f"/t/acme/mcp-servers/{server.pk}/delete/")
    assert response["Location"] == "/t/acme/mcp-servers/"
    assert not selectors.mcp_server_list(tenant=world_a.tenant).exists()


# --- Query budgets ----------------------------------------------------------------------------


def test_the_agent_list_query_budget(world_a, owner, django_assert_max_num_queries):
    for n in range(8):
        agent = _agent(world_a, f"Agent {n}")
        if n % 2:
            _publish(world_a, agent)
    # session, user, membership, the tenant switcher, the agents (live versions joined), the
    # budget banner
    with django_assert_max_num_queries(6):
        response = owner.get("/t/acme/agents/")
    assert response.content.decode().count('id="agent-') == 8
    # the editor: + the agent, its draft, and the providers, servers and agents it offers
    with django_assert_max_num_queries(11):
        response = owner.get(f"/t/acme/agents/{agent.pk}/")
    assert response.status_code == 200
    with django_assert_max_num_queries(7):
        owner.get(f"/t/acme/agents/{agent.pk}/versions/")


def test_the_provider_and_mcp_list_query_budgets(world_a, owner, django_assert_max_num_queries):
    for n in range(6):
        _provider(world_a, f"Provider {n}")
        _server(world_a, f"Server {n}", headers={"X-Key": "v"})
    with django_assert_max_num_queries(6):  # + the budget banner of owners and admins
        response = owner.get("/t/acme/providers/")
    assert response.content.decode().count('id="provider-check-') == 6
    with django_assert_max_num_queries(6):
        response = owner.get("/t/acme/mcp-servers/")
    assert response.content.decode().count('id="server-') == 6

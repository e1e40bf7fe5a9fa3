"""The end-user chat: pages, markdown sanitising, and the thread websocket driven through the
whole ASGI stack (origin check, session auth, routing) against real PostgreSQL and Redis.

Runs are executed in the test itself (`executor.claim` + `executor.execute`) on the built-in
offline model; nothing sleeps: each wait is a receive with a timeout that only bounds a failure.
"""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace

import pytest
from agents import Agent, RunConfig, Runner, function_tool
from agents.testing import ScriptedModel, assistant_message, function_call
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.test import Client
from django.urls import reverse

from ai_agents import services as agent_services
from ai_agents.fakeserver import FakeOpenAIServer
from ai_agents.runtime.trace import Trace, TraceHooks
from controlplane.asgi import application
from conversations import consumers, executor, inspector, markdown, selectors, services, streams
from conversations import events as sdk_events
from conversations.models import Item, MultitaskStrategy, Run, RunSource, RunStatus, Thread
from conversations.session import ThreadSession
from tenants import realtime
from tenants import services as tenant_services
from tenants.consumers import CLOSE_NOT_FOUND, CLOSE_REVOKED, CLOSE_UNAUTHENTICATED
from tests.conftest import make_world

WAIT = 5
CALC = "use the calculator to compute 6 * 7"


def _agent(world, name="Calc", publish=True):
    agent = agent_services.agent_create(
        tenant=world.tenant, actor=world.actor(), name=name,
        config={"tools": [{"name": "calculator"}]},
    )  # fmt: skip
    if publish:
        agent_services.agent_publish(tenant=world.tenant, actor=world.actor(), agent_id=agent.pk)
    return agent


def _hands_off(world, agent, *targets):
    """Publishes a version of `agent` that hands off to `targets` (published agents)."""
    config = {"tools": [{"name": "calculator"}], "handoffs": [str(t.pk) for t in targets]}
    agent_services.draft_save(
        tenant=world.tenant, actor=world.actor(), agent_id=agent.pk, config=config
    )
    agent_services.agent_publish(tenant=world.tenant, actor=world.actor(), agent_id=agent.pk)


def _thread(world, user, agent, title=""):
    end_user = services.end_user_for_member(tenant=world.tenant, user=user)
    return services.thread_create(
        tenant=world.tenant, end_user=end_user, agent_id=agent.pk, title=title
    )


def _url(name, world, **kw):
    return reverse(name, kwargs={"tenant_slug": world.tenant.slug, **kw})


def _run_to_end(world, thread, text=CALC):
    run = services.run_create(
        tenant=world.tenant, end_user=thread.end_user, thread_id=thread.pk, input=text
    )
    held = executor.claim(run.pk, owner="t")
    assert async_to_sync(executor.execute)(held) == RunStatus.SUCCESS
    return run


# --- Markdown ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "absent"),
    [
        ("hi <script>alert(1)</script>", "<script"),
        ("[click](javascript:alert(1))", 'href="javascript'),
        ('<a href="https://e.example">raw</a>', "<a href"),
        ("<img src=x onerror=alert(1)>", "<img"),
        ("![cat](https://evil.example/cat.png)", "<img"),
        ('<div onclick="x()">hi</div>', "<div"),
    ],
)
def test_markdown_drops_scripts_raw_html_javascript_links_and_images(source, absent):
    html = markdown.render_markdown(source)
    assert absent not in html


def test_markdown_renders_formatting_and_safe_links():
    html = markdown.render_markdown("**bold** and [docs](https://docs.example/x)\n\n- a\n- b")
    assert "<strong>bold</strong>" in html and "<li>a</li>" in html
    assert 'href="https://docs.example/x"' in html
    assert 'rel="noopener noreferrer nofollow"' in html and 'target="_blank"' in html


def test_markdown_renders_a_pipe_table_with_its_columns_alignment_as_classes():
    html = markdown.render_markdown("| Item | Price |\n|------|------:|\n| Tea | $3 |")
    assert "<th>Item</th>" in html and '<th class="align-right">Price</th>' in html
    assert "<td>Tea</td>" in html and '<td class="align-right">$3</td>' in html
    assert "|" not in html and "style=" not in html  # the CSP refuses style attributes


def test_markdown_image_becomes_a_link_that_loads_nothing():
    html = markdown.render_markdown("![a cat](https://evil.example/cat.png)")
    assert "<img" not in html
    assert 'href="https://evil.example/cat.png"' in html and "Image: a cat" in html


def test_user_text_is_escaped_not_rendered():
    html = markdown.render_plain("<b>hi</b>\n**x**")
    assert html == "&lt;b&gt;hi&lt;/b&gt;<br>**x**"


# --- Pages ------------------------------------------------------------------------------------


@pytest.fixture
def chat(world_a, world_b):
    agent = _agent(world_a)
    draft = _agent(world_a, name="Unpublished", publish=False)
    mine = _thread(world_a, world_a.member, agent, title="My trip to Lisbon")
    theirs = _thread(world_a, world_a.admin, agent, title="Admin secret plans")
    other_tenant = _thread(world_b, world_b.member, _agent(world_b, name="Globex bot"), "Globex")
    return SimpleNamespace(
        agent=agent, draft=draft, mine=mine, theirs=theirs, other_tenant=other_tenant
    )


def test_chat_home_shows_published_agents_and_only_my_threads(
    world_a, chat, django_assert_max_num_queries
):
    for i in range(5):  # more threads and agents cost no more queries
        _thread(world_a, world_a.member, _agent(world_a, name=f"Helper {i}"), title=f"T{i}")
    client = world_a.client_for(world_a.member)
    with django_assert_max_num_queries(8):  # 8: the budget banner reads the budget
        response = client.get(_url("chat-home", world_a))
    assert response.status_code == 200
    text = response.content.decode()
    assert "Calc" in text and "Unpublished" not in text and "Globex bot" not in text
    assert "My trip to Lisbon" in text
    assert "Admin secret plans" not in text and "Globex" not in text.replace("Globex bot", "")
    overview = (
        world_a.client_for(world_a.member).get(_url("tenant-overview", world_a)).content.decode()
    )
    assert _url("chat-home", world_a) in overview, "every member has the Chat link"
    # A member's landing page leads to the chat, not to a promise of agents that never appear.
    assert f'href="{_url("chat-home", world_a)}">Chat with an agent</a>' in overview


def test_screen_readers_hear_which_thread_a_button_acts_on_and_each_reply_once(world_a, chat):
    untitled = _thread(world_a, world_a.member, chat.agent)
    Item.objects.create(  # listed once it holds a message
        tenant=world_a.tenant, thread=untitled, data={"role": "user", "content": "hi"}
    )
    client = world_a.client_for(world_a.member)
    home = client.get(_url("chat-home", world_a)).content.decode()
    assert 'aria-label="Rename “My trip to Lisbon”"' in home
    assert 'aria-label="Delete “My trip to Lisbon”"' in home
    assert 'aria-label="Delete “Untitled conversation”"' in home
    page = client.get(_url("chat-thread", world_a, thread_id=chat.mine.pk)).content.decode()
    log = page[page.index('id="chat-log"') :].split(">", 1)[0]
    assert "aria-live" not in log, "streamed pieces and reloads are not read out"
    assert 'id="chat-announce" aria-live="polite"' in page


def test_chat_home_empty_states(world_a):
    text = world_a.client_for(world_a.member).get(_url("chat-home", world_a)).content.decode()
    assert "No agent is published yet" in text and "No conversations yet" in text


def test_search_by_title(world_a, chat):
    _thread(world_a, world_a.member, chat.agent, title="Groceries")
    client = world_a.client_for(world_a.member)
    text = client.get(_url("chat-home", world_a), {"q": "lisbon"}).content.decode()
    assert "My trip to Lisbon" in text and "Groceries" not in text
    fragment = client.get(
        _url("chat-home", world_a), {"q": "groc"}, HTTP_HX_REQUEST="true",
        HTTP_HX_TARGET="thread-list",
    )  # fmt: skip
    body = fragment.content.decode()
    assert "Groceries" in body and "Lisbon" not in body and "<html" not in body
    text = client.get(_url("chat-home", world_a), {"q": "nothing-like-this"}).content.decode()
    assert "No conversation has" in text


def test_starting_a_chat_creates_a_thread_and_opens_it(world_a, chat):
    client = world_a.client_for(world_a.member)
    response = client.post(_url("chat-start", world_a), {"agent_id": chat.agent.pk})
    thread = Thread.objects.for_tenant(world_a.tenant).order_by("-created_at").first()
    assert thread.agent_id == chat.agent.pk and thread.end_user.user_id == world_a.member.pk
    assert response.status_code == 302
    assert response["Location"] == _url("chat-thread", world_a, thread_id=thread.pk)
    # An unpublished agent cannot be chatted with.
    response = client.post(_url("chat-start", world_a), {"agent_id": chat.draft.pk}, follow=True)
    assert "not published" in response.content.decode()


def test_rename_and_delete_with_htmx(world_a, chat):
    client = world_a.client_for(world_a.member)
    response = client.post(
        _url("chat-rename", world_a, thread_id=chat.mine.pk), {"title": "Porto instead"},
        HTTP_HX_REQUEST="true",
    )  # fmt: skip
    assert response.status_code == 200 and "Porto instead" in response.content.decode()
    chat.mine.refresh_from_db()
    assert chat.mine.title == "Porto instead"
    response = client.post(
        _url("chat-delete", world_a, thread_id=chat.mine.pk), HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 200 and "No conversations yet" in response.content.decode()
    assert not Thread.objects.for_tenant(world_a.tenant).filter(pk=chat.mine.pk).exists()


def test_a_busy_thread_is_not_deleted(world_a, chat):
    services.run_create(
        tenant=world_a.tenant, end_user=chat.mine.end_user, thread_id=chat.mine.pk, input="hi"
    )
    response = world_a.client_for(world_a.member).post(
        _url("chat-delete", world_a, thread_id=chat.mine.pk), HTTP_HX_REQUEST="true"
    )
    assert "still writing a reply" in response.content.decode()
    assert Thread.objects.for_tenant(world_a.tenant).filter(pk=chat.mine.pk).exists()


@pytest.mark.parametrize(
    ("name", "method"),
    [
        ("chat-thread", "get"),
        ("chat-items", "get"),
        ("chat-rename", "post"),
        ("chat-delete", "post"),
    ],
)
def test_another_members_and_another_tenants_threads_are_404(world_a, chat, name, method):
    client = world_a.client_for(world_a.member)
    for thread in (chat.theirs, chat.other_tenant):
        response = getattr(client, method)(_url(name, world_a, thread_id=thread.pk), {"title": "x"})
        assert response.status_code == 404, (name, thread.title)
    chat.theirs.refresh_from_db()
    assert chat.theirs.title == "Admin secret plans"


def test_thread_page_renders_history_with_steps_and_sanitised_markdown(world_a, chat):
    _run_to_end(world_a, chat.mine)
    Item.objects.create(
        tenant=world_a.tenant, thread=chat.mine,
        data={"role": "user", "content": "<b>not bold</b>"},
    )  # fmt: skip
    Item.objects.create(
        tenant=world_a.tenant, thread=chat.mine,
        data={"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "**yes** <script>alert(1)</script>"}]},
    )  # fmt: skip
    response = world_a.client_for(world_a.member).get(
        _url("chat-thread", world_a, thread_id=chat.mine.pk)
    )
    text = response.content.decode()
    assert response.status_code == 200
    assert CALC in text and "42" in text
    assert '<details class="step step-tool_call"' in text and "calculator" in text
    assert "&lt;b&gt;not bold&lt;/b&gt;" in text
    assert "<strong>yes</strong>" in text and "<script>alert(1)" not in text
    assert 'data-ws-url="/ws/t/acme/chat/' in text and "js/chat.js" in text


def test_a_handoff_shows_as_one_step_named_after_the_agent(world_a, chat):
    for data in (
        {"role": "user", "content": "I was charged twice"},
        {"type": "function_call", "name": "transfer_to_billing_team", "call_id": "call_h",
         "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_h",
         "output": '{"assistant": "Billing Team"}'},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Billing here."}]},
    ):  # fmt: skip
        Item.objects.create(tenant=world_a.tenant, thread=chat.mine, data=data)
    client = world_a.client_for(world_a.member)
    page = client.get(_url("chat-thread", world_a, thread_id=chat.mine.pk)).content.decode()
    newer = client.get(
        _url("chat-items", world_a, thread_id=chat.mine.pk), {"after": 0}
    ).content.decode()
    for text in (page, newer):
        assert text.count("Handed off to") == 1 and "Handed off to Billing Team" in text
        assert "Tool result" not in text and "&quot;assistant&quot;" not in text
        assert "Billing here." in text


def test_a_tools_result_that_reads_like_a_handoffs_is_still_shown(world_a, chat):
    for data in (
        {"type": "function_call", "name": "who_is_on_call", "call_id": "w", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "w", "output": '{"assistant": "Bob"}'},
    ):  # fmt: skip
        Item.objects.create(tenant=world_a.tenant, thread=chat.mine, data=data)
    entries, _more = selectors.item_page(tenant=world_a.tenant, thread=chat.mine)
    assert [(e.kind, e.title) for e in entries] == [
        ("tool_call", "who_is_on_call"),
        ("tool_output", "Result"),
    ]


def _reply_saved(world, thread, agent):
    """`agent`'s reply to "hi", a real run of the SDK saved to the thread as the worker saves it
    (the run stays running, its trace unsaved). Returns the run, the events its stream carried
    and its trace."""
    run = services.run_create(
        tenant=world.tenant, end_user=thread.end_user, thread_id=thread.pk, input="hi"
    )
    held = executor.claim(run.pk, owner="t")
    session = ThreadSession(
        tenant_id=world.tenant.pk, thread_id=thread.pk, run_id=run.pk, attempt=held.attempt
    )
    trace = Trace()

    async def stream():
        mapper = sdk_events.EventMapper(agent.name)
        result = Runner.run_streamed(
            agent, "hi", session=session, hooks=TraceHooks(trace),
            run_config=RunConfig(tracing_disabled=True),
        )  # fmt: skip
        return [e async for sdk_event in result.stream_events() for e in mapper.map(sdk_event)]

    return run, async_to_sync(stream)(), trace.spans


def _several_handoffs_in_one_reply(world, thread):
    """A real run of the SDK, saved to the thread as the worker saves it: a tool of the agent's
    own named like a handoff, a response asking for two handoffs (the SDK takes the first), and
    a second handoff later (the thread's agent hands off to Billing and Sales, Billing to
    Sales). Returns the run and the events its stream carried."""
    sales = _agent(world, name="Sales")
    billing = _agent(world, name="Billing")
    _hands_off(world, billing, sales)
    _hands_off(world, thread.agent, billing, sales)
    model = ScriptedModel(
        [
            [
                assistant_message("Let me see."),
                function_call("transfer_to_archive", {}, call_id="a"),
            ],
            [
                function_call("transfer_to_billing", {}, call_id="h1"),
                function_call("transfer_to_sales", {}, call_id="h2"),
            ],
            [function_call("transfer_to_sales", {}, call_id="h3")],
            [assistant_message("Sales here.")],
        ]
    )

    @function_tool(name_override="transfer_to_archive")
    def archive() -> str:
        """Archive the conversation."""
        return "archived"

    sales = Agent(name="Sales", model=model)
    billing = Agent(name="Billing", model=model, handoffs=[sales])
    triage = Agent(name="Triage", model=model, tools=[archive], handoffs=[billing, sales])
    run, streamed, _trace = _reply_saved(world, thread, triage)
    return run, streamed


STEP_OF = {"message.completed": "assistant", "tool.started": "tool_call", "handoff": "handoff"}


def test_the_page_numbers_a_replys_steps_as_its_stream_does_whatever_its_handoffs(world_a, chat):
    run, streamed = _several_handoffs_in_one_reply(world_a, chat.mine)
    entries, _more = selectors.item_page(tenant=world_a.tenant, thread=chat.mine)
    shown = [(e.kind, e.extra["seq"]) for e in entries if e.kind in STEP_OF.values()]
    assert shown == [(STEP_OF[e["type"]], e["seq"]) for e in streamed if e["type"] in STEP_OF]
    assert [e.title for e in entries if e.kind == "handoff"] == [
        "Handed off to Billing",
        "Handed off to Sales",
    ]  # the second handoff asked for in one response was not taken: no step, live or saved
    # A message spoken by another agent than the conversation's is labelled with it.
    assert [e.extra.get("agent") for e in entries if e.kind == "assistant"] == [None, "Sales"]
    assert [e.title for e in entries if e.kind == "tool_call"] == ["transfer_to_archive"]
    assert [e.detail for e in entries if e.kind == "tool_output"] == ["archived"]
    assert not [e for e in streamed if e.get("call_id") == "h2"]

    # Any page boundary, between a call and its result too, shows each item as the whole does.
    def shown_as(e):
        return (e.kind, e.extra.get("seq"), e.title, e.extra.get("agent"))

    whole = {e.id: shown_as(e) for e in entries}
    ids = list(
        Item.objects.for_tenant(world_a.tenant)
        .filter(thread=chat.mine)
        .values_list("id", flat=True)
        .order_by("id")
    )
    for cut in ids[1:]:
        older, _more = selectors.item_page(
            tenant=world_a.tenant, thread=chat.mine, before=cut, limit=2
        )
        newer = selectors.item_after(tenant=world_a.tenant, thread=chat.mine, after=cut - 1)
        for e in older + newer:
            assert whole[e.id] == shown_as(e), cut
        assert {e.id for e in newer} == {i for i in whole if i >= cut}

    # The inspector shows every saved item, the ignored handoff as what it was.
    inspected = [e.title for e in inspector.run_items(tenant=world_a.tenant, run=run)]
    assert "Handoff to sales not taken" in inspected
    assert inspected.count("Handed off to Billing") == inspected.count("Handed off to Sales") == 1


def test_a_tool_named_and_answering_like_a_handoff_shows_as_the_tool_call_it_was(
    world_a, world_b, chat, django_assert_num_queries
):
    """The agent's own tool `transfer_to_x` answers `{"assistant": "x"}`, as a handoff's result
    reads. The agent that ran had no handoff of that name: it was a tool call, as its stream
    said, and the history shows it as one. Its handoff to Billing, and Billing's own to Sales,
    stay handoffs, also once Billing is renamed (which renames its handoff's tool)."""
    sales = _agent(world_a, name="Sales")
    billing = _agent(world_a, name="Billing")
    _hands_off(world_a, billing, sales)
    _hands_off(world_a, chat.agent, billing)
    model = ScriptedModel(
        [
            [function_call("transfer_to_x", {}, call_id="x")],
            [function_call("transfer_to_billing", {}, call_id="b")],
            [function_call("transfer_to_sales", {}, call_id="s")],
            [assistant_message("Sales here.")],
        ]
    )

    @function_tool(name_override="transfer_to_x")
    def lookalike() -> str:
        """Answers like a handoff."""
        return '{"assistant": "x"}'

    sdk_sales = Agent(name="Sales", model=model)
    sdk_billing = Agent(name="Billing", model=model, handoffs=[sdk_sales])
    calc = Agent(name="Calc", model=model, tools=[lookalike], handoffs=[sdk_billing])
    run, streamed, trace = _reply_saved(world_a, chat.mine, calc)
    assert [e["type"] for e in streamed if e["type"] in ("tool.started", "handoff")] == [
        "tool.started",
        "handoff",
        "handoff",
    ]

    def steps(entries):
        return [(e.kind, e.title, e.detail) for e in entries if e.kind != "user"]

    said = [
        ("tool_call", "transfer_to_x", "{}"),
        ("tool_output", "Result", '{\n  "assistant": "x"\n}'),
        ("handoff", "Handed off to Billing", ""),
        ("handoff", "Handed off to Sales", ""),
        ("assistant", "", ""),
    ]
    with django_assert_num_queries(4):  # the items, the runs' earlier ones, handoffs, ends
        entries, _more = selectors.item_page(tenant=world_a.tenant, thread=chat.mine)
    assert steps(entries) == said
    assert [e.extra.get("agent") for e in entries if e.kind == "assistant"] == ["Sales"]
    shown = [(e.kind, e.extra["seq"]) for e in entries if e.kind in STEP_OF.values()]
    assert shown == [(STEP_OF[e["type"]], e["seq"]) for e in streamed if e["type"] in STEP_OF]
    page = world_a.client_for(world_a.member).get(
        _url("chat-thread", world_a, thread_id=chat.mine.pk)
    )
    assert "Handed off to x" not in page.content.decode()
    titles = [e.title for e in inspector.run_items(tenant=world_a.tenant, run=run)]
    assert "transfer_to_x" in titles and "Handed off to x" not in titles

    # The tool's result on a page of its own, its call on the page before: still a result.
    call = Item.objects.for_tenant(world_a.tenant).get(
        thread=chat.mine, data__type="function_call", data__call_id="x"
    )
    with django_assert_num_queries(6):  # and the run's earlier `transfer_to_*` calls, results
        newer = selectors.item_after(tenant=world_a.tenant, thread=chat.mine, after=call.pk)
    assert steps(newer) == said[1:]

    # Once the run has ended and its trace is saved, a renamed agent's handoff stays one.
    Run.objects.for_tenant(world_a.tenant).filter(pk=run.pk).update(
        status=RunStatus.SUCCESS, trace=trace
    )
    agent_services.agent_update(
        tenant=world_a.tenant, actor=world_a.actor(), agent_id=billing.pk,
        name="Billing desk", description="",
    )  # fmt: skip
    entries, _more = selectors.item_page(tenant=world_a.tenant, thread=chat.mine)
    assert steps(entries) == said
    assert selectors.run_handoff_tools(tenant=world_a.tenant, run_ids=[run.pk])(run.pk) == {
        "transfer_to_billing",  # its trace's
        "transfer_to_billing_desk",
        "transfer_to_sales",
    }
    # Another tenant asking about the run learns nothing.
    assert not selectors.run_handoff_tools(tenant=world_b.tenant, run_ids=[run.pk])(run.pk)


def test_a_message_sent_without_the_pages_script_is_sent_and_a_refused_one_kept(
    world_a, chat, kicked, django_capture_on_commit_callbacks
):
    client = world_a.client_for(world_a.member)
    url = _url("chat-send", world_a, thread_id=chat.mine.pk)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(url, {"text": CALC})
    assert response.status_code == 302 and response["Location"].endswith(f"/{chat.mine.pk}/")
    run = Run.objects.for_tenant(world_a.tenant).get(thread=chat.mine)
    assert run.input == [{"role": "user", "content": CALC}] and kicked == [str(run.pk)]
    page = client.get(response["Location"]).content.decode()
    assert CALC in page and "Waiting for the agent" in page

    # A second message while the reply is written: refused, kept in the box, nothing stored.
    response = client.post(url, {"text": "and 7 * 8?"})
    assert response.status_code == 409
    text = response.content.decode()
    assert "busy with another reply" in text and ">and 7 * 8?</textarea>" in text
    assert Run.objects.for_tenant(world_a.tenant).filter(thread=chat.mine).count() == 1
    # Reloading that page asks for its address: the conversation, not an error.
    again = client.get(url)
    assert again.status_code == 302 and again["Location"].endswith(f"/{chat.mine.pk}/")

    # Another member's or tenant's thread: 404, nothing written.
    for thread in (chat.theirs, chat.other_tenant):
        url = _url("chat-send", world_a, thread_id=thread.pk)
        assert client.post(url, {"text": "hi"}).status_code == 404
        assert client.get(url).status_code == 404
        assert not Run.objects.for_tenant(thread.tenant).filter(thread=thread).exists()


def test_a_message_over_the_rate_limit_without_the_script_is_refused_in_the_chats_words(
    world_a, chat, kicked, settings
):
    settings.RATE_LIMIT_END_USER_RUNS_PER_MINUTE = 1
    client = world_a.client_for(world_a.member)
    url = _url("chat-send", world_a, thread_id=chat.mine.pk)
    assert client.post(url, {"text": "first"}).status_code == 302
    Run.objects.for_tenant(world_a.tenant).filter(thread=chat.mine).update(status=RunStatus.SUCCESS)
    Thread.objects.for_tenant(world_a.tenant).filter(pk=chat.mine.pk).update(status="idle")
    response = client.post(url, {"text": "second"})
    assert response.status_code == 429 and int(response["Retry-After"]) > 0
    text = response.content.decode()
    assert "Your message was not sent: you can send 1 message per minute." in text
    assert "This end user may start" not in text and ">second</textarea>" in text


def test_a_message_that_got_no_reply_says_why_in_the_history_on_the_page_of_its_end(world_a, chat):
    failed = services.run_create(
        tenant=world_a.tenant, end_user=chat.mine.end_user, thread_id=chat.mine.pk, input="go"
    )
    Item.objects.create(
        tenant=world_a.tenant, thread=chat.mine, run=failed, data={"role": "user", "content": "go"}
    )
    Run.objects.for_tenant(world_a.tenant).filter(pk=failed.pk).update(
        status=RunStatus.ERROR, error="The model provider failed (HTTP 500)."
    )
    Thread.objects.for_tenant(world_a.tenant).filter(pk=chat.mine.pk).update(status="idle")
    answered = services.run_create(
        tenant=world_a.tenant, end_user=chat.mine.end_user, thread_id=chat.mine.pk, input="hi"
    )
    for data in ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}):
        Item.objects.create(tenant=world_a.tenant, thread=chat.mine, run=answered, data=data)
    client = world_a.client_for(world_a.member)
    page = client.get(_url("chat-thread", world_a, thread_id=chat.mine.pk)).content.decode()
    note = "<strong>No reply:</strong> The model provider failed (HTTP 500)."
    assert page.count(note) == 1
    assert page.index(">go<") < page.index(note) < page.index(">hi<")

    # Paged so that the failed run ends one page: the note is on that page, not the next.
    first_of_answered = Item.objects.for_tenant(world_a.tenant).filter(run=answered).earliest("id")
    older = client.get(
        _url("chat-items", world_a, thread_id=chat.mine.pk), {"before": first_of_answered.pk}
    ).content.decode()
    newer = client.get(
        _url("chat-items", world_a, thread_id=chat.mine.pk), {"after": first_of_answered.pk - 1}
    ).content.decode()
    assert note in older and note not in newer


def _reply_that_failed(world, thread, text):
    run = services.run_create(
        tenant=world.tenant, end_user=thread.end_user, thread_id=thread.pk, input=text
    )
    Item.objects.create(
        tenant=world.tenant, thread=thread, run=run, data={"role": "user", "content": text}
    )
    Run.objects.for_tenant(world.tenant).filter(pk=run.pk).update(
        status=RunStatus.ERROR, error="The model provider failed (HTTP 500)."
    )
    Thread.objects.for_tenant(world.tenant).filter(pk=thread.pk).update(status="error")
    return run


def test_try_again_without_the_pages_script_replaces_the_failed_reply(
    world_a, chat, kicked, django_capture_on_commit_callbacks
):
    older = _reply_that_failed(world_a, chat.mine, "first")
    failed = _reply_that_failed(world_a, chat.mine, "second")
    client = world_a.client_for(world_a.member)
    page = client.get(_url("chat-thread", world_a, thread_id=chat.mine.pk)).content.decode()
    # Offered under the latest reply only, the one that can be tried again.
    assert page.count("Try again</button>") == 1
    assert f'name="retry_of" value="{failed.pk}"' in page
    assert f'name="retry_of" value="{older.pk}"' not in page

    url = _url("chat-send", world_a, thread_id=chat.mine.pk)
    refused = client.post(url, {"retry_of": str(older.pk)})
    assert refused.status_code == 409
    assert "Only the latest reply can be tried again." in refused.content.decode()

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(url, {"retry_of": str(failed.pk)})
    assert response.status_code == 302
    again = Run.objects.for_tenant(world_a.tenant).filter(thread=chat.mine).latest("created_at")
    assert again.input == [{"role": "user", "content": "second"}] and kicked == [str(again.pk)]
    page = client.get(response["Location"]).content.decode()
    assert page.count(">second<") == 1 and "Waiting for the agent" in page
    assert "Try again</button>" not in page

    # Another member's thread: 404, nothing written.
    theirs = _url("chat-send", world_a, thread_id=chat.theirs.pk)
    assert client.post(theirs, {"retry_of": str(failed.pk)}).status_code == 404
    assert Run.objects.for_tenant(world_a.tenant).filter(thread=chat.mine).count() == 3


def test_try_again_is_offered_only_under_the_latest_reply_on_every_page_of_the_history(
    world_a, chat
):
    """A reply that failed, then a question that was answered: paged so that the failed reply
    ends the older page, that page says why there was no reply but offers no "Try again",
    which only the latest reply can take (it would be refused)."""
    failed = _reply_that_failed(world_a, chat.mine, "go")
    answered = services.run_create(
        tenant=world_a.tenant, end_user=chat.mine.end_user, thread_id=chat.mine.pk, input="hi"
    )
    for data in ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}):
        Item.objects.create(tenant=world_a.tenant, thread=chat.mine, run=answered, data=data)
    Run.objects.for_tenant(world_a.tenant).filter(pk=answered.pk).update(status=RunStatus.SUCCESS)
    client = world_a.client_for(world_a.member)
    items = _url("chat-items", world_a, thread_id=chat.mine.pk)
    first_of_answered = Item.objects.for_tenant(world_a.tenant).filter(run=answered).earliest("id")
    older = client.get(items, {"before": first_of_answered.pk}).content.decode()
    assert "No reply:" in older
    assert "Try again" not in older and f'value="{failed.pk}"' not in older
    for page in (
        client.get(_url("chat-thread", world_a, thread_id=chat.mine.pk)),
        client.get(items),
        client.get(items, {"after": first_of_answered.pk - 1}),
    ):
        assert "Try again" not in page.content.decode()

    # The latest reply failed: offered on the page and in the fragments that end with it.
    Run.objects.for_tenant(world_a.tenant).filter(pk=answered.pk).update(status=RunStatus.ERROR)
    last = Item.objects.for_tenant(world_a.tenant).filter(run=answered).latest("id")
    for page in (
        client.get(_url("chat-thread", world_a, thread_id=chat.mine.pk)),
        client.get(items),
        client.get(items, {"after": last.pk - 1}),
    ):
        assert page.content.decode().count(f'name="retry_of" value="{answered.pk}"') == 1
    assert "Try again" not in client.get(items, {"before": last.pk}).content.decode()


def test_try_again_warns_when_the_failed_reply_had_used_a_tool_that_changes_things(world_a, chat):
    warning = "This reply had already used a tool that may have changed something"
    failed = _reply_that_failed(world_a, chat.mine, "book a table")
    client = world_a.client_for(world_a.member)
    url = _url("chat-thread", world_a, thread_id=chat.mine.pk)
    page = client.get(url).content.decode()
    assert "Try again</button>" in page and warning not in page
    Run.objects.for_tenant(world_a.tenant).filter(pk=failed.pk).update(side_effects=True)
    page = client.get(url).content.decode()
    assert 'aria-describedby="chat-retry-repeats">Try again</button>' in page
    assert f'<span class="muted small" id="chat-retry-repeats">{warning}' in page


def test_a_reply_cut_short_says_so_in_the_history(world_a, chat):
    stopped = services.run_create(
        tenant=world_a.tenant, end_user=chat.mine.end_user, thread_id=chat.mine.pk, input="go"
    )
    Run.objects.for_tenant(world_a.tenant).filter(pk=stopped.pk).update(
        status=RunStatus.RUNNING, attempt=1
    )
    for data in ({"role": "user", "content": "go"}, {"role": "assistant", "content": "Once upon"}):
        Item.objects.create(tenant=world_a.tenant, thread=chat.mine, run=stopped, data=data)
    services.run_cancel(tenant=world_a.tenant, run_id=stopped.pk, end_user=chat.mine.end_user)
    assert Run.objects.for_tenant(world_a.tenant).get(pk=stopped.pk).end_user_error == "Stopped."
    page = world_a.client_for(world_a.member).get(
        _url("chat-thread", world_a, thread_id=chat.mine.pk)
    )
    text = page.content.decode()
    note = '<div class="chat-run-stopped muted small" data-run-id="{}" role="note">Stopped.</div>'
    assert text.count(note.format(stopped.pk)) == 1
    assert text.index("Once upon") < text.index(note.format(stopped.pk))
    # The run inspector's transcript says who stopped it.
    transcript = world_a.client_for(world_a.admin).get(
        reverse("thread-transcript", args=[world_a.tenant.slug, chat.mine.pk])
    )
    assert "Stopped by the end user." in transcript.content.decode()


def test_who_stopped_a_reply_is_for_owners_and_admins_even_on_runs_stopped_before(world_a, chat):
    stopped = services.run_create(
        tenant=world_a.tenant, end_user=chat.mine.end_user, thread_id=chat.mine.pk, input="go"
    )
    Item.objects.create(
        tenant=world_a.tenant, thread=chat.mine, run=stopped, data={"role": "user", "content": "go"}
    )
    reason = "Stopped by boss@acme.test from the run inspector."
    Run.objects.for_tenant(world_a.tenant).filter(pk=stopped.pk).update(
        status=RunStatus.CANCELLED,
        error=reason,
        end_user_error="",  # as stored before 0004
    )
    Thread.objects.for_tenant(world_a.tenant).filter(pk=chat.mine.pk).update(status="idle")
    url = _url("chat-thread", world_a, thread_id=chat.mine.pk)
    member = world_a.client_for(world_a.member).get(url).content.decode()
    assert "boss@acme.test" not in member and 'role="note">Stopped.</div>' in member


def test_load_earlier_pages_back_by_item_id(world_a, chat):
    Item.objects.bulk_create(
        Item(tenant=world_a.tenant, thread=chat.mine, data={"role": "user", "content": f"m{i:02}"})
        for i in range(60)
    )
    client = world_a.client_for(world_a.member)
    text = client.get(_url("chat-thread", world_a, thread_id=chat.mine.pk)).content.decode()
    assert "m59" in text and "m10" in text and "m09" not in text
    first_shown = Item.objects.for_tenant(world_a.tenant).filter(data__content="m10").get().pk
    assert f"?before={first_shown}" in text
    older = client.get(
        _url("chat-items", world_a, thread_id=chat.mine.pk), {"before": first_shown}
    ).content.decode()
    assert "m00" in older and "m09" in older and "m10" not in older
    assert "?before=" not in older  # the start of the conversation
    newer = client.get(
        _url("chat-items", world_a, thread_id=chat.mine.pk), {"after": first_shown}
    ).content.decode()
    assert "m11" in newer and "m10" not in newer


def test_load_earlier_without_the_script_opens_the_conversation_from_the_earlier_page(
    world_a, chat
):
    """Without the page's script, "Load earlier messages" (a form) opens the page with
    `?before=`, which shows the earlier page and everything after it (as the script would have
    added it above what was read), with the control for the page before that."""
    Item.objects.bulk_create(
        Item(tenant=world_a.tenant, thread=chat.mine, data={"role": "user", "content": f"m{i:03}"})
        for i in range(120)
    )
    ids = {
        item.data["content"]: item.pk
        for item in Item.objects.for_tenant(world_a.tenant).filter(thread=chat.mine)
    }
    client = world_a.client_for(world_a.member)
    url = _url("chat-thread", world_a, thread_id=chat.mine.pk)
    latest = client.get(url).content.decode()
    assert "m070" in latest and "m069" not in latest
    assert f'<form class="chat-earlier" id="chat-earlier" method="get" action="{url}">' in latest
    assert f'<input type="hidden" name="before" value="{ids["m070"]}">' in latest

    page = client.get(url, {"before": ids["m070"]}).content.decode()
    shown = re.findall(r"<div class=\"bubble\">(m\d{3})</div>", page)
    assert shown == [f"m{i:03}" for i in range(20, 120)]
    assert f'<input type="hidden" name="before" value="{ids["m020"]}">' in page
    assert 'id="chat-composer"' in page  # the conversation, not a fragment of it
    start = client.get(url, {"before": ids["m020"]}).content.decode()
    assert re.findall(r"<div class=\"bubble\">(m\d{3})</div>", start)[0] == "m000"
    assert 'id="chat-earlier"' not in start  # the start of the conversation
    # A cursor that is not a number is the latest page, as for the script's requests.
    bubbles = re.compile(r"<div class=\"bubble\">(m\d{3})</div>")
    assert bubbles.findall(client.get(url, {"before": "x"}).content.decode()) == bubbles.findall(
        latest
    )


def test_the_window_of_earlier_messages_is_bounded(world_a, chat):
    """A cursor far back shows the page before it and what follows it up to a bound, with the
    control to page back from there and the way to the latest, instead of the whole
    conversation; following the cursor goes on back to the start (it used to show the same
    latest window again and again once the bound was reached)."""
    Item.objects.bulk_create(
        Item(tenant=world_a.tenant, thread=chat.mine, data={"role": "user", "content": f"m{i:03}"})
        for i in range(12)
    )
    rows = list(Item.objects.for_tenant(world_a.tenant).filter(thread=chat.mine).order_by("id"))

    def window(before: int, most: int = 8) -> tuple[list[str], int | None, bool]:
        entries, earlier, cut = selectors.item_window(
            tenant=world_a.tenant, thread=chat.mine, before=before, limit=3, most=most
        )
        return [str(e.html) for e in entries], earlier, cut

    shown, earlier, cut = window(rows[6].pk)
    assert shown == [f"m{i:03}" for i in range(3, 11)] and cut  # 3 before, 5 from the cursor
    assert earlier == rows[3].pk
    shown, earlier, cut = window(earlier)
    assert shown == [f"m{i:03}" for i in range(0, 8)] and cut and earlier is None  # the start
    assert window(rows[6].pk, most=20) == ([f"m{i:03}" for i in range(3, 12)], rows[3].pk, False)
    assert window(rows[2].pk, most=20) == ([f"m{i:03}" for i in range(12)], None, False)


def test_without_the_script_load_earlier_reaches_the_start_past_the_bound(world_a, chat):
    """Past the bound, the page's "Load earlier messages" still goes further back each time,
    and the page offers the latest messages once it no longer shows them."""
    from unittest import mock

    Item.objects.bulk_create(
        Item(tenant=world_a.tenant, thread=chat.mine, data={"role": "user", "content": f"m{i:03}"})
        for i in range(12)
    )
    rows = list(Item.objects.for_tenant(world_a.tenant).filter(thread=chat.mine).order_by("id"))
    client = world_a.client_for(world_a.member)
    url = _url("chat-thread", world_a, thread_id=chat.mine.pk)
    cursor = re.compile(r'name="before" value="(\d+)"')
    bubbles = re.compile(r"<div class=\"bubble\">(m\d{3})</div>")
    seen, before = [], str(rows[9].pk)
    with mock.patch.object(selectors.item_window, "__kwdefaults__", {"limit": 3, "most": 8}):
        for _ in range(6):
            page = client.get(url, {"before": before}).content.decode()
            shown = bubbles.findall(page)
            seen.append(shown[0])
            # The way to the latest, once the latest is past the window.
            assert ("Show the latest messages" in page) == ("m011" not in shown)
            found = cursor.search(page)
            if found is None:
                break
            assert found.group(1) != before, "Load earlier messages showed the same page"
            before = found.group(1)
    assert seen == ["m006", "m003", "m000"]


def test_a_message_id_must_be_the_whole_value():
    assert services.chat_message_metadata("abcdefgh") == {"chat_message_id": "abcdefgh"}
    assert services.chat_message_metadata("abcdefgh\n") == {}  # `$` lets a final newline in
    assert services.chat_message_metadata("<b>abcdefgh</b>") == {}


def test_a_long_replys_messages_carry_their_place_in_the_run_on_every_page(world_a, chat):
    """A reply longer than a page (many tool calls): the page shows its latest items only, and
    numbers its messages and handoffs among the whole run's, as the stream replays them."""
    _hands_off(world_a, chat.agent, _agent(world_a, name="Billing"))
    run = services.run_create(
        tenant=world_a.tenant, end_user=chat.mine.end_user, thread_id=chat.mine.pk, input="go"
    )
    data = [{"role": "user", "content": "go"}]
    for i in range(30):
        data += [
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": f"step {i}"}]},
            {"type": "function_call", "name": "calculator", "call_id": f"c{i}", "arguments": "{}"},
            {"type": "function_call_output", "call_id": f"c{i}", "output": "1"},
        ]  # fmt: skip
    data.append(
        {"type": "function_call", "name": "transfer_to_billing", "call_id": "h", "arguments": "{}"}
    )
    data.append({"role": "assistant", "content": "Billing here."})  # no `type`: a message too
    Item.objects.bulk_create(
        Item(tenant=world_a.tenant, thread=chat.mine, run=run, data=d) for d in data
    )
    client = world_a.client_for(world_a.member)
    page = client.get(_url("chat-thread", world_a, thread_id=chat.mine.pk)).content.decode()

    def seq(text: str, needle: str) -> str:
        return re.findall(r'data-run-seq="(\d*)"', text[: text.index(needle)])[-1]

    assert "step 13" not in page and "step 14" in page  # the latest 50 items only
    assert seq(page, "step 14") == "14" and seq(page, "step 29") == "29"
    assert seq(page, "Handed off to billing") == "0" and seq(page, "Billing here.") == "30"
    assert seq(page, 'data-call-id="c29"') == "29"  # tool calls are numbered apart from handoffs

    first_shown = int(re.search(r"\?before=(\d+)", page).group(1))
    newer = client.get(
        _url("chat-items", world_a, thread_id=chat.mine.pk), {"after": first_shown + 5}
    ).content.decode()
    assert "step 15" not in newer and seq(newer, "step 16") == "16"
    older = client.get(
        _url("chat-items", world_a, thread_id=chat.mine.pk), {"before": first_shown}
    ).content.decode()
    assert seq(older, "step 0") == "0" and seq(older, "step 13") == "13"


def test_messages_not_yet_started_show_as_waiting_or_queued(world_a, chat):
    """A refresh before the worker picks a run up (or while it waits in line) still shows what
    the user sent; once the run writes its items, the message shows from them, once."""
    first = services.run_create(
        tenant=world_a.tenant, end_user=chat.mine.end_user, thread_id=chat.mine.pk,
        input="First <question>", source=RunSource.CHAT,
    )  # fmt: skip
    services.run_create(
        tenant=world_a.tenant, end_user=chat.mine.end_user, thread_id=chat.mine.pk,
        input="Second question", source=RunSource.CHAT, strategy=MultitaskStrategy.ENQUEUE,
    )  # fmt: skip
    client = world_a.client_for(world_a.member)
    page = client.get(_url("chat-thread", world_a, thread_id=chat.mine.pk)).content.decode()
    assert "First &lt;question&gt;" in page and "Waiting for the agent" in page
    assert "Second question" in page and "Queued: sent when the current reply ends" in page
    assert page.index("First &lt;question&gt;") < page.index("Second question")
    assert "Say hello" not in page

    Item.objects.create(
        tenant=world_a.tenant, thread=chat.mine, run=first,
        data={"role": "user", "content": "First <question>"},
    )  # fmt: skip
    newer = client.get(
        _url("chat-items", world_a, thread_id=chat.mine.pk), {"after": 0}
    ).content.decode()
    assert newer.count("First &lt;question&gt;") == 1 and "Waiting for the agent" not in newer
    assert "Second question" in newer and "Queued" in newer


def test_the_latest_page_reloaded_keeps_the_messages_waiting_for_the_agent(world_a, chat):
    """After Stop, "Stop this reply, then send" or "Replace my last message" the page reloads
    the latest page of the history: the message just sent is still there, not the empty state."""
    services.run_create(
        tenant=world_a.tenant, end_user=chat.mine.end_user, thread_id=chat.mine.pk,
        input="Replace it with this", source=RunSource.CHAT,
    )  # fmt: skip
    client = world_a.client_for(world_a.member)
    latest = client.get(
        _url("chat-items", world_a, thread_id=chat.mine.pk), HTTP_HX_REQUEST="true"
    ).content.decode()
    assert "Replace it with this" in latest and "Waiting for the agent" in latest
    assert "Say hello" not in latest
    Item.objects.create(
        tenant=world_a.tenant, thread=chat.mine, data={"role": "user", "content": "older"}
    )
    older = client.get(
        _url("chat-items", world_a, thread_id=chat.mine.pk), {"before": 10**9}
    ).content.decode()
    assert "older" in older and "Replace it with this" not in older


# --- The websocket --------------------------------------------------------------------------


@pytest.fixture
def ws_env(settings, _isolated_redis):
    settings.ALLOWED_HOSTS = ["localhost", "testserver"]


@pytest.fixture
async def _close_async_clients(ws_env):
    yield
    layer = get_channel_layer()
    if layer is not None:
        await layer.flush()
    await streams.aclose()


def _setup():
    a, b = make_world("Acme"), make_world("Globex")
    agent = _agent(a)
    return SimpleNamespace(
        a=a, b=b, agent=agent,
        mine=_thread(a, a.member, agent),
        theirs=_thread(a, a.admin, agent),
        other_tenant=_thread(b, b.member, _agent(b)),
    )  # fmt: skip


def _session(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies[django_settings.SESSION_COOKIE_NAME].value


async def _socket(w, thread, user, query="", tenant=None):
    session = await database_sync_to_async(_session)(user)
    slug = (tenant or w.a.tenant).slug
    headers = [
        (b"host", b"localhost"),
        (b"origin", b"http://localhost"),
        (b"cookie", f"{django_settings.SESSION_COOKIE_NAME}={session}".encode()),
    ]
    return WebsocketCommunicator(
        application, f"/ws/t/{slug}/chat/{thread.pk}/{query}", headers=headers
    )


async def _open(w, thread, user, query=""):
    socket = await _socket(w, thread, user, query)
    connected, code = await socket.connect(timeout=WAIT)
    if not connected:
        pytest.fail(f"refused with {code}")
    hello = await socket.receive_json_from(timeout=WAIT)
    assert hello["type"] == "hello" and hello["thread_id"] == str(thread.pk)
    return socket, hello


async def _until_terminal(socket) -> list[dict]:
    """Every message up to and including the terminal run.status event."""
    got = []
    while True:
        msg = await socket.receive_json_from(timeout=WAIT)
        got.append(msg)
        ev = msg.get("event", {})
        if msg["type"] == "event" and ev.get("type") == "run.status" and ev["status"] in (
            "success", "error", "cancelled", "interrupted", "timeout"
        ):  # fmt: skip
            return got


async def _execute(run_id):
    held = await database_sync_to_async(executor.claim)(run_id, owner="t")
    assert held is not None
    return await executor.execute(held)


pytestmark_ws = pytest.mark.django_db(transaction=True)


@pytestmark_ws
async def test_refused_for_another_users_thread_another_tenant_and_anonymous(
    _close_async_clients,
):
    w = await database_sync_to_async(_setup)()
    for thread, tenant in ((w.theirs, None), (w.other_tenant, None), (w.other_tenant, w.b.tenant)):
        socket = await _socket(w, thread, w.a.member, tenant=tenant)
        try:
            connected, code = await socket.connect(timeout=WAIT)
            assert not connected and code == CLOSE_NOT_FOUND
        finally:
            # A refused socket's consumer runs until the client disconnects.
            await socket.disconnect()
    anonymous = WebsocketCommunicator(
        application, f"/ws/t/acme/chat/{w.mine.pk}/",
        headers=[(b"host", b"localhost"), (b"origin", b"http://localhost")],
    )  # fmt: skip
    try:
        connected, code = await anonymous.connect(timeout=WAIT)
        assert not connected and code == CLOSE_UNAUTHENTICATED
    finally:
        await anonymous.disconnect()


@pytestmark_ws
async def test_sending_a_message_starts_a_run_and_streams_the_reply(kicked, _close_async_clients):
    w = await database_sync_to_async(_setup)()
    socket, hello = await _open(w, w.mine, w.a.member)
    assert hello["active_run"] is None
    second_tab, _ = await _open(w, w.mine, w.a.member)
    try:
        await socket.send_json_to({"type": "send", "text": CALC})
        created = await socket.receive_json_from(timeout=WAIT)
        assert created["type"] == "run.created"
        assert created["title"] == CALC  # an untitled thread is named after its first message
        run_id = created["run_id"]
        assert kicked == [run_id]
        assert (await second_tab.receive_json_from(timeout=WAIT)) == {
            "type": "run.started", "run_id": run_id,
        }  # fmt: skip
        assert await _execute(run_id) == RunStatus.SUCCESS
        for tab in (socket, second_tab):
            got = await _until_terminal(tab)
            kinds = [m["event"]["type"] for m in got]
            assert all(m["type"] == "event" and m["run_id"] == run_id for m in got)
            assert kinds[0] == "run.status" and "tool.started" in kinds
            assert "42" in "".join(
                m["event"]["text"] for m in got if m["event"]["type"] == "message.delta"
            )
            assert got[-1]["event"]["status"] == "success"
            ids = [m["id"] for m in got]
            assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    finally:
        await socket.disconnect()
        await second_tab.disconnect()


@pytestmark_ws
async def test_a_late_announcement_of_a_run_the_socket_followed_does_not_replay_it(
    _close_async_clients,
):
    w = await database_sync_to_async(_setup)()
    socket, _ = await _open(w, w.mine, w.a.member)
    try:
        await socket.send_json_to({"type": "send", "text": CALC})
        run_id = (await socket.receive_json_from(timeout=WAIT))["run_id"]
        assert await _execute(run_id) == RunStatus.SUCCESS
        await _until_terminal(socket)
        # The run is announced again after the socket read it to the end (a promoted run's
        # announcement from the worker can come that late).
        await database_sync_to_async(streams.announce_run)(w.mine.pk, run_id)
        await socket.send_json_to({"type": "ping"})
        assert await socket.receive_json_from(timeout=WAIT) == {"type": "pong"}
        assert await socket.receive_nothing(timeout=0.2)
    finally:
        await socket.disconnect()


@pytestmark_ws
async def test_a_chat_opened_later_hears_only_runs_started_after_it(_close_async_clients):
    """The thread's earlier announcements stay in Redis for a while: a socket opened after them
    must not replay those runs, and still hears the next one."""
    w = await database_sync_to_async(_setup)()
    first, _ = await _open(w, w.mine, w.a.member)
    try:
        await first.send_json_to({"type": "send", "text": CALC})
        old_run = (await first.receive_json_from(timeout=WAIT))["run_id"]
        assert await _execute(old_run) == RunStatus.SUCCESS
        await _until_terminal(first)
    finally:
        await first.disconnect()
    later, hello = await _open(w, w.mine, w.a.member)
    try:
        assert hello["active_run"] is None
        await later.send_json_to({"type": "ping"})
        assert await later.receive_json_from(timeout=WAIT) == {"type": "pong"}
        assert await later.receive_nothing(timeout=0.3)
        run = await database_sync_to_async(services.run_create)(
            tenant=w.a.tenant, end_user=w.mine.end_user, thread_id=w.mine.pk, input=CALC,
            source="api",
        )  # fmt: skip
        started = await later.receive_json_from(timeout=WAIT)
        assert started == {"type": "run.started", "run_id": str(run.pk)}
        assert await _execute(run.pk) == RunStatus.SUCCESS
        assert (await _until_terminal(later))[-1]["event"]["status"] == "success"
    finally:
        await later.disconnect()


@pytestmark_ws
async def test_a_chat_that_could_not_watch_its_thread_follows_a_run_started_meanwhile(
    _close_async_clients, monkeypatch
):
    """The thread's notices could not be watched when the socket connected (Redis away for
    this process) and a run started meanwhile: once the socket watches, it asks PostgreSQL and
    follows that run."""
    w = await database_sync_to_async(_setup)()
    watch = streams.watch_thread
    refused = []

    async def first_refused(*args, **kwargs):
        if len(refused) < 2:  # at connect, and at once after: the next try is 0.5 s later
            refused.append(1)
            raise streams.StreamUnavailable("Redis is away")
        return await watch(*args, **kwargs)

    monkeypatch.setattr(streams, "watch_thread", first_refused)
    socket, hello = await _open(w, w.mine, w.a.member)
    try:
        assert hello["active_run"] is None
        run = await database_sync_to_async(services.run_create)(
            tenant=w.a.tenant, end_user=w.mine.end_user, thread_id=w.mine.pk, input=CALC,
            source="api",
        )  # fmt: skip
        started = await socket.receive_json_from(timeout=WAIT)
        assert started == {"type": "run.started", "run_id": str(run.pk)}
        assert await _execute(run.pk) == RunStatus.SUCCESS
        assert (await _until_terminal(socket))[-1]["event"]["status"] == "success"
        assert refused == [1, 1]
    finally:
        await socket.disconnect()


@pytestmark_ws
async def test_try_again_over_the_socket_starts_the_failed_replys_question_again(
    kicked, _close_async_clients
):
    w = await database_sync_to_async(_setup)()
    failed = await database_sync_to_async(_reply_that_failed)(w.a, w.mine, "what now?")
    kicked.clear()
    socket, _hello = await _open(w, w.mine, w.a.member)
    try:
        await socket.send_json_to({"type": "retry", "run_id": str(failed.pk)})
        created = await socket.receive_json_from(timeout=WAIT)
        assert created["type"] == "run.created" and kicked == [created["run_id"]]
        again = await database_sync_to_async(Run.objects.for_tenant(w.a.tenant).get)(
            pk=created["run_id"]
        )
        assert again.input == [{"role": "user", "content": "what now?"}]
        # Not the latest reply any more (and one is running): refused, nothing written.
        await socket.send_json_to({"type": "retry", "run_id": str(failed.pk)})
        refused = await socket.receive_json_from(timeout=WAIT)
        assert refused["type"] == "error" and refused["code"] == "conflict"
        await socket.send_json_to({"type": "retry", "run_id": "nope"})
        missing = await socket.receive_json_from(timeout=WAIT)
        assert (missing["type"], missing["code"]) == ("error", "not_found")
        assert kicked == [created["run_id"]]
    finally:
        await socket.disconnect()


@pytestmark_ws
async def test_a_busy_thread_answers_thread_busy(_close_async_clients):
    w = await database_sync_to_async(_setup)()
    socket, _ = await _open(w, w.mine, w.a.member)
    try:
        await socket.send_json_to({"type": "send", "text": "first"})
        assert (await socket.receive_json_from(timeout=WAIT))["type"] == "run.created"
        await socket.send_json_to({"type": "send", "text": "second"})
        answer = await socket.receive_json_from(timeout=WAIT)
        assert answer["type"] == "error" and answer["code"] == "thread_busy"
        assert answer["message"]
        runs = Run.objects.for_tenant(w.a.tenant).filter(thread=w.mine)
        assert await runs.acount() == 1
        # the stop button ends the run for every reader: the followed stream says so
        await socket.send_json_to({"type": "cancel"})
        while True:
            message = await socket.receive_json_from(timeout=WAIT)
            if message["type"] == "event" and message["event"]["type"] == "run.status":
                break
        assert message["event"]["status"] == "cancelled"
        assert [r.status async for r in runs] == ["cancelled"]
    finally:
        await socket.disconnect()


@pytestmark_ws
async def test_resume_from_a_middle_event_gets_only_the_rest(_close_async_clients):
    w = await database_sync_to_async(_setup)()
    run = await database_sync_to_async(services.run_create)(
        tenant=w.a.tenant, end_user=w.mine.end_user, thread_id=w.mine.pk, input=CALC
    )
    assert await _execute(run.pk) == RunStatus.SUCCESS
    stored = await streams.read(run.pk)
    middle = len(stored) // 2
    socket, hello = await _open(w, w.mine, w.a.member)
    assert hello["active_run"] is None
    try:
        await socket.send_json_to(
            {"type": "resume", "run_id": str(run.pk), "after": stored[middle][0]}
        )
        got = await _until_terminal(socket)
        assert [(m["id"], m["event"]) for m in got] == [(i, e) for i, e in stored[middle + 1 :]]
        # Another member's run cannot be followed from this socket.
        other = await database_sync_to_async(services.run_create)(
            tenant=w.a.tenant, end_user=w.theirs.end_user, thread_id=w.theirs.pk, input="hi"
        )
        await socket.send_json_to({"type": "resume", "run_id": str(other.pk), "after": "0-0"})
        answer = await socket.receive_json_from(timeout=WAIT)
        assert answer["type"] == "error" and answer["code"] == "not_found"
    finally:
        await socket.disconnect()


@pytestmark_ws
async def test_an_out_of_range_resume_id_disturbs_no_other_chat(_close_async_clients):
    """Ids past Redis's 64-bit range are replayed from the start: one such position would fail
    the read a web process shares among every stream it follows, every tenant's."""
    from conversations import events as ev

    w = await database_sync_to_async(_setup)()
    run = await database_sync_to_async(services.run_create)(
        tenant=w.a.tenant, end_user=w.mine.end_user, thread_id=w.mine.pk, input="hello"
    )
    held = await database_sync_to_async(executor.claim)(run.pk, owner="t")
    await streams.append(run.pk, held.attempt, [ev.status("running")])
    watching, _ = await _open(w, w.mine, w.a.member)
    theirs = await database_sync_to_async(services.run_create)(
        tenant=w.b.tenant, end_user=w.other_tenant.end_user, thread_id=w.other_tenant.pk, input="hi"
    )
    their_held = await database_sync_to_async(executor.claim)(theirs.pk, owner="t")
    await streams.append(theirs.pk, their_held.attempt, [ev.status("running")])
    other = await _socket(w, w.other_tenant, w.b.member, tenant=w.b.tenant)
    assert (await other.connect(timeout=WAIT))[0]
    assert (await other.receive_json_from(timeout=WAIT))["type"] == "hello"
    try:
        assert (await watching.receive_json_from(timeout=WAIT))["event"]["status"] == "running"
        await other.send_json_to(
            {"type": "resume", "run_id": str(theirs.pk), "after": f"{2**64}-0"}
        )
        assert (await other.receive_json_from(timeout=WAIT))["type"] == "event"  # from the start
        await streams.append(run.pk, held.attempt, [ev.message_delta("Hi", agent="Calc")])
        got = await watching.receive_json_from(timeout=WAIT)
        assert got["type"] == "event" and got["event"]["text"] == "Hi"
    finally:
        await watching.disconnect()
        await other.disconnect()


def test_stream_ids_are_checked_against_redis_range():
    assert streams.is_stream_id("1700000000000-0")
    assert streams.is_stream_id(f"{2**64 - 1}-{2**64 - 1}")
    assert not streams.is_stream_id(f"{2**64}-0")
    assert not streams.is_stream_id(f"0-{2**64}")
    assert not streams.is_stream_id("1-2-3") and not streams.is_stream_id(None)
    with pytest.raises(ValueError, match="not a stream id"):
        streams.read_sync("00000000-0000-0000-0000-000000000000", after=f"{2**64}-0")


@pytestmark_ws
async def test_connecting_during_a_run_follows_it_from_the_given_id(_close_async_clients):
    w = await database_sync_to_async(_setup)()
    run = await database_sync_to_async(services.run_create)(
        tenant=w.a.tenant, end_user=w.mine.end_user, thread_id=w.mine.pk, input="hello"
    )
    held = await database_sync_to_async(executor.claim)(run.pk, owner="t")
    from conversations import events as ev

    ids = await streams.append(
        run.pk, held.attempt,
        [ev.status("running"), ev.message_delta("Hel", agent="Calc"),
         ev.message_delta("lo", agent="Calc")],
    )  # fmt: skip
    # A refreshed page reconnects with the last id it saw.
    socket, hello = await _open(w, w.mine, w.a.member, query=f"?after={ids[1]}")
    assert hello["active_run"] == str(run.pk)
    try:
        first = await socket.receive_json_from(timeout=WAIT)
        assert first["id"] == ids[2] and first["event"]["text"] == "lo"
        await streams.finish(run.pk, held.attempt, ev.status("success"))
        last = await socket.receive_json_from(timeout=WAIT)
        assert last["event"]["type"] == "run.status" and last["event"]["status"] == "success"
    finally:
        await socket.disconnect()


@pytestmark_ws
async def test_redis_down_answers_unavailable(settings, monkeypatch, _close_async_clients):
    """Said once, however long the outage lasts; the socket keeps looking, and tells the page
    when the reply is saved, so the page does not wait for it forever."""
    monkeypatch.setattr(consumers, "RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(consumers, "RETRY_MAX_S", 0.02)
    w = await database_sync_to_async(_setup)()
    run = await database_sync_to_async(services.run_create)(
        tenant=w.a.tenant, end_user=w.mine.end_user, thread_id=w.mine.pk, input="hello"
    )
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there: the streams are down
    socket, hello = await _open(w, w.mine, w.a.member)
    try:
        assert hello["active_run"]
        answer = await socket.receive_json_from(timeout=WAIT)
        assert answer["type"] == "error" and answer["code"] == "unavailable"
        assert "unavailable right now" in answer["message"]  # the stream, not a reader bug
        assert await socket.receive_nothing(timeout=0.3)  # retried meanwhile, said once
        # The worker saves the reply while the stream is still down.
        await Run.objects.for_tenant(w.a.tenant).filter(pk=run.pk).aupdate(status=RunStatus.SUCCESS)
        ended = await socket.receive_json_from(timeout=WAIT)
        assert ended == {"type": "run.ended", "run_id": str(run.pk), "status": "success"}
    finally:
        await socket.disconnect()


@pytestmark_ws
async def test_a_stream_that_fails_once_is_followed_again_from_the_last_event(
    monkeypatch, _close_async_clients
):
    from conversations import events as ev

    monkeypatch.setattr(consumers, "RETRY_FIRST_S", 0.01)
    real = streams.follow_raw
    calls: list[str] = []

    async def fails_once(run_id, after="0-0", **kwargs):
        calls.append(after)
        async for entry in real(run_id, after, **kwargs):
            yield entry
            if len(calls) == 1:
                raise streams.StreamUnavailable("Redis went away")

    monkeypatch.setattr(streams, "follow_raw", fails_once)
    w = await database_sync_to_async(_setup)()
    run = await database_sync_to_async(services.run_create)(
        tenant=w.a.tenant, end_user=w.mine.end_user, thread_id=w.mine.pk, input="hello"
    )
    held = await database_sync_to_async(executor.claim)(run.pk, owner="t")
    ids = await streams.append(
        run.pk, held.attempt,
        [ev.status("running"), ev.message_delta("Hel", agent="Calc"),
         ev.message_delta("lo", agent="Calc")],
    )  # fmt: skip
    socket, _ = await _open(w, w.mine, w.a.member)
    try:
        first = await socket.receive_json_from(timeout=WAIT)
        assert first["id"] == ids[0] and first["event"]["status"] == "running"
        outage = await socket.receive_json_from(timeout=WAIT)
        assert outage["type"] == "error" and outage["code"] == "unavailable"
        back = await socket.receive_json_from(timeout=WAIT)
        assert back == {"type": "live", "run_id": str(run.pk)}
        rest = [await socket.receive_json_from(timeout=WAIT) for _ in ids[1:]]
        assert [(m["id"], m["event"].get("text")) for m in rest] == [
            (ids[1], "Hel"), (ids[2], "lo"),
        ]  # fmt: skip
        await streams.finish(run.pk, held.attempt, ev.status("success"))
        last = await socket.receive_json_from(timeout=WAIT)
        assert last["event"]["type"] == "run.status" and last["event"]["status"] == "success"
        assert calls == ["0-0", ids[0]]
    finally:
        await socket.disconnect()


@pytestmark_ws
async def test_removing_the_membership_closes_the_chat_socket(_close_async_clients):
    w = await database_sync_to_async(_setup)()
    socket, _ = await _open(w, w.mine, w.a.member)
    try:
        await database_sync_to_async(tenant_services.membership_remove)(
            tenant=w.a.tenant, actor=await database_sync_to_async(w.a.actor)(w.a.owner),
            membership_id=w.a.member_membership.pk,
        )  # fmt: skip
        assert (await socket.receive_json_from(timeout=WAIT))["type"] == "revoked"
        closing = await socket.receive_output(timeout=WAIT)
        assert closing == {"type": "websocket.close", "code": CLOSE_REVOKED}
    finally:
        await socket.disconnect()


@pytest.mark.parametrize(
    "message",
    [
        {"type": "send", "text": "still here?"},
        {"type": "cancel"},
        {"type": "resume", "run_id": "00000000-0000-0000-0000-000000000000", "after": "0-0"},
    ],
    ids=["send", "cancel", "resume"],
)
@pytestmark_ws
async def test_a_removed_member_whose_revoke_was_lost_is_refused_and_closed(
    kicked, message, _close_async_clients
):
    """The channel layer delivers at most once: what the client asks for looks again."""
    from tenants.models import Membership

    w = await database_sync_to_async(_setup)()
    socket, _ = await _open(w, w.mine, w.a.member)
    try:
        await database_sync_to_async(
            lambda: (
                Membership.objects.for_tenant(w.a.tenant)
                .filter(pk=w.a.member_membership.pk)
                .delete()
            )
        )()  # removed, and the socket was told nothing
        await socket.send_json_to(message)
        answer = await socket.receive_json_from(timeout=WAIT)
        assert answer == {"type": "revoked", "reason": "membership removed"}
        closing = await socket.receive_output(timeout=WAIT)
        assert closing == {"type": "websocket.close", "code": CLOSE_REVOKED}
        assert kicked == []  # no run was started
    finally:
        await socket.disconnect()


@pytestmark_ws
async def test_a_thread_deleted_unheard_is_found_by_the_followers_heartbeat(
    monkeypatch, _close_async_clients
):
    from conversations import events as ev
    from conversations.models import Thread

    monkeypatch.setattr(consumers, "HEARTBEAT_S", 0.2)
    w = await database_sync_to_async(_setup)()
    run = await database_sync_to_async(services.run_create)(
        tenant=w.a.tenant, end_user=w.mine.end_user, thread_id=w.mine.pk, input="hello"
    )
    held = await database_sync_to_async(executor.claim)(run.pk, owner="t")
    await streams.append(run.pk, held.attempt, [ev.status("running")])
    socket, _ = await _open(w, w.mine, w.a.member)
    try:
        assert (await socket.receive_json_from(timeout=WAIT))["event"]["status"] == "running"
        await database_sync_to_async(
            lambda: Thread.objects.for_tenant(w.a.tenant).filter(pk=w.mine.pk).delete()
        )()  # deleted, and the socket was told nothing
        answer = await socket.receive_json_from(timeout=WAIT)
        assert answer == {"type": "revoked", "reason": "thread deleted"}
    finally:
        await socket.disconnect()


@pytestmark_ws
async def test_a_run_started_elsewhere_is_followed_by_open_chats(_close_async_clients):
    """A run created by any source (the REST API, a schedule) shows up in the open chat."""
    w = await database_sync_to_async(_setup)()
    socket, _ = await _open(w, w.mine, w.a.member)
    try:
        run = await database_sync_to_async(services.run_create)(
            tenant=w.a.tenant,
            end_user=w.mine.end_user,
            thread_id=w.mine.pk,
            input=CALC,
            source="api",
        )
        started = await socket.receive_json_from(timeout=WAIT)
        assert started == {"type": "run.started", "run_id": str(run.pk)}
        assert await _execute(run.pk) == RunStatus.SUCCESS
        got = await _until_terminal(socket)
        assert "42" in "".join(
            m["event"]["text"] for m in got if m["event"].get("type") == "message.delta"
        )
    finally:
        await socket.disconnect()


@pytestmark_ws
async def test_deleting_a_thread_closes_its_open_chats(_close_async_clients):
    w = await database_sync_to_async(_setup)()
    socket, _ = await _open(w, w.mine, w.a.member)
    try:
        await database_sync_to_async(services.thread_delete)(
            tenant=w.a.tenant, end_user=w.mine.end_user, thread_id=w.mine.pk
        )
        assert (await socket.receive_json_from(timeout=WAIT))["type"] == "revoked"
        assert (await socket.receive_output(timeout=WAIT))["code"] == CLOSE_REVOKED
    finally:
        await socket.disconnect()


async def test_a_cancelled_socket_ends_even_while_a_follower_is_still_stopping():
    """A follower may take a moment to end once cancelled. The socket's own cancellation (a
    client gone, the event loop shutting down) must not be swallowed meanwhile: a consumer that
    swallowed it went back to waiting for messages that never come, and hung the shutdown."""
    from conversations.consumers import ChatConsumer

    release = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await release.wait()

    consumer = ChatConsumer()
    follower = asyncio.create_task(slow_to_stop())
    consumer.followers = {"run": follower}
    await asyncio.sleep(0)
    stopping = asyncio.create_task(consumer._stop_following())
    try:
        await asyncio.sleep(0.01)  # it is waiting for the follower now
        stopping.cancel()
        await asyncio.wait([stopping], timeout=2)
        assert stopping.cancelled()
    finally:
        release.set()
        await asyncio.wait_for(asyncio.wait([follower, stopping]), 2)


# --- Failures only an owner or admin can act on ------------------------------------------------


def _refused_key_setup(settings):
    settings.EGRESS_ALLOWED_NETWORKS = ["127.0.0.0/8", "::1/128"]
    settings.RUN_MODEL_RETRIES = 0
    w = _setup()
    fake = FakeOpenAIServer(api_key="sk-the-right-key").start()
    provider = agent_services.provider_create(
        tenant=w.a.tenant, actor=w.a.actor(), name="Wrong key", base_url=fake.base_url,
        default_model="fake-model", api_key="sk-a-wrong-key-123",
    )  # fmt: skip
    agent_services.draft_save(
        tenant=w.a.tenant, actor=w.a.actor(), agent_id=w.agent.pk,
        config={"provider_id": str(provider.pk), "tools": [{"name": "calculator"}]},
    )  # fmt: skip
    agent_services.agent_publish(tenant=w.a.tenant, actor=w.a.actor(), agent_id=w.agent.pk)
    return w, fake


@database_sync_to_async
def _set_role(world, membership, role):
    tenant_services.membership_change_role(
        tenant=world.tenant, actor=world.actor(), membership_id=membership.pk, role=role
    )


async def _failed_run(socket, text="hello"):
    await socket.send_json_to({"type": "send", "text": text})
    created = await socket.receive_json_from(timeout=WAIT)
    assert created["type"] == "run.created"
    assert await _execute(created["run_id"]) == RunStatus.ERROR
    return (await _until_terminal(socket))[-1]["event"]


@pytestmark_ws
async def test_a_refused_key_is_told_to_members_as_a_setup_problem_and_to_admins_as_it_is(
    settings, monkeypatch, _close_async_clients
):
    w, fake = await database_sync_to_async(_refused_key_setup)(settings)
    admin_thread = await database_sync_to_async(_thread)(w.a, w.a.admin, w.agent)
    member, _ = await _open(w, w.mine, w.a.member)
    admin, _ = await _open(w, admin_thread, w.a.admin)
    refused = "The model provider refused the API key (HTTP 401). Check the key in the provider."
    setup = "This agent cannot answer right now: something in its setup needs fixing."
    try:
        told = await _failed_run(member)
        assert told["status"] == "error" and told["message"].startswith(setup)
        assert "detail" not in told and "key" not in told["message"]
        seen = await _failed_run(admin)
        assert seen["message"].startswith(setup) and seen["detail"] == refused

        # The inspector keeps the admin's reason and what the end user read.
        run = await Run.objects.for_tenant(w.a.tenant).filter(thread=w.mine).aget()
        assert run.error == refused and run.end_user_error.startswith(setup)

        # After a reload: the member's history says what the member was told, the admin's
        # what to fix; the run's page both.
        def pages():
            mine = w.a.client_for(w.a.member).get(_url("chat-thread", w.a, thread_id=w.mine.pk))
            theirs = w.a.client_for(w.a.admin).get(
                _url("chat-thread", w.a, thread_id=admin_thread.pk)
            )
            inspected = w.a.client_for(w.a.admin).get(_url("run-detail", w.a, run_id=run.pk))
            return mine.content.decode(), theirs.content.decode(), inspected.content.decode()

        mine, theirs, inspected = await database_sync_to_async(pages)()
        assert f"<strong>No reply:</strong> {setup}" in mine and "Check the key" not in mine
        assert f"<strong>No reply:</strong> {refused}" in theirs
        assert refused in inspected and f"The end user was told: {setup}" in inspected

        # Made an admin while the chat is open: the next failure says what to fix.
        await _set_role(w.a, w.a.member_membership, "admin")
        promoted = await _failed_run(member, "again")
        assert promoted["detail"] == refused

        # A demotion whose message the channel layer lost: the socket reads the role again
        # with its client's next message.
        monkeypatch.setattr(realtime, "role_changed", lambda *args, **kwargs: None)

        await _set_role(w.a, w.a.admin_membership, "member")
        demoted = await _failed_run(admin, "once more")
        assert "detail" not in demoted and demoted["message"].startswith(setup)
    finally:
        await member.disconnect()
        await admin.disconnect()
        fake.stop()

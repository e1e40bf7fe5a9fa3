"""The run inspector: the runs list (filters, keyset pages, live refresh), a run's page with its
timeline built from a real run's trace, stopping a run, a thread's transcript; who may see them,
and that untrusted text and secrets stay where they belong."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from asgiref.sync import async_to_sync
from django.urls import reverse
from django.utils import timezone

from ai_agents import services as agent_services
from controlplane.errors import ValidationFailed
from conversations import executor, inspector, services, streams
from conversations.models import Item, Run, RunStatus, Thread
from tenants.models import AuditEvent


def _agent(world, name="Calc", tools=("calculator",)):
    agent = agent_services.agent_create(
        tenant=world.tenant,
        actor=world.actor(),
        name=name,
        config={"tools": [{"name": t} for t in tools]},
    )
    agent_services.agent_publish(tenant=world.tenant, actor=world.actor(), agent_id=agent.pk)
    agent.refresh_from_db()
    return agent


def _thread(world, agent, end_user=None):
    end_user = end_user or services.end_user_for_member(tenant=world.tenant, user=world.member)
    return services.thread_create(tenant=world.tenant, end_user=end_user, agent_id=agent.pk)


def _run(world, agent, *, end_user=None, status=RunStatus.SUCCESS, ago=None, **fields):
    """A run row as the executor leaves it (each on its own thread, so several can be active)."""
    thread = _thread(world, agent, end_user)
    created = timezone.now() - (ago or timedelta(minutes=1))
    return Run.objects.create(
        tenant=world.tenant,
        thread=thread,
        agent=agent,
        version=agent.published_version,
        end_user=thread.end_user,
        status=status,
        source=fields.pop("source", "chat"),
        input=fields.pop("input", [{"role": "user", "content": "hi"}]),
        created_at=created,
        started_at=created + timedelta(milliseconds=120),
        finished_at=None
        if status in (RunStatus.PENDING, RunStatus.RUNNING)
        else created + timedelta(seconds=2),
        attempt=fields.pop("attempt", 1),
        **fields,
    )


def _shown(response) -> list[str]:
    return re.findall(r'data-run-id="([0-9a-f-]{36})"', response.content.decode())


def _list(client, world, **query):
    return client.get(reverse("run-list", args=[world.tenant.slug]), query)


def _detail(client, world, run, **query):
    return client.get(reverse("run-detail", args=[world.tenant.slug, run.pk]), query)


@pytest.fixture
def admin(world_a):
    return world_a.client_for(world_a.admin)


# --- A real run, end to end -------------------------------------------------------------------


def test_a_real_runs_page_shows_its_timeline_timings_tokens_and_reply(
    world_a, admin, django_capture_on_commit_callbacks
):
    agent = _agent(world_a)
    thread = _thread(world_a, agent)
    run = services.run_create(
        tenant=world_a.tenant,
        end_user=thread.end_user,
        thread_id=thread.pk,
        input="use the calculator to compute 6 * 7",
        actor=world_a.actor(world_a.member),
    )
    held = executor.claim(run.pk, owner="test")
    assert async_to_sync(executor.execute)(held) == RunStatus.SUCCESS
    run.refresh_from_db()
    kinds = [s["kind"] for s in run.trace]
    assert "first_token" in kinds  # the executor marks when the first text streamed
    assert {s.get("model") for s in run.trace if s["kind"] == "model_call"} == {"offline"}

    response = _detail(admin, world_a, run)
    assert response.status_code == 200
    page = response.content.decode()
    assert "run-status-success" in page
    assert "Model call · offline" in page and "Tool · calculator" in page
    assert "6 * 7" in page and "42" in page  # the tool's arguments and result, and the reply
    assert f">{run.total_tokens}<" in page and run.total_tokens > 0
    assert reverse("agent-detail", args=[world_a.tenant.slug, agent.pk]) in page
    assert reverse("thread-transcript", args=[world_a.tenant.slug, thread.pk]) in page
    assert world_a.member.email in page  # the end user, and who started it
    assert "after the attempt started" in page  # time to first token
    assert "hx-trigger" not in page  # a finished run does not poll
    assert "Raw trace (JSON)" in page and "&quot;kind&quot;: &quot;first_token&quot;" in page
    # The waterfall: every bar lies within the run.
    xs = [float(x) for x in re.findall(r'<rect x="([\d.]+)%"', page)]
    widths = [float(w) for w in re.findall(r'width="([\d.]+)%"', page)]
    assert xs and all(0 <= x <= 100 for x in xs)
    assert all(0 <= x + w <= 100.01 for x, w in zip(xs, widths, strict=True))

    listed = _list(admin, world_a)
    assert _shown(listed) == [str(run.pk)]
    row = listed.content.decode()
    assert "Calc" in row and "run-status-success" in row
    assert re.search(r"\d+(\.\d+)? ms|\d+\.\d+ s", row)  # duration and time to first token


def test_the_timeline_orders_spans_by_start_and_shows_every_kind():
    trace = [
        {"kind": "mcp_server", "at_ms": 3.0, "name": "docs", "connected": False, "error": "down"},
        {"kind": "guardrail", "at_ms": 5.0, "side": "input", "name": "pii", "tripped": True},
        {"kind": "model_call", "at_ms": 400.0, "duration_ms": 390.0, "model": "gpt-x"},
        {"kind": "retry", "at_ms": 420.0, "reason": "429 from the provider", "attempt": 2},
        {"kind": "tool_call", "at_ms": 900.0, "duration_ms": 300.0, "tool": "search"},
        {"kind": "handoff", "at_ms": 950.0, "from_agent": "Triage", "to_agent": "Billing"},
        {"kind": "end", "at_ms": 1000.0, "status": "error", "message": "Too many turns."},
    ]
    tl = inspector.timeline(trace)
    assert [s.kind for s in tl.steps] == [
        "mcp_server",
        "guardrail",
        "model_call",
        "retry",
        "tool_call",
        "handoff",
        "end",
    ]
    assert tl.total_ms == 1000.0 and (tl.model_calls, tl.tool_calls, tl.retries) == (1, 1, 1)
    model = tl.steps[2]
    assert (model.start_ms, model.offset_pct, model.width_pct) == (10.0, 1.0, 39.0)
    tool = tl.steps[4]
    assert (tool.offset_pct, tool.width_pct) == (60.0, 30.0)
    assert tl.steps[0].tone == "error" and tl.steps[1].badge == "tripped"
    assert ("Agent", "Billing") not in tl.steps[0].facts
    # A server of an agent handed off to connects when the handoff reaches it: named with it.
    [reached] = inspector.timeline(
        [{"kind": "mcp_server", "at_ms": 960.0, "name": "ledger", "agent": "Billing"}]
    ).steps
    assert reached.facts[0] == ("Agent", "Billing")
    # A configured check is named as the agent editor names it, not by its runtime id.
    checks = inspector.timeline(
        [{"kind": "guardrail", "at_ms": 1.0, "side": "output", "name": "output:1:blocked_words"}]
    )
    assert checks.steps[0].title == "Guardrail · Blocked words (output check 2)"
    assert tl.steps[1].title == "Guardrail · pii (input)"
    retry = tl.steps[3]  # a kind this page has no special case for: every field is shown
    assert ("Reason", "429 from the provider") in retry.facts and ("Attempt", "2") in retry.facts
    assert tl.first_output_ms == 400.0 and tl.first_token_ms is None
    assert inspector.timeline("not a list").steps == []  # a damaged trace is no 500


# --- The list: filters, pages, live refresh ---------------------------------------------------


@pytest.fixture
def many(world_a):
    """Runs that differ in one filterable property each."""
    calc, other = _agent(world_a), _agent(world_a, "Writer", tools=())
    ext = services.end_user_for_external(
        tenant=world_a.tenant, external_id="crm-4711", display_name="Dana Scully"
    )
    return {
        "ok": _run(world_a, calc),
        "error": _run(world_a, calc, status=RunStatus.ERROR, error="The provider said 401."),
        "writer": _run(world_a, other),
        "external": _run(world_a, calc, end_user=ext, source="api"),
        "old": _run(world_a, calc, ago=timedelta(days=3)),
        "running": _run(world_a, calc, status=RunStatus.RUNNING),
        "calc": calc,
        "other": other,
    }


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"status": "error"}, ["error"]),
        ({"status": "active"}, ["running"]),
        ({"source": "api"}, ["external"]),
        ({"user": "scully"}, ["external"]),
        ({"user": "4711"}, ["external"]),
        ({"user": "member@acme"}, ["ok", "error", "writer", "old", "running"]),
        ({"range": "24h"}, ["ok", "error", "writer", "external", "running"]),
    ],
)
def test_filters_narrow_the_list(world_a, admin, many, query, expected):
    shown = set(_shown(_list(admin, world_a, **query)))
    assert shown == {str(many[k].pk) for k in expected}


def test_filter_by_agent_and_by_explicit_dates(world_a, admin, many):
    assert _shown(_list(admin, world_a, agent=str(many["other"].pk))) == [str(many["writer"].pk)]
    editor = admin.get(reverse("agent-detail", args=[world_a.tenant.slug, many["other"].pk]))
    runs_url = reverse("run-list", args=[world_a.tenant.slug]) + f"?agent={many['other'].pk}"
    assert f'href="{runs_url}"' in editor.content.decode()  # the agent's page links its runs
    old = many["old"].created_at
    response = _list(
        admin,
        world_a,
        since=(old - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M"),
        until=(old + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M"),
    )
    assert _shown(response) == [str(many["old"].pk)]


def test_the_list_is_newest_first_and_shows_the_error_and_cost(world_a, admin, many):
    Run.objects.for_tenant(world_a.tenant).filter(pk=many["ok"].pk).update(cost=Decimal("0.0042"))
    response = _list(admin, world_a)
    times = [r.created_at for r in Run.objects.for_tenant(world_a.tenant).order_by("-created_at")]
    assert _shown(response) == [
        str(r.pk) for r in Run.objects.for_tenant(world_a.tenant).order_by("-created_at")
    ]
    assert times == sorted(times, reverse=True)
    page = response.content.decode()
    assert "The provider said 401." in page and "$0.0042" in page


@pytest.mark.parametrize(
    ("amount", "shown"),
    [
        ("0.10", "$0.10"),  # cents, never "$0.1"
        ("0.5", "$0.50"),
        ("0.0123", "$0.0123"),  # below a dollar, the digits a small amount has
        ("0.99995", "$1.00"),
        ("1234.5", "$1,234.50"),  # as the usage page writes it
        ("12.3", "$12.30"),
    ],
)
def test_a_runs_cost_is_written_in_dollars_and_cents_on_the_list_and_its_page(
    world_a, admin, amount, shown
):
    run = _run(world_a, _agent(world_a), cost=Decimal(amount), total_tokens=100)
    cell = re.search(
        r'data-label="Cost"[^>]*>(.*?)</td>', _list(admin, world_a).content.decode(), re.S
    )
    assert cell and re.sub(r"<[^>]+>", "", cell.group(1)).strip() == shown
    assert f"<dt>Cost</dt><dd>{shown}</dd>" in _detail(admin, world_a, run).content.decode()


def test_a_runs_tokens_are_written_with_thousands_separators(world_a, admin):
    run = _run(
        world_a, _agent(world_a), input_tokens=47_000, output_tokens=1_211, total_tokens=48_211
    )
    listed = _list(admin, world_a).content.decode()
    assert re.search(r'title="47,000 in, 1,211 out">48,211</td>', listed)
    page = _detail(admin, world_a, run).content.decode()
    assert "<dt>Input tokens</dt><dd>47,000</dd>" in page
    assert "<dt>Total tokens</dt><dd><strong>48,211</strong></dd>" in page


def test_a_time_that_rounds_up_to_the_next_unit_is_written_in_that_unit(world_a, admin):
    run = _run(world_a, _agent(world_a), trace=[{"kind": "first_token", "at_ms": 999.7}])
    Run.objects.for_tenant(world_a.tenant).filter(pk=run.pk).update(
        finished_at=run.started_at + timedelta(milliseconds=59_999.7)
    )
    listed = _list(admin, world_a).content.decode()
    assert re.search(r'data-label="First token"[^>]*>1\.00 s<', listed)  # not "1000 ms"
    assert re.search(r'data-label="Duration"[^>]*>1 min<', listed)  # not "60.0 s"
    page = _detail(admin, world_a, run).content.decode()
    assert "<dt>Duration</dt><dd>1 min</dd>" in page


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"status": "exploded"}, "Status: Select a valid choice"),
        ({"agent": "not-an-agent"}, "Agent: Select a valid choice"),
        ({"since": "yesterday-ish"}, "From (UTC): Enter a valid date/time"),
        ({"since": "2026-02-02T10:00", "until": "2026-02-01T10:00"}, "must be after"),
        ({"before": "garbage"}, "This page link is not valid"),
        ({"thread": "12"}, "Conversation: The link to a conversation&#x27;s runs is not valid"),
    ],
)
def test_bad_filter_input_gets_a_clear_message(world_a, admin, many, query, message):
    response = _list(admin, world_a, **query)
    assert response.status_code == 200
    assert message in response.content.decode()
    assert _shown(response) == []


def test_keyset_pages_walk_every_run_once(world_a, admin, django_assert_max_num_queries):
    agent = _agent(world_a)
    thread = _thread(world_a, agent)
    now = timezone.now()
    same_time = now - timedelta(minutes=5)  # ties on created_at are broken by id
    runs = Run.objects.bulk_create(
        Run(
            tenant=world_a.tenant,
            thread=thread,
            agent=agent,
            version=agent.published_version,
            end_user=thread.end_user,
            status=RunStatus.SUCCESS,
            source="chat",
            created_at=same_time if i % 3 == 0 else now - timedelta(seconds=i),
        )
        for i in range(inspector.PAGE_SIZE + 12)
    )
    with django_assert_max_num_queries(12):
        first = _list(admin, world_a)
    assert len(_shown(first)) == inspector.PAGE_SIZE
    older = re.search(r'href="\?before=([^"]+)"', first.content.decode())
    assert older, "an Older link"
    second = admin.get(
        reverse("run-list", args=[world_a.tenant.slug]) + "?before=" + older.group(1)
    )
    assert len(_shown(second)) == 12
    assert "Older" not in second.content.decode() and "Newest" in second.content.decode()
    assert sorted(_shown(first) + _shown(second)) == sorted(str(r.pk) for r in runs)


def test_filters_survive_paging_and_htmx_gets_only_the_table(world_a, admin, many):
    response = admin.get(
        reverse("run-list", args=[world_a.tenant.slug]),
        {"status": "error"},
        HTTP_HX_REQUEST="true",
        HTTP_HX_TARGET="run-table",
    )
    body = response.content.decode()
    assert body.lstrip().startswith('<div id="run-table"')
    assert "<html" not in body and _shown(response) == [str(many["error"].pk)]


def test_the_list_polls_only_while_a_shown_run_is_active(world_a, admin, many):
    assert 'hx-trigger="every 3s"' in _list(admin, world_a).content.decode()
    finished = _list(admin, world_a, status="success").content.decode()
    assert "every 3s" not in finished


def test_another_tenants_runs_are_never_listed(world_a, world_b, many):
    b_agent = _agent(world_b)
    _run(world_b, b_agent)
    found = inspector.run_search(tenant=world_b.tenant, filters=inspector.RunFilters())
    assert {r.tenant_id for r in found.runs} == {world_b.tenant.pk}
    client = world_b.client_for(world_b.owner)
    assert not set(_shown(_list(client, world_b))) & {
        str(r.pk) for r in Run.objects.for_tenant(world_a.tenant)
    }


def test_the_runs_of_one_thread(world_a, admin, many):
    thread = many["ok"].thread
    assert _shown(_list(admin, world_a, thread=str(thread.pk))) == [str(many["ok"].pk)]


# --- Permissions ------------------------------------------------------------------------------


def test_members_get_403_and_admins_and_owners_get_in(world_a, many):
    run = many["running"]
    slug = world_a.tenant.slug
    urls = [
        reverse("run-list", args=[slug]),
        reverse("run-detail", args=[slug, run.pk]),
        reverse("thread-transcript", args=[slug, run.thread_id]),
    ]
    member = world_a.client_for(world_a.member)
    for url in urls:
        assert member.get(url).status_code == 403
    assert member.post(reverse("run-cancel", args=[slug, run.pk])).status_code == 403
    run.refresh_from_db()
    assert run.status == RunStatus.RUNNING
    for user in (world_a.owner, world_a.admin):
        client = world_a.client_for(user)
        assert all(client.get(url).status_code == 200 for url in urls)
    nav = world_a.client_for(world_a.admin).get(urls[0]).content.decode()
    assert f'href="{urls[0]}" aria-current="page">Runs<' in nav
    assert ">Runs<" not in member.get(reverse("chat-home", args=[slug])).content.decode()


# --- Untrusted text and secrets ---------------------------------------------------------------


def test_tool_arguments_outputs_reply_and_error_are_escaped(world_a, admin):
    agent = _agent(world_a)
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    run = _run(
        world_a,
        agent,
        status=RunStatus.ERROR,
        input=[{"role": "user", "content": evil}],
        output=None,
        error=f"Tool failed: {evil}",
        trace=[
            {
                "kind": "tool_call",
                "at_ms": 10.0,
                "duration_ms": 5.0,
                "tool": evil,
                "arguments": '{"q": "' + evil.replace('"', '\\"') + '"}',
                "output": evil,
            },
            {"kind": "mystery", "at_ms": 11.0, "payload": evil},
        ],
    )
    Item.objects.create(
        tenant=world_a.tenant,
        thread=run.thread,
        run=run,
        data={"role": "assistant", "content": f"Sure! {evil} [click](javascript:alert(1))"},
    )
    page = _detail(admin, world_a, run).content.decode()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert 'href="javascript:' not in page  # a model-chosen script link is not a link
    assert "&lt;script&gt;alert(" in page  # shown as text, not dropped


def test_a_reply_is_rendered_as_sanitised_markdown(world_a, admin):
    agent = _agent(world_a)
    run = _run(world_a, agent, output="**Bold** <iframe src=https://evil.example></iframe>")
    page = _detail(admin, world_a, run).content.decode()
    assert "<strong>Bold</strong>" in page and "<iframe" not in page


def test_the_api_key_is_named_never_revealed(world_a, admin):
    agent = _agent(world_a)
    run = _run(
        world_a, agent, source="api", api_key=world_a.admin_key, metadata={"ticket": "T-981"}
    )
    page = _detail(admin, world_a, run).content.decode()
    assert "T-981" in page  # the integrator's metadata
    assert "Acme admin key" in page and f"cp_{world_a.admin_key.prefix}_" in page
    assert world_a.admin_key_raw not in page and world_a.admin_key.key_hash not in page


# --- An active run: progress and stop ---------------------------------------------------------


def test_an_active_run_shows_its_progress_and_an_admin_can_stop_it(
    world_a, admin, django_capture_on_commit_callbacks
):
    agent = _agent(world_a)
    thread = _thread(world_a, agent)
    run = services.run_create(
        tenant=world_a.tenant, end_user=thread.end_user, thread_id=thread.pk, input="hello"
    )
    held = executor.claim(run.pk, owner="test")
    streams.claim_sync(run.pk, held.attempt)
    streams.append_sync(
        run.pk,
        held.attempt,
        [
            {"type": "run.status", "status": "running", "attempt": 1},
            {"type": "tool.started", "call_id": "c1", "tool": "calculator", "arguments": "{}"},
            {"type": "message.delta", "text": "Hello the", "agent": "Calc"},
        ],
    )
    page = _detail(admin, world_a, run).content.decode()
    assert 'hx-trigger="every 2s"' in page
    assert "9 characters of reply streamed" in page and "running now" in page
    assert "Stop run" in page

    url = reverse("run-cancel", args=[world_a.tenant.slug, run.pk])
    with django_capture_on_commit_callbacks(execute=True):
        response = admin.post(url, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    body = response.content.decode()
    assert "The run is stopped." in body and "run-status-cancelled" in body
    assert "every 2s" not in body and "Stop run" not in body
    # Who stopped it, said as a reason, not as a failure; the reply it had begun is its output.
    assert (
        f"Why it ended:</strong> Stopped by {world_a.admin.email} from the run inspector." in body
    )
    assert "What went wrong" not in body
    assert "Stopped mid-reply" in body and "Hello the" in body
    # The end user's chat is told an administrator stopped the reply.
    assert streams.read_sync(run.pk)[-1][1]["message"] == "Stopped by an administrator."
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
    Thread.objects.for_tenant(world_a.tenant).get(pk=thread.pk)  # the thread is still there
    events = AuditEvent.objects.for_tenant(world_a.tenant).filter(action="run.cancel")
    assert [(e.actor_label, e.target_id, e.changes) for e in events] == [
        (
            world_a.actor(world_a.admin).label,
            str(run.pk),
            {"status": ["running", "cancelled"]},
        )
    ]
    # Stopping an ended run changes nothing and records nothing.
    again = admin.post(url)
    assert again.status_code == 302
    assert events.count() == 1


# --- The transcript ---------------------------------------------------------------------------


def test_the_transcript_shows_any_end_users_thread_and_pages_back(world_a, admin):
    agent = _agent(world_a)
    ext = services.end_user_for_external(tenant=world_a.tenant, external_id="crm-1")
    thread = _thread(world_a, agent, ext)
    for i in range(60):
        Item.objects.create(
            tenant=world_a.tenant,
            thread=thread,
            data={"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i:02}"},
        )
    url = reverse("thread-transcript", args=[world_a.tenant.slug, thread.pk])
    page = admin.get(url).content.decode()
    assert "message 59" in page and "message 05" not in page and "crm-1" in page
    assert re.search(r'class="muted small">Calc\s', page)  # who wrote the replies
    earlier = re.search(r'href="\?before=(\d+)"', page)
    assert earlier
    older = admin.get(
        url, {"before": earlier.group(1), "fragment": "transcript-items"}, HTTP_HX_REQUEST="true"
    )
    assert "message 05" in older.content.decode() and "<html" not in older.content.decode()


# --- Playground runs --------------------------------------------------------------------------


def test_playground_runs_are_listed_apart_and_open_with_their_timeline(world_a, world_b, admin):
    agent = _agent(world_a)
    tested = agent_services.playground_run(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        agent_id=agent.pk,
        input="use the calculator to compute 6 * 7",
    )
    b_agent = _agent(world_b)
    theirs = agent_services.playground_run(
        tenant=world_b.tenant, actor=world_b.actor(), agent_id=b_agent.pk, input="hi"
    )
    _run(world_a, agent)  # a conversation run is not a playground run
    slug = world_a.tenant.slug
    listed = admin.get(reverse("playground-run-list", args=[slug]))
    assert _shown(listed) == [str(tested.pk)]
    assert str(theirs.pk) not in listed.content.decode()
    assert _shown(admin.get(reverse("playground-run-list", args=[slug]), {"range": "1h"})) == [
        str(tested.pk)
    ]
    bad = admin.get(reverse("playground-run-list", args=[slug]), {"agent": "nope"})
    assert "Agent: Select a valid choice" in bad.content.decode()
    page = admin.get(reverse("playground-run-detail", args=[slug, tested.pk])).content.decode()
    assert "Tool · calculator" in page and "Model call · offline" in page and "42" in page
    assert world_a.owner.email in page  # who tested it
    member = world_a.client_for(world_a.member)
    assert member.get(reverse("playground-run-list", args=[slug])).status_code == 403
    assert member.get(reverse("playground-run-detail", args=[slug, tested.pk])).status_code == 403


def test_a_cursor_keeps_the_exact_microsecond():
    run = Run(created_at=timezone.now().replace(microsecond=999_999))
    when, run_id = inspector.parse_cursor(inspector.cursor_for(run))
    assert (when, run_id) == (run.created_at, run.pk)
    for bad in ("", "12", "x_y", "99999999999999999999999_" + str(run.pk)):
        with pytest.raises(ValidationFailed):
            inspector.parse_cursor(bad)


def test_the_list_says_how_often_a_runs_model_calls_were_tried_again(world_a, admin):
    agent = _agent(world_a)
    retry = {"kind": "retry", "reason": "rate_limited", "at_ms": 10, "retry": 1}
    twice = _run(world_a, agent, trace=[retry, {**retry, "retry": 2}, {"kind": "end"}])
    once = _run(world_a, agent, trace=[retry])
    never = _run(world_a, agent, trace=[{"kind": "end"}])
    page = _list(admin, world_a).content.decode()

    def row(run):
        return page.split(f'data-run-id="{run.pk}"', 1)[1].split("</tr>", 1)[0]

    assert "2 model retries" in row(twice) and "1 model retry<" in row(once)
    assert "model retr" not in row(never)

"""Usage, cost and budgets: prices, what a finished run records and to whom, the fencing of a
superseded attempt, the monthly budget (warn, stop, reset), the usage page, CSV and the API."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html import unescape
from html.parser import HTMLParser

import pytest
from django.utils import timezone

from ai_agents import services as agent_services
from ai_agents.runtime.execute import RunOutcome
from controlplane.errors import ValidationFailed
from conversations import executor, services
from conversations.models import Run
from tenants.actors import Actor
from tenants.models import AuditEvent
from usage import services as usage_services
from usage.errors import BudgetExhausted
from usage.models import Budget, MonthlyUsage, UsageRecord


def _call(model="gpt-4o", provider=None, inp=1000, cached=0, out=500, agent="Helper"):
    return {
        "kind": "model_call",
        "agent": agent,
        "model": model,
        "provider_id": str(provider.pk) if provider else None,
        "provider": provider.name if provider else "",
        "input_tokens": inp,
        "cached_input_tokens": cached,
        "output_tokens": out,
        "total_tokens": inp + out,
    }


@pytest.fixture
def setup(world_a):
    actor = world_a.actor()
    provider = agent_services.provider_create(
        tenant=world_a.tenant,
        actor=actor,
        name="openai",
        base_url="https://api.openai.example.com/v1",
        default_model="gpt-4o",
        api_key="sk-test-usage-key",
    )
    agent = agent_services.agent_create(tenant=world_a.tenant, actor=actor, name="Helper")
    agent_services.agent_publish(tenant=world_a.tenant, actor=actor, agent_id=agent.pk)
    member = services.end_user_for_member(tenant=world_a.tenant, user=world_a.member)
    external = services.end_user_for_external(
        tenant=world_a.tenant, external_id="cust-42", display_name="=HYPERLINK(evil)"
    )
    return world_a, provider, agent, member, external


def _price(world, model, provider=None, inp="2.50", cached=None, out="10.00"):
    return usage_services.price_create(
        tenant=world.tenant,
        actor=world.actor(),
        model=model,
        provider_id=provider.pk if provider else None,
        input_per_million=Decimal(inp),
        cached_input_per_million=Decimal(cached) if cached is not None else None,
        output_per_million=Decimal(out),
        note="",
    )


def _finished_run(world, agent, end_user, spans, actor=None, status="success"):
    """A run created through run_create, claimed and finished with `spans` as its trace."""
    thread = services.thread_create(tenant=world.tenant, end_user=end_user, agent_id=agent.pk)
    run = services.run_create(
        tenant=world.tenant, end_user=end_user, thread_id=thread.pk, input="hi", actor=actor
    )
    held = executor.claim(run.pk, owner="test")
    outcome = RunOutcome(
        status if status == "success" else "error", output="ok", message="boom", trace=spans
    )
    assert executor.finish(held, outcome)
    run.refresh_from_db()
    return run


def _records(world, **filters):
    return list(UsageRecord.objects.for_tenant(world.tenant).filter(**filters).order_by("id"))


# --- Cost -----------------------------------------------------------------------------------------


def test_cost_uses_the_provider_price_first_then_the_general_one_and_cached_input(setup):
    world, provider, *_ = setup
    _price(world, "gpt-4o", inp="2.50", cached="1.25", out="10")
    _price(world, "gpt-4o", provider=provider, inp="5", out="20")
    _price(world, "gpt-4o-mini", inp="0.15", cached="0.075", out="0.60")
    calls = [
        _call("gpt-4o", provider, inp=1_000_000, out=0),  # provider's own price: $5
        _call("gpt-4o", None, inp=1_000_000, cached=400_000, out=1_000_000),
        _call("gpt-4o-mini", provider, inp=2_000, out=1_000),
        _call("no-such-model", provider),
        {**_call("offline"), "provider": "builtin"},
    ]
    rates = usage_services.rates_for(world.tenant, calls)
    costs = [usage_services.cost_of(c, rates.get((c["provider_id"], c["model"]))) for c in calls]
    # 600k uncached at 2.50 + 400k cached at 1.25 + 1M output at 10
    assert costs[:3] == [Decimal("5"), Decimal("12"), Decimal("0.0009")]
    assert costs[3] is None  # no price: not silently zero
    assert ("", "offline") not in rates  # the offline model is free by rule, never looked up


def test_other_tenants_prices_do_not_apply(setup, world_b):
    world, provider, *_ = setup
    _price(world_b, "gpt-4o")
    assert usage_services.rates_for(world.tenant, [_call("gpt-4o", provider)]) == {}


# --- Recording and attribution --------------------------------------------------------------------


def test_a_finished_run_records_every_model_call_with_cost_and_attribution(setup):
    world, provider, agent, member, _ = setup
    _price(world, "gpt-4o", inp="2", out="8")
    nested = {"kind": "agent_call", "agent": "other", "model_calls": [_call(inp=500, out=500)]}
    spans = [_call(inp=1000, out=1000), {"kind": "tool_call"}, nested, _call("mystery", provider)]
    run = _finished_run(world, agent, member, spans, actor=world.actor(world.member))

    records = _records(world, run=run)
    assert [r.model for r in records] == ["gpt-4o", "gpt-4o", "mystery"]
    assert [r.cost for r in records] == [Decimal("0.01"), Decimal("0.005"), None]
    assert run.cost == Decimal("0.015")  # the priced calls; the page names the unpriced model
    first = records[0]
    assert (first.agent_id, first.version_id, first.end_user_id) == (
        agent.pk,
        run.version_id,
        member.pk,
    )
    assert (first.user_id, first.api_key_id, first.thread_id) == (
        world.member.pk,
        None,
        run.thread_id,
    )
    assert first.agent_name == "Helper" and first.version_number == 1 and first.source == "chat"
    month = MonthlyUsage.objects.for_tenant(world.tenant).get()
    assert month.total_tokens == 2000 + 1000 + 1500 and month.cost == Decimal("0.015")
    assert month.unpriced_tokens == 1500 and month.calls == 3


def test_the_run_inspector_says_no_price_instead_of_a_cost_of_zero(setup):
    world, provider, agent, member, _ = setup
    _price(world, "gpt-4o", inp="2", out="8")
    unpriced = _finished_run(world, agent, member, [_call("mystery-model", provider, 7, 0, 3)])
    mixed = _finished_run(
        world, agent, member, [_call(inp=1000, out=1000), _call("mystery-model", provider, 7, 0, 3)]
    )
    assert (unpriced.cost, unpriced.unpriced_tokens) == (0, 10)
    admin = world.client_for(world.admin)

    def cost_on_page(run):
        html = admin.get(f"/t/{world.tenant.slug}/runs/{run.pk}/").content.decode()
        return html.split("<dt>Cost</dt><dd>", 1)[1].split("</dd>", 1)[0]

    assert cost_on_page(unpriced) == "no price"
    assert cost_on_page(mixed) == "$0.01 + 10 tokens with no price"
    rows = admin.get(f"/t/{world.tenant.slug}/runs/").content.decode()

    def cost_in_list(run):
        row = rows.split(f'data-run-id="{run.pk}"', 1)[1].split("</tr>", 1)[0]
        cell = row.split('data-label="Cost"', 1)[1].split(">", 1)[1].split("</td>", 1)[0]
        return " ".join(re.sub(r"<[^>]+>", " ", cell).split())  # the text, one line or two

    assert cost_in_list(unpriced) == "no price"
    assert cost_in_list(mixed) == "$0.01 + 10 tokens with no price"


def test_a_run_started_with_an_api_key_is_attributed_to_the_key(setup):
    world, _, agent, _, external = setup
    run = _finished_run(world, agent, external, [_call()], actor=Actor(api_key=world.admin_key))
    (record,) = _records(world, run=run)
    assert record.api_key_id == world.admin_key.pk and record.user_id is None
    assert record.end_user_id == external.pk


def test_failed_runs_count_the_tokens_they_spent(setup):
    world, _, agent, member, _ = setup
    run = _finished_run(world, agent, member, [_call(inp=70, out=30)], status="error")
    assert run.status == "error"
    assert sum(r.total_tokens for r in _records(world, run=run)) == 100
    stopped_early = _finished_run(world, agent, member, [{"kind": "end"}], status="error")
    assert _records(world, run=stopped_early) == [] and stopped_early.cost == 0


def test_a_superseded_attempt_counts_nothing_and_the_winner_counts_once(setup):
    world, _, agent, member, _ = setup
    thread = services.thread_create(tenant=world.tenant, end_user=member, agent_id=agent.pk)
    run = services.run_create(tenant=world.tenant, end_user=member, thread_id=thread.pk, input="hi")
    stale = executor.claim(run.pk, owner="stalled")
    Run.objects.for_tenant(world.tenant).filter(pk=run.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    winner = executor.claim(run.pk, owner="new")
    outcome = RunOutcome("success", output="ok", trace=[_call(inp=10, out=10)])
    assert not executor.finish(stale, outcome)  # refused: it no longer holds the run
    assert _records(world) == []
    assert executor.finish(winner, outcome)
    assert not executor.finish(winner, outcome)  # a repeated finish is refused too
    assert len(_records(world)) == 1
    assert MonthlyUsage.objects.for_tenant(world.tenant).get().total_tokens == 20


def test_an_executed_run_on_the_offline_model_is_recorded_as_free(setup):
    from asgiref.sync import async_to_sync

    world, _, agent, member, _ = setup
    thread = services.thread_create(tenant=world.tenant, end_user=member, agent_id=agent.pk)
    run = services.run_create(
        tenant=world.tenant, end_user=member, thread_id=thread.pk, input="hello"
    )
    held = executor.claim(run.pk, owner="test")
    assert async_to_sync(executor.execute)(held) == "success"
    run.refresh_from_db()
    records = _records(world, run=run)
    assert records and all(r.model == "offline" and r.provider_name == "builtin" for r in records)
    assert all(r.cost == 0 for r in records) and run.cost == 0
    assert sum(r.total_tokens for r in records) == run.total_tokens > 0


def test_playground_runs_count_attributed_to_the_user_or_the_key(setup, api_client):
    world, _, agent, *_ = setup
    agent_services.playground_run(
        tenant=world.tenant, actor=world.actor(world.admin), agent_id=agent.pk, input="hello"
    )
    response = api_client(world.admin_key_raw).post(
        f"/api/v1/agents/{agent.pk}/draft/run", {"input": "hi"}, content_type="application/json"
    )
    assert response.status_code == 200
    records = _records(world, source="playground")
    assert {(r.user_id, r.api_key_id) for r in records} == {
        (world.admin.pk, None),
        (None, world.admin_key.pk),
    }
    assert all(r.playground_run_id and r.agent_id == agent.pk for r in records)


# --- Budget ---------------------------------------------------------------------------------------


def _budget(world, **kw):
    values = {"token_limit": None, "cost_limit": None, "warn_percent": 80, **kw}
    return usage_services.budget_set(tenant=world.tenant, actor=world.actor(), **values)


def test_budget_warns_once_then_stops_new_runs_with_a_clear_message(setup, world_b):
    world, _, agent, member, _ = setup
    _budget(world, token_limit=1000, warn_percent=50)
    _finished_run(world, agent, member, [_call(inp=300, out=300)])
    _finished_run(world, agent, member, [_call(inp=10, out=10)])
    warnings = AuditEvent.objects.for_tenant(world.tenant).filter(action="budget.warning")
    assert warnings.count() == 1  # once a month, not once per run

    admin_page = world.client_for(world.admin).get(f"/t/{world.tenant.slug}/")
    assert b"of the monthly budget is used" in admin_page.content
    member_page = world.client_for(world.member).get(f"/t/{world.tenant.slug}/")
    assert b"monthly budget" not in member_page.content

    _finished_run(world, agent, member, [_call(inp=200, out=200)])  # 1020 of 1000
    assert (
        AuditEvent.objects.for_tenant(world.tenant).filter(action="budget.exhausted").count() == 1
    )
    thread = services.thread_create(tenant=world.tenant, end_user=member, agent_id=agent.pk)
    with pytest.raises(BudgetExhausted) as refused:
        services.run_create(tenant=world.tenant, end_user=member, thread_id=thread.pk, input="x")
    now = timezone.now()
    resets = (now.replace(day=28) + timedelta(days=4)).replace(day=1)
    assert refused.value.status == 402
    assert refused.value.message == (
        "This tenant has used its monthly budget (1,020 tokens of 1,000); it resets on "
        f"{resets.day} {resets:%B}. An owner can raise it in Settings → Monthly budget."
    )
    assert Run.objects.for_tenant(world.tenant).filter(thread=thread).count() == 0

    # The playground and the draft-run API are refused the same way; another tenant is not.
    response = world.client_for(world.owner).get(f"/t/{world.tenant.slug}/")
    assert b"budget is used up" in response.content
    # A member hears of it before typing a message that would be refused, with no admin links.
    chat_home = world.client_for(world.member).get(f"/t/{world.tenant.slug}/chat/")
    text = chat_home.content.decode()
    assert f"{world.tenant.name} has used its monthly budget" in text
    assert "new messages are refused until" in text and "/settings/budget/" not in text
    key = world.admin_key_raw
    from django.test import Client

    api = Client(HTTP_AUTHORIZATION=f"Bearer {key}")
    refused_api = api.post(
        f"/api/v1/agents/{agent.pk}/draft/run", {"input": "hi"}, content_type="application/json"
    )
    assert refused_api.status_code == 402
    assert refused_api.json()["code"] == "budget_exhausted"
    assert "resets on" in refused_api.json()["message"]
    usage_services.budget_check(tenant=world_b.tenant)  # unaffected

    # Raising the limit lets runs through at once.
    _budget(world, token_limit=5000, warn_percent=50)
    services.run_create(tenant=world.tenant, end_user=member, thread_id=thread.pk, input="x")


def test_draft_runs_refused_or_failing_give_the_keys_run_slot_back(setup, api_client, monkeypatch):
    from ai_agents.runtime import execute
    from tenants import services as tenant_services

    world, _, agent, *_ = setup
    tenant_services.api_key_limits_update(
        tenant=world.tenant, actor=world.actor(), api_key_id=world.admin_key.pk,
        requests_per_minute=None, runs_per_minute=1,
    )  # fmt: skip
    client = api_client(world.admin_key_raw)
    url = f"/api/v1/agents/{agent.pk}/draft/run"

    def draft_run():
        return client.post(url, {"input": "hi"}, content_type="application/json")

    _budget(world, token_limit=1)
    _finished_run(world, agent, setup[3], [_call(inp=1, out=1)])
    assert draft_run().status_code == 402  # refused by the budget: no run started
    _budget(world, token_limit=None)

    async def broken(**kwargs):
        raise RuntimeError("the runtime broke")

    with monkeypatch.context() as patch, pytest.raises(RuntimeError):
        patch.setattr(execute, "run_version", broken)
        agent_services.playground_run(
            tenant=world.tenant, actor=Actor(api_key=world.admin_key), agent_id=agent.pk, input="x"
        )
    assert draft_run().status_code == 200  # the key's one run of the minute
    assert draft_run().status_code == 429


def test_the_budget_counter_starts_again_next_month(setup, monkeypatch):
    world, _, agent, member, _ = setup
    _budget(world, cost_limit=Decimal("1.00"))
    _price(world, "gpt-4o", inp="1000", out="1000")
    _finished_run(world, agent, member, [_call(inp=1000, out=0)])  # $1.00
    with pytest.raises(BudgetExhausted, match=r"\$1\.00 of \$1\.00"):
        usage_services.budget_check(tenant=world.tenant)
    this_month = timezone.now()
    next_month = (this_month.replace(day=28) + timedelta(days=4)).replace(day=1, hour=0, minute=5)
    monkeypatch.setattr(timezone, "now", lambda: next_month)
    usage_services.budget_check(tenant=world.tenant)  # a new month: allowed
    _finished_run(world, agent, member, [_call(inp=10, out=0)])
    months = MonthlyUsage.objects.for_tenant(world.tenant).order_by("month")
    assert [m.month.month for m in months] == [this_month.month, next_month.month]
    assert months[1].cost == Decimal("0.01")


def test_budget_is_validated_and_changed_only_by_owners(setup, api_client):
    world, *_ = setup
    url = f"/t/{world.tenant.slug}/settings/budget/"
    admin = world.client_for(world.admin)
    assert admin.get(url).status_code == 200
    assert admin.post(url, {"token_limit": "10", "warn_percent": "80"}).status_code == 403
    assert world.client_for(world.member).get(url).status_code == 403
    owner = world.client_for(world.owner)
    bad = owner.post(url, {"token_limit": "0", "warn_percent": "120"})
    assert bad.context["form"].errors == {
        "token_limit": ["The token limit must be at least 1 token, or empty for no limit."],
        "warn_percent": ["The warning threshold is a percentage from 1 to 100."],
    }
    assert owner.post(url, {"token_limit": "5000", "warn_percent": "75"}).status_code == 302
    event = AuditEvent.objects.for_tenant(world.tenant).get(action="budget.updated")
    assert event.changes["token_limit"] == [None, 5000] and event.actor_label == world.owner.email

    read, write = api_client(world.read_key_raw), api_client(world.admin_key_raw)
    got = read.get("/api/v1/budget").json()
    assert got["token_limit"] == 5000 and got["status"] == "ok" and got["warn_percent"] == 75
    body = json.dumps({"token_limit": 0, "cost_limit": "12.345"})
    fine = json.dumps({"token_limit": 1})
    assert read.put("/api/v1/budget", fine, content_type="application/json").status_code == 403
    invalid = write.put("/api/v1/budget", body, content_type="application/json")
    assert invalid.status_code == 422
    assert set(invalid.json()["metadata"]["fields"]) == {"token_limit", "cost_limit"}
    ok = write.put(
        "/api/v1/budget",
        json.dumps({"cost_limit": "25.00", "warn_percent": 90}),
        content_type="application/json",
    )
    assert ok.status_code == 200
    assert ok.json()["cost_limit"] == "25.00" and ok.json()["token_limit"] is None


def test_budget_limits_beyond_the_maximum_get_one_plain_message_per_field(setup, api_client):
    world, *_ = setup
    url = f"/t/{world.tenant.slug}/settings/budget/"
    owner = world.client_for(world.owner)
    huge = owner.post(url, {"token_limit": str(10**19), "cost_limit": "1e13", "warn_percent": "80"})
    assert huge.status_code == 200
    assert huge.context["form"].errors == {
        "token_limit": ["The token limit can be at most 1,000,000,000,000 tokens."],
        "cost_limit": ["The cost limit can be at most $1,000,000,000."],
    }
    html = huge.content.decode()
    assert "9223372036854775807" not in html and "digits in total" not in html
    assert html.count('class="error"') == 2  # one message per field, nothing else
    just_over = owner.post(
        url, {"token_limit": "1000000000001", "cost_limit": "1000000000.01", "warn_percent": "80"}
    )
    assert set(just_over.context["form"].errors) == {"token_limit", "cost_limit"}
    assert Budget.objects.for_tenant(world.tenant).count() == 0  # nothing saved
    most = {"token_limit": "1000000000000", "cost_limit": "1000000000.00", "warn_percent": "80"}
    assert owner.post(url, most).status_code == 302
    budget = Budget.objects.for_tenant(world.tenant).get()
    assert (budget.token_limit, budget.cost_limit) == (10**12, Decimal("1000000000"))
    shown = owner.get(url).content.decode()
    assert 'value="1000000000000"' in shown and 'value="1000000000.00"' in shown

    write = api_client(world.admin_key_raw)
    body = json.dumps(
        {"token_limit": 10**12 + 1, "cost_limit": "1000000000.01", "warn_percent": 80}
    )
    refused = write.put("/api/v1/budget", body, content_type="application/json")
    assert refused.status_code == 422
    assert set(refused.json()["metadata"]["fields"]) == {"token_limit", "cost_limit"}
    body = json.dumps({"token_limit": 10**12, "cost_limit": "1000000000"})
    ok = write.put("/api/v1/budget", body, content_type="application/json")
    assert ok.status_code == 200 and ok.json()["token_limit"] == 10**12

    with pytest.raises(ValidationFailed) as invalid:
        _budget(world, token_limit=2**63, cost_limit=Decimal("1e12"))
    assert invalid.value.fields == {
        "token_limit": "The token limit can be at most 1,000,000,000,000 tokens.",
        "cost_limit": "The cost limit can be at most $1,000,000,000.",
    }


# --- Prices: dashboard and API --------------------------------------------------------------------


def test_prices_are_edited_by_managers_in_the_dashboard_and_audited(setup):
    world, provider, *_ = setup
    url = f"/t/{world.tenant.slug}/usage/prices/"
    assert world.client_for(world.member).get(url).status_code == 403
    admin = world.client_for(world.admin)
    data = {
        "model": "gpt-4o",
        "provider": "",
        "input_per_million": "2.5",
        "output_per_million": "10",
    }
    added = admin.post(url, data, HTTP_HX_REQUEST="true")
    assert added.status_code == 200 and b"Price for gpt-4o added." in added.content
    dup = admin.post(url, data, HTTP_HX_REQUEST="true")
    assert b"There is already a price for gpt-4o" in dup.content
    negative = admin.post(url, {**data, "model": "x", "output_per_million": "-1"})
    assert negative.status_code == 400 and b"greater than or equal to 0" in negative.content
    price = usage_services.selectors.price_list(tenant=world.tenant).get()
    edit = admin.post(
        f"{url}{price.pk}/",
        {**data, "provider": str(provider.pk), "output_per_million": "12"},
    )
    assert edit.status_code == 302
    price.refresh_from_db()
    assert price.provider_id == provider.pk and price.output_per_million == Decimal("12")
    actions = list(
        AuditEvent.objects.for_tenant(world.tenant)
        .filter(action__startswith="price.")
        .values_list("action", flat=True)
    )
    assert sorted(actions) == ["price.created", "price.updated"]
    assert admin.post(f"{url}list-prices/").status_code == 302
    listed = admin.get(url).content.decode()
    assert "gpt-4o-mini" in listed and "OpenAI list price" in listed
    assert admin.post(f"{url}{price.pk}/delete/").status_code == 302
    assert "price.deleted" in AuditEvent.objects.for_tenant(world.tenant).values_list(
        "action", flat=True
    )


def test_prices_api_reads_with_read_scope_and_writes_with_admin(setup, api_client, world_b):
    world, provider, *_ = setup
    read, write = api_client(world.read_key_raw), api_client(world.admin_key_raw)
    body = {"model": "gpt-4.1", "input_per_million": "2", "output_per_million": "8"}
    assert read.post("/api/v1/prices", body, content_type="application/json").status_code == 403
    created = write.post(
        "/api/v1/prices", {**body, "provider_id": str(provider.pk)}, content_type="application/json"
    )
    assert created.status_code == 201
    price = created.json()
    assert price["input_per_million"] == "2" and price["currency"] == "USD"
    assert read.get("/api/v1/prices").json()[0]["model"] == "gpt-4.1"
    bad = write.post(
        "/api/v1/prices", {**body, "output_per_million": "-1"}, content_type="application/json"
    )
    assert bad.status_code == 422 and "output_per_million" in bad.json()["metadata"]["fields"]
    theirs = agent_services.provider_create(
        tenant=world_b.tenant,
        actor=world_b.actor(),
        name="theirs",
        base_url="https://x.example.com/v1",
        default_model="m",
    )
    other = write.post(
        "/api/v1/prices", {**body, "provider_id": str(theirs.pk)}, content_type="application/json"
    )
    assert other.status_code == 404  # another tenant's provider does not exist here
    updated = write.put(
        f"/api/v1/prices/{price['id']}",
        {**body, "output_per_million": "9"},
        content_type="application/json",
    )
    assert updated.status_code == 200 and updated.json()["provider_id"] is None
    assert write.delete(f"/api/v1/prices/{price['id']}").status_code == 204
    assert read.get(f"/api/v1/prices/{price['id']}").status_code == 404


# --- The usage page, CSV and API ------------------------------------------------------------------


@pytest.fixture
def used(setup):
    world, provider, agent, member, external = setup
    _price(world, "gpt-4o", inp="2", out="8")
    _finished_run(world, agent, member, [_call(inp=1000, out=1000)])
    _finished_run(
        world,
        agent,
        external,
        [_call(inp=100, out=100), _call("mystery-model", provider, inp=7, out=3)],
        actor=Actor(api_key=world.read_key),
    )
    return setup


def test_the_usage_page_shows_totals_charts_tables_and_unpriced_models(
    used, django_assert_max_num_queries
):
    world, *_ = used
    url = f"/t/{world.tenant.slug}/usage/"
    assert world.client_for(world.member).get(url).status_code == 403
    owner = world.client_for(world.owner)
    with django_assert_max_num_queries(20):
        page = owner.get(url)
    html = page.content.decode()
    assert page.status_code == 200
    assert "2.2k" in html  # 2,210 tokens
    assert "$0.01" in html and "plus 10 tokens with no price" in html  # $0.011, to the cent
    assert "No price for 1 model" in html and "mystery-model" in html
    assert "<svg" in html and "Helper" in html and "cust-42" not in html  # display name shown
    assert "=HYPERLINK(evil)" in html  # escaped text, shown as the end user's name
    assert "style=" not in html.split("<main", 1)[1]  # CSP: no inline styles
    # Each top table's first column says what it lists, for a screen reader reading a cell.
    heads = re.findall(
        r"<h2>([^<]+)</h2>\s*<table class=\"table\">\s*<thead><tr><th[^>]*>(.*?)</th>", html
    )
    assert [(label, re.sub(r"<[^>]+>", "", head)) for label, head in heads] == [
        (label, label) for label in ("Agents", "Models", "End users", "API keys")
    ]
    chart = owner.get(url + "?by=model&metric=cost&fragment=chart", HTTP_HX_REQUEST="true")
    fragment = chart.content.decode()
    assert fragment.lstrip().startswith('<div id="usage-chart"') and "gpt-4o" in fragment
    assert 'aria-current="true">By model' in fragment
    by_user = owner.get(url + "?by=end_user&fragment=chart", HTTP_HX_REQUEST="true")
    assert 'aria-label="Tokens per day, by end user"' in by_user.content.decode()
    empty = owner.get(url + "?period=last_month").content.decode()
    assert "No usage in last month" in empty
    wrong = owner.get(url + "?period=custom&since=2026-05-02&until=2026-05-01")
    assert "Pick a day on or after the start." in wrong.content.decode()


class _Table(HTMLParser):
    """The first <table> of a page as a reader meets it: the text of its caption, and of each
    row's cells (th and td alike) by part: thead, tbody, tfoot."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.caption, self.parts = "", {"thead": [], "tbody": [], "tfoot": []}
        self._in: list[str] = []
        self._part = self._cell = None
        self._done = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if self._done:
            return
        if tag in self.parts:
            self._part = tag
        elif tag == "tr" and self._part:
            self.parts[self._part].append([])
        elif tag in ("th", "td") and self._part:
            self._cell = ""
        elif tag == "caption":
            self._in.append("caption")

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self._cell is not None:
            self.parts[self._part][-1].append(" ".join(self._cell.split()))
            self._cell = None
        elif tag == "caption":
            self._in.clear()
        elif tag == "table":
            self._done = True

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        elif self._in:
            self.caption += data


def test_the_charts_figures_are_also_a_table_that_screen_readers_read(used):
    """The chart is an image to a screen reader, read by its name only: the titles of its bars
    (the figures) were never read. The same figures are a table under "Show as table": a row
    per day with usage, a column per series, the legend's totals at its foot."""
    world, *_ = used
    today = timezone.now().date()
    # The call of the API key's run two days ago; the member's run today; nothing in between.
    two_days_ago = timezone.now() - timedelta(days=2)
    UsageRecord.objects.filter(tenant=world.tenant, api_key__isnull=False).update(
        created_at=two_days_ago
    )
    days = f"period=custom&since={today - timedelta(days=3)}&until={today}"
    url = f"/t/{world.tenant.slug}/usage/?{days}"
    owner = world.client_for(world.owner)

    def chart(query: str) -> tuple[str, _Table, list[str]]:
        html = owner.get(f"{url}&{query}&fragment=chart", HTTP_HX_REQUEST="true").content.decode()
        bars = [unescape(t) for t in re.findall(r"<title>(.*?)</title>", html)]
        return html, _Table(html), bars

    def day(d) -> str:
        return f"{d:%-d %b %Y}"

    html, table, bars = chart("by=model&metric=total_tokens")
    # The chart keeps its name; the table follows it, under a summary that says what it holds.
    assert 'role="img" aria-label="Tokens per day, by model"' in html
    assert html.index('role="img"') < html.index("<summary>Show as table</summary>")
    assert html.index("<summary>Show as table</summary>") < html.index("<table")
    assert table.caption.startswith("Tokens per day, by model,")
    assert "Days at 0 are left out." in table.caption
    assert table.parts["thead"] == [["Day", "gpt-4o", "mystery-model · openai", "Total"]]
    assert table.parts["tbody"] == [
        [day(today - timedelta(days=2)), "200", "10", "210"],
        [day(today), "2k", "0", "2k"],
    ]
    assert table.parts["tfoot"] == [["Total", "2.2k", "10", "2.2k"]]

    # Every bar's figure is its cell's, and every cell above 0 is a bar.
    for query in ("by=model&metric=total_tokens", "by=agent&metric=cost", "by=end_user"):
        _html, table, bars = chart(query)
        [columns] = table.parts["thead"]
        cells = {
            f"{row[0]} · {column}: {cell}"
            for row in table.parts["tbody"]
            for column, cell in zip(columns[1:-1], row[1:-1], strict=True)
            if cell not in ("0", "$0")
        }
        assert bars and sorted(bars) == sorted(cells), query

    _html, table, _bars = chart("by=end_user&metric=cost")
    assert table.parts["tbody"] == [
        [day(today - timedelta(days=2)), "$0", "$0.001", "$0.001"],
        [day(today), "$0.01", "$0", "$0.01"],
    ]


def test_a_model_without_a_price_whose_calls_used_no_tokens_is_not_said_to_lack_one(setup):
    world, provider, agent, member, _external = setup
    _price(world, "gpt-4o", inp="2", out="8")
    _finished_run(
        world,
        agent,
        member,
        [_call(inp=10, out=10), _call("mystery-model", provider, inp=0, out=0)],
    )
    html = world.client_for(world.owner).get(f"/t/{world.tenant.slug}/usage/").content.decode()
    assert "every call priced" in html
    assert "No price for" not in html and 'id="unpriced"' not in html

    _finished_run(world, agent, member, [_call("mystery-model", provider, inp=5, out=0)])
    html = world.client_for(world.owner).get(f"/t/{world.tenant.slug}/usage/").content.decode()
    assert "plus 5 tokens with no price" in html
    assert "No price for 1 model" in html and "5 tokens in 1 call" in html


def test_the_csv_export_streams_every_record_of_the_period(used):
    world, *_ = used
    response = world.client_for(world.admin).get(f"/t/{world.tenant.slug}/usage/export.csv")
    assert response.status_code == 200 and response["Content-Type"] == "text/csv; charset=utf-8"
    assert response.streaming
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert [(r["model"], r["total_tokens"], r["cost_usd"]) for r in rows] == [
        ("gpt-4o", "2000", "0.01000000"),
        ("gpt-4o", "200", "0.00100000"),
        ("mystery-model", "10", ""),  # no price: empty, not 0
    ]
    assert rows[1]["api_key"] == world.read_key.prefix and rows[0]["user"] == ""
    assert rows[1]["end_user"] == "'=HYPERLINK(evil)"  # never a live formula
    last_month = world.client_for(world.admin).get(
        f"/t/{world.tenant.slug}/usage/export.csv?period=last_month"
    )
    assert len(b"".join(last_month.streaming_content).decode().splitlines()) == 1  # header only


def test_the_usage_api_groups_over_a_range(used, api_client, world_b):
    world, _, _, member, external = used
    read = api_client(world.read_key_raw)
    by_model = read.get("/api/v1/usage?group_by=model").json()
    assert by_model["totals"]["total_tokens"] == 2210
    assert (
        by_model["totals"]["cost"] == "0.01100000" and by_model["totals"]["unpriced_tokens"] == 10
    )
    assert [(g["label"], g["total_tokens"]) for g in by_model["groups"]] == [
        ("gpt-4o", 2200),
        ("mystery-model · openai", 10),
    ]
    assert by_model["unpriced_models"] == [
        {"model": "mystery-model", "provider": "openai", "tokens": 10, "calls": 1}
    ]
    by_user = read.get("/api/v1/usage?group_by=end_user").json()["groups"]
    assert {g["key"]: g["total_tokens"] for g in by_user} == {
        str(member.pk): 2000,
        str(external.pk): 210,
    }
    by_key = read.get("/api/v1/usage?group_by=api_key").json()["groups"]
    assert {g["key"]: g["total_tokens"] for g in by_key} == {"": 2000, str(world.read_key.pk): 210}
    today = datetime.now(UTC).date()
    days = read.get(f"/api/v1/usage?group_by=day&since={today}&until={today}").json()
    assert [g["key"] for g in days["groups"]] == [today.isoformat()]
    bad = read.get("/api/v1/usage?group_by=colour")
    assert bad.status_code == 422 and "group_by" in bad.json()["metadata"]["fields"]
    backwards = read.get(f"/api/v1/usage?since={today}&until={today - timedelta(days=1)}")
    assert backwards.status_code == 422 and "until" in backwards.json()["metadata"]["fields"]
    theirs = api_client(world_b.read_key_raw).get("/api/v1/usage").json()
    assert theirs["totals"]["total_tokens"] == 0 and theirs["groups"] == []


def test_a_period_at_the_end_of_the_calendar_is_a_clear_error(used, api_client):
    world, *_ = used
    far = "since=9999-12-31&until=9999-12-31"
    read = api_client(world.read_key_raw)
    for path in ("/api/v1/usage", "/api/v1/usage/records"):
        response = read.get(f"{path}?{far}")
        assert response.status_code == 422, path
        assert response.json()["metadata"]["fields"] == {"until": "Pick a day before 9999-12-31."}
    owner = world.client_for(world.owner)
    page = owner.get(f"/t/{world.tenant.slug}/usage/?period=custom&{far}")
    assert page.status_code == 400 and "Pick a day before 9999-12-31." in page.content.decode()
    export = owner.get(f"/t/{world.tenant.slug}/usage/export.csv?period=custom&{far}")
    assert export.status_code == 400 and b"until: Pick a day before 9999-12-31." in export.content


def test_a_renamed_agent_is_one_group_and_deleted_agents_stay_apart(setup, api_client):
    from usage import selectors

    world, _, agent, member, _ = setup
    actor = world.actor()
    _finished_run(world, agent, member, [_call(inp=1000, out=0)])
    agent_services.agent_update(
        tenant=world.tenant, actor=actor, agent_id=agent.pk, name="Helper v2", description=""
    )
    _finished_run(world, agent, member, [_call(inp=500, out=0)])
    for name, tokens in (("Old bot", 30), ("Older bot", 20)):  # agents deleted since
        UsageRecord.objects.create(
            tenant=world.tenant, source="chat", agent=None, agent_name=name, model="gpt-4o",
            input_tokens=tokens, total_tokens=tokens,
        )  # fmt: skip

    period = selectors.period_for()
    series = selectors.usage_series(
        tenant=world.tenant, period=period, group="agent", metric="total_tokens"
    )
    assert [(s.label, sum(s.values)) for s in series] == [
        ("Helper v2", 1500),  # counted once, under its name now
        ("Old bot (deleted)", 30),
        ("Older bot (deleted)", 20),
    ]
    groups = api_client(world.read_key_raw).get("/api/v1/usage?group_by=agent").json()["groups"]
    assert [(g["key"], g["label"], g["total_tokens"]) for g in groups] == [
        (str(agent.pk), "Helper v2", 1500),
        ("deleted:Old bot", "Old bot (deleted)", 30),
        ("deleted:Older bot", "Older bot (deleted)", 20),
    ]
    page = world.client_for(world.owner).get(f"/t/{world.tenant.slug}/usage/")
    (agents,) = [rows for label, rows in page.context["tables"] if label == "Agents"]
    assert [(r["label"], r["total_tokens"]) for r in agents] == [
        ("Helper v2", 1500),
        ("Old bot (deleted)", 30),
        ("Older bot (deleted)", 20),
    ]


# --- End to end, and the cost on the hot path -----------------------------------------------------


@pytest.fixture
def fake_llm(settings):
    from ai_agents.fakeserver import FakeOpenAIServer

    settings.EGRESS_ALLOWED_NETWORKS = ["127.0.0.0/8", "::1/128"]
    with FakeOpenAIServer(api_key="sk-fake-provider-key") as server:
        yield server


def test_a_model_behind_a_provider_is_recorded_by_name_provider_and_price(world_a, fake_llm):
    actor = world_a.actor()
    provider = agent_services.provider_create(
        tenant=world_a.tenant,
        actor=actor,
        name="Fake LLM",
        base_url=fake_llm.base_url,
        default_model="fake-model",
        api_key="sk-fake-provider-key",
        timeout_seconds=5,
    )
    agent = agent_services.agent_create(
        tenant=world_a.tenant,
        actor=actor,
        name="Remote",
        config={"provider_id": str(provider.pk), "model": "fake-large"},
    )
    _price(world_a, "fake-large", provider=provider, inp="3", out="15")
    fake_llm.script(
        [
            {
                "text": "Hello!",
                "usage": {"input_tokens": 1200, "output_tokens": 80, "total_tokens": 1280},
            }
        ]
    )
    run = agent_services.playground_run(
        tenant=world_a.tenant, actor=actor, agent_id=agent.pk, input="hi"
    )
    assert run.status == "success", run.message
    (record,) = _records(world_a, playground_run=run)
    assert (record.model, record.provider_id, record.provider_name) == (
        "fake-large",
        provider.pk,
        "Fake LLM",
    )
    assert (record.input_tokens, record.output_tokens) == (1200, 80)
    assert record.cost == Decimal("0.0048")  # 1200 x $3/1M + 80 x $15/1M


def test_recording_a_run_costs_a_few_queries_whatever_the_month_holds(
    setup, django_assert_max_num_queries
):
    world, provider, agent, member, _ = setup
    _budget(world, token_limit=10**9)
    _price(world, "gpt-4o")
    for _ in range(3):
        _finished_run(world, agent, member, [_call()] * 5)
    thread = services.thread_create(tenant=world.tenant, end_user=member, agent_id=agent.pk)
    run = services.run_create(tenant=world.tenant, end_user=member, thread_id=thread.pk, input="x")
    run.refresh_from_db()
    assert run.tenant  # `finish` has the run's tenant already (it ends the thread with it)
    # The run's version and agent (a worker has them already), the prices, then the records,
    # the month's total and the budget in one statement.
    with django_assert_max_num_queries(4):
        recorded = usage_services.record_run(run, [_call(), _call("o3", provider), _call()])
    stored = UsageRecord.objects.for_tenant(world.tenant).filter(run_id=run.pk).order_by("pk")
    assert [(r.pk, r.model, r.cost) for r in recorded] == [(r.pk, r.model, r.cost) for r in stored]
    with django_assert_max_num_queries(1):
        usage_services.budget_check(tenant=world.tenant)


def test_changing_the_dates_on_the_page_makes_a_custom_period(used):
    world, *_ = used
    owner = world.client_for(world.owner)
    today = datetime.now(UTC).date()
    first = today.replace(day=1)
    shown = owner.get(
        f"/t/{world.tenant.slug}/usage/?period=this_month&since={first}&until={today}"
    )
    assert shown.context["period"].preset == "this_month"
    custom = owner.get(
        f"/t/{world.tenant.slug}/usage/?period=this_month&since={today}&until={today}"
    )
    assert custom.context["period"].preset == "custom"
    assert custom.context["totals"]["total_tokens"] == 2210  # today holds everything
    before = today - timedelta(days=40)
    old = owner.get(
        f"/t/{world.tenant.slug}/usage/?period=this_month&since={before}&until={before}"
    )
    assert old.context["totals"]["total_tokens"] == 0


def test_picking_a_preset_shows_it_and_the_export_link_carries_it(used):
    world, *_ = used
    owner = world.client_for(world.owner)
    url = f"/t/{world.tenant.slug}/usage/"
    today = datetime.now(UTC).date()
    first = today.replace(day=1)
    # What the browser sends after "This month" is switched to "Last month" in the select: the
    # From/To fields still hold this month's days.
    picked = owner.get(
        f"{url}?period=last_month&shown=this_month&since={first}&until={today}"
        "&by=agent&metric=total_tokens"
    )
    assert picked.context["period"].preset == "last_month"
    assert 'name="shown" value="this_month"' in owner.get(url).content.decode()
    assert picked.context["totals"]["total_tokens"] == 0
    html = picked.content.decode()
    assert 'name="shown" value="last_month"' in html
    export = html.split("/usage/export.csv", 1)[1].split('"', 1)[0]
    assert export.startswith("?period=last_month&amp;by=agent") and "since" not in export
    csv_body = owner.get(url + "export.csv" + export.replace("&amp;", "&")).streaming_content
    assert len(b"".join(csv_body).decode().splitlines()) == 1  # last month: the header only
    # Dates changed while a preset was on screen are a period of their own...
    custom = owner.get(f"{url}?period=last_month&shown=last_month&since={today}&until={today}")
    assert custom.context["period"].preset == "custom"
    assert custom.context["totals"]["total_tokens"] == 2210
    assert f"export.csv?period=custom&amp;since={today}&amp;until={today}" in (
        custom.content.decode()
    )
    # ...and a preset picked while custom dates were on screen is that preset.
    back = owner.get(f"{url}?period=this_month&shown=custom&since={today}&until={today}")
    assert back.context["period"].preset == "this_month"


def test_the_chart_stacks_each_days_groups_on_round_gridlines():
    from datetime import date

    from usage import charts
    from usage.selectors import Series

    days = [date(2026, 11, 1), date(2026, 11, 2)]
    series = [Series("a", "Alpha", [3000, 0]), Series("other", "Other", [1410, 200])]
    chart = charts.stacked_bars(days, series, "total_tokens")
    assert [g["label"] for g in chart.gridlines] == ["0", "1.5k", "3k", "4.5k", "6k"]
    day_one = [b for b in chart.bars if b.title.startswith("1 Nov")]
    assert [b.css for b in day_one] == ["s0", "s5"]  # "Other" is always grey
    plot_height = chart.baseline - charts.TOP
    assert sum(b.height for b in day_one) == pytest.approx(plot_height * 4410 / 6000, abs=0.2)
    assert day_one[1].title == "1 Nov 2026 · Other: 1.4k"
    assert [entry["total"] for entry in chart.legend] == ["3k", "1.6k"]
    assert charts.stacked_bars(days, [Series("a", "A", [0, 0])], "cost").empty


def _axis_values(labels, metric):
    """The amounts a reader takes the axis labels for: 1.5k is 1500, $1,200.00 is 1200."""
    values = []
    for label in labels:
        if metric == "cost":
            values.append(Decimal(label.removeprefix("$").replace(",", "")))
        else:
            scale = {"k": 1000, "M": 10**6, "B": 10**9}.get(label[-1], 1)
            values.append(Decimal(label.rstrip("kMB")) * scale)
    return values


@pytest.mark.parametrize(
    "metric, peaks",
    [
        ("total_tokens", [*range(1, 61), 99, 101, 999, 1001, 4410, 12_345, 999_999, 3 * 10**9]),
        (
            "cost",
            [
                *(Decimal(n) / 100 for n in range(1, 41)),  # 1 cent to 40 cents
                *(Decimal(n) / 10_000 for n in (1, 7, 25, 51, 99, 101, 240)),
                Decimal("0.00000001"),
                Decimal("0.00000004"),
                Decimal("0.0000004"),
                Decimal("0.1"),
                Decimal("7.3"),
                Decimal("1234"),
            ],
        ),
    ],
)
def test_the_charts_axis_reads_as_distinct_evenly_spaced_round_amounts(metric, peaks):
    from datetime import date

    from usage import charts
    from usage.selectors import Series

    days = [date(2026, 11, 1), date(2026, 11, 2)]
    for peak in peaks:
        chart = charts.stacked_bars(days, [Series("a", "A", [peak, 0])], metric)
        labels = [g["label"] for g in chart.gridlines]
        values = _axis_values(labels, metric)
        step = values[1]
        assert values == [step * n for n in range(len(values))], (peak, labels)  # no repeats
        assert step > 0 and 2 <= len(values) <= 5 and values[-1] >= peak, (peak, labels)
        if metric == "total_tokens":
            assert step == int(step), (peak, labels)  # no half tokens
        # The tallest bar reaches its value on the axis.
        (bar,) = [b for b in chart.bars if b.title.startswith("1 Nov")]
        plot_height = chart.baseline - charts.TOP
        expected = plot_height * float(peak) / float(values[-1])
        assert bar.height == pytest.approx(max(expected, 0.5), abs=0.1)


def test_a_chart_of_a_few_tokens_or_cents_has_one_gridline_per_unit():
    from datetime import date

    from usage import charts
    from usage.selectors import Series

    days = [date(2026, 11, 1), date(2026, 11, 2)]
    tokens = charts.stacked_bars(days, [Series("a", "A", [3, 1])], "total_tokens")
    assert [g["label"] for g in tokens.gridlines] == ["0", "1", "2", "3"]
    one = charts.stacked_bars(days, [Series("a", "A", [1, 0])], "total_tokens")
    assert [g["label"] for g in one.gridlines] == ["0", "1"]
    cents = charts.stacked_bars(days, [Series("a", "A", [Decimal("0.03"), 0])], "cost")
    assert [g["label"] for g in cents.gridlines] == ["$0", "$0.01", "$0.02", "$0.03"]


def test_costs_below_a_cent_show_their_digits(setup):
    from usage import charts

    assert charts.amount(Decimal("0.0000004"), "cost") == "$0.0000004"
    assert charts.amount(Decimal("0.00420000"), "cost") == "$0.0042"
    assert charts.amount(0.0025, "cost") == "$0.0025"  # a gridline: a float
    assert charts.amount(Decimal("1234.5"), "cost") == "$1,234.50"
    world, _, agent, member, _ = setup
    _price(world, "gpt-4o", inp="0.4", out="0")
    _finished_run(world, agent, member, [_call(inp=1, out=0)])
    page = world.client_for(world.owner).get(f"/t/{world.tenant.slug}/usage/")
    html = page.content.decode()
    assert html.count("$0.0000004") >= 2 and "$0.<" not in html  # totals and the tables


def _table_cells(html, table):
    """{row label: (tokens, cost)} of one of the usage page's top tables, as shown."""
    section = html.split(f"<h2>{table}</h2>", 1)[1].split("</section>", 1)[0]
    rows = re.findall(
        r'<tr><td>(.*?)</td><td class="num"[^>]*>(.*?)</td><td class="num"[^>]*>(.*?)</td>', section
    )
    return {label: (tokens, re.sub(r"<[^>]+>", " ", cost).split()) for label, tokens, cost in rows}


def test_a_row_of_the_top_tables_with_no_tokens_costs_nothing(setup):
    world, provider, agent, member, _ = setup
    actor = world.actor()
    idle = agent_services.agent_create(tenant=world.tenant, actor=actor, name="Idle")
    agent_services.agent_publish(tenant=world.tenant, actor=actor, agent_id=idle.pk)
    _price(world, "gpt-4o", inp="2", out="8")
    _finished_run(world, agent, member, [_call(inp=1000, out=1000), _call("mystery", provider)])
    # Calls that used no tokens: of a priced model, and of a model with no price.
    _finished_run(
        world, idle, member, [_call(inp=0, out=0), _call("silent-model", provider, inp=0, out=0)]
    )
    html = world.client_for(world.owner).get(f"/t/{world.tenant.slug}/usage/").content.decode()
    agents = _table_cells(html, "Agents")
    assert agents["Idle"] == ("0", ["$0"])  # nothing used: nothing to price
    assert agents["Helper"] == ("3.5k", ["$0.01", "+", "1.5k", "tokens", "with", "no", "price"])
    models = _table_cells(html, "Models")
    assert models["silent-model · openai"] == ("0", ["$0"])
    assert models["mystery · openai"] == ("1.5k", ["no", "price"])  # tokens, but no price


def test_price_lists_cost_the_same_queries_for_many_prices(
    setup, api_client, django_assert_max_num_queries
):
    world, provider, *_ = setup
    for n in range(6):
        _price(world, f"model-{n}", provider=provider if n % 2 else None)
    owner = world.client_for(world.owner)
    # session, user, membership, switcher, budget banner, the prices (providers joined), the form
    with django_assert_max_num_queries(8):
        page = owner.get(f"/t/{world.tenant.slug}/usage/prices/")
    assert page.content.decode().count("/delete/") == 6
    read = api_client(world.read_key_raw)
    with django_assert_max_num_queries(4):
        assert len(read.get("/api/v1/prices").json()) == 6


def test_the_api_streams_the_same_csv_for_a_read_key(used, api_client, world_b):
    world, *_ = used
    response = api_client(world.read_key_raw).get("/api/v1/usage/records?period=this_month")
    assert response.status_code == 200 and response["Content-Type"] == "text/csv; charset=utf-8"
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert [r["total_tokens"] for r in rows] == ["2000", "200", "10"]
    theirs = api_client(world_b.read_key_raw).get("/api/v1/usage/records")
    assert b"".join(theirs.streaming_content).decode().count("\n") == 1  # the header only
    bad = api_client(world.read_key_raw).get("/api/v1/usage/records?since=2026-13-01")
    assert bad.status_code == 422 and "since" in bad.json()["metadata"]["fields"]


# --- Number formats, periods and layout of the usage pages ----------------------------------------


def test_the_csv_export_writes_costs_as_plain_decimals_and_keeps_rows_of_deleted_threads(setup):
    world, provider, agent, member, _ = setup
    _price(world, "tiny", inp="0.4", out="0")
    _price(world, "gpt-4o", inp="2.5", out="0")
    free = {**_call("offline", inp=5, out=5), "provider": "builtin"}
    gone = _finished_run(world, agent, member, [free, _call("tiny", provider, inp=1, out=0)])
    _finished_run(world, agent, member, [_call("gpt-4o", provider, inp=1_000_000, out=0)])
    services.thread_delete(tenant=world.tenant, end_user=member, thread_id=gone.thread_id)
    response = world.client_for(world.admin).get(f"/t/{world.tenant.slug}/usage/export.csv")
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    # Never 0E-8 or 4.0E-7: plain digits, 8 places on every row, exact below a cent.
    assert [(r["model"], r["cost_usd"]) for r in rows] == [
        ("offline", "0.00000000"),
        ("tiny", "0.00000040"),
        ("gpt-4o", "2.50000000"),
    ]
    # The calls of a deleted thread stay, with their tokens, cost and agent, without its ids.
    assert [(r["run_id"], r["thread_id"], r["agent"]) for r in rows[:2]] == [("", "", "Helper")] * 2
    assert rows[2]["run_id"] and rows[2]["thread_id"]


def test_an_invalid_custom_period_is_shown_back_as_entered_with_no_figures(used):
    world, *_ = used
    owner = world.client_for(world.owner)
    url = f"/t/{world.tenant.slug}/usage/"
    page = owner.get(f"{url}?period=custom&since=2026-12-01&until=2026-11-01&by=model&metric=cost")
    html = page.content.decode()
    assert page.status_code == 400
    assert "Pick a day on or after the start." in html
    # The form holds what was entered, not this month's dates...
    assert '<option value="custom" selected>' in html and html.count(" selected>") == 1
    assert 'name="since" id="id_since" value="2026-12-01"' in html
    assert 'name="until" id="id_until" value="2026-11-01"' in html
    assert 'name="shown" value="custom"' in html and 'name="metric" value="cost"' in html
    # ...and no figures stand beside it as if they were for that period.
    assert "No figures are shown: the period above is not valid." in html
    assert "Tokens · " not in html and "2.2k" not in html and "<svg" not in html
    assert "export.csv" not in html and "Monthly budget" in html
    # Dates changed (badly) while "This month" was on screen are a custom period too.
    changed = owner.get(
        f"{url}?period=this_month&shown=this_month&since=2026-12-01&until=2026-11-01"
    ).content.decode()
    assert '<option value="custom" selected>' in changed and 'value="2026-12-01"' in changed
    chart = owner.get(
        f"{url}?period=custom&since=2026-12-01&until=2026-11-01&fragment=chart",
        HTTP_HX_REQUEST="true",
    )
    assert chart.status_code == 400 and b"until: Pick a day on or after the start." in chart.content
    today = datetime.now(UTC).date()
    fixed = owner.get(f"{url}?period=custom&since={today}&until={today}")
    assert fixed.status_code == 200 and fixed.context["totals"]["total_tokens"] == 2210


def test_a_cost_chart_of_free_calls_says_they_cost_nothing(setup):
    world, provider, agent, member, _ = setup
    owner = world.client_for(world.owner)
    url = f"/t/{world.tenant.slug}/usage/?metric=cost"
    _finished_run(world, agent, member, [_call("mystery-model", provider, inp=7, out=3)])
    unpriced = owner.get(url).content.decode()
    assert "No priced usage in this month: none of the models called has a price." in unpriced
    free = {**_call("offline", inp=50, out=50), "provider": "builtin"}
    _finished_run(world, agent, member, [free])
    html = owner.get(url).content.decode()
    assert "No priced usage" not in html
    assert "Every priced call in this month cost $0 (1 call; the others have no price)" in html
    fragment = owner.get(url + "&fragment=chart", HTTP_HX_REQUEST="true").content.decode()
    assert "Every priced call in this month cost $0" in fragment
    tokens = owner.get(url.replace("cost", "total_tokens")).content.decode()
    assert "<svg" in tokens and "Every priced call" not in tokens  # the same calls, in tokens


def test_prices_show_dollars_per_million_with_the_cents_everywhere(setup):
    world, *_ = setup
    _price(world, "big", inp="1", out="1250")
    mini = _price(world, "gpt-4o-mini", inp="0.15", cached="0.075", out="0.60")
    admin = world.client_for(world.admin)
    url = f"/t/{world.tenant.slug}/usage/prices/"
    cells = re.findall(r'<td class="num">(.*?)</td>', admin.get(url).content.decode())
    assert cells == [
        "$1.00",
        '<span class="muted">as input</span>',
        "$1,250.00",
        "$0.15",
        "$0.075",
        "$0.60",
    ]
    detail = admin.get(f"{url}{mini.pk}/").content.decode()
    for name, value in (
        ("input_per_million", "0.15"),
        ("cached_input_per_million", "0.075"),
        ("output_per_million", "0.60"),
    ):
        assert f'name="{name}" value="{value}"' in detail
    # Saving the form as shown keeps the price.
    saved = admin.post(
        f"{url}{mini.pk}/",
        {
            "model": "gpt-4o-mini",
            "provider": "",
            "input_per_million": "0.15",
            "cached_input_per_million": "0.075",
            "output_per_million": "0.60",
        },
    )
    assert saved.status_code == 302
    mini.refresh_from_db()
    assert (mini.input_per_million, mini.output_per_million) == (Decimal("0.15"), Decimal("0.6"))

"""Rate limits: the sliding-window math in Redis, which limits apply to whom, the API's 429, the
dashboard settings, and what happens when Redis is down. Real Redis throughout; the clock is
set by the test (`ratelimit.clock_ms`) so waits are exact and nothing sleeps."""

from __future__ import annotations

import json
import logging

import pytest
import redis
from django.conf import settings as django_settings
from django.urls import reverse

from ai_agents import services as agent_services
from controlplane import ratelimit
from controlplane.errors import RateLimited, ValidationFailed
from conversations import services as chat_services
from conversations.models import Item, Run, RunSource
from tenants import limits, services
from tenants.models import ApiKey, AuditEvent

T0 = 1_800_000_000_000  # ms; any fixed instant
W = ratelimit.Window


@pytest.fixture(autouse=True)
def _fresh_limiter():
    """Forget outages seen by earlier tests (the limiter remembers them per Redis URL)."""
    ratelimit.close()
    yield
    ratelimit.close()


@pytest.fixture
def clock(monkeypatch):
    """The limiter's clock, in ms from T0: `clock.at(12.5)`."""

    class Clock:
        now = T0

        def at(self, seconds: float) -> None:
            self.now = T0 + round(seconds * 1000)

    c = Clock()
    monkeypatch.setattr(ratelimit, "clock_ms", lambda: c.now)
    return c


def _hit(windows, at: float, tenant="t1"):
    return ratelimit.hit(tenant, windows, now_ms=T0 + round(at * 1000))


# --- the window math ----------------------------------------------------------------------------


def test_a_window_allows_its_limit_then_says_exactly_how_long_to_wait(db):
    w = [W("u", 3, 60)]
    assert all(_hit(w, at).allowed for at in (0, 10, 20))
    refused = _hit(w, 30)
    assert not refused.allowed and refused.window == w[0]
    # the hit at 0 s leaves the window at 60 s
    assert refused.retry_after_ms == 30_000 and refused.retry_after == 30


def test_the_window_slides_one_hit_at_a_time_and_its_boundary_is_exact(db):
    w = [W("u", 3, 60)]
    for at in (0, 10, 20):
        _hit(w, at)
    just_before = _hit(w, 59.999)
    assert not just_before.allowed and just_before.retry_after_ms == 1
    assert just_before.retry_after == 1  # never "try again in 0 s"
    assert _hit(w, 60).allowed  # the hit at 0 s has left the window
    nxt = _hit(w, 65)
    assert not nxt.allowed and nxt.retry_after_ms == 5_000  # now the 10 s hit must leave
    assert _hit(w, 70).allowed


def test_retry_after_rounds_up_to_whole_seconds(db):
    w = [W("u", 1, 60)]
    _hit(w, 0)
    assert _hit(w, 47.7).retry_after == 13  # 12.3 s left


def test_refused_hits_do_not_count_or_push_the_wait_further(db):
    w = [W("u", 2, 60)]
    _hit(w, 0), _hit(w, 1)
    for at in range(2, 50):
        assert not _hit(w, at).allowed
    assert _hit(w, 60).allowed and not _hit(w, 60.5).allowed
    assert _hit(w, 61).allowed


def test_several_windows_are_all_or_nothing_and_the_longest_wait_wins(db):
    minute, hour = W("u", 2, 60), W("u", 3, 3600)
    assert _hit([minute, hour], 0).allowed and _hit([minute, hour], 1).allowed
    refused = _hit([minute, hour], 2)
    assert refused.window == minute and refused.retry_after == 58
    # the hit refused by the minute window was not counted in the hour window
    assert _hit([minute, hour], 61).allowed
    refused = _hit([minute, hour], 122)
    assert refused.window == hour and refused.retry_after == 3600 - 122


def test_a_lowered_limit_waits_for_enough_hits_to_leave(db):
    for at in (0, 10, 20, 30, 40):
        assert _hit([W("u", 5, 60)], at).allowed
    refused = _hit([W("u", 2, 60)], 45)
    assert refused.retry_after_ms == (30 + 60 - 45) * 1000  # then only the 40 s hit is left


def test_keys_carry_the_prefix_and_tenant_and_expire_with_the_window(db):
    w = W("user:42:runs", 5, 60)
    _hit([w], 0, tenant="tenant-a")
    key = ratelimit.window_key("tenant-a", w)
    prefix = django_settings.CACHES["default"]["KEY_PREFIX"]
    assert key == f"{prefix}:rl:{{tenant-a}}:user:42:runs:60s"
    client = redis.Redis.from_url(django_settings.REDIS_URL)
    try:
        assert 0 < client.pttl(key) <= 60_000
    finally:
        client.close()
    # the same subject in another tenant has a window of its own
    assert _hit([W("user:42:runs", 1, 60)], 0, tenant="tenant-b").allowed


def test_refund_gives_the_slot_back(db):
    w = [W("u", 1, 60)]
    decision = _hit(w, 0)
    ratelimit.refund(decision)
    assert _hit(w, 1).allowed


# --- who is limited -----------------------------------------------------------------------------


@pytest.fixture
def chat(world_a, world_b):
    """Threads of two end users of A and one of B, with a published agent each."""

    def agent(world):
        a = agent_services.agent_create(tenant=world.tenant, actor=world.actor(), name="Helper")
        agent_services.agent_publish(tenant=world.tenant, actor=world.actor(), agent_id=a.pk)
        return a

    def thread(world, user, agent):
        end_user = chat_services.end_user_for_member(tenant=world.tenant, user=user)
        return chat_services.thread_create(
            tenant=world.tenant, end_user=end_user, agent_id=agent.pk
        )

    agent_a, agent_b = agent(world_a), agent(world_b)
    return {
        "member": [thread(world_a, world_a.member, agent_a) for _ in range(3)],
        "admin": thread(world_a, world_a.admin, agent_a),
        "other_tenant": thread(world_b, world_b.member, agent_b),
    }


def _send(thread, text="hello", **kwargs):
    return chat_services.run_create(
        tenant=thread.tenant, end_user=thread.end_user, thread_id=thread.pk, input=text, **kwargs
    )


def test_an_end_user_over_the_limit_is_refused_and_nothing_is_written(
    world_a, world_b, chat, clock
):
    services.tenant_limits_update(
        tenant=world_a.tenant, actor=world_a.actor(), end_user_runs_per_minute=2
    )
    first, second, third = chat["member"]
    _send(first)
    clock.at(15)
    _send(second)
    clock.at(48)
    runs, items = Run.objects.for_tenant(world_a.tenant), Item.objects.for_tenant(world_a.tenant)
    before = (runs.count(), items.count())
    with pytest.raises(RateLimited) as refused:
        _send(third, "one too many")
    exc = refused.value
    assert exc.status == 429 and exc.code == "rate_limited"
    assert exc.message == "This end user may start 2 runs per minute; try again in 12 s."
    assert exc.metadata == {
        "scope": "end_user_runs", "limit": 2, "window": 60, "retry_after": 12,
    }  # fmt: skip
    assert (runs.count(), items.count()) == before
    third.refresh_from_db()
    assert third.status == "idle" and third.title == ""
    # another end user of the tenant, and an end user of another tenant, are not affected
    _send(chat["admin"])
    _send(chat["other_tenant"])
    clock.at(60)
    _send(third)  # and the first run has left the member's window


def test_the_hourly_limit_and_the_operators_defaults_apply(settings, world_a, chat, clock):
    settings.RATE_LIMIT_END_USER_RUNS_PER_MINUTE = 10
    settings.RATE_LIMIT_END_USER_RUNS_PER_HOUR = 2
    _send(chat["member"][0])
    clock.at(120)
    _send(chat["member"][1])
    clock.at(600)
    with pytest.raises(RateLimited) as refused:
        _send(chat["member"][2])
    assert refused.value.message == (
        "This end user may start 2 runs per hour; try again in 3000 s."
    )
    # 0 turns the limit off for this tenant, whatever the default
    services.tenant_limits_update(
        tenant=world_a.tenant, actor=world_a.actor(), end_user_runs_per_hour=0
    )
    _send(chat["member"][2])


def test_a_message_refused_for_another_reason_is_not_counted(world_a, chat, clock):
    services.tenant_limits_update(
        tenant=world_a.tenant, actor=world_a.actor(), end_user_runs_per_minute=2
    )
    first, second, _ = chat["member"]
    _send(first)
    with pytest.raises(chat_services.ThreadBusy):
        _send(first, "while it replies")
    _send(second)  # the busy message did not take the second slot


def test_scheduled_and_triggered_runs_do_not_count_against_the_end_user(world_a, chat, clock):
    services.tenant_limits_update(
        tenant=world_a.tenant, actor=world_a.actor(), end_user_runs_per_minute=1
    )
    first, second, third = chat["member"]
    _send(first, source=RunSource.SCHEDULE)
    _send(second, source=RunSource.TRIGGER)
    _send(third)


def test_a_run_started_with_an_api_key_counts_against_the_key(world_a, chat, clock):
    from tenants.actors import Actor

    key, _raw = services.api_key_create(
        tenant=world_a.tenant, actor=world_a.actor(), name="bot", scopes=["run"],
        runs_per_minute=1,
    )  # fmt: skip
    actor = Actor(api_key=key)
    _send(chat["member"][0], source=RunSource.API, actor=actor)
    clock.at(20)
    with pytest.raises(RateLimited) as refused:
        _send(chat["admin"], source=RunSource.API, actor=actor)  # another end user, same key
    assert refused.value.message == "This API key may start 1 run per minute; try again in 40 s."
    assert refused.value.metadata["scope"] == "api_key_runs"


# --- the REST API -------------------------------------------------------------------------------


def test_a_key_over_its_request_limit_gets_429_with_retry_after_and_the_envelope(
    world_a, api_client, clock
):
    services.api_key_limits_update(
        tenant=world_a.tenant, actor=world_a.actor(), api_key_id=world_a.read_key.pk,
        requests_per_minute=2, runs_per_minute=None,
    )  # fmt: skip
    client = api_client(world_a.read_key_raw)
    assert client.get("/api/v1/tenant").status_code == 200
    clock.at(5)
    assert client.get("/api/v1/members").status_code == 200
    clock.at(48.2)
    response = api_client(world_a.read_key_raw, header="x-api-key").get("/api/v1/tenant")
    assert response.status_code == 429
    assert response["Retry-After"] == "12"
    assert response.json() == {
        "code": "rate_limited",
        "message": "This API key may make 2 requests per minute; try again in 12 s.",
        "metadata": {"scope": "api_key_requests", "limit": 2, "window": 60, "retry_after": 12},
    }
    # the tenant's other key has its own window (the tenant default: 600 a minute)
    assert api_client(world_a.admin_key_raw).get("/api/v1/tenant").status_code == 200
    clock.at(60)
    assert client.get("/api/v1/tenant").status_code == 200


def test_the_tenant_limit_for_keys_applies_to_keys_without_their_own(world_a, api_client, clock):
    services.tenant_limits_update(
        tenant=world_a.tenant, actor=world_a.actor(), api_key_requests_per_minute=1
    )
    client = api_client(world_a.admin_key_raw)
    assert client.get("/api/v1/tenant").status_code == 200
    response = client.get("/api/v1/tenant")
    assert response.status_code == 429 and response["Retry-After"] == "60"


def test_the_draft_run_endpoint_counts_against_the_keys_run_limit(world_a, api_client, clock):
    agent = agent_services.agent_create(tenant=world_a.tenant, actor=world_a.actor(), name="A")
    services.api_key_limits_update(
        tenant=world_a.tenant, actor=world_a.actor(), api_key_id=world_a.admin_key.pk,
        requests_per_minute=None, runs_per_minute=1,
    )  # fmt: skip
    client = api_client(world_a.admin_key_raw)
    url = f"/api/v1/agents/{agent.pk}/draft/run"
    body = json.dumps({"input": "hello"})
    assert client.post(url, body, content_type="application/json").status_code == 200
    clock.at(1)
    response = client.post(url, body, content_type="application/json")
    assert response.status_code == 429 and response["Retry-After"] == "59"
    assert response.json()["message"] == (
        "This API key may start 1 run per minute; try again in 59 s."
    )
    assert len(client.get(f"/api/v1/agents/{agent.pk}/runs").json()) == 1


def test_key_limits_over_the_api_are_validated_and_audited(world_a, api_client):
    client = api_client(world_a.admin_key_raw)
    response = client.post(
        "/api/v1/api-keys",
        json.dumps({"name": "ci", "scopes": ["read"], "requests_per_minute": -1}),
        content_type="application/json",
    )
    assert response.status_code == 422
    assert "requests_per_minute" in response.json()["metadata"]["fields"]
    created = client.post(
        "/api/v1/api-keys",
        json.dumps({"name": "ci", "scopes": ["read"], "runs_per_minute": 5}),
        content_type="application/json",
    ).json()
    assert created["runs_per_minute"] == 5 and created["requests_per_minute"] is None
    url = f"/api/v1/api-keys/{created['id']}/limits"
    too_many = client.put(
        url, json.dumps({"requests_per_minute": 10_001}), content_type="application/json"
    )
    assert too_many.status_code == 422
    assert "requests_per_minute" in too_many.json()["metadata"]["fields"]
    ok = client.put(
        url, json.dumps({"requests_per_minute": 30, "runs_per_minute": None}),
        content_type="application/json",
    )  # fmt: skip
    assert ok.status_code == 200
    assert (ok.json()["requests_per_minute"], ok.json()["runs_per_minute"]) == (30, None)
    event = AuditEvent.objects.for_tenant(world_a.tenant).get(action="api_key.limits_updated")
    assert event.changes == {"requests_per_minute": [None, 30], "runs_per_minute": [5, None]}


def test_tenant_limits_over_the_api(world_a, world_b, api_client, settings):
    settings.RATE_LIMIT_END_USER_RUNS_PER_HOUR = 300
    admin = api_client(world_a.admin_key_raw)
    body = json.dumps({"end_user_runs_per_minute": 5, "api_key_runs_per_minute": 0})
    response = admin.put("/api/v1/tenant/limits", body, content_type="application/json")
    assert response.status_code == 200
    got = api_client(world_a.read_key_raw).get("/api/v1/tenant/limits").json()
    assert got["end_user_runs_per_minute"] == 5 and got["end_user_runs_per_hour"] is None
    assert got["effective"]["end_user_runs_per_hour"] == 300
    assert got["effective"]["api_key_runs_per_minute"] == 0
    event = AuditEvent.objects.for_tenant(world_a.tenant).get(action="tenant.limits_updated")
    assert event.actor_api_key == world_a.admin_key
    bad = admin.put(
        "/api/v1/tenant/limits", json.dumps({"end_user_runs_per_hour": "lots"}),
        content_type="application/json",
    )  # fmt: skip
    assert bad.status_code == 422 and "end_user_runs_per_hour" in bad.json()["metadata"]["fields"]
    read_only = api_client(world_a.read_key_raw).put(
        "/api/v1/tenant/limits", body, content_type="application/json"
    )
    assert read_only.status_code == 403
    world_b.tenant.refresh_from_db()
    assert world_b.tenant.end_user_runs_per_minute is None


# --- Redis down ---------------------------------------------------------------------------------


def test_with_redis_down_requests_and_runs_go_through(settings, world_a, chat, api_client, caplog):
    """Fail open: the limiter must not turn a Redis outage into errors."""
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    services.tenant_limits_update(
        tenant=world_a.tenant, actor=world_a.actor(), end_user_runs_per_minute=1,
        api_key_requests_per_minute=1,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="controlplane.ratelimit"):
        client = api_client(world_a.read_key_raw)
        assert [client.get("/api/v1/tenant").status_code for _ in range(3)] == [200] * 3
        _send(chat["member"][0])
        _send(chat["member"][1])
    warnings = [r for r in caplog.records if "not enforced" in r.getMessage()]
    assert len(warnings) == 1  # said once, not once per request


def test_after_a_failure_checks_skip_redis_for_a_while(settings, db, monkeypatch):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    tries = []
    real = ratelimit._client
    monkeypatch.setattr(ratelimit, "_client", lambda url: tries.append(url) or real(url))
    assert _hit([W("u", 1, 60)], 0).allowed
    assert _hit([W("u", 1, 60)], 1).allowed
    assert len(tries) == 1  # the second check did not wait for a connection
    ratelimit._down_until[settings.REDIS_URL] = 0  # the backoff is over: try Redis again
    assert _hit([W("u", 1, 60)], 2).allowed and len(tries) == 2


# --- the dashboard ------------------------------------------------------------------------------


def test_owners_set_the_tenants_limits_in_settings(world_a, settings):
    settings.RATE_LIMIT_END_USER_RUNS_PER_MINUTE = 20
    client = world_a.client_for(world_a.admin)
    page = client.get(reverse("tenant-settings", args=[world_a.tenant.slug])).content.decode()
    assert "Rate limits" in page and 'placeholder="default: 20"' in page
    url = reverse("tenant-limits", args=[world_a.tenant.slug])
    response = client.post(
        url, {"end_user_runs_per_minute": "5", "end_user_runs_per_hour": "0",
              "api_key_requests_per_minute": "", "api_key_runs_per_minute": "30"},
    )  # fmt: skip
    assert response.status_code == 302
    world_a.tenant.refresh_from_db()
    t = world_a.tenant
    assert (t.end_user_runs_per_minute, t.end_user_runs_per_hour) == (5, 0)
    assert (t.api_key_requests_per_minute, t.api_key_runs_per_minute) == (None, 30)
    event = AuditEvent.objects.for_tenant(t).get(action="tenant.limits_updated")
    assert event.actor_user == world_a.admin
    assert event.changes == {
        "end_user_runs_per_minute": [None, 5], "end_user_runs_per_hour": [None, 0],
        "api_key_runs_per_minute": [None, 30],
    }  # fmt: skip
    page = client.get(reverse("tenant-settings", args=[t.slug])).content.decode()
    assert 'value="5"' in page


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("-1", "greater than or equal to 0"),
        ("abc", "whole number"),
        ("10001", "less than or equal to 10000"),
        ("2.5", "whole number"),
    ],
)
def test_bad_limits_are_refused_next_to_the_field(world_a, value, error):
    client = world_a.client_for(world_a.owner)
    url = reverse("tenant-limits", args=[world_a.tenant.slug])
    response = client.post(url, {"end_user_runs_per_minute": value})
    assert response.status_code == 422
    page = response.content.decode()
    assert 'id="id_end_user_runs_per_minute-error"' in page and error in page
    world_a.tenant.refresh_from_db()
    assert world_a.tenant.end_user_runs_per_minute is None
    assert not AuditEvent.objects.for_tenant(world_a.tenant).filter(action="tenant.limits_updated")


def test_members_cannot_change_limits(world_a):
    client = world_a.client_for(world_a.member)
    url = reverse("tenant-limits", args=[world_a.tenant.slug])
    assert client.post(url, {"end_user_runs_per_minute": "1000"}).status_code == 403
    world_a.tenant.refresh_from_db()
    assert world_a.tenant.end_user_runs_per_minute is None


def test_the_key_page_shows_and_edits_each_keys_limits(world_a, settings):
    settings.RATE_LIMIT_API_KEY_REQUESTS_PER_MINUTE = 600
    settings.RATE_LIMIT_API_KEY_RUNS_PER_MINUTE = 60
    client = world_a.client_for(world_a.owner)
    slug = world_a.tenant.slug
    created = client.post(
        reverse("api-key-create", args=[slug]),
        {"name": "support bot", "scopes": ["run"], "requests_per_minute": "120"},
    )
    assert created.status_code == 200
    key = ApiKey.objects.for_tenant(world_a.tenant).get(name="support bot")
    assert (key.requests_per_minute, key.runs_per_minute) == (120, None)
    page = client.get(reverse("api-key-list", args=[slug])).content.decode()
    row = page[page.index(f'id="key-{key.pk}"') :].split("</tr>")[0]
    assert "120 requests/min" in row and "60 runs/min" in row and "(tenant)" in row
    url = reverse("api-key-limits", args=[slug, key.pk])
    bad = client.post(url, {"requests_per_minute": "-5"}, HTTP_HX_REQUEST="true")
    assert f'id="id_{key.pk}_requests_per_minute-error"' in bad.content.decode()
    key.refresh_from_db()
    assert key.requests_per_minute == 120
    ok = client.post(
        url, {"requests_per_minute": "", "runs_per_minute": "0"}, HTTP_HX_REQUEST="true"
    )
    assert "are saved" in ok.content.decode()
    key.refresh_from_db()
    assert (key.requests_per_minute, key.runs_per_minute) == (None, 0)
    row = ok.content.decode()
    row = row[row.index(f'id="key-{key.pk}"') :].split("</tr>")[0]
    assert "600 requests/min" in row and "runs: no limit" in row


def test_limits_validation_names_every_bad_field():
    with pytest.raises(ValidationFailed) as refused:
        limits.validate({"requests_per_minute": "x", "runs_per_minute": 10_001})
    assert set(refused.value.fields) == {"requests_per_minute", "runs_per_minute"}


def test_an_hourly_limit_below_the_per_minute_one_is_refused_next_to_it(world_a, settings):
    settings.RATE_LIMIT_END_USER_RUNS_PER_MINUTE = 20
    client = world_a.client_for(world_a.owner)
    url = reverse("tenant-limits", args=[world_a.tenant.slug])
    # Below the per-minute limit given with it, or below the default when it is left empty.
    for minute in ("3", ""):
        limit = minute or "20"
        response = client.post(
            url, {"end_user_runs_per_minute": minute, "end_user_runs_per_hour": "2"}
        )
        assert response.status_code == 422
        assert f"Make it at least {limit}, or 0 for no hourly limit." in response.content.decode()
    world_a.tenant.refresh_from_db()
    assert world_a.tenant.end_user_runs_per_hour is None  # nothing was saved
    response = client.post(url, {"end_user_runs_per_minute": "3", "end_user_runs_per_hour": "3"})
    assert response.status_code == 302

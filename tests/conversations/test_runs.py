"""Threads and run creation: the double-texting strategies, one active run per thread under
concurrency, and isolation between tenants and end users."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection, connections

from ai_agents import services as agent_services
from controlplane.errors import Conflict, NotFound, ValidationFailed
from conversations import services
from conversations.models import EndUser, Item, Run, RunStatus, Thread


def _published_agent(world, name="Helper"):
    agent = agent_services.agent_create(tenant=world.tenant, actor=world.actor(), name=name)
    agent_services.agent_publish(tenant=world.tenant, actor=world.actor(), agent_id=agent.pk)
    return agent


@pytest.fixture
def chat(world_a):
    agent = _published_agent(world_a)
    end_user = services.end_user_for_member(tenant=world_a.tenant, user=world_a.member)
    thread = services.thread_create(tenant=world_a.tenant, end_user=end_user, agent_id=agent.pk)
    return world_a, end_user, thread


def _send(world, end_user, thread, text="hello", **kwargs):
    return services.run_create(
        tenant=world.tenant, end_user=end_user, thread_id=thread.pk, input=text, **kwargs
    )


def _runs(world, thread):
    return list(Run.objects.for_tenant(world.tenant).filter(thread=thread).order_by("created_at"))


def test_a_message_stores_its_input_and_a_pending_run_on_the_live_version(chat):
    world, end_user, thread = chat
    run = _send(world, end_user, thread, "What can you do?")
    assert run.status == RunStatus.PENDING and not run.queued
    assert run.input == [{"role": "user", "content": "What can you do?"}]
    assert run.version == run.agent.published_version
    thread.refresh_from_db()
    assert thread.status == "busy" and thread.title == "What can you do?"


def test_reject_is_the_default_and_writes_nothing(chat):
    world, end_user, thread = chat
    first = _send(world, end_user, thread)
    with pytest.raises(services.ThreadBusy, match="busy"):
        _send(world, end_user, thread, "again")
    assert _runs(world, thread) == [first]


def test_enqueue_waits_behind_the_active_run(chat):
    world, end_user, thread = chat
    first = _send(world, end_user, thread)
    second = _send(world, end_user, thread, "and then?", strategy="enqueue")
    assert (first.is_active, second.is_active, second.queued) == (True, False, True)


def test_interrupt_keeps_what_was_said_and_rollback_forgets_it(chat):
    world, end_user, thread = chat
    first = _send(world, end_user, thread)
    Item.objects.create(
        tenant=world.tenant,
        thread=thread,
        run=first,
        data={"role": "assistant", "content": "partial answer"},
    )
    second = _send(world, end_user, thread, "stop, new question", strategy="interrupt")
    first.refresh_from_db()
    assert first.status == RunStatus.INTERRUPTED and second.is_active
    assert Item.objects.for_tenant(world.tenant).filter(run=first).count() == 1

    Item.objects.create(
        tenant=world.tenant,
        thread=thread,
        run=second,
        data={"role": "assistant", "content": "draft"},
    )
    third = _send(world, end_user, thread, "forget that", strategy="rollback")
    second.refresh_from_db()
    assert second.status == RunStatus.CANCELLED and third.is_active
    assert not Item.objects.for_tenant(world.tenant).filter(run=second).exists()


def _ended(world, run, status, *said):
    """`run` ended with `status`, its question and `said` saved in the thread."""
    Item.objects.create(tenant=world.tenant, thread_id=run.thread_id, run=run, data=run.input[0])
    for text in said:
        Item.objects.create(
            tenant=world.tenant,
            thread_id=run.thread_id,
            run=run,
            data={"role": "assistant", "content": text},
        )
    Run.objects.for_tenant(world.tenant).filter(pk=run.pk).update(
        status=status, error="The model provider did not answer in time."
    )
    Thread.objects.for_tenant(world.tenant).filter(pk=run.thread_id).update(status="error")


def _items(world, thread):
    return [
        (item.run_id, item.data.get("content"))
        for item in Item.objects.for_tenant(world.tenant).filter(thread=thread).order_by("id")
    ]


def test_try_again_replaces_the_failed_reply_with_a_new_run_of_its_question(chat):
    world, end_user, thread = chat
    answered = _send(world, end_user, thread, "first question")
    _ended(world, answered, RunStatus.SUCCESS, "first answer")
    failed = _send(world, end_user, thread, "second question")
    _ended(world, failed, RunStatus.TIMEOUT, "half an ans")

    again = _send(world, end_user, thread, None, retry_of=failed.pk)
    assert again.is_active and again.input == [{"role": "user", "content": "second question"}]
    # The failed attempt leaves the conversation; the run stays, for the run inspector.
    assert _items(world, thread) == [
        (answered.pk, "first question"),
        (answered.pk, "first answer"),
    ]
    failed.refresh_from_db()
    assert (failed.status, failed.error) == (
        RunStatus.TIMEOUT,
        "The model provider did not answer in time.",
    )
    thread.refresh_from_db()
    assert thread.status == "busy" and thread.title == "first question"


def test_try_again_is_refused_for_a_reply_that_did_not_fail_or_is_not_the_latest(chat, world_b):
    world, end_user, thread = chat
    answered = _send(world, end_user, thread, "first")
    _ended(world, answered, RunStatus.SUCCESS, "an answer")
    with pytest.raises(Conflict, match="Only a reply that failed can be tried again"):
        _send(world, end_user, thread, None, retry_of=answered.pk)
    failed = _send(world, end_user, thread, "second")
    _ended(world, failed, RunStatus.ERROR)
    stopped = _send(world, end_user, thread, "third")
    _ended(world, stopped, RunStatus.CANCELLED)
    with pytest.raises(Conflict, match="Only a reply that failed can be tried again"):
        _send(world, end_user, thread, None, retry_of=stopped.pk)
    with pytest.raises(Conflict, match="Only the latest reply can be tried again"):
        _send(world, end_user, thread, None, retry_of=failed.pk)

    # Another end user's thread, another tenant's run, or not a run id: nothing of theirs.
    other_user = services.end_user_for_external(tenant=world.tenant, external_id="someone")
    with pytest.raises(NotFound):
        _send(world, other_user, thread, None, retry_of=failed.pk)
    elsewhere = services.thread_create(
        tenant=world.tenant, end_user=end_user, agent_id=thread.agent_id
    )
    for run_id in (failed.pk, "not-a-run"):
        with pytest.raises(NotFound, match="No such run in this conversation"):
            _send(world, end_user, elsewhere, None, retry_of=run_id)
    b_agent = _published_agent(world_b)
    b_user = services.end_user_for_member(tenant=world_b.tenant, user=world_b.member)
    b_thread = services.thread_create(tenant=world_b.tenant, end_user=b_user, agent_id=b_agent.pk)
    with pytest.raises(NotFound):
        _send(world_b, b_user, b_thread, None, retry_of=failed.pk)
    assert (failed.pk, "second") in _items(world, thread)  # nothing was removed
    assert len(_runs(world, thread)) == 3 and not _runs(world_b, b_thread)


def test_try_again_waits_for_no_one_and_is_refused_while_a_reply_runs(chat):
    world, end_user, thread = chat
    failed = _send(world, end_user, thread, "question")
    _ended(world, failed, RunStatus.ERROR)
    again = _send(world, end_user, thread, None, retry_of=failed.pk)
    # The failed run is no longer the latest, and a reply is running: refused, not queued.
    with pytest.raises(Conflict):
        _send(world, end_user, thread, None, retry_of=failed.pk)
    assert _runs(world, thread) == [failed, again]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("strategy", ["reject", "enqueue", "interrupt", "rollback"])
def test_fifty_concurrent_messages_never_make_two_active_runs(world_a, strategy):
    agent = _published_agent(world_a)
    end_user = services.end_user_for_member(tenant=world_a.tenant, user=world_a.member)
    thread = services.thread_create(tenant=world_a.tenant, end_user=end_user, agent_id=agent.pk)
    connection.close()

    def send(i: int) -> str:
        try:
            _send(world_a, end_user, thread, f"message {i}", strategy=strategy)
            return "created"
        except services.ThreadBusy:
            return "busy"
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(send, range(50)))
    runs = _runs(world_a, thread)
    active = [r for r in runs if r.is_active]
    assert len(active) == 1
    if strategy == "reject":
        assert results.count("created") == 1 and len(runs) == 1
    else:
        assert results.count("created") == 50 and len(runs) == 50  # nothing lost


def test_another_tenants_or_end_users_thread_is_not_found(chat, world_b):
    world, end_user, thread = chat
    other_user = services.end_user_for_member(tenant=world.tenant, user=world.admin)
    with pytest.raises(NotFound):
        _send(world, other_user, thread)
    stranger = services.end_user_for_member(tenant=world_b.tenant, user=world_b.member)
    with pytest.raises(NotFound):
        services.run_create(
            tenant=world_b.tenant, end_user=stranger, thread_id=thread.pk, input="hi"
        )
    with pytest.raises(NotFound):
        services.thread_get(tenant=world.tenant, end_user=end_user, thread_id="not-a-uuid")
    assert not Run.objects.for_tenant(world.tenant).exists()


def test_bad_input_names_the_field(chat):
    world, end_user, thread = chat
    for bad, field in [
        ("   ", "input"),
        ([], "input"),
        ([{"role": "tool", "content": "x"}], "input.0"),
        ("x" * 100_001, "input"),
    ]:
        with pytest.raises(ValidationFailed) as exc:
            _send(world, end_user, thread, bad)
        assert field in exc.value.fields
    with pytest.raises(ValidationFailed):
        _send(world, end_user, thread, strategy="shout")
    assert not Run.objects.for_tenant(world.tenant).exists()


def test_end_users_are_created_once_and_kept_apart(world_a, world_b):
    a1 = services.end_user_for_external(tenant=world_a.tenant, external_id="cust-42")
    a2 = services.end_user_for_external(tenant=world_a.tenant, external_id="cust-42")
    b1 = services.end_user_for_external(tenant=world_b.tenant, external_id="cust-42")
    assert a1 == a2 and a1 != b1
    assert services.end_user_for_member(tenant=world_a.tenant, user=world_a.owner) == (
        services.end_user_for_member(tenant=world_a.tenant, user=world_a.owner)
    )
    assert EndUser.objects.for_tenant(world_a.tenant).count() == 2
    with pytest.raises(ValidationFailed):
        services.end_user_for_external(tenant=world_a.tenant, external_id=" ")


def test_a_thread_needs_a_published_agent_of_the_tenant(world_a, world_b):
    draft_only = agent_services.agent_create(
        tenant=world_a.tenant, actor=world_a.actor(), name="Draft"
    )
    end_user = services.end_user_for_member(tenant=world_a.tenant, user=world_a.member)
    with pytest.raises(Exception, match="not published"):
        services.thread_create(tenant=world_a.tenant, end_user=end_user, agent_id=draft_only.pk)
    theirs = _published_agent(world_b, "Theirs")
    with pytest.raises(NotFound):
        services.thread_create(tenant=world_a.tenant, end_user=end_user, agent_id=theirs.pk)
    assert not Thread.objects.for_tenant(world_a.tenant).exists()


def test_a_message_costs_three_queries_and_five_behind_an_active_run(
    chat, django_assert_num_queries
):
    """run_create is on every chat message's path: the month's budget, the locked thread (with
    its agent and live version), then one statement that inserts the run and marks the thread
    busy unless a run is active. Behind an active run, the strategy's writes: here the queued
    run and the thread. (Plus the savepoint pair that the test's own transaction turns `atomic`
    into.)"""
    world, end_user, thread = chat
    with django_assert_num_queries(3 + 2):
        first = _send(world, end_user, thread)
    with django_assert_num_queries(5 + 2):
        queued = _send(world, end_user, thread, "next", strategy="enqueue")
    thread.refresh_from_db()
    assert (thread.status, thread.title) == ("busy", first.input[-1]["content"][:80])
    stored = Run.objects.for_tenant(world.tenant).get(pk=first.pk)
    assert (stored.status, stored.input, stored.version_id) == (
        "pending",
        first.input,
        first.version_id,
    )
    assert queued.queued and [r.pk for r in _runs(world, thread)] == [first.pk, queued.pk]

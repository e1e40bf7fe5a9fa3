"""The thread's items as the Agents SDK session: history across runs, the window, and fencing."""

from __future__ import annotations

import pytest
from agents import Agent, RunConfig, Runner
from asgiref.sync import async_to_sync

from ai_agents import services as agent_services
from ai_agents.runtime.offline import OfflineModel
from conversations import services
from conversations.models import Item, Run, RunStatus
from conversations.session import SupersededAttempt, ThreadSession


@pytest.fixture
def thread(world_a):
    agent = agent_services.agent_create(tenant=world_a.tenant, actor=world_a.actor(), name="A")
    agent_services.agent_publish(tenant=world_a.tenant, actor=world_a.actor(), agent_id=agent.pk)
    end_user = services.end_user_for_member(tenant=world_a.tenant, user=world_a.member)
    return services.thread_create(tenant=world_a.tenant, end_user=end_user, agent_id=agent.pk)


def _start(run: Run, attempt: int = 1) -> None:
    run.status, run.attempt = RunStatus.RUNNING, attempt
    run.save(update_fields=["status", "attempt"])


def _run_sdk(session: ThreadSession, text: str) -> str:
    agent = Agent(name="A", model=OfflineModel())
    result = async_to_sync(Runner.run)(
        agent, text, session=session, run_config=RunConfig(tracing_disabled=True)
    )
    return str(result.final_output)


def test_the_sdk_remembers_the_thread_across_runs(world_a, thread):
    for number, text in enumerate(["first question", "second question"], start=1):
        run = services.run_create(
            tenant=world_a.tenant, end_user=thread.end_user, thread_id=thread.pk, input=text
        )
        _start(run)
        session = ThreadSession(
            tenant_id=world_a.tenant.pk, thread_id=thread.pk, run_id=run.pk, attempt=1
        )
        _run_sdk(session, text)
        run.status = RunStatus.SUCCESS
        run.save(update_fields=["status"])
        stored = list(Item.objects.for_tenant(world_a.tenant).filter(thread=thread).order_by("id"))
        assert len(stored) == 2 * number  # the user message and the reply of every run
    history = async_to_sync(
        ThreadSession(tenant_id=world_a.tenant.pk, thread_id=thread.pk).get_items
    )()
    assert [i.get("role") for i in history] == ["user", "assistant", "user", "assistant"]
    assert history[0]["content"] == "first question" and history[2]["content"] == "second question"


def test_the_history_window_returns_the_latest_items_in_order(world_a, thread):
    for i in range(6):
        Item.objects.create(
            tenant=world_a.tenant, thread=thread, data={"role": "user", "content": str(i)}
        )
    session = ThreadSession(tenant_id=world_a.tenant.pk, thread_id=thread.pk, limit=4)
    assert [i["content"] for i in async_to_sync(session.get_items)()] == ["2", "3", "4", "5"]
    assert [i["content"] for i in async_to_sync(session.get_items)(2)] == ["4", "5"]


def test_a_superseded_attempt_cannot_write(world_a, thread):
    run = services.run_create(
        tenant=world_a.tenant, end_user=thread.end_user, thread_id=thread.pk, input="hi"
    )
    _start(run, attempt=2)  # a newer attempt took the run over
    old = ThreadSession(tenant_id=world_a.tenant.pk, thread_id=thread.pk, run_id=run.pk, attempt=1)
    with pytest.raises(SupersededAttempt):
        async_to_sync(old.add_items)([{"role": "assistant", "content": "late reply"}])
    run.status = RunStatus.INTERRUPTED
    run.save(update_fields=["status"])
    current = ThreadSession(
        tenant_id=world_a.tenant.pk, thread_id=thread.pk, run_id=run.pk, attempt=2
    )
    with pytest.raises(SupersededAttempt):  # an interrupted run writes nothing more either
        async_to_sync(current.add_items)([{"role": "assistant", "content": "too late"}])
    assert not Item.objects.for_tenant(world_a.tenant).filter(thread=thread).exists()


def test_another_tenants_session_sees_nothing(world_a, world_b, thread):
    Item.objects.create(tenant=world_a.tenant, thread=thread, data={"role": "user", "content": "x"})
    foreign = ThreadSession(tenant_id=world_b.tenant.pk, thread_id=thread.pk)
    assert async_to_sync(foreign.get_items)() == []


def test_a_prefetched_history_is_returned_once_then_read_fresh(world_a, thread):
    session = ThreadSession(
        tenant_id=world_a.tenant.pk, thread_id=thread.pk, limit=4, prefetched=[{"a": 1}]
    )
    assert async_to_sync(session.get_items)() == [{"a": 1}]  # as read with the run
    async_to_sync(session.add_items)([{"role": "user", "content": "hi"}])
    assert async_to_sync(session.get_items)() == [{"role": "user", "content": "hi"}]

"""Executing runs: claim, attempt fencing, finishing, queue promotion, timeouts and the sweeper,
against real PostgreSQL and Redis (the agent is the built-in offline model)."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from django.urls import reverse
from django.utils import timezone

from ai_agents import services as agent_services
from controlplane.errors import NotFound
from conversations import executor, services, streams
from conversations.models import Item, Run, RunStatus
from usage.models import UsageRecord


@pytest.fixture
def thread(world_a):
    agent = agent_services.agent_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name="Calc",
        config={"tools": [{"name": "calculator"}]},
    )
    agent_services.agent_publish(tenant=world_a.tenant, actor=world_a.actor(), agent_id=agent.pk)
    end_user = services.end_user_for_member(tenant=world_a.tenant, user=world_a.member)
    return services.thread_create(tenant=world_a.tenant, end_user=end_user, agent_id=agent.pk)


def _send(world, thread, text="use the calculator to compute 6 * 7", **kw):
    return services.run_create(
        tenant=world.tenant, end_user=thread.end_user, thread_id=thread.pk, input=text, **kw
    )


def _events(run):
    return [event for _id, event in streams.read_sync(run.pk)]


def test_a_run_executes_streams_and_lands_in_postgres(
    world_a, thread, kicked, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        run = _send(world_a, thread)
    assert kicked == [str(run.pk)]  # handed to a worker on commit
    held = executor.claim(run.pk, owner="test")
    assert held is not None and held.attempt == 1
    assert async_to_sync(executor.execute)(held) == RunStatus.SUCCESS
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCESS and "42" in run.output
    assert run.total_tokens > 0 and run.finished_at and not run.lease_owner
    assert [s["tool"] for s in run.trace if s["kind"] == "tool_call"] == ["calculator"]
    items = list(Item.objects.for_tenant(world_a.tenant).filter(thread=thread).order_by("id"))
    assert items[0].data == {"role": "user", "content": "use the calculator to compute 6 * 7"}
    assert items[-1].data["role"] == "assistant" and all(i.run_id == run.pk for i in items)
    thread.refresh_from_db()
    assert thread.status == "idle"

    events = _events(run)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "run.status" and events[0]["status"] == "running"
    assert "tool.started" in kinds and "tool.finished" in kinds and "usage" in kinds
    assert events[-1] == {**events[-1], "type": "run.status", "status": "success"}
    text = "".join(e["text"] for e in events if e["type"] == "message.delta")
    assert "42" in text


def test_a_runs_model_call_does_not_wait_for_its_question_to_be_saved(world_a, thread, monkeypatch):
    """The run's question is saved while its model call goes out: here saving it waits until
    the model has been called (a run whose call waited for the save would wait 10 s, then
    call). The history has the question once, before the reply, and the run succeeds."""
    import threading

    from ai_agents.runtime.offline import OfflineModel
    from conversations.session import ThreadSession

    called = threading.Event()
    real_stream, real_add = OfflineModel.stream_response, ThreadSession._add

    def stream_response(self, *args, **kwargs):
        called.set()
        return real_stream(self, *args, **kwargs)

    saved_after_the_call: list[bool] = []

    def add(self, items):
        if not saved_after_the_call:  # the question, the run's first write
            saved_after_the_call.append(called.wait(10))
        return real_add(self, items)

    monkeypatch.setattr(OfflineModel, "stream_response", stream_response)
    monkeypatch.setattr(ThreadSession, "_add", add)
    run = _send(world_a, thread)
    held = executor.claim(run.pk, owner="test")

    assert async_to_sync(executor.execute)(held) == RunStatus.SUCCESS

    assert saved_after_the_call == [True]
    items = list(Item.objects.for_tenant(world_a.tenant).filter(thread=thread).order_by("id"))
    assert [i.data.get("role") for i in items if i.data.get("role") == "user"] == ["user"]
    assert items[0].data == {"role": "user", "content": "use the calculator to compute 6 * 7"}
    assert items[-1].data["role"] == "assistant"


def test_a_second_claim_is_refused_while_the_lease_holds(world_a, thread):
    run = _send(world_a, thread)
    assert executor.claim(run.pk, owner="w1") is not None
    assert executor.claim(run.pk, owner="w2") is None


def test_a_superseded_attempt_writes_nothing_and_one_reply_lands(world_a, thread):
    run = _send(world_a, thread)
    first = executor.claim(run.pk, owner="stalled-worker")
    Run.objects.for_tenant(world_a.tenant).filter(pk=run.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )  # its heartbeat stopped
    second = executor.claim(run.pk, owner="healthy-worker")
    assert (first.attempt, second.attempt) == (1, 2)
    assert async_to_sync(executor.execute)(first) == "superseded"
    assert not Item.objects.for_tenant(world_a.tenant).filter(thread=thread).exists()
    assert async_to_sync(executor.execute)(second) == RunStatus.SUCCESS
    replies = Item.objects.for_tenant(world_a.tenant).filter(thread=thread, data__role="assistant")
    assert replies.count() == 1
    assert all(e.get("attempt", 2) == 2 for e in _events(run) if e["type"] == "run.status")


def test_a_run_that_keeps_losing_its_worker_fails_with_a_reason(world_a, thread, settings):
    settings.RUN_MAX_ATTEMPTS = 2
    run = _send(world_a, thread)
    for _ in range(2):
        assert executor.claim(run.pk, owner="dies") is not None
        Run.objects.for_tenant(world_a.tenant).filter(pk=run.pk).update(
            lease_expires_at=timezone.now() - timedelta(seconds=1)
        )
    assert executor.claim(run.pk, owner="third") is None
    run.refresh_from_db()
    assert run.status == RunStatus.ERROR and "after 2 attempts" in run.error
    thread.refresh_from_db()
    assert thread.status == "error"
    _send(world_a, thread, "hello again")  # the thread is usable again


def test_an_enqueued_run_starts_when_the_active_one_ends(
    world_a, thread, kicked, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        first = _send(world_a, thread)
        second = _send(world_a, thread, "and then?", strategy="enqueue")
    assert kicked == [str(first.pk)]
    assert executor.claim(second.pk, owner="w") is None  # queued: not yet
    with django_capture_on_commit_callbacks(execute=True):
        async_to_sync(executor.execute)(executor.claim(first.pk, owner="w"))
    second.refresh_from_db()
    assert not second.queued and kicked == [str(first.pk), str(second.pk)]
    assert async_to_sync(executor.execute)(executor.claim(second.pk, owner="w")) == "success"


def test_a_run_past_its_wall_clock_limit_times_out(world_a, thread, settings):
    settings.RUN_TIMEOUT_SECONDS = 0.05
    settings.OFFLINE_MODEL_WORD_DELAY = 0.05  # a slow reply
    run = _send(world_a, thread, "tell me something long please")
    assert async_to_sync(executor.execute)(executor.claim(run.pk, owner="w")) == RunStatus.TIMEOUT
    run.refresh_from_db()
    assert run.status == RunStatus.TIMEOUT and "longer than 0.05 seconds" in run.error


def test_the_sweeper_kicks_runs_whose_worker_died_and_runs_nobody_took(world_a, thread, kicked):
    lapsed = _send(world_a, thread)
    executor.claim(lapsed.pk, owner="dead")
    Run.objects.for_tenant(world_a.tenant).filter(pk=lapsed.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    other = services.thread_create(
        tenant=world_a.tenant, end_user=thread.end_user, agent_id=thread.agent_id
    )
    forgotten = _send(world_a, other)
    Run.objects.for_tenant(world_a.tenant).filter(pk=forgotten.pk).update(
        created_at=timezone.now() - timedelta(minutes=5)
    )
    fresh_thread = services.thread_create(
        tenant=world_a.tenant, end_user=thread.end_user, agent_id=thread.agent_id
    )
    fresh = _send(world_a, fresh_thread)
    kicked.clear()
    assert sorted(executor.sweep()) == sorted([str(lapsed.pk), str(forgotten.pk)])
    assert str(fresh.pk) not in kicked


@pytest.mark.django_db(transaction=True)
def test_one_worker_process_holds_hundreds_of_runs_at_once(settings):
    """The run host runs every claimed run on one event loop: 200 runs are in flight together
    in one process, and each lands exactly one reply."""
    from concurrent.futures import wait

    from conversations.worker import RunHost
    from tests.conftest import make_world

    settings.OFFLINE_MODEL_WORD_DELAY = 0.02  # each reply takes a while, like a real model
    world = make_world("Busy")
    agent = agent_services.agent_create(tenant=world.tenant, actor=world.actor(), name="Echo")
    agent_services.agent_publish(tenant=world.tenant, actor=world.actor(), agent_id=agent.pk)
    end_user = services.end_user_for_member(tenant=world.tenant, user=world.member)
    runs = []
    for i in range(200):
        thread = services.thread_create(tenant=world.tenant, end_user=end_user, agent_id=agent.pk)
        runs.append(
            services.run_create(
                tenant=world.tenant,
                end_user=end_user,
                thread_id=thread.pk,
                input=f"hello number {i}",
            )
        )
    host = RunHost()
    futures = [host.submit(executor.claim(run.pk, owner=host.owner)) for run in runs]
    peak = 0
    while not all(f.done() for f in futures):
        peak = max(peak, host.active)
        wait(futures, timeout=0.05)
    assert [f.result() for f in futures] == ["success"] * 200
    assert peak >= 100, f"only {peak} runs were in flight at once"
    assert Run.objects.for_tenant(world.tenant).filter(status="success").count() == 200
    replies = Item.objects.for_tenant(world.tenant).filter(data__role="assistant")
    assert replies.count() == 200


def test_the_database_work_of_a_run_hosts_runs_goes_side_by_side():
    """Two runs' units of database work run at the same time on the run host's threads (each
    here waits for the other): on one shared thread, the second would wait for the first."""
    import asyncio
    import threading

    from conversations.worker import RunHost

    host = RunHost()
    both = threading.Barrier(2, timeout=5)

    def unit() -> str:
        both.wait()  # raises BrokenBarrierError if the other unit never runs meanwhile
        return threading.current_thread().name

    async def a_run() -> str:
        from conversations import session

        session.unit_threads.set(host._units)  # as `RunHost._hold` does for each run
        return await session.orm(unit)()

    async def two_runs() -> list[str]:
        return await asyncio.gather(a_run(), a_run())

    names = asyncio.run_coroutine_threadsafe(two_runs(), host.loop).result(10)
    assert len(set(names)) == 2 and all(n.startswith("run-host-db") for n in names)


@pytest.mark.django_db(transaction=True)
def test_a_kick_returns_at_once_and_the_run_is_claimed_and_executed_on_the_host(
    world_a, thread, monkeypatch
):
    """Celery's task hands the kick over and returns while the claim is still in progress
    (a slow claim no longer holds up the next kick); the run is then claimed and executed."""
    import threading

    from conversations import tasks, worker

    run = _send(world_a, thread)
    host = worker.RunHost()
    monkeypatch.setattr(worker, "host", lambda: host)
    claiming, go_on = threading.Event(), threading.Event()
    take = executor.take

    def slow_take(*args, **kwargs):
        claiming.set()
        assert go_on.wait(10)
        return take(*args, **kwargs)

    monkeypatch.setattr(executor, "take", slow_take)

    tasks.run_execute(str(run.pk))  # returns although the claim has not finished

    assert claiming.wait(5)
    run.refresh_from_db()
    assert run.status == RunStatus.PENDING
    go_on.set()
    assert host.drain(grace_s=10) == []  # waits for the claim, then for the run
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCESS
    assert Item.objects.for_tenant(world_a.tenant).filter(run=run, data__role="assistant")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_worker_runs_on_the_event_loop_its_setting_names(settings, loop):
    import uvloop

    from conversations.worker import RunHost
    from tests.conftest import make_world, member_thread

    world_a = make_world("Loops")
    thread = member_thread(world_a)
    settings.RUN_EVENT_LOOP = loop
    host = RunHost()
    try:
        assert isinstance(host._loop, uvloop.Loop) == (loop == "uvloop")
        run = _send(world_a, thread, "hello there")
        assert host.submit(executor.claim(run.pk, owner=host.owner)).result(30) == "success"
    finally:
        host.drain(grace_s=0)
        host.loop.call_soon_threadsafe(host.loop.stop)
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCESS
    (question, reply) = _texts(run)  # the question and one reply
    assert question == ("user", "hello there") and reply[0] == "assistant" and reply[1]


def test_stopping_a_run_ends_it_for_everyone_and_starts_the_next(
    world_a, thread, kicked, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        running = _send(world_a, thread)
        waiting = _send(world_a, thread, "next one", strategy="enqueue")
    held = executor.claim(running.pk, owner="w")
    async_to_sync(streams.claim)(running.pk, held.attempt)  # the worker has started streaming
    stranger = services.end_user_for_member(tenant=world_a.tenant, user=world_a.admin)
    with pytest.raises(NotFound):
        services.run_cancel(tenant=world_a.tenant, run_id=running.pk, end_user=stranger)
    with django_capture_on_commit_callbacks(execute=True):
        stopped = services.run_cancel(
            tenant=world_a.tenant, run_id=running.pk, end_user=thread.end_user
        )
    assert stopped.status == RunStatus.CANCELLED
    assert _events(running)[-1]["status"] == "cancelled"  # followers see the end at once
    assert async_to_sync(executor.execute)(held) == "superseded"  # the worker's writes are refused
    kept = [item.data for item in Item.objects.for_tenant(world_a.tenant).filter(run=running)]
    assert kept == running.input  # the question stays in the thread; nothing was said yet
    waiting.refresh_from_db()
    assert not waiting.queued and kicked[-1] == str(waiting.pk)
    assert services.run_cancel(tenant=world_a.tenant, run_id=running.pk).status == "cancelled"


def _history(world, thread):
    """The thread's items as the agent's next run reads them (its session), as (role, text)."""
    from conversations.session import ThreadSession

    session = ThreadSession(tenant_id=world.tenant.pk, thread_id=thread.pk)
    items = async_to_sync(session.get_items)()
    return [(i.get("role"), executor._assistant_text(i) or i.get("content")) for i in items]


def _chat_page(world, thread) -> str:
    """The member's chat page of `thread`, as a reload shows it."""
    url = reverse("chat-thread", args=[world.tenant.slug, thread.pk])
    return world.client_for(world.member).get(url).content.decode()


STOPPED_NOTE = 'role="note">Stopped.</div>'


def test_a_queued_message_that_is_stopped_stays_in_the_history_after_the_reply_it_waited_for(
    world_a, world_b, thread, django_capture_on_commit_callbacks
):
    """ "Send after this reply", then the waiting message is stopped before its turn: it stays
    in the conversation, marked stopped, after the reply it waited for (where the chat showed it
    as it was sent), once; the agent reads it there too. Until that reply ends, a reload shows
    it at the end, stopped."""
    running = _send(world_a, thread)  # the calculator's 6 * 7
    waiting = _send(world_a, thread, "second question", strategy="enqueue")
    held = executor.claim(running.pk, owner="w")
    with django_capture_on_commit_callbacks(execute=True):
        stopped = services.run_cancel(
            tenant=world_a.tenant, run_id=waiting.pk, end_user=thread.end_user
        )
    assert stopped.status == RunStatus.CANCELLED
    page = _chat_page(world_a, thread)
    assert "second question" in page, "a reload while the reply is written still shows it"
    assert page.index("second question") < page.index(STOPPED_NOTE)
    assert "Queued: sent when the current reply ends" not in page

    assert async_to_sync(executor.execute)(held) == RunStatus.SUCCESS
    history = _history(world_a, thread)
    assert history[0] == ("user", running.input[0]["content"]) and history[-2][0] == "assistant"
    assert "42" in history[-2][1]
    assert history[-1] == ("user", "second question")  # after the reply it waited for
    assert [m for m in history if m == ("user", "second question")] == [history[-1]]  # once
    page = _chat_page(world_a, thread)
    assert page.count("second question") == 1
    assert page.index("returned: 42") < page.index("second question") < page.index(STOPPED_NOTE)
    thread.refresh_from_db()
    assert thread.status == "idle"  # nothing else started
    assert not Run.objects.for_tenant(world_a.tenant).filter(status__in=["pending", "running"])
    # Stopping it again changes nothing, and writes nothing twice.
    services.run_cancel(tenant=world_a.tenant, run_id=waiting.pk, end_user=thread.end_user)
    assert _history(world_a, thread) == history
    # The other tenant cannot stop it, and its own conversations are untouched.
    with pytest.raises(NotFound):
        services.run_cancel(tenant=world_b.tenant, run_id=running.pk)
    assert not Item.objects.for_tenant(world_b.tenant).exists()


@pytest.mark.parametrize("ended_by", ["its worker", "the claim, out of attempts"])
def test_a_question_stopped_in_line_comes_after_the_failed_question_it_waited_behind(
    world_a, thread, settings, ended_by
):
    """The reply ahead fails before it saved anything (here its worker reports the failure, or
    its last attempt's worker died): its question is kept, and the message stopped while it
    waited behind it comes after it, as the chat showed them."""
    from ai_agents.runtime.execute import RunOutcome

    ahead = _send(world_a, thread, "first question")
    waiting = _send(world_a, thread, "second question", strategy="enqueue")
    services.run_cancel(tenant=world_a.tenant, run_id=waiting.pk, end_user=thread.end_user)
    if ended_by == "its worker":
        held = executor.claim(ahead.pk, owner="w")
        assert executor.finish(held, RunOutcome("error", message="The provider failed."))
    else:
        settings.RUN_MAX_ATTEMPTS = 1
        executor.claim(ahead.pk, owner="w")
        Run.objects.for_tenant(world_a.tenant).filter(pk=ahead.pk).update(
            lease_expires_at=timezone.now() - timedelta(seconds=1)
        )
        assert executor.claim(ahead.pk, owner="another") is None  # failed: out of attempts

    assert _history(world_a, thread) == [("user", "first question"), ("user", "second question")]


def test_messages_stopped_in_line_keep_their_place_among_the_others(
    world_a, thread, django_capture_on_commit_callbacks
):
    """Three messages wait in line behind a reply; the first and the third are stopped. Each
    stopped one joins the conversation where its turn was: the first when the reply ends (before
    the second, which starts then), the third after the second's reply. A message sent with
    "Stop this reply, then send" comes after those stopped before it."""
    first = _send(world_a, thread, "q1")
    in_line = [_send(world_a, thread, f"q{n}", strategy="enqueue") for n in (2, 3, 4)]
    for run in (in_line[0], in_line[2]):
        services.run_cancel(tenant=world_a.tenant, run_id=run.pk, end_user=thread.end_user)
    with django_capture_on_commit_callbacks(execute=True):
        assert async_to_sync(executor.execute)(executor.claim(first.pk, owner="w")) == "success"
    asked = [text for role, text in _history(world_a, thread) if role == "user"]
    assert asked == ["q1", "q2"]  # q3 is next in line: q4 waits behind it
    third = executor.claim(in_line[1].pk, owner="w")
    assert third is not None
    # "Stop this reply, then send": q3's reply is interrupted, q4 (stopped) takes its place
    # before the new message.
    _send(world_a, thread, "q5", strategy="interrupt")
    asked = [text for role, text in _history(world_a, thread) if role == "user"]
    assert asked == ["q1", "q2", "q3", "q4"]
    page = _chat_page(world_a, thread)
    # The bubbles, not the words: a page's random tokens (CSRF, nonce) may hold "q3".
    q2, q3, q4 = (page.index(f'<div class="bubble">{text}</div>') for text in ("q2", "q3", "q4"))
    assert q2 < page.index(STOPPED_NOTE) < q3
    assert page.count(STOPPED_NOTE) == 2 and page.rindex(STOPPED_NOTE) > q4


def test_a_queued_message_whose_reply_ahead_was_stopped_keeps_its_question_when_stopped(
    world_a, thread, django_capture_on_commit_callbacks
):
    """The reply is stopped (the message waiting in line starts), then that message is stopped
    before its worker took it: both questions stay, each marked stopped."""
    running = _send(world_a, thread, "first question")
    waiting = _send(world_a, thread, "second question", strategy="enqueue")
    executor.claim(running.pk, owner="w")
    with django_capture_on_commit_callbacks(execute=True):
        services.run_cancel(tenant=world_a.tenant, run_id=running.pk, end_user=thread.end_user)
        services.run_cancel(tenant=world_a.tenant, run_id=waiting.pk, end_user=thread.end_user)
    assert _history(world_a, thread) == [
        ("user", "first question"),
        ("user", "second question"),
    ]
    page = _chat_page(world_a, thread)
    assert page.count(STOPPED_NOTE) == 2


def test_interrupting_closes_the_old_runs_stream(
    world_a, thread, django_capture_on_commit_callbacks
):
    first = _send(world_a, thread)
    held = executor.claim(first.pk, owner="w")
    async_to_sync(streams.claim)(first.pk, held.attempt)
    with django_capture_on_commit_callbacks(execute=True):
        _send(world_a, thread, "new question", strategy="interrupt")
    assert _events(first)[-1]["status"] == "interrupted"
    assert async_to_sync(executor.execute)(held) == "superseded"


def test_a_run_whose_worker_died_after_a_side_effect_is_not_repeated(world_a):
    agent = agent_services.agent_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name="Delegator",
        config={"tools": [{"name": "run_agent"}, {"name": "calculator"}]},
    )
    agent_services.agent_publish(tenant=world_a.tenant, actor=world_a.actor(), agent_id=agent.pk)
    end_user = services.end_user_for_member(tenant=world_a.tenant, user=world_a.member)
    thread = services.thread_create(tenant=world_a.tenant, end_user=end_user, agent_id=agent.pk)

    safe = _send(world_a, thread)  # the calculator changes nothing
    async_to_sync(executor.execute)(executor.claim(safe.pk, owner="w"))
    safe.refresh_from_db()
    assert safe.side_effects is False

    risky = _send(world_a, thread, "use the run_agent tool to ask helper about invoices")
    async_to_sync(executor.execute)(executor.claim(risky.pk, owner="w"))
    risky.refresh_from_db()
    assert risky.side_effects is True  # recorded before the tool ran

    # Had its worker died after that point, the sweeper's next claim refuses to repeat it.
    Run.objects.for_tenant(world_a.tenant).filter(pk=risky.pk).update(
        status=RunStatus.RUNNING, lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert executor.claim(risky.pk, owner="w2") is None
    risky.refresh_from_db()
    assert risky.status == RunStatus.ERROR and "could do that twice" in risky.error


def test_a_run_stopped_while_the_model_answered_starts_no_tool_that_changes_things(
    world_a, monkeypatch
):
    from ai_agents.runtime import execute as agent_execute

    agent = agent_services.agent_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name="Delegator",
        config={"tools": [{"name": "run_agent"}]},
    )
    agent_services.agent_publish(tenant=world_a.tenant, actor=world_a.actor(), agent_id=agent.pk)
    end_user = services.end_user_for_member(tenant=world_a.tenant, user=world_a.member)
    thread = services.thread_create(tenant=world_a.tenant, end_user=end_user, agent_id=agent.pk)
    run = _send(world_a, thread, "use the run_agent tool to ask helper about invoices")
    held = executor.claim(run.pk, owner="w")
    mark = executor.mark_side_effects

    def stopped_first(claim):  # the stop button, before the worker's heartbeat notices
        services.run_cancel(tenant=world_a.tenant, run_id=run.pk)
        return mark(claim)

    monkeypatch.setattr(executor, "mark_side_effects", stopped_first)
    called = []

    async def helper(**kwargs):
        called.append(kwargs["agent_slug"])
        return "done"

    monkeypatch.setattr(agent_execute, "run_published_agent", helper)
    assert async_to_sync(executor.execute)(held) == "superseded"
    assert called == []
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED and not run.side_effects


def test_a_retried_run_starts_over_and_the_thread_keeps_one_reply(world_a, thread):
    run = _send(world_a, thread, "hello there")
    first = executor.claim(run.pk, owner="dies-after-the-reply")
    # What attempt 1 had stored when its worker died before saving the status.
    for data in (
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "an old reply"}]},
    ):
        Item.objects.create(tenant=world_a.tenant, thread=thread, run=run, data=data)
    Run.objects.for_tenant(world_a.tenant).filter(pk=run.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    second = executor.claim(run.pk, owner="healthy")
    assert (first.attempt, second.attempt) == (1, 2)
    assert not Item.objects.for_tenant(world_a.tenant).filter(run=run).exists()
    assert async_to_sync(executor.execute)(second) == RunStatus.SUCCESS
    items = Item.objects.for_tenant(world_a.tenant).filter(thread=thread)
    assert items.filter(data__role="user").count() == 1
    assert items.filter(data__role="assistant").count() == 1


def test_a_run_failed_after_its_worker_died_answers_its_open_tool_calls(world_a, thread):
    run = _send(world_a, thread)
    executor.claim(run.pk, owner="dies-inside-a-tool")
    call = {"type": "function_call", "call_id": "call_1", "name": "run_agent", "arguments": "{}"}
    Item.objects.create(tenant=world_a.tenant, thread=thread, run=run, data=call)
    Run.objects.for_tenant(world_a.tenant).filter(pk=run.pk).update(
        side_effects=True, lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert executor.claim(run.pk, owner="w2") is None
    run.refresh_from_db()
    assert run.status == RunStatus.ERROR and "could do that twice" in run.error
    [answer] = Item.objects.for_tenant(world_a.tenant).filter(data__type="function_call_output")
    assert answer.data["call_id"] == "call_1" and "stopped" in answer.data["output"]
    # The thread is usable again: the next run's history is one a provider accepts.
    following = _send(world_a, thread, "hello again")
    held = executor.claim(following.pk, owner="w3")
    assert async_to_sync(executor.execute)(held) == RunStatus.SUCCESS


def test_an_unexpected_failure_ends_the_run_with_a_reason_at_once(world_a, thread, monkeypatch):
    from ai_agents.runtime import execute as agent_execute

    async def broken(**kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(agent_execute, "run_version", broken)
    run = _send(world_a, thread)
    assert async_to_sync(executor.execute)(executor.claim(run.pk, owner="w")) == "error"
    run.refresh_from_db()
    assert run.status == RunStatus.ERROR and "error on our side" in run.error
    assert _events(run)[-1]["status"] == "error"
    thread.refresh_from_db()
    assert thread.status == "error"


def test_a_run_failed_by_the_sweeper_ends_its_stream_with_the_reason(
    world_a, thread, django_capture_on_commit_callbacks
):
    run = _send(world_a, thread)
    held = executor.claim(run.pk, owner="dies")
    async_to_sync(streams.claim)(run.pk, held.attempt)  # it had started streaming
    Run.objects.for_tenant(world_a.tenant).filter(pk=run.pk).update(
        side_effects=True, lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert executor.claim(run.pk, owner="w2") is None
    last = _events(run)[-1]
    assert last["type"] == "run.status" and last["status"] == "error"
    assert "could do that twice" in last["message"]


def test_a_run_stopped_just_after_its_outcome_is_saved_still_ends_its_stream(
    world_a, thread, monkeypatch
):
    # The heartbeat that renews leases after `finish` committed finds the run ended and
    # cancels the attempt, as it cancels one that lost its lease. Readers must still get the
    # terminal event, not wait for a stream that stays silent.
    import asyncio

    run = _send(world_a, thread)
    held = executor.claim(run.pk, owner="w")
    finish = executor.finish
    attempt: list[asyncio.Task] = []

    def finish_then_heartbeat(*args, **kwargs):
        written = finish(*args, **kwargs)
        loop = attempt[0].get_loop()
        loop.call_soon_threadsafe(attempt[0].cancel)
        return written

    monkeypatch.setattr(executor, "finish", finish_then_heartbeat)

    async def go():
        attempt.append(asyncio.ensure_future(executor.execute(held)))
        with pytest.raises(asyncio.CancelledError):
            await attempt[0]
        await asyncio.sleep(0.5)  # the shielded end of the attempt goes on

    async_to_sync(go)()
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCESS
    last = _events(run)[-1]
    assert (last["type"], last["status"]) == ("run.status", "success")


@pytest.mark.django_db(transaction=True)
def test_a_heartbeat_just_after_a_run_ended_does_not_stop_it(world_a, thread, monkeypatch):
    # The beat's renewal finds the run no longer running, because its own attempt has just
    # written the outcome: the attempt must not be taken for one that lost its lease.
    from conversations.worker import RunHost

    host = RunHost()
    finish = executor.finish

    def finish_then_beat(*args, **kwargs):
        written = finish(*args, **kwargs)
        host.beat()
        return written

    monkeypatch.setattr(executor, "finish", finish_then_beat)
    run = _send(world_a, thread)
    assert host.submit(executor.claim(run.pk, owner=host.owner)).result(timeout=30) == "success"
    assert host.active == 0


def test_a_database_failure_mid_run_leaves_the_run_to_be_retried(world_a, thread, monkeypatch):
    from django.db import OperationalError

    from ai_agents.runtime import execute as agent_execute

    async def cut_off(**kwargs):
        raise OperationalError("server closed the connection unexpectedly")

    original = agent_execute.run_version
    monkeypatch.setattr(agent_execute, "run_version", cut_off)
    run = _send(world_a, thread)
    with pytest.raises(OperationalError):
        async_to_sync(executor.execute)(executor.claim(run.pk, owner="w"))
    run.refresh_from_db()
    assert run.status == RunStatus.RUNNING and run.attempt == 1  # its lease lapses, then...
    Run.objects.for_tenant(world_a.tenant).filter(pk=run.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    monkeypatch.setattr(agent_execute, "run_version", original)
    held = executor.claim(run.pk, owner="w2")  # ...the sweeper's kick runs it again
    assert held is not None and held.attempt == 2
    assert async_to_sync(executor.execute)(held) == RunStatus.SUCCESS


def test_claiming_a_new_run_reads_it_with_what_it_needs_in_one_statement(
    world_a, thread, django_assert_num_queries
):
    """A worker's claim is on every run's path: a pending run's first attempt is taken, and the
    run read with its tenant and agent version, by one `UPDATE … RETURNING`; the thread's
    history is read with it, before the run reaches the event loop."""
    run = _send(world_a, thread)
    with django_assert_num_queries(2):
        held, (loaded, ctx) = executor.take(run.pk, owner="w")
    assert ctx.extra["history"] == []  # a new thread
    with django_assert_num_queries(0):  # everything executing it needs is already read
        assert (loaded.tenant.pk, loaded.version.agent.name) == (world_a.tenant.pk, "Calc")
        assert ctx.agent_id == loaded.version.agent_id and held.attempt == 1
        assert loaded.input == run.input and loaded.version.config["tools"]  # JSON decoded
        assert (loaded.status, loaded.lease_owner, loaded.attempt) == ("running", "w", 1)
        assert loaded.started_at is not None and loaded.lease_expires_at > loaded.started_at
    stored = Run.objects.for_tenant(world_a.tenant).get(pk=run.pk)
    assert (stored.status, stored.attempt, stored.lease_owner) == ("running", 1, "w")
    assert executor.take(run.pk, owner="w2") is None  # claimed: nobody else takes it


def test_a_run_taken_for_a_run_host_arrives_built_and_runs_as_built(world_a, thread, monkeypatch):
    import asyncio

    run = _send(world_a, thread)
    loop = asyncio.new_event_loop()  # the host's; the agent (offline model) has no client on it
    try:
        held, loaded = executor.take(run.pk, owner="w", loop=loop)
    finally:
        loop.close()
    built = loaded[1].extra["built"]
    assert built.agent.name == "Calc" and [t.name for t in built.agent.tools] == ["calculator"]

    def build_again(**kwargs):
        raise AssertionError("built twice")

    monkeypatch.setattr("ai_agents.runtime.execute.build", build_again)
    assert async_to_sync(executor.execute)(held, loaded) == RunStatus.SUCCESS
    run.refresh_from_db()
    assert "42" in run.output


@pytest.mark.django_db(transaction=True)
def test_workers_racing_for_one_run_leave_it_one_attempt(world_a, thread):
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connections

    run = _send(world_a, thread)

    def take(owner):
        try:
            taken = executor.take(run.pk, owner=owner)
            return None if taken is None else taken[0].owner
        finally:
            connections.close_all()

    with ThreadPoolExecutor(8) as pool:
        winners = [w for w in pool.map(take, [f"w{i}" for i in range(8)]) if w]
    assert len(winners) == 1
    stored = Run.objects.for_tenant(world_a.tenant).get(pk=run.pk)
    assert (stored.attempt, stored.lease_owner) == (1, winners[0])


def test_finishing_a_run_costs_three_queries(world_a, thread, django_assert_num_queries):
    """`finish` is on every run's path: the prices; one statement for the run's outcome (fenced
    on its attempt), the next queued run and the thread; one for the usage records and the
    month's total with the budget. (Plus the savepoint pair of the test's transaction.)"""
    from ai_agents.runtime import execute as agent_execute

    run = _send(world_a, thread)
    held, (loaded, _ctx) = executor.take(run.pk, owner="w")
    outcome = agent_execute.RunOutcome(
        "success",
        output="done",
        trace=[
            {
                "kind": "model_call",
                "agent": "Calc",
                "model": "gpt-test",
                "provider": "Fake",
                "provider_id": None,
                "input_tokens": 10,
                "output_tokens": 5,
                "total_tokens": 15,
            }
        ],
        usage={"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
    )
    with django_assert_num_queries(3 + 2):
        assert executor.finish(held, outcome, run=loaded)
    run.refresh_from_db()
    assert (run.status, run.output, run.total_tokens) == (RunStatus.SUCCESS, "done", 15)
    assert run.trace == outcome.trace and run.finished_at and not run.lease_owner
    assert run.lease_expires_at is None and run.error == ""
    thread.refresh_from_db()
    assert thread.status == "idle"
    records = UsageRecord.objects.for_tenant(world_a.tenant).filter(run_id=run.pk)
    assert [r.total_tokens for r in records] == [15]
    assert not executor.finish(held, outcome, run=loaded)  # finished: the fence refuses
    assert records.count() == 1  # and counts nothing twice


def test_the_heartbeat_renews_live_leases_and_names_the_lost_ones_in_one_statement(
    world_a, thread, django_assert_num_queries
):
    live = executor.claim(_send(world_a, thread).pk, owner="w")
    other = services.thread_create(
        tenant=world_a.tenant, end_user=thread.end_user, agent_id=thread.agent_id
    )
    superseded = executor.claim(_send(world_a, other).pk, owner="w")
    Run.objects.for_tenant(world_a.tenant).filter(pk=superseded.run_id).update(attempt=2)
    before = timezone.now()
    with django_assert_num_queries(1):
        lost = executor.renew([live, superseded])
    assert lost == [superseded]
    renewed = Run.objects.for_tenant(world_a.tenant).get(pk=live.run_id)
    assert renewed.lease_expires_at > before + timedelta(seconds=executor.lease_seconds() - 5)
    assert executor.renew([]) == []


def test_a_released_lease_is_never_renewed_again(world_a, thread, kicked):
    held = executor.claim(_send(world_a, thread).pk, owner="w")
    assert executor.release([held]) == [held] and kicked[-1] == str(held.run_id)
    # A beat that read its claims before the release renews after it: refused.
    assert executor.renew([held]) == [held]
    run = Run.objects.for_tenant(world_a.tenant).get(pk=held.run_id)
    assert run.lease_expires_at <= timezone.now() and run.lease_owner == ""
    taken = executor.claim(run.pk, owner="another-worker")
    assert taken is not None and taken.attempt == 2


def test_an_outcome_that_cannot_be_saved_still_ends_the_run(world_a, thread, monkeypatch):
    from usage import services as usage_services

    run = _send(world_a, thread, "hello there")
    save = usage_services.save_run_usage
    calls = []

    def broken_once(*args, **kwargs):  # a bug in what is written with the outcome
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("cannot store this")
        return save(*args, **kwargs)

    monkeypatch.setattr(usage_services, "save_run_usage", broken_once)
    assert async_to_sync(executor.execute)(executor.claim(run.pk, owner="w")) == RunStatus.ERROR
    run.refresh_from_db()
    assert run.status == RunStatus.ERROR and "could not be saved" in run.error
    thread.refresh_from_db()
    assert thread.status != "busy"  # the conversation can go on


def test_a_run_whose_agent_cannot_be_built_ends_at_once_with_a_reason(world_a, thread, monkeypatch):
    import asyncio

    run = _send(world_a, thread, "hello there")

    def broken_build(**kwargs):
        raise ValueError("cannot decrypt the provider key")  # a bug, or a rotated key

    monkeypatch.setattr(executor, "build", broken_build)
    loop = asyncio.new_event_loop()
    try:
        assert executor.take(run.pk, owner="w", loop=loop) is None  # as the Celery task calls it
    finally:
        loop.close()
    run.refresh_from_db()
    assert run.status == RunStatus.ERROR and "could not start" in run.error
    assert run.attempt == 1  # not retried: it would fail the same way
    assert _events(run)[-1]["status"] == "error"  # readers of its stream see it end
    thread.refresh_from_db()
    assert thread.status != "busy"
    # Nothing was saved before it failed: its question stays in the conversation, with why
    # there was no reply and "Try again" (a reload does not make the message vanish).
    page = (
        world_a.client_for(world_a.member)
        .get(f"/t/{world_a.tenant.slug}/chat/{thread.pk}/")
        .content.decode()
    )
    question = '<div class="bubble">hello there</div>'
    assert page.count(question) == 1
    assert page.index(question) < page.index("<strong>No reply:</strong>")
    assert f'name="retry_of" value="{run.pk}"' in page


def test_a_run_whose_database_goes_away_while_it_starts_is_left_for_a_retry(
    world_a, thread, monkeypatch
):
    import asyncio

    from django.db import OperationalError

    run = _send(world_a, thread, "hello there")

    def database_gone(**kwargs):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(executor, "build", database_gone)
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(OperationalError):
            executor.take(run.pk, owner="w", loop=loop)
    finally:
        loop.close()
    run.refresh_from_db()
    # Not failed for the database's sake: its lease lapses and another attempt replies.
    assert run.status == RunStatus.RUNNING and run.error == ""
    run.lease_expires_at = timezone.now() - timedelta(seconds=1)
    run.save(update_fields=["lease_expires_at"])
    monkeypatch.undo()
    retried = executor.claim(run.pk, owner="w2")
    assert retried is not None and retried.attempt == 2
    assert async_to_sync(executor.execute)(retried) == RunStatus.SUCCESS


@pytest.mark.django_db(transaction=True)
def test_a_beat_in_flight_does_not_renew_the_leases_a_shutdown_released(
    settings, kicked, monkeypatch
):
    import threading
    import time

    from conversations.worker import RunHost
    from tests.conftest import make_world

    settings.OFFLINE_MODEL_WORD_DELAY = 0.2  # a long reply
    settings.RUN_LEASE_SECONDS = 1.5  # a beat every 0.5 s
    world = make_world("Deploy")
    agent = agent_services.agent_create(tenant=world.tenant, actor=world.actor(), name="Echo")
    agent_services.agent_publish(tenant=world.tenant, actor=world.actor(), agent_id=agent.pk)
    end_user = services.end_user_for_member(tenant=world.tenant, user=world.member)
    thread = services.thread_create(tenant=world.tenant, end_user=end_user, agent_id=agent.pk)
    run = services.run_create(
        tenant=world.tenant, end_user=end_user, thread_id=thread.pk, input="hello there"
    )
    renewing, renewed = threading.Event(), threading.Event()
    real_renew = executor.renew

    def slow_renew(claims):  # a database slow to answer the heartbeat
        renewing.set()
        time.sleep(0.6)
        try:
            return real_renew(claims)
        finally:
            renewed.set()

    monkeypatch.setattr(executor, "renew", slow_renew)
    host = RunHost()
    held = executor.claim(run.pk, owner=host.owner)
    host.submit(held)
    assert renewing.wait(timeout=5)  # a beat is in flight

    assert host.drain(grace_s=0) == [held]

    assert renewed.wait(timeout=5)  # that beat has ended
    run.refresh_from_db()
    assert run.lease_expires_at <= timezone.now()  # still released: another worker may take it


@pytest.mark.django_db(transaction=True)
def test_a_worker_shutting_down_lets_short_runs_finish_and_hands_long_ones_over(settings, kicked):
    from concurrent.futures import wait

    from conversations.worker import RunHost
    from tests.conftest import make_world

    settings.OFFLINE_MODEL_WORD_DELAY = 0.2  # a long reply: seconds
    world = make_world("Deploy")
    agent = agent_services.agent_create(tenant=world.tenant, actor=world.actor(), name="Echo")
    agent_services.agent_publish(tenant=world.tenant, actor=world.actor(), agent_id=agent.pk)
    end_user = services.end_user_for_member(tenant=world.tenant, user=world.member)
    thread = services.thread_create(tenant=world.tenant, end_user=end_user, agent_id=agent.pk)
    run = services.run_create(
        tenant=world.tenant, end_user=end_user, thread_id=thread.pk, input="hello there"
    )
    host = RunHost()
    held = executor.claim(run.pk, owner=host.owner)
    future = host.submit(held)
    kicked.clear()

    assert host.drain(grace_s=0.3) == [held]  # still replying after the grace: handed over

    run.refresh_from_db()
    assert run.status == RunStatus.RUNNING and run.lease_expires_at <= timezone.now()
    assert kicked == [str(run.pk)]  # another worker takes it at once, not after the lease
    taken = executor.claim(run.pk, owner="another-worker")
    assert taken is not None and taken.attempt == 2
    wait([future], timeout=5)
    assert future.cancelled()  # this process's attempt stopped


@pytest.mark.django_db(transaction=True)
def test_a_worker_shutting_down_waits_for_runs_that_end_within_the_grace(settings, kicked):
    from conversations.worker import RunHost
    from tests.conftest import make_world

    settings.OFFLINE_MODEL_WORD_DELAY = 0.01
    world = make_world("Deploy")
    agent = agent_services.agent_create(tenant=world.tenant, actor=world.actor(), name="Echo")
    agent_services.agent_publish(tenant=world.tenant, actor=world.actor(), agent_id=agent.pk)
    end_user = services.end_user_for_member(tenant=world.tenant, user=world.member)
    thread = services.thread_create(tenant=world.tenant, end_user=end_user, agent_id=agent.pk)
    run = services.run_create(
        tenant=world.tenant, end_user=end_user, thread_id=thread.pk, input="hello there"
    )
    host = RunHost()
    future = host.submit(executor.claim(run.pk, owner=host.owner))

    assert host.drain(grace_s=30) == []

    assert future.result(timeout=5) == RunStatus.SUCCESS
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCESS


@pytest.mark.parametrize("signal", ["worker_process_shutdown", "worker_shutdown"])
def test_celerys_shutdown_drains_this_processs_run_host(signal, settings, monkeypatch):
    import os
    import socket

    from celery import signals

    from conversations import worker

    drained = []

    class Host:
        owner = f"{socket.gethostname()}:{os.getpid()}"

        def drain(self, grace_s):
            drained.append(grace_s)

    settings.RUN_SHUTDOWN_GRACE_SECONDS = 12.0
    monkeypatch.setattr(worker, "_host", Host())
    getattr(signals, signal).send(sender=None, pid=os.getpid(), exitcode=0)
    assert drained == [12.0]


def _saw(run, held, events):
    from conversations import events as ev

    async_to_sync(streams.append)(run.pk, held.attempt, [ev.status("running"), *events])


def _texts(run):
    items = Item.objects.for_tenant(run.tenant).filter(run=run).order_by("id")
    return [(item.data.get("role"), executor._assistant_text(item.data) or item.data.get("content"))
            for item in items]  # fmt: skip


def test_an_interrupted_reply_keeps_what_its_readers_saw(world_a, thread):
    from conversations import events as ev

    active = _send(world_a, thread, "tell me a story")
    held = executor.claim(active.pk, owner="w")
    _saw(active, held, [
        ev.message_delta("Once upon", agent="Calc"),
        ev.model_retry(reason="timeout", message="", retry=1, max_retries=3, wait_ms=0,
                       discard=True, agent="Calc"),
        ev.message_delta("Once upon a ", agent="Calc"),
        ev.message_delta("time", agent="Calc"),
    ])  # fmt: skip
    _send(world_a, thread, "actually, a poem", strategy="interrupt")

    active.refresh_from_db()
    assert active.status == RunStatus.INTERRUPTED
    # Its question (its attempt had not stored it yet) and the reply as far as it was shown.
    assert _texts(active) == [("user", "tell me a story"), ("assistant", "Once upon a time")]
    assert async_to_sync(executor.execute)(held) == "superseded"


def test_a_stopped_reply_keeps_its_stored_turns_and_adds_only_the_unsaved_text(world_a, thread):
    from conversations import events as ev
    from conversations.session import ThreadSession

    run = _send(world_a, thread, "look it up")
    held = executor.claim(run.pk, owner="w")
    session = ThreadSession(
        tenant_id=run.tenant_id, thread_id=run.thread_id, run_id=run.pk, attempt=held.attempt
    )
    async_to_sync(session.add_items)([
        {"role": "user", "content": "look it up"},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Let me check."}]},
    ])  # fmt: skip
    _saw(run, held, [
        ev.message_delta("Let me check.", agent="Calc"),
        ev.message_completed("Let me check.", agent="Calc"),
        ev.tool_started(call_id="c1", tool="calculator", arguments="{}", agent="Calc"),
        ev.tool_finished(call_id="c1", tool="calculator", output="42", agent="Calc"),
        ev.message_delta("It is 4", agent="Calc"),
    ])  # fmt: skip
    services.run_cancel(tenant=world_a.tenant, run_id=run.pk, end_user=thread.end_user)

    assert _texts(run) == [
        ("user", "look it up"),
        ("assistant", "Let me check."),
        ("assistant", "It is 4"),
    ]


def test_a_stopped_run_counts_the_model_calls_it_completed(world_a, thread, monkeypatch):
    run = _send(world_a, thread, "hello there")
    finish = executor.finish

    def stopped_as_it_ends(held, outcome, **kwargs):  # the stop button, as the reply was saved
        services.run_cancel(tenant=world_a.tenant, run_id=run.pk)
        return finish(held, outcome, **kwargs)

    monkeypatch.setattr(executor, "finish", stopped_as_it_ends)
    assert async_to_sync(executor.execute)(executor.claim(run.pk, owner="w")) == "superseded"

    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
    records = UsageRecord.objects.for_tenant(world_a.tenant).filter(run_id=run.pk)
    assert records.count() == 1 and run.total_tokens == records.get().total_tokens > 0
    # Its timeline keeps what it did, and ends as the run did.
    kinds = [span["kind"] for span in run.trace]
    assert kinds.count("model_call") == 1 and kinds[-1] == "end" and kinds.count("end") == 1
    assert run.trace[-1]["status"] == "cancelled" and run.trace[-1]["message"] == "Stopped."
    page = world_a.client_for(world_a.admin).get(
        reverse("run-detail", args=[world_a.tenant.slug, run.pk])
    )
    assert re.search(r"<dt>Model calls</dt><dd>1</dd>", page.content.decode())


def test_a_tool_changes_nothing_only_if_it_is_the_built_in_one():
    from agents import function_tool

    from ai_agents import tools

    @function_tool(name_override="calculator")
    def from_an_mcp_server(expression: str) -> str:
        """Evaluate something, somewhere.

        Args:
            expression: the expression.
        """
        return "0"

    assert not executor.has_side_effects(tools.build("calculator", {}))
    assert executor.has_side_effects(from_an_mcp_server)  # the same name, another origin


def _message(text):
    return {"type": "message", "role": "assistant",
            "content": [{"type": "output_text", "text": text}]}  # fmt: skip


def _stopped_after_trimming(world, thread, question, stored, events, *, keep, redis_url):
    """A reply to `question` whose attempt stored `stored` (after the question) and streamed
    `events`, after four deltas that the stream then loses: it is trimmed to its last `keep`
    entries before the end user stops the reply. The run."""
    import redis as redis_client

    from conversations import events as ev
    from conversations.session import ThreadSession

    run = _send(world, thread, question)
    held = executor.claim(run.pk, owner="w")
    session = ThreadSession(
        tenant_id=run.tenant_id, thread_id=run.thread_id, run_id=run.pk, attempt=held.attempt
    )
    async_to_sync(session.add_items)([{"role": "user", "content": question}, *stored])
    _saw(run, held, [*[ev.message_delta("x", agent="Calc") for _ in range(4)], *events])
    client = redis_client.Redis.from_url(redis_url)
    try:
        client.xtrim(streams.stream_key(run.pk), maxlen=keep, approximate=False)
    finally:
        client.close()
    services.run_cancel(tenant=world.tenant, run_id=run.pk, end_user=thread.end_user)
    return run


def test_a_stopped_reply_on_a_trimmed_stream_keeps_its_unsaved_messages(world_a, thread, settings):
    """A reply longer than its stream's length cap: the attempt's start is gone from the
    stream, so its saved messages are told apart by their text and order, not their place."""
    from conversations import events as ev

    run = _stopped_after_trimming(
        world_a,
        thread,
        "look it up",
        [_message("Sure."), _message("Let me check.")],
        [
            ev.message_completed("Sure.", agent="Calc"),
            ev.message_completed("Let me check.", agent="Calc"),
            ev.tool_started(call_id="c1", tool="calculator", arguments="{}", agent="Calc"),
            ev.tool_finished(call_id="c1", tool="calculator", output="42", agent="Calc"),
            ev.message_completed("It is 42.", agent="Calc"),  # its turn is not stored yet
            ev.tool_started(call_id="c2", tool="calculator", arguments="{}", agent="Calc"),
            ev.message_delta("And the", agent="Calc"),
        ],
        keep=6,
        redis_url=settings.REDIS_URL,
    )

    assert _texts(run) == [
        ("user", "look it up"),
        ("assistant", "Sure."),
        ("assistant", "Let me check."),
        ("assistant", "It is 42.\n\nAnd the"),
    ]


def test_a_stopped_reply_on_a_trimmed_stream_keeps_a_message_that_repeats_a_saved_one(
    world_a, thread, settings
):
    """The agent said the same words in two turns; only the first turn is stored. The second
    one's message is unsaved, and is kept, though the stored items hold its text."""
    from conversations import events as ev

    run = _stopped_after_trimming(
        world_a,
        thread,
        "add them up",
        [
            _message("Checking."),
            {"type": "function_call", "name": "calculator", "call_id": "c1", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "2"},
        ],
        [
            ev.message_completed("Checking.", agent="Calc"),
            ev.tool_started(call_id="c1", tool="calculator", arguments="{}", agent="Calc"),
            ev.tool_finished(call_id="c1", tool="calculator", output="2", agent="Calc"),
            ev.message_completed("Checking.", agent="Calc"),  # its turn is not stored yet
            ev.tool_started(call_id="c2", tool="calculator", arguments="{}", agent="Calc"),
            ev.message_delta("The sum", agent="Calc"),
        ],
        keep=4,
        redis_url=settings.REDIS_URL,
    )

    assert _texts(run) == [
        ("user", "add them up"),
        ("assistant", "Checking."),
        (None, None),  # the call c1
        (None, None),  # and its result
        ("assistant", "Checking.\n\nThe sum"),
    ]


def test_a_call_id_reused_across_turns_anchors_nothing_on_a_trimmed_stream():
    """Some providers number calls per response: the later, unsaved call's events must not be
    taken for the stored call with the same id (the unsaved message between them was lost)."""
    from conversations import events as ev

    stored = [
        {"role": "user", "content": "go"},
        _message("A"),
        {"type": "function_call", "name": "calculator", "call_id": "call_0", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_0", "output": "1"},
    ]
    trimmed = [  # the attempt's `running` event and message A were trimmed away
        ev.tool_started(call_id="call_0", tool="calculator", arguments="{}", agent="Calc"),
        ev.tool_finished(call_id="call_0", tool="calculator", output="1", agent="Calc"),
        ev.message_completed("B", agent="Calc"),
        ev.tool_started(call_id="call_0", tool="calculator", arguments="{}", agent="Calc"),
        ev.tool_finished(call_id="call_0", tool="calculator", output="2", agent="Calc"),
        ev.message_delta("par", agent="Calc"),
    ]
    assert executor._unsaved_text(trimmed, stored, whole=False) == "B\n\npar"

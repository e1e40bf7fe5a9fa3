"""A message that arrives while the thread's reply is being saved, stopped or stored turn by turn:
both go through, one after the other (the lock order in conversations/executor.py: the thread,
then its runs), instead of PostgreSQL breaking a deadlock by failing one of them."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connections, transaction
from django.utils import timezone

from ai_agents.runtime import execute as agent_execute
from conversations import executor, services
from conversations.models import Item, Run, RunStatus, ThreadStatus


@pytest.mark.parametrize("ender", ["finish", "cancel", "session", "failed claim"])
@pytest.mark.django_db(transaction=True)
def test_a_message_sent_while_the_reply_ends_does_not_deadlock(monkeypatch, ender):
    from tests.conftest import make_world, member_thread

    world = make_world("Race")
    thread = member_thread(world)
    end_user = thread.end_user
    run = services.run_create(
        tenant=world.tenant, end_user=end_user, thread_id=thread.pk, input="hello"
    )
    held = executor.claim(run.pk, owner="w")
    if ender == "failed claim":  # its worker died on its last attempt: the next claim fails it
        Run.objects.for_tenant(world.tenant).filter(pk=run.pk).update(
            attempt=executor.max_attempts(), lease_expires_at=timezone.now() - timedelta(seconds=1)
        )

    finished: dict[str, object] = {}

    def worker_finishes() -> None:
        try:
            if ender == "finish":
                finished["ok"] = executor.finish(
                    held, agent_execute.RunOutcome("success", output="hi")
                )
            elif ender == "failed claim":
                finished["ok"] = executor.claim(run.pk, owner="w2") is None
            elif ender == "cancel":
                services.run_cancel(tenant=world.tenant, run_id=run.pk)
                finished["ok"] = True
            else:  # the worker stores a turn's items (ThreadSession.add_items)
                executor._session(held, run)._add(
                    [{"role": "assistant", "content": [{"type": "output_text", "text": "hi"}]}]
                )
                finished["ok"] = True
        except Exception as exc:
            finished["error"] = exc
        finally:
            connections.close_all()

    real_insert = services._insert_if_idle

    def insert_after_the_worker_started_finishing(*args, **kwargs):
        # run_create holds the thread's lock now; the worker's finish statement starts.
        worker = threading.Thread(target=worker_finishes)
        worker.start()
        other = connections.create_connection("default")  # to watch the locks
        try:
            for _ in range(200):
                with other.cursor() as cursor:
                    cursor.execute(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                    if cursor.fetchone()[0]:
                        break
                time.sleep(0.01)
        finally:
            other.close()
        try:
            return real_insert(*args, **kwargs)
        finally:
            insert_after_the_worker_started_finishing.worker = worker

    monkeypatch.setattr(services, "_insert_if_idle", insert_after_the_worker_started_finishing)
    created_error = None
    try:
        services.run_create(
            tenant=world.tenant,
            end_user=end_user,
            thread_id=thread.pk,
            input="and then?",
            strategy="enqueue",
        )
    except Exception as exc:
        created_error = exc
    insert_after_the_worker_started_finishing.worker.join(10)
    run.refresh_from_db()
    if ender != "session":
        assert run.status != "running"
    assert created_error is None, f"run_create failed: {created_error!r}"
    assert finished.get("ok") is True, f"finish failed: {finished!r}; run is {run.status}"


def _until_a_session_waits_for_a_lock() -> None:
    other = connections.create_connection("default")  # to watch the locks
    try:
        for _ in range(500):
            with other.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
                if cursor.fetchone()[0]:
                    return
            time.sleep(0.01)
    finally:
        other.close()
    raise AssertionError("the worker's finish never waited for the thread")


@pytest.mark.parametrize("change", ["stopped in line", "sent to wait in line"])
@pytest.mark.django_db(transaction=True)
def test_a_message_stopped_or_queued_as_the_reply_ends_does_not_stay_in_line(change):
    """The worker saves the reply while the thread is locked by a message that is stopped in
    line, or sent with "Send after this reply": once the lock is released, the reply's end sees
    that message. One stopped in line joins the conversation after the reply; one sent is
    promoted and starts. Neither stays in line for good (nothing else would take it out)."""
    from tests.conftest import make_world, member_thread

    world = make_world("Race")
    thread = member_thread(world)
    end_user = thread.end_user

    def send(text: str, **kw) -> Run:
        return services.run_create(
            tenant=world.tenant, end_user=end_user, thread_id=thread.pk, input=text, **kw
        )

    run = send("hello")
    waiting = send("and then?", strategy="enqueue") if change == "stopped in line" else None
    held = executor.claim(run.pk, owner="w")
    finished: dict[str, object] = {}

    def worker_finishes() -> None:
        try:
            finished["ok"] = executor.finish(held, agent_execute.RunOutcome("success", output="hi"))
        except Exception as exc:
            finished["error"] = exc
        finally:
            connections.close_all()

    worker = threading.Thread(target=worker_finishes)
    with transaction.atomic():  # the thread stays locked until this commits
        if waiting is not None:
            services.run_cancel(tenant=world.tenant, run_id=waiting.pk, end_user=end_user)
        else:
            waiting = send("and then?", strategy="enqueue")
        worker.start()
        _until_a_session_waits_for_a_lock()
    worker.join(10)
    assert finished.get("ok") is True, f"finish failed: {finished!r}"
    waiting.refresh_from_db()
    assert not waiting.queued, "the message is still in line, behind a reply that ended"
    kept = Item.objects.for_tenant(world.tenant).filter(run=waiting)
    if change == "stopped in line":
        assert waiting.status == RunStatus.CANCELLED
        assert [item.data["content"] for item in kept] == ["and then?"]
    else:
        assert waiting.status == RunStatus.PENDING and not kept.exists()  # its worker stores it
        thread.refresh_from_db()
        assert thread.status == ThreadStatus.BUSY

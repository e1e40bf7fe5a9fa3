""" "Don't send": an end user takes back their message that waits in line (sent with "Send after
this reply") before its turn. The run ends cancelled and its question never joins the
conversation; only the thread's end user may do it, and only while the message still waits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async

from controlplane.errors import Conflict, NotFound
from conversations import executor, selectors, services, streams
from conversations.models import Item, MultitaskStrategy, Run, RunSource, RunStatus
from tests.conversations.test_chat import (  # noqa: F401 (fixtures)
    WAIT,
    _agent,
    _close_async_clients,
    _execute,
    _open,
    _setup,
    _thread,
    _until_terminal,
    _url,
    ws_env,
)

FOLLOW_UP = "And what is 2 + 3?"


def _send(world, thread, text, strategy=MultitaskStrategy.REJECT):
    return services.run_create(
        tenant=world.tenant, end_user=thread.end_user, thread_id=thread.pk, input=text,
        source=RunSource.CHAT, strategy=strategy,
    )  # fmt: skip


@pytest.fixture
def line(world_a, world_b, kicked):
    """The member's thread with a reply being written and a message waiting in line behind it;
    the admin's thread in the same tenant, and a thread of another tenant."""
    agent = _agent(world_a)
    mine = _thread(world_a, world_a.member, agent)
    active = _send(world_a, mine, "use the calculator to compute 6 * 7")
    waiting = _send(world_a, mine, FOLLOW_UP, MultitaskStrategy.ENQUEUE)
    assert waiting.queued
    theirs = _thread(world_a, world_a.admin, agent)
    other_tenant = _thread(world_b, world_b.member, _agent(world_b, name="Globex bot"))
    return SimpleNamespace(
        mine=mine, active=active, waiting=waiting, theirs=theirs, other_tenant=other_tenant
    )


def _questions(world, thread) -> list:
    items = Item.objects.for_tenant(world.tenant).filter(thread=thread).order_by("id")
    return [i.data.get("content") for i in items if i.data.get("role") == "user"]


def test_a_withdrawn_message_is_cancelled_and_never_joins_the_conversation(
    world_a, line, django_capture_on_commit_callbacks, monkeypatch
):
    announced: list = []
    monkeypatch.setattr(streams, "announce_withdrawn", lambda *a: announced.append(a))
    with django_capture_on_commit_callbacks(execute=True):
        run = services.run_withdraw(
            tenant=world_a.tenant, end_user=line.mine.end_user, thread_id=line.mine.pk,
            run_id=line.waiting.pk,
        )  # fmt: skip
    assert selectors.input_text(run) == FOLLOW_UP
    run.refresh_from_db()
    assert (run.status, run.queued, run.withdrawn) == (RunStatus.CANCELLED, False, True)
    assert run.error == services.WITHDRAWN and run.finished_at is not None
    assert announced == [(line.mine.pk, run.pk)]
    # The chat no longer shows it among the messages waiting.
    waiting = selectors.pending_inputs(tenant=world_a.tenant, thread=line.mine)
    assert [str(e.html) for e in waiting] == ["use the calculator to compute 6 * 7"]

    # The reply ahead of it ends: nothing is promoted, and its question is not kept (a message
    # stopped in line would be, after that reply).
    held = executor.claim(line.active.pk, owner="t")
    assert async_to_sync(executor.execute)(held) == RunStatus.SUCCESS
    assert _questions(world_a, line.mine) == ["use the calculator to compute 6 * 7"]
    assert not selectors.pending_inputs(tenant=world_a.tenant, thread=line.mine)
    assert Run.objects.for_tenant(world_a.tenant).get(pk=run.pk).status == RunStatus.CANCELLED

    # Taken back twice (two tabs at once): the same answer, nothing more written.
    again = services.run_withdraw(
        tenant=world_a.tenant, end_user=line.mine.end_user, thread_id=line.mine.pk,
        run_id=line.waiting.pk,
    )  # fmt: skip
    assert again.pk == run.pk and again.finished_at == run.finished_at


def test_the_next_message_in_line_goes_in_its_turn_and_a_stopped_one_is_still_kept(world_a, line):
    """Only the withdrawn message leaves the line: a message stopped in line is still kept after
    the reply, and the one after it starts."""
    stopped = _send(world_a, line.mine, "stopped in line", MultitaskStrategy.ENQUEUE)
    services.run_stop(tenant=world_a.tenant, actor=world_a.actor(), run_id=stopped.pk)
    last = _send(world_a, line.mine, "last in line", MultitaskStrategy.ENQUEUE)
    services.run_withdraw(
        tenant=world_a.tenant, end_user=line.mine.end_user, thread_id=line.mine.pk,
        run_id=line.waiting.pk,
    )  # fmt: skip
    services.run_cancel(tenant=world_a.tenant, run_id=line.active.pk, end_user=line.mine.end_user)
    assert _questions(world_a, line.mine) == [
        "use the calculator to compute 6 * 7",
        "stopped in line",
    ]
    last.refresh_from_db()
    assert not last.queued and last.status == RunStatus.PENDING  # its turn has come


def test_a_message_that_started_meanwhile_is_not_withdrawn(world_a, line):
    """The reply ahead ended just before: the message was sent to the agent, nothing changes."""
    services.run_cancel(tenant=world_a.tenant, run_id=line.active.pk, end_user=line.mine.end_user)
    line.waiting.refresh_from_db()
    assert not line.waiting.queued
    with pytest.raises(Conflict, match="already been sent to the agent"):
        services.run_withdraw(
            tenant=world_a.tenant, end_user=line.mine.end_user, thread_id=line.mine.pk,
            run_id=line.waiting.pk,
        )  # fmt: skip
    after = Run.objects.for_tenant(world_a.tenant).get(pk=line.waiting.pk)
    assert (after.status, after.withdrawn) == (RunStatus.PENDING, False)
    # Nor one that ended.
    with pytest.raises(Conflict, match="already been sent"):
        services.run_withdraw(
            tenant=world_a.tenant, end_user=line.mine.end_user, thread_id=line.mine.pk,
            run_id=line.active.pk,
        )  # fmt: skip


def test_a_message_stopped_in_line_is_not_withdrawn(world_a, line):
    services.run_stop(tenant=world_a.tenant, actor=world_a.actor(), run_id=line.waiting.pk)
    with pytest.raises(Conflict, match="already stopped"):
        services.run_withdraw(
            tenant=world_a.tenant, end_user=line.mine.end_user, thread_id=line.mine.pk,
            run_id=line.waiting.pk,
        )  # fmt: skip
    after = Run.objects.for_tenant(world_a.tenant).get(pk=line.waiting.pk)
    assert after.queued and not after.withdrawn


def test_another_end_user_thread_or_tenant_cannot_withdraw_it(world_a, world_b, line):
    other_end_user = services.end_user_for_member(tenant=world_a.tenant, user=world_a.admin)
    attempts = [
        # another end user of the tenant, on their own thread or naming the owner's
        dict(tenant=world_a.tenant, end_user=other_end_user, thread_id=line.theirs.pk),
        dict(tenant=world_a.tenant, end_user=other_end_user, thread_id=line.mine.pk),
        # the owner naming another thread of theirs than the message's
        dict(tenant=world_a.tenant, end_user=line.mine.end_user, thread_id=line.theirs.pk),
        # another tenant
        dict(
            tenant=world_b.tenant,
            end_user=line.other_tenant.end_user,
            thread_id=line.other_tenant.pk,
        ),
        dict(tenant=world_b.tenant, end_user=line.other_tenant.end_user, thread_id=line.mine.pk),
    ]
    for attempt in attempts:
        with pytest.raises(NotFound):
            services.run_withdraw(run_id=line.waiting.pk, **attempt)
    with pytest.raises(NotFound):
        services.run_withdraw(
            tenant=world_a.tenant, end_user=line.mine.end_user, thread_id=line.mine.pk,
            run_id="not-a-uuid",
        )  # fmt: skip
    after = Run.objects.for_tenant(world_a.tenant).get(pk=line.waiting.pk)
    assert (after.status, after.queued, after.withdrawn) == (RunStatus.PENDING, True, False)


def test_a_withdrawn_message_does_not_stop_the_failed_reply_ahead_being_tried_again(world_a, line):
    services.run_withdraw(
        tenant=world_a.tenant, end_user=line.mine.end_user, thread_id=line.mine.pk,
        run_id=line.waiting.pk,
    )  # fmt: skip
    Run.objects.for_tenant(world_a.tenant).filter(pk=line.active.pk).update(
        status=RunStatus.ERROR, error="boom"
    )
    assert selectors.run_retryable(tenant=world_a.tenant, thread=line.mine).pk == line.active.pk
    services.run_create(
        tenant=world_a.tenant, end_user=line.mine.end_user, thread_id=line.mine.pk, input=None,
        retry_of=line.active.pk,
    )  # fmt: skip


# --- Without the page's script ---------------------------------------------------------------


def test_dont_send_without_the_pages_script_takes_the_message_back_into_the_box(world_a, line):
    client = world_a.client_for(world_a.member)
    page = client.get(_url("chat-thread", world_a, thread_id=line.mine.pk)).content.decode()
    assert page.count('name="withdraw"') == 1  # only under the message waiting in line
    assert f'name="withdraw" value="{line.waiting.pk}"' in page
    assert 'Don\'t send<span class="sr-only"> this message</span></button>' in page

    url = _url("chat-send", world_a, thread_id=line.mine.pk)
    response = client.post(url, {"withdraw": str(line.waiting.pk)})
    # Redirected to the conversation: reloading it posts nothing again.
    thread_url = _url("chat-thread", world_a, thread_id=line.mine.pk)
    assert response.status_code == 302 and response["Location"] == thread_url
    assert Run.objects.for_tenant(world_a.tenant).get(pk=line.waiting.pk).withdrawn
    text = client.get(thread_url).content.decode()
    assert f">{FOLLOW_UP}</textarea>" in text and 'name="withdraw"' not in text
    assert f">{FOLLOW_UP}</textarea>" not in client.get(thread_url).content.decode()  # once

    # Another message, sent after its turn came (an old page's button): refused, with why.
    services.run_cancel(tenant=world_a.tenant, run_id=line.active.pk, end_user=line.mine.end_user)
    late = _send(world_a, line.mine, "late", MultitaskStrategy.REJECT)
    services.run_cancel(tenant=world_a.tenant, run_id=late.pk, end_user=line.mine.end_user)
    response = client.post(url, {"withdraw": str(late.pk)})
    assert response.status_code == 409
    assert "already been sent to the agent" in response.content.decode()


def test_dont_send_without_the_script_on_another_members_or_tenants_thread_is_404(
    world_a, world_b, line
):
    for client in (world_a.client_for(world_a.admin), world_b.client_for(world_b.member)):
        for slug_world in (world_a, world_b):
            url = _url("chat-send", slug_world, thread_id=line.mine.pk)
            assert client.post(url, {"withdraw": str(line.waiting.pk)}).status_code == 404
    after = Run.objects.for_tenant(world_a.tenant).get(pk=line.waiting.pk)
    assert (after.status, after.queued, after.withdrawn) == (RunStatus.PENDING, True, False)


# --- Over the socket -------------------------------------------------------------------------


pytestmark_ws = pytest.mark.django_db(transaction=True)


@pytestmark_ws
async def test_dont_send_over_the_socket_takes_it_back_for_every_tab(
    kicked,
    _close_async_clients,  # noqa: F811 (the fixture)
):
    w = await database_sync_to_async(_setup)()
    socket, _ = await _open(w, w.mine, w.a.member)
    other_tab, _ = await _open(w, w.mine, w.a.member)
    try:
        await socket.send_json_to({"type": "send", "text": "first"})
        active = (await socket.receive_json_from(timeout=WAIT))["run_id"]
        assert (await other_tab.receive_json_from(timeout=WAIT))["run_id"] == active
        await socket.send_json_to({"type": "send", "text": FOLLOW_UP, "strategy": "enqueue"})
        created = await socket.receive_json_from(timeout=WAIT)
        assert created["type"] == "run.created" and created["queued"]
        waiting = created["run_id"]

        # A message of another thread (the admin's) is not found from this one.
        theirs = await database_sync_to_async(_send)(w.a, w.theirs, "theirs")
        await socket.send_json_to({"type": "withdraw", "run_id": str(theirs.pk)})
        refused = await socket.receive_json_from(timeout=WAIT)
        assert refused["type"] == "error" and refused["code"] == "not_found"

        await socket.send_json_to({"type": "withdraw", "run_id": waiting})
        assert await socket.receive_json_from(timeout=WAIT) == {
            "type": "run.withdrawn", "run_id": waiting, "text": FOLLOW_UP,
        }  # fmt: skip
        assert await other_tab.receive_json_from(timeout=WAIT) == {
            "type": "run.withdrawn", "run_id": waiting,
        }  # fmt: skip
        # The socket that asked hears it once.
        await socket.send_json_to({"type": "ping"})
        assert await socket.receive_json_from(timeout=WAIT) == {"type": "pong"}

        # The reply being written was sent already: refused, nothing changes.
        await socket.send_json_to({"type": "withdraw", "run_id": active})
        refused = await socket.receive_json_from(timeout=WAIT)
        assert refused["type"] == "error" and refused["code"] == "conflict"
        assert "already been sent" in refused["message"]

        assert await _execute(active) == RunStatus.SUCCESS
        ended = await _until_terminal(socket)
        assert {m["run_id"] for m in ended} == {active}
        assert await socket.receive_nothing(timeout=0.2)
        runs = {r.pk: r async for r in Run.objects.for_tenant(w.a.tenant).filter(thread=w.mine)}
        assert [str(r.pk) for r in runs.values() if r.withdrawn] == [waiting]
        questions = [
            i.data.get("content")
            async for i in Item.objects.for_tenant(w.a.tenant).filter(thread=w.mine)
            if i.data.get("role") == "user"
        ]
        assert questions == ["first"]
    finally:
        await socket.disconnect()
        await other_tab.disconnect()


def test_a_waiting_message_keeps_its_text_as_typed_for_dont_send(world_a, line):
    """The page's "Don't send" puts the text back in the box from the message's `data-text`:
    the bubble the server draws has its line breaks as <br>, which the page cannot read back.
    A message stopped in line has no "Don't send", and is not faded like one still waiting."""
    typed = "line one\nline two & <three>"
    two_lines = _send(world_a, line.mine, typed, MultitaskStrategy.ENQUEUE)
    services.run_cancel(tenant=world_a.tenant, run_id=line.waiting.pk, end_user=line.mine.end_user)
    client = world_a.client_for(world_a.member)
    page = client.get(_url("chat-thread", world_a, thread_id=line.mine.pk)).content.decode()

    start = page.index(f'data-waiting-run="{two_lines.pk}"')
    tag = page[page.rindex("<div", 0, start) : page.index(">", start)]
    assert 'data-text="line one\nline two &amp; &lt;three&gt;"' in tag
    stopped = page.index(f'data-waiting-run="{line.waiting.pk}"')
    stopped_tag = page[page.rindex("<div", 0, stopped) : page.index(">", stopped)]
    assert "msg-stopped" in stopped_tag and "data-text" not in stopped_tag

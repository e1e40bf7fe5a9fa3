"""The chat page's id for each message it sends: kept with the run and shown with the message in
the history, wherever the message is (saved, waiting in line, stopped in line), so that a page
whose connection dropped as it sent a message finds out exactly whether the server stored it."""

from __future__ import annotations

import re

import pytest
from channels.db import database_sync_to_async

from conversations import selectors, services
from conversations.models import Item, MultitaskStrategy, Run, RunSource
from tests.conversations.test_chat import (  # noqa: F401 (fixtures)
    WAIT,
    _agent,
    _close_async_clients,
    _open,
    _setup,
    _thread,
    _url,
    ws_env,
)

SENT, QUEUED, STOPPED = "a" * 32, "b" * 32, "c" * 32


def _send(world, thread, text, message_id, strategy=MultitaskStrategy.REJECT):
    return services.run_create(
        tenant=world.tenant, end_user=thread.end_user, thread_id=thread.pk, input=text,
        source=RunSource.CHAT, strategy=strategy,
        metadata=services.chat_message_metadata(message_id),
    )  # fmt: skip


def _ids_by_text(html: str) -> dict[str, str | None]:
    found = {}
    for match in re.finditer(
        r'<div class="msg msg-user[^"]*"([^>]*)><div class="bubble">([^<]*)', html
    ):
        attrs, text = match.groups()
        said = re.search(r'data-message-id="([^"]*)"', attrs)
        found[text] = said.group(1) if said else None
    return found


def test_every_message_of_the_history_carries_its_pages_id(world_a, kicked):
    thread = _thread(world_a, world_a.member, _agent(world_a))
    active = _send(world_a, thread, "saved", SENT)
    Item.objects.create(
        tenant=world_a.tenant, thread=thread, run=active, data={"role": "user", "content": "saved"}
    )
    _send(world_a, thread, "waiting", QUEUED, MultitaskStrategy.ENQUEUE)
    stopped = _send(world_a, thread, "stopped", STOPPED, MultitaskStrategy.ENQUEUE)
    services.run_stop(tenant=world_a.tenant, actor=world_a.actor(), run_id=stopped.pk)
    assert Run.objects.for_tenant(world_a.tenant).get(pk=active.pk).metadata == {
        selectors.CHAT_MESSAGE_ID: SENT
    }

    client = world_a.client_for(world_a.member)
    expected = {"saved": SENT, "waiting": QUEUED, "stopped": STOPPED}
    for url, query in (
        (_url("chat-thread", world_a, thread_id=thread.pk), {}),
        (_url("chat-items", world_a, thread_id=thread.pk), {}),
        (_url("chat-items", world_a, thread_id=thread.pk), {"after": 0}),
    ):
        html = client.get(url, query).content.decode()
        assert _ids_by_text(html) == expected, url
    # The message stopped in line is drawn as one of those waiting, with its run (and marked
    # stopped, so that it is not faded like them).
    html = client.get(_url("chat-thread", world_a, thread_id=thread.pk)).content.decode()
    assert f'msg-waiting msg-stopped" data-pending data-waiting-run="{stopped.pk}"' in html


@pytest.mark.parametrize("given", [None, 7, "", "short", "x" * 65, 'a"b' * 4, "<script>aaaa"])
def test_a_value_that_is_not_a_pages_id_is_not_kept(given):
    assert services.chat_message_metadata(given) == {}


@pytest.mark.django_db(transaction=True)
async def test_the_socket_keeps_the_id_a_message_was_sent_with(
    kicked,
    _close_async_clients,  # noqa: F811 (the fixture)
):
    w = await database_sync_to_async(_setup)()
    socket, _ = await _open(w, w.mine, w.a.member)
    try:
        await socket.send_json_to({"type": "send", "text": "hello", "message_id": SENT})
        created = await socket.receive_json_from(timeout=WAIT)
        assert created["type"] == "run.created"
        run = await Run.objects.for_tenant(w.a.tenant).aget(pk=created["run_id"])
        assert run.metadata == {selectors.CHAT_MESSAGE_ID: SENT}
    finally:
        await socket.disconnect()

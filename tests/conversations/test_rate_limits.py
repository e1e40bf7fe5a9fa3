"""The chat when an end user reaches a rate limit: a friendly error that says when they can send
again, and nothing written for the refused message (the page keeps the text; tests/browser)."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async

from controlplane import ratelimit
from conversations.models import Item, Run
from tenants import services as tenant_services
from tests.conversations.test_chat import (  # noqa: F401 (fixtures)
    WAIT,
    _close_async_clients,
    _open,
    _setup,
    ws_env,
)

T0 = 1_800_000_000_000


def _setup_limited():
    w = _setup()
    tenant_services.tenant_limits_update(
        tenant=w.a.tenant, actor=w.a.actor(), end_user_runs_per_minute=1
    )
    return w


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("_close_async_clients")
async def test_a_message_over_the_limit_gets_a_friendly_error_and_writes_nothing(monkeypatch):
    now = [T0]
    monkeypatch.setattr(ratelimit, "clock_ms", lambda: now[0])
    w = await database_sync_to_async(_setup_limited)()
    socket, _ = await _open(w, w.mine, w.a.member)
    try:
        await socket.send_json_to({"type": "send", "text": "first"})
        assert (await socket.receive_json_from(timeout=WAIT))["type"] == "run.created"
        runs = Run.objects.for_tenant(w.a.tenant)
        items = Item.objects.for_tenant(w.a.tenant)
        before = (await runs.acount(), await items.acount())
        now[0] = T0 + 45_500
        await socket.send_json_to({"type": "send", "text": "second", "strategy": "enqueue"})
        answer = await socket.receive_json_from(timeout=WAIT)
        assert answer == {
            "type": "error",
            "code": "rate_limited",
            "message": "Your message was not sent: you can send 1 message per minute. "
            "You can send it again in 15 seconds.",
            "retry_after": 15,
            "limit": 1,
            "window": 60,
        }
        assert (await runs.acount(), await items.acount()) == before
        # another member of the tenant chats on
        other, _ = await _open(w, w.theirs, w.a.admin)
        await other.send_json_to({"type": "send", "text": "hi"})
        assert (await other.receive_json_from(timeout=WAIT))["type"] == "run.created"
        await other.disconnect()
    finally:
        await socket.disconnect()

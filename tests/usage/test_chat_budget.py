"""The chat tells its user, in plain words, that the tenant's monthly budget is used up."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from conversations.models import Run
from tests.conversations.test_chat import (  # noqa: F401  (fixtures)
    WAIT,
    _close_async_clients,
    _open,
    _setup,
    ws_env,
)
from usage import services as usage_services
from usage.models import MonthlyUsage


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("_close_async_clients")
async def test_the_chat_refuses_a_message_once_the_budget_is_used_up():
    w = await database_sync_to_async(_setup)()

    def exhaust() -> None:
        usage_services.budget_set(
            tenant=w.a.tenant, actor=w.a.actor(), token_limit=10, cost_limit=None, warn_percent=80
        )
        MonthlyUsage.objects.create(
            tenant=w.a.tenant, month=usage_services.month_of(timezone.now()), total_tokens=10
        )

    await database_sync_to_async(exhaust)()
    socket, _ = await _open(w, w.mine, w.a.member)
    try:
        await socket.send_json_to({"type": "send", "text": "hello"})
        answer = await socket.receive_json_from(timeout=WAIT)
        assert answer["type"] == "error" and answer["code"] == "budget_exhausted"
        assert answer["message"].startswith(
            "This tenant has used its monthly budget (10 tokens of 10); it resets on 1 "
        )
        assert answer["message"].endswith("An owner can raise it in Settings → Monthly budget.")
        assert await Run.objects.for_tenant(w.a.tenant).filter(thread=w.mine).acount() == 0
    finally:
        await socket.disconnect()

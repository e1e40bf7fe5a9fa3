"""The chat tells its user, in plain words, that the tenant's monthly budget is used up, and
what they can do about it: an owner where to raise it, an admin where to see it, a member (who
cannot open the budget's page) to ask an owner."""

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
    _thread,
    _url,
    ws_env,
)
from usage import services as usage_services
from usage.models import MonthlyUsage

MEMBER_ADVICE = "Ask an owner of Acme to raise it."
ADMIN_ADVICE = "An owner can raise it; see Settings → Monthly budget."
OWNER_ADVICE = "You can raise it in Settings → Monthly budget."


def _exhaust(world) -> None:
    usage_services.budget_set(
        tenant=world.tenant, actor=world.actor(), token_limit=10, cost_limit=None, warn_percent=80
    )
    MonthlyUsage.objects.create(
        tenant=world.tenant, month=usage_services.month_of(timezone.now()), total_tokens=10
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("_close_async_clients")
async def test_the_chat_refuses_a_message_once_the_budget_is_used_up():
    w = await database_sync_to_async(_setup)()
    await database_sync_to_async(_exhaust)(w.a)
    mine_by_owner = await database_sync_to_async(_thread)(w.a, w.a.owner, w.agent)
    for thread, user, advice in (
        (w.mine, w.a.member, MEMBER_ADVICE),
        (w.theirs, w.a.admin, ADMIN_ADVICE),
        (mine_by_owner, w.a.owner, OWNER_ADVICE),
    ):
        socket, _ = await _open(w, thread, user)
        try:
            await socket.send_json_to({"type": "send", "text": "hello"})
            answer = await socket.receive_json_from(timeout=WAIT)
            assert answer["type"] == "error" and answer["code"] == "budget_exhausted"
            assert answer["message"].startswith(
                "This tenant has used its monthly budget (10 tokens of 10); it resets on 1 "
            )
            assert answer["message"].endswith(f". {advice}"), (user.email, answer["message"])
            assert await Run.objects.for_tenant(w.a.tenant).filter(thread=thread).acount() == 0
        finally:
            await socket.disconnect()


@pytest.mark.django_db
def test_the_chat_without_its_script_says_the_same_to_each_role():
    """The composer's plain form (the page's script did not run) is refused in the same words:
    a member is not sent to a settings page they cannot open."""
    w = _setup()
    _exhaust(w.a)
    for user, advice in (
        (w.a.member, MEMBER_ADVICE),
        (w.a.admin, ADMIN_ADVICE),
        (w.a.owner, OWNER_ADVICE),
    ):
        thread = _thread(w.a, user, w.agent)
        response = w.a.client_for(user).post(
            _url("chat-send", w.a, thread_id=thread.pk), {"text": "hello"}
        )
        assert response.status_code == 402
        page = response.content.decode()
        assert "This tenant has used its monthly budget (10 tokens of 10)" in page
        assert advice in page, (user.email, page)
        if user == w.a.member:
            assert "Settings → Monthly budget" not in page

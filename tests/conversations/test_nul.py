"""NUL characters (U+0000), which PostgreSQL's text and jsonb cannot hold: a person's message
with one is refused, naming it; a tool's output or a model's text with one is stored with it
replaced, and the run ends as it would have (controlplane/text.py)."""

from __future__ import annotations

import pytest
from agents import function_tool
from asgiref.sync import async_to_sync

from ai_agents import services as agent_services
from ai_agents import tools
from controlplane.errors import ValidationFailed
from controlplane.text import has_nul, without_nul
from conversations import executor, services
from conversations.models import Item, RunStatus
from tests.conftest import make_world


def test_without_nul_replaces_in_strings_keys_and_nested_values():
    value = {"a\x00": ["x\x00y", {"k": "\x00"}], "n": 1, "ok": "fine"}
    assert without_nul(value) == {"a\ufffd": ["x\ufffdy", {"k": "\ufffd"}], "n": 1, "ok": "fine"}
    clean = {"ok": ["fine"]}
    assert without_nul(clean) is clean and not has_nul(clean)


def _thread(world):
    agent = agent_services.agent_create(
        tenant=world.tenant,
        actor=world.actor(),
        name="Calc",
        config={"tools": [{"name": "calculator"}]},
    )
    agent_services.agent_publish(tenant=world.tenant, actor=world.actor(), agent_id=agent.pk)
    end_user = services.end_user_for_member(tenant=world.tenant, user=world.member)
    return services.thread_create(tenant=world.tenant, end_user=end_user, agent_id=agent.pk)


@pytest.mark.parametrize(
    "change",
    [
        {"input": "hello\x00there"},
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": "a\x00"}]}]},
        {"input": "hello", "metadata": {"note\x00": "x"}},
    ],
    ids=["text", "content part", "metadata"],
)
def test_a_message_with_a_nul_is_refused_naming_it(world_a, change):
    thread = _thread(world_a)
    field = "metadata" if "metadata" in change else "input"
    with pytest.raises(ValidationFailed, match="NUL character") as refused:
        services.run_create(
            tenant=world_a.tenant, end_user=thread.end_user, thread_id=thread.pk, **change
        )
    assert field in refused.value.fields
    assert not Item.objects.for_tenant(world_a.tenant).filter(thread=thread).exists()


def test_a_thread_title_with_a_nul_is_refused(world_a):
    thread = _thread(world_a)
    with pytest.raises(ValidationFailed, match="NUL character"):
        services.thread_rename(
            tenant=world_a.tenant, end_user=thread.end_user, thread_id=thread.pk, title="a\x00"
        )


@pytest.mark.django_db(transaction=True)
def test_a_tool_output_with_a_nul_is_stored_replaced_and_the_run_succeeds(monkeypatch):
    world = make_world("Nul")
    thread = _thread(world)

    def nul_calculator(settings):
        @function_tool(name_override="calculator")
        def calculator(expression: str) -> str:
            """Evaluate an arithmetic expression.

            Args:
                expression: the expression.
            """
            return "42\x00"  # as a fetched page with a NUL byte would be

        return calculator

    monkeypatch.setattr(tools, "_build_calculator", nul_calculator)
    run = services.run_create(
        tenant=world.tenant,
        end_user=thread.end_user,
        thread_id=thread.pk,
        input="use the calculator to compute 6 * 7",
    )
    assert async_to_sync(executor.execute)(executor.claim(run.pk, owner="w")) == "success"
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCESS
    outputs = [
        item.data["output"]
        for item in Item.objects.for_tenant(world.tenant).filter(run=run)
        if item.data.get("type") == "function_call_output"
    ]
    assert outputs == ["42\ufffd"]

"""The demo tenant of `make run`: published agents on the built-in offline model that a new user
can try at once, showing a tool, a handoff and a guardrail."""

import io

from asgiref.sync import async_to_sync
from django.core.management import call_command

from ai_agents import selectors
from ai_agents.runtime import execute
from tenants.models import Tenant


def _try(tenant, agent, text):
    return async_to_sync(execute.run_version)(
        tenant=tenant, version=agent.published_version, input=text
    )


def test_the_demo_agents_show_tools_handoffs_and_guardrails_without_a_key(db):
    out = io.StringIO()
    call_command("bootstrap_demo", stdout=out)
    assert "Password:" in out.getvalue()
    demo = Tenant.objects.get(slug="demo")
    agents = {a.name: a for a in selectors.agent_list(tenant=demo, published_only=True)}
    assert set(agents) == {"Demo assistant", "Billing specialist"}
    assistant = agents["Demo assistant"]

    tool = _try(demo, assistant, "Use the calculator to compute 12 * 12")
    assert tool.status == "success" and tool.tool_calls[0]["output"] == "144"
    assert "[built-in offline model]" in tool.text

    handoff = _try(demo, assistant, "Transfer me to the billing specialist please")
    assert handoff.status == "success" and handoff.last_agent == "Billing specialist"

    blocked = _try(demo, assistant, "my password is hunter2")
    assert blocked.status == "guardrail" and "passwords" in blocked.message

    # a second run of `make run` leaves them alone
    call_command("bootstrap_demo", stdout=io.StringIO())
    assert selectors.agent_list(tenant=demo).count() == 2

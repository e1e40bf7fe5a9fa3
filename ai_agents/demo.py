"""The demo tenant's agents: published, on the built-in offline model, so a new user can try
tools, handoffs and guardrails in the playground at once, with no key and no network."""

from __future__ import annotations

from django.db import transaction

from ai_agents import services
from ai_agents.models import Agent
from tenants.actors import Actor
from tenants.models import Membership, Tenant, User

BILLING = {
    "name": "Billing specialist",
    "description": "Answers questions about invoices and payments.",
    "instructions": "You are the billing specialist. Start every answer with Billing:",
}
ASSISTANT = {
    "name": "Demo assistant",
    "description": "A first agent to try: tools, a handoff and a guardrail, no API key needed.",
    "instructions": (
        "You are a helpful assistant of the Demo workspace. Use the calculator for arithmetic "
        "and the date tool for times; hand billing questions to the Billing specialist."
    ),
}


@transaction.atomic
def ensure(*, tenant: Tenant, user: User) -> bool:
    """Create and publish the demo agents unless the tenant has agents already."""
    if Agent.objects.for_tenant(tenant).exists():
        return False
    membership = Membership.objects.for_tenant(tenant).get(user=user)
    actor = Actor(user=user, membership=membership)
    billing = services.agent_create(
        tenant=tenant,
        actor=actor,
        name=BILLING["name"],
        description=BILLING["description"],
        config={"instructions": BILLING["instructions"]},
    )
    services.agent_publish(tenant=tenant, actor=actor, agent_id=billing.pk, note="Demo")
    assistant = services.agent_create(
        tenant=tenant,
        actor=actor,
        name=ASSISTANT["name"],
        description=ASSISTANT["description"],
        config={
            "instructions": ASSISTANT["instructions"],
            "tools": [{"name": "calculator"}, {"name": "current_datetime"}],
            "handoffs": [str(billing.pk)],
            "input_guardrails": [
                {
                    "kind": "blocked_words",
                    "words": ["password", "credit card number"],
                    "message": "For your safety, please do not share passwords or card numbers.",
                }
            ],
        },
    )
    services.agent_publish(tenant=tenant, actor=actor, agent_id=assistant.pk, note="Demo")
    return True

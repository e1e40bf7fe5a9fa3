import uuid

import pytest

from ai_agents import selectors, services
from ai_agents.models import Agent, AgentVersion, ModelProvider
from controlplane.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from tenants.models import AuditEvent

SECRET = "sk-test-SECRET-1234567890"


def _agent(world, name="Support", **config):
    return services.agent_create(tenant=world.tenant, actor=world.actor(), name=name, config=config)


def _provider(world, name="OpenAI", key=SECRET):
    return services.provider_create(
        tenant=world.tenant,
        actor=world.actor(),
        name=name,
        base_url="https://api.example.com/v1",
        default_model="gpt-test",
        api_key=key,
    )


def test_a_provider_key_is_encrypted_and_never_audited(world_a):
    provider = _provider(world_a)
    row = ModelProvider.objects.for_tenant(world_a.tenant).get(pk=provider.pk)
    assert SECRET not in row.api_key_encrypted and row.api_key_last4 == "7890"
    services.provider_update(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        provider_id=provider.pk,
        name="OpenAI",
        base_url=provider.base_url,
        default_model="gpt-test-2",
        api=provider.api,
        timeout_seconds=30,
        api_key=None,
    )
    row.refresh_from_db()
    assert row.api_key_last4 == "7890"  # None keeps the key
    dump = repr(list(AuditEvent.objects.for_tenant(world_a.tenant).values()))
    assert SECRET not in dump and row.api_key_encrypted not in dump
    assert "(secret)" in dump


def test_provider_input_is_checked_field_by_field(world_a):
    with pytest.raises(ValidationFailed) as exc:
        services.provider_create(
            tenant=world_a.tenant,
            actor=world_a.actor(),
            name="",
            base_url="ftp://x",
            default_model="",
            timeout_seconds=0,
        )
    assert set(exc.value.fields) == {"name", "base_url", "default_model", "timeout_seconds"}
    with pytest.raises(PermissionDenied):
        services.provider_create(
            tenant=world_a.tenant,
            actor=world_a.actor(world_a.member),
            name="x",
            base_url="https://x.test",
            default_model="m",
        )


def test_a_config_that_names_another_tenants_objects_is_not_found(world_a, world_b):
    foreign_provider = _provider(world_b)
    foreign_agent = _agent(world_b, "Theirs")
    foreign_mcp = services.mcp_server_create(
        tenant=world_b.tenant,
        actor=world_b.actor(),
        name="tools",
        url="https://mcp.example.com/mcp",
    )
    for config in (
        {"provider_id": str(foreign_provider.pk)},
        {"handoffs": [str(foreign_agent.pk)]},
        {"mcp_servers": [{"server_id": str(foreign_mcp.pk)}]},
        {"provider_id": str(uuid.uuid4())},
    ):
        with pytest.raises(NotFound):
            _agent(world_a, "Mine", **config)
    assert not Agent.objects.for_tenant(world_a.tenant).exists()  # nothing half-written


def test_bad_configs_name_the_field(world_a):
    cases = [
        ({"tools": [{"name": "rm_rf"}]}, "tools"),
        ({"tools": [{"name": "http_get", "settings": {"max_bytes": -1}}]}, "tools"),
        ({"model_settings": {"temperature": 9}}, "model_settings.temperature"),
        ({"input_guardrails": [{"kind": "pattern", "pattern": "(unclosed"}]}, "input_guardrails.0"),
        ({"max_turns": 0}, "max_turns"),
        ({"output_schema": {"type": "string"}}, "output_schema"),
        ({"unknown": 1}, "unknown"),
    ]
    for config, field in cases:
        with pytest.raises(ValidationFailed) as exc:
            _agent(world_a, **config)
        assert field in exc.value.fields, (config, exc.value.fields)


def test_publish_freezes_the_draft_and_restore_publishes_a_copy(world_a):
    agent = _agent(world_a, instructions="v1 instructions")
    actor = world_a.actor()
    v1 = services.agent_publish(tenant=world_a.tenant, actor=actor, agent_id=agent.pk)
    assert (v1.number, v1.state) == (1, "published")
    with pytest.raises(Conflict):
        services.agent_publish(tenant=world_a.tenant, actor=actor, agent_id=agent.pk)

    services.draft_save(
        tenant=world_a.tenant,
        actor=actor,
        agent_id=agent.pk,
        config={"instructions": "v2 instructions", "max_turns": 4},
    )
    # the live version is untouched by editing
    agent.refresh_from_db()
    assert agent.published_version.config["instructions"] == "v1 instructions"
    v2 = services.agent_publish(tenant=world_a.tenant, actor=actor, agent_id=agent.pk, note="x")
    assert v2.number == 2
    changes = dict(
        (f, (a, b))
        for f, a, b in selectors.version_compare(
            tenant=world_a.tenant, agent=agent, a_id=v1.pk, b_id=v2.pk
        )
    )
    assert changes == {"instructions": ("v1 instructions", "v2 instructions"), "max_turns": (10, 4)}

    v3 = services.agent_restore(
        tenant=world_a.tenant, actor=actor, agent_id=agent.pk, version_id=v1.pk
    )
    agent.refresh_from_db()
    assert agent.published_version == v3 and v3.number == 3 and v3.note == "Restored from v1"
    assert v3.config == v1.config
    v1.refresh_from_db()
    assert v1.number == 1 and v1.config["instructions"] == "v1 instructions"  # history intact
    numbers = [v.number for v in selectors.version_list(tenant=world_a.tenant, agent=agent)]
    assert numbers == [3, 2, 1]


def test_only_one_draft_exists_per_agent(world_a):
    agent = _agent(world_a)
    for text in ("a", "b", "c"):
        services.draft_save(
            tenant=world_a.tenant,
            actor=world_a.actor(),
            agent_id=agent.pk,
            config={"instructions": text},
        )
    drafts = AgentVersion.objects.for_tenant(world_a.tenant).filter(agent=agent, state="draft")
    assert [d.config["instructions"] for d in drafts] == ["c"]


def test_an_agent_cannot_hand_off_to_itself_and_a_used_target_cannot_be_deleted(world_a):
    billing = _agent(world_a, "Billing")
    triage = _agent(world_a, "Triage", handoffs=[str(billing.pk)])
    with pytest.raises(ValidationFailed):
        services.draft_save(
            tenant=world_a.tenant,
            actor=world_a.actor(),
            agent_id=triage.pk,
            config={"handoffs": [str(triage.pk)]},
        )
    with pytest.raises(Conflict, match="Triage"):
        services.agent_delete(tenant=world_a.tenant, actor=world_a.actor(), agent_id=billing.pk)


def test_a_provider_in_use_cannot_be_deleted(world_a):
    provider = _provider(world_a)
    _agent(world_a, provider_id=str(provider.pk))
    with pytest.raises(Conflict, match="Support"):
        services.provider_delete(
            tenant=world_a.tenant, actor=world_a.actor(), provider_id=provider.pk
        )


def test_mcp_headers_are_encrypted_and_only_names_are_kept(world_a):
    server = services.mcp_server_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name="crm",
        url="https://mcp.example.com/mcp",
        headers={"Authorization": "Bearer mcp-SECRET-9999"},
        tool_allowlist=["lookup", " "],
    )
    assert server.header_names == ["Authorization"] and server.tool_allowlist == ["lookup"]
    assert "mcp-SECRET" not in server.headers_encrypted
    assert services.mcp_headers(server) == {"Authorization": "Bearer mcp-SECRET-9999"}
    with pytest.raises(ValidationFailed) as exc:
        services.mcp_server_create(
            tenant=world_a.tenant,
            actor=world_a.actor(),
            name="x",
            url="https://x.test",
            transport="stdio",
        )
    assert "transport" in exc.value.fields

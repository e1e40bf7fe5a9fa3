"""Writes for agents, versions, model providers and MCP servers.

Contract: `tenant` first, an `Actor` who must be an owner/admin (or an admin-scoped key), one
transaction with its audit event. Every id inside a configuration (provider, MCP servers, handoff
targets) is looked up in the same tenant: another tenant's id is NotFound, exactly like a missing
one. Secrets are encrypted before they are stored and never returned.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlsplit

from asgiref.sync import async_to_sync
from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone
from django.utils.text import slugify
from pydantic import ValidationError

from ai_agents import selectors, tools
from ai_agents.config import AgentConfig, diff
from ai_agents.models import (
    Agent,
    AgentStatus,
    AgentVersion,
    McpServer,
    McpTransport,
    ModelProvider,
    PlaygroundRun,
    ProviderApi,
    VersionState,
)
from controlplane import crypto
from controlplane.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from tenants import limits
from tenants.actors import Actor
from tenants.audit import audit_changes, audit_record, changes
from tenants.models import Tenant


def _require_manager(actor: Actor) -> None:
    if not actor.can_manage():
        raise PermissionDenied("Only owners and admins can configure agents.")


def _fields_from(exc: ValidationError, prefix: str = "") -> dict[str, str]:
    fields: dict[str, str] = {}
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        fields.setdefault(prefix + loc, err["msg"].removeprefix("Value error, "))
    return fields


def _http_url(url: str, field: str) -> str:
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationFailed(
            "Invalid URL.", fields={field: "Use an absolute http:// or https:// URL."}
        )
    return url


# --- Model providers --------------------------------------------------------------------------


def _provider_state(p: ModelProvider) -> dict[str, Any]:
    return {
        "name": p.name,
        "api": p.api,
        "base_url": p.base_url,
        "default_model": p.default_model,
        "timeout_seconds": p.timeout_seconds,
        "api_key": p.api_key_encrypted,
    }


@transaction.atomic
def provider_create(
    *,
    tenant: Tenant,
    actor: Actor,
    name: str,
    base_url: str,
    default_model: str,
    api: str = ProviderApi.CHAT,
    api_key: str = "",
    timeout_seconds: float = 60.0,
) -> ModelProvider:
    """Register an OpenAI-compatible endpoint. The key is encrypted; only its last 4 are kept."""
    _require_manager(actor)
    provider = ModelProvider(tenant=tenant, created_by=actor.user)
    _provider_apply(
        provider,
        name=name,
        base_url=base_url,
        default_model=default_model,
        api=api,
        timeout_seconds=timeout_seconds,
    )
    _set_key(provider, api_key)
    _save_unique(provider, "name", "A provider with this name exists.")
    audit_record(
        tenant=tenant,
        actor=actor,
        action="provider.created",
        target=provider,
        change_set=changes({}, _provider_state(provider)),
    )
    return provider


@transaction.atomic
def provider_update(
    *,
    tenant: Tenant,
    actor: Actor,
    provider_id,
    name: str,
    base_url: str,
    default_model: str,
    api: str,
    timeout_seconds: float,
    api_key: str | None = None,
) -> ModelProvider:
    """Change a provider. `api_key=None` keeps the stored key, "" removes it."""
    _require_manager(actor)
    provider = selectors.provider_get(tenant=tenant, provider_id=provider_id)
    before = _provider_state(provider)
    _provider_apply(
        provider,
        name=name,
        base_url=base_url,
        default_model=default_model,
        api=api,
        timeout_seconds=timeout_seconds,
    )
    if api_key is not None:
        _set_key(provider, api_key)
    provider.updated_at = timezone.now()
    _save_unique(provider, "name", "A provider with this name exists.")
    audit_changes(
        tenant=tenant,
        actor=actor,
        action="provider.updated",
        target=provider,
        before=before,
        after=_provider_state(provider),
    )
    return provider


@transaction.atomic
def provider_delete(*, tenant: Tenant, actor: Actor, provider_id) -> None:
    _require_manager(actor)
    provider = selectors.provider_get(tenant=tenant, provider_id=provider_id)
    users = _versions_referencing(tenant, "provider_id", str(provider.pk))
    if users:
        raise Conflict(
            f"{provider.name} is used by {', '.join(users)}: choose another provider there first."
        )
    audit_record(tenant=tenant, actor=actor, action="provider.deleted", target=provider)
    provider.delete()


def _provider_apply(
    provider: ModelProvider,
    *,
    name: str,
    base_url: str,
    default_model: str,
    api: str,
    timeout_seconds: float,
) -> None:
    errors: dict[str, str] = {}
    if not name.strip():
        errors["name"] = "Give the provider a name."
    if not default_model.strip():
        errors["default_model"] = "Name the model to use by default, e.g. gpt-4o-mini."
    if api not in ProviderApi.values:
        errors["api"] = f"Choose one of: {', '.join(ProviderApi.values)}."
    if not 1 <= float(timeout_seconds) <= 600:
        errors["timeout_seconds"] = "Between 1 and 600 seconds."
    try:
        base_url = _http_url(base_url, "base_url")
    except ValidationFailed as exc:
        errors.update(exc.fields)
    if errors:
        raise ValidationFailed("The provider could not be saved.", fields=errors)
    provider.name, provider.base_url = name.strip()[:100], base_url.rstrip("/")
    provider.default_model, provider.api = default_model.strip()[:200], api
    provider.timeout_seconds = float(timeout_seconds)


def _set_key(provider: ModelProvider, api_key: str) -> None:
    api_key = api_key.strip()
    provider.api_key_encrypted = crypto.encrypt(api_key) if api_key else ""
    provider.api_key_last4 = crypto.last4(api_key) if api_key else ""


def _save_unique(obj: Any, field: str, message: str) -> None:
    try:
        with transaction.atomic():
            obj.save()
    except IntegrityError:
        raise ValidationFailed(message, fields={field: message})


def _versions_referencing(tenant: Tenant, key: str, value: str) -> list[str]:
    """Names of agents whose draft or live version refers to `value` (provider or MCP server)."""
    found = set()
    live = Agent.objects.for_tenant(tenant).values_list("published_version_id", flat=True)
    candidates = AgentVersion.objects.for_tenant(tenant).filter(
        state=VersionState.DRAFT
    ) | AgentVersion.objects.for_tenant(tenant).filter(pk__in=list(live))
    for version in candidates.select_related("agent"):
        config = version.config
        refs = (
            [config.get(key)]
            if key == "provider_id"
            else [m.get("server_id") for m in config.get("mcp_servers", [])]
        )
        if value in refs:
            found.add(version.agent.name)
    return sorted(found)


# --- MCP servers ------------------------------------------------------------------------------


def _mcp_state(s: McpServer) -> dict[str, Any]:
    return {
        "name": s.name,
        "transport": s.transport,
        "url": s.url,
        "header_names": s.header_names,
        "tool_allowlist": s.tool_allowlist,
        "timeout_seconds": s.timeout_seconds,
        "headers": s.headers_encrypted,
    }


def _mcp_apply(
    server: McpServer,
    *,
    name: str,
    transport: str,
    url: str,
    tool_allowlist: list[str],
    timeout_seconds: float,
) -> None:
    errors: dict[str, str] = {}
    if not name.strip():
        errors["name"] = "Give the server a name."
    if transport not in McpTransport.values:
        errors["transport"] = (
            "Choose streamable_http or sse (stdio is not offered: it would run "
            "programs on the control plane's hosts)."
        )
    if not 1 <= float(timeout_seconds) <= 120:
        errors["timeout_seconds"] = "Between 1 and 120 seconds."
    try:
        url = _http_url(url, "url")
    except ValidationFailed as exc:
        errors.update(exc.fields)
    if errors:
        raise ValidationFailed("The MCP server could not be saved.", fields=errors)
    server.name, server.transport, server.url = name.strip()[:100], transport, url
    server.tool_allowlist = sorted({t.strip() for t in tool_allowlist if t.strip()})
    server.timeout_seconds = float(timeout_seconds)


def _set_headers(server: McpServer, headers: dict[str, str]) -> None:
    clean = {k.strip(): v for k, v in headers.items() if k.strip()}
    bad = [k for k in clean if not k.replace("-", "").isalnum()]
    if bad:
        raise ValidationFailed(
            "Invalid header name.", fields={"headers": f"Invalid name: {bad[0]}"}
        )
    server.headers_encrypted = crypto.encrypt(json.dumps(clean)) if clean else ""
    server.header_names = sorted(clean)


def mcp_headers(server: McpServer) -> dict[str, str]:
    """The decrypted headers, for the runtime only: never rendered, logged or returned."""
    return json.loads(crypto.decrypt(server.headers_encrypted)) if server.headers_encrypted else {}


@transaction.atomic
def mcp_server_create(
    *,
    tenant: Tenant,
    actor: Actor,
    name: str,
    url: str,
    transport: str = McpTransport.STREAMABLE_HTTP,
    headers: dict[str, str] | None = None,
    tool_allowlist: list[str] | None = None,
    timeout_seconds: float = 10.0,
) -> McpServer:
    _require_manager(actor)
    server = McpServer(tenant=tenant, created_by=actor.user)
    _mcp_apply(
        server,
        name=name,
        transport=transport,
        url=url,
        tool_allowlist=tool_allowlist or [],
        timeout_seconds=timeout_seconds,
    )
    _set_headers(server, headers or {})
    _save_unique(server, "name", "An MCP server with this name exists.")
    audit_record(
        tenant=tenant,
        actor=actor,
        action="mcp_server.created",
        target=server,
        change_set=changes({}, _mcp_state(server)),
    )
    return server


@transaction.atomic
def mcp_server_update(
    *,
    tenant: Tenant,
    actor: Actor,
    server_id,
    name: str,
    url: str,
    transport: str,
    tool_allowlist: list[str],
    timeout_seconds: float,
    headers: dict[str, str] | None = None,
) -> McpServer:
    """`headers=None` keeps the stored headers; a dict replaces them all."""
    _require_manager(actor)
    server = selectors.mcp_server_get(tenant=tenant, server_id=server_id)
    before = _mcp_state(server)
    _mcp_apply(
        server,
        name=name,
        transport=transport,
        url=url,
        tool_allowlist=tool_allowlist,
        timeout_seconds=timeout_seconds,
    )
    if headers is not None:
        _set_headers(server, headers)
    server.updated_at = timezone.now()
    _save_unique(server, "name", "An MCP server with this name exists.")
    audit_changes(
        tenant=tenant,
        actor=actor,
        action="mcp_server.updated",
        target=server,
        before=before,
        after=_mcp_state(server),
    )
    return server


@transaction.atomic
def mcp_server_delete(*, tenant: Tenant, actor: Actor, server_id) -> None:
    _require_manager(actor)
    server = selectors.mcp_server_get(tenant=tenant, server_id=server_id)
    users = _versions_referencing(tenant, "mcp_servers", str(server.pk))
    if users:
        raise Conflict(f"{server.name} is used by {', '.join(users)}: remove it there first.")
    audit_record(tenant=tenant, actor=actor, action="mcp_server.deleted", target=server)
    server.delete()


# --- Playground -------------------------------------------------------------------------------


def playground_run(*, tenant: Tenant, actor: Actor, agent_id, input: str) -> PlaygroundRun:
    """Run the agent's working version (its draft, else the live one) once and keep the result
    with its trace. The model is called outside any transaction. A used-up monthly budget
    refuses the run (BudgetExhausted) before any rate limit is counted. Started with an API key,
    the run counts against the key's run limit (RateLimited when it is reached); a run that
    raises before it is kept gives the slot back, like `conversations.services.run_create`."""
    _require_manager(actor)
    if not input.strip():
        raise ValidationFailed("Say something to the agent.", fields={"input": "Type a message."})
    agent = selectors.agent_get(tenant=tenant, agent_id=agent_id)
    version = selectors.working_version(tenant=tenant, agent=agent)
    if version is None:  # every agent is created with a draft
        raise Conflict("This agent has no version to run.")
    from ai_agents.runtime import execute  # the runtime builds on these services
    from usage import services as usage_services  # usage builds on agents' models

    usage_services.budget_check(tenant=tenant)  # a used-up monthly budget refuses test runs too
    # A run started over the API counts against the key; one refused by the budget above was
    # not counted, and one that raises before it is kept is taken back.
    with limits.run_start(tenant=tenant, api_key=actor.api_key, source="api"):
        started = time.monotonic()
        outcome = async_to_sync(execute.run_version)(tenant=tenant, version=version, input=input)
        with transaction.atomic():
            run = _playground_save(tenant, actor, agent, version, input, outcome, started)
            usage_services.record_playground(tenant=tenant, actor=actor, run=run)
    return run


def _playground_save(
    tenant: Tenant,
    actor: Actor,
    agent: Agent,
    version: AgentVersion,
    input: str,
    outcome: Any,
    started: float,
) -> PlaygroundRun:
    return PlaygroundRun.objects.create(
        tenant=tenant,
        agent=agent,
        version=version,
        version_number=version.number,
        config=version.config,
        input=input,
        status=outcome.status,
        output=outcome.output if outcome.status == "success" else None,
        message=outcome.message,
        last_agent=outcome.last_agent,
        trace=outcome.trace,
        usage=outcome.usage,
        duration_ms=round((time.monotonic() - started) * 1000),
        created_by=actor.user,
    )


# --- Agents and versions ----------------------------------------------------------------------


def validate_config(
    *, tenant: Tenant, raw: dict[str, Any], agent: Agent | None = None
) -> AgentConfig:
    """Parse and check a configuration. References to another tenant's objects are NotFound."""
    try:
        config = AgentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ValidationFailed("The configuration is invalid.", fields=_fields_from(exc))
    # Another tenant's id is NotFound, like a missing one; `fields` says where it was named.
    try:
        if config.provider_id is not None:
            where = "provider_id"
            selectors.provider_get(tenant=tenant, provider_id=config.provider_id)
        for index, ref in enumerate(config.mcp_servers):
            where = f"mcp_servers.{index}"
            selectors.mcp_server_get(tenant=tenant, server_id=ref.server_id)
        for index, target_id in enumerate(config.handoffs):
            where = f"handoffs.{index}"
            if agent is not None and target_id == agent.pk:
                raise ValidationFailed(
                    "An agent cannot hand off to itself.",
                    fields={"handoffs": "An agent cannot hand off to itself."},
                )
            selectors.agent_get(tenant=tenant, agent_id=target_id)
    except NotFound as exc:
        raise NotFound(exc.message, fields={where: exc.message})
    for tool in config.tools:
        try:
            tool.settings = tools.validate(tool.name, tool.settings)
        except tools.ToolSettingsInvalid as exc:
            raise ValidationFailed(str(exc), fields={"tools": str(exc)})
    return config


def _unique_slug(tenant: Tenant, name: str) -> str:
    base = slugify(name)[:50] or "agent"
    slug, n = base, 2
    while Agent.objects.for_tenant(tenant).filter(slug=slug).exists():
        slug, n = f"{base}-{n}", n + 1
    return slug


@transaction.atomic
def agent_create(
    *,
    tenant: Tenant,
    actor: Actor,
    name: str,
    slug: str = "",
    description: str = "",
    config: dict[str, Any] | None = None,
) -> Agent:
    """Create an agent with a draft version (publish it to make it live)."""
    _require_manager(actor)
    if not name.strip():
        raise ValidationFailed("A name is required.", fields={"name": "Give the agent a name."})
    parsed = validate_config(tenant=tenant, raw=config or {})
    slug = slugify(slug)[:60] if slug.strip() else _unique_slug(tenant, name)
    if not slug:
        raise ValidationFailed("Invalid slug.", fields={"slug": "Use letters, digits and dashes."})
    agent = Agent(
        tenant=tenant,
        name=name.strip()[:100],
        slug=slug,
        description=description.strip(),
        created_by=actor.user,
    )
    _save_unique(agent, "slug", f"An agent called “{slug}” exists.")
    AgentVersion.objects.create(
        tenant=tenant, agent=agent, config=parsed.dump(), created_by=actor.user
    )
    audit_record(
        tenant=tenant,
        actor=actor,
        action="agent.created",
        target=agent,
        change_set=changes({}, {"name": agent.name, "slug": agent.slug}),
    )
    return agent


@transaction.atomic
def agent_update(*, tenant: Tenant, actor: Actor, agent_id, name: str, description: str) -> Agent:
    """Rename or describe an agent. Not versioned: its configuration stays as it is, but the
    name and description are what agents handing off to it show their model (the handoff's
    tool is `transfer_to_<name>`), from their next run on."""
    _require_manager(actor)
    agent = _agent_for_update(tenant, agent_id)
    if not name.strip():
        raise ValidationFailed("A name is required.", fields={"name": "Give the agent a name."})
    before = {"name": agent.name, "description": agent.description}
    agent.name, agent.description = name.strip()[:100], description.strip()
    agent.updated_at = timezone.now()
    agent.save(update_fields=["name", "description", "updated_at"])
    audit_changes(
        tenant=tenant,
        actor=actor,
        action="agent.updated",
        target=agent,
        before=before,
        after={"name": agent.name, "description": agent.description},
    )
    return agent


def _agent_for_update(tenant: Tenant, agent_id) -> Agent:
    agent = selectors.agent_get(tenant=tenant, agent_id=agent_id)
    # Serialise edits and publishes of one agent.
    Agent.objects.for_tenant(tenant).select_for_update().filter(pk=agent.pk).first()
    return agent


@transaction.atomic
def draft_save(*, tenant: Tenant, actor: Actor, agent_id, config: dict[str, Any]) -> AgentVersion:
    """Save the agent's draft (created from the live version if there is none)."""
    _require_manager(actor)
    agent = _agent_for_update(tenant, agent_id)
    parsed = validate_config(tenant=tenant, raw=config, agent=agent)
    draft = selectors.draft_get(tenant=tenant, agent=agent)
    before = (
        draft.config
        if draft
        else (agent.published_version.config if agent.published_version else {})
    )
    if draft is None:
        draft = AgentVersion(tenant=tenant, agent=agent, created_by=actor.user)
    draft.config = parsed.dump()
    draft.save()
    fields = diff(before or {}, draft.config)
    if fields:
        audit_record(
            tenant=tenant,
            actor=actor,
            action="agent.draft_saved",
            target=agent,
            change_set={
                name: ["…", "…"] if name == "instructions" else [a, b] for name, a, b in fields
            },
        )
    return draft


def _next_number(tenant: Tenant, agent: Agent) -> int:
    top = (
        AgentVersion.objects.for_tenant(tenant).filter(agent=agent).aggregate(n=Max("number"))["n"]
    )
    return (top or 0) + 1


def _go_live(tenant: Tenant, agent: Agent, version: AgentVersion) -> None:
    agent.published_version = version
    agent.status = AgentStatus.ACTIVE
    agent.updated_at = timezone.now()
    agent.save(update_fields=["published_version", "status", "updated_at"])


@transaction.atomic
def agent_publish(*, tenant: Tenant, actor: Actor, agent_id, note: str = "") -> AgentVersion:
    """Freeze the draft as the next version and make it live. Conflict if there is no draft."""
    _require_manager(actor)
    agent = _agent_for_update(tenant, agent_id)
    draft = selectors.draft_get(tenant=tenant, agent=agent)
    if draft is None:
        raise Conflict("There is no draft to publish: edit the agent first.")
    # References may have gone since the draft was saved.
    validate_config(tenant=tenant, raw=draft.config, agent=agent)
    previous = agent.published_version
    draft.state, draft.number = VersionState.PUBLISHED, _next_number(tenant, agent)
    draft.published_at, draft.published_by, draft.note = timezone.now(), actor.user, note[:200]
    draft.save()
    _go_live(tenant, agent, draft)
    audit_record(
        tenant=tenant,
        actor=actor,
        action="agent.published",
        target=agent,
        change_set=changes(
            {"version": previous.number if previous else None}, {"version": draft.number}
        ),
    )
    return draft


@transaction.atomic
def agent_restore(*, tenant: Tenant, actor: Actor, agent_id, version_id) -> AgentVersion:
    """Publish a copy of an earlier version as the next version (history is never rewritten)."""
    _require_manager(actor)
    agent = _agent_for_update(tenant, agent_id)
    source = selectors.version_get(tenant=tenant, agent=agent, version_id=version_id)
    if source.state != VersionState.PUBLISHED:
        raise ValidationFailed(
            "Only a published version can be restored.",
            fields={"version": "Choose a published version."},
        )
    validate_config(tenant=tenant, raw=source.config, agent=agent)
    previous = agent.published_version
    AgentVersion.objects.for_tenant(tenant).filter(agent=agent, state=VersionState.DRAFT).delete()
    restored = AgentVersion.objects.create(
        tenant=tenant,
        agent=agent,
        state=VersionState.PUBLISHED,
        number=_next_number(tenant, agent),
        config=source.config,
        note=f"Restored from v{source.number}",
        created_by=actor.user,
        published_at=timezone.now(),
        published_by=actor.user,
    )
    _go_live(tenant, agent, restored)
    audit_record(
        tenant=tenant,
        actor=actor,
        action="agent.restored",
        target=agent,
        change_set=changes(
            {"version": previous.number if previous else None}, {"version": restored.number}
        ),
    )
    return restored


@transaction.atomic
def agent_delete(*, tenant: Tenant, actor: Actor, agent_id) -> None:
    _require_manager(actor)
    agent = _agent_for_update(tenant, agent_id)
    referring = (
        AgentVersion.objects.for_tenant(tenant)
        .exclude(agent=agent)
        .filter(config__handoffs__contains=[str(agent.pk)])
        .select_related("agent")
    )
    users = sorted(
        v.agent.name
        for v in referring
        if v.state == VersionState.DRAFT or v.agent.published_version_id == v.pk
    )
    if users:
        raise Conflict(f"{agent.name} is a handoff target of {', '.join(sorted(set(users)))}.")
    audit_record(tenant=tenant, actor=actor, action="agent.deleted", target=agent)
    agent.published_version = None
    agent.save(update_fields=["published_version"])
    agent.delete()

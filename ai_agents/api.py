"""Management API for agents, versions, model providers and MCP servers (admin-scoped keys write,
read-scoped keys read). Provider keys and MCP header values are write-only."""

from datetime import datetime
from typing import Any
from uuid import UUID

from asgiref.sync import async_to_sync
from ninja import Field, Router, Schema, Status

from ai_agents import selectors, services, tools
from ai_agents.config import AgentConfig
from ai_agents.runtime import execute
from tenants.auth import require_scope
from tenants.requests import ApiRequest

router = Router(tags=["agents"])


# --- Schemas ----------------------------------------------------------------------------------


class ProviderOut(Schema):
    id: UUID
    name: str
    api: str
    base_url: str
    default_model: str
    timeout_seconds: float
    has_api_key: bool
    api_key_last4: str
    created_at: datetime


class ProviderIn(Schema):
    name: str = Field(min_length=1, max_length=100)
    base_url: str = Field(min_length=1, max_length=500)
    default_model: str = Field(min_length=1, max_length=200)
    api: str = "chat_completions"
    timeout_seconds: float = 60.0
    api_key: str | None = Field(
        None,
        max_length=4000,
        description="Write-only. Omit to keep the stored key; an empty string removes it.",
    )


class CheckOut(Schema):
    ok: bool
    message: str


class McpServerOut(Schema):
    id: UUID
    name: str
    transport: str
    url: str
    header_names: list[str]
    tool_allowlist: list[str]
    timeout_seconds: float
    created_at: datetime


class McpServerIn(Schema):
    name: str = Field(min_length=1, max_length=100)
    url: str = Field(min_length=1, max_length=500)
    transport: str = "streamable_http"
    tool_allowlist: list[str] = Field(default_factory=list)
    timeout_seconds: float = 10.0
    headers: dict[str, str] | None = Field(
        None, description="Write-only. Omit to keep the stored headers; {} removes them."
    )


class McpToolOut(Schema):
    name: str
    description: str


class VersionOut(Schema):
    id: UUID
    state: str
    number: int | None
    note: str
    config: dict[str, Any]
    created_at: datetime
    published_at: datetime | None


class AgentOut(Schema):
    id: UUID
    name: str
    slug: str
    description: str
    status: str
    published_version: int | None = Field(None, alias="published_version.number")
    created_at: datetime
    updated_at: datetime


class AgentCreateIn(Schema):
    name: str = Field(min_length=1, max_length=100)
    slug: str = Field("", max_length=60)
    description: str = Field("", max_length=2000)
    config: AgentConfig = Field(default_factory=lambda: AgentConfig.model_validate({}))


class AgentUpdateIn(Schema):
    name: str = Field(min_length=1, max_length=100)
    description: str = Field("", max_length=2000)


class PublishIn(Schema):
    note: str = Field("", max_length=200)


class ChangeOut(Schema):
    field: str
    before: Any
    after: Any


class RunIn(Schema):
    input: str = Field(min_length=1, max_length=20_000)


class RunOut(Schema):
    id: UUID
    version_number: int | None = Field(description="Null when the draft ran.")
    input: str
    status: str = Field(description="success, guardrail or error")
    output: Any
    message: str
    last_agent: str
    usage: dict[str, int]
    trace: list[dict[str, Any]]
    duration_ms: int
    created_at: datetime


class ToolOut(Schema):
    name: str
    title: str
    description: str
    settings_schema: dict[str, Any]


# --- Providers --------------------------------------------------------------------------------


@router.get("/providers", response=list[ProviderOut])
def list_providers(request: ApiRequest):
    require_scope(request, "read")
    return selectors.provider_list(tenant=request.tenant)


@router.post("/providers", response={201: ProviderOut})
def create_provider(request: ApiRequest, payload: ProviderIn):
    require_scope(request, "admin")
    provider = services.provider_create(
        tenant=request.tenant,
        actor=request.actor,
        name=payload.name,
        base_url=payload.base_url,
        default_model=payload.default_model,
        api=payload.api,
        api_key=payload.api_key or "",
        timeout_seconds=payload.timeout_seconds,
    )
    return Status(201, provider)


@router.get("/providers/{provider_id}", response=ProviderOut)
def get_provider(request: ApiRequest, provider_id: UUID):
    require_scope(request, "read")
    return selectors.provider_get(tenant=request.tenant, provider_id=provider_id)


@router.put("/providers/{provider_id}", response=ProviderOut)
def update_provider(request: ApiRequest, provider_id: UUID, payload: ProviderIn):
    require_scope(request, "admin")
    return services.provider_update(
        tenant=request.tenant,
        actor=request.actor,
        provider_id=provider_id,
        name=payload.name,
        base_url=payload.base_url,
        default_model=payload.default_model,
        api=payload.api,
        timeout_seconds=payload.timeout_seconds,
        api_key=payload.api_key,
    )


@router.delete("/providers/{provider_id}", response={204: None})
def delete_provider(request: ApiRequest, provider_id: UUID):
    require_scope(request, "admin")
    services.provider_delete(tenant=request.tenant, actor=request.actor, provider_id=provider_id)
    return Status(204, None)


@router.post("/providers/{provider_id}/test", response=CheckOut)
def test_provider(request: ApiRequest, provider_id: UUID):
    require_scope(request, "admin")
    provider = selectors.provider_get(tenant=request.tenant, provider_id=provider_id)
    ok, message = async_to_sync(execute.check_provider)(provider)
    return {"ok": ok, "message": message}


# --- MCP servers ------------------------------------------------------------------------------


@router.get("/mcp-servers", response=list[McpServerOut])
def list_mcp_servers(request: ApiRequest):
    require_scope(request, "read")
    return selectors.mcp_server_list(tenant=request.tenant)


@router.post("/mcp-servers", response={201: McpServerOut})
def create_mcp_server(request: ApiRequest, payload: McpServerIn):
    require_scope(request, "admin")
    server = services.mcp_server_create(
        tenant=request.tenant,
        actor=request.actor,
        name=payload.name,
        url=payload.url,
        transport=payload.transport,
        headers=payload.headers or {},
        tool_allowlist=payload.tool_allowlist,
        timeout_seconds=payload.timeout_seconds,
    )
    return Status(201, server)


@router.get("/mcp-servers/{server_id}", response=McpServerOut)
def get_mcp_server(request: ApiRequest, server_id: UUID):
    require_scope(request, "read")
    return selectors.mcp_server_get(tenant=request.tenant, server_id=server_id)


@router.put("/mcp-servers/{server_id}", response=McpServerOut)
def update_mcp_server(request: ApiRequest, server_id: UUID, payload: McpServerIn):
    require_scope(request, "admin")
    return services.mcp_server_update(
        tenant=request.tenant,
        actor=request.actor,
        server_id=server_id,
        name=payload.name,
        url=payload.url,
        transport=payload.transport,
        tool_allowlist=payload.tool_allowlist,
        timeout_seconds=payload.timeout_seconds,
        headers=payload.headers,
    )


@router.delete("/mcp-servers/{server_id}", response={204: None})
def delete_mcp_server(request: ApiRequest, server_id: UUID):
    require_scope(request, "admin")
    services.mcp_server_delete(tenant=request.tenant, actor=request.actor, server_id=server_id)
    return Status(204, None)


@router.post("/mcp-servers/{server_id}/tools", response=list[McpToolOut])
def list_mcp_server_tools(request: ApiRequest, server_id: UUID):
    """Connect to the server now and list the tools it offers (after the allow-list)."""
    require_scope(request, "admin")
    from ai_agents.runtime import mcp

    server = selectors.mcp_server_get(tenant=request.tenant, server_id=server_id)
    return async_to_sync(mcp.list_tools)(server)


# --- Agents and versions ----------------------------------------------------------------------


@router.get("/tools", response=list[ToolOut])
def list_tools(request: ApiRequest):
    """The built-in tool catalogue, with the JSON schema of each tool's settings."""
    require_scope(request, "read")
    return [
        {
            "name": s.name,
            "title": s.title,
            "description": s.description,
            "settings_schema": s.settings_model.model_json_schema(),
        }
        for s in tools.CATALOGUE.values()
    ]


@router.get("/agents", response=list[AgentOut])
def list_agents(request: ApiRequest):
    require_scope(request, "read")
    return selectors.agent_list(tenant=request.tenant)


@router.post("/agents", response={201: AgentOut})
def create_agent(request: ApiRequest, payload: AgentCreateIn):
    require_scope(request, "admin")
    agent = services.agent_create(
        tenant=request.tenant,
        actor=request.actor,
        name=payload.name,
        slug=payload.slug,
        description=payload.description,
        config=payload.config.dump(),
    )
    return Status(201, agent)


@router.get("/agents/{agent_id}", response=AgentOut)
def get_agent(request: ApiRequest, agent_id: UUID):
    require_scope(request, "read")
    return selectors.agent_get(tenant=request.tenant, agent_id=agent_id)


@router.patch("/agents/{agent_id}", response=AgentOut)
def update_agent(request: ApiRequest, agent_id: UUID, payload: AgentUpdateIn):
    require_scope(request, "admin")
    return services.agent_update(
        tenant=request.tenant,
        actor=request.actor,
        agent_id=agent_id,
        name=payload.name,
        description=payload.description,
    )


@router.delete("/agents/{agent_id}", response={204: None})
def delete_agent(request: ApiRequest, agent_id: UUID):
    require_scope(request, "admin")
    services.agent_delete(tenant=request.tenant, actor=request.actor, agent_id=agent_id)
    return Status(204, None)


@router.get("/agents/{agent_id}/versions", response=list[VersionOut])
def list_versions(request: ApiRequest, agent_id: UUID):
    require_scope(request, "read")
    agent = selectors.agent_get(tenant=request.tenant, agent_id=agent_id)
    return selectors.version_list(tenant=request.tenant, agent=agent)


@router.get("/agents/{agent_id}/versions/{version_id}", response=VersionOut)
def get_version(request: ApiRequest, agent_id: UUID, version_id: UUID):
    require_scope(request, "read")
    agent = selectors.agent_get(tenant=request.tenant, agent_id=agent_id)
    return selectors.version_get(tenant=request.tenant, agent=agent, version_id=version_id)


@router.put("/agents/{agent_id}/draft", response=VersionOut)
def save_draft(request: ApiRequest, agent_id: UUID, payload: AgentConfig):
    require_scope(request, "admin")
    return services.draft_save(
        tenant=request.tenant, actor=request.actor, agent_id=agent_id, config=payload.dump()
    )


@router.post("/agents/{agent_id}/publish", response=VersionOut)
def publish_agent(request: ApiRequest, agent_id: UUID, payload: PublishIn):
    require_scope(request, "admin")
    return services.agent_publish(
        tenant=request.tenant, actor=request.actor, agent_id=agent_id, note=payload.note
    )


@router.post("/agents/{agent_id}/versions/{version_id}/restore", response=VersionOut)
def restore_version(request: ApiRequest, agent_id: UUID, version_id: UUID):
    require_scope(request, "admin")
    return services.agent_restore(
        tenant=request.tenant, actor=request.actor, agent_id=agent_id, version_id=version_id
    )


@router.get("/agents/{agent_id}/compare", response=list[ChangeOut])
def compare_versions(request: ApiRequest, agent_id: UUID, a: UUID, b: UUID):
    """Field-by-field differences between two versions of the agent."""
    require_scope(request, "read")
    agent = selectors.agent_get(tenant=request.tenant, agent_id=agent_id)
    rows = selectors.version_compare(tenant=request.tenant, agent=agent, a_id=a, b_id=b)
    return [{"field": f, "before": x, "after": y} for f, x, y in rows]


@router.post("/agents/{agent_id}/draft/run", response=RunOut)
def run_draft(request: ApiRequest, agent_id: UUID, payload: RunIn):
    """Run the draft (or, without one, the published version) once, like the playground; the
    run is kept with its trace."""
    require_scope(request, "admin")
    return services.playground_run(
        tenant=request.tenant, actor=request.actor, agent_id=agent_id, input=payload.input
    )


@router.get("/agents/{agent_id}/runs", response=list[RunOut])
def list_test_runs(request: ApiRequest, agent_id: UUID):
    """The agent's latest playground and draft runs, newest first."""
    require_scope(request, "read")
    agent = selectors.agent_get(tenant=request.tenant, agent_id=agent_id)
    return selectors.playground_run_list(tenant=request.tenant, agent=agent, limit=50)


@router.get("/agents/{agent_id}/runs/{run_id}", response=RunOut)
def get_test_run(request: ApiRequest, agent_id: UUID, run_id: UUID):
    require_scope(request, "read")
    agent = selectors.agent_get(tenant=request.tenant, agent_id=agent_id)
    return selectors.playground_run_get(tenant=request.tenant, agent=agent, run_id=run_id)

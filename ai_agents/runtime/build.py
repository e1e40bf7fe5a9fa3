"""Turn a stored `AgentVersion` into an SDK `Agent` and `RunConfig`, cheaply enough to do per run.

Everything tenant-owned is read through tenant-scoped selectors: a handoff target, provider or
MCP server of another tenant simply does not exist here. Building is synchronous ORM work; run it
in a thread (`sync_to_async`) from async code, then connect the MCP servers (`BuiltAgent.start`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from agents import Agent, Model, ModelSettings, RunConfig, Tool
from agents.mcp import MCPServer, MCPServerSse, MCPServerStreamableHttp, create_static_tool_filter

from ai_agents import selectors, services, tools
from ai_agents.config import AgentConfig
from ai_agents.models import Agent as AgentRow
from ai_agents.models import AgentVersion, McpServer, McpTransport, ModelProvider, ProviderApi
from ai_agents.runtime import guardrails, models, retry
from ai_agents.runtime.context import RunContext
from ai_agents.runtime.schema import JsonSchemaOutput
from ai_agents.runtime.trace import Trace
from tenants.models import Tenant

log = logging.getLogger(__name__)


class McpRequiredUnavailable(RuntimeError):
    """A server the agent requires could not be reached: the run fails with this message."""


@dataclass
class McpBinding:
    server: MCPServer
    name: str
    required: bool
    owner: Agent[Any]


@dataclass
class BuiltAgent:
    agent: Agent[RunContext]
    run_config: RunConfig
    config: AgentConfig
    mcp: list[McpBinding] = field(default_factory=list)

    async def start(self, trace: Trace) -> None:
        """Connect the MCP servers. An optional server that fails is dropped (the trace says
        why); a required one fails the run."""
        for binding in list(self.mcp):
            try:
                await binding.server.connect()
            except BaseException as exc:
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                reason = _plain(exc)
                trace.add(
                    "mcp_server",
                    name=binding.name,
                    connected=False,
                    error=reason,
                    required=binding.required,
                )
                if binding.required:
                    raise McpRequiredUnavailable(
                        f"The MCP server {binding.name} is required by this agent but could not "
                        f"be reached: {reason}"
                    ) from None
                binding.owner.mcp_servers = [
                    s for s in binding.owner.mcp_servers if s is not binding.server
                ]
                self.mcp.remove(binding)
            else:
                trace.add(
                    "mcp_server", name=binding.name, connected=True, required=binding.required
                )

    async def close(self) -> None:
        for binding in self.mcp:
            try:
                await binding.server.cleanup()
            except Exception:  # closing must never fail the run
                log.debug("closing MCP server %s failed", binding.name, exc_info=True)


def _plain(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return _plain(exc.exceptions[0])
    text = str(exc) or type(exc).__name__
    return text[:300]


def _mcp_server(row: McpServer, headers: dict[str, str]) -> MCPServer:
    from controlplane import egress

    tool_filter = (
        create_static_tool_filter(allowed_tool_names=row.tool_allowlist)
        if row.tool_allowlist
        else None
    )
    common: dict[str, Any] = {
        "name": row.name,
        "cache_tools_list": True,
        "client_session_timeout_seconds": row.timeout_seconds,
        "tool_filter": tool_filter,
    }
    params: dict[str, Any] = {
        "url": row.url,
        "headers": headers,
        "timeout": row.timeout_seconds,
        "httpx_client_factory": egress.mcp_httpx_client_factory,
    }
    if row.transport == McpTransport.SSE:
        return MCPServerSse(params=params, **common)  # type: ignore[arg-type]
    return MCPServerStreamableHttp(params=params, **common)  # type: ignore[arg-type]


def model_for(
    *, tenant: Tenant, config: AgentConfig, trace: Trace | None = None, agent: str = ""
) -> tuple[Model, ModelSettings]:
    """The agent's model and settings. With the run's `trace`, a provider's failed calls are
    retried within the run's budget (`ai_agents.runtime.retry`), each retry a span of it."""
    provider: ModelProvider | None = None
    if config.provider_id is not None:
        provider = selectors.provider_get(tenant=tenant, provider_id=config.provider_id)
    settings = ModelSettings(
        temperature=config.model_settings.temperature,
        top_p=config.model_settings.top_p,
        max_tokens=config.model_settings.max_output_tokens,
        include_usage=True,  # streamed chat completions report tokens only when asked
    )
    if provider is None:
        return models.offline_model(), settings
    model = models.provider_model(provider, model_name=config.model or provider.default_model)
    if trace is not None:
        model = retry.RetryingModel(
            model, trace=trace, agent=agent, timeout=provider.timeout_seconds
        )
    return model, settings


def build(
    *,
    tenant: Tenant,
    version: AgentVersion,
    trace: Trace | None = None,
) -> BuiltAgent:
    """The SDK agent for `version`, with its tools, MCP servers, guardrails and handoffs (each
    handoff target at its published version). With the run's `trace`, failed model calls are
    retried within the run's budget.

    Every agent the run can reach through handoffs is built once, and the handoffs link those
    agents as configured, cycles included: a specialist whose configuration hands back to the
    triage agent can do so after triage handed to it. (Building one copy per path, as before,
    cost a dense graph of 32 agents about a million builds per run, each with its queries and
    MCP connections.) The returned agent's `mcp` holds the MCP servers of every agent built,
    each once."""
    built: dict[str, tuple[Agent[RunContext], list[McpBinding], AgentConfig]] = {}
    agent = _build_one(tenant=tenant, version=version, trace=trace, built=built)
    # Breadth first, without recursion: a long chain of handoffs is no deeper a call stack.
    waiting, unpublished = [str(version.agent_id)], set[str]()
    while waiting:
        source, _bindings, source_config = built[waiting.pop(0)]
        for target_id in map(str, source_config.handoffs):
            if target_id in unpublished:
                continue
            if target_id not in built:
                target = selectors.agent_get(tenant=tenant, agent_id=target_id)
                if target.published_version is None:
                    unpublished.add(target_id)  # never published: nothing to hand off to yet
                    continue
                _build_one(
                    tenant=tenant, version=target.published_version, trace=trace, built=built
                )
                waiting.append(target_id)
            source.handoffs.append(built[target_id][0])
    config = built[str(version.agent_id)][2]
    run_config = RunConfig(tracing_disabled=True, workflow_name=f"agent:{version.agent.slug}")
    mcp = [binding for _agent, bindings, _config in built.values() for binding in bindings]
    return BuiltAgent(agent=agent, run_config=run_config, config=config, mcp=mcp)


def _build_one(
    *,
    tenant: Tenant,
    version: AgentVersion,
    trace: Trace | None,
    built: dict[str, tuple[Agent[RunContext], list[McpBinding], AgentConfig]],
) -> Agent[RunContext]:
    """The SDK agent for `version`, without its handoffs (`build` links them), registered in
    `built` by agent id."""
    config = AgentConfig.model_validate(version.config)
    agent_row: AgentRow = version.agent
    model, model_settings = model_for(
        tenant=tenant, config=config, trace=trace, agent=agent_row.name
    )
    sdk_tools: list[Tool] = [tools.build(t.name, t.settings) for t in config.tools]

    servers: list[MCPServer] = []
    refs: list[tuple[MCPServer, str, bool]] = []
    for ref in config.mcp_servers:
        row = selectors.mcp_server_get(tenant=tenant, server_id=ref.server_id)
        server = _mcp_server(row, services.mcp_headers(row))
        servers.append(server)
        refs.append((server, row.name, ref.required))

    output_type = JsonSchemaOutput(config.output_schema) if config.output_schema else None
    agent: Agent[RunContext] = Agent(
        name=agent_row.name,
        handoff_description=agent_row.description or None,
        instructions=config.instructions or None,
        model=model,
        model_settings=model_settings,
        tools=sdk_tools,
        mcp_servers=servers,
        handoffs=[],
        input_guardrails=guardrails.build_input(config.input_guardrails, model),
        output_guardrails=guardrails.build_output(config.output_guardrails, model),
        output_type=output_type,
    )
    bindings = [
        McpBinding(server=server, name=name, required=required, owner=agent)
        for server, name, required in refs
    ]
    built[str(agent_row.pk)] = (agent, bindings, config)
    return agent


def context_for(
    *,
    tenant: Tenant,
    version: AgentVersion,
    depth: int = 0,
    thread_id: Any = None,
    end_user_id: str | None = None,
) -> RunContext:
    return RunContext(
        tenant_id=tenant.pk,
        agent_id=version.agent_id,
        agent_slug=version.agent.slug,
        version_id=version.pk,
        depth=depth,
        thread_id=thread_id,
        end_user_id=end_user_id,
    )


__all__ = [
    "BuiltAgent",
    "McpRequiredUnavailable",
    "ProviderApi",
    "build",
    "context_for",
    "model_for",
]

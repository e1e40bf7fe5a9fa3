"""Turn a stored `AgentVersion` into an SDK `Agent` and `RunConfig`, cheaply enough to do per run.

Everything tenant-owned is read through tenant-scoped selectors: a handoff target, provider or
MCP server of another tenant simply does not exist here. Building is synchronous ORM work; run it
in a thread (`sync_to_async`) from async code, then connect the MCP servers of the agent the run
starts with (`BuiltAgent.start`); those of the agents it can hand off to connect if a handoff
reaches them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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


class _ConnectedOnFirstUse:
    """Mixed into the SDK's MCP server classes: the server connects when the run first lists
    its tools (when its agent is about to call the model) or calls one, not before. An agent
    the run can hand off to but never does costs no connection, and its server being down
    fails no run that does not reach it.

    The connection is made and closed by a task of its own: the `mcp` client's streams live in
    anyio task groups, which must be left by the task that entered them, and the SDK's turn
    that first uses a server is not the task that closes the run. Every later use waits for
    the same connection. `required` and `trace` are set by `build` (the dashboard's check of
    a server leaves them unset and gets the connection's own error)."""

    required: bool | None = None
    trace: Trace | None = None
    owner_name: str = ""  # the agent whose server this is
    of_first_agent = True  # the agent the run starts with (not one it may hand off to)
    # The server's own timeout, which bounds connecting as a whole (set by `_mcp_server`).
    connect_timeout: float | None = None
    # Why a connection given up before the server answered failed (`stop`, or the loop
    # shutting down). The dashboard's check, which is no run, says so in its own words.
    given_up = "the run ended before the server answered"
    _holder: asyncio.Task[None] | None = None
    _made: asyncio.Future[BaseException | None] | None = None
    _closing: asyncio.Event | None = None
    if TYPE_CHECKING:
        name: str  # the SDK server's

    async def connect(self) -> None:
        error = await self._connection()
        if error is not None:
            raise error

    async def cleanup(self) -> None:
        holder = self._holder
        if holder is None or holder is asyncio.current_task():
            # Never connected; or the SDK's own cleanup of a failed connect, in the holder.
            await super().cleanup()  # type: ignore[misc]
            return
        self.stop()
        # Not `await holder`: a connection given up ends it cancelled, which is not this
        # task's cancellation. If this task is cancelled, the holder still ends on its own.
        await asyncio.wait({holder})

    def stop(self) -> asyncio.Task[None] | None:
        """Tell the holder to end, without waiting for it: it closes the connection made, or
        gives up the one it is still making (a run stopped while its server has not answered
        ends then, not when the server's timeout runs out). The holder, None if there is none."""
        holder = self._holder
        if holder is not None:
            assert self._closing is not None and self._made is not None
            self._closing.set()
            if not self._made.done():
                holder.cancel()
        return holder

    async def list_tools(self, run_context: Any = None, agent: Any = None) -> list[Any]:
        if not await self.usable():
            return []
        return await super().list_tools(run_context, agent)  # type: ignore[misc, no-any-return]

    async def call_tool(self, *args: Any, **kwargs: Any) -> Any:
        await self._needed()
        return await super().call_tool(*args, **kwargs)  # type: ignore[misc]

    async def list_prompts(self) -> Any:
        await self._needed()
        return await super().list_prompts()  # type: ignore[misc]

    async def get_prompt(self, *args: Any, **kwargs: Any) -> Any:
        await self._needed()
        return await super().get_prompt(*args, **kwargs)  # type: ignore[misc]

    async def _needed(self) -> None:
        """Connected, for a use that cannot do without the server (unreachable for an
        optional one that failed: its agent was given none of its tools)."""
        if not await self.usable():
            raise McpRequiredUnavailable(self._failure_text())

    async def usable(self) -> bool:
        """Connect if not yet tried. False when an optional server could not be reached (its
        agent runs without its tools); a required one raises `McpRequiredUnavailable`."""
        if await self._connection() is None:
            return True
        if self.required is False:
            return False
        raise McpRequiredUnavailable(self._failure_text())

    def _failure_text(self) -> str:
        assert self._made is not None and self._made.done()
        reason = _plain(self._made.result() or RuntimeError("not connected"))
        whose = "this agent" if self.of_first_agent else f"the agent {self.owner_name}"
        return (
            f"The MCP server {self.name} is required by {whose} but could not be reached: {reason}"
        )

    async def _connection(self) -> BaseException | None:
        if self._made is None:
            loop = asyncio.get_running_loop()
            self._made, self._closing = loop.create_future(), asyncio.Event()
            self._holder = loop.create_task(
                self._hold(),
                name=f"mcp-server:{self.name}",
            )
        return await asyncio.shield(self._made)

    async def _hold(self) -> None:
        assert self._made is not None and self._closing is not None
        # One deadline over the whole handshake. The SDK's client opens with a `server/discover`
        # probe that waits a fixed 10 s (the `mcp` package's DISCOVER_TIMEOUT_SECONDS, whatever
        # the server's timeout) before it falls back to `initialize`: a server that takes the
        # connection and never answers cost its timeout plus 10 s (over SSE, no request is even
        # sent before the endpoint event, and the wait was the 5 minutes between stream events).
        deadline = asyncio.timeout(self.connect_timeout)
        try:
            async with deadline:
                await super().connect()  # type: ignore[misc]
        except BaseException as exc:
            failure = exc
            if isinstance(exc, asyncio.CancelledError):  # `stop`, or the loop shutting down
                failure = ConnectionAbortedError(self.given_up)
            elif deadline.expired() and self.connect_timeout is not None:
                failure = TimeoutError(_no_answer(self.connect_timeout))
            self._report(failure)
            self._made.set_result(failure)
            if not isinstance(exc, Exception):
                raise
            return
        self._report(None)
        self._made.set_result(None)
        try:
            await self._closing.wait()
        finally:
            try:
                # Closing a streamable HTTP session sends a DELETE, whose answer the client awaits
                # as long as it would the next event of a stream (5 minutes): a server that has
                # stopped answering holds the check, or the end of the run, for its timeout only.
                async with asyncio.timeout(self.connect_timeout):
                    await super().cleanup()  # type: ignore[misc]
            except Exception:  # closing must never fail the run
                log.debug("closing MCP server %s failed", self.name, exc_info=True)

    def _report(self, error: BaseException | None) -> None:
        if self.trace is None:
            return
        fields: dict[str, Any] = {"name": self.name, "required": bool(self.required)}
        if not self.of_first_agent:
            fields["agent"] = self.owner_name
        if error is None:
            self.trace.add("mcp_server", connected=True, **fields)
        else:
            self.trace.add("mcp_server", connected=False, error=_plain(error), **fields)


class _StreamableHttpServer(_ConnectedOnFirstUse, MCPServerStreamableHttp):
    pass


class _SseServer(_ConnectedOnFirstUse, MCPServerSse):
    pass


@dataclass
class BuiltAgent:
    agent: Agent[RunContext]
    run_config: RunConfig
    config: AgentConfig
    # The MCP servers of every agent built, each once. Each connects on first use; `start`
    # connects the run's own agent's before the run starts.
    mcp: list[_ConnectedOnFirstUse] = field(default_factory=list)

    async def start(self, trace: Trace) -> None:
        """Connect the MCP servers of the agent the run starts with, so that one it requires
        fails the run before anything is streamed. An optional one that fails is skipped (the
        trace says why). The servers of agents it can hand off to connect when a handoff
        reaches them."""
        for server in self.mcp:
            if server.of_first_agent:
                await server.usable()

    async def close(self) -> None:
        """Close the MCP servers the run connected (each holder logs a failure to close, which
        never fails the run). Every holder is told before any is waited for: a stopped run is
        cancelled again on each heartbeat until it has ended, which may cut this wait short,
        and each holder must still end."""
        holders = [holder for server in self.mcp if (holder := server.stop()) is not None]
        if holders:
            await asyncio.wait(holders)


def _plain(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return _plain(exc.exceptions[0])
    text = str(exc) or type(exc).__name__
    return text[:300]


def _no_answer(seconds: float) -> str:
    unit = "second" if seconds == 1 else "seconds"
    return f"the server did not answer within {seconds:g} {unit}"


def _mcp_server(row: McpServer, headers: dict[str, str]) -> _ConnectedOnFirstUse:
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
    server: _ConnectedOnFirstUse
    if row.transport == McpTransport.SSE:
        server = _SseServer(params=params, **common)  # type: ignore[arg-type]
    else:
        server = _StreamableHttpServer(params=params, **common)  # type: ignore[arg-type]
    server.connect_timeout = row.timeout_seconds
    return server


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
    built: dict[str, tuple[Agent[RunContext], list[_ConnectedOnFirstUse], AgentConfig]] = {}
    agent = _build_one(tenant=tenant, version=version, trace=trace, built=built, first=True)
    # Breadth first, without recursion: a long chain of handoffs is no deeper a call stack.
    waiting, unpublished = [str(version.agent_id)], set[str]()
    while waiting:
        source, _servers, source_config = built[waiting.pop(0)]
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
    mcp = [server for _agent, servers, _config in built.values() for server in servers]
    return BuiltAgent(agent=agent, run_config=run_config, config=config, mcp=mcp)


def _build_one(
    *,
    tenant: Tenant,
    version: AgentVersion,
    trace: Trace | None,
    built: dict[str, tuple[Agent[RunContext], list[_ConnectedOnFirstUse], AgentConfig]],
    first: bool = False,
) -> Agent[RunContext]:
    """The SDK agent for `version`, without its handoffs (`build` links them), registered in
    `built` by agent id."""
    config = AgentConfig.model_validate(version.config)
    agent_row: AgentRow = version.agent
    model, model_settings = model_for(
        tenant=tenant, config=config, trace=trace, agent=agent_row.name
    )
    sdk_tools: list[Tool] = [tools.build(t.name, t.settings) for t in config.tools]

    servers: list[_ConnectedOnFirstUse] = []
    for ref in config.mcp_servers:
        row = selectors.mcp_server_get(tenant=tenant, server_id=ref.server_id)
        server = _mcp_server(row, services.mcp_headers(row))
        server.required, server.trace = ref.required, trace
        server.owner_name, server.of_first_agent = agent_row.name, first
        servers.append(server)

    output_type = JsonSchemaOutput(config.output_schema) if config.output_schema else None
    agent: Agent[RunContext] = Agent(
        name=agent_row.name,
        handoff_description=agent_row.description or None,
        instructions=config.instructions or None,
        model=model,
        model_settings=model_settings,
        tools=sdk_tools,
        mcp_servers=list[MCPServer](servers),  # type: ignore[arg-type]
        handoffs=[],
        input_guardrails=guardrails.build_input(config.input_guardrails, model),
        output_guardrails=guardrails.build_output(config.output_guardrails, model),
        output_type=output_type,
    )
    built[str(agent_row.pk)] = (agent, servers, config)
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

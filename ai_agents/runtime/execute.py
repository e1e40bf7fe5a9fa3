"""Running an agent version: build it, connect its MCP servers, stream the SDK run, and turn
every way it can end into a status and a message a person understands."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from uuid import UUID

import openai
from agents import (
    InputGuardrailTripwireTriggered,
    MaxTurnsExceeded,
    ModelBehaviorError,
    OutputGuardrailTripwireTriggered,
    Runner,
    StreamEvent,
)
from asgiref.sync import sync_to_async

from ai_agents import selectors
from ai_agents.models import AgentVersion, ModelProvider, ProviderApi
from ai_agents.runtime import models, retry
from ai_agents.runtime.build import BuiltAgent, McpRequiredUnavailable, build, context_for
from ai_agents.runtime.context import RunContext
from ai_agents.runtime.trace import TraceHooks, model_calls
from controlplane.errors import NotFound
from tenants.models import Tenant

EventSink = Callable[[StreamEvent], Awaitable[None]]


class AgentUnavailable(RuntimeError):
    pass


# What a run's end user is told when it failed for a reason only an owner or admin can act on
# (a key the provider refused, an address the egress policy blocks, a tool that no longer
# exists): the run's own reason, in the run inspector, says what to fix.
SETUP_PROBLEM = (
    "This agent cannot answer right now: something in its setup needs fixing. An owner or "
    "admin of this tenant can see what in the run inspector."
)


@dataclass
class RunOutcome:
    status: str  # success | guardrail | error
    output: Any = None
    message: str = ""
    last_agent: str = ""
    trace: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    # What the run's end user is told instead of `message`, when `message` is for whoever runs
    # the agent ("Check the key in the provider."); empty: `message` is for everyone.
    told: str = ""

    @property
    def for_end_user(self) -> str:
        return self.told or self.message

    @property
    def text(self) -> str:
        if self.status != "success":
            return self.message
        return self.output if isinstance(self.output, str) else _json(self.output)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return [s for s in self.trace if s["kind"] == "tool_call"]


def _json(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False, indent=2, default=str)


def explain_provider_error(
    exc: BaseException, *, timeout: float | None = None, detail: bool = False
) -> str | None:
    """Plain words for a failure of a model provider, or None if `exc` is not one. A run's
    reason is read by its end user too: the library's own words (e.g. "peer closed connection
    without sending complete message body") stay in its trace. `detail` adds them, for an admin
    setting a provider up ("test connection")."""
    from controlplane import egress

    explained = _explain(exc, timeout=timeout)
    plain = None if explained is None else explained[0]
    causes = retry.exception_chain(exc)
    if (
        plain is None
        or not detail
        or isinstance(exc, openai.APIStatusError)  # the provider's own message is in it
        or any(isinstance(each, egress.EgressError | egress.EgressDenied) for each in causes)
    ):
        return plain
    cause = exc.__cause__ if isinstance(exc, openai.APIConnectionError) and exc.__cause__ else exc
    technical = f"{type(cause).__name__}: {str(cause)[:200]}"
    return plain if technical in plain else f"{plain.rstrip('.')} ({technical})."


def _explain(exc: BaseException, *, timeout: float | None) -> tuple[str, str] | None:
    """The plain words for provider failure `exc` (None if it is not one), and what its end
    user is told instead when those words are for an owner or admin ("" otherwise)."""
    from controlplane import egress

    for each in retry.exception_chain(
        exc
    ):  # the egress guard's refusal says why, whatever wraps it
        if isinstance(each, (egress.EgressDenied, egress.EgressError)):
            return str(each), SETUP_PROBLEM
    if isinstance(exc, openai.AuthenticationError):
        return (
            "The model provider refused the API key (HTTP 401). Check the key in the provider.",
            SETUP_PROBLEM,
        )
    if isinstance(exc, openai.PermissionDeniedError):
        return (
            "The model provider refused access (HTTP 403): the key may lack this model.",
            SETUP_PROBLEM,
        )
    if isinstance(exc, openai.NotFoundError):
        return "The model provider does not know this model or URL (HTTP 404).", SETUP_PROBLEM
    if isinstance(exc, openai.RateLimitError):
        return (
            "The model provider is taking no more requests for now (HTTP 429: too many "
            "requests). Try again shortly.",
            "",
        )
    if isinstance(exc, openai.APITimeoutError):
        within = f" within {timeout:g} s" if timeout else ""
        return f"The model provider did not answer{within}.", ""
    names = {cls.__name__ for each in retry.exception_chain(exc) for cls in type(each).__mro__}
    if isinstance(exc, openai.APIConnectionError):
        # The library's own words ("peer closed connection without sending complete message
        # body") are for the trace; the run says what happened.
        if names & {"RemoteProtocolError", "ReadError"}:
            return "The connection to the model provider broke while it answered.", ""
        return "Could not connect to the model provider.", ""
    if isinstance(exc, openai.APIStatusError):
        detail = re.sub(r"^Error code: \d+ - ", "", exc.message)  # the status is said already
        # The provider's own words may name its account, limits or the request's contents.
        told = (
            f"The agent's model is failing right now (HTTP {exc.status_code}). Try again later."
            if exc.status_code >= 500
            else f"The agent's model refused this request (HTTP {exc.status_code}). An owner "
            "or admin of this tenant can see why in the run inspector."
        )
        return (
            f"The model provider answered with an error (HTTP {exc.status_code}): {detail}",
            told,
        )
    if "TimeoutException" in names:  # httpx's, raised as is while a stream is read
        within = f" for {timeout:g} s" if timeout else ""
        return f"The model provider stopped answering (nothing{within}).", ""
    if "ConnectError" in names:
        return "Could not connect to the model provider.", ""
    if "TransportError" in names:
        return "The connection to the model provider broke while it answered.", ""
    if isinstance(exc, ModelBehaviorError):  # the SDK's own words say what the model did
        return (
            f"The model answered with something the agent cannot use: {str(exc)[:200]}",
            "The agent's model answered with something the agent cannot use. Try again.",
        )
    if isinstance(exc, (openai.APIResponseValidationError, ValueError)):
        return "The model provider answered, but not with a valid completion.", ""
    return None


async def run_version(
    *,
    tenant: Tenant,
    version: AgentVersion,
    input: str | list[Any],
    depth: int = 0,
    context: RunContext | None = None,
    on_event: EventSink | None = None,
    session: Any = None,
    built: BuiltAgent | None = None,
) -> RunOutcome:
    """Run `version` on `input` to the end. Never raises for a failure of the agent, its model,
    tools or MCP servers: those become `RunOutcome(status="error", message=...)`.

    `session` (an Agents SDK Session, e.g. a thread's) supplies the history and receives the new
    items; `on_event` receives every SDK stream event as it happens. `built`: the agent built
    already (`build` with `context.trace`, under `models.run_loop` set to this loop)."""
    async with models.run_scope():  # provider clients of a loop that does not share them
        return await _run_version(
            tenant=tenant,
            version=version,
            input=input,
            depth=depth,
            context=context,
            on_event=on_event,
            session=session,
            built=built,
        )


async def _run_version(
    *,
    tenant: Tenant,
    version: AgentVersion,
    input: str | list[Any],
    depth: int,
    context: RunContext | None,
    on_event: EventSink | None,
    session: Any,
    built: BuiltAgent | None,
) -> RunOutcome:
    ctx = context or await sync_to_async(context_for)(tenant=tenant, version=version, depth=depth)
    models.run_loop.set(asyncio.get_running_loop())  # a run host's runs share its clients
    try:
        if built is None:
            built = await sync_to_async(build)(tenant=tenant, version=version, trace=ctx.trace)
    except NotFound as exc:
        return RunOutcome(
            "error",
            message=f"The agent's configuration refers to something that "
            f"no longer exists: {exc.message}",
            trace=ctx.trace.spans,
            told=SETUP_PROBLEM,
        )
    timeout = None
    last_agent = built.agent.name
    try:
        await built.start(ctx.trace)
        result = Runner.run_streamed(
            built.agent,
            input,
            context=ctx,
            max_turns=built.config.max_turns,
            hooks=TraceHooks(ctx.trace),
            run_config=built.run_config,
            session=session,
        )
        async for event in result.stream_events():
            if on_event is not None:
                await on_event(event)
        last_agent = result.last_agent.name
        return RunOutcome(
            "success",
            output=result.final_output,
            last_agent=last_agent,
            trace=ctx.trace.spans,
            usage=ctx.trace.usage(),
        )
    except InputGuardrailTripwireTriggered as exc:
        info = exc.guardrail_result.output.output_info or {}
        return _ended("guardrail", info.get("message", "The request was blocked."), ctx, last_agent)
    except OutputGuardrailTripwireTriggered as exc:
        info = exc.guardrail_result.output.output_info or {}
        return _ended("guardrail", info.get("message", "The answer was withheld."), ctx, last_agent)
    except MaxTurnsExceeded:
        return _ended(
            "error",
            f"The agent did not finish within {built.config.max_turns} turns.",
            ctx,
            last_agent,
        )
    except Exception as exc:
        # Raised by `start`, or inside the SDK's turn (which may wrap it) when a handoff
        # reaches an agent whose required MCP server is down.
        mcp_down = _in_chain(exc, McpRequiredUnavailable)
        if mcp_down is not None:
            told = "A service this agent needs cannot be reached right now. Try again later."
            return _ended("error", str(mcp_down), ctx, last_agent, told)
        exhausted = _in_chain(exc, retry.RetriesExhausted)
        if exhausted is not None:
            reason, told = _gave_up(exhausted, timeout)
            return _ended("error", reason, ctx, last_agent, told)
        explained = _explain(exc, timeout=timeout)
        if explained is None:
            raise
        return _ended("error", explained[0], ctx, last_agent, explained[1])
    finally:
        await built.close()


_E = TypeVar("_E", bound=BaseException)


def _in_chain(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first `kind` along `exc`'s chain: the SDK wraps what a hook or a turn raises (e.g.
    in a UserError)."""
    return next((each for each in retry.exception_chain(exc) if isinstance(each, kind)), None)


def _gave_up(exc: retry.RetriesExhausted, timeout: float | None) -> tuple[str, str]:
    """The run's reason when its model retries ran out, and what its end user is told."""
    if exc.message:
        return exc.message, ""
    cause = exc.__cause__ or exc
    times = "once more" if exc.retries == 1 else f"{exc.retries} more times"
    plain, told = _explain(cause, timeout=timeout) or (str(cause), "")
    return f"{plain} It was tried {times}, without success.", told


def _ended(
    status: str, message: str, ctx: RunContext, last_agent: str, told: str = ""
) -> RunOutcome:
    ctx.trace.add("end", status=status, message=message)
    return RunOutcome(
        status,
        message=message,
        last_agent=last_agent,
        trace=ctx.trace.spans,
        usage=ctx.trace.usage(),
        told=told,
    )


def _published(tenant_id: UUID, slug: str) -> tuple[Tenant, AgentVersion]:
    tenant = Tenant.objects.get(pk=tenant_id)
    try:
        agent = selectors.agent_get_by_slug(tenant=tenant, slug=slug)
    except NotFound:
        raise AgentUnavailable(f"There is no agent called {slug!r}.")
    if agent.published_version is None:
        raise AgentUnavailable(f"{agent.name} has not been published yet.")
    version = agent.published_version
    _ = version.agent  # loaded here, in the thread that may use the ORM
    return tenant, version


async def run_published_agent(
    *, tenant_id: UUID, agent_slug: str, input: str, parent: RunContext
) -> str:
    """The `run_agent` tool: another agent of the same tenant, at its published version."""
    tenant, version = await sync_to_async(_published)(tenant_id, agent_slug)
    child = await sync_to_async(context_for)(
        tenant=tenant,
        version=version,
        depth=parent.depth + 1,
        thread_id=parent.thread_id,
        end_user_id=parent.end_user_id,
    )
    outcome = await run_version(tenant=tenant, version=version, input=input, context=child)
    parent.trace.add(
        "agent_call",
        agent=agent_slug,
        status=outcome.status,
        message=outcome.message,  # the reason, for the run inspector
        usage=outcome.usage,
        model_calls=model_calls(outcome.trace),  # its tokens count towards this run
    )
    if outcome.status != "success":
        # The tool's result is shown in the chat and may be repeated by the model: what the end
        # user may read, not a setup problem's details.
        raise AgentUnavailable(f"{agent_slug} could not answer: {outcome.for_end_user}")
    return outcome.text


async def check_provider(provider: ModelProvider) -> tuple[bool, str]:
    """The dashboard's "test connection": one tiny request, and what went wrong in plain words.
    The client is closed afterwards unless it is a run host's shared one (`models.run_scope`)."""
    async with models.run_scope():
        client = models.openai_client(provider)
        try:
            if provider.api == ProviderApi.RESPONSES:
                await client.responses.create(
                    model=provider.default_model, input="ping", max_output_tokens=16
                )
            else:
                reply = await client.chat.completions.create(
                    model=provider.default_model,
                    messages=[{"role": "user", "content": "ping"}],
                    max_tokens=1,
                )
                if not getattr(reply, "choices", None):
                    raise ValueError("the answer has no choices")
        except Exception as exc:
            explained = explain_provider_error(exc, timeout=provider.timeout_seconds, detail=True)
            return False, explained or (f"Unexpected error: {type(exc).__name__}: {exc}")
    return True, f"Connected: {provider.default_model} answered."

"""The project's own trace of a run: model calls, tool calls, handoffs, guardrails and MCP
servers, with durations and token counts. The SDK's export to OpenAI is off; this trace is kept
with the run instead (a list of JSON-able spans)."""

from __future__ import annotations

import json
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from agents import Agent, FunctionTool, Model, ModelResponse, RunContextWrapper, RunHooks, Tool

MAX_TEXT = 2_000  # characters of a tool argument or output kept in a span


# Which endpoint and model name a Model instance stands for, so that every model_call span can say
# what was called (usage and cost are counted per model). Registered where models are built.
_IDENTITIES: weakref.WeakKeyDictionary[Model, dict[str, Any]] = weakref.WeakKeyDictionary()


def identify(model: Model, *, name: str, provider_id: str | None, provider: str) -> Model:
    _IDENTITIES[model] = {"model": name, "provider_id": provider_id, "provider": provider}
    return model


def identity_of(model: Any) -> dict[str, Any]:
    """{"model", "provider_id", "provider"} of an agent's model; `provider` is "builtin" for the
    built-in offline model."""
    from ai_agents.runtime.offline import OfflineModel

    while isinstance(getattr(model, "inner", None), Model):  # a wrapper (retries) of the model
        model = model.inner
    if isinstance(model, Model) and model in _IDENTITIES:
        return _IDENTITIES[model]
    if isinstance(model, OfflineModel):
        return {"model": "offline", "provider_id": None, "provider": "builtin"}
    name = model if isinstance(model, str) else getattr(model, "model", None)
    return {
        "model": name if isinstance(name, str) and name else "unknown",
        "provider_id": None,
        "provider": "",
    }


def model_calls(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every model call of a trace, including those of agents it called (the run_agent tool)."""
    calls: list[dict[str, Any]] = []
    for span in spans:
        if span["kind"] == "model_call":
            calls.append(span)
        elif span["kind"] == "agent_call":
            calls.extend(span.get("model_calls", []))
    return calls


def _clip(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "…"


@dataclass
class Trace:
    spans: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def add(self, kind: str, **data: Any) -> dict[str, Any]:
        span = {"kind": kind, "at_ms": round((time.monotonic() - self.started) * 1000, 1), **data}
        self.spans.append(span)
        return span

    def usage(self) -> dict[str, int]:
        calls = model_calls(self.spans)
        return {
            "requests": len(calls),
            "input_tokens": sum(s.get("input_tokens", 0) for s in calls),
            "output_tokens": sum(s.get("output_tokens", 0) for s in calls),
            "total_tokens": sum(s.get("total_tokens", 0) for s in calls),
        }


class TraceHooks(RunHooks[Any]):
    """Fills `Trace` from the SDK's lifecycle hooks."""

    def __init__(self, trace: Trace):
        self.trace = trace
        self._llm_started: dict[str, float] = {}
        self._tool_started: dict[str, float] = {}

    async def on_llm_start(
        self,
        context: RunContextWrapper[Any],
        agent: Agent[Any],
        system_prompt: str | None,
        input_items: list[Any],
    ) -> None:
        self._llm_started[agent.name] = time.monotonic()

    async def on_llm_end(
        self, context: RunContextWrapper[Any], agent: Agent[Any], response: ModelResponse
    ) -> None:
        started = self._llm_started.pop(agent.name, time.monotonic())
        usage = response.usage
        details = getattr(usage, "input_tokens_details", None)
        self.trace.add(
            "model_call",
            agent=agent.name,
            **identity_of(agent.model),
            duration_ms=round((time.monotonic() - started) * 1000, 1),
            input_tokens=usage.input_tokens,
            cached_input_tokens=getattr(details, "cached_tokens", 0) or 0,
            output_tokens=usage.output_tokens,
            total_tokens=usage.total_tokens,
        )

    async def on_tool_start(
        self, context: RunContextWrapper[Any], agent: Agent[Any], tool: Tool
    ) -> None:
        self._tool_started[_call_id(context, tool)] = time.monotonic()
        arguments = getattr(context, "tool_arguments", None)
        if isinstance(tool, FunctionTool) and not _valid_arguments(arguments):
            # The SDK will not run the tool: it answers the model with the parse error, so the
            # model gets another try. That try counts against the run's retries.
            self._malformed(agent, tool, str(arguments))
            return
        before_tool = getattr(context.context, "extra", {}).get("before_tool")
        if before_tool is not None:  # e.g. the executor records side effects before they happen
            await before_tool(tool)

    def _malformed(self, agent: Agent[Any], tool: Tool, arguments: str) -> None:
        from ai_agents.runtime import retry

        message = f"The model called {tool.name} with arguments that are not a JSON object."
        used, allowed = retry.retries_used(self.trace), retry.budget()
        if used >= allowed:
            raise retry.RetriesExhausted(
                f"{message} It was told and tried again, but kept doing so, so the reply was "
                "stopped."
            )
        self.trace.add(
            "retry",
            agent=agent.name,
            reason=retry.MALFORMED_TOOL_ARGUMENTS,
            message=f"{message} The tool did not run; the model was told and tries again.",
            retry=used + 1,
            wait_ms=0,
            discarded=False,
            tool=tool.name,
            arguments=_clip(arguments),
        )

    async def on_tool_end(
        self, context: RunContextWrapper[Any], agent: Agent[Any], tool: Tool, result: Any
    ) -> None:
        started = self._tool_started.pop(_call_id(context, tool), time.monotonic())
        self.trace.add(
            "tool_call",
            agent=agent.name,
            tool=tool.name,
            arguments=_clip(getattr(context, "tool_arguments", "") or ""),
            output=_clip(result),
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )

    async def on_handoff(
        self, context: RunContextWrapper[Any], from_agent: Agent[Any], to_agent: Agent[Any]
    ) -> None:
        self.trace.add("handoff", from_agent=from_agent.name, to_agent=to_agent.name)


def _valid_arguments(arguments: Any) -> bool:
    """Arguments a function tool can be called with: a JSON object (or nothing at all)."""
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return True
    try:
        return isinstance(json.loads(arguments), dict)
    except (TypeError, ValueError):
        return False


def _call_id(context: RunContextWrapper[Any], tool: Tool) -> str:
    return str(getattr(context, "tool_call_id", "") or tool.name)

"""The project's own trace of a run: model calls, tool calls, handoffs, guardrails and MCP
servers, with durations and token counts. The SDK's export to OpenAI is off; this trace is kept
with the run instead (a list of JSON-able spans)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from agents import Agent, ModelResponse, RunContextWrapper, RunHooks, Tool

MAX_TEXT = 2_000  # characters of a tool argument or output kept in a span


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
        calls = [s for s in self.spans if s["kind"] == "model_call"]
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
        self.trace.add(
            "model_call",
            agent=agent.name,
            model=_model_name(agent),
            duration_ms=round((time.monotonic() - started) * 1000, 1),
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            total_tokens=usage.total_tokens,
        )

    async def on_tool_start(
        self, context: RunContextWrapper[Any], agent: Agent[Any], tool: Tool
    ) -> None:
        self._tool_started[_call_id(context, tool)] = time.monotonic()
        before_tool = getattr(context.context, "extra", {}).get("before_tool")
        if before_tool is not None:  # e.g. the executor records side effects before they happen
            await before_tool(tool.name)

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


def _model_name(agent: Agent[Any]) -> str:
    """The model's name as configured (a string, or the name a Model instance carries)."""
    model = agent.model
    if model is None or isinstance(model, str):
        return model or ""
    return str(getattr(model, "model", "") or getattr(model, "model_name", "") or "")


def _call_id(context: RunContextWrapper[Any], tool: Tool) -> str:
    return str(getattr(context, "tool_call_id", "") or tool.name)

"""The one vocabulary of run events (docs/run-events.md).

Every reader (the chat websocket, the REST/SSE streams, `join`) maps from these small JSON-able
dicts, never from SDK objects: the SDK's stream events are translated once, here, by the worker,
and what is stored in a run's Redis Stream (`conversations.streams`) is this vocabulary.

Each event is a dict with a `type` and the fields listed next to its constructor below. Model and
tool text in them is untrusted (escape it when rendering).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from agents import (
    AgentUpdatedStreamEvent,
    HandoffCallItem,
    HandoffOutputItem,
    ItemHelpers,
    MessageOutputItem,
    RawResponsesStreamEvent,
    RunItemStreamEvent,
    StreamEvent,
    ToolCallItem,
    ToolCallOutputItem,
)
from openai.types.responses import ResponseTextDeltaEvent

from ai_agents.runtime.retry import ModelRetryEvent

RUN_STATUS: Final = "run.status"
MESSAGE_DELTA: Final = "message.delta"
MESSAGE_COMPLETED: Final = "message.completed"
TOOL_STARTED: Final = "tool.started"
TOOL_FINISHED: Final = "tool.finished"
HANDOFF: Final = "handoff"
GUARDRAIL_TRIPPED: Final = "guardrail.tripped"
USAGE: Final = "usage"
ERROR: Final = "error"
# The field of a terminal `run.status` that only owners and admins may read (`status`).
DETAIL: Final = "detail"
MODEL_RETRY: Final = "model.retry"
# Never stored: `streams.follow` yields it when nothing happened for a while, so a websocket or
# SSE reader can send a keep-alive and re-check the reader's permissions.
HEARTBEAT: Final = "heartbeat"

TYPES: Final = frozenset(
    {
        RUN_STATUS,
        MESSAGE_DELTA,
        MESSAGE_COMPLETED,
        TOOL_STARTED,
        TOOL_FINISHED,
        HANDOFF,
        GUARDRAIL_TRIPPED,
        USAGE,
        ERROR,
        MODEL_RETRY,
        HEARTBEAT,
    }
)

STATUSES: Final = frozenset(
    {"pending", "running", "success", "error", "cancelled", "interrupted", "timeout"}
)
TERMINAL_STATUSES: Final = frozenset({"success", "error", "cancelled", "interrupted", "timeout"})

# Characters of a tool's arguments or output kept in an event: enough to show, small enough that
# one chatty tool does not fill the stream (the run's trace and items keep what they keep).
MAX_TOOL_TEXT: Final = 4_000

Event = dict[str, Any]


def _clip(text: str, limit: int = MAX_TOOL_TEXT) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


# --- constructors: the vocabulary ---------------------------------------------------------------


def status(
    status: str, *, message: str = "", detail: str = "", attempt: int | None = None
) -> Event:
    """`run.status`: the run changed state. `message` explains a failure in plain words, to the
    run's end user; `detail`, the run's own reason for owners and admins, is there only when it
    says more (a refused key: "Check the key in the provider."). `attempt` is filled in by
    `streams.append`/`finish` when absent."""
    value = str(status)
    if value not in STATUSES:
        raise ValueError(f"unknown run status {value!r}")
    event: Event = {"type": RUN_STATUS, "status": value, "message": message or ""}
    if detail and detail != message:
        event[DETAIL] = detail
    if attempt is not None:
        event["attempt"] = int(attempt)
    return event


def message_delta(text: str, *, agent: str) -> Event:
    """`message.delta`: a piece of the reply being written; deltas concatenate to the text of
    the next `message.completed`."""
    return {"type": MESSAGE_DELTA, "text": text, "agent": agent}


def _placed(event: Event, seq: int | None) -> Event:
    if seq is not None:
        event["seq"] = seq
    return event


def message_completed(text: str, *, agent: str, seq: int | None = None) -> Event:
    """`message.completed`: one whole assistant message (a run may have several). `seq`: its
    place among the attempt's messages, from 0."""
    return _placed({"type": MESSAGE_COMPLETED, "text": text, "agent": agent}, seq)


def tool_started(
    *, call_id: str, tool: str, arguments: str, agent: str, seq: int | None = None
) -> Event:
    """`tool.started`: the model called a tool. `arguments` is the model's JSON text, clipped.
    `seq`: the call's place among the attempt's function tool calls, from 0."""
    return _placed(
        {
            "type": TOOL_STARTED,
            "call_id": call_id,
            "tool": tool,
            "arguments": _clip(arguments),
            "agent": agent,
        },
        seq,
    )


def tool_finished(*, call_id: str, tool: str, output: Any, agent: str) -> Event:
    """`tool.finished`: the tool answered (or failed: the SDK turns a failure into output text).
    `call_id` matches the `tool.started` event; `output` is text, clipped."""
    return {
        "type": TOOL_FINISHED,
        "call_id": call_id,
        "tool": tool,
        "output": _clip(_text(output)),
        "agent": agent,
    }


def handoff(*, from_agent: str, to_agent: str, seq: int | None = None) -> Event:
    """`handoff`: the conversation moved to another agent; later messages come from `to_agent`.
    `seq`: its place among the attempt's handoffs, from 0."""
    return _placed({"type": HANDOFF, "from_agent": from_agent, "to_agent": to_agent}, seq)


def guardrail_tripped(*, side: str, message: str) -> Event:
    """`guardrail.tripped`: an input or output guardrail stopped the run (`side` is "input" or
    "output"); a terminal `run.status` follows."""
    if side not in ("input", "output"):
        raise ValueError(f"guardrail side must be 'input' or 'output', not {side!r}")
    return {"type": GUARDRAIL_TRIPPED, "side": side, "message": message}


def usage(
    values: Mapping[str, int] | None = None,
    *,
    input_tokens: int = 0,
    output_tokens: int = 0,
    total_tokens: int = 0,
    requests: int = 0,
) -> Event:
    """`usage`: tokens and model requests of the run so far (the trace's `usage()` dict fits)."""
    given = dict(values or {})
    return {
        "type": USAGE,
        "input_tokens": int(given.get("input_tokens", input_tokens)),
        "output_tokens": int(given.get("output_tokens", output_tokens)),
        "total_tokens": int(given.get("total_tokens", total_tokens)),
        "requests": int(given.get("requests", requests)),
    }


def error(message: str) -> Event:
    """`error`: something went wrong that the reader should show; the run may still go on (a
    failure that ends the run is a terminal `run.status` with a message)."""
    return {"type": ERROR, "message": message}


def model_retry(
    *,
    reason: str,
    message: str,
    retry: int,
    max_retries: int,
    wait_ms: int,
    discard: bool,
    agent: str,
) -> Event:
    """`model.retry`: a model call failed and is tried again after `wait_ms`. With `discard`,
    that call had already streamed text: readers drop the `message.delta` text they received
    since the last `message.completed`, `tool.started`, `tool.finished` or `handoff`, because
    the new call writes the message again from its start."""
    return {
        "type": MODEL_RETRY,
        "reason": reason,
        "message": message,
        "retry": int(retry),
        "max_retries": int(max_retries),
        "wait_ms": int(wait_ms),
        "discard": bool(discard),
        "agent": agent,
    }


def heartbeat() -> Event:
    return {"type": HEARTBEAT}


def is_terminal(event: Mapping[str, Any]) -> bool:
    """True for the `run.status` event that ends a run's stream."""
    return event.get("type") == RUN_STATUS and event.get("status") in TERMINAL_STATUSES


# --- from the Agents SDK --------------------------------------------------------------------------


class EventMapper:
    """Translates one run's SDK stream events, in order. It remembers what a single event does
    not carry: the agent currently speaking (raw token deltas do not name their agent; the SDK
    announces a new agent with `AgentUpdatedStreamEvent`), each tool call's name (a
    `ToolCallOutputItem` only has the call id) and how many messages, function tool calls and
    handoffs came before (each one's `seq`: the chat page tells a replayed step the thread has
    saved by it), and which calls asked for a handoff: a response that asks for several gets
    the first, and the others' results (`ToolCallOutputItem`s saying so) are no event, as the
    chat page shows them as nothing (`selectors.transfer_kinds`). Use one mapper per attempt of
    a run."""

    def __init__(self, agent_name: str) -> None:
        self.agent = agent_name
        self._tools: dict[str, str] = {}
        self._handoff_calls: set[str] = set()
        self._counts: dict[str, int] = {}

    def _next(self, kind: str) -> int:
        seq = self._counts.get(kind, 0)
        self._counts[kind] = seq + 1
        return seq

    def map(self, event: StreamEvent) -> list[Event]:
        if isinstance(event, RawResponsesStreamEvent):
            data = event.data
            if isinstance(data, ResponseTextDeltaEvent) and data.delta:
                return [message_delta(data.delta, agent=self.agent)]
            if isinstance(data, ModelRetryEvent):
                return [
                    model_retry(
                        reason=data.reason,
                        message=data.message,
                        retry=data.retry,
                        max_retries=data.max_retries,
                        wait_ms=data.wait_ms,
                        discard=data.discard,
                        agent=self.agent,
                    )
                ]
            return []
        if isinstance(event, AgentUpdatedStreamEvent):
            # No event of its own: the starting agent is the run's agent, and every later change
            # comes from a handoff, which has its `handoff` event. Only remembered for deltas.
            self.agent = event.new_agent.name
            return []
        if isinstance(event, RunItemStreamEvent):
            return self._item(event)
        return []

    def _item(self, event: RunItemStreamEvent) -> list[Event]:
        item = event.item
        agent = getattr(getattr(item, "agent", None), "name", None) or self.agent
        if event.name == "message_output_created" and isinstance(item, MessageOutputItem):
            return [
                message_completed(
                    ItemHelpers.text_message_output(item), agent=agent, seq=self._next("message")
                )
            ]
        if event.name == "tool_called" and isinstance(item, ToolCallItem):
            call_id = str(item.call_id or "")
            tool = item.tool_name or _raw_get(item.raw_item, "type") or "tool"
            self._tools[call_id] = tool
            self._handoff_calls.discard(call_id)  # a reused call id
            # Numbered like the thread numbers its saved items: function calls only (hosted
            # tools' calls are saved as items of their own kinds).
            function = _raw_get(item.raw_item, "type") == "function_call"
            return [
                tool_started(
                    call_id=call_id,
                    tool=tool,
                    arguments=_text(_raw_get(item.raw_item, "arguments") or ""),
                    agent=agent,
                    seq=self._next("tool") if function else None,
                )
            ]
        if event.name == "handoff_requested" and isinstance(item, HandoffCallItem):
            self._handoff_calls.add(str(_raw_get(item.raw_item, "call_id") or ""))
            return []  # its `handoff_occured` follows, if it is the one taken
        if event.name == "tool_output" and isinstance(item, ToolCallOutputItem):
            call_id = str(item.call_id or "")
            if call_id in self._handoff_calls:
                self._handoff_calls.discard(call_id)
                return []  # a handoff the SDK did not take
            return [
                tool_finished(
                    call_id=call_id,
                    tool=self._tools.get(call_id, ""),
                    output=item.output,
                    agent=agent,
                )
            ]
        # "handoff_occured" is the SDK's spelling.
        if event.name == "handoff_occured" and isinstance(item, HandoffOutputItem):
            self._handoff_calls.discard(str(_raw_get(item.raw_item, "call_id") or ""))
            return [
                handoff(
                    from_agent=item.source_agent.name,
                    to_agent=item.target_agent.name,
                    seq=self._next("handoff"),
                )
            ]
        # Reasoning, MCP listings and approvals, tool search: not part of the vocabulary.
        return []


def _raw_get(raw: Any, name: str) -> Any:
    return raw.get(name) if isinstance(raw, dict) else getattr(raw, name, None)


def from_sdk(event: StreamEvent, *, agent_name: str) -> list[Event]:
    """Map one SDK stream event with no memory of the run: deltas are attributed to
    `agent_name`, `tool.finished` has an empty `tool` and nothing has a `seq`. A run's executor
    should keep one `EventMapper` instead, which gets all three right."""
    mapped = EventMapper(agent_name).map(event)
    for one in mapped:
        one.pop("seq", None)
    return mapped

"""Reads of the run inspector (owners and admins): every run of the tenant, filtered and paged by
a keyset; one run with its timeline built from `Run.trace`; a thread's transcript; the live
progress of an active run from its event stream.

Every function takes the tenant first and filters on it: another tenant's run or thread is
`NotFound`. Nothing here filters on the end user: admins see every end user's runs.
They live apart from `selectors.py` (the chat's reads) because they answer a different reader.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from django.core.exceptions import ValidationError
from django.db.models import F, Func, IntegerField, JSONField, Q, QuerySet
from django.db.models import Value as SqlValue
from django.utils.safestring import SafeString

from ai_agents.config import GUARDRAIL_LABELS
from ai_agents.models import PlaygroundRun
from controlplane.errors import NotFound
from conversations import markdown, selectors, streams
from conversations.events import MESSAGE_DELTA, RUN_STATUS, TOOL_FINISHED, TOOL_STARTED
from conversations.models import ACTIVE_STATUSES, Item, Run, Thread
from tenants.models import Tenant

PAGE_SIZE = 50
MAX_VALUE_CHARS = 4_000  # characters of one span value shown before it is clipped

RANGE_PRESETS: dict[str, tuple[str, timedelta]] = {
    "1h": ("Last hour", timedelta(hours=1)),
    "24h": ("Last 24 hours", timedelta(hours=24)),
    "7d": ("Last 7 days", timedelta(days=7)),
    "30d": ("Last 30 days", timedelta(days=30)),
}


# --- The list ---------------------------------------------------------------------------------


@dataclass
class RunFilters:
    agent_id: UUID | None = None
    status: str = ""  # a RunStatus, or "active" for pending and running
    source: str = ""
    end_user: str = ""  # matches a name, an e-mail or an external id
    thread_id: UUID | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass
class RunPage:
    runs: Sequence[Run]
    next_cursor: str | None  # pass as `before` for the next (older) page

    @property
    def any_active(self) -> bool:
        return any(r.is_active or r.status in ACTIVE_STATUSES for r in self.runs)


def cursor_for(run: Run | PlaygroundRun) -> str:
    """The keyset position just after `run` (newest first)."""
    return selectors.keyset_cursor(run.created_at, run.pk)


def parse_cursor(value: str) -> tuple[datetime, UUID]:
    """`cursor_for`'s inverse; ValidationFailed for anything else (a hand-edited link)."""
    return selectors.parse_keyset_cursor(value, restart="Start again from the newest runs.")


def _filtered(tenant: Tenant, filters: RunFilters) -> QuerySet[Run]:
    qs = Run.objects.for_tenant(tenant)
    if filters.agent_id:
        qs = qs.filter(agent_id=filters.agent_id)
    if filters.status == "active":
        qs = qs.filter(status__in=ACTIVE_STATUSES)
    elif filters.status:
        qs = qs.filter(status=filters.status)
    if filters.source:
        qs = qs.filter(source=filters.source)
    if filters.thread_id:
        qs = qs.filter(thread_id=filters.thread_id)
    if filters.since:
        qs = qs.filter(created_at__gte=filters.since)
    if filters.until:
        qs = qs.filter(created_at__lt=filters.until)
    who = filters.end_user.strip()
    if who:
        qs = qs.filter(
            Q(end_user__display_name__icontains=who)
            | Q(end_user__external_id__icontains=who)
            | Q(end_user__user__email__icontains=who)
            | Q(end_user__user__name__icontains=who)
        )
    return qs


def _first_token_ms() -> Func:
    # Read in PostgreSQL so the list never loads whole traces.
    return Func(
        F("trace"),
        SqlValue('$[*] ? (@.kind == "first_token").at_ms'),
        function="jsonb_path_query_first",
        output_field=JSONField(),
    )


def _model_retries() -> Func:
    # The `retry` spans of the trace (a model call tried again), counted in PostgreSQL.
    matches = Func(
        F("trace"),
        SqlValue('$[*] ? (@.kind == "retry")'),
        function="jsonb_path_query_array",
        output_field=JSONField(),
    )
    return Func(matches, function="jsonb_array_length", output_field=IntegerField())


def run_search(
    *, tenant: Tenant, filters: RunFilters, before: str = "", limit: int = PAGE_SIZE
) -> RunPage:
    """The tenant's runs matching `filters`, newest first, `limit` at a time after the keyset
    cursor `before`. The large JSON columns (input, output, trace) are not loaded: the time to
    first token and the first line of the error come from the database. ValidationFailed for
    a malformed cursor."""
    qs = _filtered(tenant, filters)
    if before:
        when, run_id = parse_cursor(before)
        qs = qs.filter(Q(created_at__lt=when) | Q(created_at=when, id__lt=run_id))
    rows = list(
        qs.select_related("agent", "version", "end_user", "end_user__user")
        .defer("input", "output", "trace", "metadata")
        .annotate(first_token_ms=_first_token_ms(), model_retries=_model_retries())
        .order_by("-created_at", "-id")[: limit + 1]
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return RunPage(runs=rows, next_cursor=cursor_for(rows[-1]) if more and rows else None)


@dataclass
class PlaygroundPage:
    runs: Sequence[PlaygroundRun]
    next_cursor: str | None


def playground_run_search(
    *, tenant: Tenant, filters: RunFilters, before: str = "", limit: int = PAGE_SIZE
) -> PlaygroundPage:
    """The tenant's playground runs (tests of an agent's draft or version from its editor),
    newest first, filtered by agent and time; the same keyset cursor as `run_search`."""
    qs = PlaygroundRun.objects.for_tenant(tenant)
    if filters.agent_id:
        qs = qs.filter(agent_id=filters.agent_id)
    if filters.since:
        qs = qs.filter(created_at__gte=filters.since)
    if filters.until:
        qs = qs.filter(created_at__lt=filters.until)
    if before:
        when, run_id = parse_cursor(before)
        qs = qs.filter(Q(created_at__lt=when) | Q(created_at=when, id__lt=run_id))
    rows = list(
        qs.select_related("agent", "created_by")
        .defer("config", "output", "trace")
        .order_by("-created_at", "-id")[: limit + 1]
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return PlaygroundPage(runs=rows, next_cursor=cursor_for(rows[-1]) if more and rows else None)


def playground_run_get(*, tenant: Tenant, run_id: Any) -> PlaygroundRun:
    """One playground run of the tenant; NotFound for another tenant's."""
    try:
        return (
            PlaygroundRun.objects.for_tenant(tenant)
            .select_related("agent", "created_by")
            .get(pk=run_id)
        )
    except (PlaygroundRun.DoesNotExist, ValueError, ValidationError):
        raise NotFound("No such run.")


def output_of(output: Any) -> tuple[SafeString | None, str]:
    """A final output: text as sanitised markdown (model output is untrusted), or structured
    output as pretty JSON text."""
    if output is None or output == "":
        return None, ""
    if isinstance(output, str):
        return markdown.render_markdown(output), ""
    return None, json.dumps(output, indent=2, ensure_ascii=False, default=str)


# --- One run ----------------------------------------------------------------------------------


def run_get(*, tenant: Tenant, run_id: Any) -> Run:
    """One run of the tenant with everything its page shows; NotFound for another tenant's."""
    try:
        return (
            Run.objects.for_tenant(tenant)
            .select_related(
                "agent", "version", "thread", "end_user", "end_user__user", "created_by", "api_key"
            )
            .get(pk=run_id)
        )
    except (Run.DoesNotExist, ValueError, ValidationError):
        raise NotFound("No such run.")


def run_items(*, tenant: Tenant, run: Run) -> list[selectors.Entry]:
    """What the run added to its thread (input, tool steps, reply), oldest first."""
    rows = list(Item.objects.for_tenant(tenant).filter(run=run).order_by("id")[:500])
    handoffs = selectors.run_handoff_tools(tenant=tenant, run_ids=[run.pk])
    told = selectors.transfer_kinds(rows, handoffs=handoffs)
    return [e for e in (selectors.entry_for(i, transfers=told) for i in rows) if e is not None]


@dataclass
class Message:
    role: str
    text: str


def run_input(run: Run) -> list[Message]:
    """The run's input messages as plain text (escape when rendering: it is untrusted)."""
    items = run.input if isinstance(run.input, list) else [run.input]
    out = []
    for item in items:
        if isinstance(item, dict):
            role = str(item.get("role") or item.get("type") or "item")
            text = selectors._text_of(item.get("content")) or json.dumps(
                item, indent=2, ensure_ascii=False, default=str
            )
        else:
            role, text = "user", str(item)
        out.append(Message(role=role, text=text))
    return out


def thread_get(*, tenant: Tenant, thread_id: Any) -> Thread:
    """Any thread of the tenant, whoever it belongs to (admins read every transcript)."""
    try:
        return (
            Thread.objects.for_tenant(tenant)
            .select_related("agent", "end_user", "end_user__user")
            .get(pk=thread_id)
        )
    except (Thread.DoesNotExist, ValueError, ValidationError):
        raise NotFound("No such conversation.")


# --- The timeline -----------------------------------------------------------------------------


@dataclass
class Value:
    """A long value of a span (tool arguments, tool output): pretty-printed, clipped."""

    label: str
    text: str
    clipped: bool = False


@dataclass
class Step:
    kind: str
    title: str
    start_ms: float
    duration_ms: float
    tone: str = "info"  # info | ok | warn | error: the colour of its bar and badge
    badge: str = ""
    facts: list[tuple[str, str]] = field(default_factory=list)
    values: list[Value] = field(default_factory=list)
    offset_pct: float = 0.0
    width_pct: float = 0.0
    marker: bool = False  # an instant, not an interval


@dataclass
class Timeline:
    steps: list[Step]
    total_ms: float
    model_calls: int = 0
    tool_calls: int = 0
    retries: int = 0  # model calls that failed and were made again, bad tool arguments too
    first_token_ms: float | None = None
    first_output_ms: float | None = None  # the end of the first model call
    raw: str = ""  # the trace as pretty JSON, for the "raw" view


def _num(value: Any) -> float:
    try:
        return max(float(value), 0.0)
    except (TypeError, ValueError):
        return 0.0


def _pretty(value: Any) -> Value:
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            text = value
        else:
            text = (
                json.dumps(parsed, indent=2, ensure_ascii=False)
                if isinstance(parsed, (dict, list))
                else value
            )
    else:
        text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    clipped = len(text) > MAX_VALUE_CHARS
    return Value(label="", text=text[:MAX_VALUE_CHARS] if clipped else text, clipped=clipped)


def _value(label: str, value: Any) -> Value:
    v = _pretty(value)
    v.label = label
    return v


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "…"


def _tokens(span: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("Input tokens", str(span.get("input_tokens", 0))),
        ("Output tokens", str(span.get("output_tokens", 0))),
        ("Total tokens", str(span.get("total_tokens", 0))),
    ]


def _guardrail_label(span: dict[str, Any]) -> str:
    """What a guardrail check was, as the agent editor names it: "Blocked words (input check
    1)" for the span of the first input check (named `input:0:blocked_words` by the runtime)."""
    name, side = str(span.get("name", "")), str(span.get("side", ""))
    parts = name.split(":")
    if len(parts) == 3 and parts[1].isdigit() and parts[2] in GUARDRAIL_LABELS:
        return f"{GUARDRAIL_LABELS[parts[2]]} ({parts[0]} check {int(parts[1]) + 1})"
    return f"{name} ({side})" if side else name


def _step(span: dict[str, Any]) -> Step:
    kind = str(span.get("kind", "span"))
    end = _num(span.get("at_ms"))
    duration = _num(span.get("duration_ms"))
    start = max(end - duration, 0.0)
    s = Step(
        kind=kind, title=kind.replace("_", " ").capitalize(), start_ms=start, duration_ms=duration
    )
    if kind == "model_call":
        model = span.get("model") or ""
        s.title = f"Model call · {model}" if model else "Model call"
        s.badge = f"{span.get('total_tokens', 0)} tokens"
        s.facts = [("Agent", str(span.get("agent", ""))), *_tokens(span)]
    elif kind == "tool_call":
        s.title = f"Tool · {span.get('tool', '')}"
        s.tone = "ok"
        s.facts = [("Agent", str(span.get("agent", "")))]
        s.values = [
            _value("Arguments", span.get("arguments", "")),
            _value("Result", span.get("output", "")),
        ]
    elif kind == "handoff":
        s.title = f"Handoff · {span.get('from_agent', '')} → {span.get('to_agent', '')}"
        s.marker = True
    elif kind == "guardrail":
        tripped = bool(span.get("tripped"))
        s.title = f"Guardrail · {_guardrail_label(span)}"
        s.tone, s.badge = ("warn", "tripped") if tripped else ("ok", "passed")
        if span.get("reason"):
            s.facts = [("Reason", _short(span["reason"]))]
        s.marker = not duration
    elif kind == "mcp_server":
        connected = bool(span.get("connected"))
        s.title = f"MCP server · {span.get('name', '')}"
        s.tone, s.badge = ("ok", "connected") if connected else ("error", "failed")
        s.facts = [("Required", "yes" if span.get("required") else "no, skipped when down")]
        if span.get("agent"):  # a server of an agent handed off to, connected when reached
            s.facts.insert(0, ("Agent", str(span["agent"])))
        if span.get("error"):
            s.facts.append(("Error", _short(span["error"], 500)))
        s.marker = not duration
    elif kind == "agent_call":
        ok = span.get("status") == "success"
        s.title = f"Agent call · {span.get('agent', '')}"
        s.tone, s.badge = ("ok", "answered") if ok else ("error", str(span.get("status", "")))
        usage = span.get("usage") or {}
        if isinstance(usage, dict):
            s.facts = [("Tokens", str(usage.get("total_tokens", 0)))]
        s.marker = not duration
    elif kind == "first_token":
        s.title = "First text streamed to the user"
        s.marker = True
    elif kind == "end":
        status = str(span.get("status", ""))
        s.title = "Ended" if status == "success" else f"Ended · {status}"
        s.tone = "ok" if status == "success" else "error"
        if span.get("message"):
            s.facts = [("Message", _short(span["message"], 1000))]
        s.marker = True
    else:
        # A kind this page does not know yet (e.g. retries): show every field as it is.
        s.tone = "warn" if kind in ("retry", "error") else "info"
        skip = {"kind", "at_ms", "duration_ms"}
        s.facts = [
            (k.replace("_", " ").capitalize(), _short(v)) for k, v in span.items() if k not in skip
        ]
        s.marker = not duration
    return s


def timeline(trace: Any) -> Timeline:
    """The run's spans as steps with start times (ms from the attempt's start) and bar positions
    (percent of the whole run). Spans are recorded when they end: start = end - duration."""
    spans = [s for s in trace if isinstance(s, dict)] if isinstance(trace, list) else []
    steps = sorted((_step(s) for s in spans), key=lambda s: (s.start_ms, s.marker))
    total = max((s.start_ms + s.duration_ms for s in steps), default=0.0)
    for s in steps:
        if total > 0:
            s.offset_pct = round(min(s.start_ms / total * 100, 100.0), 2)
            # A short step still gets a visible sliver.
            width = max(s.duration_ms / total * 100, 0.4) if s.duration_ms else 0.0
            s.width_pct = round(min(width, 100.0 - s.offset_pct), 2)
    model_ends = [_num(s.get("at_ms")) for s in spans if s.get("kind") == "model_call"]
    first_token = next(
        (_num(s.get("at_ms")) for s in spans if s.get("kind") == "first_token"), None
    )
    return Timeline(
        steps=steps,
        total_ms=total,
        model_calls=len(model_ends),
        tool_calls=sum(1 for s in spans if s.get("kind") == "tool_call"),
        retries=sum(1 for s in spans if s.get("kind") == "retry"),
        first_token_ms=first_token,
        first_output_ms=min(model_ends) if model_ends else None,
        raw=json.dumps(spans, indent=2, ensure_ascii=False, default=str) if spans else "",
    )


# --- Live progress of an active run -----------------------------------------------------------


@dataclass
class Progress:
    available: bool = True
    deltas: int = 0
    text_chars: int = 0
    tools_running: list[str] = field(default_factory=list)
    tools_done: list[str] = field(default_factory=list)
    attempt: int | None = None


def run_progress(*, tenant: Tenant, run: Run) -> Progress:
    """What an active run has streamed so far (its Redis Stream): text so far and tool steps.
    `available` is False when the stream cannot be read (Redis down): the page says so."""
    if run.tenant_id != tenant.pk:
        raise NotFound("No such run.")
    try:
        entries = streams.read_sync(run.pk, count=10_000)
    except streams.StreamUnavailable:
        return Progress(available=False)
    progress = Progress()
    running: dict[str, str] = {}
    for _id, event in entries:
        kind = event.get("type")
        if kind == MESSAGE_DELTA:
            progress.deltas += 1
            progress.text_chars += len(str(event.get("text", "")))
        elif kind == TOOL_STARTED:
            running[str(event.get("call_id", ""))] = str(event.get("tool", ""))
        elif kind == TOOL_FINISHED:
            running.pop(str(event.get("call_id", "")), None)
            progress.tools_done.append(str(event.get("tool", "")))
        elif kind == RUN_STATUS and event.get("attempt"):
            progress.attempt = event.get("attempt")
    progress.tools_running = list(running.values())
    return progress

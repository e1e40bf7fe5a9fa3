"""Reads for the end-user chat: a member's threads, a thread's items page by page, its active run.

Every function takes the tenant first and filters on it; threads are also filtered on the end user,
so another member's thread is as invisible as another tenant's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from django.core.exceptions import ValidationError
from django.db import connection
from django.db.models import Count, Exists, Max, OuterRef, Q
from django.db.models.fields.json import KeyTextTransform
from django.utils.safestring import SafeString

from ai_agents.models import Agent, AgentVersion
from controlplane.errors import ValidationFailed
from conversations import markdown
from conversations.models import ACTIVE_STATUSES, EndUser, Item, Run, RunStatus, Thread
from tenants.models import Membership, Tenant

PAGE_SIZE = 50
# Runs that ended without their reply; the history says why (`_with_endings`).
FAILED_STATUSES = (RunStatus.ERROR, RunStatus.TIMEOUT)
# Runs whose reply was cut short (what was said stays): the history says so.
STOPPED_STATUSES = (RunStatus.CANCELLED, RunStatus.INTERRUPTED)


THREAD_PAGE_SIZE = 30  # conversations a page of the chat home lists

# The key of a chat run's metadata that holds the id the chat page gave its message: the history
# carries it on the message (`data-message-id`), so that a page whose connection dropped as it
# sent the message finds out, exactly, whether the server stored it.
CHAT_MESSAGE_ID = "chat_message_id"


@dataclass
class ThreadPage:
    threads: list[Thread]
    next_cursor: str | None  # pass as `before` for the next (older) page


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def keyset_cursor(when: datetime, pk: Any) -> str:
    """A keyset position in a list ordered newest first, just after the row at `when` with key
    `pk`: the time to the exact microsecond (integer arithmetic: a float timestamp can be off by
    one) and the key, which breaks ties."""
    return f"{(when - _EPOCH) // _MICROSECOND}_{pk}"


def parse_keyset_cursor(value: str, *, restart: str) -> tuple[datetime, UUID]:
    """`keyset_cursor`'s inverse; ValidationFailed for anything else (a hand-edited link), with
    `restart` (where to start again) for the `before` field."""
    try:
        micros, _, pk = value.partition("_")
        return _EPOCH + int(micros) * _MICROSECOND, UUID(pk)
    except (ValueError, OverflowError):
        raise ValidationFailed("This page link is not valid.", fields={"before": restart})


def thread_cursor(thread: Thread) -> str:
    """The position just after `thread` in the list (latest activity first)."""
    return keyset_cursor(thread.updated_at, thread.pk)


def _started(tenant: Tenant) -> Q:
    """A thread something happened in: a message was sent (a run, even one not started yet),
    items were saved, or it was given a title. "Start a chat" makes a thread before its first
    message; until then it is not listed, and is opened again rather than made twice."""
    runs = Run.objects.for_tenant(tenant).filter(thread=OuterRef("pk"))
    items = Item.objects.for_tenant(tenant).filter(thread=OuterRef("pk"))
    return ~Q(title="") | Exists(runs) | Exists(items)


def thread_list(
    *,
    tenant: Tenant,
    end_user: EndUser,
    q: str = "",
    before: str = "",
    limit: int = THREAD_PAGE_SIZE,
) -> ThreadPage:
    """The end user's started threads in this tenant (`_started`), latest activity first,
    `limit` at a time after the keyset cursor `before` (`thread_cursor`); `q` filters titles.
    One query. ValidationFailed for a malformed cursor."""
    qs = Thread.objects.for_tenant(tenant).filter(_started(tenant), end_user=end_user)
    q = q.strip()
    if q:
        qs = qs.filter(title__icontains=q)
    if before:
        when, thread_id = parse_keyset_cursor(
            before, restart="Start again from the newest conversations."
        )
        qs = qs.filter(Q(updated_at__lt=when) | Q(updated_at=when, id__lt=thread_id))
    rows = list(qs.select_related("agent").order_by("-updated_at", "-id")[: limit + 1])
    more = len(rows) > limit
    rows = rows[:limit]
    return ThreadPage(threads=rows, next_cursor=thread_cursor(rows[-1]) if more and rows else None)


def thread_unstarted(*, tenant: Tenant, end_user: EndUser, agent_id: Any) -> Thread | None:
    """The end user's newest thread with this published agent that nothing happened in yet
    (not `_started`, so not listed), for "Start a chat" to open again instead of leaving one
    more empty conversation behind. None if there is none (or for a malformed id)."""
    try:
        return (
            Thread.objects.for_tenant(tenant)
            .filter(end_user=end_user, agent_id=agent_id, agent__published_version__isnull=False)
            .exclude(_started(tenant))
            .order_by("-created_at")
            .first()
        )
    except (ValueError, TypeError, ValidationError):  # a malformed id
        return None


def run_active(*, tenant: Tenant, thread: Thread) -> Run | None:
    """The thread's active (pending or running, not queued) run, if any."""
    return (
        Run.objects.for_tenant(tenant)
        .filter(thread=thread, status__in=ACTIVE_STATUSES, queued=False)
        .order_by("-created_at")
        .first()
    )


def run_retryable(*, tenant: Tenant, thread: Thread) -> Run | None:
    """The thread's latest run if it failed: the reply "Try again" can replace
    (`services.run_create(retry_of=...)` refuses any other), with its `side_effects` (it had
    started a tool that may change things, which trying again may repeat). None otherwise."""
    latest = (
        Run.objects.for_tenant(tenant)
        .filter(thread=thread, withdrawn=False)  # a message taken back was never in it
        .order_by("-created_at")
        .only("pk", "status", "side_effects")
        .first()
    )
    return latest if latest is not None and latest.status in FAILED_STATUSES else None


def chat_still_open(
    *, tenant: Tenant, membership: Membership, end_user: EndUser, thread: Thread
) -> tuple[bool, Any, str]:
    """In one query: whether the membership and the end user's thread both still exist, and if
    so the id of the thread's active run (as `run_active`) and the member's role now. A chat
    socket asks this once it has joined its groups, to catch a removal (or a role change) that
    committed before it could hear of it, and again with each message of its client."""
    # Plain SQL: once per chat socket, and the ORM spent more compiling it than PostgreSQL
    # spends answering it.
    # tenant-scope: every table is filtered on the tenant
    with connection.cursor() as cursor:
        cursor.execute(
            _CHAT_STILL_OPEN,
            [
                tenant.pk,
                list(ACTIVE_STATUSES),
                thread.pk,
                tenant.pk,
                end_user.pk,
                membership.pk,
                tenant.pk,
                membership.user_id,
            ],
        )
        row = cursor.fetchone()
    return (True, row[0], row[1]) if row is not None else (False, None, "")


_CHAT_STILL_OPEN = f"""
    SELECT (
        SELECT run.id FROM {Run._meta.db_table} run
        WHERE run.tenant_id = %s AND run.thread_id = thread.id AND run.status = ANY(%s)
          AND NOT run.queued
        ORDER BY run.created_at DESC
        LIMIT 1
    ), membership.role
    FROM {Thread._meta.db_table} thread, {Membership._meta.db_table} membership
    WHERE thread.id = %s AND thread.tenant_id = %s AND thread.end_user_id = %s
      AND membership.id = %s AND membership.tenant_id = %s AND membership.user_id = %s
"""  # noqa: S608 (table names from the models; the values are parameters)


def run_get(*, tenant: Tenant, thread: Thread, run_id: Any) -> Run | None:
    """A run of this thread (None for a malformed id, another thread's or tenant's run)."""
    try:
        return Run.objects.for_tenant(tenant).filter(thread=thread, pk=run_id).first()
    except (ValueError, TypeError, ValidationError):  # a malformed id
        return None


def run_status(*, tenant: Tenant, thread: Thread, run_id: Any) -> str | None:
    """The status of a run of this thread (None if it is not one)."""
    run = run_get(tenant=tenant, thread=thread, run_id=run_id)
    return run.status if run is not None else None


@dataclass
class Entry:
    """One rendered item of the history: a message bubble or a compact step."""

    id: int
    kind: str  # user | assistant | tool_call | tool_output | handoff | other
    html: SafeString | None = None
    title: str = ""
    detail: str = ""
    run_id: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text") or part.get("refusal")
                if isinstance(text, str):
                    parts.append(text)
        return "\n".join(parts)
    return ""


def _pretty(value: Any) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    return json.dumps(value, indent=2, ensure_ascii=False)


def entry_for(item: Item, *, transfers: Transfers | None = None) -> Entry | None:
    """How an item (SDK Responses format) is shown; None for items the user does not see.
    `transfers` tells what each `transfer_to_*` call was (`transfer_kinds`: one it does not name is
    a tool call); without it, such a call is taken for the handoff its name says."""
    data = item.data if isinstance(item.data, dict) else {}
    kind, role = data.get("type"), data.get("role")
    base: dict[str, Any] = {"id": item.pk, "run_id": item.run_id}
    if kind in ("function_call", "function_call_output"):
        # The page skips a replayed tool step it already shows (static/js/chat.js).
        base["extra"] = {"call_id": str(data.get("call_id") or "")}
    if role == "user":
        message_id = getattr(item, "message_id", None)  # read with the item (`_with_message_ids`)
        if message_id:
            base["extra"] = {"message_id": message_id}
        return Entry(kind="user", html=markdown.render_plain(_text_of(data.get("content"))), **base)
    if role == "assistant" and kind in (None, "message"):
        return Entry(
            kind="assistant",
            html=markdown.render_markdown(_text_of(data.get("content"))),
            **base,
        )
    if kind == "function_call":
        name = str(data.get("name", ""))
        if transfers is None:
            was, target = (HANDOFF if _is_transfer(name) else TOOL), None
        else:
            was, target = transfers.get(item.pk, (TOOL, None))
        if was != TOOL:
            target = target or _agent_of_transfer(name)
            if was == IGNORED:
                return Entry(kind="other", title=f"Handoff to {target} not taken", **base)
            base["extra"] = {**base["extra"], "agent": target}
            return Entry(kind="handoff", title=f"Handed off to {target}", **base)
        return Entry(
            kind="tool_call", title=name, detail=_pretty(data.get("arguments", "")), **base
        )
    if kind == "function_call_output":
        return Entry(kind="tool_output", title="Result", detail=_pretty(data.get("output")), **base)
    if role in ("system", "developer") or kind == "reasoning":
        return None
    if isinstance(kind, str) and kind.endswith("_call"):
        # A hosted tool's call (web search, MCP, ...): the page skips its replayed step by its
        # id, as the run's events name it (the SDK's `ToolCallItem.call_id`).
        base["extra"] = {"call_id": str(data.get("call_id") or data.get("id") or "")}
    return Entry(kind="other", title=str(kind or role or "item"), detail=_pretty(data), **base)


# --- Handoffs --------------------------------------------------------------------------------
#
# The SDK saves a handoff as a function call named `transfer_to_<agent>` and a result naming the
# agent (`{"assistant": "<agent name>"}`). A response that asks for several handoffs gets the
# first; each other call is saved with the result below, and nothing else happens. A tool of the
# agent's own (an MCP server's) may also be named `transfer_to_...`, and answer just like a
# handoff. So what such a call was is read from what its run could hand off to
# (`run_handoff_tools`), as the SDK decides it (a handoff of that name wins over a tool) and the
# run's events tell it (`events.EventMapper`): a handoff, an ignored handoff (shown and numbered
# as nothing), or a tool call. Only an item saved outside a run, with no configuration to ask, is
# told by its result.

HANDOFF, IGNORED, TOOL = "handoff", "ignored", "tool_call"
# What the SDK saves as the result of a handoff it did not take (agents.run_internal).
IGNORED_HANDOFF_RESULT = "Multiple handoffs detected, ignoring this one."

# Item pk of a `transfer_to_*` call or of its result -> (what the call was, the agent it named).
Transfers = dict[int, tuple[str, str | None]]
# A run id -> the tool names of the handoffs its agents had (`run_handoff_tools`).
HandoffTools = Callable[[Any], frozenset[str]]


def _is_transfer(name: str) -> bool:
    return name.startswith("transfer_to_")


def handoff_tool_name(agent_name: str) -> str:
    """The name of the tool the SDK gives a handoff to the agent called `agent_name`: what
    `agents.Handoff.default_tool_name` makes of it (without its warning about odd characters)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", re.sub(r"\s", "_", f"transfer_to_{agent_name}")).lower()


def run_handoff_tools(*, tenant: Tenant, run_ids: Collection[Any]) -> HandoffTools:
    """For each of these runs of the tenant, the tool names of the handoffs its agents had: those
    of the agent version that ran, and, as `ai_agents.runtime.build` follows them, those of the
    published versions of the agents it hands off to (and back to the run's agent), under their
    names now; and those of the handoffs its trace recorded, under the names they had then (an
    agent renamed since). Read in one query, at the first question (none if nothing asks); a run of
    another tenant, or none, has none."""
    found: dict[Any, frozenset[str]] | None = None

    def tools_of(run_id: Any) -> frozenset[str]:
        nonlocal found
        if found is None:
            found = _handoff_tools(tenant, list(run_ids))
        return found.get(run_id, frozenset())

    return tools_of


def _handoff_tools(tenant: Tenant, run_ids: list[Any]) -> dict[Any, frozenset[str]]:
    if not run_ids:
        return {}
    names: dict[Any, set[str]] = {}
    # Plain SQL: the handoffs of the agents handed off to are a recursive query.
    # tenant-scope: runs and agents are filtered on the tenant; versions are those they name
    with connection.cursor() as cursor:
        cursor.execute(
            _HANDOFF_AGENTS,
            {"tenant": tenant.pk, "runs": run_ids},
        )
        for run_id, agent_name in cursor.fetchall():
            if isinstance(agent_name, str):
                names.setdefault(run_id, set()).add(handoff_tool_name(agent_name))
    return {run_id: frozenset(tools) for run_id, tools in names.items()}


# `reach`: the agents each run's agent hands off to, those hand off to, and so on, as `build`
# links them: each agent once (UNION ends the recursion at a cycle); the run's own agent, built
# from the run's version, is a handoff target if one of them hands back to it, and its handoffs
# are the run's version's.
_HANDOFF_AGENTS = f"""
    WITH RECURSIVE reach (run_id, root, agent_id) AS (
        SELECT run.id, version.agent_id, (target #>> '{{}}')::uuid
        FROM {Run._meta.db_table} run
        JOIN {AgentVersion._meta.db_table} version
          ON version.id = run.version_id AND version.tenant_id = run.tenant_id
        CROSS JOIN LATERAL jsonb_path_query(version.config, '$.handoffs[*]') target
        WHERE run.tenant_id = %(tenant)s AND run.id = ANY(%(runs)s)
      UNION
        SELECT reach.run_id, reach.root, (target #>> '{{}}')::uuid
        FROM reach
        JOIN {Agent._meta.db_table} agent
          ON agent.id = reach.agent_id AND agent.tenant_id = %(tenant)s
        JOIN {AgentVersion._meta.db_table} version
          ON version.id = agent.published_version_id AND version.tenant_id = agent.tenant_id
        CROSS JOIN LATERAL jsonb_path_query(version.config, '$.handoffs[*]') target
        WHERE reach.agent_id <> reach.root
    )
    SELECT reach.run_id, agent.name
    FROM reach
    JOIN {Agent._meta.db_table} agent
      ON agent.id = reach.agent_id AND agent.tenant_id = %(tenant)s
    WHERE agent.published_version_id IS NOT NULL OR reach.agent_id = reach.root
    UNION
    SELECT run.id, span #>> '{{}}'
    FROM {Run._meta.db_table} run
    CROSS JOIN LATERAL jsonb_path_query(run.trace, '$[*] ? (@.kind == "handoff").to_agent') span
    WHERE run.tenant_id = %(tenant)s AND run.id = ANY(%(runs)s)
"""  # noqa: S608 (table names from the models; the values are parameters)


def _handoff_result(data: dict[str, Any]) -> str | None:
    """The agent a handoff's saved result names (the SDK's `{"assistant": "<agent name>"}`)."""
    if data.get("type") != "function_call_output":
        return None
    output = data.get("output")
    try:
        value = json.loads(output) if isinstance(output, str) else output
    except ValueError:
        return None
    if isinstance(value, dict) and list(value) == ["assistant"]:
        name = value["assistant"]
        return name if isinstance(name, str) and name else None
    return None


def _result_kind(data: dict[str, Any], *, handoff: bool) -> tuple[str, str | None]:
    """What a saved result says its `transfer_to_*` call was, and the agent it names. `handoff`:
    the call is known to be a handoff's; whether it was taken is all its result tells."""
    target = _handoff_result(data)
    if target is not None:
        return HANDOFF, target
    if data.get("output") == IGNORED_HANDOFF_RESULT:
        return IGNORED, None
    return (HANDOFF if handoff else TOOL), None


def transfer_kinds(items: list[Item], *, handoffs: HandoffTools) -> Transfers:
    """What each `transfer_to_*` call among `items` (in id order) was, and each result of one.
    A call is a handoff if its run had a handoff of its name (`handoffs`, from
    `run_handoff_tools`), ignored if its result says so; otherwise a tool call, whatever its
    result. A result belongs to the latest call of its run with its call id that has none yet
    (providers reuse call ids across responses); one whose call is not among `items` is a
    tool's. An item saved outside a run has no configuration to ask: its call is taken for the
    handoff its name says until its result says otherwise, and its result is told by itself."""
    found: Transfers = {}
    # (run, call id) -> (call pk, a handoff's; None: a `transfer_to_*` call outside a run)
    open_calls: dict[tuple[Any, Any], tuple[int, bool | None]] = {}
    for item in items:
        data = item.data if isinstance(item.data, dict) else {}
        kind, key = data.get("type"), (item.run_id, data.get("call_id"))
        if kind == "function_call":
            name = str(data.get("name", ""))
            handoff: bool | None = False
            if _is_transfer(name):
                handoff = None if item.run_id is None else name in handoffs(item.run_id)
                if handoff is not False:
                    found[item.pk] = (HANDOFF, None)
            open_calls[key] = (item.pk, handoff)
        elif kind == "function_call_output":
            call, handoff = open_calls.pop(key, (None, None if item.run_id is None else False))
            if handoff is False:
                continue  # a tool's result
            was = _result_kind(data, handoff=bool(handoff))
            if call is not None:
                found[call] = found[item.pk] = was
            elif was[0] != TOOL:
                found[item.pk] = was
    return found


def _entries(
    items: list[Item],
    *,
    handoffs: HandoffTools,
    before: list[Item] | None = None,
    later: list[Item] | None = None,
) -> list[Entry]:
    """The items as shown. A handoff is one step, named from its result (the call's name is
    lower-cased); an ignored handoff is not shown. `before`: the `transfer_to_*` calls of their
    runs before `items` and those calls' results before `items` (`_earlier_counts`), for a
    result whose call is on an older page; `later`: results after `items` of their
    `transfer_to_*` calls (`_later_results`)."""
    told = transfer_kinds([*(before or []), *items, *(later or [])], handoffs=handoffs)
    shown = []
    for item in items:
        was, _agent = told.get(item.pk, (TOOL, None))
        result = isinstance(item.data, dict) and item.data.get("type") == "function_call_output"
        if was == IGNORED or (was == HANDOFF and result):
            continue  # a handoff's result is its step; an ignored handoff is no step
        entry = entry_for(item, transfers=told)
        if entry is not None:
            shown.append(entry)
    return shown


def _later_results(
    tenant: Tenant, thread: Thread, items: list[Item], handoffs: HandoffTools
) -> list[Item]:
    """The results, saved after `items`, of the handoffs among them whose result they do not
    hold (a page can end between a call and its result). No query without one."""
    told = transfer_kinds(items, handoffs=handoffs)
    waiting = [
        item
        for item in items
        if told.get(item.pk) == (HANDOFF, None)
        and isinstance(item.data, dict)
        and item.data.get("type") == "function_call"
    ]
    return _results_of(tenant, thread, waiting, after=items[-1].pk) if waiting else []


def _results_of(tenant: Tenant, thread: Thread, calls: list[Item], *, after: int) -> list[Item]:
    """The saved results, after item id `after`, of these function calls (by their runs and call
    ids), in id order."""
    return list(
        Item.objects.for_tenant(tenant)
        .filter(
            thread=thread,
            id__gt=after,
            run_id__in={call.run_id for call in calls},
            data__type="function_call_output",
            data__call_id__in=[call.data.get("call_id") for call in calls],
        )
        .order_by("id")
    )


NUMBERED = ("assistant", "handoff", "tool_call")


def _agent_of_transfer(name: str) -> str:
    """The agent a `transfer_to_*` call's name says, when no result names it."""
    return name.removeprefix("transfer_to_").replace("_", " ")


def _speakers(entries: list[Entry], earlier: dict[Any, dict[str, Any]], agent: str) -> None:
    """Each assistant message spoken by another agent than the thread's `agent` (after a
    handoff in its run, here or before these entries) is labelled with it (`extra["agent"]`),
    as the chat page labels a streamed one."""
    speaking: dict[Any, str] = {}
    for entry in entries:
        run = entry.run_id
        if entry.kind == "handoff":
            speaking[run] = entry.extra.get("agent") or agent
        elif entry.kind == "assistant":
            speaker = speaking.get(run, earlier.get(run, {}).get("agent") or agent)
            if speaker != agent:
                entry.extra = {**entry.extra, "agent": speaker}


def _numbered(entries: list[Entry], earlier: dict[Any, dict[str, Any]]) -> list[Entry]:
    """Each assistant message, handoff and tool call gets its place among its run's own of its
    kind (`seq`, from 0), counting the run's items before these (`earlier`): the chat page
    matches a reply's replayed steps with what it shows by it, whatever page of the history it
    shows (static/js/chat.js)."""
    counts: dict[tuple[Any, str], int] = {}
    for entry in entries:
        if entry.run_id is None or entry.kind not in NUMBERED:
            continue
        key = (entry.run_id, entry.kind)
        seq = counts.get(key, earlier.get(entry.run_id, {}).get(entry.kind, 0))
        entry.extra = {**entry.extra, "seq": seq}
        counts[key] = seq + 1
    return entries


def _earlier_counts(
    tenant: Tenant, thread: Thread, rows: list[Item], handoffs: HandoffTools
) -> tuple[dict[Any, dict[str, Any]], list[Item]]:
    """How many assistant messages, handoffs and tool calls each run of `rows` has before
    them, counted as `_entries` shows them; and the runs' `transfer_to_*` calls before them with
    those calls' results before them (what `_entries` needs of an older page)."""
    run_ids = {row.run_id for row in rows if row.run_id is not None}
    if not run_ids:
        return {}, []
    earlier = Item.objects.for_tenant(tenant).filter(
        thread=thread, run_id__in=run_ids, id__lt=rows[0].pk
    )
    transfer = Q(data__type="function_call", data__name__startswith="transfer_to_")
    counted = {
        row["run_id"]: row
        for row in earlier.values("run_id").annotate(
            assistant=Count(
                "id",
                filter=Q(data__role="assistant")
                & (Q(data__type="message") | ~Q(data__has_key="type")),
            ),
            tool_call=Count("id", filter=Q(data__type="function_call") & ~transfer),
            handoff=Count("id", filter=transfer),
        )
    }
    before: list[Item] = []
    if any(row["handoff"] for row in counted.values()):
        # What each earlier `transfer_to_*` call was (a handoff of its run's, taken or not as its
        # result says, wherever that is, or a tool call): a second query, only for the runs
        # that have such calls.
        calls = list(earlier.filter(transfer).order_by("id"))
        results = _results_of(tenant, thread, calls, after=calls[0].pk)
        before = sorted([*calls, *results], key=lambda item: item.pk)
        told = transfer_kinds(before, handoffs=handoffs)
        for call in calls:
            was, agent = told.get(call.pk, (TOOL, None))
            if was != HANDOFF:
                counted[call.run_id]["handoff"] -= 1
                counted[call.run_id]["tool_call"] += int(was == TOOL)
            else:  # who speaks from there on
                name = str(call.data.get("name", ""))
                counted[call.run_id]["agent"] = agent or _agent_of_transfer(name)
        before = [item for item in before if item.pk < rows[0].pk]
    return counted, before


def item_page(
    *, tenant: Tenant, thread: Thread, before: int | None = None, limit: int = PAGE_SIZE
) -> tuple[list[Entry], int | None]:
    """The `limit` items of the thread before item id `before` (the latest without it), oldest
    first, and the id to page further back from (None when this page reaches the start)."""
    qs = _with_message_ids(Item.objects.for_tenant(tenant).filter(thread=thread).order_by("-id"))
    if before is not None:
        qs = qs.filter(id__lt=before)
    rows = list(qs[: limit + 1])
    more = len(rows) > limit
    rows = list(reversed(rows[:limit]))
    return _shown(tenant, thread, rows), (rows[0].pk if more and rows else None)


def _with_message_ids(items: Any) -> Any:
    """The items with the chat page's id of their run's message (`CHAT_MESSAGE_ID`), read in the
    same query (a join on the run's primary key)."""
    return items.annotate(message_id=KeyTextTransform(CHAT_MESSAGE_ID, "run__metadata"))


# The most items the page without its script shows at once (`item_window`).
WINDOW_MAX = PAGE_SIZE * 20


def item_window(
    *, tenant: Tenant, thread: Thread, before: int, limit: int = PAGE_SIZE, most: int = WINDOW_MAX
) -> tuple[list[Entry], int | None, bool]:
    """What the chat page shows after "Load earlier messages" without its script, as the script
    would have added that page above the rest: the `limit` items before id `before`, then the
    thread from `before` on, oldest first, at most `most` items in all (a cursor far back would
    otherwise render the whole thread). Returns the entries, the id to page further back from
    (None when the window reaches the start), and whether the window stops short of the
    latest item (the page then offers the latest). Each step back moves the window `limit`
    items further back, so the start of any thread is reached. Two queries, and `_shown`'s."""
    items = _with_message_ids(Item.objects.for_tenant(tenant).filter(thread=thread))
    older = list(items.filter(id__lt=before).order_by("-id")[: limit + 1])
    more = len(older) > limit
    older = older[:limit]
    room = max(most - len(older), 0)
    newer = list(items.filter(id__gte=before).order_by("id")[: room + 1])
    cut = len(newer) > room
    rows = list(reversed(older)) + newer[:room]
    return _shown(tenant, thread, rows), (rows[0].pk if more and rows else None), cut


def _shown(tenant: Tenant, thread: Thread, rows: list[Item]) -> list[Entry]:
    """`rows` (a run of the thread's items, in id order) as shown, numbered."""
    handoffs = run_handoff_tools(
        tenant=tenant, run_ids={row.run_id for row in rows if row.run_id is not None}
    )
    earlier, before = _earlier_counts(tenant, thread, rows, handoffs)
    later = _later_results(tenant, thread, rows, handoffs)
    entries = _entries(rows, handoffs=handoffs, before=before, later=later)
    _speakers(entries, earlier, thread.agent.name)
    return _with_endings(tenant, thread, _numbered(entries, earlier), rows)


def _with_endings(
    tenant: Tenant, thread: Thread, entries: list[Entry], rows: list[Item]
) -> list[Entry]:
    """After the last item of each run that failed, why (`kind="run_error"`): in `title` as its
    end user is told, in `detail` as the run inspector says it when that says more (for owners
    and admins). After the last item of a run that was stopped or interrupted, that it was
    (`kind="run_stopped"`), so a reply cut short does not read as whole. The chat's status line
    says it as it happens, the history keeps it. On the page that holds the run's last item
    only."""
    run_ids = {entry.run_id for entry in entries if entry.run_id is not None}
    if not run_ids:
        return entries
    ended = {
        run_id: (status, error, told, last_item)
        for run_id, status, error, told, last_item in Run.objects.for_tenant(tenant)
        .filter(thread=thread, pk__in=run_ids, status__in=FAILED_STATUSES + STOPPED_STATUSES)
        .annotate(last_item=Max("items__id"))
        .values_list("pk", "status", "error", "end_user_error", "last_item")
    }
    held = {row.pk for row in rows}
    ending = {run_id for run_id, (*_why, last_item) in ended.items() if last_item in held}
    if not ending:
        return entries
    last = {entry.run_id: i for i, entry in enumerate(entries) if entry.run_id in ending}
    shown: list[Entry] = []
    for i, entry in enumerate(entries):
        shown.append(entry)
        if last.get(entry.run_id) == i:
            status, error, told, _last_item = ended[entry.run_id]
            stopped = status in STOPPED_STATUSES
            if status == RunStatus.INTERRUPTED:
                title = told or "Interrupted by a newer message."
            elif stopped:  # its reason may name who stopped it: for owners and admins only
                title = told or "Stopped."
            else:
                title = told or error or "The agent could not answer."
            detail = error if error and error != title else ""
            kind = "run_stopped" if stopped else "run_error"
            shown.append(Entry(id=0, kind=kind, title=title, detail=detail, run_id=entry.run_id))
    return shown


def pending_inputs(*, tenant: Tenant, thread: Thread) -> list[Entry]:
    """The messages of runs that have not started writing to the thread yet (waiting for a
    worker, or queued behind the active run), oldest first: shown as sent, marked as waiting.
    A run's input becomes items of the thread only when its worker starts it. A message
    stopped while it waited in line is among them, marked stopped (`extra["stopped"]`, as its
    end user is told; `extra["detail"]`, who stopped it, for owners and admins), until the
    reply ahead of it ends and its question joins the thread (`services.run_cancel`)."""
    waiting = (
        Run.objects.for_tenant(tenant)
        .filter(
            Q(status__in=ACTIVE_STATUSES) | Q(status=RunStatus.CANCELLED, queued=True),
            thread=thread,
        )
        .exclude(pk__in=Item.objects.for_tenant(tenant).filter(thread=thread).values("run_id"))
        .order_by("created_at")
        .only("pk", "input", "queued", "status", "error", "end_user_error", "metadata")
    )
    entries = []
    for run in waiting:
        extra: dict[str, Any] = {"waiting": True, "queued": run.queued}
        if run.status == RunStatus.CANCELLED:
            told = run.end_user_error or "Stopped."
            extra = {"stopped": told, "detail": run.error if run.error != told else ""}
        metadata = run.metadata if isinstance(run.metadata, dict) else {}
        if isinstance(metadata.get(CHAT_MESSAGE_ID), str):
            extra["message_id"] = metadata[CHAT_MESSAGE_ID]
        for message in run.input if isinstance(run.input, list) else []:
            if isinstance(message, dict) and message.get("role") == "user":
                text = _text_of(message.get("content"))
                entries.append(
                    Entry(
                        id=0,
                        kind="user",
                        html=markdown.render_plain(text),
                        run_id=run.pk,
                        # `text`: as typed, for "Don't send" to put back in the message box
                        # (the bubble's own text has lost its line breaks to <br>).
                        extra={**extra, "text": text},
                    )
                )
    return entries


def input_text(run: Run) -> str:
    """The text of a run's user message(s), as its end user typed it: what "Don't send" puts
    back in the message box."""
    messages = run.input if isinstance(run.input, list) else []
    return "\n".join(
        _text_of(message.get("content"))
        for message in messages
        if isinstance(message, dict) and message.get("role") == "user"
    )


def item_after(*, tenant: Tenant, thread: Thread, after: int, limit: int = 200) -> list[Entry]:
    """Items newer than id `after`, oldest first (what a finished reply added)."""
    rows = list(
        _with_message_ids(
            Item.objects.for_tenant(tenant).filter(thread=thread, id__gt=after).order_by("id")
        )[:limit]
    )
    return _shown(tenant, thread, rows)

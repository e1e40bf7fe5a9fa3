"""Executing runs (DESIGN.md, "A run, end to end", steps 2-6).

Correctness comes from PostgreSQL, not from the broker: the Celery message only kicks a run.
`claim` takes the run for one *attempt* with a lease; a heartbeat renews the lease; every write
of an attempt (items, status, stream events) is fenced on that attempt, so a superseded attempt
changes nothing; `sweep` re-kicks runs whose lease lapsed (their worker died) or that were never
picked up, and fails with a reason a run that used up its attempts.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache, partial
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction
from django.db.models import Field
from django.utils import timezone

from ai_agents.models import Agent, AgentVersion
from ai_agents.runtime import execute as agent_execute
from ai_agents.runtime import models as agent_models
from ai_agents.runtime.build import build, context_for
from ai_agents.runtime.trace import Trace
from controlplane import rows
from controlplane.errors import NotFound
from controlplane.text import without_nul
from conversations import events as run_events
from conversations import streams
from conversations.models import (
    Item,
    Run,
    RunStatus,
    Thread,
    ThreadStatus,
)
from conversations.selectors import FAILED_STATUSES
from conversations.session import SupersededAttempt, ThreadSession, orm
from tenants.models import Tenant
from usage import services as usage_services

log = logging.getLogger(__name__)


def lease_seconds() -> float:
    return float(getattr(settings, "RUN_LEASE_SECONDS", 30))


def max_attempts() -> int:
    return int(getattr(settings, "RUN_MAX_ATTEMPTS", 3))


def run_timeout() -> float:
    return float(getattr(settings, "RUN_TIMEOUT_SECONDS", 600))


@dataclass(frozen=True)
class Claim:
    run_id: UUID
    tenant_id: UUID
    attempt: int
    owner: str


def _runs(reason: str):  # type: ignore[no-untyped-def]
    # tenant-scope: workers and the sweeper address runs by id; callers give the reason
    return Run.objects.unscoped(reason)


# Lock order: a thread's row, then its runs' rows. `run_create` locks the thread and then looks
# for its active run; whatever ends a run (finish, a stop, a claim that fails the run) locks the
# run's thread before the run, or the two would deadlock when a message arrives as a reply ends.
# The thread's lock is FOR NO KEY UPDATE, which lets items (whose foreign key takes KEY SHARE on
# the thread) go in meanwhile.
_LOCK_THREAD_OF = f"""
    SELECT thread.id FROM {Thread._meta.db_table} thread
    WHERE thread.id = (SELECT run.thread_id FROM {Run._meta.db_table} run WHERE run.id = %s)
      AND (%s::uuid IS NULL OR thread.tenant_id = %s::uuid)
    FOR NO KEY UPDATE OF thread
"""  # noqa: S608 (table names from the models; the values are parameters)


def lock_thread_of(run_id: UUID | str, *, tenant_id: UUID | None = None) -> None:
    """Lock the thread of the run `run_id` (of `tenant_id`'s, if given), as the lock order above
    asks before the run's own row is locked. Inside a transaction."""
    # tenant-scope: the run's own thread; the tenant is checked when the caller names it
    with connection.cursor() as cursor:
        cursor.execute(_LOCK_THREAD_OF, [run_id, tenant_id, tenant_id])


def end_thread(run: Run, status: str) -> UUID | None:
    """Set the thread's status after `run` ended with `status`; promote the next queued run
    (returns its id): on commit it is kicked and announced to the chats open on the thread,
    which follow it. The same statement as `finish` ends the thread with."""
    # tenant-scope: the run's own thread and queued runs (its thread and tenant)
    with connection.cursor() as cursor:
        cursor.execute(
            _end_thread_sql(),
            [run.thread_id, run.tenant_id, *_thread_end_params(status, timezone.now())],
        )
        (following,) = cursor.fetchone()
    if following is not None:
        _announce_promoted(run.thread_id, following)
    return following


def close_stream(run_id: UUID, attempt: int, status: str, message: str) -> None:
    """End a run's event stream from outside its worker (cancel, interrupt, rollback): a newer
    fence shuts the worker's attempt out, then the terminal event is written under it."""
    try:
        if streams.claim_sync(run_id, attempt + 1):
            streams.finish_sync(run_id, attempt + 1, run_events.status(status, message=message))
    except streams.StreamUnavailable:
        log.warning("run %s: could not close its event stream", run_id)


def claim(run_id: UUID | str, *, owner: str) -> Claim | None:
    """Take the run for a new attempt, if it is pending or its lease has lapsed. None otherwise
    (someone holds it, it is queued, or it has ended)."""
    taken = _claim(run_id, owner)
    return None if taken is None else taken[0]


def take(
    run_id: UUID | str, *, owner: str, loop: asyncio.AbstractEventLoop | None = None
) -> tuple[Claim, tuple[Run, Any]] | None:
    """`claim`, and what executing the attempt needs (`execute`'s `loaded`), read with it: the
    run with its tenant and agent version, and the thread's history. With `loop` (the run
    host's), the agent is built here too, for that loop: off the loop, where each database call
    is a hop to a thread and back before the model is called."""
    taken = _claim(run_id, owner)
    if taken is None:
        return None
    held, run = taken
    try:
        ctx = _context(run, held)
        if loop is not None:
            token = agent_models.run_loop.set(loop)  # the run's models share the loop's clients
            try:
                ctx.extra["built"] = build(tenant=run.tenant, version=run.version, trace=ctx.trace)
            except NotFound:
                pass  # `run_version` builds it again, and says what no longer exists
            finally:
                agent_models.run_loop.reset(token)
    except (InterfaceError, OperationalError):
        # The database went away: not this run's fault. The lease lapses and the sweeper (or
        # the next kick) retries it, as after a worker's death.
        raise
    except Exception:
        # The claim is committed: the run ends now, with a reason, rather than staying running
        # until its lease lapses, then failing the same way on every retry.
        log.exception("run %s attempt %s could not start", held.run_id, held.attempt)
        message = "The reply could not start because of an error on our side. It is logged; "
        message += "please try again."
        if finish(held, agent_execute.RunOutcome("error", message=message), run=run):
            close_stream(held.run_id, held.attempt - 1, RunStatus.ERROR, message)
        return None
    return held, (run, ctx)


# A pending run's first attempt, the common case, is taken in one statement: the run's row
# changes only if it is still pending, unqueued and never attempted (checked again once its row
# lock is granted, so two workers cannot both take it), and it comes back with its tenant and
# agent version, as `_claim`'s locked read gives them.
_FIRST_ATTEMPT_PARTS = (
    rows.Columns(Run, "r"),
    rows.Columns(Tenant, "t"),
    rows.Columns(AgentVersion, "v"),
    rows.Columns(Agent, "a"),
)


@cache
def _first_attempt_sql() -> str:
    run, tenant, version, agent = _FIRST_ATTEMPT_PARTS
    return f"""
        UPDATE {Run._meta.db_table} AS r
        SET attempt = 1, status = %s, lease_owner = %s, lease_expires_at = %s,
            started_at = COALESCE(r.started_at, %s)
        FROM {Tenant._meta.db_table} AS t, {AgentVersion._meta.db_table} AS v,
             {Agent._meta.db_table} AS a
        WHERE r.id = %s AND r.status = %s AND NOT r.queued AND r.attempt = 0
          AND t.id = r.tenant_id AND v.id = r.version_id AND a.id = v.agent_id
        RETURNING {run.sql}, {tenant.sql}, {version.sql}, {agent.sql}
    """  # noqa: S608 (table and column names from the models; the values are parameters)


def _take_first_attempt(run_id: UUID | str, owner: str) -> Run | None:
    now = timezone.now()
    until = now + timedelta(seconds=lease_seconds())
    # tenant-scope: a worker is handed a run id; the run row tells it the tenant
    with connection.cursor() as cursor:
        cursor.execute(
            _first_attempt_sql(), [RunStatus.RUNNING, owner, until, now, run_id, RunStatus.PENDING]
        )
        row = cursor.fetchone()
    if row is None:
        return None
    run, tenant, version, agent = rows.split(row, *_FIRST_ATTEMPT_PARTS)
    version.agent = agent
    run.tenant, run.version = tenant, version
    return run


def _claim(run_id: UUID | str, owner: str) -> tuple[Claim, Run] | None:
    if max_attempts() >= 1:
        run = _take_first_attempt(run_id, owner)
        if run is not None:
            return Claim(run_id=run.pk, tenant_id=run.tenant_id, attempt=1, owner=owner), run
    # Anything else (a lapsed lease, a run out of attempts, one taken or ended): the general
    # path, with the run's row locked while it decides.
    with transaction.atomic():
        lock_thread_of(run_id)  # the thread first (see `_LOCK_THREAD_OF`)
        # tenant-scope: a worker is handed a run id; the run row tells it the tenant
        locked = (
            _runs("a worker claims a run by id")
            .select_for_update(of=("self",))  # the run's row only
            .select_related("tenant", "version__agent")
            .filter(pk=run_id)[:1]  # not .first(): no ORDER BY to build for one row by its key
        )
        run = next(iter(locked), None)
        if run is None or run.queued:
            return None
        now = timezone.now()
        lapsed = run.status == RunStatus.RUNNING and (
            run.lease_expires_at is None or run.lease_expires_at <= now
        )
        if run.status != RunStatus.PENDING and not lapsed:
            return None
        if run.attempt >= max_attempts() or (lapsed and run.side_effects):
            _close_dangling_calls(run)
            run.status, run.finished_at = RunStatus.ERROR, now
            run.error = (
                "The reply was stopped: its worker disappeared after a tool that may change "
                "things had started, and repeating it could do that twice."
                if run.side_effects
                else f"The run was stopped after {run.attempt} attempts: each one ended "
                "before it could finish (its worker stopped, or lost the database). Please "
                "try again."
            )
            run.lease_owner, run.lease_expires_at = "", None
            run.save(
                update_fields=["status", "finished_at", "error", "lease_owner", "lease_expires_at"]
            )
            # The question first: ending the thread stores the questions stopped in line behind
            # this run, after it.
            keep_the_question(run.pk, now)
            end_thread(run, RunStatus.ERROR)
            # Readers following the run's stream see it end now, with the reason.
            failed_id, failed_attempt, reason = run.pk, run.attempt, run.error
            transaction.on_commit(
                lambda: close_stream(failed_id, failed_attempt, RunStatus.ERROR, reason)
            )
            return None
        if run.attempt:
            # A retry starts the run over from its input: what an earlier attempt stored (its
            # input, tool calls, maybe its whole reply before its worker died) goes, so the
            # thread never holds two replies, or two copies of the question, for one run.
            Item.objects.filter(tenant_id=run.tenant_id, run=run).delete()
        run.attempt += 1
        run.status = RunStatus.RUNNING
        run.lease_owner = owner
        run.lease_expires_at = now + timedelta(seconds=lease_seconds())
        run.started_at = run.started_at or now
        run.save(
            update_fields=["attempt", "status", "lease_owner", "lease_expires_at", "started_at"]
        )
        held = Claim(run_id=run.pk, tenant_id=run.tenant_id, attempt=run.attempt, owner=owner)
        return held, run


@cache
def _keep_the_question_sql(fenced: bool) -> str:
    fence = " AND run.attempt = %s AND run.status = %s" if fenced else ""
    return f"""
        INSERT INTO {Item._meta.db_table} (tenant_id, thread_id, run_id, data, created_at)
        SELECT run.tenant_id, run.thread_id, run.id, item.data, %s
        FROM {Run._meta.db_table} run
        CROSS JOIN LATERAL jsonb_array_elements(run.input) WITH ORDINALITY AS item (data, position)
        WHERE run.id = %s{fence}
          AND NOT EXISTS (SELECT 1 FROM {Item._meta.db_table} saved WHERE saved.run_id = run.id)
        ORDER BY item.position
    """  # noqa: S608 (table names from the models; the values are parameters)


def keep_the_question(run_id: UUID, now: datetime, held: Claim | None = None) -> None:
    """A run that failed before it saved anything (it could not start, its agent could not be
    built, every attempt's worker died first) keeps its input in the conversation, as its
    worker would have saved it: the history shows the question and why it got no reply, and a
    reload never makes a message vanish. A run that saved anything is left as it is. With
    `held`, only while that attempt owns the run (still running)."""
    params: list[Any] = [now, run_id]
    if held is not None:
        params += [held.attempt, RunStatus.RUNNING]
    # tenant-scope: the run carries its tenant and thread; the items are written for them
    with connection.cursor() as cursor:
        cursor.execute(_keep_the_question_sql(held is not None), params)


def _close_dangling_calls(run: Run) -> None:
    """A run that fails after its worker died may have stored a tool call whose output never
    came. Model providers refuse a history with such a call, so the thread would be stuck:
    answer each one, saying what happened."""
    items = list(Item.objects.filter(tenant_id=run.tenant_id, run=run).order_by("id"))
    answered = {
        item.data.get("call_id")
        for item in items
        if isinstance(item.data, dict) and item.data.get("type") == "function_call_output"
    }
    lost = [
        item.data["call_id"]
        for item in items
        if isinstance(item.data, dict)
        and item.data.get("type") == "function_call"
        and item.data.get("call_id")
        and item.data["call_id"] not in answered
    ]
    # tenant-scope: every new row carries the run's tenant (set below)
    Item.objects.bulk_create(
        [
            Item(
                tenant_id=run.tenant_id,
                thread_id=run.thread_id,
                run=run,
                data={
                    "type": "function_call_output",
                    "call_id": call_id,
                    "output": "No result: the worker running this tool stopped before it "
                    "answered, and the reply was ended.",
                },
            )
            for call_id in lost
        ]
    )


def keep_what_was_said(run: Run) -> None:
    """`run` is ending from outside (interrupted by a newer message, or stopped), its row locked:
    the thread keeps what its readers saw. Its input, if it never started (its attempt stores
    it), and the text of the turn in progress, which no item holds yet (a turn's items are
    stored when the turn ends), as an incomplete assistant message. The text comes from the
    latest attempt's events, read under the row locks so that nothing streamed before the fence
    is missed (milliseconds; when Redis is away, bounded by the stream client's timeouts, and
    only the input is kept)."""
    stored = list(Item.objects.filter(tenant_id=run.tenant_id, run=run).order_by("id"))
    keep: list[dict[str, Any]] = [] if stored else [dict(item) for item in run.input or []]
    if run.attempt:
        try:
            entries, whole = streams.read_latest_attempt_sync(run.pk)
        except streams.StreamUnavailable:
            entries, whole = [], True
        said = _unsaved_text(
            [event for _id, event in entries], [item.data for item in stored], whole=whole
        )
        if said:
            keep.append(
                {
                    "type": "message",
                    "role": "assistant",
                    "status": "incomplete",
                    "content": [{"type": "output_text", "text": said, "annotations": []}],
                }
            )
    # tenant-scope: every new row carries the run's tenant (set below)
    Item.objects.bulk_create(
        [
            Item(tenant_id=run.tenant_id, thread_id=run.thread_id, run=run, data=without_nul(d))
            for d in keep
        ]
    )


def _assistant_text(data: Any) -> str | None:
    if not isinstance(data, dict) or data.get("role") != "assistant":
        return None
    content = data.get("content")
    return (
        content
        if isinstance(content, str)
        else "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))
    )


# The item a tool event's call id is stored with.
_STORED_AS = {
    run_events.TOOL_STARTED: "function_call",
    run_events.TOOL_FINISHED: "function_call_output",
}


def _unsaved_text(events: list[dict[str, Any]], stored: list[Any], *, whole: bool = True) -> str:
    """What the latest attempt's readers saw that its `stored` items (their data, in order) do
    not hold: its later whole messages and the text still being written (with `model.retry`'s
    discards applied, as readers apply them). `whole`: the events start at the attempt's start,
    so the n-th message is the n-th stored one. If not (a stream trimmed to its length cap), the
    latest tool call or result the events show and the items hold anchors them, if its call id
    is the only one of its kind on both sides (a provider may reuse ids across turns); with none
    in sight, the longest run of the stored messages' texts that the events' first messages
    repeat is taken to be those messages."""
    saved: list[str] = []
    # Each stored call or result: the messages stored before it; None if its id is not unique.
    saved_before: dict[tuple[Any, Any], int | None] = {}
    for data in stored:
        if (text := _assistant_text(data)) is not None:
            saved.append(text.strip())
        elif isinstance(data, dict) and data.get("call_id"):
            key = (data.get("type"), data.get("call_id"))
            saved_before[key] = None if key in saved_before else len(saved)
    event_keys: Counter[tuple[Any, Any]] = Counter(
        (_STORED_AS[str(event["type"])], event.get("call_id"))
        for event in events
        if event.get("type") in _STORED_AS
    )
    messages: list[str] = []
    partial = ""
    anchor: tuple[int, int] | None = None  # (messages seen, messages stored) at the anchor
    for event in events:
        kind = event.get("type")
        if kind == run_events.RUN_STATUS and event.get("status") == RunStatus.RUNNING:
            messages, partial, anchor = [], "", None  # a new attempt starts the reply over
        elif kind == run_events.MESSAGE_DELTA:
            partial += str(event.get("text", ""))
        elif kind == run_events.MESSAGE_COMPLETED:
            messages.append(str(event.get("text", "")))
            partial = ""
        elif kind in (run_events.TOOL_STARTED, run_events.TOOL_FINISHED, run_events.HANDOFF):
            partial = ""
            key = (_STORED_AS.get(str(kind)), event.get("call_id"))
            if (before := saved_before.get(key)) is not None and event_keys[key] == 1:
                anchor = (len(messages), before)
        elif kind == run_events.MODEL_RETRY and event.get("discard"):
            partial = ""
    if whole:
        unsaved = messages[len(saved) :]
    elif anchor is not None:
        seen, held = anchor
        unsaved = messages[seen:][len(saved) - held :]
    else:
        overlap = next(
            n
            for n in range(min(len(saved), len(messages)), -1, -1)
            if [text.strip() for text in messages[:n]] == saved[len(saved) - n :]
        )
        unsaved = messages[overlap:]
    said = [*unsaved, partial]
    return "\n\n".join(text.strip() for text in said if text.strip())


def renew(claims: list[Claim]) -> list[Claim]:
    """Extend the leases of `claims`; returns the ones that were lost (superseded, ended or
    released). One statement however many runs the worker holds (the heartbeat beats every few
    seconds)."""
    return _set_leases(claims, timezone.now() + timedelta(seconds=lease_seconds()), keep=True)


def release(claims: list[Claim]) -> list[Claim]:
    """End the leases of `claims` now and kick their runs, so that another worker takes them
    over at once (a worker shutting down). Returns the claims that were still held. The lease
    loses its owner too: a renewal still in flight cannot extend it again."""
    lost = _set_leases(claims, timezone.now(), keep=False)
    released = [held for held in claims if held not in lost]
    for held in released:
        kick(held.run_id)
    return released


def _set_leases(claims: list[Claim], until: datetime, *, keep: bool) -> list[Claim]:
    """Set the leases of the runs `claims` still hold (same attempt, same owner) to end at
    `until`, keeping their owner or not; the lost claims."""
    if not claims:
        return []
    # tenant-scope: the heartbeat renews the leases this worker holds, by run id and attempt
    with connection.cursor() as cursor:
        cursor.execute(
            """
            UPDATE conversations_run
            SET lease_expires_at = %s, lease_owner = CASE WHEN %s THEN lease_owner ELSE '' END
            WHERE status = %s
              AND (id, attempt, lease_owner) IN (
                SELECT * FROM unnest(%s::uuid[], %s::integer[], %s::varchar[]))
            RETURNING id, attempt
            """,
            [
                until,
                keep,
                RunStatus.RUNNING,
                [held.run_id for held in claims],
                [held.attempt for held in claims],
                [held.owner for held in claims],
            ],
        )
        kept = {(UUID(str(run_id)), attempt) for run_id, attempt in cursor.fetchall()}
    return [held for held in claims if (UUID(str(held.run_id)), held.attempt) not in kept]


def has_side_effects(tool: Any) -> bool:
    """Built-in tools say whether they change anything; any other tool (MCP) is assumed to."""
    from ai_agents.tools import changes_nothing

    return not changes_nothing(tool)


def mark_side_effects(held: Claim) -> None:
    """Record, before a tool that may change things starts, that the run must not be repeated.
    SupersededAttempt if `held` no longer owns the run (stopped, interrupted, or taken over by
    a newer attempt): the tool must not start."""
    # tenant-scope: the claim carries the run id; the attempt fences the write
    marked = (
        _runs("recording a side effect of a claimed run")
        .filter(pk=held.run_id, attempt=held.attempt, status=RunStatus.RUNNING)
        .update(side_effects=True)
    )
    if not marked:
        raise SupersededAttempt(f"attempt {held.attempt} of run {held.run_id} is superseded")


def record_stopped_usage(held: Claim, spans: list[dict[str, Any]]) -> bool:
    """The attempt `held` was stopped from outside (its run cancelled or interrupted), so its
    outcome is fenced out; what it did until then is still the run's: its trace (the run
    inspector's timeline) is saved, and the model calls it completed count: their usage is
    stored and the run's tokens and cost set, as `finish` would have. Nothing for a run taken
    over by a newer attempt (which counts its own), or still running (a worker shutting down).
    Returns whether anything was recorded. Call once per attempt."""
    if not spans:
        return False
    usage = Trace(spans=spans).usage()
    with transaction.atomic():
        # tenant-scope: the claim carries the run id; the attempt and status select the case
        run = (
            _runs("recording a stopped attempt's usage")
            .select_for_update(of=("self",))
            .select_related("tenant", "version__agent")
            .filter(
                pk=held.run_id,
                attempt=held.attempt,
                status__in=(RunStatus.CANCELLED, RunStatus.INTERRUPTED),
            )
            .first()
        )
        if run is None:
            return False
        # Ended as the run did, when the attempt last did something (an outcome the attempt
        # reached too late to save had its own end).
        done = [span for span in spans if span.get("kind") != "end"]
        last_ms = max((float(span.get("at_ms") or 0) for span in spans), default=0.0)
        end = {"kind": "end", "at_ms": last_ms, "status": run.status, "message": run.error}
        run.trace = [*without_nul(done), end]
        if not usage.get("requests"):
            run.save(update_fields=["trace"])
            return True
        records = usage_services.price_run(run, run.trace)
        run.input_tokens = usage.get("input_tokens", 0)
        run.output_tokens = usage.get("output_tokens", 0)
        run.total_tokens = usage.get("total_tokens", 0)
        run.save(
            update_fields=[
                "trace",
                "input_tokens",
                "output_tokens",
                "total_tokens",
                "cost",
                "unpriced_tokens",
            ]
        )
        usage_services.save_run_usage(run.tenant, records)
    return True


def _status_of(outcome: agent_execute.RunOutcome) -> str:
    return RunStatus.SUCCESS if outcome.status == "success" else RunStatus.ERROR


def finish(
    held: Claim,
    outcome: agent_execute.RunOutcome,
    *,
    status: str | None = None,
    run: Run | None = None,
) -> bool:
    """Write the outcome if `held` still owns the run. Returns False for a superseded attempt
    (nothing is written). The next queued run, if any, is promoted and kicked on commit.
    `run`: the run as the attempt read it (`take`), with its tenant and agent version; else it
    is read here."""
    final = status or _status_of(outcome)
    if run is None:
        # tenant-scope: the claim carries the run id; the statement below fences the write
        run = (
            _runs("finishing a claimed run")
            .select_related("tenant", "version__agent")
            .get(pk=held.run_id)
        )
    usage = outcome.usage or {}
    run.status = final
    # What models and tools produced may hold NULs, which PostgreSQL cannot store.
    run.output = without_nul(outcome.output) if final == RunStatus.SUCCESS else None
    run.error = "" if final == RunStatus.SUCCESS else without_nul(outcome.message)
    run.end_user_error = "" if final == RunStatus.SUCCESS else without_nul(outcome.told)
    run.trace = without_nul(outcome.trace)
    run.input_tokens = usage.get("input_tokens", 0)
    run.output_tokens = usage.get("output_tokens", 0)
    run.total_tokens = usage.get("total_tokens", 0)
    run.finished_at = now = timezone.now()
    run.lease_owner, run.lease_expires_at = "", None
    records = usage_services.price_run(run, outcome.trace)  # sets the cost; writes nothing
    with transaction.atomic():
        if final in FAILED_STATUSES:
            # The question first (if this attempt still owns the run): the outcome's statement
            # stores the questions stopped in line behind this run, after it. The thread's lock,
            # taken first as everywhere, keeps the run as it is until the outcome is written.
            lock_thread_of(held.run_id)
            keep_the_question(run.pk, now, held=held)
        fenced, following = _write_outcome(held, run, now)
        if not fenced:
            return False
        # usage and cost land with the outcome
        usage_services.save_run_usage(run.tenant, records)
        if following is not None:
            _announce_promoted(run.thread_id, following)
    return True


_OUTCOME_FIELDS = (
    "status",
    "output",
    "error",
    "end_user_error",
    "trace",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cost",
    "unpriced_tokens",
    "finished_at",
    "lease_owner",
    "lease_expires_at",
)


def _run_field(name: str) -> Field[Any, Any]:
    field = Run._meta.get_field(name)
    assert isinstance(field, Field)
    return field


def _stopped_in_line_sql() -> str:
    """Two CTEs after `ended` (the thread whose active run ended: thread_id, tenant_id) and
    `following` (the next run in line, pending and queued: its created_at; or nothing): the
    runs stopped while they waited in line ahead of it (cancelled, still `queued`) leave the
    line, and their input joins the thread, in the order they were sent. Their turn has come:
    their question goes after the reply they waited for, where the chat showed it, and not
    before the end of that reply, which was still being written when they were stopped.
    Leaving the line in the same statement writes each question once. Parameters: the
    cancelled status, then the items' creation time."""
    run, item = Run._meta.db_table, Item._meta.db_table
    return f"""
        stopped AS (
            UPDATE {run} AS stopped SET queued = false
            FROM ended
            WHERE stopped.thread_id = ended.thread_id AND stopped.tenant_id = ended.tenant_id
              AND stopped.queued AND stopped.status = %s
              AND NOT EXISTS (
                  SELECT 1 FROM following WHERE following.created_at < stopped.created_at
              )
            RETURNING stopped.id, stopped.tenant_id, stopped.thread_id, stopped.input,
                      stopped.created_at
        ), kept AS (
            INSERT INTO {item} (tenant_id, thread_id, run_id, data, created_at)
            SELECT stopped.tenant_id, stopped.thread_id, stopped.id, question.data, %s
            FROM stopped
            CROSS JOIN LATERAL jsonb_array_elements(stopped.input)
                WITH ORDINALITY AS question (data, position)
            ORDER BY stopped.created_at, question.position
        )
    """  # noqa: S608 (table names from the models; the values are parameters)


def _thread_end_sql(ended: str, result: str) -> str:
    """A statement that ends a thread's run: `ended`, a CTE that gives the ended run's
    (thread_id, tenant_id) or nothing, then the thread's next queued run promoted (its row
    locked), the thread's status set, and the questions stopped in line ahead of it kept
    (`_stopped_in_line_sql`); `result` selects what comes back. Parameters: those of `ended`,
    then `_thread_end_params`."""
    run, thread = Run._meta.db_table, Thread._meta.db_table
    return f"""
        WITH {ended}, following AS (
            SELECT queue.id, queue.created_at FROM {run} AS queue, ended
            WHERE queue.thread_id = ended.thread_id AND queue.tenant_id = ended.tenant_id
              AND queue.queued AND queue.status = %s
            ORDER BY queue.created_at LIMIT 1
            FOR UPDATE OF queue
        ), promoted AS (
            UPDATE {run} AS queue SET queued = false FROM following
            WHERE queue.id = following.id
            RETURNING queue.id
        ), thread AS (
            UPDATE {thread} AS t
            SET status = CASE WHEN EXISTS (SELECT 1 FROM promoted) THEN %s ELSE %s END,
                updated_at = %s
            FROM ended
            WHERE t.id = ended.thread_id AND t.tenant_id = ended.tenant_id
        ), {_stopped_in_line_sql()}
        {result}
    """  # noqa: S608 (table names from the models and fixed SQL; the values are parameters)


def _thread_end_params(run_status: str, now: datetime) -> list[Any]:
    return [
        RunStatus.PENDING,
        ThreadStatus.BUSY,
        _thread_status(run_status),
        now,
        RunStatus.CANCELLED,
        now,
    ]


@cache
def _keep_stopped_in_line_sql() -> str:
    return f"""
        WITH ended AS (SELECT %s::uuid AS thread_id, %s::uuid AS tenant_id), following AS (
            SELECT queue.created_at FROM {Run._meta.db_table} AS queue, ended
            WHERE queue.thread_id = ended.thread_id AND queue.tenant_id = ended.tenant_id
              AND queue.queued AND queue.status = %s
            ORDER BY queue.created_at LIMIT 1
        ), {_stopped_in_line_sql()}
        SELECT 1
    """  # noqa: S608 (table names from the models and fixed SQL; the values are parameters)


def keep_stopped_in_line(*, tenant_id: UUID, thread_id: UUID, now: datetime) -> None:
    """The thread's active run ended other than through `finish` or `end_thread` (a newer
    message interrupted or replaced it): the questions stopped while they waited in line ahead
    of the next run in line join the thread, as those two do it (`_stopped_in_line_sql`). Inside
    the transaction that holds the thread's lock."""
    # tenant-scope: the statement names the tenant with the thread
    with connection.cursor() as cursor:
        cursor.execute(
            _keep_stopped_in_line_sql(),
            [thread_id, tenant_id, RunStatus.PENDING, RunStatus.CANCELLED, now],
        )


@cache
def _end_thread_sql() -> str:
    return _thread_end_sql(
        "ended AS (SELECT %s::uuid AS thread_id, %s::uuid AS tenant_id)",
        "SELECT (SELECT id FROM promoted)",
    )


@cache
def _outcome_sql() -> str:
    columns = ", ".join(f"{_run_field(name).column} = %s" for name in _OUTCOME_FIELDS)
    # The thread is locked first (`_LOCK_THREAD_OF`): the run's update waits for `thread_first`,
    # an uncorrelated condition that PostgreSQL evaluates before it touches the run's row. It
    # does not wait for the lock: a statement that waited would go on with what it read when
    # it began, blind to a message queued or stopped in line meanwhile, which would then stay
    # in line for good. When another holds the thread, nothing is written and `_write_outcome`
    # waits for the lock in a statement of its own, then runs this one again.
    ended = f"""thread_first AS ({_LOCK_THREAD_OF} SKIP LOCKED), ended AS (
            UPDATE {Run._meta.db_table} SET {columns}
            WHERE id = %s AND attempt = %s AND status = %s
              AND EXISTS (SELECT 1 FROM thread_first)
            RETURNING thread_id, tenant_id
        )"""  # noqa: S608 (table and column names from the models; the values are parameters)
    return _thread_end_sql(
        ended,
        "SELECT (SELECT count(*) FROM ended), (SELECT id FROM promoted),"
        " (SELECT count(*) FROM thread_first)",
    )


def _write_outcome(held: Claim, run: Run, now: datetime) -> tuple[bool, UUID | None]:
    """One statement: the outcome written if `held` still owns the run (its attempt, still
    running: the fence, checked once the row is locked), then the thread ended as `end_thread`
    ends it, at `now` (three when another holds the thread's lock). Inside a transaction.
    Returns (written, promoted run id)."""
    values = [
        _run_field(name).get_db_prep_save(getattr(run, name), connection)
        for name in _OUTCOME_FIELDS
    ]
    params = [
        held.run_id,
        None,
        None,
        *values,
        held.run_id,
        held.attempt,
        RunStatus.RUNNING,
        *_thread_end_params(run.status, now),
    ]
    # tenant-scope: the claim carries the run id; the attempt fences the write, and the thread
    # and queued run it touches are the run's own (same thread and tenant)
    with connection.cursor() as cursor:
        cursor.execute(_outcome_sql(), params)
        fenced, following, locked = cursor.fetchone()
        if not locked:
            # Another holds the thread (a message arriving, a stop): wait for it here, then
            # the statement reads the runs as they are once it is free.
            lock_thread_of(held.run_id)
            cursor.execute(_outcome_sql(), params)
            fenced, following, locked = cursor.fetchone()
    return bool(fenced), following


def _thread_status(run_status: str) -> str:
    return {
        RunStatus.SUCCESS: ThreadStatus.IDLE,
        RunStatus.CANCELLED: ThreadStatus.IDLE,
        RunStatus.INTERRUPTED: ThreadStatus.INTERRUPTED,
    }.get(RunStatus(run_status), ThreadStatus.ERROR)


def _announce_promoted(thread_id: UUID, following: UUID) -> None:
    """On commit: kick the promoted run and tell the chats open on the thread, which follow it."""
    transaction.on_commit(partial(kick, following))
    transaction.on_commit(partial(streams.announce_run, thread_id, following))


def _context(run: Run, held: Claim | None = None) -> Any:
    """The run's context; with `held`, also the thread's history window read now (off the event
    loop, where each database call is a hop to a thread and back before the model is called)."""
    ctx = context_for(
        tenant=run.tenant,
        version=run.version,
        thread_id=run.thread_id,
        end_user_id=str(run.end_user_id),
    )
    if held is not None:
        ctx.extra["history"] = _session(held, run).history()
    return ctx


def _session(
    held: Claim, run: Run, prefetched: list[Any] | None = None, first_write_behind: bool = False
) -> ThreadSession:
    return ThreadSession(
        tenant_id=held.tenant_id,
        thread_id=run.thread_id,
        run_id=held.run_id,
        attempt=held.attempt,
        limit=getattr(settings, "THREAD_HISTORY_WINDOW", 100),
        prefetched=prefetched,
        first_write_behind=first_write_behind,
    )


def _load(held: Claim) -> tuple[Run, Any]:
    run = (
        Run.objects.filter(tenant_id=held.tenant_id, pk=held.run_id)
        .select_related("tenant", "version__agent")
        .get()
    )
    return run, _context(run)


async def execute(
    held: Claim,
    loaded: tuple[Run, Any] | None = None,
    *,
    concluding: Callable[[], None] | None = None,
) -> str:
    """Run one attempt to its end (`loaded`: the run and its context as `take` read them, else
    they are read here). Returns the final status ("superseded" if the attempt lost the run on
    the way: then it wrote nothing more). `concluding` is called when the agent is done and the
    outcome is about to be written: the lease no longer needs renewing."""
    run, ctx = loaded if loaded is not None else await orm(_load)(held)
    # Queued like every event, not awaited: its append raises the stream's fence to this
    # attempt (emptying an earlier attempt's events), as `streams.claim` would, without a round
    # trip before the model is called. If Redis is away, the writer logs it and the run goes on.
    streams.append_later(
        held.run_id, held.attempt, [run_events.status(RunStatus.RUNNING, attempt=held.attempt)]
    )
    mapper = run_events.EventMapper(run.version.agent.name)  # follows handoffs and tool names
    events = streams.Coalescer(held.run_id, held.attempt)

    async def before_tool(tool: Any) -> None:
        # Runs before the tool does (a trace hook), so a worker that dies inside the tool has
        # already recorded that the run must not be repeated. Every such call is fenced, each
        # one waiting for its own mark: a run stopped or taken over while the model answered
        # starts no tool that changes things.
        if has_side_effects(tool):
            await orm(mark_side_effects)(held)

    ctx.extra["before_tool"] = before_tool

    async def on_event(event: Any) -> None:
        mapped = mapper.map(event)
        for e in mapped:  # the first text the user keeps, for the run inspector
            kind = e["type"]
            if kind == run_events.MESSAGE_DELTA and not ctx.extra.get("first_token"):
                ctx.extra["first_token"] = ctx.trace.add("first_token")
            elif kind == run_events.MESSAGE_COMPLETED:
                ctx.extra["text_kept"] = True
            elif kind == run_events.MODEL_RETRY and e["discard"] and not ctx.extra.get("text_kept"):
                # The text streamed so far is written again: it was not the first text.
                mark = ctx.extra.pop("first_token", None)
                if mark is not None:
                    ctx.trace.spans.remove(mark)
        # Queued, not awaited: the run reads its next token while this one is written. Events
        # that cannot be written are lost; readers fall back to PostgreSQL for the reply.
        events.put(mapped)

    # The run's input is saved while its model call goes out (`first_write_behind`); the
    # outcome is written only once that write is done (`settle`, here and below).
    session = _session(
        held, run, prefetched=ctx.extra.pop("history", None), first_write_behind=True
    )
    status: str | None = None
    try:
        outcome = await asyncio.wait_for(
            agent_execute.run_version(
                tenant=run.tenant,
                version=run.version,
                input=run.input,
                context=ctx,
                on_event=on_event,
                session=session,
                built=ctx.extra.pop("built", None),
            ),
            timeout=run_timeout(),
        )
        await session.settle()  # a write refused to a superseded attempt is raised here
    except SupersededAttempt:
        await _count_stopped(held, ctx)
        return "superseded"
    except asyncio.CancelledError:  # its lease was lost: stopped, or the process shuts down
        await _count_stopped(held, ctx)
        raise
    except (InterfaceError, OperationalError):
        # PostgreSQL went away for a moment: this attempt stops here and writes nothing more;
        # its lease lapses and the sweeper runs the run again on a healthy connection.
        log.warning("run %s attempt %s: database error", held.run_id, held.attempt)
        raise
    except TimeoutError:
        status = RunStatus.TIMEOUT
        outcome = agent_execute.RunOutcome(
            "error",
            message=f"The reply took longer than {run_timeout():g} seconds and was stopped.",
            trace=ctx.trace.spans,
            usage=ctx.trace.usage(),
        )
    except Exception:
        # A bug, or a failure the agent runtime does not explain: the run
        # still ends, with a reason, instead of waiting for its lease to lapse and be retried.
        log.exception("run %s attempt %s failed unexpectedly", held.run_id, held.attempt)
        ctx.trace.add("end", status="error", message="unexpected failure")
        outcome = agent_execute.RunOutcome(
            "error",
            message="The reply failed because of an error on our side. It is logged; "
            "please try again.",
            trace=ctx.trace.spans,
            usage=ctx.trace.usage(),
        )
    finally:
        # Whatever ended the attempt, its input's write is done before anything else is written
        # (a failure's outcome keeps the question only if the run saved none).
        await session.settle(quiet=True)
        events.flush()  # merged text still held goes before the run's last events
    if concluding is not None:
        concluding()
    # Shielded: a heartbeat that renews leases after `finish` committed finds the run ended and
    # would stop the attempt, as it stops one that lost its lease; the outcome is written by
    # then, and its readers must still get the stream's last events.
    return await asyncio.shield(_conclude(held, outcome, status or _status_of(outcome), run))


async def _count_stopped(held: Claim, ctx: Any, spans: list[dict[str, Any]] | None = None) -> None:
    """`record_stopped_usage` for an attempt that lost its run, shielded from a second
    cancellation; a failure is logged (the run's outcome is not this attempt's to change)."""
    try:
        await asyncio.shield(
            orm(record_stopped_usage)(held, spans if spans is not None else ctx.trace.spans)
        )
    except Exception:
        log.warning(
            "run %s: the stopped attempt's usage was not recorded", held.run_id, exc_info=True
        )


async def _conclude(held: Claim, outcome: agent_execute.RunOutcome, final: str, run: Run) -> str:
    """Write the attempt's outcome, then end its event stream (after its queued events). An
    outcome that cannot be written (a bug) still ends the run, as an error without its trace,
    instead of leaving it running until its lease lapses and it is run again."""
    try:
        written = await orm(finish)(held, outcome, status=final, run=run)
    except (InterfaceError, OperationalError):
        raise  # PostgreSQL is away: the lease lapses and the sweeper runs it again
    except Exception:
        log.exception(
            "run %s attempt %s: its outcome could not be saved", held.run_id, held.attempt
        )
        final = RunStatus.ERROR
        outcome = agent_execute.RunOutcome(
            "error",
            message="The reply could not be saved because of an error on our side. It is "
            "logged; please try again.",
            usage=outcome.usage,
        )
        written = await orm(finish)(held, outcome, status=final, run=run)
    if not written:
        await _count_stopped(held, None, outcome.trace)
        return "superseded"
    try:
        if outcome.usage:
            streams.append_later(held.run_id, held.attempt, [run_events.usage(outcome.usage)])
        await streams.finish(
            held.run_id,
            held.attempt,
            run_events.status(final, message=outcome.for_end_user, detail=outcome.message)
            if final != RunStatus.SUCCESS
            else run_events.status(final),
        )
    except streams.StreamUnavailable:
        pass
    return final


def kick(run_id: UUID | str) -> None:
    """Ask a worker to execute the run. Only a kick: if it is lost, the sweeper kicks again."""
    from conversations import tasks

    try:
        tasks.run_execute.delay(str(run_id))
    except Exception:  # the broker may be down; the run stays pending and is swept later
        log.warning("could not enqueue run %s; the sweeper will retry", run_id, exc_info=True)


def sweep() -> list[str]:
    """Kick every run that should be moving but is not: running with a lapsed lease (its worker
    died) and pending runs that no worker picked up. Returns the kicked ids."""
    now = timezone.now()
    stale_pending = now - timedelta(seconds=max(lease_seconds(), 10))
    # tenant-scope: the sweeper looks after every tenant's runs
    candidates = _runs("the sweeper looks at every tenant's runs").filter(
        status__in=[RunStatus.PENDING, RunStatus.RUNNING], queued=False
    )
    lapsed = candidates.filter(status=RunStatus.RUNNING, lease_expires_at__lte=now)
    forgotten = candidates.filter(status=RunStatus.PENDING, created_at__lte=stale_pending)
    ids = [str(pk) for pk in lapsed.values_list("pk", flat=True)]
    ids += [str(pk) for pk in forgotten.values_list("pk", flat=True)]
    for run_id in ids:
        kick(run_id)
    return ids

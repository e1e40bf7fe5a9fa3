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
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from ai_agents.runtime import execute as agent_execute
from ai_agents.runtime.build import context_for
from conversations import events as run_events
from conversations import streams
from conversations.models import (
    Run,
    RunStatus,
    Thread,
    ThreadStatus,
)
from conversations.session import SupersededAttempt, ThreadSession

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


def end_thread(run: Run, status: str) -> UUID | None:
    """Set the thread's status after `run` ended; promote the next queued run (returns its id)."""
    following = (
        Run.objects.for_tenant(run.tenant)
        .select_for_update()
        .filter(thread_id=run.thread_id, queued=True, status=RunStatus.PENDING)
        .order_by("created_at")
        .first()
    )
    thread_status = {
        RunStatus.SUCCESS: ThreadStatus.IDLE,
        RunStatus.CANCELLED: ThreadStatus.IDLE,
        RunStatus.INTERRUPTED: ThreadStatus.INTERRUPTED,
    }.get(RunStatus(status), ThreadStatus.ERROR)
    if following is not None:
        following.queued = False
        following.save(update_fields=["queued"])
        thread_status = ThreadStatus.BUSY
    Thread.objects.for_tenant(run.tenant).filter(pk=run.thread_id).update(
        status=thread_status, updated_at=timezone.now()
    )
    return following.pk if following is not None else None


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
    with transaction.atomic():
        # tenant-scope: a worker is handed a run id; the run row tells it the tenant
        run = _runs("a worker claims a run by id").select_for_update().filter(pk=run_id).first()
        if run is None or run.queued:
            return None
        now = timezone.now()
        lapsed = run.status == RunStatus.RUNNING and (
            run.lease_expires_at is None or run.lease_expires_at <= now
        )
        if run.status != RunStatus.PENDING and not lapsed:
            return None
        if run.attempt >= max_attempts() or (lapsed and run.side_effects):
            run.status, run.finished_at = RunStatus.ERROR, now
            run.error = (
                "The reply was stopped: its worker disappeared after a tool that may change "
                "things had started, and repeating it could do that twice."
                if run.side_effects
                else f"The run was stopped after {run.attempt} attempts: its worker kept "
                "disappearing before it could finish."
            )
            run.lease_owner, run.lease_expires_at = "", None
            run.save(
                update_fields=["status", "finished_at", "error", "lease_owner", "lease_expires_at"]
            )
            next_id = end_thread(run, RunStatus.ERROR)
            if next_id is not None:
                transaction.on_commit(lambda: kick(next_id))
            return None
        run.attempt += 1
        run.status = RunStatus.RUNNING
        run.lease_owner = owner
        run.lease_expires_at = now + timedelta(seconds=lease_seconds())
        run.started_at = run.started_at or now
        run.save(
            update_fields=["attempt", "status", "lease_owner", "lease_expires_at", "started_at"]
        )
        return Claim(run_id=run.pk, tenant_id=run.tenant_id, attempt=run.attempt, owner=owner)


def renew(claims: list[Claim]) -> list[Claim]:
    """Extend the leases of `claims`; returns the ones that were lost (superseded or ended)."""
    lost = []
    until = timezone.now() + timedelta(seconds=lease_seconds())
    for held in claims:
        # tenant-scope: the heartbeat renews the leases this worker holds, by run id
        updated = (
            _runs("heartbeat of this worker's runs")
            .filter(pk=held.run_id, attempt=held.attempt, status=RunStatus.RUNNING)
            .update(lease_expires_at=until)
        )
        if not updated:
            lost.append(held)
    return lost


def has_side_effects(tool: str) -> bool:
    """Built-in tools say whether they change anything; any other tool (MCP) is assumed to."""
    from ai_agents.tools import CATALOGUE

    spec = CATALOGUE.get(tool)
    return spec.has_side_effects if spec is not None else True


def mark_side_effects(held: Claim) -> None:
    # tenant-scope: the claim carries the run id; the attempt fences the write
    _runs("recording a side effect of a claimed run").filter(
        pk=held.run_id, attempt=held.attempt, status=RunStatus.RUNNING
    ).update(side_effects=True)


def _status_of(outcome: agent_execute.RunOutcome) -> str:
    return RunStatus.SUCCESS if outcome.status == "success" else RunStatus.ERROR


def finish(held: Claim, outcome: agent_execute.RunOutcome, *, status: str | None = None) -> bool:
    """Write the outcome if `held` still owns the run. Returns False for a superseded attempt
    (nothing is written). The next queued run, if any, is promoted and kicked on commit."""
    final = status or _status_of(outcome)
    with transaction.atomic():
        # tenant-scope: the claim carries the run id; the attempt fences the write
        run = _runs("finishing a claimed run").select_for_update().filter(pk=held.run_id).first()
        if run is None or run.attempt != held.attempt or run.status != RunStatus.RUNNING:
            return False
        usage = outcome.usage or {}
        run.status = final
        run.output = outcome.output if final == RunStatus.SUCCESS else None
        run.error = "" if final == RunStatus.SUCCESS else outcome.message
        run.trace = outcome.trace
        run.input_tokens = usage.get("input_tokens", 0)
        run.output_tokens = usage.get("output_tokens", 0)
        run.total_tokens = usage.get("total_tokens", 0)
        run.finished_at = timezone.now()
        run.lease_owner, run.lease_expires_at = "", None
        run.save()
        next_id = end_thread(run, final)
        if next_id is not None:
            transaction.on_commit(lambda: kick(next_id))
    return True


def _load(held: Claim) -> tuple[Run, Any]:
    run = (
        Run.objects.filter(tenant_id=held.tenant_id, pk=held.run_id)
        .select_related("tenant", "version__agent", "thread", "end_user")
        .get()
    )
    ctx = context_for(
        tenant=run.tenant,
        version=run.version,
        thread_id=run.thread_id,
        end_user_id=str(run.end_user_id),
    )
    return run, ctx


async def execute(held: Claim) -> str:
    """Run one attempt to its end. Returns the final status ("superseded" if the attempt lost
    the run on the way: then it wrote nothing more)."""
    run, ctx = await sync_to_async(_load)(held)
    try:
        await streams.claim(held.run_id, held.attempt)
        await streams.append(
            held.run_id, held.attempt, [run_events.status(RunStatus.RUNNING, attempt=held.attempt)]
        )
    except streams.StreamUnavailable:
        log.warning("run %s: the event stream is unavailable; running without it", held.run_id)
    mapper = run_events.EventMapper(run.version.agent.name)  # follows handoffs and tool names

    marked = False

    async def before_tool(tool: str) -> None:
        # Runs before the tool does (a trace hook), so a worker that dies inside the tool has
        # already recorded that the run must not be repeated.
        nonlocal marked
        if not marked and has_side_effects(tool):
            marked = True
            await sync_to_async(mark_side_effects)(held)

    ctx.extra["before_tool"] = before_tool

    async def on_event(event: Any) -> None:
        mapped = mapper.map(event)
        if not ctx.extra.get("first_token") and any(
            e["type"] == run_events.MESSAGE_DELTA for e in mapped
        ):
            ctx.extra["first_token"] = ctx.trace.add("first_token")  # for the run inspector
        if mapped:
            try:
                await streams.append(held.run_id, held.attempt, mapped)
            except streams.StreamUnavailable:
                pass  # readers fall back to PostgreSQL for the final reply

    session = ThreadSession(
        tenant_id=held.tenant_id,
        thread_id=run.thread_id,
        run_id=held.run_id,
        attempt=held.attempt,
        limit=getattr(settings, "THREAD_HISTORY_WINDOW", 100),
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
            ),
            timeout=run_timeout(),
        )
    except SupersededAttempt:
        return "superseded"
    except TimeoutError:
        status = RunStatus.TIMEOUT
        outcome = agent_execute.RunOutcome(
            "error",
            message=f"The reply took longer than {run_timeout():g} seconds and was stopped.",
            trace=ctx.trace.spans,
            usage=ctx.trace.usage(),
        )
    final = status or _status_of(outcome)
    if not await sync_to_async(finish)(held, outcome, status=final):
        return "superseded"
    try:
        if outcome.usage:
            await streams.append(held.run_id, held.attempt, [run_events.usage(outcome.usage)])
        await streams.finish(
            held.run_id,
            held.attempt,
            run_events.status(final, message=outcome.message if final != RunStatus.SUCCESS else ""),
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

"""Writes for end users, threads and runs.

`run_create` is the one way a run comes to exist, whatever asks for it (chat, REST, schedule,
trigger): in one transaction it locks the thread, applies the thread's double-texting strategy,
and stores the run with its input. The database guarantees at most one active run per thread
(`run_one_active_per_thread`), so concurrent messages can never produce two.
"""

from __future__ import annotations

import re
from functools import cache, partial
from typing import Any
from uuid import UUID

from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from ai_agents import selectors as agent_selectors
from ai_agents.models import Agent
from controlplane import rows
from controlplane.errors import Conflict, NotFound, RateLimited, ValidationFailed
from controlplane.text import has_nul
from conversations import executor, selectors, streams
from conversations.models import (
    EndUser,
    EndUserKind,
    Item,
    MultitaskStrategy,
    Run,
    RunSource,
    RunStatus,
    Thread,
    ThreadStatus,
)
from tenants import audit, limits
from tenants.actors import Actor
from tenants.models import Tenant, User
from usage import services as usage_services

MAX_INPUT_CHARS = 100_000


class ThreadBusy(Conflict):
    """The thread has an active run and the strategy is `reject`."""

    code = "thread_busy"


# --- End users --------------------------------------------------------------------------------


def _get_or_create_end_user(
    tenant: Tenant, lookup: dict[str, Any], defaults: dict[str, Any]
) -> EndUser:
    qs = EndUser.objects.for_tenant(tenant)
    try:  # the lookup is unique: `get`, not `first`, whose ORDER BY costs every socket's connect
        return qs.get(**lookup)
    except EndUser.DoesNotExist:
        pass
    try:
        with transaction.atomic():
            return EndUser.objects.create(tenant=tenant, **lookup, **defaults)
    except IntegrityError:  # created concurrently: use that one
        return qs.get(**lookup)


def end_user_for_member(*, tenant: Tenant, user: User) -> EndUser:
    """The end user a member chats as in the browser (created on first use)."""
    return _get_or_create_end_user(
        tenant, {"user": user}, {"kind": EndUserKind.MEMBER, "display_name": user.display_name}
    )


def end_user_for_external(*, tenant: Tenant, external_id: str, display_name: str = "") -> EndUser:
    """An integrator's user, named by an id that is unique within the tenant."""
    external_id = external_id.strip()
    if not external_id or len(external_id) > 200:
        raise ValidationFailed(
            "Invalid end-user id.", fields={"user_id": "Give 1 to 200 characters."}
        )
    return _get_or_create_end_user(
        tenant,
        {"external_id": external_id},
        {"kind": EndUserKind.EXTERNAL, "display_name": display_name.strip()[:200]},
    )


# --- Threads ----------------------------------------------------------------------------------


def thread_get(*, tenant: Tenant, end_user: EndUser, thread_id: Any) -> Thread:
    """A thread of this end user; another end user's or tenant's thread is NotFound."""
    try:
        return (
            Thread.objects.for_tenant(tenant)
            .select_related("agent")
            .get(pk=thread_id, end_user=end_user)
        )
    except (Thread.DoesNotExist, ValueError, ValidationError):
        raise NotFound("No such thread.")


def thread_create(
    *,
    tenant: Tenant,
    end_user: EndUser,
    agent_id: Any,
    title: str = "",
    metadata: dict[str, Any] | None = None,
) -> Thread:
    """Start a conversation with a published agent of the tenant."""
    _refuse_nul(title, "title")
    _refuse_nul(metadata, "metadata")
    agent = agent_selectors.agent_get(tenant=tenant, agent_id=agent_id)
    if agent.published_version_id is None:
        raise Conflict(f"{agent.name} is not published yet.")
    return Thread.objects.create(
        tenant=tenant,
        agent=agent,
        end_user=end_user,
        title=title.strip()[:200],
        metadata=metadata or {},
    )


def default_title(text: str) -> str:
    """The title an untitled thread takes from its first message."""
    return text[:80]


@transaction.atomic
def thread_rename(*, tenant: Tenant, end_user: EndUser, thread_id: Any, title: str) -> Thread:
    """Retitle a thread of this end user (NotFound for another's or another tenant's).
    A new title is not activity: `updated_at` stays, so the list keeps its order.
    ValidationFailed for a blank title (empty or only spaces): the thread keeps the title it
    had, rather than becoming "Untitled conversation" and, with nothing said in it yet, leaving
    the list that it is listed in for its title (`selectors._started`)."""
    _refuse_nul(title, "title")
    if not title.strip():
        raise ValidationFailed(
            "The title cannot be blank: type at least one character other than a space.",
            fields={"title": "Type a title."},
        )
    thread = thread_get(tenant=tenant, end_user=end_user, thread_id=thread_id)
    thread.title = title.strip()[:200]
    thread.save(update_fields=["title"])
    return thread


@transaction.atomic
def thread_delete(*, tenant: Tenant, end_user: EndUser, thread_id: Any) -> None:
    """Delete a thread of this end user with its runs and items, and close its open chats on
    commit. NotFound for another's or another tenant's; Conflict while a reply is being written
    (or waits to be)."""
    thread = thread_get(tenant=tenant, end_user=end_user, thread_id=thread_id)
    if (
        Run.objects.for_tenant(tenant)
        .filter(thread=thread, status__in=[RunStatus.PENDING, RunStatus.RUNNING])
        .exists()
    ):
        raise Conflict(
            "This conversation is still writing a reply. Open it and stop the reply, "
            "then delete it."
        )
    thread_pk = thread.pk
    thread.delete()
    transaction.on_commit(partial(streams.announce_deleted, thread_pk))


# --- Runs -------------------------------------------------------------------------------------


def _refuse_nul(value: Any, field: str) -> None:
    if has_nul(value):
        raise ValidationFailed(
            f"The {field} contains a NUL character (U+0000), which cannot be stored.",
            fields={field: "Remove the NUL character."},
        )


# The ids the chat page gives its messages (it makes 32 hex digits).
_CHAT_MESSAGE_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")


def chat_message_metadata(message_id: Any) -> dict[str, Any]:
    """The metadata of a chat run that records the id the chat page gave its message
    (`selectors.CHAT_MESSAGE_ID`); nothing for a value that is not such an id."""
    if isinstance(message_id, str) and _CHAT_MESSAGE_ID.fullmatch(message_id):
        return {selectors.CHAT_MESSAGE_ID: message_id}
    return {}


def normalise_input(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items in the SDK's Responses format; a string is one user message."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValidationFailed("The message is empty.", fields={"input": "Type a message."})
        items: list[dict[str, Any]] = [{"role": "user", "content": text}]
    elif isinstance(value, list) and value:
        items = []
        for index, item in enumerate(value):
            role, content = (
                (item.get("role"), item.get("content")) if isinstance(item, dict) else (None, None)
            )
            if role not in ("user", "system", "developer") or not isinstance(content, (str, list)):
                raise ValidationFailed(
                    "Invalid input message.",
                    fields={f"input.{index}": "Each message needs a role (user) and a content."},
                )
            items.append({"role": role, "content": content})
    else:
        raise ValidationFailed("The input is empty.", fields={"input": "Send a message."})
    _refuse_nul(items, "input")
    if sum(len(str(i["content"])) for i in items) > MAX_INPUT_CHARS:
        raise ValidationFailed(
            "The input is too long.", fields={"input": f"At most {MAX_INPUT_CHARS} characters."}
        )
    return items


def run_create(
    *,
    tenant: Tenant,
    end_user: EndUser,
    thread_id: Any,
    input: str | list[dict[str, Any]] | None,
    source: str = RunSource.CHAT,
    strategy: str = MultitaskStrategy.REJECT,
    actor: Actor | None = None,
    metadata: dict[str, Any] | None = None,
    retry_of: Any = None,
) -> Run:
    """Store the input and a pending run on the thread, applying `strategy` if a run is active:

    - reject (default): ThreadBusy, nothing written;
    - enqueue: the run waits (queued) and starts when the active one ends;
    - interrupt: the active run ends as `interrupted` (what it said stays), this one starts;
    - rollback: the active run ends as `cancelled` and its items are removed, this one starts.

    The run records the agent version it will use (the live one, now). Before anything is
    written, the start counts against the rate limits of the end user and of the actor's API key
    (`tenants.limits`): RateLimited (429) when one is reached.

    `retry_of` (instead of `input`): "Try again" on the thread's latest run, which failed
    (`RETRYABLE`). Its items leave the conversation (the run itself stays, for the run
    inspector) and the new run takes its input, in the same transaction. Conflict if that run is
    not the thread's latest or did not fail; ThreadBusy if a run is active.
    """
    if strategy not in MultitaskStrategy.values:
        raise ValidationFailed(
            "Unknown strategy.",
            fields={"multitask_strategy": f"One of {MultitaskStrategy.values}."},
        )
    if source not in RunSource.values:
        raise ValidationFailed("Unknown source.", fields={"source": f"One of {RunSource.values}."})
    items = [] if retry_of is not None else normalise_input("" if input is None else input)
    _refuse_nul(metadata, "metadata")
    usage_services.budget_check(tenant=tenant)  # a used-up monthly budget refuses new runs
    try:
        # Rate limits first, so a refused run writes nothing; a run refused below is not counted.
        with (
            limits.run_start(
                tenant=tenant,
                end_user_id=end_user.pk,
                api_key=actor.api_key if actor else None,
                source=source,
            ),
            transaction.atomic(),
        ):
            return _run_create(
                tenant, end_user, thread_id, items, source, strategy, actor, metadata, retry_of
            )
    except IntegrityError:
        # The unique index caught a concurrent creator that the row lock did not serialise
        # (e.g. a run promoted by a finishing one): the answer is the same as for `reject`.
        raise ThreadBusy("This conversation is busy with another reply. Try again in a moment.")


def _run_create(
    tenant: Tenant,
    end_user: EndUser,
    thread_id: Any,
    items: list[dict[str, Any]],
    source: str,
    strategy: str,
    actor: Actor | None,
    metadata: dict[str, Any] | None,
    retry_of: Any = None,
) -> Run:
    # This is on every chat message's path, in plain SQL: the ORM spent more compiling these
    # statements than PostgreSQL spends answering them. First the thread, locked (which
    # serialises run creation per thread), with its agent's name and live version.
    agent_id, version_id, agent_name, title = _lock_thread(tenant, end_user, thread_id)
    if version_id is None:
        raise Conflict(f"{agent_name} is not published any more.")
    if retry_of is not None:
        items, strategy = _take_back(tenant, thread_id, retry_of), MultitaskStrategy.REJECT
    now = timezone.now()
    run = Run(
        tenant=tenant,
        thread_id=thread_id,
        agent_id=agent_id,
        version_id=version_id,
        end_user=end_user,
        status=RunStatus.PENDING,
        queued=False,
        strategy=strategy,
        source=source,
        input=items,
        metadata=metadata or {},
        created_by=actor.user if actor else None,
        api_key=actor.api_key if actor else None,
        created_at=now,
    )
    if not title and isinstance(items[-1]["content"], str):
        title = default_title(items[-1]["content"])
    # The usual case, one statement: no run is active, so the run goes in and the thread is busy.
    active_id = _insert_if_idle(run, title, now)
    if active_id is not None:
        # A run is active (it and the thread stay locked): the strategy decides.
        _apply_strategy(tenant, run, active_id, strategy, title, now)
    if not run.queued:
        # Only a kick: if it is lost, the sweeper finds the pending run and kicks it again.
        transaction.on_commit(partial(executor.kick, run.pk))
        transaction.on_commit(partial(streams.announce_run, run.thread_id, run.pk))
    return run


# The runs whose reply can be tried again: those that failed (not one stopped or replaced), the
# runs the history ends with "No reply:".
RETRYABLE = selectors.FAILED_STATUSES


def _take_back(tenant: Tenant, thread_id: Any, run_id: Any) -> list[dict[str, Any]]:
    """For "Try again": the failed run `run_id`, the latest of the locked thread, leaves the
    conversation (its items are removed); returns its input, for the run that replaces it."""
    try:
        run_uuid = UUID(str(run_id))
    except ValueError:
        raise NotFound("No such run in this conversation.")
    failed = (
        Run.objects.for_tenant(tenant)
        .filter(thread_id=thread_id, pk=run_uuid)
        .only("status", "input", "created_at")
        .first()
    )
    if failed is None:
        raise NotFound("No such run in this conversation.")
    if failed.status not in RETRYABLE:
        raise Conflict("Only a reply that failed can be tried again.")
    # A message taken back before it was sent (`run_withdraw`) never joined the conversation.
    later = Run.objects.for_tenant(tenant).filter(
        thread_id=thread_id, created_at__gt=failed.created_at, withdrawn=False
    )
    if later.exists():
        raise Conflict("Only the latest reply can be tried again.")
    Item.objects.for_tenant(tenant).filter(thread_id=thread_id, run=failed).delete()
    return list(failed.input)


_LOCK_THREAD = f"""
    SELECT thread.agent_id, agent.published_version_id, agent.name, thread.title
    FROM {Thread._meta.db_table} thread
    JOIN {Agent._meta.db_table} agent ON agent.id = thread.agent_id
    WHERE thread.id = %s AND thread.tenant_id = %s AND thread.end_user_id = %s
    FOR NO KEY UPDATE OF thread
"""  # noqa: S608 (table names from the models; the values are parameters)


def _lock_thread(
    tenant: Tenant, end_user: EndUser, thread_id: Any
) -> tuple[UUID, UUID | None, str, str]:
    """The end user's thread locked: its agent, the agent's live version and name, its title.
    NotFound as `thread_get` says."""
    try:
        thread_uuid = UUID(str(thread_id))
    except ValueError:
        raise NotFound("No such thread.")
    # tenant-scope: the statement names the tenant and the end user
    with connection.cursor() as cursor:
        cursor.execute(_LOCK_THREAD, [thread_uuid, tenant.pk, end_user.pk])
        row = cursor.fetchone()
    if row is None:
        raise NotFound("No such thread.")
    return row[0], row[1], row[2], row[3]


_RUN_INSERT = rows.Insert(Run)


@cache
def _insert_sql() -> str:
    run, thread = Run._meta.db_table, Thread._meta.db_table
    return f"""
        WITH active AS (
            SELECT id FROM {run}
            WHERE thread_id = %s AND tenant_id = %s AND status IN (%s, %s) AND NOT queued
            LIMIT 1
            FOR UPDATE
        ), created AS (
            INSERT INTO {run} ({_RUN_INSERT.columns})
            SELECT {_RUN_INSERT.placeholders(cast=True)}
            WHERE NOT EXISTS (SELECT 1 FROM active)
            RETURNING id
        ), busy AS (
            UPDATE {thread} SET status = %s, updated_at = %s, title = %s
            WHERE id = %s AND tenant_id = %s AND EXISTS (SELECT 1 FROM created)
        )
        SELECT id FROM active
    """  # noqa: S608 (table and column names from the models; the values are parameters)


def _insert_if_idle(run: Run, title: str, now: Any) -> UUID | None:
    """Insert `run` and mark the thread busy (with `title`), unless the thread has an active
    run: then nothing is written, and the active run (locked) is returned. The thread is locked
    by the caller, and this is a new statement: it sees every run committed before that lock
    was granted."""
    values = _RUN_INSERT.values(run)
    # tenant-scope: the run carries its tenant; the active-run check and the thread update name it
    with connection.cursor() as cursor:
        cursor.execute(
            _insert_sql(),
            [
                run.thread_id,
                run.tenant_id,
                RunStatus.PENDING,
                RunStatus.RUNNING,
                *values,
                ThreadStatus.BUSY,
                now,
                title,
                run.thread_id,
                run.tenant_id,
            ],
        )
        active = cursor.fetchone()
    if active is not None:
        return UUID(str(active[0]))
    run._state.adding, run._state.db = False, connection.alias
    return None


def _apply_strategy(
    tenant: Tenant, run: Run, active_id: UUID, strategy: str, title: str, now: Any
) -> None:
    """The run `active_id` is active on the thread: reject (ThreadBusy), enqueue `run`, or end
    the active run (interrupt, rollback) and insert `run` in its place; the thread is busy, with
    `title`."""
    if strategy == MultitaskStrategy.REJECT:
        raise ThreadBusy("This conversation is busy with another reply. Try again in a moment.")
    if strategy == MultitaskStrategy.ENQUEUE:
        run.queued = True
    else:
        active = Run.objects.for_tenant(tenant).get(pk=active_id)  # locked: the whole row
        interrupted = strategy == MultitaskStrategy.INTERRUPT
        active.status = RunStatus.INTERRUPTED if interrupted else RunStatus.CANCELLED
        active.error = (
            "Interrupted by a newer message." if interrupted else "Replaced by a newer message."
        )
        active.finished_at = now
        active.lease_owner, active.lease_expires_at = "", None
        active.save(
            update_fields=["status", "error", "finished_at", "lease_owner", "lease_expires_at"]
        )
        if interrupted:
            executor.keep_what_was_said(active)
        else:
            Item.objects.for_tenant(tenant).filter(run=active).delete()
        # Messages stopped while they waited behind it: their turn has come, before this one's.
        executor.keep_stopped_in_line(tenant_id=tenant.pk, thread_id=run.thread_id, now=now)
        transaction.on_commit(
            partial(executor.close_stream, active.pk, active.attempt, active.status, active.error)
        )
    run.save(force_insert=True)
    Thread.objects.for_tenant(tenant).filter(pk=run.thread_id).update(
        status=ThreadStatus.BUSY, updated_at=now, title=title
    )


# What a chat is told when an owner or admin stopped its reply.
STOPPED_BY_ADMIN = "Stopped by an administrator."


def _duration_words(seconds: int) -> str:
    """ "45 seconds", "2 minutes": how long someone waits, in the chat's words."""
    if seconds < 60:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = -(-seconds // 60)
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


def rate_limited_message(exc: RateLimited) -> str:
    """A message refused by the end user's rate limit, in the chat's words (the API's says
    "This end user may start … runs"): it was not sent, how many are allowed, when to resend."""
    limit, window = exc.metadata.get("limit"), exc.metadata.get("window")
    wait = int(exc.metadata.get("retry_after") or 1)
    unit = "hour" if window == 3600 else "minute"
    return (
        f"Your message was not sent: you can send {limit} "
        f"message{'' if limit == 1 else 's'} per {unit}. "
        f"You can send it again in {_duration_words(wait)}."
    )


def run_cancel(
    *, tenant: Tenant, run_id: Any, end_user: EndUser | None = None, by: Actor | None = None
) -> Run:
    """Stop a run (the chat's stop button, the API's cancel). Idempotent: an ended run is
    returned as it is. With `end_user`, only that end user's runs are found, and the run says
    its end user stopped it; `by`: who else did (the run inspector's admin). The worker holding
    the run loses its lease at its next heartbeat and stops; its writes are fenced out now.

    What was said stays in the thread, marked stopped: the question, and the reply as far as its
    readers saw it (`executor.keep_what_was_said`). A run that waits in line (queued) stays in
    the line, stopped: its question joins the thread when the reply ahead of it ends, after that
    reply (`executor.finish`, `executor.end_thread`), and until then the chat shows it with the
    messages waiting (`selectors.pending_inputs`)."""
    try:
        run_uuid = UUID(str(run_id))
    except ValueError:
        raise NotFound("No such run.") from None
    with transaction.atomic():
        executor.lock_thread_of(run_uuid, tenant_id=tenant.pk)  # the thread first, as everywhere
        runs = Run.objects.for_tenant(tenant).select_for_update()
        if end_user is not None:
            runs = runs.filter(end_user=end_user)
        try:
            run = runs.get(pk=run_uuid)
        except Run.DoesNotExist:
            raise NotFound("No such run.") from None
        if run.status not in (RunStatus.PENDING, RunStatus.RUNNING):
            return run
        was_queued = run.queued
        # The run's reason (the inspector's) names who stopped it; its readers (the chat) are
        # told "Stopped." when it was them, and who did it otherwise.
        if end_user is not None:
            reason, told = "Stopped by the end user.", "Stopped."
        elif by is not None and by.user is not None:
            reason, told = f"Stopped by {by.label} from the run inspector.", STOPPED_BY_ADMIN
        elif by is not None:
            reason, told = f"Stopped by {by.label}.", "Stopped."
        else:
            reason, told = "Stopped.", "Stopped."
        run.status, run.error, run.finished_at = RunStatus.CANCELLED, reason, timezone.now()
        run.end_user_error = "" if told == reason else told
        run.lease_owner, run.lease_expires_at = "", None
        run.save(
            update_fields=[
                "status",
                "error",
                "end_user_error",
                "finished_at",
                "lease_owner",
                "lease_expires_at",
            ]
        )
        if not was_queued:
            executor.keep_what_was_said(run)  # the reply shown so far stays, as it was cut
            executor.end_thread(run, RunStatus.CANCELLED)
        transaction.on_commit(
            partial(executor.close_stream, run.pk, run.attempt, RunStatus.CANCELLED, told)
        )
    return run


# The run inspector's reason for a message its end user took back before it was sent.
WITHDRAWN = "Withdrawn by the end user before it was sent."


def run_withdraw(*, tenant: Tenant, end_user: EndUser, thread_id: Any, run_id: Any) -> Run:
    """ "Don't send": the end user takes back their message that waits in line (queued behind
    the reply being written) before its turn. The run ends as `cancelled`, marked `withdrawn`,
    and leaves the line, so its question never joins the conversation: the agent never reads
    it and the history never shows it (the statements that keep a question stopped in line,
    and `selectors.pending_inputs`, look only at runs still in line). On commit the chats open
    on the thread are told (`streams.announce_withdrawn`). Idempotent: a run already withdrawn
    is returned as it is. Returns the run, whose `input` is the message.

    NotFound for a run of another thread, end user or tenant. Conflict, with nothing written,
    for a run that no longer waits in line: it started (or ended) meanwhile, or it was stopped
    in line, and then its question stays in the conversation."""
    try:
        run_uuid, thread_uuid = UUID(str(run_id)), UUID(str(thread_id))
    except ValueError:
        raise NotFound("No such message in this conversation.") from None
    with transaction.atomic():
        # The thread first, as everywhere: a reply that ends now promotes the next run in line
        # under this lock, so the run is either still in line here or has left it.
        executor.lock_thread_of(run_uuid, tenant_id=tenant.pk)
        try:
            run = (
                Run.objects.for_tenant(tenant)
                .select_for_update()
                .get(pk=run_uuid, thread_id=thread_uuid, end_user=end_user)
            )
        except Run.DoesNotExist:
            raise NotFound("No such message in this conversation.") from None
        if run.withdrawn:
            return run
        if run.status == RunStatus.CANCELLED and run.queued:
            raise Conflict("That message was already stopped; it stays in the conversation.")
        if run.status != RunStatus.PENDING or not run.queued:
            raise Conflict("That message has already been sent to the agent.")
        run.status, run.queued, run.withdrawn = RunStatus.CANCELLED, False, True
        run.error, run.end_user_error, run.finished_at = WITHDRAWN, "", timezone.now()
        run.save(
            update_fields=[
                "status",
                "queued",
                "withdrawn",
                "error",
                "end_user_error",
                "finished_at",
            ]
        )
        # No worker holds a run in line and no reader has been told of it: its event stream is
        # left alone (the chat that sent it stops following it when told).
        transaction.on_commit(partial(streams.announce_withdrawn, run.thread_id, run.pk))
    return run


def run_stop(*, tenant: Tenant, actor: Actor, run_id: Any) -> Run:
    """An owner or admin stops a run from the run inspector: `run_cancel`, audited as
    `run.cancel` when the run was still active (stopping an ended run changes nothing)."""
    with transaction.atomic():
        before = Run.objects.for_tenant(tenant).filter(pk=run_id).values_list("status", flat=True)
        try:
            was = before.first()
        except (ValueError, ValidationError):
            raise NotFound("No such run.")
        run = run_cancel(tenant=tenant, run_id=run_id, by=actor)
        if was != run.status:
            audit.audit_record(
                tenant=tenant,
                actor=actor,
                action="run.cancel",
                target=run,
                target_label=f"Run of {run.agent.name}",
                change_set={"status": [was, run.status]},
            )
    return run

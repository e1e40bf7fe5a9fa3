"""An Agents SDK `Session` backed by the thread's `Item` rows: the short-term memory of a
conversation.

Reads return the latest `limit` items in order (the history window). Writes belong to one
attempt of one run and are fenced on it: once a newer attempt has taken the run over (or the
run was interrupted or cancelled), a superseded attempt can add nothing.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from functools import cache, wraps
from typing import Any, ParamSpec, TypeVar, cast
from uuid import UUID

from agents.memory import SessionSettings
from asgiref.sync import sync_to_async
from django.db import connection, connections, transaction
from django.utils import timezone

from controlplane.text import without_nul
from conversations.models import Item, Run, RunStatus

DEFAULT_HISTORY_WINDOW = 100

P = ParamSpec("P")
R = TypeVar("R")


def orm(fn: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """`fn` as one unit of ORM work of the run host, run in a thread. Like a request, a unit
    starts by dropping connections that are broken (a PostgreSQL restart) or past CONN_MAX_AGE,
    so one failure does not poison every later run of the worker process. A connection inside a
    transaction (a caller's `atomic`, e.g. a test's) is left alone.

    Where `unit_threads` names a pool (the run host's, for the runs it holds), units go to its
    threads, so that different runs' units reach PostgreSQL side by side; elsewhere a unit
    takes asgiref's thread-sensitive path (an outer `async_to_sync`'s thread, whose open
    transaction it may need to see)."""

    @wraps(fn)
    async def unit(*args: P.args, **kwargs: P.kwargs) -> R:
        pool = unit_threads.get()
        adapter = _in_unit if pool is None else _in_pool(pool)
        return cast(R, await adapter(fn, args, kwargs))

    return unit


def _drop_unusable_connections() -> None:
    for each in connections.all(initialized_only=True):
        if not each.in_atomic_block:
            each.close_if_unusable_or_obsolete()


def _unit(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    _drop_unusable_connections()
    return fn(*args, **kwargs)


# One adapter for every unit: building asgiref's adapter inspects the function each time, which
# the run host did for every unit (several per run).
_in_unit = sync_to_async(_unit)

# The threads the units of the current run go to (see `orm`). Without a pool, every unit of
# every run a worker holds queued for asgiref's one shared thread: at 50 chats, a run's first
# unit (the SDK saving its input before the model call) waited about 200 ms there
# (docs/benchmark.md).
unit_threads: ContextVar[ThreadPoolExecutor | None] = ContextVar("unit_threads", default=None)


def unit_here(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """`fn(*args, **kwargs)` as a unit, on the calling thread (one of the run host's)."""
    return cast(R, _pooled_unit(fn, args, kwargs))


def _pooled_unit(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        return _unit(fn, args, kwargs)
    finally:
        # A thread of the pool may sit idle for long: what is past CONN_MAX_AGE goes now (with
        # DATABASE_POOL, back to the pool), not when the thread's next unit starts. A worker's
        # kept connections (DATABASE_POOL=0, CONN_MAX_AGE=60) stay with their thread.
        _drop_unusable_connections()


@cache
def _in_pool(pool: ThreadPoolExecutor) -> Any:
    return sync_to_async(_pooled_unit, thread_sensitive=False, executor=pool)


class SupersededAttempt(RuntimeError):
    """This attempt no longer owns the run: its writes are refused."""


class ThreadSession:
    def __init__(
        self,
        *,
        tenant_id: UUID,
        thread_id: UUID,
        run_id: UUID | None = None,
        attempt: int | None = None,
        limit: int | None = DEFAULT_HISTORY_WINDOW,
        prefetched: list[Any] | None = None,
        first_write_behind: bool = False,
    ) -> None:
        """`prefetched`: the history window, read already (the worker reads it with the run, off
        the event loop); the first `get_items` of the window returns it instead of reading.

        `first_write_behind`: the first `add_items` (the run's input, which the Agents SDK saves
        before it calls the model) returns at once and its write goes on meanwhile, so the
        model call does not wait for it. Every later call of the session waits for it first,
        and so must the run before it writes its outcome (`settle`)."""
        self.session_id = str(thread_id)
        self.session_settings: SessionSettings | None = SessionSettings(limit=limit)
        self.tenant_id, self.thread_id = tenant_id, thread_id
        self.run_id, self.attempt = run_id, attempt
        self._prefetched = prefetched
        self._write_behind = first_write_behind
        self._behind: asyncio.Future[None] | None = None

    def _items(self):  # type: ignore[no-untyped-def]
        return Item.objects.filter(tenant_id=self.tenant_id, thread_id=self.thread_id)

    # --- sync bodies (run in a worker thread) ---

    def _get(self, limit: int | None) -> list[Any]:
        # Plain SQL: read before every run, and the ORM spent more compiling this than
        # PostgreSQL spends answering it. jsonb comes as text here, as the ORM reads it.
        # tenant-scope: the statement names the session's tenant
        with connection.cursor() as cursor:
            cursor.execute(
                """
                SELECT data FROM conversations_item
                WHERE tenant_id = %s AND thread_id = %s
                ORDER BY id DESC
                LIMIT %s
                """,
                [self.tenant_id, self.thread_id, limit],
            )
            rows = cursor.fetchall()
        return [json.loads(data) if isinstance(data, str) else data for (data,) in reversed(rows)]

    def _check_owner(self) -> None:
        if self.run_id is None:
            return
        run = (
            Run.objects.filter(tenant_id=self.tenant_id, pk=self.run_id)
            .select_for_update()
            .only("attempt", "status")
            .first()
        )
        if run is None or run.attempt != self.attempt or run.status != RunStatus.RUNNING:
            raise SupersededAttempt(f"attempt {self.attempt} of run {self.run_id} is superseded")

    def _add(self, items: list[Any]) -> None:
        # A tool's output or a model's text may hold NULs, which PostgreSQL cannot store
        # (controlplane/text.py): each becomes U+FFFD.
        if self.run_id is None:
            # tenant-scope: every new row carries this session's tenant (set below)
            Item.objects.bulk_create(
                [
                    Item(tenant_id=self.tenant_id, thread_id=self.thread_id, data=without_nul(i))
                    for i in items
                ]
            )
            return
        # One statement for the fence and the rows (a run adds items after every turn): the
        # items go in only while this attempt owns the run, whose row it locks like
        # `_check_owner` does, so a cancel or a newer attempt waits for it or shuts it out.
        # tenant-scope: the statement names the session's tenant
        with connection.cursor() as cursor:
            cursor.execute(
                """
                INSERT INTO conversations_item (tenant_id, thread_id, run_id, data, created_at)
                SELECT run.tenant_id, %s, run.id, item.data, %s
                FROM conversations_run run,
                     unnest(%s::jsonb[]) WITH ORDINALITY AS item (data, position)
                WHERE run.id = %s AND run.tenant_id = %s AND run.attempt = %s
                      AND run.status = %s
                ORDER BY item.position
                FOR UPDATE OF run
                """,
                [
                    self.thread_id,
                    timezone.now(),
                    [json.dumps(without_nul(item)) for item in items],
                    self.run_id,
                    self.tenant_id,
                    self.attempt,
                    RunStatus.RUNNING,
                ],
            )
            if cursor.rowcount != len(items):
                raise SupersededAttempt(
                    f"attempt {self.attempt} of run {self.run_id} is superseded"
                )

    def _pop(self) -> Any:
        with transaction.atomic():
            self._check_owner()
            last = self._items().select_for_update().order_by("-id").first()
            if last is None:
                return None
            last.delete()
            return last.data

    def _clear(self) -> None:
        with transaction.atomic():
            self._check_owner()
            self._items().delete()

    # --- the Session protocol ---

    def history(self) -> list[Any]:
        """The history window, read now (sync: for `prefetched`)."""
        return self._get((self.session_settings or SessionSettings()).limit)

    async def settle(self, *, quiet: bool = False) -> None:
        """Wait for a write that went on behind (`first_write_behind`), and raise what it
        raised (e.g. `SupersededAttempt`), unless `quiet` (the run is failing already)."""
        behind, self._behind = self._behind, None
        if behind is None:
            return
        try:
            await behind
        except Exception:
            if not quiet:
                raise

    async def get_items(self, limit: int | None = None) -> list[Any]:
        await self.settle()
        window = limit if limit is not None else (self.session_settings or SessionSettings()).limit
        if self._prefetched is not None:
            prefetched, self._prefetched = self._prefetched, None  # once: later reads are fresh
            if window == (self.session_settings or SessionSettings()).limit:
                return list(prefetched)
        return await orm(self._get)(window)

    async def add_items(self, items: list[Any]) -> None:
        if not items:
            return
        await self.settle()
        if self._write_behind:
            self._write_behind = False
            self._behind = asyncio.ensure_future(orm(self._add)(list(items)))
            return
        await orm(self._add)(list(items))

    async def pop_item(self) -> Any:
        await self.settle()
        return await orm(self._pop)()

    async def clear_session(self) -> None:
        await self.settle()
        await orm(self._clear)()


# The Agents SDK asks for the signature of the session's methods (whether they take `wrapper`)
# on every turn; a stored signature spares `inspect` parsing the function each time.
for _name in ("get_items", "add_items", "pop_item", "clear_session"):
    _method = getattr(ThreadSession, _name)
    _method.__signature__ = inspect.signature(_method)
del _name, _method

"""The host of run execution inside a worker process: one asyncio event loop, in its own thread,
holds every run this process executes, so a process holds hundreds of runs that wait on the
network; and a heartbeat thread, which tool code on the loop cannot block, renews their leases.

A run whose lease was lost (cancelled, or taken over after a stall) is cancelled here; its
writes are fenced in any case.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import uvloop
from django.conf import settings
from django.db import close_old_connections

from ai_agents.runtime import models as agent_models
from conversations import executor, session

log = logging.getLogger(__name__)


def new_run_loop() -> asyncio.AbstractEventLoop:
    """The loop a worker's runs share, as `RUN_EVENT_LOOP` says: uvloop (a pinned dependency),
    whose loop does the same work for less CPU (every run's stream is many small reads and
    writes), or asyncio's."""
    if settings.RUN_EVENT_LOOP == "uvloop":
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class RunHost:
    def __init__(self) -> None:
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._loop = new_run_loop()
        agent_models.share_clients(self._loop)  # one client per provider for all its runs
        # The runs' database work, side by side (`session.orm`): each thread keeps a connection.
        self._units = ThreadPoolExecutor(
            max_workers=settings.RUN_DB_THREADS, thread_name_prefix="run-host-db"
        )
        self._held: dict[executor.Claim, asyncio.Task[Any]] = {}
        # Every attempt submitted and not yet ended, from the moment it is submitted.
        self._submitted: dict[executor.Claim, Future[str]] = {}
        self._taking: set[Future[None]] = set()  # kicks being claimed (`take`)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._loop.run_forever, name="run-host-loop", daemon=True).start()
        self._beating = threading.Thread(
            target=self._heartbeat, name="run-host-heartbeat", daemon=True
        )
        self._beating.start()

    def take(self, run_id: str) -> Future[None]:
        """Claim the run and execute it, on the host's database threads: the caller (Celery's
        task) returns at once and takes the next kick. Claiming in the task itself made every
        kick wait for the one before it to be claimed, its history read and its agent built:
        at 50 chats, most of a reply's time to first token (docs/benchmark.md)."""
        future = self._units.submit(session.unit_here, self._take, run_id)
        with self._lock:
            self._taking.add(future)
        future.add_done_callback(self._taken)
        return future

    def _take(self, run_id: str) -> None:
        try:
            taken = executor.take(run_id, owner=self.owner, loop=self._loop)
        except Exception:
            # The claim failed (the database away): the run stays pending, or running with a
            # lease that lapses, and the sweeper kicks it again.
            log.warning("could not take run %s", run_id, exc_info=True)
            return
        if taken is not None:
            self.submit(*taken)

    def _taken(self, future: Future[None]) -> None:
        with self._lock:
            self._taking.discard(future)

    def submit(self, held: executor.Claim, loaded: Any = None) -> Future[str]:
        """Execute the attempt `held` (`loaded`: what `executor.take` read with it)."""
        # A fresh context: the caller's (e.g. asgiref's thread markers) must not leak into the
        # run, whose database calls would then try the caller's executor.
        future: Future[str] = contextvars.Context().run(
            asyncio.run_coroutine_threadsafe, self._hold(held, loaded), self._loop
        )
        with self._lock:
            self._submitted[held] = future
        future.add_done_callback(lambda _: self._forget(held))
        return future

    def _forget(self, held: executor.Claim) -> None:
        with self._lock:
            self._submitted.pop(held, None)

    async def _hold(self, held: executor.Claim, loaded: Any) -> str:
        """Execute `held` while the heartbeat renews its lease (and cancels it once lost)."""
        task = asyncio.current_task()
        assert task is not None
        with self._lock:
            self._held[held] = task
        session.unit_threads.set(self._units)  # this run's context only
        try:
            return await executor.execute(held, loaded, concluding=lambda: self._release(held))
        except Exception:
            log.exception("run %s attempt %s crashed", held.run_id, held.attempt)
            raise
        finally:
            with self._lock:
                self._held.pop(held, None)

    def _release(self, held: executor.Claim) -> None:
        """The attempt is writing its outcome: its lease needs no more renewing, and the run
        that this ends must not look lost to the heartbeat."""
        with self._lock:
            self._held.pop(held, None)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop every run of this host executes on."""
        return self._loop

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._held)

    def drain(self, grace_s: float) -> list[executor.Claim]:
        """The process is shutting down: wait up to `grace_s` seconds for the runs held to end,
        then stop the others and release their leases, so that another worker takes them over
        at once instead of after their lease lapses. Returns the released claims."""
        with self._lock:
            taking = list(self._taking)
        wait(taking, timeout=grace_s)  # claims in progress end submitted (or not taken)
        with self._lock:
            submitted = dict(self._submitted)
        wait(submitted.values(), timeout=grace_s)
        left = [held for held, future in submitted.items() if not future.done()]
        for held in left:
            submitted[held].cancel()  # the attempt stops; its writes would be fenced anyway
        # No renewal may follow the release: a beat in flight would extend the leases again
        # and keep the runs from other workers until they lapse.
        self._stop.set()
        if threading.current_thread() is not self._beating:
            self._beating.join(timeout=executor.lease_seconds())
        released: list[executor.Claim] = []
        if left:
            try:
                released = executor.release(left)
            except Exception:  # the database may be away: the leases lapse instead
                log.warning("could not release the leases of %s runs", len(left), exc_info=True)
            finally:
                close_old_connections()
            log.info("shutting down: released %s runs to other workers", len(released))
        try:  # the model providers' connections, kept alive for later runs
            asyncio.run_coroutine_threadsafe(agent_models.close_clients(), self._loop).result(5)
        except Exception:
            log.warning("could not close the model clients", exc_info=True)
        return released

    def _heartbeat(self) -> None:
        interval = max(executor.lease_seconds() / 3, 0.2)
        while not self._stop.wait(interval):
            self.beat()

    def beat(self) -> None:
        """Renew the leases of the runs held; stop those whose lease was lost."""
        with self._lock:
            claims = list(self._held)
        if not claims:
            return
        try:
            lost = executor.renew(claims)
        except Exception:  # the database may be away for a moment; try again next beat
            log.warning("lease renewal failed", exc_info=True)
            return
        finally:
            close_old_connections()
        for held in lost:
            with self._lock:
                task = self._held.get(held)
            if task is not None:
                log.info("run %s attempt %s lost its lease; stopping it", held.run_id, held.attempt)
                self._loop.call_soon_threadsafe(task.cancel)


_host: RunHost | None = None
_host_lock = threading.Lock()


def drain_on_shutdown(**_: Any) -> None:
    """Celery's warm shutdown (a deploy, a scale-down): the run host of this process, if it
    started, lets its runs finish for up to RUN_SHUTDOWN_GRACE_SECONDS and hands the rest to
    other workers. Connected to `worker_process_shutdown` (a prefork pool process) and to
    `worker_shutdown` (the solo and threads pools, which run tasks in the main process)."""
    from django.conf import settings

    with _host_lock:
        current = _host
    if current is None or current.owner != f"{socket.gethostname()}:{os.getpid()}":
        return
    current.drain(settings.RUN_SHUTDOWN_GRACE_SECONDS)


def host() -> RunHost:
    """The process-wide host, started on first use (after a fork, in the child)."""
    global _host
    with _host_lock:
        if _host is None or _host.owner != f"{socket.gethostname()}:{os.getpid()}":
            _host = RunHost()
        return _host

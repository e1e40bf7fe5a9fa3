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
from concurrent.futures import Future
from functools import partial

from django.db import close_old_connections

from conversations import executor

log = logging.getLogger(__name__)


class RunHost:
    def __init__(self) -> None:
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._loop = asyncio.new_event_loop()
        self._held: dict[executor.Claim, Future[str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._loop.run_forever, name="run-host-loop", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="run-host-heartbeat", daemon=True).start()

    def submit(self, held: executor.Claim) -> Future[str]:
        # A fresh context: the caller's (e.g. asgiref's thread markers) must not leak into the
        # run, whose database calls would then try the caller's executor.
        future = contextvars.Context().run(
            asyncio.run_coroutine_threadsafe, executor.execute(held), self._loop
        )
        with self._lock:
            self._held[held] = future
        future.add_done_callback(partial(self._done, held))
        return future

    def _done(self, held: executor.Claim, _future: Future[str]) -> None:
        with self._lock:
            future = self._held.pop(held, None)
        if future is not None and not future.cancelled() and future.exception() is not None:
            log.error(
                "run %s attempt %s crashed", held.run_id, held.attempt, exc_info=future.exception()
            )

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._held)

    def _heartbeat(self) -> None:
        interval = max(executor.lease_seconds() / 3, 0.2)
        while not self._stop.wait(interval):
            with self._lock:
                claims = list(self._held)
            if not claims:
                continue
            try:
                lost = executor.renew(claims)
            except Exception:  # the database may be away for a moment; try again next beat
                log.warning("lease renewal failed", exc_info=True)
                continue
            finally:
                close_old_connections()
            for held in lost:
                with self._lock:
                    future = self._held.get(held)
                if future is not None:
                    log.info(
                        "run %s attempt %s lost its lease; stopping it", held.run_id, held.attempt
                    )
                    future.cancel()


_host: RunHost | None = None
_host_lock = threading.Lock()


def host() -> RunHost:
    """The process-wide host, started on first use (after a fork, in the child)."""
    global _host
    with _host_lock:
        if _host is None or _host.owner != f"{socket.gethostname()}:{os.getpid()}":
            _host = RunHost()
        return _host

"""Python's cyclic garbage collector, set for long-lived server processes.

A worker's runs create short-lived reference cycles all the time (asyncio futures and their
callbacks, exceptions and their tracebacks, the Agents SDK's per-run objects). With Python's
default first threshold (a collection of the youngest objects every 700 net allocations of
container objects), a worker holding 50 streamed runs collected several hundred times in
15 seconds, and every older collection walked the whole heap that Django, the Agents SDK and
their libraries built at import: about a tenth of the worker's CPU (docs/benchmark.md).

`tune()`, called once a process has imported what it serves with (the web process after its
ASGI application is built, a worker when it is ready and in each pool process it forks):

- moves every object alive then into the collector's permanent generation (`gc.freeze()`):
  modules, classes, settings and the like are never garbage, and no later collection walks
  them (nor touches their pages, which a forked pool process then shares with its parent);
- raises the first threshold to `GC_GEN0_THRESHOLD` (default 20 000; 0 keeps Python's):
  the cycles that do form are collected in fewer, larger passes, most of what is allocated
  between two passes is freed by reference counting meanwhile, and the memory the waiting
  garbage holds stays small (a few MB).

Collection is never turned off: cycles are still found and freed.
"""

from __future__ import annotations

import gc

from django.conf import settings


def tune() -> None:
    threshold = settings.GC_GEN0_THRESHOLD
    if threshold > 0:
        _gen0, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(threshold, gen1, gen2)
    gc.freeze()

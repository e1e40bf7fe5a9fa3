"""CPU time and resident memory of the server's processes, sampled with psutil.

A `Group` is a named set of processes (web, worker, PostgreSQL, Redis). A background thread
samples every group a few times a second: each process's CPU time (user + system) and RSS. CPU
used between two `mark`s is, per process, its CPU at the last sample (or at the mark) minus its
CPU at the first mark (0 for a process born in between): a process that ends between samples
loses at most one sampling interval of CPU.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

SAMPLE_INTERVAL_S = 0.2

# A PostgreSQL backend's title: "postgres: [cluster: ]user database host(port) state".
_BACKEND = re.compile(r"^postgres: (?:\S+: )?(\S+) (\S+) ")


@dataclass
class Group:
    name: str
    find: Callable[[], list[psutil.Process]]
    note: str = ""
    cpu: dict[int, float] = field(default_factory=dict)  # pid -> last CPU seconds seen
    rss_peak: int = 0  # peak of the group's summed RSS, bytes
    seen: set[int] = field(default_factory=set)


def tree(pid: int) -> Callable[[], list[psutil.Process]]:
    """The process and its descendants (a Celery worker forks its pool)."""

    def find() -> list[psutil.Process]:
        try:
            root = psutil.Process(pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    return find


def postgres_backends(postmaster: int, database: str) -> Callable[[], list[psutil.Process]]:
    """Every backend of `database` (the server may serve other databases too)."""

    def find() -> list[psutil.Process]:
        try:
            children = psutil.Process(postmaster).children()
        except psutil.Error:
            return []
        found = []
        for child in children:
            try:
                match = _BACKEND.match(" ".join(child.cmdline()))
            except psutil.Error:
                continue
            if match and match.group(2) == database:
                found.append(child)
        return found

    return find


def single(pid: int) -> Callable[[], list[psutil.Process]]:
    def find() -> list[psutil.Process]:
        try:
            return [psutil.Process(pid)]
        except psutil.Error:
            return []

    return find


class Sampler:
    def __init__(self, groups: list[Group], interval: float = SAMPLE_INTERVAL_S) -> None:
        self.groups = groups
        self.interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)

    def start(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        with self._lock:
            for group in self.groups:
                rss = 0
                for proc in group.find():
                    try:
                        with proc.oneshot():
                            times = proc.cpu_times()
                            memory = proc.memory_info()
                    except psutil.Error:
                        continue
                    group.cpu[proc.pid] = times.user + times.system
                    group.seen.add(proc.pid)
                    rss += memory.rss
                group.rss_peak = max(group.rss_peak, rss)

    def mark(self) -> dict[str, dict[int, float]]:
        """Sample now; the CPU seconds of every process so far, by group."""
        self.sample()
        with self._lock:
            return {g.name: dict(g.cpu) for g in self.groups}

    def reset_peaks(self) -> None:
        with self._lock:
            for group in self.groups:
                group.rss_peak = 0
                group.seen = set()  # the next sample (the window's first mark) fills it

    def peaks(self) -> dict[str, int]:
        with self._lock:
            return {g.name: g.rss_peak for g in self.groups}

    def processes(self) -> dict[str, int]:
        """How many processes each group had during the cell (connection churn shows here)."""
        with self._lock:
            return {g.name: len(g.seen) for g in self.groups}


def cpu_between(start: dict[str, dict[int, float]], end: dict[str, dict[int, float]]) -> dict:
    """CPU seconds used by each group between two marks."""
    out: dict[str, float] = {}
    for name, after in end.items():
        before = start.get(name, {})
        out[name] = sum(max(0.0, cpu - before.get(pid, 0.0)) for pid, cpu in after.items())
    return out


def load_average() -> list[float]:
    return [round(x, 2) for x in psutil.getloadavg()]


def now() -> float:
    return time.monotonic()

"""Sampling profiles of the web and worker processes during a cell, with py-spy.

`py-spy record --format raw` writes collapsed stacks ("frame;frame;frame count"); `summarise`
ranks functions by self time (the leaf frame) and by inclusive time (anywhere on the stack,
counted once per sample), and packages by self time, in percent of the process's busy samples.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

RATE = 200  # samples per second


def executable() -> str | None:
    """py-spy next to this Python (the virtualenv's), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def available() -> bool:
    return executable() is not None


def start(
    pid: int, out: Path, duration_s: float, *, subprocesses: bool, gil: bool = True
) -> subprocess.Popen[bytes]:
    """Record `pid` for `duration_s`. With `gil`, only the thread holding the GIL is sampled:
    where the process spends CPU in Python. Without it, every thread that is not idle: also
    where it waits (e.g. on PostgreSQL), which shows serialisation rather than cost."""
    argv = [
        str(executable()), "record", "--pid", str(pid), "--format", "raw",
        "--output", str(out), "--rate", str(RATE), "--duration", str(max(1, round(duration_s))),
        "--nonblocking", "--threads",
    ]  # fmt: skip
    if subprocesses:
        argv.append("--subprocesses")
    if gil:
        argv.append("--gil")
    log = out.with_suffix(".log").open("wb")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def _frame(frame: str) -> str:
    # py-spy: "function (path/to/module.py:line)"; keep function and file, drop the line.
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "python3.11/", "python3.12/", "wt-bench/", "/work/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})" if path else name


def _package(frame: str) -> str:
    """The package (or module of the project) a frame's file belongs to."""
    where = frame.rpartition(" (")[2].rstrip(")")
    parts = where.split("/")
    if len(parts) == 1:
        return parts[0].removesuffix(".py") or "?"
    if parts[0] in ("django", "agents", "channels") and len(parts) > 2:
        return "/".join(parts[:2])  # django/db, agents/models: big enough to split
    return parts[0]


_MACHINERY = {
    "Thread._bootstrap",
    "Thread._bootstrap_inner",
    "Thread.run",
    "_run_module_as_main",
    "_run_code",
    "<module>",
    "main",
    "_worker",
    "BaseEventLoop.run_forever",
}


def _role(frames: list[str]) -> str:
    """What a thread does: its outermost frame below the thread and runpy machinery."""
    for frame in frames:
        if frame.split(" (", 1)[0] not in _MACHINERY:
            return frame
    return frames[-1] if frames else "?"


def summarise(path: Path, top: int = 20, *, seconds: float | None = None) -> dict[str, Any]:
    """`seconds`: the recording's length, to express each thread's busy share of it."""
    threads: Counter[str] = Counter()
    roles: dict[str, Counter[str]] = {}
    self_counts: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    if not path.exists():
        return {"samples": 0, "self": [], "inclusive": [], "packages": []}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        raw = [f for f in stack.split(";") if f and not f.startswith("process ")]
        thread = next((f for f in raw if f.startswith("thread ")), "thread ?")
        frames = [_frame(f) for f in raw if not f.startswith("thread ")]
        if not frames:
            continue
        threads[thread] += count
        roles.setdefault(thread, Counter())[_role(frames)] += count
        total += count
        self_counts[frames[-1]] += count
        packages[_package(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count

    def ranked(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": name, "samples": n, "percent": round(100 * n / total, 1)}
            for name, n in counter.most_common(top)
        ]

    window = (seconds or 0) * RATE

    def label(thread: str) -> str:
        role = roles[thread].most_common(1)[0][0]
        name = thread.split("): ", 1)[1] if "): " in thread else ""
        return f"{name}: {role}" if name else role

    busy = [
        {
            "function": label(thread),
            "samples": n,
            "percent": round(100 * n / window, 1) if window else None,
        }
        for thread, n in threads.most_common(8)
    ]
    return {
        "samples": total,
        "threads": busy,
        "self": ranked(self_counts),
        "inclusive": ranked(inclusive),
        "packages": ranked(packages),
    }

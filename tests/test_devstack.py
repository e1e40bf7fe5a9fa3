"""`make run` and `make test` with a PostgreSQL server of your own: the database the URL names is
created when the server does not have it yet, and left as it is when it does."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from controlplane import devstack

pytestmark = pytest.mark.skipif(
    not os.environ.get("DATABASE_URL"), reason="needs a PostgreSQL server of your own"
)


@pytest.fixture
def missing_database():
    parts = urlsplit(os.environ["DATABASE_URL"])
    name = f"cp_devstack_{uuid.uuid4().hex[:8]}"
    admin = urlunsplit(parts._replace(path="/postgres"))
    yield urlunsplit(parts._replace(path=f"/{name}")), name, admin
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def _exists(admin: str, name: str) -> bool:
    with psycopg.connect(admin) as conn:
        return bool(conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone())


def test_the_database_a_url_names_is_created_once(missing_database):
    url, name, admin = missing_database
    assert not _exists(admin, name)
    assert devstack.ensure_database(url) is True
    assert _exists(admin, name)
    assert devstack.ensure_database(url) is False  # there already: nothing changes


def test_a_command_run_with_the_services_finds_its_database(missing_database):
    url, _, _ = missing_database
    env = {**os.environ, "DATABASE_URL": url}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "controlplane.devstack",
            "exec",
            "--",
            sys.executable,
            "-c",
            f"import psycopg; psycopg.connect({url!r}).close(); print('connected')",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "created the database DATABASE_URL names" in done.stdout
    assert "connected" in done.stdout


def _uvicorn_setting(env: dict[str, str]) -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "controlplane.devstack",
            "exec",
            "--",
            sys.executable,
            "-c",
            "import uvicorn; c = uvicorn.main.make_context('uvicorn', ['x:app']); "
            "print(c.params['ws_per_message_deflate'])",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(("given", "used"), [(None, "False"), ("true", "True")])
def test_the_web_process_sends_uncompressed_websocket_frames_unless_told(given, used):
    env = {**os.environ}
    env.pop("UVICORN_WS_PER_MESSAGE_DEFLATE", None)
    if given is not None:
        env["UVICORN_WS_PER_MESSAGE_DEFLATE"] = given
    # What uvicorn itself makes of the environment `make run` and the bench start it with.
    assert _uvicorn_setting(env) == used

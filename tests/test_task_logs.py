"""A real worker logs its tasks as Celery does, but not the run kick (controlplane/logfilters.py):
`conversations.run_execute` hands the run to the run host and returns, twice a run."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.core.cache import cache

from controlplane.celery import app
from controlplane.logfilters import QuietTasks
from controlplane.tasks import ping
from conversations.tasks import run_execute

ROOT = Path(__file__).resolve().parents[1]


def _record(level: int, name: str) -> logging.LogRecord:
    context = {"id": "1", "name": name, "args": "()", "kwargs": "{}", "eta": None}
    return logging.LogRecord(
        "celery.app.trace", level, __file__, 1, "Task %(name)s", (context,), None
    )


def test_the_filter_drops_the_named_tasks_info_lines_only():
    quiet = QuietTasks(["conversations.run_execute"])
    assert not quiet.filter(_record(logging.INFO, "conversations.run_execute"))
    assert quiet.filter(_record(logging.INFO, "controlplane.ping"))
    assert quiet.filter(_record(logging.ERROR, "conversations.run_execute"))  # failures pass


@pytest.mark.slow
def test_a_worker_logs_other_tasks_but_not_the_run_kick(settings):
    queue = f"test-{uuid.uuid4().hex[:8]}"
    prefix = settings.CACHES["default"]["KEY_PREFIX"]
    env = {**os.environ, "CACHE_KEY_PREFIX": prefix}
    worker = subprocess.Popen(
        [
            sys.executable, "-m", "celery", "-A", "controlplane", "worker",
            "--concurrency", "1", "--queues", queue,
            "--without-mingle", "--without-gossip", "--loglevel", "INFO",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        nonce = uuid.uuid4().hex
        with app.connection_for_write() as conn:
            # A run that does not exist: the host finds nothing to claim. One process, in order:
            # once the ping has run, so has the kick.
            run_execute.apply_async(args=[str(uuid.uuid4())], queue=queue, connection=conn)
            ping.apply_async(args=[nonce], queue=queue, connection=conn)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and cache.get(f"ping:{nonce}") is None:
            assert worker.poll() is None, worker.stdout.read()
            time.sleep(0.2)
        assert cache.get(f"ping:{nonce}") == "pong"
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            output, _ = worker.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            output, _ = worker.communicate()
    assert "Task controlplane.ping[" in output and "succeeded" in output, output
    assert "conversations.run_execute[" not in output, output

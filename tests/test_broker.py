"""A real Celery worker consumes from each supported broker: Redis (the default) and RabbitMQ."""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest
from django.conf import settings
from django.core.cache import cache

from controlplane.celery import app
from controlplane.tasks import ping

ROOT = Path(__file__).resolve().parents[1]


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    if parsed.scheme.endswith("socket") or parsed.scheme == "unix":
        return Path(parsed.path).exists()
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 5672), timeout=1):
            return True
    except OSError:
        return False


def _broker_urls():
    urls = [pytest.param(settings.CELERY_BROKER_URL, id="redis")]
    amqp = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
    urls.append(pytest.param(amqp, id="rabbitmq"))
    return urls


@pytest.mark.slow
@pytest.mark.parametrize("broker_url", _broker_urls())
def test_a_worker_runs_a_task_from_the_broker(broker_url, settings):
    if not _reachable(broker_url):
        if os.environ.get("CI"):
            pytest.fail(f"broker {urlparse(broker_url).scheme} not reachable in CI: {broker_url}")
        pytest.skip(f"no broker at {urlparse(broker_url).netloc}; CI runs this with RabbitMQ")
    queue = f"test-{uuid.uuid4().hex[:8]}"
    prefix = settings.CACHES["default"]["KEY_PREFIX"]
    env = {**os.environ, "CELERY_BROKER_URL": broker_url, "CACHE_KEY_PREFIX": prefix}
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "controlplane",
            "worker",
            "--pool",
            "solo",
            "--queues",
            queue,
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            "WARNING",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        nonce = uuid.uuid4().hex
        # Send through the broker under test, not the default one.
        with app.connection_for_write(broker_url) as conn:
            ping.apply_async(args=[nonce], queue=queue, connection=conn)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and cache.get(f"ping:{nonce}") is None:
            assert worker.poll() is None, worker.stdout.read()
            time.sleep(0.2)
        assert cache.get(f"ping:{nonce}") == "pong"
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()

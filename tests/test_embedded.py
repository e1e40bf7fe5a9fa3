"""`make run` from nothing: no environment, no services. The product must come up on embedded
PostgreSQL and Redis, let the printed account log in, stop cleanly on Ctrl-C, and find its data
again on the next start."""

from __future__ import annotations

import http.cookiejar
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
CLEARED = (
    "DATABASE_URL",
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "DJANGO_SECRET_KEY",
    "CONTROLPLANE_EMBEDDED",
    "DATABASE_TEST_NAME",
    "DJANGO_SETTINGS_MODULE",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, var: Path):
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if k not in CLEARED}
        env.update(CONTROLPLANE_VAR_DIR=str(var), PORT=str(self.port), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane.devstack", "run"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_for(self, pattern: str, timeout: float = 60) -> None:
        """Until a line of the output matches `pattern`."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.output, re.M):
            assert time.monotonic() < deadline, f"no line matching {pattern}:\n{self.output}"
            assert self.proc.poll() is None, f"make run exited early:\n{self.output}"
            time.sleep(0.2)

    def wait_healthy(self, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"make run exited early:\n{self.output}"
            try:
                with urllib.request.urlopen(self.url("/healthz"), timeout=5) as response:
                    if response.status == 200:
                        return response.read()
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"not healthy in {timeout}s:\n{self.output}")

    def ctrl_c(self, timeout: float = 60) -> int:
        os.killpg(self.proc.pid, signal.SIGINT)  # what a terminal sends to the whole group
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"did not stop within {timeout}s:\n{self.output}")
        self.reader.join(timeout=5)
        return code


def _login(stack: Stack, email: str, password: str) -> str:
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(stack.url("/login/"), timeout=10).read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    data = urllib.parse.urlencode(
        {"csrfmiddlewaretoken": token, "username": email, "password": password}
    ).encode()
    request = urllib.request.Request(
        stack.url("/login/"), data=data, headers={"Referer": stack.url("/login/")}
    )
    with opener.open(request, timeout=10) as response:
        return response.geturl(), response.read().decode()


def _servers_running(var: Path) -> list[str]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if str(var) in cmd or (proc.info["name"] == "redis-server" and str(var) in cmd):
            found.append(cmd)
    return found


@pytest.mark.slow
def test_make_run_from_nothing_then_again(tmp_path):
    var = tmp_path / "var"
    first = Stack(var)
    try:
        first.wait_healthy()
        match = re.search(r"E-mail:\s+(\S+)\s+Password:\s+(\S+)", first.output)
        assert match, f"no account printed:\n{first.output}"
        email, password = match.groups()
        url, page = _login(first, email, password)
        assert url.endswith("/t/demo/"), url
        assert "Overview" in page and "Demo" in page
        for prefix in ("web", "worker", "beat"):  # the worker may log after web is up
            first.wait_for(rf"^\d\d:\d\d:\d\d {prefix}\s+\|")
    finally:
        code = first.ctrl_c()
    assert code == 0, first.output
    assert "devstack: stopped" in first.output
    assert not _servers_running(var), "embedded servers left running"

    second = Stack(var)
    try:
        second.wait_healthy()
        assert "Password:" not in second.output and "exists" in second.output
        url, _ = _login(second, email, password)  # the data survived the restart
        assert url.endswith("/t/demo/")
    finally:
        assert second.ctrl_c() == 0, second.output
    assert not _servers_running(var)

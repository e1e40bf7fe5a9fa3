"""The suite's socket guard (tests/conftest.py): no test reaches beyond this machine, and a
connection off it that did not come through the egress client fails the test that made it."""

from __future__ import annotations

import socket
import time

import pytest

from tests import conftest

OFF_THE_MACHINE = ("192.0.2.1", 80)  # TEST-NET-1: routed nowhere


@pytest.fixture
def bypasses():
    """The bypasses this test made, taken from the guard so that the test itself passes."""
    seen: list[object] = []
    yield seen
    assert conftest.BYPASSED == seen
    conftest.BYPASSED.clear()


def test_a_plain_connection_off_the_machine_is_refused_at_once_and_recorded(bypasses):
    started = time.monotonic()
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError, match="socket guard"):
        sock.connect(OFF_THE_MACHINE)
    with socket.socket() as sock:
        assert sock.connect_ex(OFF_THE_MACHINE) != 0

    assert time.monotonic() - started < 1  # no packet left: nothing to wait for
    bypasses.extend([OFF_THE_MACHINE, OFF_THE_MACHINE])


def test_a_name_connect_would_resolve_itself_is_refused(bypasses):
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("example.com", 80))
    bypasses.append(("example.com", 80))


def test_loopback_and_unix_sockets_pass(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
        with socket.create_connection(("localhost", server.getsockname()[1]), timeout=5):
            pass
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)


def test_the_egress_clients_connection_off_the_machine_is_refused_without_blame(monkeypatch):
    from controlplane import egress

    monkeypatch.setattr(egress, "connection_is_guarded", lambda: True)
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(OFF_THE_MACHINE)
    assert conftest.BYPASSED == []

"""The one outbound HTTP client (controlplane.egress).

Everything here talks to a real HTTP server on 127.0.0.1 and nowhere else: host names are answered
by a fake resolver (no DNS query leaves the process), and a socket guard refuses, without sending
anything, every connection that is not to loopback or that did not go through the egress module.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import http.server
import ipaddress
import json
import pickle
import re
import socket
import ssl
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpcore
import httpx
import httpx2
import openai
import pytest
from django.core.exceptions import ImproperlyConfigured

from controlplane import egress
from controlplane.egress import EgressDenied, EgressError

PUBLIC = "93.184.215.14"  # a public address; the socket guard makes sure nothing is sent there
PUBLIC_ONLY = "outbound requests may only reach public addresses"


# --- A real local server --------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def _route(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        self.server.requests.append((self.command, parts.path, self.headers.get("Host")))
        try:
            route = "route_" + parts.path.strip("/").replace("-", "_").replace("/", "_")
            getattr(self, route, self.route_404)(query)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, which is what several tests want

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def route_404(self, query: dict[str, str]) -> None:
        self._send(404, b"not found")

    def route_page(self, query: dict[str, str]) -> None:
        self._send(
            200,
            b"hello from the test server",
            {"Content-Type": "text/plain; charset=utf-8", "X-Seen-Host": self.headers["Host"]},
        )

    def route_echo(self, query: dict[str, str]) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode()
        seen = {"method": self.command, "headers": dict(self.headers.items()), "body": body}
        self._send(200, json.dumps(seen).encode(), {"Content-Type": "application/json"})

    def route_v1_models(self, query: dict[str, str]) -> None:
        # Just enough of an OpenAI-compatible API for the client to list models.
        models = {"object": "list", "data": [{"id": "m1", "object": "model", "created": 0}]}
        self._send(200, json.dumps(models).encode(), {"Content-Type": "application/json"})

    def route_redirect(self, query: dict[str, str]) -> None:
        self._send(int(query.get("status", "302")), b"", {"Location": query["to"]})

    def route_loop(self, query: dict[str, str]) -> None:
        self._send(302, b"", {"Location": "/loop"})

    def route_huge(self, query: dict[str, str]) -> None:
        # No Content-Length: the body ends when the connection does, so only counting stops it.
        self.send_response(200)
        self.end_headers()
        chunk = b"x" * 65536
        for _ in range(64):  # 4 MiB
            self.wfile.write(chunk)

    def route_huge_declared(self, query: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(50_000_000))
        self.end_headers()
        self.wfile.write(b"x" * 1000)

    def route_slow(self, query: dict[str, str]) -> None:
        self.server.stop.wait(30)  # released when the server stops; no test waits for it
        self._send(200, b"finally")

    def route_drip(self, query: dict[str, str]) -> None:
        # A byte every 50 ms: every single read is quick, only a total time limit stops this.
        self.send_response(200)
        self.end_headers()
        for _ in range(100):  # then end, so a client without a total limit fails, not hangs
            if self.server.stop.wait(0.05):
                return
            self.wfile.write(b".")
            self.wfile.flush()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.stop = threading.Event()
        self.requests: list[tuple[str, str, str | None]] = []
        self.port = self.server_address[1]
        if context is not None:
            self.socket = context.wrap_socket(self.socket, server_side=True)

    def __enter__(self) -> _Server:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()

    def url(self, path: str = "/page", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    with _Server() as running:
        yield running


# --- Fake DNS, socket guard, settings ---------------------------------------------------------


@dataclass
class FakeDNS:
    """Answers for host names: each call takes the next answer; the last one repeats."""

    answers: dict[str, list[list[str]]] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)

    def add(self, host: str, *answers: list[str]) -> None:
        self.answers[host] = list(answers)


@pytest.fixture(autouse=True)
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    fake = FakeDNS()
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        try:
            ipaddress.ip_address(name)
        except ValueError:
            pass
        else:  # a numeric address involves no lookup
            return real(host, port, *args, **kwargs)
        fake.calls[name] += 1
        if name not in fake.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        answers = fake.answers[name]
        addresses = answers[min(fake.calls[name], len(answers)) - 1]
        return [
            (
                socket.AF_INET6 if ":" in a else socket.AF_INET,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                (a, port, 0, 0) if ":" in a else (a, port),
            )
            for a in addresses
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return fake


@dataclass
class SocketGuard:
    connected: list[tuple[str, int]] = field(default_factory=list)
    refused: list[tuple[str, int]] = field(default_factory=list)
    outside_expected: bool = False


@pytest.fixture(autouse=True)
def guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[SocketGuard]:
    """Every outgoing connection must come from the egress backend; anything not to loopback is
    refused before a packet leaves (and must be expected by the test)."""
    state = SocketGuard()
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: Any) -> None:
        assert egress.connection_is_guarded(), f"a connection to {address} bypassed egress"
        host, port = address[0], address[1]
        if not ipaddress.ip_address(host).is_loopback:
            state.refused.append((host, port))
            raise ConnectionRefusedError(111, "refused by the test socket guard")
        state.connected.append((host, port))
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    yield state
    if not state.outside_expected:
        assert state.refused == [], "something tried to leave loopback"


@pytest.fixture
def allow_loopback(settings: Any) -> None:
    settings.EGRESS_ALLOWED_NETWORKS = list(egress.LOOPBACK_NETWORKS)


Get = Callable[..., Any]


@pytest.fixture(params=["sync", "async"])
def get(request: pytest.FixtureRequest) -> Get:
    """`fetch` and `afetch` behind one awaitable, so each behaviour is shown for both."""

    async def run(url: str, **kwargs: Any) -> egress.EgressResponse:
        method = kwargs.pop("method", "GET")
        if request.param == "sync":
            return await anyio.to_thread.run_sync(partial(egress.fetch, method, url, **kwargs))
        return await egress.afetch(method, url, **kwargs)

    return run


# --- Addresses ---------------------------------------------------------------------------------


async def test_loopback_is_refused_by_default_naming_the_address(get: Get, server: _Server, guard):
    url = server.url()
    with pytest.raises(EgressDenied) as refused:
        await get(url)
    assert str(refused.value) == (
        f"{url} resolves to a loopback address (127.0.0.1); outbound requests may only reach "
        "public addresses"
    )
    assert isinstance(refused.value, ValueError)
    assert guard.connected == [] and server.requests == []


async def test_private_address_message(get: Get):
    with pytest.raises(EgressDenied) as refused:
        await get("http://10.0.0.5/")
    assert str(refused.value) == (
        "http://10.0.0.5/ resolves to a private address (10.0.0.5); outbound requests may only "
        "reach public addresses"
    )


async def test_allow_listed_loopback_is_fetched(get: Get, server: _Server, allow_loopback):
    response = await get(server.url())
    assert response.status_code == 200
    assert response.text == "hello from the test server"
    assert response.content == b"hello from the test server"
    assert response.url == server.url()
    assert response.headers["x-seen-host"] == f"127.0.0.1:{server.port}"


async def test_post_with_json_body(get: Get, server: _Server, allow_loopback):
    response = await get(server.url("/echo"), method="POST", json={"q": "weather"})
    seen = response.json()
    assert seen["method"] == "POST"
    assert json.loads(seen["body"]) == {"q": "weather"}
    assert seen["headers"]["Content-Type"] == "application/json"


# Refused even with loopback allow-listed: the spelling itself, or where it leads, is the problem.
ALWAYS_REFUSED = [
    ("http:///", "has no host name"),
    ("http://0x7f.1/", "numeric host written in an unusual form (0x7f.1)"),
    ("http://2130706433/", "numeric host written in an unusual form (2130706433)"),
    ("http://127.1/", "numeric host written in an unusual form (127.1)"),
    ("http://0177.0.0.1/", "is not a valid URL (invalid IPv4 address: '0177.0.0.1')"),
    ("http://%31%32%37.0.0.1/", "has an invalid host name"),
    ("http://localhost./", "has a host name ending in a dot"),
    ("http://evil@127.0.0.1/", "has a user name or password before the host"),
    ("http://example.com@127.0.0.1/", "has a user name or password before the host"),
    ("http://example.com\\@127.0.0.1/", "contains spaces, control characters or backslashes"),
    ("http://127.0.0.1 /", "contains spaces, control characters or backslashes"),
    ("ftp://example.com/", "uses the scheme 'ftp'; outbound requests may only use http and https"),
    ("file:///etc/passwd", "uses the scheme 'file'"),
    ("gopher://127.0.0.1:70/", "uses the scheme 'gopher'"),
    ("http://example.com:99999/", "has an invalid port (99999)"),
    ("http://0.0.0.0/", f"resolves to an unspecified address (0.0.0.0); {PUBLIC_ONLY}"),
    ("http://[::]/", "resolves to an unspecified address (::)"),
    ("http://224.0.0.1/", "resolves to a multicast address (224.0.0.1)"),
    ("http://169.254.169.254/latest/", f"a link-local address (169.254.169.254); {PUBLIC_ONLY}"),
    ("http://metadata.google.internal/", "resolves to a link-local address (169.254.169.254)"),
    ("http://[fe80::1]/", "resolves to a link-local address (fe80::1)"),
    ("http://[fe80::1%25eth0]/", "has an invalid host (fe80::1%25eth0)"),
    ("http://10.0.0.5/", "resolves to a private address (10.0.0.5)"),
    ("http://192.168.1.1/", "resolves to a private address (192.168.1.1)"),
    ("http://[fd00::1]/", "resolves to a private address (fd00::1)"),
    ("http://100.64.0.1/", "resolves to a non-public address (100.64.0.1)"),
    ("http://240.0.0.1/", "resolves to a reserved address (240.0.0.1)"),
    ("http://[::ffff:10.0.0.5]/", "resolves to a private address (::ffff:10.0.0.5)"),
    ("http://[::ffff:169.254.169.254]/", "resolves to a link-local address"),
    ("http://[64:ff9b::a00:5]/", "resolves to a private address (64:ff9b::a00:5)"),  # NAT64
    ("http://[2002:a00:5::]/", "resolves to a private address (2002:a00:5::)"),  # 6to4
    ("http://mixed.test/", "resolves to a private address (10.0.0.5)"),
]
# Refused by default, and reachable once loopback is allow-listed (as the tests do).
LOOPBACK_FORMS = [
    ("http://127.0.0.1/", "resolves to a loopback address (127.0.0.1)"),
    ("http://127.8.9.10/", "resolves to a loopback address (127.8.9.10)"),
    ("http://[::1]/", "resolves to a loopback address (::1)"),
    ("http://[::ffff:127.0.0.1]/", "resolves to a loopback address (::ffff:127.0.0.1)"),
    ("http://[64:ff9b::7f00:1]/", "resolves to a loopback address (64:ff9b::7f00:1)"),
    ("http://localhost/", "resolves to a loopback address (127.0.0.1)"),
]


@pytest.fixture
def names(dns: FakeDNS) -> None:
    dns.add("metadata.google.internal", ["169.254.169.254"])
    dns.add("mixed.test", [PUBLIC, "10.0.0.5"])
    dns.add("localhost", ["127.0.0.1"])


@pytest.mark.parametrize(("url", "reason"), ALWAYS_REFUSED + LOOPBACK_FORMS)
async def test_bypass_forms_are_refused(get: Get, names, guard, url: str, reason: str):
    with pytest.raises(EgressDenied) as refused:
        await get(url)
    assert reason in str(refused.value)
    assert guard.connected == []
    with pytest.raises(EgressDenied) as checked:
        egress.check_url(url)
    assert str(checked.value) == str(refused.value)


@pytest.mark.parametrize(("url", "reason"), ALWAYS_REFUSED)
async def test_bypass_forms_are_refused_with_loopback_allowed(
    get: Get, names, allow_loopback, guard, url: str, reason: str
):
    with pytest.raises(EgressDenied) as refused:
        await get(url)
    assert reason in str(refused.value)
    assert guard.connected == []


def test_errors_survive_pickling_for_celery():
    denied = EgressDenied("http://10.0.0.5/", "resolves to a private address", "http://a.test/")
    copy = pickle.loads(pickle.dumps(denied))
    assert (
        str(copy)
        == str(denied)
        == ("http://a.test/ redirected to http://10.0.0.5/, which resolves to a private address")
    )
    assert (copy.url, copy.reason, copy.via) == (denied.url, denied.reason, denied.via)


async def test_messages_leave_out_credentials_and_query(get: Get):
    with pytest.raises(EgressDenied) as refused:
        await get("http://admin:hunter2@10.0.0.5/hook?token=s3cret")
    assert "hunter2" not in str(refused.value) and "s3cret" not in str(refused.value)
    assert str(refused.value).startswith("http://…@10.0.0.5/hook?…")


async def test_allowed_ports(get: Get, server: _Server, allow_loopback, settings):
    settings.EGRESS_ALLOWED_PORTS = [80, 443]
    with pytest.raises(EgressDenied) as refused:
        await get(server.url())
    assert f"uses port {server.port}; outbound requests may only use port(s) 80, 443" in str(
        refused.value
    )
    settings.EGRESS_ALLOWED_PORTS = [server.port]
    assert (await get(server.url())).status_code == 200


def test_misconfigured_networks_are_reported(settings):
    settings.EGRESS_ALLOWED_NETWORKS = ["10.0.0.0/33"]
    with pytest.raises(ImproperlyConfigured, match="EGRESS_ALLOWED_NETWORKS"):
        egress.check_url("http://10.0.0.5/")


def test_networks_from_a_comma_separated_string(settings):
    settings.EGRESS_ALLOWED_NETWORKS = "10.0.0.0/8, 192.168.0.0/16"
    assert egress.check_url("http://10.0.0.5/").addresses == ("10.0.0.5",)


# --- check_url -----------------------------------------------------------------------------------


def test_check_url_resolves_once_and_returns_every_address(dns: FakeDNS):
    dns.add("api.example.test", [PUBLIC, "2606:4700::1"])
    resolved = egress.check_url("https://api.example.test/v1")
    assert resolved == egress.ResolvedURL(
        url="https://api.example.test/v1",
        scheme="https",
        host="api.example.test",
        port=443,
        addresses=(PUBLIC, "2606:4700::1"),
    )
    assert dns.calls["api.example.test"] == 1


async def test_acheck_url(dns: FakeDNS):
    dns.add("api.example.test", [PUBLIC])
    assert (await egress.acheck_url("http://api.example.test:8080/")).port == 8080
    dns.add("rebound.test", ["10.1.2.3"])
    with pytest.raises(EgressDenied, match=r"private address \(10\.1\.2\.3\)"):
        await egress.acheck_url("http://rebound.test/")


async def test_unknown_host_is_an_error_not_a_denial(get: Get):
    with pytest.raises(EgressError, match=re.escape("could not find the address of nowhere.test")):
        egress.check_url("http://nowhere.test/")
    with pytest.raises(
        EgressError, match=re.escape("could not connect to http://nowhere.test/: could not")
    ):
        await get("http://nowhere.test/")


# --- Connecting to the address that was checked --------------------------------------------------


async def test_connects_to_the_checked_address_and_keeps_the_host_name(
    get: Get, server: _Server, dns: FakeDNS, guard, allow_loopback
):
    # DNS rebinding: the first answer passes the check, any later one points inside.
    dns.add("rebind.test", ["127.0.0.1"], ["10.0.0.5"])
    response = await get(server.url(host="rebind.test"))
    assert response.status_code == 200
    assert response.headers["x-seen-host"] == f"rebind.test:{server.port}"
    assert dns.calls["rebind.test"] == 1
    assert guard.connected == [("127.0.0.1", server.port)]


async def test_public_address_is_the_one_connected_to(get: Get, dns: FakeDNS, guard):
    dns.add("public.test", [PUBLIC], ["10.0.0.5"])
    guard.outside_expected = True
    with pytest.raises(EgressError) as failed:
        await get("http://public.test/")
    assert (
        str(failed.value) == "could not connect to http://public.test/: the connection was refused"
    )
    assert dns.calls["public.test"] == 1
    assert guard.refused == [(PUBLIC, 80)]


def test_the_pool_refuses_connections_the_transport_did_not_check(allow_loopback, server: _Server):
    """The backend fails closed; this also shows the transport's pool really uses it."""
    transport = egress.EgressTransport()
    with pytest.raises(EgressDenied, match="was not checked before connecting"):
        transport._pool.handle_request(httpcore.Request("GET", server.url()))


async def test_connection_refused_is_a_plain_error(get: Get, allow_loopback):
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    with pytest.raises(EgressError) as failed:
        await get(f"http://127.0.0.1:{port}/")
    assert str(failed.value) == (
        f"could not connect to http://127.0.0.1:{port}/: the connection was refused"
    )


# --- Redirects ----------------------------------------------------------------------------------


def _redirect(server: _Server, to: str, status: int = 302) -> str:
    return server.url(f"/redirect?{httpx.QueryParams({'to': to, 'status': status})}")


async def test_redirect_within_allowed_addresses_is_followed(
    get: Get, server: _Server, allow_loopback
):
    response = await get(_redirect(server, server.url()))
    assert response.status_code == 200
    assert response.url == server.url()
    assert response.text == "hello from the test server"


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("http://10.0.0.5/admin", "resolves to a private address (10.0.0.5)"),
        ("http://169.254.169.254/latest/", "resolves to a link-local address (169.254.169.254)"),
        ("http://metadata.google.internal/", "resolves to a link-local address (169.254.169.254)"),
        ("http://[::ffff:10.0.0.5]/", "resolves to a private address (::ffff:10.0.0.5)"),
        ("http://0x7f.1/", "has a numeric host written in an unusual form"),
        ("file:///etc/passwd", "uses the scheme 'file'"),
    ],
)
async def test_redirect_to_a_private_address_is_refused_although_the_first_hop_is_allowed(
    get: Get, server: _Server, names, allow_loopback, guard, target: str, reason: str
):
    first = _redirect(server, target)
    with pytest.raises(EgressDenied) as refused:
        await get(first)
    message = str(refused.value)
    assert message.startswith(f"{server.url('/redirect')}?… redirected to ")
    assert f", which {reason}" in message
    assert {address for address, _ in guard.connected} == {"127.0.0.1"}


async def test_redirect_limit(get: Get, server: _Server, allow_loopback):
    with pytest.raises(EgressError) as failed:
        await get(server.url("/loop"), max_redirects=2)
    assert str(failed.value) == f"{server.url('/loop')} redirected more than 2 times"


async def test_secret_headers_stay_with_their_origin(
    get: Get, server: _Server, dns: FakeDNS, allow_loopback
):
    dns.add("other.test", ["127.0.0.1"])
    headers = {"X-Api-Key": "k-123", "Authorization": "Bearer t", "Accept": "application/json"}
    same = (await get(_redirect(server, server.url("/echo")), headers=headers)).json()
    assert same["headers"]["X-Api-Key"] == "k-123"
    assert same["headers"]["Authorization"] == "Bearer t"

    other = _redirect(server, server.url("/echo", host="other.test"))
    seen = (await get(other, headers=headers)).json()
    assert "X-Api-Key" not in seen["headers"] and "Authorization" not in seen["headers"]
    assert seen["headers"]["Accept"] == "application/json"
    assert seen["headers"]["Host"] == f"other.test:{server.port}"


# --- Limits -------------------------------------------------------------------------------------


async def test_body_larger_than_the_limit_is_cut_off(get: Get, server: _Server, allow_loopback):
    with pytest.raises(EgressError) as failed:
        await get(server.url("/huge"), max_bytes=100_000)
    assert str(failed.value) == (
        f"the response from {server.url('/huge')} is larger than the limit of 100,000 bytes"
    )


async def test_declared_length_over_the_limit_is_refused_before_reading(
    get: Get, server: _Server, allow_loopback
):
    with pytest.raises(EgressError, match="is larger than the limit of 1,000,000 bytes"):
        await get(server.url("/huge-declared"))


async def test_body_at_the_limit_is_returned(get: Get, server: _Server, allow_loopback):
    body = b"hello from the test server"
    assert (await get(server.url(), max_bytes=len(body))).content == body


async def test_slow_server_times_out(get: Get, server: _Server, allow_loopback):
    with pytest.raises(EgressError) as failed:
        await get(server.url("/slow"), timeout=0.3)
    assert str(failed.value) == (
        f"the request to {server.url('/slow')} took longer than the limit of 0.3 seconds"
    )


async def test_timeout_is_total_not_per_read(get: Get, server: _Server, allow_loopback):
    # Each byte arrives well within 0.5 s; only a limit on the whole request ends this.
    with pytest.raises(EgressError, match=re.escape("took longer than the limit of 0.5 seconds")):
        await get(server.url("/drip"), timeout=0.5, max_bytes=10_000_000)


# --- The guarded httpx clients ------------------------------------------------------------------


async def test_guarded_async_client_enforces_the_same_rules(
    server: _Server, names, settings, guard
):
    async with egress.guarded_async_client(follow_redirects=True) as client:
        with pytest.raises(EgressDenied, match=r"loopback address \(127\.0\.0\.1\)"):
            await client.get(server.url())
        settings.EGRESS_ALLOWED_NETWORKS = list(egress.LOOPBACK_NETWORKS)
        response = await client.get(server.url())
        assert response.status_code == 200
        for target in ("http://169.254.169.254/", "http://metadata.google.internal/"):
            with pytest.raises(EgressDenied, match=r"link-local address \(169\.254\.169\.254\)"):
                await client.get(_redirect(server, target))
        with pytest.raises(EgressDenied, match="has a user name or password"):
            await client.get("http://evil@127.0.0.1/")
    assert {address for address, _ in guard.connected} == {"127.0.0.1"}


async def test_guarded_async_client_pins_the_checked_address(
    server: _Server, dns: FakeDNS, guard, allow_loopback
):
    dns.add("rebind.test", ["127.0.0.1"], ["169.254.169.254"])
    async with egress.guarded_async_client() as client:
        response = await client.get(server.url(host="rebind.test"))
    assert response.headers["x-seen-host"] == f"rebind.test:{server.port}"
    assert dns.calls["rebind.test"] == 1


def test_guarded_client_sync(server: _Server, allow_loopback, dns: FakeDNS):
    dns.add("metadata.google.internal", ["169.254.169.254"])
    with egress.guarded_client(follow_redirects=True) as client:
        assert client.get(server.url()).status_code == 200
        with pytest.raises(EgressDenied, match="link-local address"):
            client.get(_redirect(server, "http://metadata.google.internal/"))


@pytest.mark.parametrize("argument", ["transport", "mounts", "proxy", "trust_env"])
def test_guarded_clients_refuse_arguments_that_bypass_the_transport(argument: str):
    with pytest.raises(TypeError, match=argument):
        egress.guarded_async_client(**{argument: None})
    with pytest.raises(TypeError, match=argument):
        egress.guarded_client(**{argument: None})


# --- The httpx2 clients for the openai and mcp packages -----------------------------------------


@contextlib.contextmanager
def _no_session_left_open() -> Iterator[None]:
    """Fails if a model client's aiohttp session (its pool of connections to the provider) made
    inside is dropped without being closed: aiohttp warns when it collects one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    assert [str(w.message) for w in caught if "Unclosed" in str(w.message)] == []


async def test_openai_client_reaches_an_allowed_provider(server: _Server, allow_loopback):
    async def listed() -> list[str]:
        async with openai.AsyncOpenAI(
            api_key="sk-test",
            base_url=server.url("/v1"),
            http_client=egress.guarded_openai_http_client(timeout=5),
            max_retries=0,
        ) as client:
            return [m.id for m in (await client.models.list()).data]

    with _no_session_left_open():  # its connection is closed with it, not left to the end
        assert await listed() == ["m1"]


async def test_openai_client_with_a_metadata_base_url_is_refused(guard):
    async with openai.AsyncOpenAI(
        api_key="sk-test",
        base_url="http://169.254.169.254/v1",
        http_client=egress.guarded_openai_http_client(timeout=5),
        max_retries=0,
    ) as client:
        with pytest.raises(EgressDenied) as refused:
            await client.models.list()
    assert str(refused.value) == (
        "http://169.254.169.254/v1/models resolves to a link-local address (169.254.169.254); "
        "outbound requests may only reach public addresses"
    )
    assert guard.connected == [] and guard.refused == []


async def _enforces_the_rules(
    client: httpx2.AsyncClient, server: _Server, dns: FakeDNS, settings: Any, guard: SocketGuard
) -> None:
    """What every guarded httpx2 client must do, shown on `client`."""
    async with client:
        with pytest.raises(EgressDenied, match=r"loopback address \(127\.0\.0\.1\)"):
            await client.get(server.url())
        settings.EGRESS_ALLOWED_NETWORKS = list(egress.LOOPBACK_NETWORKS)
        assert (await client.get(server.url())).status_code == 200
        with pytest.raises(EgressDenied, match=r"link-local address \(169\.254\.169\.254\)"):
            await client.get(
                _redirect(server, "http://metadata.google.internal/"), follow_redirects=True
            )
        # DNS rebinding: the second answer is private; the connection goes to the first, looked
        # up once (the library does not look up again).
        dns.add("rebind.test", ["127.0.0.1"], ["10.0.0.5"])
        response = await client.get(server.url(host="rebind.test"))
        assert response.headers["x-seen-host"] == f"rebind.test:{server.port}"
        assert dns.calls["rebind.test"] == 1
        echoed = (await client.post(server.url("/echo"), json={"a": 1})).json()
        assert echoed["method"] == "POST" and json.loads(echoed["body"]) == {"a": 1}
    assert {address for address, _ in guard.connected} == {"127.0.0.1"}


async def test_mcp_client_factory_enforces_the_same_rules(
    server: _Server, dns: FakeDNS, names, settings, guard
):
    client = egress.mcp_httpx_client_factory(headers={"X-Test": "1"})
    assert isinstance(client, httpx2.AsyncClient)
    assert client.timeout.read == 300.0
    await _enforces_the_rules(client, server, dns, settings, guard)


async def test_the_model_client_on_aiohttp_enforces_the_same_rules(
    server: _Server, dns: FakeDNS, names, settings, guard
):
    client = egress.guarded_openai_http_client(timeout=5)
    assert isinstance(client._transport, egress.AiohttpEgressTransport)
    await _enforces_the_rules(client, server, dns, settings, guard)


async def test_the_model_client_sends_a_streamed_body_with_its_length(
    allow_loopback, server: _Server
):
    async def pieces():
        yield b'{"a": '
        yield b"1}"

    async with egress.guarded_openai_http_client(timeout=5) as client:
        response = await client.post(server.url("/echo"), content=pieces())
    seen = response.json()
    assert json.loads(seen["body"]) == {"a": 1}
    assert seen["headers"]["Content-Length"] == "8"
    assert "Transfer-Encoding" not in seen["headers"]


async def test_the_model_clients_failures_read_as_httpx2s(allow_loopback, server: _Server):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    async with egress.guarded_openai_http_client(timeout=5) as client:
        with pytest.raises(httpx2.ConnectError):
            await client.get(f"http://127.0.0.1:{closed}/")
        with pytest.raises(httpx2.ReadTimeout):
            await client.get(server.url("/slow"), timeout=httpx2.Timeout(5, read=0.2))


@pytest.mark.parametrize("server_class", ["MCPServerStreamableHttp", "MCPServerSse"])
async def test_agents_sdk_mcp_server_at_a_private_address_is_refused(server_class: str, guard):
    mcp = pytest.importorskip("agents.mcp")
    params = {
        "url": "http://10.0.0.5/mcp",
        "httpx_client_factory": egress.mcp_httpx_client_factory,
        "timeout": 5,
    }
    mcp_server = getattr(mcp, server_class)(name="tools", params=params)
    try:
        with pytest.raises((EgressDenied, BaseExceptionGroup)) as failed:
            await mcp_server.connect()
    finally:
        await mcp_server.cleanup()
    error: BaseException = failed.value
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, EgressDenied)
    assert "resolves to a private address (10.0.0.5)" in str(error)
    assert guard.refused == []


# --- TLS: SNI and certificate checks are for the host name, not the pinned address --------------


def _certificate(host: str) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


async def test_tls_uses_the_host_name_for_sni_and_certificate(
    dns: FakeDNS, allow_loopback, tmp_path
):
    cert_pem, key_pem = _certificate("tls.test")
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server_names: list[str | None] = []
    server_context.sni_callback = lambda _sock, name, _ctx: server_names.append(name)
    trust = ssl.create_default_context(cadata=cert_pem.decode())
    dns.add("tls.test", ["127.0.0.1"])
    dns.add("impostor.test", ["127.0.0.1"])

    with _Server(server_context) as tls:
        async with egress.guarded_async_client(verify=trust) as client:
            response = await client.get(f"https://tls.test:{tls.port}/page")
            assert response.status_code == 200
            assert response.headers["x-seen-host"] == f"tls.test:{tls.port}"
            assert server_names == ["tls.test"]
            # Same address, other name: the certificate is checked against the name.
            with pytest.raises(httpx.ConnectError, match="certificate verify failed"):
                await client.get(f"https://impostor.test:{tls.port}/page")
        # The model client's transport (aiohttp) alike.
        server_names.clear()
        async with egress.guarded_openai_http_client(verify=trust) as model_client:
            response = await model_client.get(f"https://tls.test:{tls.port}/page")
            assert response.headers["x-seen-host"] == f"tls.test:{tls.port}"
            assert server_names == ["tls.test"]
            with pytest.raises(httpx2.ConnectError, match="certificate verify failed"):
                await model_client.get(f"https://impostor.test:{tls.port}/page")

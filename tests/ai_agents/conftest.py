"""Fixtures for running agents for real: the project's fake OpenAI-compatible server and a real
MCP server (the `mcp` package's), both on loopback, which the egress guard is told to allow."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from mcp.server import MCPServer

from ai_agents import services
from ai_agents.fakeserver import FakeOpenAIServer


@pytest.fixture(autouse=True)
def _loopback_allowed(settings):
    settings.EGRESS_ALLOWED_NETWORKS = ["127.0.0.0/8", "::1/128"]
    settings.OFFLINE_MODEL_WORD_DELAY = 0


@pytest.fixture
def fake_llm() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(api_key="sk-fake-provider-key") as server:
        yield server


@pytest.fixture
def provider(world_a, fake_llm):
    return services.provider_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name="Fake LLM",
        base_url=fake_llm.base_url,
        default_model="fake-model",
        api_key="sk-fake-provider-key",
        timeout_seconds=5,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackMcp:
    """A real MCP server in a thread: tools `add` and `shout`, streamable HTTP and SSE."""

    def __init__(self) -> None:
        server = MCPServer("test-tools")

        @server.tool()
        def add(a: int, b: int) -> int:
            """Add two integers."""
            return a + b

        @server.tool()
        def shout(text: str) -> str:
            """Upper-case a text."""
            return text.upper()

        self.port = _free_port()
        from starlette.applications import Starlette
        from starlette.routing import Mount

        http_app = server.streamable_http_app(stateless_http=True, json_response=True)
        sse_app = server.sse_app()
        app = Starlette(
            routes=[Mount("/sse-app", app=sse_app), Mount("/", app=http_app)],
            lifespan=http_app.router.lifespan_context,
        )
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def sse_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/sse-app/sse"

    def wait_until_no_connections(self, timeout: float = 10) -> bool:
        """True once no client holds a connection to the server (False if one still does
        after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while self._server.server_state.connections:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def __enter__(self) -> LoopbackMcp:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the MCP server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture
def mcp_loopback() -> Iterator[LoopbackMcp]:
    with LoopbackMcp() as server:
        yield server


@pytest.fixture
def dead_port() -> int:
    return _free_port()  # nothing listens there


class SilentServer:
    """Accepts connections and never answers: an MCP server that hangs."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self.connected = threading.Event()  # a client connected
        self.hung_up = threading.Event()  # a client closed its connection
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connected.set()
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    if not conn.recv(65536):
                        break
                except OSError:
                    break
        self.hung_up.set()

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


class UnacceptingServer:
    """Listens and never accepts: the kernel completes the TCP handshake and holds the
    connection in the listen backlog, where no process ever reads it (a server that hangs
    before its accept loop)."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self.port = self._sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def unaccepting_server() -> Iterator[UnacceptingServer]:
    server = UnacceptingServer()
    yield server
    server.close()


class MuteAfterHandshake:
    """A streamable HTTP MCP server that declines the `server/discover` probe, completes the
    `initialize` handshake with a session id, and then never answers anything again (neither
    a request nor the DELETE that ends the session)."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            while True:
                head = [reader.readline()]
                while head[-1] not in (b"\r\n", b""):
                    head.append(reader.readline())
                if head[-1] == b"":
                    return
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                message = json.loads(reader.read(length)) if length else {}
                method = message.get("method")
                if method == "server/discover":
                    self._answer(
                        conn,
                        {
                            "jsonrpc": "2.0",
                            "id": message["id"],
                            "error": {"code": -32601, "message": "Method not found"},
                        },
                    )
                elif method == "initialize":
                    result = {
                        "protocolVersion": message["params"]["protocolVersion"],
                        "capabilities": {"tools": {}},
                        "serverInfo": {"name": "mute", "version": "1"},
                    }
                    self._answer(
                        conn,
                        {"jsonrpc": "2.0", "id": message["id"], "result": result},
                        b"Mcp-Session-Id: s1\r\n",
                    )
                elif message and "id" not in message:  # a notification
                    conn.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
                else:  # anything else: hold the connection, never answer
                    while conn.recv(65536):
                        pass
                    return

    @staticmethod
    def _answer(conn: socket.socket, body: dict, extra: bytes = b"") -> None:
        data = json.dumps(body).encode()
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + extra
            + b"Content-Length: %d\r\n\r\n" % len(data)
            + data
        )

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def mute_after_handshake() -> Iterator[MuteAfterHandshake]:
    server = MuteAfterHandshake()
    yield server
    server.close()

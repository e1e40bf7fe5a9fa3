"""The benchmark's LLM: `ai_agents.fakeserver`'s app, unchanged, with every streamed chat
completion timed.

    python -m bench.fakellm --port 0 [--ttft-ms N] [--token-delay-ms N]

For each `POST /v1/chat/completions` it records when the request arrived (before its body is
read) and when the first content token was handed to the server (the chunk after the role
chunk), under the run marker found in the request: the last `bench-...` word of the body, which
is the one of the newest user message (older turns come first in a chat request). The harness
subtracts this, run by run, from the time to first token its client saw.

Control routes (loopback only, like the fake's own `/_fake/*`):
``GET /_bench/timings``   ``{"timings": {marker: [ttft_ms, total_ms, arrived]}, "unmarked": n}``
    (`arrived`: the request's arrival on the wall clock, seconds) and forgets them (each cell
    reads its own).
``POST /_bench/config``   ``{"ttft_ms": N, "token_delay_ms": N}``: the timing of later answers.
"""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

from ai_agents import fakeserver
from ai_agents.fakeserver import FakeState

MARKER = re.compile(rb"bench-[0-9a-z]+-\d+-\d+")
# A content delta of the chat-completions stream; the role chunk before it has `"role"` first.
FIRST_TOKEN = b'"delta":{"content":"'
TIMED_PATH = "/v1/chat/completions"

Scope = dict[str, Any]


class Timings:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_marker: dict[str, tuple[float, float, float]] = {}
        self._unmarked = 0

    def add(self, marker: str | None, ttft_ms: float, total_ms: float, arrived: float) -> None:
        with self._lock:
            if marker is None:
                self._unmarked += 1
            else:
                self._by_marker[marker] = (ttft_ms, total_ms, arrived)

    def take(self) -> dict[str, Any]:
        with self._lock:
            out = {"timings": self._by_marker, "unmarked": self._unmarked}
            self._by_marker, self._unmarked = {}, 0
        return out


class TimedApp:
    """ASGI middleware around the fake's app: times chat completions, serves `/_bench/*`."""

    def __init__(self, app: Any, state: FakeState) -> None:
        self.app = app
        self.state = state
        self.timings = Timings()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path.startswith("/_bench/"):
            await self._control(scope, receive, send)
            return
        if path != TIMED_PATH:
            await self.app(scope, receive, send)
            return
        start, arrived = time.monotonic(), time.time()
        body = bytearray()
        first: float | None = None

        async def timed_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                body.extend(message.get("body", b""))
            return message

        async def timed_send(message: Any) -> None:
            nonlocal first
            if (
                first is None
                and message["type"] == "http.response.body"
                and FIRST_TOKEN in message.get("body", b"")
            ):
                first = time.monotonic()
            await send(message)

        try:
            await self.app(scope, timed_receive, timed_send)
        finally:
            end = time.monotonic()
            markers = MARKER.findall(bytes(body))
            if first is not None:
                self.timings.add(
                    markers[-1].decode() if markers else None,
                    (first - start) * 1000,
                    (end - start) * 1000,
                    arrived,
                )

    async def _control(self, scope: Scope, receive: Any, send: Any) -> None:
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        status = 404
        payload: dict[str, Any] = {"error": "unknown route"}
        if scope["path"] == "/_bench/timings" and scope["method"] == "GET":
            status, payload = 200, self.timings.take()
            self.state.reset()  # the fake's own request log would grow for the whole bench
        elif scope["path"] == "/_bench/config" and scope["method"] == "POST":
            try:
                config = json.loads(raw or b"{}")
                for key in ("ttft_ms", "token_delay_ms"):
                    if key in config:
                        value = float(config[key])
                        if value < 0:
                            raise ValueError(f"{key} cannot be negative")
                        setattr(self.state, key, value)
                status, payload = 200, {"ok": True}
            except (TypeError, ValueError) as exc:
                status, payload = 400, {"error": str(exc)}
        data = json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": data})


def main(argv: list[str] | None = None) -> int:
    return fakeserver.main(
        argv, prog="python -m bench.fakellm", description=__doc__, default_port=0, wrap=TimedApp
    )


if __name__ == "__main__":
    raise SystemExit(main())

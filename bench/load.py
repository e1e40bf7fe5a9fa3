"""The simulated chats: websocket chats against the stack, and HTTP streams straight to the fake
LLM (the floor), on one asyncio loop with the same pacing and bookkeeping.

Every run sends one message of `WORDS` words whose first word is a unique marker; the fake LLM
echoes it (`You said: <message>`), which is `TOKENS` tokens. A run is correct only if it ends in
success with exactly that text, in order (in at most one delta per token: the worker merges
deltas that come close together), under strictly increasing event ids, within the run timeout;
anything else is a failed run with a reason.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import websockets
from websockets.asyncio.client import ClientConnection, connect

TOKENS = 20
WORDS = TOKENS - 2  # "You said: " is two tokens of the fake's echo
FILLER = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
    "november oscar papa quebec romeo sierra tango"
).split()
TERMINAL = {"success", "error", "cancelled", "interrupted", "timeout"}


def message_for(marker: str) -> str:
    return " ".join([marker, *FILLER[: WORDS - 1]])


def expected_reply(text: str) -> str:
    return f"You said: {text}"


@dataclass
class RunRecord:
    chat: int
    marker: str
    started: float  # time.monotonic() when the message was sent
    sent_at: float = field(default_factory=time.time)  # the same moment on the wall clock
    ended: float = 0.0
    ttft_s: float | None = None  # message sent -> first text delta, at the client
    ok: bool = False
    error: str = ""
    run_id: str = ""
    retried: bool = False


class RunFailed(Exception):
    pass


@dataclass
class Plan:
    """What every chat of a cell does, and when to stop."""

    cell: str
    run_timeout_s: float
    stop: asyncio.Event
    records: list[RunRecord]
    turns: int = 5  # messages per thread before a chat moves on to its next thread
    ramp_s: float = 0.0  # chats start evenly spread over this long, as people do not all at once
    chats: int = 1

    async def start(self, chat: int) -> None:
        if self.ramp_s > 0 and self.chats > 1:
            await asyncio.sleep(self.ramp_s * chat / self.chats)

    def marker(self, chat: int, seq: int) -> str:
        return f"bench-{self.cell}-{chat}-{seq}"


def _event_id(value: Any) -> tuple[int, int]:
    ms, _, seq = str(value).partition("-")
    return int(ms), int(seq)


# --- websocket chats ----------------------------------------------------------------------------


@dataclass
class ChatTarget:
    base_url: str  # http://host:port of the web process
    slug: str
    session_cookie: str  # "sessionid=<key>"
    threads: list[str]

    def ws_url(self, thread: str) -> str:
        parts = urlsplit(self.base_url)
        return f"ws://{parts.netloc}/ws/t/{self.slug}/chat/{thread}/"


async def _recv(ws: ClientConnection, deadline: float) -> dict[str, Any]:
    left = deadline - time.monotonic()
    if left <= 0:
        raise RunFailed("timeout")
    try:
        raw = await asyncio.wait_for(ws.recv(), left)
    except TimeoutError:
        raise RunFailed("timeout") from None
    message = json.loads(raw)
    if not isinstance(message, dict):
        raise RunFailed("protocol: a message that is not an object")
    return message


async def _ws_run(ws: ClientConnection, record: RunRecord, text: str, timeout_s: float) -> None:
    deadline = record.started + timeout_s
    await ws.send(json.dumps({"type": "send", "text": text}))
    expected = expected_reply(text)
    deltas: list[str] = []
    last = (0, 0)
    attempt = 0
    while True:
        message = await _recv(ws, deadline)
        kind = message.get("type")
        if kind == "run.created":
            record.run_id = str(message.get("run_id"))
            continue
        if kind in ("pong", "run.started"):
            continue
        if kind != "event":
            detail = message.get("code") or message.get("status") or ""
            raise RunFailed(f"protocol: {kind} {detail}".strip())
        if message.get("run_id") != record.run_id:
            raise RunFailed("protocol: an event of another run")
        event_id = _event_id(message.get("id"))
        if event_id <= last:
            raise RunFailed("duplicated or out-of-order event id")
        last = event_id
        event = message.get("event") or {}
        etype = event.get("type")
        if etype == "message.delta":
            if event.get("text"):
                if record.ttft_s is None:
                    record.ttft_s = time.monotonic() - record.started
                deltas.append(event["text"])
        elif etype == "run.status":
            status = event.get("status")
            if status == "running" and int(event.get("attempt") or 1) != attempt:
                if attempt:  # a new attempt tells its story from the start
                    record.retried = True
                    deltas = []
                attempt = int(event.get("attempt") or 1)
            elif status in TERMINAL:
                record.ended = time.monotonic()
                if status != "success":
                    raise RunFailed(f"status {status}: {event.get('message', '')}"[:200])
                # The worker merges deltas that come close together (RUN_STREAM_DELTA_MS):
                # the text must be exactly the reply, in at most one delta per token.
                if "".join(deltas) != expected or not 1 <= len(deltas) <= TOKENS:
                    raise RunFailed(
                        f"wrong tokens: {len(deltas)} deltas"
                        + (", text differs" if "".join(deltas) != expected else "")
                    )
                record.ok = True
                return


async def ws_chat(index: int, target: ChatTarget, plan: Plan) -> None:
    """One person chatting: a socket per thread, `plan.turns` messages on it, next thread."""
    origin = target.base_url
    headers = {"Cookie": target.session_cookie}
    seq = 0
    thread_index = 0
    await plan.start(index)
    while not plan.stop.is_set():
        thread = target.threads[thread_index % len(target.threads)]
        thread_index += 1
        record: RunRecord | None = None
        try:
            async with connect(
                target.ws_url(thread),
                origin=origin,  # type: ignore[arg-type]
                additional_headers=headers,
                open_timeout=plan.run_timeout_s,
                max_size=None,
                ping_interval=None,
            ) as ws:
                hello = await _recv(ws, time.monotonic() + plan.run_timeout_s)
                if hello.get("type") != "hello" or hello.get("active_run"):
                    raise RunFailed(f"protocol: expected hello on an idle thread, got {hello}")
                for _ in range(plan.turns):
                    if plan.stop.is_set():
                        break
                    seq += 1
                    marker = plan.marker(index, seq)
                    record = RunRecord(index, marker, time.monotonic())
                    plan.records.append(record)
                    await _ws_run(ws, record, message_for(marker), plan.run_timeout_s)
                    record = None
        except (RunFailed, OSError, websockets.exceptions.WebSocketException, ValueError) as exc:
            reason = str(exc) if isinstance(exc, RunFailed) else f"{type(exc).__name__}: {exc}"
            if record is None:  # failed before a run started (connect, hello): count it too
                seq += 1
                record = RunRecord(index, plan.marker(index, seq), time.monotonic())
                plan.records.append(record)
            record.ok, record.error = False, reason[:200]
            record.ended = record.ended or time.monotonic()
            await asyncio.sleep(0.05)  # do not spin on a refusing server


# --- the floor: the fake LLM straight over HTTP ------------------------------------------------


@dataclass
class FloorTarget:
    host: str
    port: int


class _Http:
    """A minimal HTTP/1.1 keep-alive client for one streamed chat completion at a time."""

    def __init__(self, target: FloorTarget) -> None:
        self.target = target
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.target.host, self.target.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

    async def stream(self, text: str, on_token: Callable[[str], None]) -> None:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        body = json.dumps(
            {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": text}]}
        ).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.target.host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        status = await self.reader.readline()
        if b" 200 " not in status:
            raise RunFailed(f"fake LLM answered {status.decode(errors='replace').strip()}")
        chunked = False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
                chunked = True
        if not chunked:
            raise RunFailed("protocol: the fake LLM's stream is not chunked")
        buffer = b""
        while True:
            size = int((await self.reader.readline()).strip() or b"0", 16)
            if size == 0:
                await self.reader.readline()
                return
            buffer += (await self.reader.readexactly(size + 2))[:-2]
            while b"\n\n" in buffer:
                raw, buffer = buffer.split(b"\n\n", 1)
                if not raw.startswith(b"data: ") or raw == b"data: [DONE]":
                    continue
                choices = json.loads(raw[6:]).get("choices") or [{}]
                content = (choices[0].get("delta") or {}).get("content")
                if content:
                    on_token(content)


async def floor_chat(index: int, target: FloorTarget, plan: Plan) -> None:
    """One chat against the fake LLM itself: the same messages, no control plane in between."""
    client = _Http(target)
    seq = 0
    await plan.start(index)
    try:
        while not plan.stop.is_set():
            seq += 1
            marker = plan.marker(index, seq)
            text = message_for(marker)
            record = RunRecord(index, marker, time.monotonic())
            plan.records.append(record)
            tokens: list[str] = []

            def on_token(
                token: str, record: RunRecord = record, tokens: list[str] = tokens
            ) -> None:
                if record.ttft_s is None:
                    record.ttft_s = time.monotonic() - record.started
                tokens.append(token)

            try:
                await asyncio.wait_for(client.stream(text, on_token), plan.run_timeout_s)
                record.ended = time.monotonic()
                if len(tokens) != TOKENS or "".join(tokens) != expected_reply(text):
                    raise RunFailed(f"wrong tokens: {len(tokens)}")
                record.ok = True
            except (
                RunFailed,
                OSError,
                TimeoutError,
                ValueError,
                asyncio.IncompleteReadError,
            ) as exc:
                record.ended = record.ended or time.monotonic()
                record.error = (str(exc) or type(exc).__name__)[:200]
                await client.close()
    finally:
        await client.close()


Chat = Callable[[int, Plan], Awaitable[None]]

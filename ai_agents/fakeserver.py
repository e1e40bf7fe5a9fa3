"""The project's own fake OpenAI-compatible server, for tests, demos and the benchmark.

It speaks enough of the OpenAI HTTP API for the `openai` client and the OpenAI Agents SDK
(`OpenAIChatCompletionsModel`, `OpenAIResponsesModel`) to run agents against it, offline and
deterministically. It never calls anything: every answer is scripted or made by the rules below.

Routes
------
``POST /v1/chat/completions``
    JSON, or SSE when ``"stream": true``: a role chunk, one chunk per word token, tool-call chunks
    (name, then argument fragments), a final chunk with ``finish_reason``, then ``data: [DONE]``.
    With ``"stream_options": {"include_usage": true}`` a last chunk has ``"choices": []`` and
    ``usage`` (the SDK only asks for it with ``ModelSettings(include_usage=True)``).
``POST /v1/responses``
    JSON ``Response``, or SSE (``event: <type>`` + ``data: <json>``): ``response.created``,
    ``response.in_progress``, per output item ``response.output_item.added``, for a message
    ``response.content_part.added``, ``response.output_text.delta`` x N,
    ``response.output_text.done``, ``response.content_part.done``, for a function call
    ``response.function_call_arguments.delta`` x N, ``response.function_call_arguments.done``,
    then ``response.output_item.done``; always ending with ``response.completed`` (with usage).
``GET /v1/models``, ``GET /v1/models/{id}``
    The served model names (``fake-model``, ``fake-embedding``); any other name is accepted too.
``POST /v1/embeddings``
    Deterministic hashed bag-of-words vectors, L2-normalised (texts sharing words are close).
    ``dimensions`` is honoured (default 384); ``encoding_format`` ``float`` or ``base64`` (the
    `openai` client asks for base64 when the caller does not choose).

Every ``/v1`` route checks ``Authorization: Bearer <key>`` when the server has an API key, and
answers a wrong or missing key with 401 and an OpenAI-style body
``{"error": {"message", "type", "code", "param"}}``, as are bad requests (400) and unknown
routes (404). Every ``/v1`` request is recorded first, even a rejected one.

Control routes (no authentication: a test harness on 127.0.0.1)
----------------------------------------------------------------
``POST /_fake/script``  body: a list of steps (or ``{"steps": [...]}``), appended to a FIFO queue
    consumed one step per chat-completions or responses request (embeddings and models do not
    consume steps). The whole list is validated first: a bad step answers 400 and queues nothing.
``GET /_fake/script``   ``{"pending": [steps not consumed yet]}``.
``GET /_fake/requests`` ``{"requests": [{"method", "path", "headers", "body"}, ...]}`` in arrival
    order; ``body`` is the parsed JSON (or the raw text); the authorization header is redacted to
    its last four characters.
``POST /_fake/reset``   empties the queue and the request log.

Script steps
------------
``{"text": "..."}``
    An assistant message.
``{"tool_calls": [{"name": "...", "arguments": {...}}]}``
    Function calls (``arguments`` may also be a JSON string, passed through verbatim, so a
    malformed one can be scripted). Call ids are generated and unique unless ``"id"`` is given.
    ``text`` and ``tool_calls`` may be combined (the text comes first).
``{"error": {"status": 401, "message": "..."}}``
    That HTTP status with ``{"error": {"message", "type", "code", "param"}}``; ``type`` and
    ``code`` default from the status (401: ``invalid_request_error``/``invalid_api_key``, 429:
    ``requests``/``rate_limit_exceeded``, ...) and may be given, as may ``headers``
    (e.g. ``{"retry-after": "0"}``). A streamed request gets the error before any event.
``{"garbage": true}`` or ``{"garbage": "<raw body>"}``
    200 with a body that does not parse: truncated JSON (``application/json``), or for a streamed
    request an SSE ``data:`` line of truncated JSON; a string is sent verbatim instead.
Optional on any step: ``usage`` (``prompt_tokens``/``input_tokens``,
``completion_tokens``/``output_tokens``, ``total_tokens``: overrides the computed numbers),
``delay_ms`` (wait before answering at all, headers included), ``ttft_ms`` and
``token_delay_ms`` (override the server's timing for this answer).

Faults in the middle of an answer (with ``text`` and/or ``tool_calls``), counted in emitted tokens
(text tokens, then per tool call one for the call and one per argument fragment):
``reset_after: N``
    Send N tokens, then drop the connection without finishing the body (the client sees the
    stream break: ``httpx.RemoteProtocolError``). ``0`` drops it right after the headers. A
    non-streamed answer is dropped after its headers whatever N is.
``stall_after: N``
    Send N tokens, then nothing more, keeping the connection open (until the client gives up
    or the server stops): the client's read timeout fires. ``0`` stalls right after the headers.
Malformed tool arguments need no fault of their own: give ``arguments`` as a string that is not
a JSON object (e.g. ``"{\"city\": "``) and it is streamed verbatim.

Default rules (no step queued)
------------------------------
1. The last input item is a tool result (chat ``role: tool``; responses
   ``function_call_output``): answer ``"Tool said: <output>"`` (several trailing results are
   joined with ``"; "``).
2. The last input item is a user message saying ``call <tool> <json args>`` (or
   ``call <tool> key=value ...``) or ``use the <tool> tool``, and ``<tool>`` is one of the
   request's ``tools`` (handoffs included, e.g. ``transfer_to_billing_agent``): call it, with the
   JSON object (or the key=value pairs, values JSON-decoded when they can be) as arguments, else
   ``{}``. A name the request has no tool for is not called (rule 3 applies).
3. Otherwise echo: ``"You said: <last user text>"``. This is not JSON: an agent with an
   ``output_type`` needs a scripted ``{"text": "<json>"}``.

Usage and timing (deterministic)
--------------------------------
Prompt tokens = whitespace-separated words in the instructions and every message/item text
(contents, tool outputs, tool-call arguments); completion tokens = tokens emitted: one per word
token of the text (``re.findall(r"\\s*\\S+\\s*")``, so the deltas join back to the exact text),
plus per tool call one for the call and one per word fragment of its arguments. Usage is in every
non-streamed answer and in ``response.completed``; chat streams carry it only when asked.
``ttft_ms`` delays the first token (chat: the first chunk; responses: the first output item,
``response.created``/``in_progress`` come at once), ``token_delay_ms`` separates tokens; a
non-streamed answer waits the same total. All waits are ``asyncio.sleep``.

Running it
----------
In-process (tests): ``FakeOpenAIServer(host="127.0.0.1", port=0, *, ttft_ms=0,
token_delay_ms=0, api_key=None, model="fake-model")`` runs uvicorn on a background thread (start
takes a few ms; stop about 0.1 s, up to 1 s more while a stream is still being answered)::

    with FakeOpenAIServer() as server:  # or server.start() ... server.stop()
        client = AsyncOpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
        server.script([{"text": "hi"}])  # same queue as POST /_fake/script
        ...
        server.pending(); server.requests("/v1/chat/completions"); server.reset()

``server.url`` is the root (control routes), ``server.port`` the port it got.

CLI (demos, benchmark)::

    python -m ai_agents.fakeserver --port 8765 [--host H] [--ttft-ms N] [--token-delay-ms N]
                                   [--api-key K] [--model NAME]

It prints ``fake OpenAI server listening on http://HOST:PORT/v1`` once it accepts connections
(``--port 0`` picks a free port) and stops cleanly on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import math
import re
import signal
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

DEFAULT_MODEL = "fake-model"
DEFAULT_EMBEDDING_MODEL = "fake-embedding"
DEFAULT_EMBEDDING_DIMENSIONS = 384
MAX_EMBEDDING_DIMENSIONS = 8192

_STEP_KEYS = {
    "text",
    "tool_calls",
    "error",
    "garbage",
    "usage",
    "delay_ms",
    "ttft_ms",
    "token_delay_ms",
    "reset_after",
    "stall_after",
}
_USAGE_KEYS = {
    "prompt_tokens",
    "input_tokens",
    "completion_tokens",
    "output_tokens",
    "total_tokens",
}
# (type, code) of OpenAI's error bodies, by status; a step may override both.
_ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    409: ("invalid_request_error", "conflict"),
    422: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", "service_unavailable"),
}
# Keys of message/item dicts that are not text the model reads (ids, roles, discriminators).
_NON_TEXT_KEYS = {
    "role",
    "type",
    "id",
    "call_id",
    "tool_call_id",
    "name",
    "status",
    "annotations",
    "logprobs",
}
_TOKEN_RE = re.compile(r"\s*\S+\s*")
_CALL_RE = re.compile(r"\bcall\s+(?:the\s+)?([A-Za-z_][\w.\-]*)", re.IGNORECASE)
_USE_RE = re.compile(r"\buse\s+the\s+([A-Za-z_][\w.\-]*)\s+tool\b", re.IGNORECASE)
_KV_RE = re.compile(r"""(\w+)=("[^"]*"|'[^']*'|[^\s,;]+)""")
_WORD_RE = re.compile(r"\w+")


class ScriptError(ValueError):
    """A script step that does not follow the documented format."""


# --------------------------------------------------------------------------------------------
# Script steps


@dataclass(frozen=True)
class _ScriptedCall:
    name: str
    arguments: str
    call_id: str | None


@dataclass(frozen=True)
class Step:
    """One parsed script step (see the module docstring for the wire format)."""

    raw: Mapping[str, Any]
    text: str | None = None
    tool_calls: tuple[_ScriptedCall, ...] = ()
    error: Mapping[str, Any] | None = None
    garbage: str | bool | None = None
    usage: Mapping[str, int] | None = None
    delay_ms: float = 0.0
    ttft_ms: float | None = None
    token_delay_ms: float | None = None
    reset_after: int | None = None
    stall_after: int | None = None


def _non_negative(raw: Mapping[str, Any], key: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ScriptError(f"`{key}` must be a non-negative number of milliseconds, got {value!r}")
    return float(value)


def parse_step(raw: Any) -> Step:
    """Validate one script step; raise `ScriptError` naming the wrong field."""
    if not isinstance(raw, Mapping):
        raise ScriptError(f"a step must be an object, got {raw!r}")
    unknown = set(raw) - _STEP_KEYS
    if unknown:
        raise ScriptError(f"unknown step keys {sorted(unknown)}; allowed: {sorted(_STEP_KEYS)}")
    kinds = [k for k in ("error", "garbage") if k in raw]
    has_reply = "text" in raw or "tool_calls" in raw
    if len(kinds) + (1 if has_reply else 0) != 1:
        raise ScriptError(
            "a step needs exactly one of: `text` and/or `tool_calls`, `error`, `garbage`"
        )

    text = raw.get("text")
    if text is not None and not isinstance(text, str):
        raise ScriptError("`text` must be a string")

    calls: list[_ScriptedCall] = []
    if "tool_calls" in raw:
        raw_calls = raw["tool_calls"]
        if not isinstance(raw_calls, list) or not raw_calls:
            raise ScriptError("`tool_calls` must be a non-empty list")
        for call in raw_calls:
            if not isinstance(call, Mapping) or not isinstance(call.get("name"), str):
                raise ScriptError(f"each tool call needs a string `name`, got {call!r}")
            if not call["name"]:
                raise ScriptError("a tool call `name` cannot be empty")
            arguments = call.get("arguments", {})
            if isinstance(arguments, Mapping):
                arguments = json.dumps(arguments)
            elif not isinstance(arguments, str):
                raise ScriptError("tool call `arguments` must be an object or a JSON string")
            call_id = call.get("id")
            if call_id is not None and (not isinstance(call_id, str) or not call_id):
                raise ScriptError("tool call `id` must be a non-empty string")
            calls.append(_ScriptedCall(call["name"], arguments, call_id))

    error = raw.get("error")
    if "error" in raw:
        if not isinstance(error, Mapping):
            raise ScriptError("`error` must be an object")
        status = error.get("status")
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise ScriptError(f"`error.status` must be an HTTP error status, got {status!r}")
        if not isinstance(error.get("message", ""), str):
            raise ScriptError("`error.message` must be a string")
        headers = error.get("headers", {})
        if not isinstance(headers, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise ScriptError("`error.headers` must map strings to strings")

    garbage = raw.get("garbage")
    if "garbage" in raw and not (garbage is True or isinstance(garbage, str)):
        raise ScriptError("`garbage` must be true or a raw body string")

    for key in ("reset_after", "stall_after"):
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ScriptError(f"`{key}` must be a non-negative number of tokens, got {value!r}")
        if not has_reply:
            raise ScriptError(f"`{key}` needs a `text` and/or `tool_calls` answer to break")
    if "reset_after" in raw and "stall_after" in raw:
        raise ScriptError("a step has at most one of `reset_after` and `stall_after`")

    usage = raw.get("usage")
    if usage is not None:
        if not isinstance(usage, Mapping) or set(usage) - _USAGE_KEYS:
            raise ScriptError(f"`usage` must be an object with keys among {sorted(_USAGE_KEYS)}")
        if not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in usage.values()
        ):
            raise ScriptError("`usage` values must be non-negative integers")

    return Step(
        raw=dict(raw),
        text=text,
        tool_calls=tuple(calls),
        error=error,
        garbage=garbage,
        usage=usage,
        delay_ms=_non_negative(raw, "delay_ms") or 0.0,
        ttft_ms=_non_negative(raw, "ttft_ms"),
        token_delay_ms=_non_negative(raw, "token_delay_ms"),
        reset_after=raw.get("reset_after"),
        stall_after=raw.get("stall_after"),
    )


# --------------------------------------------------------------------------------------------
# Shared state (touched from the test thread and from the server's event loop thread)


class FakeState:
    """The script queue, the request log and the server-wide knobs, behind one lock."""

    def __init__(
        self,
        *,
        ttft_ms: float = 0.0,
        token_delay_ms: float = 0.0,
        api_key: str | None = None,
        model: str = DEFAULT_MODEL,
    ) -> None:
        self.ttft_ms = float(ttft_ms)
        self.token_delay_ms = float(token_delay_ms)
        self.api_key = api_key
        self.model = model
        self._lock = threading.Lock()
        self._steps: deque[Step] = deque()
        self._log: list[dict[str, Any]] = []

    def enqueue(self, steps: Iterable[Any]) -> int:
        """Validate every step, then append them all; return how many are pending."""
        if isinstance(steps, str | bytes | Mapping) or not isinstance(steps, Iterable):
            raise ScriptError("a script is a list of steps")
        parsed = [parse_step(s) for s in steps]
        with self._lock:
            self._steps.extend(parsed)
            return len(self._steps)

    def pop(self) -> Step | None:
        with self._lock:
            return self._steps.popleft() if self._steps else None

    def pending(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(s.raw) for s in self._steps]

    def record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._log.append(entry)

    def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(json.dumps(e)) for e in self._log if path in (None, e["path"])]

    def reset(self) -> None:
        with self._lock:
            self._steps.clear()
            self._log.clear()


# --------------------------------------------------------------------------------------------
# Reading requests


@dataclass
class _Conversation:
    last_kind: str  # "user", "tool", "assistant", "system" or "" for an empty input
    last_user_text: str
    trailing_tool_outputs: list[str]
    tool_names: list[str]
    prompt_tokens: int


def _text_of(content: Any) -> str:
    """The text of a message content: a string, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return json.dumps(content)


def _count_words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_count_words(v) for v in value)
    if isinstance(value, Mapping):
        return sum(_count_words(v) for k, v in value.items() if k not in _NON_TEXT_KEYS)
    return 0


def _tool_names(tools: Any) -> list[str]:
    names: list[str] = []
    for tool in tools if isinstance(tools, list) else []:
        if not isinstance(tool, Mapping):
            continue
        function = tool.get("function")
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            names.append(function["name"])  # chat completions
        elif isinstance(tool.get("name"), str):
            names.append(tool["name"])  # responses
    return names


def _chat_conversation(body: Mapping[str, Any]) -> _Conversation:
    messages = [m for m in body["messages"] if isinstance(m, Mapping)]
    return _conversation(
        [(str(m.get("role", "")), m) for m in messages],
        text=lambda m: _text_of(m.get("content")),
        tools=body.get("tools"),
        prompt_tokens=_count_words(messages),
    )


def _responses_kind(item: Mapping[str, Any]) -> str:
    item_type = item.get("type")
    if item_type in (None, "message"):
        return str(item.get("role", "user"))
    if isinstance(item_type, str) and item_type.endswith("_output"):
        return "tool"  # function_call_output, custom_tool_call_output, ...
    return "assistant"  # function_call, reasoning, ...


def _responses_conversation(body: Mapping[str, Any]) -> _Conversation:
    raw_input = body.get("input")
    if isinstance(raw_input, str):
        items: list[Mapping[str, Any]] = [{"role": "user", "content": raw_input}]
    else:
        items = [i for i in raw_input or [] if isinstance(i, Mapping)]

    def text(item: Mapping[str, Any]) -> str:
        if "output" in item:
            return _text_of(item["output"])
        return _text_of(item.get("content"))

    return _conversation(
        [(_responses_kind(i), i) for i in items],
        text=text,
        tools=body.get("tools"),
        prompt_tokens=_count_words(items) + _count_words(body.get("instructions")),
    )


def _conversation(
    items: list[tuple[str, Mapping[str, Any]]],
    *,
    text: Callable[[Mapping[str, Any]], str],
    tools: Any,
    prompt_tokens: int,
) -> _Conversation:
    trailing: list[str] = []
    for kind, item in reversed(items):
        if kind != "tool":
            break
        trailing.insert(0, text(item))
    last_user = next((text(item) for kind, item in reversed(items) if kind == "user"), "")
    return _Conversation(
        last_kind=items[-1][0] if items else "",
        last_user_text=last_user,
        trailing_tool_outputs=trailing,
        tool_names=_tool_names(tools),
        prompt_tokens=prompt_tokens,
    )


# --------------------------------------------------------------------------------------------
# Planning an answer


@dataclass
class _Call:
    name: str
    arguments: str
    call_id: str
    item_id: str
    fragments: list[str]


@dataclass
class _Reply:
    text: str
    calls: list[_Call]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    ttft_s: float
    token_delay_s: float
    reset_after: int | None = None
    stall_after: int | None = None
    tokens: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = split_tokens(self.text)


def split_tokens(text: str) -> list[str]:
    """Word tokens with their surrounding whitespace: `"".join(split_tokens(t)) == t`."""
    return _TOKEN_RE.findall(text) or ([text] if text else [])


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _decode_value(value: str) -> Any:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    value = value.rstrip(".!?")
    try:
        return json.loads(value)
    except ValueError:
        return value


def _arguments_from(rest: str) -> dict[str, Any]:
    rest = rest.strip()
    if rest.startswith("{"):
        try:
            parsed, _ = json.JSONDecoder().raw_decode(rest)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {key: _decode_value(value) for key, value in _KV_RE.findall(rest)}


def match_tool_call(text: str, tool_names: list[str]) -> tuple[str, dict[str, Any]] | None:
    """The default tool rule: `call <tool> <args>` or `use the <tool> tool`, for a known tool."""
    by_lower = {name.lower(): name for name in tool_names}

    def known(name: str) -> str | None:
        return name if name in tool_names else by_lower.get(name.lower())

    for match in _CALL_RE.finditer(text):
        name = known(match.group(1))
        if name is not None:
            return name, _arguments_from(text[match.end() :])
    for match in _USE_RE.finditer(text):
        name = known(match.group(1))
        if name is not None:
            return name, {}
    return None


def _plan(step: Step | None, conversation: _Conversation, state: FakeState) -> _Reply:
    text = ""
    calls: list[tuple[str, str, str | None]] = []
    if step is not None:
        text = step.text or ""
        calls = [(c.name, c.arguments, c.call_id) for c in step.tool_calls]
    elif conversation.last_kind == "tool":
        text = "Tool said: " + "; ".join(conversation.trailing_tool_outputs)
    else:
        matched = None
        if conversation.last_kind == "user":
            matched = match_tool_call(conversation.last_user_text, conversation.tool_names)
        if matched is not None:
            calls = [(matched[0], json.dumps(matched[1]), None)]
        else:
            text = f"You said: {conversation.last_user_text}"

    planned = [
        _Call(
            name=name,
            arguments=arguments,
            call_id=call_id or _new_id("call_"),
            item_id=_new_id("fc_"),
            fragments=split_tokens(arguments) or [""],
        )
        for name, arguments, call_id in calls
    ]
    completion = len(split_tokens(text)) + sum(1 + len(c.fragments) for c in planned)
    prompt = conversation.prompt_tokens
    total: int | None = None
    if step is not None and step.usage:
        usage = step.usage
        prompt = usage.get("prompt_tokens", usage.get("input_tokens", prompt))
        completion = usage.get("completion_tokens", usage.get("output_tokens", completion))
        total = usage.get("total_tokens")
    ttft = step.ttft_ms if step is not None and step.ttft_ms is not None else state.ttft_ms
    delay = (
        step.token_delay_ms
        if step is not None and step.token_delay_ms is not None
        else state.token_delay_ms
    )
    return _Reply(
        text=text,
        calls=planned,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total if total is not None else prompt + completion,
        ttft_s=ttft / 1000,
        token_delay_s=delay / 1000,
        reset_after=step.reset_after if step is not None else None,
        stall_after=step.stall_after if step is not None else None,
    )


class _ConnectionReset(Exception):
    """Raised inside a streamed body: uvicorn drops the connection with the body unfinished."""


# How long a stalled answer keeps its connection open without a byte (the client gives up first).
STALL_SECONDS = 3600.0


async def _fault(reply: _Reply, emitted: int) -> None:
    """Before token number `emitted` (0-based): break or stall the answer if it is scripted to."""
    if reply.reset_after is not None and emitted >= reply.reset_after:
        raise _ConnectionReset(f"scripted reset after {reply.reset_after} tokens")
    if reply.stall_after is not None and emitted >= reply.stall_after:
        await asyncio.sleep(STALL_SECONDS)


async def _broken_body(reply: _Reply) -> AsyncIterator[str]:
    """The body of a non-streamed answer scripted to reset or stall: headers, then the fault."""
    await _fault(reply, max(reply.reset_after or 0, reply.stall_after or 0))
    yield ""  # never reached


async def _sleep(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


async def _generation_time(reply: _Reply) -> None:
    """What a non-streamed answer waits: the time a stream of the same tokens would take."""
    emitted = len(reply.tokens) + sum(1 + len(c.fragments) for c in reply.calls)
    await _sleep(reply.ttft_s + reply.token_delay_s * max(emitted - 1, 0))


# --------------------------------------------------------------------------------------------
# Writing answers


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def openai_error(
    status: int,
    message: str,
    *,
    error_type: str | None = None,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """An error response with OpenAI's body: `{"error": {"message", "type", "code", "param"}}`."""
    default_type, default_code = _ERROR_KINDS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    body = {
        "error": {
            "message": message,
            "type": error_type or default_type,
            "code": code if code is not None else default_code,
            "param": param,
        }
    }
    return JSONResponse(body, status_code=status, headers=_headers(headers))


def _headers(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {"x-request-id": _new_id("req_"), **(extra or {})}


def _chat_usage(reply: _Reply) -> dict[str, Any]:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.total_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _responses_usage(reply: _Reply) -> dict[str, Any]:
    return {
        "input_tokens": reply.prompt_tokens,
        "output_tokens": reply.completion_tokens,
        "total_tokens": reply.total_tokens,
        # openai 3.57's types require `cache_write_tokens` (its client parses leniently).
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


def _chat_completion(reply: _Reply, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
    if reply.calls:
        message["tool_calls"] = [
            {
                "id": c.call_id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for c in reply.calls
        ]
    elif not reply.text:
        message["content"] = ""
    return {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if reply.calls else "stop",
                "logprobs": None,
            }
        ],
        "usage": _chat_usage(reply),
    }


async def _chat_stream(reply: _Reply, model: str, include_usage: bool) -> AsyncIterator[str]:
    completion_id = _new_id("chatcmpl-")
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        payload: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            ],
        }
        if include_usage:
            payload["usage"] = None
        return f"data: {_dumps(payload)}\n\n"

    await _sleep(reply.ttft_s)
    if reply.reset_after == 0 or reply.stall_after == 0:
        await _fault(reply, 0)
    yield chunk({"role": "assistant", "content": ""})
    emitted = 0

    async def pace() -> None:
        nonlocal emitted
        await _fault(reply, emitted)
        if emitted:
            await _sleep(reply.token_delay_s)
        emitted += 1

    for token in reply.tokens:
        await pace()
        yield chunk({"content": token})
    for index, call in enumerate(reply.calls):
        await pace()
        header = {
            "index": index,
            "id": call.call_id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        yield chunk({"tool_calls": [header]})
        for fragment in call.fragments:
            await pace()
            yield chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
    yield chunk({}, "tool_calls" if reply.calls else "stop")
    if include_usage:
        final = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": _chat_usage(reply),
        }
        yield f"data: {_dumps(final)}\n\n"
    yield "data: [DONE]\n\n"


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [] if status == "in_progress" else [_text_part(text)]
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(call: _Call, status: str) -> dict[str, Any]:
    return {
        "id": call.item_id,
        "type": "function_call",
        "status": status,
        "call_id": call.call_id,
        "name": call.name,
        "arguments": call.arguments if status == "completed" else "",
    }


def _response_object(
    response_id: str,
    body: Mapping[str, Any],
    model: str,
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    created_at: int,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "model": model,
        "output": output,
        "usage": usage,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "metadata": body.get("metadata") or {},
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "max_output_tokens": body.get("max_output_tokens"),
        "previous_response_id": body.get("previous_response_id"),
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "text": body.get("text") or {"format": {"type": "text"}},
        "truncation": body.get("truncation", "disabled"),
    }


def _final_output(reply: _Reply, message_id: str) -> list[dict[str, Any]]:
    # An answer with neither text nor calls is still one (empty) message, as in the stream.
    with_message = bool(reply.text) or not reply.calls
    output = [_message_item(message_id, reply.text, "completed")] if with_message else []
    return output + [_call_item(c, "completed") for c in reply.calls]


async def _responses_stream(
    reply: _Reply, body: Mapping[str, Any], model: str
) -> AsyncIterator[str]:
    response_id = _new_id("resp_")
    message_id = _new_id("msg_")
    created_at = int(time.time())
    sequence = 0

    def event(event_type: str, **fields: Any) -> str:
        nonlocal sequence
        payload = {"type": event_type, "sequence_number": sequence, **fields}
        sequence += 1
        return f"event: {event_type}\ndata: {_dumps(payload)}\n\n"

    def snapshot(status: str, output: list[dict[str, Any]], usage: Any) -> dict[str, Any]:
        return _response_object(
            response_id,
            body,
            model,
            status=status,
            output=output,
            usage=usage,
            created_at=created_at,
        )

    if reply.reset_after == 0 or reply.stall_after == 0:
        await _fault(reply, 0)
    yield event("response.created", response=snapshot("in_progress", [], None))
    yield event("response.in_progress", response=snapshot("in_progress", [], None))
    await _sleep(reply.ttft_s)
    emitted = 0

    async def pace() -> None:
        nonlocal emitted
        await _fault(reply, emitted)
        if emitted:
            await _sleep(reply.token_delay_s)
        emitted += 1

    output_index = 0
    if reply.text or not reply.calls:
        ids = {"item_id": message_id, "output_index": 0}
        yield event(
            "response.output_item.added",
            output_index=0,
            item=_message_item(message_id, "", "in_progress"),
        )
        yield event("response.content_part.added", **ids, content_index=0, part=_text_part(""))
        for token in reply.tokens:
            await pace()
            yield event(
                "response.output_text.delta", **ids, content_index=0, delta=token, logprobs=[]
            )
        yield event(
            "response.output_text.done", **ids, content_index=0, text=reply.text, logprobs=[]
        )
        yield event(
            "response.content_part.done", **ids, content_index=0, part=_text_part(reply.text)
        )
        yield event(
            "response.output_item.done",
            output_index=0,
            item=_message_item(message_id, reply.text, "completed"),
        )
        output_index = 1
    for offset, call in enumerate(reply.calls):
        index = output_index + offset
        await pace()
        yield event(
            "response.output_item.added", output_index=index, item=_call_item(call, "in_progress")
        )
        for fragment in call.fragments:
            await pace()
            yield event(
                "response.function_call_arguments.delta",
                item_id=call.item_id,
                output_index=index,
                delta=fragment,
            )
        yield event(
            "response.function_call_arguments.done",
            item_id=call.item_id,
            output_index=index,
            name=call.name,
            arguments=call.arguments,
        )
        yield event(
            "response.output_item.done", output_index=index, item=_call_item(call, "completed")
        )
    final = snapshot("completed", _final_output(reply, message_id), _responses_usage(reply))
    yield event("response.completed", response=final)


def _garbage(step: Step, *, stream: bool) -> Response:
    if isinstance(step.garbage, str):
        media = "text/event-stream" if stream else "application/json"
        return Response(step.garbage, media_type=media, headers=_headers())
    if stream:
        body = 'data: {"id": "chatcmpl-garbage", "choices": [{"delta": \n\ndata: [DONE]\n\n'
        return Response(body, media_type="text/event-stream", headers=_headers())
    return Response(
        '{"id": "garbage", "object": "chat.completion", "choices": [{"message": ',
        media_type="application/json",
        headers=_headers(),
    )


def _scripted_error(step: Step) -> JSONResponse:
    error = step.error or {}
    return openai_error(
        int(error["status"]),
        str(error.get("message", "Scripted error.")),
        error_type=error.get("type"),
        code=error.get("code"),
        param=error.get("param"),
        headers=error.get("headers"),
    )


# --------------------------------------------------------------------------------------------
# The application


def _redact(headers: Mapping[str, str]) -> dict[str, str]:
    out = dict(headers)
    if "authorization" in out:
        out["authorization"] = "***" + out["authorization"][-4:]
    return out


def create_app(state: FakeState) -> Starlette:
    """The ASGI app serving `state`; `FakeOpenAIServer` and the CLI run it under uvicorn."""

    async def receive(request: Request) -> tuple[Any, Response | None]:
        """Record the request, then check the key and the JSON: (body, error response)."""
        raw = await request.body()
        body: Any = None
        bad_json = False
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body, bad_json = raw.decode("utf-8", "replace"), True
        state.record(
            {
                "method": request.method,
                "path": request.url.path,
                "headers": _redact(request.headers),
                "body": body,
            }
        )
        if state.api_key is not None:
            given = request.headers.get("authorization", "")
            expected = f"Bearer {state.api_key}"
            if not given:
                return body, openai_error(
                    401, "You didn't provide an API key. Send it as `Authorization: Bearer <key>`."
                )
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return body, openai_error(401, "Incorrect API key provided.")
        if request.method == "POST" and (bad_json or not isinstance(body, dict)):
            return body, openai_error(
                400, "We could not parse the JSON body of your request (expected an object)."
            )
        return body, None

    def require(body: Mapping[str, Any], key: str, kinds: tuple[type, ...]) -> Response | None:
        if key not in body:
            return openai_error(400, f"Missing required parameter: '{key}'.", param=key)
        if not isinstance(body[key], kinds) or isinstance(body[key], bool):
            return openai_error(400, f"Invalid type for '{key}'.", param=key)
        return None

    async def answer(body: dict[str, Any], conversation: _Conversation) -> _Reply | Response:
        """The next script step (or the default rules) as a reply to send, or a failure."""
        step = state.pop()
        if step is not None:
            await _sleep(step.delay_ms / 1000)
            if step.error is not None:
                return _scripted_error(step)
            if step.garbage is not None:
                return _garbage(step, stream=bool(body.get("stream")))
        return _plan(step, conversation, state)

    async def chat_completions(request: Request) -> Response:
        body, error = await receive(request)
        error = error or require(body, "model", (str,)) or require(body, "messages", (list,))
        if error is not None:
            return error
        if not body["messages"]:
            return openai_error(
                400, "'messages' must contain at least one message.", param="messages"
            )
        reply = await answer(body, _chat_conversation(body))
        if isinstance(reply, Response):
            return reply
        model = body["model"]
        if body.get("stream"):
            options = body.get("stream_options") or {}
            include_usage = isinstance(options, Mapping) and options.get("include_usage") is True
            return StreamingResponse(
                _chat_stream(reply, model, include_usage),
                media_type="text/event-stream",
                headers=_headers({"cache-control": "no-cache"}),
            )
        if reply.reset_after is not None or reply.stall_after is not None:
            return StreamingResponse(_broken_body(reply), media_type="application/json")
        await _generation_time(reply)
        return JSONResponse(_chat_completion(reply, model), headers=_headers())

    async def responses(request: Request) -> Response:
        body, error = await receive(request)
        error = error or require(body, "model", (str,))
        if error is None and not isinstance(body.get("input", ""), str | list):
            error = openai_error(400, "Invalid type for 'input'.", param="input")
        if error is not None:
            return error
        reply = await answer(body, _responses_conversation(body))
        if isinstance(reply, Response):
            return reply
        model = body["model"]
        if body.get("stream"):
            return StreamingResponse(
                _responses_stream(reply, body, model),
                media_type="text/event-stream",
                headers=_headers({"cache-control": "no-cache"}),
            )
        if reply.reset_after is not None or reply.stall_after is not None:
            return StreamingResponse(_broken_body(reply), media_type="application/json")
        await _generation_time(reply)
        result = _response_object(
            _new_id("resp_"),
            body,
            model,
            status="completed",
            output=_final_output(reply, _new_id("msg_")),
            usage=_responses_usage(reply),
            created_at=int(time.time()),
        )
        return JSONResponse(result, headers=_headers())

    def model_card(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "fakeserver"}

    async def list_models(request: Request) -> Response:
        _, error = await receive(request)
        if error is not None:
            return error
        names = dict.fromkeys([state.model, DEFAULT_MODEL, DEFAULT_EMBEDDING_MODEL])
        return JSONResponse(
            {"object": "list", "data": [model_card(n) for n in names]}, headers=_headers()
        )

    async def get_model(request: Request) -> Response:
        _, error = await receive(request)
        if error is not None:
            return error
        return JSONResponse(model_card(request.path_params["model_id"]), headers=_headers())

    async def embeddings(request: Request) -> Response:
        body, error = await receive(request)
        error = error or require(body, "model", (str,)) or require(body, "input", (str, list))
        if error is not None:
            return error
        texts = _embedding_inputs(body["input"])
        if texts is None:
            return openai_error(400, "'input' must be a string or a list of them.", param="input")
        dimensions = body.get("dimensions")
        if dimensions is None:
            dimensions = DEFAULT_EMBEDDING_DIMENSIONS
        if (
            isinstance(dimensions, bool)
            or not isinstance(dimensions, int)
            or not 1 <= dimensions <= MAX_EMBEDDING_DIMENSIONS
        ):
            return openai_error(
                400,
                f"'dimensions' must be an integer from 1 to {MAX_EMBEDDING_DIMENSIONS}.",
                param="dimensions",
            )
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            return openai_error(
                400, "'encoding_format' must be 'float' or 'base64'.", param="encoding_format"
            )
        data = []
        for index, text in enumerate(texts):
            vector = embed_text(text, dimensions)
            encoded: Any = vector
            if encoding == "base64":
                encoded = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        words = sum(len(t.split()) for t in texts)
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": words, "total_tokens": words},
            },
            headers=_headers(),
        )

    async def post_script(request: Request) -> Response:
        try:
            payload = json.loads(await request.body())
            steps: Any = payload.get("steps") if isinstance(payload, dict) else payload
            pending = state.enqueue(steps)
        except ValueError as exc:  # ScriptError and bad JSON alike
            return openai_error(400, f"Invalid script: {exc}", param="steps")
        return JSONResponse({"queued": len(steps), "pending": pending})

    async def get_script(request: Request) -> Response:
        return JSONResponse({"pending": state.pending()})

    async def get_requests(request: Request) -> Response:
        return JSONResponse({"requests": state.requests(request.query_params.get("path"))})

    async def post_reset(request: Request) -> Response:
        state.reset()
        return JSONResponse({"ok": True})

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        return openai_error(status, f"{request.method} {request.url.path}: {exc}")

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/_fake/script", post_script, methods=["POST"]),
            Route("/_fake/script", get_script, methods=["GET"]),
            Route("/_fake/requests", get_requests, methods=["GET"]),
            Route("/_fake/reset", post_reset, methods=["POST"]),
        ],
        exception_handlers={HTTPException: http_error},
    )
    app.state.fake = state
    return app


def _embedding_inputs(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [" ".join(map(str, value))]  # one pre-tokenised input
    texts = []
    for item in value:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, list) and all(isinstance(v, int) for v in item):
            texts.append(" ".join(map(str, item)))
        else:
            return None
    return texts


def embed_text(text: str, dimensions: int = DEFAULT_EMBEDDING_DIMENSIONS) -> list[float]:
    """A deterministic unit vector: signed feature hashing of the lower-cased words."""
    vector = [0.0] * dimensions
    features = _WORD_RE.findall(text.lower()) or [text]
    for feature in features:
        digest = hashlib.blake2b(feature.encode(), digest_size=16).digest()
        for offset in (0, 8):  # two hashes per word make collisions matter less
            h = int.from_bytes(digest[offset : offset + 8], "little")
            vector[h % dimensions] += -1.0 if h >> 63 else 1.0
    norm = math.sqrt(sum(v * v for v in vector))
    if norm == 0.0:  # every hash cancelled out: still a unit vector, still deterministic
        digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
        vector[int.from_bytes(digest, "little") % dimensions] = 1.0
        return vector
    return [v / norm for v in vector]


# --------------------------------------------------------------------------------------------
# Running it


class _ThreadServer(uvicorn.Server):
    """uvicorn in a background thread, telling the starting thread when it accepts connections.

    uvicorn polls `should_exit` every 0.1 s; `request_exit` wakes the loop at once instead, so a
    test's server stops in about 0.1 s (the grace sleep of uvicorn's own shutdown) not 0.2 s.
    """

    def __init__(self, config: uvicorn.Config, ready: threading.Event) -> None:
        super().__init__(config)
        self._ready = ready
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        try:
            await super().startup(sockets=sockets)
        finally:
            self._ready.set()

    async def main_loop(self) -> None:
        assert self._wake is not None  # set by startup, which always runs first
        counter = 0
        while not await self.on_tick(counter):
            counter += 10  # uvicorn refreshes the Date header when counter % 10 == 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)

    def request_exit(self) -> None:
        """Ask the server to stop; callable from any thread."""
        self.should_exit = True
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(wake.set)


class FakeOpenAIServer:
    """The fake server on a background thread, for tests: use it as a context manager.

    `base_url` ends in `/v1` (give it to `AsyncOpenAI(base_url=...)`); `script`, `pending`,
    `requests` and `reset` act on the same state as the `/_fake/*` routes, without HTTP.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ttft_ms: float = 0,
        token_delay_ms: float = 0,
        api_key: str | None = None,
        model: str = DEFAULT_MODEL,
        loop: str = "asyncio",
    ) -> None:
        self.host = host
        self.port = port
        # Plain asyncio by default: its timers never fire before the delay is over, which
        # uvloop's millisecond timers (started from a cached loop time) can, by a little.
        self.loop = loop
        self.state = FakeState(
            ttft_ms=ttft_ms, token_delay_ms=token_delay_ms, api_key=api_key, model=model
        )
        self.app = create_app(self.state)
        self._server: _ThreadServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The root URL, e.g. `http://127.0.0.1:41234` (the control routes live under it)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> Self:
        if self._thread is not None:
            raise RuntimeError("the fake server is already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_config=None,  # leave the host process's logging alone
            access_log=False,
            lifespan="off",
            ws="none",
            loop=self.loop,
            timeout_graceful_shutdown=1,
        )
        ready = threading.Event()
        server = self._server = _ThreadServer(config, ready)

        def serve() -> None:
            try:
                server.run(sockets=[sock])
            finally:
                ready.set()  # also when it failed before accepting: start() must not wait
                sock.close()

        self._thread = threading.Thread(
            target=serve,
            name=f"fake-openai-server:{self.port}",
            daemon=True,  # a safety net only: stop() joins it
        )
        self._thread.start()
        if not ready.wait(timeout) or not server.started:
            self.stop()
            raise RuntimeError("the fake OpenAI server did not start")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let open answers finish (1 s grace), and join the thread."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.request_exit()
        thread.join(timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def script(self, steps: Iterable[Mapping[str, Any]]) -> int:
        """Append steps to the FIFO queue (all validated first); return how many are pending."""
        return self.state.enqueue(steps)

    def pending(self) -> list[dict[str, Any]]:
        return self.state.pending()

    def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        """Every `/v1` request received, in order (optionally only those to `path`)."""
        return self.state.requests(path)

    def reset(self) -> None:
        self.state.reset()


def main(
    argv: list[str] | None = None,
    *,
    prog: str = "python -m ai_agents.fakeserver",
    description: str = "A fake OpenAI-compatible server (chat completions, responses, embeddings).",
    default_port: int = 8765,
    wrap: Callable[[Any, FakeState], Any] | None = None,
) -> int:
    """The command line: serve until SIGINT or SIGTERM. `wrap(app, state)` may put middleware
    around the app (`bench.fakellm` times answers that way)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port, help="0 picks a free port")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="time to first token")
    parser.add_argument("--token-delay-ms", type=float, default=0.0, help="delay between tokens")
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model name /v1/models lists")
    args = parser.parse_args(argv)
    if args.ttft_ms < 0 or args.token_delay_ms < 0:
        parser.error("delays cannot be negative")

    # Block the stop signals before the server thread starts (it inherits the mask), so that
    # only this thread receives them, in sigwait.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    server = FakeOpenAIServer(
        args.host,
        args.port,
        ttft_ms=args.ttft_ms,
        token_delay_ms=args.token_delay_ms,
        api_key=args.api_key,
        model=args.model,
        loop="auto",  # uvloop when installed: the benchmark wants the fastest fake
    )
    if wrap is not None:
        server.app = wrap(server.app, server.state)
    server.start()
    print(f"fake OpenAI server listening on {server.base_url}", flush=True)
    try:
        signal.sigwait(stop_signals)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

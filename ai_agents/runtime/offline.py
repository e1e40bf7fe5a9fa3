"""The built-in offline model: a deterministic stand-in for an LLM that needs no key and no network.

It implements the OpenAI Agents SDK `Model` interface, so it runs through the real `Runner` like any
other model. It is *not* a language model: it recognises a handful of fixed phrasings (see
docs/offline-model.md) so that every feature of the product (streaming, tools, handoffs, memory,
structured output, system instructions, token accounting) visibly does something for a new user.

Everything it produces is a pure function of its arguments: no randomness, no clock, no I/O. Ids
(response, message and tool-call ids) are derived from a hash of the request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from agents import (
    FunctionTool,
    Handoff,
    Model,
    ModelProvider,
    ModelResponse,
    ModelTracing,
    Usage,
    get_conversation_history_wrappers,
)
from agents.exceptions import UserError
from agents.items import TResponseInputItem, TResponseOutputItem, TResponseStreamEvent
from agents.tracing import generation_span
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseUsage,
)
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails

if TYPE_CHECKING:
    from agents import AgentOutputSchemaBase, ModelSettings, Tool
    from openai.types.responses.response_prompt_param import ResponsePromptParam

__all__ = [
    "OFFLINE_MARKER",
    "OFFLINE_MODEL_ID",
    "OFFLINE_MODEL_NAME",
    "OFFLINE_PROVIDER_PREFIX",
    "OfflineModel",
    "OfflineModelProvider",
    "is_offline_model_name",
    "tokenize",
]

OFFLINE_MODEL_NAME = "offline"
"""The model name the provider answers to (and the `model` field of every response)."""

OFFLINE_PROVIDER_PREFIX = "builtin"
"""Prefix under which `OfflineModelProvider` can be registered in a `MultiProvider`."""

OFFLINE_MODEL_ID = f"{OFFLINE_PROVIDER_PREFIX}/{OFFLINE_MODEL_NAME}"
"""The fully qualified name, e.g. for `Agent(model="builtin/offline")`."""

OFFLINE_MARKER = "[built-in offline model]"
"""Every text reply starts with this marker (after a prefix set by "Start every answer with X")."""

_NOT_AN_LLM = "I am a built-in test model, not an LLM: I follow a few fixed phrasings."
_MAX_ECHO = 200
_MAX_TOOL_OUTPUT = 1000
_MAX_SCHEMA_DEPTH = 8


# --------------------------------------------------------------------------------------------
# Tokens and usage
# --------------------------------------------------------------------------------------------


def tokenize(text: str) -> list[str]:
    """Split text into word-ish tokens (a word plus the whitespace after it).

    `"".join(tokenize(text)) == text` always holds; each token becomes one stream delta.
    """
    tokens = re.findall(r"\S+\s*", text)
    lead = text[: len(text) - len(text.lstrip())]
    if lead:
        if tokens:
            tokens[0] = lead + tokens[0]
        else:
            tokens = [lead]
    return tokens


def _count_words(text: str) -> int:
    return len(re.findall(r"\S+", text))


# --------------------------------------------------------------------------------------------
# Reading the request
# --------------------------------------------------------------------------------------------


def _as_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, Mapping):
        return dict(item)
    dump = getattr(item, "model_dump", None)
    if callable(dump):
        return cast(dict[str, Any], dump(exclude_unset=True, mode="json"))
    return {"type": "unknown", "text": str(item)}


def _content_text(content: Any) -> str:
    """The text of a message `content` (a string or a list of content parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Iterable) and not isinstance(content, bytes | Mapping):
        parts: list[str] = []
        for part in content:
            p = _as_dict(part)
            kind = p.get("type")
            if isinstance(p.get("text"), str):
                parts.append(p["text"])
            elif isinstance(p.get("refusal"), str):
                parts.append(p["refusal"])
            elif kind in {"input_image", "image"}:
                parts.append("[image]")
            elif kind in {"input_file", "file"}:
                parts.append("[file]")
        return " ".join(x for x in parts if x)
    if isinstance(content, Mapping):
        return _content_text([content])
    return str(content)


def _item_text(item: dict[str, Any]) -> str:
    """All the text an input item carries, for token counting."""
    kind = item.get("type")
    if kind == "function_call":
        return f"{item.get('name', '')} {item.get('arguments', '')}"
    if kind == "function_call_output":
        return _content_text(item.get("output"))
    if "content" in item:
        return _content_text(item.get("content"))
    return json.dumps(item, sort_keys=True, default=str)


@dataclass(frozen=True)
class _ToolOutput:
    name: str
    output: str
    is_handoff: bool


@dataclass
class _Conversation:
    items: list[dict[str, Any]]
    last_user_text: str = ""
    last_is_user: bool = False
    trailing_outputs: list[_ToolOutput] = field(default_factory=list)
    has_assistant_reply: bool = False
    extra_instructions: str = ""
    nested_handoff_to: str | None = None
    """The new agent's name when the input ends with a nested handoff summary."""


_NESTED_USER_RE = re.compile(r"^\d+\.\s+user:\s*(?P<t>.*)$", re.MULTILINE)
_NESTED_HANDOFF_RE = re.compile(r'\\?"assistant\\?":\s*\\?"(?P<a>[^"\\]+)')


def _nested_history(text: str) -> tuple[str | None, str | None] | None:
    """(last user text, handoff target) from a `nest_handoff_history` summary, if it is one."""
    start, end = get_conversation_history_wrappers()
    if start not in text:
        return None
    block = text.split(start, 1)[1].split(end, 1)[0]
    users = _NESTED_USER_RE.findall(block)
    targets = _NESTED_HANDOFF_RE.findall(block)
    return (users[-1].strip() if users else None, targets[-1] if targets else None)


def _read_conversation(
    input: str | list[TResponseInputItem], tool_names: set[str]
) -> _Conversation:
    if isinstance(input, str):
        items = [{"role": "user", "content": input}]
    else:
        items = [_as_dict(item) for item in input]
    conv = _Conversation(items=items)
    call_names: dict[str, str] = {}
    extra: list[str] = []
    for item in items:
        role = item.get("role")
        kind = item.get("type", "message")
        if kind == "function_call" and isinstance(item.get("call_id"), str):
            call_names[item["call_id"]] = str(item.get("name", ""))
        if kind == "message" and role in {"system", "developer"}:
            extra.append(_content_text(item.get("content")))
        if kind == "message" and role == "assistant":
            nested = _nested_history(_content_text(item.get("content")))
            if nested is None:
                conv.has_assistant_reply = True
                conv.nested_handoff_to = None
            else:
                conv.last_user_text = nested[0] or conv.last_user_text
                conv.nested_handoff_to = nested[1]
        elif kind == "message" and role == "user":
            conv.last_user_text = _content_text(item.get("content")).strip()
            conv.nested_handoff_to = None
        elif kind != "message":
            conv.nested_handoff_to = None
    conv.extra_instructions = "\n".join(extra)
    if items:
        last = items[-1]
        conv.last_is_user = last.get("type", "message") == "message" and last.get("role") == "user"
    outputs: list[_ToolOutput] = []
    for item in reversed(items):
        if item.get("type") != "function_call_output":
            break
        output = _content_text(item.get("output"))
        name = call_names.get(str(item.get("call_id")), "")
        outputs.append(_ToolOutput(name, output, _is_handoff_output(name, output, tool_names)))
    conv.trailing_outputs = list(reversed(outputs))
    return conv


def _is_handoff_output(name: str, output: str, tool_names: set[str]) -> bool:
    if name in tool_names:
        return False
    if name.startswith("transfer_to_"):
        return True
    try:
        data = json.loads(output)
    except ValueError:
        return False
    return isinstance(data, dict) and set(data) == {"assistant"}


# --------------------------------------------------------------------------------------------
# System instructions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Style:
    name: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    case: str | None = None  # "upper" | "lower"


_QUOTED = re.compile(r"""^\s*(?:"([^"]+)"|'([^']+)'|“([^”]+)”|‘([^’]+)’|`([^`]+)`)""")
_ANSWER_WORDS = r"(?:answers?|repl(?:y|ies)|responses?|messages?|sentences?)"
_PREFIX_RE = re.compile(
    r"\b(?:start|begin|prefix|open)\s+(?:every|each|all|any|your|all\s+(?:of\s+)?your)\s+"
    rf"(?:\w+\s+)?{_ANSWER_WORDS}\s+with\s+(?P<v>[^\n]+)",
    re.IGNORECASE,
)
_SUFFIX_RE = re.compile(
    r"\b(?:end|finish|close|conclude|suffix)\s+(?:every|each|all|any|your|all\s+(?:of\s+)?your)\s+"
    rf"(?:\w+\s+)?{_ANSWER_WORDS}\s+with\s+(?P<v>[^\n]+)",
    re.IGNORECASE,
)
_NAME_RE = re.compile(
    r"\b(?:your\s+name\s+is|you\s+are\s+(?:called|named))\s+(?P<v>[^\n]+)", re.IGNORECASE
)
_CASE_RE = re.compile(
    r"\b(?:answer|respond|reply|write|speak|talk|use)\b[^.\n]{0,40}?"
    r"\b(?P<case>upper\s*-?\s*case|all\s+caps|capital\s+letters|capitals|lower\s*-?\s*case)\b",
    re.IGNORECASE,
)


def _instruction_value(raw: str) -> str:
    """The X of "... with X": a quoted string, or the rest of the sentence."""
    quoted = _QUOTED.match(raw)
    if quoted:
        return next(g for g in quoted.groups() if g)
    value = re.split(r"(?<=[.!?])\s", raw.strip(), maxsplit=1)[0].strip()
    value = re.sub(r"^(?:the\s+)?(?:words?|phrase|text|string|greeting)\s+", "", value, flags=re.I)
    value = value.rstrip(".").strip()
    quoted = _QUOTED.match(value)
    if quoted:
        return next(g for g in quoted.groups() if g)
    return value[:80]


def _read_style(instructions: str) -> _Style:
    name = prefix = suffix = case = None
    if m := _NAME_RE.search(instructions):
        name = re.split(r"[,;:(]", _instruction_value(m.group("v")))[0].strip()[:40] or None
    if m := _PREFIX_RE.search(instructions):
        prefix = _instruction_value(m.group("v")) or None
    if m := _SUFFIX_RE.search(instructions):
        suffix = _instruction_value(m.group("v")) or None
    for m in _CASE_RE.finditer(instructions):
        clause = instructions[max(0, m.start() - 20) : m.end()]
        if re.search(r"\b(?:never|not|don'?t|no)\b", clause, re.IGNORECASE):
            continue
        case = "lower" if m.group("case").lower().startswith("lower") else "upper"
        break
    return _Style(name=name, prefix=prefix, suffix=suffix, case=case)


def _styled(body: str, style: _Style) -> str:
    if style.case == "upper":
        body = body.upper()
    elif style.case == "lower":
        body = body.lower()
    text = f"{OFFLINE_MARKER} {body}".strip()
    if style.prefix:
        text = f"{style.prefix} {text}"
    if style.suffix:
        text = f"{text} {style.suffix}"
    return text


# --------------------------------------------------------------------------------------------
# Understanding the user's message
# --------------------------------------------------------------------------------------------

_CITY_TIMEZONES = {
    "tokyo": "Asia/Tokyo",
    "osaka": "Asia/Tokyo",
    "seoul": "Asia/Seoul",
    "beijing": "Asia/Shanghai",
    "shanghai": "Asia/Shanghai",
    "hong kong": "Asia/Hong_Kong",
    "singapore": "Asia/Singapore",
    "mumbai": "Asia/Kolkata",
    "delhi": "Asia/Kolkata",
    "new delhi": "Asia/Kolkata",
    "dubai": "Asia/Dubai",
    "moscow": "Europe/Moscow",
    "istanbul": "Europe/Istanbul",
    "berlin": "Europe/Berlin",
    "paris": "Europe/Paris",
    "madrid": "Europe/Madrid",
    "rome": "Europe/Rome",
    "amsterdam": "Europe/Amsterdam",
    "london": "Europe/London",
    "lisbon": "Europe/Lisbon",
    "new york": "America/New_York",
    "toronto": "America/Toronto",
    "chicago": "America/Chicago",
    "denver": "America/Denver",
    "los angeles": "America/Los_Angeles",
    "san francisco": "America/Los_Angeles",
    "seattle": "America/Los_Angeles",
    "mexico city": "America/Mexico_City",
    "sao paulo": "America/Sao_Paulo",
    "são paulo": "America/Sao_Paulo",
    "buenos aires": "America/Argentina/Buenos_Aires",
    "sydney": "Australia/Sydney",
    "melbourne": "Australia/Melbourne",
    "auckland": "Pacific/Auckland",
    "cairo": "Africa/Cairo",
    "johannesburg": "Africa/Johannesburg",
    "nairobi": "Africa/Nairobi",
    "utc": "UTC",
    "gmt": "UTC",
}

_URL_RE = re.compile(r"https?://[^\s<>\"')\]]+", re.IGNORECASE)
_DOMAIN_RE = re.compile(
    r"\b(?:www\.)?[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}(?:/[^\s<>\"')\]]*)?", re.I
)
_IANA_RE = re.compile(r"\b(?:Africa|America|Asia|Atlantic|Australia|Europe|Pacific)/[A-Za-z_/]+")
_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")
_EXPR_RUN_RE = re.compile(r"[-+*/%^×÷().\d\s]+")
_EXPR_VALID_RE = re.compile(r"\d\s*\)*\s*(?:\*\*|[-+*/%^×÷])\s*\(*\s*-?\d")
_WORD_OPS = [
    (r"\bmultiplied\s+by\b", "*"),
    (r"\bdivided\s+by\b", "/"),
    (r"\bto\s+the\s+power\s+of\b", "**"),
    (r"\bplus\b", "+"),
    (r"\bminus\b", "-"),
    (r"\btimes\b", "*"),
    (r"(?<=\d)\s*x\s*(?=\d)", "*"),
]
_CALC_WORDS_RE = re.compile(
    r"\b(?:calculat\w*|comput\w*|evaluat\w*|math|solve|sum|add|multiply|divide|subtract|"
    r"what\s+is|what'?s|how\s+much\s+is)\b",
    re.IGNORECASE,
)
_TIME_RE = re.compile(
    r"\bwhat(?:'s|\s+is)?\s+(?:the\s+)?(?:current\s+|local\s+)?(?:time|date|day)\b|"
    r"\btime\s+(?:is\s+it|in|now)\b|\bcurrent\s+(?:time|date)\b|\btoday'?s\s+date\b|"
    r"\bwhat\s+day\b|\bclock\b|\btimezone\b",
    re.IGNORECASE,
)
_WEATHER_RE = re.compile(r"\b(?:weather|forecast|temperature)\b", re.IGNORECASE)
_FETCH_RE = re.compile(r"\b(?:fetch|download|open|browse|visit|get|read|load|scrape)\b", re.I)
_SEARCH_RE = re.compile(
    r"\b(?:search(?:\s+the\s+web)?(?:\s+for)?|look\s+up|lookup|google|find(?:\s+me)?)\s+(?P<q>.+)",
    re.IGNORECASE,
)
_REMEMBER_RE = re.compile(
    r"\b(?:remember|memori[sz]e|don'?t\s+forget|do\s+not\s+forget|keep\s+in\s+mind)\b"
    r"(?:\s*[:,-])?\s+(?:that\s+)?(?P<fact>\S.*)",
    re.IGNORECASE | re.DOTALL,
)
_RECALL_RE = re.compile(
    r"\b(?:do|did|can|could)\s+you\s+(?:still\s+)?remember\b|"
    r"\bwhat\s+do\s+you\s+(?:remember|know|recall)\b|\brecall\b|"
    r"\bsearch\s+(?:your\s+|the\s+)?memor(?:y|ies)\b|\bwhat\s+did\s+i\s+(?:tell|say)\b",
    re.IGNORECASE,
)
_HANDOFF_RES = [
    re.compile(
        r"\b(?:transfer|hand\s*-?\s*(?:me\s+)?off|hand\s+(?:me\s+|this\s+|it\s+)?over|connect|route|"
        r"switch|forward|escalate|redirect|pass)\b(?:\s+(?:me|us|this|it|my\s+request))?"
        r"(?:\s+(?:over|through|back))?\s+to\s+(?P<target>.+)",
        re.IGNORECASE | re.DOTALL,
    ),
    re.compile(r"\b(?:talk|speak|chat)\s+(?:to|with)\s+(?P<target>.+)", re.IGNORECASE | re.DOTALL),
]
_USE_TOOL_RE = re.compile(
    r"\b(?:use|call|run|invoke|try)\s+(?:the\s+|your\s+|a\s+)?(?P<name>[\w.-]+)\s+tool\b",
    re.IGNORECASE,
)
_IDENTITY_RE = re.compile(
    r"\bwho\s+are\s+you\b|\bwhat(?:'s|\s+is)\s+your\s+name\b|\bwhat\s+are\s+you\b|"
    r"\bare\s+you\s+(?:an?\s+)?(?:llm|ai|bot|robot|human|real)\b",
    re.IGNORECASE,
)
_HELP_RE = re.compile(
    r"^\s*(?:help|\?)\s*[.!?]*\s*$|\bwhat\s+can\s+you\s+do\b|\bhow\s+do\s+(?:i|you)\s+use\b",
    re.IGNORECASE,
)
_NAME_STOPWORDS = {
    "the",
    "a",
    "an",
    "agent",
    "agents",
    "team",
    "to",
    "transfer",
    "tool",
    "get",
    "do",
    "run",
    "use",
    "my",
    "of",
    "and",
    "for",
}


def _name_parts(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [p for p in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if p]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _same_word(a: str, b: str) -> bool:
    return a == b or a.rstrip("s") == b.rstrip("s")


def _mentions_name(text: str, name: str) -> bool:
    """Whether the tool/agent name appears in the text (underscores may be spaces)."""
    parts = _name_parts(name)
    if not parts:
        return False
    pattern = r"[\s_.-]*".join(re.escape(p) for p in parts)
    return re.search(rf"(?<![a-z0-9]){pattern}(?![a-z0-9])", text.lower()) is not None


def _tool_family(name: str) -> str | None:
    parts = set(_name_parts(name))
    memoryish = bool(parts & {"memory", "memories", "mem", "memo"})
    if parts & {"remember", "memorize", "memorise"} or (
        memoryish
        and parts & {"save", "store", "add", "create", "manage", "upsert", "write", "put", "new"}
    ):
        return "memory_save"
    if "recall" in parts or (
        memoryish
        and parts & {"search", "get", "list", "query", "find", "retrieve", "read", "lookup", "load"}
    ):
        return "memory_search"
    if parts & {"weather", "forecast"}:
        return "weather"
    if parts & {
        "calc",
        "calculator",
        "calculate",
        "math",
        "arithmetic",
        "compute",
        "eval",
        "evaluate",
        "add",
        "sum",
        "multiply",
        "divide",
        "subtract",
    }:
        return "calculator"
    if parts & {"time", "date", "datetime", "clock", "now", "timezone", "tz", "today"}:
        return "datetime"
    if parts & {"fetch", "http", "url", "web", "browse", "download", "scrape", "webpage", "page"}:
        return "fetch"
    if parts & {"search", "lookup", "find", "query", "google"}:
        return "search"
    return None


def _normalize_ops(text: str) -> str:
    for pattern, op in _WORD_OPS:
        text = re.sub(pattern, f" {op} ", text, flags=re.IGNORECASE)
    return text


def _find_expression(text: str) -> str | None:
    normalized = _normalize_ops(text)
    best: str | None = None
    for run in _EXPR_RUN_RE.findall(normalized):
        candidate = re.sub(r"\s+", " ", run).strip().strip(".").strip()
        if _EXPR_VALID_RE.search(candidate) and (best is None or len(candidate) > len(best)):
            best = candidate
    if best is None:
        return None
    return best.replace("×", "*").replace("÷", "/").replace("^", "**")


def _find_url(text: str) -> str | None:
    if m := _URL_RE.search(text):
        return m.group(0).rstrip(".,;:!?")
    for m in _DOMAIN_RE.finditer(text):
        candidate = m.group(0).rstrip(".,;:!?")
        if not re.fullmatch(r"[\d.]+", candidate):
            return f"https://{candidate}"
    return None


def _find_place(text: str) -> str | None:
    m = re.search(r"\b(?:in|at|for|of)\s+(?P<p>[A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)*)", text)
    if m:
        return m.group("p")
    lowered = text.lower()
    for city in sorted(_CITY_TIMEZONES, key=len, reverse=True):
        if re.search(rf"\b{re.escape(city)}\b", lowered) and city not in {"utc", "gmt"}:
            return city.title()
    m = re.search(r"\b(?:in|at)\s+(?P<p>[a-z][\w'-]*(?:\s+[a-z][\w'-]*)?)\s*[?.!]*\s*$", text)
    return m.group("p") if m else None


def _find_timezone(text: str) -> str | None:
    if m := _IANA_RE.search(text):
        return m.group(0)
    lowered = text.lower()
    for city in sorted(_CITY_TIMEZONES, key=len, reverse=True):
        if re.search(rf"\b{re.escape(city)}\b", lowered):
            return _CITY_TIMEZONES[city]
    return None


def _numbers(text: str) -> list[float]:
    return [float(n) for n in _NUMBER_RE.findall(text)]


def _clean(text: str) -> str:
    return text.strip().strip(" \t\n\"'`").rstrip(".!?;,").strip()


def _text_after(text: str, name: str) -> str:
    parts = _name_parts(name)
    pattern = r"[\s_.-]*".join(re.escape(p) for p in parts)
    m = re.search(rf"(?<![a-z0-9]){pattern}(?![a-z0-9])", text, re.IGNORECASE)
    if not m:
        return ""
    rest = text[m.end() :]
    rest = re.sub(r"^\s*(?:tool\b)?\s*(?:[:,-]\s*)?", "", rest, flags=re.IGNORECASE)
    rest = re.sub(r"^(?:to|with|on|for|and|please|about)\b\s*", "", rest, flags=re.IGNORECASE)
    return _clean(rest)


@dataclass
class _ArgContext:
    text: str
    family: str | None
    primary: str
    expression: str | None = None
    url: str | None = None
    place: str | None = None
    timezone: str | None = None
    fact: str | None = None
    query: str | None = None
    numbers: list[float] = field(default_factory=list)


def _arg_context(text: str, family: str | None, tool_name: str, fact: str | None) -> _ArgContext:
    expression = _find_expression(text)
    url = _find_url(text)
    place = _find_place(text)
    timezone = _find_timezone(text)
    search = _SEARCH_RE.search(text)
    after = _text_after(text, tool_name)
    query = _clean(search.group("q")) if search else (after or _clean(text))
    if family == "memory_search":
        about = re.search(r"\babout\s+(?P<q>.+)", text, re.IGNORECASE)
        query = _clean(about.group("q")) if about else _clean(text)
    primary_by_family = {
        "calculator": expression,
        "datetime": timezone or place or "UTC",
        "fetch": url,
        "weather": place,
        "search": query,
        "memory_save": fact,
        "memory_search": query,
    }
    primary = primary_by_family.get(family or "") or after or _clean(text)
    numbers = _numbers(expression) if expression else _numbers(text)
    return _ArgContext(
        text=text,
        family=family,
        primary=primary,
        expression=expression,
        url=url,
        place=place,
        timezone=timezone,
        fact=fact,
        query=query,
        numbers=numbers,
    )


# --------------------------------------------------------------------------------------------
# JSON schemas: tool arguments and structured output
# --------------------------------------------------------------------------------------------

_URL_PARAMS = {"url", "uri", "link", "href", "website", "webpage", "page_url", "target_url"}
_EXPR_PARAMS = {"expression", "expr", "formula", "equation", "calculation", "math", "problem"}
_TZ_PARAMS = {"timezone", "tz", "time_zone", "zone", "tz_name", "timezone_name", "iana_timezone"}
_PLACE_PARAMS = {"city", "location", "place", "town", "country", "region", "where", "city_name"}
_FACT_PARAMS = {"fact", "memory", "note", "content", "text", "information", "info", "value"}
_QUERY_PARAMS = {
    "query",
    "q",
    "search",
    "search_query",
    "term",
    "terms",
    "question",
    "topic",
    "keywords",
    "prompt",
    "message",
    "input",
    "request",
}
_NUMBER_PARAMS = {
    "a",
    "b",
    "c",
    "x",
    "y",
    "z",
    "n",
    "m",
    "first",
    "second",
    "num1",
    "num2",
    "number1",
    "number2",
    "left",
    "right",
    "lhs",
    "rhs",
    "operand1",
    "operand2",
    "value1",
    "value2",
    "number",
    "num",
}
_ID_PARAMS = {"id", "uuid", "memory_id", "key", "item_id"}
_OP_WORDS = {
    "+": ("add", "plus", "sum", "addition", "+"),
    "-": ("subtract", "minus", "difference", "subtraction", "-"),
    "*": ("multiply", "times", "product", "multiplication", "*", "mul"),
    "/": ("divide", "division", "quotient", "/", "div"),
}
_STRING_FORMATS = {
    "date-time": "1970-01-01T00:00:00Z",
    "date": "1970-01-01",
    "time": "00:00:00",
    "email": "user@example.com",
    "uri": "https://example.com",
    "url": "https://example.com",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "hostname": "example.com",
    "ipv4": "127.0.0.1",
}
_ANSWER_FIELDS = {
    "answer",
    "reply",
    "response",
    "text",
    "message",
    "content",
    "result",
    "output",
    "summary",
    "explanation",
}


def _resolve(schema: Any, root: Mapping[str, Any]) -> dict[str, Any]:
    """Follow local `$ref`s (`#/$defs/X`, `#/definitions/X`)."""
    seen = 0
    while isinstance(schema, Mapping) and "$ref" in schema and seen < _MAX_SCHEMA_DEPTH:
        ref = schema["$ref"]
        target: Any = root
        if isinstance(ref, str) and ref.startswith("#/"):
            for part in ref[2:].split("/"):
                target = target.get(part, {}) if isinstance(target, Mapping) else {}
        else:
            target = {}
        extra = {k: v for k, v in schema.items() if k != "$ref"}
        schema = {**target, **extra}
        seen += 1
    return dict(schema) if isinstance(schema, Mapping) else {}


def _variants(schema: dict[str, Any], root: Mapping[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """Non-null alternatives of a schema, and whether null is allowed."""
    nullable = False
    options: list[dict[str, Any]] = []
    alternatives = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(alternatives, list):
        for alt in alternatives:
            resolved = _resolve(alt, root)
            inner, inner_nullable = _variants(resolved, root)
            nullable = nullable or inner_nullable
            options.extend(inner)
        return options, nullable
    kind = schema.get("type")
    if isinstance(kind, list):
        nullable = "null" in kind
        for k in kind:
            if k != "null":
                options.append({**schema, "type": k})
        return options, nullable
    if kind == "null":
        return [], True
    return [schema], False


def _schema_types(options: list[dict[str, Any]]) -> set[str]:
    types: set[str] = set()
    for option in options:
        kind = option.get("type")
        if isinstance(kind, str):
            types.add(kind)
        elif "properties" in option:
            types.add("object")
        elif "enum" in option or "const" in option:
            types.add("enum")
    return types


def _clamp_number(value: float, schema: Mapping[str, Any], integer: bool) -> float | int:
    low = schema.get("minimum")
    high = schema.get("maximum")
    if isinstance(schema.get("exclusiveMinimum"), int | float):
        low = schema["exclusiveMinimum"] + (1 if integer else 0.5)
    if isinstance(schema.get("exclusiveMaximum"), int | float):
        high = schema["exclusiveMaximum"] - (1 if integer else 0.5)
    if isinstance(low, int | float) and value < low:
        value = low
    if isinstance(high, int | float) and value > high:
        value = high
    if integer:
        return int(value)
    return int(value) if float(value).is_integer() else value


def _string_value(schema: Mapping[str, Any], preferred: str | None) -> str:
    if preferred is not None:
        value = preferred
    elif isinstance(schema.get("format"), str) and schema["format"] in _STRING_FORMATS:
        value = _STRING_FORMATS[schema["format"]]
    else:
        value = "example"
    min_len = schema.get("minLength")
    max_len = schema.get("maxLength")
    if isinstance(min_len, int) and len(value) < min_len:
        value = value + "x" * (min_len - len(value))
    if isinstance(max_len, int) and len(value) > max_len:
        value = value[:max_len]
    return value


def _sample(
    schema: Any,
    root: Mapping[str, Any],
    *,
    depth: int = 0,
    key: str = "",
    answer: str | None = None,
    hints: Mapping[str, str] | None = None,
    refs: frozenset[str] = frozenset(),
) -> Any:
    """A simple deterministic value that validates against `schema`.

    `answer` goes into string fields named like answer/reply/text/...; `hints` maps field names
    to values the user gave as "field: value". `refs` are the `$ref`s already followed on the way
    here: a recursive type stops at an empty list or null where the schema allows it.
    """
    if isinstance(schema, Mapping) and isinstance(schema.get("$ref"), str):
        refs = refs | {schema["$ref"]}
    resolved = _resolve(schema, root)
    hint = (hints or {}).get(key.lower())
    if "const" in resolved:
        return resolved["const"]
    if "default" in resolved and hint is None:
        return resolved["default"]
    if isinstance(resolved.get("enum"), list) and resolved["enum"]:
        hinted = hint
        for option in resolved["enum"]:
            if hinted is not None and str(option).lower() == hinted.lower():
                return option
        return resolved["enum"][0]
    options, nullable = _variants(resolved, root)
    if not options:
        return None
    alternatives = resolved.get("anyOf") or resolved.get("oneOf") or []
    if nullable and (
        depth >= _MAX_SCHEMA_DEPTH or any(_seen_ref(alt, refs) for alt in alternatives)
    ):
        return None
    option = options[0]
    if option is not resolved:
        option = _resolve(option, root)
        if "const" in option or "enum" in option:
            return _sample(
                option, root, depth=depth + 1, key=key, answer=answer, hints=hints, refs=refs
            )
    kind = option.get("type") or ("object" if "properties" in option else None)
    if kind == "string":
        preferred = hint
        if preferred is None and answer is not None and key.lower() in _ANSWER_FIELDS:
            preferred = answer
        return _string_value(option, preferred)
    if kind in {"integer", "number"}:
        number = 0.0
        if hint is not None and (found := _numbers(hint)):
            number = found[0]
        return _clamp_number(number, option, kind == "integer")
    if kind == "boolean":
        return hint is not None and hint.strip().lower() in {"true", "yes", "y", "1", "on"}
    if kind == "array":
        raw_min, raw_max = option.get("minItems"), option.get("maxItems")
        min_items: int = raw_min if isinstance(raw_min, int) else 0
        max_items: int | None = raw_max if isinstance(raw_max, int) else None
        count = max(min_items, 1)
        if max_items is not None:
            count = min(count, max_items)
        items_schema = option.get("items", {})
        if depth >= _MAX_SCHEMA_DEPTH or _seen_ref(items_schema, refs):
            count = min_items
        return [
            _sample(
                items_schema, root, depth=depth + 1, key=key, answer=answer, hints=hints, refs=refs
            )
            for _ in range(count)
        ]
    if kind == "object":
        properties = option.get("properties")
        if not isinstance(properties, Mapping):
            return {}
        return {
            name: _sample(
                prop, root, depth=depth + 1, key=name, answer=answer, hints=hints, refs=refs
            )
            for name, prop in properties.items()
        }
    if kind == "null":
        return None
    return "example"


def _self_refs(root: Mapping[str, Any]) -> frozenset[str]:
    """The `$ref`s that point back to the root schema itself (a recursive root type)."""
    body = {k: v for k, v in root.items() if k not in {"$defs", "definitions"}}
    refs: set[str] = set()
    for section in ("$defs", "definitions"):
        defs = root.get(section)
        if isinstance(defs, Mapping):
            refs.update(f"#/{section}/{name}" for name, d in defs.items() if d == body)
    return frozenset(refs)


def _seen_ref(schema: Any, refs: frozenset[str]) -> bool:
    return isinstance(schema, Mapping) and schema.get("$ref") in refs


def _field_hints(text: str) -> dict[str, str]:
    """`field: value`, `field = value` and `field is value` pairs in the user's message."""
    hints: dict[str, str] = {}
    pattern = r"\b(?P<k>[A-Za-z_][\w]*)\s*(?::|=|\bis\b)\s*(?P<v>\"[^\"]*\"|'[^']*'|[^,;\n]+?)"
    pattern += r"(?=\s*(?:[,;\n]|\band\b|$|\.\s|\.$))"
    for m in re.finditer(pattern, text):
        key = m.group("k").lower()
        value = m.group("v").strip().strip("\"'")
        hints.setdefault(key, value)
    return hints


def _pick_op(schema: Mapping[str, Any], expression: str | None) -> str | None:
    op = None
    if expression:
        m = re.search(r"\d\s*\)*\s*([-+*/])", expression)
        op = m.group(1) if m else None
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        if op is not None:
            for option in enum:
                if str(option).lower() in _OP_WORDS[op]:
                    return str(option)
        return str(enum[0])
    return op


def _build_arguments(schema: Mapping[str, Any], ctx: _ArgContext) -> dict[str, Any]:
    """Arguments for a function tool, built from the user's message and the tool's JSON schema.

    Pass 1 fills parameters whose name says what they want (url, expression, timezone, city,
    query, a/b/x/y numbers, ...). Pass 2 gives the first still-empty string parameter the
    request's main payload, numbers the next unused number, enums their first value; optional
    parameters left without a value are omitted, nullable ones get null.
    """
    root = schema
    properties = schema.get("properties")
    if not isinstance(properties, Mapping):
        return {}
    required = set(schema.get("required") or [])
    numbers = list(ctx.numbers)
    primary_used = False
    args: dict[str, Any] = {}
    todo: list[tuple[str, dict[str, Any], list[dict[str, Any]], bool]] = []

    def take_number(option: Mapping[str, Any], integer: bool) -> float | int | None:
        if not numbers:
            return None
        return _clamp_number(numbers.pop(0), option, integer)

    for name, raw in properties.items():
        resolved = _resolve(raw, root)
        options, nullable = _variants(resolved, root)
        types = _schema_types(options)
        option = _resolve(options[0], root) if options else {}
        lname = name.lower()
        value: Any = None
        if "string" in types:
            if lname in _URL_PARAMS or lname.endswith("_url"):
                value = ctx.url
            elif lname in _EXPR_PARAMS:
                value = ctx.expression
            elif lname in _TZ_PARAMS:
                value = ctx.timezone or ("UTC" if ctx.family == "datetime" else None)
            elif lname in _PLACE_PARAMS:
                value = ctx.place
            elif lname in _FACT_PARAMS and ctx.family == "memory_save":
                value = ctx.fact
            elif lname in _QUERY_PARAMS:
                value = ctx.query if ctx.family in {"search", "memory_search"} else ctx.primary
            elif lname in {"operation", "op", "operator"}:
                value = _pick_op(option, ctx.expression)
            if value is not None and value == ctx.primary:
                primary_used = True
        elif types & {"integer", "number"} and lname in _NUMBER_PARAMS:
            value = take_number(option, "integer" in types and "number" not in types)
        elif "enum" in types and lname in {"operation", "op", "operator"}:
            value = _pick_op(option, ctx.expression)
        elif "enum" in types and lname == "action" and ctx.family == "memory_save":
            enum = [str(v) for v in option.get("enum", [])]
            value = next((v for v in ("create", "add", "save", "insert") if v in enum), None)
        if value is not None:
            args[name] = value
        else:
            todo.append((name, option, options, nullable))

    for name, option, options, nullable in todo:
        types = _schema_types(options)
        lname = name.lower()
        value = None
        if "enum" in types or "const" in option:
            value = _sample(option, root)
        elif "string" in types and not primary_used and lname not in _ID_PARAMS:
            value = _string_value(option, ctx.primary)
            primary_used = True
        elif types & {"integer", "number"}:
            value = take_number(option, "integer" in types and "number" not in types)
        if value is None:
            if name not in required:
                continue
            if nullable:
                args[name] = None
                continue
            value = _sample(option, root, key=name)
        args[name] = value
    return {name: args[name] for name in properties if name in args}


# --------------------------------------------------------------------------------------------
# Deciding what to do
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    name: str
    arguments: str


@dataclass(frozen=True)
class _Decision:
    """Exactly one of `text` (a final assistant message) or `call` (one function call)."""

    intent: str
    text: str | None = None
    call: _Call | None = None


@dataclass
class _Request:
    instructions: str
    conv: _Conversation
    tools: list[FunctionTool]
    handoffs: list[Handoff]
    output_schema: AgentOutputSchemaBase | None
    tool_choice: str | None
    style: _Style

    @property
    def structured(self) -> bool:
        return self.output_schema is not None and not self.output_schema.is_plain_text()


def _call_tool(tool: FunctionTool, text: str, family: str | None, fact: str | None) -> _Call:
    ctx = _arg_context(text, family, tool.name, fact)
    args = _build_arguments(tool.params_json_schema or {}, ctx)
    return _Call(tool.name, json.dumps(args, ensure_ascii=False))


def _handoff_call(handoff: Handoff) -> _Call:
    schema = handoff.input_json_schema or {}
    args = _sample(schema, schema) if schema.get("properties") else {}
    return _Call(handoff.tool_name, json.dumps(args, ensure_ascii=False))


def _match_handoff(target: str, handoffs: list[Handoff]) -> Handoff | None:
    """The handoff the target names: all of an agent's name words (the most words wins, then
    the earlier handoff), else the one agent that shares the most of them with the target
    ("billing" for "Billing specialist"); None when none shares any, or two share as many."""
    target_words = _words(target)
    best: tuple[int, int] | None = None
    chosen: Handoff | None = None
    partial: dict[int, list[Handoff]] = {}
    for index, handoff in enumerate(handoffs):
        keys = [w for w in _words(handoff.agent_name) if w not in _NAME_STOPWORDS]
        if not keys:
            keys = [w for w in _name_parts(handoff.tool_name) if w not in _NAME_STOPWORDS]
        if not keys and not _mentions_name(target, handoff.tool_name):
            continue
        hits = sum(any(_same_word(k, w) for w in target_words) for k in keys)
        if hits < len(keys) and not _mentions_name(target, handoff.tool_name):
            if hits:
                partial.setdefault(hits, []).append(handoff)
            continue
        score = (len(keys), -index)
        if best is None or score > best:
            best, chosen = score, handoff
    if chosen is None and partial:
        most = partial[max(partial)]
        chosen = most[0] if len(most) == 1 else None
    return chosen


def _tool_examples(request: _Request) -> list[str]:
    examples: list[str] = []
    for tool in request.tools[:3]:
        family = _tool_family(tool.name)
        shown = tool.name.replace("_", " ")
        example = {
            "calculator": f"use the {shown} to compute 2+3"
            if "calc" in tool.name.lower()
            else f"use {tool.name} to compute 2+3",
            "datetime": "what time is it in Tokyo",
            "fetch": "fetch https://example.com",
            "weather": "what's the weather in Paris",
            "search": "search for offline models",
            "memory_save": "remember that I like tea",
            "memory_search": "what do you remember about me",
        }.get(family or "", f"use the {tool.name} tool")
        examples.append(f'"{example}"')
    for handoff in request.handoffs[:2]:
        examples.append(f'"transfer me to {handoff.agent_name}"')
    return examples


def _capabilities(request: _Request) -> str:
    examples = _tool_examples(request)
    if not examples:
        return (
            "Give this agent tools (e.g. a calculator), handoffs or a memory tool and I will "
            "use them when you ask."
        )
    return "Try " + ", ".join(examples) + "."


def _plain_reply(request: _Request) -> str:
    text = request.conv.last_user_text
    style = request.style
    echo = text if len(text) <= _MAX_ECHO else text[: _MAX_ECHO - 1].rstrip() + "…"
    name = style.name
    if _IDENTITY_RE.search(text):
        who = f"My name is {name}. " if name else ""
        return f"{who}{_NOT_AN_LLM} {_capabilities(request)}"
    if _HELP_RE.search(text):
        return f"{_NOT_AN_LLM} {_capabilities(request)}"
    parts: list[str] = []
    if not request.conv.has_assistant_reply:
        parts.append(f"Hi, I am {name}." if name else "Hi!")
        parts.append(_NOT_AN_LLM)
    elif name:
        parts.append(f"{name} here.")
    parts.append(f'You said: "{echo}".' if echo else "You sent an empty message.")
    parts.append(_capabilities(request))
    return " ".join(parts)


def _tool_result_reply(request: _Request) -> str:
    sentences: list[str] = []
    for out in request.conv.trailing_outputs:
        output = out.output.strip()
        if len(output) > _MAX_TOOL_OUTPUT:
            output = output[: _MAX_TOOL_OUTPUT - 1] + "…"
        family = _tool_family(out.name)
        if family == "memory_save":
            sentences.append(f"I saved that to memory with the {out.name} tool: {output}")
        else:
            sentences.append(f"The {out.name or 'tool'} tool returned: {output}")
    return " ".join(s if s.endswith((".", "!", "?", "…")) else s + "." for s in sentences)


def _handoff_reply(request: _Request, output: str) -> str:
    try:
        data = json.loads(output)
        agent = data.get("assistant") if isinstance(data, dict) else None
    except ValueError:
        agent = output or None
    who = request.style.name or (agent if isinstance(agent, str) else None) or "the new agent"
    text = request.conv.last_user_text
    echo = text if len(text) <= _MAX_ECHO else text[: _MAX_ECHO - 1].rstrip() + "…"
    said = f' You said: "{echo}".' if echo else ""
    return f"Hi, this is {who}: the conversation was handed over to me.{said} How can I help?"


def _decide(request: _Request) -> _Decision:
    conv = request.conv
    text = conv.last_user_text
    tools_by_name = {t.name: t for t in request.tools}

    if conv.trailing_outputs:
        handoff_outputs = [o for o in conv.trailing_outputs if o.is_handoff]
        if handoff_outputs and len(handoff_outputs) == len(conv.trailing_outputs):
            return _Decision(
                "handoff_greeting", text=_handoff_reply(request, handoff_outputs[-1].output)
            )
        return _Decision("tool_result", text=_tool_result_reply(request))
    if conv.nested_handoff_to is not None:
        return _Decision("handoff_greeting", text=_handoff_reply(request, conv.nested_handoff_to))

    if not conv.last_is_user or request.tool_choice == "none":
        return _Decision("reply", text=_plain_reply(request))

    # An explicitly forced tool (ModelSettings.tool_choice="<name>").
    choice = request.tool_choice
    if choice and choice not in {"auto", "required", "none"}:
        if choice in tools_by_name:
            tool = tools_by_name[choice]
            return _Decision("tool", call=_call_tool(tool, text, _tool_family(choice), None))
        for handoff in request.handoffs:
            if handoff.tool_name == choice:
                return _Decision("handoff", call=_handoff_call(handoff))

    # Handoffs: "transfer me to billing", "talk to the Billing agent".
    failed_target: str | None = None
    for pattern in _HANDOFF_RES:
        if m := pattern.search(text):
            target = _clean(m.group("target"))
            matched = _match_handoff(target, request.handoffs)
            if matched is not None:
                return _Decision("handoff", call=_handoff_call(matched))
            failed_target = failed_target or target

    # Memory: "what do you remember about me", "remember that ...".
    if _RECALL_RE.search(text):
        search = next((t for t in request.tools if _tool_family(t.name) == "memory_search"), None)
        if search is not None:
            return _Decision("memory_search", call=_call_tool(search, text, "memory_search", None))
        return _Decision(
            "memory_search",
            text="I have no memory search tool, so I cannot look anything up. "
            "Give this agent a memory tool (e.g. search_memory) to try it.",
        )
    if m := _REMEMBER_RE.search(text):
        fact = _clean(m.group("fact"))
        save = next((t for t in request.tools if _tool_family(t.name) == "memory_save"), None)
        if save is not None:
            return _Decision("memory_save", call=_call_tool(save, text, "memory_save", fact))
        return _Decision(
            "memory_save",
            text=f'I have no memory tool, so I cannot remember "{fact}". '
            "Give this agent a memory tool (e.g. remember or manage_memory) to try it.",
        )

    # A tool named in the message ("use the calculator ...", "call get_weather ...").
    for tool in sorted(request.tools, key=lambda t: -len(t.name)):
        if _mentions_name(text, tool.name):
            family = _tool_family(tool.name)
            return _Decision("tool", call=_call_tool(tool, text, family, None))

    # A request that matches what a kind of tool does.
    expression = _find_expression(text)
    wants_calc = expression is not None and (
        _CALC_WORDS_RE.search(text) is not None or _clean(text) == expression
    )
    triggers = {
        "calculator": wants_calc,
        "weather": _WEATHER_RE.search(text) is not None,
        "datetime": _TIME_RE.search(text) is not None,
        "fetch": _URL_RE.search(text) is not None
        or (_FETCH_RE.search(text) is not None and _find_url(text) is not None),
        "search": _SEARCH_RE.search(text) is not None,
    }
    for family, wanted in triggers.items():
        if not wanted:
            continue
        for tool in request.tools:
            if _tool_family(tool.name) == family:
                return _Decision("tool", call=_call_tool(tool, text, family, None))

    # A distinctive word of a tool's name ("lookup_order" ← "where is my order?").
    words = set(_words(text))
    for tool in request.tools:
        parts = [p for p in _name_parts(tool.name) if len(p) >= 4 and p not in _NAME_STOPWORDS]
        if any(any(_same_word(p, w) for w in words) for p in parts):
            family = _tool_family(tool.name)
            return _Decision("tool", call=_call_tool(tool, text, family, None))

    if choice == "required":
        if request.tools:
            tool = request.tools[0]
            return _Decision("tool", call=_call_tool(tool, text, _tool_family(tool.name), None))
        if request.handoffs:
            return _Decision("handoff", call=_handoff_call(request.handoffs[0]))

    if failed_target is not None:
        agents = ", ".join(h.agent_name for h in request.handoffs) or "none"
        return _Decision(
            "handoff_unavailable",
            text=f'I cannot transfer you to "{failed_target}": no handoff matches. '
            f"Agents I can hand over to: {agents}.",
        )
    if m := _USE_TOOL_RE.search(text):
        names = ", ".join(t.name for t in request.tools) or "none"
        return _Decision(
            "tool_unavailable",
            text=f'I have no tool called "{m.group("name")}". Tools I can use: {names}.',
        )
    return _Decision("reply", text=_plain_reply(request))


# --------------------------------------------------------------------------------------------
# Building the response
# --------------------------------------------------------------------------------------------


def _digest(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class _Plan:
    """Everything needed to answer one request, identical for streamed and non-streamed calls."""

    response_id: str
    item: TResponseOutputItem
    tokens: list[str]
    input_tokens: int
    intent: str

    @property
    def output_tokens(self) -> int:
        return len(self.tokens)

    def usage(self) -> Usage:
        return Usage(
            requests=1,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            total_tokens=self.input_tokens + self.output_tokens,
        )

    def response_usage(self) -> ResponseUsage:
        return ResponseUsage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            total_tokens=self.input_tokens + self.output_tokens,
            # Built with model_validate: newer openai types also require `cache_write_tokens`.
            input_tokens_details=InputTokensDetails.model_validate(
                {"cached_tokens": 0, "cache_write_tokens": 0}
            ),
            output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
        )


class OfflineModel(Model):
    """The built-in offline model (see the module docstring and docs/offline-model.md).

    Args:
        token_delay: seconds to sleep before each streamed delta (0 = as fast as possible; the
            product may pass e.g. 0.015 so that streaming is visible). Non-streamed calls never
            sleep.
        model_name: the name reported in responses and traces.
    """

    def __init__(self, *, token_delay: float = 0.0, model_name: str = OFFLINE_MODEL_NAME) -> None:
        if token_delay < 0:
            raise ValueError("token_delay must be >= 0")
        self.token_delay = token_delay
        self.model_name = model_name

    def __repr__(self) -> str:
        return f"OfflineModel(token_delay={self.token_delay!r})"

    # -- planning ---------------------------------------------------------------------------

    def _plan(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
    ) -> _Plan:
        function_tools = [t for t in tools if isinstance(t, FunctionTool)]
        conv = _read_conversation(input, {t.name for t in function_tools})
        instructions = "\n".join(x for x in (system_instructions, conv.extra_instructions) if x)
        tool_choice = model_settings.tool_choice if model_settings is not None else None
        request = _Request(
            instructions=instructions,
            conv=conv,
            tools=function_tools,
            handoffs=list(handoffs),
            output_schema=output_schema,
            tool_choice=tool_choice if isinstance(tool_choice, str) else None,
            style=_read_style(instructions),
        )
        decision = _decide(request)
        schema_name = output_schema.name() if request.structured and output_schema else None
        digest = _digest(
            self.model_name,
            system_instructions,
            conv.items,
            [t.name for t in function_tools],
            [h.tool_name for h in handoffs],
            schema_name,
        )[:24]
        input_tokens = _count_words(system_instructions or "") + sum(
            _count_words(_item_text(item)) for item in conv.items
        )
        item: TResponseOutputItem
        if decision.call is not None:
            call_id = f"call_off_{_digest(digest, 0, decision.call.name)[:24]}"
            item = ResponseFunctionToolCall(
                id=f"fc_off_{digest}",
                call_id=call_id,
                type="function_call",
                name=decision.call.name,
                arguments=decision.call.arguments,
                status="completed",
            )
            tokens = tokenize(decision.call.arguments)
        else:
            body = decision.text or ""
            text = _styled(body, request.style)
            if request.structured and output_schema is not None:
                schema = output_schema.json_schema()
                hints = _field_hints(conv.last_user_text)
                value = _sample(schema, schema, answer=text, hints=hints, refs=_self_refs(schema))
                text = json.dumps(value, ensure_ascii=False)
            item = ResponseOutputMessage(
                id=f"msg_off_{digest}",
                type="message",
                role="assistant",
                status="completed",
                content=[ResponseOutputText(type="output_text", text=text, annotations=[])],
            )
            tokens = tokenize(text)
        return _Plan(
            response_id=f"resp_off_{digest}",
            item=item,
            tokens=tokens,
            input_tokens=max(1, input_tokens),
            intent=decision.intent,
        )

    def _response(self, plan: _Plan, *, completed: bool) -> Response:
        return Response(
            id=plan.response_id,
            created_at=0,
            model=self.model_name,
            object="response",
            output=[plan.item] if completed else [],
            tool_choice="auto",
            tools=[],
            top_p=None,
            parallel_tool_calls=False,
            status="completed" if completed else "in_progress",
            usage=plan.response_usage() if completed else None,
        )

    def _trace_span(self, tracing: ModelTracing, model_settings: ModelSettings) -> Any:
        config: dict[str, Any] = {"token_delay": self.token_delay}
        if model_settings is not None and model_settings.tool_choice is not None:
            config["tool_choice"] = str(model_settings.tool_choice)
        span = generation_span(
            model=self.model_name, model_config=config, disabled=tracing.is_disabled()
        )
        span.start(mark_as_current=False)
        return span

    def _finish_span(
        self, span: Any, tracing: ModelTracing, plan: _Plan, input: str | list[Any]
    ) -> None:
        if tracing.include_data():
            items = [{"role": "user", "content": input}] if isinstance(input, str) else input
            span.span_data.input = [_as_dict(i) for i in items]
            span.span_data.output = [plan.item.model_dump(mode="json", exclude_unset=True)]
        span.span_data.usage = {
            "input_tokens": plan.input_tokens,
            "output_tokens": plan.output_tokens,
        }
        span.finish(reset_current=False)

    # -- Model interface --------------------------------------------------------------------

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None = None,
        conversation_id: str | None = None,
        prompt: ResponsePromptParam | None = None,
    ) -> ModelResponse:
        span = self._trace_span(tracing, model_settings)
        plan = self._plan(
            system_instructions, input, model_settings, tools, output_schema, handoffs
        )
        self._finish_span(span, tracing, plan, input)
        return ModelResponse(output=[plan.item], usage=plan.usage(), response_id=plan.response_id)

    async def stream_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None = None,
        conversation_id: str | None = None,
        prompt: ResponsePromptParam | None = None,
    ) -> AsyncIterator[TResponseStreamEvent]:
        span = self._trace_span(tracing, model_settings)
        plan = self._plan(
            system_instructions, input, model_settings, tools, output_schema, handoffs
        )
        try:
            async for event in self._events(plan):
                yield event
        finally:
            self._finish_span(span, tracing, plan, input)

    async def _events(self, plan: _Plan) -> AsyncIterator[TResponseStreamEvent]:
        seq = 0

        def nxt() -> int:
            nonlocal seq
            seq += 1
            return seq - 1

        pending = self._response(plan, completed=False)
        yield ResponseCreatedEvent(
            type="response.created", response=pending.model_copy(deep=True), sequence_number=nxt()
        )
        yield ResponseInProgressEvent(
            type="response.in_progress",
            response=pending.model_copy(deep=True),
            sequence_number=nxt(),
        )
        item = plan.item
        if isinstance(item, ResponseFunctionToolCall):
            item_id = item.id or item.call_id
            yield ResponseOutputItemAddedEvent(
                type="response.output_item.added",
                item=item.model_copy(update={"arguments": "", "status": "in_progress"}),
                output_index=0,
                sequence_number=nxt(),
            )
            for token in plan.tokens:
                await self._pause()
                yield ResponseFunctionCallArgumentsDeltaEvent(
                    type="response.function_call_arguments.delta",
                    item_id=item_id,
                    output_index=0,
                    delta=token,
                    sequence_number=nxt(),
                )
            # Older openai types require `name`; newer ones keep it as an extra field.
            yield ResponseFunctionCallArgumentsDoneEvent.model_validate(
                {
                    "type": "response.function_call_arguments.done",
                    "item_id": item_id,
                    "output_index": 0,
                    "arguments": item.arguments,
                    "name": item.name,
                    "sequence_number": nxt(),
                }
            )
        elif isinstance(item, ResponseOutputMessage):
            part = item.content[0]
            assert isinstance(part, ResponseOutputText)
            yield ResponseOutputItemAddedEvent(
                type="response.output_item.added",
                item=item.model_copy(update={"content": [], "status": "in_progress"}),
                output_index=0,
                sequence_number=nxt(),
            )
            yield ResponseContentPartAddedEvent(
                type="response.content_part.added",
                item_id=item.id,
                output_index=0,
                content_index=0,
                part=part.model_copy(update={"text": "", "annotations": []}),
                sequence_number=nxt(),
            )
            for token in plan.tokens:
                await self._pause()
                yield ResponseTextDeltaEvent(
                    type="response.output_text.delta",
                    item_id=item.id,
                    output_index=0,
                    content_index=0,
                    delta=token,
                    logprobs=[],
                    sequence_number=nxt(),
                )
            yield ResponseTextDoneEvent(
                type="response.output_text.done",
                item_id=item.id,
                output_index=0,
                content_index=0,
                text=part.text,
                logprobs=[],
                sequence_number=nxt(),
            )
            yield ResponseContentPartDoneEvent(
                type="response.content_part.done",
                item_id=item.id,
                output_index=0,
                content_index=0,
                part=part.model_copy(deep=True),
                sequence_number=nxt(),
            )
        yield ResponseOutputItemDoneEvent(
            type="response.output_item.done",
            item=item.model_copy(deep=True),
            output_index=0,
            sequence_number=nxt(),
        )
        yield ResponseCompletedEvent(
            type="response.completed",
            response=self._response(plan, completed=True),
            sequence_number=nxt(),
        )

    async def _pause(self) -> None:
        if self.token_delay > 0:
            await asyncio.sleep(self.token_delay)


def is_offline_model_name(model_name: str | None) -> bool:
    """Whether `model_name` names the offline model (`offline` or `builtin/offline`)."""
    return model_name in {OFFLINE_MODEL_NAME, OFFLINE_MODEL_ID}


class OfflineModelProvider(ModelProvider):
    """A `ModelProvider` that serves the offline model.

    `get_model(None)`, `get_model("offline")` and `get_model("builtin/offline")` return the same
    `OfflineModel`; any other name raises `UserError`. Register it in a `MultiProvider` under the
    prefix `builtin` to mix it with real providers.
    """

    def __init__(self, *, token_delay: float = 0.0) -> None:
        self._model = OfflineModel(token_delay=token_delay)

    def get_model(self, model_name: str | None) -> Model:
        if model_name is None or model_name == "" or is_offline_model_name(model_name):
            return self._model
        raise UserError(
            f"Unknown model {model_name!r} for the built-in offline provider: "
            f"use {OFFLINE_MODEL_NAME!r} or {OFFLINE_MODEL_ID!r}."
        )

"""Faster paths through the `openai` client for what every run does many times, each equal to
the library's own result and falling back to it for anything else (`ai_agents.runtime.models`
uses them; docs/benchmark.md has the measurements).

**Streamed chunks** (`FastChunksClient`): the library builds each chunk of a streamed chat
completion with its own non-validating constructor, which walks the model's type annotations in
Python (about 100 µs a chunk, a chunk per token). pydantic's validation builds the same object in
a few µs. A chunk that does not validate (a provider off the schema) is built the library's
lenient way, as before.

**Request bodies** (`install`): the `openai` client runs every request body through its
`_utils._transform`, which walks the whole body against the params' TypedDict annotations (each
message against every member of the message union, each content part likewise) to rename
aliased keys and to format dates and files. Chat-completions params have no such field, and the
Agents SDK hands them plain JSON (dicts, lists, strings, numbers, booleans, None): for such a
body the transform returns its input without the omitted arguments, after a walk that cost about
a tenth of a worker's CPU per run. `install` returns that result directly. It is installed only
if a walk of the params' annotations finds no alias or format (a newer `openai` that adds one
keeps the library's path), and a body holding anything but plain JSON (a pydantic model, a
tuple, a file) still goes through the library's transform.

**Declared settings types** (`install_declared_types`): the Agents SDK resolves the type hints
of `Agent` (and of `RunConfig`) every time one is constructed, to learn which settings class a
subclass declares: `typing.get_type_hints` evaluates every annotation of the class from its
source text (for `Agent` it ends in a NameError on a name imported only for type checkers, and
the SDK takes its default), about 0.4 ms of a worker's CPU per run, which builds its agents.
The answer depends on the class alone, so it is kept per class and field.

**Session contracts** (`install_session_contracts`): on every turn the Agents SDK asks whether
the session's four history methods take a `wrapper` argument, with `inspect.signature` of each
bound method: about 3 % of a worker's CPU. For a session whose methods are its class's own, the
answer depends on the class alone and is kept per class; an instance that replaces a method
gets the library's answer every time.

Tests compare each fast path with the library's on what the SDK sends and receives.
"""

from __future__ import annotations

import functools
import logging
import sys
import typing
from typing import Any

import pydantic
import typing_extensions
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionChunk

log = logging.getLogger(__name__)

_PLAIN_LEAVES = (str, int, float, bool, type(None))


def plain(value: Any) -> bool:
    """Whether `value` is plain JSON (what the library's transform leaves as it is)."""
    if isinstance(value, _PLAIN_LEAVES):
        return True
    if isinstance(value, dict):
        return all(isinstance(key, str) and plain(item) for key, item in value.items())
    if isinstance(value, list):
        return all(plain(item) for item in value)
    return False


def has_transforms(annotation: Any, _seen: set[int] | None = None) -> bool:
    """Whether the library's transform could change a value of `annotation`: an alias or a
    format anywhere in it. Unresolvable annotations count as yes."""
    from openai._utils._transform import PropertyInfo

    seen = set() if _seen is None else _seen
    if id(annotation) in seen:
        return False
    seen.add(id(annotation))
    if typing_extensions.is_typeddict(annotation):
        try:
            hints = typing_extensions.get_type_hints(annotation, include_extras=True)
        except Exception:
            return True
        return any(has_transforms(hint, seen) for hint in hints.values())
    origin = typing_extensions.get_origin(annotation)
    args = typing_extensions.get_args(annotation)
    if origin is typing_extensions.Annotated or origin is typing.Annotated:
        for meta in args[1:]:
            if isinstance(meta, PropertyInfo) and (meta.alias or meta.format):
                return True
        return has_transforms(args[0], seen)
    if origin is typing_extensions.Literal or origin is typing.Literal:
        return False
    return any(has_transforms(arg, seen) for arg in args if not isinstance(arg, (str, int)))


def fast_transform(original: Any, safe: tuple[Any, ...]) -> Any:
    """`original` (the library's `async_maybe_transform`), answering plain bodies of the
    `safe` types itself."""
    from openai._utils import is_given

    async def transform(data: object, expected_type: object) -> Any:
        if expected_type in safe and isinstance(data, dict):
            body = {key: value for key, value in data.items() if is_given(value)}
            if all(isinstance(key, str) and plain(value) for key, value in body.items()):
                return body
        return await original(data, expected_type)

    transform.__wrapped__ = original  # type: ignore[attr-defined]
    return transform


def install() -> bool:
    """Install the fast path for chat completions (once). False if the params need the
    library's transform after all."""
    try:
        from openai.resources.chat.completions import completions as module
        from openai.types.chat import completion_create_params as params
    except ImportError:
        return False
    current = module.async_maybe_transform
    if hasattr(current, "__wrapped__"):
        return True
    safe = (params.CompletionCreateParamsStreaming, params.CompletionCreateParamsNonStreaming)
    if any(has_transforms(kind) for kind in safe):
        log.info("chat completion params have transformed fields: using openai's transform")
        return False
    module.async_maybe_transform = fast_transform(current, safe)  # type: ignore[assignment]
    return True


def install_declared_types() -> bool:
    """Keep the SDK's declared settings type per (class, field) in every module of the SDK
    that uses it (once). False if this SDK has no such function."""
    try:
        from agents import _config_coercion
    except ImportError:
        return False
    original = getattr(_config_coercion, "_declared_dataclass_type", None)
    if original is None:
        return False
    if hasattr(original, "cache_info"):
        return True
    cached = functools.lru_cache(maxsize=256)(original)
    for name, module in list(sys.modules.items()):
        if name != "agents" and not name.startswith("agents."):
            continue
        if getattr(module, "_declared_dataclass_type", None) is original:
            module._declared_dataclass_type = cached  # type: ignore[attr-defined]
    return True


_SESSION_METHODS = ("get_items", "add_items", "pop_item", "clear_session")


def install_session_contracts() -> bool:
    """Keep the SDK's answer to "do this session's methods take `wrapper`" per session class
    (once). False if this SDK does not ask."""
    try:
        from agents.memory import session as module
    except ImportError:
        return False
    original = getattr(module, "_session_accepts_wrapper", None)
    if original is None:
        return False
    if hasattr(original, "__wrapped__"):
        return True
    known: dict[type, bool] = {}

    @functools.wraps(original)
    def accepts_wrapper(session: Any) -> bool:
        kind = type(session)
        own = getattr(session, "__dict__", {})
        if any(name in own or not callable(getattr(kind, name, None)) for name in _SESSION_METHODS):
            return bool(original(session))  # methods of its own: the library's answer
        answer = known.get(kind)
        if answer is None:
            answer = known[kind] = bool(original(session))
        return answer

    module._session_accepts_wrapper = accepts_wrapper  # type: ignore[attr-defined]
    return True


class FastChunksClient(AsyncOpenAI):
    """`AsyncOpenAI`, building streamed chat-completion chunks with pydantic's validation (see
    the module's docstring); everything else as the library does."""

    def _process_response_data(self, *, data: object, cast_to: Any, response: Any) -> Any:
        if cast_to is ChatCompletionChunk and isinstance(data, dict):
            try:
                return ChatCompletionChunk.model_validate(data)
            except pydantic.ValidationError:
                pass  # off the schema: the library's lenient construction below
        return super()._process_response_data(data=data, cast_to=cast_to, response=response)

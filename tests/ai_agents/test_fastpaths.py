"""The fast path for chat-completion request bodies gives exactly what openai's own transform
gives, for the bodies the Agents SDK sends, and steps aside for anything else."""

from __future__ import annotations

from typing import Annotated

import pydantic
from agents import Agent, ModelSettings
from openai import NOT_GIVEN, AsyncOpenAI, omit
from openai._utils import async_maybe_transform as library_transform
from openai._utils._transform import PropertyInfo
from openai.resources.chat.completions import completions as chat_module
from openai.types.chat import ChatCompletionChunk
from openai.types.chat import completion_create_params as params
from typing_extensions import TypedDict

from ai_agents.runtime import fastpaths
from ai_agents.runtime import models as _models  # noqa: F401  (installs the fast path)

STREAMING = params.CompletionCreateParamsStreaming


def _sdk_body(**extra):
    """A body as `OpenAIChatCompletionsModel` builds it: history with tool calls, tools, and
    arguments the SDK leaves out (omit / NOT_GIVEN)."""
    body = {
        "model": "fake-model",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "And this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather of a city.",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                        "additionalProperties": False,
                    },
                    "strict": True,
                },
            }
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.2,
        "top_p": omit,
        "max_tokens": NOT_GIVEN,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
        },
        "metadata": {"run": "r1"},
        "store": None,
    }
    body.update(extra)
    return body


async def test_the_chat_client_uses_the_fast_path():
    assert hasattr(chat_module.async_maybe_transform, "__wrapped__")


async def test_an_sdk_body_comes_out_exactly_as_the_library_makes_it():
    fast = chat_module.async_maybe_transform
    body = _sdk_body()
    expected = await library_transform(_sdk_body(), STREAMING)
    got = await fast(body, STREAMING)
    assert got == expected
    assert "top_p" not in got and "max_tokens" not in got  # omitted arguments are left out
    assert got["store"] is None  # an explicit None stays


async def test_a_body_that_is_not_plain_json_goes_through_the_library():
    class Schema(pydantic.BaseModel):
        type: str = "object"

    calls = []

    async def library(data, expected_type):
        calls.append(data)
        return await library_transform(data, expected_type)

    fast = fastpaths.fast_transform(library, (STREAMING,))
    for odd in ({"metadata": ("a", "b")}, {"response_format": Schema()}):
        body = _sdk_body(**odd)
        assert await fast(body, STREAMING) == await library_transform(_sdk_body(**odd), STREAMING)
    assert len(calls) == 2
    # Another params type is the library's business too.
    await fast({"metadata": {"a": "b"}}, params.CompletionCreateParamsNonStreaming)
    assert len(calls) == 3


def test_a_params_type_with_an_alias_or_a_format_is_never_taken_over():
    class Inner(TypedDict, total=False):
        created: Annotated[str, PropertyInfo(format="iso8601")]

    class Aliased(TypedDict, total=False):
        name: Annotated[str, PropertyInfo(alias="Name")]

    class Outer(TypedDict, total=False):
        items: list[Inner]
        plain: str

    assert fastpaths.has_transforms(Aliased)
    assert fastpaths.has_transforms(Outer)  # found however deep it is
    assert not fastpaths.has_transforms(STREAMING)
    assert not fastpaths.has_transforms(params.CompletionCreateParamsNonStreaming)


# --- streamed chunks ----------------------------------------------------------------------------

CHUNKS = [
    {  # the role chunk
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        ],
    },
    {  # a token
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fake-model",
        "system_fingerprint": None,
        "choices": [
            {"index": 0, "delta": {"content": "hello "}, "logprobs": None, "finish_reason": None}
        ],
    },
    {  # a tool call's first fragment
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"ci'},
                        }
                    ]
                },
                "finish_reason": None,
            }
        ],
    },
    {  # the usage chunk: no choices, and a field this client version does not know
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        "provider_extra": {"region": "eu"},
    },
]


def _client():
    return fastpaths.FastChunksClient(base_url="http://127.0.0.1:9/v1", api_key="none")


def _library(data):
    return AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="none")._process_response_data(
        data=data, cast_to=ChatCompletionChunk, response=None
    )


def test_a_streamed_chunk_is_the_object_the_library_builds():
    client = _client()
    for data in CHUNKS:
        fast = client._process_response_data(data=data, cast_to=ChatCompletionChunk, response=None)
        slow = _library(data)
        assert type(fast) is type(slow) is ChatCompletionChunk
        assert fast == slow
        assert fast.model_dump() == slow.model_dump()
        # (pydantic counts a kept unknown field as set; the library's constructor does not)
        assert fast.model_fields_set - set(fast.model_extra or {}) == slow.model_fields_set
    extra = client._process_response_data(
        data=CHUNKS[-1], cast_to=ChatCompletionChunk, response=None
    )
    assert extra.provider_extra == {"region": "eu"}  # unknown fields are kept, as before


def test_a_chunk_off_the_schema_is_built_the_lenient_way_as_before():
    off = {"id": "c1", "choices": [{"delta": {"content": "hi"}, "index": "first"}]}  # no model
    got = _client()._process_response_data(data=off, cast_to=ChatCompletionChunk, response=None)
    assert got == _library(off)
    assert got.choices[0].delta.content == "hi"


def test_provider_clients_are_the_fast_client():
    from ai_agents.runtime.models import _new_client

    class Provider:
        api_key_encrypted = b""
        base_url = "http://127.0.0.1:9/v1"
        timeout_seconds = 5

    assert isinstance(_new_client(Provider()), fastpaths.FastChunksClient)


def test_an_agents_settings_type_is_resolved_once_per_class(monkeypatch):
    from agents import RunConfig, _config_coercion

    cached = _config_coercion._declared_dataclass_type
    for owner in (Agent, RunConfig):
        assert cached(owner, "model_settings", ModelSettings) is cached.__wrapped__(
            owner, "model_settings", ModelSettings
        )
    cached.cache_clear()
    resolved = []
    real = _config_coercion.get_type_hints
    monkeypatch.setattr(
        _config_coercion, "get_type_hints", lambda owner: resolved.append(owner) or real(owner)
    )
    built = [Agent(name=f"a{n}", model_settings={"temperature": 0.5}) for n in range(3)]
    assert [a.model_settings for a in built] == [ModelSettings(temperature=0.5)] * 3
    assert resolved.count(Agent) == 1


def test_a_sessions_wrapper_contract_is_inspected_once_per_class_as_the_library_answers(
    monkeypatch,
):
    from agents import SQLiteSession
    from agents.memory import session as module

    from conversations.session import ThreadSession

    class TakesWrapper:
        async def get_items(self, limit=None, wrapper=None): ...
        async def add_items(self, items, wrapper=None): ...
        async def pop_item(self, wrapper=None): ...
        async def clear_session(self, wrapper=None): ...

    kept = module._session_accepts_wrapper
    library = kept.__wrapped__
    thread_session = ThreadSession(tenant_id=1, thread_id=1)
    patched = TakesWrapper()
    patched.pop_item = lambda: None  # an instance's own method: no `wrapper`
    for session in (thread_session, SQLiteSession("s"), TakesWrapper(), patched):
        assert kept(session) is library(session)
    assert kept(TakesWrapper()) is True and kept(patched) is False

    inspected = []
    real = module._session_method_accepts_wrapper
    monkeypatch.setattr(
        module,
        "_session_method_accepts_wrapper",
        lambda method: inspected.append(method) or real(method),
    )
    for _ in range(3):
        assert module._get_session_wrapper(thread_session, object()) is None
        assert kept(TakesWrapper()) is True
    assert inspected == []  # both classes were answered above: no signature read again
    kept(patched)
    assert len(inspected) == 3  # the library's answer (it stops at pop_item)

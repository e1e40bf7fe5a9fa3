"""The fast path for chat-completion request bodies gives exactly what openai's own transform
gives, for the bodies the Agents SDK sends, and steps aside for anything else."""

from __future__ import annotations

from typing import Annotated

import pydantic
from openai import NOT_GIVEN, omit
from openai._utils import async_maybe_transform as library_transform
from openai._utils._transform import PropertyInfo
from openai.resources.chat.completions import completions as chat_module
from openai.types.chat import completion_create_params as params
from typing_extensions import TypedDict

from ai_agents.runtime import fastparams
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

    fast = fastparams.fast_transform(library, (STREAMING,))
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

    assert fastparams.has_transforms(Aliased)
    assert fastparams.has_transforms(Outer)  # found however deep it is
    assert not fastparams.has_transforms(STREAMING)
    assert not fastparams.has_transforms(params.CompletionCreateParamsNonStreaming)

"""The built-in offline model, driven through the real Agents SDK `Runner` (no network, no DB)."""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Any, Literal

import pytest
from agents import (
    Agent,
    AgentUpdatedStreamEvent,
    FunctionTool,
    ModelSettings,
    ModelTracing,
    MultiProvider,
    RawResponsesStreamEvent,
    RunConfig,
    Runner,
    function_tool,
)
from agents.exceptions import UserError
from agents.models.multi_provider import MultiProviderMap
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseTextDeltaEvent,
)
from pydantic import BaseModel, Field

from ai_agents.runtime.offline import (
    OFFLINE_MARKER,
    OFFLINE_MODEL_ID,
    OFFLINE_MODEL_NAME,
    OfflineModel,
    OfflineModelProvider,
    tokenize,
)

RUN_CONFIG = RunConfig(tracing_disabled=True, model_provider=OfflineModelProvider())


def offline_agent(name: str = "Assistant", **kwargs: Any) -> Agent[Any]:
    return Agent(name=name, model=OFFLINE_MODEL_ID, **kwargs)


async def run(agent: Agent[Any], message: Any, **kwargs: Any) -> Any:
    return await Runner.run(agent, message, run_config=RUN_CONFIG, **kwargs)


async def run_streamed(agent: Agent[Any], message: Any, **kwargs: Any) -> tuple[Any, list[Any]]:
    result = Runner.run_streamed(agent, message, run_config=RUN_CONFIG, **kwargs)
    events = [event async for event in result.stream_events()]
    return result, events


def deltas(events: list[Any]) -> list[str]:
    return [
        e.data.delta
        for e in events
        if isinstance(e, RawResponsesStreamEvent) and isinstance(e.data, ResponseTextDeltaEvent)
    ]


def tool_calls(result: Any) -> list[ResponseFunctionToolCall]:
    return [i.raw_item for i in result.new_items if i.type == "tool_call_item"]


# -- tools used by the tests ------------------------------------------------------------------

SEEN: list[tuple[str, dict[str, Any]]] = []


@pytest.fixture(autouse=True)
def _clear_seen():
    SEEN.clear()
    yield


@function_tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: The expression, e.g. "2+3".
    """
    SEEN.append(("calculator", {"expression": expression}))
    allowed = set("0123456789+-*/(). ")
    assert set(expression) <= allowed, expression
    return str(eval(expression, {"__builtins__": {}}))


@function_tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    SEEN.append(("add", {"a": a, "b": b}))
    return a + b


@function_tool
def current_time(timezone: str) -> str:
    """The current time in an IANA timezone."""
    SEEN.append(("current_time", {"timezone": timezone}))
    return f"09:30 ({timezone})"


@function_tool
def fetch_url(url: str) -> str:
    """Fetch a web page."""
    SEEN.append(("fetch_url", {"url": url}))
    return f"<title>Example Domain</title> from {url}"


@function_tool
def remember(fact: str) -> str:
    """Save a fact about the user."""
    SEEN.append(("remember", {"fact": fact}))
    return f"Saved memory #1: {fact}"


async def _manage_memory(ctx: Any, args: str) -> str:
    SEEN.append(("manage_memory", json.loads(args)))
    return "created memory 1"


# The shape of LangMem's create_manage_memory_tool(), as seen by the SDK.
manage_memory = FunctionTool(
    name="manage_memory",
    description="Create, update or delete a memory.",
    params_json_schema={
        "type": "object",
        "properties": {
            "content": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "action": {"type": "string", "enum": ["create", "update", "delete"]},
            "id": {"anyOf": [{"type": "string", "format": "uuid"}, {"type": "null"}]},
        },
        "required": ["content", "action", "id"],
        "additionalProperties": False,
    },
    on_invoke_tool=_manage_memory,
)


# -- plain replies and streaming ---------------------------------------------------------------


async def test_plain_reply_streams_token_by_token_and_begins_with_the_marker():
    result, events = await run_streamed(offline_agent(), "Hello there, how are you today?")

    text = result.final_output
    assert text.startswith(OFFLINE_MARKER + " ")
    assert "not an LLM" in text
    assert 'You said: "Hello there, how are you today?"' in text
    pieces = deltas(events)
    assert len(pieces) >= 10
    assert "".join(pieces) == text
    assert all(len(p.split()) == 1 for p in pieces)  # one word-ish token per delta
    assert pieces == tokenize(text)


async def test_stream_emits_the_responses_event_sequence():
    _, events = await run_streamed(offline_agent(), "hi")
    types = [e.data.type for e in events if isinstance(e, RawResponsesStreamEvent)]
    n = types.count("response.output_text.delta")
    assert n >= 3
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * n,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    completed = [
        e.data for e in events if isinstance(getattr(e, "data", None), ResponseCompletedEvent)
    ]
    (message,) = completed[0].response.output
    assert isinstance(message, ResponseOutputMessage)
    assert message.content[0].text.startswith(OFFLINE_MARKER)


async def test_later_replies_keep_the_marker_but_drop_the_introduction():
    agent = offline_agent()
    first = await run(agent, "hi")
    second = await run(agent, [*first.to_input_list(), {"role": "user", "content": "and again"}])
    assert "not an LLM" in first.final_output
    assert second.final_output.startswith(OFFLINE_MARKER)
    assert "not an LLM" not in second.final_output
    assert 'You said: "and again"' in second.final_output


async def test_identity_question_says_it_is_not_an_llm():
    result = await run(offline_agent(instructions="Your name is Robo."), "Who are you?")
    assert "My name is Robo" in result.final_output
    assert "built-in test model, not an LLM" in result.final_output


async def test_string_input_straight_to_the_model():
    model = OfflineModel()
    response = await model.get_response(
        None,
        "hi",
        ModelSettings(),
        [],
        None,
        [],
        ModelTracing.DISABLED,
        previous_response_id=None,
        conversation_id=None,
        prompt=None,
    )
    (message,) = response.output
    assert isinstance(message, ResponseOutputMessage)
    assert message.content[0].text.startswith(OFFLINE_MARKER)
    assert 'You said: "hi"' in message.content[0].text
    assert response.usage.input_tokens == 1


async def test_get_response_and_stream_response_agree():
    model = OfflineModel()
    args: tuple[Any, ...] = (
        "Always answer in uppercase.",
        [{"role": "user", "content": "use the calculator to compute 2+3"}],
        ModelSettings(),
        [calculator],
        None,
        [],
        ModelTracing.DISABLED,
    )
    ids: dict[str, Any] = {"previous_response_id": None, "conversation_id": None, "prompt": None}
    response = await model.get_response(*args, **ids)
    events = [e async for e in model.stream_response(*args, **ids)]
    completed = events[-1]
    assert isinstance(completed, ResponseCompletedEvent)
    assert completed.response.output == response.output
    assert completed.response.id == response.response_id
    assert completed.response.usage is not None
    assert completed.response.usage.output_tokens == response.usage.output_tokens > 0
    assert completed.response.usage.input_tokens == response.usage.input_tokens == 10
    (call,) = response.output
    assert isinstance(call, ResponseFunctionToolCall)
    argument_deltas = [
        e.delta for e in events if e.type == "response.function_call_arguments.delta"
    ]
    assert "".join(argument_deltas) == call.arguments
    assert len(argument_deltas) == response.usage.output_tokens


# -- determinism --------------------------------------------------------------------------------


async def test_same_input_gives_the_same_output():
    agent = offline_agent(tools=[calculator])
    first, first_events = await run_streamed(agent, "use the calculator to compute 6*7")
    second, second_events = await run_streamed(agent, "use the calculator to compute 6*7")
    third = await run(agent, "use the calculator to compute 6*7")

    assert first.final_output == second.final_output == third.final_output
    assert deltas(first_events) == deltas(second_events)
    ids = [[r.response_id for r in res.raw_responses] for res in (first, second, third)]
    assert ids[0] == ids[1] == ids[2]
    calls = [[c.call_id for c in tool_calls(res)] for res in (first, second, third)]
    assert calls[0] == calls[1] == calls[2]
    assert calls[0][0]

    different = await run(agent, "use the calculator to compute 6*8")
    assert different.final_output != first.final_output
    assert tool_calls(different)[0].call_id != calls[0][0]


# -- tools ----------------------------------------------------------------------------------------


async def test_calculator_tool_is_called_and_its_output_used():
    agent = offline_agent(tools=[calculator])
    result = await run(agent, "use the calculator to compute 2+3", max_turns=2)

    assert SEEN == [("calculator", {"expression": "2+3"})]
    (call,) = tool_calls(result)
    assert call.name == "calculator"
    assert json.loads(call.arguments) == {"expression": "2+3"}
    assert result.final_output == f"{OFFLINE_MARKER} The calculator tool returned: 5."
    assert result.context_wrapper.usage.requests == 2


async def test_tool_round_trip_streams_call_output_and_answer():
    agent = offline_agent(tools=[calculator])
    result, events = await run_streamed(agent, "what is 12 times 7?", max_turns=2)

    names = [e.name for e in events if e.type == "run_item_stream_event"]
    assert names == ["tool_called", "tool_output", "message_output_created"]
    raw_types = [e.data.type for e in events if isinstance(e, RawResponsesStreamEvent)]
    assert "response.function_call_arguments.delta" in raw_types
    assert "response.function_call_arguments.done" in raw_types
    assert SEEN == [("calculator", {"expression": "12 * 7"})]
    assert "84" in result.final_output
    assert "".join(deltas(events)) == result.final_output


@pytest.mark.parametrize(
    ("tools", "message", "expected_call", "expected_text"),
    [
        ([add], "what is 7 plus 8", ("add", {"a": 7, "b": 8}), "15"),
        (
            [calculator, current_time],
            "What time is it in Tokyo?",
            ("current_time", {"timezone": "Asia/Tokyo"}),
            "09:30 (Asia/Tokyo)",
        ),
        (
            [current_time, fetch_url],
            "fetch https://example.com",
            ("fetch_url", {"url": "https://example.com"}),
            "<title>Example Domain</title>",
        ),
    ],
)
async def test_tool_arguments_come_from_the_message_and_the_schema(
    tools, message, expected_call, expected_text
):
    result = await run(offline_agent(tools=tools), message, max_turns=2)
    assert SEEN == [expected_call]
    assert expected_text in result.final_output
    assert result.final_output.startswith(OFFLINE_MARKER)


async def test_tool_call_ids_are_unique_across_a_conversation():
    agent = offline_agent(tools=[calculator])
    first = await run(agent, "use the calculator to compute 2+3")
    second = await run(
        agent,
        [*first.to_input_list(), {"role": "user", "content": "use the calculator to compute 2+3"}],
    )
    ids = [c.call_id for c in tool_calls(first) + tool_calls(second)]
    assert len(ids) == 2
    assert all(i.startswith("call_") and len(i) > 10 for i in ids)
    assert len(set(ids)) == 2


async def test_tool_choice_none_and_missing_tool():
    agent = offline_agent(tools=[calculator], model_settings=ModelSettings(tool_choice="none"))
    result = await run(agent, "use the calculator to compute 2+3")
    assert SEEN == []
    assert tool_calls(result) == []

    result = await run(offline_agent(tools=[add]), "use the weather tool for Paris")
    assert SEEN == []
    assert 'I have no tool called "weather"' in result.final_output
    assert "add" in result.final_output


# -- handoffs -------------------------------------------------------------------------------------


async def test_handoff_to_the_named_agent_streamed():
    billing = offline_agent("Billing agent")
    triage = offline_agent("Triage", handoffs=[billing])
    result, events = await run_streamed(triage, "transfer me to billing", max_turns=2)

    agents_seen = [e.new_agent.name for e in events if isinstance(e, AgentUpdatedStreamEvent)]
    assert agents_seen == ["Triage", "Billing agent"]
    assert result.last_agent is billing
    names = [e.name for e in events if e.type == "run_item_stream_event"]
    assert names[:2] == ["handoff_requested", "handoff_occured"]
    assert result.final_output.startswith(OFFLINE_MARKER)
    assert "Hi, this is Billing agent" in result.final_output


async def test_handoff_picks_the_matching_agent_and_refuses_unknown_ones():
    billing = offline_agent("Billing agent")
    support = offline_agent("Customer support")
    triage = offline_agent("Triage", handoffs=[billing, support])

    result = await run(triage, "Can I talk to the Customer Support team?")
    assert result.last_agent is support

    result = await run(triage, "please connect me to billing")
    assert result.last_agent is billing

    result = await run(triage, "transfer me to sales")
    assert result.last_agent is triage
    assert 'I cannot transfer you to "sales"' in result.final_output
    assert "Billing agent, Customer support" in result.final_output


async def test_handoff_takes_the_one_agent_a_part_of_whose_name_is_asked_for():
    billing = offline_agent("Billing specialist")
    refunds = offline_agent("Refunds desk")
    triage = offline_agent("Triage", handoffs=[refunds, billing])
    result = await run(triage, "I was charged twice, please transfer me to billing")
    assert result.last_agent is billing

    # Two agents share as much of the name: neither is guessed.
    manager = offline_agent("Billing manager")
    triage = offline_agent("Triage", handoffs=[billing, manager])
    result = await run(triage, "transfer me to billing")
    assert result.last_agent is triage
    assert "Billing specialist, Billing manager" in result.final_output


async def test_handoff_with_nested_history():
    billing = offline_agent("Billing agent")
    triage = offline_agent("Triage", handoffs=[billing])
    config = RunConfig(
        tracing_disabled=True, model_provider=OfflineModelProvider(), nest_handoff_history=True
    )
    result = await Runner.run(triage, "transfer me to billing", run_config=config, max_turns=2)
    assert result.last_agent is billing
    assert "Hi, this is Billing agent" in result.final_output
    assert 'You said: "transfer me to billing"' in result.final_output


# -- memory ---------------------------------------------------------------------------------------


async def test_remember_calls_the_memory_tool():
    result = await run(offline_agent(tools=[calculator, remember]), "remember that I like tea")
    assert SEEN == [("remember", {"fact": "I like tea"})]
    assert "Saved memory #1: I like tea" in result.final_output


async def test_remember_with_a_langmem_style_manage_memory_tool():
    await run(offline_agent(tools=[manage_memory]), "Please remember that my dog is called Rex.")
    assert SEEN == [
        ("manage_memory", {"content": "my dog is called Rex", "action": "create", "id": None})
    ]


async def test_remember_without_a_memory_tool_says_so():
    result = await run(offline_agent(tools=[calculator]), "remember that I like tea")
    assert SEEN == []
    assert tool_calls(result) == []
    assert "I have no memory tool" in result.final_output
    assert '"I like tea"' in result.final_output


# -- structured output ----------------------------------------------------------------------------


class Mood(StrEnum):
    HAPPY = "happy"
    SAD = "sad"


class Pet(BaseModel):
    name: str
    age: int = Field(ge=1, le=30)


class Profile(BaseModel):
    answer: str
    city: str
    temperature: int
    mood: Mood
    kind: Literal["cat", "dog"]
    nickname: str | None
    pets: list[Pet]
    verified: bool


async def test_structured_output_validates_into_the_pydantic_model():
    agent = offline_agent(output_type=Profile)
    message = "city: Paris, temperature: 21, mood: sad, kind: dog"
    result = await run(agent, message)
    profile = result.final_output

    assert isinstance(profile, Profile)
    assert profile.city == "Paris"
    assert profile.temperature == 21
    assert profile.mood is Mood.SAD
    assert profile.kind == "dog"
    assert profile.pets and profile.pets[0].age >= 1
    assert profile.answer.startswith(OFFLINE_MARKER)

    streamed, events = await run_streamed(agent, message)
    assert streamed.final_output == profile
    pieces = deltas(events)
    assert len(pieces) > 5
    assert Profile.model_validate_json("".join(pieces)) == profile


async def test_structured_output_for_a_non_object_type():
    result = await run(offline_agent(output_type=list[int]), "hi")
    assert isinstance(result.final_output, list)
    assert all(isinstance(x, int) for x in result.final_output)


class TreeNode(BaseModel):
    label: str
    children: list[TreeNode]
    parent: TreeNode | None


async def test_structured_output_for_a_recursive_type_terminates():
    result = await run(offline_agent(output_type=TreeNode), "hi")
    tree = result.final_output
    assert isinstance(tree, TreeNode)
    assert tree.parent is None
    assert tree.children == []


async def test_structured_output_after_a_tool_call():
    class Answer(BaseModel):
        result: str

    agent = offline_agent(tools=[calculator], output_type=Answer)
    result = await run(agent, "use the calculator to compute 2+3", max_turns=2)
    assert isinstance(result.final_output, Answer)
    assert "returned: 5" in result.final_output.result


# -- usage ----------------------------------------------------------------------------------------


async def test_usage_is_realistic_and_the_same_streamed_or_not():
    instructions = "You are a helpful demo agent."  # 6 words
    agent = offline_agent(instructions=instructions)
    message = "please say something nice"  # 4 words

    plain = await run(agent, message)
    streamed, events = await run_streamed(agent, message)

    usage = plain.context_wrapper.usage
    assert usage.requests == 1
    assert usage.input_tokens == 10
    assert usage.output_tokens == len(tokenize(plain.final_output)) == len(deltas(events))
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    s = streamed.context_wrapper.usage
    assert (s.requests, s.input_tokens, s.output_tokens, s.total_tokens) == (
        usage.requests,
        usage.input_tokens,
        usage.output_tokens,
        usage.total_tokens,
    )
    completed = next(
        e.data for e in events if isinstance(getattr(e, "data", None), ResponseCompletedEvent)
    )
    assert completed.response.usage.output_tokens == usage.output_tokens


async def test_usage_of_a_tool_run_counts_each_model_call():
    agent = offline_agent(tools=[calculator])
    plain = await run(agent, "use the calculator to compute 2+3")
    streamed, _ = await run_streamed(agent, "use the calculator to compute 2+3")
    for result in (plain, streamed):
        usage = result.context_wrapper.usage
        assert usage.requests == 2
        assert len(usage.request_usage_entries) == 2
        assert all(e.output_tokens > 0 for e in usage.request_usage_entries)
        # The second call sees the first call's arguments and the tool output as input.
        first, second = usage.request_usage_entries
        assert second.input_tokens > first.input_tokens
    assert plain.context_wrapper.usage.total_tokens == streamed.context_wrapper.usage.total_tokens


# -- system instructions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("instructions", "check"),
    [
        (
            "Always answer in uppercase.",
            lambda t: t.startswith(OFFLINE_MARKER) and 'YOU SAID: "HELLO"' in t,
        ),
        ("Respond in lowercase only.", lambda t: 'you said: "hello"' in t and "Hi" not in t),
        (
            "Start every answer with 'Ahoy!'. Be brief.",
            lambda t: t.startswith(f"Ahoy! {OFFLINE_MARKER} "),
        ),
        ("Begin each reply with Dear user.", lambda t: t.startswith(f"Dear user {OFFLINE_MARKER}")),
        ('End every answer with "Over."', lambda t: t.endswith(" Over.")),
        ("You are helpful. Your name is Ada.", lambda t: "Hi, I am Ada." in t),
        ("Never answer in uppercase.", lambda t: 'You said: "hello"' in t),
    ],
)
async def test_instruction_patterns(instructions, check):
    result = await run(offline_agent(instructions=instructions), "hello")
    assert check(result.final_output), result.final_output


async def test_instructions_also_apply_after_a_handoff():
    billing = offline_agent("Billing agent", instructions="Your name is Penny. Use all caps.")
    triage = offline_agent("Triage", handoffs=[billing])
    result = await run(triage, "talk to the Billing agent")
    assert result.final_output.startswith(f"{OFFLINE_MARKER} HI, THIS IS PENNY")


# -- provider and options -------------------------------------------------------------------------


async def test_provider_names_and_multi_provider_prefix():
    provider = OfflineModelProvider()
    model = provider.get_model(OFFLINE_MODEL_NAME)
    assert isinstance(model, OfflineModel)
    assert provider.get_model(OFFLINE_MODEL_ID) is model
    assert provider.get_model(None) is model
    with pytest.raises(UserError):
        provider.get_model("gpt-4o")

    multi = MultiProvider(provider_map=MultiProviderMap())
    multi.provider_map.add_provider("builtin", provider)
    config = RunConfig(tracing_disabled=True, model_provider=multi)
    result = await Runner.run(Agent(name="A", model="builtin/offline"), "hi", run_config=config)
    assert result.final_output.startswith(OFFLINE_MARKER)

    direct = await Runner.run(
        Agent(name="B", model=OfflineModel()), "hi", run_config=RunConfig(tracing_disabled=True)
    )
    assert direct.final_output == result.final_output


async def test_token_delay_spaces_out_the_deltas():
    agent = Agent(name="A", model=OfflineModel(token_delay=0.01))
    started = time.monotonic()
    result, events = await run_streamed(agent, "hi")
    elapsed = time.monotonic() - started
    n = len(deltas(events))
    assert n >= 10
    assert elapsed >= n * 0.01
    assert result.final_output.startswith(OFFLINE_MARKER)
    with pytest.raises(ValueError):
        OfflineModel(token_delay=-1)

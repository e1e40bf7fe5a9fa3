"""The project's fake OpenAI-compatible server, driven through the real SDK client path.

Every agent run goes `Runner` -> `OpenAIChatCompletionsModel` / `OpenAIResponsesModel` ->
`AsyncOpenAI` -> HTTP -> `ai_agents.fakeserver`, so these tests also pin what the SDK sends and
accepts. The wire-format test validates the raw answers against the `openai` package's own
pydantic types, so a field the SDK happens to tolerate missing today is still caught.
"""

from __future__ import annotations

import asyncio
import json
import math
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    RunConfig,
    Runner,
    function_tool,
)
from openai import AsyncOpenAI
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent, ResponseTextDeltaEvent
from pydantic import TypeAdapter

from ai_agents.fakeserver import FakeOpenAIServer, embed_text

ROOT = Path(__file__).resolve().parents[2]
RUN = RunConfig(tracing_disabled=True)
APIS = ["chat", "responses"]
# A guard against a hang, not a speed goal: every run here takes milliseconds.
HANG = 10


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _fresh_server(server):
    server.reset()
    yield


@pytest.fixture
async def client(server):
    c = AsyncOpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
    yield c
    await c.close()


weather_calls: list[str] = []


@function_tool
def get_weather(city: str) -> str:
    """Get the current weather for a city.

    Args:
        city: Name of the city.
    """
    weather_calls.append(city)
    return f"sunny, 21C in {city}"


@function_tool
def get_time() -> str:
    """The time of day."""
    return "12:00"


@pytest.fixture(autouse=True)
def _forget_weather_calls():
    weather_calls.clear()


def make_agent(api: str, client: AsyncOpenAI, **kwargs: Any) -> Agent:
    model: OpenAIChatCompletionsModel | OpenAIResponsesModel
    if api == "chat":
        model = OpenAIChatCompletionsModel(model="fake-model", openai_client=client)
    else:
        model = OpenAIResponsesModel(model="fake-model", openai_client=client)
    kwargs.setdefault("tools", [get_weather, get_time])
    return Agent(name="Assistant", instructions="You are terse.", model=model, **kwargs)


async def run(agent: Agent, text: str):
    return await asyncio.wait_for(Runner.run(agent, text, run_config=RUN), HANG)


async def run_streamed(agent: Agent, text: str):
    """Run streamed; return (result, text deltas, run item events)."""
    result = Runner.run_streamed(agent, text, run_config=RUN)
    deltas: list[str] = []
    items: list[Any] = []

    async def consume() -> None:
        async for event in result.stream_events():
            if event.type == "raw_response_event" and isinstance(
                event.data, ResponseTextDeltaEvent
            ):
                deltas.append(event.data.delta)
            elif event.type == "run_item_stream_event":
                items.append(event)

    await asyncio.wait_for(consume(), HANG)
    return result, deltas, items


def model_path(api: str) -> str:
    return "/v1/chat/completions" if api == "chat" else "/v1/responses"


# --- replies ------------------------------------------------------------------------------


@pytest.mark.parametrize("api", APIS)
async def test_plain_reply_echoes_the_user_with_usage(api, server, client):
    result = await run(make_agent(api, client), "hello there")

    assert result.final_output == "You said: hello there"
    usage = result.context_wrapper.usage
    # "You are terse." + "hello there" = 5 words in; "You ", "said: ", "hello ", "there" out.
    assert (usage.requests, usage.input_tokens, usage.output_tokens) == (1, 5, 4)
    assert len(server.requests(model_path(api))) == 1


@pytest.mark.parametrize("api", APIS)
async def test_streamed_reply_arrives_as_several_text_deltas(api, client):
    result, deltas, _ = await run_streamed(make_agent(api, client), "one two three four")

    assert deltas == ["You ", "said: ", "one ", "two ", "three ", "four"]
    assert result.final_output == "You said: one two three four"


async def test_streamed_chat_usage_is_reported_only_with_include_usage(server, client):
    with_usage = make_agent("chat", client, model_settings=ModelSettings(include_usage=True))
    result, _, _ = await run_streamed(with_usage, "hello there")
    usage = result.context_wrapper.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (5, 4, 9)

    # The SDK's gotcha, pinned: against a non-OpenAI base_url it does not ask for usage.
    result, _, _ = await run_streamed(make_agent("chat", client), "hello there")
    assert result.context_wrapper.usage.requests == 1
    assert result.context_wrapper.usage.total_tokens == 0

    asked, not_asked = (r["body"] for r in server.requests())
    assert asked["stream_options"] == {"include_usage": True}
    assert "stream_options" not in not_asked


async def test_responses_stream_reports_usage_without_asking(client):
    result, _, _ = await run_streamed(make_agent("responses", client), "hello there")

    usage = result.context_wrapper.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (5, 4, 9)


# --- tools --------------------------------------------------------------------------------


@pytest.mark.parametrize("api", APIS)
async def test_rule_based_tool_round_trip(api, server, client):
    result = await run(make_agent(api, client), 'please call get_weather {"city": "Paris"}')

    assert weather_calls == ["Paris"]
    assert result.final_output == "Tool said: sunny, 21C in Paris"
    first, second = (r["body"] for r in server.requests(model_path(api)))
    assert "sunny, 21C in Paris" not in json.dumps(first)
    assert "sunny, 21C in Paris" in json.dumps(second)


@pytest.mark.parametrize("api", APIS)
async def test_rule_based_tool_call_with_key_value_and_use_the_tool(api, client):
    result = await run(make_agent(api, client), "call get_weather city=Lyon")
    assert result.final_output == "Tool said: sunny, 21C in Lyon"

    result = await run(make_agent(api, client), "Please use the get_time tool.")
    assert result.final_output == "Tool said: 12:00"

    # A tool the agent does not have is not called: the model just echoes.
    result = await run(make_agent(api, client), "call launch_rockets now")
    assert result.final_output == "You said: call launch_rockets now"
    assert weather_calls == ["Lyon"]


@pytest.mark.parametrize("api", APIS)
async def test_scripted_tool_round_trip_streamed(api, server, client):
    server.script(
        [
            {
                "tool_calls": [
                    {"name": "get_weather", "arguments": {"city": "Oslo"}},
                    {"name": "get_weather", "arguments": {"city": "Rome"}},
                ]
            },
            {"text": "Oslo is sunny and so is Rome."},
        ]
    )

    result, deltas, items = await run_streamed(make_agent(api, client), "weather?")

    assert weather_calls == ["Oslo", "Rome"]
    called = [e.item.raw_item for e in items if e.name == "tool_called"]
    assert [c.name for c in called] == ["get_weather", "get_weather"]
    assert len({c.call_id for c in called}) == 2
    assert all(c.call_id for c in called)
    assert [e.item.output for e in items if e.name == "tool_output"] == [
        "sunny, 21C in Oslo",
        "sunny, 21C in Rome",
    ]
    assert "".join(deltas) == result.final_output == "Oslo is sunny and so is Rome."
    assert server.pending() == []


@pytest.mark.parametrize("api", APIS)
async def test_rule_based_handoff(api, client):
    billing = make_agent(api, client, tools=[])
    billing.name = "Billing agent"
    triage = make_agent(api, client, handoffs=[billing])

    result = await run(triage, "call transfer_to_billing_agent")

    assert result.last_agent is billing
    assert result.final_output == 'Tool said: {"assistant": "Billing agent"}'


async def test_scripted_usage_override(server, client):
    server.script([{"text": "ok", "usage": {"prompt_tokens": 1000, "completion_tokens": 7}}])

    result = await run(make_agent("chat", client), "hi")

    usage = result.context_wrapper.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (1000, 7, 1007)


# --- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "streamed"])
@pytest.mark.parametrize("api", APIS)
async def test_scripted_401_surfaces_as_authentication_error(api, streamed, server, client):
    server.script([{"error": {"status": 401, "message": "Your key was revoked."}}])
    agent = make_agent(api, client)

    with pytest.raises(openai.AuthenticationError) as caught:
        await (run_streamed(agent, "hi") if streamed else run(agent, "hi"))

    assert caught.value.status_code == 401
    assert caught.value.body == {
        "message": "Your key was revoked.",
        "type": "invalid_request_error",
        "code": "invalid_api_key",
        "param": None,
    }
    assert server.pending() == []


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "streamed"])
@pytest.mark.parametrize("api", APIS)
async def test_garbage_surfaces_as_an_error_not_a_hang(api, streamed, server, client):
    server.script([{"garbage": True}])
    agent = make_agent(api, client)

    # The openai client lets the JSON decoder's error through (a ValueError).
    with pytest.raises(json.JSONDecodeError):
        await (run_streamed(agent, "hi") if streamed else run(agent, "hi"))

    # The next request is answered normally: the failure consumed exactly one step.
    assert (await run(agent, "again")).final_output == "You said: again"


@pytest.mark.parametrize("api", APIS)
async def test_a_scripted_reset_breaks_the_stream_after_n_tokens(api, server, client):
    server.script([{"text": "one two three four five six", "reset_after": 3}])
    agent = make_agent(api, client)
    result = Runner.run_streamed(agent, "hi", run_config=RUN)
    deltas: list[str] = []

    async def consume() -> None:
        async for event in result.stream_events():
            if event.type == "raw_response_event" and isinstance(
                event.data, ResponseTextDeltaEvent
            ):
                deltas.append(event.data.delta)

    with pytest.raises((httpx.RemoteProtocolError, openai.APIConnectionError)):
        await asyncio.wait_for(consume(), HANG)
    assert "".join(deltas) == "one two three "  # exactly three tokens, then the break
    # The next request is answered normally: the failure consumed exactly one step.
    assert (await run(agent, "again")).final_output == "You said: again"


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "streamed"])
async def test_a_scripted_stall_sends_nothing_until_the_client_gives_up(streamed, server):
    server.script([{"text": "one two three", "stall_after": 1}])
    impatient = AsyncOpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=0.3)
    agent = make_agent("chat", impatient)
    started = time.monotonic()
    with pytest.raises((httpx.ReadTimeout, openai.APITimeoutError)):
        await (run_streamed(agent, "hi") if streamed else run(agent, "hi"))
    assert time.monotonic() - started < HANG
    await impatient.close()


def test_reset_and_stall_steps_are_validated(server):
    for bad in (
        {"text": "x", "reset_after": -1},
        {"text": "x", "stall_after": "2"},
        {"error": {"status": 500}, "reset_after": 1},
        {"text": "x", "reset_after": 1, "stall_after": 1},
    ):
        with pytest.raises(ValueError):
            server.script([bad])
    assert server.pending() == []


async def test_server_api_key_is_checked():
    with FakeOpenAIServer(api_key="sk-right") as srv:
        wrong = AsyncOpenAI(base_url=srv.base_url, api_key="sk-wrong", max_retries=0)
        right = AsyncOpenAI(base_url=srv.base_url, api_key="sk-right", max_retries=0)
        try:
            with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
                await run(make_agent("chat", wrong), "hi")
            assert (await run(make_agent("chat", right), "hi")).final_output == "You said: hi"
        finally:
            await wrong.close()
            await right.close()

        async with httpx.AsyncClient() as http:
            missing = await http.get(f"{srv.base_url}/models")
        assert missing.status_code == 401
        assert set(missing.json()["error"]) >= {"message", "type", "code"}
        # Rejected requests are recorded too, with the key redacted.
        seen = [r["headers"].get("authorization") for r in srv.requests()]
        assert seen == ["***rong", "***ight", None]


# --- embeddings ---------------------------------------------------------------------------


async def test_embeddings_are_deterministic_unit_vectors(client):
    texts = ["the cat sat on the mat", "a cat sat on a mat", "quarterly revenue report"]

    default = await client.embeddings.create(model="fake-embedding", input=texts)
    as_floats = await client.embeddings.create(
        model="fake-embedding", input=texts, encoding_format="float"
    )
    small = await client.embeddings.create(model="fake-embedding", input="hello", dimensions=64)

    vectors = [d.embedding for d in default.data]
    assert [len(v) for v in vectors] == [384, 384, 384]
    assert [d.index for d in default.data] == [0, 1, 2]
    assert len(small.data[0].embedding) == 64
    # The client asks for base64 by default and decodes float32: same numbers as "float".
    for decoded, plain in zip(vectors, (d.embedding for d in as_floats.data), strict=True):
        assert decoded == pytest.approx(plain, abs=1e-6)
    assert vectors[0] == pytest.approx(embed_text(texts[0]), abs=1e-6)
    assert all(math.isclose(math.hypot(*v), 1.0, rel_tol=1e-5) for v in vectors)

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    # Shared words make texts close; no shared word leaves them (nearly) orthogonal.
    assert cos(vectors[0], vectors[1]) > 0.4
    assert abs(cos(vectors[0], vectors[2])) < 0.2
    assert default.usage.prompt_tokens == 6 + 6 + 3


# --- recording and control ----------------------------------------------------------------


async def test_requests_records_what_the_sdk_sent(server, client):
    await run(make_agent("chat", client), 'call get_weather {"city": "Nice"}')

    first, second = server.requests()
    assert (first["method"], first["path"]) == ("POST", "/v1/chat/completions")
    assert first["headers"]["authorization"] == "***test"
    assert first["body"]["model"] == "fake-model"
    assert first["body"]["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": 'call get_weather {"city": "Nice"}'},
    ]
    assert [t["function"]["name"] for t in first["body"]["tools"]] == ["get_weather", "get_time"]
    tool_message = second["body"]["messages"][-1]
    call = second["body"]["messages"][-2]["tool_calls"][0]
    assert tool_message == {
        "role": "tool",
        "tool_call_id": call["id"],
        "content": "sunny, 21C in Nice",
    }
    assert json.loads(call["function"]["arguments"]) == {"city": "Nice"}

    async with httpx.AsyncClient() as http:
        over_http = (await http.get(f"{server.url}/_fake/requests")).json()["requests"]
    assert over_http == [first, second]


async def test_control_routes_over_http(server, client):
    http = httpx.AsyncClient(base_url=f"{server.url}/_fake")
    queued = await http.post("/script", json=[{"text": "one"}, {"text": "two"}])
    assert queued.json() == {"queued": 2, "pending": 2}

    bad = await http.post("/script", json={"steps": [{"text": "ok"}, {"txt": "typo"}]})
    assert bad.status_code == 400
    assert "txt" in bad.json()["error"]["message"]
    pending = (await http.get("/script")).json()
    assert pending == {"pending": [{"text": "one"}, {"text": "two"}]}

    agent = make_agent("responses", client)
    assert (await run(agent, "a")).final_output == "one"
    assert (await run(agent, "b")).final_output == "two"
    assert (await run(agent, "c")).final_output == "You said: c"

    assert len(server.requests()) == 3
    assert (await http.post("/reset")).status_code == 200
    assert server.requests() == []
    await http.aclose()


def test_script_validation_names_the_wrong_field(server):
    for step, field in [
        ({"text": 3}, "text"),
        ({"text": "a", "error": {"status": 401}}, "exactly one"),
        ({"error": {"status": 200, "message": "x"}}, "error.status"),
        ({"tool_calls": [{"arguments": {}}]}, "name"),
        ({"garbage": False}, "garbage"),
        ({"text": "a", "delay_ms": -1}, "delay_ms"),
    ]:
        with pytest.raises(ValueError, match=field):
            server.script([{"text": "queued first"}, step])
    assert server.pending() == []


# --- default rules and wire format --------------------------------------------------------


def sse(text: str) -> list[tuple[str | None, str]]:
    events = []
    for block in text.strip().split("\n\n"):
        name = None
        data = []
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data.append(line.removeprefix("data: "))
        events.append((name, "\n".join(data)))
    return events


def test_tool_results_are_answered_even_several(server):
    messages = [
        {"role": "user", "content": "call get_weather"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "b", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "first"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "second"}]},
    ]
    answer = httpx.post(
        f"{server.base_url}/chat/completions", json={"model": "m", "messages": messages}
    ).json()

    assert answer["choices"][0]["message"]["content"] == "Tool said: first; second"


def test_wire_format_matches_the_openai_types(server):
    base = server.base_url
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    ask = {"model": "m", "messages": [{"role": "user", "content": "call get_weather city=Oslo"}]}

    completion = httpx.post(f"{base}/chat/completions", json={**ask, "tools": tools}).json()
    parsed = ChatCompletion.model_validate(completion)
    assert parsed.choices[0].finish_reason == "tool_calls"
    assert json.loads(parsed.choices[0].message.tool_calls[0].function.arguments) == {
        "city": "Oslo"
    }

    streamed = httpx.post(
        f"{base}/chat/completions",
        json={**ask, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert streamed.headers["content-type"].startswith("text/event-stream")
    *chunks, done = sse(streamed.text)
    assert done == (None, "[DONE]")
    parsed_chunks = [ChatCompletionChunk.model_validate_json(data) for _, data in chunks]
    assert parsed_chunks[0].choices[0].delta.role == "assistant"
    assert parsed_chunks[-2].choices[0].finish_reason == "stop"
    assert parsed_chunks[-1].choices == []
    assert parsed_chunks[-1].usage is not None
    assert parsed_chunks[-1].usage.completion_tokens == len(parsed_chunks) - 3 == 5

    without_usage = httpx.post(f"{base}/chat/completions", json={**ask, "stream": True})
    assert all(json.loads(d).get("usage") is None for _, d in sse(without_usage.text)[:-1])

    tools = [{"type": "function", "name": "get_weather", "parameters": {}, "strict": False}]
    body = {"model": "m", "input": "call get_weather city=Oslo", "tools": tools}
    Response.model_validate(httpx.post(f"{base}/responses", json=body).json())

    server.script([{"text": "Oslo: sunny", "tool_calls": [{"name": "get_weather"}]}])
    events = sse(httpx.post(f"{base}/responses", json={**body, "stream": True}).text)
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    parsed_events = [adapter.validate_json(data) for _, data in events]
    assert [name for name, _ in events] == [e.type for e in parsed_events]
    assert [e.sequence_number for e in parsed_events] == list(range(len(events)))
    assert [e.type.removeprefix("response.") for e in parsed_events] == [
        "created",
        "in_progress",
        "output_item.added",
        "content_part.added",
        "output_text.delta",
        "output_text.delta",
        "output_text.done",
        "content_part.done",
        "output_item.done",
        "output_item.added",
        "function_call_arguments.delta",
        "function_call_arguments.done",
        "output_item.done",
        "completed",
    ]
    final = parsed_events[-1].response
    assert [item.type for item in final.output] == ["message", "function_call"]
    assert final.usage.output_tokens == 2 + 2

    models = httpx.get(f"{base}/models").json()
    assert "fake-model" in [m["id"] for m in models["data"]]
    CreateEmbeddingResponse.model_validate(
        httpx.post(f"{base}/embeddings", json={"model": "e", "input": "x"}).json()
    )

    missing = httpx.post(f"{base}/chat/completions", json={"model": "m"})
    assert missing.status_code == 400
    assert missing.json()["error"]["param"] == "messages"
    unknown = httpx.get(f"{base}/assistants")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "invalid_request_error"


# --- timing -------------------------------------------------------------------------------
# Lower bounds only: a slow machine makes them pass later, never fail.


async def test_server_timing_knobs_delay_the_stream():
    with FakeOpenAIServer(ttft_ms=150, token_delay_ms=40) as srv:
        c = AsyncOpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0)
        try:
            result = Runner.run_streamed(make_agent("chat", c), "a b", run_config=RUN)
            started = time.perf_counter()
            arrivals = []
            async for event in result.stream_events():
                if event.type == "raw_response_event" and isinstance(
                    event.data, ResponseTextDeltaEvent
                ):
                    arrivals.append(time.perf_counter() - started)
        finally:
            await c.close()

    assert len(arrivals) == 4  # "You ", "said: ", "a ", "b"
    assert arrivals[0] >= 0.15
    assert arrivals[-1] >= 0.15 + 3 * 0.04


async def test_step_timing_overrides(server, client):
    server.script([{"text": "x y z", "delay_ms": 100, "token_delay_ms": 60}])

    started = time.perf_counter()
    result = await run(make_agent("responses", client), "hi")

    assert result.final_output == "x y z"
    assert time.perf_counter() - started >= 0.1 + 2 * 0.06  # non-streamed waits as long


# --- running it ---------------------------------------------------------------------------


def test_context_manager_stops_its_thread_and_port():
    before = set(threading.enumerate())
    with FakeOpenAIServer() as srv:
        port = srv.port
        assert srv.base_url == f"http://127.0.0.1:{port}/v1"
        assert httpx.get(f"{srv.base_url}/models").status_code == 200
        assert srv.running
    assert not srv.running
    assert set(threading.enumerate()) <= before
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_cli_serves_with_api_key_and_stops_on_sigterm():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ai_agents.fakeserver",
            "--port",
            "0",
            "--api-key",
            "sk-cli",
            "--token-delay-ms",
            "1",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], HANG)
        assert ready, "the CLI printed nothing"
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        assert line.startswith("fake OpenAI server listening on http://127.0.0.1:")
        base_url = line.split()[-1]

        assert httpx.get(f"{base_url}/models").status_code == 401
        answer = httpx.post(
            f"{base_url}/chat/completions",
            headers={"Authorization": "Bearer sk-cli"},
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert answer.json()["choices"][0]["message"]["content"] == "You said: hi"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=HANG) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()

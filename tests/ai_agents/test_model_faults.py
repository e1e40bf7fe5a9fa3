"""A model provider that fails: errors, 429 with Retry-After, a stall, a connection reset in the
middle of a streamed answer, an answer that cannot be read, malformed tool arguments. Each run
goes through the real OpenAI client path to the project's fake server, which plays the fault.

What a user notices: the reply arrives anyway when a retry fixes it (and a reset never shows a
half message twice), or the run fails with a message that says what happened; the trace has one
`retry` span per retry, with its reason and wait, for the run inspector.
"""

from __future__ import annotations

import time

import pytest
from asgiref.sync import async_to_sync

from ai_agents import selectors, services
from ai_agents.runtime import execute
from conversations import events

LONG = "alpha bravo charlie delta echo foxtrot golf hotel"


@pytest.fixture(autouse=True)
def _quick_retries(settings):
    settings.RUN_MODEL_RETRIES = 3
    settings.RUN_MODEL_RETRY_BACKOFF_SECONDS = 0.05
    settings.RUN_MODEL_RETRY_MAX_WAIT_SECONDS = 5


@pytest.fixture
def impatient_provider(world_a, fake_llm):
    """A provider whose read timeout is short, so a stall is noticed quickly."""
    return services.provider_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name="Impatient",
        base_url=fake_llm.base_url,
        default_model="fake-model",
        api_key="sk-fake-provider-key",
        timeout_seconds=1,
    )


def _agent(world, provider, **config):
    agent = services.agent_create(
        tenant=world.tenant,
        actor=world.actor(),
        name="Assistant",
        config={"provider_id": str(provider.pk), **config},
    )
    services.agent_publish(tenant=world.tenant, actor=world.actor(), agent_id=agent.pk)
    return selectors.agent_get(tenant=world.tenant, agent_id=agent.pk)


def _run(world, agent, text="hello"):
    """Run the agent streamed; return (outcome, events of the run's vocabulary)."""
    version = selectors.working_version(tenant=world.tenant, agent=agent)
    mapper = events.EventMapper(agent.name)
    seen: list[dict] = []

    async def on_event(event) -> None:
        seen.extend(mapper.map(event))

    outcome = async_to_sync(execute.run_version)(
        tenant=world.tenant, version=version, input=text, on_event=on_event
    )
    return outcome, seen


def _retries(outcome):
    return [s for s in outcome.trace if s["kind"] == "retry"]


def _shown_text(seen):
    """The reply as a reader following the events shows it (honouring `discard`)."""
    text = ""
    for event in seen:
        if event["type"] == "message.delta":
            text += event["text"]
        elif event["type"] == "model.retry" and event["discard"]:
            text = ""
    return text


def test_a_server_error_is_retried_and_the_reply_arrives(world_a, provider, fake_llm):
    agent = _agent(world_a, provider)
    fake_llm.script([{"error": {"status": 503, "message": "overloaded"}}, {"text": "Hi there."}])
    outcome, seen = _run(world_a, agent)
    assert outcome.status == "success" and outcome.output == "Hi there."
    [span] = _retries(outcome)
    assert span["reason"] == "server_error" and span["retry"] == 1
    assert "HTTP 503" in span["message"] and span["discarded"] is False
    [retry] = [e for e in seen if e["type"] == "model.retry"]
    assert retry["reason"] == "server_error" and retry["discard"] is False
    assert "Trying again" in retry["message"]
    assert len(fake_llm.requests("/v1/chat/completions")) == 2


def test_a_429_waits_as_long_as_the_provider_asks(world_a, provider, fake_llm):
    agent = _agent(world_a, provider)
    fake_llm.script(
        [{"error": {"status": 429, "headers": {"retry-after": "1"}}}, {"text": "Now then."}]
    )
    started = time.monotonic()
    outcome, _seen = _run(world_a, agent)
    assert outcome.status == "success" and outcome.output == "Now then."
    assert time.monotonic() - started >= 1.0  # not the 0.05 s backoff: the provider's 1 s
    [span] = _retries(outcome)
    assert (span["reason"], span["wait_ms"]) == ("rate_limited", 1000)


def test_a_429_asking_for_longer_than_the_cap_fails_at_once(world_a, provider, fake_llm):
    agent = _agent(world_a, provider)
    fake_llm.script([{"error": {"status": 429, "headers": {"retry-after": "120"}}}])
    started = time.monotonic()
    outcome, _seen = _run(world_a, agent)
    assert time.monotonic() - started < 5
    assert outcome.status == "error"
    assert "too many requests" in outcome.message and "wait 120 s" in outcome.message
    assert len(fake_llm.requests("/v1/chat/completions")) == 1


@pytest.mark.parametrize("api", ["chat_completions", "responses"])
def test_a_reset_mid_stream_discards_the_partial_text_and_writes_it_again(world_a, fake_llm, api):
    provider = services.provider_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name=f"Fake {api}",
        base_url=fake_llm.base_url,
        default_model="fake-model",
        api_key="sk-fake-provider-key",
        api=api,
        timeout_seconds=5,
    )
    agent = _agent(world_a, provider)
    fake_llm.script([{"text": LONG, "reset_after": 3}, {"text": LONG}])
    outcome, seen = _run(world_a, agent)
    assert outcome.status == "success" and outcome.output == LONG
    deltas = [e["text"] for e in seen if e["type"] == "message.delta"]
    assert "".join(deltas) == "alpha bravo charlie " + LONG  # 3 tokens, then the whole reply
    [retry] = [e for e in seen if e["type"] == "model.retry"]
    assert retry["reason"] == "connection" and retry["discard"] is True
    assert _shown_text(seen) == LONG  # what a reader shows: the reply once
    [completed] = [e for e in seen if e["type"] == "message.completed"]
    assert completed["text"] == LONG
    assert _retries(outcome)[0]["discarded"] is True


def test_the_first_token_of_a_run_is_the_first_it_kept(world_a, provider, fake_llm):
    """A reset mid-answer discards what was streamed: the run inspector's first token is the
    retry's, not the discarded text's."""
    from conversations import executor
    from conversations import services as chat_services

    agent = _agent(world_a, provider)
    end_user = chat_services.end_user_for_member(tenant=world_a.tenant, user=world_a.member)
    thread = chat_services.thread_create(
        tenant=world_a.tenant, end_user=end_user, agent_id=agent.pk
    )
    run = chat_services.run_create(
        tenant=world_a.tenant, end_user=end_user, thread_id=thread.pk, input="hello"
    )
    fake_llm.script([{"text": LONG, "reset_after": 3}, {"text": LONG, "ttft_ms": 300}])
    assert async_to_sync(executor.execute)(executor.claim(run.pk, owner="t")) == "success"
    run.refresh_from_db()
    kinds = [span["kind"] for span in run.trace]
    assert kinds.count("first_token") == 1 and kinds.index("retry") < kinds.index("first_token")
    [retry] = [span for span in run.trace if span["kind"] == "retry"]
    [first] = [span for span in run.trace if span["kind"] == "first_token"]
    assert first["at_ms"] >= retry["at_ms"] + 250  # the retry's answer waited 300 ms


def test_a_stalled_provider_times_out_and_is_retried(world_a, impatient_provider, fake_llm):
    agent = _agent(world_a, impatient_provider)
    fake_llm.script([{"text": LONG, "stall_after": 2}, {"text": "Back again."}])
    outcome, seen = _run(world_a, agent)
    assert outcome.status == "success" and outcome.output == "Back again."
    [span] = _retries(outcome)
    assert span["reason"] == "timeout" and span["discarded"] is True
    assert "nothing for 1 s" in span["message"]
    assert _shown_text(seen) == "Back again."


def test_an_unreadable_answer_is_retried(world_a, provider, fake_llm):
    agent = _agent(world_a, provider)
    fake_llm.script([{"garbage": True}, {"text": "Readable."}])
    outcome, _seen = _run(world_a, agent)
    assert outcome.status == "success" and outcome.output == "Readable."
    assert [s["reason"] for s in _retries(outcome)] == ["malformed_response"]


def test_when_the_retries_run_out_the_run_fails_saying_what_happened(
    world_a, provider, fake_llm, settings
):
    settings.RUN_MODEL_RETRIES = 2
    agent = _agent(world_a, provider)
    fake_llm.script([{"error": {"status": 500, "message": "boom"}}] * 3 + [{"text": "too late"}])
    outcome, _seen = _run(world_a, agent)
    assert outcome.status == "error"
    assert outcome.message == (
        "The model provider answered with an error (HTTP 500): boom "
        "It was tried 2 more times, without success."
    )
    assert [s["retry"] for s in _retries(outcome)] == [1, 2]
    assert len(fake_llm.requests("/v1/chat/completions")) == 3
    assert fake_llm.pending() == [{"text": "too late"}]


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        (
            {"text": LONG, "reset_after": 3},
            "The connection to the model provider broke while it answered.",
        ),
        ({"garbage": True}, "The model provider answered, but not with a valid completion."),
    ],
)
def test_a_run_out_of_retries_says_what_happened_in_plain_words(
    world_a, provider, fake_llm, settings, fault, said
):
    """Its reason is read by the end user too: the library's own words stay in the trace."""
    settings.RUN_MODEL_RETRIES = 1
    agent = _agent(world_a, provider)
    fake_llm.script([fault, fault])
    outcome, _seen = _run(world_a, agent)
    assert outcome.status == "error"
    assert outcome.message == f"{said} It was tried once more, without success."
    assert _retries(outcome)[0]["message"]  # the inspector's retry step keeps the cause


def test_an_error_that_would_repeat_is_not_retried(world_a, provider, fake_llm):
    agent = _agent(world_a, provider)
    fake_llm.script([{"error": {"status": 401, "message": "bad key"}}, {"text": "unused"}])
    outcome, _seen = _run(world_a, agent)
    assert outcome.status == "error" and "refused the API key" in outcome.message
    assert _retries(outcome) == []
    assert len(fake_llm.requests("/v1/chat/completions")) == 1


def test_malformed_tool_arguments_never_reach_the_tool_and_the_model_tries_again(
    world_a, provider, fake_llm
):
    agent = _agent(world_a, provider, tools=[{"name": "calculator"}])
    fake_llm.script(
        [
            {"tool_calls": [{"name": "calculator", "arguments": '{"expression": "6*'}]},
            {"tool_calls": [{"name": "calculator", "arguments": {"expression": "6*7"}}]},
            {"text": "It is 42."},
        ]
    )
    outcome, _seen = _run(world_a, agent, "six times seven?")
    assert outcome.status == "success" and outcome.output == "It is 42."
    [span] = _retries(outcome)
    assert span["reason"] == "malformed_tool_arguments" and span["tool"] == "calculator"
    # The model was told what was wrong, and the tool ran only with the good arguments.
    second = fake_llm.requests("/v1/chat/completions")[1]["body"]["messages"]
    [told] = [m for m in second if m.get("role") == "tool"]
    assert "arguments were not a valid JSON object" in told["content"]
    assert [c["output"] for c in outcome.tool_calls if c["output"] == "42"] == ["42"]


def test_a_model_that_keeps_sending_malformed_arguments_fails_the_run(
    world_a, provider, fake_llm, settings
):
    settings.RUN_MODEL_RETRIES = 1
    agent = _agent(world_a, provider, tools=[{"name": "calculator"}])
    bad = {"tool_calls": [{"name": "calculator", "arguments": "[1, 2"}]}
    fake_llm.script([bad, bad, {"text": "unused"}])
    outcome, _seen = _run(world_a, agent, "six times seven?")
    assert outcome.status == "error"
    assert "calculator with arguments that are not a JSON object" in outcome.message
    assert "stopped" in outcome.message
    assert len(fake_llm.requests("/v1/chat/completions")) == 2

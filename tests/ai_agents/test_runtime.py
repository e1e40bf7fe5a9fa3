"""Agents built from stored configuration, run through the real OpenAI client path against the
project's fake OpenAI-compatible server, with a real MCP server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import openai
import pytest
from asgiref.sync import async_to_sync
from django.utils import timezone

from ai_agents import selectors, services
from ai_agents.runtime import execute, models
from ai_agents.runtime.build import build


def _make(world, name="Assistant", publish=True, **config):
    agent = services.agent_create(
        tenant=world.tenant, actor=world.actor(), name=name, config=config
    )
    if publish:
        services.agent_publish(tenant=world.tenant, actor=world.actor(), agent_id=agent.pk)
    return selectors.agent_get(tenant=world.tenant, agent_id=agent.pk)


def _run(world, agent, text):
    version = selectors.working_version(tenant=world.tenant, agent=agent)
    return async_to_sync(execute.run_version)(tenant=world.tenant, version=version, input=text)


def _spans(outcome, kind):
    return [s for s in outcome.trace if s["kind"] == kind]


def test_an_agent_calls_a_builtin_tool(world_a, provider, fake_llm):
    agent = _make(
        world_a,
        provider_id=str(provider.pk),
        tools=[{"name": "calculator"}],
        instructions="You compute.",
    )
    fake_llm.script(
        [
            {"tool_calls": [{"name": "calculator", "arguments": {"expression": "6*7"}}]},
            {"text": "The answer is 42."},
        ]
    )
    outcome = _run(world_a, agent, "what is six times seven?")
    assert outcome.status == "success", outcome.message
    assert outcome.output == "The answer is 42."
    [call] = outcome.tool_calls
    assert (call["tool"], call["output"]) == ("calculator", "42")
    bodies = [r["body"] for r in fake_llm.requests() if r["path"].endswith("/chat/completions")]
    assert bodies[0]["messages"][0] == {"role": "system", "content": "You compute."}
    assert any(m.get("role") == "tool" and m.get("content") == "42" for m in bodies[1]["messages"])
    # streamed chat completions report tokens only when asked: the runtime asks
    assert bodies[0]["stream_options"] == {"include_usage": True}
    assert outcome.usage["requests"] == 2 and outcome.usage["output_tokens"] > 0


def test_an_agent_calls_a_tool_of_a_real_mcp_server(world_a, provider, fake_llm, mcp_loopback):
    server = services.mcp_server_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name="math",
        url=mcp_loopback.url,
        tool_allowlist=["add"],
    )
    agent = _make(
        world_a,
        provider_id=str(provider.pk),
        mcp_servers=[{"server_id": str(server.pk), "required": True}],
    )
    fake_llm.script(
        [
            {"tool_calls": [{"name": "add", "arguments": {"a": 40, "b": 2}}]},
            {"text": "It is 42."},
        ]
    )
    outcome = _run(world_a, agent, "add 40 and 2")
    assert outcome.status == "success", outcome.message
    [call] = outcome.tool_calls
    assert call["tool"] == "add" and "42" in call["output"]
    first = fake_llm.requests()[0]["body"]
    offered = {t["function"]["name"] for t in first["tools"]}
    assert offered == {"add"}  # `shout` is not on the allow-list
    assert _spans(outcome, "mcp_server")[0]["connected"] is True


def test_a_triage_agent_hands_off_to_a_specialist(world_a, provider, fake_llm):
    billing = _make(
        world_a, "Billing", provider_id=str(provider.pk), instructions="You handle invoices."
    )
    triage = _make(world_a, "Triage", provider_id=str(provider.pk), handoffs=[str(billing.pk)])
    fake_llm.script(
        [
            {"tool_calls": [{"name": "transfer_to_billing", "arguments": {}}]},
            {"text": "Billing here: your invoice is paid."},
        ]
    )
    outcome = _run(world_a, triage, "I have a question about my invoice")
    assert outcome.status == "success", outcome.message
    assert outcome.last_agent == "Billing"
    assert outcome.output == "Billing here: your invoice is paid."
    assert _spans(outcome, "handoff") == [
        {**_spans(outcome, "handoff")[0], "from_agent": "Triage", "to_agent": "Billing"}
    ]
    second = fake_llm.requests()[1]["body"]
    assert second["messages"][0]["content"] == "You handle invoices."


def _hand_off(world, agent, *targets):
    """Give `agent` handoffs to `targets` and publish that."""
    version = selectors.working_version(tenant=world.tenant, agent=agent)
    config = {**version.config, "handoffs": [str(t.pk) for t in targets]}
    services.draft_save(tenant=world.tenant, actor=world.actor(), agent_id=agent.pk, config=config)
    services.agent_publish(tenant=world.tenant, actor=world.actor(), agent_id=agent.pk)


def test_a_specialist_hands_back_to_the_triage_agent_that_handed_to_it(world_a, provider, fake_llm):
    """Billing's configuration hands off to Triage: after Triage handed the conversation to
    Billing, Billing can hand it back, as configured."""
    billing = _make(world_a, "Billing", provider_id=str(provider.pk))
    triage = _make(world_a, "Triage", provider_id=str(provider.pk), handoffs=[str(billing.pk)])
    _hand_off(world_a, billing, triage)
    fake_llm.script(
        [
            {"tool_calls": [{"name": "transfer_to_billing", "arguments": {}}]},
            {"tool_calls": [{"name": "transfer_to_triage", "arguments": {}}]},
            {"text": "Triage again: what else can I do?"},
        ]
    )
    outcome = _run(world_a, triage, "my invoice, then something else")
    assert outcome.status == "success", outcome.message
    assert (outcome.last_agent, outcome.output) == ("Triage", "Triage again: what else can I do?")
    hops = [(s["from_agent"], s["to_agent"]) for s in _spans(outcome, "handoff")]
    assert hops == [("Triage", "Billing"), ("Billing", "Triage")]
    offered = {t["function"]["name"] for t in fake_llm.requests()[1]["body"]["tools"]}
    assert offered == {"transfer_to_triage"}


def test_every_agent_of_a_dense_handoff_graph_is_built_once(world_a, provider):
    """Eight agents that all hand off to each other: the run builds eight agents, linked as
    configured, not one copy per path through them (over a thousand)."""
    team = [_make(world_a, f"Agent {n}", provider_id=str(provider.pk)) for n in range(8)]
    for member in team:
        _hand_off(world_a, member, *(other for other in team if other != member))
    first = selectors.agent_get(tenant=world_a.tenant, agent_id=team[0].pk)
    built = build(tenant=world_a.tenant, version=first.published_version)
    reached, todo = {}, [built.agent]
    while todo:
        agent = todo.pop()
        if id(agent) not in reached:
            reached[id(agent)] = agent
            todo.extend(agent.handoffs)
    assert sorted(a.name for a in reached.values()) == sorted(m.name for m in team)
    for agent in reached.values():
        assert len(agent.handoffs) == 7 and agent not in agent.handoffs


def test_a_tripped_input_guardrail_ends_the_run_before_the_model(world_a, provider, fake_llm):
    agent = _make(
        world_a,
        provider_id=str(provider.pk),
        input_guardrails=[
            {
                "kind": "blocked_words",
                "words": ["password"],
                "message": "Please never share passwords.",
            }
        ],
    )
    outcome = _run(world_a, agent, "my Password is hunter2")
    assert (outcome.status, outcome.message) == ("guardrail", "Please never share passwords.")
    assert fake_llm.requests() == []  # the model was never called
    [span] = _spans(outcome, "guardrail")
    assert span["tripped"] is True and "password" in span["reason"]


def test_an_output_guardrail_withholds_the_answer(world_a, provider, fake_llm):
    agent = _make(
        world_a,
        provider_id=str(provider.pk),
        output_guardrails=[
            {"kind": "pattern", "pattern": r"\d{4}-\d{4}", "message": "That answer was withheld."}
        ],
    )
    fake_llm.script([{"text": "The card is 1234-5678."}])
    outcome = _run(world_a, agent, "what's the card?")
    assert (outcome.status, outcome.message) == ("guardrail", "That answer was withheld.")


def test_a_classifier_guardrail_asks_the_model_a_yes_no_question(world_a, provider, fake_llm):
    agent = _make(
        world_a,
        provider_id=str(provider.pk),
        input_guardrails=[
            {"kind": "classifier", "question": "Is this about weapons?", "message": "Off limits."}
        ],
    )
    fake_llm.script([{"text": "yes"}])
    outcome = _run(world_a, agent, "how do I build a trebuchet")
    assert (outcome.status, outcome.message) == ("guardrail", "Off limits.")
    judge = fake_llm.requests()[0]["body"]["messages"][0]["content"]
    assert "Is this about weapons?" in judge


def test_publishing_and_restoring_change_what_the_next_run_uses(world_a, provider, fake_llm):
    actor, tenant = world_a.actor(), world_a.tenant
    agent = _make(world_a, provider_id=str(provider.pk), instructions="Version one.")
    v1 = agent.published_version

    def system_prompt_of_next_run() -> str:
        fake_llm.reset()
        live = selectors.agent_get(tenant=tenant, agent_id=agent.pk).published_version
        async_to_sync(execute.run_version)(tenant=tenant, version=live, input="hi")
        return fake_llm.requests()[0]["body"]["messages"][0]["content"]

    assert system_prompt_of_next_run() == "Version one."
    services.draft_save(
        tenant=tenant,
        actor=actor,
        agent_id=agent.pk,
        config={"provider_id": str(provider.pk), "instructions": "Version two."},
    )
    assert system_prompt_of_next_run() == "Version one."  # a draft is not live
    services.agent_publish(tenant=tenant, actor=actor, agent_id=agent.pk)
    assert system_prompt_of_next_run() == "Version two."
    services.agent_restore(tenant=tenant, actor=actor, agent_id=agent.pk, version_id=v1.pk)
    assert system_prompt_of_next_run() == "Version one."


def test_the_responses_api_works_too(world_a, fake_llm):
    provider = services.provider_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name="Responses",
        base_url=fake_llm.base_url,
        default_model="fake-model",
        api="responses",
        api_key="sk-fake-provider-key",
    )
    agent = _make(world_a, provider_id=str(provider.pk), tools=[{"name": "calculator"}])
    fake_llm.script(
        [
            {"tool_calls": [{"name": "calculator", "arguments": {"expression": "2^10"}}]},
            {"text": "1024 it is."},
        ]
    )
    outcome = _run(world_a, agent, "two to the tenth")
    assert outcome.status == "success" and outcome.output == "1024 it is."
    assert outcome.tool_calls[0]["output"] == "1024"
    assert all(r["path"].endswith("/responses") for r in fake_llm.requests())


def test_structured_output_follows_the_schema(world_a, provider, fake_llm):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
    }
    agent = _make(world_a, provider_id=str(provider.pk), output_schema=schema)
    fake_llm.script([{"text": '{"answer": 42}'}])
    assert _run(world_a, agent, "answer?").output == {"answer": 42}
    fake_llm.script([{"text": '{"answer": "many"}'}])
    outcome = _run(world_a, agent, "answer?")
    assert outcome.status == "error" and "does not match the schema" in outcome.message


# --- Failures, in plain words ----------------------------------------------------------------


def test_a_refused_key_fails_the_run_and_the_connection_test_says_so(world_a, fake_llm):
    provider = services.provider_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name="Wrong key",
        base_url=fake_llm.base_url,
        default_model="fake-model",
        api_key="sk-wrong-key-123456",
    )
    agent = _make(world_a, provider_id=str(provider.pk))
    outcome = _run(world_a, agent, "hello")
    assert outcome.status == "error" and "refused the API key" in outcome.message
    assert outcome.for_end_user == execute.SETUP_PROBLEM  # the end user cannot fix a key
    ok, message = async_to_sync(execute.check_provider)(provider)
    assert not ok and "refused the API key" in message
    assert "sk-wrong-key" not in outcome.message + message


def test_a_slow_provider_times_out_with_a_clear_error(world_a, fake_llm):
    provider = services.provider_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name="Slow",
        base_url=fake_llm.base_url,
        default_model="fake-model",
        api_key="sk-fake-provider-key",
        timeout_seconds=1,
    )
    fake_llm.script([{"text": "late", "delay_ms": 3000}])
    ok, message = async_to_sync(execute.check_provider)(provider)
    assert not ok and "did not answer within 1 s" in message


def test_garbage_from_the_provider_is_reported_not_crashed_on(
    world_a, provider, fake_llm, settings
):
    settings.RUN_MODEL_RETRIES = 0  # retries are tested in test_model_faults.py
    agent = _make(world_a, provider_id=str(provider.pk))
    fake_llm.script([{"garbage": True}])
    outcome = _run(world_a, agent, "hello")
    assert outcome.status == "error" and "not with a valid completion" in outcome.message
    fake_llm.script([{"garbage": True}])
    ok, message = async_to_sync(execute.check_provider)(provider)
    # An admin setting the provider up is told the technical cause too.
    assert not ok and "valid completion (" in message and "Error" in message
    assert async_to_sync(execute.check_provider)(provider) == (
        True,
        "Connected: fake-model answered.",
    )


def test_an_unreachable_optional_mcp_server_is_skipped_and_the_trace_says_why(
    world_a, provider, fake_llm, dead_port
):
    server = services.mcp_server_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name="down",
        url=f"http://127.0.0.1:{dead_port}/mcp",
        timeout_seconds=2,
    )
    optional = _make(
        world_a,
        "Optional",
        provider_id=str(provider.pk),
        mcp_servers=[{"server_id": str(server.pk)}],
    )
    fake_llm.script([{"text": "I answered without it."}])
    outcome = _run(world_a, optional, "hi")
    assert outcome.status == "success" and outcome.output == "I answered without it."
    [span] = _spans(outcome, "mcp_server")
    assert span["connected"] is False and span["error"]
    assert "tools" not in fake_llm.requests()[0]["body"]

    required = _make(
        world_a,
        "Required",
        provider_id=str(provider.pk),
        mcp_servers=[{"server_id": str(server.pk), "required": True}],
    )
    outcome = _run(world_a, required, "hi")
    assert outcome.status == "error"
    assert "MCP server down is required" in outcome.message


def test_an_mcp_server_of_an_agent_handed_off_to_connects_only_when_reached(
    world_a, provider, fake_llm, dead_port, mcp_loopback
):
    """Billing requires an MCP server that is down, Triage can hand off to Billing: Triage's
    runs that stay with Triage answer (and try no connection); the run that hands off fails
    with a reason naming Billing and its server. A reachable server of an agent handed off to
    connects when the handoff reaches it, and its tools work there."""
    down = services.mcp_server_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name="ledger",
        url=f"http://127.0.0.1:{dead_port}/mcp",
        timeout_seconds=2,
    )
    billing = _make(
        world_a,
        "Billing",
        provider_id=str(provider.pk),
        mcp_servers=[{"server_id": str(down.pk), "required": True}],
    )
    triage = _make(world_a, "Triage", provider_id=str(provider.pk), handoffs=[str(billing.pk)])

    fake_llm.script([{"text": "Hello, how can I help?"}])
    outcome = _run(world_a, triage, "hi")
    assert (outcome.status, outcome.output) == ("success", "Hello, how can I help?")
    assert _spans(outcome, "mcp_server") == []  # Billing's server was not tried

    fake_llm.script([{"tool_calls": [{"name": "transfer_to_billing", "arguments": {}}]}])
    outcome = _run(world_a, triage, "my invoice")
    assert outcome.status == "error"
    assert outcome.message.startswith(
        "The MCP server ledger is required by the agent Billing but could not be reached"
    )
    assert outcome.told.startswith("A service this agent needs cannot be reached right now.")
    [span] = _spans(outcome, "mcp_server")
    assert (span["agent"], span["connected"], span["required"]) == ("Billing", False, True)
    assert len(fake_llm.requests()) == 2  # Triage's turn only: Billing never called the model

    math = services.mcp_server_create(
        tenant=world_a.tenant, actor=world_a.actor(), name="math", url=mcp_loopback.url
    )
    config = {**selectors.working_version(tenant=world_a.tenant, agent=billing).config}
    config["mcp_servers"] = [{"server_id": str(math.pk), "required": True}]
    services.draft_save(
        tenant=world_a.tenant, actor=world_a.actor(), agent_id=billing.pk, config=config
    )
    services.agent_publish(tenant=world_a.tenant, actor=world_a.actor(), agent_id=billing.pk)
    fake_llm.script(
        [
            {"tool_calls": [{"name": "transfer_to_billing", "arguments": {}}]},
            {"tool_calls": [{"name": "add", "arguments": {"a": 40, "b": 2}}]},
            {"text": "Billing: it is 42."},
        ]
    )
    outcome = _run(world_a, triage, "add my invoices")
    assert (outcome.status, outcome.output) == ("success", "Billing: it is 42."), outcome.message
    [call] = outcome.tool_calls
    assert call["tool"] == "add" and "42" in call["output"]
    [span] = _spans(outcome, "mcp_server")
    assert (span["agent"], span["connected"]) == ("Billing", True)
    kinds = [s["kind"] for s in outcome.trace]
    assert kinds.index("handoff") < kinds.index("mcp_server")  # connected when reached


def test_a_run_stopped_while_its_mcp_server_connects_ends_then(
    world_a, provider, fake_llm, silent_server
):
    """A run is stopped (the stop button, its lease lost, its time up) while its MCP server has
    not answered yet: the run ends then, not when the server's two minutes run out, and it
    hangs up on the server."""
    slow = services.mcp_server_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name="slow",
        url=silent_server.url,
        timeout_seconds=120,
    )
    agent = _make(
        world_a,
        provider_id=str(provider.pk),
        mcp_servers=[{"server_id": str(slow.pk), "required": True}],
    )
    version = selectors.working_version(tenant=world_a.tenant, agent=agent)

    async def stop_while_connecting() -> bool:
        run = asyncio.ensure_future(
            execute.run_version(tenant=world_a.tenant, version=version, input="hi")
        )
        assert await asyncio.to_thread(silent_server.connected.wait, 10)
        run.cancel()
        await asyncio.wait({run}, timeout=10)
        return run.cancelled()

    assert async_to_sync(stop_while_connecting)(), "the run went on after it was stopped"
    assert silent_server.hung_up.wait(10)
    assert fake_llm.requests() == []


def test_a_tools_check_cancelled_while_the_server_connects_ends_cancelled(world_a, silent_server):
    """List tools (dashboard or API) is waiting for a server that has not answered, and the
    check is cancelled (the request went away, the worker shuts down): it ends cancelled and
    hangs up on the server. It used to end with the error "Could not list the tools of slow:
    CancelledError", as though the server had failed."""
    from ai_agents.runtime import mcp

    slow = services.mcp_server_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name="slow",
        url=silent_server.url,
        timeout_seconds=120,
    )

    async def cancel_while_connecting() -> asyncio.Future[list[dict[str, str]]]:
        check = asyncio.ensure_future(mcp.list_tools(slow))
        assert await asyncio.to_thread(silent_server.connected.wait, 10)
        check.cancel()
        await asyncio.wait({check}, timeout=10)
        return check

    check = async_to_sync(cancel_while_connecting)()
    assert check.done(), "the check went on after it was cancelled"
    assert check.cancelled(), f"the cancellation became an error: {check.exception()!r}"
    assert silent_server.hung_up.wait(10)


# A server that takes the connection and never answers used to hold a check of a 1 s timeout for
# 11 s (the `mcp` client's `server/discover` probe waits a fixed 10 s before it falls back to
# `initialize`), and over SSE for the 5 minutes allowed between stream events. The bound below
# leaves seconds of slack for a loaded machine and is still far from either.
_NO_ANSWER_BOUND = 4.0


def _timed(work):
    """Await the coroutine `work` (for 30 s at most): how long it took, what it returned, and
    what it raised."""

    async def timed():
        start = time.monotonic()
        try:
            result = await asyncio.wait_for(work, 30)
        except Exception as exc:
            return time.monotonic() - start, None, exc
        return time.monotonic() - start, result, None

    return async_to_sync(timed)()


@pytest.mark.parametrize("transport", ["streamable_http", "sse"])
def test_a_tools_check_of_a_server_that_never_answers_ends_within_its_timeout(
    world_a, silent_server, transport
):
    """A server that takes the connection and never answers is a failure, not a cancellation:
    the check says so, naming the server, once its timeout has run out (not 10 s later), and
    hangs up on it."""
    from ai_agents.runtime import mcp
    from controlplane.errors import Unavailable

    slow = services.mcp_server_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name="slow",
        url=silent_server.url,
        transport=transport,
        timeout_seconds=1,
    )
    took, _, raised = _timed(mcp.list_tools(slow))
    assert took < _NO_ANSWER_BOUND, f"the check took {took:.1f} s"
    assert isinstance(raised, Unavailable), repr(raised)
    assert raised.message == (
        "Could not list the tools of slow: the server did not answer within 1 second"
    )
    assert silent_server.hung_up.wait(10)


def test_a_tools_check_of_a_server_that_never_accepts_ends_within_its_timeout(
    world_a, unaccepting_server
):
    """The server's process never accepts the connection the kernel made for it: the same
    failure, within the same time."""
    from ai_agents.runtime import mcp
    from controlplane.errors import Unavailable

    hung = services.mcp_server_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name="hung",
        url=unaccepting_server.url,
        timeout_seconds=1.5,
    )
    took, _, raised = _timed(mcp.list_tools(hung))
    assert took < _NO_ANSWER_BOUND + 0.5, f"the check took {took:.1f} s"
    assert isinstance(raised, Unavailable), repr(raised)
    assert raised.message == (
        "Could not list the tools of hung: the server did not answer within 1.5 seconds"
    )


def test_a_tools_check_whose_connecting_task_alone_is_stopped_says_so(world_a, silent_server):
    """The task that connects is cancelled (its loop shutting down) while the check itself is
    not: the check fails in words that fit a check. It used to say that "the run ended", and
    there is no run."""
    from ai_agents.runtime import mcp
    from controlplane.errors import Unavailable

    slow = services.mcp_server_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name="slow",
        url=silent_server.url,
        timeout_seconds=120,
    )

    async def stop_the_connecting_task() -> asyncio.Future[list[dict[str, str]]]:
        check = asyncio.ensure_future(mcp.list_tools(slow))
        assert await asyncio.to_thread(silent_server.connected.wait, 10)
        [holder] = [t for t in asyncio.all_tasks() if t.get_name() == "mcp-server:slow"]
        holder.cancel()
        await asyncio.wait({check}, timeout=10)
        return check

    check = async_to_sync(stop_the_connecting_task)()
    assert check.done() and not check.cancelled()
    raised = check.exception()
    assert isinstance(raised, Unavailable), repr(raised)
    assert raised.message == (
        "Could not list the tools of slow: the check was stopped before the server answered"
    )
    assert silent_server.hung_up.wait(10)


def test_a_tools_check_of_a_server_that_stops_answering_after_the_handshake_ends_in_time(
    world_a, mute_after_handshake
):
    """The server completes the handshake, then answers neither the listing nor the request
    that ends its session: the check fails after the listing's timeout, and closing waits for
    the server no longer than its timeout. It used to wait 5 minutes for that last answer."""
    from ai_agents.runtime import mcp
    from controlplane.errors import Unavailable

    mute = services.mcp_server_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name="mute",
        url=mute_after_handshake.url,
        timeout_seconds=1,
    )
    took, _, raised = _timed(mcp.list_tools(mute))
    # one timeout for the listing, one for closing, and the same slack as above
    assert took < _NO_ANSWER_BOUND + 1, f"the check took {took:.1f} s"
    assert isinstance(raised, Unavailable), repr(raised)
    assert raised.message == "Could not list the tools of mute: Request 'tools/list' timed out"


def test_a_run_whose_mcp_server_never_answers_fails_or_skips_it_within_its_timeout(
    world_a, provider, fake_llm, silent_server
):
    """A required server that takes the connection and never answers fails the run once the
    server's timeout has run out, before the model is called; an optional one is skipped as
    soon, and the run goes on without its tools."""
    slow = services.mcp_server_create(
        tenant=world_a.tenant,
        actor=world_a.actor(),
        name="slow",
        url=silent_server.url,
        timeout_seconds=1,
    )
    required = _make(
        world_a,
        "Required",
        provider_id=str(provider.pk),
        mcp_servers=[{"server_id": str(slow.pk), "required": True}],
    )
    version = selectors.working_version(tenant=world_a.tenant, agent=required)
    took, outcome, raised = _timed(
        execute.run_version(tenant=world_a.tenant, version=version, input="hi")
    )
    assert raised is None, repr(raised)
    assert took < _NO_ANSWER_BOUND, f"the run took {took:.1f} s to fail"
    assert outcome.status == "error"
    assert outcome.message == (
        "The MCP server slow is required by this agent but could not be reached: "
        "the server did not answer within 1 second"
    )
    assert fake_llm.requests() == []

    optional = _make(
        world_a,
        "Optional",
        provider_id=str(provider.pk),
        mcp_servers=[{"server_id": str(slow.pk)}],
    )
    fake_llm.script([{"text": "I answered without it."}])
    version = selectors.working_version(tenant=world_a.tenant, agent=optional)
    took, outcome, raised = _timed(
        execute.run_version(tenant=world_a.tenant, version=version, input="hi")
    )
    assert raised is None, repr(raised)
    assert took < _NO_ANSWER_BOUND, f"the run took {took:.1f} s"
    assert outcome.status == "success" and outcome.output == "I answered without it."
    [span] = _spans(outcome, "mcp_server")
    assert (span["connected"], span["error"]) == (
        False,
        "the server did not answer within 1 second",
    )
    assert "tools" not in fake_llm.requests()[0]["body"]


def test_a_run_stopped_as_it_ends_still_closes_every_mcp_connection(
    world_a, provider, fake_llm, mcp_loopback, monkeypatch
):
    """The stop (or the run's time running out) arrives as the run closes its MCP servers:
    the run ends stopped, and neither of its two SSE connections (each held open until
    closed) is left open on the worker's loop, which goes on serving other runs."""
    from ai_agents.runtime.build import BuiltAgent

    math, words = (
        services.mcp_server_create(
            tenant=world_a.tenant,
            actor=world_a.actor(),
            name=name,
            url=mcp_loopback.sse_url,
            transport="sse",
            tool_allowlist=[tool],
        )
        for name, tool in (("math", "add"), ("words", "shout"))
    )
    agent = _make(
        world_a,
        provider_id=str(provider.pk),
        mcp_servers=[{"server_id": str(s.pk), "required": True} for s in (math, words)],
    )
    version = selectors.working_version(tenant=world_a.tenant, agent=agent)
    fake_llm.script([{"text": "Done."}])
    close = BuiltAgent.close

    async def stopped_as_it_closes(built: BuiltAgent) -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await close(built)

    monkeypatch.setattr(BuiltAgent, "close", stopped_as_it_closes)

    async def run_and_stop() -> tuple[bool, bool]:
        run = asyncio.ensure_future(
            execute.run_version(tenant=world_a.tenant, version=version, input="hi")
        )
        await asyncio.wait({run})
        closed = await asyncio.to_thread(mcp_loopback.wait_until_no_connections)
        return run.cancelled(), closed

    stopped, closed = async_to_sync(run_and_stop)()
    assert stopped
    assert closed, "the run left a connection to its MCP servers open"


def test_private_addresses_are_refused_unless_allowed(world_a, provider, settings):
    settings.EGRESS_ALLOWED_NETWORKS = []
    agent = _make(world_a, provider_id=str(provider.pk))
    outcome = _run(world_a, agent, "hello")
    assert outcome.status == "error" and "127.0.0.1" in outcome.message
    ok, message = async_to_sync(execute.check_provider)(provider)
    assert not ok and "127.0.0.1" in message


def test_without_a_provider_the_builtin_offline_model_answers(world_a):
    agent = _make(world_a, tools=[{"name": "calculator"}])
    outcome = _run(world_a, agent, "use the calculator to compute 17 * 23")
    assert outcome.status == "success", outcome.message
    assert outcome.tool_calls and outcome.tool_calls[0]["output"] == "391"
    assert "391" in outcome.output


def _unsaved_provider(fake_llm):
    """A provider of the fake LLM, as the runtime reads one (not saved: no tenant needed)."""
    from ai_agents.models import ModelProvider
    from controlplane import crypto

    return ModelProvider(
        pk=1,
        base_url=fake_llm.base_url,
        api_key_encrypted=crypto.encrypt("sk-fake-provider-key"),
        timeout_seconds=5,
        updated_at=timezone.now(),
    )


async def test_a_provider_client_keeps_a_connection_alive_for_each_concurrent_run(
    fake_llm, monkeypatch
):
    # One client serves every run of a worker's loop: 60 streams at once, then 60 more, must
    # reuse the first 60 connections (httpx's default keeps 20 and opens the rest anew).
    import socket

    opened = []
    connect = socket.socket.connect

    def counted(sock, address):
        opened.append(address)
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", counted)
    provider = _unsaved_provider(fake_llm)
    client = models._new_client(provider)
    fake_llm.state.token_delay_ms = 20  # the streams overlap

    async def one() -> str:
        stream = await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    try:
        assert all(await asyncio.gather(*(one() for _ in range(60))))
        assert len(opened) == 60
        assert all(await asyncio.gather(*(one() for _ in range(60))))
        assert len(opened) == 60  # none opened anew
    finally:
        await client.close()


def _status_error(cls, status, message):
    request = httpx.Request("POST", "http://provider.test/v1/chat/completions")
    return cls(message, response=httpx.Response(status, request=request), body=None)


@pytest.mark.parametrize(
    ("exc", "told"),
    [
        (
            _status_error(openai.PermissionDeniedError, 403, "Error code: 403 - no access"),
            execute.SETUP_PROBLEM,
        ),
        (
            _status_error(openai.NotFoundError, 404, "Error code: 404 - model gpt-x"),
            execute.SETUP_PROBLEM,
        ),
        (
            _status_error(openai.BadRequestError, 400, "Error code: 400 - org-123 quota"),
            "The agent's model refused this request (HTTP 400). An owner or admin of this "
            "tenant can see why in the run inspector.",
        ),
        (
            _status_error(openai.InternalServerError, 503, "Error code: 503 - org-123 down"),
            "The agent's model is failing right now (HTTP 503). Try again later.",
        ),
    ],
)
def test_a_providers_own_words_are_for_the_admin_and_the_end_user_is_told_plainly(exc, told):
    plain, end_user = execute._explain(exc, timeout=None)
    assert end_user == told and "org-123" not in end_user
    assert f"(HTTP {exc.status_code})" in plain
    assert execute.explain_provider_error(exc) == plain  # "test connection" says it as it is


def test_transient_provider_failures_are_told_to_everyone_alike():
    request = httpx.Request("POST", "http://provider.test/v1/chat/completions")
    for exc in (
        openai.APITimeoutError(request=request),
        openai.APIConnectionError(request=request),
        _status_error(openai.RateLimitError, 429, "Error code: 429 - slow down"),
    ):
        plain, end_user = execute._explain(exc, timeout=5)
        assert plain and end_user == ""


def test_an_address_the_egress_policy_blocks_is_a_setup_problem_for_the_end_user(
    world_a, provider, settings
):
    settings.EGRESS_ALLOWED_NETWORKS = []  # the fake provider listens on 127.0.0.1
    agent = _make(world_a, provider_id=str(provider.pk))
    outcome = _run(world_a, agent, "hello")
    assert outcome.status == "error" and "127.0.0.1" in outcome.message
    assert outcome.for_end_user == execute.SETUP_PROBLEM


@contextlib.contextmanager
def _run_hosts_loop():
    """The running loop as a run host's: its runs share their provider clients."""
    loop = asyncio.get_running_loop()
    models.share_clients(loop)
    token = models.run_loop.set(loop)
    try:
        yield
    finally:
        models.run_loop.reset(token)
        models._SHARED.discard(loop)


async def test_a_run_hosts_provider_clients_are_shared_and_close_on_shutdown(fake_llm):
    from datetime import timedelta

    provider = _unsaved_provider(fake_llm)
    with _run_hosts_loop():
        client = models.openai_client(provider)
        assert models.openai_client(provider) is client  # shared by the loop's runs
        await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}]
        )
        provider.updated_at += timedelta(seconds=1)  # edited: a new client, the old one kept
        edited = models.openai_client(provider)
        assert edited is not client and not client.is_closed()
        await models.close_clients()  # what a worker's shutdown does (RunHost.drain)
        assert client.is_closed() and edited.is_closed()
        assert models.openai_client(provider) is not edited
        await models.close_clients()


async def test_a_connection_test_on_a_run_hosts_loop_leaves_its_shared_client_open(fake_llm):
    """The provider's "test connection" closes the client it made, never the one a run host's
    runs share."""
    provider = _unsaved_provider(fake_llm)
    with _run_hosts_loop():
        shared = models.openai_client(provider)
        assert (await execute.check_provider(provider))[0] is True
        assert not shared.is_closed()
        await shared.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}]
        )
        await models.close_clients()
    async with models.run_scope():  # elsewhere: the connection test's own client is closed
        assert (await execute.check_provider(provider))[0]
        made = models.openai_client(provider)
    assert made.is_closed()


async def test_a_run_elsewhere_closes_the_clients_it_made(fake_llm):
    provider = _unsaved_provider(fake_llm)
    async with models.run_scope():  # what run_version does on a loop that does not share
        client = models.openai_client(provider)
        assert models.openai_client(provider) is client  # one per provider for the run
        await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert client.is_closed()


def test_another_agents_setup_problem_reaches_the_calling_run_in_the_end_users_words(
    world_a, fake_llm
):
    from ai_agents.runtime.context import RunContext
    from ai_agents.runtime.trace import Trace

    wrong = services.provider_create(
        tenant=world_a.tenant, actor=world_a.actor(), name="Wrong key",
        base_url=fake_llm.base_url, default_model="fake-model", api_key="sk-wrong-key-123456",
    )  # fmt: skip
    _make(world_a, "Researcher", provider_id=str(wrong.pk))
    caller = _make(world_a, "Caller")
    parent = RunContext(
        tenant_id=world_a.tenant.pk, agent_id=caller.pk, agent_slug=caller.slug,
        version_id=caller.published_version.pk, trace=Trace(),
    )  # fmt: skip
    with pytest.raises(execute.AgentUnavailable) as failed:
        async_to_sync(execute.run_published_agent)(
            tenant_id=world_a.tenant.pk, agent_slug="researcher", input="hi", parent=parent
        )
    # The tool's result is shown in the chat: no key advice, the reason stays in the trace.
    assert str(failed.value) == f"researcher could not answer: {execute.SETUP_PROBLEM}"
    call = next(s for s in parent.trace.spans if s["kind"] == "agent_call")
    assert "refused the API key" in call["message"]

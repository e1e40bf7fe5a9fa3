"""The per-run event stream (conversations.streams) against the real Redis of the settings, and
the event vocabulary (conversations.events) mapped from real Agents SDK runs. No database."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid

import pytest
import redis
from agents import (
    Agent,
    AgentUpdatedStreamEvent,
    MessageOutputItem,
    RunConfig,
    RunItemStreamEvent,
    Runner,
    ToolCallOutputItem,
    function_tool,
)
from agents.testing import ScriptedModel, assistant_message, function_call
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings

from ai_agents.runtime.offline import OfflineModel
from conversations import events, streams


@pytest.fixture
async def run_id():
    """A fresh run id; its keys are deleted and the loop's client closed afterwards."""
    rid = uuid.uuid4()
    url = django_settings.REDIS_URL  # a test may point the settings elsewhere
    yield rid
    client = redis.Redis.from_url(url)
    try:
        client.delete(streams.stream_key(rid), streams.attempt_key(rid))
    finally:
        client.close()
    await streams.aclose()


def _types(entries):
    return [event["type"] for _id, event in entries]


def _texts(entries):
    return [event.get("text") for _id, event in entries]


async def test_append_reads_back_in_order_and_resumes_from_a_middle_id(run_id):
    assert await streams.claim(run_id, 1)
    first = await streams.append(
        run_id,
        1,
        [events.status("running"), events.message_delta("Hel", agent="A")],
    )
    second = await streams.append(run_id, 1, [events.message_delta("lo", agent="A")])
    ids = first + second
    assert len(ids) == 3 and ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))

    entries = await streams.read(run_id)
    assert [entry_id for entry_id, _ in entries] == ids
    assert entries[0][1] == {"type": "run.status", "status": "running", "message": "", "attempt": 1}
    assert _texts(entries[1:]) == ["Hel", "lo"]

    resumed = await streams.read(run_id, after=ids[1])
    assert resumed == [(ids[2], {"type": "message.delta", "text": "lo", "agent": "A"})]
    assert await streams.read(run_id, after=ids[2]) == []
    # The web side's sync reader sees the same entries.
    assert streams.read_sync(run_id, after=ids[0]) == entries[1:]


async def test_the_latest_attempts_events_are_read_back_from_the_streams_end(run_id):
    assert await streams.claim(run_id, 1)
    told = [events.status("running"), events.message_delta("first try", agent="A")]
    told += [events.status("running")]  # a retry starts the reply over
    told += [events.message_delta(f"w{i} ", agent="A") for i in range(7)]
    await streams.append(run_id, 1, told)

    # Pages of 3, newest first, until the attempt's start: nothing is capped away at the end.
    latest, whole = await sync_to_async(streams.read_latest_attempt_sync)(run_id, page=3)
    assert whole and _types(latest) == ["run.status"] + ["message.delta"] * 7
    assert "".join(_texts(latest[1:])) == "w0 w1 w2 w3 w4 w5 w6 "
    assert await sync_to_async(streams.read_latest_attempt_sync)(uuid.uuid4()) == ([], True)

    # Trimmed to its length cap past the attempt's start: what is left, and not whole.
    client = redis.Redis.from_url(django_settings.REDIS_URL)
    try:
        client.xtrim(streams.stream_key(run_id), maxlen=4, approximate=False)
    finally:
        client.close()
    left, whole = await sync_to_async(streams.read_latest_attempt_sync)(run_id, page=3)
    assert not whole and "".join(_texts(left)) == "w3 w4 w5 w6 "


async def test_read_rejects_an_id_that_is_not_a_stream_id(run_id):
    with pytest.raises(ValueError):
        await streams.read(run_id, after="$")
    with pytest.raises(ValueError):
        await streams.read(run_id, after="abc-1")


async def _collect(run_id, after="0-0", started: asyncio.Event | None = None):
    seen = []
    async for entry in streams.follow(run_id, after, heartbeat_s=None):
        seen.append(entry)
        if started is not None:
            started.set()
    return seen


async def test_follow_ends_at_the_terminal_event_and_a_late_follower_gets_everything_once(run_id):
    await streams.claim(run_id, 1)
    await streams.append(run_id, 1, [events.status("running")])
    started = asyncio.Event()
    early = asyncio.create_task(_collect(run_id, started=started))
    await started.wait()  # the follower has read what was there and waits for more
    for word in ("one ", "two ", "three"):
        await streams.append(run_id, 1, [events.message_delta(word, agent="A")])
    final_id = await streams.finish(run_id, 1, events.status("success"))

    seen = await asyncio.wait_for(early, timeout=10)
    assert _types(seen) == ["run.status", *["message.delta"] * 3, "run.status"]
    assert seen[-1] == (final_id, {**seen[-1][1], "status": "success"})

    late = await asyncio.wait_for(_collect(run_id), timeout=10)
    assert late == seen  # everything, once, in order
    assert len({entry_id for entry_id, _ in late}) == len(late)
    from_middle = await asyncio.wait_for(_collect(run_id, after=seen[2][0]), timeout=10)
    assert from_middle == seen[3:]


async def test_two_concurrent_followers_see_the_same_events(run_id):
    await streams.claim(run_id, 1)
    await streams.append(run_id, 1, [events.status("running")])
    ready = [asyncio.Event(), asyncio.Event()]
    followers = [asyncio.create_task(_collect(run_id, started=r)) for r in ready]
    await asyncio.gather(*(r.wait() for r in ready))
    await streams.append(
        run_id,
        1,
        [
            events.tool_started(call_id="c1", tool="calc", arguments="{}", agent="A"),
            events.tool_finished(call_id="c1", tool="calc", output="42", agent="A"),
        ],
    )
    await streams.append(run_id, 1, [events.message_delta("42", agent="A")])
    await streams.finish(run_id, 1, events.status("error", message="boom"))
    one, two = await asyncio.wait_for(asyncio.gather(*followers), timeout=10)
    assert one == two
    assert _types(one) == [
        "run.status",
        "tool.started",
        "tool.finished",
        "message.delta",
        "run.status",
    ]
    assert one[-1][1]["message"] == "boom"


async def test_follow_yields_heartbeats_while_nothing_happens(run_id):
    await streams.claim(run_id, 1)
    (first,) = await streams.append(run_id, 1, [events.status("running")])
    stream = streams.follow(run_id, heartbeat_s=0.05)
    assert await anext(stream) == (first, {**events.status("running"), "attempt": 1})
    # Nothing more is written: the next thing is a heartbeat carrying the last id seen.
    assert await asyncio.wait_for(anext(stream), timeout=5) == (first, {"type": "heartbeat"})
    await stream.aclose()


async def test_a_superseded_attempt_writes_nothing(run_id):
    assert await streams.claim(run_id, 1)
    await streams.append(
        run_id, 1, [events.status("running"), events.message_delta("old", agent="A")]
    )
    before = await streams.read(run_id)

    assert await streams.claim(run_id, 2)
    assert not await streams.claim(run_id, 1)  # the fence does not go back
    assert await streams.append(run_id, 1, [events.message_delta("zombie", agent="A")]) == []
    assert await streams.append(run_id, 2, [events.status("running")])
    assert await streams.append(run_id, 1, [events.message_delta("zombie", agent="A")]) == []
    assert await streams.finish(run_id, 1, events.status("error", message="zombie")) is None
    assert streams.append_sync(run_id, 1, [events.error("zombie")]) == []
    final_id = await streams.finish(run_id, 2, events.status("success"))

    entries = await streams.read(run_id)
    assert [e for _, e in entries] == [
        {"type": "run.status", "status": "running", "message": "", "attempt": 2},
        {"type": "run.status", "status": "success", "message": "", "attempt": 2},
    ]
    # Ids stay monotonic across the new attempt, so a reader that saw attempt 1 keeps reading.
    assert await streams.read(run_id, after=before[-1][0]) == entries
    assert entries[-1][0] == final_id
    # A finished attempt is closed too.
    assert await streams.append(run_id, 2, [events.message_delta("late", agent="A")]) == []
    assert len(await streams.read(run_id)) == 2


async def test_finish_keeps_the_stream_for_the_configured_ttl(run_id, settings):
    settings.RUN_STREAM_TTL_SECONDS = 120
    client = redis.Redis.from_url(django_settings.REDIS_URL)
    try:
        await streams.claim(run_id, 1)
        await streams.append(run_id, 1, [events.status("running")])
        live_ttl = client.ttl(streams.stream_key(run_id))
        assert live_ttl > 120  # a live run's stream does not expire under it
        with pytest.raises(ValueError):
            await streams.finish(run_id, 1, events.status("running"))
        await streams.finish(run_id, 1, events.status("cancelled"))
        assert 100 < client.ttl(streams.stream_key(run_id)) <= 120
        assert 100 < client.ttl(streams.attempt_key(run_id)) <= 120
    finally:
        client.close()


@function_tool
def get_weather(city: str) -> str:
    """Get the weather for a city."""
    return f"sunny in {city}"


async def _mapped(agent, text, *, agent_name):
    mapper = events.EventMapper(agent_name)
    result = Runner.run_streamed(agent, text, run_config=RunConfig(tracing_disabled=True))
    mapped = []
    async for sdk_event in result.stream_events():
        mapped.extend(mapper.map(sdk_event))
    return mapped, result.final_output


async def test_from_sdk_maps_a_streamed_tool_run_and_survives_the_stream(run_id):
    agent = Agent(name="Weather", model=OfflineModel(token_delay=0), tools=[get_weather])
    mapped, final = await _mapped(agent, "What's the weather in Lyon?", agent_name="Weather")

    kinds = [e["type"] for e in mapped]
    assert kinds[:2] == ["tool.started", "tool.finished"] and kinds[-1] == "message.completed"
    started, finished = mapped[0], mapped[1]
    assert started["tool"] == finished["tool"] == "get_weather"
    assert started["call_id"] and started["call_id"] == finished["call_id"]
    assert "Lyon" in started["arguments"] and finished["output"] == "sunny in Lyon"
    deltas = [e for e in mapped if e["type"] == "message.delta"]
    assert len(deltas) > 3  # the offline model streams word by word
    assert "".join(e["text"] for e in deltas) == mapped[-1]["text"] == final
    assert {e["agent"] for e in mapped} == {"Weather"}

    await streams.claim(run_id, 1)
    await streams.append(run_id, 1, mapped)
    assert [e for _, e in await streams.read(run_id)] == mapped  # JSON round trip


async def test_each_message_tool_call_and_handoff_carries_its_place_among_its_kind():
    weather = {"city": "Oslo"}
    model = ScriptedModel(
        [
            [assistant_message("Looking."), function_call("get_weather", weather, call_id="a")],
            [function_call("get_weather", {"city": "Rome"}, call_id="b")],
            [assistant_message("Sunny."), function_call("transfer_to_billing", {}, call_id="t")],
            [assistant_message("Billing here.")],
        ]
    )
    billing = Agent(name="Billing", model=model, handoff_description="invoices")
    triage = Agent(name="Triage", model=model, tools=[get_weather], handoffs=[billing])
    mapped, _final = await _mapped(triage, "hi", agent_name="Triage")

    placed = [(e["type"], e.get("seq")) for e in mapped if e["type"] != "message.delta"]
    assert placed == [
        ("message.completed", 0),
        ("tool.started", 0),
        ("tool.finished", None),
        ("tool.started", 1),
        ("tool.finished", None),
        ("message.completed", 1),
        ("handoff", 0),
        ("message.completed", 2),
    ]
    # Without a mapper's memory, no place is known: none is given.
    lone = events.from_sdk(
        RunItemStreamEvent(
            name="message_output_created",
            item=MessageOutputItem(agent=triage, raw_item=assistant_message("Hi.")),
        ),
        agent_name="Triage",
    )
    assert lone == [{"type": "message.completed", "text": "Hi.", "agent": "Triage"}]


async def test_from_sdk_maps_a_handoff_and_attributes_later_text_to_the_new_agent():
    model = ScriptedModel(
        [
            [function_call("get_weather", {"city": "Oslo"}, call_id="call_w")],
            [function_call("transfer_to_billing", {}, call_id="call_h")],
            [assistant_message("Billing here.")],
        ]
    )
    billing = Agent(name="Billing", model=model, handoff_description="invoices")
    triage = Agent(name="Triage", model=model, tools=[get_weather], handoffs=[billing])
    mapped, final = await _mapped(triage, "hi", agent_name="Triage")

    assert mapped == [
        {
            "type": "tool.started",
            "call_id": "call_w",
            "tool": "get_weather",
            "arguments": '{"city":"Oslo"}',
            "agent": "Triage",
            "seq": 0,
        },
        {
            "type": "tool.finished",
            "call_id": "call_w",
            "tool": "get_weather",
            "output": "sunny in Oslo",
            "agent": "Triage",
        },
        {"type": "handoff", "from_agent": "Triage", "to_agent": "Billing", "seq": 0},
        {"type": "message.delta", "text": "Billing here.", "agent": "Billing"},
        {"type": "message.completed", "text": "Billing here.", "agent": "Billing", "seq": 0},
    ]
    assert final == "Billing here."
    # Without a mapper's memory: the agent update maps to nothing.
    assert events.from_sdk(AgentUpdatedStreamEvent(new_agent=billing), agent_name="Triage") == []


def test_tool_output_is_clipped():
    agent = Agent(name="A")
    item = ToolCallOutputItem(
        agent=agent,
        raw_item={"call_id": "c9", "output": "x", "type": "function_call_output"},
        output="x" * 10_000,
    )
    (event,) = events.from_sdk(RunItemStreamEvent(name="tool_output", item=item), agent_name="A")
    assert event["call_id"] == "c9" and event["tool"] == ""
    assert len(event["output"]) == events.MAX_TOOL_TEXT + 1 and event["output"].endswith("…")


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_an_unreachable_redis_raises_stream_unavailable(run_id, settings):
    settings.REDIS_URL = f"redis://127.0.0.1:{_unused_port()}/0"
    with pytest.raises(streams.StreamUnavailable):
        await streams.claim(run_id, 1)
    with pytest.raises(streams.StreamUnavailable):
        await streams.append(run_id, 1, [events.status("running")])
    with pytest.raises(streams.StreamUnavailable):
        await streams.read(run_id)
    with pytest.raises(streams.StreamUnavailable):
        await anext(streams.follow(run_id))
    with pytest.raises(streams.StreamUnavailable):
        streams.read_sync(run_id)
    streams.close_sync()


# --- the multiplexer: every follower of a loop served by one reader ------------------------------


def _mux():
    return streams._aconn().mux


async def test_many_followers_of_many_runs_get_their_own_events_once_in_order(run_id):
    """Followers joining a reader that is already waiting: each sees its run's events, in order,
    exactly once, whatever the other runs do meanwhile; one reader serves them all."""
    runs = [run_id, *(uuid.uuid4() for _ in range(5))]
    try:
        for rid in runs:
            await streams.claim(rid, 1)
            await streams.append(rid, 1, [events.status("running")])
        ready = {rid: [asyncio.Event() for _ in range(3)] for rid in runs}
        followers = {
            rid: [asyncio.create_task(_collect(rid, started=r)) for r in ready[rid]] for rid in runs
        }
        await asyncio.gather(*(r.wait() for rs in ready.values() for r in rs))
        assert len(_mux().by_key) == len(runs)
        for n in range(4):
            for rid in runs:
                await streams.append(rid, 1, [events.message_delta(f"{rid}-{n}", agent="A")])
        for rid in runs:
            await streams.finish(rid, 1, events.status("success"))
        for rid in runs:
            seen = await asyncio.wait_for(asyncio.gather(*followers[rid]), timeout=10)
            stored = await streams.read(rid)
            assert all(s == stored for s in seen)
            assert _texts(stored[1:-1]) == [f"{rid}-{n}" for n in range(4)]
        assert _mux().by_key == {}  # everyone left at the terminal event
    finally:
        client = redis.Redis.from_url(django_settings.REDIS_URL)
        try:
            client.delete(*(streams.stream_key(rid) for rid in runs[1:]))
            client.delete(*(streams.attempt_key(rid) for rid in runs[1:]))
        finally:
            client.close()


async def test_a_follower_joining_while_the_reader_waits_does_not_wait_for_its_block(
    run_id, monkeypatch
):
    """A new run's follower wakes the reader that is blocked on the other streams: its first
    event arrives at once, not after the reader's BLOCK (made longer than the bound here)."""
    monkeypatch.setattr(streams, "MAX_BLOCK_MS", 4_500)
    other = uuid.uuid4()
    quiet = asyncio.create_task(_collect(other))  # keeps the reader blocked on `other`
    try:
        for _ in range(3):  # the follower joins, its reader starts and sends its XREAD
            await asyncio.sleep(0)
        assert _mux().reading
        await streams.claim(run_id, 1)
        late = streams.follow(run_id, heartbeat_s=None)
        first = asyncio.create_task(anext(late))
        await asyncio.sleep(0)  # the follower joined
        (entry_id,) = await streams.append(run_id, 1, [events.status("running")])
        assert (await asyncio.wait_for(first, timeout=2))[0] == entry_id
        await late.aclose()
    finally:
        quiet.cancel()


async def test_a_follower_resuming_behind_another_gets_only_its_missing_events(run_id):
    await streams.claim(run_id, 1)
    ids = await streams.append(
        run_id, 1, [events.status("running"), *(events.message_delta(w, agent="A") for w in "abc")]
    )
    ahead = streams.follow(run_id, after=ids[-1], heartbeat_s=None)
    ahead_next = asyncio.create_task(anext(ahead))
    await asyncio.sleep(0)
    behind = await asyncio.wait_for(
        _collect_n(streams.follow(run_id, after=ids[1], heartbeat_s=None), 2), timeout=10
    )
    assert [i for i, _ in behind] == ids[2:]
    (new_id,) = await streams.append(run_id, 1, [events.message_delta("d", agent="A")])
    assert (await asyncio.wait_for(ahead_next, timeout=10))[0] == new_id  # nothing twice
    await ahead.aclose()


async def _collect_n(stream, n):
    got = []
    async for entry in stream:
        got.append(entry)
        if len(got) == n:
            break
    await stream.aclose()
    return got


async def test_a_follower_that_leaves_gets_nothing_more_and_the_reader_stops(run_id):
    await streams.claim(run_id, 1)
    (first,) = await streams.append(run_id, 1, [events.status("running")])
    leaving = streams.follow(run_id, heartbeat_s=None)
    assert (await anext(leaving))[0] == first
    staying = asyncio.create_task(_collect(run_id))
    await leaving.aclose()
    await streams.append(run_id, 1, [events.message_delta("x", agent="A")])
    await streams.finish(run_id, 1, events.status("success"))
    assert len(await asyncio.wait_for(staying, timeout=10)) == 3
    assert _mux().by_key == {}
    await asyncio.wait_for(_mux().task, timeout=10)  # no follower: the reader ends


class _Proxy:
    """A TCP proxy to the test Redis that can be cut, like a Redis that goes away."""

    def __init__(self, target: str):
        url = redis.connection.parse_url(target)
        self.socket = url.get("path")  # the embedded Redis listens on a unix socket
        self.host, self.port = url.get("host", "127.0.0.1"), url.get("port", 6379)
        self.db = url.get("db", 0)
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self, port: int = 0) -> str:
        """Listen (again: on the same `port`, as a Redis coming back)."""
        self.server = await asyncio.start_server(self._client, "127.0.0.1", port)
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/{self.db}"

    async def _client(self, reader, writer):
        if self.socket:
            up_reader, up_writer = await asyncio.open_unix_connection(self.socket)
        else:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self.writers += [writer, up_writer]

        async def pipe(src, dst):
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self):
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        await self.server.wait_closed()


async def test_redis_going_away_ends_every_follower_with_stream_unavailable(run_id, settings):
    proxy = _Proxy(django_settings.REDIS_URL)
    direct = django_settings.REDIS_URL
    settings.REDIS_URL = await proxy.start()
    await streams.claim(run_id, 1)
    (first,) = await streams.append(run_id, 1, [events.status("running")])
    followers = [streams.follow(run_id, heartbeat_s=None) for _ in range(3)]
    for follower in followers:
        assert (await anext(follower))[0] == first
    waiting = [asyncio.create_task(anext(f)) for f in followers]
    await asyncio.sleep(0)
    await proxy.cut()
    for task in waiting:
        with pytest.raises(streams.StreamUnavailable):
            await asyncio.wait_for(task, timeout=10)
    # Redis is back (here: reached directly): a new follower starts a new reader.
    settings.REDIS_URL = direct
    assert (await asyncio.wait_for(anext(streams.follow(run_id)), timeout=10))[0] == first


# --- a thread's notices ---------------------------------------------------------------------------


@pytest.fixture
async def thread_id():
    yield uuid.uuid4()
    await streams.aclose()


async def _next(notices, within=10.0):
    return await asyncio.wait_for(anext(notices), timeout=within)


async def test_a_watcher_hears_its_threads_notices_from_when_it_started_watching(thread_id):
    """Notices of other threads, and those announced before watching (a run long over), are not
    heard; those after are, in order, whether the reader was idle or already reading."""
    other = uuid.uuid4()
    await sync_to_async(streams.announce_run)(thread_id, uuid.uuid4())
    notices = await streams.watch_thread(thread_id)
    elsewhere = await streams.watch_thread(other)
    try:
        run = uuid.uuid4()
        await sync_to_async(streams.announce_run)(other, uuid.uuid4())
        await sync_to_async(streams.announce_run)(thread_id, run)
        await sync_to_async(streams.announce_deleted)(thread_id)
        assert await _next(notices) == {"type": "run.started", "run_id": str(run)}
        assert await _next(notices) == {"type": "thread.deleted"}
        assert (await _next(elsewhere))["type"] == "run.started"
        with pytest.raises(TimeoutError):
            await _next(notices, within=0.3)
    finally:
        notices.close()
        elsewhere.close()
    assert _mux().watchers == {}
    await asyncio.wait_for(_mux().task, timeout=10)  # nobody watches or follows: the reader ends


async def test_a_watcher_back_from_a_cut_connection_hears_what_was_announced_meanwhile(
    thread_id, settings
):
    """This process loses Redis for a moment while another announces a run: watching again,
    the socket still hears of it."""
    proxy = _Proxy(django_settings.REDIS_URL)
    direct = django_settings.REDIS_URL
    settings.REDIS_URL = through_proxy = await proxy.start()
    notices = await streams.watch_thread(thread_id)
    waiting = asyncio.create_task(anext(notices))
    await asyncio.sleep(0.2)  # the reader waits in its XREAD
    await proxy.cut()
    with pytest.raises(streams.StreamUnavailable):
        await asyncio.wait_for(waiting, timeout=10)
    notices.close()
    run = uuid.uuid4()
    settings.REDIS_URL = direct  # another process, which reaches Redis
    await sync_to_async(streams.announce_run)(thread_id, run)
    settings.REDIS_URL = through_proxy
    await proxy.start(port=int(through_proxy.rsplit(":", 1)[1].split("/")[0]))
    again = await streams.watch_thread(thread_id, after=notices.position)
    try:
        assert await _next(again) == {"type": "run.started", "run_id": str(run)}
    finally:
        again.close()
        await proxy.cut()


async def test_watches_at_the_same_time_each_hear_what_follows_their_own_start(thread_id):
    """Two sockets connect together while the reader reads no notices: they share one look at
    where the stream ends, and the first still hears the run announced on its thread after."""
    mux = _mux()
    real, looked, gate, asked = mux.client.xrevrange, [], asyncio.Event(), asyncio.Event()

    async def slow_xrevrange(*args, **kwargs):
        rows = await real(*args, **kwargs)
        looked.append(rows)
        asked.set()
        await gate.wait()
        return rows

    mux.client.xrevrange = slow_xrevrange
    try:
        first = asyncio.create_task(streams.watch_thread(thread_id))
        await asyncio.wait_for(asked.wait(), timeout=10)
        run = uuid.uuid4()
        await sync_to_async(streams.announce_run)(thread_id, run)
        second = asyncio.create_task(streams.watch_thread(uuid.uuid4()))
        await asyncio.sleep(0.05)
        gate.set()
        notices, other = await first, await second
    finally:
        mux.client.xrevrange = real
    try:
        assert len(looked) == 1
        assert await _next(notices) == {"type": "run.started", "run_id": str(run)}
    finally:
        notices.close()
        other.close()


async def test_a_reader_running_for_runs_alone_does_not_hand_a_new_socket_old_notices(thread_id):
    """The process follows a run's stream but watches no thread: a socket that connects then
    hears the runs announced after it, not one announced before."""
    await sync_to_async(streams.announce_run)(thread_id, uuid.uuid4())  # a run long over
    follower = asyncio.create_task(anext(streams.follow_raw(uuid.uuid4(), heartbeat_s=30)))
    await asyncio.sleep(0.05)  # the reader runs, for the follower
    notices = await streams.watch_thread(thread_id)
    try:
        with pytest.raises(TimeoutError):
            await _next(notices, within=0.3)
        run = uuid.uuid4()
        await sync_to_async(streams.announce_run)(thread_id, run)
        assert (await _next(notices))["run_id"] == str(run)
    finally:
        notices.close()
        follower.cancel()


async def test_a_watch_while_the_readers_xread_is_late_still_hears_its_notice(thread_id):
    """The reader's XREAD, issued before the socket watched, reaches Redis after the socket's
    notice was added (a new connection, a health check): the socket still hears it."""
    mux = _mux()
    real, calls = mux.client.xread, []

    async def late_xread(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            await asyncio.sleep(0.3)
        return await real(*args, **kwargs)

    mux.client.xread = late_xread
    follower = asyncio.create_task(anext(streams.follow_raw(uuid.uuid4(), heartbeat_s=30)))
    try:
        await asyncio.sleep(0.05)  # the reader's first XREAD is on its way
        notices = await streams.watch_thread(thread_id)
        run = uuid.uuid4()
        await sync_to_async(streams.announce_run)(thread_id, run)
        await asyncio.sleep(0.5)
        await sync_to_async(streams.announce_run)(uuid.uuid4(), uuid.uuid4())  # anyone else's
        assert (await _next(notices, within=4))["run_id"] == str(run)
    finally:
        mux.client.xread = real
        notices.close()
        follower.cancel()


# --- the writer: queued appends, sent in the background -------------------------------------------


def _count_round_trips(monkeypatch) -> list[int]:
    """The number of commands of each pipeline the loop's writer sends."""
    sent: list[int] = []
    writer = streams._aconn().writer
    execute = writer._execute

    async def counted(commands):
        sent.append(len(commands))
        return await execute(commands)

    monkeypatch.setattr(writer, "_execute", counted)
    return sent


async def test_queued_events_land_in_order_before_the_final_one(run_id, monkeypatch):
    other = uuid.uuid4()
    sent = _count_round_trips(monkeypatch)
    try:
        assert await streams.claim(run_id, 1) and await streams.claim(other, 1)
        streams.append_later(run_id, 1, [events.status("running")])
        for n in range(30):  # queued faster than one round trip: they travel together
            streams.append_later(run_id, 1, [events.message_delta(f"{n} ", agent="A")])
            streams.append_later(other, 1, [events.message_delta(f"other {n} ", agent="B")])
        final_id = await streams.finish(run_id, 1, events.status("success"))

        entries = await streams.read(run_id)
        assert _types(entries) == ["run.status", *["message.delta"] * 30, "run.status"]
        assert "".join(t for t in _texts(entries) if t) == "".join(f"{n} " for n in range(30))
        assert entries[-1][0] == final_id
        assert len(await streams.read(other)) == 30  # the other run's events are its own
        # Sixty events of two runs and a final: one round trip with three fenced scripts, not
        # one round trip per event.
        assert sent == [3]
    finally:
        redis.Redis.from_url(django_settings.REDIS_URL).delete(
            streams.stream_key(other), streams.attempt_key(other)
        )


async def test_queued_events_of_a_superseded_attempt_are_refused(run_id):
    assert await streams.claim(run_id, 1)
    assert await streams.claim(run_id, 2)
    streams.append_later(run_id, 1, [events.message_delta("zombie", agent="A")])
    assert await streams.finish(run_id, 1, events.status("error")) is None
    streams.append_later(run_id, 2, [events.message_delta("alive", agent="A")])
    assert await streams.finish(run_id, 2, events.status("success"))
    assert _texts(await streams.read(run_id)) == ["alive", None]


async def test_the_writer_reloads_its_scripts_after_redis_forgot_them(run_id):
    assert await streams.claim(run_id, 1)
    redis.Redis.from_url(django_settings.REDIS_URL).script_flush()  # as after a restart
    streams.append_later(run_id, 1, [events.message_delta("still ", agent="A")])
    streams.append_later(run_id, 1, [events.message_delta("here", agent="A")])
    assert await streams.finish(run_id, 1, events.status("success"))
    assert _texts(await streams.read(run_id)) == ["still ", "here", None]


async def test_queued_events_that_cannot_be_written_are_dropped_and_finish_says_so(
    run_id, settings, caplog
):
    settings.REDIS_URL = f"redis://127.0.0.1:{_unused_port()}/0"
    streams.append_later(run_id, 1, [events.message_delta("lost", agent="A")])  # never raises
    streams.append_later(run_id, 1, [events.message_delta("lost too", agent="A")])
    with pytest.raises(streams.StreamUnavailable, match=str(run_id)):
        await streams.finish(run_id, 1, events.status("success"))
    lost = [r for r in caplog.records if "events were lost" in r.getMessage()]
    assert len(lost) == 1  # once per run, not once per event
    await streams.aclose()


# --- stopping tasks: a cancellation of the one who stops them is never swallowed ---------------


async def _slow_to_stop(release: asyncio.Event) -> None:
    """A task that takes a while to end once cancelled (a read or a query still finishing)."""
    try:
        await asyncio.Event().wait()
    finally:
        await release.wait()


async def _cancelled_while_stopping(stop) -> asyncio.Task:
    """Run `stop()` (which stops a slow task), cancel it while it waits, and return its task."""
    stopping = asyncio.create_task(stop())
    await asyncio.sleep(0.01)  # it is waiting for the slow task now
    stopping.cancel()
    await asyncio.wait([stopping], timeout=2)
    return stopping


async def test_closing_the_stream_reader_ends_when_its_closer_is_cancelled():
    # The event loop's shutdown cancels each task once: a closer that swallowed that
    # cancellation (it used to) could wait on forever and hang the shutdown.
    release = asyncio.Event()
    mux = streams._Multiplexer(client=None)  # type: ignore[arg-type]
    mux.task = asyncio.create_task(_slow_to_stop(release))
    await asyncio.sleep(0)
    try:
        stopping = await _cancelled_while_stopping(mux.aclose)
        assert stopping.cancelled()
    finally:
        release.set()
        await asyncio.wait_for(asyncio.wait([mux.task]), 2)


async def test_a_task_that_will_not_end_is_left_behind_not_waited_for_forever(caplog):
    never = asyncio.create_task(asyncio.Event().wait())
    stubborn_release = asyncio.Event()

    async def stubborn() -> None:
        while not stubborn_release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await stubborn_release.wait()

    left = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    try:
        await asyncio.wait_for(
            streams.cancel_and_wait([never, left], what="test task", within_s=0.1), 2
        )
        assert never.cancelled() and not left.done()
        assert "did not end" in caplog.text
    finally:
        stubborn_release.set()
        await asyncio.wait_for(left, 2)


async def test_deltas_close_together_are_merged_and_the_first_goes_at_once(run_id):
    assert await streams.claim(run_id, 1)
    coalescer = streams.Coalescer(run_id, 1, window_s=0.2)
    coalescer.put([events.message_delta("Hel", agent="A")])  # the first token: at once
    for token in ("lo", ", ", "wor"):
        coalescer.put([events.message_delta(token, agent="A")])
    await asyncio.sleep(0.05)
    assert _texts(await streams.read(run_id)) == ["Hel"]  # the rest waits for the window
    await asyncio.sleep(0.25)
    assert _texts(await streams.read(run_id)) == ["Hel", "lo, wor"]  # sent by the timer
    coalescer.put([events.message_delta("ld", agent="A")])  # within the window again
    coalescer.put([events.tool_started(call_id="c1", tool="calculator", arguments="{}", agent="A")])
    coalescer.put([events.message_delta("!", agent="B")])  # another agent: not merged
    coalescer.flush()
    assert await streams.finish(run_id, 1, events.status("success"))
    entries = await streams.read(run_id)
    assert _types(entries)[2:] == ["message.delta", "tool.started", "message.delta", "run.status"]
    assert _texts(entries)[2] == "ld"  # sent before the event that followed it
    assert [e.get("agent") for _id, e in entries[2:5:2]] == ["A", "B"]
    assert "".join(t for t in _texts(entries) if t) == "Hello, world!"


async def test_with_no_window_every_delta_is_its_own_event(run_id):
    assert await streams.claim(run_id, 1)
    coalescer = streams.Coalescer(run_id, 1, window_s=0)
    for token in ("a", "b", "c"):
        coalescer.put([events.message_delta(token, agent="A")])
    assert await streams.finish(run_id, 1, events.status("success"))
    assert _texts(await streams.read(run_id)) == ["a", "b", "c", None]

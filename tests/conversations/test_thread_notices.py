"""The thread notices under races and outages: what a chat socket hears (docs/run-events.md,
"A thread's notices"). Each of these failed on an earlier version of the notices."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from asgiref.sync import sync_to_async

from conversations import consumers, streams


def _mux():
    return streams._aconn().mux


async def _next(notices, within=3.0):
    return await asyncio.wait_for(anext(notices), timeout=within)


@pytest.fixture
async def cleanup():
    yield
    await streams.aclose()


async def test_a_socket_connecting_while_the_reader_is_moved_back_hears_no_old_notice(cleanup):
    """A socket re-watches from an old position (its quiet thread's start, after a Redis blip):
    a socket that connects before the reader has caught up starts from that old position and
    hears a run announced long before it connected."""
    quiet, busy = uuid.uuid4(), uuid.uuid4()
    idle = await streams.watch_thread(quiet)  # an idle socket on a quiet thread
    old_position = idle.position
    old_run = uuid.uuid4()
    await sync_to_async(streams.announce_run)(busy, old_run)  # a run long over
    await asyncio.sleep(0.3)  # the reader has read past it
    # The idle socket watches again from its position (as `_watch` does after StreamUnavailable).
    again = await streams.watch_thread(quiet, after=old_position)
    # A new socket opens on the busy thread right then.
    fresh = await streams.watch_thread(busy)
    try:
        with pytest.raises(TimeoutError):
            await _next(fresh, within=0.5)
    finally:
        for n in (idle, again, fresh):
            n.close()


async def test_a_watcher_moving_the_reader_back_during_an_xread_hears_every_notice(cleanup):
    """A watcher rewinds (after=position) while an XREAD from a later position is in flight, and
    that XREAD's reply carries a later notice of its thread: the earlier one is never handed."""
    mux = _mux()
    keeper = await streams.watch_thread(uuid.uuid4())  # keeps the reader reading notices
    thread = uuid.uuid4()
    q = keeper.position  # a position before N1
    await asyncio.sleep(0.1)
    real, gate, issued = mux.client.xread, asyncio.Event(), asyncio.Event()

    async def gated(*args, **kwargs):
        issued.set()
        await gate.wait()
        return await real(*args, **kwargs)

    mux.client.xread = gated  # the reader's NEXT XREAD waits at the gate
    n1, n2 = uuid.uuid4(), uuid.uuid4()
    try:
        await sync_to_async(streams.announce_run)(thread, n1)  # ends the XREAD in flight
        await asyncio.wait_for(issued.wait(), 5)  # next XREAD issued from N1's id
        w = await streams.watch_thread(thread, after=q)  # rewinds: N1 is after q
        await sync_to_async(streams.announce_run)(thread, n2)
        gate.set()
    finally:
        pass
    try:
        heard = [(await _next(w))["run_id"]]
        with __import__("contextlib").suppress(TimeoutError):
            heard.append((await _next(w, within=0.5))["run_id"])
        assert heard == [str(n1), str(n2)], heard
    finally:
        mux.client.xread = real
        keeper.close()
        w.close()


def _stub_consumer(thread_id):
    c = consumers.ChatConsumer()
    c.thread = type("T", (), {"pk": thread_id})()
    c.turn = asyncio.Lock()
    c.revoked = False
    c.followers, c.finished, c.joined = {}, set(), []
    c.sent = []

    async def send_json(content, close=False):
        c.sent.append(content)

    async def close(code=None, reason=None):
        c.sent.append({"closed": code})

    c.send_json, c.close = send_json, close
    return c


async def test_a_socket_whose_client_left_stops_watching_without_logging_an_error(cleanup, caplog):
    """A notice for a socket whose client has just left: the server refuses the send (uvicorn's
    ClientDisconnected, an OSError). The socket stops watching quietly: a client closing its tab
    is not an error for the operators' logs."""
    from uvicorn.protocols.utils import ClientDisconnected

    thread = uuid.uuid4()
    c = _stub_consumer(thread)

    async def gone(content, close=False):
        raise ClientDisconnected()

    c.send_json = gone
    notices = await streams.watch_thread(thread)
    task = asyncio.create_task(c._watch(notices))
    try:
        await sync_to_async(streams.announce_run)(thread, uuid.uuid4())
        await asyncio.wait_for(task, 5)  # it stops watching
        assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    finally:
        task.cancel()
        notices.close()


async def test_a_follower_whose_client_left_stops_without_logging_an_error(cleanup, caplog):
    """The same for the run a socket follows: the next event's send is refused, and the follower
    ends quietly."""
    from uvicorn.protocols.utils import ClientDisconnected

    from conversations import events

    c = _stub_consumer(uuid.uuid4())

    async def gone(text_data=None, bytes_data=None, close=False):
        raise ClientDisconnected()

    c.send = gone
    run_id = str(uuid.uuid4())
    assert await streams.claim(run_id, 1)
    await streams.append(run_id, 1, [events.message_delta("Hel", agent="A")])
    task = asyncio.create_task(c._relay(run_id, "0-0"))
    try:
        await asyncio.wait_for(task, 5)  # it stops following
        assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    finally:
        task.cancel()


async def test_a_socket_closed_by_its_threads_deletion_stops_watching(cleanup):
    thread = uuid.uuid4()
    c = _stub_consumer(thread)
    notices = await streams.watch_thread(thread)
    c.watcher = task = asyncio.create_task(c._watch(notices))
    await sync_to_async(streams.announce_deleted)(thread)
    for _ in range(50):
        if c.revoked:
            break
        await asyncio.sleep(0.05)
    assert c.revoked
    await c._stop_following()  # what disconnect() does
    await asyncio.sleep(0.5)
    try:
        assert task.done(), "the _watch task still waits for notices"
        assert str(thread) not in _mux().watchers, "the watcher is still registered"
    finally:
        task.cancel()
        notices.close()


async def test_through_a_redis_outage_the_socket_waits_longer_each_time(
    cleanup, settings, monkeypatch
):
    """Redis down: watch_thread(after=...) needs no round trip, so it 'succeeds', wait resets to
    0 and every 0.5 s the socket asks PostgreSQL (_catch_up) again, forever."""
    thread = uuid.uuid4()
    c = _stub_consumer(thread)
    catch_ups, sleeps = [], []
    real_sleep = asyncio.sleep

    async def fake_catch_up():
        catch_ups.append(1)

    async def recording_sleep(s, *a, **k):
        if s >= 0.5:
            sleeps.append(s)
            s = 0.01
        return await real_sleep(s, *a, **k)

    c._catch_up = fake_catch_up
    notices = await streams.watch_thread(thread)  # Redis up at connect
    await asyncio.sleep(0.2)
    await streams.aclose()  # the reader ends: the watcher gets StreamUnavailable
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # now Redis is away
    monkeypatch.setattr(consumers.asyncio, "sleep", recording_sleep)
    c.watcher = task = asyncio.create_task(c._watch(notices))
    try:
        await real_sleep(1.0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sleeps[:4] == [0.5, 1.0, 2.0, 4.0], sleeps[:8]


async def test_a_failed_look_at_postgresql_does_not_end_the_watching(cleanup, monkeypatch):
    from django.db import OperationalError

    thread = uuid.uuid4()
    c = _stub_consumer(thread)
    calls = []

    async def flaky_catch_up():
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("PostgreSQL restarting")

    c._catch_up = flaky_catch_up
    c.watcher = task = asyncio.create_task(c._watch(None))  # as when Redis failed at connect
    await asyncio.sleep(1.0)
    run = uuid.uuid4()
    await sync_to_async(streams.announce_run)(thread, run)
    await asyncio.sleep(0.5)
    try:
        assert not task.done(), "watching ended after one failed query"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

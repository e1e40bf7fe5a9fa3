"""One Redis Stream per run: the events of `conversations.events`, in order, readable from any id
(DESIGN.md, "A run, end to end", steps 3, 4, 6 and 7; docs/run-events.md).

- Keys: `cp:run:{<run id>}:events` (the stream) and `cp:run:{<run id>}:attempt` (the fence). The
  braces are a Redis Cluster hash tag: both keys of a run live in one slot, so the scripts below
  stay valid on a cluster.
- Fencing: every write names the attempt that makes it. A Lua script compares it with the fence
  and writes atomically, so a superseded attempt's events never reach the stream. A newer attempt
  raises the fence and empties the stream (keeping its last id, so ids stay monotonic for readers
  already following): the stream tells the story of the current attempt only.
- `finish` appends the terminal `run.status`, closes the stream to further writes and gives both
  keys the TTL `RUN_STREAM_TTL_SECONDS`. While a run is live its keys carry a longer TTL,
  renewed on every write, so a run whose worker vanished does not leave keys behind forever.
- Redis failures surface as `StreamUnavailable`: the web side answers 503 or falls back to
  PostgreSQL, the worker carries on without the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from uuid import UUID, uuid4

import redis
import redis.asyncio as aioredis
from django.conf import settings
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from conversations import events as run_events

log = logging.getLogger(__name__)

# Approximate cap (XADD MAXLEN ~) on a stream's entries: a long answer is a few thousand deltas;
# `message.completed` carries the whole text anyway.
MAXLEN = 10_000
# TTL of a live run's keys, renewed on every write; `finish` shortens it.
LIVE_TTL_SECONDS = 24 * 3600
# A blocking XREAD waits at most this long per call, below the client's socket timeout; longer
# waits loop (`follow` does).
MAX_BLOCK_MS = 3_000
SOCKET_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
# Followers share one reader per loop (`_Multiplexer`), but a loop's writes and reads still take
# pooled connections at once: redis-py's default cap (100) refused the 101st open chat of a web
# process when each follower held one (measured with `make bench`, c = 200).
MAX_CONNECTIONS = 5_000
# The process's stream reader issues at most one XREAD per BATCH_S seconds (see `_Multiplexer`);
# the setting RUN_STREAM_BATCH_MS overrides it (0: one XREAD per event under load).
BATCH_S = 0.004

_ID = re.compile(r"^\d+(-\d+)?$")
# Both parts of a stream id are unsigned 64-bit integers: Redis refuses a larger one, and one
# refused position fails the XREAD that a web process shares among all the streams it follows.
_ID_PART_MAX = 2**64 - 1

Entry = tuple[str, dict[str, Any]]


class StreamUnavailable(Exception):
    """Redis could not be reached (or answered with an error) for a run's stream."""


def stream_ttl() -> int:
    return int(getattr(settings, "RUN_STREAM_TTL_SECONDS", 3600))


def _run(run_id: UUID | str) -> str:
    return str(run_id if isinstance(run_id, UUID) else UUID(str(run_id)))


def stream_key(run_id: UUID | str) -> str:
    return f"cp:run:{{{_run(run_id)}}}:events"


def attempt_key(run_id: UUID | str) -> str:
    return f"cp:run:{{{_run(run_id)}}}:attempt"


# Every thread's notices to its open chats (`announce_run`, `announce_deleted`), in one stream
# that every web process reads.
NOTICES_KEY = "cp:notices"


# --- Lua: the fence ------------------------------------------------------------------------------
# KEYS[1] = attempt key, KEYS[2] = stream key; ARGV[1] = attempt, ARGV[2] = live TTL.
# The attempt key holds "<n>" while attempt n runs and "<n>:done" once it finished.
_FENCE = """
local function fence()
  local attempt = tonumber(ARGV[1])
  local raw = redis.call('GET', KEYS[1])
  local current, done = 0, false
  if raw then
    current = tonumber(string.match(raw, '^%d+')) or 0
    done = string.find(raw, ':done', 1, true) ~= nil
  end
  if attempt < current or (attempt == current and done) then
    return false
  end
  if attempt > current then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
    if redis.call('EXISTS', KEYS[2]) == 1 then
      redis.call('XTRIM', KEYS[2], 'MAXLEN', 0)
    end
  else
    redis.call('EXPIRE', KEYS[1], ARGV[2])
  end
  return true
end
"""

_CLAIM = (
    _FENCE
    + """
if not fence() then return 0 end
return 1
"""
)

# ARGV[3] = maxlen, ARGV[4..] = events (JSON). Returns the new ids, or false when refused.
_APPEND = (
    _FENCE
    + """
if not fence() then return false end
local ids = {}
for i = 4, #ARGV do
  ids[#ids + 1] = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*',
                             'attempt', ARGV[1], 'event', ARGV[i])
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
return ids
"""
)

# ARGV[3] = maxlen, ARGV[4] = final TTL, ARGV[5] = the terminal event. Returns its id or false.
_FINISH = (
    _FENCE
    + """
if not fence() then return false end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*',
                      'attempt', ARGV[1], 'event', ARGV[5])
redis.call('SET', KEYS[1], ARGV[1] .. ':done', 'EX', ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return id
"""
)


# --- connections ---------------------------------------------------------------------------------


def _options() -> dict[str, Any]:
    return {
        "decode_responses": True,
        "protocol": 2,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": SOCKET_TIMEOUT,
        "health_check_interval": 30,
    }


@dataclass
class _AsyncConn:
    client: aioredis.Redis
    claim: Any
    append: Any
    finish: Any
    mux: _Multiplexer
    writer: _Writer


@dataclass
class _SyncConn:
    client: redis.Redis
    claim: Any
    append: Any
    finish: Any


# An asyncio client's connections belong to the loop that opened them: one client per running
# loop (and URL). Not a WeakKeyDictionary: the client refers to its loop, which would keep the
# entry alive forever; the entries of closed loops are dropped instead when a new loop connects.
_async_conns: dict[asyncio.AbstractEventLoop, dict[str, _AsyncConn]] = {}
_sync_conns: dict[str, _SyncConn] = {}
_sync_lock = threading.Lock()


def _aconn() -> _AsyncConn:
    loop = asyncio.get_running_loop()
    url = settings.REDIS_URL
    if loop not in _async_conns:
        for old in [old for old in _async_conns if old.is_closed()]:
            # Its sockets cannot be closed without their loop; the garbage collector ends them.
            del _async_conns[old]
    per_loop = _async_conns.setdefault(loop, {})
    conn = per_loop.get(url)
    if conn is None:
        # One retry on a broken connection (e.g. a pooled one after a Redis restart); none on a
        # timeout, which could write an append twice.
        retry = AsyncRetry(
            ExponentialBackoff(cap=0.2, base=0.05), 1, (redis.exceptions.ConnectionError,)
        )
        max_connections = int(getattr(settings, "RUN_STREAM_MAX_CONNECTIONS", MAX_CONNECTIONS))
        client = aioredis.Redis.from_url(
            url, retry=retry, max_connections=max_connections, **_options()
        )
        append_script, finish_script = (
            client.register_script(_APPEND),
            client.register_script(_FINISH),
        )
        conn = _AsyncConn(
            client,
            client.register_script(_CLAIM),
            append_script,
            finish_script,
            _Multiplexer(client),
            _Writer(client, append_script, finish_script),
        )
        per_loop[url] = conn
    return conn


def _sconn() -> _SyncConn:
    url = settings.REDIS_URL
    with _sync_lock:
        conn = _sync_conns.get(url)
        if conn is None:
            retry = Retry(
                ExponentialBackoff(cap=0.2, base=0.05), 1, (redis.exceptions.ConnectionError,)
            )
            client = redis.Redis.from_url(url, retry=retry, **_options())
            conn = _SyncConn(
                client,
                client.register_script(_CLAIM),
                client.register_script(_APPEND),
                client.register_script(_FINISH),
            )
            _sync_conns[url] = conn
    return conn


async def aclose() -> None:
    """Close the clients of the running loop (tests, shutdown)."""
    per_loop = _async_conns.pop(asyncio.get_running_loop(), {})
    for conn in per_loop.values():
        await conn.writer.aclose()
        await conn.mux.aclose()
        await conn.client.aclose()


def close_sync() -> None:
    with _sync_lock:
        conns = list(_sync_conns.values())
        _sync_conns.clear()
    for conn in conns:
        conn.client.close()


def _unavailable_error(
    run_id: UUID | str, exc: BaseException, *, what: str = "The event stream of run"
) -> StreamUnavailable:
    return StreamUnavailable(f"{what} {run_id} is unavailable: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def _unavailable(run_id: UUID | str, *, what: str = "The event stream of run") -> Iterator[None]:
    try:
        yield
    except (redis.exceptions.RedisError, OSError) as exc:
        raise _unavailable_error(run_id, exc, what=what) from exc


def _spacing_s(setting: str) -> float:
    """The least time between two Redis round trips of the stream reader or writer under load
    (RUN_STREAM_BATCH_MS, RUN_STREAM_WRITE_BATCH_MS; BATCH_S when unset, 0: none)."""
    value = getattr(settings, setting, None)
    return BATCH_S if value is None else max(0.0, float(value) / 1000)


# --- the multiplexer: one reader per event loop for every follower -------------------------------


def _parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class _Follower:
    """One `follow()`: the entries the reader handed it and not yet taken, and where it is."""

    __slots__ = ("error", "key", "last_id", "left", "mux", "pending", "read", "read_id", "waiter")

    def __init__(self, mux: _Multiplexer, key: str, after: str) -> None:
        self.mux = mux
        self.key = key
        self.last_id = after  # the last entry handed out (`after` at first)
        # The last entry the reader gave it (handed out or pending), and the same comparable:
        # entries at or before it are not for this follower.
        self.read_id = after
        self.read = _parse_id(after)
        self.pending: list[tuple[str, str]] = []
        self.waiter: asyncio.Future[None] | None = None
        self.error: BaseException | None = None
        self.left = False

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_batch(self, heartbeat_s: float | None) -> list[tuple[str, str]] | None:
        """The entries that arrived since the last call, oldest first, waiting for some; None
        when nothing arrived for `heartbeat_s` seconds. StreamUnavailable if Redis failed."""
        if not self.pending and self.error is None:
            loop = asyncio.get_running_loop()
            waiter = self.waiter = loop.create_future()
            timer = None if heartbeat_s is None else loop.call_later(heartbeat_s, self._wake)
            try:
                await waiter
            finally:
                self.waiter = None
                if timer is not None:
                    timer.cancel()
        if self.pending:
            batch, self.pending = self.pending, []
            self.last_id = batch[-1][0]
            return batch
        if self.error is not None:
            raise StreamUnavailable(f"{type(self.error).__name__}: {self.error}") from self.error
        return None

    def leave(self) -> None:
        if not self.left:
            self.left = True
            self.mux.leave(self)


def _discard(registry: dict[str, list[Any]], follower: _Follower) -> None:
    """Take `follower` out of `registry` (its key's list, dropped once empty)."""
    followers = registry.get(follower.key)
    if followers is None:
        return
    with contextlib.suppress(ValueError):
        followers.remove(follower)
    if not followers:
        del registry[follower.key]


class _Watcher(_Follower):
    """One `watch_thread()`: the notices of one thread (`key` is its id) handed to it."""

    __slots__ = ()

    def leave(self) -> None:
        if not self.left:
            self.left = True
            self.mux.unwatch(self)


class _Multiplexer:
    """Follows every stream that this event loop's followers follow, with one blocking XREAD at
    a time over all of them (one round trip per batch of events for the whole process, instead
    of one per event per follower), and hands each follower the entries after its own position.

    The set of streams changes while the XREAD waits: a follower that joins then adds an entry
    to this reader's own wake-up stream (`cp:mux:{<uuid>}`, one tiny entry, expiring), which is
    in every XREAD, so it returns at once and the next XREAD includes the new stream. A follower
    that leaves needs nothing: entries of a stream nobody follows any more are dropped. A Redis
    failure ends the reader: every follower gets StreamUnavailable, and the next follower to
    join starts a new reader."""

    WAKE_TTL_SECONDS = 24 * 3600

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.by_key: dict[str, list[_Follower]] = {}
        # The thread notices' watchers, by thread id; where the next XREAD reads the notices from
        # (None: nobody watches, they are not read); whether a watcher moved that back during
        # the XREAD in flight (its reply must not move it forward again), and where that XREAD
        # reads them from (None: not at all).
        self.watchers: dict[str, list[_Watcher]] = {}
        self.notices_last: str | None = None
        self.notices_rewound = False
        self.notices_behind = True  # notices_last may be far from the stream's end
        self.notices_reading: str | None = None
        self.snapshot: asyncio.Task[str] | None = None
        self.task: asyncio.Task[None] | None = None
        self.wake_key = f"cp:mux:{{{uuid4()}}}"
        self.wake_last = "0-0"
        self.reading = False  # an XREAD is on its way or waiting; joiners must wake it
        self.woken = False  # a wake-up was sent for this XREAD
        self.wakers: set[asyncio.Task[None]] = set()

    def join(self, key: str, after: str) -> _Follower:
        follower = _Follower(self, key, after)
        followers = self.by_key.get(key)
        if followers is None:
            self.by_key[key] = [follower]
            new_key = True
        else:
            # The XREAD in flight reads this stream from its followers' lowest position: a
            # follower at or after it needs no new XREAD.
            new_key = follower.read < min(f.read for f in followers)
            followers.append(follower)
        self._serve(behind=new_key)
        return follower

    def _serve(self, *, behind: bool) -> None:
        """Start the reader, or wake the XREAD in flight if it reads from later than a new
        follower or watcher needs (`behind`)."""
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.done():
            self.task = loop.create_task(self._read())
        elif behind and self.reading and not self.woken:
            self.woken = True
            waker = loop.create_task(self._wake())
            self.wakers.add(waker)
            waker.add_done_callback(self.wakers.discard)

    async def watch(self, thread_id: str, after: str | None) -> _Watcher:
        """Start handing `thread_id`'s notices after `after` to a new watcher; with None, every
        notice added from now on (and perhaps one added a few milliseconds before). While the
        reader reads the notices for other watchers, where it stands is now: no round trip.
        Otherwise one `XREVRANGE`, shared by the watches that ask at the same time."""
        loop = asyncio.get_running_loop()
        if after is None:
            running = self.task is not None and not self.task.done()
            if (
                running
                and self.watchers
                and self.notices_last is not None
                and not (self.notices_rewound or self.notices_behind)
            ):
                after = self.notices_last
            else:
                if self.snapshot is None:
                    self.snapshot = loop.create_task(self._latest_notice())
                after = await asyncio.shield(self.snapshot)
        watcher = _Watcher(self, thread_id, after)
        self.watchers.setdefault(thread_id, []).append(watcher)
        # The reader reads the notices from no later than this watcher's start: moved back if
        # need be (the watchers already there ignore what they read before), and woken if the
        # XREAD in flight does not read them from there.
        position = _parse_id(after)
        if self.notices_last is None or position < _parse_id(self.notices_last):
            self.notices_last, self.notices_rewound = after, True
            self.notices_behind = True
        reading = self.notices_reading
        self._serve(behind=reading is None or position < _parse_id(reading))
        return watcher

    async def _latest_notice(self) -> str:
        try:
            rows: Any = await self.client.xrevrange(NOTICES_KEY, count=1)
            return str(rows[0][0]) if rows else "0-0"
        finally:
            self.snapshot = None

    def unwatch(self, watcher: _Watcher) -> None:
        _discard(self.watchers, watcher)

    def leave(self, follower: _Follower) -> None:
        _discard(self.by_key, follower)

    async def _wake(self) -> None:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.xadd(self.wake_key, {"w": "1"}, maxlen=1, approximate=False)
                pipe.expire(self.wake_key, self.WAKE_TTL_SECONDS)
                await pipe.execute()
        except (redis.exceptions.RedisError, OSError):
            # The reader's own XREAD fails the same way and tells the followers.
            log.debug("could not wake the stream reader", exc_info=True)

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        batch_s = _spacing_s("RUN_STREAM_BATCH_MS")
        issued = -batch_s
        try:
            while self.by_key or self.watchers:
                # Under load, XREADs that return at once are spaced BATCH_S apart, so that each
                # carries every stream's new entries instead of one (its cost grows with the
                # number of streams followed): an event waits at most that long.
                wait = issued + batch_s - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                    if not (self.by_key or self.watchers):
                        break
                issued = loop.time()
                # Each stream from its followers' lowest position. A follower that joins behind
                # that position while the XREAD waits gets its entries from the next XREAD.
                since: dict[str, tuple[int, int]] = {}
                positions: dict[Any, Any] = {}
                for key, followers in self.by_key.items():
                    lowest = min(followers, key=_position)
                    since[key], positions[key] = lowest.read, lowest.read_id
                positions[self.wake_key] = self.wake_last
                if not self.watchers:
                    self.notices_last = None  # nobody watches: where they stand is not kept
                if self.notices_last is not None:
                    positions[NOTICES_KEY] = self.notices_last
                self.notices_reading, self.notices_rewound = self.notices_last, False
                self.reading, self.woken = True, False
                try:
                    reply: Any = await self.client.xread(positions, count=500, block=MAX_BLOCK_MS)
                finally:
                    self.reading, reading = False, self.notices_reading
                    self.notices_reading = None
                if reading is not None and not self.notices_rewound:
                    got: list[Any] = next((r for k, r in reply or [] if k == NOTICES_KEY), [])
                    self.notices_behind = len(got) >= 500  # a full batch: more may wait
                for key, rows in reply or []:
                    if key == self.wake_key:
                        self.wake_last = rows[-1][0]
                    elif key == NOTICES_KEY:
                        self._notify(rows)
                    else:
                        self._deliver(self.by_key.get(key), rows, since.get(key))
            self.notices_last = None
        except (redis.exceptions.RedisError, OSError) as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            self._fail(redis.exceptions.ConnectionError("the stream reader was stopped"))
            raise
        except BaseException as exc:  # a bug here must not leave followers waiting forever
            log.exception("the stream reader failed")
            self._fail(exc)
            raise

    @staticmethod
    def _deliver(
        followers: list[_Follower] | None, rows: list[Any], since: tuple[int, int] | None
    ) -> None:
        """Hand `rows` (read after `since`) to each follower, from after its own position."""
        if not followers or since is None:
            return
        parsed: list[tuple[tuple[int, int], str, str]] = []
        for entry_id, fields in rows:
            raw = fields.get("event") if isinstance(fields, dict) else None
            if not isinstance(raw, str):
                log.warning("skipping a malformed stream entry %s", entry_id)
                continue
            parsed.append((_parse_id(entry_id), entry_id, raw))
        if not parsed:
            return
        newest, newest_id = parsed[-1][0], parsed[-1][1]
        for follower in followers:
            seen = follower.read
            if newest <= seen or seen < since:  # nothing new, or it joined behind this read
                continue
            if parsed[0][0] > seen:
                follower.pending.extend((entry_id, raw) for _p, entry_id, raw in parsed)
            else:
                follower.pending.extend(
                    (entry_id, raw) for position, entry_id, raw in parsed if position > seen
                )
            follower.read, follower.read_id = newest, newest_id
            follower._wake()

    def _notify(self, rows: list[Any]) -> None:
        """Hand each notice to the watchers of its thread that had not read it."""
        if not rows or self.notices_rewound:
            return  # rewound: the next XREAD reads these again, from the watcher's start
        if self.notices_last is not None:
            self.notices_last = rows[-1][0]
        for entry_id, fields in rows:
            thread = fields.get("thread") if isinstance(fields, dict) else None
            watchers = self.watchers.get(thread) if isinstance(thread, str) else None
            raw = fields.get("event") if watchers else None
            if not watchers or not isinstance(raw, str):
                continue
            position = _parse_id(entry_id)
            for watcher in watchers:
                if position > watcher.read:
                    watcher.pending.append((entry_id, raw))
                    watcher.read, watcher.read_id = position, entry_id
                    watcher._wake()

    def _fail(self, exc: BaseException) -> None:
        # Watchers that watch again pass the last notice they had (`ThreadNotices.position`).
        followers = [f for fs in self.by_key.values() for f in fs]
        followers += [w for ws in self.watchers.values() for w in ws]
        self.by_key, self.watchers, self.notices_last = {}, {}, None
        for follower in followers:
            follower.error = exc
            follower._wake()

    async def aclose(self) -> None:
        await cancel_and_wait(
            [t for t in (self.task, *self.wakers) if t is not None], what="stream reader"
        )


# --- the writer: one background sender per event loop for every run's events ---------------------


class _Write:
    """Events of one run queued for its stream: appends, or the terminal event (`final`)."""

    __slots__ = ("attempt", "done", "final", "payload", "run_id")

    def __init__(
        self,
        run_id: UUID | str,
        attempt: int,
        payload: list[str],
        final: bool = False,
        done: asyncio.Future[Any] | None = None,
    ) -> None:
        self.run_id, self.attempt, self.payload = run_id, attempt, payload
        self.final, self.done = final, done


class _Writer:
    """Sends the events that the runs of this event loop queue (`append_later`, `finish`), in
    the background, so that a run does not wait on Redis between two tokens.

    What was queued while the previous send was on its way goes in the next one, as one
    pipeline (one round trip) for every run, with one fenced append per run that carries all
    that run's queued events in order (one fence check), followed by its terminal event if it
    was queued too. After a quiet moment an event goes at once; under load, sends are spaced
    `RUN_STREAM_WRITE_BATCH_MS` apart, so each carries many runs' events. A failed send loses
    those events (readers reload the reply from PostgreSQL, as when Redis is down) and is
    logged once per run."""

    def __init__(self, client: aioredis.Redis, append: Any, finish: Any) -> None:
        self.client, self.append_script, self.finish_script = client, append, finish
        self.queue: list[_Write] = []
        self.task: asyncio.Task[None] | None = None
        self.failed_runs: set[str] = set()
        self.sent_at = float("-inf")

    def put(self, write: _Write) -> None:
        self.queue.append(write)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        spacing = _spacing_s("RUN_STREAM_WRITE_BATCH_MS")
        while self.queue:
            # Under load, sends are spaced at least `spacing` apart, so that each carries the
            # events of many runs (tokens a few ms apart each wake the writer otherwise): an
            # event waits at most that long. A send after a quiet moment goes at once.
            wait = self.sent_at + spacing - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self.sent_at = loop.time()
            batch, self.queue = self.queue, []
            try:
                await self._send(batch)
            except asyncio.CancelledError:
                for write in batch + self.queue:
                    if write.done is not None and not write.done.done():
                        write.done.cancel()
                raise
            except Exception as exc:  # a bug must not leave a finish waiting forever
                log.exception("the stream writer failed")
                for write in batch:
                    self._failed(write, exc)

    def _commands(self, batch: list[_Write]) -> list[tuple[_Write, list[Any]]]:
        """One fenced append per run (and attempt) with its queued events, then its final."""
        appends: dict[tuple[str, int], list[str]] = {}
        finals: list[_Write] = []
        order: list[tuple[str, int]] = []
        for write in batch:
            key = (str(write.run_id), write.attempt)
            if key not in appends:
                appends[key] = []
                order.append(key)
            if write.final:
                finals.append(write)
            else:
                appends[key].extend(write.payload)
        commands: list[tuple[_Write, list[Any]]] = []
        for run_id, attempt in order:
            if appends[(run_id, attempt)]:
                keys, args = _fence_args(run_id, attempt)
                commands.append(
                    (
                        _Write(run_id, attempt, []),
                        [self.append_script.sha, 2, *keys, *args, MAXLEN]
                        + appends[(run_id, attempt)],
                    )
                )
        for write in finals:
            keys, args = _fence_args(write.run_id, write.attempt)
            commands.append(
                (
                    write,
                    [self.finish_script.sha, 2, *keys, *args, MAXLEN, stream_ttl(), *write.payload],
                )
            )
        return commands

    async def _send(self, batch: list[_Write]) -> None:
        commands = self._commands(batch)
        try:
            results = await self._execute([args for _write, args in commands])
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:
                # Redis restarted and forgot the scripts; a refused EVALSHA did nothing.
                await self.client.script_load(_APPEND)
                await self.client.script_load(_FINISH)
                again = await self._execute([commands[i][1] for i in missing])
                for i, result in zip(missing, again, strict=True):
                    results[i] = result
        except (redis.exceptions.RedisError, OSError) as exc:
            for write, _args in commands:
                self._failed(write, exc)
            return
        for (write, _args), result in zip(commands, results, strict=True):
            if isinstance(result, Exception):
                self._failed(write, result)
            elif not result:
                _refused(write.run_id, write.attempt, "finish" if write.final else "append")
                if write.done is not None and not write.done.done():
                    write.done.set_result(None)
            elif write.done is not None and not write.done.done():
                write.done.set_result(str(result))

    async def _execute(self, commands: list[list[Any]]) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            for args in commands:
                pipe.execute_command("EVALSHA", *args)
            return list(await pipe.execute(raise_on_error=False))

    def _failed(self, write: _Write, exc: BaseException) -> None:
        if write.done is not None:
            if not write.done.done():
                write.done.set_exception(_unavailable_error(write.run_id, exc))
            return
        run_id = str(write.run_id)
        if run_id not in self.failed_runs:
            if len(self.failed_runs) > 10_000:
                self.failed_runs.clear()
            self.failed_runs.add(run_id)
            log.warning("run %s: events were lost: %s: %s", run_id, type(exc).__name__, exc)

    async def aclose(self) -> None:
        if self.task is not None:
            await cancel_and_wait([self.task], what="stream writer")


def _position(follower: _Follower) -> tuple[int, int]:
    return follower.read


# A task asked to stop gets this long to end; one that takes longer is left behind (and logged)
# rather than wedging its caller, e.g. a socket's disconnect or an event loop's shutdown.
CANCEL_WAIT_S = 5.0


async def cancel_and_wait(
    tasks: Sequence[asyncio.Future[Any]], *, what: str, within_s: float | None = None
) -> None:
    """Cancel `tasks` and wait (at most `within_s` seconds, CANCEL_WAIT_S by default) for them
    to end, ignoring how they end. A cancellation of the caller itself propagates:
    `suppress(CancelledError)` around `await task` would swallow it too, and a task whose
    cancellation is swallowed can go back to waiting forever (the event loop's shutdown cancels
    each task only once)."""
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if not pending:
        return
    limit = CANCEL_WAIT_S if within_s is None else within_s
    done, late = await asyncio.wait(pending, timeout=limit)
    for task in done:
        if not task.cancelled():
            task.exception()  # retrieved: how a stopped task ended does not matter here
    for task in late:
        log.warning("a %s did not end %.1f s after it was cancelled: %r", what, limit, task)


# --- helpers shared by the async and sync APIs ---------------------------------------------------


def _encode(event: Mapping[str, Any], attempt: int) -> str:
    if not isinstance(event.get("type"), str):
        raise ValueError(f"an event needs a type: {event!r}")
    data = dict(event)
    if data["type"] == run_events.RUN_STATUS:
        data.setdefault("attempt", attempt)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)


def _fence_args(run_id: UUID | str, attempt: int) -> tuple[list[str], list[Any]]:
    if int(attempt) < 1:
        raise ValueError("attempts are numbered from 1")
    return [attempt_key(run_id), stream_key(run_id)], [int(attempt), LIVE_TTL_SECONDS]


def _final(final_event: Mapping[str, Any]) -> None:
    if not run_events.is_terminal(final_event):
        raise ValueError(f"finish needs a terminal run.status event, not {final_event!r}")


def is_stream_id(value: object) -> bool:
    """Whether `value` is a stream id Redis accepts as a position ("1700000000000-0", or the
    milliseconds alone)."""
    if not isinstance(value, str) or not _ID.match(value):
        return False
    ms, _, seq = value.partition("-")
    return int(ms) <= _ID_PART_MAX and int(seq or 0) <= _ID_PART_MAX


def _check_after(after: str) -> str:
    if not is_stream_id(after):
        raise ValueError(f"{after!r} is not a stream id (like 1700000000000-0)")
    return after


def _block(block_ms: int | None) -> int | None:
    if block_ms is None:
        return None
    # BLOCK 0 would wait forever, past the socket timeout.
    return max(1, min(int(block_ms), MAX_BLOCK_MS))


def _entries(reply: Any) -> list[Entry]:
    out: list[Entry] = []
    for _key, rows in reply or []:
        for entry_id, fields in rows:
            try:
                out.append((entry_id, json.loads(fields["event"])))
            except (KeyError, TypeError, ValueError):
                log.warning("skipping a malformed stream entry %s", entry_id)
    return out


def _refused(run_id: UUID | str, attempt: int, what: str) -> None:
    log.info("run %s: %s by attempt %s refused: superseded or finished", run_id, what, attempt)


# --- async API (the worker, websocket consumers, SSE) --------------------------------------------


async def claim(run_id: UUID | str, attempt: int) -> bool:
    """Raise the run's fence to `attempt` (call it when the attempt starts). A newer attempt
    empties the stream of the earlier attempts' events. False if `attempt` is superseded or
    already finished; it may then write nothing."""
    keys, args = _fence_args(run_id, attempt)
    conn = _aconn()
    with _unavailable(run_id):
        ok = bool(await conn.claim(keys=keys, args=args))
    if not ok:
        _refused(run_id, attempt, "claim")
    return ok


async def append(
    run_id: UUID | str, attempt: int, events: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Append `events` in order, atomically, in one round trip. Returns their stream ids, or []
    when `attempt` is superseded or finished (then nothing was written). A `run.status` event
    gets `attempt` filled in."""
    if not events:
        return []
    payload = [_encode(event, attempt) for event in events]
    keys, args = _fence_args(run_id, attempt)
    conn = _aconn()
    with _unavailable(run_id):
        ids = await conn.append(keys=keys, args=[*args, MAXLEN, *payload])
    if not ids:
        _refused(run_id, attempt, "append")
        return []
    return list(ids)


def append_later(run_id: UUID | str, attempt: int, events: Sequence[Mapping[str, Any]]) -> None:
    """Queue `events` for the run's stream and return at once (`_Writer`): they are written in
    order, after the run's earlier queued events and before its `finish`. Nothing is raised:
    events that cannot be written are lost (logged once per run), and readers reload the reply
    from PostgreSQL."""
    if events:
        _fence_args(run_id, attempt)  # a bad attempt is a bug: raise here, not in the writer
        _aconn().writer.put(_Write(run_id, attempt, [_encode(event, attempt) for event in events]))


class Coalescer:
    """Queues one attempt's events (`append_later`), merging the text deltas of a reply that come
    less than `RUN_STREAM_DELTA_MS` after the last one sent into one `message.delta`: a model
    streams a token every few ms, and each event is a stream entry, a read, a websocket frame
    and a redraw for every reader. The first delta goes at once (time to first token is not
    touched), later ones at most that late; any other event first sends the merged text before
    it, so the order of what readers see is the order of what happened. Call `flush` before
    the attempt ends its stream. 0 turns merging off."""

    def __init__(self, run_id: UUID | str, attempt: int, window_s: float | None = None) -> None:
        self.run_id, self.attempt = run_id, attempt
        self.window_s = _spacing_s("RUN_STREAM_DELTA_MS") if window_s is None else window_s
        self.pending: dict[str, Any] | None = None
        self.sent_at = float("-inf")
        self.timer: asyncio.TimerHandle | None = None

    def put(self, events: Sequence[Mapping[str, Any]]) -> None:
        for event in events:
            if self.window_s <= 0 or event.get("type") != run_events.MESSAGE_DELTA:
                self.flush()
                append_later(self.run_id, self.attempt, [event])
                continue
            if self.pending is not None:
                if self.pending.get("agent") == event.get("agent"):
                    self.pending["text"] += event.get("text", "")
                    continue
                self.flush()
            loop = asyncio.get_running_loop()
            now = loop.time()
            if now - self.sent_at >= self.window_s:
                self.sent_at = now
                append_later(self.run_id, self.attempt, [event])
            else:
                self.pending = dict(event)
                self.timer = loop.call_at(self.sent_at + self.window_s, self.flush)

    def flush(self) -> None:
        """Send the merged text now, if there is any."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.pending is not None:
            event, self.pending = self.pending, None
            self.sent_at = asyncio.get_running_loop().time()
            append_later(self.run_id, self.attempt, [event])


async def finish(run_id: UUID | str, attempt: int, final_event: Mapping[str, Any]) -> str | None:
    """Append the terminal `run.status` after the run's queued events, close the stream to
    further writes and keep it for `RUN_STREAM_TTL_SECONDS`. Returns the event's id, or None
    for a superseded attempt."""
    _final(final_event)
    payload = _encode(final_event, attempt)
    _fence_args(run_id, attempt)
    done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    _aconn().writer.put(_Write(run_id, attempt, [payload], final=True, done=done))
    entry_id = await done
    return None if entry_id is None else str(entry_id)


async def read(
    run_id: UUID | str, after: str = "0-0", block_ms: int | None = None, count: int = 500
) -> list[Entry]:
    """Up to `count` events after the id `after` ("0-0": from the start), oldest first. With
    `block_ms`, wait that long (at most MAX_BLOCK_MS) for one to arrive. [] if none (or if the
    stream does not exist: not started yet, or expired)."""
    key = stream_key(run_id)
    _check_after(after)
    conn = _aconn()
    with _unavailable(run_id):
        reply = await conn.client.xread({key: after}, count=count, block=_block(block_ms))
    return _entries(reply)


class RawEntry(NamedTuple):
    """One event as stored: `raw` is its JSON text (None for a heartbeat, which is never
    stored), `terminal` says it is the run's terminal `run.status`."""

    id: str
    raw: str | None
    terminal: bool


def _is_terminal_raw(raw: str) -> bool:
    # Only a run.status can be terminal: decode just those (a delta never is).
    if '"run.status"' not in raw:
        return False
    try:
        return run_events.is_terminal(json.loads(raw))
    except (TypeError, ValueError):
        return False


async def follow_raw(
    run_id: UUID | str, after: str = "0-0", *, heartbeat_s: float | None = 15
) -> AsyncIterator[RawEntry]:
    """`follow` without decoding: each event's stored JSON text, so a relay can pass it on as
    it is (stored events are written by `_encode` only: valid JSON objects). A heartbeat is
    `RawEntry(last id, None, False)`. Same ordering, resumption and ending as `follow`."""
    follower = _aconn().mux.join(stream_key(run_id), _check_after(after))
    try:
        while True:
            batch = await follower.next_batch(heartbeat_s)
            if batch is None:
                yield RawEntry(follower.last_id, None, False)
                continue
            for entry_id, raw in batch:
                terminal = _is_terminal_raw(raw)
                yield RawEntry(entry_id, raw, terminal)
                if terminal:
                    return
    except StreamUnavailable as exc:
        # Re-raised here so the message names this run.
        raise StreamUnavailable(f"The event stream of run {run_id} is unavailable: {exc}") from exc
    finally:
        follower.leave()


async def follow(
    run_id: UUID | str, after: str = "0-0", *, heartbeat_s: float | None = 15
) -> AsyncIterator[Entry]:
    """Yield the run's events after `after` as they arrive, ending after the terminal
    `run.status`. When nothing arrives for `heartbeat_s` seconds, yield `(last id, heartbeat)`:
    the reader can send a keep-alive, check it may still listen, and decide to give up (a run
    whose stream expired or that never started yields only heartbeats).

    Every follower of the process (of its event loop) is served by one reader
    (`_Multiplexer`): one blocking XREAD over all the streams followed, not one per follower."""
    async for entry_id, raw, terminal in follow_raw(run_id, after, heartbeat_s=heartbeat_s):
        if raw is None:
            yield entry_id, run_events.heartbeat()
            continue
        try:
            event = json.loads(raw)
        except (TypeError, ValueError):
            log.warning("skipping a malformed stream entry %s", entry_id)
            continue
        yield entry_id, event
        if terminal:
            return


# --- a thread's notices: what its open chats must hear of --------------------------------------
# A run started on a thread by someone else (another tab, the API, a schedule, a promoted queued
# run), a message taken back while it waited in line, and the thread's deletion must reach every
# chat open on it, in whichever web process. They go to one stream (`NOTICES_KEY`), which each
# web process's multiplexer reads in the XREAD it makes anyway, handing each notice to the
# sockets watching its thread. Unlike a channel-layer group message (three round trips to send,
# two to receive, a group join and leave per socket, and lost if a process missed it), a notice
# costs its sender one round trip and its readers none, however many sockets are open, and a
# reader back from a Redis failure reads what it missed.

NOTICES_MAXLEN = 10_000
NOTICES_TTL_SECONDS = 24 * 3600
RUN_STARTED = "run.started"
RUN_WITHDRAWN = "run.withdrawn"
THREAD_DELETED = "thread.deleted"


def _announce(thread_id: UUID | str, notice: dict[str, Any]) -> None:
    """Add `notice` for the thread's sockets. Best effort: the database holds the truth, and a
    socket that missed a run finds it when its client next asks, or at its next connect."""
    try:
        pipe = _sconn().client.pipeline(transaction=False)
        pipe.xadd(
            NOTICES_KEY,
            {"thread": _run(thread_id), "event": json.dumps(notice, separators=(",", ":"))},
            maxlen=NOTICES_MAXLEN,
            approximate=True,
        )
        pipe.expire(NOTICES_KEY, NOTICES_TTL_SECONDS)
        pipe.execute()
    except (redis.exceptions.RedisError, OSError):
        log.warning("could not tell the chats of thread %s: %s", thread_id, notice, exc_info=True)


def announce_run(thread_id: UUID | str, run_id: UUID | str) -> None:
    """Tell the sockets open on a thread that a run started there, so each follows its stream
    (call it on commit)."""
    _announce(thread_id, {"type": RUN_STARTED, "run_id": str(run_id)})


def announce_withdrawn(thread_id: UUID | str, run_id: UUID | str) -> None:
    """Tell the sockets open on a thread that a message waiting in line was taken back by its
    end user before it started, so each drops it from the page (call it on commit)."""
    _announce(thread_id, {"type": RUN_WITHDRAWN, "run_id": str(run_id)})


def announce_deleted(thread_id: UUID | str) -> None:
    """Tell the sockets open on a thread that it was deleted, so each closes (on commit)."""
    _announce(thread_id, {"type": THREAD_DELETED})


class ThreadNotices:
    """The notices of one thread from the moment `watch_thread` returned, as they come (an
    async iterator of dicts that never ends by itself). StreamUnavailable if Redis fails: watch
    again. `close()` when done."""

    def __init__(self, thread_id: str, watcher: _Watcher) -> None:
        self.thread_id, self.watcher = thread_id, watcher
        self.buffer: list[tuple[str, str]] = []

    def __aiter__(self) -> ThreadNotices:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while True:
            while self.buffer:
                entry_id, raw = self.buffer.pop(0)
                try:
                    notice = json.loads(raw)
                except ValueError:
                    log.warning("skipping a malformed thread notice %s", entry_id)
                    continue
                if isinstance(notice, dict):
                    return notice
            try:
                self.buffer = await self.watcher.next_batch(None) or []
            except StreamUnavailable as exc:
                raise StreamUnavailable(
                    f"The notices of thread {self.thread_id} are unavailable: {exc}"
                ) from exc

    @property
    def position(self) -> str:
        """The id of the last notice handed out (or where the watching started): watch again
        from there after StreamUnavailable to miss nothing still in the stream."""
        return self.watcher.last_id

    def close(self) -> None:
        self.watcher.leave()


async def watch_thread(thread_id: UUID | str, after: str | None = None) -> ThreadNotices:
    """Start hearing the thread's notices: every one announced after this returns, or with
    `after` (a `ThreadNotices.position`), every one after that. Call it before asking
    PostgreSQL what the thread is doing, so that a run committed after that answer is heard of.
    StreamUnavailable if Redis cannot be reached."""
    mux = _aconn().mux
    with _unavailable(thread_id, what="The notices of thread"):
        watcher = await mux.watch(_run(thread_id), None if after is None else _check_after(after))
    return ThreadNotices(_run(thread_id), watcher)


# --- sync API (views and services that run under the sync ORM) -----------------------------------


def claim_sync(run_id: UUID | str, attempt: int) -> bool:
    keys, args = _fence_args(run_id, attempt)
    conn = _sconn()
    with _unavailable(run_id):
        ok = bool(conn.claim(keys=keys, args=args))
    if not ok:
        _refused(run_id, attempt, "claim")
    return ok


def append_sync(run_id: UUID | str, attempt: int, events: Sequence[Mapping[str, Any]]) -> list[str]:
    if not events:
        return []
    payload = [_encode(event, attempt) for event in events]
    keys, args = _fence_args(run_id, attempt)
    conn = _sconn()
    with _unavailable(run_id):
        ids = conn.append(keys=keys, args=[*args, MAXLEN, *payload])
    if not ids:
        _refused(run_id, attempt, "append")
        return []
    return list(ids)


def finish_sync(run_id: UUID | str, attempt: int, final_event: Mapping[str, Any]) -> str | None:
    _final(final_event)
    payload = _encode(final_event, attempt)
    keys, args = _fence_args(run_id, attempt)
    conn = _sconn()
    with _unavailable(run_id):
        entry_id = conn.finish(keys=keys, args=[*args, MAXLEN, stream_ttl(), payload])
    if not entry_id:
        _refused(run_id, attempt, "finish")
        return None
    return str(entry_id)


def read_latest_attempt_sync(run_id: UUID | str, page: int = 500) -> tuple[list[Entry], bool]:
    """The events of the run's latest attempt, oldest first, and whether they start at the
    attempt's start: read from the stream's end back to the attempt's `run.status` running
    event, a page at a time, so the newest events are never the ones left out of a long stream.
    Without that event (the stream was trimmed to its length cap), what the stream still holds,
    and False."""
    key = stream_key(run_id)
    conn = _sconn()
    newest_first: list[Entry] = []
    before = "+"
    while True:
        with _unavailable(run_id):
            rows: list[Any] = conn.client.xrevrange(key, max=before, min="-", count=page) or []
        entries = _entries([(key, rows)])
        for entry in entries:
            newest_first.append(entry)
            event = entry[1]
            if event.get("type") == run_events.RUN_STATUS and event.get("status") == "running":
                return newest_first[::-1], True
        if len(rows) < page:
            return newest_first[::-1], not newest_first
        before = "(" + rows[-1][0]


def read_sync(
    run_id: UUID | str, after: str = "0-0", block_ms: int | None = None, count: int = 500
) -> list[Entry]:
    key = stream_key(run_id)
    _check_after(after)
    conn = _sconn()
    with _unavailable(run_id):
        reply = conn.client.xread({key: after}, count=count, block=_block(block_ms))
    return _entries(reply)

"""Sliding-window rate limits in Redis (docs/rate-limits.md).

The algorithm is a **sliding log**: each limited subject has one sorted set per window, holding one
entry per allowed hit, scored by its time in milliseconds. A hit is allowed when every window holds
fewer entries than its limit after dropping those older than the window; then it is added to all of
them. The log is exact (no burst of twice the limit across a boundary, unlike fixed windows) and
gives an exact Retry-After: the time until the entry that keeps the window full leaves it. A
window never holds more entries than its limit (refused hits are not stored), so its memory is
bounded by the limit, which `MAX_LIMIT` caps. A sliding-window counter would use less memory but
only approximates the last N seconds, and users are told "try again in 12 s": that must be true.

One Lua script checks every window of a decision and records the hit in all of them, atomically,
in one round trip, so concurrent web processes cannot both take the last slot, and a hit refused
by the hourly window is not counted in the per-minute one. (The `limits` library, the obvious
candidate, checks one limit per call and needs a second call for the time to wait.)

Keys: `<cache KEY_PREFIX>:rl:{<tenant id>}:<subject>:<window>s`, so they are namespaced by the
same prefix as the cache (a test gets its own) and by tenant; the braces are a Redis Cluster hash
tag, so the windows of one decision share a slot. Every key expires one window after its last hit.

Redis down: the check **fails open** (the hit is allowed and a warning logged), and for
`OUTAGE_BACKOFF_SECONDS` later checks skip Redis without waiting for a connection: a limiter must
not turn a Redis outage into refused or slow requests.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from django.conf import settings
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

# A window may hold at most this many entries (about 100 bytes each in Redis).
MAX_LIMIT = 10_000
OUTAGE_BACKOFF_SECONDS = 5.0
CONNECT_TIMEOUT = 0.5
SOCKET_TIMEOUT = 1.0

# KEYS: one sorted set per window. ARGV[1]: now in ms ('' = Redis's own clock, the same for every
# web process), ARGV[2]: this hit's member, then a (limit, window ms) pair per key.
# Returns {0, 0} when the hit is allowed (and recorded), else {n, wait ms} where n is the
# 1-based index of the window that is full the longest.
_HIT = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local refused, wait = 0, 0
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[1 + 2 * i])
  local window = tonumber(ARGV[2 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local count = redis.call('ZCARD', key)
  if count >= limit then
    -- the window has room again once this entry (the limit-th newest) leaves it
    local entry = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
    local w = tonumber(entry[2]) + window - now
    if w > wait or refused == 0 then
      refused, wait = i, w
    end
  end
end
if refused > 0 then
  return {refused, wait}
end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[2])
  redis.call('PEXPIRE', key, ARGV[2 + 2 * i])
end
return {0, 0}
"""


@dataclass(frozen=True)
class Window:
    """`limit` hits per `seconds` for one subject; `subject` names it within the tenant."""

    subject: str
    limit: int
    seconds: int

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_LIMIT or self.seconds < 1:
            raise ValueError(f"bad window {self!r}")


@dataclass(frozen=True)
class Decision:
    allowed: bool
    # The window that refused the hit (None when allowed or when Redis was unreachable).
    window: Window | None = None
    retry_after_ms: int = 0
    # What undoes an allowed hit (`refund`).
    keys: tuple[str, ...] = ()
    member: str = ""

    @property
    def retry_after(self) -> int:
        """Whole seconds to wait, rounded up (what a Retry-After header carries), at least 1."""
        return max(1, math.ceil(self.retry_after_ms / 1000))


def key_prefix() -> str:
    return str(settings.CACHES["default"].get("KEY_PREFIX") or "cp")


def window_key(tenant_id: Any, window: Window) -> str:
    return f"{key_prefix()}:rl:{{{tenant_id}}}:{window.subject}:{window.seconds}s"


# --- connection ----------------------------------------------------------------------------------

_clients: dict[str, tuple[redis.Redis, Any]] = {}
_lock = threading.Lock()
# Redis URL -> monotonic time until which checks skip it after a failure.
_down_until: dict[str, float] = {}


def _client(url: str) -> tuple[redis.Redis, Any]:
    with _lock:
        found = _clients.get(url)
        if found is None:
            # One retry on a broken pooled connection (a Redis restart); none on a timeout,
            # which could count a hit twice.
            retry = Retry(
                ExponentialBackoff(cap=0.1, base=0.02), 1, (redis.exceptions.ConnectionError,)
            )
            client = redis.Redis.from_url(
                url,
                retry=retry,
                decode_responses=True,
                socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=SOCKET_TIMEOUT,
                health_check_interval=30,
            )
            found = (client, client.register_script(_HIT))
            _clients[url] = found
    return found


def close() -> None:
    """Close the clients (tests, shutdown)."""
    with _lock:
        clients = list(_clients.values())
        _clients.clear()
        _down_until.clear()
    for client, _script in clients:
        client.close()


def _unreachable(url: str, exc: Exception) -> None:
    first = url not in _down_until
    _down_until[url] = time.monotonic() + OUTAGE_BACKOFF_SECONDS
    if first:
        log.warning(
            "rate limits are not enforced: Redis is unreachable (%s: %s); retrying in %.0f s",
            type(exc).__name__,
            exc,
            OUTAGE_BACKOFF_SECONDS,
        )


def _reachable(url: str) -> bool:
    until = _down_until.get(url)
    if until is None:
        return True
    if time.monotonic() < until:
        return False
    return True  # time to try again; a success clears the entry


# --- the check -----------------------------------------------------------------------------------


def clock_ms() -> int | None:
    """The time of a check: None lets Redis use its own clock, shared by every web process.
    (Tests replace this to check the window math without waiting.)"""
    return None


def hit(tenant_id: Any, windows: Sequence[Window], *, now_ms: int | None = None) -> Decision:
    """Count one hit against every window, or none if any is full. One round trip.

    `now_ms` is for tests; by default the time is Redis's own clock. When Redis cannot be reached
    the hit is allowed (fail open, see the module docstring)."""
    if not windows:
        return Decision(True)
    url = settings.REDIS_URL
    if not _reachable(url):
        return Decision(True)
    keys = tuple(window_key(tenant_id, w) for w in windows)
    member = uuid.uuid4().hex
    if now_ms is None:
        now_ms = clock_ms()
    args: list[Any] = ["" if now_ms is None else int(now_ms), member]
    for w in windows:
        args += [w.limit, w.seconds * 1000]
    script = _client(url)[1]
    try:
        refused, wait = script(keys=list(keys), args=args)
    except (redis.exceptions.RedisError, OSError) as exc:
        _unreachable(url, exc)
        return Decision(True)
    _down_until.pop(url, None)
    if int(refused):
        return Decision(False, windows[int(refused) - 1], int(wait))
    return Decision(True, keys=keys, member=member)


def refund(decision: Decision) -> None:
    """Take back an allowed hit whose action did not happen after all (best effort)."""
    if not decision.allowed or not decision.keys:
        return
    url = settings.REDIS_URL
    client, _script = _client(url)
    try:
        with client.pipeline(transaction=False) as pipe:
            for key in decision.keys:
                pipe.zrem(key, decision.member)
            pipe.execute()
    except (redis.exceptions.RedisError, OSError) as exc:
        _unreachable(url, exc)

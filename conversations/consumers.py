"""The chat websocket of one thread: `/ws/t/<slug>/chat/<thread_id>/`.

Before accepting: the session's user must be a member of the tenant in the route and the thread
must belong to that member's end user in that tenant; anything else is refused with 4404, exactly
like an unknown thread. The socket joins the membership and user groups, so removing the member,
or a logout or password change, closes it (4403) like `TenantEventsConsumer`.

Tokens never travel over the channel layer (at-most-once, DESIGN.md step 7): each followed run is
read from its Redis Stream (`streams.follow`) by a background task, from the id the client last
saw, so a reload or a second tab resumes where it was. A run started on the thread elsewhere
(another tab, the API, a schedule) and the thread's deletion reach the socket through the
thread's notices (`streams.watch_thread`), read by the same reader as the runs' streams.
Protocol: docs/run-events.md and the module's README below.

Client → server:
    {"type": "send", "text": "...", "strategy": "reject", "message_id": "..."}   start a run
        (strategy optional); `message_id`, the page's id for the message, is kept in the run's
        metadata and shown with the message in the history
    {"type": "retry", "run_id": "..."}   "Try again": the thread's latest run failed; its
        items leave the conversation and a new run takes its input (answered like a send)
    {"type": "cancel"}                                       stop the active run
    {"type": "withdraw", "run_id": "..."}   "Don't send": take back a message of this end user
        that waits in line, before its turn (answered with run.withdrawn or an error)
    {"type": "resume", "run_id": "...", "after": "<id>"}     follow a run from an event id
    {"type": "ping"}
Server → client:
    {"type": "hello", "thread_id", "active_run": id | null}
    {"type": "run.created", "run_id", "queued", "title"}   (to the sender; others get
        run.started). `title`: the thread's, which an untitled thread took from this message
    {"type": "run.started", "run_id"}
    {"type": "run.withdrawn", "run_id", "text"?}   a message waiting in line was taken back
        (it leaves the page); `text`, the message, only to the socket that asked
    {"type": "event", "id": "<stream id>", "run_id", "event": {...}}   a failed run's last
        event carries `detail` (its reason for those who run the agent) to owners and admins
    {"type": "error", "code", "message", "run_id"?}  codes: thread_busy, invalid, not_found,
        conflict (also: a message to withdraw was already sent), unavailable (the run's stream
        cannot be read: said once per outage; the socket keeps trying, then sends `live` or
        `run.ended`), bad_request,
        rate_limited (with retry_after seconds, limit and window: nothing was written)
    {"type": "live", "run_id"}   the run's stream is read again after `unavailable`: its events
        follow from where they stopped
    {"type": "run.ended", "run_id", "status"}   the run ended without a readable stream:
        reload the history over HTTP
    {"type": "revoked", "reason"} then close 4403
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from functools import partial, wraps
from typing import Any
from urllib.parse import parse_qs

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.db import DatabaseError, connections

from controlplane.errors import Conflict, DomainError, NotFound, RateLimited, ValidationFailed
from conversations import events as run_events
from conversations import selectors, services, streams
from conversations.models import FINAL_STATUSES, MultitaskStrategy, RunSource
from tenants import realtime
from tenants import selectors as tenant_selectors
from tenants.consumers import CLOSE_NOT_FOUND, CLOSE_REVOKED, CLOSE_UNAUTHENTICATED
from tenants.models import Membership

log = logging.getLogger(__name__)

STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
MAX_TEXT = services.MAX_INPUT_CHARS
# A followed run quiet for this long is looked up in PostgreSQL (has it ended? is the socket's
# membership still there?).
HEARTBEAT_S = 15.0
# After its stream failed, a followed run is followed again after this many seconds, doubling up
# to the second value while the outage lasts.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 5.0


def _db(func: Any) -> Any:
    """`func` (ORM work) off the event loop, on the loop's pool of threads. asgiref's default
    (`thread_sensitive=True`) runs every socket's queries on one shared thread: with many chats
    open, each connect and each message queued behind all the others' (docs/benchmark.md).
    Like a request, each call hands its connection back when it ends: a thread of that pool
    may sit idle (or die with its loop) holding nothing."""

    @wraps(func)
    def unit(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        finally:
            for connection in connections.all(initialized_only=True):
                if not connection.in_atomic_block:
                    connection.close()

    return database_sync_to_async(unit, thread_sensitive=False)


def _stream_id(value: Any) -> str:
    """The client's last event id, or the stream's start if it sent no valid one."""
    return value if streams.is_stream_id(value) and STREAM_ID.match(value) else "0-0"


def _for_end_user(raw: str) -> str:
    """A run's terminal event (its stored JSON) without what only owners and admins read."""
    if f'"{run_events.DETAIL}"' not in raw:
        return raw
    event = json.loads(raw)
    event.pop(run_events.DETAIL, None)
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


class _Gone(Exception):
    """The socket's membership or thread no longer exists (`reason` says which)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _still_open(consumer: ChatConsumer) -> Any:
    """The id of the thread's active run (None if idle); `_Gone` if the membership or the
    thread is gone. Removal closes open sockets through the channel layer, which delivers at
    most once (a Redis hiccup at commit, or a socket older than the layer's group expiry, and
    the message is lost): what the client asks for looks again, in the same unit of work."""
    still_open, active, role = selectors.chat_still_open(
        tenant=consumer.tenant,
        membership=consumer.membership,
        end_user=consumer.end_user,
        thread=consumer.thread,
    )
    if still_open:
        consumer.membership.role = role  # what the socket passes on follows it (`detail`)
        return active
    member = Membership.objects.for_tenant(consumer.tenant).filter(pk=consumer.membership.pk)
    raise _Gone("thread deleted" if member.exists() else "membership removed")


def _checked(consumer: ChatConsumer, func: Any, /, *args: Any, **kwargs: Any) -> Any:
    """`func(*args, **kwargs)` once `_still_open` has found the socket's membership and thread."""
    _still_open(consumer)
    return func(*args, **kwargs)


def _lookup(slug: str, user: Any, thread_id: Any) -> tuple[Any, Any, Any]:
    """Membership, end user and thread; NotFound for anything not theirs."""
    membership = tenant_selectors.membership_for(slug=slug, user=user)
    tenant = membership.tenant
    end_user = services.end_user_for_member(tenant=tenant, user=user)
    thread = services.thread_get(tenant=tenant, end_user=end_user, thread_id=thread_id)
    return membership, end_user, thread


class ChatConsumer(AsyncJsonWebsocketConsumer):
    groups: list[str] = []

    async def connect(self) -> None:
        self.joined: list[str] = []
        self.followers: dict[str, asyncio.Task[None]] = {}
        self.watcher: asyncio.Task[None] | None = None
        # The client's messages and the thread's notices are handled one at a time, so that the
        # sender of a message hears `run.created` for its run, never `run.started` first.
        self.turn = asyncio.Lock()
        # Runs this socket followed to their end: a late notice of one of them must not replay
        # it from the start.
        self.finished: set[str] = set()
        # Messages its client took back ("Don't send"): their notice is not passed on again.
        self.withdrawn: set[str] = set()
        self.revoked = False
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        kwargs = self.scope["url_route"]["kwargs"]
        slug, thread_id = kwargs["tenant_slug"], kwargs["thread_id"]
        try:
            membership, end_user, thread = await _db(_lookup)(slug, user, thread_id)
        except NotFound:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.tenant, self.end_user, self.thread = membership.tenant, end_user, thread
        self.membership = membership
        self.joined = [realtime.membership_group(membership.pk), realtime.user_group(user.pk)]
        for group in self.joined:
            await self.channel_layer.group_add(group, self.channel_name)
        # The thread's notices are heard from here on (before the query below, which finds a
        # run started before this point; one started after it is announced).
        try:
            notices: streams.ThreadNotices | None = await streams.watch_thread(thread.pk)
        except streams.StreamUnavailable:
            notices = None  # the watcher tries again until Redis answers
        opened = False
        try:
            opened = await self._open()
        finally:  # refused, the client gone during the handshake, a failed query
            if notices is not None and not opened:
                notices.close()
        if opened:
            self.watcher = asyncio.create_task(self._watch(notices))

    async def _open(self) -> bool:
        """The rest of `connect`: False if the socket was refused."""
        # A removal (or thread deletion) that committed before we joined reached nobody: look
        # again now that any later revoke will reach us (one query, with the active run).
        still_open, active, role = await _db(selectors.chat_still_open)(
            tenant=self.tenant,
            membership=self.membership,
            end_user=self.end_user,
            thread=self.thread,
        )
        self.membership.role = role or self.membership.role  # changed before we joined
        if not still_open:
            await self._leave()
            await self.close(code=CLOSE_NOT_FOUND)
            return False
        await self.accept()
        await self.send_json(
            {
                "type": "hello",
                "thread_id": str(self.thread.pk),
                "active_run": str(active) if active else None,
            }
        )
        if active is not None:
            query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
            self._follow(str(active), _stream_id((query.get("after") or ["0-0"])[0]))
        return True

    async def disconnect(self, code: int) -> None:
        await self._stop_following()
        await self._leave()

    async def _leave(self) -> None:
        for group in getattr(self, "joined", []):
            await self.channel_layer.group_discard(group, self.channel_name)
        self.joined = []

    async def _stop_following(self) -> None:
        current = asyncio.current_task()  # a follower revoking the socket ends by itself
        tasks = [task for task in getattr(self, "followers", {}).values() if task is not current]
        watcher = getattr(self, "watcher", None)
        if watcher is not None and watcher is not current:
            tasks.append(watcher)
        self.followers, self.watcher = {}, None
        await streams.cancel_and_wait(tasks, what="chat stream follower")

    async def dispatch(self, message: dict[str, Any]) -> None:
        """As channels' own, without its `close_old_connections` before every message: that is a
        hop to the shared sync thread per message (a tenth of a web process's CPU under load).
        This consumer's database work runs in `_db` units, which hand their connection back
        when they end, and channels' database wrapper (the session's user) closes its own."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    # --- from the client ---------------------------------------------------------------------

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if self.revoked:
            return
        try:
            await self._in_turn(partial(self._receive, content))
        except _Gone as gone:
            await self.connection_revoke({"reason": gone.reason})

    async def _receive(self, content: Any) -> None:
        kind = content.get("type") if isinstance(content, dict) else None
        if kind == "send":
            await self._send_message(content)
        elif kind == "retry":
            await self._send_message(content, retry_of=str(content.get("run_id", "")))
        elif kind == "resume":
            run_id = str(content.get("run_id", ""))
            run = await _db(_checked)(
                self, selectors.run_get, tenant=self.tenant, thread=self.thread, run_id=run_id
            )
            if run is None:
                await self._error("not_found", "No such run in this conversation.")
                return
            self._follow(str(run.pk), _stream_id(content.get("after")))
        elif kind == "cancel":
            await self._cancel()
        elif kind == "withdraw":
            await self._withdraw(str(content.get("run_id", "")))
        elif kind == "ping":
            await self.send_json({"type": "pong"})
        else:
            await self._error("bad_request", "Unknown message type.")

    async def _send_message(self, content: dict[str, Any], retry_of: str | None = None) -> None:
        text = content.get("text") if retry_of is None else ""
        strategy = content.get("strategy") or MultitaskStrategy.REJECT
        if not isinstance(text, str) or not isinstance(strategy, str):
            await self._error("invalid", "Type a message.")
            return
        try:
            run = await _db(_checked)(
                self,
                services.run_create,
                tenant=self.tenant,
                end_user=self.end_user,
                thread_id=self.thread.pk,
                input=text if retry_of is None else None,
                source=RunSource.CHAT,
                strategy=strategy,
                retry_of=retry_of,
                metadata=services.chat_message_metadata(content.get("message_id")),
            )
        except services.ThreadBusy as exc:
            await self._error("thread_busy", exc.message)
            return
        except RateLimited as exc:
            await self._rate_limited(exc)
            return
        except ValidationFailed as exc:
            await self._error("invalid", exc.message, fields=exc.fields)
            return
        except NotFound as exc:
            await self._error("not_found", exc.message)
            return
        except (Conflict, DomainError) as exc:  # in the words for who is asking
            said = exc.message_for(self.membership.role, tenant_name=self.tenant.name)
            await self._error(exc.code, said)
            return
        run_id = str(run.pk)
        # An untitled thread has taken its title from this message (`run_create`).
        self.thread.title = self.thread.title or services.default_title(text)
        await self.send_json(
            {
                "type": "run.created",
                "run_id": run_id,
                "queued": run.queued,
                "title": self.thread.title,
            }
        )
        self._follow(run_id, "0-0")
        # run_create announces the run to the thread's other sockets (another tab) on commit.

    async def _cancel(self) -> None:
        """The stop button: stop this thread's active run (every tab sees it end)."""
        active = await _db(_still_open)(self)
        if active is None:
            await self._error("not_found", "There is no reply to stop.")
            return
        await _db(services.run_cancel)(tenant=self.tenant, run_id=active, end_user=self.end_user)

    async def _withdraw(self, run_id: str) -> None:
        """ "Don't send" on a message of this thread waiting in line: it is taken back (every
        tab drops it, through the thread's notices) and its text comes back to this client."""
        try:
            run = await _db(_checked)(
                self,
                services.run_withdraw,
                tenant=self.tenant,
                end_user=self.end_user,
                thread_id=self.thread.pk,
                run_id=run_id,
            )
        except NotFound as exc:
            await self._error("not_found", exc.message)
            return
        except Conflict as exc:
            await self._error(exc.code, exc.message)
            return
        run_id = str(run.pk)
        self.withdrawn.add(run_id)
        self._unfollow(run_id)
        await self.send_json(
            {"type": "run.withdrawn", "run_id": run_id, "text": selectors.input_text(run)}
        )

    def _unfollow(self, run_id: str) -> None:
        """Stop reading a run that will never start: its stream will never be written, and the
        look at PostgreSQL after a quiet spell would report it as a reply that ended."""
        self.finished.add(run_id)
        follower = self.followers.pop(run_id, None)
        if follower is not None and follower is not asyncio.current_task():
            follower.cancel()

    async def _rate_limited(self, exc: RateLimited) -> None:
        """In the chat's words (the page keeps the typed text and counts down)."""
        await self._error(
            "rate_limited",
            services.rate_limited_message(exc),
            retry_after=int(exc.metadata.get("retry_after") or 1),
            limit=exc.metadata.get("limit"),
            window=exc.metadata.get("window"),
        )

    async def _error(self, code: str, message: str, **extra: Any) -> None:
        await self.send_json({"type": "error", "code": code, "message": message, **extra})

    # --- following runs ----------------------------------------------------------------------

    def _follow(self, run_id: str, after: str) -> None:
        """(Re)start reading `run_id`'s stream after `after` in the background."""
        previous = self.followers.pop(run_id, None)
        if previous is not None:
            previous.cancel()
        self.followers[run_id] = asyncio.create_task(self._relay(run_id, after))

    async def _relay(self, run_id: str, after: str) -> None:
        # The frame around each event is built around the event's stored JSON text, which goes
        # out as it is (no decoding and re-encoding per token). `run_id` is a UUID and stream
        # ids are digits and a dash: nothing in the frame needs escaping.
        head = '{"type":"event","run_id":"' + run_id + '","id":"'
        # Seconds before following again after the stream failed; 0 while it works. Through an
        # outage the run is followed again from the last event sent (the client is told once),
        # until its stream answers or PostgreSQL says it ended: the client is never left
        # waiting for a reply it will not hear of.
        wait = 0.0
        try:
            while not self.revoked:
                try:
                    if wait:
                        await asyncio.sleep(wait)
                        if await self._ended(run_id):
                            return
                    async for event_id, raw, terminal in streams.follow_raw(
                        run_id, after=after, heartbeat_s=HEARTBEAT_S
                    ):
                        if self.revoked:
                            return
                        if wait:
                            wait = 0.0
                            await self.send_json({"type": "live", "run_id": run_id})
                        if terminal:
                            self.finished.add(run_id)
                            if raw is not None and not self.membership.can_manage:
                                raw = _for_end_user(raw)
                        if raw is None:
                            # Quiet for a while: if PostgreSQL says the run ended (its stream
                            # expired or was never written), stop and let the client reload the
                            # history. And look again at the membership, as for the client's
                            # messages (`_still_open`).
                            if await self._ended(run_id):
                                return
                            continue
                        await self.send(text_data=head + event_id + '","event":' + raw + "}")
                        after = event_id
                    return
                except streams.StreamUnavailable:
                    message = (
                        "Live updates are unavailable right now; the conversation is reloaded "
                        "when the reply is saved."
                    )
                except asyncio.CancelledError:
                    raise
                except OSError:  # the client left (the server's ClientDisconnected): no one to tell
                    return
                except Exception:  # a reader bug must not kill the socket silently
                    if not wait:
                        log.exception("chat: following run %s failed", run_id)
                    message = (
                        "Live updates stopped; the conversation is reloaded when the reply is "
                        "saved."
                    )
                if self.revoked:
                    return
                if not wait:  # once per outage
                    await self._error("unavailable", message, run_id=run_id)
                wait = min(wait * 2, RETRY_MAX_S) if wait else RETRY_FIRST_S
        finally:
            task = self.followers.get(run_id)
            if task is asyncio.current_task():
                del self.followers[run_id]

    async def _ended(self, run_id: str) -> bool:
        """Whether following `run_id` is over: PostgreSQL says the run ended (the client is told
        to reload the history), or the socket's membership or thread is gone (it is revoked)."""
        try:
            status = await _db(_checked)(
                self, selectors.run_status, tenant=self.tenant, thread=self.thread, run_id=run_id
            )
        except _Gone as gone:
            await self.connection_revoke({"reason": gone.reason})
            return True
        if status is None or status in FINAL_STATUSES:
            self.finished.add(run_id)
            await self.send_json({"type": "run.ended", "run_id": run_id, "status": status})
            return True
        return False

    # --- the thread's notices ---------------------------------------------------------------

    async def _watch(self, notices: streams.ThreadNotices | None) -> None:
        """Hear the thread's notices until the socket closes. When Redis fails it watches
        again, from the last notice it heard, after 0.5 s and then twice as long each time up
        to 5 s; once it watches again it asks PostgreSQL for the thread's active run too (an
        announcement may have failed, or the gap outlasted the notices kept). The client hears
        of an outage from the run it follows, if any."""
        wait = 0.0
        position: str | None = None
        try:
            while not self.revoked:
                try:
                    if notices is None:
                        if wait:
                            await asyncio.sleep(wait)
                        notices = await streams.watch_thread(self.thread.pk, after=position)
                        if not await self._in_turn(self._catch_up):
                            return
                    async for notice in notices:
                        wait = 0.0
                        if not await self._in_turn(partial(self._notice, notice)):
                            return
                except streams.StreamUnavailable:
                    pass
                except DatabaseError:  # the look at PostgreSQL failed: both are tried again
                    log.warning("chat: no active run read for %s", self.thread.pk, exc_info=True)
                except (_Gone, asyncio.CancelledError):
                    raise
                except OSError:  # the client left (the server's ClientDisconnected)
                    return
                except Exception:  # a bug: stop watching
                    log.exception("chat: watching thread %s failed", self.thread.pk)
                    return
                if notices is not None:
                    position = notices.position
                    notices.close()
                    notices = None
                wait = min(wait * 2, RETRY_MAX_S) if wait else RETRY_FIRST_S
        except _Gone as gone:
            await self.connection_revoke({"reason": gone.reason})
        finally:
            if notices is not None:
                notices.close()

    async def _in_turn(self, work: Callable[[], Awaitable[None]]) -> bool:
        """`work()` in the socket's turn (`self.turn`), unless the socket was revoked meanwhile
        (then nothing); whether the socket is still open afterwards."""
        async with self.turn:
            if not self.revoked:
                await work()
        return not self.revoked

    async def _catch_up(self) -> None:
        """Follow the thread's active run if the socket does not yet (after watching again)."""
        active = await _db(_still_open)(self)
        if active is not None:
            await self._notice({"type": streams.RUN_STARTED, "run_id": str(active)})

    async def _notice(self, notice: dict[str, Any]) -> None:
        kind = notice.get("type")
        if kind == streams.RUN_STARTED:
            run_id = str(notice.get("run_id", ""))
            if run_id and run_id not in self.followers and run_id not in self.finished:
                await self.send_json({"type": "run.started", "run_id": run_id})
                self._follow(run_id, "0-0")
        elif kind == streams.RUN_WITHDRAWN:
            run_id = str(notice.get("run_id", ""))
            if run_id and run_id not in self.withdrawn:
                self.withdrawn.add(run_id)
                self._unfollow(run_id)
                await self.send_json({"type": "run.withdrawn", "run_id": run_id})
        elif kind == streams.THREAD_DELETED:
            await self.connection_revoke({"reason": "thread deleted"})

    # --- from the channel layer --------------------------------------------------------------

    async def membership_role(self, message: dict[str, Any]) -> None:
        """The member's role changed: what the socket shows from now on follows it (a failed
        run's `detail` goes to owners and admins only)."""
        self.membership.role = str(message.get("role", self.membership.role))

    async def connection_revoke(self, message: dict[str, Any]) -> None:
        if self.revoked:
            return
        self.revoked = True
        try:
            await self._leave()
        finally:
            await self._stop_following()
            await self.send_json({"type": "revoked", "reason": message.get("reason", "")})
            await self.close(code=CLOSE_REVOKED)

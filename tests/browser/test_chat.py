"""The end-user chat in a real browser: a member talks to a published agent over the websocket.

The live server of pytest-django speaks WSGI only, so `asgi_site` serves the real ASGI app
(HTTP through Django, websockets through Channels) with uvicorn on a thread of its own, and runs
really execute: `executor.kick` claims the run and hands it to a `RunHost`, whose asyncio loop
thread streams the built-in offline model's reply into the run's Redis Stream.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import pytest
from django.db import connections
from playwright.sync_api import Page, expect

from ai_agents import services as agent_services
from conversations import executor, services, worker
from conversations.models import Item, Run, RunStatus
from tests.browser.test_dashboard import log_in
from tests.conftest import make_world

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

QUESTION = "Use the calculator to compute 12 * 12"
REPLY = "[built-in offline model] The calculator tool returned: 144."
WORD_DELAY = 0.3  # seconds per streamed word: slow enough to refresh the page mid-reply
LONG = 15_000  # ms; bounds a failure, never a timing

T = TypeVar("T")


@dataclass
class AsgiSite:
    url: str
    host: worker.RunHost


def off_the_loop(func: Callable[[], T]) -> T:
    """`func()` on a thread of its own: the ORM, off Playwright's event loop. The thread hands
    its database connection back to the pool when it is done: a thread that ends holding one
    keeps it from the pool for good, and after a few tests the pages of the live server waited
    for a connection until they answered 500."""

    def unit() -> T:
        try:
            return func()
        finally:
            connections.close_all()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(unit).result()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def asgi_site(settings, monkeypatch, kicked) -> Iterator[AsgiSite]:
    """The real ASGI application under uvicorn on 127.0.0.1, and runs executed in-process."""
    import uvicorn

    settings.ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
    settings.SESSION_COOKIE_SECURE = False  # a Secure cookie is dropped over http
    settings.CSRF_COOKIE_SECURE = False
    settings.SECURE_SSL_REDIRECT = False
    settings.SECURE_HSTS_SECONDS = 0
    settings.OFFLINE_MODEL_WORD_DELAY = WORD_DELAY

    # Built after the settings change, as controlplane/asgi.py builds it: its middleware chain
    # (SecurityMiddleware reads the SSL settings once) sees the values above.
    from channels.auth import AuthMiddlewareStack
    from channels.routing import ProtocolTypeRouter, URLRouter
    from django.core.asgi import get_asgi_application

    from controlplane.routing import websocket_urlpatterns
    from controlplane.websocket import AllowedHostsOriginValidator

    app = ProtocolTypeRouter(
        {
            "http": get_asgi_application(),
            "websocket": AllowedHostsOriginValidator(
                AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
            ),
        }
    )

    host = worker.RunHost()

    def kick(run_id) -> None:  # what a Celery worker does with the message, in-process
        held = executor.claim(run_id, owner=host.owner)
        if held is not None:
            # Called on commit inside the consumer's `database_sync_to_async` thread: the host
            # must not carry that thread's context into the run.
            host.submit(held)

    monkeypatch.setattr(executor, "kick", kick)

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    started = threading.Event()
    for _ in range(200):  # up to 10 s for the socket to listen
        if server.started:
            started.set()
            break
        started.wait(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield AsgiSite(url=f"http://127.0.0.1:{port}", host=host)
    finally:
        server.should_exit = True
        thread.join(2)
        if thread.is_alive():  # a connection still open: uvicorn would wait for it
            server.force_exit = True
            thread.join(5)
        assert not thread.is_alive(), "uvicorn did not stop"
        host._stop.set()
        host._loop.call_soon_threadsafe(host._loop.stop)


@pytest.fixture
def site(asgi_site: AsgiSite) -> str:
    """The browser fixture (`run_in_browser`) opens its contexts on the ASGI server."""
    return asgi_site.url


def _published_agent(world):
    agent = agent_services.agent_create(
        tenant=world.tenant,
        actor=world.actor(),
        name="Calc",
        description="Does arithmetic with its calculator.",
        config={"tools": [{"name": "calculator"}]},
    )
    agent_services.agent_publish(tenant=world.tenant, actor=world.actor(), agent_id=agent.pk)
    return agent


def chat_socket(ws) -> bool:
    return "/chat/" in ws.url


def _pending_text(page: Page) -> str:
    return page.evaluate(
        "() => { const b = document.querySelector('.msg-pending .bubble');"
        " return b ? b.textContent : null; }"
    )


def test_member_chats_with_a_tool_reply_that_streams_survives_a_refresh_and_reaches_a_2nd_tab(
    asgi_site, run_in_browser
):
    world = make_world("Acme")
    _published_agent(world)
    member = world.member.email

    def flow(new_context) -> None:
        page = new_context().new_page()
        sockets: list[str] = []
        page.on("websocket", lambda ws: chat_socket(ws) and sockets.append(ws.url))
        log_in(page, member)
        expect(page).to_have_url(re.compile(r"/t/acme/$"))

        # The member picks the published agent on the chat page and starts a conversation.
        page.goto("/t/acme/chat/")
        card = page.locator(".chat-agent-card", has_text="Calc")
        expect(card).to_contain_text("Does arithmetic with its calculator.")
        with page.expect_websocket(chat_socket) as opened:
            card.get_by_role("button", name="Start a chat").click()
        opened.value.wait_for_event("framereceived")  # the server's hello: the socket is up
        expect(page).to_have_url(re.compile(r"/t/acme/chat/[0-9a-f-]{36}/$"))
        thread_url = page.url
        expect(page.get_by_text("Say hello to Calc")).to_be_visible()

        # The same member has the conversation open in a second browser too.
        other = new_context().new_page()
        log_in(other, member)
        expect(other).to_have_url(re.compile(r"/t/acme/$"))
        with other.expect_websocket(chat_socket) as opened:
            other.goto(thread_url)
        opened.value.wait_for_event("framereceived")
        expect(other.get_by_text("Say hello to Calc")).to_be_visible()

        expect(page.get_by_role("heading", level=1)).to_have_text("New conversation")
        page.get_by_label("Message").fill(QUESTION)
        page.get_by_role("button", name="Send").click()
        expect(page.locator(".msg-user").last).to_have_text(QUESTION)
        # The conversation is named after its first message at once, not at the next visit.
        expect(page.get_by_role("heading", level=1)).to_have_text(QUESTION)
        expect(page).to_have_title(re.compile("^" + re.escape(QUESTION) + " · Chat"))
        # Busy replying: a new message would go with the picked strategy.
        expect(page.get_by_label("While a reply is being written")).to_be_visible()

        # The tool step appears with the calculator's result, then the reply streams in.
        step = page.locator("details.step-tool_call[data-pending]")
        expect(step).to_contain_text("calculator", timeout=LONG)
        expect(step.locator(".step-output")).to_have_text("144", timeout=LONG)
        page.wait_for_function(
            "() => { const b = document.querySelector('.msg-pending .bubble');"
            " return b && b.textContent.length > 0; }",
            timeout=LONG,
        )
        first = _pending_text(page)
        page.wait_for_function(
            "n => { const b = document.querySelector('.msg-pending .bubble');"
            " return b && b.textContent.length > n; }",
            arg=len(first),
            timeout=LONG,
        )
        second = _pending_text(page)
        assert REPLY.startswith(first) and REPLY.startswith(second), (first, second)
        assert len(first) < len(second) < len(REPLY), "the reply is still being written"
        # The second browser is following the same reply live.
        other_step = other.locator("details.step-tool_call[data-pending]")
        expect(other_step.locator(".step-output")).to_have_text("144")

        # Refresh in the middle of the reply: what was shown is drawn again at once, and the
        # reply continues from where it was (not from the start: no word appears twice).
        before_refresh = second
        seen_before = len(sockets)
        page.reload()
        expect(page.locator(".msg-pending .bubble")).to_contain_text(
            before_refresh.strip(), timeout=LONG
        )
        page.wait_for_function(
            "n => { const b = document.querySelector('.msg-pending .bubble');"
            " return !b || b.textContent.length > n; }",
            arg=len(before_refresh),
            timeout=LONG,
        )
        resumed = _pending_text(page)
        assert resumed is None or REPLY.startswith(resumed), resumed
        reconnect = sockets[seen_before]
        assert re.search(r"\?after=\d+-\d+$", reconnect), reconnect
        assert not reconnect.endswith("after=0-0"), reconnect

        # The run ends: the streamed bubble is replaced by the server's rendering of the reply.
        final = page.locator(".msg-assistant[data-item-id]")
        expect(final).to_have_count(1, timeout=LONG)
        expect(final).to_have_text(REPLY)
        expect(page.locator("[data-pending]")).to_have_count(0)
        expect(page.get_by_role("button", name="Send")).to_be_enabled()
        expect(page.get_by_label("While a reply is being written")).to_be_hidden()
        expect(page.locator("#chat-log")).to_contain_text("144")
        assert page.locator(".msg-assistant", has_text="144").count() == 1
        assert page.locator(".msg-user", has_text=QUESTION).count() == 1
        tool_steps = page.locator("details.step-tool_call")
        expect(tool_steps).to_have_count(1)
        expect(tool_steps).to_contain_text("calculator")
        kept = page.evaluate("() => Object.keys(sessionStorage).filter(k => k.startsWith('chat:'))")
        assert kept == [], "a finished reply leaves nothing to resume"

        # The second browser followed the same reply and ends on the same final message.
        other_final = other.locator(".msg-assistant[data-item-id]")
        expect(other_final).to_have_count(1, timeout=LONG)
        expect(other_final).to_have_text(REPLY)
        expect(other.locator("[data-pending]")).to_have_count(0)
        assert other.locator(".msg-assistant", has_text="144").count() == 1
        assert other.locator(".msg-user", has_text=QUESTION).count() == 1

        # A reload of the finished conversation shows the same, from the server.
        page.reload()
        expect(page.locator(".msg-assistant")).to_have_text([REPLY])

    run_in_browser(flow)

    run = Run.objects.for_tenant(world.tenant).get()
    assert run.status == RunStatus.SUCCESS
    assert run.attempt == 1, "the refresh did not restart the run"
    # The question, the tool call, its result and the reply: saved once each.
    assert Item.objects.for_tenant(world.tenant).filter(thread=run.thread).count() == 4


def _ask_then_queue(new_context, world, thread, follow_up):
    """A member's chat on `thread`: QUESTION asked and, while it is answered, `follow_up` sent
    with "Send after this reply". Returns the page and the waiting message."""
    page = new_context().new_page()
    log_in(page, world.member.email)
    expect(page).to_have_url(re.compile(r"/t/acme/$"))
    with page.expect_websocket(chat_socket) as opened:
        page.goto(f"/t/acme/chat/{thread.pk}/")
    opened.value.wait_for_event("framereceived")
    page.get_by_label("Message").fill(QUESTION)
    page.get_by_role("button", name="Send").click()
    picker = page.get_by_label("While a reply is being written")
    expect(picker).to_be_visible(timeout=LONG)
    picker.select_option(label="Send after this reply")
    page.get_by_label("Message").fill(follow_up)
    page.get_by_role("button", name="Send").click()
    return page, page.locator(".msg-user", has_text=follow_up)


def test_stop_button_shows_only_while_a_reply_is_written(asgi_site, run_in_browser):
    world = make_world("Acme")
    agent = _published_agent(world)
    end_user = services.end_user_for_member(tenant=world.tenant, user=world.member)
    thread = services.thread_create(tenant=world.tenant, end_user=end_user, agent_id=agent.pk)

    def flow(new_context) -> None:
        page = new_context().new_page()
        log_in(page, world.member.email)
        expect(page).to_have_url(re.compile(r"/t/acme/$"))
        with page.expect_websocket(chat_socket) as opened:
            page.goto(f"/t/acme/chat/{thread.pk}/")
        opened.value.wait_for_event("framereceived")
        expect(page.get_by_role("button", name="Send")).to_be_enabled()
        expect(page.get_by_role("button", name="Stop")).to_be_hidden(timeout=1_000)

    run_in_browser(flow)


def test_a_message_sent_during_a_reply_waits_in_line_and_survives_a_refresh(
    asgi_site, run_in_browser
):
    world = make_world("Acme")
    agent = _published_agent(world)
    end_user = services.end_user_for_member(tenant=world.tenant, user=world.member)
    thread = services.thread_create(tenant=world.tenant, end_user=end_user, agent_id=agent.pk)
    follow_up = "Thanks, and what is 2 + 3?"

    def flow(new_context) -> None:
        page, queued = _ask_then_queue(new_context, world, thread, follow_up)
        expect(queued).to_contain_text("Queued: sent when the current reply ends", timeout=LONG)

        # A refresh while it waits still shows it, as waiting in line (from the server).
        page.reload()
        expect(page.locator(".msg-waiting", has_text=follow_up)).to_contain_text("Queued")

        # Both replies arrive, in order: the question, its reply, the follow-up, its reply.
        replies = page.locator(".msg-assistant[data-item-id]")
        expect(replies).to_have_count(2, timeout=3 * LONG)
        expect(page.locator("[data-pending]")).to_have_count(0, timeout=LONG)
        texts = page.locator(".msg[data-item-id]").all_inner_texts()
        assert [t for t in texts if follow_up in t] == [follow_up]
        assert texts.index(follow_up) > texts.index(REPLY)

    run_in_browser(flow)

    runs = list(Run.objects.for_tenant(world.tenant).order_by("created_at"))
    assert [r.status for r in runs] == [RunStatus.SUCCESS, RunStatus.SUCCESS]
    assert runs[1].strategy == "enqueue"


def test_a_message_stopped_while_it_waited_in_line_stays_after_the_reply_it_waited_for(
    asgi_site, run_in_browser
):
    """A message sent with "Send after this reply" is stopped before its turn (here from the run
    inspector): the page shows it, marked stopped, while the reply goes on; once the reply ends,
    after it, and so does a reload."""
    world = make_world("Acme")
    thread = _member_thread(world)
    follow_up = "Thanks, and what is 2 + 3?"

    def stop_it() -> None:
        waiting = Run.objects.for_tenant(world.tenant).get(queued=True)
        services.run_stop(tenant=world.tenant, actor=world.actor(), run_id=waiting.pk)

    def flow(new_context) -> None:
        page, queued = _ask_then_queue(new_context, world, thread, follow_up)
        expect(queued).to_contain_text("Queued", timeout=LONG)
        off_the_loop(stop_it)
        expect(queued).to_contain_text("Stopped by an administrator.", timeout=LONG)
        expect(queued).not_to_contain_text("Queued")
        expect(page.get_by_role("button", name="Stop")).to_be_visible()  # the reply goes on

        replies = page.locator(".msg-assistant[data-item-id]")
        expect(replies).to_have_text([REPLY], timeout=3 * LONG)
        expect(page.locator("[data-pending]")).to_have_count(0, timeout=LONG)
        for reload in (False, True):  # as the page shows it, then after a reload
            if reload:
                page.reload()
                expect(replies).to_have_text([REPLY])
            texts = page.locator("#chat-log > *").all_inner_texts()
            assert [t for t in texts if follow_up in t] == [follow_up], texts
            assert texts.index(follow_up) > texts.index(REPLY), texts
            assert texts[texts.index(follow_up) + 1] == "Stopped by an administrator.", texts

    run_in_browser(flow)

    runs = list(Run.objects.for_tenant(world.tenant).order_by("created_at"))
    assert [r.status for r in runs] == [RunStatus.SUCCESS, RunStatus.CANCELLED]


def _scripted_socket(page: Page, frames: list[dict]) -> list:
    """The page's chat socket answers with `frames`, in order, and nothing else: the page's
    handling of an order of events the server can produce but not on cue. Returns the sockets
    opened so far (a flow sends more frames with `sockets[-1].send`)."""
    import json

    sockets: list = []

    def connected(ws) -> None:
        sockets.append(ws)
        for frame in frames:
            ws.send(json.dumps(frame))

    page.route_web_socket(re.compile(r"/ws/t/"), connected)
    return sockets


def _event(run_id: str, n: int, **ev) -> dict:
    return {"type": "event", "id": f"{n}-0", "run_id": run_id, "event": ev}


def _message(text: str) -> dict:
    return {"type": "message", "role": "assistant",
            "content": [{"type": "output_text", "text": text}]}  # fmt: skip


def _turns(count: int) -> list[dict]:
    """`count` saved turns of a reply: each a message, a calculator call and its result."""
    items: list[dict] = []
    for i in range(count):
        items += [
            _message(f"step {i}"),
            {"type": "function_call", "name": "calculator", "call_id": f"c{i}", "arguments": "{}"},
            {"type": "function_call_output", "call_id": f"c{i}", "output": "1"},
        ]
    return items


def _member_thread(world):
    """A thread of the world's member with the Calc agent."""
    agent = _published_agent(world)
    end_user = services.end_user_for_member(tenant=world.tenant, user=world.member)
    return services.thread_create(tenant=world.tenant, end_user=end_user, agent_id=agent.pk)


def _thread_with_a_run(world, items: list[dict] | None = None):
    """A thread whose run asks "go": pending with no `items`; else running its first attempt,
    which saved `items`, the question first."""
    thread = _member_thread(world)
    run = services.run_create(
        tenant=world.tenant, end_user=thread.end_user, thread_id=thread.pk, input="go"
    )
    if items is not None:
        Run.objects.for_tenant(world.tenant).filter(pk=run.pk).update(
            status=RunStatus.RUNNING, attempt=1
        )
        Item.objects.bulk_create(
            Item(tenant=world.tenant, thread=thread, run=run, data=d)
            for d in [{"role": "user", "content": "go"}, *items]
        )
    return thread, run


def _open_chat(new_context, world, thread, frames: list[dict]) -> tuple[Page, list]:
    """The member's chat page on `thread`, its socket scripted with `frames`."""
    page = new_context().new_page()
    log_in(page, world.member.email)
    expect(page).to_have_url(re.compile(r"/t/acme/$"))
    sockets = _scripted_socket(page, frames)
    page.goto(f"/t/acme/chat/{thread.pk}/")
    return page, sockets


def test_a_late_event_of_an_interrupted_reply_leaves_the_next_reply_alone(
    asgi_site, run_in_browser
):
    import uuid

    world = make_world("Acme")
    thread = _member_thread(world)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    frames = [
        {"type": "hello", "thread_id": str(thread.pk), "active_run": None},
        {"type": "run.started", "run_id": first},
        _event(first, 1, type="run.status", status="running", message="", attempt=1),
        _event(first, 2, type="message.delta", text="Once upon", agent="Calc"),
        # "Stop this reply, then send": the next reply starts before the first one's end is read.
        {"type": "run.started", "run_id": second},
        _event(second, 1, type="run.status", status="running", message="", attempt=1),
        _event(second, 2, type="message.delta", text="Sec", agent="Calc"),
        _event(first, 3, type="run.status", status="interrupted", message="Interrupted.",
               attempt=1),
        _event(second, 3, type="message.delta", text="ond", agent="Calc"),
    ]  # fmt: skip

    def flow(new_context) -> None:
        page, _sockets = _open_chat(new_context, world, thread, frames)
        # The second reply is whole, in one bubble, and still stoppable.
        expect(page.locator(".msg-pending .bubble")).to_have_text(["Second"], timeout=LONG)
        expect(page.get_by_role("button", name="Stop")).to_be_visible()
        expect(page.locator("#chat")).to_have_attribute("data-active-run", second)

    run_in_browser(flow)


def test_a_queued_reply_that_starts_before_the_earlier_ones_end_arrives_is_shown_whole(
    asgi_site, run_in_browser
):
    import uuid

    world = make_world("Acme")
    thread = _member_thread(world)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    frames = [
        {"type": "hello", "thread_id": str(thread.pk), "active_run": first},
        _event(first, 1, type="run.status", status="running", message="", attempt=1),
        _event(first, 2, type="message.delta", text="Once upon", agent="Calc"),
        # "Send after this reply": this socket follows the queued run from its creation, so it
        # hears no `run.started` when the run is promoted; its start can beat the earlier end.
        {"type": "run.created", "run_id": second, "queued": True},
        _event(second, 1, type="run.status", status="running", message="", attempt=1),
        _event(second, 2, type="message.delta", text="Sec", agent="Calc"),
        _event(first, 3, type="run.status", status="success", message="", attempt=1),
        _event(second, 3, type="message.delta", text="ond", agent="Calc"),
    ]

    def flow(new_context) -> None:
        page, _sockets = _open_chat(new_context, world, thread, frames)
        expect(page.locator(".msg-pending .bubble")).to_have_text(["Second"], timeout=LONG)
        expect(page.get_by_role("button", name="Stop")).to_be_visible()
        expect(page.locator("#chat")).to_have_attribute("data-active-run", second)

    run_in_browser(flow)


def test_a_reply_longer_than_a_page_replayed_from_its_start_draws_only_what_is_unsaved(
    unstarted, run_in_browser
):
    world = make_world("Acme")
    thread, run = _thread_with_a_run(world, _turns(30))  # 91 items: the page shows the latest 50
    rid = str(run.pk)
    frames = [
        {"type": "hello", "thread_id": str(thread.pk), "active_run": rid},
        _event(rid, 1, type="run.status", status="running", message="", attempt=1),
    ]
    for i in range(30):
        frames += [
            _event(rid, 3 * i + 2, type="message.completed", text=f"step {i}", agent="Calc"),
            _event(rid, 3 * i + 3, type="tool.started", call_id=f"c{i}", tool="calculator",
                   arguments="{}", agent="Calc"),
            _event(rid, 3 * i + 4, type="tool.finished", call_id=f"c{i}", tool="calculator",
                   output="1", agent="Calc"),
        ]  # fmt: skip
    frames.append(_event(rid, 100, type="message.delta", text="now writing", agent="Calc"))

    def flow(new_context) -> None:
        page, _sockets = _open_chat(new_context, world, thread, frames)
        expect(page.locator(".msg-pending .bubble")).to_have_text(["now writing"], timeout=LONG)
        expect(page.locator("details[data-pending]")).to_have_count(0)
        expect(page.locator(".msg-assistant", has_text="step 0")).to_have_count(0)  # older page

    run_in_browser(flow)


def test_a_retried_reply_replaces_what_its_earlier_attempt_had_saved(unstarted, run_in_browser):
    world = make_world("Acme")
    thread, run = _thread_with_a_run(world, [_message("First try")])
    rid = str(run.pk)
    frames = [
        {"type": "hello", "thread_id": str(thread.pk), "active_run": rid},
        _event(rid, 1, type="run.status", status="running", message="", attempt=1),
        _event(rid, 2, type="message.completed", text="First try", agent="Calc"),
        # Its worker died; the retry starts the reply over (and removed what attempt 1 saved).
        _event(rid, 3, type="run.status", status="running", message="", attempt=2),
        _event(rid, 4, type="message.completed", text="First try", agent="Calc"),
        _event(rid, 5, type="message.delta", text="and more", agent="Calc"),
    ]

    def flow(new_context) -> None:
        page, _sockets = _open_chat(new_context, world, thread, frames)
        expect(page.locator(".msg-pending .bubble")).to_have_text(
            ["First try", "and more"], timeout=LONG
        )
        expect(page.locator(".msg-assistant:not([data-pending])")).to_have_count(0)

    run_in_browser(flow)


@pytest.fixture
def unstarted(asgi_site, monkeypatch) -> None:
    """Runs stay as the test sets them: none is handed to the site's in-process worker."""
    monkeypatch.setattr(executor, "kick", lambda run_id: None)


def test_an_older_replys_start_read_late_does_not_take_over_the_page(unstarted, run_in_browser):
    import uuid

    world = make_world("Acme")
    thread, run = _thread_with_a_run(world)
    older, current = str(uuid.uuid4()), str(run.pk)  # the page opens on the current one
    frames = [
        {"type": "hello", "thread_id": str(thread.pk), "active_run": current},
        # The interrupted reply's stream, replayed late: it started long before the current one.
        _event(older, 1, type="run.status", status="running", message="", attempt=1),
        _event(older, 2, type="message.delta", text="Old words", agent="Calc"),
        _event(current, 1, type="run.status", status="running", message="", attempt=1),
        _event(current, 2, type="message.delta", text="Current", agent="Calc"),
    ]

    def flow(new_context) -> None:
        page, _sockets = _open_chat(new_context, world, thread, frames)
        expect(page.locator(".msg-pending .bubble")).to_have_text(["Current"], timeout=LONG)
        expect(page.locator("#chat")).to_have_attribute("data-active-run", current)
        expect(page.get_by_role("button", name="Stop")).to_be_visible()

    run_in_browser(flow)


def test_a_reply_whose_stream_lost_its_start_draws_its_unsaved_steps(unstarted, run_in_browser):
    """A stream trimmed to its length cap replays from the middle of the reply: the page knows
    each step's place from the event, not by counting what it read."""
    world = make_world("Acme")
    thread, run = _thread_with_a_run(world, _turns(3))  # three turns saved; a fourth is written
    rid = str(run.pk)
    frames = [
        {"type": "hello", "thread_id": str(thread.pk), "active_run": rid},
        # No `running` event: the stream's first events were trimmed away.
        _event(rid, 7, type="message.completed", text="step 2", agent="Calc", seq=2),
        _event(rid, 8, type="tool.started", call_id="c2", tool="calculator", arguments="{}",
               agent="Calc", seq=2),
        _event(rid, 9, type="tool.finished", call_id="c2", tool="calculator", output="1",
               agent="Calc"),
        _event(rid, 10, type="message.completed", text="step 3", agent="Calc", seq=3),
        _event(rid, 11, type="tool.started", call_id="c3", tool="calculator", arguments="{}",
               agent="Calc", seq=3),
        _event(rid, 12, type="message.delta", text="now writing", agent="Calc"),
    ]  # fmt: skip

    def flow(new_context) -> None:
        page, _sockets = _open_chat(new_context, world, thread, frames)
        expect(page.locator(".msg-pending .bubble")).to_have_text(
            ["step 3", "now writing"], timeout=LONG
        )
        expect(page.locator("details[data-pending]")).to_have_count(1)  # the call c3
        expect(page.locator(".msg-assistant", has_text="step 2")).to_have_count(1)

    run_in_browser(flow)


def test_a_replayed_hosted_tool_call_is_matched_by_its_id(unstarted, run_in_browser):
    """Hosted tools' calls (web search and the like) have no place among the function calls: a
    saved one is the one the page shows with its id, whatever came before it."""
    world = make_world("Acme")

    def searched(n: int) -> dict:
        return {"id": f"ws_{n}", "type": "web_search_call", "status": "completed",
                "action": {"type": "search", "query": f"q{n}"}}  # fmt: skip

    saved = [searched(1), searched(2), *_turns(1)[1:]]  # two searches, then calculator call c0
    thread, run = _thread_with_a_run(world, saved)
    rid = str(run.pk)

    def started(n: int, call_id: str, **seq) -> dict:
        return _event(rid, n, type="tool.started", call_id=call_id, tool="web_search",
                      arguments="", agent="Calc", **seq)  # fmt: skip

    frames = [
        {"type": "hello", "thread_id": str(thread.pk), "active_run": rid},
        _event(rid, 1, type="run.status", status="running", message="", attempt=1),
        started(2, "ws_1"),
        started(3, "ws_2"),
        _event(rid, 4, type="tool.started", call_id="c0", tool="calculator", arguments="{}",
               agent="Calc", seq=0),
        _event(rid, 5, type="tool.finished", call_id="c0", tool="calculator", output="1",
               agent="Calc"),
        started(6, "ws_3"),  # not saved yet
        _event(rid, 7, type="message.delta", text="Found it", agent="Calc"),
    ]  # fmt: skip

    def flow(new_context) -> None:
        page, _sockets = _open_chat(new_context, world, thread, frames)
        expect(page.locator(".msg-pending .bubble")).to_have_text(["Found it"], timeout=LONG)
        expect(page.locator("details[data-pending]")).to_have_count(1)
        expect(page.locator("details[data-pending]")).to_have_attribute("data-call-id", "ws_3")
        expect(page.locator('details[data-call-id="ws_2"]')).to_have_count(1)

    run_in_browser(flow)


def test_a_reply_after_a_handoff_is_labelled_with_the_agent_that_speaks(unstarted, run_in_browser):
    world = make_world("Acme")
    thread, run = _thread_with_a_run(world, [])
    rid = str(run.pk)
    frames = [
        {"type": "hello", "thread_id": str(thread.pk), "active_run": rid},
        _event(rid, 1, type="run.status", status="running", message="", attempt=1),
        _event(rid, 2, type="message.completed", text="Let me get billing.", agent="Calc", seq=0),
        _event(rid, 3, type="handoff", from_agent="Calc", to_agent="Billing", seq=0),
        _event(rid, 4, type="message.delta", text="Billing here", agent="Billing"),
    ]

    def flow(new_context) -> None:
        page, _sockets = _open_chat(new_context, world, thread, frames)
        expect(page.locator(".msg-pending .bubble")).to_have_text(
            ["Let me get billing.", "Billing here"], timeout=LONG
        )
        # The conversation's own agent goes unlabelled; the one handed to is named.
        expect(page.locator(".msg-pending .msg-agent")).to_have_text(["Billing"])

    run_in_browser(flow)


def test_a_retry_notice_stops_counting_down_once_the_call_is_made_again(unstarted, run_in_browser):
    world = make_world("Acme")
    thread, run = _thread_with_a_run(world, [])
    rid = str(run.pk)
    stalled = "The model provider stopped answering (nothing for 20 s)."
    frames = [
        {"type": "hello", "thread_id": str(thread.pk), "active_run": rid},
        _event(rid, 1, type="run.status", status="running", message="", attempt=1),
        _event(rid, 2, type="model.retry", reason="timeout", retry=1, max_retries=3,
               message=f"{stalled} Trying again in 0.3 s.", wait_ms=300, discard=False,
               agent="Calc"),
    ]  # fmt: skip

    def flow(new_context) -> None:
        page, _sockets = _open_chat(new_context, world, thread, frames)
        notice = page.locator("#chat-status")
        expect(notice).to_have_text(f"{stalled} Trying again in 0.3 s.", timeout=LONG)
        # The wait is over: the call is being made again, however long it takes to answer.
        expect(notice).to_have_text(f"{stalled} Trying again\u2026", timeout=LONG)

    run_in_browser(flow)


def test_a_retried_reply_shows_its_question_once_when_it_ends(unstarted, run_in_browser):
    import json

    world = make_world("Acme")
    thread, run = _thread_with_a_run(world, [_message("First try")])
    rid = str(run.pk)
    frames = [
        {"type": "hello", "thread_id": str(thread.pk), "active_run": rid},
        _event(rid, 1, type="run.status", status="running", message="", attempt=1),
        _event(rid, 2, type="message.completed", text="First try", agent="Calc", seq=0),
        _event(rid, 3, type="run.status", status="running", message="", attempt=2),
        _event(rid, 4, type="message.delta", text="Second try", agent="Calc"),
    ]

    def retried() -> None:
        Item.objects.for_tenant(world.tenant).filter(run=run).delete()
        Item.objects.bulk_create(
            Item(tenant=world.tenant, thread=thread, run=run, data=d)
            for d in [{"role": "user", "content": "go"}, _message("Second try")]
        )
        Run.objects.for_tenant(world.tenant).filter(pk=run.pk).update(status=RunStatus.SUCCESS)

    def flow(new_context) -> None:
        page, sockets = _open_chat(new_context, world, thread, frames)
        expect(page.locator(".msg-pending .bubble")).to_have_text(["Second try"], timeout=LONG)
        expect(page.locator(".msg-user", has_text="go")).to_have_count(1)

        # The retry stored the question again, then its reply, and the run ended.
        off_the_loop(retried)
        sockets[-1].send(json.dumps(_event(
            rid, 5, type="run.status", status="success", message="", attempt=2
        )))  # fmt: skip

        expect(page.locator(".msg-assistant:not([data-pending])")).to_have_text(
            ["Second try"], timeout=LONG
        )
        expect(page.locator(".msg-user", has_text="go")).to_have_count(1)
        expect(page.locator("[data-pending]")).to_have_count(0)

    run_in_browser(flow)


def test_a_queued_reply_that_already_ran_never_takes_the_page_back(unstarted, run_in_browser):
    """A reply this page queued started normally (after the earlier one's end); a retry of it,
    read after a newer reply started, must not make it the page's reply again."""
    import uuid

    world = make_world("Acme")
    thread, run = _thread_with_a_run(world)
    first, queued, newest = str(run.pk), str(uuid.uuid4()), str(uuid.uuid4())
    frames = [
        {"type": "hello", "thread_id": str(thread.pk), "active_run": first},
        {"type": "run.created", "run_id": queued, "queued": True},
        _event(first, 1, type="run.status", status="success", message="", attempt=1),
        _event(queued, 1, type="run.status", status="running", message="", attempt=1),
        # "Stop this reply, then send": the newest reply starts; the queued one's retry, in
        # flight as it was interrupted, is read late.
        {"type": "run.started", "run_id": newest},
        _event(queued, 2, type="run.status", status="running", message="", attempt=2),
        _event(newest, 1, type="run.status", status="running", message="", attempt=1),
        _event(newest, 2, type="message.delta", text="Newest", agent="Calc"),
    ]

    def flow(new_context) -> None:
        page, _sockets = _open_chat(new_context, world, thread, frames)
        expect(page.locator(".msg-pending .bubble")).to_have_text(["Newest"], timeout=LONG)
        expect(page.locator("#chat")).to_have_attribute("data-active-run", newest)

    run_in_browser(flow)


def test_a_retry_read_after_a_stream_that_lost_its_start_starts_the_reply_over(
    unstarted, run_in_browser
):
    world = make_world("Acme")
    thread, run = _thread_with_a_run(world, _turns(1))
    rid = str(run.pk)
    frames = [
        {"type": "hello", "thread_id": str(thread.pk), "active_run": rid},
        # Attempt 1, its start trimmed away: what it shows is saved.
        _event(rid, 5, type="message.completed", text="step 0", agent="Calc", seq=0),
        _event(rid, 6, type="tool.started", call_id="c0", tool="calculator", arguments="{}",
               agent="Calc", seq=0),
        # Its worker died; the retry removed what attempt 1 saved and writes the reply again.
        _event(rid, 7, type="run.status", status="running", message="", attempt=2),
        _event(rid, 8, type="message.completed", text="step 0", agent="Calc", seq=0),
        _event(rid, 9, type="message.delta", text="more", agent="Calc"),
    ]  # fmt: skip

    def flow(new_context) -> None:
        page, _sockets = _open_chat(new_context, world, thread, frames)
        expect(page.locator(".msg-pending .bubble")).to_have_text(["step 0", "more"], timeout=LONG)
        expect(page.locator(".msg-assistant:not([data-pending])")).to_have_count(0)
        expect(page.locator(".msg-user", has_text="go")).to_have_count(1)

    run_in_browser(flow)


def test_a_reply_that_fails_after_its_question_was_shown_says_why_in_the_history(
    unstarted, run_in_browser
):
    import json

    world = make_world("Acme")
    thread, run = _thread_with_a_run(world, [])
    rid = str(run.pk)
    reason = "Could not connect to the model provider. It was tried 3 more times, without success."
    frames = [
        {"type": "hello", "thread_id": str(thread.pk), "active_run": rid},
        _event(rid, 1, type="run.status", status="running", message="", attempt=1),
    ]

    def failed() -> None:
        Run.objects.for_tenant(world.tenant).filter(pk=run.pk).update(
            status=RunStatus.ERROR, error=reason
        )

    def flow(new_context) -> None:
        page, sockets = _open_chat(new_context, world, thread, frames)
        expect(page.locator(".msg-user", has_text="go")).to_have_count(1, timeout=LONG)
        off_the_loop(failed)
        sockets[-1].send(json.dumps(_event(
            rid, 2, type="run.status", status="error", message=reason, attempt=1
        )))  # fmt: skip
        note = page.locator(".chat-run-error")
        # The question was on the page already: the history says why there was no reply.
        expect(note).to_have_text([f"No reply: {reason}"], timeout=LONG)
        assert page.evaluate(
            "() => document.querySelector('.chat-run-error')"
            ".previousElementSibling.textContent.includes('go')"
        )
        page.reload()
        expect(page.locator(".chat-run-error")).to_have_text([f"No reply: {reason}"])

    run_in_browser(flow)


def test_loading_earlier_messages_keeps_the_reader_in_place_and_the_keyboard_on_the_list(
    asgi_site, run_in_browser
):
    world = make_world("Acme")
    thread = _member_thread(world)
    Item.objects.bulk_create(
        Item(tenant=world.tenant, thread=thread, data={"role": "user", "content": f"Line {i:03}"})
        for i in range(120)
    )

    def flow(new_context) -> None:
        page = new_context().new_page()
        log_in(page, world.member.email)
        page.goto(f"/t/acme/chat/{thread.pk}/")
        log = page.locator("#chat-log")
        expect(page.locator(".msg-user").first).to_have_text("Line 070")
        log.evaluate("n => { n.scrollTop = 0; }")
        top = page.locator(".msg-user", has_text="Line 070")
        before = top.bounding_box()["y"]
        page.get_by_role("button", name="Load earlier messages").click()
        expect(page.locator(".msg-user").first).to_have_text("Line 020")
        # What was read stays where it was; the keyboard is on the next "Load earlier".
        assert abs(top.bounding_box()["y"] - before) < 5
        expect(page.get_by_role("button", name="Load earlier messages")).to_be_focused()
        page.keyboard.press("Enter")
        expect(page.locator(".msg-user").first).to_have_text("Line 000")
        expect(page.locator("#chat-log > :first-child")).to_be_focused()
        expect(page.get_by_role("button", name="Load earlier messages")).to_have_count(0)

    run_in_browser(flow)


def test_loading_earlier_messages_works_without_the_pages_script(asgi_site, run_in_browser):
    """The page's scripts blocked (or not loaded yet): "Load earlier messages" opens the
    conversation from the earlier page on, and again to its start."""
    world = make_world("Acme")
    thread = _member_thread(world)
    Item.objects.bulk_create(
        Item(tenant=world.tenant, thread=thread, data={"role": "user", "content": f"Line {i:03}"})
        for i in range(120)
    )

    def flow(new_context) -> None:
        page = new_context().new_page()
        log_in(page, world.member.email)
        page.route("**/*.js", lambda route: route.abort())
        page.goto(f"/t/acme/chat/{thread.pk}/")
        assert page.evaluate("() => !window.htmx")
        expect(page.locator(".msg-user").first).to_have_text("Line 070")
        page.get_by_role("button", name="Load earlier messages").click()
        expect(page).to_have_url(re.compile(r"\?before=\d+$"))
        expect(page.locator(".msg-user").first).to_have_text("Line 020")
        expect(page.locator(".msg-user").last).to_have_text("Line 119")
        page.get_by_role("button", name="Load earlier messages").click()
        expect(page.locator(".msg-user").first).to_have_text("Line 000")
        expect(page.locator(".msg-user")).to_have_count(120)
        expect(page.get_by_role("button", name="Load earlier messages")).to_have_count(0)

    run_in_browser(flow)


def test_a_reader_who_scrolled_back_stays_there_while_a_reply_is_written(asgi_site, run_in_browser):
    world = make_world("Acme")
    thread = _member_thread(world)
    Item.objects.bulk_create(
        Item(tenant=world.tenant, thread=thread, data={"role": "user", "content": f"Line {i:03}"})
        for i in range(40)
    )

    def flow(new_context) -> None:
        page = new_context().new_page()
        log_in(page, world.member.email)
        with page.expect_websocket(chat_socket) as opened:
            page.goto(f"/t/acme/chat/{thread.pk}/")
        opened.value.wait_for_event("framereceived")
        page.get_by_label("Message").fill(QUESTION)
        page.keyboard.press("Enter")
        # At the newest message, the list follows the reply as it is written.
        pending = page.locator(".msg-pending .bubble")
        expect(pending).not_to_be_empty(timeout=LONG)
        expect(pending).to_be_in_viewport()
        # The reader scrolls back to the start: the reply goes on and ends without moving them.
        log = page.locator("#chat-log")
        log.evaluate(
            "n => new Promise(done => {"
            " n.addEventListener('scroll', done, {once: true}); n.scrollTop = 0; })"
        )
        expect(page.locator(".msg-assistant[data-item-id]")).to_have_text(REPLY, timeout=LONG)
        expect(page.locator(".msg-user", has_text="Line 000")).to_be_in_viewport()
        assert log.evaluate("n => n.scrollTop") == 0
        # Sending a message brings them back to the newest.
        page.get_by_label("Message").fill("Thanks")
        page.keyboard.press("Enter")
        expect(page.locator(".msg-user", has_text="Thanks")).to_be_in_viewport()

    run_in_browser(flow)


def _an_agent_whose_provider_is_refused():
    """A member's conversation with an agent whose provider's address the egress guard refuses
    (a setup problem: its runs fail at once), and what fixes it (the built-in offline model)."""
    world = make_world("Acme")
    provider = agent_services.provider_create(
        tenant=world.tenant,
        actor=world.actor(),
        name="Unreachable",
        base_url="http://127.0.0.1:9/v1",  # a private address: the egress guard refuses it
        default_model="m",
        api_key="sk-unused",
    )
    agent = agent_services.agent_create(
        tenant=world.tenant,
        actor=world.actor(),
        name="Calc",
        config={"tools": [{"name": "calculator"}], "provider_id": str(provider.pk)},
    )
    agent_services.agent_publish(tenant=world.tenant, actor=world.actor(), agent_id=agent.pk)
    end_user = services.end_user_for_member(tenant=world.tenant, user=world.member)
    thread = services.thread_create(tenant=world.tenant, end_user=end_user, agent_id=agent.pk)

    def fix_the_agent() -> None:
        agent_services.draft_save(
            tenant=world.tenant,
            actor=world.actor(),
            agent_id=agent.pk,
            config={"tools": [{"name": "calculator"}]},
        )
        agent_services.agent_publish(tenant=world.tenant, actor=world.actor(), agent_id=agent.pk)

    return world, thread, fix_the_agent


def test_try_again_after_a_reply_failed_answers_the_same_question_once(asgi_site, run_in_browser):
    """The agent's provider is refused (a setup problem): the chat says there was no reply and
    offers "Try again". Once the agent is fixed, trying again answers the same question, which
    shows once, with no trace of the failed reply, also after a reload."""
    world, thread, fix_the_agent = _an_agent_whose_provider_is_refused()

    def flow(new_context) -> None:
        page = new_context().new_page()
        log_in(page, world.member.email)
        with page.expect_websocket(chat_socket) as opened:
            page.goto(f"/t/acme/chat/{thread.pk}/")
        opened.value.wait_for_event("framereceived")
        page.get_by_label("Message").fill(QUESTION)
        page.get_by_role("button", name="Send").click()
        expect(page.locator(".chat-run-error")).to_contain_text("No reply:", timeout=LONG)
        again = page.get_by_role("button", name="Try again")
        expect(again).to_have_count(1)
        off_the_loop(fix_the_agent)
        again.click()
        expect(page.locator(".msg-assistant:not([data-pending])")).to_have_text(
            [re.compile(re.escape(REPLY))], timeout=LONG
        )
        expect(page.locator(".chat-run-error")).to_have_count(0)
        expect(page.get_by_role("button", name="Try again")).to_have_count(0)
        expect(page.locator(".msg-user", has_text=QUESTION)).to_have_count(1)
        page.reload()
        expect(page.locator(".msg-assistant")).to_have_text([re.compile(re.escape(REPLY))])
        expect(page.locator(".msg-user", has_text=QUESTION)).to_have_count(1)
        expect(page.locator(".chat-run-error")).to_have_count(0)

    run_in_browser(flow)


def test_try_again_in_one_tab_takes_the_failed_reply_out_of_another_tab(asgi_site, run_in_browser):
    """The conversation is open in two browsers; its reply failed in both. "Try again" in the
    first: the second follows the new reply and ends as the first does, the question once and
    no note of the failed reply (as a reload shows it)."""
    world, thread, fix_the_agent = _an_agent_whose_provider_is_refused()

    def open_chat(new_context) -> Page:
        page = new_context().new_page()
        log_in(page, world.member.email)
        with page.expect_websocket(chat_socket) as opened:
            page.goto(f"/t/acme/chat/{thread.pk}/")
        opened.value.wait_for_event("framereceived")
        return page

    def flow(new_context) -> None:
        page, other = open_chat(new_context), open_chat(new_context)
        page.get_by_label("Message").fill(QUESTION)
        page.get_by_role("button", name="Send").click()
        for tab in (page, other):
            expect(tab.locator(".chat-run-error")).to_contain_text("No reply:", timeout=LONG)
            expect(tab.get_by_role("button", name="Try again")).to_have_count(1)
        off_the_loop(fix_the_agent)
        page.get_by_role("button", name="Try again").click()
        for tab in (page, other):
            expect(tab.locator(".msg-assistant:not([data-pending])")).to_have_text(
                [re.compile(re.escape(REPLY))], timeout=LONG
            )
            expect(tab.locator("[data-pending]")).to_have_count(0, timeout=LONG)
            expect(tab.locator(".msg-user", has_text=QUESTION)).to_have_count(1)
            expect(tab.locator(".chat-run-error")).to_have_count(0)
            expect(tab.get_by_role("button", name="Try again")).to_have_count(0)

    run_in_browser(flow)


def test_a_refused_try_again_leaves_the_failed_reply_as_it_was(unstarted, run_in_browser):
    """ "Try again" refused (here by the rate limit): the failed reply is back as it was, its
    question first, and the keyboard is in the message box, where it went on the click (the
    button it was on was hidden)."""
    import json

    world = make_world("Acme")
    thread, run = _thread_with_a_run(world, [_message("Half an ans")])
    Run.objects.for_tenant(world.tenant).filter(pk=run.pk).update(
        status=RunStatus.ERROR, error="The model provider failed (HTTP 500)."
    )
    sent: list[dict] = []
    refusal = {
        "type": "error",
        "code": "rate_limited",
        "message": "Your message was not sent: you can send 1 message per minute. "
        "You can send it again in 30 seconds.",
        "retry_after": 30,
        "limit": 1,
        "window": 60,
    }

    def connected(ws) -> None:
        def heard(message) -> None:
            sent.append(json.loads(message))
            ws.send(json.dumps(refusal))

        ws.on_message(heard)
        ws.send(json.dumps({"type": "hello", "thread_id": str(thread.pk), "active_run": None}))

    def flow(new_context) -> None:
        page = new_context().new_page()
        log_in(page, world.member.email)
        expect(page).to_have_url(re.compile(r"/t/acme/$"))
        page.route_web_socket(re.compile(r"/ws/t/"), connected)
        page.goto(f"/t/acme/chat/{thread.pk}/")
        shown = page.locator("#chat-log > :not([hidden])")
        before = shown.all_inner_texts()
        assert [t.strip() for t in before] == [
            "go",
            "Half an ans",
            "No reply: The model provider failed (HTTP 500).",
            "Try again",
        ], before
        page.get_by_role("button", name="Try again").click()
        expect(page.locator("#chat-status")).to_contain_text("Your message was not sent")
        assert sent == [{"type": "retry", "run_id": str(run.pk)}]
        expect(page.get_by_role("button", name="Try again")).to_be_visible()
        # Like Send, it waits for the window the refusal named.
        expect(page.get_by_role("button", name="Try again")).to_be_disabled()
        expect(page.get_by_role("button", name="Send")).to_be_disabled()
        assert shown.all_inner_texts() == before
        expect(page.locator("[data-pending]")).to_have_count(0)
        expect(page.get_by_label("Message")).to_be_focused()

    run_in_browser(flow)


def test_a_chat_back_from_a_lost_connection_shows_an_exchange_that_happened_meanwhile(
    asgi_site, run_in_browser
):
    """The page's socket drops while no reply is being written; meanwhile another tab asks and
    gets its answer, start to end. When the socket is back (still no reply being written),
    the page shows that exchange, as a reload would."""
    world = make_world("Acme")
    thread = _member_thread(world)
    hello = {"type": "hello", "thread_id": str(thread.pk), "active_run": None}

    def answered_elsewhere() -> None:
        run = services.run_create(
            tenant=world.tenant, end_user=thread.end_user, thread_id=thread.pk, input="asked"
        )
        Run.objects.for_tenant(world.tenant).filter(pk=run.pk).update(status=RunStatus.SUCCESS)
        Item.objects.bulk_create(
            Item(tenant=world.tenant, thread=thread, run=run, data=d)
            for d in [{"role": "user", "content": "asked"}, _message("answered elsewhere")]
        )

    def flow(new_context) -> None:
        page, sockets = _open_chat(new_context, world, thread, [hello])
        expect(page.get_by_role("button", name="Send")).to_be_enabled(timeout=LONG)
        off_the_loop(answered_elsewhere)
        sockets[-1].close()
        expect(page.locator(".msg-assistant")).to_have_text(["answered elsewhere"], timeout=LONG)
        expect(page.locator(".msg-user", has_text="asked")).to_have_count(1)

    run_in_browser(flow)

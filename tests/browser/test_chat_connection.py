"""The chat in a real browser while its socket is down: nothing the member types or asks for is
dropped without a word. The page says it is not connected and reconnecting, Send, Try again and
Stop wait for the connection, the typed text stays in the message box; once the socket is back
the status goes and sending works again."""

from __future__ import annotations

import json
import re
import time

import pytest
from playwright.sync_api import Page, expect

from conversations import services
from conversations.models import Item, MultitaskStrategy, Run, RunStatus
from tests.browser.test_chat import (  # noqa: F401 (fixtures)
    LONG,
    QUESTION,
    _an_agent_whose_provider_is_refused,
    _event,
    _member_thread,
    _open_chat,
    _thread_with_a_run,
    asgi_site,
    chat_socket,
    off_the_loop,
    site,
    unstarted,
)
from tests.browser.test_dashboard import log_in
from tests.conftest import make_world

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

TYPED = "And what is 13 * 13?"
ANSWER = "[built-in offline model] The calculator tool returned: 169."
RECONNECTING = re.compile(r"(Not connected|Connection lost); reconnecting")


class Link:
    """The page's chat socket, through the real server, with a switch: while `down`, every
    connection the page opens fails before it opens (as with the server out of reach), and
    `drop()` cuts the open one. `cut` drops the connection when the page sends a message:
    "before" it reaches the server, or "after" (before the server's answer reaches the page).
    While `deaf`, the server's frames do not reach the page (a network that stalls)."""

    def __init__(self, page: Page) -> None:
        self.down = False
        self.deaf = False
        self.cut: str | None = None
        self.sockets: list = []
        page.route_web_socket(re.compile(r"/ws/t/"), self._connected)

    def _connected(self, ws) -> None:
        if self.down:
            ws.close()
            return
        server = ws.connect_to_server()
        self.sockets.append(ws)

        def told(message) -> None:
            if not self.deaf:
                ws.send(message)

        server.on_message(told)

        def heard(message) -> None:
            sending = json.loads(message).get("type") == "send"
            if sending and self.cut == "before":
                self.drop()
                return
            server.send(message)
            if sending and self.cut == "after":
                self.drop()

        ws.on_message(heard)

    def drop(self) -> None:
        self.down = True
        self.sockets[-1].close()


def _inputs(world) -> list[str]:
    """What the tenant's runs were asked, oldest first."""
    runs = Run.objects.for_tenant(world.tenant).order_by("created_at")
    return [r.input[0]["content"] for r in runs]


def _open(new_context, world, thread) -> tuple[Page, Link]:
    page = new_context().new_page()
    log_in(page, world.member.email)
    expect(page).to_have_url(re.compile(r"/t/acme/$"))
    link = Link(page)
    with page.expect_websocket(chat_socket) as opened:
        page.goto(f"/t/acme/chat/{thread.pk}/")
    opened.value.wait_for_event("framereceived")  # the server's hello: the socket is up
    return page, link


@pytest.mark.usefixtures("asgi_site")
def test_while_the_socket_is_down_send_and_try_again_wait_and_say_why(run_in_browser):
    world, thread, fix_the_agent = _an_agent_whose_provider_is_refused()

    def runs() -> list[tuple[str, str]]:
        return [
            (r.status, r.input[0]["content"] if r.input else "")
            for r in Run.objects.for_tenant(world.tenant).order_by("created_at")
        ]

    def flow(new_context) -> None:
        page, link = _open(new_context, world, thread)
        page.get_by_label("Message").fill(QUESTION)
        page.get_by_role("button", name="Send").click()
        expect(page.locator(".chat-run-error")).to_contain_text("No reply:", timeout=LONG)
        send = page.get_by_role("button", name="Send")
        again = page.get_by_role("button", name="Try again")
        expect(again).to_be_enabled()

        link.drop()
        status = page.get_by_role("status")
        expect(status).to_have_text(RECONNECTING, timeout=LONG)
        # Neither can send while the connection is down: the reason is what the status says.
        expect(send).to_be_disabled()
        expect(again).to_be_disabled()
        box = page.get_by_label("Message")
        box.fill(TYPED)
        box.press("Enter")
        send.click(force=True)
        again.click(force=True)
        expect(box).to_have_value(TYPED)
        expect(page.locator(".msg-user")).to_have_text([QUESTION])
        expect(page.locator(".chat-run-error")).to_be_visible()
        expect(status).to_have_text(RECONNECTING)
        assert off_the_loop(runs) == [(RunStatus.ERROR, QUESTION)], "nothing was sent"

        off_the_loop(fix_the_agent)
        link.down = False  # the page's next attempt connects
        expect(status).to_be_hidden(timeout=3 * LONG)
        expect(send).to_be_enabled()
        expect(again).to_be_enabled()
        expect(box).to_have_value(TYPED)
        send.click()
        expect(page.locator(".msg-assistant:not([data-pending])")).to_have_text(
            [ANSWER], timeout=LONG
        )
        expect(page.locator(".msg-user")).to_have_text([QUESTION, TYPED])
        expect(box).to_have_value("")

    run_in_browser(flow)

    assert runs() == [(RunStatus.ERROR, QUESTION), (RunStatus.SUCCESS, TYPED)]


@pytest.mark.usefixtures("asgi_site")
@pytest.mark.parametrize("cut", ["before", "after"])
def test_a_message_whose_answer_the_lost_connection_took_is_neither_lost_nor_sent_twice(
    cut, run_in_browser
):
    """The connection drops as a message is sent, before the server's answer: "before" the
    server got it, or "after". Until the connection is back, the text is in the message box again
    and the page says it may not have been sent. Then the history tells: a message the server
    did not get stays in the box, said so, and is sent with Send; one it got is shown once in the
    conversation, answered, and leaves the box."""
    world = make_world("Acme")
    thread = _member_thread(world)

    def inputs() -> list[str]:
        return _inputs(world)

    def flow(new_context) -> None:
        page, link = _open(new_context, world, thread)
        box = page.get_by_label("Message")
        send = page.get_by_role("button", name="Send")
        status = page.get_by_role("status")
        link.cut = cut
        box.fill(TYPED)
        send.click()
        expect(box).to_have_value(TYPED, timeout=LONG)
        expect(page.locator(".msg-user")).to_have_count(0)
        expect(status).to_have_text(
            re.compile(r"^Not connected; reconnecting.*may not have reached")
        )
        expect(send).to_be_disabled()

        link.cut, link.down = None, False
        if cut == "before":
            expect(status).to_have_text(re.compile(r"^Your message was not sent"), timeout=3 * LONG)
            expect(box).to_have_value(TYPED)
            expect(page.locator(".msg-user")).to_have_count(0)
            assert off_the_loop(inputs) == []
            send.click()
        expect(page.locator(".msg-assistant:not([data-pending])")).to_have_text(
            [ANSWER], timeout=3 * LONG
        )
        expect(page.locator(".msg-user")).to_have_text([TYPED])
        expect(box).to_have_value("")

    run_in_browser(flow)

    assert inputs() == [TYPED]
    assert Item.objects.for_tenant(world.tenant).filter(data__content=TYPED).count() == 1


@pytest.mark.usefixtures("asgi_site")
def test_a_message_the_server_got_is_not_offered_again_while_an_earlier_reload_is_slow(
    run_in_browser,
):
    """The connection drops as a message is sent, after the server got it, while the page is
    still reading the history after an earlier lost connection (a slow network). Once the
    socket is back, the page does not say the message was not sent, nor leave it in the box to
    be sent twice: once the history comes, the message is in the conversation, answered."""
    world = make_world("Acme")
    thread = _member_thread(world)

    def inputs() -> list[str]:
        return _inputs(world)

    def flow(new_context) -> None:
        page, link = _open(new_context, world, thread)
        box = page.get_by_label("Message")
        status = page.get_by_role("status")
        held: list | None = []

        def slow(route) -> None:
            if held is None:
                route.continue_()
            else:
                held.append(route)

        page.route(re.compile(r"/chat/[^/]+/items/"), slow)
        link.drop()  # back without a message in doubt: the page reads what it missed
        expect(status).to_have_text(RECONNECTING, timeout=LONG)
        with page.expect_request(re.compile(r"/chat/[^/]+/items/"), timeout=3 * LONG):
            link.down = False  # the history it asks for is held, not answered

        link.cut = "after"
        box.fill(TYPED)
        page.get_by_role("button", name="Send").click()
        expect(status).to_have_text(re.compile(r"may not have reached"), timeout=LONG)
        link.cut, link.down = None, False
        expect(status).not_to_have_text(re.compile(r"may not have reached"), timeout=3 * LONG)

        waited, held = held, None  # the network is back
        for route in waited:
            route.continue_()
        expect(page.locator(".msg-assistant:not([data-pending])")).to_have_text(
            [ANSWER], timeout=3 * LONG
        )
        expect(page.locator(".msg-user")).to_have_text([TYPED])
        expect(box).to_have_value("")
        expect(page.locator("#chat-status")).not_to_contain_text("not sent")

    run_in_browser(flow)

    assert inputs() == [TYPED]


@pytest.mark.usefixtures("asgi_site")
def test_a_message_in_doubt_is_not_called_unsent_when_the_history_cannot_be_read(
    run_in_browser,
):
    """The connection drops as a message is sent, after the server got it; once the socket is
    back, the history answers with an error. The page does not say the message was not sent (it
    was: sending it again would store it twice): it says it could not check, and the text
    stays in the box, with Send usable."""
    world = make_world("Acme")
    thread = _member_thread(world)

    def flow(new_context) -> None:
        page, link = _open(new_context, world, thread)
        box = page.get_by_label("Message")
        status = page.get_by_role("status")
        page.route(
            re.compile(r"/chat/[^/]+/items/"),
            lambda route: route.fulfill(status=500, body="Server Error"),
        )
        link.cut = "after"
        box.fill(TYPED)
        page.get_by_role("button", name="Send").click()
        expect(status).to_have_text(re.compile(r"may not have reached"), timeout=LONG)
        link.cut, link.down = None, False
        expect(status).to_have_text(re.compile(r"could not be read to check"), timeout=3 * LONG)
        expect(status).not_to_have_text(re.compile(r"was not sent"))
        expect(box).to_have_value(TYPED)
        expect(page.get_by_role("button", name="Send")).to_be_enabled()

    run_in_browser(flow)

    assert Item.objects.for_tenant(world.tenant).filter(data__content=TYPED).count() == 1


@pytest.mark.usefixtures("asgi_site")
def test_two_messages_in_doubt_go_back_in_order_and_the_stored_one_leaves_the_box(
    run_in_browser,
):
    """Two messages are sent while the server's answers are held up, then the connection drops:
    both go back to the box, in the order they were sent. Once the history is read again, the
    one the server stored leaves the box (the other, refused as the first reply was being
    written, stays), however the box holds them."""
    world = make_world("Acme")
    thread = _member_thread(world)
    second = "And what is 2 + 3?"

    def flow(new_context) -> None:
        page, link = _open(new_context, world, thread)
        box = page.get_by_label("Message")
        send = page.get_by_role("button", name="Send", exact=True)
        status = page.get_by_role("status")
        link.deaf = True
        box.fill(TYPED)
        send.click()
        box.fill(second)
        send.click()
        expect(page.locator(".msg-user[data-pending]")).to_have_count(2)
        link.drop()
        expect(status).to_have_text(re.compile(r"may not have reached"), timeout=LONG)
        expect(box).to_have_value(f"{TYPED}\n{second}")

        link.deaf, link.down = False, False
        expect(status).to_have_text(re.compile(r"^Your message was not sent"), timeout=3 * LONG)
        expect(box).to_have_value(second)
        expect(page.locator(".msg-user .bubble")).to_have_text([TYPED])

    run_in_browser(flow)

    assert _inputs(world) == [TYPED]


def _waiting_in_line(world, thread, *texts):
    """A reply being written on `thread` (no worker takes it) and `texts` waiting in line."""
    services.run_create(
        tenant=world.tenant, end_user=thread.end_user, thread_id=thread.pk, input="go"
    )
    for text in texts:
        services.run_create(
            tenant=world.tenant, end_user=thread.end_user, thread_id=thread.pk, input=text,
            strategy=MultitaskStrategy.ENQUEUE,
        )  # fmt: skip


def _queue_in_doubt(page: Page, link: Link, text: str, cut: str) -> None:
    """`text` sent with "Send after this reply", the connection cut `cut` it reached the
    server."""
    page.get_by_label("While a reply is being written").select_option(label="Send after this reply")
    link.cut = cut
    page.get_by_label("Message").fill(text)
    page.get_by_role("button", name="Send", exact=True).click()
    expect(page.get_by_role("status")).to_have_text(
        re.compile(r"may not have reached"), timeout=LONG
    )


@pytest.mark.usefixtures("unstarted")
def test_an_identical_message_waiting_from_before_is_not_taken_for_the_one_in_doubt(
    run_in_browser,
):
    """The same words already wait in line, sent earlier. A new copy is lost with the connection
    before the server got it: once back, the page does not take the earlier one for it, and
    the text stays in the box, said not sent."""
    world = make_world("Acme")
    thread = _member_thread(world)
    off_the_loop(lambda: _waiting_in_line(world, thread, TYPED))

    def flow(new_context) -> None:
        page, link = _open(new_context, world, thread)
        _queue_in_doubt(page, link, TYPED, "before")
        link.cut, link.down = None, False
        expect(page.get_by_role("status")).to_have_text(
            re.compile(r"^Your message was not sent"), timeout=3 * LONG
        )
        expect(page.get_by_label("Message")).to_have_value(TYPED)
        expect(page.locator(".msg-waiting", has_text=TYPED)).to_have_count(1)

    run_in_browser(flow)

    assert _inputs(world) == ["go", TYPED]


@pytest.mark.usefixtures("unstarted")
def test_a_message_in_doubt_stopped_in_line_meanwhile_is_known_as_stored(run_in_browser):
    """The message reached the server, which queued it, and was stopped in line (from the run
    inspector) while the connection was down: the history shows it, stopped, and it leaves the
    box: sending it again would store it twice."""
    world = make_world("Acme")
    thread = _member_thread(world)
    off_the_loop(lambda: _waiting_in_line(world, thread))

    def stop_it() -> None:
        # The server got the message as the connection dropped: wait for it to be stored (a
        # bound on a failure, not a timing).
        for _ in range(300):
            queued = Run.objects.for_tenant(world.tenant).filter(queued=True).first()
            if queued is not None:
                break
            time.sleep(0.05)
        assert queued is not None, "the server never stored the message"
        services.run_stop(tenant=world.tenant, actor=world.actor(), run_id=queued.pk)

    def flow(new_context) -> None:
        page, link = _open(new_context, world, thread)
        _queue_in_doubt(page, link, TYPED, "after")
        off_the_loop(stop_it)
        link.cut, link.down = None, False
        stopped = page.locator(".msg-user.msg-waiting", has_text=TYPED)
        expect(stopped).to_contain_text("Stopped by an administrator.", timeout=3 * LONG)
        expect(page.get_by_label("Message")).to_have_value("")
        expect(page.locator("#chat-status")).not_to_contain_text("not sent")

    run_in_browser(flow)

    assert _inputs(world) == ["go", TYPED]


@pytest.mark.usefixtures("unstarted")
def test_a_history_that_cannot_be_read_again_leaves_the_page_as_it_was(run_in_browser):
    """A reply ends and the history, read again for what it saved, answers with an error: the
    page keeps what it showed (the question and the reply as it streamed), not an empty log."""
    world = make_world("Acme")
    thread, run = off_the_loop(lambda: _thread_with_a_run(world))
    run_id = str(run.pk)
    frames = [
        {"type": "hello", "thread_id": str(thread.pk), "active_run": run_id},
        _event(run_id, 1, type="run.status", status="running", message="", attempt=1),
        _event(run_id, 2, type="message.delta", text="Partly written", agent="Calc"),
    ]

    def flow(new_context) -> None:
        page, sockets = _open_chat(new_context, world, thread, frames)
        expect(page.locator(".msg-pending .bubble")).to_have_text(["Partly written"], timeout=LONG)
        page.route(
            re.compile(r"/chat/[^/]+/items/"),
            lambda route: route.fulfill(status=500, body="Server Error"),
        )
        with page.expect_response(re.compile(r"/chat/[^/]+/items/")):
            sockets[-1].send(
                json.dumps({"type": "run.ended", "run_id": run_id, "status": "success"})
            )
        expect(page.get_by_role("button", name="Stop")).to_be_hidden()
        expect(page.locator(".msg-user .bubble")).to_have_text(["go"])
        expect(page.locator(".msg-assistant .bubble")).to_have_text(["Partly written"])

    run_in_browser(flow)

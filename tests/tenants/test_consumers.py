"""The tenant's live-event websocket `/ws/t/<slug>/events/`, driven through the whole ASGI stack.

Every connection goes through `controlplane.asgi.application` (origin check, session auth, URL
routing) with a real session cookie, and revocation travels over the real Redis channel layer.
The database is transactional because services notify open sockets in `transaction.on_commit`.
Nothing here sleeps: each wait is a `receive_output` with a timeout that only bounds a failure.
"""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.security.websocket import OriginValidator
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.test import Client

from controlplane.asgi import application
from tenants import services
from tenants.consumers import CLOSE_NOT_FOUND, CLOSE_REVOKED, CLOSE_UNAUTHENTICATED
from tenants.models import Membership, Role
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db(transaction=True)

# Upper bound for a message that should arrive; a passing test never waits this long.
WAIT = 5


@pytest.fixture(autouse=True)
def _websocket_hosts(settings):
    # The origin check reads ALLOWED_HOSTS on every connection. Asserting its type also fails
    # this file if the websocket stack loses its origin check.
    settings.ALLOWED_HOSTS = ["localhost", "testserver"]
    assert isinstance(application.application_mapping["websocket"], OriginValidator)


@pytest.fixture(autouse=True)
async def _drop_channel_layer(_isolated_redis):
    # Runs inside the per-test Redis prefix: afterwards delete this test's keys and close the
    # pools on this test's event loop, so no connection outlives its loop.
    yield
    layer = get_channel_layer()
    if layer is not None:
        await layer.flush()


def _logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _session_of(client: Client) -> str:
    return client.cookies[django_settings.SESSION_COOKIE_NAME].value


async def _session_for(user) -> tuple[Client, str]:
    client = await database_sync_to_async(_logged_in)(user)
    return client, _session_of(client)


def _socket(
    slug: str, session: str | None = None, origin: bytes | None = b"http://localhost"
) -> WebsocketCommunicator:
    headers = [(b"host", b"localhost")]
    if origin is not None:
        headers.append((b"origin", origin))
    if session is not None:
        headers.append((b"cookie", f"{django_settings.SESSION_COOKIE_NAME}={session}".encode()))
    return WebsocketCommunicator(application, f"/ws/t/{slug}/events/", headers=headers)


async def _open(slug: str, session: str) -> tuple[WebsocketCommunicator, dict]:
    """An accepted socket and its hello message."""
    socket = _socket(slug, session)
    connected, code = await socket.connect(timeout=WAIT)
    if not connected:
        await socket.disconnect()
        pytest.fail(f"the socket to {slug} was refused with code {code}")
    hello = await socket.receive_json_from(timeout=WAIT)
    return socket, hello


async def _refusal(socket: WebsocketCommunicator) -> dict:
    """The whole message the application answers a connect with (it must be a close)."""
    await socket.send_input({"type": "websocket.connect"})
    message = await socket.receive_output(timeout=WAIT)
    assert message["type"] == "websocket.close", f"expected a refusal, got {message}"
    return message


async def _assert_closed_after_revoke(socket: WebsocketCommunicator, reason: str) -> None:
    assert await socket.receive_json_from(timeout=WAIT) == {"type": "revoked", "reason": reason}
    closing = await socket.receive_output(timeout=WAIT)
    assert closing == {"type": "websocket.close", "code": CLOSE_REVOKED}


async def _assert_still_open(socket: WebsocketCommunicator) -> None:
    await socket.send_json_to({"type": "ping"})
    assert await socket.receive_json_from(timeout=WAIT) == {"type": "pong"}


def _remove_member(world, membership: Membership) -> None:
    services.membership_remove(
        tenant=world.tenant, actor=world.actor(world.owner), membership_id=membership.pk
    )


# --- 1. A member is let in and greeted ----------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "role"), [("owner", Role.OWNER), ("admin", Role.ADMIN), ("member", Role.MEMBER)]
)
async def test_a_member_is_accepted_and_greeted_with_tenant_and_role(world_a, world_b, who, role):
    _client, session = await _session_for(getattr(world_a, who))
    socket, hello = await _open(world_a.tenant.slug, session)
    try:
        assert hello == {"type": "hello", "tenant": "acme", "role": role}
        await _assert_still_open(socket)
    finally:
        await socket.disconnect()


# --- 2. Refusals before accept ------------------------------------------------------------------


async def test_an_anonymous_connection_is_refused_before_accept(world_a):
    socket = _socket(world_a.tenant.slug, session=None)
    try:
        assert await _refusal(socket) == {"type": "websocket.close", "code": CLOSE_UNAUTHENTICATED}
        assert await socket.receive_nothing()
    finally:
        await socket.disconnect()


async def test_a_session_cookie_that_names_no_session_is_anonymous(world_a):
    socket = _socket(world_a.tenant.slug, session="not-a-session-key")
    try:
        assert await _refusal(socket) == {"type": "websocket.close", "code": CLOSE_UNAUTHENTICATED}
    finally:
        await socket.disconnect()


async def test_another_tenants_slug_is_refused_exactly_like_an_unknown_one(world_a, world_b):
    _client, b_session = await _session_for(world_b.owner)

    foreign = _socket(world_a.tenant.slug, b_session)
    unknown = _socket("no-such-tenant", b_session)
    try:
        refused_foreign = await _refusal(foreign)
        refused_unknown = await _refusal(unknown)
        # Same message, same code, nothing else sent: the slug is not an oracle.
        assert refused_foreign == {"type": "websocket.close", "code": CLOSE_NOT_FOUND}
        assert refused_unknown == refused_foreign
        assert await foreign.receive_nothing()
        assert await unknown.receive_nothing()
    finally:
        await foreign.disconnect()
        await unknown.disconnect()

    # The same session is let into its own tenant, so the refusal above was about the tenant.
    own, hello = await _open(world_b.tenant.slug, b_session)
    try:
        assert hello == {"type": "hello", "tenant": "globex", "role": Role.OWNER}
    finally:
        await own.disconnect()


# --- 3. Origin check ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [b"http://evil.example", b"http://localhost.evil.example", None],
    ids=["foreign-origin", "lookalike-origin", "no-origin"],
)
async def test_a_bad_origin_is_refused_before_accept_even_with_a_valid_session(world_a, origin):
    _client, session = await _session_for(world_a.member)
    socket = _socket(world_a.tenant.slug, session, origin=origin)
    try:
        refused = await _refusal(socket)
        # AllowedHostsOriginValidator denies with a plain close, before the consumer runs (so
        # none of the consumer's 44xx codes and no hello).
        assert refused.get("code", 1000) == 1000
        assert await socket.receive_nothing()
    finally:
        await socket.disconnect()


# --- 4 and 6. Removing a member -----------------------------------------------------------------


async def test_removing_a_member_closes_their_open_socket_with_4403(world_a):
    _client, session = await _session_for(world_a.member)
    socket, hello = await _open(world_a.tenant.slug, session)
    try:
        assert hello["role"] == Role.MEMBER
        await database_sync_to_async(_remove_member)(world_a, world_a.member_membership)
        await _assert_closed_after_revoke(socket, "membership removed")
    finally:
        await socket.disconnect()

    # And the same session cannot come back in: now it is refused like any other outsider.
    again = _socket(world_a.tenant.slug, session)
    try:
        assert await _refusal(again) == {"type": "websocket.close", "code": CLOSE_NOT_FOUND}
    finally:
        await again.disconnect()


async def test_a_revoked_socket_is_sent_nothing_after_its_close(world_a):
    _client, session = await _session_for(world_a.member)
    socket, _ = await _open(world_a.tenant.slug, session)
    try:
        await database_sync_to_async(_remove_member)(world_a, world_a.member_membership)
        await _assert_closed_after_revoke(socket, "membership removed")
        # Both notifications were queued before the service returned, so a wrongly delivered
        # event is already waiting; the timeout only bounds the passing case.
        assert await socket.receive_nothing(timeout=1)
    finally:
        await socket.disconnect()


async def test_removing_one_member_leaves_other_members_sockets_open(world_a, world_b):
    _c1, member_session = await _session_for(world_a.member)
    _c2, admin_session = await _session_for(world_a.admin)
    _c3, b_session = await _session_for(world_b.member)
    removed, _ = await _open(world_a.tenant.slug, member_session)
    staying, _ = await _open(world_a.tenant.slug, admin_session)
    elsewhere, _ = await _open(world_b.tenant.slug, b_session)
    try:
        await database_sync_to_async(_remove_member)(world_a, world_a.member_membership)
        await _assert_closed_after_revoke(removed, "membership removed")

        # The admin's socket gets the members wake-up, which the service publishes after the
        # revocation: had a revoke reached this socket, it would have come first.
        assert await staying.receive_json_from(timeout=WAIT) == {
            "type": "event",
            "event": {"kind": "members"},
        }
        await _assert_still_open(staying)
        # The other tenant hears nothing of it and stays open too.
        await _assert_still_open(elsewhere)
        assert await elsewhere.receive_nothing()
    finally:
        for socket in (removed, staying, elsewhere):
            await socket.disconnect()


# --- 5. Logging out -----------------------------------------------------------------------------


async def test_logging_out_closes_every_socket_of_that_user(world_a, world_b):
    # The member of Acme also belongs to Globex, so one session holds sockets in two tenants.
    await database_sync_to_async(Membership.objects.create)(
        tenant=world_b.tenant, user=world_a.member, role=Role.MEMBER
    )
    client, session = await _session_for(world_a.member)
    _owner_client, owner_session = await _session_for(world_a.owner)
    in_a, _ = await _open(world_a.tenant.slug, session)
    in_b, _ = await _open(world_b.tenant.slug, session)
    owner_socket, _ = await _open(world_a.tenant.slug, owner_session)
    try:
        response = await database_sync_to_async(client.post)("/logout/")
        assert response.status_code == 302

        await _assert_closed_after_revoke(in_a, "logged out")
        await _assert_closed_after_revoke(in_b, "logged out")
        # Someone else's socket in the same tenant is untouched.
        await _assert_still_open(owner_socket)
    finally:
        for socket in (in_a, in_b, owner_socket):
            await socket.disconnect()

    # The logged-out session no longer authenticates a new socket.
    again = _socket(world_a.tenant.slug, session)
    try:
        assert await _refusal(again) == {"type": "websocket.close", "code": CLOSE_UNAUTHENTICATED}
    finally:
        await again.disconnect()


async def test_changing_the_password_closes_the_users_other_sockets(world_a):
    client, _session = await _session_for(world_a.member)
    _other_client, other_session = await _session_for(world_a.member)  # another browser
    socket, _ = await _open(world_a.tenant.slug, other_session)
    try:
        new = "a-fresh-passphrase-81"
        response = await database_sync_to_async(client.post)(
            "/password/change/",
            {"old_password": PASSWORD, "new_password1": new, "new_password2": new},
        )
        assert response.status_code == 302
        await _assert_closed_after_revoke(socket, "password changed")
    finally:
        await socket.disconnect()

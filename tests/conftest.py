"""The default fixture world: two tenants, each with an owner, an admin and a member, and API keys.

Every test runs against the real PostgreSQL and Redis of `make test` (the URLs given, or the
embedded servers). Cache and channel-layer keys get a fresh prefix per test instead of a flush,
so a shared Redis is never wiped.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psycopg
import pytest
from axes.handlers.proxy import AxesProxyHandler
from django.db import connections
from django.test import Client

from tenants import services
from tenants.actors import Actor
from tenants.models import ApiKey, Membership, Role, Tenant, User

if TYPE_CHECKING:
    from conversations.models import Thread

PASSWORD = "correct-horse-battery-staple-9"


# --- The socket guard --------------------------------------------------------------------------
# No test reaches beyond this machine, and only the egress client (controlplane/egress.py) may
# connect toward an address a tenant, user or model chose. Every connection off loopback is
# refused before a packet leaves; one that did not come through the egress client also fails
# the test that made it (`_no_connection_bypassed_egress`). Loopback (PostgreSQL, Redis, the
# fake LLM, test servers) and unix sockets pass. Python's own sockets only: uvloop and aiohttp's
# C paths connect below them (the model client's transport checks its addresses itself, and
# tests/test_egress.py proves it).
BYPASSED: list[object] = []


def _leaves_the_machine(address: object) -> bool:
    if not isinstance(address, tuple) or not address:
        return False  # a unix socket's path
    host = address[0].decode() if isinstance(address[0], bytes) else str(address[0])
    if host.lower().rstrip(".") == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return True  # a name connect() would resolve itself: the egress client never asks that


def _refusal(address: object) -> ConnectionRefusedError:
    from controlplane import egress

    if not egress.connection_is_guarded():
        BYPASSED.append(address)
    return ConnectionRefusedError(
        errno.ECONNREFUSED, f"the test socket guard refused a connection to {address!r}"
    )


def _guard_sockets() -> None:
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(sock: socket.socket, address: object) -> None:
        if _leaves_the_machine(address):
            raise _refusal(address)
        real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: object) -> int:
        if _leaves_the_machine(address):
            return _refusal(address).errno or errno.ECONNREFUSED
        return real_connect_ex(sock, address)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]


def pytest_configure(config: pytest.Config) -> None:
    _guard_sockets()


@pytest.fixture(autouse=True)
def _no_connection_bypassed_egress():
    BYPASSED.clear()
    yield
    bypassed, BYPASSED[:] = list(BYPASSED), []
    assert bypassed == [], f"connections off this machine that bypassed egress: {bypassed}"


@pytest.fixture(scope="session", autouse=True)
def _close_pools_before_teardown(django_db_setup, django_db_blocker):
    """Connections left open by the worker threads of async tests (consumers) would keep the test
    database busy and stop pytest-django from dropping it: end them first."""
    yield
    with django_db_blocker.unblock():
        for connection in connections.all():
            connection.close_pool()
            # A plain connection, not one from a (re-opened) pool.
            with psycopg.connect(**connection.get_connection_params()) as raw:
                raw.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )


@pytest.fixture(autouse=True)
def kicked(monkeypatch) -> list[str]:
    """Runs that would have been handed to a worker. Tests drive execution themselves (or start
    real workers); nothing else consumes the broker during the suite."""
    from conversations import executor

    calls: list[str] = []
    monkeypatch.setattr(executor, "kick", lambda run_id: calls.append(str(run_id)))
    return calls


@pytest.fixture(autouse=True)
def _isolated_redis(settings):
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    settings.CACHES = {
        "default": {**settings.CACHES["default"], "KEY_PREFIX": prefix},
    }
    layer = dict(settings.CHANNEL_LAYERS["default"])
    layer["CONFIG"] = {**layer["CONFIG"], "prefix": f"{prefix}:asgi"}
    settings.CHANNEL_LAYERS = {"default": layer}
    # django-axes memoizes its handler, which keeps the cache it saw first: a fresh one makes
    # login lockouts live under this test's prefix too.
    AxesProxyHandler.get_implementation(force=True)
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    # Outbound requests reach public addresses only; a test that needs loopback says so.
    settings.EGRESS_ALLOWED_NETWORKS = []
    settings.OFFLINE_MODEL_WORD_DELAY = 0  # the offline model streams without pauses in tests
    settings.SECURE_SSL_REDIRECT = False
    # Tests that start dozens of runs as one end user are not about rate limits; the tests that
    # are (tests/tenants/test_limits.py) set the limits they need.
    settings.RATE_LIMIT_END_USER_RUNS_PER_MINUTE = 0
    settings.RATE_LIMIT_END_USER_RUNS_PER_HOUR = 0
    yield


@dataclass
class World:
    tenant: Tenant
    owner: User
    admin: User
    member: User
    owner_membership: Membership
    admin_membership: Membership
    member_membership: Membership
    admin_key: ApiKey
    admin_key_raw: str
    read_key: ApiKey
    read_key_raw: str

    def client_for(self, user: User) -> Client:
        client = Client()
        client.force_login(user)
        return client

    def actor(self, user: User | None = None) -> Actor:
        user = user or self.owner
        membership = Membership.objects.for_tenant(self.tenant).get(user=user)
        return Actor(user=user, membership=membership)


def make_world(name: str) -> World:
    slug = name.lower()
    owner = User.objects.create_user(f"owner@{slug}.test", PASSWORD, name=f"{name} Owner")
    tenant = services.tenant_create(user=owner, name=name, slug=slug)
    admin = User.objects.create_user(f"admin@{slug}.test", PASSWORD, name=f"{name} Admin")
    member = User.objects.create_user(f"member@{slug}.test", PASSWORD, name=f"{name} Member")
    om = Membership.objects.for_tenant(tenant).get(user=owner)
    am = Membership.objects.create(tenant=tenant, user=admin, role=Role.ADMIN)
    mm = Membership.objects.create(tenant=tenant, user=member, role=Role.MEMBER)
    actor = Actor(user=owner, membership=om)
    admin_key, admin_raw = services.api_key_create(
        tenant=tenant, actor=actor, name=f"{name} admin key", scopes=["admin"]
    )
    read_key, read_raw = services.api_key_create(
        tenant=tenant, actor=actor, name=f"{name} read key", scopes=["read"]
    )
    return World(tenant, owner, admin, member, om, am, mm, admin_key, admin_raw, read_key, read_raw)


def member_thread(world: World, agent_name: str = "Echo") -> Thread:
    """A thread of the world's member with a newly published agent (the built-in model)."""
    from ai_agents import services as agent_services
    from conversations import services as conversation_services

    actor = world.actor()
    agent = agent_services.agent_create(tenant=world.tenant, actor=actor, name=agent_name)
    agent_services.agent_publish(tenant=world.tenant, actor=actor, agent_id=agent.pk)
    end_user = conversation_services.end_user_for_member(tenant=world.tenant, user=world.member)
    return conversation_services.thread_create(
        tenant=world.tenant, end_user=end_user, agent_id=agent.pk
    )


@pytest.fixture
def world_a(db) -> World:
    return make_world("Acme")


@pytest.fixture
def world_b(db) -> World:
    return make_world("Globex")


@pytest.fixture
def api_client():
    def make(raw_key: str, header: str = "bearer") -> Client:
        if header == "bearer":
            return Client(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
        return Client(HTTP_X_API_KEY=raw_key)

    return make

"""Every URL route, API operation and websocket route is classified, and every tenant-scoped one is
called by another tenant: it must answer 404 (or, for lists, show none of the other tenant's rows).

A route without an entry here fails `test_every_*_is_classified`, so nothing ships unchecked.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from channels.testing import WebsocketCommunicator
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from controlplane.api import api
from controlplane.routing import websocket_urlpatterns
from tests.conftest import World

# --- Dashboard routes -------------------------------------------------------------------------

# Routes that are not inside a tenant: each with the reason it is safe.
PUBLIC_ROUTES = {
    "healthz": "reports reachability only, no tenant data",
    "home": "redirects a signed-in user to one of their own tenants",
    "login": "authentication",
    "logout": "authentication",
    "signup": "creates a new tenant",
    "password_change": "the user's own account",
    "password_change_done": "the user's own account",
    "password_reset": "answers the same whether or not the e-mail exists",
    "password_reset_done": "static page",
    "password_reset_confirm": "signed, per-user token",
    "password_reset_complete": "static page",
    "invitation-accept": "the signed invitation link is the credential (tests/tenants)",
    "tenant-create": "creates a tenant owned by the signed-in user",
}


@dataclass
class Case:
    """How to call a tenant route: its object ids come from tenant A (`w` is A's world)."""

    kwargs: Callable[[World], dict] = lambda w: {}
    methods: tuple[str, ...] = ("get",)
    data: dict = field(default_factory=dict)


TENANT_ROUTES: dict[str, Case] = {
    "tenant-overview": Case(),
    "tenant-settings": Case(methods=("get", "post"), data={"name": "Pwned", "slug": "pwned"}),
    "tenant-limits": Case(methods=("get", "post"), data={"end_user_runs_per_minute": "1"}),
    "member-list": Case(),
    "member-invite": Case(methods=("post",), data={"email": "x@example.test", "role": "owner"}),
    "member-change-role": Case(
        lambda w: {"membership_id": w.member_membership.pk}, ("post",), {"role": "owner"}
    ),
    "member-remove": Case(lambda w: {"membership_id": w.member_membership.pk}, ("post",)),
    "invitation-revoke": Case(lambda w: {"invitation_id": w.invitation.pk}, ("post",)),
    "api-key-list": Case(),
    "api-key-create": Case(methods=("post",), data={"name": "pwn", "scopes": ["admin"]}),
    "api-key-revoke": Case(lambda w: {"api_key_id": w.read_key.pk}, ("post",)),
    "api-key-limits": Case(
        lambda w: {"api_key_id": w.read_key.pk}, ("post",), {"requests_per_minute": "1"}
    ),
    "audit-log": Case(),
    # Agents: ids from `agents_of(a)` (made in `two_worlds`, before the snapshot).
    "agent-list": Case(),
    "agent-create": Case(methods=("post",), data={"name": "Pwned"}),
    "agent-detail": Case(
        lambda w: _ids(agent_id="agent")(w), ("get", "post"), {"instructions": "pwned"}
    ),
    "agent-update": Case(lambda w: _ids(agent_id="agent")(w), ("post",), {"name": "Pwned"}),
    "agent-publish": Case(lambda w: _ids(agent_id="agent")(w), ("post",), {"note": "pwned"}),
    "agent-delete": Case(lambda w: _ids(agent_id="agent")(w), ("post",)),
    "agent-playground": Case(lambda w: _ids(agent_id="agent")(w), ("post",), {"message": "hi"}),
    "agent-versions": Case(lambda w: _ids(agent_id="agent")(w)),
    "agent-restore": Case(lambda w: _ids(agent_id="agent", version_id="version")(w), ("post",)),
    "agent-compare": Case(lambda w: _ids(agent_id="agent")(w)),
    "provider-list": Case(),
    "provider-create": Case(
        methods=("post",),
        data={"name": "pwn", "base_url": "https://x.example.com/v1", "default_model": "m"},
    ),
    "provider-detail": Case(
        lambda w: _ids(provider_id="provider")(w),
        ("get", "post"),
        {"name": "pwned", "base_url": "https://x.example.com/v1", "default_model": "m"},
    ),
    "provider-delete": Case(lambda w: _ids(provider_id="provider")(w), ("post",)),
    "provider-test": Case(lambda w: _ids(provider_id="provider")(w), ("post",)),
    "mcp-server-list": Case(),
    "mcp-server-create": Case(
        methods=("post",), data={"name": "pwn", "url": "https://x.example.com/mcp"}
    ),
    "mcp-server-detail": Case(
        lambda w: _ids(server_id="server")(w),
        ("get", "post"),
        {"name": "pwned", "url": "https://x.example.com/mcp", "transport": "sse"},
    ),
    "mcp-server-delete": Case(lambda w: _ids(server_id="server")(w), ("post",)),
    "mcp-server-tools": Case(lambda w: _ids(server_id="server")(w), ("post",)),
    # Chat: A's thread belongs to A's owner; B's owner must not reach it from either slug.
    "chat-home": Case(),
    "chat-start": Case(
        methods=("post",), data={"agent_id": "00000000-0000-0000-0000-000000000000"}
    ),
    "chat-thread": Case(lambda w: {"thread_id": _thread_of(w).pk}),
    "chat-items": Case(lambda w: {"thread_id": _thread_of(w).pk}),
    "chat-send": Case(lambda w: {"thread_id": _thread_of(w).pk}, ("post",), {"text": "pwned"}),
    "chat-rename": Case(lambda w: {"thread_id": _thread_of(w).pk}, ("post",), {"title": "pwned"}),
    "chat-delete": Case(lambda w: {"thread_id": _thread_of(w).pk}, ("post",)),
    # Usage, prices and budget: A's price (made in `agents_of`).
    "usage": Case(),
    "usage-export": Case(),
    "price-list": Case(
        methods=("get", "post"),
        data={"model": "pwned", "input_per_million": "1", "output_per_million": "1"},
    ),
    "price-list-prices": Case(methods=("post",)),
    "price-detail": Case(
        lambda w: _ids(price_id="price")(w),
        ("get", "post"),
        {"model": "pwned", "input_per_million": "9", "output_per_million": "9"},
    ),
    "price-delete": Case(lambda w: _ids(price_id="price")(w), ("post",)),
    "budget-settings": Case(
        methods=("get", "post"), data={"token_limit": "1", "warn_percent": "5"}
    ),
    # Run inspector: A's active run (made in `two_worlds`) must stay running.
    "run-list": Case(),
    "run-detail": Case(lambda w: {"run_id": _run_of(w).pk}),
    "run-cancel": Case(lambda w: {"run_id": _run_of(w).pk}, ("post",)),
    "thread-transcript": Case(lambda w: {"thread_id": _run_of(w).thread_id}),
    "playground-run-list": Case(),
    "playground-run-detail": Case(lambda w: _ids(run_id="run")(w)),
}


def _thread_of(world: World):
    """A chat thread of `world`'s owner with its published agent (made once per test)."""
    if not hasattr(world, "chat_thread"):
        from conversations import services

        end_user = services.end_user_for_member(tenant=world.tenant, user=world.owner)
        world.chat_thread = services.thread_create(
            tenant=world.tenant, end_user=end_user, agent_id=agents_of(world)["agent"].pk
        )
    return world.chat_thread


def _run_of(world: World):
    """An active run of `world`'s member on a thread of its own (made once per test)."""
    if not hasattr(world, "active_run"):
        from conversations import services

        end_user = services.end_user_for_member(tenant=world.tenant, user=world.member)
        thread = services.thread_create(
            tenant=world.tenant, end_user=end_user, agent_id=agents_of(world)["agent"].pk
        )
        world.active_run = services.run_create(
            tenant=world.tenant, end_user=end_user, thread_id=thread.pk, input="hello"
        )
    return world.active_run


def _walk(patterns, prefix="", namespace=""):
    for p in patterns:
        if isinstance(p, URLResolver):
            ns = p.namespace or namespace
            yield from _walk(p.url_patterns, prefix + str(p.pattern), ns)
        elif isinstance(p, URLPattern):
            yield prefix + str(p.pattern), p.name, namespace


def dashboard_routes():
    return [(route, name) for route, name, ns in _walk(get_resolver().url_patterns) if ns != "api"]


def test_every_dashboard_route_is_classified():
    unnamed = [route for route, name in dashboard_routes() if not name]
    assert not unnamed, f"Name these routes so they can be classified: {unnamed}"
    names = {name for _, name in dashboard_routes()}
    unclassified = sorted(names - PUBLIC_ROUTES.keys() - TENANT_ROUTES.keys())
    assert not unclassified, f"Classify these routes in {__file__}: {unclassified}"
    for route, name in dashboard_routes():
        in_tenant = route.startswith("t/<slug:tenant_slug>/")
        assert in_tenant == (name in TENANT_ROUTES), f"{name} ({route}) is classified wrongly"


@pytest.fixture
def two_worlds(world_a, world_b):
    from tenants import services

    world_a.invitation, _ = services.invitation_create(
        tenant=world_a.tenant, actor=world_a.actor(), email="pending@acme.test", role="member"
    )
    world_b.invitation, _ = services.invitation_create(
        tenant=world_b.tenant, actor=world_b.actor(), email="pending@globex.test", role="member"
    )
    # An agent (live version and draft), a provider and an MCP server in each tenant, made now so
    # that the snapshot taken before a cross-tenant call already holds them.
    agents_of(world_a), agents_of(world_b)
    _run_of(world_a), _run_of(world_b)
    return world_a, world_b


def _snapshot(world: World):
    """What a cross-tenant call must not change in tenant A."""
    from ai_agents.models import Agent, AgentVersion, McpServer, ModelProvider
    from conversations.models import Run
    from tenants.models import ApiKey, Invitation, Membership
    from usage.models import Budget, ModelPrice

    return (
        sorted(
            ModelPrice.objects.for_tenant(world.tenant).values_list("model", "output_per_million")
        ),
        sorted(Budget.objects.for_tenant(world.tenant).values_list("token_limit", "warn_percent")),
        sorted(Agent.objects.for_tenant(world.tenant).values_list("name", "published_version")),
        sorted(AgentVersion.objects.for_tenant(world.tenant).values_list("pk", "state", "number")),
        sorted(ModelProvider.objects.for_tenant(world.tenant).values_list("name", "default_model")),
        sorted(McpServer.objects.for_tenant(world.tenant).values_list("name", "url")),
        world.tenant.__class__.objects.values_list(
            "name", "slug", "end_user_runs_per_minute", "api_key_requests_per_minute"
        ).get(pk=world.tenant.pk),
        sorted(Membership.objects.for_tenant(world.tenant).values_list("user__email", "role")),
        sorted(
            ApiKey.objects.for_tenant(world.tenant).values_list(
                "name", "revoked_at", "requests_per_minute"
            )
        ),
        sorted(Invitation.objects.for_tenant(world.tenant).values_list("email", "revoked_at")),
        sorted(Run.objects.for_tenant(world.tenant).values_list("pk", "status")),
    )


@pytest.mark.parametrize("name", sorted(TENANT_ROUTES))
def test_another_tenant_gets_404_on_every_tenant_route(two_worlds, name):
    from django.urls import reverse

    a, b = two_worlds
    case = TENANT_ROUTES[name]
    before = _snapshot(a)
    client = Client()
    client.force_login(b.owner)  # an owner of B: every permission, in the wrong tenant
    ids = case.kwargs(a)
    # A's slug: the tenant itself is invisible to B.
    url = reverse(name, kwargs={"tenant_slug": a.tenant.slug, **ids})
    for method in case.methods:
        response = getattr(client, method)(url, case.data)
        assert response.status_code == 404, f"{method.upper()} {url} -> {response.status_code}"
    # B's own slug with A's object ids: the objects are invisible too.
    if ids:
        url = reverse(name, kwargs={"tenant_slug": b.tenant.slug, **ids})
        for method in case.methods:
            response = getattr(client, method)(url, case.data)
            assert response.status_code == 404, f"{method.upper()} {url} -> {response.status_code}"
    assert _snapshot(a) == before


# --- API operations ---------------------------------------------------------------------------


@dataclass
class ApiCase:
    """`path` has `{...}` filled from tenant A's world; `list_of` marks a list (no ids)."""

    fill: Callable[[World], dict] = lambda w: {}
    body: dict | None = None
    scoped_list: bool = False
    query: Callable[[World], str] = lambda w: ""


def agents_of(world: World) -> dict:
    """An agent (with a published version and a draft), a provider and an MCP server of
    `world`'s tenant, made once per test through the services."""
    if not hasattr(world, "agent_objects"):
        from ai_agents import services

        actor = world.actor()
        tag = world.tenant.slug
        provider = services.provider_create(
            tenant=world.tenant,
            actor=actor,
            name=f"{tag}-prov",
            base_url="https://llm.example.com/v1",
            default_model="m",
            api_key="sk-cross-tenant-test-key",
        )
        server = services.mcp_server_create(
            tenant=world.tenant, actor=actor, name=f"{tag}-mcp", url="https://mcp.example.com/mcp"
        )
        agent = services.agent_create(tenant=world.tenant, actor=actor, name=f"{tag}-agent")
        version = services.agent_publish(tenant=world.tenant, actor=actor, agent_id=agent.pk)
        services.draft_save(
            tenant=world.tenant, actor=actor, agent_id=agent.pk, config={"instructions": "draft"}
        )
        run = services.playground_run(
            tenant=world.tenant, actor=actor, agent_id=agent.pk, input="hello"
        )
        from usage import services as usage_services

        price = usage_services.price_create(
            tenant=world.tenant,
            actor=actor,
            model="m",
            provider_id=provider.pk,
            input_per_million=1,
            cached_input_per_million=None,
            output_per_million=2,
            note="",
        )
        usage_services.budget_set(
            tenant=world.tenant, actor=actor, token_limit=10**9, cost_limit=None, warn_percent=80
        )
        world.agent_objects = {
            "price": price,
            "run": run,
            "agent": agent,
            "version": version,
            "provider": provider,
            "server": server,
        }
    return world.agent_objects


def _ids(**names: str) -> Callable[[World], dict]:
    return lambda w: {key: agents_of(w)[obj].pk for key, obj in names.items()}


API_OPERATIONS: dict[tuple[str, str], ApiCase] = {
    ("GET", "/api/v1/tenant"): ApiCase(scoped_list=True),
    ("GET", "/api/v1/members"): ApiCase(scoped_list=True),
    ("GET", "/api/v1/tenant/limits"): ApiCase(scoped_list=True),
    ("PUT", "/api/v1/tenant/limits"): ApiCase(
        body={"end_user_runs_per_minute": 1}, scoped_list=True
    ),
    ("GET", "/api/v1/api-keys"): ApiCase(scoped_list=True),
    ("POST", "/api/v1/api-keys"): ApiCase(body={"name": "x", "scopes": ["read"]}, scoped_list=True),
    ("GET", "/api/v1/api-keys/{key_id}"): ApiCase(lambda w: {"key_id": w.read_key.pk}),
    ("POST", "/api/v1/api-keys/{key_id}/revoke"): ApiCase(lambda w: {"key_id": w.read_key.pk}),
    ("PUT", "/api/v1/api-keys/{key_id}/limits"): ApiCase(
        lambda w: {"key_id": w.read_key.pk}, body={"requests_per_minute": 1}
    ),
    ("GET", "/api/v1/audit-events"): ApiCase(scoped_list=True),
    ("GET", "/api/v1/providers"): ApiCase(scoped_list=True),
    ("POST", "/api/v1/providers"): ApiCase(
        body={"name": "p2", "base_url": "https://x.example.com/v1", "default_model": "m"},
        scoped_list=True,
    ),
    ("GET", "/api/v1/providers/{provider_id}"): ApiCase(_ids(provider_id="provider")),
    ("PUT", "/api/v1/providers/{provider_id}"): ApiCase(
        _ids(provider_id="provider"),
        body={"name": "pwned", "base_url": "https://x.example.com/v1", "default_model": "m"},
    ),
    ("DELETE", "/api/v1/providers/{provider_id}"): ApiCase(_ids(provider_id="provider")),
    ("POST", "/api/v1/providers/{provider_id}/test"): ApiCase(_ids(provider_id="provider")),
    ("GET", "/api/v1/mcp-servers"): ApiCase(scoped_list=True),
    ("POST", "/api/v1/mcp-servers"): ApiCase(
        body={"name": "m2", "url": "https://x.example.com/mcp"}, scoped_list=True
    ),
    ("GET", "/api/v1/mcp-servers/{server_id}"): ApiCase(_ids(server_id="server")),
    ("PUT", "/api/v1/mcp-servers/{server_id}"): ApiCase(
        _ids(server_id="server"), body={"name": "pwned", "url": "https://x.example.com/mcp"}
    ),
    ("DELETE", "/api/v1/mcp-servers/{server_id}"): ApiCase(_ids(server_id="server")),
    ("POST", "/api/v1/mcp-servers/{server_id}/tools"): ApiCase(_ids(server_id="server")),
    ("GET", "/api/v1/tools"): ApiCase(scoped_list=True),
    ("GET", "/api/v1/agents"): ApiCase(scoped_list=True),
    ("POST", "/api/v1/agents"): ApiCase(body={"name": "new"}, scoped_list=True),
    ("GET", "/api/v1/agents/{agent_id}"): ApiCase(_ids(agent_id="agent")),
    ("PATCH", "/api/v1/agents/{agent_id}"): ApiCase(_ids(agent_id="agent"), body={"name": "x"}),
    ("DELETE", "/api/v1/agents/{agent_id}"): ApiCase(_ids(agent_id="agent")),
    ("GET", "/api/v1/agents/{agent_id}/versions"): ApiCase(_ids(agent_id="agent")),
    ("GET", "/api/v1/agents/{agent_id}/versions/{version_id}"): ApiCase(
        _ids(agent_id="agent", version_id="version")
    ),
    ("PUT", "/api/v1/agents/{agent_id}/draft"): ApiCase(
        _ids(agent_id="agent"), body={"instructions": "pwned"}
    ),
    ("POST", "/api/v1/agents/{agent_id}/publish"): ApiCase(_ids(agent_id="agent"), body={}),
    ("POST", "/api/v1/agents/{agent_id}/versions/{version_id}/restore"): ApiCase(
        _ids(agent_id="agent", version_id="version")
    ),
    ("GET", "/api/v1/agents/{agent_id}/compare"): ApiCase(
        _ids(agent_id="agent"),
        query=lambda w: f"?a={agents_of(w)['version'].pk}&b={agents_of(w)['version'].pk}",
    ),
    ("GET", "/api/v1/agents/{agent_id}/runs"): ApiCase(_ids(agent_id="agent")),
    ("GET", "/api/v1/agents/{agent_id}/runs/{run_id}"): ApiCase(
        _ids(agent_id="agent", run_id="run")
    ),
    ("POST", "/api/v1/agents/{agent_id}/draft/run"): ApiCase(
        _ids(agent_id="agent"), body={"input": "hello"}
    ),
    ("GET", "/api/v1/usage"): ApiCase(scoped_list=True, query=lambda w: "?group_by=agent"),
    ("GET", "/api/v1/usage/records"): ApiCase(scoped_list=True),
    ("GET", "/api/v1/prices"): ApiCase(scoped_list=True),
    ("POST", "/api/v1/prices"): ApiCase(
        body={"model": "x", "input_per_million": "1", "output_per_million": "1"}, scoped_list=True
    ),
    ("GET", "/api/v1/prices/{price_id}"): ApiCase(_ids(price_id="price")),
    ("PUT", "/api/v1/prices/{price_id}"): ApiCase(
        _ids(price_id="price"),
        body={"model": "pwned", "input_per_million": "9", "output_per_million": "9"},
    ),
    ("DELETE", "/api/v1/prices/{price_id}"): ApiCase(_ids(price_id="price")),
    ("GET", "/api/v1/budget"): ApiCase(scoped_list=True),
    ("PUT", "/api/v1/budget"): ApiCase(body={"token_limit": 1}, scoped_list=True),
}


def api_operations():
    ops = []
    for prefix, router in api._routers:
        for path, path_view in router.path_operations.items():
            full = "/api/v1" + re.sub(r"/+", "/", f"/{prefix}/{path}")
            for op in path_view.operations:
                for method in op.methods:
                    ops.append((method, full.rstrip("/") or full, op))
    return ops


def test_every_api_operation_is_classified_and_authenticated(db):
    found = {(m, p) for m, p, _ in api_operations()}
    unclassified = sorted(found - API_OPERATIONS.keys())
    assert not unclassified, f"Classify these API operations in {__file__}: {unclassified}"
    assert not (API_OPERATIONS.keys() - found), "stale entries"
    for method, path in found:
        url = path.replace("{key_id}", "00000000-0000-0000-0000-000000000000")
        response = Client().generic(method, url)
        assert response.status_code == 401, f"{method} {path} must require an API key"


@pytest.mark.parametrize(("method", "path"), sorted(API_OPERATIONS))
def test_another_tenants_key_gets_404_or_nothing_of_theirs(two_worlds, method, path):
    import json

    a, b = two_worlds
    agents_of(a), agents_of(b)
    case = API_OPERATIONS[(method, path)]
    before = _snapshot(a)
    client = Client(HTTP_AUTHORIZATION=f"Bearer {b.admin_key_raw}")
    url = path.format(**case.fill(a)) + case.query(a)
    if method == "GET":
        response = client.get(url)
    else:
        response = client.generic(
            method, url, json.dumps(case.body or {}), content_type="application/json"
        )
    if case.scoped_list:
        assert response.status_code < 400, response.content
        body = b"".join(response.streaming_content) if response.streaming else response.content
        text = body.decode()
        for secret in (str(a.tenant.pk), a.tenant.slug, "acme.test", str(a.read_key.pk), "Acme"):
            assert secret not in text, f"{method} {path} leaks {secret!r} of another tenant"
    else:
        assert response.status_code == 404, f"{method} {url} -> {response.status_code}"
    assert _snapshot(a) == before
    # and without any key: 401
    anonymous = Client().generic(method, url)
    assert anonymous.status_code == 401


# --- Websocket routes -------------------------------------------------------------------------


class _ChatThreadRoute:
    """`format(slug=...)`: the chat socket of a thread of that tenant's owner. The test formats
    routes from async code, so the thread is made in a worker thread that closes its connection
    (the transactional test database sees it)."""

    def format(self, *, slug: str) -> str:
        from concurrent.futures import ThreadPoolExecutor

        from django.db import connections

        def make() -> str:
            from ai_agents import services as agent_services
            from conversations import services
            from tenants.actors import Actor
            from tenants.models import Membership, Role

            try:
                owner = Membership.objects.select_related("tenant", "user").get(
                    tenant__slug=slug, role=Role.OWNER
                )
                who = Actor(user=owner.user, membership=owner)
                agent = agent_services.agent_create(tenant=owner.tenant, actor=who, name="Chat")
                agent_services.agent_publish(tenant=owner.tenant, actor=who, agent_id=agent.pk)
                end_user = services.end_user_for_member(tenant=owner.tenant, user=owner.user)
                thread = services.thread_create(
                    tenant=owner.tenant, end_user=end_user, agent_id=agent.pk
                )
                return str(thread.pk)
            finally:
                connections.close_all()

        with ThreadPoolExecutor(1) as pool:
            thread_id = pool.submit(make).result()
        return f"/ws/t/{slug}/chat/{thread_id}/"


WEBSOCKET_ROUTES = {
    "ws-tenant-events": "/ws/t/{slug}/events/",
    "ws-chat-thread": _ChatThreadRoute(),
}


def test_every_websocket_route_is_classified():
    names = {p.name for p in websocket_urlpatterns}
    assert None not in names, "name every websocket route"
    assert names == WEBSOCKET_ROUTES.keys(), f"classify: {names ^ WEBSOCKET_ROUTES.keys()}"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("name", sorted(WEBSOCKET_ROUTES))
async def test_another_tenants_member_cannot_open_a_websocket(name, settings):
    # database_sync_to_async closes the worker thread's connection afterwards, so the test
    # database can be dropped at the end of the run.
    from channels.db import database_sync_to_async as sync_to_async

    from controlplane.asgi import application
    from tests.conftest import make_world

    settings.ALLOWED_HOSTS = ["testserver", "localhost"]
    a = await sync_to_async(make_world)("Acme")
    b = await sync_to_async(make_world)("Globex")
    client = Client()
    await sync_to_async(client.force_login)(b.owner)
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    headers = [(b"cookie", cookie), (b"origin", b"http://testserver"), (b"host", b"testserver")]

    own = WebsocketCommunicator(
        application, WEBSOCKET_ROUTES[name].format(slug=b.tenant.slug), headers=headers
    )
    other = WebsocketCommunicator(
        application, WEBSOCKET_ROUTES[name].format(slug=a.tenant.slug), headers=headers
    )
    try:
        connected, _ = await own.connect()
        assert connected, "the route must work for its own tenant, or this test proves nothing"
        await own.disconnect()

        connected, code = await other.connect()
        assert not connected and code == 4404
    finally:
        # A refused socket's consumer still runs (it reads the channel layer) until the
        # client disconnects: end it here rather than leave it to the event loop's shutdown,
        # and close this loop's channel-layer connections.
        await _disconnect_all(own, other)


async def _disconnect_all(*sockets: WebsocketCommunicator) -> None:
    from channels.layers import get_channel_layer

    for socket in sockets:
        await socket.disconnect()  # returns at once for a socket whose consumer already ended
    layer = get_channel_layer()
    if layer is not None:
        await layer.flush()

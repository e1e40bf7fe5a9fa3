"""Model instances for a run: the built-in offline model, or a tenant's OpenAI-compatible
endpoint reached through the egress-guarded HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import weakref
from collections.abc import AsyncIterator
from typing import Any

from agents import Model, OpenAIChatCompletionsModel, OpenAIResponsesModel
from django.conf import settings
from openai import AsyncOpenAI

from ai_agents.models import ModelProvider, ProviderApi
from ai_agents.runtime import fastpaths
from ai_agents.runtime.trace import identify
from controlplane import crypto

fastpaths.install()  # chat-completion bodies skip openai's type walk when it changes nothing
fastpaths.install_declared_types()  # an Agent's settings type is looked up once per class
fastpaths.install_session_contracts()  # a session's methods are inspected once per class


def offline_model() -> Model:
    from ai_agents.runtime.offline import OfflineModel

    return identify(
        OfflineModel(token_delay=settings.OFFLINE_MODEL_WORD_DELAY),
        name="offline",
        provider_id=None,
        provider="builtin",
    )


# The event loop the run's models will be called on. `run_version` sets it before building the
# agent in a worker thread (`sync_to_async` carries context variables there), so that the models
# of every run on that loop share one client per provider: its connections are kept alive from
# run to run instead of being opened (and their addresses checked) for each run. An httpx client
# belongs to one event loop, hence one cache per loop.
run_loop: contextvars.ContextVar[asyncio.AbstractEventLoop | None] = contextvars.ContextVar(
    "run_loop", default=None
)
_CLIENTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, AsyncOpenAI]] = (
    weakref.WeakKeyDictionary()
)
_CLIENTS_LOCK = threading.Lock()


# A provider's client is shared by every run of a worker's event loop (hundreds at once): it keeps
# that many connections alive, or most model calls would open (and the provider's TLS would
# handshake) a new connection. httpx's default keeps 20.
PROVIDER_CONNECTIONS = 1000
PROVIDER_KEEPALIVE = 500


def _new_client(provider: ModelProvider) -> AsyncOpenAI:
    import httpx2

    from controlplane import egress

    key = crypto.decrypt(provider.api_key_encrypted) if provider.api_key_encrypted else "none"
    limits = httpx2.Limits(
        max_connections=PROVIDER_CONNECTIONS, max_keepalive_connections=PROVIDER_KEEPALIVE
    )
    return fastpaths.FastChunksClient(
        base_url=provider.base_url,
        api_key=key,
        max_retries=0,
        timeout=provider.timeout_seconds,
        http_client=egress.guarded_openai_http_client(
            timeout=provider.timeout_seconds, limits=limits
        ),
    )


# The loops whose runs share their clients (`share_clients`): a worker's run host, which lives
# as long as its process. An edited provider's old client may still be in use by runs: it is
# kept (its idle connections close on their own) and closed with the loop's (`close_clients`).
_SHARED: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
_RETIRED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[AsyncOpenAI]] = (
    weakref.WeakKeyDictionary()
)
# Elsewhere (the playground, a test connection, a run of a management command) a run keeps its
# clients to itself and closes them when it ends (`run_scope`): its loop may end with it
# (async_to_sync makes one per call where there is none).
_SCOPE: contextvars.ContextVar[dict[Any, AsyncOpenAI] | None] = contextvars.ContextVar(
    "provider_clients", default=None
)


def share_clients(loop: asyncio.AbstractEventLoop) -> None:
    """Let the runs of `loop` share one client per provider (`run_loop`), until the loop's
    `close_clients`."""
    _SHARED.add(loop)


async def close_clients() -> None:
    """Close the provider clients of the running loop, and their kept connections (a worker
    shutting down)."""
    loop = asyncio.get_running_loop()
    with _CLIENTS_LOCK:
        clients = [*_CLIENTS.pop(loop, {}).values(), *_RETIRED.pop(loop, [])]
    for client in clients:
        await client.close()


@contextlib.asynccontextmanager
async def run_scope() -> AsyncIterator[None]:
    """The provider clients a run makes on a loop that does not share them are the run's, and
    are closed when it ends."""
    if asyncio.get_running_loop() in _SHARED:
        yield
        return
    token = _SCOPE.set({})
    try:
        yield
    finally:
        clients = list((_SCOPE.get() or {}).values())
        _SCOPE.reset(token)
        for client in clients:
            await client.close()


def openai_client(provider: ModelProvider) -> AsyncOpenAI:
    """The provider's client: shared by the runs of a run host's loop (see `run_loop`,
    `share_clients`) until the provider changes; else the run's own (`run_scope`); else new."""
    version = (
        provider.pk,
        provider.updated_at,
        provider.base_url,
        provider.api_key_encrypted,
        provider.timeout_seconds,
    )
    loop = run_loop.get()
    if loop is not None and not loop.is_closed() and loop in _SHARED:
        with _CLIENTS_LOCK:
            clients = _CLIENTS.setdefault(loop, {})
            if version not in clients:
                for stale in [v for v in clients if v[0] == provider.pk]:
                    _RETIRED.setdefault(loop, []).append(clients.pop(stale))
            return _kept(clients, version, provider)
    scope = _SCOPE.get()
    return _new_client(provider) if scope is None else _kept(scope, version, provider)


def _kept(clients: dict[Any, AsyncOpenAI], version: Any, provider: ModelProvider) -> AsyncOpenAI:
    if version not in clients:
        clients[version] = _new_client(provider)
    return clients[version]


def provider_model(provider: ModelProvider, *, model_name: str) -> Model:
    client = openai_client(provider)
    model: Model
    if provider.api == ProviderApi.RESPONSES:
        model = OpenAIResponsesModel(model=model_name, openai_client=client)
    else:
        model = OpenAIChatCompletionsModel(model=model_name, openai_client=client)
    return identify(model, name=model_name, provider_id=str(provider.pk), provider=provider.name)

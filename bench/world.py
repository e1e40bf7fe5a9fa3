"""What the benchmark talks to, created through the product's own services: a tenant, its owner,
one member per simulated chat (each logged in: a session cookie), a model provider pointing at
the fake LLM, a published agent on it, and the threads the chats write to.

Runs in the harness process with the stack's settings; it never runs while a cell is measured,
so its database work is not counted.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from importlib import import_module

from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.db import connections, transaction
from django.utils import timezone

from ai_agents import services as agent_services
from ai_agents.models import ProviderApi
from conversations import services as conversation_services
from conversations.models import EndUser, Thread
from tenants import services as tenant_services
from tenants.actors import Actor
from tenants.models import Membership, Role, Tenant, User

MODEL_BACKEND = "django.contrib.auth.backends.ModelBackend"


@dataclass
class Chatter:
    """One simulated person: a member of the tenant, logged in, with their threads."""

    user_id: str
    end_user_id: str
    session_key: str
    threads: list[str] = field(default_factory=list)


@dataclass
class World:
    tenant_id: str
    slug: str
    agent_id: str
    chatters: list[Chatter]


def _login(user: User) -> str:
    """A session for `user`, as `django.contrib.auth.login` stores one; returns its key."""
    store = import_module(settings.SESSION_ENGINE).SessionStore()
    store[SESSION_KEY] = user._meta.pk.value_to_string(user)
    store[BACKEND_SESSION_KEY] = MODEL_BACKEND
    store[HASH_SESSION_KEY] = user.get_session_auth_hash()
    store.create()
    return str(store.session_key)


def build(*, chatters: int, llm_base_url: str) -> World:
    """A fresh tenant (slug `bench-<random>`) with `chatters` logged-in members."""
    label = secrets.token_hex(4)
    slug = f"bench-{label}"
    owner = User.objects.create_user(f"owner@{slug}.bench.invalid", None, name="Bench owner")
    tenant = tenant_services.tenant_create(user=owner, name=f"Bench {label}", slug=slug)
    # Each simulated person sends a message as soon as the last reply ends, far more often than
    # a person does: the tenant's per-end-user rate limits are off (0 means no limit).
    tenant.end_user_runs_per_minute = tenant.end_user_runs_per_hour = 0
    tenant.save(update_fields=["end_user_runs_per_minute", "end_user_runs_per_hour"])
    actor = Actor(user=owner, membership=Membership.objects.for_tenant(tenant).get(user=owner))
    provider = agent_services.provider_create(
        tenant=tenant,
        actor=actor,
        name="Fake LLM",
        base_url=llm_base_url,
        default_model="fake-model",
        api=ProviderApi.CHAT,
        timeout_seconds=60,
    )
    agent = agent_services.agent_create(
        tenant=tenant,
        actor=actor,
        name="Echo",
        config={"provider_id": str(provider.pk), "instructions": "Repeat what the user says."},
    )
    agent_services.agent_publish(tenant=tenant, actor=actor, agent_id=agent.pk)
    world = World(tenant_id=str(tenant.pk), slug=slug, agent_id=str(agent.pk), chatters=[])
    add_chatters(world, chatters)
    return world


def add_chatters(world: World, count: int) -> None:
    """Grow the world to `count` chatters (members without a password: they only have sessions)."""
    tenant = Tenant.objects.get(pk=world.tenant_id)
    for index in range(len(world.chatters), count):
        with transaction.atomic():
            user = User.objects.create_user(
                f"chat{index}@{world.slug}.bench.invalid", None, name=f"Chatter {index}"
            )
            Membership.objects.create(tenant=tenant, user=user, role=Role.MEMBER)
            end_user = conversation_services.end_user_for_member(tenant=tenant, user=user)
        world.chatters.append(Chatter(str(user.pk), str(end_user.pk), _login(user)))


def add_threads(world: World, per_chatter: int) -> None:
    """Give each chatter `per_chatter` new, empty threads with the agent (replacing the old)."""
    tenant = Tenant.objects.get(pk=world.tenant_id)
    rows = []
    now = timezone.now()
    for chatter in world.chatters:
        end_user = EndUser(pk=chatter.end_user_id, tenant=tenant)
        chatter.threads = []
        for _ in range(per_chatter):
            thread = Thread(
                tenant=tenant,
                agent_id=world.agent_id,
                end_user=end_user,
                title="Benchmark",
                created_at=now,
                updated_at=now,
            )
            chatter.threads.append(str(thread.pk))
            rows.append(thread)
    Thread.objects.bulk_create(rows, batch_size=1000)


def release() -> None:
    """Close this process's database connections: nothing of the harness is open in a cell."""
    connections.close_all()


@dataclass
class RunTimes:
    """A run's own timestamps (wall clock, seconds) and two marks of its trace (ms after the
    claim): when its first model call was sent and when its first token was written."""

    created: float
    started: float | None
    finished: float | None
    model_call_ms: float | None
    first_token_ms: float | None


def run_times(world: World, run_ids: list[str]) -> dict[str, RunTimes]:
    """`RunTimes` of each of these runs of the world's tenant, by run id."""
    from conversations.models import Run

    tenant = Tenant.objects.get(pk=world.tenant_id)
    rows = (
        Run.objects.for_tenant(tenant)
        .filter(pk__in=run_ids)
        .values_list("pk", "created_at", "started_at", "finished_at", "trace")
    )
    times = {}
    for pk, created, started, finished, trace in rows:
        calls = [s for s in trace if s.get("kind") == "model_call" and "duration_ms" in s]
        first = next((s for s in trace if s.get("kind") == "first_token"), None)
        times[str(pk)] = RunTimes(
            created=created.timestamp(),
            started=started.timestamp() if started else None,
            finished=finished.timestamp() if finished else None,
            # A model call's span is written when it ends, with its duration.
            model_call_ms=min(s["at_ms"] - s["duration_ms"] for s in calls) if calls else None,
            first_token_ms=first["at_ms"] if first else None,
        )
    release()
    return times


def run_phases(times: dict[str, RunTimes]) -> dict[str, list[float]]:
    """Per run, in ms: `queued` (created -> claimed by a worker) and `running` (claimed ->
    finished)."""
    queued, running = [], []
    for t in times.values():
        if t.started is not None:
            queued.append((t.started - t.created) * 1000)
            if t.finished is not None:
                running.append((t.finished - t.started) * 1000)
    return {"queued": queued, "running": running}


def wait_idle(world: World, timeout_s: float) -> tuple[float, int]:
    """Wait until none of the world's runs is pending or running (runs the chats gave up on
    still execute), so the next cell starts on an idle stack. Returns (seconds waited, runs
    still active at the timeout)."""
    import time

    from conversations.models import Run, RunStatus

    tenant = Tenant.objects.get(pk=world.tenant_id)
    active = Run.objects.for_tenant(tenant).filter(
        status__in=[RunStatus.PENDING, RunStatus.RUNNING]
    )
    started = time.monotonic()
    left = active.count()
    while left and time.monotonic() - started < timeout_s:
        time.sleep(0.25)
        left = active.count()
    release()
    return time.monotonic() - started, left

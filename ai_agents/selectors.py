"""Reads for agents, versions, providers and MCP servers, all scoped to one tenant."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.core.exceptions import ValidationError
from django.db import connection
from django.db.models import QuerySet

from ai_agents.config import diff
from ai_agents.models import (
    Agent,
    AgentVersion,
    McpServer,
    ModelProvider,
    PlaygroundRun,
    VersionState,
)
from controlplane import rows
from controlplane.errors import NotFound
from tenants.models import Tenant


def provider_list(*, tenant: Tenant) -> QuerySet[ModelProvider]:
    return ModelProvider.objects.for_tenant(tenant).order_by("name")


_PROVIDER = rows.Columns(ModelProvider, "provider")


def provider_get(*, tenant: Tenant, provider_id) -> ModelProvider:
    """The tenant's provider, or NotFound. Plain SQL: every run reads its agent's provider, and
    the ORM spent more compiling this than PostgreSQL spends answering it."""
    try:
        key = UUID(str(provider_id))
    except ValueError:
        raise NotFound("No such model provider.")
    # tenant-scope: the statement names the tenant
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {_PROVIDER.sql} FROM {ModelProvider._meta.db_table} provider "  # noqa: S608
            "WHERE provider.id = %s AND provider.tenant_id = %s",
            [key, tenant.pk],
        )
        row = cursor.fetchone()
    if row is None:
        raise NotFound("No such model provider.")
    return _PROVIDER.build(row)


def mcp_server_list(*, tenant: Tenant) -> QuerySet[McpServer]:
    return McpServer.objects.for_tenant(tenant).order_by("name")


def mcp_server_get(*, tenant: Tenant, server_id) -> McpServer:
    try:
        return McpServer.objects.for_tenant(tenant).get(pk=server_id)
    except (McpServer.DoesNotExist, ValueError, ValidationError):
        raise NotFound("No such MCP server.")


def agent_list(*, tenant: Tenant, published_only: bool = False) -> QuerySet[Agent]:
    qs = Agent.objects.for_tenant(tenant).select_related("published_version").order_by("name")
    return qs.filter(published_version__isnull=False) if published_only else qs


def agent_get(*, tenant: Tenant, agent_id) -> Agent:
    try:
        return Agent.objects.for_tenant(tenant).select_related("published_version").get(pk=agent_id)
    except (Agent.DoesNotExist, ValueError, ValidationError):
        raise NotFound("No such agent.")


def agent_get_by_slug(*, tenant: Tenant, slug: str) -> Agent:
    try:
        return Agent.objects.for_tenant(tenant).select_related("published_version").get(slug=slug)
    except Agent.DoesNotExist:
        raise NotFound(f"No agent called {slug!r}.")


def version_list(*, tenant: Tenant, agent: Agent) -> QuerySet[AgentVersion]:
    return (
        AgentVersion.objects.for_tenant(tenant)
        .filter(agent=agent)
        .select_related("created_by", "published_by")
        .order_by("state", "-number")  # the draft first ("draft" < "published"), then newest
    )


def version_get(*, tenant: Tenant, agent: Agent, version_id) -> AgentVersion:
    try:
        return AgentVersion.objects.for_tenant(tenant).get(agent=agent, pk=version_id)
    except (AgentVersion.DoesNotExist, ValueError, ValidationError):
        raise NotFound("No such version.")


def playground_run_list(*, tenant: Tenant, agent: Agent, limit: int = 10) -> list[PlaygroundRun]:
    """The agent's latest test runs, newest first."""
    return list(
        PlaygroundRun.objects.for_tenant(tenant)
        .filter(agent=agent)
        .select_related("created_by")
        .order_by("-created_at")[:limit]
    )


def playground_run_get(*, tenant: Tenant, agent: Agent, run_id) -> PlaygroundRun:
    try:
        return PlaygroundRun.objects.for_tenant(tenant).get(agent=agent, pk=run_id)
    except (PlaygroundRun.DoesNotExist, ValueError, ValidationError):
        raise NotFound("No such run.")


def version_compare(*, tenant: Tenant, agent: Agent, a_id, b_id) -> list[tuple[str, Any, Any]]:
    """Field-by-field differences between two versions of one agent."""
    a = version_get(tenant=tenant, agent=agent, version_id=a_id)
    b = version_get(tenant=tenant, agent=agent, version_id=b_id)
    return diff(a.config, b.config)


def draft_get(*, tenant: Tenant, agent: Agent) -> AgentVersion | None:
    return (
        AgentVersion.objects.for_tenant(tenant)
        .filter(agent=agent, state=VersionState.DRAFT)
        .first()
    )


def working_version(*, tenant: Tenant, agent: Agent) -> AgentVersion | None:
    """What the editor shows: the draft if there is one, else the published version."""
    return draft_get(tenant=tenant, agent=agent) or agent.published_version

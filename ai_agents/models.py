"""Agents, their immutable versions, model providers and MCP servers. All tenant-owned."""

from __future__ import annotations

import uuid

from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.db.models import Q
from django.utils import timezone

from tenants.models import User
from tenants.scoping import TenantOwned


class ProviderApi(models.TextChoices):
    CHAT = "chat_completions", "Chat Completions"
    RESPONSES = "responses", "Responses"


class ModelProvider(TenantOwned):
    """An OpenAI-compatible endpoint (OpenAI, Gemini's compatible endpoint, Ollama, vLLM, ...).

    The built-in offline model needs no provider row: an agent without a provider uses it. The API
    key is stored encrypted (controlplane.crypto); only its last four characters are kept
    in clear, for display.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=100)
    api = models.CharField(max_length=20, choices=ProviderApi.choices, default=ProviderApi.CHAT)
    base_url = models.URLField(max_length=500)
    default_model = models.CharField(max_length=200)
    api_key_encrypted = models.TextField(blank=True)
    api_key_last4 = models.CharField(max_length=4, blank=True)
    timeout_seconds = models.FloatField(default=60.0)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    created_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="provider_name_unique"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def has_api_key(self) -> bool:
        return bool(self.api_key_encrypted)


class McpTransport(models.TextChoices):
    STREAMABLE_HTTP = "streamable_http", "Streamable HTTP"
    SSE = "sse", "Server-sent events (SSE)"


class McpServer(TenantOwned):
    """A tenant's MCP server, reached over HTTP only (never stdio: that would run a tenant's
    program on our hosts). Header values are encrypted; their names are kept for display."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=100)
    transport = models.CharField(
        max_length=20, choices=McpTransport.choices, default=McpTransport.STREAMABLE_HTTP
    )
    url = models.URLField(max_length=500)
    headers_encrypted = models.TextField(blank=True)
    header_names = ArrayField(models.CharField(max_length=100), default=list, blank=True)
    tool_allowlist = ArrayField(models.CharField(max_length=128), default=list, blank=True)
    timeout_seconds = models.FloatField(default=10.0)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    created_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="mcp_server_name_unique"),
        ]

    def __str__(self) -> str:
        return self.name


class AgentStatus(models.TextChoices):
    DRAFT = "draft", "Draft"  # never published
    ACTIVE = "active", "Active"  # has a published version
    ARCHIVED = "archived", "Archived"


class Agent(TenantOwned):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=100)
    slug = models.SlugField(max_length=60)
    description = models.TextField(blank=True)
    status = models.CharField(max_length=10, choices=AgentStatus.choices, default=AgentStatus.DRAFT)
    published_version = models.ForeignKey(
        "AgentVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    created_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "slug"], name="agent_slug_unique"),
        ]

    def __str__(self) -> str:
        return self.name


class VersionState(models.TextChoices):
    DRAFT = "draft", "Draft"
    PUBLISHED = "published", "Published"


class AgentVersion(TenantOwned):
    """One configuration of an agent. A draft is edited in place; publishing freezes it with the
    next number, and a published version is never changed again (restoring copies it)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="versions")
    state = models.CharField(
        max_length=10, choices=VersionState.choices, default=VersionState.DRAFT
    )
    number = models.PositiveIntegerField(null=True, blank=True)
    # The whole configuration, validated by ai_agents.config.AgentConfig.
    config = models.JSONField(default=dict)
    note = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    published_at = models.DateTimeField(null=True, blank=True)
    published_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["agent"], condition=Q(state="draft"), name="agentversion_one_draft"
            ),
            models.UniqueConstraint(fields=["agent", "number"], name="agentversion_number_unique"),
            models.CheckConstraint(
                condition=Q(state="draft", number__isnull=True)
                | Q(state="published", number__isnull=False),
                name="agentversion_number_iff_published",
            ),
        ]
        ordering = ["-number"]

    def __str__(self) -> str:
        return f"v{self.number}" if self.number else "draft"


class PlaygroundRun(TenantOwned):
    """One run from the playground or `POST /agents/{id}/draft/run`, kept with its trace so it can
    be inspected afterwards. Conversation runs have their own table; this one records tests of a
    configuration."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="playground_runs")
    # The exact configuration that ran: the version row (draft or published) and, if it was
    # published, its number. A draft that is edited later keeps its id but not its content,
    # so the configuration is copied too.
    version = models.ForeignKey(
        AgentVersion, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    version_number = models.PositiveIntegerField(null=True, blank=True)
    config = models.JSONField(default=dict)
    input = models.TextField()
    status = models.CharField(max_length=16)
    output = models.JSONField(null=True, blank=True)
    message = models.TextField(blank=True)
    last_agent = models.CharField(max_length=100, blank=True)
    trace = models.JSONField(default=list)
    usage = models.JSONField(default=dict)
    duration_ms = models.PositiveIntegerField(default=0)
    created_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            models.Index(fields=["tenant", "agent", "-created_at"], name="playgroundrun_recent")
        ]

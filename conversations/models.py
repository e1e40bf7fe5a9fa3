"""Threads, their conversation items, and runs. All tenant-owned.

Correctness comes from PostgreSQL (DESIGN.md, "A run, end to end"): one active run per thread is
a partial unique index; items are written by the run that produced them, so a rolled-back run
takes its items with it.
"""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q
from django.utils import timezone

from ai_agents.models import Agent, AgentVersion
from tenants.models import ApiKey, User
from tenants.scoping import TenantOwned


class EndUserKind(models.TextChoices):
    MEMBER = "member", "Member of the tenant (browser chat)"
    EXTERNAL = "external", "External user named by an integrator"


class EndUser(TenantOwned):
    """Who a thread belongs to: a member chatting in the browser, or an integrator's user,
    named by an external id that is unique within the tenant."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(max_length=10, choices=EndUserKind.choices)
    user = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    external_id = models.CharField(max_length=200, blank=True)
    display_name = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "user"],
                condition=Q(user__isnull=False),
                name="enduser_member_once",
            ),
            models.UniqueConstraint(
                fields=["tenant", "external_id"],
                condition=~Q(external_id=""),
                name="enduser_external_once",
            ),
            models.CheckConstraint(
                condition=(Q(kind="member", user__isnull=False, external_id=""))
                | (Q(kind="external", user__isnull=True) & ~Q(external_id="")),
                name="enduser_kind_matches",
            ),
        ]

    def __str__(self) -> str:
        return self.display_name or self.external_id or str(self.user_id)


class ThreadStatus(models.TextChoices):
    IDLE = "idle", "Idle"
    BUSY = "busy", "Busy"
    INTERRUPTED = "interrupted", "Interrupted"
    ERROR = "error", "Error"


class Thread(TenantOwned):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="threads")
    end_user = models.ForeignKey(EndUser, on_delete=models.CASCADE, related_name="threads")
    title = models.CharField(max_length=200, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    status = models.CharField(
        max_length=12, choices=ThreadStatus.choices, default=ThreadStatus.IDLE
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            models.Index(fields=["tenant", "end_user", "-updated_at"], name="thread_user_recent"),
            models.Index(fields=["tenant", "agent", "-updated_at"], name="thread_agent_recent"),
        ]

    def __str__(self) -> str:
        return self.title or f"Thread {self.pk}"


class RunStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    SUCCESS = "success", "Success"
    ERROR = "error", "Error"
    CANCELLED = "cancelled", "Cancelled"
    INTERRUPTED = "interrupted", "Interrupted"
    TIMEOUT = "timeout", "Timed out"


ACTIVE_STATUSES = (RunStatus.PENDING, RunStatus.RUNNING)
FINAL_STATUSES = (
    RunStatus.SUCCESS,
    RunStatus.ERROR,
    RunStatus.CANCELLED,
    RunStatus.INTERRUPTED,
    RunStatus.TIMEOUT,
)


class MultitaskStrategy(models.TextChoices):
    """What a new message does while the thread has an active run ("double texting")."""

    REJECT = "reject", "Reject the new message"
    ENQUEUE = "enqueue", "Run it after the active run"
    INTERRUPT = "interrupt", "Interrupt the active run, keep what it said"
    ROLLBACK = "rollback", "Cancel the active run and forget it"


class RunSource(models.TextChoices):
    CHAT = "chat", "Browser chat"
    API = "api", "REST API"
    SCHEDULE = "schedule", "Schedule"
    TRIGGER = "trigger", "Event trigger"


class Run(TenantOwned):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    thread = models.ForeignKey(Thread, on_delete=models.CASCADE, related_name="runs")
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="runs")
    version = models.ForeignKey(AgentVersion, on_delete=models.PROTECT, related_name="+")
    end_user = models.ForeignKey(EndUser, on_delete=models.CASCADE, related_name="runs")
    status = models.CharField(max_length=12, choices=RunStatus.choices, default=RunStatus.PENDING)
    # An enqueued run waits (pending) behind the active one and is not itself active.
    queued = models.BooleanField(default=False)
    # Taken back by its end user while it waited in line ("Don't send"): cancelled before it
    # started, and its question never joined the conversation (`services.run_withdraw`).
    withdrawn = models.BooleanField(default=False, db_default=False)
    strategy = models.CharField(
        max_length=10, choices=MultitaskStrategy.choices, default=MultitaskStrategy.REJECT
    )
    source = models.CharField(max_length=10, choices=RunSource.choices)
    # The new input items (SDK Responses format); they join the thread when the run starts.
    input = models.JSONField(default=list)
    metadata = models.JSONField(default=dict, blank=True)
    # Execution (DESIGN.md step 6): each attempt takes a lease renewed by a heartbeat; writes of
    # an attempt are fenced on `attempt`.
    attempt = models.PositiveIntegerField(default=0)
    lease_owner = models.CharField(max_length=200, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # Set once a tool that may change the world started (an MCP tool, another agent): such a
    # run is not retried after its worker dies, so the effect cannot happen twice.
    side_effects = models.BooleanField(default=False)
    # Outcome.
    output = models.JSONField(null=True, blank=True)
    # Why it did not succeed, for whoever runs the agent (the run inspector); what its end user
    # is told instead when that reason is theirs to act on (a refused key); empty: `error`.
    error = models.TextField(blank=True)
    end_user_error = models.TextField(blank=True, default="", db_default="")
    trace = models.JSONField(default=list, blank=True)
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    total_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=12, decimal_places=6, default=0)  # of priced calls
    # Tokens of calls whose model had no price: their cost is unknown, not 0.
    unpriced_tokens = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    api_key = models.ForeignKey(
        ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        constraints = [
            # The rule the whole run lifecycle leans on: at most one active run per thread.
            models.UniqueConstraint(
                fields=["thread"],
                condition=Q(status__in=["pending", "running"], queued=False),
                name="run_one_active_per_thread",
            ),
        ]
        indexes = [
            models.Index(fields=["tenant", "-created_at"], name="run_tenant_recent"),
            models.Index(fields=["tenant", "agent", "-created_at"], name="run_agent_recent"),
            # The run inspector's filters by status and by end user.
            models.Index(fields=["tenant", "status", "-created_at"], name="run_status_recent"),
            models.Index(fields=["tenant", "end_user", "-created_at"], name="run_user_recent"),
            models.Index(fields=["thread", "queued", "created_at"], name="run_thread_queue"),
            models.Index(
                fields=["lease_expires_at"], condition=Q(status="running"), name="run_running_lease"
            ),
        ]

    def __str__(self) -> str:
        return f"Run {self.pk} ({self.status})"

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_STATUSES and not self.queued


class Item(TenantOwned):
    """One conversation item of a thread, as the Agents SDK has it (Responses format): user and
    assistant messages, tool calls and outputs, handoffs. Ordered by `id`."""

    id = models.BigAutoField(primary_key=True)
    thread = models.ForeignKey(Thread, on_delete=models.CASCADE, related_name="items")
    run = models.ForeignKey(
        Run, null=True, blank=True, on_delete=models.CASCADE, related_name="items"
    )
    data = models.JSONField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["thread", "id"], name="item_thread_order")]

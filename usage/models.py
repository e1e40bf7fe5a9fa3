"""Usage and cost: the tenant's price table, one record per model call, the monthly budget and
the running monthly counter that the budget is checked against. All tenant-owned.

Amounts are US dollars as `Decimal`, prices per one million tokens.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

from django.db import models
from django.db.models import Q
from django.utils import timezone

from tenants.models import ApiKey, User
from tenants.scoping import TenantOwned

# Prices: up to $999,999.999999 per 1M tokens. Costs: 8 decimal places (a call may cost $1e-7).


class ModelPrice(TenantOwned):
    """What one model costs, per million tokens. `provider` narrows the price to one of the
    tenant's providers; without it the price holds for that model name at any provider. A price
    for the same name at a specific provider wins over the general one."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    model = models.CharField(max_length=200)
    provider = models.ForeignKey(
        "agents.ModelProvider", null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    input_per_million = models.DecimalField(max_digits=12, decimal_places=6)
    # None: cached input tokens cost the same as other input tokens.
    cached_input_per_million = models.DecimalField(
        null=True, blank=True, max_digits=12, decimal_places=6
    )
    output_per_million = models.DecimalField(max_digits=12, decimal_places=6)
    note = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "model"],
                condition=Q(provider__isnull=True),
                name="modelprice_model_once",
            ),
            models.UniqueConstraint(
                fields=["tenant", "provider", "model"],
                condition=Q(provider__isnull=False),
                name="modelprice_provider_model_once",
            ),
            models.CheckConstraint(
                condition=Q(input_per_million__gte=0)
                & Q(output_per_million__gte=0)
                & (Q(cached_input_per_million__isnull=True) | Q(cached_input_per_million__gte=0)),
                name="modelprice_not_negative",
            ),
        ]
        ordering = ["model"]

    def __str__(self) -> str:
        return self.model


class UsageSource(models.TextChoices):
    CHAT = "chat", "Browser chat"
    API = "api", "REST API"
    SCHEDULE = "schedule", "Schedule"
    TRIGGER = "trigger", "Event trigger"
    PLAYGROUND = "playground", "Playground / draft run"


class UsageRecord(TenantOwned):
    """One model call: its tokens, what it cost when it was made (None: the model had no price),
    and who it is attributed to. Records outlive the runs, agents and keys they point at (the
    references become null; the names are kept)."""

    id = models.BigAutoField(primary_key=True)
    created_at = models.DateTimeField(default=timezone.now)
    source = models.CharField(max_length=12, choices=UsageSource.choices)
    agent = models.ForeignKey(
        "agents.Agent", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    agent_name = models.CharField(max_length=100, blank=True)
    version = models.ForeignKey(
        "agents.AgentVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    version_number = models.PositiveIntegerField(null=True, blank=True)  # None: a draft
    end_user = models.ForeignKey(
        "conversations.EndUser",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    api_key = models.ForeignKey(
        ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    user = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    run = models.ForeignKey(
        "conversations.Run", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    thread = models.ForeignKey(
        "conversations.Thread", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    playground_run = models.ForeignKey(
        "agents.PlaygroundRun",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    provider = models.ForeignKey(
        "agents.ModelProvider", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    provider_name = models.CharField(max_length=100, blank=True)  # "builtin": the offline model
    model = models.CharField(max_length=200)
    called_agent = models.CharField(max_length=100, blank=True)  # a handoff target, a classifier
    input_tokens = models.PositiveIntegerField(default=0)
    cached_input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    total_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(null=True, blank=True, max_digits=18, decimal_places=8)

    class Meta:
        indexes = [
            models.Index(fields=["tenant", "created_at"], name="usage_tenant_time"),
            models.Index(fields=["tenant", "agent", "created_at"], name="usage_agent_time"),
            models.Index(fields=["tenant", "end_user", "created_at"], name="usage_enduser_time"),
        ]


# The largest limits a budget may set: far beyond any tenant's month, and well inside what the
# columns hold (a bigint; 14 digits with 2 for the cents), so a typo of a few extra zeros gets a
# plain answer naming the field instead of a database limit.
TOKEN_LIMIT_MAX = 1_000_000_000_000
COST_LIMIT_MAX = Decimal("1000000000")


class Budget(TenantOwned):
    """The tenant's monthly budget: tokens and/or cost (None: no limit of that kind). At
    `warn_percent` of a limit admins are warned; at the limit new runs are refused until the
    month (UTC) ends."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    token_limit = models.PositiveBigIntegerField(null=True, blank=True)
    cost_limit = models.DecimalField(null=True, blank=True, max_digits=14, decimal_places=2)
    warn_percent = models.PositiveSmallIntegerField(default=80)
    updated_at = models.DateTimeField(default=timezone.now)
    updated_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant"], name="budget_one_per_tenant"),
            models.CheckConstraint(
                condition=Q(warn_percent__gte=1, warn_percent__lte=100),
                name="budget_warn_percent_range",
            ),
        ]

    def __str__(self) -> str:
        return "Monthly budget"


class MonthlyUsage(TenantOwned):
    """The running total of one tenant for one calendar month (UTC), added to in the transaction
    that records the calls, so the budget check before a run is one indexed read (never a sum
    over the month's records)."""

    id = models.BigAutoField(primary_key=True)
    month = models.DateField()  # the first day of the month
    total_tokens = models.PositiveBigIntegerField(default=0)
    cost = models.DecimalField(default=0, max_digits=18, decimal_places=8)
    unpriced_tokens = models.PositiveBigIntegerField(default=0)
    calls = models.PositiveIntegerField(default=0)
    # When the month crossed the warning threshold and the limit: each is audited once a month.
    warned_at = models.DateTimeField(null=True, blank=True)
    exhausted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "month"], name="monthlyusage_once"),
        ]

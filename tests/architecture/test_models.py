"""Every model is classified: tenant-owned (scoped, fail-closed) or global (with the reason)."""

from django.apps import apps

from tenants.scoping import TenantOwned, TenantScopedManager

TENANT_OWNED = {
    "tenants.Membership": "a user's role in one tenant",
    "tenants.Invitation": "an invitation into one tenant",
    "tenants.ApiKey": "a credential that acts as one tenant",
    "tenants.AuditEvent": "one tenant's history",
    "agents.Agent": "a tenant's agent",
    "agents.AgentVersion": "a configuration of one tenant's agent",
    "agents.ModelProvider": "a tenant's model endpoint and its encrypted key",
    "agents.McpServer": "a tenant's MCP server and its encrypted headers",
    "agents.PlaygroundRun": "a test run of one tenant's agent, with its trace",
    "conversations.EndUser": "a person a tenant's threads belong to",
    "conversations.Thread": "a conversation with one tenant's agent",
    "conversations.Run": "one execution of a tenant's agent on a thread",
    "conversations.Item": "one conversation item of a tenant's thread",
    "usage.ModelPrice": "a tenant's price for one model",
    "usage.UsageRecord": "one model call of a tenant's agent, with its tokens and cost",
    "usage.Budget": "a tenant's monthly budget",
    "usage.MonthlyUsage": "a tenant's running total for one month",
}

GLOBAL = {
    "tenants.Tenant": "the root every tenant-owned row points at",
    "tenants.User": "one person can belong to several tenants; access is through Membership",
    "auth.Permission": "Django's permission catalogue; unused by tenant access control",
    "auth.Group": "Django's groups; unused, roles live on Membership",
    "contenttypes.ContentType": "Django's model registry",
    "sessions.Session": "a browser session belongs to a user, not to a tenant",
    "django_celery_beat.PeriodicTask": "beat's schedule table; tenant schedules point at it and "
    "keep the tenant on their own row",
    "django_celery_beat.PeriodicTasks": "beat's change marker",
    "django_celery_beat.IntervalSchedule": "shared schedule shapes (every N seconds)",
    "django_celery_beat.CrontabSchedule": "shared schedule shapes (crontab)",
    "django_celery_beat.SolarSchedule": "shared schedule shapes (solar events)",
    "django_celery_beat.ClockedSchedule": "shared schedule shapes (one moment)",
    "axes.AccessAttempt": "login throttling by user name and IP, before any tenant is known "
    "(the cache handler is used, so this table stays empty)",
    "axes.AccessLog": "login history of the throttling app (unused with the cache handler)",
    "axes.AccessFailureLog": "failed logins of the throttling app (unused with the cache handler)",
    "axes.AccessAttemptExpiration": "expiry of throttling records (unused with the cache handler)",
}


def _label(model) -> str:
    return f"{model._meta.app_label}.{model.__name__}"


def test_every_model_is_classified_with_a_reason():
    labels = {_label(m) for m in apps.get_models()}
    unclassified = sorted(labels - TENANT_OWNED.keys() - GLOBAL.keys())
    assert not unclassified, (
        f"Classify these models in {__file__}: tenant-owned (inherit tenants.scoping.TenantOwned) "
        f"or global with a reason: {unclassified}"
    )
    assert not (TENANT_OWNED.keys() & GLOBAL.keys())
    assert all(reason.strip() for reason in {**TENANT_OWNED, **GLOBAL}.values())
    stale = sorted((TENANT_OWNED.keys() | GLOBAL.keys()) - labels)
    assert not stale, f"These classified models no longer exist: {stale}"


def test_tenant_owned_models_carry_a_tenant_and_the_fail_closed_manager():
    for model in apps.get_models():
        label = _label(model)
        has_tenant = any(f.name == "tenant" for f in model._meta.get_fields())
        if label in TENANT_OWNED:
            assert issubclass(model, TenantOwned), f"{label} must inherit TenantOwned"
            field = model._meta.get_field("tenant")
            assert not field.null, f"{label}.tenant must be NOT NULL"
            assert isinstance(model._default_manager, TenantScopedManager), label
        else:
            # A global model that points at a tenant is almost always a misclassified one.
            assert not has_tenant or label == "tenants.Tenant", f"{label} has a tenant: classify it"

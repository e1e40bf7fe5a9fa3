"""The audit log, written by services inside their transaction: who did what to which object."""

from __future__ import annotations

from typing import Any

from django.db import models

from tenants.actors import Actor
from tenants.models import AuditEvent, Tenant

# Field names whose values never enter the log, whatever the model.
SECRET_FIELDS = frozenset({"password", "key_hash", "api_key", "secret", "token", "headers"})


def _plain(value: Any) -> Any:
    if isinstance(value, models.Model):
        return str(value.pk)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool, dict)):
        return value
    return str(value)


def changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[Any]]:
    """{field: [before, after]} for changed fields; a secret field says only that it changed."""
    out: dict[str, list[Any]] = {}
    for field in sorted(set(before) | set(after)):
        old, new = before.get(field), after.get(field)
        if old == new:
            continue
        if field in SECRET_FIELDS:
            out[field] = ["(secret)", "(changed)"]
        else:
            out[field] = [_plain(old), _plain(new)]
    return out


def audit_changes(
    *,
    tenant: Tenant,
    actor: Actor,
    action: str,
    target: models.Model,
    before: dict[str, Any],
    after: dict[str, Any],
) -> AuditEvent | None:
    """Record an update with its {field: [before, after]}, or nothing when nothing changed."""
    change_set = changes(before, after)
    if not change_set:
        return None
    return audit_record(
        tenant=tenant, actor=actor, action=action, target=target, change_set=change_set
    )


def audit_record(
    *,
    tenant: Tenant,
    actor: Actor,
    action: str,
    target: models.Model | None = None,
    target_type: str = "",
    target_label: str = "",
    change_set: dict[str, list[Any]] | None = None,
) -> AuditEvent:
    return AuditEvent.objects.create(
        tenant=tenant,
        actor_user=actor.user,
        actor_api_key=actor.api_key,
        actor_label=actor.label,
        action=action,
        target_type=target_type or (target._meta.model_name if target is not None else ""),
        target_id=str(target.pk) if target is not None else "",
        target_label=(target_label or str(target))[:255] if target is not None else target_label,
        changes=change_set or {},
        ip_address=actor.ip_address,
    )

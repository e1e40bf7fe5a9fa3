"""Channel-layer groups through which services reach open websockets.

The layer is at-most-once: good for waking and closing connections, never for data that matters.
Every function here is meant to be called on commit (`transaction.on_commit`).
"""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

log = logging.getLogger(__name__)


def tenant_group(tenant_id: Any) -> str:
    return f"tenant.{tenant_id}"


def membership_group(membership_id: Any) -> str:
    return f"membership.{membership_id}"


def user_group(user_id: Any) -> str:
    return f"user.{user_id}"


def api_key_group(api_key_id: Any) -> str:
    return f"apikey.{api_key_id}"


def _send(group: str, message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group, message)
    except Exception:  # the layer is best effort; the database already holds the truth
        log.warning("could not notify %s", group, exc_info=True)


def role_changed(membership_id: Any, role: str) -> None:
    """Tell the member's open connections their new role."""
    _send(membership_group(membership_id), {"type": "membership.role", "role": role})


def close_connections(group: str, *, reason: str) -> None:
    """Ask every consumer in `group` to close (revocation reaches open connections)."""
    _send(group, {"type": "connection.revoke", "reason": reason})


def publish(tenant_id: Any, event: dict[str, Any]) -> None:
    """Wake live dashboards of a tenant (they re-read what they show)."""
    _send(tenant_group(tenant_id), {"type": "tenant.event", "event": event})

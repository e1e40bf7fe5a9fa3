"""The tenant's live-event websocket: `/ws/t/<slug>/events/`.

Authenticates the session, checks membership of the tenant in the route before accepting (another
tenant's slug is refused exactly like an unknown one), and closes when the membership is removed or
the user logs out. It relays wake-up events only; pages re-read their data over HTTP.
"""

from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from controlplane.errors import NotFound
from tenants import realtime, selectors

CLOSE_NOT_FOUND = 4404
CLOSE_REVOKED = 4403
CLOSE_UNAUTHENTICATED = 4401


class TenantEventsConsumer(AsyncJsonWebsocketConsumer):
    groups: list[str] = []

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        slug = self.scope["url_route"]["kwargs"]["tenant_slug"]
        try:
            membership = await database_sync_to_async(selectors.membership_for)(
                slug=slug, user=user
            )
        except NotFound:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.membership = membership
        self.revoked = False
        self.joined = [
            realtime.tenant_group(membership.tenant_id),
            realtime.membership_group(membership.pk),
            realtime.user_group(user.pk),
        ]
        for group in self.joined:
            await self.channel_layer.group_add(group, self.channel_name)
        # A removal that committed between the lookup and joining the groups sent its revoke to
        # nobody: look again now that any later revoke will reach us.
        try:
            await database_sync_to_async(selectors.membership_for)(slug=slug, user=user)
        except NotFound:
            await self._leave()
            await self.close(code=CLOSE_NOT_FOUND)
            return
        await self.accept()
        await self.send_json(
            {"type": "hello", "tenant": membership.tenant.slug, "role": membership.role}
        )

    async def disconnect(self, code: int) -> None:
        await self._leave()

    async def _leave(self) -> None:
        for group in getattr(self, "joined", []):
            await self.channel_layer.group_discard(group, self.channel_name)
        self.joined = []

    async def receive_json(self, content, **kwargs) -> None:
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong"})

    async def tenant_event(self, message: dict) -> None:
        if self.revoked:  # events queued before the revoke are not for this connection any more
            return
        await self.send_json({"type": "event", "event": message.get("event", {})})

    async def membership_role(self, message: dict) -> None:
        self.membership.role = str(message.get("role", self.membership.role))

    async def connection_revoke(self, message: dict) -> None:
        if self.revoked:
            return
        self.revoked = True
        await self._leave()
        await self.send_json({"type": "revoked", "reason": message.get("reason", "")})
        await self.close(code=CLOSE_REVOKED)

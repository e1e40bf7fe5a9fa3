"""Every websocket route of the product (tests/architecture/ classifies each one)."""

from django.urls import path

from conversations import consumers as chat_consumers
from tenants import consumers as tenant_consumers

websocket_urlpatterns = [
    path(
        "ws/t/<slug:tenant_slug>/events/",
        tenant_consumers.TenantEventsConsumer.as_asgi(),
        name="ws-tenant-events",
    ),
    path(
        "ws/t/<slug:tenant_slug>/chat/<uuid:thread_id>/",
        chat_consumers.ChatConsumer.as_asgi(),
        name="ws-chat-thread",
    ),
]

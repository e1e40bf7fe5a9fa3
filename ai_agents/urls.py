"""Dashboard routes of the agents app, mounted under /t/<tenant_slug>/."""

from django.urls import path

from ai_agents import views

urlpatterns = [
    path("agents/", views.agent_list, name="agent-list"),
    path("agents/create/", views.agent_create, name="agent-create"),
    path("agents/<uuid:agent_id>/", views.agent_detail, name="agent-detail"),
    path("agents/<uuid:agent_id>/details/", views.agent_update, name="agent-update"),
    path("agents/<uuid:agent_id>/publish/", views.agent_publish, name="agent-publish"),
    path("agents/<uuid:agent_id>/delete/", views.agent_delete, name="agent-delete"),
    path("agents/<uuid:agent_id>/playground/", views.agent_playground, name="agent-playground"),
    path("agents/<uuid:agent_id>/versions/", views.agent_versions, name="agent-versions"),
    path(
        "agents/<uuid:agent_id>/versions/<uuid:version_id>/restore/",
        views.agent_restore,
        name="agent-restore",
    ),
    path("agents/<uuid:agent_id>/compare/", views.agent_compare, name="agent-compare"),
    path("providers/", views.provider_list, name="provider-list"),
    path("providers/create/", views.provider_create, name="provider-create"),
    path("providers/<uuid:provider_id>/", views.provider_detail, name="provider-detail"),
    path("providers/<uuid:provider_id>/delete/", views.provider_delete, name="provider-delete"),
    path("providers/<uuid:provider_id>/test/", views.provider_test, name="provider-test"),
    path("mcp-servers/", views.mcp_server_list, name="mcp-server-list"),
    path("mcp-servers/create/", views.mcp_server_create, name="mcp-server-create"),
    path("mcp-servers/<uuid:server_id>/", views.mcp_server_detail, name="mcp-server-detail"),
    path("mcp-servers/<uuid:server_id>/delete/", views.mcp_server_delete, name="mcp-server-delete"),
    path("mcp-servers/<uuid:server_id>/tools/", views.mcp_server_tools, name="mcp-server-tools"),
]

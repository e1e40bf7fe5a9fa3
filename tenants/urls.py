from django.contrib.auth import views as auth_views
from django.urls import URLPattern, URLResolver, include, path

from tenants import forms, views

account_patterns = [
    path(
        "login/",
        auth_views.LoginView.as_view(
            authentication_form=forms.LoginForm, redirect_authenticated_user=True
        ),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("signup/", views.signup, name="signup"),
    path("password/change/", views.PasswordChangeView.as_view(), name="password_change"),
    path(
        "password/change/done/",
        auth_views.PasswordChangeDoneView.as_view(),
        name="password_change_done",
    ),
    path("password/reset/", auth_views.PasswordResetView.as_view(), name="password_reset"),
    path(
        "password/reset/sent/",
        auth_views.PasswordResetDoneView.as_view(),
        name="password_reset_done",
    ),
    path(
        "password/reset/<uidb64>/<token>/",
        auth_views.PasswordResetConfirmView.as_view(),
        name="password_reset_confirm",
    ),
    path(
        "password/reset/done/",
        auth_views.PasswordResetCompleteView.as_view(),
        name="password_reset_complete",
    ),
    path("invite/<str:token>/", views.invitation_accept, name="invitation-accept"),
    path("tenants/new/", views.tenant_create, name="tenant-create"),
]

tenant_patterns: list[URLPattern | URLResolver] = [
    path("", views.tenant_overview, name="tenant-overview"),
    path("settings/", views.tenant_settings, name="tenant-settings"),
    path("settings/limits/", views.tenant_limits, name="tenant-limits"),
    path("members/", views.member_list, name="member-list"),
    path("members/invite/", views.member_invite, name="member-invite"),
    path("members/<uuid:membership_id>/role/", views.member_change_role, name="member-change-role"),
    path("members/<uuid:membership_id>/remove/", views.member_remove, name="member-remove"),
    path(
        "invitations/<uuid:invitation_id>/revoke/",
        views.invitation_revoke,
        name="invitation-revoke",
    ),
    path("api-keys/", views.api_key_list, name="api-key-list"),
    path("api-keys/create/", views.api_key_create, name="api-key-create"),
    path("api-keys/<uuid:api_key_id>/revoke/", views.api_key_revoke, name="api-key-revoke"),
    path("api-keys/<uuid:api_key_id>/limits/", views.api_key_limits, name="api-key-limits"),
    path("audit/", views.audit_log, name="audit-log"),
    path("", include("ai_agents.urls")),
    path("", include("conversations.urls")),
    path("", include("usage.urls")),
]

urlpatterns = [
    path("", views.home, name="home"),
    path("", include(account_patterns)),
    path("t/<slug:tenant_slug>/", include(tenant_patterns)),
]

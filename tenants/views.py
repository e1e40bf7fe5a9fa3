"""Dashboard pages for accounts, tenants, members, API keys, settings and the audit log.

Views parse, call one service or selector with `tenant=request.tenant`, and render. The tenant comes
only from the URL and is checked against the signed-in user's membership by `tenant_view`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial, wraps
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.paginator import Paginator
from django.db import transaction
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from controlplane.errors import NotFound, PermissionDenied, ValidationFailed
from tenants import forms, limits, realtime, selectors, services
from tenants.actors import Actor
from tenants.models import Role
from tenants.requests import AuthenticatedRequest, TenantRequest

View = Callable[..., HttpResponse]


def client_ip(request: HttpRequest) -> str | None:
    return request.META.get("REMOTE_ADDR")


def tenant_view(*, manage: bool = False) -> Callable[[View], View]:
    """Resolve `/t/<tenant_slug>/` against the user's memberships: 404 for a tenant they are not in.

    With `manage=True` only owners and admins get through; members see a 403 page that says so.
    """

    def decorator(view: View) -> View:
        @login_required
        @wraps(view)
        def wrapper(
            request: TenantRequest, tenant_slug: str, *args: Any, **kwargs: Any
        ) -> HttpResponse:
            try:
                membership = selectors.membership_for(slug=tenant_slug, user=request.user)
            except NotFound:
                raise Http404("No such tenant")
            if manage and not membership.can_manage:
                raise DjangoPermissionDenied("Only owners and admins can manage this tenant.")
            request.tenant = membership.tenant
            request.membership = membership
            request.actor = Actor(
                user=request.user, membership=membership, ip_address=client_ip(request)
            )
            return view(request, *args, **kwargs)

        return wrapper

    return decorator


def _back(request: TenantRequest, name: str) -> HttpResponse:
    return redirect(name, tenant_slug=request.tenant.slug)


class PasswordChangeView(auth_views.PasswordChangeView):
    """Django's view; a new password also ends the user's open websockets in other browsers."""

    def form_valid(self, form):  # type: ignore[no-untyped-def]
        response = super().form_valid(form)
        group = realtime.user_group(self.request.user.pk)
        transaction.on_commit(partial(realtime.close_connections, group, reason="password changed"))
        return response


# --- Home, sign-up, tenants -------------------------------------------------------------------


@login_required
def home(request: AuthenticatedRequest) -> HttpResponse:
    memberships = selectors.membership_list_for_user(user=request.user)
    if not memberships:
        return redirect("tenant-create")
    return redirect("tenant-overview", tenant_slug=memberships[0].tenant.slug)


def signup(request: HttpRequest) -> HttpResponse:
    if not settings.SIGNUP_ENABLED:
        return render(request, "registration/signup_closed.html", status=403)
    if request.user.is_authenticated:
        return redirect("home")
    form = forms.SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            user, tenant = services.signup(
                email=form.cleaned_data["email"],
                password=form.cleaned_data["password1"],
                name=form.cleaned_data["name"],
                tenant_name=form.cleaned_data["tenant_name"],
                ip_address=client_ip(request),
            )
        except ValidationFailed as exc:
            forms.apply_domain_errors(form, exc)
        else:
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            messages.success(request, f"Welcome! {tenant.name} is ready.")
            return redirect("tenant-overview", tenant_slug=tenant.slug)
    return render(request, "registration/signup.html", {"form": form})


@login_required
def tenant_create(request: AuthenticatedRequest) -> HttpResponse:
    form = forms.TenantForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            tenant = services.tenant_create(
                user=request.user,
                name=form.cleaned_data["name"],
                slug=form.cleaned_data["slug"],
                ip_address=client_ip(request),
            )
        except ValidationFailed as exc:
            forms.apply_domain_errors(form, exc)
        else:
            messages.success(request, f"{tenant.name} is created. You are its owner.")
            return redirect("tenant-overview", tenant_slug=tenant.slug)
    return render(request, "tenants/tenant_create.html", {"form": form})


@tenant_view()
def tenant_overview(request: TenantRequest) -> HttpResponse:
    tenant = request.tenant
    context: dict[str, Any] = {}
    if request.membership.can_manage:
        context = {
            "member_count": selectors.membership_list(tenant=tenant).count(),
            "pending_invitations": selectors.invitation_list_pending(tenant=tenant).count(),
            "active_keys": selectors.api_key_list(tenant=tenant, include_revoked=False).count(),
            "recent_events": selectors.audit_event_list(tenant=tenant)[:8],
        }
    return render(request, "tenants/overview.html", context)


def _settings_page(request: TenantRequest, status: int = 200, **forms_: Any) -> HttpResponse:
    tenant = request.tenant
    context = {
        "form": forms.TenantForm(initial={"name": tenant.name, "slug": tenant.slug}),
        "limits_form": forms.TenantLimitsForm(tenant=tenant),
        **forms_,
    }
    return render(request, "tenants/settings.html", context, status=status)


@tenant_view(manage=True)
def tenant_limits(request: TenantRequest) -> HttpResponse:
    if request.method != "POST":
        return _back(request, "tenant-settings")
    form = forms.TenantLimitsForm(request.POST, tenant=request.tenant)
    if form.is_valid():
        try:
            services.tenant_limits_update(
                tenant=request.tenant, actor=request.actor, **form.cleaned_data
            )
        except ValidationFailed as exc:
            forms.apply_domain_errors(form, exc)
        else:
            messages.success(request, "Rate limits saved.")
            return _back(request, "tenant-settings")
    return _settings_page(request, status=422, limits_form=form)


@tenant_view(manage=True)
def tenant_settings(request: TenantRequest) -> HttpResponse:
    tenant = request.tenant
    form = forms.TenantForm(
        request.POST or None, initial={"name": tenant.name, "slug": tenant.slug}
    )
    if request.method == "POST" and form.is_valid():
        try:
            services.tenant_update(
                tenant=tenant,
                actor=request.actor,
                name=form.cleaned_data["name"],
                slug=form.cleaned_data["slug"] or tenant.slug,
            )
        except ValidationFailed as exc:
            forms.apply_domain_errors(form, exc)
        else:
            messages.success(request, "Settings saved.")
            return redirect("tenant-settings", tenant_slug=tenant.slug)
    return _settings_page(request, form=form)


# --- Members and invitations -----------------------------------------------------------------


def _members_context(request: TenantRequest, **extra: Any) -> dict[str, Any]:
    tenant = request.tenant
    return {
        "memberships": selectors.membership_list(tenant=tenant),
        "invitations": selectors.invitation_list_pending(tenant=tenant),
        "roles": Role.choices,
        "invite_form": forms.InviteForm(),
        **extra,
    }


@tenant_view(manage=True)
def member_list(request: TenantRequest) -> HttpResponse:
    # Live refresh: the page re-reads its table when the tenant's event socket says members changed.
    if request.htmx and request.GET.get("fragment") == "member-table":
        return render(request, "tenants/members.html#member-table", _members_context(request))
    return render(request, "tenants/members.html", _members_context(request))


@tenant_view(manage=True)
@require_POST
def member_invite(request: TenantRequest) -> HttpResponse:
    form = forms.InviteForm(request.POST)
    link = None
    if form.is_valid():
        try:
            _, link = services.invitation_create(
                tenant=request.tenant,
                actor=request.actor,
                email=form.cleaned_data["email"],
                role=form.cleaned_data["role"],
                base_url=request.build_absolute_uri("/"),
            )
        except ValidationFailed as exc:
            forms.apply_domain_errors(form, exc)
        else:
            form = forms.InviteForm()
    context = _members_context(request, invite_form=form, invite_link=link)
    if request.htmx:
        # Retarget so one response refreshes both the form and the pending list.
        return render(request, "tenants/members.html#invitations", context, status=200)
    if link:
        messages.success(request, f"Invitation sent. Link: {link}")
        return _back(request, "member-list")
    return render(request, "tenants/members.html", context, status=422)


def _member_action(request: TenantRequest, action: Callable[[], Any], success: str) -> HttpResponse:
    try:
        action()
    except (ValidationFailed, PermissionDenied) as exc:
        error = next(iter(exc.fields.values()), None) or exc.message
        if request.htmx:
            return render(
                request,
                "tenants/members.html#member-table",
                _members_context(request, member_error=error),
            )
        messages.error(request, error)
    except NotFound:
        raise Http404("No such member")
    else:
        if request.htmx:
            return render(
                request,
                "tenants/members.html#member-table",
                _members_context(request, member_notice=success),
            )
        messages.success(request, success)
    return _back(request, "member-list")


@tenant_view(manage=True)
@require_POST
def member_change_role(request: TenantRequest, membership_id: str) -> HttpResponse:
    form = forms.RoleForm(request.POST)
    role = form.cleaned_data["role"] if form.is_valid() else request.POST.get("role", "")
    return _member_action(
        request,
        lambda: services.membership_change_role(
            tenant=request.tenant,
            actor=request.actor,
            membership_id=membership_id,
            role=role,
        ),
        "Role changed.",
    )


@tenant_view()
@require_POST
def member_remove(request: TenantRequest, membership_id: str) -> HttpResponse:
    leaving = str(request.membership.pk) == str(membership_id)
    if leaving:
        try:
            services.membership_remove(
                tenant=request.tenant,
                actor=request.actor,
                membership_id=membership_id,
            )
        except ValidationFailed as exc:
            messages.error(request, exc.message)
            return _back(request, "tenant-overview")
        messages.success(request, f"You left {request.tenant.name}.")
        return redirect("home")
    if not request.membership.can_manage:
        raise DjangoPermissionDenied("Only owners and admins can remove members.")
    return _member_action(
        request,
        lambda: services.membership_remove(
            tenant=request.tenant,
            actor=request.actor,
            membership_id=membership_id,
        ),
        "Member removed.",
    )


@tenant_view(manage=True)
@require_POST
def invitation_revoke(request: TenantRequest, invitation_id: str) -> HttpResponse:
    try:
        services.invitation_revoke(
            tenant=request.tenant,
            actor=request.actor,
            invitation_id=invitation_id,
        )
    except NotFound:
        raise Http404("No such invitation")
    if request.htmx:
        return render(request, "tenants/members.html#invitations", _members_context(request))
    messages.success(request, "Invitation withdrawn.")
    return _back(request, "member-list")


def invitation_accept(request: HttpRequest, token: str) -> HttpResponse:
    """The invite link. Shows why a link is unusable; never creates a membership twice."""
    try:
        invitation = services.invitation_from_token(token)
    except services.InvitationInvalid as exc:
        return render(
            request, "tenants/invitation_invalid.html", {"message": exc.message}, status=410
        )
    context: dict[str, Any] = {"invitation": invitation, "tenant": invitation.tenant}
    user = request.user
    if user.is_authenticated:
        if request.method == "POST":
            try:
                membership = services.invitation_accept(
                    token=token, user=user, ip_address=client_ip(request)
                )
            except services.InvitationInvalid as exc:
                return render(
                    request, "tenants/invitation_invalid.html", {"message": exc.message}, status=410
                )
            messages.success(
                request,
                f"You joined {membership.tenant.name} as {membership.get_role_display().lower()}.",
            )
            return redirect("tenant-overview", tenant_slug=membership.tenant.slug)
        context["wrong_user"] = user.email.lower() != invitation.email.lower()
        return render(request, "tenants/invitation_accept.html", context)
    if selectors.user_exists(email=invitation.email):
        context["login_url"] = f"{reverse('login')}?next={request.path}"
        return render(request, "tenants/invitation_accept.html", context)
    form = forms.InvitationSignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            new_user, membership = services.signup_with_invitation(
                token=token,
                password=form.cleaned_data["password1"],
                name=form.cleaned_data["name"],
                ip_address=client_ip(request),
            )
        except services.InvitationInvalid as exc:
            return render(
                request, "tenants/invitation_invalid.html", {"message": exc.message}, status=410
            )
        except ValidationFailed as exc:
            forms.apply_domain_errors(form, exc)
        else:
            login(request, new_user, backend="django.contrib.auth.backends.ModelBackend")
            messages.success(request, f"Welcome to {membership.tenant.name}!")
            return redirect("tenant-overview", tenant_slug=membership.tenant.slug)
    context["form"] = form
    return render(request, "tenants/invitation_accept.html", context)


# --- API keys ---------------------------------------------------------------------------------


def _keys_context(request: TenantRequest, **extra: Any) -> dict[str, Any]:
    tenant = request.tenant
    keys = list(selectors.api_key_list(tenant=tenant))
    editing, editing_form = extra.pop("editing", None), extra.pop("editing_form", None)
    rows = []
    for key in keys:
        if editing == str(key.pk):
            form = editing_form
        else:
            form = forms.ApiKeyLimitsForm(
                tenant=tenant,
                initial={"requests_per_minute": key.requests_per_minute,
                         "runs_per_minute": key.runs_per_minute},
                auto_id=f"id_{key.pk}_%s",
            )  # fmt: skip
        # What the key may do, and whether each number is its own or the tenant's.
        shown = [
            (label, limits.key_limit(key, field, tenant), getattr(key, field) is None)
            for field, label in (("requests_per_minute", "requests"), ("runs_per_minute", "runs"))
        ]
        rows.append({"key": key, "limits": shown, "form": form, "open": form is editing_form})
    return {"keys": rows, "form": forms.ApiKeyForm(tenant=tenant), **extra}


@tenant_view(manage=True)
def api_key_list(request: TenantRequest) -> HttpResponse:
    return render(request, "tenants/api_keys.html", _keys_context(request))


@tenant_view(manage=True)
@require_POST
def api_key_create(request: TenantRequest) -> HttpResponse:
    form = forms.ApiKeyForm(request.POST, tenant=request.tenant)
    created = raw = None
    if form.is_valid():
        try:
            created, raw = services.api_key_create(
                tenant=request.tenant,
                actor=request.actor,
                name=form.cleaned_data["name"],
                scopes=form.cleaned_data["scopes"],
                expires_at=form.expires_at(),
                requests_per_minute=form.cleaned_data["requests_per_minute"],
                runs_per_minute=form.cleaned_data["runs_per_minute"],
            )
        except ValidationFailed as exc:
            forms.apply_domain_errors(form, exc)
        else:
            form = forms.ApiKeyForm(tenant=request.tenant)
    # The secret is rendered into this one response and nowhere else, ever.
    context = _keys_context(request, form=form, created=created, raw_key=raw)
    template = "tenants/api_keys.html#keys-panel" if request.htmx else "tenants/api_keys.html"
    response = render(request, template, context, status=200 if raw or request.htmx else 422)
    response["Cache-Control"] = "no-store"
    return response


@tenant_view(manage=True)
@require_POST
def api_key_revoke(request: TenantRequest, api_key_id: str) -> HttpResponse:
    try:
        key = services.api_key_revoke(
            tenant=request.tenant,
            actor=request.actor,
            api_key_id=api_key_id,
        )
    except NotFound:
        raise Http404("No such API key")
    if request.htmx:
        return render(
            request,
            "tenants/api_keys.html#keys-panel",
            _keys_context(request, notice=f"“{key.name}” is revoked."),
        )
    messages.success(request, f"“{key.name}” is revoked.")
    return _back(request, "api-key-list")


@tenant_view(manage=True)
@require_POST
def api_key_limits(request: TenantRequest, api_key_id: str) -> HttpResponse:
    form = forms.ApiKeyLimitsForm(
        request.POST, tenant=request.tenant, auto_id=f"id_{api_key_id}_%s"
    )
    context: dict[str, Any] = {}
    if form.is_valid():
        try:
            key = services.api_key_limits_update(
                tenant=request.tenant, actor=request.actor, api_key_id=api_key_id,
                **form.cleaned_data,
            )  # fmt: skip
        except NotFound:
            raise Http404("No such API key")
        except ValidationFailed as exc:
            forms.apply_domain_errors(form, exc)
        else:
            context["notice"] = f"The limits of “{key.name}” are saved."
            if not request.htmx:
                messages.success(request, context["notice"])
                return _back(request, "api-key-list")
    if form.errors:  # shown open under the key, with the errors next to the fields
        context.update(editing=str(api_key_id), editing_form=form)
    template = "tenants/api_keys.html#keys-panel" if request.htmx else "tenants/api_keys.html"
    status = 200 if request.htmx or not form.errors else 422
    return render(request, template, _keys_context(request, **context), status=status)


# --- Audit log --------------------------------------------------------------------------------


@tenant_view(manage=True)
def audit_log(request: TenantRequest) -> HttpResponse:
    from datetime import datetime, time, timedelta

    from django.utils import timezone

    tenant = request.tenant
    form = forms.AuditFilterForm(request.GET or None)
    filters: dict[str, Any] = {}
    if form.is_valid():
        data = form.cleaned_data
        filters = {"action": data["action"], "actor": data["actor"]}
        if data["since"]:
            filters["since"] = timezone.make_aware(datetime.combine(data["since"], time.min))
        if data["until"]:
            filters["until"] = timezone.make_aware(
                datetime.combine(data["until"] + timedelta(days=1), time.min)
            )
    events = selectors.audit_event_list(tenant=tenant, **filters)
    page = Paginator(events, 50).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    context = {
        "form": form,
        "page": page,
        "actions": selectors.audit_actions(tenant=tenant),
        "query": query.urlencode(),
    }
    template = (
        "tenants/audit.html#audit-table"
        if request.htmx and not request.htmx.boosted
        else "tenants/audit.html"
    )
    return render(request, template, context)

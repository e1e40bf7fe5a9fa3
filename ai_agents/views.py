"""Dashboard pages for agents (editor, versions, playground), model providers and MCP servers.

Every page is for owners and admins (`tenant_view(manage=True)`): members get a 403 page, another
tenant's slug or object ids a 404. Views parse, call one service or selector with
`tenant=request.tenant`, and render; a form error re-renders the page with 422 (an htmx fragment
answers 200, because htmx does not swap error responses).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from typing import Any
from uuid import UUID

from asgiref.sync import async_to_sync
from django.contrib import messages
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from ai_agents import forms, selectors, services
from ai_agents.config import diff
from ai_agents.models import Agent, AgentVersion, PlaygroundRun, VersionState
from ai_agents.runtime import execute
from controlplane.errors import (
    Conflict,
    NotFound,
    QuotaExceeded,
    Unavailable,
    ValidationFailed,
)
from tenants.forms import apply_domain_errors
from tenants.requests import TenantRequest
from tenants.views import tenant_view

View = Callable[..., HttpResponse]


def not_found_is_404(view: View) -> View:
    """A selector's or service's NotFound (missing, or another tenant's) is the 404 page."""

    @wraps(view)
    def wrapper(request: TenantRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            return view(request, *args, **kwargs)
        except NotFound as exc:
            raise Http404(exc.message)

    return wrapper


def _no_store(response: HttpResponse) -> HttpResponse:
    # Pages with secret-bearing forms (provider keys, MCP headers) are not kept in caches.
    response["Cache-Control"] = "no-store"
    return response


# --- Agents -----------------------------------------------------------------------------------


def _list_context(request: TenantRequest, **extra: Any) -> dict[str, Any]:
    return {
        "agents": selectors.agent_list(tenant=request.tenant),
        "form": forms.AgentCreateForm(),
        **extra,
    }


@tenant_view(manage=True)
def agent_list(request: TenantRequest) -> HttpResponse:
    return render(request, "agents/agent_list.html", _list_context(request))


@tenant_view(manage=True)
@require_POST
def agent_create(request: TenantRequest) -> HttpResponse:
    form = forms.AgentCreateForm(request.POST)
    if form.is_valid():
        try:
            agent = services.agent_create(
                tenant=request.tenant,
                actor=request.actor,
                name=form.cleaned_data["name"],
                description=form.cleaned_data["description"],
            )
        except ValidationFailed as exc:
            apply_domain_errors(form, exc)
        else:
            messages.success(request, f"{agent.name} is created. Configure it, then publish.")
            return redirect("agent-detail", tenant_slug=request.tenant.slug, agent_id=agent.pk)
    return render(request, "agents/agent_list.html", _list_context(request, form=form), status=422)


def _editor(
    request: TenantRequest, agent: Agent, working: AgentVersion | None, data: Any = None
) -> forms.AgentEditor:
    tenant = request.tenant
    return forms.AgentEditor(
        data,
        config=working.config if working else {},
        providers=list(selectors.provider_list(tenant=tenant)),
        servers=list(selectors.mcp_server_list(tenant=tenant)),
        agents=[a for a in selectors.agent_list(tenant=tenant) if a.pk != agent.pk],
    )


def _release(agent: Agent, working: AgentVersion | None) -> dict[str, Any]:
    """Where the agent stands: its live version, whether a draft exists and how it differs."""
    live = agent.published_version
    has_draft = working is not None and working.state == VersionState.DRAFT
    changes = diff(live.config, working.config) if live and working and has_draft else []
    return {"live": live, "has_draft": has_draft, "changes": changes, "working": working}


def _editor_page(
    request: TenantRequest,
    agent: Agent,
    *,
    status: int = 200,
    editor: forms.AgentEditor | None = None,
    details: forms.AgentDetailsForm | None = None,
    playground: forms.PlaygroundForm | None = None,
    run: dict[str, Any] | None = None,
) -> HttpResponse:
    working = selectors.working_version(tenant=request.tenant, agent=agent)
    context = {
        "agent": agent,
        "editor": editor or _editor(request, agent, working),
        "details": details
        or forms.AgentDetailsForm(initial={"name": agent.name, "description": agent.description}),
        "publish_form": forms.PublishForm(),
        "playground": playground or forms.PlaygroundForm(),
        "run": run,
        **_release(agent, working),
    }
    return render(request, "agents/agent_detail.html", context, status=status)


@tenant_view(manage=True)
@not_found_is_404
def agent_detail(request: TenantRequest, agent_id: UUID) -> HttpResponse:
    """The editor of the agent's draft. Saving creates the draft if only a live version exists."""
    agent = selectors.agent_get(tenant=request.tenant, agent_id=agent_id)
    if request.method != "POST":
        return _editor_page(request, agent)
    working = selectors.working_version(tenant=request.tenant, agent=agent)
    editor = _editor(request, agent, working, request.POST)
    if editor.is_valid():
        # Keys the editor does not show (e.g. the memory policy) are kept as they are.
        config = {**(working.config if working else {}), **editor.config()}
        try:
            services.draft_save(
                tenant=request.tenant, actor=request.actor, agent_id=agent.pk, config=config
            )
        except ValidationFailed as exc:
            editor.apply_domain_errors(exc)
        else:
            messages.success(request, "Draft saved. Publish it when it is ready to go live.")
            return redirect("agent-detail", tenant_slug=request.tenant.slug, agent_id=agent.pk)
    return _editor_page(request, agent, editor=editor, status=422)


@tenant_view(manage=True)
@require_POST
@not_found_is_404
def agent_update(request: TenantRequest, agent_id: UUID) -> HttpResponse:
    agent = selectors.agent_get(tenant=request.tenant, agent_id=agent_id)
    form = forms.AgentDetailsForm(request.POST)
    if form.is_valid():
        try:
            services.agent_update(
                tenant=request.tenant,
                actor=request.actor,
                agent_id=agent.pk,
                name=form.cleaned_data["name"],
                description=form.cleaned_data["description"],
            )
        except ValidationFailed as exc:
            apply_domain_errors(form, exc)
        else:
            messages.success(request, "Name and description saved.")
            return redirect("agent-detail", tenant_slug=request.tenant.slug, agent_id=agent.pk)
    return _editor_page(request, agent, details=form, status=422)


@tenant_view(manage=True)
@require_POST
@not_found_is_404
def agent_publish(request: TenantRequest, agent_id: UUID) -> HttpResponse:
    agent = selectors.agent_get(tenant=request.tenant, agent_id=agent_id)
    form = forms.PublishForm(request.POST)
    note = form.cleaned_data["note"] if form.is_valid() else ""
    try:
        version = services.agent_publish(
            tenant=request.tenant, actor=request.actor, agent_id=agent.pk, note=note
        )
    except (Conflict, ValidationFailed) as exc:
        messages.error(request, _plain(exc))
    else:
        messages.success(request, f"v{version.number} is live.")
    return redirect("agent-detail", tenant_slug=request.tenant.slug, agent_id=agent.pk)


@tenant_view(manage=True)
@require_POST
@not_found_is_404
def agent_delete(request: TenantRequest, agent_id: UUID) -> HttpResponse:
    agent = selectors.agent_get(tenant=request.tenant, agent_id=agent_id)
    try:
        services.agent_delete(tenant=request.tenant, actor=request.actor, agent_id=agent.pk)
    except Conflict as exc:
        messages.error(request, exc.message)
        return redirect("agent-detail", tenant_slug=request.tenant.slug, agent_id=agent.pk)
    messages.success(request, f"{agent.name} is deleted.")
    return redirect("agent-list", tenant_slug=request.tenant.slug)


def _plain(exc: Conflict | ValidationFailed) -> str:
    detail = next(iter(exc.fields.values()), "")
    return f"{exc.message} {detail}".strip() if detail and detail != exc.message else exc.message


# --- Playground -------------------------------------------------------------------------------


def _run_summary(run: PlaygroundRun) -> dict[str, Any]:
    """What the playground shows of a run. Model output stays text: the template escapes it."""
    output = run.output
    structured = None
    if run.status == "success" and output is not None and not isinstance(output, str):
        structured = json.dumps(output, indent=2, ensure_ascii=False, default=str)
    spans = run.trace or []
    return {
        "status": run.status,
        "message": run.message,
        "text": output if isinstance(output, str) else "",
        "structured": structured,
        "last_agent": run.last_agent,
        "duration_ms": run.duration_ms,
        "tool_calls": [s for s in spans if s["kind"] == "tool_call"],
        "handoffs": [s for s in spans if s["kind"] == "handoff"],
        "mcp_servers": [s for s in spans if s["kind"] == "mcp_server"],
        "guardrails": [s for s in spans if s["kind"] == "guardrail" and s.get("tripped")],
        "agent_calls": [s for s in spans if s["kind"] == "agent_call"],
        "usage": run.usage,
    }


@tenant_view(manage=True)
@require_POST
@not_found_is_404
def agent_playground(request: TenantRequest, agent_id: UUID) -> HttpResponse:
    """Run the working version (the draft, else the live version) once on one message.

    `services.playground_run` runs it (`execute.run_version`, outside any transaction: there is
    no ATOMIC_REQUESTS) and keeps the run with its trace, like the API's draft run.
    """
    agent = selectors.agent_get(tenant=request.tenant, agent_id=agent_id)
    form = forms.PlaygroundForm(request.POST)
    run = None
    status = 422
    if form.is_valid():
        try:
            kept = services.playground_run(
                tenant=request.tenant,
                actor=request.actor,
                agent_id=agent.pk,
                input=form.cleaned_data["message"],
            )
        except ValidationFailed as exc:
            form.add_error("message", exc.fields.get("input", exc.message))
        except Conflict as exc:
            form.add_error(None, exc.message)
        except QuotaExceeded as exc:  # a rate limit, or the budget (worded for the member's role)
            said = exc.message_for(request.membership.role, tenant_name=request.tenant.name)
            form.add_error(None, said)
            status = exc.status
        else:
            run = _run_summary(kept)
    if request.htmx:
        working = selectors.working_version(tenant=request.tenant, agent=agent)
        context = {"agent": agent, "playground": form, "run": run, "working": working}
        return render(request, "agents/agent_detail.html#playground", context)
    return _editor_page(request, agent, playground=form, run=run, status=200 if run else status)


# --- Versions ---------------------------------------------------------------------------------


def _versions_context(request: TenantRequest, agent: Agent, **extra: Any) -> dict[str, Any]:
    versions = list(selectors.version_list(tenant=request.tenant, agent=agent))
    live = agent.published_version
    draft = next((v for v in versions if v.state == VersionState.DRAFT), None)
    return {
        "agent": agent,
        "versions": versions,
        "live": live,
        "draft": draft,
        "choices": forms.version_choices(versions),
        "default_a": str(live.pk) if live else (str(versions[-1].pk) if versions else ""),
        "default_b": str(draft.pk) if draft else (str(versions[0].pk) if versions else ""),
        **extra,
    }


@tenant_view(manage=True)
@not_found_is_404
def agent_versions(request: TenantRequest, agent_id: UUID) -> HttpResponse:
    agent = selectors.agent_get(tenant=request.tenant, agent_id=agent_id)
    return render(request, "agents/versions.html", _versions_context(request, agent))


@tenant_view(manage=True)
@require_POST
@not_found_is_404
def agent_restore(request: TenantRequest, agent_id: UUID, version_id: UUID) -> HttpResponse:
    agent = selectors.agent_get(tenant=request.tenant, agent_id=agent_id)
    error = notice = None
    try:
        restored = services.agent_restore(
            tenant=request.tenant, actor=request.actor, agent_id=agent.pk, version_id=version_id
        )
    except (Conflict, ValidationFailed) as exc:
        error = _plain(exc)
    else:
        notice = f"{restored.note}: v{restored.number} is live."
        agent = selectors.agent_get(tenant=request.tenant, agent_id=agent.pk)
    if request.htmx:
        context = _versions_context(request, agent, error=error, notice=notice)
        return render(request, "agents/versions.html#versions-panel", context)
    if error:
        messages.error(request, error)
    else:
        messages.success(request, str(notice))
    return redirect("agent-versions", tenant_slug=request.tenant.slug, agent_id=agent.pk)


def _label(version: AgentVersion) -> str:
    return f"v{version.number}" if version.number else "Draft"


def _names(request: TenantRequest) -> dict[str, str]:
    """Names for the ids a configuration holds, so a comparison reads as names."""
    tenant = request.tenant
    names = {str(p.pk): f"{p.name} (provider)" for p in selectors.provider_list(tenant=tenant)}
    names.update({str(s.pk): s.name for s in selectors.mcp_server_list(tenant=tenant)})
    names.update({str(a.pk): a.name for a in selectors.agent_list(tenant=tenant)})
    return names


def _shown(value: Any, names: dict[str, str]) -> dict[str, Any]:
    """A value of a comparison as text (ids as names); lists and objects as indented JSON."""
    if value is None or value == "" or value == []:
        return {"text": "", "json": False}

    def named(v: Any) -> Any:
        if isinstance(v, str):
            return names.get(v, v)
        if isinstance(v, list):
            return [named(x) for x in v]
        if isinstance(v, dict):
            return {k: named(x) for k, x in v.items()}
        return v

    value = named(value)
    if isinstance(value, (list, dict)):
        return {"text": json.dumps(value, indent=2, ensure_ascii=False), "json": True}
    return {"text": str(value), "json": False}


def _uuid(value: str | None) -> UUID | None:
    """An id from the query string; a malformed one is a 404 like a missing one."""
    if not value:
        return None
    try:
        return UUID(value)
    except ValueError:
        raise Http404("No such version")


@tenant_view(manage=True)
@not_found_is_404
def agent_compare(request: TenantRequest, agent_id: UUID) -> HttpResponse:
    agent = selectors.agent_get(tenant=request.tenant, agent_id=agent_id)
    context = _versions_context(request, agent)
    a_id, b_id = _uuid(request.GET.get("a")), _uuid(request.GET.get("b"))
    if a_id and b_id:
        a = selectors.version_get(tenant=request.tenant, agent=agent, version_id=a_id)
        b = selectors.version_get(tenant=request.tenant, agent=agent, version_id=b_id)
        rows = selectors.version_compare(tenant=request.tenant, agent=agent, a_id=a.pk, b_id=b.pk)
        names = _names(request)
        context.update(
            a=a,
            b=b,
            a_label=_label(a),
            b_label=_label(b),
            default_a=str(a.pk),
            default_b=str(b.pk),
            rows=[(field, _shown(x, names), _shown(y, names)) for field, x, y in rows],
        )
    return render(request, "agents/compare.html", context)


# --- Model providers --------------------------------------------------------------------------


def _providers_context(request: TenantRequest, **extra: Any) -> dict[str, Any]:
    return {
        "providers": selectors.provider_list(tenant=request.tenant),
        "form": forms.ProviderForm(),
        **extra,
    }


@tenant_view(manage=True)
def provider_list(request: TenantRequest) -> HttpResponse:
    return _no_store(render(request, "agents/providers.html", _providers_context(request)))


@tenant_view(manage=True)
@require_POST
def provider_create(request: TenantRequest) -> HttpResponse:
    form = forms.ProviderForm(request.POST)
    if form.is_valid():
        try:
            provider = services.provider_create(
                tenant=request.tenant,
                actor=request.actor,
                api_key=form.cleaned_data["api_key"],
                **form.service_kwargs(),
            )
        except ValidationFailed as exc:
            apply_domain_errors(form, exc)
        else:
            messages.success(request, f"{provider.name} is added. Test the connection below.")
            return redirect(
                "provider-detail", tenant_slug=request.tenant.slug, provider_id=provider.pk
            )
    context = _providers_context(request, form=form)
    return _no_store(render(request, "agents/providers.html", context, status=422))


@tenant_view(manage=True)
@not_found_is_404
def provider_detail(request: TenantRequest, provider_id: UUID) -> HttpResponse:
    provider = selectors.provider_get(tenant=request.tenant, provider_id=provider_id)
    form = forms.ProviderEditForm(request.POST or None, provider=provider)
    if request.method == "POST" and form.is_valid():
        try:
            services.provider_update(
                tenant=request.tenant,
                actor=request.actor,
                provider_id=provider.pk,
                api_key=form.new_key(),
                **form.service_kwargs(),
            )
        except ValidationFailed as exc:
            apply_domain_errors(form, exc)
        else:
            messages.success(request, "Provider saved.")
            return redirect(
                "provider-detail", tenant_slug=request.tenant.slug, provider_id=provider.pk
            )
    status = 422 if request.method == "POST" else 200
    context = {"provider": provider, "form": form}
    return _no_store(render(request, "agents/provider_detail.html", context, status=status))


@tenant_view(manage=True)
@require_POST
@not_found_is_404
def provider_delete(request: TenantRequest, provider_id: UUID) -> HttpResponse:
    provider = selectors.provider_get(tenant=request.tenant, provider_id=provider_id)
    try:
        services.provider_delete(
            tenant=request.tenant, actor=request.actor, provider_id=provider.pk
        )
    except Conflict as exc:
        messages.error(request, exc.message)
        return redirect("provider-detail", tenant_slug=request.tenant.slug, provider_id=provider.pk)
    messages.success(request, f"{provider.name} is deleted.")
    return redirect("provider-list", tenant_slug=request.tenant.slug)


@tenant_view(manage=True)
@require_POST
@not_found_is_404
def provider_test(request: TenantRequest, provider_id: UUID) -> HttpResponse:
    """One tiny request to the provider, now; the answer in plain words."""
    provider = selectors.provider_get(tenant=request.tenant, provider_id=provider_id)
    ok, message = async_to_sync(execute.check_provider)(provider)
    if request.htmx:
        context = {"provider": provider, "ok": ok, "message": message}
        return render(request, "agents/provider_detail.html#provider-check", context)
    (messages.success if ok else messages.error)(request, message)
    return redirect("provider-detail", tenant_slug=request.tenant.slug, provider_id=provider.pk)


# --- MCP servers ------------------------------------------------------------------------------


def _servers_context(request: TenantRequest, **extra: Any) -> dict[str, Any]:
    return {
        "servers": selectors.mcp_server_list(tenant=request.tenant),
        "form": forms.McpServerForm(),
        **extra,
    }


@tenant_view(manage=True)
def mcp_server_list(request: TenantRequest) -> HttpResponse:
    return _no_store(render(request, "agents/mcp_servers.html", _servers_context(request)))


@tenant_view(manage=True)
@require_POST
def mcp_server_create(request: TenantRequest) -> HttpResponse:
    form = forms.McpServerForm(request.POST)
    if form.is_valid():
        try:
            server = services.mcp_server_create(
                tenant=request.tenant,
                actor=request.actor,
                headers=form.cleaned_data["headers"] or {},
                **form.service_kwargs(),
            )
        except ValidationFailed as exc:
            apply_domain_errors(form, exc)
        else:
            messages.success(request, f"{server.name} is added. List its tools to check it.")
            return redirect(
                "mcp-server-detail", tenant_slug=request.tenant.slug, server_id=server.pk
            )
    context = _servers_context(request, form=form)
    return _no_store(render(request, "agents/mcp_servers.html", context, status=422))


@tenant_view(manage=True)
@not_found_is_404
def mcp_server_detail(request: TenantRequest, server_id: UUID) -> HttpResponse:
    server = selectors.mcp_server_get(tenant=request.tenant, server_id=server_id)
    form = forms.McpServerEditForm(request.POST or None, server=server)
    if request.method == "POST" and form.is_valid():
        try:
            services.mcp_server_update(
                tenant=request.tenant,
                actor=request.actor,
                server_id=server.pk,
                headers=form.new_headers(),
                **form.service_kwargs(),
            )
        except ValidationFailed as exc:
            apply_domain_errors(form, exc)
        else:
            messages.success(request, "MCP server saved.")
            return redirect(
                "mcp-server-detail", tenant_slug=request.tenant.slug, server_id=server.pk
            )
    status = 422 if request.method == "POST" else 200
    context = {"server": server, "form": form}
    return _no_store(render(request, "agents/mcp_server_detail.html", context, status=status))


@tenant_view(manage=True)
@require_POST
@not_found_is_404
def mcp_server_delete(request: TenantRequest, server_id: UUID) -> HttpResponse:
    server = selectors.mcp_server_get(tenant=request.tenant, server_id=server_id)
    try:
        services.mcp_server_delete(tenant=request.tenant, actor=request.actor, server_id=server.pk)
    except Conflict as exc:
        messages.error(request, exc.message)
        return redirect("mcp-server-detail", tenant_slug=request.tenant.slug, server_id=server.pk)
    messages.success(request, f"{server.name} is deleted.")
    return redirect("mcp-server-list", tenant_slug=request.tenant.slug)


@tenant_view(manage=True)
@require_POST
@not_found_is_404
def mcp_server_tools(request: TenantRequest, server_id: UUID) -> HttpResponse:
    """Connect to the server now and list the tools an agent would get (after the allow-list)."""
    from ai_agents.runtime import mcp

    server = selectors.mcp_server_get(tenant=request.tenant, server_id=server_id)
    found: list[dict[str, str]] | None = None
    error = None
    try:
        found = async_to_sync(mcp.list_tools)(server)
    except Unavailable as exc:
        error = exc.message
    context = {"server": server, "tools": found, "error": error}
    if request.htmx:
        return render(request, "agents/mcp_server_detail.html#mcp-tools", context)
    form = forms.McpServerEditForm(server=server)
    return _no_store(render(request, "agents/mcp_server_detail.html", {**context, "form": form}))

"""The run inspector: `/t/<slug>/runs/` (every run of the tenant, filtered), one run's page with
its timeline, stopping an active run, and a thread's transcript.

For owners and admins only (`tenant_view(manage=True)`): members get the 403 page, another
tenant's slug or ids a 404. Pages of active runs poll their own fragment (htmx) until the run ends.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib import messages
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from ai_agents import selectors as agent_selectors
from controlplane.errors import NotFound, ValidationFailed
from conversations import inspector, selectors, services
from conversations.forms import RunFilterForm, TimeFilterForm
from conversations.models import RunStatus
from tenants.requests import TenantRequest
from tenants.views import tenant_view


def _fragment(request: TenantRequest, name: str) -> bool:
    """An htmx request that asked for one fragment of the page (not a boosted navigation)."""
    return bool(request.htmx) and not request.htmx.boosted and request.GET.get("fragment") == name


def _search(request: TenantRequest, form: TimeFilterForm, search: Any) -> dict[str, Any]:
    """Validate the filters and run `search(filters, before)`: the list page's context, with
    the page (None when the input is bad) and the errors in words."""
    page, errors = None, []
    if not form.is_bound or form.is_valid():
        filters = form.filters() if form.is_bound else inspector.RunFilters()
        try:
            page = search(filters, request.GET.get("before", ""))
        except ValidationFailed as exc:
            errors = [f"{exc.message} {' '.join(exc.fields.values())}"]
    else:
        errors = form.error_list()
    query = request.GET.copy()
    for key in ("before", "fragment"):
        query.pop(key, None)
    context = {
        "form": form,
        "page": page,
        "errors": errors,
        "query": query.urlencode(),
        "paged": bool(request.GET.get("before")),
    }
    return context


def _list_response(request: TenantRequest, template: str, context: dict[str, Any]) -> HttpResponse:
    if _fragment(request, "run-table") or (request.htmx and request.htmx.target == "run-table"):
        response = render(request, f"{template}#run-table", context)
    else:
        response = render(request, template, context)
    response["Vary"] = "HX-Request"
    return response


@tenant_view(manage=True)
def run_list(request: TenantRequest) -> HttpResponse:
    tenant = request.tenant
    agents = list(agent_selectors.agent_list(tenant=tenant))
    form = RunFilterForm(request.GET or None, agents=agents)
    context = _search(
        request,
        form,
        lambda filters, before: inspector.run_search(tenant=tenant, filters=filters, before=before),
    )
    return _list_response(request, "conversations/runs.html", context)


@tenant_view(manage=True)
def playground_run_list(request: TenantRequest) -> HttpResponse:
    tenant = request.tenant
    agents = list(agent_selectors.agent_list(tenant=tenant))
    form = TimeFilterForm(request.GET or None, agents=agents)
    context = _search(
        request,
        form,
        lambda filters, before: inspector.playground_run_search(
            tenant=tenant, filters=filters, before=before
        ),
    )
    return _list_response(request, "conversations/playground_runs.html", context)


@tenant_view(manage=True)
def playground_run_detail(request: TenantRequest, run_id: Any) -> HttpResponse:
    try:
        run = inspector.playground_run_get(tenant=request.tenant, run_id=run_id)
    except NotFound as exc:
        raise Http404(exc.message)
    output_html, output_json = inspector.output_of(run.output)
    context = {
        "run": run,
        "timeline": inspector.timeline(run.trace),
        "output_html": output_html,
        "output_json": output_json,
    }
    return render(request, "conversations/playground_run.html", context)


def _run_context(request: TenantRequest, run_id: Any) -> dict[str, Any]:
    tenant = request.tenant
    try:
        run = inspector.run_get(tenant=tenant, run_id=run_id)
    except NotFound as exc:
        raise Http404(exc.message)
    context: dict[str, Any] = {
        "run": run,
        "timeline": inspector.timeline(run.trace),
        "items": inspector.run_items(tenant=tenant, run=run),
    }
    context["output_html"], context["output_json"] = inspector.output_of(run.output)
    if not run.output and run.status in (RunStatus.CANCELLED, RunStatus.INTERRUPTED):
        # A stopped run's reply is the text it kept in the conversation, not an output.
        said = [e.html for e in context["items"] if e.kind == "assistant" and e.html]
        context["stopped_reply"] = said[-1] if said else None
    context["input_messages"] = inspector.run_input(run)
    if run.metadata:
        context["metadata_json"] = json.dumps(run.metadata, indent=2, ensure_ascii=False)
    if run.is_active:
        context["progress"] = inspector.run_progress(tenant=tenant, run=run)
    return context


@tenant_view(manage=True)
def run_detail(request: TenantRequest, run_id: Any) -> HttpResponse:
    context = _run_context(request, run_id)
    if _fragment(request, "run-body"):
        return render(request, "conversations/run.html#run-body", context)
    return render(request, "conversations/run.html", context)


@tenant_view(manage=True)
@require_POST
def run_cancel(request: TenantRequest, run_id: Any) -> HttpResponse:
    try:
        run = services.run_stop(tenant=request.tenant, actor=request.actor, run_id=run_id)
    except NotFound as exc:
        raise Http404(exc.message)
    notice = "The run is stopped." if run.status == "cancelled" else "The run had already ended."
    if request.htmx:
        context = _run_context(request, run.pk)
        return render(request, "conversations/run.html#run-body", {**context, "notice": notice})
    messages.success(request, notice)
    return redirect("run-detail", tenant_slug=request.tenant.slug, run_id=run.pk)


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


@tenant_view(manage=True)
def thread_transcript(request: TenantRequest, thread_id: Any) -> HttpResponse:
    """A thread's conversation, read-only, page by page (older pages load above)."""
    tenant = request.tenant
    try:
        thread = inspector.thread_get(tenant=tenant, thread_id=thread_id)
    except NotFound as exc:
        raise Http404(exc.message)
    entries, earlier = selectors.item_page(
        tenant=tenant, thread=thread, before=_int_or_none(request.GET.get("before"))
    )
    context = {"thread": thread, "entries": entries, "earlier": earlier}
    if _fragment(request, "transcript-items"):
        return render(request, "conversations/transcript.html#transcript-items", context)
    return render(request, "conversations/transcript.html", context)

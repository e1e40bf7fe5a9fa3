"""The end-user chat pages: `/t/<slug>/chat/` (agents and the member's threads) and one thread.

Every member may chat (`tenant_view()`); a member sees and changes only their own threads (their
EndUser in this tenant): another member's or tenant's thread is a 404. Replies stream over the
websocket (`conversations.consumers`); these views render history from PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib import messages
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from ai_agents import selectors as agent_selectors
from controlplane.errors import Conflict, DomainError, NotFound
from conversations import selectors, services
from conversations.models import EndUser, RunSource, Thread
from tenants.requests import TenantRequest
from tenants.views import tenant_view

View = Callable[..., HttpResponse]


def chat_view(view: View) -> View:
    """A member's chat view: the member's end user is passed in, NotFound is the 404 page."""

    @tenant_view()
    @wraps(view)
    def wrapper(request: TenantRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        end_user = services.end_user_for_member(tenant=request.tenant, user=request.user)
        try:
            return view(request, end_user, *args, **kwargs)
        except NotFound as exc:
            raise Http404(exc.message)

    return wrapper


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


@chat_view
def chat_home(request: TenantRequest, end_user: EndUser) -> HttpResponse:
    q = request.GET.get("q", "")[:200]
    context = {
        "agents": agent_selectors.agent_list(tenant=request.tenant, published_only=True),
        "threads": selectors.thread_list(tenant=request.tenant, end_user=end_user, q=q),
        "q": q,
    }
    if request.htmx and request.htmx.target == "thread-list":
        return render(request, "conversations/home.html#thread-list", context)
    return render(request, "conversations/home.html", context)


@chat_view
@require_POST
def chat_start(request: TenantRequest, end_user: EndUser) -> HttpResponse:
    try:
        thread = services.thread_create(
            tenant=request.tenant, end_user=end_user, agent_id=request.POST.get("agent_id")
        )
    except Conflict as exc:
        messages.error(request, exc.message)
        return redirect("chat-home", tenant_slug=request.tenant.slug)
    return redirect("chat-thread", tenant_slug=request.tenant.slug, thread_id=thread.pk)


@chat_view
def chat_thread(request: TenantRequest, end_user: EndUser, thread_id: Any) -> HttpResponse:
    thread = services.thread_get(tenant=request.tenant, end_user=end_user, thread_id=thread_id)
    return _thread_page(request, thread)


def _thread_page(
    request: TenantRequest, thread: Thread, *, draft: str = "", error: str = "", status: int = 200
) -> HttpResponse:
    entries, earlier = selectors.item_page(tenant=request.tenant, thread=thread)
    active = selectors.run_active(tenant=request.tenant, thread=thread)
    context = {
        "thread": thread,
        "entries": entries,
        "earlier": earlier,
        "active_run": active,
        "waiting": selectors.pending_inputs(tenant=request.tenant, thread=thread),
        "draft": draft,
        "send_error": error,
    }
    return render(request, "conversations/thread.html", context, status=status)


@chat_view
@require_POST
def chat_send(request: TenantRequest, end_user: EndUser, thread_id: Any) -> HttpResponse:
    """The composer when the page's script did not run (blocked or not loaded yet): the message
    is sent as over the socket, and the page shows it waiting for its reply, which a reload
    shows once written. A refused message stays in the box, with why."""
    thread = services.thread_get(tenant=request.tenant, end_user=end_user, thread_id=thread_id)
    text = request.POST.get("text", "")
    try:
        services.run_create(
            tenant=request.tenant,
            end_user=end_user,
            thread_id=thread.pk,
            input=text,
            source=RunSource.CHAT,
        )
    except NotFound:
        raise
    except DomainError as exc:  # busy with a reply, over a limit, no longer published, ...
        response = _thread_page(request, thread, draft=text, error=exc.message, status=exc.status)
        if exc.metadata.get("retry_after"):
            response["Retry-After"] = str(exc.metadata["retry_after"])
        return response
    return redirect("chat-thread", tenant_slug=request.tenant.slug, thread_id=thread.pk)


@chat_view
def chat_items(request: TenantRequest, end_user: EndUser, thread_id: Any) -> HttpResponse:
    """htmx fragments of the history: `?before=<id>` an older page, `?after=<id>` newer items,
    neither: the latest page (the log of the thread page, as the page renders it)."""
    thread = services.thread_get(tenant=request.tenant, end_user=end_user, thread_id=thread_id)
    after = _int_or_none(request.GET.get("after"))
    if after is not None:
        entries = selectors.item_after(tenant=request.tenant, thread=thread, after=after)
        context = {
            "thread": thread,
            "entries": entries,
            "earlier": None,
            "newer": True,
            "waiting": selectors.pending_inputs(tenant=request.tenant, thread=thread),
        }
    else:
        before = _int_or_none(request.GET.get("before"))
        entries, earlier = selectors.item_page(tenant=request.tenant, thread=thread, before=before)
        context = {"thread": thread, "entries": entries, "earlier": earlier}
        if before is None:  # the latest page ends, like the page, with what waits for the agent
            context["waiting"] = selectors.pending_inputs(tenant=request.tenant, thread=thread)
    return render(request, "conversations/thread.html#items", context)


@chat_view
@require_POST
def chat_rename(request: TenantRequest, end_user: EndUser, thread_id: Any) -> HttpResponse:
    thread = services.thread_rename(
        tenant=request.tenant,
        end_user=end_user,
        thread_id=thread_id,
        title=request.POST.get("title", ""),
    )
    if request.htmx:
        return render(request, "conversations/home.html#thread-row", {"thread": thread})
    return redirect("chat-home", tenant_slug=request.tenant.slug)


@chat_view
@require_POST
def chat_delete(request: TenantRequest, end_user: EndUser, thread_id: Any) -> HttpResponse:
    try:
        services.thread_delete(tenant=request.tenant, end_user=end_user, thread_id=thread_id)
    except Conflict as exc:
        if request.htmx:
            return render(
                request,
                "conversations/home.html#thread-row",
                {
                    "thread": services.thread_get(
                        tenant=request.tenant, end_user=end_user, thread_id=thread_id
                    ),
                    "row_error": exc.message,
                },
            )
        messages.error(request, exc.message)
        return redirect("chat-home", tenant_slug=request.tenant.slug)
    if request.htmx:
        return HttpResponse("")  # the row is swapped out
    messages.success(request, "Conversation deleted.")
    return redirect("chat-home", tenant_slug=request.tenant.slug)

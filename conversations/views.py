"""The end-user chat pages: `/t/<slug>/chat/` (agents and the member's threads) and one thread.

Every member may chat (`tenant_view()`); a member sees and changes only their own threads (their
EndUser in this tenant): another member's or tenant's thread is a 404. Replies stream over the
websocket (`conversations.consumers`); these views render history from PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlencode

from django.contrib import messages
from django.core.exceptions import BadRequest
from django.http import Http404, HttpResponse, QueryDict
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.cache import patch_vary_headers
from django.views.decorators.http import require_http_methods, require_POST
from django_htmx.http import reswap, retarget

from ai_agents import selectors as agent_selectors
from controlplane.errors import Conflict, DomainError, NotFound, RateLimited, ValidationFailed
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


def _list_state(data: QueryDict) -> tuple[str, str]:
    """The search and the page (`q`, `before`) of the conversation list, as a link or a form of
    the list carries them: a rename or delete without the page's script comes back to them."""
    # A NUL cannot be searched for (PostgreSQL refuses it in a pattern): it is dropped.
    return data.get("q", "").replace("\x00", "")[:200], data.get("before", "")[:200]


def _list_url(request: TenantRequest, *, q: str, before: str, anchor: str = "") -> str:
    query = urlencode([(key, value) for key, value in (("q", q), ("before", before)) if value])
    url = reverse("chat-home", kwargs={"tenant_slug": request.tenant.slug})
    return url + (f"?{query}" if query else "") + (f"#{anchor}" if anchor else "")


# What an htmx request for the chat home gets, by its target: the list (a search, with what it
# found for the status line) or the rows of an older page ("Show older conversations"), to append.
_HOME_FRAGMENTS = {"thread-list": "#thread-searched", "thread-rows": "#thread-page"}


def _home(
    request: TenantRequest,
    end_user: EndUser,
    *,
    q: str,
    before: str,
    status: int = 200,
    **extra: Any,
) -> HttpResponse:
    """The chat home at one page of its list (`extra`: what the list shows besides its rows)."""
    try:
        page = selectors.thread_list(tenant=request.tenant, end_user=end_user, q=q, before=before)
    except ValidationFailed as exc:  # a hand-edited page link
        raise BadRequest(exc.message)
    context = {
        "agents": agent_selectors.agent_list(tenant=request.tenant, published_only=True),
        "page": page,
        "threads": page.threads,
        "q": q,
        "before": before,
        **extra,
    }
    part = _HOME_FRAGMENTS.get(request.htmx.target or "", "") if request.htmx else ""
    response = render(request, f"conversations/home.html{part}", context, status=status)
    patch_vary_headers(response, ["HX-Request"])
    return response


@chat_view
def chat_home(request: TenantRequest, end_user: EndUser) -> HttpResponse:
    q, before = _list_state(request.GET)
    return _home(request, end_user, q=q, before=before)


@chat_view
@require_POST
def chat_start(request: TenantRequest, end_user: EndUser) -> HttpResponse:
    """Open a conversation with a published agent: the end user's one with it that nothing was
    said in yet if there is one (`thread_unstarted`, not listed), else a new one."""
    agent_id = request.POST.get("agent_id")
    try:
        thread = selectors.thread_unstarted(
            tenant=request.tenant, end_user=end_user, agent_id=agent_id
        ) or services.thread_create(tenant=request.tenant, end_user=end_user, agent_id=agent_id)
    except Conflict as exc:
        messages.error(request, exc.message)
        return redirect("chat-home", tenant_slug=request.tenant.slug)
    return redirect("chat-thread", tenant_slug=request.tenant.slug, thread_id=thread.pk)


@chat_view
def chat_thread(request: TenantRequest, end_user: EndUser, thread_id: Any) -> HttpResponse:
    """A conversation: its latest page; `?before=<item id>` ("Load earlier messages" without
    the page's script) from the page before that item to the latest."""
    thread = services.thread_get(tenant=request.tenant, end_user=end_user, thread_id=thread_id)
    # A message taken back without the page's script ("Don't send", `_withdraw`) comes back in
    # the box once, on the page its post redirected to.
    draft = request.session.pop(_draft_key(thread), "")
    return _thread_page(
        request,
        thread,
        before=_int_or_none(request.GET.get("before")),
        draft=draft if isinstance(draft, str) else "",
    )


def _draft_key(thread: Thread) -> str:
    return f"chat-draft:{thread.pk}"


def _thread_page(
    request: TenantRequest,
    thread: Thread,
    *,
    before: int | None = None,
    draft: str = "",
    error: str = "",
    status: int = 200,
) -> HttpResponse:
    cut = False  # the window stops short of the latest item
    if before is None:
        entries, earlier = selectors.item_page(tenant=request.tenant, thread=thread)
    else:
        entries, earlier, cut = selectors.item_window(
            tenant=request.tenant, thread=thread, before=before
        )
    active = selectors.run_active(tenant=request.tenant, thread=thread)
    context = {
        "thread": thread,
        "entries": entries,
        "earlier": earlier,
        "cut": cut,
        "active_run": active,
        # Messages waiting for a reply come after the latest item: not under a window cut short.
        "waiting": [] if cut else selectors.pending_inputs(tenant=request.tenant, thread=thread),
        "retryable": selectors.run_retryable(tenant=request.tenant, thread=thread),
        "draft": draft,
        "send_error": error,
    }
    return render(request, "conversations/thread.html", context, status=status)


@chat_view
@require_http_methods(["GET", "POST"])
def chat_send(request: TenantRequest, end_user: EndUser, thread_id: Any) -> HttpResponse:
    """The composer when the page's script did not run (blocked or not loaded yet): the message
    is sent as over the socket, and the page shows it waiting for its reply, which a reload
    shows once written. A refused message stays in the box, with why. `retry_of`: "Try again"
    on the reply that failed; `withdraw`: "Don't send" on a message waiting in line, whose text
    comes back in the box. A GET (the address bar after a refusal, reloaded) goes to the
    conversation."""
    thread = services.thread_get(tenant=request.tenant, end_user=end_user, thread_id=thread_id)
    if request.method == "GET":
        return redirect("chat-thread", tenant_slug=request.tenant.slug, thread_id=thread.pk)
    if "withdraw" in request.POST:
        return _withdraw(request, end_user, thread, request.POST["withdraw"])
    text = request.POST.get("text", "")
    retry_of = request.POST.get("retry_of") or None  # "Try again" on a reply that failed
    try:
        services.run_create(
            tenant=request.tenant,
            end_user=end_user,
            thread_id=thread.pk,
            input=text if retry_of is None else None,
            source=RunSource.CHAT,
            retry_of=retry_of,
        )
    except NotFound:
        raise
    except DomainError as exc:  # busy with a reply, over a limit, no longer published, ...
        if isinstance(exc, RateLimited):
            said = services.rate_limited_message(exc)
        else:  # in the words for who is asking
            said = exc.message_for(request.membership.role, tenant_name=request.tenant.name)
        response = _thread_page(request, thread, draft=text, error=said, status=exc.status)
        if exc.metadata.get("retry_after"):
            response["Retry-After"] = str(exc.metadata["retry_after"])
        return response
    return redirect("chat-thread", tenant_slug=request.tenant.slug, thread_id=thread.pk)


def _withdraw(
    request: TenantRequest, end_user: EndUser, thread: Thread, run_id: str
) -> HttpResponse:
    """ "Don't send" without the page's script: a redirect to the conversation, where the
    message is gone from the line and back in the box (so reloading that page posts nothing
    again); a message already sent stays, with why."""
    try:
        run = services.run_withdraw(
            tenant=request.tenant, end_user=end_user, thread_id=thread.pk, run_id=run_id
        )
    except Conflict as exc:
        return _thread_page(request, thread, error=exc.message, status=exc.status)
    request.session[_draft_key(thread)] = selectors.input_text(run)
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
            "retryable": selectors.run_retryable(tenant=request.tenant, thread=thread),
        }
    else:
        before = _int_or_none(request.GET.get("before"))
        entries, earlier = selectors.item_page(tenant=request.tenant, thread=thread, before=before)
        context = {"thread": thread, "entries": entries, "earlier": earlier}
        if before is None:  # the latest page ends, like the page, with what waits for the agent
            context["waiting"] = selectors.pending_inputs(tenant=request.tenant, thread=thread)
            context["retryable"] = selectors.run_retryable(tenant=request.tenant, thread=thread)
    return render(request, "conversations/thread.html#items", context)


@chat_view
@require_POST
def chat_rename(request: TenantRequest, end_user: EndUser, thread_id: Any) -> HttpResponse:
    """Retitle a conversation of the list. htmx gets its row back, its title focused; a plain
    form goes back to the list's search and page, at the row."""
    q, before = _list_state(request.POST)
    title = request.POST.get("title", "")
    try:
        thread = services.thread_rename(
            tenant=request.tenant, end_user=end_user, thread_id=thread_id, title=title
        )
    except ValidationFailed as exc:
        # The rename box stays open on what was typed, with why (htmx swaps only a 200).
        thread = services.thread_get(tenant=request.tenant, end_user=end_user, thread_id=thread_id)
        rename_error = {
            "thread_id": thread.pk,
            "message": exc.message,
            "value": title.replace("\x00", ""),
        }
        if not request.htmx:
            return _home(
                request, end_user, q=q, before=before, rename_error=rename_error, status=422
            )
        context = {"thread": thread, "q": q, "before": before, "rename_error": rename_error}
        return render(request, "conversations/home.html#thread-row", context)
    if request.htmx:
        context = {"thread": thread, "q": q, "before": before, "focus": True}
        return render(request, "conversations/home.html#thread-row", context)
    return redirect(_list_url(request, q=q, before=before, anchor=f"thread-{thread.pk}"))


@chat_view
@require_POST
def chat_delete(request: TenantRequest, end_user: EndUser, thread_id: Any) -> HttpResponse:
    """Delete a conversation of the list. htmx asked first (`hx-confirm`); a plain form is
    answered with the list asking to confirm, and deletes on a post with `confirm`. A
    conversation still writing a reply is kept, its row saying so with a link to it."""
    q, before = _list_state(request.POST)
    thread = services.thread_get(tenant=request.tenant, end_user=end_user, thread_id=thread_id)
    if not request.htmx and not request.POST.get("confirm"):
        return _home(request, end_user, q=q, before=before, confirm_delete=thread)
    try:
        services.thread_delete(tenant=request.tenant, end_user=end_user, thread_id=thread.pk)
    except Conflict as exc:
        row_error = {"thread_id": thread.pk, "message": exc.message}
        if not request.htmx:  # the newest page, which a conversation replying now is on
            return _home(request, end_user, q=q, before="", row_error=row_error, status=409)
        context = {"thread": thread, "q": q, "before": before, "row_error": row_error}
        return render(request, "conversations/home.html#thread-row", context)
    title = thread.title or "Untitled conversation"
    if not request.htmx:
        messages.success(request, f"Deleted “{title}”.")
        return redirect(_list_url(request, q=q, before=before))
    # The row goes; the list's heading takes the focus and its status line says what happened.
    # When nothing is left to list, the whole list is replaced by what it says when empty.
    rest = selectors.thread_list(tenant=request.tenant, end_user=end_user, q=q, limit=1)
    context = {"deleted": title, "q": q, "emptied": not rest.threads, "threads": []}
    response = render(request, "conversations/home.html#thread-deleted", context)
    return reswap(retarget(response, "#thread-list"), "outerHTML") if not rest.threads else response

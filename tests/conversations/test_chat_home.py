"""The conversation list of the chat home (`/t/<slug>/chat/`): pages of 30 by a keyset cursor,
the search kept across pages, no empty conversations left behind by "Start a chat", rename and
delete with and without the page's script, and whose conversations a member can reach."""

from __future__ import annotations

import html
import re
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.urls import reverse
from django.utils import timezone

from ai_agents import services as agent_services
from controlplane.errors import ValidationFailed
from conversations import selectors, services
from conversations.models import Item, Thread

ROW = re.compile(r'<li class="list-row chat-thread-row" id="thread-([0-9a-f-]{36})">')
OLDER = re.compile(r'<a class="btn btn-small" href="([^"]+)"[^>]*>Show older conversations</a>')


def _agent(world, name="Calc"):
    agent = agent_services.agent_create(tenant=world.tenant, actor=world.actor(), name=name)
    agent_services.agent_publish(tenant=world.tenant, actor=world.actor(), agent_id=agent.pk)
    return agent


def _thread(world, user, agent, title="", *, ago=None):
    end_user = services.end_user_for_member(tenant=world.tenant, user=user)
    thread = services.thread_create(
        tenant=world.tenant, end_user=end_user, agent_id=agent.pk, title=title
    )
    if ago is not None:  # last active `ago` before now
        Thread.objects.for_tenant(world.tenant).filter(pk=thread.pk).update(
            updated_at=timezone.now() - ago
        )
        thread.refresh_from_db()
    return thread


def _url(name, world, **kw):
    return reverse(name, kwargs={"tenant_slug": world.tenant.slug, **kw})


def _rows(html: str) -> list[str]:
    return ROW.findall(html)


def _older(html: str) -> str | None:
    found = OLDER.search(html)
    return found.group(1).replace("&amp;", "&") if found else None


@pytest.fixture
def home(world_a, world_b):
    agent = _agent(world_a)
    # 34 conversations, the first the most recently active.
    mine = [
        _thread(world_a, world_a.member, agent, f"Trip {i:02}", ago=timedelta(minutes=i))
        for i in range(34)
    ]
    theirs = _thread(world_a, world_a.admin, agent, "Admin secret plans")
    other_tenant = _thread(world_b, world_b.member, _agent(world_b, "Globex bot"), "Globex")
    return SimpleNamespace(agent=agent, mine=mine, theirs=theirs, other_tenant=other_tenant)


# --- Pages ------------------------------------------------------------------------------------


def test_the_list_shows_30_conversations_then_a_link_to_the_older_ones(
    world_a, home, django_assert_max_num_queries
):
    client = world_a.client_for(world_a.member)
    with django_assert_max_num_queries(8):  # 8: the budget banner reads the budget
        first = client.get(_url("chat-home", world_a)).content.decode()
    assert _rows(first) == [str(t.pk) for t in home.mine[:30]], "newest activity first"
    older = _older(first)
    assert older and "before=" in older
    # Without the page's script the link opens the older page, with a way back to the newest.
    second = client.get(older).content.decode()
    assert _rows(second) == [str(t.pk) for t in home.mine[30:]]
    assert _older(second) is None and "← Newest conversations" in second
    # With htmx only the rows are sent, to be appended, and the link goes (out of band).
    fragment = client.get(older, HTTP_HX_REQUEST="true", HTTP_HX_TARGET="thread-rows")
    body = fragment.content.decode()
    assert "<html" not in body and _rows(body) == [str(t.pk) for t in home.mine[30:]]
    assert 'id="thread-more" class="pager" hx-swap-oob="true" hidden>' in body
    assert _older(body) is None
    assert body.count("autofocus") == 1, "the first new row takes the focus from the link"


def test_the_search_is_kept_across_pages(world_a, home):
    for i in range(3):
        _thread(world_a, world_a.member, home.agent, f"Groceries {i}", ago=timedelta(seconds=i))
    client = world_a.client_for(world_a.member)
    first = client.get(_url("chat-home", world_a), {"q": "trip"}).content.decode()
    assert len(_rows(first)) == 30 and "Groceries" not in first
    older = _older(first)
    assert "q=trip" in older
    second = client.get(older).content.decode()
    assert _rows(second) == [str(t.pk) for t in home.mine[30:]] and "Groceries" not in second
    assert 'name="q" value="trip"' in second, "the rows' forms keep the search"


def test_a_search_says_what_it_found_in_the_lists_status_line(world_a, home):
    """A search swaps the list under the search box; the status line (role=status) is what a
    screen reader hears of it."""
    _thread(world_a, world_a.member, home.agent, "Groceries")
    client = world_a.client_for(world_a.member)

    def said(q: str) -> str:
        response = client.get(
            _url("chat-home", world_a), {"q": q}, HTTP_HX_REQUEST="true",
            HTTP_HX_TARGET="thread-list",
        )  # fmt: skip
        found = re.search(
            r'<p id="chat-list-status" hx-swap-oob="innerHTML">(.*?)</p>', response.content.decode()
        )
        return html.unescape(found.group(1)) if found else ""

    assert said("groc") == '1 conversation has "groc" in its title.'
    assert said("Trip 0") == '10 conversations have "Trip 0" in their title.'
    assert said("trip") == 'More than 30 conversations have "trip" in their title.'
    assert said('50% "off"') == 'No conversation has "50% "off"" in its title.'
    assert said("") == "All your conversations."


def test_conversations_active_at_the_same_instant_are_each_listed_once(world_a, home):
    same = timezone.now()
    Thread.objects.for_tenant(world_a.tenant).filter(pk__in=[t.pk for t in home.mine]).update(
        updated_at=same
    )
    client = world_a.client_for(world_a.member)
    first = client.get(_url("chat-home", world_a)).content.decode()
    assert len(_rows(first)) == 30
    second = client.get(_older(first)).content.decode()
    shown = _rows(first) + _rows(second)
    assert sorted(shown) == sorted(str(t.pk) for t in home.mine)


def test_a_broken_page_link_is_a_400_not_an_error(world_a, home):
    response = world_a.client_for(world_a.member).get(
        _url("chat-home", world_a), {"before": "nonsense"}
    )
    assert response.status_code == 400


def test_the_list_selector_pages_only_the_end_users_threads_in_the_tenant(world_a, world_b, home):
    end_user = services.end_user_for_member(tenant=world_a.tenant, user=world_a.member)
    page = selectors.thread_list(tenant=world_a.tenant, end_user=end_user, q="", limit=40)
    listed = {t.pk for t in page.threads}
    assert listed == {t.pk for t in home.mine} and page.next_cursor is None
    assert home.theirs.pk not in listed and home.other_tenant.pk not in listed
    # Another tenant's selector never returns this tenant's rows, even for the same end user.
    assert not selectors.thread_list(tenant=world_b.tenant, end_user=end_user).threads


# --- Empty conversations ----------------------------------------------------------------------


def test_starting_a_chat_and_going_back_leaves_no_empty_conversation(world_a, home):
    client = world_a.client_for(world_a.member)
    count = Thread.objects.for_tenant(world_a.tenant).count()
    first = client.post(_url("chat-start", world_a), {"agent_id": home.agent.pk})
    again = client.post(_url("chat-start", world_a), {"agent_id": home.agent.pk})
    assert first["Location"] == again["Location"], "the empty conversation is opened again"
    assert Thread.objects.for_tenant(world_a.tenant).count() == count + 1
    listed = client.get(_url("chat-home", world_a), {"q": ""}).content.decode()
    assert "Untitled conversation" not in listed
    # Once a message is sent it is listed (named after it), and the next start is a new chat.
    thread = Thread.objects.for_tenant(world_a.tenant).order_by("-created_at").first()
    services.run_create(
        tenant=world_a.tenant, end_user=thread.end_user, thread_id=thread.pk, input="Lisbon?"
    )
    listed = client.get(_url("chat-home", world_a)).content.decode()
    assert _rows(listed)[0] == str(thread.pk) and "Lisbon?" in listed
    new = client.post(_url("chat-start", world_a), {"agent_id": home.agent.pk})
    assert new["Location"] != first["Location"]


def test_an_empty_conversation_is_listed_once_it_has_items(world_a, home):
    thread = _thread(world_a, world_a.member, home.agent)
    client = world_a.client_for(world_a.member)
    assert str(thread.pk) not in _rows(client.get(_url("chat-home", world_a)).content.decode())
    Item.objects.create(tenant=world_a.tenant, thread=thread, data={"role": "user", "content": "x"})
    assert str(thread.pk) in _rows(client.get(_url("chat-home", world_a)).content.decode())


def test_start_never_opens_another_members_or_tenants_empty_conversation(world_a, world_b):
    agent = _agent(world_a)
    admins = _thread(world_a, world_a.admin, agent)
    member = world_a.client_for(world_a.member)
    first = member.post(_url("chat-start", world_a), {"agent_id": agent.pk})
    assert str(admins.pk) not in first["Location"]
    assert member.get(first["Location"]).status_code == 200
    # The member's empty conversation is theirs alone: the admin's start does not open it.
    admin = world_a.client_for(world_a.admin)
    assert admin.post(_url("chat-start", world_a), {"agent_id": agent.pk})["Location"] == _url(
        "chat-thread", world_a, thread_id=admins.pk
    )
    assert admin.get(first["Location"]).status_code == 404
    # Tenant B's member cannot start a chat with A's agent from B's slug.
    response = world_b.client_for(world_b.member).post(
        _url("chat-start", world_b), {"agent_id": agent.pk}
    )
    assert response.status_code == 404


# --- Rename -----------------------------------------------------------------------------------


def test_renaming_keeps_the_conversations_place_and_focuses_it(world_a, home):
    client = world_a.client_for(world_a.member)
    before = _rows(client.get(_url("chat-home", world_a)).content.decode())
    renamed = home.mine[5]
    response = client.post(
        _url("chat-rename", world_a, thread_id=renamed.pk),
        {"title": "Porto instead", "q": "", "before": ""},
        HTTP_HX_REQUEST="true",
    )
    row = response.content.decode()
    assert "Porto instead" in row
    assert re.search(r'<a href="[^"]+"[^>]* autofocus><strong>Porto instead</strong></a>', row)
    after = client.get(_url("chat-home", world_a)).content.decode()
    assert _rows(after) == before, "a new title is not new activity"


def test_renaming_without_script_comes_back_to_the_search_and_page(world_a, home):
    client = world_a.client_for(world_a.member)
    first = client.get(_url("chat-home", world_a), {"q": "trip"}).content.decode()
    cursor = re.search(r"before=([^&\"#]+)", _older(first)).group(1)
    renamed = home.mine[31]
    response = client.post(
        _url("chat-rename", world_a, thread_id=renamed.pk),
        {"title": "Trip to Porto", "q": "trip", "before": cursor},
    )
    assert response.status_code == 302
    assert response["Location"] == (
        _url("chat-home", world_a) + f"?q=trip&before={cursor}#thread-{renamed.pk}"
    )
    page = client.get(response["Location"]).content.decode()
    assert "Trip to Porto" in page and str(renamed.pk) in _rows(page)


# --- Delete -----------------------------------------------------------------------------------


def test_deleting_without_script_asks_first_then_comes_back_to_the_search(world_a, home):
    client = world_a.client_for(world_a.member)
    gone = home.mine[3]
    url = _url("chat-delete", world_a, thread_id=gone.pk)
    asked = client.post(url, {"q": "trip", "before": ""})
    assert asked.status_code == 200
    text = asked.content.decode()
    assert "Delete “Trip 03”?" in text and 'name="confirm" value="yes"' in text
    assert Thread.objects.for_tenant(world_a.tenant).filter(pk=gone.pk).exists()
    done = client.post(url, {"q": "trip", "before": "", "confirm": "yes"})
    assert done.status_code == 302 and done["Location"] == _url("chat-home", world_a) + "?q=trip"
    assert not Thread.objects.for_tenant(world_a.tenant).filter(pk=gone.pk).exists()
    assert "Deleted “Trip 03”." in client.get(done["Location"]).content.decode()


def test_deleting_with_htmx_moves_focus_to_the_list_and_says_when_the_search_is_empty(
    world_a, home
):
    client = world_a.client_for(world_a.member)
    lisbon = _thread(world_a, world_a.member, home.agent, "Lisbon")
    lisbon_2 = _thread(world_a, world_a.member, home.agent, "Lisbon again")
    # One of two matches: the row goes, the heading takes the focus, the status line says so.
    response = client.post(
        _url("chat-delete", world_a, thread_id=lisbon.pk), {"q": "lisbon"}, HTTP_HX_REQUEST="true"
    )
    body = response.content.decode()
    assert response.status_code == 200 and "HX-Retarget" not in response
    assert not _rows(body) and "Deleted “Lisbon”." in body
    assert '<h2 id="chat-list-heading" tabindex="-1" autofocus hx-swap-oob="true">' in body
    # The last match: the list says that nothing matches any more.
    response = client.post(
        _url("chat-delete", world_a, thread_id=lisbon_2.pk),
        {"q": "lisbon"},
        HTTP_HX_REQUEST="true",
    )
    body = response.content.decode()
    assert response["HX-Retarget"] == "#thread-list" and response["HX-Reswap"] == "outerHTML"
    assert 'No conversation has "lisbon" in its title.' in body
    assert "Deleted “Lisbon again”." in body and "autofocus" in body
    assert Thread.objects.for_tenant(world_a.tenant).filter(title__startswith="Trip").count() == 34


def test_a_conversation_still_replying_is_kept_and_its_row_says_what_to_do(world_a, home):
    busy = home.mine[0]
    services.run_create(
        tenant=world_a.tenant, end_user=busy.end_user, thread_id=busy.pk, input="hi"
    )
    client = world_a.client_for(world_a.member)
    url = _url("chat-delete", world_a, thread_id=busy.pk)
    words = (
        "This conversation is still writing a reply. Open it and stop the reply, then delete it."
    )
    link = f'<a href="{_url("chat-thread", world_a, thread_id=busy.pk)}" autofocus>'
    row = client.post(url, HTTP_HX_REQUEST="true").content.decode()
    assert words in row and link in row and "run in progress" not in row
    page = client.post(url, {"confirm": "yes"})
    assert page.status_code == 409
    assert words in page.content.decode() and link in page.content.decode()
    assert Thread.objects.for_tenant(world_a.tenant).filter(pk=busy.pk).exists()


def test_another_members_and_another_tenants_conversations_are_404(world_a, home):
    client = world_a.client_for(world_a.member)
    for name, data in [
        ("chat-delete", {}),
        ("chat-delete", {"confirm": "yes"}),
        ("chat-rename", {"title": "pwned"}),
    ]:
        for thread in (home.theirs, home.other_tenant):
            response = client.post(_url(name, world_a, thread_id=thread.pk), data)
            assert response.status_code == 404, (name, data, thread.title)
            response = client.post(data=data, path=_url(name, world_a, thread_id=thread.pk),
                                   HTTP_HX_REQUEST="true")  # fmt: skip
            assert response.status_code == 404, (name, data, thread.title)
    assert Thread.objects.for_tenant(world_a.tenant).filter(title="Admin secret plans").exists()
    assert Thread.objects.for_tenant(home.other_tenant.tenant).filter(title="Globex").exists()
    # The member's own conversation is asked about first (without the page's script).
    mine = client.post(_url("chat-delete", world_a, thread_id=home.mine[0].pk))
    assert mine.status_code == 200 and "Delete “Trip 00”?" in mine.content.decode()


# --- Agents -----------------------------------------------------------------------------------


def test_each_start_button_names_its_agent(world_a, home):
    _agent(world_a, "Travel planner")
    text = world_a.client_for(world_a.member).get(_url("chat-home", world_a)).content.decode()
    names = [
        re.sub(r"<[^>]+>", "", button)
        for button in re.findall(
            r'<button class="btn btn-primary btn-small"[^>]*>(.*?)</button>', text
        )
    ]
    assert sorted(names) == ["Start a chat with Calc", "Start a chat with Travel planner"]


def test_a_title_that_cannot_be_stored_keeps_the_rename_box_open_with_why(world_a, home):
    client = world_a.client_for(world_a.member)
    thread = home.mine[0]
    url = _url("chat-rename", world_a, thread_id=thread.pk)
    why = "The title contains a NUL character (U+0000), which cannot be stored."
    row = client.post(url, {"title": "Por\x00to", "q": ""}, HTTP_HX_REQUEST="true")
    assert row.status_code == 200  # htmx swaps the row in with the box open
    html = row.content.decode()
    assert why in html and 'value="Porto"' in html and 'aria-invalid="true"' in html
    assert html.count("<details") == 1 and "data-disclosure open" in html
    page = client.post(url, {"title": "Por\x00to", "q": "Trip"})
    assert page.status_code == 422 and why in page.content.decode()
    assert page.content.decode().count("data-disclosure open") == 1  # that row's box only
    thread.refresh_from_db()
    assert thread.title == "Trip 00"


def test_a_blank_title_is_refused_and_the_conversation_keeps_its_title_and_its_row(world_a, home):
    """Only spaces is no title: the rename box stays open saying so, and the conversation (one
    with nothing said in it, listed for its title) keeps its title and its place in the list,
    with the page's script or without it."""
    client = world_a.client_for(world_a.member)
    thread = home.mine[0]
    url = _url("chat-rename", world_a, thread_id=thread.pk)
    why = "The title cannot be blank: type at least one character other than a space."
    row = client.post(url, {"title": "   ", "q": ""}, HTTP_HX_REQUEST="true")
    assert row.status_code == 200  # htmx swaps the row in with the box open
    text = row.content.decode()
    assert why in text and 'aria-invalid="true"' in text and "data-disclosure open" in text
    assert "<strong>Trip 00</strong>" in text and "Untitled conversation" not in text
    page = client.post(url, {"title": " \t ", "q": ""})
    assert page.status_code == 422 and why in page.content.decode()
    thread.refresh_from_db()
    assert thread.title == "Trip 00"
    listed = client.get(_url("chat-home", world_a)).content.decode()
    assert _rows(listed)[0] == str(thread.pk) and "Untitled conversation" not in listed
    # The service refuses it whoever calls it, naming the field.
    with pytest.raises(ValidationFailed) as refused:
        services.thread_rename(
            tenant=world_a.tenant, end_user=thread.end_user, thread_id=thread.pk, title="\u3000 "
        )
    assert refused.value.fields == {"title": "Type a title."}


def test_a_nul_in_the_search_is_dropped_not_an_error(world_a, home):
    client = world_a.client_for(world_a.member)
    page = client.get(_url("chat-home", world_a), {"q": "Trip 0\x001"})
    assert page.status_code == 200 and "Trip 01" in page.content.decode()
    gone = home.mine[3]
    response = client.post(
        _url("chat-delete", world_a, thread_id=gone.pk), {"q": "a\x00"}, HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 200
    assert not Thread.objects.for_tenant(world_a.tenant).filter(pk=gone.pk).exists()

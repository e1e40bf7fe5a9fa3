import re

import pytest
from django.core import mail
from django.test import Client

from tenants import services
from tenants.models import ApiKey, AuditEvent, Invitation, Membership, Role, Tenant, User
from tests.conftest import PASSWORD


def _login(client: Client, email: str, password: str = PASSWORD):
    return client.post("/login/", {"username": email, "password": password})


# --- Accounts ---------------------------------------------------------------------------------


def test_login_lands_in_the_users_tenant(world_a):
    client = Client()
    response = _login(client, "owner@acme.test")
    assert response.status_code == 302
    response = client.get(response["Location"], follow=True)
    assert response.redirect_chain[-1][0] == "/t/acme/"
    assert b"Recent activity" in response.content


def test_wrong_passwords_are_throttled(world_a):
    client = Client()
    for _ in range(4):
        response = _login(client, "owner@acme.test", "wrong")
        assert b"The e-mail or the password is wrong." in response.content
    assert _login(client, "owner@acme.test", "wrong").status_code == 429
    # now even the right password is refused for a while, with a page that says why
    response = _login(client, "owner@acme.test")
    assert response.status_code == 429
    assert b"Too many failed attempts" in response.content
    assert "_auth_user_id" not in client.session
    # another account from the same address is not locked
    assert _login(Client(), "admin@acme.test").status_code == 302


def test_signup_creates_an_account_and_a_tenant(db):
    client = Client()
    response = client.post(
        "/signup/",
        {
            "name": "Ada",
            "email": "ada@example.test",
            "tenant_name": "Analytical Engines",
            "password1": PASSWORD,
            "password2": PASSWORD,
        },
    )
    assert response.status_code == 302 and response["Location"] == "/t/analytical-engines/"
    tenant = Tenant.objects.get(slug="analytical-engines")
    assert Membership.objects.for_tenant(tenant).get().role == Role.OWNER
    assert client.get("/t/analytical-engines/").status_code == 200


def test_signup_errors_stand_next_to_their_fields(world_a):
    response = Client().post(
        "/signup/",
        {
            "email": "owner@acme.test",
            "tenant_name": "",
            "password1": "short",
            "password2": "other",
        },
    )
    assert response.status_code == 200
    form = response.context["form"]
    assert set(form.errors) >= {"tenant_name", "password2"}
    response = Client().post(
        "/signup/",
        {
            "email": "owner@acme.test",
            "tenant_name": "X Co",
            "password1": PASSWORD,
            "password2": PASSWORD,
        },
    )
    assert "log in instead" in response.context["form"].errors["email"][0]


def test_signup_can_be_switched_off(db, settings):
    settings.SIGNUP_ENABLED = False
    response = Client().post("/signup/", {"email": "x@example.test"})
    assert response.status_code == 403 and b"Sign-up is closed" in response.content
    assert not User.objects.filter(email="x@example.test").exists()


def test_password_reset_sends_a_working_link(world_a):
    client = Client()
    client.post("/password/reset/", {"email": "member@acme.test"})
    assert len(mail.outbox) == 1
    link = re.search(r"http://testserver(/password/reset/\S+)", mail.outbox[0].body).group(1)
    response = client.get(link, follow=True)
    new = "a-brand-new-passphrase-42"
    response = client.post(
        response.redirect_chain[-1][0], {"new_password1": new, "new_password2": new}
    )
    assert response.status_code == 302
    assert _login(Client(), "member@acme.test", new).status_code == 302


def test_password_change_requires_the_old_password(world_a):
    client = world_a.client_for(world_a.member)
    response = client.post(
        "/password/change/",
        {
            "old_password": "nope",
            "new_password1": "x-new-pass-777",
            "new_password2": "x-new-pass-777",
        },
    )
    assert "old_password" in response.context["form"].errors


# --- Tenant pages -----------------------------------------------------------------------------


def test_a_member_can_only_chat_not_manage(world_a):
    client = world_a.client_for(world_a.member)
    page = client.get("/t/acme/")
    assert page.status_code == 200 and b"You are a member" in page.content
    assert b'href="/t/acme/members/"' not in page.content  # no management links in the navigation
    for url in ("/t/acme/members/", "/t/acme/api-keys/", "/t/acme/settings/", "/t/acme/audit/"):
        assert client.get(url).status_code == 403
    response = client.post("/t/acme/api-keys/create/", {"name": "mine", "scopes": ["admin"]})
    assert response.status_code == 403
    assert ApiKey.objects.for_tenant(world_a.tenant).count() == 2


def test_anonymous_visitors_are_sent_to_log_in(world_a):
    response = Client().get("/t/acme/members/")
    assert response.status_code == 302 and response["Location"].startswith("/login/?next=")


def test_the_tenant_switcher_lists_only_the_users_tenants(world_a, world_b):
    services.tenant_create(user=world_a.owner, name="Acme Labs")
    page = world_a.client_for(world_a.owner).get("/t/acme/").content.decode()
    assert "Acme Labs" in page and "/t/acme-labs/" in page
    assert "Globex" not in page


def test_invite_by_htmx_shows_the_link_and_the_pending_row(
    world_a, django_capture_on_commit_callbacks
):
    client = world_a.client_for(world_a.admin)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/t/acme/members/invite/",
            {"email": "new@example.test", "role": "admin"},
            HTTP_HX_REQUEST="true",
        )
    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith('<section class="card" id="invitations">')
    assert "new@example.test" in html and "/invite/" in html
    assert len(mail.outbox) == 1
    # a bad address is reported next to the field
    response = client.post(
        "/t/acme/members/invite/",
        {"email": "not-an-email", "role": "member"},
        HTTP_HX_REQUEST="true",
    )
    assert "Enter a valid email address." in response.content.decode()


def test_role_change_and_removal_by_htmx(world_a):
    client = world_a.client_for(world_a.owner)
    url = f"/t/acme/members/{world_a.member_membership.pk}/role/"
    response = client.post(url, {"role": "admin"}, HTTP_HX_REQUEST="true")
    assert "Role changed." in response.content.decode()
    assert Membership.objects.for_tenant(world_a.tenant).get(user=world_a.member).role == "admin"
    # the last owner cannot demote themselves; the page says why
    response = client.post(
        f"/t/acme/members/{world_a.owner_membership.pk}/role/",
        {"role": "member"},
        HTTP_HX_REQUEST="true",
    )
    assert "Make someone else an owner first." in response.content.decode()
    response = client.post(
        f"/t/acme/members/{world_a.member_membership.pk}/remove/", HTTP_HX_REQUEST="true"
    )
    assert "Member removed." in response.content.decode()
    assert not Membership.objects.for_tenant(world_a.tenant).filter(user=world_a.member).exists()


def test_api_key_page_shows_the_secret_once_and_revokes(world_a):
    client = world_a.client_for(world_a.owner)
    response = client.post(
        "/t/acme/api-keys/create/",
        {"name": "Support bot", "scopes": ["read", "run"], "expires_in": "30"},
        HTTP_HX_REQUEST="true",
    )
    html = response.content.decode()
    raw = re.search(r'value="(cp_[^"]+)" id="new-key"', html).group(1)
    assert response["Cache-Control"] == "no-store"
    key = services.api_key_authenticate(raw=raw)
    assert key.name == "Support bot" and key.expires_at is not None
    listing = client.get("/t/acme/api-keys/").content.decode()
    assert raw not in listing and f"cp_{key.prefix}_…" in listing
    response = client.post(f"/t/acme/api-keys/{key.pk}/revoke/", HTTP_HX_REQUEST="true")
    assert "is revoked" in response.content.decode()
    assert ApiKey.objects.for_tenant(world_a.tenant).get(pk=key.pk).status == "revoked"


def test_api_key_form_errors_name_the_field(world_a):
    client = world_a.client_for(world_a.owner)
    response = client.post("/t/acme/api-keys/create/", {"name": "", "scopes": []})
    assert response.status_code == 422
    assert set(response.context["form"].errors) == {"name", "scopes"}


def test_settings_rename_and_readdress(world_a, world_b):
    client = world_a.client_for(world_a.admin)
    response = client.post("/t/acme/settings/", {"name": "Acme Corp", "slug": "globex"})
    assert "already taken" in response.context["form"].errors["slug"][0]
    response = client.post("/t/acme/settings/", {"name": "Acme Corp", "slug": "acme-corp"})
    assert response["Location"] == "/t/acme-corp/settings/"
    event = AuditEvent.objects.for_tenant(world_a.tenant).get(action="tenant.updated")
    assert event.changes == {"name": ["Acme", "Acme Corp"], "slug": ["acme", "acme-corp"]}


def test_audit_log_filters_and_query_budget(world_a, django_assert_max_num_queries):
    for i in range(60):
        services.api_key_create(
            tenant=world_a.tenant, actor=world_a.actor(), name=f"k{i}", scopes=["read"]
        )
    client = world_a.client_for(world_a.owner)
    with django_assert_max_num_queries(10):
        page = client.get("/t/acme/audit/")
    assert (
        page.context["page"].paginator.count == 63 and len(page.context["page"].object_list) == 50
    )
    filtered = client.get("/t/acme/audit/?action=tenant.", HTTP_HX_REQUEST="true").content.decode()
    assert filtered.lstrip().startswith('<div id="audit-table">')
    assert "tenant.created" in filtered and "api_key.created" not in filtered
    assert "k59" not in client.get("/t/acme/audit/?actor=nobody").content.decode()


def test_members_page_query_budget(world_a, django_assert_max_num_queries):
    for i in range(20):
        user = User.objects.create_user(f"u{i}@acme.test", PASSWORD)
        Membership.objects.create(tenant=world_a.tenant, user=user)
    client = world_a.client_for(world_a.owner)
    with django_assert_max_num_queries(8):
        response = client.get("/t/acme/members/")
    assert response.content.decode().count('<tr id="member-') == 23


# --- Invitation pages -------------------------------------------------------------------------


@pytest.fixture
def invite_link(world_a):
    _, link = services.invitation_create(
        tenant=world_a.tenant, actor=world_a.actor(), email="new@example.test", role="member"
    )
    return link.replace("http://127.0.0.1:8000", "")


def test_a_new_person_creates_an_account_from_the_invitation(world_a, invite_link, settings):
    settings.SIGNUP_ENABLED = False  # an invitation works even when open sign-up is off
    client = Client()
    page = client.get(invite_link)
    assert b"Join Acme" in page.content and b"new@example.test" in page.content
    response = client.post(
        invite_link, {"name": "Newt", "password1": PASSWORD, "password2": PASSWORD}
    )
    assert response["Location"] == "/t/acme/"
    assert (
        Membership.objects.for_tenant(world_a.tenant).get(user__email="new@example.test").role
        == "member"
    )
    used = Client().get(invite_link)
    assert used.status_code == 410 and b"already been used" in used.content


def test_an_existing_user_logs_in_then_joins(world_a, world_b, invite_link):
    services.invitation_create(
        tenant=world_a.tenant, actor=world_a.actor(), email="owner@globex.test", role="admin"
    )
    link = Invitation.objects.for_tenant(world_a.tenant).get(email="owner@globex.test")
    url = f"/invite/{services.invitation_token(link)}/"
    page = Client().get(url)
    assert b"Log in to accept" in page.content
    client = world_b.client_for(world_b.owner)
    assert client.post(url)["Location"] == "/t/acme/"
    # someone else signed in cannot take it
    wrong = world_b.client_for(world_b.member).get(invite_link)
    assert b"but you are logged in as member@globex.test" in wrong.content


@pytest.mark.parametrize("mangle", [lambda u: u[:-3] + "xx/", lambda u: "/invite/nonsense/"])
def test_a_tampered_invitation_shows_a_clear_page(world_a, invite_link, mangle):
    response = Client().post(
        mangle(invite_link), {"name": "x", "password1": PASSWORD, "password2": PASSWORD}
    )
    assert response.status_code == 410 and b"not valid" in response.content
    assert not User.objects.filter(email="new@example.test").exists()


def test_pages_carry_a_content_security_policy(world_a):
    response = world_a.client_for(world_a.owner).get("/t/acme/")
    csp = response["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp


def test_untrusted_names_are_escaped(world_a):
    services.tenant_update(
        tenant=world_a.tenant, actor=world_a.actor(), name="<script>x()</script>", slug="acme"
    )
    html = world_a.client_for(world_a.owner).get("/t/acme/").content.decode()
    assert "<script>x()</script>" not in html and "&lt;script&gt;" in html


def test_the_members_table_can_be_refreshed_live(world_a):
    """The page re-reads only its table when the tenant's event socket reports a change."""
    client = world_a.client_for(world_a.owner)
    page = client.get("/t/acme/members/").content.decode()
    assert 'hx-trigger="tenant:members from:body"' in page
    fragment = client.get("/t/acme/members/?fragment=member-table", HTTP_HX_REQUEST="true")
    html = fragment.content.decode()
    assert html.lstrip().startswith('<section class="card" id="member-table"')
    assert "member@acme.test" in html and "Invite someone" not in html

"""The dashboard in a real browser: an owner sets up a tenant, its API keys and its people.

Each flow drives the pages the way a person does (typing, clicking, confirming dialogs) against
the live server, with one browser context per person. The flows run on the browser's thread
(see conftest.py); the ORM setup and the database checks stay in the test body.
"""

from __future__ import annotations

import re

import pytest
from django.core import mail
from playwright.sync_api import Locator, Page, expect

from tenants.models import ApiKey, Membership, Role, Tenant, User
from tests.conftest import PASSWORD, make_world

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def log_in(page: Page, email: str, password: str = PASSWORD) -> None:
    page.goto("/login/")
    page.get_by_label("E-mail").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def nav(page: Page) -> Locator:
    return page.get_by_role("navigation", name="Tenant")


def test_owner_creates_a_tenant_then_creates_copies_and_revokes_an_api_key(run_in_browser):
    User.objects.create_user("alice@example.test", PASSWORD, name="Alice")

    def flow(new_context) -> str:
        context = new_context()
        context.grant_permissions(["clipboard-read", "clipboard-write"])
        page = context.new_page()

        # Someone without a tenant is sent to create one right after logging in.
        log_in(page, "alice@example.test")
        expect(page).to_have_url(re.compile(r"/tenants/new/$"))
        expect(page.get_by_role("heading", name="Create a tenant")).to_be_visible()
        page.get_by_label("Name").fill("Acme Robotics")
        page.get_by_label("Address").fill("acme-robotics")
        page.get_by_role("button", name="Create tenant").click()
        expect(page).to_have_url(re.compile(r"/t/acme-robotics/$"))
        expect(page.get_by_text("Acme Robotics is created. You are its owner.")).to_be_visible()

        # A new key's secret is shown once, in a read-only field; Copy puts it on the clipboard.
        nav(page).get_by_role("link", name="API keys").click()
        expect(page).to_have_url(re.compile(r"/t/acme-robotics/api-keys/$"))
        expect(page.get_by_text("No keys yet.")).to_be_visible()
        page.get_by_label("Name").fill("CI pipeline")
        page.get_by_label("Expires").select_option(label="In 90 days")
        scopes = page.get_by_role("group", name="Scopes")
        expect(scopes.get_by_role("checkbox", name=re.compile(r"^Read:"))).to_be_checked()
        expect(scopes.get_by_role("checkbox", name=re.compile(r"^Run:"))).to_be_checked()
        scopes.get_by_role("checkbox", name=re.compile(r"^Admin:")).check()
        page.get_by_role("button", name="Create key").click()
        expect(page.get_by_text("“CI pipeline” is created.")).to_be_visible()
        new_key = page.locator("#new-key")
        expect(new_key).to_be_visible()
        expect(new_key).to_have_attribute("readonly", "")
        expect(new_key).to_have_value(re.compile(r"^cp_[A-Za-z0-9]+_\S{20,}$"))
        raw_key = new_key.input_value()
        page.get_by_role("button", name="Copy").click()
        expect(page.get_by_role("button", name="Copied")).to_be_visible()
        assert page.evaluate("navigator.clipboard.readText()") == raw_key

        row = page.locator("#keys-panel tbody tr", has_text="CI pipeline")
        expect(row).to_have_count(1)
        expect(row).to_contain_text(f"cp_{raw_key.split('_')[1]}_")
        expect(row.locator(".status")).to_have_text("active")
        for scope in ("read", "run", "admin"):
            expect(row.get_by_text(scope, exact=True)).to_be_visible()

        # The key works against the API (a fresh context: no session cookie to lean on).
        api = new_context().request
        auth = {"Authorization": f"Bearer {raw_key}"}
        response = api.get("/api/v1/tenant", headers=auth)
        assert response.status == 200, response.text()
        assert response.json()["slug"] == "acme-robotics"

        # Shown once: after a reload the key is listed but its secret is nowhere on the page.
        page.reload()
        expect(row.locator(".status")).to_have_text("active")
        expect(page.locator("#new-key")).to_have_count(0)
        assert raw_key not in page.content()

        # Revoking asks first; the row stays, marked revoked, and loses its button.
        dialogs: list[str] = []

        def accept(dialog) -> None:
            dialogs.append(dialog.message)
            dialog.accept()

        page.on("dialog", accept)
        row.get_by_role("button", name="Revoke").click()
        expect(page.get_by_text("“CI pipeline” is revoked.")).to_be_visible()
        expect(row.locator(".status")).to_have_text("revoked")
        expect(row.get_by_role("button", name="Revoke")).to_have_count(0)
        assert dialogs == ["Revoke “CI pipeline”? Programs using it stop working at once."]

        response = api.get("/api/v1/tenant", headers=auth)
        assert response.status == 401, response.text()
        return raw_key

    raw_key = run_in_browser(flow)

    tenant = Tenant.objects.get(slug="acme-robotics")
    assert Membership.objects.for_tenant(tenant).get().user.email == "alice@example.test"
    key = ApiKey.objects.for_tenant(tenant).get(name="CI pipeline")
    assert key.prefix == raw_key.split("_")[1]
    assert sorted(key.scopes) == ["admin", "read", "run"]
    assert key.expires_at is not None
    assert key.revoked_at is not None


def test_invited_person_creates_an_account_joins_and_sees_only_member_pages(run_in_browser):
    world = make_world("Acme")

    def flow(new_context) -> str:
        owner = new_context().new_page()
        log_in(owner, world.owner.email)
        expect(owner).to_have_url(re.compile(r"/t/acme/$"))
        nav(owner).get_by_role("link", name="Members").click()
        invitations = owner.locator("#invitations")
        expect(invitations.get_by_text("No pending invitations.")).to_be_visible()
        invitations.get_by_label("E-mail").fill("bob@example.test")
        expect(invitations.get_by_label("Role", exact=True)).to_have_value(Role.MEMBER)
        invitations.get_by_role("button", name="Send invitation").click()

        link_field = owner.locator("#invite-link")
        expect(link_field).to_be_visible()
        expect(link_field).to_have_value(re.compile(r"^http://localhost:\d+/invite/[^/]+/$"))
        invite_link = link_field.input_value()
        pending = invitations.locator(".list-row", has_text="bob@example.test")
        expect(pending).to_contain_text("Member")

        # Bob opens the link in his own browser, creates his account and lands in the tenant.
        bob = new_context().new_page()
        bob.goto(invite_link)
        expect(bob.get_by_role("heading", name="Join Acme")).to_be_visible()
        expect(bob.get_by_text("Acme Owner invited bob@example.test as member.")).to_be_visible()
        bob.get_by_label("Your name").fill("Bob Builder")
        bob.get_by_label("Password", exact=True).fill(PASSWORD)
        bob.get_by_label("Repeat the password").fill(PASSWORD)
        bob.get_by_role("button", name="Create account and join").click()
        expect(bob).to_have_url(re.compile(r"/t/acme/$"))
        expect(bob.get_by_text("Welcome to Acme!")).to_be_visible()
        expect(bob.locator(".sidebar-foot")).to_contain_text("Bob Builder")

        # A member uses the tenant but gets no management pages, not even by typing the URL.
        expect(nav(bob).get_by_role("link", name="Overview")).to_be_visible()
        for label in ("Members", "API keys", "Audit log", "Settings"):
            expect(nav(bob).get_by_role("link", name=label)).to_have_count(0)
        response = bob.goto("/t/acme/api-keys/")
        assert response is not None and response.status == 403
        expect(bob.get_by_role("heading", name="Not allowed")).to_be_visible()

        # The link works once: opened again it is refused.
        response = new_context().new_page().goto(invite_link)
        assert response is not None and response.status == 410

        # The owner sees Bob among the members, and no pending invitation, after a reload.
        owner.reload()
        expect(owner.locator("#member-table")).to_contain_text("bob@example.test")
        expect(owner.get_by_text("No pending invitations.")).to_be_visible()
        return invite_link

    invite_link = run_in_browser(flow)

    assert [m.to for m in mail.outbox] == [["bob@example.test"]]
    assert invite_link in mail.outbox[0].body
    bob = User.objects.get(email="bob@example.test")
    assert bob.name == "Bob Builder"
    assert Membership.objects.for_tenant(world.tenant).get(user=bob).role == Role.MEMBER

"""Create the demo tenant and its owner the first time; print how to sign in.

Run by `make run`. Idempotent: later runs say the account exists and print no password (it is
stored only as an Argon2 hash, so it cannot be shown again; reset it with `--reset-password`).
"""

import os
import secrets

from django.core.management.base import BaseCommand
from django.db import transaction

from ai_agents import demo as demo_agents
from tenants import services
from tenants.models import Tenant, User

DEMO_EMAIL = "owner@demo.local"
DEMO_TENANT = "Demo"


class Command(BaseCommand):
    help = "Create the demo tenant and owner account if they do not exist."

    def add_arguments(self, parser):
        parser.add_argument("--email", default=DEMO_EMAIL)
        parser.add_argument(
            "--reset-password",
            action="store_true",
            help="Give the owner a new generated password and print it.",
        )

    @transaction.atomic
    def handle(self, *args, email: str, reset_password: bool, **options):
        user = User.objects.filter(email=email).first()
        bind = os.environ.get("HOST", "127.0.0.1")
        shown = "127.0.0.1" if bind in ("0.0.0.0", "::") else bind
        host = f"http://{shown}:{os.environ.get('PORT', '8000')}/"
        if user is not None and not reset_password:
            demo = Tenant.objects.filter(slug="demo").first()
            if demo is not None and demo_agents.ensure(tenant=demo, user=user):
                self.stdout.write("bootstrap: added the demo agents to the Demo tenant")
            self.stdout.write(
                f"bootstrap: demo account {email} exists (forgot the password? "
                "run `make reset-demo-password`)"
            )
            return
        password = secrets.token_urlsafe(12)
        tenant: Tenant | None
        if user is None:
            user, tenant = services.signup(
                email=email, password=password, name="Demo Owner", tenant_name=DEMO_TENANT
            )
            demo_agents.ensure(tenant=tenant, user=user)
        else:
            user.set_password(password)
            user.save(update_fields=["password"])
            tenant = Tenant.objects.filter(memberships__user=user).first()
        self.stdout.write(
            self.style.SUCCESS(
                "\n".join(
                    [
                        "",
                        "  Control Plane is ready.",
                        f"    URL:      {host}",
                        f"    E-mail:   {email}",
                        f"    Password: {password}",
                        f"    Tenant:   {tenant.name if tenant else '-'}",
                        "  The password is shown this once.",
                        "",
                    ]
                )
            )
        )

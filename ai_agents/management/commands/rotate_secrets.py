"""Re-encrypt every stored tenant secret under the newest key of SECRETS_ENCRYPTION_KEYS.

Rotation: put a new key first in SECRETS_ENCRYPTION_KEYS (keep the old one after it), deploy, run
this command, then remove the old key. Safe to run more than once.
"""

from django.core.management.base import BaseCommand
from django.db import transaction

from ai_agents.models import McpServer, ModelProvider
from controlplane import crypto


class Command(BaseCommand):
    help = "Re-encrypt stored provider keys and MCP headers under the newest encryption key."

    def handle(self, *args, **options):
        done = 0
        with transaction.atomic():
            # tenant-scope: key rotation is an operator task over every tenant's secrets
            providers = ModelProvider.objects.unscoped("rotating every tenant's secrets")
            for provider in providers.select_for_update().exclude(api_key_encrypted=""):
                provider.api_key_encrypted = crypto.rotate(provider.api_key_encrypted)
                provider.save(update_fields=["api_key_encrypted"])
                done += 1
            # tenant-scope: key rotation is an operator task over every tenant's secrets
            servers = McpServer.objects.unscoped("rotating every tenant's secrets")
            for server in servers.select_for_update().exclude(headers_encrypted=""):
                server.headers_encrypted = crypto.rotate(server.headers_encrypted)
                server.save(update_fields=["headers_encrypted"])
                done += 1
        self.stdout.write(f"rotate_secrets: {done} secret(s) re-encrypted under the newest key")

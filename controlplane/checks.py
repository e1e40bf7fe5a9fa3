"""System checks that stop a misconfigured deployment at start (migrate, check, runserver)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, register


@register("security")
def encryption_keys_configured(app_configs: Any, **kwargs: Any) -> list[Error]:
    if settings.SECRETS_ENCRYPTION_KEYS:
        return []
    return [
        Error(
            "SECRETS_ENCRYPTION_KEYS is not set: tenant secrets (provider keys, MCP headers) "
            "cannot be stored.",
            hint="Generate a key with: python -c 'from cryptography.fernet import Fernet; "
            "print(Fernet.generate_key().decode())' and set SECRETS_ENCRYPTION_KEYS to it.",
            id="controlplane.E001",
        )
    ]

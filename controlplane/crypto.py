"""Encryption of tenant secrets at rest (provider keys, MCP headers, webhook secrets).

Keys come from `SECRETS_ENCRYPTION_KEYS`: a comma-separated list of Fernet keys, newest first.
Encryption always uses the first; decryption tries each, so a key is rotated by putting a new one
in front, running `manage.py rotate_secrets` (re-encrypts every stored secret under the new key),
then dropping the old one. In the embedded dev mode a key is generated once under ./var/.
"""

from __future__ import annotations

from functools import cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


class SecretUnreadable(Exception):
    """A stored secret cannot be decrypted with any configured key."""


@cache
def _fernet(keys: tuple[str, ...]) -> MultiFernet:
    if not keys:
        raise ImproperlyConfigured(
            "SECRETS_ENCRYPTION_KEYS is not set. Generate one with: python -c 'from "
            "cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"
        )
    try:
        return MultiFernet([Fernet(k.encode()) for k in keys])
    except ValueError as exc:
        raise ImproperlyConfigured(f"SECRETS_ENCRYPTION_KEYS holds an invalid key: {exc}") from exc


def _current() -> MultiFernet:
    return _fernet(tuple(settings.SECRETS_ENCRYPTION_KEYS))


def encrypt(plaintext: str) -> str:
    return _current().encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return _current().decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise SecretUnreadable(
            "A stored secret cannot be decrypted: was SECRETS_ENCRYPTION_KEYS changed without "
            "keeping the old key?"
        ) from exc


def rotate(token: str) -> str:
    """Re-encrypt `token` under the newest key."""
    try:
        return _current().rotate(token.encode()).decode()
    except InvalidToken as exc:
        raise SecretUnreadable(
            "A stored secret cannot be decrypted with any configured key."
        ) from exc


def last4(secret: str) -> str:
    """What may be shown of a secret: its last four characters at most."""
    return secret[-4:] if len(secret) >= 12 else ""

import pytest
from cryptography.fernet import Fernet

from controlplane import crypto


def test_secrets_round_trip_and_never_appear_in_the_token(settings):
    settings.SECRETS_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    token = crypto.encrypt("sk-live-1234567890abcd")
    assert "sk-live" not in token and crypto.decrypt(token) == "sk-live-1234567890abcd"


def test_rotation_keeps_old_secrets_readable_and_moves_them_to_the_new_key(settings):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.SECRETS_ENCRYPTION_KEYS = [old]
    token = crypto.encrypt("header-value")
    settings.SECRETS_ENCRYPTION_KEYS = [new, old]
    assert crypto.decrypt(token) == "header-value"
    rotated = crypto.rotate(token)
    settings.SECRETS_ENCRYPTION_KEYS = [new]  # the old key is dropped after rotation
    assert crypto.decrypt(rotated) == "header-value"
    with pytest.raises(crypto.SecretUnreadable, match="SECRETS_ENCRYPTION_KEYS"):
        crypto.decrypt(token)


def test_only_the_last_four_characters_are_ever_shown():
    assert crypto.last4("sk-abcdefghijklmnop") == "mnop"
    assert crypto.last4("short") == ""  # too short to show anything safely

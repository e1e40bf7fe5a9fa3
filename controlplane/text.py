"""NUL characters and PostgreSQL: its text and jsonb values cannot hold U+0000, and a statement
carrying one fails as a whole. What people send is refused with a clear error (`has_nul`, as
Django's form fields do); what models and tools produce is kept with each NUL replaced by U+FFFD
(`without_nul`), so a tool that read a binary page cannot make a run's outcome unwritable."""

from __future__ import annotations

from typing import Any

NUL = "\x00"
REPLACEMENT = "\ufffd"


def has_nul(value: Any) -> bool:
    """Whether a NUL is in `value`: a string, or any string within nested dicts and lists
    (keys too)."""
    if isinstance(value, str):
        return NUL in value
    if isinstance(value, dict):
        return any(has_nul(key) or has_nul(item) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return any(has_nul(item) for item in value)
    return False


def without_nul(value: Any) -> Any:
    """`value` with every NUL in its strings (keys too) replaced by U+FFFD; `value` itself when
    it has none."""
    if not has_nul(value):
        return value
    if isinstance(value, str):
        return value.replace(NUL, REPLACEMENT)
    if isinstance(value, dict):
        return {without_nul(key): without_nul(item) for key, item in value.items()}
    return [without_nul(item) for item in value]

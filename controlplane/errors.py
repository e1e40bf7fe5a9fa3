"""Domain exceptions. Services raise them; `controlplane.api` and `controlplane.views` map them,
in one place each, to the JSON error envelope and to friendly pages."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    code = "error"
    status = 400

    def __init__(self, message: str, *, fields: dict[str, str] | None = None, **metadata: Any):
        super().__init__(message)
        self.message = message
        self.fields = fields or {}
        self.metadata = metadata

    def message_for(self, role: str, *, tenant_name: str) -> str:
        """The message in the words for a member of that role, in the dashboard or the chat
        (the API, which addresses no person, says `message`). The same for every role unless
        the error knows better (`usage.errors.BudgetExhausted`: only owners can act on it)."""
        return self.message


class NotFound(DomainError):
    """Missing, or another tenant's: the two are indistinguishable on purpose."""

    code = "not_found"
    status = 404


class Conflict(DomainError):
    code = "conflict"
    status = 409


class PermissionDenied(DomainError):
    code = "permission_denied"
    status = 403


class ValidationFailed(DomainError):
    code = "validation_failed"
    status = 422


class QuotaExceeded(DomainError):
    code = "quota_exceeded"
    status = 429


class RateLimited(QuotaExceeded):
    """Too many requests or runs in a sliding window. `metadata` holds `limit`, `window`
    (seconds), `scope` and `retry_after` (whole seconds), which the API sends as Retry-After."""

    code = "rate_limited"


class Unavailable(DomainError):
    """Something outside the control plane (a model provider, an MCP server) failed."""

    code = "upstream_unavailable"
    status = 502


class AuthenticationFailed(DomainError):
    code = "unauthenticated"
    status = 401


def envelope(
    code: str, message: str, *, fields: dict[str, str] | None = None, **metadata: Any
) -> dict:
    """The one JSON error shape (compatible with the Agent Protocol's ErrorResponse)."""
    meta = dict(metadata)
    if fields:
        meta["fields"] = fields
    body: dict[str, Any] = {"code": code, "message": message}
    if meta:
        body["metadata"] = meta
    return body

"""The one NinjaAPI, mounted at /api/v1/, and the one place errors become JSON."""

from __future__ import annotations

import logging

from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError
from ninja.errors import ValidationError as NinjaValidationError

from controlplane.errors import DomainError, envelope
from controlplane.middleware import unavailable_response
from tenants.auth import ApiKeyAuth

log = logging.getLogger(__name__)

api = NinjaAPI(
    title="Control Plane API",
    version="1",
    description=(
        "Manage and run agents from code. Authenticate with an API key of your tenant, sent as "
        "`Authorization: Bearer <key>` or `X-Api-Key: <key>`."
    ),
    urls_namespace="api",
    docs_url="/docs",
    auth=ApiKeyAuth(),
)


def _error(request: HttpRequest, status: int, code: str, message: str, **extra) -> HttpResponse:
    return api.create_response(request, envelope(code, message, **extra), status=status)


@api.exception_handler(DomainError)
def on_domain_error(request: HttpRequest, exc: DomainError) -> HttpResponse:
    response = _error(request, exc.status, exc.code, exc.message, fields=exc.fields, **exc.metadata)
    retry_after = exc.metadata.get("retry_after")
    if isinstance(retry_after, int) and retry_after > 0:
        response["Retry-After"] = str(retry_after)
    return response


def _field_name(loc: list | tuple) -> str:
    # ninja prefixes the location ("body", "payload", "query", "path"); users want the field.
    parts = [str(p) for p in loc if p not in ("body", "payload", "query", "path", "header")]
    return ".".join(parts) or "body"


@api.exception_handler(NinjaValidationError)
def on_validation_error(request: HttpRequest, exc: NinjaValidationError) -> HttpResponse:
    fields: dict[str, str] = {}
    for err in exc.errors:
        fields.setdefault(_field_name(err.get("loc", ())), err.get("msg", "is invalid"))
    names = ", ".join(fields)
    return _error(request, 422, "validation_failed", f"Invalid input: {names}.", fields=fields)


@api.exception_handler(AuthenticationError)
def on_auth_error(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return _error(
        request,
        401,
        "unauthenticated",
        "An API key is required: send `Authorization: Bearer <key>` or `X-Api-Key: <key>`.",
    )


@api.exception_handler(Http404)
def on_not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
    return _error(request, 404, "not_found", "Not found.")


@api.exception_handler(RequestDataTooBig)
def on_too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    from django.conf import settings

    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return _error(request, 413, "body_too_large", f"The request body exceeds {limit} bytes.")


@api.exception_handler(HttpError)
def on_http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    code = {400: "bad_request", 405: "method_not_allowed"}.get(exc.status_code, "error")
    return _error(request, exc.status_code, code, str(exc.message))


@api.exception_handler(Exception)
def on_unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
    unavailable = unavailable_response(request, exc)  # Redis down: 503 + Retry-After, as pages
    if unavailable is not None:
        return unavailable
    log.exception("unhandled error in %s %s", request.method, request.path)
    return _error(request, 500, "internal_error", "Something went wrong on our side.")


api.add_router("/", "tenants.api.router")
api.add_router("/", "ai_agents.api.router")
api.add_router("/", "usage.api.router")

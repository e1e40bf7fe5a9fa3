"""Which rate limits apply to what (docs/rate-limits.md); `controlplane.ratelimit` counts.

- every request authenticated by an API key: the key's **requests per minute**;
- every run start (`conversations.services.run_create`, the draft-run endpoint): the key's
  **runs per minute** when a key starts it, and the end user's **runs per minute and per hour**
  for runs an end user asks for (chat and API; schedules and triggers are set up by admins).

A limit comes from the key (keys only), else the tenant, else the operator's default in settings;
0 means no limit. Tenant and key rows are already loaded by the caller: a check costs no query,
and one Redis round trip.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from controlplane import ratelimit
from controlplane.errors import RateLimited, ValidationFailed
from tenants.models import ApiKey, Tenant

MAX_LIMIT = ratelimit.MAX_LIMIT

# Tenant field -> the settings default it overrides.
TENANT_DEFAULTS = {
    "end_user_runs_per_minute": "RATE_LIMIT_END_USER_RUNS_PER_MINUTE",
    "end_user_runs_per_hour": "RATE_LIMIT_END_USER_RUNS_PER_HOUR",
    "api_key_requests_per_minute": "RATE_LIMIT_API_KEY_REQUESTS_PER_MINUTE",
    "api_key_runs_per_minute": "RATE_LIMIT_API_KEY_RUNS_PER_MINUTE",
}
# Key field -> the tenant field it overrides.
KEY_DEFAULTS = {
    "requests_per_minute": "api_key_requests_per_minute",
    "runs_per_minute": "api_key_runs_per_minute",
}
# Runs an end user asks for; the others (schedules, triggers) are set up by the tenant's admins.
END_USER_SOURCES = frozenset({"chat", "api"})

_UNITS = {60: "minute", 3600: "hour"}


def default(field: str) -> int:
    """The operator's default for a tenant field."""
    return int(getattr(settings, TENANT_DEFAULTS[field]))


def tenant_limit(tenant: Tenant, field: str) -> int:
    value = getattr(tenant, field)
    return default(field) if value is None else int(value)


def key_limit(key: ApiKey, field: str, tenant: Tenant | None = None) -> int:
    """The key's own limit, else its tenant's (pass `tenant` when it is at hand: no query)."""
    value = getattr(key, field)
    if value is not None:
        return int(value)
    return tenant_limit(tenant if tenant is not None else key.tenant, KEY_DEFAULTS[field])


def validate(values: dict[str, Any]) -> dict[str, int | None]:
    """Check limits typed by a person or sent to the API: empty (None) or 0..MAX_LIMIT.
    Raises ValidationFailed naming each bad field."""
    clean: dict[str, int | None] = {}
    errors: dict[str, str] = {}
    for field, value in values.items():
        if value is None or value == "":
            clean[field] = None
            continue
        try:
            number = int(value)
            if isinstance(value, float) and number != value:
                raise ValueError
        except (TypeError, ValueError):
            errors[field] = "Give a whole number, or leave it empty for the default."
            continue
        if not 0 <= number <= MAX_LIMIT:
            errors[field] = f"Give a number from 0 (no limit) to {MAX_LIMIT:,}."
            continue
        clean[field] = number
    if errors:
        raise ValidationFailed("Some limits are invalid.", fields=errors)
    return clean


# --- the checks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    window: ratelimit.Window
    scope: str
    message: str  # with {limit}, {s} (plural), {unit} and {wait}


def _rule(subject: str, limit: int, seconds: int, scope: str, message: str) -> list[_Rule]:
    if limit <= 0:
        return []
    return [_Rule(ratelimit.Window(subject, min(limit, MAX_LIMIT), seconds), scope, message)]


def _refuse(rules: list[_Rule], decision: ratelimit.Decision) -> RateLimited:
    rule = next(r for r in rules if r.window == decision.window)
    window = rule.window
    wait = decision.retry_after
    message = rule.message.format(
        limit=window.limit,
        s="" if window.limit == 1 else "s",
        unit=_UNITS.get(window.seconds, f"{window.seconds} s"),
        wait=wait,
    )
    return RateLimited(
        message,
        scope=rule.scope,
        limit=window.limit,
        window=window.seconds,
        retry_after=wait,
    )


def _check(tenant_id: Any, rules: list[_Rule], now_ms: int | None) -> ratelimit.Decision:
    decision = ratelimit.hit(tenant_id, [r.window for r in rules], now_ms=now_ms)
    if not decision.allowed:
        raise _refuse(rules, decision)
    return decision


def api_request(*, key: ApiKey, now_ms: int | None = None) -> None:
    """Count a request made with `key`; RateLimited when its per-minute limit is reached."""
    rules = _rule(
        f"key:{key.pk}:requests",
        key_limit(key, "requests_per_minute"),
        60,
        "api_key_requests",
        "This API key may make {limit} request{s} per {unit}; try again in {wait} s.",
    )
    _check(key.tenant_id, rules, now_ms)


def _run_rules(
    tenant: Tenant, end_user_id: Any | None, api_key: ApiKey | None, source: str
) -> list[_Rule]:
    rules: list[_Rule] = []
    if api_key is not None:
        rules += _rule(
            f"key:{api_key.pk}:runs",
            key_limit(api_key, "runs_per_minute", tenant),
            60,
            "api_key_runs",
            "This API key may start {limit} run{s} per {unit}; try again in {wait} s.",
        )
    if end_user_id is not None and source in END_USER_SOURCES:
        for field, seconds in (("end_user_runs_per_minute", 60), ("end_user_runs_per_hour", 3600)):
            rules += _rule(
                f"user:{end_user_id}:runs",
                tenant_limit(tenant, field),
                seconds,
                "end_user_runs",
                "This end user may start {limit} run{s} per {unit}; try again in {wait} s.",
            )
    return rules


def run_check(
    *,
    tenant: Tenant,
    end_user_id: Any | None = None,
    api_key: ApiKey | None = None,
    source: str = "chat",
    now_ms: int | None = None,
) -> ratelimit.Decision:
    """Count a run start against the key's and the end user's limits; RateLimited when one is
    reached (then nothing is counted)."""
    return _check(tenant.pk, _run_rules(tenant, end_user_id, api_key, source), now_ms)


@contextmanager
def run_start(
    *,
    tenant: Tenant,
    end_user_id: Any | None = None,
    api_key: ApiKey | None = None,
    source: str = "chat",
    now_ms: int | None = None,
) -> Iterator[None]:
    """Count a run start against the key's and the end user's limits, or raise RateLimited
    before anything is written. If the block raises (the thread is busy, the input is refused),
    the run did not start and the count is taken back."""
    decision = run_check(
        tenant=tenant, end_user_id=end_user_id, api_key=api_key, source=source, now_ms=now_ms
    )
    try:
        yield
    except BaseException:
        ratelimit.refund(decision)
        raise

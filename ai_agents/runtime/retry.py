"""Retrying a failed model call, within one budget per run (`RUN_MODEL_RETRIES`).

What is retried: answers that say "try again" (429, honouring `Retry-After` up to
`RUN_MODEL_RETRY_MAX_WAIT_SECONDS`; 408, 409, 425 and 5xx), a provider that stops sending (the
client's read timeout), a connection that breaks, and an answer that cannot be parsed. What is
not: anything the provider will answer the same way again (a bad key, an unknown model, a request
it refuses, an address the egress guard refuses).

Retrying a model call is safe: the tools of a turn run only after the model's answer has
completed, so a call that failed half-way has changed nothing. It may have streamed part of its
text to the reader, though: the retry then says so with `discard=True` on its `model.retry`
event, and readers drop the text of that message before the new one streams (docs/run-events.md).
Each retry is a span of the run's trace (`kind: "retry"`), with its reason and its wait, so the
run inspector shows why a reply took longer.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

import openai
import pydantic
from agents import Model, ModelResponse
from agents.items import TResponseStreamEvent
from django.conf import settings
from openai.types.responses import ResponseTextDeltaEvent

from ai_agents.runtime.trace import Trace

RATE_LIMITED: Final = "rate_limited"
SERVER_ERROR: Final = "server_error"
TIMEOUT: Final = "timeout"
CONNECTION: Final = "connection"
MALFORMED_RESPONSE: Final = "malformed_response"
MALFORMED_TOOL_ARGUMENTS: Final = "malformed_tool_arguments"

# Statuses a provider uses for "not now": request timeout, conflict (e.g. a locked conversation),
# too early, too many requests, and every server error.
_RETRY_STATUSES: Final = frozenset({408, 409, 425, 429})
# Raw events that readers see (as `message.delta`); tool arguments reach them only once whole.
_VISIBLE_EVENTS: Final = (ResponseTextDeltaEvent,)


def budget() -> int:
    return max(int(getattr(settings, "RUN_MODEL_RETRIES", 3)), 0)


def backoff_seconds() -> float:
    return max(float(getattr(settings, "RUN_MODEL_RETRY_BACKOFF_SECONDS", 1.0)), 0.0)


def max_wait_seconds() -> float:
    return max(float(getattr(settings, "RUN_MODEL_RETRY_MAX_WAIT_SECONDS", 30.0)), 0.0)


def retries_used(trace: Trace) -> int:
    return sum(1 for span in trace.spans if span["kind"] == "retry")


def backoff(retry: int) -> float:
    """Seconds before retry number `retry` (1-based): exponential with "equal jitter" (half
    fixed, half random), so many runs failing together do not come back together."""
    ceiling = min(backoff_seconds() * 2 ** (retry - 1), max_wait_seconds())
    return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 (jitter, not a secret)


@dataclass(frozen=True)
class Failure:
    """A failed model call that may be retried: `reason` (a code) and `message` (plain words)."""

    reason: str
    message: str
    retry_after: float | None = None


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what caused it (`__cause__`, else `__context__`), outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def retry_after(response: Any) -> float | None:
    """Seconds a provider asked us to wait (`retry-after-ms`, or `retry-after` in seconds or as
    an HTTP date); None if it did not say."""
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(float(raw_ms) / 1000, 0.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(float(raw), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def classify(exc: BaseException, *, timeout: float | None = None) -> Failure | None:
    """The retryable failure `exc` is, or None when retrying would get the same answer."""
    from controlplane import egress

    for candidate in exception_chain(exc):
        if isinstance(candidate, (egress.EgressDenied, egress.EgressError)):
            return None
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status == 429:
            return Failure(
                RATE_LIMITED,
                "The model provider is taking no more requests for now (HTTP 429: too many "
                "requests).",
                retry_after(exc.response),
            )
        if status in _RETRY_STATUSES or status >= 500:
            return Failure(
                SERVER_ERROR,
                f"The model provider answered with an error (HTTP {status}).",
                retry_after(exc.response),
            )
        return None
    for candidate in exception_chain(exc):
        names = _names(candidate)
        if isinstance(candidate, (openai.APITimeoutError, TimeoutError)) or (
            "TimeoutException" in names
        ):
            within = f" for {timeout:g} s" if timeout else ""
            return Failure(TIMEOUT, f"The model provider stopped answering (nothing{within}).")
        if isinstance(candidate, openai.APIConnectionError) or "TransportError" in names:
            return Failure(CONNECTION, "The connection to the model provider broke.")
    if isinstance(
        exc, (json.JSONDecodeError, openai.APIResponseValidationError, pydantic.ValidationError)
    ):
        return Failure(MALFORMED_RESPONSE, "The model provider sent an answer we could not read.")
    return None


class RetriesExhausted(Exception):
    """A retryable failure with no retry left (or a wait longer than allowed): the run fails.
    `message` says why in plain words, or is empty: then the caller explains the cause (the
    provider's own error) and adds that it was tried `retries` more times."""

    def __init__(self, message: str = "", *, retries: int = 0) -> None:
        super().__init__(message or f"gave up after {retries} retries")
        self.message = message
        self.retries = retries


@dataclass
class ModelRetryEvent:
    """Put in the SDK's stream of raw model events when a model call is retried; the run's
    event mapper turns it into a `model.retry` event. The SDK passes unknown raw events through."""

    reason: str
    message: str
    retry: int
    max_retries: int
    wait_ms: int
    discard: bool
    type: str = "cp.model_retry"


class RetryingModel(Model):
    """Wraps one agent's model: a failed call is retried while the run's budget lasts.

    The budget is the trace's: every retry of the run (of any of its agents, and for malformed
    tool arguments too) is a `retry` span, and there are at most `RUN_MODEL_RETRIES` of them.
    """

    def __init__(
        self, inner: Model, *, trace: Trace, agent: str, timeout: float | None = None
    ) -> None:
        self.inner = inner
        self.trace = trace
        self.agent = agent
        self.timeout = timeout

    async def close(self) -> None:
        await self.inner.close()

    async def _cleanup_on_run_end(self, owner: object) -> None:
        await self.inner._cleanup_on_run_end(owner)

    def _plan(self, exc: Exception, *, discard: bool) -> ModelRetryEvent:
        """Record the retry of a failed call and say how long to wait; raise `exc` (or
        RetriesExhausted) when it must not be retried."""
        failure = classify(exc, timeout=self.timeout)
        if failure is None:
            raise exc
        used, allowed = retries_used(self.trace), budget()
        if not allowed:
            raise exc
        if used >= allowed:
            raise RetriesExhausted(retries=used) from exc
        wait = backoff(used + 1)
        if failure.retry_after is not None:
            if failure.retry_after > max_wait_seconds():
                raise RetriesExhausted(
                    f"{failure.message} It asked us to wait {failure.retry_after:.0f} s, longer "
                    f"than the {max_wait_seconds():g} s a reply may wait. Try again later."
                ) from exc
            wait = failure.retry_after
        event = ModelRetryEvent(
            reason=failure.reason,
            message=f"{failure.message} Trying again in {wait:.1f} s.",
            retry=used + 1,
            max_retries=allowed,
            wait_ms=round(wait * 1000),
            discard=discard,
        )
        self.trace.add(
            "retry",
            agent=self.agent,
            reason=failure.reason,
            message=failure.message,
            retry=event.retry,
            wait_ms=event.wait_ms,
            discarded=discard,
            error=f"{type(exc).__name__}: {str(exc)[:300]}",
        )
        return event

    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        while True:
            try:
                return await self.inner.get_response(*args, **kwargs)
            except Exception as exc:
                event = self._plan(exc, discard=False)
                await asyncio.sleep(event.wait_ms / 1000)

    async def stream_response(  # type: ignore[override]
        self, *args: Any, **kwargs: Any
    ) -> AsyncIterator[TResponseStreamEvent]:
        while True:
            shown = False  # did this call stream text to the reader?
            try:
                async for event in self.inner.stream_response(*args, **kwargs):
                    shown = shown or isinstance(event, _VISIBLE_EVENTS)
                    yield event
                return
            except Exception as exc:
                retry = self._plan(exc, discard=shown)
            yield retry  # type: ignore[misc]
            await asyncio.sleep(retry.wait_ms / 1000)

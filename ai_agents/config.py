"""The configuration an `AgentVersion` stores, as one validated schema.

The same schema validates the dashboard form, the management API and what the runtime reads, so a
version that was saved is always one the runtime can build.
"""

from __future__ import annotations

import re
from typing import Any, Literal
from uuid import UUID

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

GUARDRAIL_KINDS = ("blocked_words", "pattern", "max_length", "classifier")
GUARDRAIL_LABELS = {
    "blocked_words": "Blocked words",
    "pattern": "Regular expression",
    "max_length": "Maximum length",
    "classifier": "Classifier (asks the model)",
}
assert set(GUARDRAIL_LABELS) == set(GUARDRAIL_KINDS)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettingsConfig(_Strict):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_output_tokens: int | None = Field(None, ge=1, le=200_000)


class ToolConfig(_Strict):
    name: str = Field(min_length=1, max_length=64)
    settings: dict[str, Any] = Field(default_factory=dict)


class McpRef(_Strict):
    server_id: UUID
    # A required server that cannot be reached fails the run; an optional one is skipped
    # (and the trace says why).
    required: bool = False


class GuardrailConfig(_Strict):
    kind: Literal["blocked_words", "pattern", "max_length", "classifier"]
    words: list[str] = Field(default_factory=list, max_length=200)
    pattern: str = Field("", max_length=500)
    max_chars: int | None = Field(None, ge=1, le=1_000_000)
    question: str = Field("", max_length=1000)
    message: str = Field("", max_length=500)

    @model_validator(mode="after")
    def _complete(self) -> GuardrailConfig:
        if self.kind == "blocked_words" and not [w for w in self.words if w.strip()]:
            raise ValueError("a blocked-words guardrail needs at least one word")
        if self.kind == "pattern":
            if not self.pattern:
                raise ValueError("a pattern guardrail needs a pattern")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"the pattern is not a valid regular expression: {exc}") from exc
        if self.kind == "max_length" and not self.max_chars:
            raise ValueError("a maximum-length guardrail needs max_chars")
        if self.kind == "classifier" and not self.question.strip():
            raise ValueError("a classifier guardrail needs a yes/no question")
        return self

    @property
    def user_message(self) -> str:
        return self.message or "Sorry, I can't help with that request."


class MemoryPolicy(_Strict):
    """Long-term memory policy (used by the memory feature)."""

    enabled: bool = False
    extract_after_run: bool = True
    search_limit: int = Field(5, ge=0, le=50)


class AgentConfig(_Strict):
    instructions: str = Field("", max_length=50_000)
    provider_id: UUID | None = None  # None: the built-in offline model
    model: str = Field("", max_length=200)  # empty: the provider's default model
    model_settings: ModelSettingsConfig = Field(
        default_factory=lambda: ModelSettingsConfig.model_validate({})
    )
    tools: list[ToolConfig] = Field(default_factory=list, max_length=64)
    mcp_servers: list[McpRef] = Field(default_factory=list, max_length=16)
    handoffs: list[UUID] = Field(default_factory=list, max_length=32)
    input_guardrails: list[GuardrailConfig] = Field(default_factory=list, max_length=16)
    output_guardrails: list[GuardrailConfig] = Field(default_factory=list, max_length=16)
    memory: MemoryPolicy = Field(default_factory=lambda: MemoryPolicy.model_validate({}))
    max_turns: int = Field(10, ge=1, le=100)
    output_schema: dict[str, Any] | None = None

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, tools: list[ToolConfig]) -> list[ToolConfig]:
        names = [t.name for t in tools]
        if len(names) != len(set(names)):
            raise ValueError("a tool may be listed once")
        return tools

    @field_validator("handoffs")
    @classmethod
    def _unique_handoffs(cls, ids: list[UUID]) -> list[UUID]:
        return list(dict.fromkeys(ids))

    @field_validator("output_schema")
    @classmethod
    def _object_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is None:
            return None
        if schema.get("type") != "object":
            raise ValueError('the output schema must be a JSON schema with "type": "object"')
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"the output schema is not a valid JSON schema: {exc.message}")
        return schema

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model_settings.temperature": 0.2, "tools": [...], ...} for field-by-field comparison."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "output_schema":
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def diff(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The fields that differ between two configurations, in a stable order."""
    a, b = (
        flatten(AgentConfig.model_validate(before).dump()),
        flatten(AgentConfig.model_validate(after).dump()),
    )
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]

"""Structured output for a tenant's JSON schema, without generating Python classes from it."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
from agents import AgentOutputSchemaBase, ModelBehaviorError


class JsonSchemaOutput(AgentOutputSchemaBase):
    """The model must answer with a JSON object valid against `schema`; the final output is the
    parsed object (a dict)."""

    def __init__(self, schema: dict[str, Any]):
        jsonschema.Draft202012Validator.check_schema(schema)
        self._schema = schema
        self._validator = jsonschema.Draft202012Validator(schema)

    def is_plain_text(self) -> bool:
        return False

    def name(self) -> str:
        return "final_output"

    def json_schema(self) -> dict[str, Any]:
        return self._schema

    def is_strict_json_schema(self) -> bool:
        # Tenants write ordinary JSON schemas; OpenAI's strict mode demands extra rules of them.
        return False

    def validate_json(self, json_str: str) -> Any:
        try:
            value = json.loads(json_str)
        except json.JSONDecodeError as exc:
            raise ModelBehaviorError(f"The model's answer is not JSON: {exc}") from None
        error = next(iter(self._validator.iter_errors(value)), None)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "the answer"
            raise ModelBehaviorError(
                f"The model's answer does not match the schema at {where}: {error.message}"
            )
        return value

"""Input and output guardrails built from an agent version's configuration.

A tripped guardrail ends the run; `output_info` carries the message the end user sees and what
matched, which the trace records.
"""

from __future__ import annotations

import re
from typing import Any

from agents import (
    Agent,
    GuardrailFunctionOutput,
    InputGuardrail,
    Model,
    OutputGuardrail,
    RunConfig,
    RunContextWrapper,
    Runner,
)

from ai_agents.config import GuardrailConfig
from ai_agents.runtime.context import RunContext
from ai_agents.runtime.trace import Trace, TraceHooks


def text_of(value: Any) -> str:
    """The text a guardrail looks at: a string, the latest user message, or an output."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for item in reversed(value):
            if isinstance(item, dict) and item.get("role") == "user":
                content = item.get("content")
                if isinstance(content, str):
                    return content
                if isinstance(content, list):
                    return " ".join(
                        part.get("text", "") for part in content if isinstance(part, dict)
                    )
        return ""
    if hasattr(value, "model_dump_json"):
        return str(value.model_dump_json())
    return str(value)


def _check(config: GuardrailConfig, text: str) -> str | None:
    """What tripped, or None."""
    if config.kind == "blocked_words":
        for word in config.words:
            if word.strip() and re.search(rf"(?<!\w){re.escape(word.strip())}(?!\w)", text, re.I):
                return f"blocked word {word.strip()!r}"
    elif config.kind == "pattern":
        if re.search(config.pattern, text):
            return f"pattern {config.pattern!r}"
    elif config.kind == "max_length":
        if config.max_chars is not None and len(text) > config.max_chars:
            return f"{len(text)} characters, more than {config.max_chars}"
    return None


async def _classify(
    config: GuardrailConfig, text: str, model: Model, trace: Trace | None = None
) -> str | None:
    judge = Agent(
        name="Guardrail classifier",
        instructions=(
            "You are a strict classifier. Read the text and answer the question with a single "
            f"word, yes or no.\nQuestion: {config.question}"
        ),
        model=model,
    )
    result = await Runner.run(
        judge,
        text,
        max_turns=1,
        run_config=RunConfig(tracing_disabled=True),
        hooks=TraceHooks(trace) if trace is not None else None,  # its tokens count too
    )
    answer = str(result.final_output).strip().lower()
    return (
        f"classifier answered {answer[:20]!r} to {config.question!r}"
        if answer.startswith("yes")
        else None
    )


def _check_function(config: GuardrailConfig, name: str, side: str, model: Model) -> Any:
    """The SDK guardrail function for one configured check (the same for input and output)."""

    async def check(
        ctx: RunContextWrapper[RunContext], agent: Agent[Any], value: Any
    ) -> GuardrailFunctionOutput:
        text = text_of(value)
        if config.kind == "classifier":
            hit = await _classify(config, text, model, ctx.context.trace)
        else:
            hit = _check(config, text)
        ctx.context.trace.add(
            "guardrail", side=side, name=name, tripped=hit is not None, reason=hit or ""
        )
        return GuardrailFunctionOutput(
            output_info={"message": config.user_message, "reason": hit},
            tripwire_triggered=hit is not None,
        )

    return check


def build_input(configs: list[GuardrailConfig], model: Model) -> list[InputGuardrail[Any]]:
    # Not in parallel: a blocked input must not reach the model (nor spend its tokens).
    return [
        InputGuardrail(
            guardrail_function=_check_function(config, name, "input", model),
            name=name,
            run_in_parallel=False,
        )
        for index, config in enumerate(configs)
        for name in [f"input:{index}:{config.kind}"]
    ]


def build_output(configs: list[GuardrailConfig], model: Model) -> list[OutputGuardrail[Any]]:
    return [
        OutputGuardrail(
            guardrail_function=_check_function(config, name, "output", model), name=name
        )
        for index, config in enumerate(configs)
        for name in [f"output:{index}:{config.kind}"]
    ]

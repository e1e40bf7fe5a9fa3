"""The built-in tool catalogue.

Every tool is built per run from its per-agent settings and receives the run's `RunContext`
(tenant, agent, thread, end user) through the SDK's tool context. Tools reach tenant data only
through tenant-scoped services, and the network only through `controlplane.egress`.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agents import FunctionTool, ModelBehaviorError, RunContextWrapper, function_tool
from agents.tool import default_tool_error_function
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ai_agents.runtime.context import RunContext

# --- Settings schemas -------------------------------------------------------------------------


# What the SDK says to a model whose call of a tool is not a JSON object; it raises
# `ModelBehaviorError` with this start.
_INVALID_JSON = "Invalid JSON input for tool"


def tool_error(ctx: RunContextWrapper[Any], error: Exception) -> str:
    """What the model is told when a call of a built-in tool fails. Arguments that are not a
    JSON object: that, so its next call can be right (the run counts it as a retry). Anything
    else: the SDK's generic answer, since the error may hold what the model must not see."""
    if isinstance(error, ModelBehaviorError) and str(error).startswith(_INVALID_JSON):
        return (
            "The tool did not run: its arguments were not a valid JSON object. Call it again "
            "with the arguments as one JSON object, as its parameters describe."
        )
    return default_tool_error_function(ctx, error)


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatetimeSettings(_Settings):
    default_timezone: str = Field("UTC", max_length=64)


class CalculatorSettings(_Settings):
    pass


class HttpGetSettings(_Settings):
    max_bytes: int = Field(200_000, ge=1_000, le=2_000_000)
    timeout_seconds: float = Field(10.0, gt=0, le=60)
    allowed_domains: list[str] = Field(default_factory=list, max_length=50)


class RunAgentSettings(_Settings):
    # Slugs of the agents this one may call; empty means any published agent of the tenant.
    allowed_agents: list[str] = Field(default_factory=list, max_length=50)


@dataclass(frozen=True)
class ToolSpec:
    name: str
    title: str
    description: str
    settings_model: type[_Settings]
    build: Callable[[Any], FunctionTool]
    has_side_effects: bool = False
    examples: list[str] = field(default_factory=list)

    def validate_settings(self, raw: dict[str, Any]) -> dict[str, Any]:
        return self.settings_model.model_validate(raw).model_dump(mode="json")


class ToolSettingsInvalid(ValueError):
    pass


# --- current_datetime -------------------------------------------------------------------------


def _build_datetime(settings: DatetimeSettings) -> FunctionTool:
    @function_tool(name_override="current_datetime", failure_error_function=tool_error)
    def current_datetime(timezone: str = "") -> str:
        """Get the current date and time.

        Args:
            timezone: An IANA time zone such as Europe/Paris or Asia/Tokyo. Empty for the default.
        """
        name = timezone.strip() or settings.default_timezone
        try:
            zone = ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            return f"Unknown time zone {name!r}. Use an IANA name such as Europe/Paris."
        now = datetime.now(zone)
        return f"{now:%A %d %B %Y, %H:%M:%S} in {name} (UTC{now:%z})"

    return current_datetime


# --- calculator -------------------------------------------------------------------------------

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "floor": math.floor,
    "ceil": math.ceil,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "log": math.log,
    "log10": math.log10,
    "exp": math.exp,
}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
MAX_EXPRESSION = 500


class CalculationError(ValueError):
    pass


def calculate(expression: str) -> float | int:
    """Evaluate arithmetic without eval(): a whitelist walk over the parsed expression."""
    if len(expression) > MAX_EXPRESSION:
        raise CalculationError(f"The expression is longer than {MAX_EXPRESSION} characters.")
    try:
        tree = ast.parse(expression.replace("^", "**"), mode="eval")
    except SyntaxError:
        raise CalculationError(f"{expression!r} is not an arithmetic expression.") from None

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name) and node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 1000 or abs(left) > 1e100):
                raise CalculationError("That power is too large to compute.")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCTIONS
            and not node.keywords
        ):
            return _FUNCTIONS[node.func.id](*[walk(a) for a in node.args])
        raise CalculationError(f"Unsupported element in {expression!r}.")

    try:
        result = walk(tree)
    except ZeroDivisionError:
        raise CalculationError("Division by zero.") from None
    except (OverflowError, ValueError, TypeError) as exc:
        raise CalculationError(f"Cannot compute {expression!r}: {exc}.") from None
    if isinstance(result, float) and result.is_integer() and abs(result) < 1e15:
        return int(result)
    return result


def _build_calculator(settings: CalculatorSettings) -> FunctionTool:
    @function_tool(name_override="calculator", failure_error_function=tool_error)
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression exactly, e.g. (12.5 * 4) / 3 or sqrt(2) ^ 2.

        Args:
            expression: Numbers, + - * / // % ^ ( ), and sqrt abs round min max floor ceil sin
                cos tan log log10 exp, pi, e.
        """
        try:
            return str(calculate(expression))
        except CalculationError as exc:
            return f"Error: {exc}"

    return calculator


# --- http_get ---------------------------------------------------------------------------------


def _build_http_get(settings: HttpGetSettings) -> FunctionTool:
    from urllib.parse import urlsplit

    from controlplane import egress

    @function_tool(name_override="http_get", failure_error_function=tool_error)
    async def http_get(url: str) -> str:
        """Fetch a public web page or API over HTTP(S) GET and return its text.

        Args:
            url: The absolute http:// or https:// URL to fetch.
        """
        host = (urlsplit(url).hostname or "").lower().rstrip(".")
        allowed = [d.lower().lstrip(".") for d in settings.allowed_domains]
        if allowed and not any(host == d or host.endswith(f".{d}") for d in allowed):
            return f"Error: {host or url} is not among the domains this agent may fetch."
        try:
            response = await egress.afetch(
                "GET", url, timeout=settings.timeout_seconds, max_bytes=settings.max_bytes
            )
        except (egress.EgressDenied, egress.EgressError) as exc:
            return f"Error: {exc}"
        return f"HTTP {response.status_code} from {response.url}\n\n{response.text}"

    return http_get


# --- run_agent --------------------------------------------------------------------------------

MAX_AGENT_DEPTH = 3


def _build_run_agent(settings: RunAgentSettings) -> FunctionTool:
    @function_tool(name_override="run_agent", failure_error_function=tool_error)
    async def run_agent(ctx: RunContextWrapper[RunContext], agent: str, input: str) -> str:
        """Ask another agent of this workspace and return its answer.

        Args:
            agent: The other agent's slug (its short name).
            input: What to ask it.
        """
        from ai_agents.runtime import execute

        run = ctx.context
        if settings.allowed_agents and agent not in settings.allowed_agents:
            return f"Error: this agent may not call {agent!r}."
        if agent == run.agent_slug:
            return "Error: an agent cannot call itself."
        if run.depth >= MAX_AGENT_DEPTH:
            return f"Error: agents may call each other at most {MAX_AGENT_DEPTH} levels deep."
        try:
            answer = await execute.run_published_agent(
                tenant_id=run.tenant_id, agent_slug=agent, input=input, parent=run
            )
        except execute.AgentUnavailable as exc:
            return f"Error: {exc}"
        return answer

    return run_agent


CATALOGUE: dict[str, ToolSpec] = {
    spec.name: spec
    for spec in [
        ToolSpec(
            "current_datetime",
            "Date and time",
            "The current date and time in any time zone.",
            DatetimeSettings,
            lambda s: _build_datetime(DatetimeSettings.model_validate(s)),
            examples=["What time is it in Tokyo?"],
        ),
        ToolSpec(
            "calculator",
            "Calculator",
            "Exact arithmetic, safely (no code is executed).",
            CalculatorSettings,
            lambda s: _build_calculator(CalculatorSettings.model_validate(s)),
            examples=["Use the calculator to compute 17 * 23"],
        ),
        ToolSpec(
            "http_get",
            "Web fetch",
            "Fetches a public URL, with a size and time limit; private networks are unreachable.",
            HttpGetSettings,
            lambda s: _build_http_get(HttpGetSettings.model_validate(s)),
            examples=["Fetch https://example.com"],
        ),
        ToolSpec(
            "run_agent",
            "Ask another agent",
            "Runs another published agent of this tenant and returns its answer.",
            RunAgentSettings,
            lambda s: _build_run_agent(RunAgentSettings.model_validate(s)),
            has_side_effects=True,
            examples=["Ask the billing agent about invoice 42"],
        ),
    ]
}


def validate(name: str, raw_settings: dict[str, Any]) -> dict[str, Any]:
    """Normalised settings for a catalogue tool; ToolSettingsInvalid says what is wrong."""
    spec = CATALOGUE.get(name)
    if spec is None:
        raise ToolSettingsInvalid(f"There is no built-in tool called {name!r}.")
    try:
        return spec.validate_settings(raw_settings)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise ToolSettingsInvalid(f"{name}: {where}: {first['msg']}") from None


# Marks the tools `build` made from a catalogue entry that changes nothing. A tool's name does
# not say where it comes from: an MCP server may offer a tool called "calculator".
_CHANGES_NOTHING = "_controlplane_changes_nothing"


def build(name: str, settings: dict[str, Any]) -> FunctionTool:
    spec = CATALOGUE[name]
    tool = spec.build(settings)
    if not spec.has_side_effects:
        setattr(tool, _CHANGES_NOTHING, True)
    return tool


def changes_nothing(tool: Any) -> bool:
    """Whether `tool` is a built-in tool that changes nothing (the date, the calculator, the web
    fetch). Any other tool, an MCP server's whatever its name, may change things."""
    return getattr(tool, _CHANGES_NOTHING, False) is True

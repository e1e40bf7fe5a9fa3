"""The product's Celery app, for the fault tests' worker processes, plus one tool only tests
have: `block_loop`, which blocks its worker's event loop (a synchronous sleep inside an async
tool, as a careless tool would), to show that the lease holds while the loop is blocked.

    celery -A tests.conversations.fault_app worker ...
"""

from __future__ import annotations

import time

from agents import FunctionTool, function_tool

from ai_agents import tools
from controlplane.celery import app

__all__ = ["app", "register"]


class BlockLoopSettings(tools.CalculatorSettings):
    pass


def _build_block_loop(settings: object) -> FunctionTool:
    @function_tool(name_override="block_loop")
    async def block_loop(seconds: float) -> str:
        """Block the event loop for a while.

        Args:
            seconds: How long.
        """
        time.sleep(min(float(seconds), 30.0))  # noqa: ASYNC251 (the point of the tool)
        return f"blocked for {seconds:g} s"

    return block_loop


SPEC = tools.ToolSpec(
    "block_loop",
    "Block the loop",
    "Test-only: blocks the worker's event loop.",
    BlockLoopSettings,
    _build_block_loop,
)


def register(catalogue: dict[str, tools.ToolSpec]) -> None:
    catalogue[SPEC.name] = SPEC


register(tools.CATALOGUE)

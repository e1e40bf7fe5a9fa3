"""What every tool and guardrail of a run knows about the run it is in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from ai_agents.runtime.trace import Trace


@dataclass
class RunContext:
    """The SDK run context. Identity comes from the server, never from the model or the client."""

    tenant_id: UUID
    agent_id: UUID
    agent_slug: str
    version_id: UUID
    thread_id: UUID | None = None
    end_user_id: str | None = None
    depth: int = 0  # how many agents deep (run_agent tool)
    trace: Trace = field(default_factory=Trace)
    extra: dict[str, Any] = field(default_factory=dict)

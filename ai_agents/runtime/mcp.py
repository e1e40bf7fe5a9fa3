"""The dashboard's and API's "list tools" check of a tenant's MCP server."""

from __future__ import annotations

import logging

from asgiref.sync import sync_to_async

from ai_agents import services
from ai_agents.models import McpServer
from ai_agents.runtime.build import _mcp_server, _plain
from controlplane.errors import Unavailable

log = logging.getLogger(__name__)


async def list_tools(row: McpServer) -> list[dict[str, str]]:
    """Connect now and list the tools the agent would see (after the allow-list)."""
    headers = await sync_to_async(services.mcp_headers)(row)
    server = _mcp_server(row, headers)
    # Only the connecting task stopped (its loop shutting down), not this check: there is no
    # run here to have ended.
    server.given_up = "the check was stopped before the server answered"
    try:
        await server.connect()
        found = await server.list_tools()
    except Exception as exc:
        # Failures only (a refused connection, a timeout, an error group of the `mcp` client's
        # task groups). A cancellation of the check (the request gone, the worker stopping),
        # whether a CancelledError or a BaseExceptionGroup carrying one, goes on up: caught
        # here it was reported as "Could not list the tools of …: CancelledError".
        raise Unavailable(f"Could not list the tools of {row.name}: {_plain(exc)}") from None
    finally:
        try:
            await server.cleanup()
        except Exception:  # the listing is what matters; closing is best effort
            log.debug("closing MCP server %s failed", row.name, exc_info=True)
    allowed = set(row.tool_allowlist)
    return [
        {"name": t.name, "description": t.description or ""}
        for t in found
        if not allowed or t.name in allowed
    ]

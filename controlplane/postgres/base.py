"""Django's PostgreSQL backend, with a health check that asks the server only when something
has happened on the connection.

With `CONN_HEALTH_CHECKS`, Django checks a kept connection before its first use in each request
or unit of work by running `SELECT 1` (`is_usable`). A worker's run host does a unit of ORM work
several times per run, so that was four of a run's fifteen statements: a round trip and a
backend wake-up each, for an answer that is nearly always yes.

A connection that is idle between statements has nothing to read: everything the server sent
was read with the last result. What ends a connection from the server's side sends something or
closes the socket (a restart or `pg_terminate_backend` sends a FATAL error first; an idle timeout
likewise; a crashed server's kernel closes the socket), and all of these make the socket
readable. So an idle connection whose socket has nothing to read is used as it is, and any other
(something to read, a transaction open, psycopg already knowing it broken) gets Django's
`SELECT 1` as before. A connection cut without a word (a network partition) is not caught by
either check: the `SELECT 1` would block until the socket's timeout too.

Settings select it with `ENGINE = "controlplane.postgres"`; everything else is Django's.
"""

from __future__ import annotations

import select
from typing import Any

from django.db.backends.postgresql import base
from psycopg import pq


def quiet(connection: Any) -> bool:
    """Whether the psycopg `connection` is open, idle outside a transaction, and has received
    nothing since its last exchange with the server."""
    if connection.closed or connection.broken:
        return False
    if connection.info.transaction_status != pq.TransactionStatus.IDLE:
        return False
    try:
        fd = connection.fileno()
        readable, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


class DatabaseWrapper(base.DatabaseWrapper):
    def is_usable(self) -> bool:
        if self.connection is not None and quiet(self.connection):
            return True
        return super().is_usable()

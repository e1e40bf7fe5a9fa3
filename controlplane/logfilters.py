"""Logging filters named in settings.LOGGING."""

from __future__ import annotations

import logging
from collections.abc import Iterable


class QuietTasks(logging.Filter):
    """Drops a Celery worker's "Task … received" and "Task … succeeded" lines for the tasks
    named (their failures and retries are logged at WARNING and ERROR and pass).

    `conversations.run_execute` only hands a run to the worker's run host and returns: two lines
    per run said nothing the run inspector does not say better, 200 lines a second at 100 runs
    a second, and their formatting was about 2 % of a worker's CPU (docs/benchmark.md)."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        super().__init__()
        self.names = frozenset(names)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        context = record.args
        return not (isinstance(context, dict) and context.get("name") in self.names)

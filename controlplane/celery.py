"""The one Celery app. Settings come from Django settings under the CELERY_ prefix."""

import os
from typing import Any

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

app = Celery("controlplane")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.task_prerun.connect
@signals.task_postrun.connect
def _database_connections(sender: Any = None, **_: Any) -> None:
    """Tasks treat database connections as requests do: before and after each, a connection
    that is broken or older than CONN_MAX_AGE is closed, and the others live on. Celery's own
    handling closes every connection after every task (CELERY_DB_REUSE_MAX, set high, turns
    it off): with DATABASE_POOL=0 that cost PostgreSQL a new backend per run kicked."""
    from django.db import close_old_connections

    if not getattr(getattr(sender, "request", None), "is_eager", False):  # eager: the caller's
        close_old_connections()


@signals.worker_ready.connect
@signals.worker_process_init.connect
def _tune_gc(**_: Any) -> None:
    """Once the worker (and each pool process it forks) has loaded what it runs with: the
    collector skips those objects from now on, and collects young ones in larger passes."""
    from controlplane import gctuning

    gctuning.tune()


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _drain_runs(**kwargs: Any) -> None:
    """Runs held by this process finish, or go to other workers, before it exits."""
    from conversations.worker import drain_on_shutdown

    drain_on_shutdown(**kwargs)

"""Celery tasks of conversations. They take ids and call one function; the message is only a
kick (correctness comes from the run's lease in PostgreSQL), so they are safe to repeat."""

from celery import shared_task

from conversations import executor, worker


@shared_task(name="conversations.run_execute", ignore_result=True, acks_late=False)
def run_execute(run_id: str) -> None:
    """Claim the run and hand it to this process's run host; returns at once. Acked early on
    purpose: if this process dies, the lease lapses and the sweeper kicks the run again.

    Its database connection lives on between tasks (`controlplane.celery`): a new connection
    per run cost PostgreSQL a new backend per run (docs/benchmark.md)."""
    host = worker.host()
    taken = executor.take(run_id, owner=host.owner, loop=host.loop)
    if taken is not None:
        host.submit(*taken)


@shared_task(name="conversations.runs_sweep", ignore_result=True)
def runs_sweep() -> int:
    """Periodic (beat): re-kick runs whose worker died and pending runs nobody picked up."""
    return len(executor.sweep())

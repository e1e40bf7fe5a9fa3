"""Celery tasks of conversations. They take ids and call one function; the message is only a
kick (correctness comes from the run's lease in PostgreSQL), so they are safe to repeat."""

from celery import shared_task

from conversations import executor, worker


@shared_task(name="conversations.run_execute", ignore_result=True, acks_late=False)
def run_execute(run_id: str) -> None:
    """Hand the run to this process's run host, which claims and executes it; returns at once.
    Acked early on purpose: if this process dies, the run is still pending, or its lease lapses,
    and the sweeper kicks it again.

    The host's database threads keep their connections between runs (`session.orm`): a new
    connection per run cost PostgreSQL a new backend per run (docs/benchmark.md)."""
    worker.host().take(run_id)


@shared_task(name="conversations.runs_sweep", ignore_result=True)
def runs_sweep() -> int:
    """Periodic (beat): re-kick runs whose worker died and pending runs nobody picked up."""
    return len(executor.sweep())

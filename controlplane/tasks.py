from celery import shared_task
from django.core.cache import cache


@shared_task(name="controlplane.ping", acks_late=False, ignore_result=True)
def ping(nonce: str) -> None:
    """Proves a worker consumes from the configured broker: leaves `pong` under the nonce."""
    cache.set(f"ping:{nonce}", "pong", timeout=300)

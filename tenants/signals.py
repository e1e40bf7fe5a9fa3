"""Logging out closes that user's open websockets (revocation reaches open connections)."""

from functools import partial

from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.dispatch import receiver

from tenants import realtime


@receiver(user_logged_out)
def close_sockets_on_logout(sender, request, user, **kwargs) -> None:
    if user is not None:
        transaction.on_commit(
            partial(realtime.close_connections, realtime.user_group(user.pk), reason="logged out")
        )

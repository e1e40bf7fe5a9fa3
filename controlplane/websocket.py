"""Origin validation for every websocket route."""

from __future__ import annotations

from typing import Any

from channels.security.websocket import OriginValidator
from django.conf import settings


class AllowedHostsOriginValidator(OriginValidator):
    """channels' validator of the same name, except that it reads `ALLOWED_HOSTS` on each
    connection instead of copying it when the ASGI app is built, so the one setting governs HTTP
    and websockets alike at all times."""

    def __init__(self, application: Any) -> None:
        super().__init__(application, [])

    @property  # type: ignore[override]
    def allowed_origins(self) -> list[str]:
        hosts = list(settings.ALLOWED_HOSTS)
        if settings.DEBUG and not hosts:
            hosts = ["localhost", "127.0.0.1", "[::1]"]
        return hosts

    @allowed_origins.setter
    def allowed_origins(self, value: list[str]) -> None:
        pass  # always derived from settings

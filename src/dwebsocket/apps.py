"""The Django app: ``'dwebsocket'`` in ``INSTALLED_APPS``."""

from __future__ import annotations

from django.apps import AppConfig


class DWebSocketConfig(AppConfig):
    name = "dwebsocket"
    verbose_name = "dwebsocket"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
        from .servers import runserver

        runserver.install()

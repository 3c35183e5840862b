"""The Django app: ``'dwebsocket'`` in ``INSTALLED_APPS``."""

from __future__ import annotations

from django.apps import AppConfig


class DWebSocketConfig(AppConfig):
    name = "dwebsocket"
    verbose_name = "dwebsocket"

    def ready(self) -> None:
        from . import asgi, checks  # noqa: F401  (checks: registers the system checks)
        from .servers import runserver

        runserver.install()  # manage.py runserver lends its sockets
        asgi.install()  # django.core.asgi.get_asgi_application() serves WebSockets

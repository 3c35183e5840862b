"""The Django app: ``'dwebsocket'`` in ``INSTALLED_APPS``."""

from __future__ import annotations

from django.apps import AppConfig

__all__ = ["DWebSocketConfig"]


class DWebSocketConfig(AppConfig):
    name = "dwebsocket"
    verbose_name = "dwebsocket"

    def ready(self) -> None:
        # Imported once the app registry is ready: these modules use Django's
        # handlers and register system checks.
        from . import asgi, checks, conf, groups, metrics  # noqa: F401  (checks: registers the system checks)
        from .transports import restart
        from .transports.wsgi import runserver

        metrics.configure()  # WEBSOCKET_METRICS, if prometheus_client is installed
        if conf.is_redis_url(conf.get("WEBSOCKET_BROKER")):
            # Every serving process publishes its status (manage.py websocket_status)
            # through the broker, from its first connection on.
            restart.on_first_connection(groups.get_broker)

        runserver.install()  # manage.py runserver lends its sockets
        asgi.install()  # django.core.asgi.get_asgi_application() serves WebSockets
        # On SIGTERM, close open connections with 1012 (service restart). Here
        # because a gunicorn worker loads the app in its main thread, the only
        # thread where a signal handler can be set.
        restart.install()

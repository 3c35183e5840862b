"""Let Django's development server (``manage.py runserver``) lend its socket.

Django's request handler does not put the client socket in the WSGI environ.
When the app is ready, dwebsocket installs a subclass of
``django.core.servers.basehttp.WSGIRequestHandler`` that adds it. The
``runserver`` command looks the handler class up each time it starts a
server, so this works whichever app's ``runserver`` command is in use (the
``staticfiles`` one included) and with the autoreloader.
"""

from __future__ import annotations

from typing import Any

from django.core.servers import basehttp

__all__ = ["WebSocketRequestHandler", "install"]


class WebSocketRequestHandler(basehttp.WSGIRequestHandler):
    """Django's request handler, plus the client socket in ``environ``."""

    def get_environ(self) -> dict[str, Any]:
        environ: dict[str, Any] = dict(super().get_environ())
        environ["dwebsocket.socket"] = self.request
        environ["dwebsocket.release"] = self._release_websocket
        return environ

    def _release_websocket(self) -> None:
        # The socket carried a WebSocket: no further HTTP request follows on it.
        self.close_connection = True
        self.log_request(101)


def install() -> None:
    """Make ``runserver`` use :class:`WebSocketRequestHandler`; idempotent."""
    current = basehttp.WSGIRequestHandler
    if issubclass(current, WebSocketRequestHandler):
        return
    if current is not WebSocketRequestHandler.__mro__[1]:
        # Another app replaced the handler too: keep its behaviour and add ours.
        handler: type = type("WebSocketRequestHandler", (WebSocketRequestHandler, current), {})
    else:
        handler = WebSocketRequestHandler
    basehttp.WSGIRequestHandler = handler  # type: ignore[misc,assignment]

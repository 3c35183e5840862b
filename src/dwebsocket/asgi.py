"""The ASGI application: Django's own for HTTP, plus the project's WebSocket views.

With ``'dwebsocket'`` in ``INSTALLED_APPS`` the ``asgi.py`` that
``startproject`` wrote needs no change: :func:`install` (run when the app is
ready) makes ``django.core.asgi.get_asgi_application()`` return a
:class:`WebSocketASGIHandler`. ``from dwebsocket.asgi import
get_asgi_application`` gives the same application explicitly.

HTTP goes to Django's ASGI handler, unchanged; WebSocket connections go
through the same middleware and URLconf to views decorated with
``@require_websocket`` or ``@accept_websocket``.
"""

from __future__ import annotations

from typing import Any

import django
import django.core.asgi
from django.core.handlers.asgi import ASGIHandler

from . import metrics
from .transports.asgi.handler import WebSocketHandler

__all__ = ["WebSocketASGIHandler", "get_asgi_application"]


class WebSocketASGIHandler(ASGIHandler):
    """Django's ASGI handler, which also serves ``websocket`` scopes."""

    def __init__(self) -> None:
        super().__init__()
        metrics.serving("asgi")  # this process serves ASGI: its polling sessions are labelled so
        self._websocket = WebSocketHandler()  # at startup: its warnings are seen then

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def get_asgi_application() -> WebSocketASGIHandler:
    """The ASGI application for the project: Django's, plus WebSocket views."""
    django.setup(set_prefix=False)
    return WebSocketASGIHandler()


def install() -> None:
    """Make ``django.core.asgi.get_asgi_application()`` serve WebSocket views too.

    Django's function builds its handler after ``django.setup()``, which runs
    this: it then builds a :class:`WebSocketASGIHandler`. Idempotent; leaves
    alone a handler class that another app put there.
    """
    module: Any = django.core.asgi
    if module.ASGIHandler is ASGIHandler:
        module.ASGIHandler = WebSocketASGIHandler

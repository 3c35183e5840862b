"""The ASGI entry point: ``from dwebsocket.asgi import get_asgi_application``.

Use it in ``asgi.py`` in place of Django's function of the same name. HTTP
goes to Django's own ASGI handler, unchanged; WebSocket connections go
through the same middleware and URLconf to views decorated with
``@require_websocket`` or ``@accept_websocket``.
"""

from __future__ import annotations

from typing import Any

import django
from django.core.handlers.asgi import ASGIHandler

__all__ = ["get_asgi_application"]


class _Application:
    def __init__(self) -> None:
        from .servers.asgi import WebSocketHandler

        self._http = ASGIHandler()
        self._websocket = WebSocketHandler()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self._http(scope, receive, send)


def get_asgi_application() -> Any:
    """The ASGI application for the project: Django's, plus WebSocket views."""
    django.setup(set_prefix=False)
    return _Application()

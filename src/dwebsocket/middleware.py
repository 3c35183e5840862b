"""``WebSocketMiddleware``: marks WebSocket requests and guards the views that do not take them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponseBadRequest
from django.http.response import HttpResponseBase

from . import conf
from .decorators import run_websocket_view
from .websocket import attach

_NOT_ACCEPTED = (
    "This URL does not accept WebSocket connections. Decorate its view with "
    "@accept_websocket or @require_websocket, or set WEBSOCKET_ACCEPT_ALL = True.\n"
)


class WebSocketMiddleware:
    """Set ``request.websocket`` and ``request.is_websocket()`` on every request.

    A WebSocket handshake to a view that is not decorated gets 400, unless
    ``WEBSOCKET_ACCEPT_ALL`` is on, in which case every view accepts it.
    Place it right after ``django.middleware.common.CommonMiddleware``.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        attach(request)
        return self.get_response(request)

    def process_view(
        self,
        request: HttpRequest,
        view_func: Callable[..., Any],
        view_args: tuple[Any, ...],
        view_kwargs: dict[str, Any],
    ) -> HttpResponseBase | None:
        if request.websocket is None or getattr(view_func, "accept_websocket", False):  # type: ignore[attr-defined]
            return None  # plain HTTP, or a decorated view that handles the handshake itself
        if conf.get("WEBSOCKET_ACCEPT_ALL"):
            return run_websocket_view(view_func, request, view_args, view_kwargs)
        return HttpResponseBadRequest(_NOT_ACCEPTED, content_type="text/plain")

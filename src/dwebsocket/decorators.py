"""``@require_websocket`` and ``@accept_websocket``: which views speak WebSocket."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBadRequest
from django.http.response import HttpResponseBase

from .websocket import _async_view_runner, attach, run_websocket_view

View = TypeVar("View", bound=Callable[..., Any])

_NOT_WEBSOCKET = (
    "This URL speaks WebSocket only: connect with a WebSocket client "
    "(new WebSocket('ws://...') in a browser).\n"
)


def _not_websocket() -> HttpResponseBase:
    """The answer of a ``@require_websocket`` view to a request that is no handshake."""
    return HttpResponseBadRequest(_NOT_WEBSOCKET, content_type="text/plain")


def _websocket_view(view: View, *, required: bool, subprotocols: Iterable[str] | None) -> View:
    if iscoroutinefunction(view):
        # One coroutine runs the handshake and the view (no wrapper awaiting another).
        async_wrapper = _async_view_runner(view, subprotocols, _not_websocket if required else None)
        wrapper: Any = functools.wraps(view)(async_wrapper)
        markcoroutinefunction(wrapper)
    else:

        def sync_wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            if attach(request) is None:
                if required:
                    return HttpResponseBadRequest(_NOT_WEBSOCKET, content_type="text/plain")
                return view(request, *args, **kwargs)  # type: ignore[no-any-return]
            return run_websocket_view(view, request, args, kwargs, subprotocols)

        wrapper = functools.wraps(view)(sync_wrapper)
    wrapper.accept_websocket = True
    wrapper.require_websocket = required
    return wrapper  # type: ignore[no-any-return]


@overload
def require_websocket(view: View) -> View: ...
@overload
def require_websocket(*, subprotocols: Iterable[str] | None = None) -> Callable[[View], View]: ...
def require_websocket(
    view: View | None = None, *, subprotocols: Iterable[str] | None = None
) -> View | Callable[[View], View]:
    """Make *view* a WebSocket endpoint; any other request gets 400 Bad Request.

    Use it bare (``@require_websocket``) or with the subprotocols the view
    speaks (``@require_websocket(subprotocols=["chat.v1"])``). Works on sync
    and ``async def`` views.
    """
    if view is None:
        return lambda v: _websocket_view(v, required=True, subprotocols=subprotocols)
    return _websocket_view(view, required=True, subprotocols=subprotocols)


@overload
def accept_websocket(view: View) -> View: ...
@overload
def accept_websocket(*, subprotocols: Iterable[str] | None = None) -> Callable[[View], View]: ...
def accept_websocket(
    view: View | None = None, *, subprotocols: Iterable[str] | None = None
) -> View | Callable[[View], View]:
    """Let *view* serve both plain HTTP and WebSocket on the same URL.

    Inside, ``request.is_websocket()`` tells which one it is serving, and
    ``request.websocket`` is the connection (``None`` for plain HTTP).
    """
    if view is None:
        return lambda v: _websocket_view(v, required=False, subprotocols=subprotocols)
    return _websocket_view(view, required=False, subprotocols=subprotocols)


__all__ = ["accept_websocket", "require_websocket"]

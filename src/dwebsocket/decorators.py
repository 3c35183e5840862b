"""``@require_websocket`` and ``@accept_websocket``: which views speak WebSocket."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.core import signals
from django.http import HttpRequest, HttpResponseBadRequest
from django.http.response import HttpResponseBase

from .connection import CONNECTING
from .websocket import AsyncWebSocket, WebSocket, attach

logger = logging.getLogger("dwebsocket")

View = TypeVar("View", bound=Callable[..., Any])

_NOT_WEBSOCKET = (
    "This URL speaks WebSocket only: connect with a WebSocket client "
    "(new WebSocket('ws://...') in a browser).\n"
)


def _name(view: Callable[..., Any]) -> str:
    return getattr(view, "__qualname__", None) or repr(view)


def _view_failed(websocket: WebSocket, view: Callable[..., Any]) -> bool:
    """After the view raised: True to re-raise (nothing sent yet), else log it."""
    if websocket._state == CONNECTING:
        websocket._refuse()
        return True  # Django answers the handshake with its usual 500 page
    logger.exception("dwebsocket: error in WebSocket view %s", _name(view))
    # As Django does for any view's error (error reporters, the test client).
    signals.got_request_exception.send(sender=None, request=websocket._request)
    return False


def _refusal(websocket: WebSocket, response: Any) -> HttpResponseBase | None:
    """A response the view returned before touching the connection refuses the handshake."""
    if isinstance(response, HttpResponseBase) and websocket._state == CONNECTING:
        websocket._refuse()
        return response
    return None


def run_websocket_view(
    view: Callable[..., Any],
    request: HttpRequest,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    subprotocols: Iterable[str] | None = None,
) -> HttpResponseBase:
    """Run a sync *view* for a WebSocket handshake; the response for the server.

    The handshake is checked first (a bad one or a foreign origin is refused
    before the view runs). If the view returns a response without having used
    ``request.websocket``, that response refuses the handshake. Otherwise the
    connection is closed when the view returns, with 1011 if it raised.
    """
    websocket = attach(request)
    assert websocket is not None
    refusal = websocket._prepare(subprotocols)
    if refusal is not None:
        return refusal
    try:
        response = view(request, *args, **kwargs)
    except Exception:
        if _view_failed(websocket, view):
            raise
        websocket.close(1011, "internal error")
    else:
        refused = _refusal(websocket, response)
        if refused is not None:
            return refused
    return websocket._finish()


async def arun_websocket_view(
    view: Callable[..., Any],
    request: HttpRequest,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    subprotocols: Iterable[str] | None = None,
) -> HttpResponseBase:
    """:func:`run_websocket_view` for an ``async def`` view."""
    websocket = attach(request)
    assert websocket is not None
    refusal = websocket._prepare(subprotocols)
    if refusal is not None:
        return refusal
    connection = AsyncWebSocket(websocket)
    request.websocket = connection  # type: ignore[attr-defined]
    try:
        response = await view(request, *args, **kwargs)
    except Exception:
        if _view_failed(websocket, view):
            raise
        await connection.close(1011, "internal error")
    else:
        refused = _refusal(websocket, response)
        if refused is not None:
            return refused
    return await websocket._afinish()


def _websocket_view(view: View, *, required: bool, subprotocols: Iterable[str] | None) -> View:
    if iscoroutinefunction(view):

        async def async_wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            if attach(request) is None:
                if required:
                    return HttpResponseBadRequest(_NOT_WEBSOCKET, content_type="text/plain")
                return await view(request, *args, **kwargs)  # type: ignore[no-any-return]
            return await arun_websocket_view(view, request, args, kwargs, subprotocols)

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

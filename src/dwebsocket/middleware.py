"""``WebSocketMiddleware``: marks WebSocket requests and guards the views that do not take them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asgiref.sync import async_to_sync, iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.http.response import HttpResponseBase

from . import conf
from .transports.polling import http as polling
from .transports.wsgi.loan import gevent_patched
from .websocket import arun_websocket_view, attach, run_websocket_view

__all__ = ["WebSocketMiddleware"]

_NOT_ACCEPTED = (
    "This URL does not accept WebSocket connections. Decorate its view with "
    "@accept_websocket or @require_websocket, or set WEBSOCKET_ACCEPT_ALL = True.\n"
)
_ASYNC_UNDER_GEVENT = (
    "Async WebSocket views cannot run under gunicorn's gevent worker: gevent runs "
    "every connection in one thread, and asyncio allows one event loop per thread. "
    "Write this view as a plain def, or serve it with -k gthread or an ASGI server.\n"
)
_ASYNC_NOT_DECORATED = (
    "WEBSOCKET_ACCEPT_ALL covers sync views only under ASGI: decorate this async "
    "view with @accept_websocket or @require_websocket.\n"
)


def _polling_action(request: HttpRequest) -> str | None:
    """The long-polling action this request asks for, if any (see transports/polling/)."""
    if "dwebsocket=" not in request.META.get("QUERY_STRING", ""):
        return None  # every plain request: no query parsing here
    action = request.GET.get("dwebsocket")
    if action is None:
        return None
    if action not in polling.ACTIONS:
        return "invalid"
    if action == "open":
        if request.method != "POST":
            return "invalid"
        polling.prepare_open(request)
    return action


def _undecorated(view_func: Callable[..., Any]) -> Callable[..., Any]:
    """An undecorated view, run as WEBSOCKET_ACCEPT_ALL runs it."""
    if iscoroutinefunction(view_func):
        async def arun(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            return await arun_websocket_view(view_func, request, args, kwargs)
        return arun
    return lambda request, *args, **kwargs: run_websocket_view(view_func, request, args, kwargs)


def _polling_view(view_func: Callable[..., Any]) -> Callable[..., Any] | HttpResponseBase:
    """The view to run for a polling session, or the response that refuses it."""
    if getattr(view_func, "accept_websocket", False):
        return view_func
    if conf.get("WEBSOCKET_ACCEPT_ALL"):
        return _undecorated(view_func)
    return HttpResponseBadRequest(_NOT_ACCEPTED, content_type="text/plain")


class WebSocketMiddleware:
    """Set ``request.websocket`` and ``request.is_websocket()`` on every request.

    A WebSocket handshake to a view that is not decorated gets 400, unless
    ``WEBSOCKET_ACCEPT_ALL`` is on, in which case every view accepts it.
    Place it right after ``django.middleware.common.CommonMiddleware``.
    Works in sync (WSGI) and async (ASGI) middleware stacks.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)
            # Django awaits a coroutine process_view on the event loop; a sync
            # one would cost every request a trip to its thread-sensitive thread.
            self.process_view = self._aprocess_view  # type: ignore[method-assign, assignment]

    def __call__(self, request: HttpRequest) -> Any:
        # In an async stack this returns the awaitable of what comes next (the
        # caller awaits it) rather than a coroutine of its own that awaits it:
        # the same, with one coroutine fewer kept for the life of a connection.
        action = _polling_action(request)
        if action is not None and action != "open":
            return polling.ahandle(request, action) if self._async else polling.handle(request, action)
        attach(request)
        return self.get_response(request)

    async def _aprocess_view(
        self,
        request: HttpRequest,
        view_func: Callable[..., Any],
        view_args: tuple[Any, ...],
        view_kwargs: dict[str, Any],
    ) -> HttpResponseBase | None:
        """:meth:`process_view` in an async stack."""
        if getattr(request, "websocket", None) is None:
            return None
        session = polling.session_of(request)
        if session is not None:
            target = _polling_view(view_func)
            if isinstance(target, HttpResponseBase):
                return target
            return await polling.astart(session, target, request, view_args, view_kwargs)
        if getattr(view_func, "accept_websocket", False):
            return None  # a decorated view handles the handshake itself
        return await sync_to_async(type(self).process_view, thread_sensitive=True)(
            self, request, view_func, view_args, view_kwargs
        )

    def process_view(
        self,
        request: HttpRequest,
        view_func: Callable[..., Any],
        view_args: tuple[Any, ...],
        view_kwargs: dict[str, Any],
    ) -> HttpResponseBase | None:
        if getattr(request, "websocket", None) is None:
            return None
        session = polling.session_of(request)
        if session is not None:
            target = _polling_view(view_func)
            if isinstance(target, HttpResponseBase):
                return target
            return polling.start(session, target, request, view_args, view_kwargs)
        if iscoroutinefunction(view_func) and not self._async and gevent_patched():
            return HttpResponse(_ASYNC_UNDER_GEVENT, status=501, content_type="text/plain")
        if getattr(view_func, "accept_websocket", False):
            return None  # a decorated view handles the handshake itself
        if not conf.get("WEBSOCKET_ACCEPT_ALL"):
            return HttpResponseBadRequest(_NOT_ACCEPTED, content_type="text/plain")
        if not iscoroutinefunction(view_func):
            return run_websocket_view(view_func, request, view_args, view_kwargs)
        if self._async:
            return HttpResponseBadRequest(_ASYNC_NOT_DECORATED, content_type="text/plain")
        return async_to_sync(arun_websocket_view)(view_func, request, view_args, view_kwargs)

"""Serve ``websocket`` scopes of an ASGI server with the project's own views.

The ASGI server (uvicorn, daphne, hypercorn) does the framing; this module
turns a ``websocket`` scope into a Django request, runs it through the
project's middleware and URL resolver, and carries ``request.websocket``
over the ASGI ``send``/``receive`` channels.

Where views run:

* a sync view runs, with the whole (sync) middleware stack, in a thread of
  its own for the life of the connection -- never in Django's single
  ``thread_sensitive`` executor, where one blocking ``wait()`` would stall
  every other sync view;
* an ``async def`` view runs on the server's event loop through the async
  middleware stack, with no thread per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
from collections.abc import Callable
from typing import Any

from asgiref.sync import ThreadSensitiveContext, iscoroutinefunction, sync_to_async
from django.conf import settings
from django.core import signals
from django.core.handlers.asgi import ASGIRequest
from django.core.handlers.base import BaseHandler
from django.http.response import HttpResponseBase
from django.urls import Resolver404, get_resolver, set_script_prefix
from django.utils.module_loading import import_string

from ..opener import OPENER_KEY
from .transport import AsgiOpener, Receive, Scope, Send

__all__ = ["WebSocketHandler"]

logger = logging.getLogger("dwebsocket")

def get_script_prefix(scope: Scope) -> str:
    """The script prefix, from FORCE_SCRIPT_NAME or the scope (as Django's ASGIHandler does)."""
    if settings.FORCE_SCRIPT_NAME:
        return str(settings.FORCE_SCRIPT_NAME)
    return str(scope.get("root_path", "") or "")


def _http_scope(scope: Scope) -> Scope:
    """The websocket scope, as the HTTP GET it started as, for ASGIRequest."""
    scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "ws"), "http")
    return {**scope, "type": "http", "method": "GET", "scheme": scheme}


class WebSocketHandler(BaseHandler):
    """Runs ``websocket`` scopes through the project's middleware, URLconf and views."""

    def __init__(self) -> None:
        super().__init__()
        self.load_middleware(is_async=False)
        self._async_handler = BaseHandler()
        self._async_handler.load_middleware(is_async=True)
        # A sync-only middleware in an async stack runs in asgiref's
        # thread-sensitive executor and holds it for the whole life of an async
        # connection. Then each async connection gets an executor of its own.
        self._sync_only_middleware = [
            path for path in settings.MIDDLEWARE
            if not getattr(import_string(path), "async_capable", False)
        ]
        if self._sync_only_middleware:
            logger.warning(
                "dwebsocket: %s cannot run asynchronously, so each connection to an "
                "async WebSocket view holds a thread for it. Make it async-capable "
                "(django.utils.deprecation.MiddlewareMixin does) to serve async views "
                "without a thread per connection.",
                ", ".join(self._sync_only_middleware),
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        loop = asyncio.get_running_loop()
        request = ASGIRequest(_http_scope(scope), _NO_BODY)
        opener = AsgiOpener(scope, receive, send, loop)
        request.META[OPENER_KEY] = opener  # request.websocket talks through it
        if not _view_is_async(request):
            response = await _in_own_thread(loop, self._run_sync, scope, request)
        else:
            # The async stack runs in this coroutine, not in one of its own: an
            # idle connection keeps one coroutine frame fewer.
            set_script_prefix(get_script_prefix(scope))
            context = ThreadSensitiveContext() if self._sync_only_middleware else contextlib.nullcontext()
            async with context:  # type: ignore[attr-defined]
                await sync_to_async(signals.request_started.send, thread_sensitive=True)(
                    sender=self.__class__, scope=scope
                )
                try:
                    response = await self._async_handler.get_response_async(request)
                finally:
                    await sync_to_async(signals.request_finished.send, thread_sensitive=True)(
                        sender=self.__class__
                    )
        if not opener.accepted:
            await opener.deny(response)

    def _run_sync(self, scope: Scope, request: ASGIRequest) -> HttpResponseBase:
        set_script_prefix(get_script_prefix(scope))
        signals.request_started.send(sender=self.__class__, scope=scope)
        try:
            return self.get_response(request)
        finally:
            signals.request_finished.send(sender=self.__class__)


class _NoBody(io.BytesIO):
    """The body of every handshake request (a GET has none): one shared, empty stream.

    Reading it always gives ``b""`` and leaves it as it was, so every request
    may read it at once; it cannot be written to or closed.
    """

    def write(self, data: Any) -> int:
        raise io.UnsupportedOperation("a WebSocket handshake has no body")

    def writelines(self, lines: Any) -> None:
        raise io.UnsupportedOperation("a WebSocket handshake has no body")

    def truncate(self, size: int | None = None) -> int:
        raise io.UnsupportedOperation("a WebSocket handshake has no body")

    def close(self) -> None:
        pass


_NO_BODY = _NoBody()


def _view_is_async(request: ASGIRequest) -> bool:
    try:
        match = get_resolver().resolve(request.path_info)
    except Resolver404:
        return False
    return iscoroutinefunction(match.func)


async def _in_own_thread(loop: asyncio.AbstractEventLoop, function: Callable[..., Any], *args: Any) -> Any:
    """Run *function* in a new thread and await its result without blocking the loop."""
    future: asyncio.Future[Any] = loop.create_future()

    def settle(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    def run() -> None:
        try:
            result = function(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, future.set_exception, exc)
        else:
            loop.call_soon_threadsafe(settle, future.set_result, result)

    threading.Thread(target=run, name="dwebsocket-view", daemon=True).start()
    return await future

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
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import ThreadSensitiveContext, iscoroutinefunction, sync_to_async
from django.conf import settings
from django.core import signals
from django.core.handlers.asgi import ASGIRequest
from django.core.handlers.base import BaseHandler
from django.http import HttpResponse
from django.http.response import HttpResponseBase
from django.urls import Resolver404, get_resolver, set_script_prefix
from django.utils.module_loading import import_string

from ..conf import Limits
from ..connection import Connection, Message, wake_future
from ..handshake import check_origin

logger = logging.getLogger("dwebsocket")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class _Finished(HttpResponse):
    """What a WebSocket view hands back under ASGI: the connection already ended."""

    status_code = 101


_HANDED_OVER = 32  # sends a thread may hand to the loop before it waits for them


class AsgiTransport:
    """Carries one connection over ASGI messages.

    Runs on the server's event loop. Threads (sync views, or any thread that
    broadcasts) reach it through ``call_soon_threadsafe``, which keeps their
    order; ``_send_lock`` (an asyncio lock, owned by the loop, first come first
    served) keeps sends in that order on the loop. A thread's ``send()`` hands
    the message over without waiting for it to be written: ``_handed_over``
    (a semaphore) bounds how many it may have handed over and not yet written,
    so that a view that outpaces its client waits for it.
    """

    def __init__(
        self, receive: Receive, send: Send, loop: asyncio.AbstractEventLoop,
        connection: Connection, limits: Limits,
    ) -> None:
        self._receive = receive
        self._send = send
        self._loop = loop
        self._connection = connection
        self._limits = limits
        self._send_lock = asyncio.Lock()
        self._handed_over = threading.BoundedSemaphore(_HANDED_OVER)
        self._close_sent = False  # owned by the loop
        # Owned by the loop: the client is gone, and what afinish() waits on for it.
        self._disconnected = False
        self._gone: asyncio.Future[None] | None = None
        self._receiver: asyncio.Task[None] | None = None
        # Guarded by _offered_lock: broadcasts handed to the loop, not yet sent.
        self._offered_lock = threading.Lock()
        self._offered = 0

    def start(self) -> None:
        self._receiver = self._loop.create_task(self._receive_loop())

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _call(self, coroutine: Awaitable[Any]) -> Any:
        """Run *coroutine* on the loop and wait for it, from any thread but the loop's."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()  # type: ignore[arg-type]

    # -- sending -----------------------------------------------------------

    async def asend(self, message: Message) -> bool:
        if self._close_sent or self._disconnected:
            return False
        key = "text" if isinstance(message, str) else "bytes"
        try:
            async with self._send_lock:
                await self._send({"type": "websocket.send", key: message})
        except Exception:  # the server refuses sends once the client is gone
            return False
        return True

    def send(self, message: Message) -> bool:
        if self._on_loop():
            # Called from sync code running on the loop (a sync helper inside an
            # async view): the send cannot be awaited here, so it is scheduled.
            self._loop.create_task(self.asend(message))
            return not (self._close_sent or self._disconnected)
        if self._close_sent or self._disconnected:  # a stale read only delays this answer
            return False
        self._handed_over.acquire()  # waits while the client is that far behind
        sending = self._send_handed_over(message)
        try:
            self._loop.call_soon_threadsafe(self._spawn, sending)
        except RuntimeError:  # the loop is closed: the server is shutting down
            sending.close()
            self._handed_over.release()
            return False
        return True

    async def _send_handed_over(self, message: Message) -> None:
        try:
            await self.asend(message)
        finally:
            self._handed_over.release()

    def offer(self, encoded: Any) -> bool:
        with self._offered_lock:
            if self._offered >= self._limits.broadcast_queue:
                overflow = True
            else:
                overflow = False
                self._offered += 1
        if overflow:
            if self._limits.broadcast_overflow == "close" and self._connection._begin_close() is not None:
                self._loop.call_soon_threadsafe(self._spawn, self.aclose(1013, "too slow for the broadcasts"))
            return False
        self._loop.call_soon_threadsafe(self._spawn, self._send_offered(encoded.message))
        return True

    def _spawn(self, coroutine: Any) -> None:
        self._loop.create_task(coroutine)

    async def _send_offered(self, message: Message) -> None:
        try:
            await self.asend(message)  # the send lock is fair: broadcasts keep their order
        finally:
            with self._offered_lock:
                self._offered -= 1

    async def aclose(self, code: int, reason: str) -> None:
        if self._close_sent or self._disconnected:
            return
        self._close_sent = True
        async with self._send_lock:
            try:
                await self._send({"type": "websocket.close", "code": code, "reason": reason})
            except Exception:
                if code == 1000:
                    return
                # Some servers (daphne) only send 1000 and 3000-4999: close all the same.
                try:
                    await self._send({"type": "websocket.close", "code": 1000, "reason": reason})
                except Exception:
                    pass

    def close(self, code: int, reason: str) -> None:
        if self._on_loop():
            self._loop.create_task(self.aclose(code, reason))
        else:
            try:
                self._call(self.aclose(code, reason))
            except RuntimeError:
                pass

    # -- receiving ---------------------------------------------------------

    async def _receive_loop(self) -> None:
        code, reason = 1006, ""
        try:
            while True:
                event = await self._receive()
                kind = event["type"]
                if kind == "websocket.disconnect":
                    code, reason = event.get("code", 1005), event.get("reason") or ""
                    break
                if kind != "websocket.receive":
                    continue
                message: Message | None = event.get("text")
                if message is None:
                    message = event.get("bytes") or b""
                limit = self._limits.max_message_size
                if limit is not None and _size(message) > limit:
                    await self.aclose(1009, "message too big")
                    continue
                if not self._connection._deliver_nowait(message):
                    await self._wait_for_room(message)
        except asyncio.CancelledError:
            pass
        except Exception:  # the server lost the connection
            pass
        finally:
            self._disconnected = True
            if self._gone is not None and not self._gone.done():
                self._gone.set_result(None)
            self._connection._closed(code, reason)

    async def _wait_for_room(self, message: Message) -> None:
        """Backpressure: wait until the view has read enough to queue *message*."""
        while True:
            room, listener = wake_future(self._loop)
            remove = self._connection._listen(listener)
            try:
                if self._connection._deliver_nowait(message):
                    return
                await room
            finally:
                remove()

    async def afinish(self) -> None:
        """Close normally, then wait for the client's answer (bounded)."""
        await self.aclose(1000, "")
        if self._disconnected:
            return
        self._gone = self._loop.create_future()
        try:
            await asyncio.wait_for(self._gone, self._limits.close_timeout)
        except asyncio.TimeoutError:
            if self._receiver is not None:
                self._receiver.cancel()


def _size(message: Message) -> int:
    if isinstance(message, bytes):
        return len(message)
    return len(message) if message.isascii() else len(message.encode("utf-8"))


class AsgiOpener:
    """Answers a handshake through ASGI's ``websocket.accept``."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, loop: asyncio.AbstractEventLoop) -> None:
        self._scope = scope
        self._receive = receive
        self._send = send
        self._loop = loop
        self.offered_subprotocols: list[str] = list(scope.get("subprotocols") or [])
        self.accepted = False  # set on the loop, read after the view returned

    def prepare(self, request: Any) -> None:
        check_origin(request)  # the server validated the rest of the handshake

    async def aopen(self, connection: Connection, subprotocol: str | None) -> AsgiTransport | None:
        try:
            await self._send({"type": "websocket.accept", "subprotocol": subprotocol, "headers": []})
        except Exception:
            return None
        self.accepted = True
        limits: Limits = connection._limits  # type: ignore[attr-defined]
        transport = AsgiTransport(self._receive, self._send, self._loop, connection, limits)
        connection._opened(transport)
        transport.start()
        return transport

    def open(self, connection: Connection, subprotocol: str | None) -> AsgiTransport | None:
        future = asyncio.run_coroutine_threadsafe(self.aopen(connection, subprotocol), self._loop)
        return future.result()

    async def afinish(self, transport: Any) -> HttpResponseBase:
        if transport is not None:
            await transport.afinish()
        return _Finished()

    def finish(self, transport: Any) -> HttpResponseBase:
        return asyncio.run_coroutine_threadsafe(self.afinish(transport), self._loop).result()

    async def deny(self, response: HttpResponseBase) -> None:
        """Send *response* as the answer to a handshake that was never accepted."""
        if "websocket.http.response" in (self._scope.get("extensions") or {}):
            headers = [(k.encode("ascii"), v.encode("latin1")) for k, v in response.items()]
            for cookie in response.cookies.values():
                headers.append((b"Set-Cookie", cookie.output(header="").encode("ascii").strip()))
            body = b"" if response.streaming else response.content  # type: ignore[attr-defined]
            await self._send({"type": "websocket.http.response.start", "status": response.status_code, "headers": headers})
            await self._send({"type": "websocket.http.response.body", "body": body})
        else:
            # Without the extension a close before accepting is the only refusal
            # ASGI has; the server answers the handshake with 403.
            await self._send({"type": "websocket.close", "code": 1008})


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
        request = ASGIRequest(_http_scope(scope), io.BytesIO())
        opener = AsgiOpener(scope, receive, send, loop)
        request._dwebsocket_opener = opener  # type: ignore[attr-defined]  # read by attach()
        if _view_is_async(request):
            response = await self._run_async(scope, request)
        else:
            response = await _in_own_thread(loop, self._run_sync, scope, request)
        if not opener.accepted:
            await opener.deny(response)

    def _run_sync(self, scope: Scope, request: ASGIRequest) -> HttpResponseBase:
        set_script_prefix(get_script_prefix(scope))
        signals.request_started.send(sender=self.__class__, scope=scope)
        try:
            return self.get_response(request)
        finally:
            signals.request_finished.send(sender=self.__class__)

    async def _run_async(self, scope: Scope, request: ASGIRequest) -> HttpResponseBase:
        set_script_prefix(get_script_prefix(scope))
        context = ThreadSensitiveContext() if self._sync_only_middleware else contextlib.nullcontext()
        async with context:  # type: ignore[attr-defined]
            await sync_to_async(signals.request_started.send, thread_sensitive=True)(
                sender=self.__class__, scope=scope
            )
            try:
                return await self._async_handler.get_response_async(request)
            finally:
                await sync_to_async(signals.request_finished.send, thread_sensitive=True)(
                    sender=self.__class__
                )


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

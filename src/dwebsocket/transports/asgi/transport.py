"""Carry one connection over an ASGI server's ``send``/``receive`` channels.

The ASGI server (uvicorn, daphne, hypercorn) does the framing; this module
accepts the handshake with ``websocket.accept``, feeds ``websocket.receive``
events into the connection, and sends the view's messages and close.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase

from ...connection import Link, wake_future
from ...handshake import check_origin
from ...messages import Frame, Message
from ..policy import OVERFLOW_CLOSE, offer_verdict, too_big

__all__ = ["AsgiOpener", "AsgiTransport", "Receive", "Scope", "Send"]

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
        link: Link,
    ) -> None:
        self._receive = receive
        self._send = send
        self._loop = loop
        self._link = link
        self._limits = link.limits
        self._send_lock = asyncio.Lock()
        self._handed_over = threading.BoundedSemaphore(_HANDED_OVER)
        self._close_sent = False  # owned by the loop
        # Owned by the loop: the client is gone, and what afinish() waits on for it.
        self._disconnected = False
        self._gone: asyncio.Future[None] | None = None
        self._receiver: asyncio.Task[None] | None = None
        # Guarded by _offered_lock: broadcasts handed to the loop and not yet
        # sent, and when one was last sent (or the first of them handed over).
        self._offered_lock = threading.Lock()
        self._offered = 0
        self._progress = 0.0

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

    def offer(self, frame: Frame) -> bool:
        with self._offered_lock:
            now = time.monotonic()
            if not self._offered:
                self._progress = now
            verdict = offer_verdict(self._offered, now - self._progress, self._limits)
            if verdict == "queued":
                self._offered += 1
        if verdict != "queued":
            if verdict == "overflow" and self._link.begin_close() is not None:
                self._loop.call_soon_threadsafe(self._spawn, self.aclose(*OVERFLOW_CLOSE))
            return False
        self._loop.call_soon_threadsafe(self._spawn, self._send_offered(frame.message))
        return True

    def _spawn(self, coroutine: Any) -> None:
        self._loop.create_task(coroutine)

    async def _send_offered(self, message: Message) -> None:
        try:
            await self.asend(message)  # the send lock is fair: broadcasts keep their order
        finally:
            with self._offered_lock:
                self._offered -= 1
                self._progress = time.monotonic()

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
                if too_big(message, self._limits):
                    await self.aclose(1009, "message too big")
                    continue
                if not self._link.deliver_nowait(message):
                    await self._wait_for_room(message)
        except asyncio.CancelledError:
            pass
        except Exception:  # the server lost the connection
            pass
        finally:
            self._disconnected = True
            if self._gone is not None and not self._gone.done():
                self._gone.set_result(None)
            self._link.closed_with(code, reason)

    async def _wait_for_room(self, message: Message) -> None:
        """Backpressure: wait until the view has read enough to queue *message*."""
        while True:
            room, listener = wake_future(self._loop)
            remove = self._link.listen(listener)
            try:
                if self._link.deliver_nowait(message):
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


class AsgiOpener:
    """Answers a handshake through ASGI's ``websocket.accept``."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, loop: asyncio.AbstractEventLoop) -> None:
        self._scope = scope
        self._receive = receive
        self._send = send
        self._loop = loop
        self.offered_subprotocols: list[str] = list(scope.get("subprotocols") or [])
        self.accepted = False  # set on the loop, read after the view returned

    def prepare(self, request: HttpRequest) -> None:
        check_origin(request)  # the server validated the rest of the handshake

    async def aopen(self, link: Link, subprotocol: str | None) -> AsgiTransport | None:
        try:
            await self._send({"type": "websocket.accept", "subprotocol": subprotocol, "headers": []})
        except Exception:
            return None
        self.accepted = True
        transport = AsgiTransport(self._receive, self._send, self._loop, link)
        link.opened(transport)
        transport.start()
        return transport

    def open(self, link: Link, subprotocol: str | None) -> AsgiTransport | None:
        future = asyncio.run_coroutine_threadsafe(self.aopen(link, subprotocol), self._loop)
        return future.result()

    async def afinish(self, transport: object) -> HttpResponseBase:
        if isinstance(transport, AsgiTransport):
            await transport.afinish()
        return _Finished()

    def finish(self, transport: object) -> HttpResponseBase:
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



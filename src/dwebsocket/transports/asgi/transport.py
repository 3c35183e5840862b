"""Carry one connection over an ASGI server's ``send``/``receive`` channels.

The ASGI server (uvicorn, daphne, hypercorn) does the framing; this module
accepts the handshake with ``websocket.accept``, feeds ``websocket.receive``
events into the connection, and sends the view's messages and close.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import types
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, cast

from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase

from ...connection import Link, wake_future
from ...handshake import check_server_handshake
from ... import metrics as _metrics
from ...messages import Frame, Message
from .. import restart
from ..policy import OVERFLOW_CLOSE, RATE_CLOSE, RateMeter, offer_verdict, queued_size, too_big

__all__ = ["AsgiOpener", "AsgiTransport", "Receive", "Scope", "Send"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _resolver(future: asyncio.Future[bool]) -> Done:
    """A :data:`Done` that resolves *future* (on the loop)."""

    def resolve(ok: bool) -> None:
        if not future.done():
            future.set_result(ok)

    return resolve


class _Finished(HttpResponse):
    """What a WebSocket view hands back under ASGI: the connection already ended."""

    status_code = 101


_RECEIVER_NAME = "dwebsocket receive"  # every connection's receive task
_HANDED_OVER = 32  # sends a thread may hand to the loop before it waits for them

# Close codes with which a client closes on purpose: what it sent before is
# read by the view before the close. Any other (1005, 1006: the client is
# gone) drops what the view had no room for.
_CLEAN_CLOSES = (1000, 1001)

Done = Callable[[bool], object]  # told whether a message was sent

# An empty queue shared by every transport (a tuple: never appended to), so an
# idle connection keeps no deque of its own (about 760 bytes each); a
# transport makes one when something has to wait, and drops it once empty.
_EMPTY: deque[Any] = cast("deque[Any]", ())


class _Mailbox:
    """Hands work from other threads to one event loop, many items per wake-up.

    Two kinds of items, kept in one queue so that a thread's sends and
    broadcasts reach each member in the order the thread made them:

    - a message a thread's ``send()`` hands to one connection;
    - a broadcast made in another thread (a sync view, a broker's listener):
      every member on this loop joins one batch, and the loop offers the frame
      to each of them as a broadcast made on the loop would. The broadcasting
      thread does a list append per member, and the loop is woken once per
      broadcast, not once per member.

    ``_lock`` guards ``_items``, ``_batches`` (frame -> the batch in
    ``_items`` that members of it join) and ``_scheduled``; the pump, on the
    loop, is the only consumer.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: deque[tuple[AsgiTransport | None, Any, Any]] = deque()
        self._batches: dict[Frame, list[AsgiTransport]] = {}
        self._scheduled = False

    def post(self, transport: AsgiTransport, event: dict[str, Any], done: Done | None) -> bool:
        """Queue *event* for *transport*; ``False`` if the loop is closed."""
        with self._lock:
            self._items.append((transport, event, done))
            if self._scheduled:
                return True
            self._scheduled = True
        return self._wake()

    def offer(self, transport: AsgiTransport, frame: Frame) -> None:
        """Add *transport* to *frame*'s batch for this loop.

        The loop is woken once the frame has been offered to every member
        (:meth:`Frame.offered`), not at the first: the broadcasting thread and
        the loop do not take turns at the GIL for each member.
        """
        with self._lock:
            batch = self._batches.get(frame)
            if batch is None:
                batch = self._batches[frame] = []
                self._items.append((None, frame, batch))
            batch.append(transport)
            if self._scheduled:
                return
            self._scheduled = True
        frame.after_offered(self._wake)

    def _wake(self) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._pump)
        except RuntimeError:  # the loop is closed: the server is shutting down
            with self._lock:
                self._scheduled = False
                self._items.clear()
                self._batches.clear()
            return False
        return True

    def _pump(self) -> None:
        with self._lock:
            items, self._items = self._items, deque()
            self._batches.clear()
            self._scheduled = False
        for transport, item, done in items:
            if transport is not None:
                transport._submit(item, done)
                continue
            for member in done:  # a broadcast: *item* is its frame, *done* its members here
                member._offer_here(item)
            _metrics.written(item)  # handed to every member here that was not busy


# Guards the making of each transport's _handed_over (once per connection that sends from a thread).
_handed_over_lock = threading.Lock()
_mailboxes_lock = threading.Lock()
_mailboxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}  # guarded by _mailboxes_lock


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    with _mailboxes_lock:
        found = _mailboxes.get(loop)
        if found is None:
            for stale in [known for known in _mailboxes if known.is_closed()]:
                del _mailboxes[stale]
            found = _mailboxes[loop] = _Mailbox(loop)
        return found


class AsgiTransport:
    """Carries one connection over ASGI messages.

    Runs on the server's event loop. Every message goes out through one
    queue, in order: ``_submit`` (on the loop) sends at once when nothing is
    under way, calling the server's ``send`` directly, and queues otherwise.
    A server's ``send`` usually completes without suspending; when it does
    suspend (its client is slow), a task carries it on and the queue waits.
    Threads (sync views, or any thread that broadcasts) reach the loop
    through the loop's :class:`_Mailbox`, which keeps their order. A
    thread's ``send()`` does not wait for the write: ``_handed_over`` (a
    semaphore) bounds how many it may have handed over and not yet written,
    so that a view that outpaces its client waits for it.
    """

    # Slots: every open connection keeps one (an instance __dict__ costs more,
    # and past 29 attributes about 1.6 KiB). An attribute not listed here still
    # works (it goes into a __dict__ made on first use): list it here.
    # The first seven are what a broadcast reads of every member (offer()):
    # slots are laid out in this order, so they share a cache line or two.
    __slots__ = (
        "_loop_thread", "_close_sent", "_disconnected", "_restarting", "_busy", "_queue", "_send",
        "__dict__", "__weakref__", "_close_refused", "_gone",
        "_handed_over", "_limits", "_link", "_loop", "_mailbox", "_offered",
        "_offered_bytes", "_pending", "_pending_bytes", "_progress", "_rate",
        "_receive", "_receiver", "_receiving",
    )

    def __init__(
        self, receive: Receive, send: Send, loop: asyncio.AbstractEventLoop,
        link: Link,
    ) -> None:
        self._receive = receive
        self._send = send
        self._loop = loop
        self._mailbox = _mailbox(loop)
        self._link = link
        self._limits = link.limits
        self._loop_thread = threading.get_ident()  # made on the loop, in AsgiOpener.aopen
        # Owned by the loop: what waits to be sent (_EMPTY, or a deque while
        # something waits), and whether a send is under way.
        self._queue: deque[tuple[dict[str, Any], Done | None]] = _EMPTY
        self._busy = False
        # Made by the first send() from a thread (under _handed_over_lock), then never replaced.
        self._handed_over: threading.BoundedSemaphore | None = None
        self._close_sent = False  # owned by the loop
        self._close_refused = False  # owned by the loop: the server refused the restart's 1012
        self._restarting = False  # set once, by restart.py's closer, before the view hears of it
        # Owned by the loop: the client is gone, and what afinish() waits on for it.
        self._disconnected = False
        self._gone: asyncio.Future[None] | None = None
        self._receiver: asyncio.Task[None] | None = None
        # Owned by the receive task (on the loop): messages received while the
        # view's queue was full, what they count against
        # WEBSOCKET_MAX_QUEUE_BYTES, and the server's receive() under way
        # while they wait (see _next_event).
        self._pending: deque[Message] = _EMPTY  # a deque of its own while messages wait
        self._pending_bytes = 0
        self._receiving: asyncio.Task[dict[str, Any]] | None = None
        self._rate = RateMeter(self._limits)
        # Owned by the loop (broadcasts are offered there, see _offer_here):
        # broadcasts queued behind a send that had to wait and not yet sent,
        # their bytes, and when one was last sent (or the first of them queued).
        self._offered = 0
        self._offered_bytes = 0
        self._progress = 0.0

    def start(self) -> None:
        # A name of its own: else each task makes one ("Task-123").
        self._receiver = self._loop.create_task(self._receive_loop(), name=_RECEIVER_NAME)
        restart.register(self)  # on the loop: in the main thread, it chains SIGTERM (restart.install)

    def begin_restart(self) -> None:
        """From restart.py's closer (a thread): the view sees 1012 now; the loop sends the close."""
        self._restarting = True
        self._link.closed_with(*restart.RESTART_CLOSE)
        if self._loop.is_running():
            try:
                self._loop.call_soon_threadsafe(self._restart_close)
                return
            except RuntimeError:  # closed meanwhile
                pass
        # The server's loop is gone (the process exits): nothing more can be sent.
        restart.unregister(self)

    def finish_restart(self) -> None:
        """Nothing to wait for: the loop sends the close frame."""

    def _restart_close(self) -> None:
        """On the loop: close with 1012, with no fallback to 1000 where the server refuses it
        (daphne): a clean 1000 would tell the client not to reconnect."""
        if self._close_sent or self._disconnected:
            return
        self._close_sent = True
        self._spawn(self._arestart_close())

    async def _arestart_close(self) -> None:
        if await self._aclose_event(*restart.RESTART_CLOSE):
            return
        # Refused: no close frame goes out, so no answer will come. The
        # connection drops when the server stops (1006, and the client reconnects).
        self._close_refused = True
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)

    def _on_loop(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def _call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        """Run *coroutine* on the loop and wait for it, from any thread but the loop's."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    # -- the send queue (on the loop) ---------------------------------------

    def _submit(self, event: dict[str, Any], done: Done | None) -> None:
        """Send *event* after everything submitted before it; on the loop."""
        if self._busy or self._queue:
            if self._queue is _EMPTY:
                self._queue = deque()
            self._queue.append((event, done))
            return
        self._run(event, done)

    def _run(self, event: dict[str, Any] | None, done: Done | None) -> None:
        """Send *event*, then what queued behind it, until a send suspends."""
        while event is not None:
            self._busy = True
            sending = self._send(event)
            # A coroutine (every server's send) is driven as is; any other awaitable by __await__().
            steps = sending if type(sending) is types.CoroutineType else sending.__await__()
            try:
                waiting_for = steps.send(None)
            except StopIteration:
                ok = True
            except Exception:  # the server refuses sends once the client is gone
                ok = False
            else:  # the server's send must wait (a slow client): a task carries it on
                self._loop.create_task(self._carry_on(steps, waiting_for, done))
                return
            if done is not None:
                done(ok)
            event, done = self._queue.popleft() if self._queue else (None, None)
        self._busy = False
        if self._queue is not _EMPTY:
            self._queue = _EMPTY  # empty: the deque is freed

    async def _carry_on(
        self, steps: Generator[Any, None, Any] | Coroutine[Any, Any, Any], waiting_for: object, done: Done | None
    ) -> None:
        """Finish a server send that suspended, as a task would, then go on with the queue.

        *steps* is the send (its coroutine, or its ``__await__()`` iterator); it yielded *waiting_for*,
        the future it waits for (or ``None`` for a bare yield).
        """
        ok = False
        try:
            while True:
                try:
                    if waiting_for is None:  # a bare yield (asyncio.sleep(0))
                        await asyncio.sleep(0)
                    else:
                        await asyncio.wait([cast("asyncio.Future[Any]", waiting_for)])
                except asyncio.CancelledError as exc:  # the loop is shutting down
                    waiting_for = steps.throw(exc)
                    continue
                waiting_for = steps.send(None)
        except StopIteration:
            ok = True
        except BaseException:  # the client is gone, or the loop is shutting down
            steps.close()
        if done is not None:
            done(ok)
        event, done = self._queue.popleft() if self._queue else (None, None)
        self._run(event, done)

    # -- sending -----------------------------------------------------------

    async def asend(self, message: Message) -> bool:
        if self._close_sent or self._disconnected:
            return False
        key = "text" if isinstance(message, str) else "bytes"
        sent: asyncio.Future[bool] = self._loop.create_future()
        self._submit({"type": "websocket.send", key: message}, _resolver(sent))
        return await sent  # already done, without suspending, when the send was

    def send(self, message: Message) -> bool:
        if self._close_sent or self._disconnected:  # a stale read only delays this answer
            return False
        key = "text" if isinstance(message, str) else "bytes"
        event = {"type": "websocket.send", key: message}
        if self._on_loop():
            # Called from sync code running on the loop (a sync helper inside
            # an async view): queued in order, not waited for.
            self._submit(event, None)
            return True
        handed_over = self._handed_over or self._make_handed_over()
        handed_over.acquire()  # waits while the client is that far behind
        if not self._mailbox.post(self, event, self._handed_back):
            handed_over.release()
            return False
        return True

    def _make_handed_over(self) -> threading.BoundedSemaphore:
        """The semaphore of the first send from a thread (an async view never needs one)."""
        with _handed_over_lock:
            if self._handed_over is None:
                self._handed_over = threading.BoundedSemaphore(_HANDED_OVER)
            return self._handed_over

    def _handed_back(self, ok: bool) -> None:
        assert self._handed_over is not None  # posted by send(), which made it
        self._handed_over.release()

    def offer(self, frame: Frame) -> bool:
        if not self._on_loop():
            # From another thread: the loop offers it, with every other member of
            # this broadcast on the loop, as one item of its mailbox.
            if self._close_sent or self._disconnected or self._restarting:
                return False
            self._mailbox.offer(self, frame)
            return True
        return self._offer_here(frame)

    def _offer_here(self, frame: Frame) -> bool:
        """:meth:`offer`, on the loop."""
        if self._close_sent or self._disconnected or self._restarting:
            return False
        message = frame.message
        event = {"type": "websocket.send", "text" if isinstance(message, str) else "bytes": message}
        if not self._busy and not self._queue:
            # Nothing waits on this connection: send at once, as a bare loop
            # over `await send(...)` would. Only a send that has to wait counts
            # towards the slow-client policy (the next broadcasts queue behind
            # it, counted).
            self._run(event, None)
            return True
        now = time.monotonic()
        if not self._offered:
            self._progress = now
        verdict = offer_verdict(self._offered, now - self._progress, self._limits, self._offered_bytes)
        if verdict != "queued":
            _metrics.overflowed(verdict)
            if verdict == "overflow" and self._link.begin_close() is not None:
                self._spawn(self.aclose(*OVERFLOW_CLOSE))
            return False
        self._offered += 1
        self._offered_bytes += frame.size
        self._submit(event, functools.partial(self._offer_sent, frame))
        return True

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        self._loop.create_task(coroutine)

    def _offer_sent(self, frame: Frame, ok: bool) -> None:
        _metrics.written(frame)
        self._offered -= 1
        self._offered_bytes -= frame.size
        self._progress = time.monotonic()

    async def aclose(self, code: int, reason: str) -> None:
        if self._restarting:  # the server stops: its 1012 goes out, whoever closes first
            self._restart_close()
            return
        if self._close_sent or self._disconnected:
            return
        self._close_sent = True
        if await self._aclose_event(code, reason) or code == 1000:
            return
        # Some servers (daphne) only send 1000 and 3000-4999: close all the same.
        await self._aclose_event(1000, reason)

    async def _aclose_event(self, code: int, reason: str) -> bool:
        sent: asyncio.Future[bool] = self._loop.create_future()
        self._submit({"type": "websocket.close", "code": code, "reason": reason}, _resolver(sent))
        return await sent

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
        refusing = False  # closed for WEBSOCKET_RATE_LIMIT: nothing more is delivered
        try:
            while True:
                # Nothing waits for room (the usual case): the server's receive()
                # directly, with no _next_event coroutine kept by an idle connection.
                if self._pending or self._receiving is not None:
                    event = await self._next_event()
                else:
                    event = await self._receive()
                kind = event["type"]
                if kind == "websocket.disconnect":
                    code, reason = event.get("code", 1005), event.get("reason") or ""
                    if code in _CLEAN_CLOSES:
                        # A client that said goodbye after what the view has not
                        # read yet: the view reads it all before it sees the close.
                        await self._drain_pending()
                    # Otherwise the client is gone (uvicorn says 1005 for a lost
                    # connection): what waits in _pending is dropped.
                    break
                if kind != "websocket.receive" or refusing:
                    continue
                message: Message | None = event.get("text")
                if message is None:
                    message = event.get("bytes") or b""
                if too_big(message, self._limits):
                    await self.aclose(1009, "message too big")
                    continue
                if not self._rate.allow():
                    refusing = True
                    await self.aclose(*RATE_CLOSE)
                    continue
                if self._pending or not self._link.deliver_nowait(message):
                    if self._pending is _EMPTY:
                        self._pending = deque()
                    self._pending.append(message)  # the view's queue is full: see _next_event
                    self._pending_bytes += queued_size(message)
        except asyncio.CancelledError:
            pass
        except Exception:  # the server lost the connection
            pass
        finally:
            self._disconnected = True
            restart.unregister(self)
            if self._receiving is not None:
                self._receiving.cancel()
                self._receiving = None
            self._pending = _EMPTY  # nobody will take them: free them now
            self._pending_bytes = 0
            if self._gone is not None and not self._gone.done():
                self._gone.set_result(None)
            if restart.stopping():
                # The server closed it for the stop (uvicorn sends 1012 without a
                # reason), possibly before restart.py's closer got to it: the view
                # sees what every view of a stopping process sees.
                code, reason = restart.RESTART_CLOSE
            self._link.closed_with(code, reason)

    async def _next_event(self) -> dict[str, Any]:
        """The server's next event; meanwhile, move what waits in ``_pending`` into the view's queue.

        Backpressure without deafness: while the view's queue is full, what
        arrives waits in ``_pending``, and the server is asked for more as
        long as that holds less than WEBSOCKET_MAX_QUEUE_BYTES, so a client
        that leaves (``websocket.disconnect``) behind a full queue is noticed.
        Past that, no more is received until the view reads (the server then
        stops reading the socket: its own backpressure). At most
        WEBSOCKET_MAX_QUEUE_BYTES and one message wait here.
        """
        budget = self._limits.max_queue_bytes
        while self._pending:
            room, listener = wake_future(self._loop)
            remove = self._link.listen(listener)
            try:
                self._queue_pending()
                if not self._pending:
                    break
                if self._receiving is None and (budget is None or self._pending_bytes < budget):
                    self._receiving = asyncio.ensure_future(self._receive())
                waits: set[asyncio.Future[Any]] = {room}
                if self._receiving is not None:
                    waits.add(self._receiving)
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if self._receiving is not None and self._receiving.done():
                    receiving, self._receiving = self._receiving, None
                    return receiving.result()
            finally:
                remove()
        if self._receiving is not None:
            receiving, self._receiving = self._receiving, None
            return await receiving
        return await self._receive()

    async def _drain_pending(self) -> None:
        """Wait until everything in ``_pending`` is in the view's queue."""
        while self._pending:
            room, listener = wake_future(self._loop)
            remove = self._link.listen(listener)
            try:
                self._queue_pending()
                if self._pending:
                    await room
            finally:
                remove()

    def _queue_pending(self) -> None:
        """Move what waits in ``_pending`` into the view's queue while it has room."""
        while self._pending and self._link.deliver_nowait(self._pending[0]):
            self._pending_bytes -= queued_size(self._pending.popleft())
        if not self._pending:
            self._pending = _EMPTY

    async def afinish(self) -> None:
        """Close normally, then wait for the client's answer (bounded)."""
        # Nobody reads any more: what arrives from now on is dropped, so a full
        # queue does not keep the receiver from reaching the client's answer.
        self._link.begin_close()
        await self.aclose(1000, "")
        if self._disconnected or self._close_refused:
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
        # Set on the loop once websocket.accept was sent, even if the server
        # raised: after that the handshake can no longer be refused with HTTP.
        self.answered = False

    def prepare(self, request: HttpRequest) -> None:
        # The server validated the rest of the handshake, and negotiates the extensions.
        check_server_handshake(request, self._scope.get("http_version"))

    async def aopen(self, link: Link, subprotocol: str | None) -> AsgiTransport | None:
        self.answered = True
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
        """Send *response* as the answer to a handshake that was never accepted.

        Nothing is sent once ``websocket.accept`` was tried and the server
        raised: the server then ends the connection itself.
        """
        if self.answered:
            return
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



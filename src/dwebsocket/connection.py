"""The connection a view talks through, independent of Django and of the server.

A :class:`Connection` is an inbound message queue plus a ``send()`` that any
thread may call. A *transport* (the WSGI socket driver, and later the ASGI and
long-polling ones) fills the queue and carries out sends and closes; the view
consumes the queue. The connection knows nothing about how bytes move.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol, Union

#: What a WebSocket message is: ``str`` for a text frame, ``bytes`` for a binary one.
Message = Union[str, bytes]

# Close codes a view may send (RFC 6455 section 7.4 and the IANA registry).
_SENDABLE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})

CONNECTING, OPEN, CLOSING, CLOSED = "CONNECTING", "OPEN", "CLOSING", "CLOSED"


class Transport(Protocol):
    """What a connection needs from the layer that moves its bytes."""

    def send(self, message: Message) -> bool:
        """Send one message from a thread; ``False`` if the connection is no longer open."""

    async def asend(self, message: Message) -> bool:
        """Send one message from a coroutine."""

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake from a thread."""

    async def aclose(self, code: int, reason: str) -> None:
        """Start the closing handshake from a coroutine."""

    def offer(self, encoded: Any) -> bool:
        """Queue a broadcast without waiting; ``False`` if it was not queued."""


def wake_future(loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Future[None], Callable[[], None]]:
    """A future on *loop*, and a listener (see :meth:`Connection._listen`) that resolves it.

    How coroutines wait for a connection: called on the loop's own thread (an
    ASGI receive loop delivering a message) the listener resolves the future at
    once; from any other thread it goes through ``call_soon_threadsafe``.
    """
    future: asyncio.Future[None] = loop.create_future()

    def resolve() -> None:
        if not future.done():
            future.set_result(None)

    def listener() -> None:
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            resolve()
        else:
            loop.call_soon_threadsafe(resolve)

    return future, listener


def check_close_code(code: int, reason: str) -> None:
    """Raise ``ValueError`` unless *code* and *reason* may go in a close frame."""
    if not (code in _SENDABLE_CODES or 3000 <= code <= 4999):
        raise ValueError(
            f"{code} is not a close code a server may send; use 1000 (normal), "
            "1001 (going away), 1008 (policy), 1011 (error) or an application code 3000-4999."
        )
    if len(reason.encode("utf-8")) > 123:
        raise ValueError("A close reason must fit in 123 bytes of UTF-8.")


def check_message(message: object) -> Message:
    """Return *message* as ``str`` or ``bytes``, or raise ``TypeError`` naming the fix."""
    if isinstance(message, (str, bytes)):
        return message
    if isinstance(message, (bytearray, memoryview)):
        return bytes(message)
    raise TypeError(
        f"send() takes str (a text frame) or bytes (a binary frame), not "
        f"{type(message).__name__}; for JSON, send json.dumps(data)."
    )


class Connection:
    """One WebSocket connection: an inbound queue and a thread-safe ``send()``.

    Concurrency: ``_cond`` (one lock) owns ``_messages``, ``_state``,
    ``_close_code``, ``_close_reason`` and ``_listeners``. The transport's
    reader is the only producer of messages; any thread may consume them or
    send. Listeners (how coroutines wait, see :meth:`_listen`) are called with
    the lock held and must only schedule work, never block.
    """

    def __init__(self, *, max_queue: int = 64) -> None:
        self._cond = threading.Condition()
        self._messages: deque[Message] = deque()
        self._max_queue = max_queue
        self._state = CONNECTING
        self._close_code: int | None = None
        self._close_reason = ""
        self._transport: Transport | None = None
        self._listeners: set[Callable[[], object]] = set()
        #: A unique id for this connection, across every process of a deployment.
        self.id = uuid.uuid4().hex
        # The groups this connection is in; changed by dwebsocket.groups only,
        # under _groups_lock, which also makes a join and the leave-all at close
        # exclusive (a join never lands after the close has left every group).
        self._groups: set[str] = set()
        self._groups_lock = threading.Lock()

    # -- for subclasses and transports --------------------------------------

    def _start(self) -> None:
        """Open the connection on first use (the handshake is answered lazily)."""

    def _opened(self, transport: Transport) -> None:
        with self._cond:
            self._transport = transport
            if self._state == CONNECTING:
                self._state = OPEN

    def _changed(self) -> None:
        """Wake every waiter, threads and coroutines; call with ``_cond`` held."""
        self._cond.notify_all()
        for listener in self._listeners:
            listener()

    def _listen(self, listener: Callable[[], object]) -> Callable[[], None]:
        """Call *listener* on every change of the queue or state; returns the undo."""
        with self._cond:
            self._listeners.add(listener)

        def remove() -> None:
            with self._cond:
                self._listeners.discard(listener)

        return remove

    def _deliver(self, message: Message) -> None:
        """Queue a received message; blocks while the queue is full (backpressure)."""
        with self._cond:
            while len(self._messages) >= self._max_queue and self._state == OPEN:
                self._cond.wait()
            if self._state == OPEN:  # after close() new messages are dropped
                self._messages.append(message)
                self._changed()

    def _deliver_nowait(self, message: Message) -> bool:
        """Queue a received message unless the queue is full; ``False`` means wait and retry."""
        with self._cond:
            if len(self._messages) >= self._max_queue and self._state == OPEN:
                return False
            if self._state == OPEN:
                self._messages.append(message)
                self._changed()
            return True

    def _pop(self) -> Message | None:
        """The next message, or ``None``; call with ``_cond`` held."""
        if not self._messages:
            return None
        message = self._messages.popleft()
        self._changed()  # a producer may be waiting for room
        return message

    def _closed(self, code: int, reason: str = "") -> None:
        """Record that the connection is closed; wakes every waiter; leaves every group."""
        with self._cond:
            first = self._state != CLOSED
            if first:
                self._state = CLOSED
                self._close_code = code
                self._close_reason = reason
            self._changed()
        if first:
            from . import groups

            groups.leave_all(self)

    def _offer(self, encoded: Any) -> bool:
        """Queue a broadcast for this client without waiting (see dwebsocket.groups)."""
        transport = self._open_transport()
        return transport is not None and transport.offer(encoded)

    @property
    def user_id(self) -> str | None:
        """The primary key of the user of this connection, if known (for presence)."""
        return None

    def _begin_close(self) -> Transport | None:
        """Move to CLOSING; the transport to send the close frame on, if still open."""
        with self._cond:
            if self._state != OPEN:
                return None
            self._state = CLOSING
            self._changed()  # a reader blocked on a full queue stops waiting
            return self._transport

    # -- the public API -------------------------------------------------------

    def wait(self, timeout: float | None = None) -> Message | None:
        """Block until the next message and return it.

        Returns ``str`` for a text message and ``bytes`` for a binary one.
        Returns ``None`` once the connection is closed and every received
        message has been read, or when *timeout* seconds pass first; check
        :attr:`connected` to tell the two apart.
        """
        self._start()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._messages:
                if self._state in (CLOSED, CONNECTING):
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._pop()

    def read(self) -> Message | None:
        """Return the next received message at once, or ``None`` if there is none."""
        self._start()
        with self._cond:
            return self._pop()

    def count_messages(self) -> int:
        """The number of received messages waiting to be read."""
        self._start()
        with self._cond:
            return len(self._messages)

    def has_messages(self) -> bool:
        """Whether a received message is waiting to be read."""
        return self.count_messages() > 0

    def send(self, message: Message) -> bool:
        """Send *message*: ``str`` as a text frame, ``bytes`` as a binary one.

        Any thread may call it, for example another view broadcasting to this
        client. Returns ``False``, and sends nothing, if the connection is not
        open (any more).
        """
        message = check_message(message)
        self._start()
        transport = self._open_transport()
        return transport is not None and transport.send(message)

    def _open_transport(self) -> Transport | None:
        with self._cond:
            return self._transport if self._state == OPEN else None

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake with *code* and *reason*; idempotent.

        Messages already received can still be read; :meth:`wait` returns
        ``None`` once the client has answered (or the close timeout passed).
        """
        check_close_code(code, reason)
        self._start()
        transport = self._begin_close()
        if transport is not None:
            transport.close(code, reason)

    def disconnect(self) -> None:
        """Close the connection normally (code 1000); idempotent."""
        self.close()

    @property
    def connected(self) -> bool:
        """``True`` while the connection is open: no close frame sent or received."""
        self._start()
        return self._state == OPEN

    @property
    def closed(self) -> bool:
        """``True`` once the connection is fully closed."""
        return self._state == CLOSED

    def is_closed(self) -> bool:
        """Whether the connection is fully closed (the original dwebsocket's name)."""
        return self.closed

    @property
    def close_code(self) -> int | None:
        """The code of the client's close frame; 1006 if it vanished without one."""
        return self._close_code

    @property
    def close_reason(self) -> str:
        """The reason in the client's close frame, or ``""``."""
        return self._close_reason

    def join(self, group: str) -> None:
        """Add this connection to *group*; it leaves by itself when it closes.

        Answers the handshake first, if the view has not used the connection yet.
        """
        from . import groups

        self._start()
        groups.wait_for(groups.join(self, group))

    def leave(self, group: str) -> None:
        """Remove this connection from *group*."""
        from . import groups

        groups.wait_for(groups.leave(self, group))

    def __iter__(self) -> Iterator[Message]:
        """Yield each message until the connection closes."""
        while True:
            message = self.wait()
            if message is None:
                return
            yield message

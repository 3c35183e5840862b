"""The connection a view talks through, independent of Django and of the server.

A :class:`Connection` is an inbound message queue plus a ``send()`` that any
thread may call. A *transport* (``dwebsocket.transports``: a WSGI server's
socket, ASGI, long-polling, the test client) fills the queue and carries out
sends and closes; the view consumes the queue. The connection knows nothing
about how bytes move, and nothing about groups: code that must know when a
connection ends registers an on-close hook (:meth:`Link.on_close`).

Transports never touch the connection's insides: they get its :class:`Link`,
the named, typed interface of what a transport may do to a connection.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol, cast

from . import metrics as _metrics
from .messages import Frame, Message, check_close_code, check_message
from .session import Session, plain
from .transports._sync import LightCondition
from .transports.policy import Limits, connections, has_room, queued_size

__all__ = ["CLOSED", "CLOSING", "CONNECTING", "OPEN", "Connection", "Link", "Transport", "wake_future"]

CONNECTING, OPEN, CLOSING, CLOSED = "CONNECTING", "OPEN", "CLOSING", "CLOSED"

# The inbound queue of a connection with nothing queued: shared, and immutable
# (a tuple), so that an idle connection keeps no deque of its own (about 760
# bytes); _push gives a connection a deque and _pop gives it back.
_NO_MESSAGES = cast("deque[Message]", ())


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

    def offer(self, frame: Frame) -> bool:
        """Send a broadcast without ever waiting; ``False`` if it was not taken."""


def wake_future(loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Future[None], Callable[[], None]]:
    """A future on *loop*, and a listener (see :meth:`Link.listen`) that resolves it.

    How coroutines wait for a connection: called on the loop's own thread (an
    ASGI receive loop delivering a message) the listener resolves the future at
    once; from any other thread it goes through ``call_soon_threadsafe``.
    """
    future: asyncio.Future[None] = loop.create_future()
    return future, _Wake(loop, future)


class _Wake:
    """The listener of :func:`wake_future`: a small object, not two closures, as every idle async view keeps one."""

    __slots__ = ("_future", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
        self._loop = loop
        self._future = future

    def _resolve(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    def __call__(self) -> None:
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._resolve()
        else:
            try:
                self._loop.call_soon_threadsafe(self._resolve)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass


class Connection:
    """One WebSocket connection: an inbound queue and a thread-safe ``send()``.

    Concurrency: ``_cond`` (one lock) owns ``_messages``, ``_queued_bytes``,
    ``_state``, ``_close_code``, ``_close_reason``, ``_transport``, ``_pump``,
    ``_listeners``, ``_close_hooks``, ``_admitted``, ``_read_number`` and, of
    a ``dwebsocket.v1`` session (``_session``, set once before the transport),
    the inbound fields ``accepted``, ``numbers`` and ``superseded``. The transport is the only producer of
    messages; any thread may consume them or send. A transport that can read
    in the consumer's thread gives a *pump*: :meth:`wait` then reads there,
    with ``_cond`` released, instead of waiting for another thread to deliver. Listeners (how coroutines wait, see
    :meth:`Link.listen`) are called with the lock held and must only schedule
    work, never block. Close hooks run once, after the lock is released.
    """

    # Slots: every open connection keeps one. "__dict__" keeps any other
    # attribute working (a subclass's, or one set on a connection by a view).
    __slots__ = (
        "__dict__", "__weakref__", "_admitted", "_close_code", "_close_hooks", "_close_reason", "_cond",
        "_limits", "_link", "_listeners", "_messages", "_pump", "_queued_bytes", "_read_number", "_session",
        "_state", "_transport", "id",
    )

    def __init__(self, limits: Limits | None = None) -> None:
        self._limits = limits or Limits()
        self._cond = LightCondition()
        self._messages: deque[Message] = _NO_MESSAGES  # a deque of its own while messages wait
        # What the queued messages count against WEBSOCKET_MAX_QUEUE_BYTES.
        self._queued_bytes = 0
        # Whether this connection holds a place in policy.connections (admit()).
        self._admitted = False
        self._state = CONNECTING
        self._close_code: int | None = None
        self._close_reason = ""
        self._transport: Transport | None = None
        self._pump: Callable[[float | None], None] | None = None
        # A tuple, replaced on each change: () (shared) while nobody listens.
        self._listeners: tuple[Callable[[], object], ...] = ()
        self._close_hooks: tuple[Callable[[Link], object], ...] = ()  # replaced on each change
        # The dwebsocket.v1 session, if the client speaks it: set once, before
        # the transport is, and read without a lock from then on.
        self._session: Session | None = None
        # The number of a numbered message the view just read, to acknowledge
        # once _cond is released (see _pop); written under _cond by the reader.
        self._read_number = 0
        #: A unique id for this connection, across every process of a deployment.
        self.id = uuid.uuid4().hex
        self._link = Link(self)

    # -- for subclasses -------------------------------------------------------

    def _start(self) -> None:
        """Open the connection on first use (the handshake is answered lazily)."""

    @property
    def user_id(self) -> str | None:
        """The primary key of the user of this connection, if known (for presence)."""
        return None

    def _changed(self) -> None:
        """Wake every waiter, threads and coroutines; call with ``_cond`` held."""
        self._cond.notify_all()
        for listener in self._listeners:
            listener()

    def _pop(self) -> Message | None:
        """The next message, or ``None``; call with ``_cond`` held.

        A numbered message (a ``dwebsocket.v1`` client's acknowledged send)
        leaves its number in ``_read_number``: the caller acknowledges it
        (:meth:`_acknowledge_read`) once it released the lock.
        """
        if not self._messages:
            return None
        message = self._messages.popleft()
        if not self._messages:
            self._messages = _NO_MESSAGES
        self._queued_bytes -= queued_size(message)
        session = self._session
        if session is not None and session.numbers:
            number = session.numbers.popleft()
            if number is not None:
                self._read_number = number
        self._changed()  # a producer may be waiting for room
        return message

    def _push(self, message: Message, number: int | None = None) -> None:
        """Queue a received message (with its number, if numbered); call with ``_cond`` held."""
        if self._messages is _NO_MESSAGES:
            self._messages = deque()
        self._messages.append(message)
        self._queued_bytes += queued_size(message)
        _metrics.received(message)
        session = self._session
        if session is not None:
            session.numbers.append(number)
            if number is not None:
                session.accepted = number
        self._changed()

    def _drop_numbered(self) -> None:
        """Drop the numbered messages the view has not read; hold ``_cond``.

        The page never got their acknowledgements, so it sends them again on
        its next connection: read here too, they would reach a view twice.
        """
        session = self._session
        if session is None or not any(n is not None for n in session.numbers):
            return
        kept = [(m, n) for m, n in zip(self._messages, session.numbers) if n is None]
        self._messages = deque(m for m, _ in kept) if kept else _NO_MESSAGES
        session.numbers = deque(n for _, n in kept)
        self._queued_bytes = sum(queued_size(m) for m in self._messages)
        self._changed()

    def _supersede(self) -> None:
        """A newer connection of the same page took over: this one's view gets no more of its numbered messages."""
        with self._cond:
            if self._session is not None:
                self._session.superseded = True
                self._drop_numbered()

    def _acknowledge_read(self) -> None:
        """Acknowledge the numbered message just read, if any; call without ``_cond``."""
        number = self._read_number
        if number:
            self._read_number = 0
            self._acknowledge(number)

    def _acknowledge(self, number: int) -> None:
        """The view read the client's message *number* (subclasses record it and tell the client)."""
        session = self._session
        if session is not None:
            session.acknowledge(number, self._transport)

    def _has_room(self, message: Message) -> bool:
        """Whether the queue takes *message* now (WEBSOCKET_MAX_QUEUE, WEBSOCKET_MAX_QUEUE_BYTES); hold ``_cond``."""
        limits = self._limits
        return has_room(
            len(self._messages), self._queued_bytes, queued_size(message), limits.max_queue, limits.max_queue_bytes
        )

    def admit(self, limit: int | None) -> bool:
        """Take a place among the process's open connections (``WEBSOCKET_MAX_CONNECTIONS``, *limit*).

        ``False`` if the process holds *limit* already: the handshake (or the
        polling ``open``) is refused with 503. Idempotent; the place is given
        back exactly once, when the connection is closed (:meth:`Link.closed_with`).
        """
        with self._cond:
            if self._admitted:
                return True
            if self._state == CLOSED or not connections.take(limit):
                return False
            self._admitted = True
            return True

    def abandon(self) -> None:
        """The connection's view is done with it: record it closed (1006) if nothing closed it yet.

        For code that admitted a connection (:meth:`admit`) and runs its view
        itself: whatever the view did, the place it took is given back.
        Idempotent.
        """
        self._link.closed_with(1006)

    def _discard(self) -> None:
        """Drop the messages nobody will read (the view has returned) and what ties the connection to its transport."""
        with self._cond:
            self._messages = _NO_MESSAGES
            self._queued_bytes = 0
            if self._session is not None:
                self._session.numbers.clear()
            self._transport = None
            self._pump = None

    def _open_transport(self) -> Transport | None:
        # Read without _cond (two attribute reads, each atomic; this is on every
        # send): a transport seen while the state turns to CLOSING refuses the
        # send itself, as it checks its own state under its own lock.
        transport = self._transport
        return transport if self._state == OPEN else None

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
                pump = self._pump
                if pump is None:
                    self._cond.wait(remaining)
                    continue
                self._cond.release()
                try:
                    pump(deadline)  # read the socket in this thread
                finally:
                    self._cond.acquire()
            message = self._pop()
        self._acknowledge_read()
        return message

    def _pump_now(self) -> None:
        """Read what has arrived, without waiting, if the transport reads in this thread."""
        pump = self._pump
        if pump is not None and not self._messages and self._state in (OPEN, CLOSING):
            pump(0.0)

    def read(self) -> Message | None:
        """Return the next received message at once, or ``None`` if there is none."""
        self._start()
        self._pump_now()
        with self._cond:
            message = self._pop()
        self._acknowledge_read()
        return message

    def count_messages(self) -> int:
        """The number of received messages waiting to be read."""
        self._start()
        self._pump_now()
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
        if transport is None:
            return False
        if self._session is not None:
            message = plain(message)
        _metrics.sent(message)
        return transport.send(message)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake with *code* and *reason*; idempotent.

        Messages already received can still be read; :meth:`wait` returns
        ``None`` once the client has answered (or the close timeout passed).
        """
        check_close_code(code, reason)
        self._start()
        transport = self._link.begin_close()
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

    def __iter__(self) -> Iterator[Message]:
        """Yield each message until the connection closes."""
        while True:
            message = self.wait()
            if message is None:
                return
            yield message


class Link:
    """What a transport (and a group) may do to a :class:`Connection`.

    The one interface between a connection and the layers that move its
    bytes: a transport reports the open, the messages that arrive and the
    close through it; the groups offer broadcasts through it and learn of the
    close through :meth:`on_close`. Every method is safe from any thread.

    A link holds its connection weakly: the connection holds its link (and,
    while open, its transport, which holds the link), so a strong reference
    back would make a cycle, and a closed connection, with every message in
    its queue, would wait for the cyclic garbage collector instead of being
    freed as soon as the view drops it. Once the connection is gone, a link
    drops what is delivered to it and refuses broadcasts.

    While the connection is open, the link also holds what a broadcast is
    offered to (``_target``: its transport, or its ``dwebsocket.v1`` session
    in front of it), so that a broadcast reaches the transport without a
    look at the connection. It is written under the connection's ``_cond``
    (set at the open, cleared when the connection closes or starts to) and
    read without it: a broadcast that reads it just before it is cleared is
    refused by the transport, which checks its own state.
    """

    __slots__ = ("_ref", "_target", "id", "limits")

    def __init__(self, connection: Connection) -> None:
        self._ref = weakref.ref(connection)
        self._target: Transport | _InSession | None = None
        #: The connection's id (see :attr:`Connection.id`).
        self.id: str = connection.id
        #: The limits the connection was opened with.
        self.limits: Limits = connection._limits

    @property
    def user_id(self) -> str | None:
        """The primary key of the connection's user, if known (for presence)."""
        c = self._ref()
        return None if c is None else c.user_id

    def opened(self, transport: Transport, pump: Callable[[float | None], None] | None = None) -> None:
        """The handshake was answered: *transport* carries the connection from now on.

        *pump*, if given, reads from the client in the calling thread until a
        message is delivered, the connection ends or the deadline (a
        ``time.monotonic()`` value, or ``None``) passes; a view's ``wait()``
        then calls it rather than waiting for another thread to deliver.
        """
        c = self._ref()
        if c is None:
            return
        with c._cond:
            c._transport = transport
            c._pump = pump
            if c._state == CONNECTING:
                c._state = OPEN
            if c._state == OPEN:
                session = c._session
                self._target = transport if session is None else _InSession(session, transport)

    def deliver(self, message: Message, timeout: float | None = None) -> bool:
        """Queue a received message, waiting while the queue is full (backpressure).

        ``False`` if the queue was still full after *timeout* seconds (nothing queued).
        """
        c = self._ref()
        if c is None:
            return True
        inbound = _inbound(c, message)
        if inbound is None:
            return True
        message, number = inbound
        deadline = None if timeout is None else time.monotonic() + timeout
        with c._cond:
            if _copy(c, number):
                return True
            while c._state == OPEN and not c._has_room(message):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                c._cond.wait(remaining)
            if c._state == OPEN:  # after close() new messages are dropped
                c._push(message, number)
            return True

    def deliver_nowait(self, message: Message) -> bool:
        """Queue a received message unless the queue is full; ``False`` means wait and retry.

        Full is ``WEBSOCKET_MAX_QUEUE`` messages or ``WEBSOCKET_MAX_QUEUE_BYTES``
        bytes (:func:`~dwebsocket.transports.policy.has_room`).
        """
        c = self._ref()
        if c is None:
            return True
        inbound = _inbound(c, message)
        if inbound is None:
            return True
        message, number = inbound
        with c._cond:
            if _copy(c, number):
                return True
            if c._state == OPEN and not c._has_room(message):
                return False
            if c._state == OPEN:
                c._push(message, number)
            return True

    def deliver_all_nowait(self, messages: list[Message]) -> bool:
        """Queue every one of *messages*, or none if the queue has no room for them all.

        A queue that is empty takes any batch (a polling ``send`` carries at
        most what a request body may, see ``WEBSOCKET_MAX_MESSAGE_SIZE``), so
        a batch larger than the queue is not refused forever.
        """
        c = self._ref()
        if c is None:
            return True
        numbered = [i for i in (_inbound(c, m) for m in messages) if i is not None]
        limits = c._limits
        with c._cond:
            if c._state != OPEN:
                return True  # dropped, as deliver() drops them after close
            accepted = c._session.accepted if c._session is not None else 0
            numbered = [(m, n) for m, n in numbered if n is None or n > accepted]  # not copies sent again
            if c._messages:
                count, size = len(c._messages), c._queued_bytes
                for message, _ in numbered:
                    adding = queued_size(message)
                    if not has_room(count, size, adding, limits.max_queue, limits.max_queue_bytes):
                        return False
                    count, size = count + 1, size + adding
            for message, number in numbered:
                if number is None or c._session is None or number > c._session.accepted:
                    c._push(message, number)
            return True

    def queued(self) -> int:
        """How many received messages wait for the view (read without the lock: a hint)."""
        c = self._ref()
        return 0 if c is None else len(c._messages)

    def load(self) -> tuple[int, int]:
        """How many received messages wait for the view, and their bytes (``queued_size``).

        Only the view takes messages away, so a transport that is the only
        producer knows the queue has at least the room this snapshot leaves.
        """
        c = self._ref()
        if c is None:
            return 0, 0
        # Read without _cond: only the view takes messages away meanwhile, and
        # _pop lowers the count before the bytes, so whichever moment each read
        # sees, the snapshot never shows more room than there is.
        return len(c._messages), c._queued_bytes

    def listen(self, listener: Callable[[], object]) -> Callable[[], None]:
        """Call *listener* on every change of the queue or state; returns the undo."""
        c = self._ref()
        if c is None:
            return _nothing
        with c._cond:
            c._listeners = (*c._listeners, listener)
        return functools.partial(_unlisten, c, listener)  # smaller than a closure

    def begin_close(self) -> Transport | None:
        """Move to CLOSING; the transport to send the close frame on, if still open."""
        c = self._ref()
        if c is None:
            return None
        with c._cond:
            if c._state != OPEN:
                return None
            c._state = CLOSING
            self._target = None
            c._changed()  # a transport blocked on a full queue stops waiting
            return c._transport

    def closed_with(self, code: int, reason: str = "") -> None:
        """Record that the connection is closed; wakes every waiter, runs the close hooks once."""
        c = self._ref()
        if c is None:
            return
        with c._cond:
            first = c._state != CLOSED
            if first:
                c._state = CLOSED
                self._target = None
                c._close_code = code
                c._close_reason = reason
                hooks, c._close_hooks = c._close_hooks, ()
                admitted, c._admitted = c._admitted, False
                if code not in (1000, 1001):  # a drop: the page reconnects and sends them again
                    c._drop_numbered()
            c._changed()
        if first:
            if admitted:  # exactly once: _admitted is set once and cleared here, under _cond
                connections.give_back()
            for hook in hooks:
                hook(self)

    def on_close(self, hook: Callable[[Link], object]) -> bool:
        """Call *hook* (with this link) once the connection is closed.

        Returns ``False``, and registers nothing, if it is closed already: the
        caller then knows the hook will never run.
        """
        c = self._ref()
        if c is None:
            return False
        with c._cond:
            if c._state == CLOSED:
                return False
            if hook not in c._close_hooks:
                c._close_hooks = (*c._close_hooks, hook)
            return True

    def offer(self, frame: Frame) -> bool:
        """Hand a broadcast to the transport without waiting; ``False`` if it was not taken."""
        target = self._target  # read without _cond: see the class docstring
        return False if target is None else target.offer(frame)

    def __repr__(self) -> str:
        c = self._ref()
        return f"<Link {self.id} {CLOSED if c is None else c._state}>"


class _InSession:
    """What a broadcast is offered to on a ``dwebsocket.v1`` connection: its session, then its transport."""

    __slots__ = ("_session", "_transport")

    def __init__(self, session: Session, transport: Transport) -> None:
        self._session = session
        self._transport = transport

    def offer(self, frame: Frame) -> bool:
        return self._session.offer(frame, self._transport)


def _nothing() -> None:
    """The undo of a listener that was never added."""


def _unlisten(c: Connection, listener: Callable[[], object]) -> None:
    """The undo of :meth:`Link.listen`."""
    with c._cond:
        if listener in c._listeners:
            c._listeners = tuple(known for known in c._listeners if known is not listener)


def _inbound(c: Connection, message: Message) -> tuple[Message, int | None] | None:
    """*message* as the view gets it, and its number (dwebsocket.v1); ``None`` if it is not for the view."""
    session = c._session
    return (message, None) if session is None else session.inbound(message, c._transport)


def _copy(c: Connection, number: int | None) -> bool:
    """Whether message *number* is a copy of one already queued (the client sent it again); hold ``_cond``."""
    session = c._session
    return number is not None and session is not None and (number <= session.accepted or session.superseded)

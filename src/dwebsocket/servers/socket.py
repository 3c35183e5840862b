"""Drive a WebSocket over a socket that a WSGI server lent us, with wsproto.

wsproto does all of the protocol: framing, masking, fragmentation, UTF-8
checks, ping/pong, the closing handshake and permessage-deflate. This module
only moves bytes between it and the socket, and adds what a server needs to
stay alive: a message size limit, keepalive pings and a close timeout.

Threads: one reader thread per connection receives, answers pings and closes
*in the order frames arrive*; any thread may send. ``_lock`` guards the
wsproto connection and every write to the socket, so frames never interleave.
One timer thread per process (``_Timers``) sends every connection's keepalive
pings and ends connections whose client stopped answering, so that a reader
only ever blocks in ``recv()`` (one system call per read), and a connection
whose view is stuck writing to a client that reads nothing is still ended.
The socket itself belongs to the server: this module shuts it down when the
connection ends and never closes its file descriptor (the server does, once).
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections import deque

import wsproto
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Pong, TextMessage

from ..conf import Limits
from ..groups import Encoded
from ..connection import Connection
from ..connection import Message as MessageData

logger = logging.getLogger("dwebsocket")

_RECV_SIZE = 65536


class SocketTransport:
    """The transport of one connection over a blocking socket."""

    def __init__(
        self,
        sock: socket.socket,
        protocol: wsproto.WSConnection,
        connection: Connection,
        limits: Limits,
        compressed: bool = False,
    ) -> None:
        self._sock = sock
        self._compressed = compressed  # frames are per-connection deflated: no shared frames
        self._connection = connection
        self._limits = limits
        # Guarded by _lock: the wsproto state machine and writes to the socket.
        self._lock = threading.Lock()
        self._protocol = protocol
        self._close_sent_at: float | None = None
        # Owned by the reader thread.
        self._parts: list[str] | list[bytes] = []
        self._size = 0
        self._discarding = False
        # Written by the reader, read by the timer thread (plain floats and a
        # flag: a stale read only delays a ping or an expiry by one tick).
        self._last_seen = time.monotonic()
        self._ping_sent_at: float | None = None
        self._delivering = False  # the reader waits for room in the view's queue
        # Set once by the timer thread, before it shuts the socket down.
        self._expired: tuple[int, str] | None = None
        self.tick = _tick(limits)
        self._shutdown_lock = threading.Lock()
        self._is_shut_down = False
        self._reader = threading.Thread(
            target=self._read_loop, name="dwebsocket-reader", daemon=True
        )
        # Guarded by _outbox_cond: broadcasts waiting for the writer thread,
        # which starts with the first broadcast (see dwebsocket.groups).
        self._outbox_cond = threading.Condition()
        self._outbox: deque[Encoded] = deque()
        self._writer: threading.Thread | None = None
        self._ending = False

    def start(self) -> None:
        """Start reading frames."""
        self._reader.start()

    # -- called from any thread ----------------------------------------------

    def send(self, message: MessageData) -> bool:
        with self._lock:
            if self._protocol.state is not ConnectionState.OPEN:
                return False
            data = self._protocol.send(Message(data=message))  # type: ignore[type-var]
            if self._write(data):
                return True
        # The client is gone: say so now (close_code), not when the reader notices.
        self._connection._closed(*(self._expired or (1006, "")))
        return False

    def offer(self, encoded: Encoded) -> bool:
        with self._outbox_cond:
            if self._ending:
                return False
            if len(self._outbox) >= self._limits.broadcast_queue:
                overflow = True
            else:
                overflow = False
                self._outbox.append(encoded)
                self._outbox_cond.notify()
                if self._writer is None:
                    self._writer = threading.Thread(
                        target=self._write_loop, name="dwebsocket-writer", daemon=True
                    )
                    self._writer.start()
        if overflow:
            return self._overflow()
        return True

    def _overflow(self) -> bool:
        """The client fell WEBSOCKET_BROADCAST_QUEUE broadcasts behind."""
        if self._limits.broadcast_overflow == "close":
            # It is not reading, so no close frame could reach it either: drop
            # the connection, and tell the view why.
            self._connection._closed(1013, "too slow for the broadcasts")
            self._shutdown()
        return False

    def _write_loop(self) -> None:
        """Write queued broadcasts, in order; the only thread that waits on a slow client for them."""
        while True:
            with self._outbox_cond:
                while not self._outbox and not self._ending:
                    self._outbox_cond.wait()
                if self._ending:
                    return
                encoded = self._outbox.popleft()
            with self._lock:
                if self._protocol.state is not ConnectionState.OPEN:
                    return
                if self._compressed:
                    data = self._protocol.send(Message(data=encoded.message))  # type: ignore[type-var]
                else:
                    data = encoded.frame  # built once for every member of the broadcast
                if not self._write(data):
                    return

    async def asend(self, message: MessageData) -> bool:
        return self.send(message)  # a WSGI server's async view has an event loop of its own

    async def aclose(self, code: int, reason: str) -> None:
        self.close(code, reason)

    def close(self, code: int, reason: str) -> None:
        with self._lock:
            if self._protocol.state is ConnectionState.OPEN:
                self._close_sent_at = time.monotonic()
                self._write(self._protocol.send(CloseConnection(code=code, reason=reason)))

    def finish(self) -> None:
        """End the connection after the view returned: close, wait, shut down."""
        self.close(1000, "")
        self._reader.join(self._limits.close_timeout)
        self._shutdown()
        self._reader.join()

    # -- internals -----------------------------------------------------------

    def _write(self, data: bytes) -> bool:
        """Write *data*; call with ``_lock`` held. ``False`` if the peer is gone."""
        try:
            self._sock.sendall(data)
        except OSError:
            self._shutdown()
            return False
        return True

    def _shutdown(self) -> None:
        """Shut the socket down once; its file descriptor stays the server's to close."""
        with self._outbox_cond:
            self._ending = True
            self._outbox_cond.notify()
        with self._shutdown_lock:
            if self._is_shut_down:
                return
            self._is_shut_down = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _check_clock(self, now: float) -> None:
        """From the timer thread: ping a quiet client; end the connection once it is gone."""
        limits = self._limits
        if self._close_sent_at is not None and now - self._close_sent_at >= limits.close_timeout:
            self._expire(1006, "no answer to the close frame")
            return
        interval, timeout = limits.ping_interval, limits.ping_timeout
        if interval is None or self._delivering:
            return  # a reader waiting on the view is not a sign of a dead client
        sent = self._ping_sent_at
        if sent is not None:
            if timeout is not None and now - sent >= timeout:
                self._expire(1006, "no answer to the keepalive ping")
        elif now - self._last_seen >= interval:
            # The client has ping_timeout from now to send anything at all. If
            # a write is under way or the socket is full, the ping is not sent:
            # a client that reads nothing and says nothing is cut all the same.
            self._ping_sent_at = now
            if self._lock.acquire(blocking=False):
                try:
                    if self._protocol.state is ConnectionState.OPEN and _writable(self._sock):
                        self._write(self._protocol.send(Ping(payload=b"dwebsocket")))
                finally:
                    self._lock.release()

    def _expire(self, code: int, reason: str) -> None:
        """End the connection: the reader's recv() returns and reports *code*."""
        if self._expired is None:
            self._expired = (code, reason)
        self._shutdown()
        self._connection._closed(*self._expired)

    def _read_loop(self) -> None:
        code, reason = 1006, ""
        _timers.add(self)
        try:
            while True:
                data = self._sock.recv(_RECV_SIZE)
                self._last_seen = time.monotonic()
                self._ping_sent_at = None
                messages, ended = self._receive(data or None)
                if messages:
                    self._delivering = True
                    for message in messages:
                        self._connection._deliver(message)
                    self._delivering = False
                    self._last_seen = time.monotonic()
                if ended is not None:
                    code, reason = ended
                    break
        except OSError:
            pass
        except Exception:  # pragma: no cover - a bug in dwebsocket, not in the peer
            logger.exception("dwebsocket: the WebSocket reader failed")
            code, reason = 1011, ""
        finally:
            _timers.remove(self)
            self._shutdown()
            if self._expired is not None:
                code, reason = self._expired
            self._connection._closed(code, reason)

    def _receive(self, data: bytes | None) -> tuple[list[MessageData], tuple[int, str] | None]:
        """Feed *data* to wsproto and act on what it parsed, in order."""
        messages: list[MessageData] = []
        ended: tuple[int, str] | None = None
        with self._lock:
            protocol = self._protocol
            protocol.receive_data(data)
            out = bytearray()
            for event in protocol.events():
                if isinstance(event, (TextMessage, BytesMessage)):
                    message = self._collect(event)
                    if message is not None:
                        messages.append(message)
                    elif self._discarding and protocol.state is ConnectionState.OPEN:
                        self._close_sent_at = time.monotonic()
                        out += protocol.send(CloseConnection(code=1009, reason="message too big"))
                elif isinstance(event, Ping):
                    if protocol.state is ConnectionState.OPEN:
                        out += protocol.send(event.response())
                elif isinstance(event, Pong):
                    pass  # any traffic, pongs included, resets the keepalive clock
                elif isinstance(event, CloseConnection):
                    if protocol.state is ConnectionState.REMOTE_CLOSING:
                        out += protocol.send(event.response())  # the client closed first
                    elif protocol.state is ConnectionState.OPEN:
                        # wsproto found a protocol error: fail the connection.
                        reason = "message too big" if event.code == 1009 else event.reason
                        out += protocol.send(CloseConnection(code=event.code, reason=reason))
                        ended = event.code, reason or ""
                        break
                    ended = event.code, event.reason or ""
                    break
            if out:
                self._write(bytes(out))
        return messages, ended

    def _collect(self, event: TextMessage | BytesMessage) -> MessageData | None:
        """Add a piece of a message; return the message once it is complete."""
        data = event.data
        if not self._discarding:
            if isinstance(data, str):
                self._size += len(data) if data.isascii() else len(data.encode("utf-8"))
            else:
                self._size += len(data)
            limit = self._limits.max_message_size
            if limit is not None and self._size > limit:
                self._discarding = True
                self._parts = []
            else:
                self._parts.append(data)  # type: ignore[arg-type]
        if not event.message_finished:
            return None
        parts, self._parts, self._size = self._parts, [], 0
        if self._discarding:
            return None
        if isinstance(data, str):
            return "".join(parts)  # type: ignore[arg-type]
        return b"".join(parts)  # type: ignore[arg-type]


def _tick(limits: Limits) -> float:
    """How often the timer thread must look at a connection with these *limits*."""
    spans = [t for t in (limits.ping_interval, limits.ping_timeout, limits.close_timeout) if t]
    return max(0.02, min(1.0, min(spans) / 4)) if spans else 1.0


def _writable(sock: socket.socket) -> bool:
    """Whether a small frame can be written without waiting."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0))


class _Timers:
    """The one thread that keeps time for every connection of the process.

    It runs while there are connections, waking every ``tick`` (a quarter of
    the shortest ping interval, ping timeout or close timeout, at most 1 s).
    ``_lock`` guards ``_transports`` and ``_thread``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._transports: set[SocketTransport] = set()
        self._thread: threading.Thread | None = None

    def add(self, transport: SocketTransport) -> None:
        with self._lock:
            self._transports.add(transport)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dwebsocket-timers", daemon=True)
                self._thread.start()

    def remove(self, transport: SocketTransport) -> None:
        with self._lock:
            self._transports.discard(transport)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._transports:
                    self._thread = None
                    return
                transports = list(self._transports)
            now = time.monotonic()
            tick = 1.0
            for transport in transports:
                tick = min(tick, transport.tick)
                try:
                    transport._check_clock(now)
                except Exception:  # pragma: no cover - a bug in dwebsocket
                    logger.exception("dwebsocket: the keepalive timer failed")
            time.sleep(tick)


_timers = _Timers()

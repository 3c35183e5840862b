"""Drive a WebSocket over a socket that a WSGI server lent us, with websockets' sans-I/O protocol.

websockets does the protocol (``protocol.py``): framing, masking, ping/pong,
the closing handshake, the message size limit and permessage-deflate. This
module moves bytes between it and the socket, assembles messages from their
frames (checking a text message's UTF-8 as its frames come), and adds what a
server needs to stay alive: keepalive pings, a close timeout, the view's
queue limits.

Reading. A connection costs one thread, the view's. While the view waits
for a message (``wait()``, ``read()``) it reads its own socket, in its own
thread: a message goes from the socket to the view with no thread between.
While the view does anything else, the process's hub (``hub.py``) reads for
it, so pings are answered and a close is noticed all the same, and queues
what arrives. Whoever reads holds ``_read_lock``, which owns the parser's
input side (the message being assembled, what is parsed but found no room in
the view's queue, the end); the hub only ever *tries* it. Once a view reads,
the hub's interest in the socket stays off (no system call per message)
until the view has not read for ``_HAND_BACK`` seconds, which the hub notices
on its next tick; a view whose queue is full hands the socket back at once.
Under gevent the same holds with greenlets: the view's greenlet reads while
it waits, and the hub's gevent watcher starts a short-lived greenlet to read
while it does not. Where the hub cannot read at all (no ``epoll``, no
gevent), a reader thread per connection reads instead.

Writing. ``_lock`` guards the protocol object, every write to the socket
and the head of the outbox, so frames never interleave; any thread may send.
A view's ``send()`` writes and waits for the socket, as a blocking write
does. A broadcast never waits: it is written straight to the socket when the
socket takes it at once, and otherwise queued in the outbox, which the hub
writes out as the socket becomes writable. The hub also keeps every
connection's keepalive clock. Lock order: ``_read_lock`` before ``_lock``.

The socket itself belongs to the server: this module shuts it down when the
connection ends and never closes its file descriptor (the server does, once).
"""

from __future__ import annotations

import codecs
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from websockets.exceptions import PayloadTooBig
from websockets.frames import Frame as Received
from websockets.frames import Opcode
from websockets.protocol import Protocol, State

from ...connection import Link
from ... import metrics as _metrics
from ...messages import Frame
from ...messages import Message as MessageData
from .. import restart
from ..policy import OVERFLOW_CLOSE, RATE_CLOSE, Limits, Outbox, RateMeter, has_room, queued_size
from .hub import hub
from .protocol import ServerProtocol

__all__ = ["SocketTransport"]

logger = logging.getLogger("dwebsocket")

_RECV_SIZE = 65536
_LEFT_CHECK = 0.5  # seconds between two looks at a client, while its view's queue is full
_HAND_BACK = 0.05  # seconds without a read before the view's socket goes back to the hub
_TCP_ESTABLISHED = 1  # tcpi_state in Linux's struct tcp_info
# Bytes of a compressed connection fed to the protocol at a time: parsing stops
# once the view's queue is full, so what one feed inflates (about 1000 times
# its size at most, each message bounded by the size limit) stays small.
_DEFLATED_FEED = 1024
_OPEN, _CLOSED = State.OPEN, State.CLOSED
_DONTWAIT = socket.MSG_DONTWAIT
_TEXT, _BINARY, _CONT, _CLOSE = Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.CLOSE


class SocketTransport:
    """The transport of one connection over a blocking socket."""

    # Slots: an idle connection keeps this object, and with more than 29
    # attributes an instance __dict__ costs about 1.6 KiB (CPython stops sharing
    # its keys), slots about 8 bytes each. An attribute not listed here still
    # works (it goes into a __dict__ made on first use): list it here.
    # The first seven are what a broadcast reads of every member (offer()):
    # slots are laid out in this order, so they share a cache line or two.
    __slots__ = (
        "_lock", "_protocol", "_outbox", "_compressed", "_fd_nonblocking", "_sock", "_fd",
        "__dict__", "__weakref__", "_close_sent_at", "_decoder", "_delivering",
        "_ended", "_expired", "_is_shut_down", "_last_seen", "_limits",
        "_link", "_on_demand", "_parts", "_pending", "_ping_sent_at", "_poller",
        "_pumped_at", "_rate", "_read_lock", "_reader", "_refusing", "_restarting",
        "_unparsed", "_view_reads", "tick",
    )

    def __init__(
        self,
        sock: socket.socket,
        protocol: ServerProtocol,
        link: Link,
    ) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        # Under gevent the descriptor is non-blocking and os.write() never waits;
        # a blocking one is written without waiting with MSG_DONTWAIT.
        self._fd_nonblocking = not os.get_blocking(self._fd)
        self._compressed = bool(protocol.extensions)  # frames are deflated per connection: none shared
        self._link = link
        self._limits = limits = link.limits
        # Guarded by _lock: the protocol (protocol.py), writes to the socket, and
        # the head of the outbox (a frame the socket took in part: its rest).
        self._lock = threading.Lock()
        self._protocol = protocol
        self._close_sent_at: float | None = None
        # Whether the view's thread and the hub read (epoll shared with the
        # hub), or a reader of the connection's own (gevent).
        self._on_demand = hub.reads
        # Guarded by _read_lock (see the module's docstring): the message being
        # assembled, the parsed messages the view's queue had no room for, the
        # end. Parsing stops once a message finds no room (see _receive), so
        # _pending holds what one feed of the protocol parsed at most, and
        # _unparsed what the socket gave that the protocol is not fed yet.
        self._read_lock = threading.Lock()
        self._parts: list[str] | list[bytes] = _NONE  # a list only while a message comes in pieces
        self._decoder: Any = None  # a text message's UTF-8 decoder, while it comes in pieces
        self._pending: list[MessageData] = _NONE  # made when needed
        self._unparsed = b""
        self._rate = RateMeter(limits)
        self._refusing = False  # closed for WEBSOCKET_RATE_LIMIT: nothing more is delivered
        self._ended: tuple[int, str] | None = None
        # Whether the view's thread is the reader: the hub's interest in the
        # socket is off until the view stops reading for a tick (see check_clock).
        self._view_reads = False
        self._pumped_at = 0.0
        self._poller: select.poll | None = None
        # Written by readers, read by the hub (plain floats and a flag: a
        # stale read only delays a ping or an expiry by one tick).
        self._last_seen = time.monotonic()
        self._ping_sent_at: float | None = None
        self._delivering = False  # a reader waits for room in the view's queue
        # Set once by the hub, before it shuts the socket down.
        self._expired: tuple[int, str] | None = None
        # Set once when the server stops (restart.py): every close is then 1012.
        self._restarting = False
        self.tick = _tick(limits)
        self._is_shut_down = False
        self._reader = None if self._on_demand else threading.Thread(
            target=self._read_loop, name="dwebsocket-reader", daemon=True
        )
        # What the socket did not take at once: broadcasts (Frame) and the rest
        # of a frame written in part (bytes, always first). The outbox has its
        # own lock for the queue; taking from it happens under _lock.
        self._outbox: Outbox[Frame | bytes] = Outbox(limits, _outbox_size)

    def start(self) -> None:
        """Start reading frames (and keeping time, and writing what waits)."""
        hub.add(self, read=self._on_demand)
        restart.register(self)
        if self._reader is not None:
            self._reader.start()

    @property
    def pump(self) -> Callable[[float | None], None] | None:
        """How a view's thread reads for itself (see :meth:`_pump`); ``None`` if it cannot."""
        return self._pump if self._on_demand else None

    # -- called from any thread ----------------------------------------------

    def send(self, message: MessageData) -> bool:
        with self._lock:
            protocol = self._protocol
            if protocol.state is not _OPEN:
                return False
            # What waits goes first, and is framed first: on a compressed
            # connection the order of framing is the order of the deflate stream.
            if self._drain():
                if isinstance(message, str):
                    protocol.send_text(message.encode())
                else:
                    protocol.send_binary(message)
                if self._write(self._framed()):
                    return True
        # The client is gone: say so now (close_code), not when the reader notices.
        self._link.closed_with(*(self._expired or (1006, "")))
        return False

    def offer(self, frame: Frame) -> bool:
        # The hot path of a broadcast, once per member: few calls and
        # attribute reads (a broadcast to 1000 members runs it 1000 times).
        lock = self._lock
        if lock.acquire(False):
            try:
                if not self._protocol.is_open:
                    return False
                if self._outbox.is_empty():  # nothing waits before it: straight to the socket
                    data = self._frame(frame) if self._compressed else frame.data
                    sent = self._send_now(data)
                    if sent == len(data):
                        return True
                    if sent < 0:
                        self._shutdown()
                        return False
                    self._outbox.push_front(data[sent:])
                    hub.want_write(self)
                    return True
            finally:
                lock.release()
        verdict = self._outbox.offer(frame)
        if verdict == "queued":
            hub.want_write(self)
            return True
        if verdict == "overflow":
            self._cut()
        return False

    def flush(self) -> bool | None:
        """From the hub: write what waits without waiting (see :class:`hub.HubClient`)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            while True:
                item = self._outbox.peek()
                if item is None:
                    return True
                if isinstance(item, Frame) and self._protocol.state is not _OPEN:
                    self._outbox.take_all()  # closing: nothing goes after the close frame
                    return True
                data = item if isinstance(item, bytes) else self._frame(item)
                sent = self._send_now(data)
                if sent < 0:
                    self._outbox.take_all()
                    self._shutdown()
                    return True
                if sent < len(data):
                    self._outbox.replace_head(data[sent:])
                    return False
                _metrics.written(self._outbox.take())
        finally:
            self._lock.release()

    def fileno(self) -> int:
        """The socket's descriptor, or -1 once the connection is shut down."""
        return -1 if self._is_shut_down else self._fd

    def _cut(self) -> None:
        """The client is too slow for the broadcasts: close it with 1013 and let it go."""
        self._link.closed_with(*OVERFLOW_CLOSE)
        if self._lock.acquire(blocking=False):
            try:
                head = self._outbox.peek()
                if self._protocol.state is _OPEN and not isinstance(head, bytes):
                    # The close frame goes out if the socket takes it at once.
                    self._protocol.send_close(*OVERFLOW_CLOSE)
                    self._send_now(self._framed())
            finally:
                self._lock.release()
        self._shutdown()

    def _frame(self, frame: Frame) -> bytes:
        """The bytes of a broadcast for this client; call with ``_lock`` held."""
        if self._compressed:  # deflated with this connection's own context
            message = frame.message
            if isinstance(message, str):
                self._protocol.send_text(message.encode())
            else:
                self._protocol.send_binary(message)
            return self._framed()
        return frame.data  # built once for every member of the broadcast

    def _framed(self) -> bytes:
        """What the protocol framed since it was last asked; hold ``_lock``."""
        writes = self._protocol.data_to_send()
        return writes[0] if len(writes) == 1 else b"".join(writes)

    def _send_now(self, data: bytes) -> int:
        """Write what the socket takes without waiting; -1 if the peer is gone. Hold ``_lock``."""
        try:
            if self._fd_nonblocking:
                return os.write(self._fd, data)
            return self._sock.send(data, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            return -1

    def _drain(self) -> bool:
        """Write everything that waits, in order, waiting for the socket; hold ``_lock``."""
        if self._outbox.is_empty():  # the common case, without the outbox's lock
            return True
        while True:
            item = self._outbox.take()
            if item is None:
                return True
            data = item if isinstance(item, bytes) else self._frame(item)
            if not self._write(data):
                return False
            _metrics.written(item)

    def _finish_head(self) -> bool:
        """Write the rest of a frame the socket took in part, so another may follow; hold ``_lock``."""
        if self._outbox.is_empty():
            return True
        head = self._outbox.peek()
        if isinstance(head, bytes):
            self._outbox.take()
            return self._write(head)
        return True

    async def asend(self, message: MessageData) -> bool:
        return self.send(message)  # a WSGI server's async view has an event loop of its own

    async def aclose(self, code: int, reason: str) -> None:
        self.close(code, reason)

    def close(self, code: int, reason: str) -> None:
        if self._restarting:  # the server stops: whoever closes first says so
            code, reason = restart.RESTART_CLOSE
        with self._lock:
            if self._protocol.state is _OPEN:
                self._close_sent_at = time.monotonic()
                if self._drain():  # what was sent before the close arrives (and is framed) before it
                    self._protocol.send_close(code, reason)
                    self._write(self._framed())

    def begin_restart(self) -> None:
        """From restart.py's closer: the view sees 1012 now; the hub's clock ends the
        connection ``WEBSOCKET_CLOSE_TIMEOUT`` from now, whatever the client does
        (so a send stuck on a client that reads nothing lets go of ``_lock``)."""
        self._restarting = True
        if self._close_sent_at is None:
            self._close_sent_at = time.monotonic()
        self._link.closed_with(*restart.RESTART_CLOSE)

    def finish_restart(self) -> None:
        """From restart.py's closer: send the close frame (1012), after what is queued."""
        self.close(*restart.RESTART_CLOSE)

    def finish(self) -> None:
        """End the connection after the view returned: close, wait, shut down."""
        self.close(1000, "")
        deadline = time.monotonic() + self._limits.close_timeout
        if self._reader is not None:
            self._reader.join(self._limits.close_timeout)
            self._shutdown()
            self._reader.join()
            return
        if self._read_lock.acquire(timeout=self._limits.close_timeout):
            try:
                self._read_to_end(deadline)
            finally:
                self._read_lock.release()
        self._shutdown()
        with self._read_lock:
            if self._ended is None:
                self._end(1006, "")

    def _read_to_end(self, deadline: float) -> None:
        """After the view: read until the client answers the close frame; hold ``_read_lock``.

        What arrives meanwhile is dropped: nobody will read it, and it must
        neither fill memory nor keep this from reading the answer.
        """
        self._view_reads = True
        hub.disarm(self)
        self._pending = _NONE
        while self._ended is None:
            if self._unparsed:  # what the protocol is not fed yet first (the queue was full)
                _messages, ended = self._receive(None, feed=False)
            else:
                data = self._recv(deadline)
                if data is None:
                    return  # the deadline passed
                _messages, ended = self._receive(data or None)
            if ended is not None:
                self._end(*ended)

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
        self._outbox.close()
        self._outbox.take_all()  # nothing more is written: free what waited at once
        if self._is_shut_down:
            return
        # Unlocked: two threads may both get here, and a second shutdown() is harmless.
        self._is_shut_down = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def check_clock(self, now: float) -> None:
        """From the hub: ping a quiet client; end the connection once it is gone."""
        limits = self._limits
        if self._outbox.overflowed():
            self._cut()
            return
        if self._pending or self._unparsed:  # the view's queue was full: see whether it has room now
            self.on_readable(_peer_left(self._sock))
        elif self._view_reads:
            self._hand_back(now)
        if self._close_sent_at is not None and now - self._close_sent_at >= limits.close_timeout:
            self._expire(1006, "no answer to the close frame")
            return
        interval, timeout = limits.ping_interval, limits.ping_timeout
        if interval is None or self._delivering or self._pending or self._unparsed:
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
                    head = self._outbox.peek()
                    if self._protocol.state is _OPEN and not isinstance(head, bytes):
                        self._protocol.send_ping(b"dwebsocket")
                        ping = self._framed()
                        sent = self._send_now(ping)
                        if 0 <= sent < len(ping):
                            self._outbox.push_front(ping[sent:])
                            hub.want_write(self)
                finally:
                    self._lock.release()

    def _expire(self, code: int, reason: str) -> None:
        """End the connection: the reader's recv() returns and reports *code*."""
        if self._expired is None:
            self._expired = (code, reason)
        self._shutdown()
        self._link.closed_with(*self._expired)

    # -- reading -------------------------------------------------------------

    def _pump(self, deadline: float | None) -> None:
        """From the view's thread: read here until a message is queued, the end, or *deadline*.

        A *deadline* (``time.monotonic()``) already past reads only what has
        arrived. If the hub is reading at this moment, this waits for it (a
        non-blocking read of one buffer), then reads on.
        """
        if deadline is None:
            self._read_lock.acquire()
        elif not self._read_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return
        try:
            if self._ended is not None or self._link.queued():
                return  # the hub delivered while this thread waited for the lock
            if not self._view_reads:  # this thread reads now: the hub need not wake for it
                self._view_reads = True
                hub.disarm(self)
            if self._pending:
                self._queue_pending()
                if self._link.queued():
                    return  # what waited is the view's now
            while self._ended is None and not self._pending:
                if self._unparsed:  # what the protocol is not fed yet comes before any new read
                    if self._take(None):
                        return
                    continue
                data = self._recv(deadline)
                if data is None:
                    return
                if self._take(data):
                    return
        except Exception:  # pragma: no cover - a bug in dwebsocket, not in the peer
            logger.exception("dwebsocket: reading the WebSocket failed")
            self._end(1011, "")
        finally:
            # The view keeps reading (no syscall to re-arm the hub each message),
            # unless its queue is full: then the hub watches for a hang-up.
            stalled = self._ended is None and bool(self._pending)
            if stalled:
                self._view_reads = False
            self._pumped_at = time.monotonic()
            self._read_lock.release()
        if stalled:
            hub.arm(self, hangup_only=True)

    def _hand_back(self, now: float) -> None:
        """From the hub: a view that has not read for a while gives the socket back to the hub."""
        if now - self._pumped_at < _HAND_BACK or not self._read_lock.acquire(blocking=False):
            return  # reading right now, or just did
        try:
            handed = self._view_reads and self._ended is None
            self._view_reads = False
        finally:
            self._read_lock.release()
        if handed:
            hub.arm(self)

    def on_readable(self, hangup: bool) -> None:
        """From the hub: the socket has data (or the client hung up) while no view reads."""
        if not self._read_lock.acquire(blocking=False):
            return  # a view's thread reads: the hub gets the socket back when it stops
        try:
            if self._ended is not None or self._view_reads:
                return
            if self._pending and not self._queue_pending():
                if hangup:  # the view is behind and its client left: let it go
                    self._end(1006, "")
                return
            if self._unparsed:  # the view made room: feed the protocol what waits first
                self._take(None)
            else:
                data = self._recv(0.0)
                if data is not None:
                    self._take(data)
        except Exception:  # pragma: no cover - a bug in dwebsocket, not in the peer
            logger.exception("dwebsocket: reading the WebSocket failed")
            self._end(1011, "")
        finally:
            rearm = self._ended is None and not self._view_reads
            stalled = bool(self._pending or self._unparsed)
            self._read_lock.release()
        if rearm:
            hub.arm(self, hangup_only=stalled)

    def _recv(self, deadline: float | None) -> bytes | None:
        """What the socket has: ``b""`` once the client is gone, ``None`` if *deadline* passed first."""
        try:
            if deadline is None:
                return self._sock.recv(_RECV_SIZE)
            remaining = deadline - time.monotonic()
            if remaining > 0:
                if self._poller is None:
                    self._poller = select.poll()
                    self._poller.register(self._fd, select.POLLIN)
                if not self._poller.poll(remaining * 1000):
                    return None
            if self._fd_nonblocking:  # gevent's recv() would wait for data: read the descriptor
                return os.read(self._fd, _RECV_SIZE)
            return self._sock.recv(_RECV_SIZE, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""

    def _take(self, data: bytes | None) -> bool:
        """Parse *data* (``b""``: the client is gone; ``None``: only what waits unfed) and queue
        what it completes; hold ``_read_lock``. Whether anything came of it."""
        if data is not None:
            self._last_seen = time.monotonic()
            self._ping_sent_at = None
        messages, ended = self._receive(data or None, feed=data is not None)
        for message in messages:
            if self._pending or not self._link.deliver_nowait(message):
                if self._pending is _NONE:
                    self._pending = []
                self._pending.append(message)  # the view's queue is full: stop reading
        if ended is not None:
            self._end(*ended)
        return bool(messages) or ended is not None

    def _queue_pending(self) -> bool:
        """Move parsed messages into the view's queue while it has room; whether all went."""
        while self._pending:
            if not self._link.deliver_nowait(self._pending[0]):
                return False
            self._pending.pop(0)
        if not self._pending:
            self._pending = _NONE
        return True

    def _end(self, code: int, reason: str) -> None:
        """The connection is over: let the hub forget it, shut the socket, report. Hold ``_read_lock``."""
        if self._ended is not None:
            return
        self._ended = code, reason
        hub.remove(self)
        restart.unregister(self)
        self._shutdown()
        self._pending = _NONE  # nobody will take them: free them now
        self._unparsed = b""
        if self._expired is not None:
            code, reason = self._expired
        self._link.closed_with(code, reason)

    def _read_loop(self) -> None:
        """The reader of a connection the hub cannot read for (gevent): blocks in ``recv()``."""
        code, reason = 1006, ""
        try:
            while True:
                if self._unparsed:  # what the protocol is not fed yet comes before any new read
                    messages, ended = self._receive(None, feed=False)
                else:
                    data = self._sock.recv(_RECV_SIZE)
                    self._last_seen = time.monotonic()
                    self._ping_sent_at = None
                    messages, ended = self._receive(data or None)
                if messages:
                    self._delivering = True
                    for message in messages:
                        while not self._link.deliver(message, timeout=_LEFT_CHECK):
                            if _peer_left(self._sock):  # the view is behind and its client left
                                raise ConnectionResetError
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
            with self._read_lock:
                self._end(code, reason)

    def _receive(
        self, data: bytes | None, feed: bool = True
    ) -> tuple[list[MessageData], tuple[int, str] | None]:
        """Feed the protocol *data* (``None``: the end) and act on what it parsed, in order.

        With *feed* false, only feed what waits in ``_unparsed``. Feeding
        stops once a complete message finds no room in the view's queue
        (WEBSOCKET_MAX_QUEUE, WEBSOCKET_MAX_QUEUE_BYTES, by a snapshot taken
        first: only the view takes messages away, so the room only grows):
        the rest waits in ``_unparsed``, as the socket gave it. A compressed
        connection is fed ``_DEFLATED_FEED`` bytes at a time, so a few
        kilobytes of deflate cannot inflate into many messages at once.
        """
        messages: list[MessageData] = []
        ended: tuple[int, str] | None = None
        limits = self._limits
        count, size = self._link.load()
        with self._lock:
            protocol = self._protocol
            if protocol.state is _CLOSED:
                self._unparsed = b""
                return messages, (1006, "")  # bytes after the closing handshake: nothing to read
            if feed and data is not None and self._unparsed:
                data = self._unparsed + data
            elif not feed:
                data = self._unparsed
            self._unparsed = b""
            if data is None:
                protocol.receive_eof()
                data = b""
            step = _DEFLATED_FEED if self._compressed else len(data)
            fed = 0
            full = False
            while True:
                if data:
                    protocol.receive_data(data if step >= len(data) else data[fed:fed + step])
                    fed += step
                events: list[Any] = protocol.events_received()  # frames only, past the handshake
                for frame in events:
                    opcode = frame.opcode
                    if opcode is _TEXT or opcode is _BINARY or opcode is _CONT:
                        try:
                            message = self._collect(frame)
                        except UnicodeDecodeError:
                            protocol.fail(1007, "invalid UTF-8")
                            ended = 1007, "invalid UTF-8"
                            break
                        if message is None or self._refusing:
                            continue  # a piece, or closed for the rate limit: only the client's answer counts now
                        if not self._rate.allow():
                            self._refusing = True
                            if protocol.state is _OPEN:
                                self._close_sent_at = time.monotonic()
                                protocol.send_close(*RATE_CLOSE)
                            continue
                        messages.append(message)
                        adding = queued_size(message)
                        if not has_room(count, size, adding, limits.max_queue, limits.max_queue_bytes):
                            full = True  # this one waits in _pending; what is not fed yet, in _unparsed
                        count, size = count + 1, size + adding
                    elif opcode is _CLOSE:  # the protocol echoed it if the client closed first
                        close = protocol.close_rcvd
                        ended = (close.code, close.reason) if close is not None else (1005, "")
                        break
                    # pings are answered by the protocol; any traffic resets the keepalive clock
                if ended is None and protocol.parser_exc is not None:
                    ended = _failure(protocol)
                if full or ended is not None or fed >= len(data):
                    break
            if fed < len(data) and ended is None:
                self._unparsed = data[fed:]
            out = protocol.data_to_send()
            if out:
                out_bytes = out[0] if len(out) == 1 else b"".join(out)
                if out_bytes and self._finish_head():
                    self._write(out_bytes)
        return messages, ended

    def _collect(self, frame: Received) -> MessageData | None:
        """Add a frame of a message; return the message once it is complete.

        Raises ``UnicodeDecodeError`` as soon as a text message's frames are
        not UTF-8. The protocol refused any message over the size limit.
        """
        if frame.opcode is not _CONT:
            if frame.fin:  # a message in one frame: no list
                return str(frame.data, "utf-8") if frame.opcode is _TEXT else bytes(frame.data)
            self._parts = []
            self._decoder = _utf8_decoder() if frame.opcode is _TEXT else None
        decoder = self._decoder
        self._parts.append(decoder.decode(frame.data, frame.fin) if decoder else bytes(frame.data))  # type: ignore[arg-type]
        if not frame.fin:
            return None
        parts, self._parts, self._decoder = self._parts, _NONE, None
        if decoder is not None:
            return "".join(parts)  # type: ignore[arg-type]
        return b"".join(parts)  # type: ignore[arg-type]


def _failure(protocol: Protocol) -> tuple[int, str]:
    """What the view sees when the protocol failed the connection (its close frame is sent)."""
    error = protocol.parser_exc
    if isinstance(error, PayloadTooBig):
        return 1009, "message too big"
    close = protocol.close_sent
    if close is None or isinstance(error, EOFError):  # the client is gone: no close frame
        return 1006, ""
    return close.code, close.reason


_utf8_decoder = codecs.getincrementaldecoder("utf-8")


# The empty pending list and parts list of every connection: a tuple, never
# appended to (a connection makes a list of its own when it needs one).
_NONE: Any = ()


def _outbox_size(item: Frame | bytes) -> int:
    """What an item of the outbox counts against WEBSOCKET_MAX_QUEUE_BYTES."""
    return len(item) if isinstance(item, bytes) else item.size


def _peer_left(sock: socket.socket) -> bool:
    """Whether the client ended the TCP connection, even with data we have not read yet."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
    except (OSError, AttributeError):  # not TCP, or no TCP_INFO here
        return False
    return bool(info) and info[0] != _TCP_ESTABLISHED


def _tick(limits: Limits) -> float:
    """How often the hub must look at a connection with these *limits*."""
    spans = [t for t in (limits.ping_interval, limits.ping_timeout, limits.close_timeout) if t]
    return max(0.02, min(1.0, min(spans) / 4)) if spans else 1.0

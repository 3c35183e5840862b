"""The process's one I/O thread for WSGI connections: keepalive clocks and queued writes.

Every connection's reader blocks in ``recv()`` in a thread of its own; what
no connection's own thread can do is done here, for all of them, by one
thread (a greenlet under gevent):

* **time**: every ``tick`` (a quarter of the shortest ping interval, ping
  timeout or close timeout, at most 1 s) it sends keepalive pings and ends
  connections whose client stopped answering;
* **queued writes**: a broadcast is written straight to a member's socket by
  the broadcasting thread when the socket takes it at once; what it does not
  take waits in the member's outbox, and the hub writes it as the socket
  becomes writable, so no broadcaster ever waits for a slow member.

``_lock`` guards ``_transports``, ``_wanted`` and ``_thread``; the selector
is touched by the hub's own thread only. The hub never waits for a
connection's lock: a busy connection is tried again a moment later.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from typing import Protocol

__all__ = ["Hub", "HubClient", "hub"]

logger = logging.getLogger("dwebsocket")

_RETRY = 0.002  # seconds before a connection whose lock was busy is tried again


class HubClient(Protocol):
    """What the hub needs from a connection's transport."""

    #: Seconds between two looks at this connection's clocks.
    tick: float

    def fileno(self) -> int:
        """The socket's file descriptor, or -1 once it is shut down."""

    def check_clock(self, now: float) -> None:
        """Ping a quiet client; end the connection once the client is gone."""

    def flush(self) -> bool | None:
        """Write what the outbox holds without waiting: True when empty, False when
        the socket is full, None when the connection's lock is busy (try again)."""


class Hub:
    """The one thread that keeps time and drains outboxes for every WSGI connection."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._transports: set[HubClient] = set()
        self._wanted: set[HubClient] = set()  # connections with queued writes
        self._thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None

    def add(self, transport: HubClient) -> None:
        """Keep time for *transport* until :meth:`remove`."""
        with self._lock:
            self._transports.add(transport)
            self._start()

    def remove(self, transport: HubClient) -> None:
        with self._lock:
            self._transports.discard(transport)
            self._wanted.discard(transport)

    def want_write(self, transport: HubClient) -> None:
        """*transport* has queued writes: write them as its socket becomes writable."""
        with self._lock:
            if transport in self._wanted or transport not in self._transports:
                return
            self._wanted.add(transport)
            wake = self._wake_w
        if wake is not None:
            try:
                wake.send(b"\0", socket.MSG_DONTWAIT)
            except OSError:  # the wake-up pipe is full: the hub is awake anyway
                pass

    def _start(self) -> None:
        """Start the thread if it is not running; call with ``_lock`` held."""
        if self._thread is None:
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._thread = threading.Thread(target=self._run, name="dwebsocket-hub", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        wake = self._wake_r
        assert wake is not None
        selector.register(wake, selectors.EVENT_READ)
        blocked: dict[int, HubClient] = {}  # socket full: waiting for the selector
        retry: set[HubClient] = set()  # lock busy: tried again after _RETRY
        next_tick = time.monotonic()
        try:
            while True:
                with self._lock:
                    if not self._transports:
                        self._thread = None
                        self._wake_r = self._wake_w = None
                        break
                    fresh, self._wanted = self._wanted, set()
                    tick = min(t.tick for t in self._transports)
                todo, retry = fresh | retry, set()
                for transport in todo:
                    self._try(transport, selector, blocked, retry)
                now = time.monotonic()
                if now >= next_tick:
                    live = self._clocks(now)
                    for fd, transport in list(blocked.items()):
                        if transport not in live:  # ended while its socket was full
                            selector.unregister(fd)
                            del blocked[fd]
                    next_tick = now + tick
                timeout = max(0.0, next_tick - time.monotonic())
                if retry:
                    timeout = min(timeout, _RETRY)
                for key, _events in selector.select(timeout):
                    if key.fileobj is wake:
                        try:
                            while wake.recv(4096):
                                pass
                        except OSError:
                            pass
                    else:
                        found = blocked.get(key.fd)
                        if found is not None:
                            self._try(found, selector, blocked, retry)
        finally:
            selector.close()
            wake.close()
            # The writing end is closed by the garbage collector once nobody holds it.

    def _try(
        self,
        transport: HubClient,
        selector: selectors.BaseSelector,
        blocked: dict[int, HubClient],
        retry: set[HubClient],
    ) -> None:
        """Flush *transport*; keep it blocked, retried or neither, as the flush says."""
        state = self._flush(transport)
        fd = transport.fileno()
        registered = blocked.get(fd) is transport
        if registered and state is not False:
            selector.unregister(fd)
            del blocked[fd]
        if fd < 0:
            return
        if state is None:
            retry.add(transport)
        elif state is False and not registered:
            if fd in blocked:  # a stale entry: the descriptor was reused
                selector.unregister(fd)
            selector.register(fd, selectors.EVENT_WRITE)
            blocked[fd] = transport

    def _flush(self, transport: HubClient) -> bool | None:
        try:
            return transport.flush()
        except Exception:  # pragma: no cover - a bug in dwebsocket
            logger.exception("dwebsocket: writing a queued broadcast failed")
            return True

    def _clocks(self, now: float) -> set[HubClient]:
        """Look at every connection's clocks; the connections still kept."""
        with self._lock:
            transports = set(self._transports)
        for transport in transports:
            try:
                transport.check_clock(now)
            except Exception:  # pragma: no cover - a bug in dwebsocket
                logger.exception("dwebsocket: the keepalive timer failed")
        return transports


#: The hub of this process.
hub = Hub()

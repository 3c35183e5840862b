"""The process's one I/O thread for WSGI connections: reads, keepalive clocks and queued writes.

A connection's view reads its own socket while it waits for a message (see
``transport.py``); what no view's thread can do is done here, for every
connection, by one thread (a greenlet under gevent):

* **reads while no view waits**: each socket is in an ``epoll`` set with
  ``EPOLLONESHOT``, armed while nobody reads it; when it fires the hub reads
  what arrived without waiting and queues it for the view. Under gevent,
  which removes ``epoll``, each socket has a gevent I/O watcher instead,
  started while nobody reads it; when it fires, a short-lived greenlet reads.
  Where neither exists, :attr:`Hub.reads` is false and each connection has a
  reader thread of its own;

* **time**: every ``tick`` (a quarter of the shortest ping interval, ping
  timeout or close timeout, at most 1 s) it sends keepalive pings and ends
  connections whose client stopped answering;
* **queued writes**: a broadcast is written straight to a member's socket by
  the broadcasting thread when the socket takes it at once; what it does not
  take waits in the member's outbox, and the hub writes it as the socket
  becomes writable, so no broadcaster ever waits for a slow member.

``_lock`` guards ``_transports``, ``_ticks``, ``_readable`` (and its
reverse, ``_read_fds``), ``_wanted``, ``_thread`` and ``_epoll``'s lifetime; the selector is touched by the hub's own thread
only, the ``epoll`` set (thread-safe in the kernel) by any thread. The hub never waits for a
connection's lock: a busy connection is tried again a moment later.
"""

from __future__ import annotations

import logging
import select
import selectors
import socket
import sys
import threading
import time
from typing import Any, Protocol

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

    def on_readable(self, hangup: bool) -> None:
        """Read what arrived without waiting (*hangup*: the client shut its side)."""


_ARMED = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT if hasattr(select, "EPOLLIN") else 0
_HANGUP_ONLY = select.EPOLLRDHUP | select.EPOLLONESHOT if hasattr(select, "EPOLLIN") else 0
_HUNG_UP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR if hasattr(select, "EPOLLIN") else 0


class Hub:
    """The one thread that keeps time and drains outboxes for every WSGI connection."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._transports: set[HubClient] = set()
        # tick -> how many of _transports have it: the shortest, without a pass over them all.
        self._ticks: dict[float, int] = {}
        self._wanted: set[HubClient] = set()  # connections with queued writes
        self._readable: dict[int, HubClient] = {}  # fd -> connection read by the hub
        self._read_fds: dict[HubClient, int] = {}  # the reverse, so a connection leaves in O(1)
        self._watchers: dict[HubClient, Any] = {}  # under gevent: connection -> its I/O watcher
        self._thread: threading.Thread | None = None
        self._epoll: select.epoll | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None

    @property
    def reads(self) -> bool:
        """Whether the hub can read for connections (``epoll``, or gevent's loop)."""
        return hasattr(select, "epoll") or _gevent_loop() is not None

    def add(self, transport: HubClient, read: bool = False) -> None:
        """Keep time for *transport* until :meth:`remove`; with *read*, read it while no view does."""
        with self._lock:
            if transport not in self._transports:
                self._transports.add(transport)
                self._ticks[transport.tick] = self._ticks.get(transport.tick, 0) + 1
            self._start()
            if not read:
                return
            loop = _gevent_loop()
            if loop is not None:
                watcher = loop.io(transport.fileno(), 1)  # 1: readable
                self._watchers[transport] = watcher
                watcher.start(self._gevent_ready, transport, watcher)
            elif self._epoll is not None:
                fd = transport.fileno()
                self._readable[fd] = transport
                self._read_fds[transport] = fd
                self._epoll.register(fd, _ARMED)

    def remove(self, transport: HubClient) -> None:
        with self._lock:
            if transport in self._transports:
                self._transports.discard(transport)
                left = self._ticks[transport.tick] - 1
                if left:
                    self._ticks[transport.tick] = left
                else:
                    del self._ticks[transport.tick]
            self._wanted.discard(transport)
            watcher = self._watchers.pop(transport, None)
            if watcher is not None:
                watcher.stop()
                watcher.close()
            fd = self._read_fds.pop(transport, None)
            if fd is not None and self._readable.get(fd) is transport:
                del self._readable[fd]
                if self._epoll is not None:
                    try:
                        self._epoll.unregister(fd)
                    except OSError:  # the descriptor is closed already
                        pass

    def arm(self, transport: HubClient, hangup_only: bool = False) -> None:
        """Wake for *transport*'s socket once (data, or with *hangup_only* only a hang-up).

        gevent's watchers cannot wait for a hang-up alone: there the clock
        looks at a stalled connection's TCP state instead.
        """
        watcher = self._watchers.get(transport)
        if watcher is not None:
            if not hangup_only and not watcher.active:
                watcher.start(self._gevent_ready, transport, watcher)
            return
        self._modify(transport, _HANGUP_ONLY if hangup_only else _ARMED)

    def disarm(self, transport: HubClient) -> None:
        """A view's thread reads *transport* now: do not wake for it."""
        watcher = self._watchers.get(transport)
        if watcher is not None:
            watcher.stop()
            return
        self._modify(transport, 0)

    def _gevent_ready(self, transport: HubClient, watcher: Any) -> None:
        """In gevent's hub, which must not block: read in a greenlet of its own, once."""
        watcher.stop()
        import gevent

        gevent.spawn(self._read_one, transport, False)

    def _read_one(self, transport: HubClient, hangup: bool) -> None:
        try:
            transport.on_readable(hangup)
        except Exception:  # pragma: no cover - a bug in dwebsocket
            logger.exception("dwebsocket: reading a WebSocket failed")

    def _modify(self, transport: HubClient, events: int) -> None:
        epoll, fd = self._epoll, transport.fileno()
        if epoll is None or fd < 0:
            return
        try:
            epoll.modify(fd, events)
        except (OSError, ValueError):  # forgotten meanwhile, or the hub stopped: nothing to arm
            pass

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
            self._epoll = select.epoll() if hasattr(select, "epoll") else None
            self._thread = threading.Thread(target=self._run, name="dwebsocket-hub", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        wake = self._wake_r
        assert wake is not None
        selector.register(wake, selectors.EVENT_READ)
        epoll = self._epoll
        if epoll is not None:
            selector.register(epoll.fileno(), selectors.EVENT_READ)
        blocked: dict[int, HubClient] = {}  # socket full: waiting for the selector
        retry: set[HubClient] = set()  # lock busy: tried again after _RETRY
        next_tick = time.monotonic()
        try:
            while True:
                with self._lock:
                    if not self._transports:
                        self._thread = None
                        self._wake_r = self._wake_w = None
                        self._epoll = None
                        self._readable.clear()
                        self._read_fds.clear()
                        break
                    fresh, self._wanted = self._wanted, set()
                    tick = min(self._ticks)
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
                    if epoll is not None and key.fd == epoll.fileno():
                        self._read(epoll)
                    elif key.fileobj is wake:
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
            if epoll is not None:
                epoll.close()
            # The writing end is closed by the garbage collector once nobody holds it.

    def _read(self, epoll: select.epoll) -> None:
        """Let every connection whose socket fired read what it has."""
        for fd, events in epoll.poll(0):
            transport = self._readable.get(fd)  # one dict lookup: atomic, no lock needed
            if transport is not None:
                self._read_one(transport, bool(events & _HUNG_UP))

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


def _gevent_loop() -> Any:
    """gevent's event loop, when gevent has patched this process's sockets; else ``None``."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("socket"):
        return None
    import gevent

    return gevent.get_hub().loop


#: The hub of this process.
hub = Hub()

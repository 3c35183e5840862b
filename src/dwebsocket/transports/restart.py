"""Close this process's open connections with 1012 (service restart) when its server stops.

A deploy stops a server process with ``SIGTERM``. Without this module a
WebSocket view blocked in ``wait()`` never returns, so gunicorn waits its
whole graceful timeout and then drops every connection without a close frame
(1006), and a long poll keeps uvicorn waiting until it times out. With it,
every open connection (WebSocket under WSGI or ASGI, and polling session) is
closed with **1012, "service restart"**: the client learns that it may
reconnect at once (``dwebsocket.js`` does, with a random delay), the view's
``wait()`` returns ``None`` with ``close_code`` 1012, the view returns, and the
server, which waits for its connections, exits within
``WEBSOCKET_CLOSE_TIMEOUT``.

How a stop is noticed, with nothing for the user to configure:

* ``SIGTERM``: :func:`install` puts :func:`_on_signal` in front of whatever
  handler is there (gunicorn's worker, uvicorn, ...), which it then calls.
  Python lets only the main thread set a handler, so :func:`install` runs when
  the app is ready (``AppConfig.ready()``, in the main thread under gunicorn,
  uvicorn and hypercorn's workers) and again each time a connection opens in
  the main thread (an ASGI server's event loop), since some servers install
  their own handler after loading the app (hypercorn ``--workers 0``, daphne).
  When the handler it displaces is the default one (the process would just
  die), it restores it and, once the connections are closed, sends the
  process ``SIGTERM`` again.
* hypercorn's worker processes get no signal: their parent sets a
  ``multiprocessing`` event, which a thread of the worker watches
  (:func:`_watch_hypercorn_worker`).
* uWSGI's workers in gevent mode get their signals through gevent signal
  watchers (uWSGI's, not Python handlers): dwebsocket adds a watcher of its
  own for ``SIGHUP``, ``SIGINT`` and ``SIGTERM``
  (:func:`_watch_uwsgi_gevent_worker`). A graceful reload (``SIGHUP``) then
  closes every connection with 1012; a stop ends the worker before the
  closer runs. uWSGI's threaded workers handle every signal in C: nothing
  reaches Python there.
* The process exiting (Python's exit hooks, before it joins the remaining
  threads): Django's autoreloader ends ``runserver``
  with ``sys.exit()``, and any process that exits with connections still open
  closes them on its way out, waiting up to ``WEBSOCKET_CLOSE_TIMEOUT``.

Concurrency. ``_lock`` (with ``_changed``, its condition) guards ``_open``,
the connections to close, and the closer's start. The signal handler takes
no lock (the main thread it interrupts may hold any): it sets ``_stopping``
and writes one byte to the closer's wake-up socket. The closer is a daemon
thread (a greenlet under gevent), started with the first connection and
blocked on that socket until a stop; it closes every connection in two
passes, so that a client too slow to take its close frame delays no other:
first :meth:`Restartable.begin_restart` for each (no waiting: the view sees
1012 from now on, and the connection's own clock ends it
``WEBSOCKET_CLOSE_TIMEOUT`` from now whatever the client does), then
:meth:`Restartable.finish_restart` (the close frame, which may wait for the
socket). A connection that opens while the process stops is closed the same
way at once.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from types import FrameType
from collections.abc import Callable
from typing import Any, Protocol

from .. import conf
from .. import metrics as _metrics

__all__ = ["RESTART_CLOSE", "Restartable", "install", "on_first_connection", "register", "stopping", "unregister"]

logger = logging.getLogger("dwebsocket")

#: The close code and reason of every connection when its server stops.
RESTART_CLOSE = (1012, "service restart")

_EXIT_GRACE = 0.5  # seconds past WEBSOCKET_CLOSE_TIMEOUT that a process exiting waits at most
# Seconds a process that ends itself waits after its last connection closed: a
# polling session counts as closed once its close is queued, and the poll in
# flight that takes it must still be answered and written.
_EXIT_LINGER = 0.25
_HYPERCORN_POLL = 0.1  # seconds between two looks at hypercorn's shutdown event (as hypercorn's own)


class Restartable(Protocol):
    """A connection's transport, as the closer sees it."""

    def begin_restart(self) -> None:
        """Close with 1012 as far as the view is concerned, without waiting for anything."""

    def finish_restart(self) -> None:
        """Send the client the close frame (1012); may wait for the client, never past the close timeout."""


_lock = threading.Lock()
_changed = threading.Condition(_lock)  # notified when a connection leaves _open
_open: set[Restartable] = set()  # guarded by _lock
_wake_r: socket.socket | None = None  # the closer's end; guarded by _lock
# Read by the signal handler without a lock: set once, under _lock, before the closer starts.
_wake_fd = -1
_stopping = False  # set once (by the handler, the hypercorn watcher, or at exit)
_exit_when_done = False  # the displaced SIGTERM handler was the default: die once closed
_closed_for_exit = False  # set by the closer when it is done waiting, just before it sends SIGTERM
_previous: Any = None  # the SIGTERM handler _on_signal displaced (main thread only)
_first_hooks: list[Callable[[], object]] = []  # set up by the app when it is ready, read-only afterwards


def stopping() -> bool:
    """Whether this process was told to stop (its connections close with 1012)."""
    return _stopping


def register(transport: Restartable) -> None:
    """*transport*'s connection is open: close it with 1012 when the process stops.

    Called from the thread that opened it; cheap. Starts the closer with the
    first connection, and closes *transport* at once if the process is stopping.
    """
    install()
    with _lock:
        _open.add(transport)
        _metrics.connection_opened(transport)
        first = _wake_r is None
        if first:
            _start_closer()
    if first:
        for hook in _first_hooks:  # in a thread: a hook may wait (for Redis), and this may be an event loop
            threading.Thread(target=hook, name="dwebsocket-first-connection", daemon=True).start()
    if _stopping:
        _wake()


def on_first_connection(hook: Callable[[], object]) -> None:
    """Call *hook* (in a thread of its own) when this process's first connection opens.

    The app starts the Redis broker this way, so that every serving process
    publishes its status record (``manage.py websocket_status``) even before
    any of its connections joins a group; not at start-up, where a server that
    forks its workers afterwards (gunicorn ``--preload``) would lose the thread.
    """
    if hook not in _first_hooks:
        _first_hooks.append(hook)


def unregister(transport: Restartable) -> None:
    """*transport*'s connection is over; idempotent."""
    with _lock:
        if transport in _open:
            _open.discard(transport)
            _metrics.connection_closed(transport)
            _changed.notify_all()


def install() -> None:
    """Call :func:`_on_signal` on SIGTERM, before the handler there now; idempotent.

    Does nothing outside the main thread (where Python refuses to set a
    handler), and leaves alone a SIGTERM that is ignored or handled outside
    Python.
    """
    global _previous
    try:
        current = signal.getsignal(signal.SIGTERM)
        if current is _on_signal or current is signal.SIG_IGN or current is None:
            return
        signal.signal(signal.SIGTERM, _on_signal)
    except ValueError:  # not the main thread
        return
    _previous = current


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """SIGTERM: start closing every connection, then do what the displaced handler does."""
    global _exit_when_done
    previous = _previous
    if previous is signal.SIG_DFL:
        # The process would die now: it dies once its connections are closed,
        # at most WEBSOCKET_CLOSE_TIMEOUT later, when the closer sends SIGTERM
        # again. A SIGTERM meanwhile (a process group signalled twice) changes
        # nothing; SIGKILL still ends it at once.
        if _wake_fd < 0 or _closed_for_exit:  # nothing to wait for, or done waiting
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        _exit_when_done = True
    _begin()
    if callable(previous):
        previous(signum, frame)


def _begin() -> None:
    """Start closing every connection; safe in a signal handler (no lock, no waiting)."""
    global _stopping
    _stopping = True
    _wake()


def _wake() -> None:
    fd = _wake_fd
    if fd >= 0:
        try:
            os.write(fd, b"\0")
        except OSError:  # full (the closer is awake anyway) or closed
            pass


def _start_closer() -> None:
    """Start the closer and its wake-up socket; call with ``_lock`` held."""
    global _wake_r, _wake_fd
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    _wake_r = reader
    _wake_fd = writer.fileno()
    _keep.append(writer)  # the signal handler writes to its descriptor: never collected
    threading.Thread(target=_closer, args=(reader,), name="dwebsocket-restart", daemon=True).start()
    _watch_hypercorn_worker()
    _watch_uwsgi_gevent_worker()


_keep: list[socket.socket] = []


def _closer(wake: socket.socket) -> None:
    """The closer's loop: each wake-up after a stop closes what is open."""
    while True:
        try:
            if not wake.recv(4096):
                return
        except OSError:
            return
        if not _stopping:
            continue
        close_all()
        if _exit_when_done:
            global _closed_for_exit
            _wait_closed(conf.get("WEBSOCKET_CLOSE_TIMEOUT") + _EXIT_GRACE)
            time.sleep(_EXIT_LINGER)
            _closed_for_exit = True
            os.kill(os.getpid(), signal.SIGTERM)  # _on_signal, in the main thread, ends the process
            return


def close_all() -> None:
    """Close every open connection with 1012, in two passes (see the module's docstring)."""
    with _lock:
        transports = list(_open)
    for transport in transports:
        try:
            transport.begin_restart()
        except Exception:  # pragma: no cover - a bug in dwebsocket
            logger.exception("dwebsocket: closing a connection for a restart failed")
    for transport in transports:
        try:
            transport.finish_restart()
        except Exception:  # pragma: no cover - a bug in dwebsocket
            logger.exception("dwebsocket: closing a connection for a restart failed")


def _wait_closed(timeout: float) -> None:
    """Wait until no connection is open, at most *timeout* seconds."""
    deadline = time.monotonic() + timeout
    with _lock:
        while _open:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            _changed.wait(remaining)


def _at_exit() -> None:
    """The process exits with connections open (runserver's autoreloader, or any exit):
    close them with 1012 and wait for them, at most ``WEBSOCKET_CLOSE_TIMEOUT``."""
    global _stopping
    with _lock:
        if not _open:
            return
    try:  # a second SIGTERM (runserver's reloader passes one on) must not cut this short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:
        pass
    _stopping = True
    close_all()
    _wait_closed(conf.get("WEBSOCKET_CLOSE_TIMEOUT") + _EXIT_GRACE)
    time.sleep(_EXIT_LINGER)


# Python joins the threads that are not daemons (asgiref's, which runs an async
# view under WSGI, is one) before it runs atexit: a view still waiting there would
# keep the process from ever getting to atexit. threading's own exit hooks run
# before that join, the latest registered first.
_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(_at_exit)
else:  # pragma: no cover - Python without threading._register_atexit
    atexit.register(_at_exit)


def _watch_hypercorn_worker() -> None:
    """In a hypercorn worker process, begin the stop when hypercorn's parent asks for it.

    hypercorn's parent process handles SIGTERM by setting a ``multiprocessing``
    event it gave each worker (``shutdown_event``, an argument of
    ``hypercorn.asyncio.run.asyncio_worker``), which the worker polls; the
    worker gets no signal. A daemon thread polls the same event as often (it
    must not block in ``event.wait()``: the parent's ``set()`` then waits for
    this process to acknowledge, forever if it dies first).
    """
    process = multiprocessing.current_process()
    target = getattr(process, "_target", None)
    event = (getattr(process, "_kwargs", None) or {}).get("shutdown_event")
    if event is None or not getattr(target, "__module__", "").startswith("hypercorn."):
        return

    def watch() -> None:
        while not event.is_set():
            time.sleep(_HYPERCORN_POLL)
        _begin()

    threading.Thread(target=watch, name="dwebsocket-restart-watch", daemon=True).start()


def _watch_uwsgi_gevent_worker() -> None:
    """In a uWSGI worker in gevent mode, begin the stop on the signals uWSGI stops it with.

    uWSGI's gevent loop handles the worker's ``SIGHUP`` (graceful reload) and
    ``SIGINT``/``SIGTERM`` (stop) with gevent signal watchers, not Python
    handlers; gevent lets a second watcher see the same signal, and this one
    begins the stop in a greenlet of its own. (In threaded mode uWSGI handles
    them in C, before any Python runs: nothing can be done there.)
    """
    monkey = sys.modules.get("gevent.monkey")
    if "uwsgi" not in sys.modules or monkey is None or not monkey.is_module_patched("socket"):
        return
    import gevent

    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, _begin)

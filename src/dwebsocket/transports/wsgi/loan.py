"""Borrow the client's socket from a WSGI server, and give it back.

WSGI has no WebSocket support, so each server that can do it lends its
socket in its own way. One small adapter per server says how to get the
socket from the environ and what to do once the connection is over; adding a
server means adding one adapter here.

Once the view returns, the server must write nothing more on the socket. The
response dwebsocket hands back makes every supported server drop the
connection quietly: iterating it raises ``BrokenPipeError``, which both
wsgiref (``runserver``) and gunicorn treat as a client that went away, logging
no error.

uWSGI is the exception. It logs a traceback for any exception the response
raises, and once the response is over it writes the status line Django gave
``start_response()`` to its descriptor, whatever happened on the socket. So
under uWSGI dwebsocket drives a duplicate of the connection's descriptor
(``uwsgi.connection_fd()``, which ``wsgi.input`` knows too), the response iterates as empty, and when the
connection is over the socket is shut down and uWSGI's descriptor is pointed
at ``/dev/null`` (``dup2``): uWSGI's last write lands there, its ``close()``
closes that, and the client never sees a byte after the close frame.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from django.http import HttpRequest, HttpResponse

from ...connection import Link
from ...handshake import Handshake, HandshakeError
from .protocol import server_protocol
from .transport import SocketTransport

__all__ = ["SUPPORTED", "ReleasedResponse", "SocketLoan", "WsgiOpener", "borrow_socket", "gevent_patched"]

SUPPORTED = (
    "manage.py runserver, gunicorn with -k gthread or -k gevent, "
    "uWSGI with --threads N or --gevent N --gevent-early-monkey-patch, "
    "or any ASGI server (uvicorn, daphne, hypercorn)"
)


@dataclass
class SocketLoan:
    """A socket a server lent for one WebSocket connection."""

    sock: socket.socket
    server: str
    #: Called once when the connection is over (e.g. to write an access-log line).
    release: Callable[[], None] = field(default=lambda: None)
    #: The server writes nothing after a response that iterates as empty (uWSGI);
    #: otherwise the response raises ``BrokenPipeError`` (see the module's docstring).
    ends_empty: bool = False


def gevent_patched() -> bool:
    gevent_monkey = sys.modules.get("gevent.monkey")
    return bool(gevent_monkey and gevent_monkey.is_module_patched("socket"))


# Whether gevent had patched the standard library when dwebsocket was imported: the
# locks its modules create at import must be gevent's for greenlets to share them.
_PATCHED_AT_IMPORT = gevent_patched()


def borrow_socket(environ: dict[str, Any]) -> SocketLoan:
    """Return the client's socket, or raise :class:`HandshakeError` (501) naming the fix."""
    sock = environ.get("dwebsocket.socket")
    if sock is not None:  # Django's runserver, through dwebsocket.servers.runserver
        return SocketLoan(sock, "runserver", environ.get("dwebsocket.release", lambda: None))
    if "uwsgi.version" in environ:
        return _borrow_uwsgi(environ)
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        if not environ.get("wsgi.multithread") and not gevent_patched():
            raise HandshakeError(
                501,
                "gunicorn's sync worker cannot hold WebSocket connections: each one "
                "would block the whole worker until gunicorn kills it. Run gunicorn "
                "with -k gthread --threads N, or -k gevent.",
            )
        return SocketLoan(sock, "gunicorn")
    software = environ.get("SERVER_SOFTWARE", "this server")
    raise HandshakeError(
        501,
        f"{software} cannot hand its socket over to a WebSocket connection. "
        f"dwebsocket works under {SUPPORTED}.",
    )


def _borrow_uwsgi(environ: dict[str, Any]) -> SocketLoan:
    """The socket of a request uWSGI runs (see the module's docstring)."""
    uwsgi = sys.modules.get("uwsgi")  # the module uWSGI embeds in its workers
    if uwsgi is None:  # pragma: no cover - a uWSGI environ outside uWSGI
        raise HandshakeError(501, "uWSGI's own uwsgi module is missing: is this really uWSGI?")
    if gevent_patched() and not _PATCHED_AT_IMPORT:
        raise HandshakeError(
            501,
            "gevent patched the standard library after Django and dwebsocket were loaded "
            "(uWSGI's --gevent-monkey-patch does so): connections would deadlock on "
            "unpatched locks. Use --gevent-early-monkey-patch instead.",
        )
    if not gevent_patched():
        if "gevent" in uwsgi.opt:
            raise HandshakeError(
                501,
                "uWSGI runs with --gevent but gevent has not patched the standard library: "
                "each WebSocket connection would block the whole worker. "
                "Add --gevent-early-monkey-patch to uwsgi's options.",
            )
        if not environ.get("wsgi.multithread"):
            raise HandshakeError(
                501,
                "this uWSGI worker runs one request at a time: each WebSocket connection "
                "would block it for as long as it lasts. Run uwsgi with --threads N, "
                "or with --gevent N --gevent-early-monkey-patch.",
            )
    opt = uwsgi.opt
    if "http" in opt and not ({"http-websockets", "http-raw-body", "http-socket"} & opt.keys()):
        raise HandshakeError(
            501,
            "uWSGI's HTTP router (--http) does not pass WebSocket traffic on unless told to: "
            "add --http-websockets to uwsgi's options.",
        )
    # The connection's descriptor, as uwsgi.connection_fd() says it, which only the
    # request's own thread may call (an async view runs in another).
    fd = environ["wsgi.input"].fileno()
    sock = socket.socket(fileno=os.dup(fd))  # dwebsocket's own descriptor, closed by _UwsgiRelease
    return SocketLoan(sock, "uwsgi", _UwsgiRelease(fd, sock), ends_empty=True)


class _UwsgiRelease:
    """The end of a connection under uWSGI: nothing uWSGI writes afterwards reaches the client.

    Called once, from the request's thread (or greenlet), after the
    transport finished. uWSGI's own descriptor *fd* stays open until uWSGI
    closes it, so its number cannot be reused meanwhile; ``dup2`` swaps what
    it refers to atomically.
    """

    def __init__(self, fd: int, sock: socket.socket) -> None:
        self._fd = fd
        self._sock = sock

    def __call__(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # shut down already (the usual case), or the client is gone
            pass
        sink = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(sink, self._fd)
        finally:
            os.close(sink)
        self._sock.close()


def prepare_socket(sock: socket.socket) -> None:
    """Make the borrowed socket fit for WebSocket traffic."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # Small frames must go out at once, not wait for Nagle's algorithm.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    sock.settimeout(None)


class ReleasedResponse(HttpResponse):
    """The response a WebSocket view hands back to a WSGI server.

    The socket already carried the handshake and the whole WebSocket session,
    so the server must not write an HTTP response on it. Iterating this
    response signals a vanished client, which servers handle without writing
    and without logging an error.
    """

    status_code = 101

    def __init__(self, release: Callable[[], None], ends_empty: bool = False) -> None:
        super().__init__(status=101)
        self._release = release
        self._ends_empty = ends_empty
        self._closed_once = False

    def __iter__(self) -> Iterator[bytes]:
        self._release()
        if self._ends_empty:  # uWSGI: nothing it writes from now on reaches the client
            return iter(())
        self.close()  # wsgiref skips close() on this path; Django's request_finished runs here
        raise BrokenPipeError(errno.EPIPE, "WebSocket connection finished; socket released")

    def close(self) -> None:
        if not self._closed_once:
            self._closed_once = True
            super().close()


class WsgiOpener:
    """Answers a handshake on a socket borrowed from the WSGI server."""

    def __init__(self) -> None:
        self._handshake: Handshake | None = None
        self._loan: SocketLoan | None = None
        self.offered_subprotocols: list[str] = []

    def prepare(self, request: HttpRequest) -> None:
        self._handshake = Handshake(request)
        self._loan = borrow_socket(request.META)
        self.offered_subprotocols = self._handshake.offered_subprotocols

    def open(self, link: Link, subprotocol: str | None) -> SocketTransport | None:
        assert self._handshake is not None and self._loan is not None
        limits = link.limits
        sock = self._loan.sock
        answer = self._handshake.accept(subprotocol, compression=limits.compression)
        try:
            prepare_socket(sock)
            sock.sendall(answer)
        except OSError:
            return None
        protocol = server_protocol(self._handshake.deflate, limits.max_message_size)
        self._handshake = None  # its HTTP parser and request copy are not needed any more
        transport = SocketTransport(sock, protocol, link)
        link.opened(transport, transport.pump)
        transport.start()
        return transport

    async def aopen(self, link: Link, subprotocol: str | None) -> SocketTransport | None:
        # Under WSGI an async view runs on an event loop of its own: blocking it
        # for the few bytes of the handshake delays no other connection.
        return self.open(link, subprotocol)

    def finish(self, transport: object) -> HttpResponse:
        if isinstance(transport, SocketTransport):
            transport.finish()
        if self._loan is None:
            return ReleasedResponse(lambda: None)
        return ReleasedResponse(self._loan.release, self._loan.ends_empty)

    async def afinish(self, transport: object) -> HttpResponse:
        return self.finish(transport)

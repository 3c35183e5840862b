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
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from django.http import HttpRequest, HttpResponse

from ...connection import Link
from ...handshake import Handshake, HandshakeError
from .transport import SocketTransport

__all__ = ["SUPPORTED", "ReleasedResponse", "SocketLoan", "WsgiOpener", "borrow_socket", "gevent_patched"]

SUPPORTED = (
    "manage.py runserver, gunicorn with -k gthread or -k gevent, "
    "or any ASGI server (uvicorn, daphne, hypercorn)"
)


@dataclass
class SocketLoan:
    """A socket a server lent for one WebSocket connection."""

    sock: socket.socket
    server: str
    #: Called once when the connection is over (e.g. to write an access-log line).
    release: Callable[[], None] = field(default=lambda: None)


def gevent_patched() -> bool:
    gevent_monkey = sys.modules.get("gevent.monkey")
    return bool(gevent_monkey and gevent_monkey.is_module_patched("socket"))


def borrow_socket(environ: dict[str, Any]) -> SocketLoan:
    """Return the client's socket, or raise :class:`HandshakeError` (501) naming the fix."""
    sock = environ.get("dwebsocket.socket")
    if sock is not None:  # Django's runserver, through dwebsocket.servers.runserver
        return SocketLoan(sock, "runserver", environ.get("dwebsocket.release", lambda: None))
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

    def __init__(self, release: Callable[[], None]) -> None:
        super().__init__(status=101)
        self._release = release
        self._closed_once = False

    def __iter__(self) -> Iterator[bytes]:
        self._release()
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
        answer = self._handshake.accept(
            subprotocol, compression=limits.compression, max_message_size=limits.max_message_size
        )
        try:
            prepare_socket(sock)
            sock.sendall(answer)
        except OSError:
            return None
        compressed = b"permessage-deflate" in answer.lower()
        protocol = self._handshake.connection.connection  # past the handshake: frames only
        assert protocol is not None
        self._handshake = None  # its HTTP parser and request copy are not needed any more
        transport = SocketTransport(sock, protocol, link, compressed)
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
        release = self._loan.release if self._loan is not None else (lambda: None)
        return ReleasedResponse(release)

    async def afinish(self, transport: object) -> HttpResponse:
        return self.finish(transport)

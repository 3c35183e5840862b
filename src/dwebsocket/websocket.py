"""``request.websocket``: the connection object a Django view talks through."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from django.http import HttpRequest, HttpResponse

from .conf import Limits
from .connection import CONNECTING, Connection
from .handshake import Handshake, HandshakeError, is_websocket_request
from .servers.socket import SocketTransport
from .servers.wsgi import ReleasedResponse, SocketLoan, borrow_socket, prepare_socket

logger = logging.getLogger("dwebsocket")


class WebSocket(Connection):
    """The WebSocket of one request, as ``request.websocket``.

    The handshake is answered when the view first uses the connection (any
    method or :attr:`connected`), so a view may still refuse the client by
    returning an ordinary response (a 403, a login redirect) before touching
    it.

    Every member is documented on :class:`dwebsocket.connection.Connection`:
    ``wait()``, ``read()``, ``send()``, ``count_messages()``,
    ``has_messages()``, ``close()``, ``disconnect()``, ``connected``,
    ``closed``, ``close_code``, ``close_reason`` and iteration.
    """

    def __init__(self, request: HttpRequest) -> None:
        self._limits = Limits.from_settings()
        super().__init__(max_queue=self._limits.max_queue)
        self._request = request
        self._handshake: Handshake | None = None
        self._loan: SocketLoan | None = None
        self._supported_subprotocols: list[str] = []
        self._subprotocol: str | None = None
        # Guarded by _accept_lock: answering the handshake happens once.
        self._accept_lock = threading.Lock()
        self._accepted = False
        self._finished_response: HttpResponse | None = None
        self._transport_finish: Callable[[], None] | None = None

    @property
    def subprotocol(self) -> str | None:
        """The subprotocol agreed with the client, or ``None``."""
        self._start()
        return self._subprotocol

    @property
    def protocol(self) -> str | None:
        """Same as :attr:`subprotocol` (the original dwebsocket's name)."""
        return self.subprotocol

    def __repr__(self) -> str:
        return f"<WebSocket {self._request.path} {self._state}>"

    # -- the handshake, driven by the decorators and the middleware ----------

    def _prepare(self, subprotocols: Iterable[str] | None) -> HttpResponse | None:
        """Validate the handshake before the view runs; a response refuses it."""
        if self._handshake is not None:
            return None
        try:
            handshake = Handshake(self._request)
            self._loan = borrow_socket(self._request.META)
        except HandshakeError as exc:
            if exc.status >= 500:
                logger.error("dwebsocket: %s", exc.message)
            self._closed(1006)
            return exc.response()
        self._handshake = handshake
        self._supported_subprotocols = list(subprotocols or ())
        return None

    def _start(self) -> None:
        if self._state != CONNECTING:
            return
        with self._accept_lock:
            if self._accepted or self._handshake is None:
                return
            self._accepted = True
            handshake = self._handshake
            self._subprotocol = handshake.select_subprotocol(self._supported_subprotocols)
            assert self._loan is not None
            sock = self._loan.sock
            try:
                prepare_socket(sock)
                sock.sendall(
                    handshake.accept(self._subprotocol, compression=self._limits.compression)
                )
            except OSError:
                self._closed(1006)
                return
            transport = SocketTransport(sock, handshake.connection, self, self._limits)
            self._transport_finish = transport.finish
            self._opened(transport)
            transport.start()

    def _refuse(self) -> None:
        """The view answered the handshake with a plain HTTP response: never accept it."""
        with self._accept_lock:
            self._accepted = True
        self._closed(1006)

    def _finish(self) -> HttpResponse:
        """End the connection after the view returned; the response for the server.

        A view that returned without touching the connection still answers
        the handshake, so the client sees a normal close rather than an error.
        """
        if self._finished_response is None:
            self._start()
            if self._transport_finish is not None:
                self._transport_finish()
            self._closed(1006)  # no-op unless the connection never opened
            release = self._loan.release if self._loan is not None else (lambda: None)
            self._finished_response = ReleasedResponse(release)
        return self._finished_response


def attach(request: HttpRequest) -> WebSocket | None:
    """Set ``request.websocket`` and ``request.is_websocket()``; idempotent."""
    if "websocket" in request.__dict__:
        return request.websocket  # type: ignore[no-any-return]
    websocket = WebSocket(request) if is_websocket_request(request) else None
    request.websocket = websocket  # type: ignore[attr-defined]
    request.is_websocket = lambda: websocket is not None  # type: ignore[attr-defined]
    return websocket

"""The interface every kind of server implements, and the one place that picks it.

``request.websocket`` never talks to a server directly. Each server kind
provides an *opener*: it checks the handshake before the view runs, answers
it on first use, provides the :class:`~dwebsocket.connection.Transport` that
carries messages, and finishes the request when the view returns. A new
server kind is a new opener and transport; the user API does not change.

Openers other than the WSGI one (ASGI, long-polling, the test client) are put
in ``request.META`` under :data:`OPENER_KEY` by the code that built the
request; :func:`opener_for` falls back to the WSGI opener for a plain
handshake.
"""

from __future__ import annotations

from typing import Protocol

from django.http import HttpRequest
from django.http.response import HttpResponseBase

from ..connection import Link, Transport
from ..handshake import is_websocket_request
from .wsgi.loan import WsgiOpener

__all__ = ["OPENER_KEY", "Opener", "opener_for"]

#: The ``request.META`` key that carries the opener of an ASGI, polling or test request.
OPENER_KEY = "dwebsocket.opener"


class Opener(Protocol):
    """How one kind of server answers a handshake and carries a connection."""

    #: The subprotocols the client offered, in its order of preference.
    offered_subprotocols: list[str]

    def prepare(self, request: HttpRequest) -> None:
        """Check the handshake before the view runs; raise HandshakeError to refuse it."""

    def open(self, link: Link, subprotocol: str | None) -> Transport | None:
        """Answer the handshake from a thread; the transport, or None if the client is gone."""

    async def aopen(self, link: Link, subprotocol: str | None) -> Transport | None:
        """Answer the handshake from a coroutine."""

    def finish(self, transport: Transport | None) -> HttpResponseBase:
        """Close after the view returned, from a thread; the response for the server."""

    async def afinish(self, transport: Transport | None) -> HttpResponseBase:
        """Close after the view returned, from a coroutine."""


def opener_for(request: HttpRequest) -> Opener | None:
    """The opener of *request*, or ``None`` if it is no WebSocket (or polling) request."""
    opener: Opener | None = request.META.get(OPENER_KEY)
    if opener is None and is_websocket_request(request):
        opener = WsgiOpener()
    return opener

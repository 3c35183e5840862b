"""The view's end of a polling session: its opener, its transport, its state.

A :class:`PollingSession` is made when an ``open`` request arrives, before
the middleware stack runs. Its :class:`PollingOpener` goes in the request (see
:mod:`dwebsocket.transports.opener`), so ``request.websocket`` is a polling
connection; when the view accepts it, the session is put in its
:class:`~dwebsocket.transports.polling.store.SessionStore` and its
:class:`PollingTransport` carries the view's sends and closes to the
session's outbound queue. The store hands it what the client sends.

The session never asks which store it has: the store object decides how
things are kept (this process, or Redis).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase

from ...connection import Link, wake_future
from ...handshake import check_origin
from ...messages import Frame, Message
from .. import restart
from ..policy import OVERFLOW_CLOSE, RATE_CLOSE, RateMeter
from . import wire
from .store import Outbound, SessionStore

__all__ = ["PollingOpener", "PollingSession", "PollingTransport"]

_LATE = "the view accepted after the open request timed out"


class _Accepted:
    """Set once: when the view accepted the session, or ended without accepting.

    The ``open`` request waits for it, from a thread (:meth:`wait`) or a
    coroutine (:meth:`await_set`). ``_lock`` guards ``_wakes``, the wake-ups
    of waiting coroutines, against a concurrent :meth:`set`.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._wakes: list[Callable[[], None]] = []

    def set(self) -> None:
        with self._lock:
            self._event.set()
            wakes, self._wakes = self._wakes, []
        for wake in wakes:
            wake()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    async def await_set(self, timeout: float) -> bool:
        done, wake = wake_future(asyncio.get_running_loop())
        with self._lock:
            if self._event.is_set():
                return True
            self._wakes.append(wake)
        try:
            await asyncio.wait_for(done, timeout)
        except asyncio.TimeoutError:
            pass
        return self._event.is_set()


class PollingSession:
    """The view's end of one client's polling session.

    ``_lock`` guards ``_link``, ``_outbound``, ``_ended``, ``_rate`` and
    :attr:`subprotocol`: whether the view accepted (and through which link
    and queue it talks) and whether the session is over. The ``open`` answer
    (:meth:`give_up`) and a view accepting at that very moment agree on the
    outcome: :meth:`accept` holds the lock while it puts the session in its
    store, :meth:`aaccept` (which may not block the loop on it) checks again after.
    :attr:`refusal` is written by the view's runner before :attr:`accepted`
    is set, and read by the ``open`` request after it.
    """

    def __init__(self, binding: str | None, store: SessionStore) -> None:
        #: Unguessable: the only thing that lets a request reach the session.
        self.sid = secrets.token_urlsafe(24)
        #: The client's Django session cookie at ``open``, or ``None``.
        self.binding = binding
        #: Set when the view accepted, or ended without accepting.
        self.accepted = _Accepted()
        #: The view's answer if it refused the session (returned before accepting).
        self.refusal: HttpResponseBase | None = None
        self.subprotocol: str | None = None
        self._store = store
        self._lock = threading.Lock()
        self._link: Link | None = None
        self._outbound: Outbound | None = None
        self._ended = False
        # WEBSOCKET_RATE_LIMIT for what the client sends; made at the accept.
        self._rate: RateMeter | None = None

    def __repr__(self) -> str:
        return f"<PollingSession {self.sid[:8]}…>"

    # -- the handshake -------------------------------------------------------

    def accept(self, link: Link, transport: PollingTransport, subprotocol: str | None) -> bool:
        """The view accepts: put the session in its store; ``False`` if the ``open`` gave up."""
        with self._lock:
            if self._ended:
                return False
            self._opened(link, transport, subprotocol, self._store.open(self, link.limits))
            return True

    async def aaccept(self, link: Link, transport: PollingTransport, subprotocol: str | None) -> bool:
        """:meth:`accept` from a coroutine: the store's round trip does not block the loop."""
        with self._lock:
            if self._ended:
                return False
        outbound = await self._store.aopen(self, link.limits)
        with self._lock:
            if not self._ended:
                self._opened(link, transport, subprotocol, outbound)
                return True
        await outbound.aclose(1006, _LATE)  # the client got a 503: nobody will poll
        return False

    def _opened(self, link: Link, transport: PollingTransport, subprotocol: str | None, outbound: Outbound) -> None:
        """Record the accept; call with ``_lock`` held."""
        link.opened(transport)  # before the open answer can go out: a send may follow at once
        self._link, self._outbound, self.subprotocol = link, outbound, subprotocol
        self._rate = RateMeter(link.limits)
        restart.register(self)

    def give_up(self) -> bool:
        """At the ``open`` answer: whether the view has not accepted; if so, it never will."""
        with self._lock:
            if self._link is None:
                self._ended = True
            return self._link is None

    # -- the view's end (through PollingTransport) ------------------------------

    def _queue(self) -> Outbound | None:
        with self._lock:
            return None if self._ended else self._outbound

    def put(self, message: Message) -> bool:
        """Queue the view's *message* for the client; waits while the queue is full."""
        outbound = self._queue()
        return outbound is not None and outbound.put(wire.encode(message))

    async def aput(self, message: Message) -> bool:
        """:meth:`put` from a coroutine."""
        outbound = self._queue()
        return outbound is not None and await outbound.aput(wire.encode(message))

    def offer(self, message: Message) -> bool:
        """Queue a broadcast without waiting; a client too far behind is closed or skipped."""
        outbound = self._queue()
        if outbound is None:
            return False
        verdict = outbound.offer(wire.encode(message))
        if verdict == "overflow":
            self.close(*OVERFLOW_CLOSE)
        return verdict == "queued"

    def _end(self) -> tuple[Outbound | None, Link | None]:
        """Mark the session over; its queue if this is the first close, and its link."""
        with self._lock:
            outbound = None if self._ended else self._outbound
            self._ended = True
            link = self._link
        restart.unregister(self)
        return outbound, link

    def close(self, code: int, reason: str) -> None:
        """End the session: the client's next poll gets the close, the view sees *code*; idempotent."""
        outbound, link = self._end()
        if outbound is not None:
            outbound.close(code, reason)
        if link is not None:
            link.closed_with(code, reason)

    async def aclose(self, code: int, reason: str) -> None:
        """:meth:`close` from a coroutine."""
        outbound, link = self._end()
        if outbound is not None:
            await outbound.aclose(code, reason)
        if link is not None:
            link.closed_with(code, reason)

    # -- when the server stops (restart.Restartable) ------------------------------

    def begin_restart(self) -> None:
        """The server stops: the client's next poll gets 1012, the view sees it now."""
        self.close(*restart.RESTART_CLOSE)

    def finish_restart(self) -> None:
        """Nothing more: the close waits in the session's queue for the client's poll."""

    # -- what the store hands over from the client (store.ViewEnd) ----------------

    def _receiving(self, count: int) -> Link | None:
        """The link to deliver *count* messages from the client to, or ``None`` to drop them.

        Counts them against WEBSOCKET_RATE_LIMIT: a client over it is closed
        with 1008 (its next poll gets the close) and what it sent is dropped.
        """
        with self._lock:
            link, rate = self._link, self._rate
            over = rate is not None and not all(rate.allow() for _ in range(count))
        if over:
            self.close(*RATE_CLOSE)
            return None
        return link

    def deliver(self, message: Message) -> None:
        """A message from the client; waits while the view's queue is full."""
        link = self._receiving(1)
        if link is not None:
            link.deliver(message)

    def deliver_nowait(self, message: Message) -> bool:
        """A message from the client, unless the view's queue is full (then ``False``)."""
        with self._lock:
            link = self._link
        if link is None:
            return True
        if not link.deliver_nowait(message):  # counted against the rate only once it is taken
            return False
        # Taken: now it counts (a message retried while the queue is full counts once).
        self._receiving(1)
        return True

    def deliver_all_nowait(self, messages: list[Message]) -> bool:
        """All of *messages* from the client, or none if the view's queue has no room for them."""
        with self._lock:
            link = self._link
        if link is None:
            return True
        if not link.deliver_all_nowait(messages):
            return False
        self._receiving(len(messages))
        return True


class PollingTransport:
    """The transport of a connection whose client long-polls."""

    def __init__(self, session: PollingSession) -> None:
        self._session = session

    def send(self, message: Message) -> bool:
        return self._session.put(message)

    async def asend(self, message: Message) -> bool:
        return await self._session.aput(message)

    def close(self, code: int, reason: str) -> None:
        self._session.close(code, reason)

    async def aclose(self, code: int, reason: str) -> None:
        await self._session.aclose(code, reason)

    def offer(self, frame: Frame) -> bool:
        return self._session.offer(frame.message)


class PollingOpener:
    """Answers the handshake of a polling session (see :mod:`dwebsocket.transports.opener`)."""

    def __init__(self, session: PollingSession, offered: list[str]) -> None:
        #: The session this opener opens (see ``http.session_of``).
        self.session = session
        self.offered_subprotocols = offered

    def prepare(self, request: HttpRequest) -> None:
        check_origin(request)

    def open(self, link: Link, subprotocol: str | None) -> PollingTransport | None:
        transport = PollingTransport(self.session)
        accepted = self.session.accept(link, transport, subprotocol)
        self.session.accepted.set()
        if not accepted:  # the open request stopped waiting: nobody will poll
            link.closed_with(1006, _LATE)
            return None
        return transport

    async def aopen(self, link: Link, subprotocol: str | None) -> PollingTransport | None:
        transport = PollingTransport(self.session)
        accepted = await self.session.aaccept(link, transport, subprotocol)
        self.session.accepted.set()
        if not accepted:
            link.closed_with(1006, _LATE)
            return None
        return transport

    def finish(self, transport: object) -> HttpResponseBase:
        """The view returned: the session ends normally (1000)."""
        self.session.close(1000, "")
        return HttpResponse(status=204)

    async def afinish(self, transport: object) -> HttpResponseBase:
        await self.session.aclose(1000, "")
        return HttpResponse(status=204)

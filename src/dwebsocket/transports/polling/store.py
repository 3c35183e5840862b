"""Where polling sessions live between requests: the store interface, and this process's store.

A polling session has two ends. The *view's end* (a
:class:`~dwebsocket.transports.polling.session.PollingSession`, in the process
that opened it) sends through the session's :class:`Outbound` queue and
receives what the client sends. The *client's end* (:class:`ClientEnd`) is the
session as a ``poll``, ``send`` or ``close`` request finds it. A
:class:`SessionStore` keeps both ends together:

- :class:`LocalStore` (here): sessions in this process's memory; a request
  reaches only the sessions of the process that opened them;
- ``redis_store.RedisStore``: their queues in Redis, so any process serves any
  request.

Whatever differs between the two is decided by the store object, never by an
``if`` in the session or the HTTP handlers. Both bound what waits for a client
by ``WEBSOCKET_BROADCAST_QUEUE`` with the policy of every transport
(:mod:`dwebsocket.transports.policy`): a broadcast to a client too far behind
follows ``WEBSOCKET_BROADCAST_OVERFLOW`` (``"close"``: the session closes with
1013), and a view's own ``send()`` waits for room, as a socket write waits
for the client to read.

This module imports the view's end only as the :class:`ViewEnd` protocol, so
the imports point one way: ``http`` -> ``session`` -> ``store`` -> ``wire``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Protocol

from ... import conf
from ...connection import wake_future
from ...messages import Message
from ..policy import OVERFLOW_CLOSE, Limits, Outbox, Verdict
from . import wire

__all__ = ["ClientEnd", "LocalStore", "Outbound", "SessionStore", "StoreUnavailable", "ViewEnd"]


class StoreUnavailable(Exception):
    """The shared store (Redis) did not answer: the request gets 503, and the client tries again."""


class ViewEnd(Protocol):
    """What a store may do to the view's end of a session (a ``PollingSession``)."""

    @property
    def sid(self) -> str:
        """The session id: unguessable, the only way a request reaches the session."""

    @property
    def binding(self) -> str | None:
        """The client's Django session cookie at ``open``; every request must carry the same."""

    def deliver(self, message: Message) -> None:
        """Hand a message from the client to the view; waits while the view's queue is full."""

    def deliver_nowait(self, message: Message) -> bool:
        """Hand over a message unless the view's queue is full; ``False`` means retry later."""

    def deliver_all_nowait(self, messages: list[Message]) -> bool:
        """Hand over all of *messages*, or none if the view's queue has no room for them (``False``)."""

    def close(self, code: int, reason: str) -> None:
        """End the session (the client closed it, or stopped polling); idempotent."""


class Outbound(Protocol):
    """One session's queue of what waits for the client's next poll (the view's end uses it)."""

    def put(self, item: wire.MessageItem) -> bool:
        """Queue a view's own send, waiting while the queue is full; ``False`` once closed."""

    async def aput(self, item: wire.MessageItem) -> bool:
        """:meth:`put` from a coroutine: waits for room without blocking the event loop."""

    def offer(self, item: wire.MessageItem) -> Verdict:
        """Queue a broadcast without ever waiting, unless the client is too far behind."""

    def close(self, code: int, reason: str) -> None:
        """Queue the close, the last item: refuse everything after it; idempotent."""

    async def aclose(self, code: int, reason: str) -> None:
        """:meth:`close` from a coroutine."""


class ClientEnd(Protocol):
    """A session as a ``poll``, ``send`` or ``close`` request finds it."""

    @property
    def binding(self) -> str | None:
        """The client's session cookie at ``open`` (see :attr:`ViewEnd.binding`)."""

    def take(self, timeout: float) -> wire.Batch:
        """Wait up to *timeout* seconds for something to send; everything waiting, at once."""

    async def atake(self, timeout: float) -> wire.Batch:
        """:meth:`take` from a coroutine, holding no thread while it waits."""

    def send(self, messages: list[Message]) -> bool:
        """Hand the client's *messages* to the view, in order, without waiting.

        ``False`` if the view's queue has no room for them: none was taken,
        and the client sends them again later (429). A request thread never
        waits for a view to read.
        """

    def close(self, code: int, reason: str, *, polled: bool) -> None:
        """End the session with *code* and *reason*, as the view sees it.

        *polled*: the client still polls for the close (the server ended the
        session over what the client sent, 1009), so the session must stay
        findable until it expires; otherwise the client asked to close, and
        polls no more.
        """


class SessionStore(Protocol):
    """Where the sessions of one deployment live between requests."""

    def open(self, view: ViewEnd, limits: Limits) -> Outbound:
        """Make *view*'s session findable by its client; its outbound queue, bounded by *limits*."""

    async def aopen(self, view: ViewEnd, limits: Limits) -> Outbound:
        """:meth:`open` from a coroutine."""

    def find(self, sid: str) -> ClientEnd | None:
        """The session *sid* as its client's requests see it, or ``None`` if there is none."""

    async def afind(self, sid: str) -> ClientEnd | None:
        """:meth:`find` from a coroutine."""


class _LocalSession:
    """A session of this process: its outbound queue, and both ends of it in one object.

    The outbox (a :class:`~dwebsocket.transports.policy.Outbox`) owns the
    waiting items under its own lock, and wakes the threads that wait on it
    (a poll in :meth:`take`, a send in :meth:`put`). ``_lock`` guards the rest:
    ``_close``, ``_polling``, ``_last_seen`` and ``_wakes``, the wake-ups of
    the coroutines that wait (an async poll for items, an async send for room),
    which are called on every change.
    """

    def __init__(self, view: ViewEnd, limits: Limits, forget: Callable[[str], None]) -> None:
        self.view = view
        self._forget = forget
        self._outbox: Outbox[wire.MessageItem] = Outbox(limits)
        self._lock = threading.Lock()
        self._close: wire.Close | None = None
        self._polling = 0  # polls waiting now: a session being polled never expires
        self._last_seen = time.monotonic()
        self._wakes: set[Callable[[], None]] = set()

    @property
    def binding(self) -> str | None:
        return self.view.binding

    def _changed(self) -> None:
        """Wake every waiting coroutine; each checks again what it waits for."""
        with self._lock:
            wakes = list(self._wakes)
        for wake in wakes:
            wake()

    # -- Outbound: the view's end ------------------------------------------------

    def put(self, item: wire.MessageItem) -> bool:
        if not self._outbox.put(item):
            return False
        self._changed()
        return True

    async def aput(self, item: wire.MessageItem) -> bool:
        loop = asyncio.get_running_loop()
        while True:
            # Listen before trying, so that room made in between is not missed.
            room, wake = wake_future(loop)
            with self._lock:
                self._wakes.add(wake)
            try:
                if self._outbox.put(item, timeout=0):
                    self._changed()
                    return True
                with self._lock:
                    if self._close is not None:
                        return False
                await room
            finally:
                with self._lock:
                    self._wakes.discard(wake)

    def offer(self, item: wire.MessageItem) -> Verdict:
        verdict = self._outbox.offer(item)
        if verdict == "queued":
            self._changed()
        return verdict

    def close(self, code: int, reason: str) -> None:
        with self._lock:
            if self._close is None:
                self._close = wire.Close(code, reason)
        self._outbox.close()  # after _close is set: a poll woken by it finds the close
        self._changed()

    async def aclose(self, code: int, reason: str) -> None:
        self.close(code, reason)

    # -- ClientEnd: the client's requests ------------------------------------------

    def take(self, timeout: float) -> wire.Batch:
        with self._lock:
            self._polling += 1
        try:
            self._outbox.wait(timeout)
            return self._answer()
        finally:
            self._polled()

    async def atake(self, timeout: float) -> wire.Batch:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with self._lock:
            self._polling += 1
        try:
            while True:
                changed, wake = wake_future(loop)
                with self._lock:
                    self._wakes.add(wake)
                try:
                    with self._lock:
                        if self._close is not None:
                            break
                    remaining = deadline - loop.time()
                    if len(self._outbox) or remaining <= 0:
                        break
                    try:
                        await asyncio.wait_for(changed, remaining)
                    except asyncio.TimeoutError:
                        break
                finally:
                    with self._lock:
                        self._wakes.discard(wake)
            return self._answer()
        finally:
            self._polled()

    def _answer(self) -> wire.Batch:
        """Everything waiting, and the close if there is one."""
        # The close first: every item queued before it is then in the outbox.
        with self._lock:
            close = self._close
        items = self._outbox.take_all()
        if items:
            self._changed()  # a coroutine may wait for room (aput)
        return wire.batch(items, close)

    def _polled(self) -> None:
        with self._lock:
            self._polling -= 1
            self._last_seen = time.monotonic()

    def send(self, messages: list[Message]) -> bool:
        return self.view.deliver_all_nowait(messages)

    def close_session(self, code: int, reason: str, polled: bool) -> None:
        self.view.close(code, reason)
        if not polled:
            self._forget(self.view.sid)

    def expired(self, now: float, grace: float) -> bool:
        """Whether the client stopped polling *grace* seconds ago."""
        with self._lock:
            return self._polling == 0 and now - self._last_seen > grace

    def overflowed(self) -> bool:
        """Whether the client fell too far behind, and the policy is to close it."""
        return self._outbox.overflowed()


class _ClientSide:
    """A :class:`_LocalSession` as its client's requests see it (a :class:`ClientEnd`).

    Its own class because both ends have a ``close`` that means different things.
    """

    __slots__ = ("_session",)

    def __init__(self, session: _LocalSession) -> None:
        self._session = session

    @property
    def binding(self) -> str | None:
        return self._session.binding

    def take(self, timeout: float) -> wire.Batch:
        return self._session.take(timeout)

    async def atake(self, timeout: float) -> wire.Batch:
        return await self._session.atake(timeout)

    def send(self, messages: list[Message]) -> bool:
        return self._session.send(messages)

    def close(self, code: int, reason: str, *, polled: bool) -> None:
        self._session.close_session(code, reason, polled)


class LocalStore:
    """The sessions of this process (``WEBSOCKET_BROKER = "memory"``).

    ``_lock`` guards ``_sessions`` and ``_reaper``. The reaper thread, started
    with the first session, ends every second the sessions whose client
    stopped polling ``WEBSOCKET_POLL_EXPIRY`` seconds ago (the view sees
    1006), and those that fell too far behind the broadcasts, as the clock of
    every transport does (1013, by ``WEBSOCKET_BROADCAST_OVERFLOW``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, _LocalSession] = {}
        self._reaper: threading.Thread | None = None

    def open(self, view: ViewEnd, limits: Limits) -> Outbound:
        session = _LocalSession(view, limits, self._forget)
        with self._lock:
            self._sessions[view.sid] = session
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="dwebsocket-polling", daemon=True)
                self._reaper.start()
        return session

    async def aopen(self, view: ViewEnd, limits: Limits) -> Outbound:
        return self.open(view, limits)

    def find(self, sid: str) -> ClientEnd | None:
        with self._lock:
            session = self._sessions.get(sid)
        return None if session is None else _ClientSide(session)

    async def afind(self, sid: str) -> ClientEnd | None:
        return self.find(sid)

    def _forget(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)

    def _reap(self) -> None:
        while True:
            time.sleep(1.0)
            grace = conf.get("WEBSOCKET_POLL_EXPIRY")
            now = time.monotonic()
            with self._lock:
                sessions = list(self._sessions.values())
            for session in sessions:
                if session.expired(now, grace):
                    self._forget(session.view.sid)
                    session.view.close(1006, "the client stopped polling")
                elif session.overflowed():
                    session.view.close(*OVERFLOW_CLOSE)

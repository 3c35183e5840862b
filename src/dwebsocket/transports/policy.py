"""What every transport must agree on, defined once.

The WSGI socket, ASGI, long-polling and test transports all take their
limits from :class:`Limits` and keep what waits for a slow client in an
:class:`Outbox`, so a limit means the same on every server and is tested
once. A leaf of the transports layer: it imports only settings and messages.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from .. import conf
from ..messages import Message, message_size

__all__ = [
    "BURST_FACTOR", "OVERFLOW_CLOSE", "STALL_SECONDS", "Limits", "Outbox", "Verdict", "offer_verdict", "too_big",
]


@dataclass(frozen=True)
class Limits:
    """The per-connection limits, read once from the settings when a connection opens.

    The defaults are those of :data:`dwebsocket.conf.DEFAULTS`; a plain
    ``Limits()`` (no settings read) is for connections outside Django.
    """

    max_message_size: int | None = conf.DEFAULTS["WEBSOCKET_MAX_MESSAGE_SIZE"]
    max_queue: int = conf.DEFAULTS["WEBSOCKET_MAX_QUEUE"]
    ping_interval: float | None = conf.DEFAULTS["WEBSOCKET_PING_INTERVAL"]
    ping_timeout: float | None = conf.DEFAULTS["WEBSOCKET_PING_TIMEOUT"]
    close_timeout: float = conf.DEFAULTS["WEBSOCKET_CLOSE_TIMEOUT"]
    compression: bool = conf.DEFAULTS["WEBSOCKET_COMPRESSION"]
    broadcast_queue: int = conf.DEFAULTS["WEBSOCKET_BROADCAST_QUEUE"]
    broadcast_overflow: str = conf.DEFAULTS["WEBSOCKET_BROADCAST_OVERFLOW"]

    @classmethod
    def from_settings(cls) -> Limits:
        """The limits the project's settings ask for."""
        return cls(
            max_message_size=conf.get("WEBSOCKET_MAX_MESSAGE_SIZE"),
            max_queue=conf.get("WEBSOCKET_MAX_QUEUE"),
            ping_interval=conf.get("WEBSOCKET_PING_INTERVAL"),
            ping_timeout=conf.get("WEBSOCKET_PING_TIMEOUT"),
            close_timeout=conf.get("WEBSOCKET_CLOSE_TIMEOUT"),
            compression=bool(conf.get("WEBSOCKET_COMPRESSION")),
            broadcast_queue=conf.get("WEBSOCKET_BROADCAST_QUEUE"),
            broadcast_overflow=conf.get("WEBSOCKET_BROADCAST_OVERFLOW"),
        )


def too_big(message: Message, limits: Limits) -> bool:
    """Whether a received *message* is over ``WEBSOCKET_MAX_MESSAGE_SIZE`` (close with 1009)."""
    limit = limits.max_message_size
    return limit is not None and message_size(message) > limit


#: What :meth:`Outbox.offer` did with an item: ``"queued"``; ``"dropped"`` (the
#: client is too slow and WEBSOCKET_BROADCAST_OVERFLOW is "drop"); ``"overflow"``
#: (too slow, and the policy is "close": the transport closes with 1013).
Verdict = Literal["queued", "dropped", "overflow"]

#: The close code and reason for a client cut for falling behind.
OVERFLOW_CLOSE = (1013, "too slow for the broadcasts")

T = TypeVar("T")


#: Seconds a client with WEBSOCKET_BROADCAST_QUEUE broadcasts waiting may take
#: none of them before it counts as slow. A burst fills a queue faster than any
#: client reads; a client that reads is taking broadcasts all along.
STALL_SECONDS = 1.0

#: However fast a client reads, no more than this many times
#: WEBSOCKET_BROADCAST_QUEUE broadcasts wait for it: what a burst may queue is bounded.
BURST_FACTOR = 16


def offer_verdict(waiting: int, stalled_for: float, limits: Limits) -> Verdict:
    """What to do with a broadcast for a client that has *waiting* items not yet written.

    *stalled_for* is how long the client has gone without taking any. A client
    counts as slow when WEBSOCKET_BROADCAST_QUEUE broadcasts wait for it and it
    took none for :data:`STALL_SECONDS`, or when :data:`BURST_FACTOR` times that
    many wait; a slow client is handled by WEBSOCKET_BROADCAST_OVERFLOW.
    """
    if waiting < limits.broadcast_queue or (
        stalled_for < STALL_SECONDS and waiting < BURST_FACTOR * limits.broadcast_queue
    ):
        return "queued"
    return "overflow" if limits.broadcast_overflow == "close" else "dropped"


class Outbox(Generic[T]):
    """What waits to be written to one client, and the slow-client policy.

    Broadcasts are *offered* (:meth:`offer`): that never waits, and a client
    that is slow by :func:`offer_verdict` is handled by
    ``WEBSOCKET_BROADCAST_OVERFLOW``. A view's own sends are *put*
    (:meth:`put`): they wait for room instead, as a socket write waits for the
    client to read. The writer side :meth:`take`\\ s items in order.

    ``_cond`` (one lock) guards the queue and the closed flag; any thread may
    call any method.
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._cond = threading.Condition()
        self._items: deque[T] = deque()
        self._closed = False
        # When the writer last took an item, or the queue last became non-empty.
        self._progress = time.monotonic()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def is_empty(self) -> bool:
        """Whether nothing waits, read without the lock (a snapshot: an item
        offered at this very moment may be missed, which only tells the caller
        that it was offered after this check)."""
        return not self._items

    def offer(self, item: T) -> Verdict:
        """Queue a broadcast without waiting, unless the client is too far behind."""
        with self._cond:
            if self._closed:
                return "dropped"
            now = time.monotonic()
            if not self._items:
                self._progress = now
            verdict = offer_verdict(len(self._items), now - self._progress, self._limits)
            if verdict != "queued":
                return verdict
            self._items.append(item)
            self._cond.notify_all()
            return "queued"

    def overflowed(self) -> bool:
        """Whether the client is slow by :func:`offer_verdict` now and the policy is to close it.

        Asked by the clock of a transport too, not only by the next broadcast:
        a client that stops reading after the last broadcast of a burst is cut.
        """
        with self._cond:
            if not self._items or self._closed:
                return False
            stalled_for = time.monotonic() - self._progress
            return offer_verdict(len(self._items), stalled_for, self._limits) == "overflow"

    def put(self, item: T, timeout: float | None = None) -> bool:
        """Queue a view's send, waiting while the outbox is full; ``False`` once closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while len(self._items) >= self._limits.broadcast_queue and not self._closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            if self._closed:
                return False
            if not self._items:
                self._progress = time.monotonic()
            self._items.append(item)
            self._cond.notify_all()
            return True

    def take(self) -> T | None:
        """The next waiting item, or ``None`` at once."""
        with self._cond:
            if not self._items:
                return None
            item = self._items.popleft()
            self._progress = time.monotonic()
            self._cond.notify_all()
            return item

    def peek(self) -> T | None:
        """The next waiting item, left in place, or ``None``."""
        with self._cond:
            return self._items[0] if self._items else None

    def replace_head(self, item: T) -> None:
        """Put *item* in place of the next one: what is left of it after a partial write."""
        with self._cond:
            self._items[0] = item
            self._progress = time.monotonic()

    def push_front(self, item: T) -> None:
        """Put *item* first, whatever the policy: part of it is written already."""
        with self._cond:
            if not self._items:
                self._progress = time.monotonic()
            self._items.appendleft(item)
            self._cond.notify_all()

    def take_all(self) -> list[T]:
        """Every waiting item, in order (a poll answers them all at once)."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._progress = time.monotonic()
            self._cond.notify_all()
            return items

    def wait(self, timeout: float | None) -> bool:
        """Wait up to *timeout* seconds for an item; whether there is one (or it closed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items and not self._closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self) -> None:
        """Refuse everything from now on; wakes every waiter."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

"""Read marks: how far the views have read each page's numbered messages (acknowledged sends).

A ``dwebsocket.js`` page numbers the messages it sends (1, 2, 3, ...) and
keeps each until the server says a view has read it; after a reconnect it
sends the others again. The server must then drop the copies of messages a
view read but whose acknowledgement the page never got (the connection
dropped in between): it keeps, per page, the number of the last message read.
The memory broker keeps marks in the process (:class:`MemoryReads`); the Redis
broker in Redis, so that a page reconnecting to another process is known there.

A mark is kept ``WEBSOCKET_HISTORY_TTL`` seconds after it last moved, as long
as a page may reconnect and recover its broadcasts.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from .. import conf

__all__ = ["MemoryReads", "ttl"]


def ttl() -> float:
    """Seconds a read mark is kept (``WEBSOCKET_HISTORY_TTL``, at least one)."""
    return max(float(conf.get("WEBSOCKET_HISTORY_TTL")), 1.0)


class MemoryReads:
    """Read marks in this process. ``_lock`` guards ``_marks`` (client -> (number, expiry), oldest first)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._marks: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def record(self, client: str, number: int) -> None:
        """Message *number* of *client* was read (marks only move forward)."""
        now = self._clock()
        with self._lock:
            self._sweep(now)
            current = self._marks.pop(client, (0, 0.0))[0]
            self._marks[client] = (max(current, number), now + ttl())

    def last(self, client: str) -> int:
        """The last number of *client* read, 0 if none is known."""
        with self._lock:
            self._sweep(self._clock())
            return self._marks.get(client, (0, 0.0))[0]

    def _sweep(self, now: float) -> None:
        """Drop expired marks (the oldest are first); hold ``_lock``."""
        while self._marks:
            client, (_, expiry) = next(iter(self._marks.items()))
            if expiry > now:
                return
            del self._marks[client]

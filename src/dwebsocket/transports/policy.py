"""What every transport must agree on, defined once.

The WSGI socket, ASGI, long-polling and test transports all take their
limits from :class:`Limits` and keep what waits for a slow client in an
:class:`Outbox`, so a limit means the same on every server and is tested
once. A leaf of the transports layer: it imports only settings, messages and _sync.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar, cast

from .. import conf
from .. import metrics as _metrics
from ..messages import Message, message_size
from ._sync import LightCondition

__all__ = [
    "BURST_BYTES_FACTOR", "BURST_FACTOR", "MESSAGE_OVERHEAD", "OVERFLOW_CLOSE", "RATE_CLOSE", "STALL_SECONDS",
    "ConnectionCount", "Limits", "Outbox", "RateMeter", "Verdict", "connections", "has_room", "offer_verdict",
    "parse_rate", "queued_size", "too_big",
]

#: What one queued message costs beyond its payload, in bytes: the Python
#: object and its slot in a queue. Counted in WEBSOCKET_MAX_QUEUE_BYTES so
#: that a flood of tiny messages is bounded in memory as well as big ones.
MESSAGE_OVERHEAD = 64


def queued_size(message: Message) -> int:
    """What *message* counts against ``WEBSOCKET_MAX_QUEUE_BYTES``: its inflated size and :data:`MESSAGE_OVERHEAD`."""
    return message_size(message) + MESSAGE_OVERHEAD


def has_room(count: int, size: int, adding: int, max_count: int, max_bytes: int | None) -> bool:
    """Whether a queue holding *count* items of *size* bytes takes one more of *adding* bytes.

    An empty queue takes any one item (a message larger than the byte budget
    still goes through, alone), so a queue holds at most
    ``max(max_bytes, one message)`` bytes.
    """
    if count == 0:
        return True
    if count >= max_count:
        return False
    return max_bytes is None or size + adding <= max_bytes


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(s|sec|second|m|min|minute)\s*$")
_UNIT_SECONDS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}


def parse_rate(value: object) -> tuple[int, float] | None:
    """``WEBSOCKET_RATE_LIMIT`` as (messages, seconds): ``"50/s"`` is (50, 1.0), ``"600/10s"`` (600, 10.0).

    ``None`` is no limit. Raises :class:`ValueError` naming the accepted forms for anything else.
    """
    if value is None:
        return None
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None or int(match.group(1)) <= 0 or match.group(2) == "0":
        raise ValueError(
            f"WEBSOCKET_RATE_LIMIT must be None or a rate such as \"50/s\", \"600/10s\" or "
            f"\"1000/m\" (messages per period); it is {value!r}."
        )
    span = float(match.group(2) or 1) * _UNIT_SECONDS[match.group(3)]
    return int(match.group(1)), span


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
    #: Bytes (inflated, plus :data:`MESSAGE_OVERHEAD` each) queued for the
    #: view, and waiting for the client; ``None``: counted in messages only.
    max_queue_bytes: int | None = conf.DEFAULTS["WEBSOCKET_MAX_QUEUE_BYTES"]
    #: Messages a client may send per period, as :func:`parse_rate` reads
    #: ``WEBSOCKET_RATE_LIMIT``; ``None``: no limit.
    rate_limit: tuple[int, float] | None = None
    #: Groups one connection may be in at once; ``None``: no limit.
    max_groups: int | None = conf.DEFAULTS["WEBSOCKET_MAX_GROUPS"]

    @classmethod
    def from_settings(cls) -> Limits:
        """The limits the project's settings ask for.

        Every connection keeps its limits: while the settings stay the same,
        connections share one instance (it is immutable) instead of each
        keeping a copy.
        """
        global _last_limits
        limits = cls(
            max_message_size=conf.get("WEBSOCKET_MAX_MESSAGE_SIZE"),
            max_queue=conf.get("WEBSOCKET_MAX_QUEUE"),
            ping_interval=conf.get("WEBSOCKET_PING_INTERVAL"),
            ping_timeout=conf.get("WEBSOCKET_PING_TIMEOUT"),
            close_timeout=conf.get("WEBSOCKET_CLOSE_TIMEOUT"),
            compression=bool(conf.get("WEBSOCKET_COMPRESSION")),
            broadcast_queue=conf.get("WEBSOCKET_BROADCAST_QUEUE"),
            broadcast_overflow=conf.get("WEBSOCKET_BROADCAST_OVERFLOW"),
            max_queue_bytes=conf.get("WEBSOCKET_MAX_QUEUE_BYTES"),
            rate_limit=parse_rate(conf.get("WEBSOCKET_RATE_LIMIT")),
            max_groups=conf.get("WEBSOCKET_MAX_GROUPS"),
        )
        last = _last_limits  # read once: another thread may replace it (with an equal or newer one)
        if last == limits:
            return last
        _last_limits = limits
        return limits


# The limits from_settings() gave last, shared by the connections opened since.
_last_limits: Limits | None = None


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

#: The close code and reason for a client over ``WEBSOCKET_RATE_LIMIT`` (policy violation).
RATE_CLOSE = (1008, "message rate limit exceeded")

T = TypeVar("T")


#: Seconds a client with WEBSOCKET_BROADCAST_QUEUE broadcasts waiting may take
#: none of them before it counts as slow. A burst fills a queue faster than any
#: client reads; a client that reads is taking broadcasts all along.
STALL_SECONDS = 1.0

#: However fast a client reads, no more than this many times
#: WEBSOCKET_BROADCAST_QUEUE broadcasts wait for it: what a burst may queue is bounded.
BURST_FACTOR = 16

#: However fast a client reads, no more than this many times
#: WEBSOCKET_MAX_QUEUE_BYTES bytes wait for it (16 MiB with the defaults).
BURST_BYTES_FACTOR = 4


def offer_verdict(waiting: int, stalled_for: float, limits: Limits, waiting_bytes: int = 0) -> Verdict:
    """What to do with a broadcast for a client that has *waiting* items (*waiting_bytes* bytes) not yet written.

    *stalled_for* is how long the client has gone without taking any. A client
    counts as slow when WEBSOCKET_BROADCAST_QUEUE broadcasts or
    WEBSOCKET_MAX_QUEUE_BYTES bytes wait for it and it took none for
    :data:`STALL_SECONDS`, or when :data:`BURST_FACTOR` times that many
    broadcasts (:data:`BURST_BYTES_FACTOR` times that many bytes) wait; a
    slow client is handled by WEBSOCKET_BROADCAST_OVERFLOW.
    """
    max_bytes = limits.max_queue_bytes
    full = waiting >= limits.broadcast_queue or (max_bytes is not None and waiting_bytes >= max_bytes)
    if not full:
        return "queued"
    burst_over = waiting >= BURST_FACTOR * limits.broadcast_queue or (
        max_bytes is not None and waiting_bytes >= BURST_BYTES_FACTOR * max_bytes
    )
    if stalled_for < STALL_SECONDS and not burst_over:
        return "queued"
    return "overflow" if limits.broadcast_overflow == "close" else "dropped"


class RateMeter:
    """``WEBSOCKET_RATE_LIMIT`` for one connection: a token bucket, refilled continuously.

    A client may send the limit's count of messages at once, then at the
    limit's pace. Owned by the one reader of the connection (the thread or
    task that parses what the client sends): no lock. Without a limit (the
    default) every connection gets the one shared meter that allows all, which
    keeps no state.
    """

    __slots__ = ("_count", "_per_second", "_tokens", "_updated")

    def __new__(cls, limits: Limits) -> RateMeter:
        if cls is RateMeter and not limits.rate_limit:
            return _UNLIMITED
        return super().__new__(cls)

    def __init__(self, limits: Limits) -> None:
        rate = limits.rate_limit
        self._count = float(rate[0]) if rate else 0.0
        self._per_second = rate[0] / rate[1] if rate else 0.0
        self._tokens = self._count
        self._updated = time.monotonic()

    def allow(self) -> bool:
        """Count one message from the client; ``False`` if it is over the limit (close with :data:`RATE_CLOSE`)."""
        if not self._count:
            return True
        now = time.monotonic()
        self._tokens = min(self._count, self._tokens + (now - self._updated) * self._per_second)
        self._updated = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class _Unlimited(RateMeter):
    """The meter of every connection without ``WEBSOCKET_RATE_LIMIT``: stateless, so shared."""

    __slots__ = ()

    def __new__(cls, limits: Limits | None = None) -> _Unlimited:
        return object.__new__(cls)

    def __init__(self, limits: Limits | None = None) -> None:
        pass

    def allow(self) -> bool:
        return True


_UNLIMITED = _Unlimited()


class ConnectionCount:
    """The connections this process holds open, against ``WEBSOCKET_MAX_CONNECTIONS``.

    A WebSocket connection takes a place when its handshake is checked,
    before the view runs; a long-polling session when its ``open`` request
    arrives, before a thread starts for its view. The place is given back
    exactly once, when the connection is closed (see
    ``dwebsocket.connection.Connection.admit``). ``_lock`` guards ``_open``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = 0

    def take(self, limit: int | None) -> bool:
        """Take a place, unless *limit* places are taken already; whether it was taken."""
        with self._lock:
            if limit is not None and self._open >= limit:
                return False
            self._open += 1
            return True

    def give_back(self) -> None:
        """Give back a place taken with :meth:`take`."""
        with self._lock:
            self._open -= 1

    @property
    def open(self) -> int:
        """How many places are taken now."""
        return self._open


#: This process's connections (WebSocket and long-polling alike).
connections = ConnectionCount()


class Outbox(Generic[T]):
    """What waits to be written to one client, and the slow-client policy.

    Broadcasts are *offered* (:meth:`offer`): that never waits, and a client
    that is slow by :func:`offer_verdict` is handled by
    ``WEBSOCKET_BROADCAST_OVERFLOW``. A view's own sends are *put*
    (:meth:`put`): they wait for room instead (``WEBSOCKET_BROADCAST_QUEUE``
    items, ``WEBSOCKET_MAX_QUEUE_BYTES`` bytes), as a socket write waits for
    the client to read. The writer side :meth:`take`\\ s items in order.
    *size* tells what an item counts against the byte budget.

    ``_cond`` (one lock) guards the queue, its byte count and the closed
    flag; any thread may call any method.
    """

    def __init__(self, limits: Limits, size: Callable[[T], int] | None = None) -> None:
        self._limits = limits
        self._size: Callable[[T], int] = size or _no_size
        self._cond = LightCondition(threading.Lock())  # no method takes it again while holding it
        # _NOTHING_WAITING (shared, immutable) while empty, so that an idle
        # connection keeps no deque (about 760 bytes); see _append and take.
        self._items: deque[T] = _NOTHING_WAITING
        self._bytes = 0
        self._closed = False
        # When the writer last took an item, or the queue last became non-empty.
        self._progress = time.monotonic()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    @property
    def bytes(self) -> int:
        """What the waiting items count against WEBSOCKET_MAX_QUEUE_BYTES (a snapshot)."""
        return self._bytes

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
            verdict = offer_verdict(len(self._items), now - self._progress, self._limits, self._bytes)
            if verdict != "queued":
                _metrics.overflowed(verdict)
                return verdict
            self._append(item)
            return "queued"

    def _append(self, item: T) -> None:
        """Queue *item* last; hold ``_cond``."""
        if self._items is _NOTHING_WAITING:
            self._items = deque()
        self._items.append(item)
        self._bytes += self._size(item)
        self._cond.notify_all()

    def overflowed(self) -> bool:
        """Whether the client is slow by :func:`offer_verdict` now and the policy is to close it.

        Asked by the clock of a transport too, not only by the next broadcast:
        a client that stops reading after the last broadcast of a burst is cut.
        """
        with self._cond:
            if not self._items or self._closed:
                return False
            stalled_for = time.monotonic() - self._progress
            if offer_verdict(len(self._items), stalled_for, self._limits, self._bytes) != "overflow":
                return False
            _metrics.overflowed("overflow")  # the caller closes the client now
            return True

    def put(self, item: T, timeout: float | None = None) -> bool:
        """Queue a view's send, waiting while the outbox is full; ``False`` once closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        size = self._size(item)
        limits = self._limits
        with self._cond:
            while not self._closed and not has_room(
                len(self._items), self._bytes, size, limits.broadcast_queue, limits.max_queue_bytes
            ):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            if self._closed:
                return False
            if not self._items:
                self._progress = time.monotonic()
            self._append(item)
            return True

    def take(self) -> T | None:
        """The next waiting item, or ``None`` at once."""
        with self._cond:
            if not self._items:
                return None
            item = self._items.popleft()
            if not self._items:
                self._items = _NOTHING_WAITING
            self._bytes -= self._size(item)
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
            if not self._items:  # emptied meanwhile (the connection ended)
                return
            self._bytes += self._size(item) - self._size(self._items[0])
            self._items[0] = item
            self._progress = time.monotonic()

    def push_front(self, item: T) -> None:
        """Put *item* first, whatever the policy: part of it is written already."""
        with self._cond:
            if not self._items:
                self._progress = time.monotonic()
            if self._items is _NOTHING_WAITING:
                self._items = deque()
            self._items.appendleft(item)
            self._bytes += self._size(item)
            self._cond.notify_all()

    def take_all(self) -> list[T]:
        """Every waiting item, in order (a poll answers them all at once)."""
        with self._cond:
            items = list(self._items)
            self._items = _NOTHING_WAITING
            self._bytes = 0
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


# The items of every empty outbox: a tuple, so nothing is ever appended to it.
_NOTHING_WAITING: deque[Any] = cast("deque[Any]", ())


def _no_size(item: object) -> int:
    return 0

"""Group history: each group's recent broadcasts, numbered, so a client can recover what it missed.

Every broadcast to a group gets the group's next :class:`Position`: ``seq``
counts the group's broadcasts (1, 2, 3, ...), and ``epoch`` names the history
that counts them; a new epoch starts whenever that history is lost, so a
position of another epoch never passes for one of this history.

:class:`MemoryHistory` keeps the history of one process (the memory broker's);
the Redis broker keeps its own in Redis with the same semantics
(``brokers/redis.py``). Both answer :meth:`~MemoryHistory.since` with a
:class:`Recovery`. docs/delivery.md describes the feature.

A leaf of the groups layer: it imports only the leaves :mod:`dwebsocket.conf`
and :mod:`dwebsocket.messages`.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from .. import conf
from ..messages import Message

__all__ = ["META_TTL", "Entry", "MemoryHistory", "Position", "Recovery", "configured", "new_epoch", "recovery"]

#: Seconds a group's counter (its epoch and seq) is kept after its last
#: broadcast: far longer than its messages, so that a client that missed
#: nothing is told so even after the messages expired ("nothing missed" is
#: asked seq == current seq; "expired" is asked seq < current seq with the
#: entries gone). Redis uses the same value for the meta hash's EXPIRE.
META_TTL = 86400

_EPOCH = re.compile(r"[0-9a-f]{1,64}")
_SEQ = re.compile(r"[0-9]{1,19}")


def configured() -> tuple[int, float] | None:
    """``(size, ttl)`` as the settings say now, or ``None`` while history is off (``WEBSOCKET_HISTORY_SIZE = 0``).

    Read at each call, like every setting, so ``override_settings`` works.
    """
    size = conf.get("WEBSOCKET_HISTORY_SIZE")
    if not size:
        return None
    return int(size), float(conf.get("WEBSOCKET_HISTORY_TTL"))


def new_epoch() -> str:
    """A fresh epoch: 16 random hex digits, never the same as one seen before (in practice)."""
    return secrets.token_hex(8)


@dataclass(frozen=True)
class Position:
    """A broadcast's place in its group's history: ``"<epoch>:<seq>"`` on the wire.

    ``seq`` 0 is the position before the group's first broadcast.
    """

    epoch: str  # names the history that counts (lowercase hex, no ':'); changes when the history is lost
    seq: int  # 1, 2, 3, ... per group; 0 = before the first broadcast

    def __str__(self) -> str:
        return f"{self.epoch}:{self.seq}"

    @classmethod
    def parse(cls, text: str) -> Position:
        """The position *text* spells (as :meth:`__str__` writes it); ``ValueError`` naming the problem.

        *text* usually comes from a client, so every part is checked: an epoch
        of 1 to 64 lowercase hex digits, a colon, a seq of 1 to 19 decimal digits.
        """
        if not isinstance(text, str):
            raise ValueError(f"a position is a string like '3f2a9c:42', not {type(text).__name__}")
        epoch, colon, seq = text.partition(":")
        if not colon:
            raise ValueError(f"a position is '<epoch>:<seq>', like '3f2a9c:42'; {text[:80]!r} has no ':'")
        if not _EPOCH.fullmatch(epoch):
            raise ValueError(f"the epoch of position {text[:80]!r} is not 1 to 64 lowercase hex digits")
        if not _SEQ.fullmatch(seq):
            raise ValueError(f"the seq of position {text[:80]!r} is not a number of 1 to 19 digits")
        return cls(epoch, int(seq))


@dataclass(frozen=True)
class Entry:
    """One kept broadcast."""

    position: Position
    message: Message
    exclude: str | None  # the id of the connection that must not get it


@dataclass(frozen=True)
class Recovery:
    """What a group's history holds after a position a client asked for."""

    entries: list[Entry]  # every kept broadcast after the asked position, in order
    position: Position  # the group's current position (the last broadcast's; seq 0 before any)
    complete: bool  # every broadcast after the asked position is in entries


def recovery(asked: Position, current: Position, entries: list[Entry]) -> Recovery:
    """The :class:`Recovery` for *asked*, given the group's *current* position and its kept *entries*.

    *entries* are those after ``asked.seq`` that are still kept (in order,
    expired ones left out). Another epoch, or a seq ahead of the group's, is
    a position of a history that is gone: nothing, not complete. Shared by
    both brokers so that "complete" means the same in each.
    """
    if asked.epoch != current.epoch or asked.seq > current.seq:
        return Recovery([], current, False)
    complete = [e.position.seq for e in entries] == list(range(asked.seq + 1, current.seq + 1))
    return Recovery(entries, current, complete)


class _Group:
    """One group's counter and ring; owned by a :class:`MemoryHistory`, under its lock."""

    __slots__ = ("epoch", "seq", "touched", "ring")

    def __init__(self, now: float, size: int) -> None:
        self.epoch = new_epoch()
        self.seq = 0
        self.touched = now  # when it was made, or broadcast to last
        self.ring: deque[tuple[float, Entry]] = deque(maxlen=size)  # (when appended, entry)


class MemoryHistory:
    """The history of every group of one process, for the memory broker.

    Each group has a ring of its last *size* broadcasts, each kept *ttl*
    seconds, and a counter kept :data:`META_TTL` seconds after its last
    broadcast. A group's counter gets a fresh random epoch when it is made,
    so the epochs of this instance are no other instance's (a restarted
    process starts new histories), and a counter dropped after a day of
    silence comes back under a new epoch.

    Expired entries and counters are dropped lazily by each call, a bounded
    amount of work per call (amortised O(1)): no thread.

    ``_lock`` guards ``_groups`` (group -> its :class:`_Group`, least
    recently broadcast to first) and ``_fresh`` (the groups whose ring may
    hold entries, least recently broadcast to first).
    """

    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        if size < 1:
            raise ValueError(f"a history keeps at least 1 broadcast per group, not {size!r}")
        self._size = size
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._groups: OrderedDict[str, _Group] = OrderedDict()
        self._fresh: OrderedDict[str, None] = OrderedDict()

    def append(self, group: str, message: Message, exclude: str | None) -> Position:
        """Keep *message* as *group*'s next broadcast; its position."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            record = self._group(group, now)
            record.seq += 1
            record.touched = now
            position = Position(record.epoch, record.seq)
            self._trim(record, now)
            record.ring.append((now, Entry(position, message, exclude)))
            self._groups.move_to_end(group)
            self._fresh[group] = None
            self._fresh.move_to_end(group)
            return position

    def position(self, group: str) -> Position:
        """*group*'s current position: its last broadcast's, or seq 0 before any.

        It starts the group's counter if there is none, so that a position
        handed out before the first broadcast stays valid.
        """
        now = self._clock()
        with self._lock:
            self._expire(now)  # counters made here are dropped too
            record = self._group(group, now)
            return Position(record.epoch, record.seq)

    def since(self, group: str, position: Position) -> Recovery:
        """Every kept broadcast of *group* after *position*, and whether none is missing."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            record = self._group(group, now)
            self._trim(record, now)
            current = Position(record.epoch, record.seq)
            entries = [entry for _, entry in record.ring if entry.position.seq > position.seq]
        return recovery(position, current, entries)

    # -- call with _lock held -----------------------------------------------------

    def _group(self, group: str, now: float) -> _Group:
        record = self._groups.get(group)
        if record is None:
            record = self._groups[group] = _Group(now, self._size)
        return record

    def _trim(self, record: _Group, now: float) -> None:
        """Drop *record*'s entries older than the TTL (they are oldest first)."""
        ring, oldest = record.ring, now - self._ttl
        while ring and ring[0][0] <= oldest:
            ring.popleft()

    def _expire(self, now: float) -> None:
        """Empty the rings of groups silent for the TTL, and drop counters silent for :data:`META_TTL`.

        Each group leaves ``_fresh`` (and ``_groups``) at most once per time it
        was put there, so this costs O(1) per append, amortised.
        """
        while self._fresh:
            name = next(iter(self._fresh))
            record = self._groups.get(name)
            if record is not None and record.touched > now - self._ttl:
                break
            if record is not None:
                record.ring.clear()
            del self._fresh[name]
        while self._groups:
            name, record = next(iter(self._groups.items()))
            if record.touched > now - META_TTL:
                break
            del self._groups[name]
            self._fresh.pop(name, None)

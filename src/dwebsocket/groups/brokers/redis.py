"""The Redis broker: broadcasts and presence across processes and hosts.

Broadcasts go through Redis pub/sub, one channel per group; each process
subscribes only to the groups it has members in, and delivers what it receives
to its own members. Pub/sub is at-most-once: a broadcast published while a
process is cut off from Redis never reaches that process's members. A process
always delivers its own broadcasts to its own members, exactly once: through
Redis when its listener is subscribed, else itself (see :class:`RedisBroker`).

**History** (docs/delivery.md): with ``WEBSOCKET_HISTORY_SIZE`` > 0 each
group has a counter, the hash ``<PREFIX>{<group>}:meta`` (``e``: its epoch,
``s``: its seq, kept :data:`~dwebsocket.groups.history.META_TTL` after the
last broadcast), and a stream ``<PREFIX>{<group>}:history`` of its last
broadcasts, entry ``<seq>-0`` for each (fields ``payload``, ``kind`` ``t`` or
``b``, ``exclude``, ``time`` in ms of Redis's clock), trimmed to about
``WEBSOCKET_HISTORY_SIZE`` entries (``MAXLEN ~``: at least that many) and
expiring ``WEBSOCKET_HISTORY_TTL`` after the last broadcast. The ``{group}``
hash tag puts a group's keys on one shard of a cluster. One script
(:data:`_PUBLISH`) takes the next position, keeps the broadcast and
publishes it, atomically: so the order of a group's broadcasts on its
channel, which every process delivers in, is their position order.

Presence lives in one sorted set per group (member -> expiry time), refreshed
by every process every ``_REFRESH`` seconds, so the members of a process that
died drop out after ``_TTL`` seconds.

Faults (docs/reliability.md): every call has a timeout
(:data:`~dwebsocket._redis.PUBLISH_TIMEOUT`,
:data:`~dwebsocket._redis.PRESENCE_TIMEOUT`); the first that fails opens a
breaker, and until Redis answers the listener's probe again nobody calls it.
No payload on a channel can end the listener: a malformed one is logged and
skipped.

**The outbox.** A broadcast that does not reach Redis (the breaker is open,
or its publish failed) is delivered to this process's members at once and
kept, oldest first, in a bounded outbox (``WEBSOCKET_OUTAGE_BUFFER``
broadcasts, each at most ``WEBSOCKET_HISTORY_TTL`` seconds). Once Redis
answers again the outbox is published in order, before any newer broadcast
of this process, through the same script (so each gets a history position)
and marked as delivered by its origin (this process's listener skips it; the
other processes deliver it, late). It waits :data:`_DRAIN_DELAY` after Redis
answers, so that the other processes' listeners, which reconnect within
their own backoff, are subscribed again and get it; meanwhile newer
broadcasts of this process join it (delivered here at once), to keep the
order. What the bound drops is counted and logged once per outage.

Threads: one listener thread owns the pub/sub connection: it subscribes,
receives, writes presence, reconnects with backoff and probes Redis. Other
threads publish and read presence through redis-py's connection pools, and
hand subscription and presence changes to the listener under ``_lock``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
import threading
import time
import uuid
from collections import deque
from typing import Any, NamedTuple

import redis

from ... import _redis, conf
from ... import metrics as _metrics
from ...connection import Link
from ...messages import Message
from ..history import META_TTL, Entry, Position, Recovery, configured, new_epoch, recovery
from ..reads import ttl as reads_ttl
from ..registry import Member, Registry
from ..status import publish as _publish_status

__all__ = ["Broadcast", "RedisBroker", "decode", "encode"]

logger = logging.getLogger("dwebsocket")

_PREFIX = _redis.PREFIX
_TTL = 30.0  # seconds a member counts without a refresh
_REFRESH = 10.0
_SKIP_FOR = 60.0  # seconds a broadcast whose PUBLISH failed may still come back from Redis


def _tag(group: str, cluster: bool) -> str:
    """What goes between the braces of the group's keys: its name, or on a cluster, for a
    name with a brace in it (which would cut the hash tag short), ``#`` and its SHA-256.

    (Names starting with ``#`` are hashed too, so that no name can be another's digest.)
    """
    if cluster and ("{" in group or "}" in group or group.startswith("#")):
        return "#" + hashlib.sha256(group.encode("utf-8")).hexdigest()
    return group


def _channel(group: str, cluster: bool = False) -> str:
    """The group's channel; on a cluster a shard channel in the slot of the group's keys."""
    return f"{_PREFIX}{{{_tag(group, True)}}}:group" if cluster else f"{_PREFIX}group:{group}"


def _presence_key(group: str, cluster: bool = False) -> str:
    """The group's presence set; on a cluster in the slot of the group's other keys."""
    return f"{_PREFIX}{{{_tag(group, True)}}}:presence" if cluster else f"{_PREFIX}presence:{group}"


def _failed(exc: redis.ResponseError) -> bool:
    """Whether an error answer means Redis cannot serve now (a demoted master, a cluster failing
    over), rather than a refusal of this command: then the breaker opens."""
    return isinstance(exc, (
        redis.exceptions.ReadOnlyError, redis.exceptions.ClusterError, redis.exceptions.TryAgainError,
        redis.exceptions.MasterDownError,
    ))


def _meta_key(group: str, cluster: bool = False) -> str:
    return f"{_PREFIX}{{{_tag(group, cluster)}}}:meta"


def _history_key(group: str, cluster: bool = False) -> str:
    return f"{_PREFIX}{{{_tag(group, cluster)}}}:history"


def _read_key(client: str) -> str:
    return f"{_PREFIX}read:{{{client}}}"


# KEYS: meta, history. ARGV: 1 an epoch to start if the group has none, 2 the
# history size, 3 its TTL in ms, 4 the meta's TTL in s, 5 the channel, 6 the
# broadcast's encoding up to its position (see _head), 7 its payload, 8 its
# kind (t or b), 9 the excluded connection id ("" for none).
# Returns {epoch, seq, how many subscribers PUBLISH reached}.
_PUBLISH = """
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  -- no counter (new, or expired or evicted): what is left of the stream is a lost history's
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch)
end
local seq = string.format('%d', redis.call('HINCRBY', KEYS[1], 's', 1))
redis.call('EXPIRE', KEYS[1], ARGV[4])
local now = redis.call('TIME')
local ms = string.format('%d', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
local added = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], seq .. '-0',
  'payload', ARGV[7], 'kind', ARGV[8], 'exclude', ARGV[9], 'time', ms)
if type(added) == 'table' and added.err then
  -- the stream is ahead of the counter (or no stream): a history that cannot go on; start another
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], seq .. '-0',
    'payload', ARGV[7], 'kind', ARGV[8], 'exclude', ARGV[9], 'time', ms)
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local receivers = redis.call('PUBLISH', ARGV[5],
  ARGV[6] .. string.len(epoch) .. ':' .. epoch .. string.len(seq) .. ':' .. seq .. ARGV[7])
return {epoch, tonumber(seq), receivers}
"""
# The same on a Redis Cluster: the channel is a shard channel with the keys' hash tag.
_PUBLISH_SHARDED = _PUBLISH.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
assert _PUBLISH_SHARDED != _PUBLISH

# KEYS: meta, history. ARGV: 1 the first stream id wanted. Returns {epoch or
# false, seq or false, the entries from that id on, TIME}: the one snapshot
# of since() on a cluster, whose pipelines redis-py (before 6) cannot run in
# MULTI.
_SINCE = """
local found = redis.call('HMGET', KEYS[1], 'e', 's')
return {found[1], found[2], redis.call('XRANGE', KEYS[2], ARGV[1], '+'), redis.call('TIME')}
"""

# KEYS: meta, history. ARGV: 1 an epoch to start if the group has none, 2 the
# meta's TTL in s. Returns {epoch, seq}: the group's current position.
_POSITION = """
local found = redis.call('HMGET', KEYS[1], 'e', 's')
if found[1] then
  return {found[1], tonumber(found[2]) or 0}
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'e', ARGV[1], 's', 0)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {ARGV[1], 0}
"""


class Broadcast(NamedTuple):
    """One broadcast as it travels through Redis."""

    message: Message
    exclude: str | None  # the id of the connection that must not get it
    origin: str  # the broker (process) that published it
    delivered: bool  # the origin already delivered it to its own members
    number: int = 0  # the origin's count of its broadcasts
    position: Position | None = None  # its place in the group's history, if it has one


def encode(
    message: Message, exclude: str | None, origin: str = "", delivered: bool = False, number: int = 0,
    position: Position | None = None,
) -> bytes:
    """One broadcast on the wire: ``<kind><flag><origin><number><exclude>[<epoch><seq>]<payload>``.

    *kind* is ``t`` or ``b`` (text or binary), ``T`` or ``B`` for one with a
    *position*; *flag* ``L`` when the origin delivered it to its own members
    (its listener then skips it), else ``-``; the origin's id, its number for
    the broadcast, the excluded connection id and, for ``T`` and ``B``, the
    position's epoch and seq are each counted, ``<length>:<UTF-8 bytes>``
    (``0:`` for none); the message is the rest. Every field is fixed or
    counted, so no value, whatever bytes it holds, can move where another
    field starts. The publish script builds the same bytes from
    :func:`_head` and the payload.
    """
    head, payload = _head(message, exclude, origin, delivered, number, position is not None)
    if position is None:
        return head + payload
    return head + _counted(position.epoch) + _counted(str(position.seq)) + payload


def _head(
    message: Message, exclude: str | None, origin: str, delivered: bool, number: int, positioned: bool
) -> tuple[bytes, bytes]:
    """The encoding of a broadcast up to its position (or its payload), and its payload."""
    if isinstance(message, str):
        kind, payload = (b"T" if positioned else b"t"), message.encode("utf-8")
    else:
        kind, payload = (b"B" if positioned else b"b"), message
    head = kind + (b"L" if delivered else b"-") + _counted(origin) + _counted(str(number)) + _counted(exclude or "")
    return head, payload


def decode(data: bytes) -> Broadcast:
    """The broadcast :func:`encode` made; ``ValueError`` if *data* is not one."""
    kind, flag = data[:1], data[1:2]
    if kind not in (b"t", b"b", b"T", b"B") or flag not in (b"L", b"-"):
        raise ValueError(f"not a broadcast: it starts with {data[:2]!r}")
    origin, offset = _uncount(data, 2)
    number, offset = _uncount(data, offset)
    exclude, offset = _uncount(data, offset)
    if not number.isdigit():
        raise ValueError(f"not a broadcast number: {number!r}")
    position = None
    if kind in (b"T", b"B"):
        epoch, offset = _uncount(data, offset)
        seq, offset = _uncount(data, offset)
        position = Position.parse(f"{epoch}:{seq}")
    payload = data[offset:]
    message: Message = payload.decode("utf-8") if kind in (b"t", b"T") else payload
    return Broadcast(message, exclude or None, origin, flag == b"L", int(number), position)


def _counted(value: str) -> bytes:
    data = value.encode("utf-8")
    return b"%d:" % len(data) + data


def _uncount(data: bytes, position: int) -> tuple[str, int]:
    """The counted string at *position* in *data*, and the position after it."""
    length, colon, _ = data[position:position + _MAX_LENGTH_DIGITS + 1].partition(b":")
    if not colon or not length.isdigit():
        raise ValueError(f"no field length at byte {position}")
    start = position + len(length) + 1
    end = start + int(length)
    if end > len(data):
        raise ValueError(f"a field at byte {position} is cut short")
    return data[start:end].decode("utf-8"), end


_MAX_LENGTH_DIGITS = 10  # digits of a field's length, at most


def _position(group: str, epoch: object, seq: object) -> Position | None:
    """The position a script or the meta hash gave; ``None`` (with a warning) if the counter is malformed.

    Only a counter written by something else than dwebsocket can be: Redis is
    shared, and nothing read from it may make a caller raise.
    """
    try:
        if not isinstance(epoch, bytes):
            raise ValueError(f"its epoch is a {type(epoch).__name__}")
        return Position.parse(f"{epoch.decode('ascii')}:{int(seq)}")  # type: ignore[call-overload]
    except (TypeError, ValueError) as exc:  # UnicodeDecodeError included
        logger.warning("dwebsocket: skipped the malformed history counter of group %r: %s", group, exc)
        return None


def _entry(epoch: str, entry_id: bytes, fields: dict[bytes, bytes]) -> tuple[int, Entry]:
    """One history stream entry: (its time in ms, the broadcast); ``ValueError`` or ``KeyError`` if malformed."""
    seq, dash, zero = entry_id.decode("ascii").partition("-")
    if not (seq.isdigit() and dash and zero == "0"):
        raise ValueError(f"entry id {entry_id!r} is not <seq>-0")
    kind, payload = fields[b"kind"], fields[b"payload"]
    if kind not in (b"t", b"b"):
        raise ValueError(f"kind {kind!r} is neither t nor b")
    message: Message = payload.decode("utf-8") if kind == b"t" else payload
    exclude = fields[b"exclude"].decode("utf-8") or None
    return int(fields[b"time"]), Entry(Position(epoch, int(seq)), message, exclude)


def _without_history(group: str, exc: Exception) -> None:
    """Redis would not run the history script (its data, its version): the broadcast goes without a position."""
    logger.warning(
        "dwebsocket: could not keep a broadcast to group %r in its history (%s); "
        "publishing it without a position.", group, exc,
    )


class _Kept(NamedTuple):
    """A broadcast of ours that did not reach Redis, delivered here already, waiting in the outbox."""

    group: str
    message: Message
    exclude: str | None
    kept_at: float  # time.monotonic() when it was kept


def _outbox_limit() -> int:
    """``WEBSOCKET_OUTAGE_BUFFER``: broadcasts the outbox holds at most (0: no outbox)."""
    return max(int(conf.get("WEBSOCKET_OUTAGE_BUFFER") or 0), 0)


class _Backoff:
    """Waits between reconnection attempts: 0.1 s doubling up to 2 s, never more.

    Each wait is drawn between half and all of the current step (jitter, so
    that the processes of a deployment do not all reconnect at once).
    """

    FIRST = 0.1
    LAST = 2.0

    def __init__(self) -> None:
        self._step = self.FIRST

    def reset(self) -> None:
        self._step = self.FIRST

    def next(self) -> float:
        delay = self._step * (0.5 + random.random() / 2)
        self._step = min(self._step * 2, self.LAST)
        return delay


#: Seconds after Redis answers again before the outbox is published: the
#: other processes' listeners reconnect within their backoff's longest wait
#: (plus a probe), and a broadcast published before they subscribe again
#: reaches none of their members.
_DRAIN_DELAY = _Backoff.LAST + 1.0


class _Tripped(Exception):
    """A caller found Redis failing (the breaker opened): the listener reconnects."""


class RedisBroker:
    """Broadcasts and presence shared by every process that uses the same Redis.

    **Delivery to this process's own members.** A broadcast normally reaches
    them back through Redis, like every other process's members, so that all
    see one order. When the listener is not subscribed to the group's channel
    (Redis was lost, the subscription is not confirmed yet, or ``PUBLISH``
    says nobody got it), the publisher delivers to its own members itself and
    marks the broadcast as delivered, so that its listener skips it if it
    arrives after all: each member gets it exactly once.

    **The breaker.** When a call to Redis fails (it is down, or hung past a
    timeout of :mod:`dwebsocket._redis`), the breaker opens: until the
    listener has had a real answer from Redis again, ``publish`` delivers to
    this process's members only, and ``size``/``members`` count them only,
    without calling Redis, so no caller waits on a Redis that does not answer.

    **Positions.** With history on, every broadcast that reaches Redis gets
    the group's next position from the publish script, and every member
    gets it with that position, in position order: through Redis that is the
    channel's order. So a publisher whose members' subscription is pending
    (a join just asked for it) waits for it, at most ``PUBLISH_TIMEOUT``:
    delivering them itself meanwhile would put its broadcasts before older
    ones of other processes that the new subscription brings. If it still is
    not live after that, the publisher delivers to its own members itself,
    holding ``_order`` from before it takes the position, and
    the listener holds it to go live for a group and to deliver each
    broadcast: so a broadcast delivered by its publisher comes before every
    later one the listener delivers. A broadcast that fails to reach Redis
    has no position. (When the listener loses its subscription without
    knowing yet, Redis restarting, concurrent publishers deliver themselves
    without that order: that history is lost anyway, see docs/reliability.md.)

    ``_lock`` guards ``_wanted``, ``_presence``, ``_changes``, ``_requested``,
    ``_done`` (what the listener must do next, and how far it got),
    ``_reachable`` (the breaker: ``False`` while open), ``_live`` (the
    groups the listener's current connection is confirmed subscribed to) and
    ``_skip`` (our broadcasts the listener must not deliver again),
    ``_reads`` (read marks the listener has yet to write, see ``groups.reads``)
    and the outbox: ``_outbox``, ``_sending`` and its counts.
    ``_order`` guards no data: it orders deliveries, see above (lock order:
    ``_order``, then ``_lock``, then the registry's).

    **The outbox** (see the module): appended to by any publisher that
    failed to reach Redis, under ``_lock``; emptied by :meth:`_drain` only,
    which holds ``_draining`` for the whole drain, so one thread at a time
    publishes kept broadcasts, in order. The entry being published is
    ``_sending`` (taken out of the outbox, put back first if its publish
    fails). ``_drain_at`` (under ``_lock``) is when the outbox may be
    published: :data:`_DRAIN_DELAY` after Redis answered again. A publisher
    that finds Redis reachable with an outbox not empty (or an entry being
    sent) keeps its broadcast too before then, and drains first after,
    waiting on ``_draining``: so no newer broadcast of this process overtakes
    a kept one. ``_draining`` is
    taken holding no other lock (and ``_lock`` only briefly inside it). The
    listener drains after each reconnection and on each turn.
    """

    def __init__(self, url: str, registry: Registry) -> None:
        self._url = url
        self._registry = registry
        #: A Redis Cluster: sharded pub/sub, and every key of a group under its hash tag.
        self._cluster = _redis.is_cluster(url)
        #: This broker's id in the broadcasts it publishes.
        self._origin = uuid.uuid4().hex
        # Blocking pools: a burst of broadcasts from many threads waits for a
        # connection rather than failing (redis-py's default pool raises at 100).
        self._redis = _redis.client(url)  # the listener: pub/sub and presence writes
        self._publisher = _redis.client(url, _redis.PUBLISH_TIMEOUT)
        self._reader = _redis.client(url, _redis.PRESENCE_TIMEOUT)  # presence reads, probes
        self._lock = threading.Lock()
        self._order = threading.Lock()
        # Scripts are per Redis server: redis-py loads them again after a restart (NOSCRIPT).
        self._publish_script = self._publisher.register_script(_PUBLISH_SHARDED if self._cluster else _PUBLISH)
        self._position_script = self._reader.register_script(_POSITION)
        self._since_script = self._reader.register_script(_SINCE)
        self._wanted: set[str] = set()
        self._presence: dict[str, dict[str, str]] = {}  # group -> member id -> entry
        self._changes: list[tuple[bool, str, str]] = []  # (joined?, group, entry), in order
        self._reads: dict[str, int] = {}  # client -> the last number read, not written yet
        self._reachable = True
        self._live: set[str] = set()
        self._count = itertools.count(1)  # numbers of our broadcasts (next() is atomic)
        # Our broadcasts whose PUBLISH failed and that we delivered to our
        # members ourselves: Redis may run it all the same (a timeout does not
        # say), and then our listener must skip it. Number -> when, oldest first.
        self._skip: dict[int, float] = {}
        # The outbox (see the class): oldest first, under _lock; drained under _draining.
        self._outbox: deque[_Kept] = deque()
        self._sending: _Kept | None = None
        self._draining = threading.Lock()
        self._drain_at = 0.0  # time.monotonic() from which the outbox may be published
        self._republished = 0  # since the outbox was last empty: published late,
        self._dropped_full = 0  # dropped for the bound,
        self._dropped_old = 0  # dropped for their age
        self._stopped = threading.Event()
        self._wake = threading.Event()
        # Waited on through _applied: how many changes were asked for, and how
        # many the listener has written to Redis.
        self._requested = 0
        self._done = 0
        self._applied = threading.Condition(self._lock)
        try:
            self._reader.ping()
        except _redis.ERRORS as exc:
            self._reachable = False
            logger.error(
                "dwebsocket: cannot reach Redis at WEBSOCKET_BROKER = %r (%s). Start Redis "
                "or fix the setting; until then broadcasts reach this process's members only.",
                url, exc,
            )
        self._listener = threading.Thread(target=self._listen, name="dwebsocket-redis", daemon=True)
        self._listener.start()

    # -- called from any thread ---------------------------------------------

    def publish(self, group: str, message: Message, exclude: str | None) -> bool:
        """Publish through Redis; ``False`` if only this process's members got it (it is kept, see the class)."""
        waiting = self._kept_waiting()
        if waiting == "hold":  # older broadcasts of ours wait for the other processes: after them
            self._registry.deliver(group, message, exclude)
            self._keep(group, message, exclude)
            return False
        if waiting == "drain":
            self._drain()  # our older broadcasts first
        settings = configured()
        with self._lock:
            reachable, live, wanted = self._reachable, group in self._live, group in self._wanted
            if settings is not None and reachable and wanted and not live:
                # Our members' subscription is on its way (a join just made
                # it): wait for it, bounded, so that they get this broadcast
                # in the channel's order, with everyone else's.
                self._applied.wait_for(
                    lambda: group in self._live or not self._reachable or group not in self._wanted,
                    _redis.PUBLISH_TIMEOUT,
                )
                reachable, live, wanted = self._reachable, group in self._live, group in self._wanted
        if not reachable:  # the breaker is open: fail fast
            _metrics.publish_failed()
            self._registry.deliver(group, message, exclude)
            self._keep(group, message, exclude)
            return False
        if settings is None:
            return self._publish(group, message, exclude, live)
        if live or not wanted:  # the channel orders our members' deliveries, or we have none
            return self._publish_kept(group, message, exclude, live, settings)
        with self._order:  # see the class: our members get it from us, in order with the listener's
            with self._lock:
                live = group in self._live  # the listener may have gone live meanwhile
            return self._publish_kept(group, message, exclude, live, settings)

    def _publish(self, group: str, message: Message, exclude: str | None, live: bool) -> bool:
        """Publish without a position (history off, or Redis would not run the history script)."""
        if not live:  # our listener would not get it back
            self._registry.deliver(group, message, exclude)
        number = next(self._count)
        try:
            receivers = _redis.publish(
                self._publisher, _channel(group, self._cluster),
                encode(message, exclude, self._origin, not live, number),
            )
        except _redis.ERRORS as exc:
            _metrics.publish_failed()
            if live:
                self._skip_later(number)
                self._registry.deliver(group, message, exclude)  # local delivery goes on
            self._keep(group, message, exclude)
            self._outage(exc)
            return False
        if live and not receivers:
            # Nobody got it, our listener included: it lost its subscription
            # (Redis restarted) and does not know yet.
            self._registry.deliver(group, message, exclude)
        return True

    def _publish_kept(
        self, group: str, message: Message, exclude: str | None, live: bool, settings: tuple[int, float]
    ) -> bool:
        """Publish with the group's next position, keeping the broadcast in its history (one script)."""
        number = next(self._count)
        try:
            epoch, seq, receivers = self._run_script(group, message, exclude, not live, number, settings)
        except redis.ResponseError as exc:  # Redis answered, but would not run it (its data, its version)
            if _failed(exc):
                return self._publish_failed(group, message, exclude, live, number, exc)
            _without_history(group, exc)
            return self._publish(group, message, exclude, live)
        except _redis.ERRORS as exc:
            return self._publish_failed(group, message, exclude, live, number, exc)
        position = _position(group, epoch, seq)
        if not live or not receivers:
            # Our listener does not get it back: not subscribed (yet), or it
            # lost its subscription (Redis restarted) and does not know yet.
            self._registry.deliver(group, message, exclude, position)
        return True

    def _publish_failed(
        self, group: str, message: Message, exclude: str | None, live: bool, number: int, exc: Exception
    ) -> bool:
        """The publish script failed: deliver here, without a position, and open the breaker."""
        _metrics.publish_failed()
        if live:
            self._skip_later(number)
        self._registry.deliver(group, message, exclude)  # local delivery goes on, without a position
        self._keep(group, message, exclude)
        self._outage(exc)
        return False

    def _run_script(
        self, group: str, message: Message, exclude: str | None, delivered: bool, number: int,
        settings: tuple[int, float],
    ) -> Any:
        """Run the publish script for one broadcast: ``[epoch, seq, receivers]``; raises what redis-py raises."""
        size, ttl = settings
        head, payload = _head(message, exclude, self._origin, delivered, number, True)
        return self._publish_script(
            keys=[_meta_key(group, self._cluster), _history_key(group, self._cluster)],
            args=[
                new_epoch(), size, max(1, round(ttl * 1000)), META_TTL, _channel(group, self._cluster), head, payload,
                "t" if isinstance(message, str) else "b", exclude or "",
            ],
        )

    # -- the outbox ----------------------------------------------------------

    def _keep(self, group: str, message: Message, exclude: str | None) -> None:
        """Keep a broadcast that did not reach Redis (delivered here already) for :meth:`_drain`."""
        limit = _outbox_limit()
        if not limit:
            return
        with self._lock:
            self._outbox.append(_Kept(group, message, exclude, time.monotonic()))
            self._trim(limit)

    def _trim(self, limit: int) -> None:
        """Drop (and count) what is past the outbox's bound or age, oldest first; the caller holds ``_lock``."""
        oldest = time.monotonic() - float(conf.get("WEBSOCKET_HISTORY_TTL"))
        while len(self._outbox) > limit:
            self._outbox.popleft()
            self._dropped_full += 1
            _metrics.outbox("full")
        while self._outbox and self._outbox[0].kept_at < oldest:
            self._outbox.popleft()
            self._dropped_old += 1
            _metrics.outbox("expired")

    def _kept_waiting(self) -> str:
        """``"drain"`` if Redis is reachable and kept broadcasts wait to be published (or are being
        published), ``"hold"`` if they wait for :data:`_DRAIN_DELAY`, else ``""``."""
        if not self._outbox and self._sending is None:
            return ""  # every broadcast asks: the usual answer, read without the lock (a publisher
            # failing meanwhile races the caller with or without it)
        with self._lock:
            if not (self._reachable and (self._outbox or self._sending is not None)):
                return ""
            return "drain" if time.monotonic() >= self._drain_at else "hold"

    def _drain(self) -> None:
        """Publish the outbox, oldest first, until it is empty or Redis fails again (see the class)."""
        with self._draining:
            while True:
                with self._lock:
                    self._trim(_outbox_limit())
                    if not self._reachable or not self._outbox or time.monotonic() < self._drain_at:
                        break
                    kept = self._sending = self._outbox.popleft()
                published = self._republish(kept)
                with self._lock:
                    self._sending = None
                    if not published:  # Redis failed again (the breaker is open): it goes first next time
                        self._outbox.appendleft(kept)
                        self._trim(_outbox_limit())
                        return
                    self._republished += 1
                _metrics.outbox("published")
            with self._lock:
                if self._outbox or not (self._republished or self._dropped_full or self._dropped_old):
                    return
                counts = self._republished, self._dropped_full, self._dropped_old
                self._republished = self._dropped_full = self._dropped_old = 0
        logger.warning(
            "dwebsocket: published %d broadcast(s) kept while Redis was unreachable; dropped %d "
            "(WEBSOCKET_OUTAGE_BUFFER full) and %d (older than WEBSOCKET_HISTORY_TTL).", *counts,
        )

    def _republish(self, kept: _Kept) -> bool:
        """Publish one kept broadcast, marked delivered by us; ``False`` (breaker open) if Redis failed."""
        number = next(self._count)
        channel = _channel(kept.group, self._cluster)
        settings = configured()
        try:
            if settings is not None:
                try:
                    self._run_script(kept.group, kept.message, kept.exclude, True, number, settings)
                    return True
                except redis.ResponseError as exc:
                    if _failed(exc):
                        raise
                    _without_history(kept.group, exc)
            _redis.publish(self._publisher, channel, encode(kept.message, kept.exclude, self._origin, True, number))
            return True
        except _redis.ERRORS as exc:  # failover ResponseErrors included
            self._outage(exc)
            return False

    def _skip_later(self, number: int) -> None:
        """Our listener must not deliver our broadcast *number* if Redis ran it after all."""
        now = time.monotonic()
        with self._lock:
            self._skip[number] = now
            while next(iter(self._skip.values())) < now - _SKIP_FOR:
                del self._skip[next(iter(self._skip))]

    def position(self, group: str) -> Position | None:
        """The group's current position; ``None`` with history off or Redis failing."""
        if configured() is None or not self._is_reachable():
            return None
        try:
            epoch, seq = self._position_script(
                keys=[_meta_key(group, self._cluster), _history_key(group, self._cluster)],
                args=[new_epoch(), META_TTL], client=self._reader,
            )
            return _position(group, epoch, seq)
        except redis.ResponseError as exc:
            if _failed(exc):
                self._outage(exc)
                return None
            logger.warning("dwebsocket: could not read the position of group %r (%s)", group, exc)
            return None
        except _redis.ERRORS as exc:
            self._outage(exc)
            return None

    def since(self, group: str, position: Position) -> Recovery | None:
        """The kept broadcasts after *position*, in one round trip; ``None`` with history off or Redis failing."""
        settings = configured()
        if settings is None or not self._is_reachable():
            return None
        try:
            if self._cluster:
                epoch, seq, raw, (seconds, micros) = self._since_script(
                    keys=[_meta_key(group, self._cluster), _history_key(group, self._cluster)],
                    args=[f"{position.seq + 1}-0"],
                )
                found = [(entry_id, dict(zip(fields[::2], fields[1::2]))) for entry_id, fields in raw]
                epoch, seq = epoch or None, seq or None  # a missing field comes out of Lua as false
            else:
                pipe = self._reader.pipeline(transaction=True)  # one snapshot of the counter and the stream
                pipe.hmget(_meta_key(group, self._cluster), "e", "s")
                pipe.xrange(_history_key(group, self._cluster), f"{position.seq + 1}-0", "+")
                pipe.time()
                (epoch, seq), found, (seconds, micros) = pipe.execute()
        except redis.ResponseError as exc:
            if _failed(exc):
                self._outage(exc)
                return None
            logger.warning("dwebsocket: could not read the history of group %r (%s)", group, exc)
            return None
        except _redis.ERRORS as exc:
            self._outage(exc)
            return None
        if epoch is None:  # no counter: the history is lost; start a new one
            current = self.position(group)
            return None if current is None else Recovery([], current, False)
        current = _position(group, epoch, seq or 0)
        if current is None:
            return None
        oldest = int(seconds) * 1000 + int(micros) // 1000 - round(settings[1] * 1000)
        entries, malformed = [], False
        for entry_id, fields in found:
            try:
                when, entry = _entry(current.epoch, entry_id, fields)
            except (KeyError, TypeError, ValueError) as exc:  # UnicodeDecodeError included
                logger.warning("dwebsocket: skipped a malformed history entry of group %r: %s", group, exc)
                malformed = True
                continue
            if when > oldest:
                entries.append(entry)
        found_recovery = recovery(position, current, entries)
        if malformed and found_recovery.complete:
            return Recovery(found_recovery.entries, current, False)
        return found_recovery

    #: Joins reach Redis through the listener thread: flush() waits for them.
    synchronous = False

    def flush(self, timeout: float) -> None:
        """Wait until the subscriptions and presence asked for so far are in Redis."""
        with self._lock:
            target = self._requested
            self._applied.wait_for(lambda: self._done >= target or not self._reachable, timeout)

    def subscribe(self, group: str) -> None:
        with self._lock:
            self._wanted.add(group)
            self._requested += 1
        self._wake.set()

    def unsubscribe(self, group: str) -> None:
        with self._lock:
            self._wanted.discard(group)
            self._requested += 1
        self._wake.set()

    def add_member(self, group: str, link: Link) -> None:
        entry = json.dumps({"id": link.id, "user": link.user_id}, separators=(",", ":"))
        with self._lock:
            self._presence.setdefault(group, {})[link.id] = entry
            self._changes.append((True, group, entry))
            self._requested += 1
        self._wake.set()

    def remove_member(self, group: str, link: Link) -> None:
        with self._lock:
            entry = self._presence.get(group, {}).pop(link.id, None)
            if entry is not None:
                self._changes.append((False, group, entry))
                self._requested += 1
            if not self._presence.get(group, True):
                del self._presence[group]
        self._wake.set()

    def size(self, group: str) -> int:
        """Members across processes; this process's only while the breaker is open."""
        self.flush(2.0)  # this process's own joins and leaves count at once
        if not self._is_reachable():
            return len(self._registry.local(group))
        key = _presence_key(group, self._cluster)
        try:
            pipe = self._reader.pipeline()  # one key: one slot on a cluster too
            pipe.zremrangebyscore(key, "-inf", time.time())
            pipe.zcard(key)
            return int(pipe.execute()[1])
        except _redis.ERRORS as exc:
            self._outage(exc)
            return len(self._registry.local(group))

    def members(self, group: str) -> list[Member]:
        """Members across processes; this process's only while the breaker is open."""
        self.flush(2.0)
        if not self._is_reachable():
            return self._registry.members(group)
        try:
            entries = self._reader.zrangebyscore(_presence_key(group, self._cluster), time.time(), "+inf")
        except _redis.ERRORS as exc:
            self._outage(exc)
            return self._registry.members(group)
        members = []
        for raw in entries:  # type: ignore[union-attr]
            try:
                entry = json.loads(raw)  # type: ignore[arg-type]
                members.append(Member(str(entry["id"]), entry.get("user")))
            except (ValueError, TypeError, KeyError):
                logger.warning(
                    "dwebsocket: skipped a malformed presence entry in %s", _presence_key(group, self._cluster)
                )
        return members

    def record_read(self, client: str, number: int) -> None:
        """Keep the mark; the listener writes it to Redis within its next turn (0.2 s at most)."""
        with self._lock:
            if number > self._reads.get(client, 0):
                self._reads[client] = number
        self._wake.set()

    def last_read(self, client: str) -> int:
        """The mark in Redis, or the one not written yet; 0 while Redis is failing and nothing is known here."""
        with self._lock:
            pending = self._reads.get(client, 0)
        if not self._is_reachable():
            return pending
        try:
            value = self._reader.get(_read_key(client))
        except _redis.ERRORS as exc:
            self._outage(exc)
            return pending
        try:
            stored = int(value) if value is not None else 0  # type: ignore[arg-type]
        except (TypeError, ValueError):
            stored = 0
        return max(stored, pending)

    def _write_reads(self) -> None:
        """Write the read marks recorded since the last turn (the listener's)."""
        with self._lock:
            reads, self._reads = self._reads, {}
        if not reads:
            return
        expiry = max(int(reads_ttl()), 1)
        pipe = self._redis.pipeline(transaction=False)  # on a cluster, redis-py splits it by slot
        for client, number in reads.items():
            pipe.set(_read_key(client), number, ex=expiry)
        try:
            pipe.execute()
        except _redis.ERRORS:
            with self._lock:  # again after reconnecting, unless a later mark came meanwhile
                for client, number in reads.items():
                    if number > self._reads.get(client, 0):
                        self._reads[client] = number
            raise

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()

    # -- health: the breaker -------------------------------------------------

    def _is_reachable(self) -> bool:
        with self._lock:
            return self._reachable

    def _outage(self, exc: Exception) -> None:
        """A call to Redis failed: open the breaker (the listener reconnects and probes)."""
        with self._lock:
            was_reachable, self._reachable = self._reachable, False
            self._applied.notify_all()  # nobody waits for an unreachable Redis
        self._wake.set()
        if was_reachable and not self._stopped.is_set():
            logger.warning(
                "dwebsocket: lost Redis at WEBSOCKET_BROKER = %r (%s); broadcasts reach this "
                "process's members only until it is back. Reconnecting.",
                self._url, exc,
            )

    def _recovered(self) -> None:
        """Redis answered the listener: close the breaker."""
        with self._lock:
            was_reachable, self._reachable = self._reachable, True
            if not was_reachable:
                self._drain_at = time.monotonic() + _DRAIN_DELAY  # see the class
        if not was_reachable:
            _metrics.broker_reconnected()
            logger.warning("dwebsocket: Redis at WEBSOCKET_BROKER = %r is back.", self._url)

    # -- the listener thread -------------------------------------------------

    def _listen(self) -> None:
        backoff = _Backoff()
        failed = False  # the last connection ended in an error (a cluster's slots may have moved)
        while not self._stopped.is_set():
            # It sees subscription confirmations: see _handle.
            pubsub = _redis.Subscriber(self._redis, after_error=failed)
            failed = True
            try:
                self._serve(pubsub, backoff)
                failed = False
            except _Tripped:
                pass  # reconnect at once (and subscribe again); the probe decides whether Redis is back
            except _redis.LISTENER_ERRORS as exc:
                self._outage(exc)
                self._stopped.wait(backoff.next())
            except Exception:  # a bug: logged, and the listener goes on
                logger.exception("dwebsocket: error in the Redis listener; reconnecting")
                self._stopped.wait(backoff.next())
            finally:
                with self._lock:
                    self._live.clear()  # publishers deliver locally from now on
                try:
                    pubsub.close()
                except Exception:
                    pass

    def _serve(self, pubsub: _redis.Subscriber, backoff: _Backoff) -> None:
        """Run until Redis fails, a caller trips the breaker, or the broker stops."""
        _redis.ping(self._reader)  # a real round trip before anyone is told Redis is back
        self._write_presence(refresh=True)  # after a (re)connection, all of it again
        self._recovered()
        backoff.reset()
        # The listener's own: the groups asked for on this connection, and the
        # confirmations still to come for each (a group is live, see _live,
        # once none is pending and it is still asked for).
        subscribed: set[str] = set()
        pending: dict[str, int] = {}
        channels: dict[str, str] = {}  # channel -> its group, for every group asked for

        next_refresh = time.monotonic() + _REFRESH
        while not self._stopped.is_set():
            with self._lock:
                if not self._reachable:
                    raise _Tripped
                wanted = set(self._wanted)
                requested = self._requested
                self._live -= subscribed - wanted  # publishers deliver locally from now on
            for group in wanted ^ subscribed:
                pending[group] = pending.get(group, 0) + 1
            channels.update((_channel(g, self._cluster), g) for g in wanted - subscribed)
            if wanted - subscribed:
                pubsub.subscribe(*(_channel(g, self._cluster) for g in wanted - subscribed))
            if subscribed - wanted:
                pubsub.unsubscribe(*(_channel(g, self._cluster) for g in subscribed - wanted))
            subscribed = wanted
            self._write_presence(refresh=time.monotonic() >= next_refresh)
            self._write_reads()
            if self._kept_waiting() == "drain":  # what we broadcast while Redis was lost (see the class)
                self._drain()
            _publish_status(self._redis, self._origin, self._registry, self._url)  # every INTERVAL seconds
            if time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + _REFRESH
            with self._lock:
                self._done = requested
                self._applied.notify_all()
            self._wake.clear()
            if not subscribed and not pending:
                self._wake.wait(0.5)
                continue
            for message in pubsub.messages(0.2):
                self._handle(message, subscribed, pending, channels)

    def _handle(
        self, message: dict[str, Any], subscribed: set[str], pending: dict[str, int], channels: dict[str, str]
    ) -> None:
        """One message of the pub/sub connection: a (un)subscription confirmed, or a broadcast."""
        kind, channel = message.get("type"), message.get("channel")
        if not isinstance(channel, bytes):
            return
        group = channels.get(channel.decode("utf-8", "replace"))
        if group is None:
            return  # not one this connection asked for
        if kind in ("subscribe", "unsubscribe"):
            if group not in pending and group in subscribed:
                # Nobody asked: a cluster moved the channel's slot (a failover,
                # resharding) and dropped the subscription. Start again.
                raise _Tripped
            left = pending.get(group, 1) - 1
            if left > 0:
                pending[group] = left
                return
            pending.pop(group, None)
            with self._order, self._lock:  # not while a publisher delivers itself: see the class
                if group in subscribed:
                    self._live.add(group)  # from now on our own broadcasts come back to us
                    self._applied.notify_all()  # publishers waiting for it
                else:
                    self._live.discard(group)
        elif kind == "message":
            self._received(group, message.get("data"))

    def _received(self, group: str, data: object) -> None:
        """Deliver one broadcast to this process's members; nothing in it can raise."""
        try:
            if not isinstance(data, bytes):
                raise ValueError(f"a {type(data).__name__}, not bytes")
            broadcast = decode(data)
        except ValueError as exc:  # UnicodeDecodeError included
            logger.warning("dwebsocket: skipped a malformed broadcast to group %r: %s", group, exc)
            return
        if broadcast.origin == self._origin:
            if broadcast.delivered:
                return  # we delivered it to our members when we published it
            with self._lock:
                if self._skip.pop(broadcast.number, None) is not None:
                    return  # its PUBLISH failed, we delivered it then, and Redis ran it after all
        try:
            with self._order:  # after a publisher's own delivery of an earlier position, see the class
                self._registry.deliver(group, broadcast.message, broadcast.exclude, broadcast.position)
        except Exception:
            logger.exception("dwebsocket: error delivering a broadcast to group %r", group)

    def _write_presence(self, refresh: bool) -> None:
        """Write joins and leaves in order; with *refresh*, every local member's expiry again."""
        with self._lock:
            changes, self._changes = self._changes, []
            if refresh:
                changes += [(True, g, e) for g, entries in self._presence.items() for e in entries.values()]
        if not changes:
            return
        expiry = time.time() + _TTL
        pipe = self._redis.pipeline(transaction=False)
        for joined, group, entry in changes:
            key = _presence_key(group, self._cluster)
            if joined:
                pipe.zadd(key, {entry: expiry})
                pipe.expire(key, int(_TTL * 2))
            else:
                pipe.zrem(key, entry)
        try:
            pipe.execute()
        except _redis.ERRORS:
            with self._lock:
                # Again after reconnecting (the refresh then brings back every join).
                self._changes[:0] = [c for c in changes if not c[0]]
            raise

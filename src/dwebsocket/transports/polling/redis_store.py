"""Polling sessions kept in Redis, so that any process can serve any request.

The :class:`~dwebsocket.transports.polling.store.SessionStore` for
``WEBSOCKET_BROKER = "redis://..."``. The view runs in the process that opened
the session (its *owner*); polls, sends and closes may reach any process::

    dwebsocket:poll:<sid>         hash: the client binding and the owner   (written at open; lives
                                  while the owner does: see below)
    dwebsocket:poll:<sid>:out     list: items for the client               (the owner pushes, polls pop)
    dwebsocket:poll:<sid>:in      list: items for the view                 (any process pushes, the owner pops)
    dwebsocket:poll:<sid>:seen    the time of the last poll                (polls write, the owner reads)
    dwebsocket:poll-owner:<id>    pub/sub: "session S has input"           (senders publish, the owner listens)

On a Redis Cluster (``redis+cluster://``) each session's keys carry the hash
tag ``{<sid>}`` (``dwebsocket:poll:{<sid>}:out``...), so a session lives on
one shard, and the owner's channel is a shard channel
(``dwebsocket:poll-owner:{<id>}``, ``SPUBLISH``/``SSUBSCRIBE``).

Items are those of :mod:`.wire` (a message, or the close, last). ``:out``
follows the slow-client policy of every transport
(:func:`~dwebsocket.transports.policy.offer_verdict`, by
``WEBSOCKET_BROADCAST_QUEUE`` and ``WEBSOCKET_BROADCAST_OVERFLOW``): the owner
is the only process that pushes to it, one push at a time per session, so the
length ``RPUSH`` returns is exact, and an item the policy refuses is popped
back from the tail before anyone else pushes.

A session lives as long as its owner: the hash expires ``_OWNER_TTL``
seconds after it was last refreshed, and the owner's listener refreshes the
hash of every session it still runs every ``_HEARTBEAT`` seconds. So a live
session is never cut, and when the owner process dies its sessions vanish
within ``_OWNER_TTL`` seconds: every request on them then gets 404 (the
client opens a new session) instead of polling a session no view reads.

Threads: each process has one listener thread for the sessions it owns: it
moves their input into the views' connections when told to (never waiting on
a full queue: it puts the rest back and retries), refreshes their hashes
(the heartbeat), and every second ends the
sessions nobody polls (1006) or that fell too far behind (1013). A poll
blocks on ``:out`` with ``BLPOP`` through a client whose socket timeout
outlasts the poll (a thread under WSGI; an asyncio client under ASGI, holding
no thread). Every client comes from :mod:`dwebsocket._redis`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, TypeVar, cast

import redis
import redis.asyncio
from asgiref.sync import sync_to_async

from ... import _redis, conf
from ... import metrics as _metrics
from ...messages import Message
from ..policy import OVERFLOW_CLOSE, Limits, Verdict, offer_verdict
from . import wire
from .store import ClientEnd, Outbound, StoreUnavailable, ViewEnd

__all__ = ["RedisStore"]

logger = logging.getLogger("dwebsocket")

_TTL = 3600  # seconds a session's queues and poll time outlive their last use at most
_OWNER_TTL = 10  # seconds a session's hash outlives the last heartbeat of its owner
_HEARTBEAT = 3.0  # seconds between two heartbeats of an owner
_BATCH = 1000  # items one round trip takes from a queue at most
_F = TypeVar("_F", bound=Callable[..., Any])


def _unavailable(method: _F) -> _F:
    """*method*, with a Redis error raised as :class:`StoreUnavailable` (a 503, not a 500)."""
    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def awrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await method(*args, **kwargs)
            except _redis.ERRORS as exc:
                raise StoreUnavailable(f"Redis did not answer ({exc})") from exc

        return cast(_F, awrapper)

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except _redis.ERRORS as exc:
            raise StoreUnavailable(f"Redis did not answer ({exc})") from exc

    return cast(_F, wrapper)


class _Keys(NamedTuple):
    """The Redis keys of one session."""

    base: str
    out: str
    inbound: str
    seen: str


def _keys(sid: str, cluster: bool = False) -> _Keys:
    """The keys of session *sid*; on a Redis Cluster all under the hash tag ``{<sid>}``, on one shard."""
    base = f"{_redis.PREFIX}poll:{{{sid}}}" if cluster else f"{_redis.PREFIX}poll:{sid}"
    return _Keys(base, base + ":out", base + ":in", base + ":seen")


def _owner_channel(owner: str, cluster: bool = False) -> str:
    """The owner's channel: a shard channel on a Redis Cluster (``SPUBLISH``, ``SSUBSCRIBE``)."""
    return f"{_redis.PREFIX}poll-owner:{{{owner}}}" if cluster else f"{_redis.PREFIX}poll-owner:{owner}"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _items(value: object) -> list[bytes | str]:
    """What LPOP with a count answered, as a list (it answers None for an empty list)."""
    if isinstance(value, (bytes, str)):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, (bytes, str))]
    return []


def _seen(value: object) -> float:
    """The time in a ``:seen`` key (0 if there is none)."""
    try:
        return float(_text(value)) if value is not None else 0.0
    except ValueError:
        return 0.0


def _grace() -> int:
    """Seconds a finished session's keys are kept, so the client can still poll the close."""
    return int(conf.get("WEBSOCKET_POLL_EXPIRY") + conf.get("WEBSOCKET_POLL_TIMEOUT")) + 1


class RedisStore:
    """The sessions of every process that uses the same Redis (a Redis ``WEBSOCKET_BROKER``).

    ``_lock`` guards ``_owned`` (the sessions this process owns, by id: their
    view and their outbound list), ``_backlog`` (those whose view's queue was
    full) and ``_listener``. ``_expiry_lock`` makes a heartbeat and a
    session's end (which sets the keys' last expiry) one after the other, so
    that a heartbeat never undoes an end. ``_lost`` belongs to the listener
    thread (whether it told the log that Redis is lost).
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._cluster = _redis.is_cluster(url)
        self._redis = _redis.client(url)
        self._owner = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._owned: dict[str, tuple[ViewEnd, _RedisOutbound]] = {}
        self._backlog: set[str] = set()
        self._listener: threading.Thread | None = None
        self._expiry_lock = threading.Lock()
        self._lost = False

    # -- SessionStore ------------------------------------------------------------

    def open(self, view: ViewEnd, limits: Limits) -> Outbound:
        pipe = self._redis.pipeline()
        self._create(pipe, view)
        pipe.execute()
        return self._own(view, limits)

    async def aopen(self, view: ViewEnd, limits: Limits) -> Outbound:
        pipe = _redis.aclient(self._url, 0).pipeline()
        self._create(pipe, view)
        await pipe.execute()
        return self._own(view, limits)

    def _create(self, pipe: redis.client.Pipeline | redis.asyncio.client.Pipeline, view: ViewEnd) -> None:
        """Queue on *pipe* the writes that make *view*'s session findable."""
        keys = _keys(view.sid, self._cluster)
        pipe.hset(keys.base, "owner", self._owner)
        if view.binding is not None:  # no field at all: no cookie ("" is a cookie too)
            pipe.hset(keys.base, "binding", view.binding)
        pipe.set(keys.seen, time.time())
        for name in keys:
            pipe.expire(name, _OWNER_TTL if name == keys.base else _TTL)

    @_unavailable
    def find(self, sid: str) -> ClientEnd | None:
        if not sid:
            return None
        binding, owner = self._redis.hmget(_keys(sid, self._cluster).base, ["binding", "owner"])
        return self._found(sid, binding, owner)

    @_unavailable
    async def afind(self, sid: str) -> ClientEnd | None:
        if not sid:
            return None
        binding, owner = await _redis.aclient(self._url, 0).hmget(_keys(sid, self._cluster).base, ["binding", "owner"])
        return self._found(sid, binding, owner)

    def _found(self, sid: str, binding: object, owner: object) -> ClientEnd | None:
        if owner is None:
            return None
        return _RemoteSession(self._url, sid, None if binding is None else _text(binding), _text(owner))

    # -- the owner -----------------------------------------------------------------

    def _own(self, view: ViewEnd, limits: Limits) -> Outbound:
        outbound = _RedisOutbound(self._url, view.sid, limits, self._finished)
        with self._lock:
            self._owned[view.sid] = (view, outbound)
            if self._listener is None:
                self._listener = threading.Thread(target=self._listen, name="dwebsocket-polling", daemon=True)
                self._listener.start()
        return outbound

    def _finished(self, sid: str) -> None:
        """The view is done: forget the session once the client had time to poll the close."""
        with self._expiry_lock:
            with self._lock:
                self._owned.pop(sid, None)
            pipe = self._redis.pipeline()
            for name in _keys(sid, self._cluster):
                pipe.expire(name, _grace())
            pipe.execute()

    def _heartbeat(self) -> None:
        """Keep the sessions this process runs findable for ``_OWNER_TTL`` seconds more."""
        with self._expiry_lock:
            with self._lock:
                sids = list(self._owned)
            if not sids:
                return
            pipe = self._redis.pipeline(transaction=False)
            for sid in sids:
                pipe.expire(_keys(sid, self._cluster).base, _OWNER_TTL)  # split by slot on a cluster
            pipe.execute()

    def _listen(self) -> None:
        while True:
            pubsub = _redis.Subscriber(self._redis, after_error=self._lost)
            try:
                pubsub.subscribe(_owner_channel(self._owner, self._cluster))
                self._heartbeat()  # at once: an outage may have left the hashes near their end
                if self._lost:
                    _redis.ping(self._redis)  # a real round trip before the log says so
                    self._lost = False
                    logger.warning("dwebsocket: polling sessions: Redis is back.")
                next_heartbeat = time.monotonic() + _HEARTBEAT
                while True:
                    for message in pubsub.messages(1.0):
                        if message.get("type") == "message":
                            self._drain(_text(message["data"]))
                    with self._lock:
                        backlog, self._backlog = self._backlog, set()
                    for sid in backlog:
                        self._drain(sid)
                    if time.monotonic() >= next_heartbeat:
                        next_heartbeat = time.monotonic() + _HEARTBEAT
                        self._heartbeat()
                    self._expire()
            except _redis.ERRORS as exc:
                if not self._lost:  # one line per outage, not one per attempt
                    self._lost = True
                    logger.warning(
                        "dwebsocket: polling sessions lost Redis (%s); their requests fail until it is back. "
                        "Retrying every second.", exc,
                    )
                time.sleep(1.0)
            except Exception:  # a bug: logged, and the listener goes on
                logger.exception("dwebsocket: error in the polling sessions' listener")
                time.sleep(1.0)
            finally:
                try:
                    pubsub.close()
                except Exception:
                    pass

    def _drain(self, sid: str) -> None:
        """Move what clients sent to session *sid* (through any process) into its view."""
        with self._lock:
            owned = self._owned.get(sid)
        if owned is None:
            return
        view = owned[0]
        inbound = _keys(sid, self._cluster).inbound
        raw = _items(self._redis.lpop(inbound, _BATCH))
        for index, data in enumerate(raw):
            try:
                item = wire.load_item(data)
                if isinstance(item, wire.Close):
                    view.close(item.code, item.reason)
                    continue
                message = wire.decode(item)
            except wire.WireError as exc:
                logger.warning("dwebsocket: skipped an item in %s: %s", inbound, exc)
                continue
            if not view.deliver_nowait(message):
                # The view's queue is full: put the rest back, and try again shortly
                # (this one thread serves every session of the process: it must not wait).
                self._redis.lpush(inbound, *raw[index:][::-1])
                with self._lock:
                    self._backlog.add(sid)
                return

    def _expire(self) -> None:
        """End the sessions whose client stopped polling, or fell too far behind."""
        with self._lock:
            owned = list(self._owned.values())
        if not owned:
            return
        grace = conf.get("WEBSOCKET_POLL_EXPIRY") + conf.get("WEBSOCKET_POLL_TIMEOUT")
        pipe = self._redis.pipeline()
        for view, _outbound in owned:
            keys = _keys(view.sid, self._cluster)
            pipe.get(keys.seen)
            pipe.llen(keys.out)
        answers = pipe.execute()
        now = time.time()
        for index, (view, outbound) in enumerate(owned):
            seen, waiting = _seen(answers[2 * index]), int(answers[2 * index + 1])
            if now - seen > grace:
                view.close(1006, "the client stopped polling")
            elif outbound.overflowed(waiting, seen, now):
                view.close(*OVERFLOW_CLOSE)


#: What one push did: a :data:`~..policy.Verdict` for a broadcast; "full" (a
#: view's send must wait for room); "closed" (the session ended).
_Pushed = Literal["queued", "dropped", "overflow", "full", "closed"]


class _RedisOutbound:
    """The ``:out`` list of a session this process owns (its :class:`Outbound`).

    The slow-client policy is :func:`~..policy.offer_verdict`, as for every
    transport: the client's progress is the later of its last poll (the
    ``:seen`` key) and the moment the list last became non-empty.

    ``_lock`` guards ``_closed`` and ``_progress``, and makes each push (and
    the close) one step: this object is the only writer of the list, so while
    it holds the lock the tail is its own.
    """

    def __init__(self, url: str, sid: str, limits: Limits, finished: Callable[[str], None]) -> None:
        self._redis = _redis.client(url)
        self._finished = finished  # tells the store the view is done
        self._sid = sid
        self._keys = _keys(sid, _redis.is_cluster(url))
        self._limits = limits
        self._lock = threading.Lock()
        self._closed = False
        self._progress = time.time()  # wall clock, as :seen is

    def _verdict(self, waiting: int, seen: float, now: float) -> Verdict:
        """The policy for a broadcast with *waiting* items ahead of it; call with ``_lock`` held."""
        return offer_verdict(waiting, now - max(self._progress, seen), self._limits)

    def _push(self, item: wire.MessageItem, broadcast: bool) -> _Pushed:
        """Push *item*, unless the client is too far behind (see :class:`_RedisOutbound`)."""
        with self._lock:
            if self._closed:
                return "closed"
            pipe = self._redis.pipeline()
            pipe.rpush(self._keys.out, wire.dump_item(item))
            pipe.expire(self._keys.out, _TTL)
            length = int(pipe.execute()[0])
            now = time.time()
            if length == 1:
                self._progress = now  # the list was empty: the client was not behind
            if length <= self._limits.broadcast_queue:
                return "queued"
            pushed: _Pushed = "full"  # a view's own send waits for room
            if broadcast:
                pushed = self._verdict(length - 1, _seen(self._redis.get(self._keys.seen)), now)
                if pushed == "queued":  # a burst to a client that keeps up
                    return "queued"
            # Take it back. None means a poll took everything, this item
            # included, in between: then it was delivered after all.
            return "queued" if self._redis.rpop(self._keys.out) is None else pushed

    def overflowed(self, waiting: int, seen: float, now: float) -> bool:
        """Whether the client is too slow now, and the policy is to close it (the owner's clock)."""
        with self._lock:
            return not self._closed and waiting > 0 and self._verdict(waiting, seen, now) == "overflow"

    def put(self, item: wire.MessageItem) -> bool:
        delay = 0.01
        while (pushed := self._push(item, broadcast=False)) == "full":
            time.sleep(delay)  # the client takes everything at its next poll
            delay = min(delay * 2, 0.5)
        return pushed == "queued"

    async def aput(self, item: wire.MessageItem) -> bool:
        push = sync_to_async(self._push, thread_sensitive=False)  # a round trip: off the loop
        delay = 0.01
        while (pushed := await push(item, broadcast=False)) == "full":
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        return pushed == "queued"

    def offer(self, item: wire.MessageItem) -> Verdict:
        pushed = self._push(item, broadcast=True)
        if pushed == "full" or pushed == "closed":
            return "dropped"
        if pushed != "queued":
            _metrics.overflowed(pushed)
        return pushed

    def close(self, code: int, reason: str) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pipe = self._redis.pipeline()
            pipe.rpush(self._keys.out, wire.dump_item(wire.Close(code, reason)))
            pipe.expire(self._keys.out, _TTL)
            pipe.execute()
        self._finished(self._sid)

    async def aclose(self, code: int, reason: str) -> None:
        await sync_to_async(self.close, thread_sensitive=False)(code, reason)


class _RemoteSession:
    """A session in Redis, as a poll, send or close request sees it (its :class:`ClientEnd`)."""

    def __init__(self, url: str, sid: str, binding: str | None, owner: str) -> None:
        self._url = url
        self._redis = _redis.client(url)
        self._keys = _keys(sid, _redis.is_cluster(url))
        self._sid = sid
        self._owner = owner
        self.binding = binding

    @_unavailable
    def take(self, timeout: float) -> wire.Batch:
        quick = self._redis
        quick.set(self._keys.seen, time.time(), ex=_TTL)
        first = _redis.blocking_client(self._url, timeout).blpop([self._keys.out], timeout=timeout)
        raw = [] if not first else [first[1], *_items(quick.lpop(self._keys.out, _BATCH))]
        quick.set(self._keys.seen, time.time(), ex=_TTL)
        return self._batch(raw)

    @_unavailable
    async def atake(self, timeout: float) -> wire.Batch:
        client = _redis.aclient(self._url, timeout)
        await client.set(self._keys.seen, time.time(), ex=_TTL)
        first = await client.blpop([self._keys.out], timeout=timeout)
        raw = [] if not first else [first[1], *_items(await client.lpop(self._keys.out, _BATCH))]
        await client.set(self._keys.seen, time.time(), ex=_TTL)
        return self._batch(raw)

    def _batch(self, raw: list[bytes | str]) -> wire.Batch:
        items: list[wire.MessageItem] = []
        for data in raw:
            try:
                item = wire.load_item(data)
            except wire.WireError as exc:
                logger.warning("dwebsocket: skipped an item in %s: %s", self._keys.out, exc)
                continue
            if isinstance(item, wire.Close):
                return wire.batch(items, item)  # nothing follows a close
            items.append(item)
        return wire.batch(items, None)

    @_unavailable
    def send(self, messages: list[Message]) -> bool:
        # What waits in :in for the owner is bounded by WEBSOCKET_MAX_QUEUE, as
        # the view's own queue is: past it the client gets 429 and sends again
        # later. Two sends at the very same moment may both pass the check.
        if messages and self._redis.llen(self._keys.inbound) >= Limits.from_settings().max_queue:
            return False
        self._tell_owner([wire.dump_item(wire.encode(m)) for m in messages])
        return True

    @_unavailable
    def close(self, code: int, reason: str, *, polled: bool) -> None:
        # Either way the keys outlive the close long enough for a last poll.
        self._tell_owner([wire.dump_item(wire.Close(code, reason))])

    def _tell_owner(self, items: list[str]) -> None:
        """Queue *items* for the view, and wake the owner's listener."""
        if not items:
            return
        pipe = self._redis.pipeline()
        pipe.rpush(self._keys.inbound, *items)
        pipe.expire(self._keys.inbound, _TTL)
        _redis.publish(pipe, _owner_channel(self._owner, _redis.is_cluster(self._url)), self._sid)
        pipe.execute()

"""The Redis broker: broadcasts and presence across processes and hosts.

Broadcasts go through Redis pub/sub, one channel per group; each process
subscribes only to the groups it has members in, and delivers what it receives
to its own members. Pub/sub is at-most-once: a broadcast published while a
process is cut off from Redis never reaches that process's members.

Presence lives in one sorted set per group (member -> expiry time), refreshed
by every process every ``_REFRESH`` seconds, so the members of a process that
died drop out after ``_TTL`` seconds.

Threads: one listener thread owns the pub/sub connection: it subscribes,
receives, writes presence and reconnects with backoff. Other threads publish
and read presence through redis-py's connection pool, and hand subscription
and presence changes to the listener under ``_lock``.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import redis

from ... import _redis
from ...connection import Link
from ...messages import Message
from ..registry import Member, Registry

__all__ = ["RedisBroker", "decode", "encode"]

logger = logging.getLogger("dwebsocket")

_PREFIX = _redis.PREFIX
_TTL = 30.0  # seconds a member counts without a refresh
_REFRESH = 10.0


def _channel(group: str) -> str:
    return f"{_PREFIX}group:{group}"


def _presence_key(group: str) -> str:
    return f"{_PREFIX}presence:{group}"


def encode(message: Message, exclude: str | None) -> bytes:
    """One broadcast on the wire: kind, the excluded id (length first), payload.

    ``t`` or ``b`` (text or binary), then the excluded connection id as
    ``<length>:<UTF-8 bytes>`` (``0:`` for none), then the message. Every
    field is either fixed or counted, so no value, whatever bytes it holds,
    can move where another field starts.
    """
    kind = b"t" if isinstance(message, str) else b"b"
    payload = message.encode("utf-8") if isinstance(message, str) else message
    excluded = (exclude or "").encode("utf-8")
    return kind + b"%d:" % len(excluded) + excluded + payload


def decode(data: bytes) -> tuple[Message, str | None]:
    """The message and excluded id of :func:`encode`; ``ValueError`` if *data* is not one."""
    kind = data[:1]
    if kind not in (b"t", b"b"):
        raise ValueError(f"unknown kind {kind!r}")
    length, colon, rest = data[1:_MAX_LENGTH_DIGITS + 2].partition(b":")
    if not colon or not length.isdigit():
        raise ValueError("no length of the excluded id")
    start = 1 + len(length) + 1
    end = start + int(length)
    if end > len(data):
        raise ValueError("the excluded id is cut short")
    exclude = data[start:end].decode("utf-8")
    payload = data[end:]
    message: Message = payload.decode("utf-8") if kind == b"t" else payload
    return message, exclude or None


_MAX_LENGTH_DIGITS = 10  # digits of the excluded id's length, at most


class RedisBroker:
    """Broadcasts and presence shared by every process that uses the same Redis."""

    def __init__(self, url: str, registry: Registry) -> None:
        self._url = url
        self._registry = registry
        # A blocking pool: a burst of broadcasts from many threads waits for a
        # connection rather than failing (redis-py's default pool raises at 100).
        self._redis = _redis.client(url)
        # Guarded by _lock: what the listener must do next, and local presence.
        self._lock = threading.Lock()
        self._wanted: set[str] = set()
        self._presence: dict[str, dict[str, str]] = {}  # group -> member id -> entry
        self._changes: list[tuple[bool, str, str]] = []  # (joined?, group, entry), in order
        self._healthy = True
        self._stopped = False
        self._wake = threading.Event()
        # Guarded by _lock, waited on through _applied: how many changes were
        # asked for, and how many the listener has written to Redis.
        self._requested = 0
        self._done = 0
        self._applied = threading.Condition(self._lock)
        try:
            self._redis.ping()
        except redis.RedisError as exc:
            self._healthy = False
            logger.error(
                "dwebsocket: cannot reach Redis at WEBSOCKET_BROKER = %r (%s). Start Redis "
                "or fix the setting; until then broadcasts reach this process's members only.",
                url, exc,
            )
        self._listener = threading.Thread(target=self._listen, name="dwebsocket-redis", daemon=True)
        self._listener.start()

    # -- called from any thread ---------------------------------------------

    def publish(self, group: str, message: Message, exclude: str | None) -> None:
        try:
            self._redis.publish(_channel(group), encode(message, exclude))
        except redis.RedisError as exc:
            self._outage(exc)
            self._registry.deliver(group, message, exclude)  # local delivery goes on

    #: Joins reach Redis through the listener thread: flush() waits for them.
    synchronous = False

    def flush(self, timeout: float) -> None:
        """Wait until the subscriptions and presence asked for so far are in Redis."""
        with self._lock:
            target = self._requested
            self._applied.wait_for(lambda: self._done >= target or not self._healthy, timeout)

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
        self.flush(2.0)  # this process's own joins and leaves count at once
        key = _presence_key(group)
        try:
            pipe = self._redis.pipeline()
            pipe.zremrangebyscore(key, "-inf", time.time())
            pipe.zcard(key)
            return int(pipe.execute()[1])
        except redis.RedisError as exc:
            self._outage(exc)
            return len(self._registry.local(group))

    def members(self, group: str) -> list[Member]:
        self.flush(2.0)
        try:
            entries = self._redis.zrangebyscore(_presence_key(group), time.time(), "+inf")
        except redis.RedisError as exc:
            self._outage(exc)
            return self._registry.members(group)
        members = []
        for raw in entries:
            entry = json.loads(raw)  # type: ignore[arg-type]
            members.append(Member(entry["id"], entry.get("user")))
        return members

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    # -- health --------------------------------------------------------------

    def _outage(self, exc: Exception) -> None:
        with self._lock:
            was_healthy, self._healthy = self._healthy, False
            self._applied.notify_all()  # nobody waits for an unreachable Redis
        if was_healthy and not self._stopped:
            logger.warning(
                "dwebsocket: lost Redis at WEBSOCKET_BROKER = %r (%s); broadcasts reach this "
                "process's members only until it is back. Reconnecting.",
                self._url, exc,
            )

    def _recovered(self) -> None:
        with self._lock:
            was_healthy, self._healthy = self._healthy, True
        if not was_healthy:
            logger.warning("dwebsocket: Redis at WEBSOCKET_BROKER = %r is back.", self._url)

    # -- the listener thread -------------------------------------------------

    def _listen(self) -> None:
        backoff = 0.1
        while not self._stopped:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                self._serve(pubsub)
            except (redis.RedisError, OSError) as exc:
                self._outage(exc)
                time.sleep(backoff * (1 + random.random()))
                backoff = min(backoff * 2, 5.0)
            except Exception:  # a bug: logged, and the listener goes on
                logger.exception("dwebsocket: error in the Redis listener; reconnecting")
                time.sleep(backoff * (1 + random.random()))
                backoff = min(backoff * 2, 5.0)
            else:
                backoff = 0.1
            finally:
                try:
                    pubsub.close()
                except Exception:
                    pass

    def _serve(self, pubsub: redis.client.PubSub) -> None:
        """Run until Redis fails or the broker stops."""
        subscribed: set[str] = set()
        self._write_presence(refresh=True)  # after a (re)connection, all of it again
        self._recovered()
        next_refresh = time.monotonic() + _REFRESH
        while not self._stopped:
            with self._lock:
                wanted = set(self._wanted)
                requested = self._requested
            if wanted - subscribed:
                pubsub.subscribe(*(_channel(g) for g in wanted - subscribed))
            if subscribed - wanted:
                pubsub.unsubscribe(*(_channel(g) for g in subscribed - wanted))
            subscribed = wanted
            self._write_presence(refresh=time.monotonic() >= next_refresh)
            if time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + _REFRESH
            with self._lock:
                self._done = requested
                self._applied.notify_all()
            self._wake.clear()
            if not subscribed:
                self._wake.wait(0.5)
                continue
            message = pubsub.get_message(timeout=0.2)
            while message is not None:
                if message.get("type") == "message":
                    self._received(message["channel"], message["data"])
                message = pubsub.get_message(timeout=0)

    def _received(self, channel: bytes, data: bytes) -> None:
        """Deliver one pub/sub message to this process's members; nothing in it can raise."""
        try:
            group = channel.decode("utf-8")[len(_PREFIX) + len("group:"):]
            message, exclude = decode(data)
        except ValueError as exc:  # UnicodeDecodeError included
            logger.warning("dwebsocket: skipped a malformed broadcast on %r: %s", channel, exc)
            return
        try:
            self._registry.deliver(group, message, exclude)
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
            key = _presence_key(group)
            if joined:
                pipe.zadd(key, {entry: expiry})
                pipe.expire(key, int(_TTL * 2))
            else:
                pipe.zrem(key, entry)
        try:
            pipe.execute()
        except redis.RedisError:
            with self._lock:
                # Again after reconnecting (the refresh then brings back every join).
                self._changes[:0] = [c for c in changes if not c[0]]
            raise

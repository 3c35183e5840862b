"""Polling sessions kept in Redis, so that any process can serve any poll.

With ``WEBSOCKET_BROKER = "redis://..."`` a long-polling session's queues
live in Redis: the view runs in the process that opened the session (its
*owner*), and polls, sends and closes may reach any process.

    dwebsocket:poll:<sid>         hash: the client binding and the owner   (written at open)
    dwebsocket:poll:<sid>:out     list: messages for the client            (owner pushes, pollers pop)
    dwebsocket:poll:<sid>:in      list: messages for the view              (any process pushes, owner pops)
    dwebsocket:poll:<sid>:seen    the time of the last poll                (pollers write, owner reads)
    dwebsocket:poll-owner:<id>    pub/sub: "session S has input"           (senders publish, owner listens)

Threads: each process has one listener thread for the sessions it owns: it
moves their input into the views' connections when told to, and expires the
sessions nobody polls. Pollers block on ``:out`` (a thread under WSGI; an
asyncio Redis client under ASGI, holding no thread). Connections come from
blocking pools, so a burst waits for a free connection instead of failing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio

from .. import conf

if TYPE_CHECKING:
    from .polling import PollingSession

logger = logging.getLogger("dwebsocket")

_PREFIX = "dwebsocket:poll:"
_TTL = 3600  # seconds a session's keys outlive its last activity at most
_POOL = 10_000  # Redis connections a process may hold; a long poll holds one


def _keys(sid: str) -> tuple[str, str, str, str]:
    base = _PREFIX + sid
    return base, base + ":out", base + ":in", base + ":seen"


def _owner_channel(owner: str) -> str:
    return f"dwebsocket:poll-owner:{owner}"


class SharedSessions:
    """The Redis side of polling sessions, for one process."""

    def __init__(self, url: str) -> None:
        self._url = url
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=_POOL, timeout=30, socket_connect_timeout=2
        )
        self._redis = redis.Redis(connection_pool=pool)
        self._owner = uuid.uuid4().hex
        # Guarded by _lock: the sessions this process owns, and one asyncio
        # client per event loop (asyncio clients cannot cross loops).
        self._lock = threading.Lock()
        self._owned: dict[str, PollingSession] = {}
        self._backlog: set[str] = set()  # sessions whose view's queue was full
        self._async: dict[int, redis.asyncio.Redis] = {}
        self._listener: threading.Thread | None = None

    def _aredis(self) -> redis.asyncio.Redis:
        loop_id = id(asyncio.get_running_loop())
        with self._lock:
            client = self._async.get(loop_id)
            if client is None:
                pool = redis.asyncio.BlockingConnectionPool.from_url(self._url, max_connections=_POOL, timeout=30)
                client = self._async[loop_id] = redis.asyncio.Redis(connection_pool=pool)
            return client

    # -- the owner -----------------------------------------------------------

    def create(self, session: PollingSession) -> None:
        key, _out, _in, seen = _keys(session.sid)
        pipe = self._redis.pipeline()
        pipe.hset(key, mapping={"binding": session.binding or "", "owner": self._owner})
        pipe.set(seen, time.time())
        for name in _keys(session.sid):
            pipe.expire(name, _TTL)
        pipe.execute()
        with self._lock:
            self._owned[session.sid] = session
            if self._listener is None:
                self._listener = threading.Thread(target=self._listen, name="dwebsocket-polling", daemon=True)
                self._listener.start()

    def push(self, sid: str, item: dict[str, Any]) -> None:
        _key, out, _in, _seen = _keys(sid)
        pipe = self._redis.pipeline()
        pipe.rpush(out, json.dumps(item))
        pipe.expire(out, _TTL)
        pipe.execute()

    def finished(self, session: PollingSession) -> None:
        """The view is done: forget the session once the client had time to poll the close."""
        with self._lock:
            self._owned.pop(session.sid, None)
        grace = conf.get("WEBSOCKET_POLL_EXPIRY") + conf.get("WEBSOCKET_POLL_TIMEOUT")
        pipe = self._redis.pipeline()
        for name in _keys(session.sid):
            pipe.expire(name, int(grace) + 1)
        pipe.execute()

    def _listen(self) -> None:
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(_owner_channel(self._owner))
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._drain(message["data"].decode())
                    with self._lock:
                        backlog, self._backlog = self._backlog, set()
                    for sid in backlog:
                        self._drain(sid)
                    self._expire()
            except redis.RedisError as exc:
                logger.warning("dwebsocket: polling sessions lost Redis (%s); retrying", exc)
                time.sleep(1.0)
            finally:
                pubsub.close()

    def _drain(self, sid: str) -> None:
        """Move what clients sent to session *sid* (through any process) into its view."""
        from .polling import _decode

        with self._lock:
            session = self._owned.get(sid)
        if session is None:
            return
        inbound = _keys(sid)[2]
        items: list[bytes] = self._redis.lpop(inbound, 1000) or []  # type: ignore[assignment]
        for index, raw in enumerate(items):
            item = json.loads(raw)
            if "close" in item:
                session.close(int(item["close"]["code"]), str(item["close"]["reason"]))
            elif session.connection is not None and not session.connection._deliver_nowait(_decode(item)):
                # The view's queue is full: put the rest back, and try again shortly
                # (this one thread serves every session of the process: it must not wait).
                self._redis.lpush(inbound, *items[index:][::-1])
                with self._lock:
                    self._backlog.add(sid)
                return

    def _expire(self) -> None:
        with self._lock:
            owned = list(self._owned.values())
        if not owned:
            return
        grace = conf.get("WEBSOCKET_POLL_EXPIRY") + conf.get("WEBSOCKET_POLL_TIMEOUT")
        seen = self._redis.mget([_keys(s.sid)[3] for s in owned])
        now = time.time()
        for session, last in zip(owned, seen):
            if now - float(last or 0) > grace:
                session.close(1006, "the client stopped polling")

    # -- any process -------------------------------------------------------

    def lookup(self, sid: str) -> tuple[str, str] | None:
        """(binding, owner) of session *sid*, "" for no binding; None if there is no such session."""
        binding, owner = self._redis.hmget(_keys(sid)[0], ["binding", "owner"])  # type: ignore[misc]
        if owner is None:
            return None
        return _text(binding or b""), _text(owner)

    def send(self, sid: str, owner: str, items: list[dict[str, Any]]) -> None:
        _key, _out, inbound, _seen = _keys(sid)
        pipe = self._redis.pipeline()
        pipe.rpush(inbound, *(json.dumps(item) for item in items))
        pipe.expire(inbound, _TTL)
        pipe.publish(_owner_channel(owner), sid)
        pipe.execute()

    def take(self, sid: str, timeout: float) -> dict[str, Any]:
        _key, out, _in, seen = _keys(sid)
        self._redis.set(seen, time.time(), ex=_TTL)
        first = self._redis.blpop([out], timeout=timeout)
        raw = [] if first is None else [first[1], *(self._redis.lpop(out, 1000) or [])]
        self._redis.set(seen, time.time(), ex=_TTL)
        return _batch(raw)

    async def atake(self, sid: str, timeout: float) -> dict[str, Any]:
        client = self._aredis()
        _key, out, _in, seen = _keys(sid)
        await client.set(seen, time.time(), ex=_TTL)
        first = await client.blpop([out], timeout=timeout)
        raw = [] if first is None else [first[1], *(await client.lpop(out, 1000) or [])]
        await client.set(seen, time.time(), ex=_TTL)
        return _batch(raw)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _batch(raw: list[bytes]) -> dict[str, Any]:
    messages: list[Any] = []
    close = None
    for data in raw:
        item = json.loads(data)
        if "close" in item:
            close = item["close"]
            break  # nothing follows a close
        messages.append(item)
    return {"messages": messages, "close": close}

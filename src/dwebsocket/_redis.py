"""The one Redis set-up of a process, shared by the broker and long-polling.

Every Redis key and channel dwebsocket uses starts with :data:`PREFIX`.
Clients come from blocking pools (a burst waits for a free connection
instead of failing) with explicit timeouts, so no redis-py default decides
how long a call may take: :func:`client` for quick commands, and
:func:`blocking_client` for commands that wait on purpose (a long poll's
``BLPOP``), whose socket timeout is longer than the wait.

``_lock`` guards ``_clients`` and ``_async_clients``: one client per (URL,
kind), and per event loop for asyncio clients, made on first use.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Any

import redis
import redis.asyncio

__all__ = ["PREFIX", "aclient", "blocking_client", "client"]

#: The start of every key and channel name dwebsocket uses in Redis.
PREFIX = "dwebsocket:"

#: Seconds a quick command may take by default: presence writes (in the
#: broker's background thread) and long-polling's commands.
COMMAND_TIMEOUT = 5.0
#: Seconds a broadcast's PUBLISH may take: the caller waits for it, so a hung
#: Redis must not hold it long (then the broker's breaker opens).
PUBLISH_TIMEOUT = 1.0
#: Seconds a presence read (group_size, group_members) or the broker's probe
#: of a Redis it lost may take.
PRESENCE_TIMEOUT = 1.0
#: Seconds to wait for a connection to Redis.
CONNECT_TIMEOUT = 2.0
#: Connections a process may hold per pool; a long poll holds one while it waits.
_POOL_SIZE = 10_000

_lock = threading.Lock()
_clients: dict[tuple[Any, ...], Any] = {}
# Also guarded by _lock: the asyncio clients of each event loop, dropped with the loop.
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, float], redis.asyncio.Redis]] = (
    weakref.WeakKeyDictionary()
)


def client(url: str, timeout: float = COMMAND_TIMEOUT) -> redis.Redis:
    """The process's client for quick commands on the Redis at *url*, each taking at most *timeout* seconds.

    One pool per (URL, timeout): :data:`PUBLISH_TIMEOUT`,
    :data:`PRESENCE_TIMEOUT` or :data:`COMMAND_TIMEOUT`. The timeout bounds
    connecting and each answer, and waiting for a free connection.
    """
    return _get(("quick", url, timeout), lambda: redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
        url, max_connections=_POOL_SIZE, timeout=timeout,
        socket_connect_timeout=min(CONNECT_TIMEOUT, timeout), socket_timeout=timeout,
    )))


def blocking_client(url: str, wait: float) -> redis.Redis:
    """A client whose commands may block for *wait* seconds on purpose (BLPOP)."""
    timeout = wait + COMMAND_TIMEOUT
    return _get(("blocking", url, timeout), lambda: redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
        url, max_connections=_POOL_SIZE, timeout=timeout,
        socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=timeout,
    )))


def aclient(url: str, wait: float) -> redis.asyncio.Redis:
    """An asyncio client for the running loop (asyncio clients cannot cross loops).

    Kept per loop object, not per ``id(loop)``: a new loop may get the id of
    a closed one, and must not get its client.
    """
    timeout = wait + COMMAND_TIMEOUT
    loop = asyncio.get_running_loop()
    with _lock:
        clients = _async_clients.setdefault(loop, {})
        found = clients.get((url, timeout))
        if found is None:
            found = clients[(url, timeout)] = redis.asyncio.Redis(
                connection_pool=redis.asyncio.BlockingConnectionPool.from_url(
                    url, max_connections=_POOL_SIZE, timeout=timeout,
                    socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=timeout,
                )
            )
        return found


def _get(key: tuple[Any, ...], make: Any) -> Any:
    with _lock:
        found = _clients.get(key)
        if found is None:
            found = _clients[key] = make()
        return found

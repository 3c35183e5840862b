"""The one Redis set-up of a process, shared by the broker and long-polling.

Every Redis key and channel dwebsocket uses starts with :data:`PREFIX`.
Clients come from blocking pools (a burst waits for a free connection
instead of failing) with explicit timeouts, so no redis-py default decides
how long a call may take: :func:`client` for quick commands, and
:func:`blocking_client` for commands that wait on purpose (a long poll's
``BLPOP``), whose socket timeout is longer than the wait.

``_lock`` guards ``_clients``: one client per (URL, kind), made on first use.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import redis
import redis.asyncio

__all__ = ["PREFIX", "aclient", "blocking_client", "client"]

#: The start of every key and channel name dwebsocket uses in Redis.
PREFIX = "dwebsocket:"

#: Seconds a quick command (PUBLISH, a pipeline of presence writes) may take.
COMMAND_TIMEOUT = 5.0
#: Seconds to wait for a connection to Redis.
CONNECT_TIMEOUT = 2.0
#: Connections a process may hold per pool; a long poll holds one while it waits.
_POOL_SIZE = 10_000

_lock = threading.Lock()
_clients: dict[tuple[Any, ...], Any] = {}


def client(url: str) -> redis.Redis:
    """The process's client for quick commands on the Redis at *url*."""
    return _get(("quick", url), lambda: redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
        url, max_connections=_POOL_SIZE, timeout=COMMAND_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=COMMAND_TIMEOUT,
    )))


def blocking_client(url: str, wait: float) -> redis.Redis:
    """A client whose commands may block for *wait* seconds on purpose (BLPOP)."""
    timeout = wait + COMMAND_TIMEOUT
    return _get(("blocking", url, timeout), lambda: redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
        url, max_connections=_POOL_SIZE, timeout=timeout,
        socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=timeout,
    )))


def aclient(url: str, wait: float) -> redis.asyncio.Redis:
    """An asyncio client for the running loop (asyncio clients cannot cross loops)."""
    timeout = wait + COMMAND_TIMEOUT
    loop = asyncio.get_running_loop()
    return _get(("async", url, timeout, id(loop)), lambda: redis.asyncio.Redis(
        connection_pool=redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=_POOL_SIZE, timeout=timeout,
            socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=timeout,
        )
    ))


def _get(key: tuple[Any, ...], make: Any) -> Any:
    with _lock:
        found = _clients.get(key)
        if found is None:
            found = _clients[key] = make()
        return found

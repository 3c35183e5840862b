"""Each process's status record, what ``manage.py websocket_status`` shows.

With a Redis broker, every process that serves connections keeps a small
record in Redis, ``<PREFIX>status:<broker id>``: a JSON object (see
:func:`record`) set with a :data:`TTL`, written by the broker's listener
thread as soon as it connects and then every :data:`INTERVAL` seconds, so
the command is at most that late, and a process that died drops out within
:data:`TTL` seconds. The listener thread is the only writer of its process's
record (and of ``_published``); the command only reads.

With the memory broker nothing leaves the process: the command can only
show the process it runs in.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from .. import _redis, metrics
from ..transports.policy import connections
from .registry import Registry

__all__ = ["INTERVAL", "KEY_PREFIX", "MAX_GROUPS", "TTL", "publish", "record", "redact"]

#: Every status record's key starts with this; the broker's id follows.
KEY_PREFIX = f"{_redis.PREFIX}status:"

#: Seconds a record lives without being written again.
TTL = 30

#: Seconds between two writes of a process's record.
INTERVAL = 2.0

#: Groups listed in one record at most (the biggest first); the rest are only counted.
MAX_GROUPS = 1000

_STARTED = time.time()
_published: dict[str, float] = {}  # broker id -> when its record was last written (its listener's only)


def redact(url: str) -> str:
    """*url* without its password, fit to print."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        credentials, _, host = rest.rpartition("@")
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user + ':' if user else ''}***@{host}"
    return url


def record(registry: Registry, broker: str, reachable: bool) -> dict[str, Any]:
    """This process's status: its server, open connections, groups with their members here, its broker."""
    sizes = {group: len(registry.local(group)) for group in registry.groups()}
    biggest = sorted(sizes.items(), key=lambda item: (-item[1], item[0]))
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "server": metrics.server_kind(),
        "started": _STARTED,
        "updated": time.time(),
        "connections": connections.open,
        "by_transport": metrics.open_connections(),
        "groups": dict(biggest[:MAX_GROUPS]),
        "groups_total": len(sizes),
        "members": sum(sizes.values()),
        "broker": redact(broker),
        "reachable": reachable,
    }


def publish(client: Any, origin: str, registry: Registry, broker: str) -> None:
    """Write this process's record, unless it did less than :data:`INTERVAL` seconds ago.

    Called by the broker's listener on each turn of its loop, which it takes
    only while Redis answers (so the record says ``reachable``). A Redis
    error goes to the listener, which reconnects.
    """
    now = time.monotonic()
    if now - _published.get(origin, -INTERVAL) < INTERVAL:
        return
    _published[origin] = now
    client.set(f"{KEY_PREFIX}{origin}", json.dumps(record(registry, broker, True)), ex=TTL)

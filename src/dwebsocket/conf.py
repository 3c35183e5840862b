"""Every dwebsocket setting, with its default, in one place.

A leaf module: the per-connection view of these settings is
:class:`dwebsocket.transports.policy.Limits`.

Settings are read from ``django.conf.settings`` each time a connection opens,
so ``override_settings`` in tests and per-process settings modules both work.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

__all__ = ["DEFAULTS", "get", "is_redis_url"]

#: The settings dwebsocket reads, and the value used when a project leaves one out.
DEFAULTS: dict[str, Any] = {
    # Accept WebSocket handshakes on every view, decorated or not (the
    # original dwebsocket's name).
    "WEBSOCKET_ACCEPT_ALL": False,
    # Origins a browser handshake (or polling request) may come from, besides
    # the request's own scheme://host and CSRF_TRUSTED_ORIGINS: full origins
    # ("https://app.example.com", with "*." wildcards) or host patterns as in
    # ALLOWED_HOSTS; ["*"] allows every origin (a system check warns).
    "WEBSOCKET_ALLOWED_ORIGINS": None,
    # The largest message a client may send, in bytes; larger ones close the
    # connection with 1009. None: no limit.
    "WEBSOCKET_MAX_MESSAGE_SIZE": 1024 * 1024,
    # Messages received but not yet read by the view. When it is full,
    # dwebsocket stops reading from the socket until the view catches up.
    "WEBSOCKET_MAX_QUEUE": 64,
    # Bytes (inflated, plus 64 per message for its bookkeeping) held for one
    # connection: received and not yet read by the view, and waiting to be
    # written to the client. Past it dwebsocket stops reading from the client
    # (inbound), and a view's send() waits / a broadcast counts the client as
    # behind (outbound). None: counted in messages only.
    "WEBSOCKET_MAX_QUEUE_BYTES": 4 * 1024 * 1024,
    # Open connections (WebSocket and long-polling sessions) in one process;
    # beyond it a handshake or a polling open gets 503. None: no limit.
    "WEBSOCKET_MAX_CONNECTIONS": 1000,
    # Messages one client may send, such as "50/s" or "600/m"; a client over
    # it is closed with 1008 (policy violation). None: no limit.
    "WEBSOCKET_RATE_LIMIT": None,
    # Groups one connection may be in at once; join() beyond it raises
    # TooManyGroups. None: no limit.
    "WEBSOCKET_MAX_GROUPS": 100,
    # Seconds without traffic before a keepalive ping; None turns pings off.
    "WEBSOCKET_PING_INTERVAL": 20.0,
    # Seconds to wait for the answer to a ping before the peer counts as gone.
    "WEBSOCKET_PING_TIMEOUT": 20.0,
    # Seconds to wait for the client's answer to a close frame.
    "WEBSOCKET_CLOSE_TIMEOUT": 5.0,
    # Offer permessage-deflate compression to clients that ask for it.
    "WEBSOCKET_COMPRESSION": True,
    # Where groups live: "memory" (this process) or a Redis URL such as
    # "redis://127.0.0.1:6379/0" (every process and host sharing that Redis),
    # "redis+sentinel://host:26379,host2:26379/mymaster" (the master that
    # those sentinels name) or "redis+cluster://host:7000,host2:7000" (a Redis
    # Cluster); see docs/deployment.md. Long-polling keeps its sessions there too.
    "WEBSOCKET_BROKER": "memory",
    # Broadcast messages waiting to be written to one client. A client that
    # falls this far behind is handled by WEBSOCKET_BROADCAST_OVERFLOW.
    "WEBSOCKET_BROADCAST_QUEUE": 256,
    # "close": close a client that falls behind with 1013 (try again later);
    # "drop": skip the broadcasts it has no room for.
    "WEBSOCKET_BROADCAST_OVERFLOW": "close",
    # Broadcasts each group keeps, so that a client that reconnects gets what
    # it missed (docs/delivery.md); Redis keeps at least this many. 0 turns
    # history and recovery off.
    "WEBSOCKET_HISTORY_SIZE": 100,
    # Seconds a group keeps each broadcast.
    "WEBSOCKET_HISTORY_TTL": 300.0,
    # Redis broker: broadcasts one process keeps while Redis is unreachable
    # (delivered to its own members at once), to publish them in order once
    # Redis is back, so that the other processes and the group history get
    # them too (each kept at most WEBSOCKET_HISTORY_TTL seconds; past the
    # bound the oldest are dropped, counted and logged). 0: none kept.
    "WEBSOCKET_OUTAGE_BUFFER": 1000,
    # Long-polling: seconds a poll waits for messages before it answers empty.
    "WEBSOCKET_POLL_TIMEOUT": 25.0,
    # Prometheus metrics (docs/metrics.md): None (the default) records them when
    # prometheus_client is installed (pip install "dwebsocket[metrics]"); True
    # requires it (a system check says so if it is missing); False turns them off.
    "WEBSOCKET_METRICS": None,
    # Long-polling: seconds without a poll after which a session expires
    # (the view then sees the connection close with 1006).
    "WEBSOCKET_POLL_EXPIRY": 15.0,
}


def get(name: str) -> Any:
    """Return the value of setting *name*, or its default."""
    return getattr(settings, name, DEFAULTS[name])


def is_redis_url(url: object) -> bool:
    """Whether *url* (a WEBSOCKET_BROKER value) names a Redis server."""
    return isinstance(url, str) and url.startswith((
        "redis://", "rediss://", "unix://",
        "redis+cluster://", "rediss+cluster://", "redis+sentinel://", "rediss+sentinel://",
    ))

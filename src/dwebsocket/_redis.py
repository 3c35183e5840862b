"""The one Redis set-up of a process, shared by the broker and long-polling.

Every Redis key and channel dwebsocket uses starts with :data:`PREFIX`.
Clients have explicit timeouts, so no redis-py default decides how long a
call may take; for one Redis they come from blocking pools (a burst waits
for a free connection instead of failing; redis-py's cluster and sentinel
pools have no blocking kind, and are sized large instead): :func:`client` for quick commands, and
:func:`blocking_client` for commands that wait on purpose (a long poll's
``BLPOP``), whose socket timeout is longer than the wait.

Three kinds of deployment, each named by its URL (:func:`parse`, the one
place URLs are read; docs/deployment.md):

- one Redis: ``redis://``, ``rediss://`` or ``unix://``, read by redis-py;
- a Redis Cluster: ``redis+cluster://[user:password@]host:port[,host:port...]``
  (any nodes of it; ``rediss+cluster://`` for TLS), through redis-py's
  :class:`redis.cluster.RedisCluster`. Broadcasts then use sharded pub/sub
  (:func:`publish`, :class:`Subscriber`), and every key that one command or
  script touches together carries one hash tag;
- a Sentinel set: ``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]``
  (the sentinels, then the master's name; ``rediss+sentinel://`` for TLS to
  the master and replicas), through :class:`redis.sentinel.Sentinel`:
  every new connection asks the sentinels where the master is, so clients
  follow a failover once their old connections fail.

``_lock`` guards ``_clients`` and ``_async_clients``: one client per (URL,
kind), and per event loop for asyncio clients, made on first use.
"""

from __future__ import annotations

import asyncio
import select
import threading
import urllib.parse
import weakref
from typing import Any, Literal, NamedTuple

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from django.core.exceptions import ImproperlyConfigured

__all__ = [
    "ERRORS", "LISTENER_ERRORS", "PREFIX", "RedisURLError", "Subscriber", "Target", "aclient", "blocking_client", "client", "is_cluster",
    "is_redis_url", "parse", "ping", "publish", "sharded_pubsub_supported",
]

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

_SINGLE_SCHEMES = ("redis://", "rediss://", "unix://")
_CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
_SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
#: Query parameters a cluster or sentinel URL may carry (anything else is a mistake).
_CLUSTER_OPTIONS = frozenset({"ssl_cert_reqs", "ssl_ca_certs"})
_SENTINEL_OPTIONS = _CLUSTER_OPTIONS | {"sentinel_username", "sentinel_password"}

#: What a call to Redis may raise when Redis fails: redis-py's errors, and
#: those of its cluster client that are not (a slot no master serves, during
#: a failover; no node reachable).
ERRORS: tuple[type[Exception], ...] = (redis.RedisError, redis.exceptions.RedisClusterException)
#: The same, with the socket errors a pub/sub connection may raise.
LISTENER_ERRORS: tuple[type[Exception], ...] = (*ERRORS, OSError)

_lock = threading.Lock()
_clients: dict[tuple[Any, ...], Any] = {}
# Also guarded by _lock: the asyncio clients of each event loop, dropped with the loop.
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, float], Any]] = (
    weakref.WeakKeyDictionary()
)


class RedisURLError(ImproperlyConfigured):
    """A Redis URL that names no deployment dwebsocket can use; the message says what is wrong."""


class Target(NamedTuple):
    """A Redis URL, read: which kind of deployment, and how to reach it."""

    kind: Literal["single", "cluster", "sentinel"]
    url: str  # as given
    nodes: tuple[tuple[str, int], ...] = ()  # cluster nodes or sentinels
    service: str = ""  # the master's name (sentinel)
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = None
    options: tuple[tuple[str, str], ...] = ()  # the query's parameters


def is_redis_url(url: object) -> bool:
    """Whether *url* is meant as a Redis URL (its scheme says so); :func:`parse` says whether it is a good one."""
    return isinstance(url, str) and url.startswith(_SINGLE_SCHEMES + _CLUSTER_SCHEMES + _SENTINEL_SCHEMES)


def is_cluster(url: str) -> bool:
    """Whether *url* names a Redis Cluster (keys need hash tags, broadcasts use sharded pub/sub)."""
    return url.startswith(_CLUSTER_SCHEMES)


def sharded_pubsub_supported() -> bool:
    """Whether the installed redis-py has sharded pub/sub (``SSUBSCRIBE``), which a cluster URL needs."""
    return hasattr(redis.client.PubSub, "ssubscribe") and hasattr(redis.cluster.RedisCluster, "spublish")


def parse(url: object) -> Target:
    """Read a Redis URL; :class:`RedisURLError` saying what is wrong with a malformed one.

    ``redis://``, ``rediss://`` and ``unix://`` URLs are redis-py's own and
    only checked for a scheme; cluster and sentinel URLs are read here.
    """
    if not isinstance(url, str) or not is_redis_url(url):
        raise RedisURLError(
            f"{url!r} is not a Redis URL: it must start with redis://, rediss://, unix://, "
            "redis+cluster://, rediss+cluster://, redis+sentinel:// or rediss+sentinel://."
        )
    if url.startswith(_SINGLE_SCHEMES):
        return Target("single", url, tls=url.startswith("rediss://"))
    scheme, _, rest = url.partition("://")
    kind: Literal["cluster", "sentinel"] = "cluster" if scheme.endswith("+cluster") else "sentinel"
    rest, _, fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    credentials, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(secret) if colon else None
        if not colon:  # redis://secret@host: a password alone, as redis-py reads it
            username, password = None, urllib.parse.unquote(user)
    nodes = tuple(_node(url, part) for part in hosts.split(","))
    try:
        options = tuple(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError:
        raise RedisURLError(f"{url!r}: its query {query!r} is not name=value pairs joined by &.") from None
    allowed = _CLUSTER_OPTIONS if kind == "cluster" else _SENTINEL_OPTIONS
    unknown = sorted({name for name, _value in options} - allowed)
    if unknown:
        raise RedisURLError(f"{url!r}: unknown parameter {unknown[0]!r}; it may have {', '.join(sorted(allowed))}.")
    parts = [p for p in path.split("/")] if slash else []
    service, db = "", 0
    if kind == "cluster":
        if parts and parts != [""] and parts != ["0"]:
            raise RedisURLError(f"{url!r}: a Redis Cluster has database 0 only; drop {'/' + path!r}.")
    else:
        if not parts or not parts[0]:
            raise RedisURLError(
                f"{url!r} names no service: a sentinel URL ends with the master's name, "
                "as in redis+sentinel://127.0.0.1:26379/mymaster."
            )
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise RedisURLError(f"{url!r}: after the service name only a database number may follow (/service/0).")
        service = urllib.parse.unquote(parts[0])
        db = int(parts[1]) if len(parts) == 2 else 0
    if fragment:
        raise RedisURLError(f"{url!r}: a Redis URL has no #fragment.")
    return Target(kind, url, nodes, service, db, scheme.startswith("rediss"), username, password, options)


def _node(url: str, part: str) -> tuple[str, int]:
    """One ``host:port`` of a cluster or sentinel URL (``[::1]:port`` for IPv6)."""
    if part.startswith("["):
        host, bracket, port = part[1:].partition("]")
        port = port[1:] if bracket and port.startswith(":") else ""
    else:
        host, _, port = part.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RedisURLError(
            f"{url!r}: {part!r} is not host:port; list the nodes as host:port, comma-separated, "
            "as in redis+cluster://10.0.0.1:7000,10.0.0.2:7000."
        )
    return host, int(port)


def _tls(target: Target) -> dict[str, Any]:
    """The connection arguments for TLS (none without it)."""
    if not target.tls:
        return {}
    options = dict(target.options)
    found: dict[str, Any] = {"ssl": True}
    if "ssl_cert_reqs" in options:
        found["ssl_cert_reqs"] = options["ssl_cert_reqs"]
    if "ssl_ca_certs" in options:
        found["ssl_ca_certs"] = options["ssl_ca_certs"]
    return found


def _make(url: str, timeout: float, connect: float, asynchronous: bool = False) -> Any:
    """A new client for *url*: commands take at most *timeout* seconds, connecting *connect*."""
    target = parse(url)
    times = {"socket_timeout": timeout, "socket_connect_timeout": connect}
    if target.kind == "single":
        module: Any = redis.asyncio if asynchronous else redis
        return module.Redis(connection_pool=module.BlockingConnectionPool.from_url(
            url, max_connections=_POOL_SIZE, timeout=timeout, **times,
        ))
    auth = {"username": target.username, "password": target.password}
    if target.kind == "cluster":
        cluster: Any = redis.asyncio.cluster if asynchronous else redis.cluster
        arguments = {
            "startup_nodes": [cluster.ClusterNode(host, port) for host, port in target.nodes],
            **auth, **times, **_tls(target),
        }
        if asynchronous:  # connects on its first command
            return cluster.RedisCluster(**arguments)
        return _LazyCluster(arguments)
    options = dict(target.options)
    sentinel: Any = redis.asyncio.sentinel if asynchronous else redis.sentinel
    # The sentinels answer "where is the master" only: quick calls, their own credentials.
    sentinels = sentinel.Sentinel(
        list(target.nodes),
        sentinel_kwargs={
            "socket_timeout": min(timeout, PRESENCE_TIMEOUT), "socket_connect_timeout": connect,
            "username": options.get("sentinel_username"), "password": options.get("sentinel_password"),
        },
        **times, **_tls(target),
    )
    return sentinels.master_for(target.service, db=target.db, max_connections=_POOL_SIZE, **auth)


def client(url: str, timeout: float = COMMAND_TIMEOUT) -> Any:
    """The process's client for quick commands on the Redis at *url*, each taking at most *timeout* seconds.

    One client per (URL, timeout): :data:`PUBLISH_TIMEOUT`,
    :data:`PRESENCE_TIMEOUT` or :data:`COMMAND_TIMEOUT`. The timeout bounds
    connecting and each answer (and, for one Redis, waiting for a free
    connection). A :class:`redis.Redis`, or a :class:`redis.cluster.RedisCluster`
    for a cluster URL.
    """
    return _get(("quick", url, timeout), lambda: _make(url, timeout, min(CONNECT_TIMEOUT, timeout)))


def blocking_client(url: str, wait: float) -> Any:
    """A client whose commands may block for *wait* seconds on purpose (BLPOP)."""
    timeout = wait + COMMAND_TIMEOUT
    return _get(("blocking", url, timeout), lambda: _make(url, timeout, CONNECT_TIMEOUT))


def aclient(url: str, wait: float) -> Any:
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
            found = clients[(url, timeout)] = _make(url, timeout, CONNECT_TIMEOUT, asynchronous=True)
        return found


def _get(key: tuple[Any, ...], make: Any) -> Any:
    with _lock:
        found = _clients.get(key)
        if found is None:
            found = _clients[key] = make()
        return found


class _LazyCluster:
    """A :class:`redis.cluster.RedisCluster` made on first use, and made again at each use until it could be.

    redis-py's cluster client connects as it is made, and raises if no node
    answers: a process that starts while the cluster is down must start all
    the same (its broker's breaker is open), and connect later. Every
    attribute is the cluster client's.

    ``_lock`` guards ``_client``.
    """

    def __init__(self, arguments: dict[str, Any]) -> None:
        self._arguments = arguments
        self._lock = threading.Lock()
        self._client: redis.cluster.RedisCluster | None = None

    def _get(self) -> redis.cluster.RedisCluster:
        with self._lock:
            if self._client is None:
                try:
                    self._client = redis.cluster.RedisCluster(**self._arguments)
                except redis.exceptions.RedisClusterException as exc:  # no node answered
                    raise redis.ConnectionError(str(exc)) from exc
            return self._client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    def close(self) -> None:
        with self._lock:
            found, self._client = self._client, None
        if found is not None:
            found.close()


def ping(redis_client: Any) -> None:
    """A real round trip, which raises if Redis cannot serve: on a cluster, to every master.

    (redis-py's own PING on a cluster goes to every node, replicas and a dead
    master still in its slot map included.)
    """
    if isinstance(redis_client, _LazyCluster):
        redis_client.ping(target_nodes=redis.cluster.RedisCluster.PRIMARIES)
    else:
        redis_client.ping()


def publish(target: Any, channel: str, data: bytes | str) -> Any:
    """``PUBLISH`` on one Redis, ``SPUBLISH`` on a cluster; *target* is a client or a pipeline."""
    if isinstance(target, (_LazyCluster, redis.cluster.RedisCluster, redis.cluster.ClusterPipeline)):
        return target.spublish(channel, data)
    return target.publish(channel, data)


class Subscriber:
    """The pub/sub of one listener thread, on one Redis or (sharded) on a cluster.

    On one Redis it is one redis-py ``PubSub``. On a cluster each channel is
    a shard channel (``SSUBSCRIBE``) on the master that serves its slot,
    which redis-py's slot map names; a ``PubSub`` per master, and
    :meth:`messages` waits on all their sockets at once. Messages come out
    as on one Redis (types ``subscribe``, ``unsubscribe``, ``message``). A
    cluster that moves a slot unsubscribes its channels (an ``unsubscribe``
    nobody asked for): the owner then starts again with a new Subscriber.

    Not thread-safe: it belongs to the thread that made it.
    """

    def __init__(self, redis_client: Any, after_error: bool = False) -> None:
        """*after_error*: it follows one that failed, and on a cluster reads the slot map again first."""
        self._client = redis_client
        self._cluster = isinstance(redis_client, (_LazyCluster, redis.cluster.RedisCluster))
        self._plain = None if self._cluster else redis_client.pubsub()
        self._nodes: dict[str, Any] = {}  # cluster: node name -> its PubSub
        self._node_of: dict[str, str] = {}  # cluster: channel -> the node name it was subscribed on
        self._mapped = not after_error  # cluster: the slot map is to be trusted

    def subscribe(self, *channels: str) -> None:
        if self._plain is not None:
            self._plain.subscribe(*channels)
            return
        if not self._mapped:
            # This Subscriber follows one that failed: the cluster may have
            # moved slots since (a failover), and only commands that fail
            # refresh redis-py's map, never a pub/sub connection. Read it
            # again. (Not otherwise: it replaces the nodes' clients, under
            # the feet of the other threads that share this one.)
            self._client.nodes_manager.initialize()
            self._mapped = True
        for channel in channels:
            node = self._client.get_node_from_key(channel)
            pubsub = self._nodes.get(node.name)
            if pubsub is None:
                pubsub = self._nodes[node.name] = self._client.get_redis_connection(node).pubsub()
            pubsub.ssubscribe(channel)
            self._node_of[channel] = node.name

    def unsubscribe(self, *channels: str) -> None:
        if self._plain is not None:
            self._plain.unsubscribe(*channels)
            return
        for channel in channels:
            name = self._node_of.pop(channel, None)
            if name is not None:
                self._nodes[name].sunsubscribe(channel)

    def messages(self, timeout: float) -> list[dict[str, Any]]:
        """What arrived; if nothing did, what arrives within *timeout* seconds."""
        if self._plain is not None:
            found = []
            message = self._plain.get_message(timeout=timeout)
            while message is not None:
                found.append(message)
                message = self._plain.get_message(timeout=0)
            return found
        found = self._drain()
        if found or not self._nodes:
            return found
        # Every parser's buffer is empty now (get_message read it all): wait on the sockets.
        # (A connection's socket is private to redis-py; without one, a short nap instead.)
        found_sockets = [getattr(p.connection, "_sock", None) for p in self._nodes.values()]
        sockets = [s for s in found_sockets if s is not None]
        if sockets and len(sockets) == len(found_sockets):
            select.select(sockets, [], [], timeout)
        else:
            threading.Event().wait(min(timeout, 0.01))
        return self._drain()

    def _drain(self) -> list[dict[str, Any]]:
        found = []
        for pubsub in list(self._nodes.values()):
            message = pubsub.get_message(timeout=0)
            while message is not None:
                kind = message.get("type")
                message["type"] = {"smessage": "message", "ssubscribe": "subscribe",
                                   "sunsubscribe": "unsubscribe"}.get(kind, kind)
                found.append(message)
                message = pubsub.get_message(timeout=0)
        return found

    def close(self) -> None:
        for pubsub in [self._plain, *self._nodes.values()]:
            if pubsub is not None:
                try:
                    pubsub.close()
                except Exception:
                    pass

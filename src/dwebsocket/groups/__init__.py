"""Groups: named sets of connections that a message can be broadcast to.

``ws.join("lobby")`` adds a connection to a group; ``broadcast("lobby", msg)``
sends to every member, from any code in any process: a view, the shell, a
management command, a task-queue worker. The broker (``WEBSOCKET_BROKER``)
carries broadcasts between processes: ``"memory"`` (the default) within one
process, ``"redis://..."`` across every process and host that share a Redis.

Each group keeps its recent broadcasts, numbered (its history,
``WEBSOCKET_HISTORY_SIZE``), so a reconnecting client can get what it missed:
see :mod:`.history` and docs/delivery.md.

A broadcast is framed once and offered to each member's transport, which
never makes the broadcaster wait; see ``WEBSOCKET_BROADCAST_QUEUE``.
"""

from __future__ import annotations

import asyncio
import threading

from .. import conf
from .. import metrics as _metrics
from ..connection import Link
from ..messages import Message, check_message
from ..transports._sync import cooperate
from .brokers import Broker, make_broker
from .history import Position
from .registry import Member, Registry

__all__ = [
    "Member",
    "TooManyGroups",
    "await_join",
    "broadcast",
    "get_broker",
    "group_members",
    "group_size",
    "history_since",
    "join",
    "leave",
    "position",
    "registry",
    "wait_join",
]

#: This process's members of every group.
registry = Registry()

# Guarded by _broker_lock: the process's broker, made on first use.
_broker: Broker | None = None
_broker_url: str | None = None
_broker_lock = threading.Lock()


def get_broker() -> Broker:
    """This process's broker, as ``WEBSOCKET_BROKER`` configures it."""
    global _broker, _broker_url
    url = conf.get("WEBSOCKET_BROKER")
    with _broker_lock:
        if _broker is None or url != _broker_url:
            if _broker is not None:
                _broker.stop()
            _broker, _broker_url = make_broker(url, registry), url
            for group in registry.groups():
                _broker.subscribe(group)
        return _broker


def _exclude_id(exclude: object) -> str | None:
    if exclude is None:
        return None
    if isinstance(exclude, str):
        return exclude
    connection_id = getattr(exclude, "id", None)
    if not isinstance(connection_id, str):
        raise TypeError(
            f"exclude= takes a connection (request.websocket) or its id, not {type(exclude).__name__}."
        )
    return connection_id


def broadcast(group: str, message: Message, exclude: object = None) -> None:
    """Send *message* to every connection in *group*, in every process.

    *exclude* is a connection (or its ``id``) that should not get it, usually
    the sender. Callable from anywhere, sync or async code alike: it never
    waits for the members. With a Redis broker it waits at most
    ``_redis.PUBLISH_TIMEOUT`` (1 s) for Redis (as long again while this
    process's subscription to *group*, which a join asked for, is pending:
    docs/reliability.md), and not at all while Redis is failing: then only
    this process's members get it, and it does not raise. Under gevent it
    lets the other greenlets run once before it returns (see
    :func:`~dwebsocket.transports._sync.cooperate`).
    """
    _metrics.published()
    get_broker().publish(group, check_message(message), _exclude_id(exclude))
    cooperate()


def position(group: str) -> str | None:
    """*group*'s current history position, ``"<epoch>:<seq>"``: its last broadcast's (seq 0 before any).

    A page rendered now can pin it (``{% websocket_position "lobby" %}``), so
    that ``dwebsocket.js`` recovers the broadcasts made between the render
    and the socket's open (docs/delivery.md). ``None`` when history is off
    (``WEBSOCKET_HISTORY_SIZE = 0``) or cannot be read (Redis failing); it
    waits at most ``_redis.PRESENCE_TIMEOUT`` (1 s) for Redis.
    """
    _check_group(group)
    found = get_broker().position(group)
    return None if found is None else str(found)


def group_size(group: str) -> int:
    """How many connections are in *group*, across the whole deployment."""
    return get_broker().size(group)


def group_members(group: str) -> list[Member]:
    """The connections in *group* across the deployment, with their users."""
    return get_broker().members(group)


_JOIN_TIMEOUT = 2.0  # seconds a join waits for the broker (Redis) to take it


class TooManyGroups(ValueError):
    """``join()`` would put a connection in more groups than ``WEBSOCKET_MAX_GROUPS`` allows."""


def join(link: Link, group: str) -> Broker | None:
    """Add the connection of *link* to *group*; the broker to flush, if the join is not complete yet.

    A closed connection joins nothing: it has left its groups for good.
    Raises :class:`TooManyGroups` if the connection is in ``WEBSOCKET_MAX_GROUPS``
    groups already (joining one it is in is no new group).
    """
    _check_group(group)
    broker = get_broker()
    limit = link.limits.max_groups
    with registry.lock:
        if limit is not None:
            joined = registry.groups_of(link)
            if len(joined) >= limit and group not in joined:
                raise TooManyGroups(
                    f"This connection is in {len(joined)} groups already, as many as "
                    f"WEBSOCKET_MAX_GROUPS ({limit}) allows: leave one before joining {group!r}, "
                    "or raise WEBSOCKET_MAX_GROUPS."
                )
        # Registered under the registry's lock: the close's leave-all (which
        # takes it too) runs after this join, or the join sees the close.
        if not link.on_close(_leave_all):
            return None
        added, first = registry.add(group, link)
        if not added:
            return None
        if first:
            broker.subscribe(group)
        broker.add_member(group, link)
    return None if broker.synchronous else broker


def leave(link: Link, group: str) -> Broker | None:
    """Remove the connection of *link* from *group*; the broker to flush, if that is not complete yet."""
    broker = get_broker()
    with registry.lock:
        if not _remove(link, group, broker):
            return None
    return None if broker.synchronous else broker


def wait_join(broker: Broker | None) -> None:
    """Block until *broker* took the join or leave that returned it (bounded)."""
    if broker is not None:
        broker.flush(_JOIN_TIMEOUT)


async def await_join(broker: Broker | None) -> None:
    """:func:`wait_join` without blocking the event loop."""
    if broker is not None:
        await asyncio.get_running_loop().run_in_executor(None, broker.flush, _JOIN_TIMEOUT)


def _leave_all(link: Link) -> None:
    """The close hook: remove the connection from every group it is in."""
    with registry.lock:
        groups = registry.groups_of(link)
        if groups:
            broker = get_broker()
            for group in groups:
                _remove(link, group, broker)
        registry.forget(link)


def _remove(link: Link, group: str, broker: Broker) -> bool:
    """Take *link* out of *group*; call with the registry's lock held."""
    removed, last = registry.remove(group, link)
    if removed:
        if last:
            broker.unsubscribe(group)
        broker.remove_member(group, link)
    return removed


def _check_group(group: str) -> None:
    if not isinstance(group, str) or not group or len(group) > 200:
        raise ValueError(f"A group name is a non-empty string of at most 200 characters, not {group!r}.")


def history_since(
    group: str, asked: tuple[str, int] | None
) -> tuple[list[tuple[Position, Message, str | None]], Position | None, bool | None]:
    """What a connection rejoining *group* missed after position *asked*: (entries, current position, complete).

    With *asked* ``None`` (the client had no position) there is nothing to
    recover: no entries, the current position, and ``None``. Without history
    (``WEBSOCKET_HISTORY_SIZE = 0``, or Redis unreachable) the position is
    ``None`` and, if something was asked, complete is ``False``.
    """
    broker = get_broker()
    if asked is None:
        return [], broker.position(group), None
    recovery = broker.since(group, Position(*asked))
    if recovery is None:
        return [], None, False
    entries = [(e.position, e.message, e.exclude) for e in recovery.entries]
    return entries, recovery.position, recovery.complete


async def ahistory_since(
    group: str, asked: tuple[str, int] | None
) -> tuple[list[tuple[Position, Message, str | None]], Position | None, bool | None]:
    """:func:`history_since` without blocking the event loop (a Redis broker is asked in a thread)."""
    if get_broker().synchronous:
        return history_since(group, asked)
    return await asyncio.get_running_loop().run_in_executor(None, history_since, group, asked)


def last_read(client: str) -> int:
    """The number of the last message of page *client* that a view read (0: none known).

    A ``dwebsocket.js`` page numbers the messages it sends and keeps each
    until a view has read it; when it reconnects, it sends again those after
    this number, and the server drops copies of earlier ones. Kept as long as
    ``WEBSOCKET_HISTORY_TTL``, in the broker (Redis: across processes).
    """
    return get_broker().last_read(client)


def record_read(client: str, number: int) -> None:
    """A view read message *number* of page *client* (see :func:`last_read`); never waits."""
    get_broker().record_read(client, number)

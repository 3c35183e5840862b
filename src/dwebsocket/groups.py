"""Groups: named sets of connections that a message can be broadcast to.

``ws.join("lobby")`` adds a connection to a group; ``broadcast("lobby", msg)``
sends to every member, from any code in any process: a view, the shell, a
management command, a task-queue worker. The broker (``WEBSOCKET_BROKER``)
carries broadcasts between processes: ``"memory"`` (the default) within one
process, ``"redis://..."`` across every process and host that share a Redis.

A broadcast reaches each member through a bounded queue of its own, so a
slow member never slows the others; see ``WEBSOCKET_BROADCAST_QUEUE``.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wsproto.frame_protocol import FrameProtocol

from . import conf

if TYPE_CHECKING:
    from .brokers import Broker
    from .connection import Connection, Message

__all__ = ["Member", "broadcast", "group_members", "group_size"]


@dataclass(frozen=True)
class Member:
    """One connection in a group, as presence reports it."""

    id: str
    user: str | None  # the user's primary key, for an authenticated request


class Encoded:
    """A broadcast message, with its WebSocket frame built once for all members."""

    __slots__ = ("message", "_frame")

    def __init__(self, message: Message) -> None:
        self.message = message
        self._frame: bytes | None = None

    @property
    def frame(self) -> bytes:
        """The unmasked, uncompressed server frame (for members without compression)."""
        if self._frame is None:  # a race builds it twice, harmlessly
            self._frame = bytes(FrameProtocol(client=False, extensions=[]).send_data(self.message, True))
        return self._frame


class _Registry:
    """The groups of this process's connections.

    ``_lock`` guards ``_members``; broker calls happen outside it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._members: dict[str, dict[str, Connection]] = {}

    def add(self, group: str, connection: Connection) -> bool:
        """Add; True if it is the group's first member in this process."""
        with self._lock:
            members = self._members.setdefault(group, {})
            first = not members
            members[connection.id] = connection
        return first

    def remove(self, group: str, connection: Connection) -> bool:
        """Remove; True if it was the group's last member in this process."""
        with self._lock:
            members = self._members.get(group)
            if not members or members.pop(connection.id, None) is None:
                return False
            if not members:
                del self._members[group]
                return True
            return False

    def local(self, group: str) -> list[Connection]:
        with self._lock:
            return list(self._members.get(group, {}).values())

    def groups(self) -> list[str]:
        with self._lock:
            return list(self._members)

    def deliver(self, group: str, message: Message, exclude: str | None) -> int:
        """Offer *message* to this process's members of *group*; returns how many."""
        encoded = Encoded(message)
        count = 0
        for member in self.local(group):
            if member.id != exclude and member._offer(encoded):
                count += 1
        return count


registry = _Registry()

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
            from .brokers import make_broker

            if _broker is not None:
                _broker.stop()
            _broker, _broker_url = make_broker(url, registry), url
            for group in registry.groups():
                _broker.subscribe(group)
        return _broker


def _exclude_id(exclude: Any) -> str | None:
    if exclude is None:
        return None
    if isinstance(exclude, str):
        return exclude
    connection = getattr(exclude, "_ws", exclude)  # AsyncWebSocket -> its WebSocket
    return str(connection.id)


def broadcast(group: str, message: Message, exclude: Any = None) -> None:
    """Send *message* to every connection in *group*, in every process.

    *exclude* is a connection (or its ``id``) that should not get it, usually
    the sender. Callable from anywhere, sync or async code alike: it never
    waits for the members.
    """
    from .connection import check_message

    get_broker().publish(group, check_message(message), _exclude_id(exclude))


def group_size(group: str) -> int:
    """How many connections are in *group*, across the whole deployment."""
    return get_broker().size(group)


def group_members(group: str) -> list[Member]:
    """The connections in *group* across the deployment, with their users."""
    return get_broker().members(group)


_JOIN_TIMEOUT = 2.0  # seconds a join waits for the broker (Redis) to take it


def join(connection: Connection, group: str) -> Broker | None:
    """Add *connection* to *group*; the broker to flush, if the join is not complete yet.

    A closed connection joins nothing: it has left its groups for good.
    """
    _check_group(group)
    broker = get_broker()
    with connection._groups_lock:
        if connection.closed or group in connection._groups:
            return None
        connection._groups.add(group)
        if registry.add(group, connection):
            broker.subscribe(group)
        broker.add_member(group, connection)
    return None if broker.synchronous else broker


def wait_for(broker: Broker | None) -> None:
    """Block until *broker* took the join or leave that returned it (bounded)."""
    if broker is not None:
        broker.flush(_JOIN_TIMEOUT)


async def await_for(broker: Broker | None) -> None:
    """:func:`wait_for` without blocking the event loop."""
    if broker is not None:
        await asyncio.get_running_loop().run_in_executor(None, broker.flush, _JOIN_TIMEOUT)


def leave(connection: Connection, group: str) -> Broker | None:
    """Remove *connection* from *group*; the broker to flush, if that is not complete yet."""
    with connection._groups_lock:
        if group not in connection._groups:
            return None
        broker = get_broker()
        _remove(connection, group, broker)
    return None if broker.synchronous else broker


def leave_all(connection: Connection) -> None:
    """Remove *connection* from every group it is in (when it closes)."""
    with connection._groups_lock:
        if connection._groups:
            broker = get_broker()
            for group in list(connection._groups):
                _remove(connection, group, broker)


def _remove(connection: Connection, group: str, broker: Broker) -> None:
    """Take *connection* out of *group*; call with its ``_groups_lock`` held."""
    connection._groups.discard(group)
    if registry.remove(group, connection):
        broker.unsubscribe(group)
    broker.remove_member(group, connection)


def _check_group(group: str) -> None:
    if not isinstance(group, str) or not group or len(group) > 200:
        raise ValueError(f"A group name is a non-empty string of at most 200 characters, not {group!r}.")

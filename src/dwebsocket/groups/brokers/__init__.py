"""Brokers carry broadcasts and presence between the processes of a deployment.

``WEBSOCKET_BROKER = "memory"`` (the default) keeps everything in this
process; ``"redis://host:port/db"`` shares it through Redis pub/sub.
"""

from __future__ import annotations

from typing import Protocol

from django.core.exceptions import ImproperlyConfigured

from ...conf import is_redis_url
from ...connection import Link
from ...messages import Message
from ..history import Position, Recovery
from ..registry import Member, Registry
from .memory import MemoryBroker

__all__ = ["Broker", "MemoryBroker", "make_broker"]


class Broker(Protocol):
    """What the groups need from a broker."""

    #: False if joins take effect in the background (then flush() waits for them).
    synchronous: bool

    def flush(self, timeout: float) -> None:
        """Wait (at most *timeout* seconds) until earlier joins and leaves took effect."""

    def publish(self, group: str, message: Message, exclude: str | None) -> bool:
        """Deliver *message* to *group* in every process (this one included).

        With history on (``WEBSOCKET_HISTORY_SIZE`` > 0) the broadcast gets the
        group's next position, is kept in the history, and reaches each
        process's members with it, in position order. ``False`` if it reached
        this process's members only (Redis failed, or its breaker is open:
        then without a position); it never raises for that.
        """

    def position(self, group: str) -> Position | None:
        """*group*'s current position (its last broadcast's, seq 0 before any).

        ``None`` while history is off, or the history cannot be read (Redis
        failed, or its breaker is open); it never raises for that.
        """

    def since(self, group: str, position: Position) -> Recovery | None:
        """The broadcasts to *group* after *position* that the history keeps.

        ``None`` in the cases :meth:`position` returns ``None``: the caller
        counts that as "not recovered".
        """

    def subscribe(self, group: str) -> None:
        """This process has members in *group* now."""

    def unsubscribe(self, group: str) -> None:
        """This process has no members in *group* any more."""

    def add_member(self, group: str, link: Link) -> None: ...

    def remove_member(self, group: str, link: Link) -> None: ...

    def size(self, group: str) -> int: ...

    def members(self, group: str) -> list[Member]: ...

    def last_read(self, client: str) -> int:
        """The last number of page *client*'s messages a view read (``groups.reads``); 0 if unknown."""

    def record_read(self, client: str, number: int) -> None:
        """A view read message *number* of page *client*; never waits for anything."""

    def stop(self) -> None:
        """Release connections and threads (when the setting changes)."""


def make_broker(url: str, registry: Registry) -> Broker:
    """The broker that *url* (the WEBSOCKET_BROKER setting) names."""
    if url == "memory":
        return MemoryBroker(registry)
    if is_redis_url(url):
        # Imported here because redis-py is an optional dependency (dwebsocket[redis]).
        from .redis import RedisBroker

        return RedisBroker(url, registry)
    raise ImproperlyConfigured(
        f'WEBSOCKET_BROKER must be "memory" or a Redis URL like "redis://127.0.0.1:6379/0", not {url!r}.'
    )

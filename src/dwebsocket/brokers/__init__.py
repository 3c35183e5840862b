"""Brokers carry broadcasts and presence between the processes of a deployment.

``WEBSOCKET_BROKER = "memory"`` (the default) keeps everything in this
process; ``"redis://host:port/db"`` shares it through Redis pub/sub.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from django.core.exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    from ..connection import Connection, Message
    from ..groups import Member, _Registry


class Broker(Protocol):
    """What the groups need from a broker."""

    #: False if joins take effect in the background (then flush() waits for them).
    synchronous: bool

    def flush(self, timeout: float) -> None:
        """Wait (at most *timeout* seconds) until earlier joins and leaves took effect."""

    def publish(self, group: str, message: Message, exclude: str | None) -> None:
        """Deliver *message* to *group* in every process (this one included)."""

    def subscribe(self, group: str) -> None:
        """This process has members in *group* now."""

    def unsubscribe(self, group: str) -> None:
        """This process has no members in *group* any more."""

    def add_member(self, group: str, connection: Connection) -> None: ...

    def remove_member(self, group: str, connection: Connection) -> None: ...

    def size(self, group: str) -> int: ...

    def members(self, group: str) -> list[Member]: ...

    def stop(self) -> None:
        """Release connections and threads (when the setting changes)."""


def make_broker(url: str, registry: _Registry) -> Broker:
    """The broker that *url* (the WEBSOCKET_BROKER setting) names."""
    if url == "memory":
        from .memory import MemoryBroker

        return MemoryBroker(registry)
    if isinstance(url, str) and url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisBroker

        return RedisBroker(url, registry)
    raise ImproperlyConfigured(
        f'WEBSOCKET_BROKER must be "memory" or a Redis URL like "redis://127.0.0.1:6379/0", not {url!r}.'
    )

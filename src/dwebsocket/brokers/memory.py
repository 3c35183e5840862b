"""The in-process broker: the default, nothing to set up, one process only."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..groups import Member

if TYPE_CHECKING:
    from ..connection import Connection, Message
    from ..groups import _Registry


class MemoryBroker:
    """Broadcasts and presence within this process."""

    def __init__(self, registry: _Registry) -> None:
        self._registry = registry

    synchronous = True

    def flush(self, timeout: float) -> None:
        pass

    def publish(self, group: str, message: Message, exclude: str | None) -> None:
        self._registry.deliver(group, message, exclude)

    def subscribe(self, group: str) -> None:
        pass

    def unsubscribe(self, group: str) -> None:
        pass

    def add_member(self, group: str, connection: Connection) -> None:
        pass

    def remove_member(self, group: str, connection: Connection) -> None:
        pass

    def size(self, group: str) -> int:
        return len(self._registry.local(group))

    def members(self, group: str) -> list[Member]:
        return [Member(c.id, c.user_id) for c in self._registry.local(group)]

    def stop(self) -> None:
        pass

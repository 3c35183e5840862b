"""The in-process broker: the default, nothing to set up, one process only."""

from __future__ import annotations

from ...connection import Link
from ...messages import Message
from ..registry import Member, Registry

__all__ = ["MemoryBroker"]


class MemoryBroker:
    """Broadcasts and presence within this process."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    synchronous = True

    def flush(self, timeout: float) -> None:
        pass

    def publish(self, group: str, message: Message, exclude: str | None) -> bool:
        self._registry.deliver(group, message, exclude)
        return True

    def subscribe(self, group: str) -> None:
        pass

    def unsubscribe(self, group: str) -> None:
        pass

    def add_member(self, group: str, link: Link) -> None:
        pass

    def remove_member(self, group: str, link: Link) -> None:
        pass

    def size(self, group: str) -> int:
        return len(self._registry.local(group))

    def members(self, group: str) -> list[Member]:
        return self._registry.members(group)

    def stop(self) -> None:
        pass

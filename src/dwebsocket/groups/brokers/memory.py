"""The in-process broker: the default, nothing to set up, one process only."""

from __future__ import annotations

import threading

from ...connection import Link
from ...messages import Message
from ..history import MemoryHistory, Position, Recovery, configured
from ..reads import MemoryReads
from ..registry import Member, Registry

__all__ = ["MemoryBroker"]


class MemoryBroker:
    """Broadcasts, presence and group history within this process.

    ``_lock`` guards ``_history`` (the history, made on first use, and made
    anew when the history settings change: a new history, so new epochs) and
    ``_settings`` (the ``(size, ttl)`` it was made with); a publish holds it
    from taking its position until its members were offered the broadcast,
    so that they see a group's broadcasts in position order.
    """

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._lock = threading.Lock()
        self._history: MemoryHistory | None = None
        self._settings: tuple[int, float] | None = None
        self._reads = MemoryReads()

    synchronous = True

    def last_read(self, client: str) -> int:
        return self._reads.last(client)

    def record_read(self, client: str, number: int) -> None:
        self._reads.record(client, number)

    def flush(self, timeout: float) -> None:
        pass

    def publish(self, group: str, message: Message, exclude: str | None) -> bool:
        settings = configured()
        if settings is None:
            self._registry.deliver(group, message, exclude)
            return True
        with self._lock:
            position = self._current(settings).append(group, message, exclude)
            self._registry.deliver(group, message, exclude, position)
        return True

    def position(self, group: str) -> Position | None:
        settings = configured()
        if settings is None:
            return None
        with self._lock:
            history = self._current(settings)
        return history.position(group)

    def since(self, group: str, position: Position) -> Recovery | None:
        settings = configured()
        if settings is None:
            return None
        with self._lock:
            history = self._current(settings)
        return history.since(group, position)

    def _current(self, settings: tuple[int, float]) -> MemoryHistory:
        """The history for *settings*; call with ``_lock`` held."""
        if self._history is None or settings != self._settings:
            self._history, self._settings = MemoryHistory(*settings), settings
        return self._history

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

"""This process's group members: who is in which group, and the presence record.

A leaf of the groups layer: it knows connections only through their
:class:`~dwebsocket.connection.Link`, and nothing of brokers.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from .. import metrics as _metrics
from ..connection import Link
from ..messages import Frame, Message, check_message
from .history import Position

logger = logging.getLogger("dwebsocket")

__all__ = ["Member", "Registry"]


@dataclass(frozen=True)
class Member:
    """One connection in a group, as presence reports it."""

    id: str
    user: str | None  # the user's primary key, for an authenticated request


class Registry:
    """The groups of this process's connections.

    ``_lock`` guards ``_members`` (group -> connection id -> link) and
    ``_joined`` (connection id -> its groups). Broker calls made while a join
    or leave holds it only queue work (lock order: the registry's lock, then
    the broker's, never the reverse).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._members: dict[str, dict[str, Link]] = {}
        # A tuple per connection, not a set: most are in one group or a few
        # (at most WEBSOCKET_MAX_GROUPS), and a tuple of one costs 48 bytes, a set 216.
        self._joined: dict[str, tuple[str, ...]] = {}

    def add(self, group: str, link: Link) -> tuple[bool, bool]:
        """Add; (added, first): whether it joined now, and whether it is the group's first here.

        Call with :attr:`lock` held, once the caller made sure the connection is
        not closed (``groups.join`` registers its close hook first).
        """
        groups = self._joined.get(link.id, ())
        if group in groups:
            return False, False
        self._joined[link.id] = (*groups, group)
        members = self._members.setdefault(group, {})
        first = not members
        members[link.id] = link
        return True, first

    def remove(self, group: str, link: Link) -> tuple[bool, bool]:
        """Remove; (removed, last): whether it was in the group, and whether it was the last here.

        Call with :attr:`lock` held.
        """
        groups = self._joined.get(link.id)
        if groups is None or group not in groups:
            return False, False
        self._joined[link.id] = tuple(known for known in groups if known != group)
        members = self._members.get(group, {})
        members.pop(link.id, None)
        last = not members
        if last:
            self._members.pop(group, None)
        return True, last

    def groups_of(self, link: Link) -> list[str]:
        """The groups *link* is in; call with :attr:`lock` held."""
        return list(self._joined.get(link.id, ()))

    def forget(self, link: Link) -> None:
        """Drop the record of *link* once it left every group; call with :attr:`lock` held."""
        self._joined.pop(link.id, None)

    @property
    def lock(self) -> threading.Lock:
        """The lock that makes a join, a leave and the leave-all at close exclusive."""
        return self._lock

    def local(self, group: str) -> list[Link]:
        """The members of *group* in this process."""
        with self._lock:
            return list(self._members.get(group, {}).values())

    def groups(self) -> list[str]:
        """The groups with members in this process."""
        with self._lock:
            return list(self._members)

    def deliver(self, group: str, message: Message, exclude: str | None, position: Position | None = None) -> int:
        """Offer *message* to this process's members of *group*; returns how many took it.

        The frame carries *group* and the broadcast's *position* in the group's
        history (``None`` when it has none: history off, or Redis unreachable),
        so that a member's transport can tell the client where it is.

        :func:`~dwebsocket.groups.broadcast` checks messages at the call; one
        that is not a message anyway (from a broker, say) is skipped with a
        warning here, so that it never reaches the thread that delivers (a
        broker's listener) or a member's writer.
        """
        try:
            frame = Frame(check_message(message), group, position)
        except (TypeError, ValueError) as exc:
            logger.warning("dwebsocket: skipped a broadcast to group %r: %s", group, exc)
            return 0
        count = 0
        try:
            for member in self.local(group):
                if member.id != exclude and member.offer(frame):
                    count += 1
        finally:
            _metrics.delivered(frame, count)
            frame.offered()
        return count

    def members(self, group: str) -> list[Member]:
        """Presence records of this process's members of *group*."""
        return [Member(link.id, link.user_id) for link in self.local(group)]

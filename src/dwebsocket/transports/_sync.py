"""Synchronisation objects sized for one per connection.

A server holds thousands of idle connections, and what each one keeps
counts: ``threading.Condition`` keeps its waiters in a ``deque``, whose first
block alone is about 600 bytes, allocated up front even though a connection's
condition rarely has a waiter, and never more than a couple. These do the same
with less.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

__all__ = ["LightCondition"]


class LightCondition(threading.Condition):
    """A ``threading.Condition`` whose waiters are kept in a list, not a deque.

    Every CPython ``Condition`` (3.10 to 3.13) uses its ``_waiters`` only with
    ``append``, ``remove``, ``[0]``, ``len``, ``clear`` and truth tests, which a
    list does alike; an empty list costs 56 bytes, the deque about 760. With a
    handful of waiters at most, removing from the front of a list is as fast.
    Under gevent the locks are gevent's, as for ``threading.Condition``.
    """

    def __init__(self, lock: Any = None) -> None:
        super().__init__(lock)
        if type(getattr(self, "_waiters", None)) is deque:  # a Python that keeps them otherwise: left as is
            self._waiters: list[Any] = []  # type: ignore[assignment]

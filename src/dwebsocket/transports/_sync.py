"""Synchronisation objects sized for one per connection, and :func:`cooperate`.

A server holds thousands of idle connections, and what each one keeps
counts. A ``threading.Condition`` costs about 1.3 KiB: a ``deque`` for its
waiters (its first block alone is about 600 bytes, allocated up front though a
connection's condition rarely has a waiter, and never more than a few), an
instance ``__dict__``, and five bound methods of its lock kept as attributes.
:class:`LightCondition` does the same in about 120 bytes besides its lock.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["LightCondition", "cooperate"]


def cooperate() -> None:
    """Under gevent, let the other greenlets run once; elsewhere, nothing.

    A broadcast never waits for its members (every write is non-blocking),
    so under gevent a loop of broadcasts would give no other greenlet a turn
    until it ends: not the other requests, not the writes queued for slow
    members, not gunicorn's heartbeat (the arbiter kills a worker silent for
    ``--timeout``, 30 s by default, cutting every connection). Called after
    each broadcast; a no-op in the hub greenlet, which must not switch away.
    """
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("threading"):
        return
    import gevent

    if gevent.getcurrent() is not gevent.get_hub():
        gevent.sleep(0)


class LightCondition:
    """A ``threading.Condition`` in slots, its waiters in a list.

    The same algorithm as CPython's ``Condition`` (3.10 to 3.13): a waiter is a
    lock of its own, acquired once by the waiting thread and released by
    :meth:`notify`; :meth:`wait` releases the condition's lock fully, even an
    ``RLock`` held several times, and takes it back before it returns. The
    lock's own methods are called as needed rather than kept as attributes.
    Under gevent the locks are gevent's (``threading.Lock`` is looked up at
    each wait, after monkey-patching), as for ``threading.Condition``.
    """

    __slots__ = ("_lock", "_waiters")

    def __init__(self, lock: Any = None) -> None:
        self._lock: Any = threading.RLock() if lock is None else lock
        # Guarded by _lock: the locks of the threads waiting, oldest first.
        self._waiters: list[Any] = []

    def __enter__(self) -> bool:
        return bool(self._lock.__enter__())

    def __exit__(self, *args: object) -> None:
        self._lock.__exit__(*args)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return bool(self._lock.acquire(blocking, timeout))

    def release(self) -> None:
        self._lock.release()

    def __repr__(self) -> str:
        return f"<LightCondition({self._lock}, {len(self._waiters)})>"

    def _release_save(self) -> Any:
        release_save = getattr(self._lock, "_release_save", None)  # an RLock: release every level
        if release_save is not None:
            return release_save()
        self._lock.release()
        return None

    def _acquire_restore(self, state: Any) -> None:
        acquire_restore = getattr(self._lock, "_acquire_restore", None)
        if acquire_restore is not None:
            acquire_restore(state)
        else:
            self._lock.acquire()

    def _is_owned(self) -> bool:
        is_owned = getattr(self._lock, "_is_owned", None)
        if is_owned is not None:
            return bool(is_owned())
        if self._lock.acquire(False):  # a plain lock: taken by someone, presumably us
            self._lock.release()
            return False
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock, wait until notified or *timeout* seconds pass, take the lock back.

        Returns ``False`` if *timeout* passed first.
        """
        if not self._is_owned():
            raise RuntimeError("cannot wait on un-acquired lock")
        waiter = threading.Lock()
        waiter.acquire()
        self._waiters.append(waiter)
        saved_state = self._release_save()
        got_it = False
        try:
            if timeout is None:
                waiter.acquire()
                got_it = True
            elif timeout > 0:
                got_it = waiter.acquire(True, timeout)
            else:
                got_it = waiter.acquire(False)
            return got_it
        finally:
            self._acquire_restore(saved_state)
            if not got_it:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        """Wait until *predicate* is true or *timeout* passes; the predicate's last value."""
        end = None
        result = predicate()
        while not result:
            if timeout is not None:
                if end is None:
                    end = time.monotonic() + timeout
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                self.wait(remaining)
            else:
                self.wait()
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        """Wake up to *n* waiters; hold the lock."""
        if not self._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        waiters = self._waiters
        while waiters and n > 0:
            waiter = waiters[0]
            try:
                waiter.release()
            except RuntimeError:  # it timed out meanwhile and released itself
                pass
            else:
                n -= 1
            try:
                waiters.remove(waiter)
            except ValueError:
                pass

    def notify_all(self) -> None:
        """Wake every waiter; hold the lock."""
        if self._waiters:
            self.notify(len(self._waiters))
        elif not self._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")

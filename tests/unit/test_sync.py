"""The per-connection synchronisation objects: a LightCondition behaves as a threading.Condition, for less memory."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import tracemalloc

import pytest
from django.test import override_settings


from dwebsocket.transports._sync import LightCondition
from dwebsocket.transports.policy import Limits, Outbox, RateMeter
from tests.servers import SRC


def _per_object(make, n: int = 500) -> float:
    make()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [make() for _ in range(n)]
        size = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    del kept
    return size


@pytest.mark.parametrize("lock", [None, threading.Lock, threading.RLock])
def test_a_waiter_is_woken_by_notify_and_gets_the_lock_back(lock):
    cond = LightCondition(lock() if lock else None)
    items: list[int] = []
    got: list[int] = []

    def consumer() -> None:
        with cond:
            while not items:
                assert cond.wait(5)
            got.append(items.pop())

    thread = threading.Thread(target=consumer)
    thread.start()
    time.sleep(0.05)  # the consumer waits
    with cond:
        items.append(7)
        cond.notify()
    thread.join(5)
    assert got == [7] and not thread.is_alive()
    assert cond._waiters == []


def test_wait_times_out_returns_false_and_leaves_no_waiter():
    cond = LightCondition()
    with cond:
        started = time.monotonic()
        assert cond.wait(0.05) is False
        assert cond.wait(0) is False
        assert time.monotonic() - started >= 0.05
        assert cond._waiters == []


def test_wait_releases_an_rlock_held_twice_and_restores_both_levels():
    cond = LightCondition(threading.RLock())
    other_got_it = threading.Event()

    def other() -> None:
        with cond:
            other_got_it.set()
            cond.notify_all()

    with cond:
        with cond:  # held twice
            thread = threading.Thread(target=other)
            thread.start()
            assert cond.wait(5)  # the other thread could take the lock: it was released fully
            assert other_got_it.is_set()
        assert not _taken_elsewhere(cond)  # still held once: no other thread can take it
    thread.join(5)
    assert _taken_elsewhere(cond)  # released at last


def _taken_elsewhere(cond: LightCondition) -> bool:
    """Whether another thread can take *cond*'s lock now (it gives it back at once)."""
    result: list[bool] = []

    def attempt() -> None:
        got = cond.acquire(True, 0.05)
        if got:
            cond.release()
        result.append(got)

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join(5)
    return result == [True]


def test_notify_all_wakes_every_waiter_and_notify_one():
    cond = LightCondition()
    woken: list[int] = []
    ready = threading.Semaphore(0)

    def waiter(i: int) -> None:
        with cond:
            ready.release()
            cond.wait(5)
            woken.append(i)

    threads = [threading.Thread(target=waiter, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for _ in threads:
        ready.acquire()
    with cond:
        cond.notify(1)
    deadline = time.monotonic() + 5
    while len(woken) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert len(woken) == 1
    with cond:
        cond.notify_all()
    for t in threads:
        t.join(5)
    assert sorted(woken) == [0, 1, 2]


def test_wait_for_returns_the_predicate_or_times_out():
    cond = LightCondition()
    with cond:
        assert cond.wait_for(lambda: 5) == 5
        assert cond.wait_for(lambda: 0, timeout=0.02) == 0


def test_waiting_or_notifying_without_the_lock_is_an_error():
    for cond in (LightCondition(), LightCondition(threading.Lock())):
        with pytest.raises(RuntimeError):
            cond.wait(0)
        with pytest.raises(RuntimeError):
            cond.notify()
        with pytest.raises(RuntimeError):
            cond.notify_all()


def test_a_light_condition_costs_a_fraction_of_a_threading_condition():
    light = _per_object(LightCondition)
    standard = _per_object(threading.Condition)
    assert light < 300 < 1000 < standard


def test_an_empty_outbox_keeps_no_deque_and_gets_one_back_while_items_wait():
    outbox: Outbox[str] = Outbox(Limits())
    assert outbox._items == ()
    assert outbox.put("a") and outbox.offer("b") == "queued"
    assert len(outbox) == 2 and outbox.peek() == "a"
    assert outbox.take() == "a" and outbox.take() == "b" and outbox.take() is None
    assert outbox._items == ()
    outbox.push_front("c")
    assert outbox.take_all() == ["c"] and outbox._items == ()


def test_connections_opened_under_the_same_settings_share_one_limits():
    with override_settings(WEBSOCKET_MAX_QUEUE=17):
        first, second = Limits.from_settings(), Limits.from_settings()
        assert first is second and first.max_queue == 17
    with override_settings(WEBSOCKET_MAX_QUEUE=18):
        third = Limits.from_settings()
    assert third.max_queue == 18 and third is not first


def test_a_light_condition_works_under_gevent():
    """gevent's locks, after monkey-patching: a greenlet waits and another wakes it."""
    script = (
        "from gevent import monkey; monkey.patch_all()\n"
        "import gevent\n"
        "from dwebsocket.transports._sync import LightCondition\n"
        "cond, got = LightCondition(), []\n"
        "def waiter():\n"
        "    with cond:\n"
        "        got.append(cond.wait(5))\n"
        "g = gevent.spawn(waiter); gevent.sleep(0.05)\n"
        "with cond:\n"
        "    cond.notify_all()\n"
        "g.join(5)\n"
        "with cond:\n"
        "    got.append(cond.wait(0.01))\n"
        "assert got == [True, False], got\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )
    assert result.stdout.strip() == "ok", result.stderr


def test_connections_without_a_rate_limit_share_one_stateless_meter():
    first, second = RateMeter(Limits()), RateMeter(Limits())
    assert first is second and all(first.allow() for _ in range(1000))
    limited = RateMeter(Limits(rate_limit=(2, 60.0)))
    assert limited is not first and [limited.allow() for _ in range(3)] == [True, True, False]



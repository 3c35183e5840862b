"""Group history in Redis: positions shared by every process, recovery, and the faults it must survive.

Each test gets its own redis-server (tests.servers.RedisServer); each
:class:`Process` is one process's registry and RedisBroker on it, so two or
three of them act as the processes of one deployment.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis
from django.test import override_settings

from dwebsocket.groups.brokers.redis import decode
from dwebsocket.groups.history import Position, Recovery
from dwebsocket.messages import Frame

from ..servers import RedisServer, start_redis
from .test_redis_broker import Process as BrokerProcess


class Member:
    """A member (what the registry needs of a Link) that keeps (message, position) of each frame."""

    def __init__(self, id: str) -> None:
        self.id = id
        self.user_id = None
        self._cond = threading.Condition()
        self.got: list[tuple[object, Position | None]] = []

    def offer(self, frame: Frame) -> bool:
        with self._cond:
            self.got.append((frame.message, frame.position))  # type: ignore[arg-type]
            self._cond.notify_all()
        return True

    def wait_for(self, count: int, timeout: float = 10.0) -> list[tuple[object, Position | None]]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.got) >= count, timeout), (
                f"{len(self.got)} of {count} broadcasts after {timeout} s: {self.got!r}"
            )
            return list(self.got)


class Process(BrokerProcess):
    """One process's side of the broker (test_redis_broker's), whose joins wait until they are live."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url

    def join(self, group: str, member: Member) -> Member:  # type: ignore[override]
        super().join(group, member)  # type: ignore[arg-type]
        wait_until(lambda: group in self.broker._live, what="the subscription")
        return member

    def since(self, group: str, position: Position) -> Recovery:
        found = self.broker.since(group, position)
        assert found is not None
        return found

    def position(self, group: str) -> Position:
        found = self.broker.position(group)
        assert found is not None
        return found


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with start_redis() as server:
        yield server


@pytest.fixture
def processes(redis_server: RedisServer) -> Iterator[list[Process]]:
    """Three processes sharing one Redis."""
    made = [Process(redis_server.url) for _ in range(3)]
    yield made
    for process in made:
        process.broker.stop()


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def seqs(recovery: Recovery) -> list[int]:
    return [entry.position.seq for entry in recovery.entries]


# -- positions --------------------------------------------------------------------------


def test_positions_are_shared_by_every_process_and_reach_members_in_order(processes):
    a, b, c = processes
    start = a.position("g")
    assert start.seq == 0 and b.position("g") == start
    member = c.join("g", Member("m"))
    per_thread, threads = 50, 4

    def publish(process: Process, thread: int) -> None:
        for n in range(per_thread):
            process.broker.publish("g", f"{thread}:{n}", None)

    workers = [threading.Thread(target=publish, args=(p, t)) for t, p in enumerate([a, b] * (threads // 2))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    got = member.wait_for(per_thread * threads)
    assert [position for _, position in got] == [Position(start.epoch, n) for n in range(1, per_thread * threads + 1)]
    for thread in range(threads):  # each publisher's own broadcasts in the order it made them
        assert [m for m, _ in got if m.startswith(f"{thread}:")] == [f"{thread}:{n}" for n in range(per_thread)]
    assert a.position("g") == b.position("g") == Position(start.epoch, per_thread * threads)


def test_the_channel_carries_the_position_the_script_gave(redis_server, processes):
    a, b, _ = processes
    member = b.join("g", Member("m"))
    raw = redis.Redis.from_url(redis_server.url).pubsub(ignore_subscribe_messages=True)
    raw.subscribe("dwebsocket:group:g")
    raw.get_message(timeout=1)
    a.broker.publish("g", "héllo", "someone")
    a.broker.publish("g", b"\x00\xff", None)
    data = [raw.get_message(timeout=2) for _ in range(2)]
    raw.close()
    broadcasts = [decode(d["data"]) for d in data if d]
    assert [(x.message, x.exclude, x.position) for x in broadcasts] == [
        ("héllo", "someone", member.wait_for(2)[0][1]), (b"\x00\xff", None, member.got[1][1]),
    ]
    assert [p.seq for _, p in member.got] == [1, 2]  # type: ignore[union-attr]


def test_a_publisher_s_own_members_get_the_position_when_it_delivers_itself(processes):
    a, _, _ = processes
    member = Member("local")
    with a.registry.lock:  # a member the listener is not subscribed for: the publisher delivers
        a.registry.add("g", member)  # type: ignore[arg-type]
    a.broker.publish("g", "one", None)
    a.broker.publish("g", "two", None)
    epoch = a.position("g").epoch
    assert member.wait_for(2) == [("one", Position(epoch, 1)), ("two", Position(epoch, 2))]


def test_broadcasts_made_while_the_subscription_is_confirmed_arrive_once_in_position_order(processes):
    a, b, _ = processes
    member = Member("m")
    per_thread, threads = 40, 4
    barrier = threading.Barrier(threads + 1)

    def publish(process: Process, thread: int) -> None:
        barrier.wait()
        for n in range(per_thread):
            process.broker.publish("g", f"{thread}:{n}", None)

    workers = [threading.Thread(target=publish, args=(p, t)) for t, p in enumerate([a, b, a, b])]
    for worker in workers:
        worker.start()
    with a.registry.lock:  # a joins while both publish: delivered by a itself, then by its listener
        a.registry.add("g", member)  # type: ignore[arg-type]
        a.broker.subscribe("g")
    barrier.wait()
    for worker in workers:
        worker.join()
    a.broker.publish("g", "last", None)
    wait_until(lambda: member.got and member.got[-1][0] == "last", what="the last broadcast")
    seen = [position.seq for _, position in member.got]  # type: ignore[union-attr]
    # Those published before the subscription are missed (recovery's job), the rest arrive in order.
    assert seen == sorted(set(seen)), f"out of order or twice: {seen}"
    assert seen[-1] == a.position("g").seq == per_thread * threads + 1


# -- recovery ---------------------------------------------------------------------------


def test_since_reads_what_another_process_published(processes):
    a, b, _ = processes
    start = b.position("g")
    a.broker.publish("g", "one", None)
    a.broker.publish("g", b"two", "conn-1")
    a.broker.publish("g", "three", None)
    everything = b.since("g", start)
    assert everything.complete and everything.position == Position(start.epoch, 3)
    assert [(e.position.seq, e.message, e.exclude) for e in everything.entries] == [
        (1, "one", None), (2, b"two", "conn-1"), (3, "three", None),
    ]
    tail = b.since("g", Position(start.epoch, 2))
    assert seqs(tail) == [3] and tail.complete
    assert b.since("g", tail.position) == Recovery([], tail.position, True)  # nothing missed
    assert b.since("g", Position(start.epoch, 9)) == Recovery([], tail.position, False)  # ahead
    assert b.since("g", Position("abc", 1)) == Recovery([], tail.position, False)  # another epoch


@override_settings(WEBSOCKET_HISTORY_SIZE=5)
def test_a_history_trimmed_by_size_is_not_complete(processes):
    a, b, _ = processes
    start = a.position("g")
    for n in range(250):  # MAXLEN ~ trims whole stream nodes (100 entries each)
        a.broker.publish("g", str(n), None)
    trimmed = b.since("g", start)
    assert not trimmed.complete and 5 <= len(trimmed.entries) < 250
    assert seqs(trimmed) == list(range(251 - len(trimmed.entries), 251))
    recent = b.since("g", Position(start.epoch, 245))
    assert recent.complete and seqs(recent) == [246, 247, 248, 249, 250]


@override_settings(WEBSOCKET_HISTORY_TTL=0.5)
def test_broadcasts_older_than_the_ttl_are_not_recovered(processes):
    a, b, _ = processes
    start = a.position("g")
    a.broker.publish("g", "old", None)
    time.sleep(0.7)
    a.broker.publish("g", "new", None)
    recovery = b.since("g", start)
    assert seqs(recovery) == [2] and not recovery.complete
    assert b.since("g", Position(start.epoch, 1)).complete
    time.sleep(0.7)  # the whole stream expired; the counter stays
    assert b.since("g", Position(start.epoch, 1)) == Recovery([], Position(start.epoch, 2), False)
    assert b.since("g", Position(start.epoch, 2)) == Recovery([], Position(start.epoch, 2), True)


def test_a_malformed_entry_is_skipped_with_a_warning(redis_server, processes, caplog):
    a, b, _ = processes
    start = a.position("g")
    a.broker.publish("g", "one", None)
    raw = redis.Redis.from_url(redis_server.url)
    raw.xadd("dwebsocket:{g}:history", {"kind": "x", "payload": "?"}, id="2-0")
    raw.hincrby("dwebsocket:{g}:meta", "s", 1)
    a.broker.publish("g", "three", None)
    with caplog.at_level("WARNING", logger="dwebsocket"):
        recovery = b.since("g", start)
    assert seqs(recovery) == [1, 3] and not recovery.complete
    assert "skipped a malformed history entry of group 'g'" in caplog.text


# -- history lost -----------------------------------------------------------------------


def test_redis_restarted_empty_starts_a_new_epoch(redis_server, processes):
    a, b, _ = processes
    member = b.join("g", Member("m"))
    a.broker.publish("g", "before", None)
    before = member.wait_for(1)[0][1]
    assert before is not None
    redis_server.stop()
    redis_server.start()

    def published_in_a_new_epoch() -> bool:
        count = len(member.got)
        a.broker.publish("g", "after", None)  # the first ones fail, or reach nobody yet
        time.sleep(0.1)
        return any(p is not None and p.epoch != before.epoch for _, p in member.got[count:])

    wait_until(published_in_a_new_epoch, timeout=15, what="publishing through Redis again")
    after = member.got[-1][1]
    assert after is not None and after.epoch != before.epoch
    recovery = b.since("g", before)
    assert recovery.complete is False and recovery.position.epoch == after.epoch
    assert b.since("g", Position(after.epoch, 0)).complete


def test_a_lost_counter_while_the_stream_remains_starts_a_new_history(redis_server, processes):
    a, b, _ = processes
    for n in range(3):
        a.broker.publish("g", str(n), None)
    old = a.position("g")
    raw = redis.Redis.from_url(redis_server.url)
    raw.delete("dwebsocket:{g}:meta")  # evicted, say
    a.broker.publish("g", "new", None)
    current = b.position("g")
    assert current.epoch != old.epoch and current.seq == 1
    recovery = b.since("g", Position(current.epoch, 0))
    assert recovery.complete and [e.message for e in recovery.entries] == ["new"]  # nothing of the old history
    assert b.since("g", old).complete is False


def test_a_counter_behind_its_stream_starts_a_new_history(redis_server, processes):
    a, b, _ = processes
    for n in range(3):
        a.broker.publish("g", str(n), None)
    old = a.position("g")
    redis.Redis.from_url(redis_server.url).hset("dwebsocket:{g}:meta", "s", 1)  # the next seq is taken
    member = b.join("g", Member("m"))
    a.broker.publish("g", "next", None)
    position = member.wait_for(1)[0][1]
    assert position is not None and position.epoch != old.epoch and position.seq == 2
    assert seqs(b.since("g", Position(position.epoch, 1))) == [2]


def test_a_counter_written_by_something_else_never_makes_a_caller_raise(redis_server, processes, caplog):
    a, _, _ = processes
    member = Member("m")
    with a.registry.lock:
        a.registry.add("g", member)  # type: ignore[arg-type]
    redis.Redis.from_url(redis_server.url).hset("dwebsocket:{g}:meta", mapping={"e": "not hex!", "s": 3})
    with caplog.at_level("WARNING", logger="dwebsocket"):
        assert a.broker.publish("g", "still delivered", None) is True
        assert a.broker.position("g") is None
        assert a.broker.since("g", Position("ab", 0)) is None
    assert member.wait_for(1) == [("still delivered", None)]
    assert "malformed history counter of group 'g'" in caplog.text


# -- off, and Redis failing ------------------------------------------------------------


@override_settings(WEBSOCKET_HISTORY_SIZE=0)
def test_history_off_publishes_plain_broadcasts_and_keeps_nothing(redis_server, processes):
    a, b, _ = processes
    member = b.join("g", Member("m"))
    raw = redis.Redis.from_url(redis_server.url)
    listener = raw.pubsub(ignore_subscribe_messages=True)
    listener.subscribe("dwebsocket:group:g")
    listener.get_message(timeout=1)
    a.broker.publish("g", "plain", None)
    assert member.wait_for(1) == [("plain", None)]
    message = listener.get_message(timeout=2)
    listener.close()
    assert message is not None and message["data"][:1] == b"t"  # the old kind: no position
    assert raw.keys("dwebsocket:{*") == []
    assert a.broker.position("g") is None and a.broker.since("g", Position("ab", 0)) is None


def test_with_the_breaker_open_position_and_since_answer_none_at_once(redis_server, processes):
    a, _, _ = processes
    a.position("g")
    redis_server.pause()  # accepts connections, answers nothing
    try:
        a.broker.publish("g", "opens the breaker", None)  # waits PUBLISH_TIMEOUT once
        started = time.monotonic()
        assert a.broker.position("g") is None
        assert a.broker.since("g", Position("ab", 0)) is None
        assert time.monotonic() - started < 0.1
    finally:
        redis_server.resume()

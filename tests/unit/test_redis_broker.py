"""The Redis broker against a real redis-server, and the faults it must survive.

Each test gets its own redis-server on a free 127.0.0.1 port (stopped, paused
or restarted at will: tests.servers.RedisServer), its own Registry and its own
RedisBroker, so no test sees another's members or listener thread. A member is
a :class:`Member`: a connection id and the broadcasts offered to it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from dwebsocket.groups.brokers.redis import RedisBroker
from dwebsocket.groups.registry import Registry
from dwebsocket.messages import Frame

from ..servers import RedisServer, start_redis


class Member:
    """What the registry needs of a member (a Link): an id, and offer()."""

    def __init__(self, id: str) -> None:
        self.id = id
        self.user_id = None
        self._cond = threading.Condition()
        self.got: list[object] = []

    def offer(self, frame: Frame) -> bool:
        with self._cond:
            self.got.append(frame.message)
            self._cond.notify_all()
        return True

    def wait_for(self, count: int, timeout: float = 10.0) -> list[object]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.got) >= count, timeout), (
                f"{len(self.got)} of {count} broadcasts after {timeout} s: {self.got!r}"
            )
            return list(self.got)

    def nothing_more(self, count: int, wait: float = 0.5) -> None:
        time.sleep(wait)
        with self._cond:
            assert len(self.got) == count, f"more than {count} broadcasts: {self.got!r}"


class Logs(logging.Handler):
    """The dwebsocket log lines written during a test (the logger does not propagate to caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)


@pytest.fixture
def logs() -> Iterator[Logs]:
    handler = Logs()
    logger = logging.getLogger("dwebsocket")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with start_redis() as server:
        yield server


class Process:
    """One process's side of the broker: its registry and its broker."""

    def __init__(self, url: str) -> None:
        self.registry = Registry()
        self.broker = RedisBroker(url, self.registry)

    def join(self, group: str, member: Member) -> None:
        with self.registry.lock:
            added, first = self.registry.add(group, member)  # type: ignore[arg-type]
            if first:
                self.broker.subscribe(group)
            self.broker.add_member(group, member)  # type: ignore[arg-type]
        self.broker.flush(5.0)


@pytest.fixture
def process(redis_server: RedisServer) -> Iterator[Process]:
    made = Process(redis_server.url)
    yield made
    made.broker.stop()


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def subscribed(url: str, channel: str) -> bool:
    return bool(redis.Redis.from_url(url).pubsub_numsub(channel)[0][1])


# -- payloads ---------------------------------------------------------------------------


def test_no_payload_kills_the_listener(redis_server, process, logs):
    member = Member("m1")
    process.join("bad", member)
    channel = "dwebsocket:group:bad"
    wait_until(lambda: subscribed(redis_server.url, channel), what="the subscription")
    raw = redis.Redis.from_url(redis_server.url)
    bad = [b"t\xff\xfe not utf-8", b"", b"x", b"t", b"b", b"\xff" * 10, b"t1:", b"t99999999999999:abc"]
    for payload in bad:
        raw.publish(channel, payload)
    process.broker.publish("bad", "still alive", None)
    assert member.wait_for(1) == ["still alive"]
    member.nothing_more(1)
    assert logs.count("skipped a malformed broadcast") == len(bad)  # one line each
    assert process.broker._listener.is_alive()


def test_no_field_of_a_broadcast_can_rewrite_it(redis_server, process):
    member = Member("m1")
    process.join("inject", member)
    wait_until(lambda: subscribed(redis_server.url, "dwebsocket:group:inject"), what="the subscription")
    # The excluded id used to end at the first newline: the rest became the message.
    process.broker.publish("inject", "hello", "x\nINJECTED")
    process.broker.publish("inject", b"\n\x00bytes", "é\n")
    process.broker.publish("inject", "excluded", "m1")
    process.broker.publish("inject", "after", None)
    assert member.wait_for(3) == ["hello", b"\n\x00bytes", "after"]

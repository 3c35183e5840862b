"""The Redis broker against a real redis-server, and the faults it must survive.

Each test gets its own redis-server on a free 127.0.0.1 port (stopped, paused
or restarted at will: tests.servers.RedisServer), its own Registry and its own
RedisBroker, so no test sees another's members or listener thread. A member is
a :class:`Member`: a connection id and the broadcasts offered to it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from django.test import override_settings

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


class Settings:
    """Django settings changed for one test (``settings.NAME = value``), restored after it."""

    def __init__(self) -> None:
        object.__setattr__(self, "_overrides", [])

    def __setattr__(self, name: str, value: object) -> None:
        override = override_settings(**{name: value})
        override.enable()
        self._overrides.append(override)

    def restore(self) -> None:
        for override in reversed(self._overrides):
            override.disable()


@pytest.fixture
def settings() -> Iterator[Settings]:
    changed = Settings()
    try:
        yield changed
    finally:
        changed.restore()


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def subscribed(url: str, channel: str, count: int = 1) -> bool:
    return bool(redis.Redis.from_url(url).pubsub_numsub(channel)[0][1] >= count)


@contextlib.contextmanager
def member_on_each_side(redis_server: RedisServer, process: Process, group: str) -> Iterator[tuple[Member, Member]]:
    """A member of *group* in *process*, and one in another process's broker on the same Redis; both subscribed."""
    local, remote = Member("local"), Member("remote")
    process.join(group, local)
    other = Process(redis_server.url)
    try:
        other.join(group, remote)
        wait_until(lambda: subscribed(redis_server.url, f"dwebsocket:group:{group}", 2), what="both subscriptions")
        yield local, remote
    finally:
        other.broker.stop()


# -- payloads ---------------------------------------------------------------------------


def test_no_payload_kills_the_listener(redis_server, process, logs):
    member = Member("m1")
    process.join("bad", member)
    channel = "dwebsocket:group:bad"
    wait_until(lambda: subscribed(redis_server.url, channel), what="the subscription")
    raw = redis.Redis.from_url(redis_server.url)
    bad = [
        b"t-0:0:\xff\xfe not UTF-8", b"t-0:2:\xff\xfeexcluded id not UTF-8", b"", b"x", b"t", b"b-",
        b"\xff" * 10, b"t-1:", b"t-99999999999999:abc", b"t-x:", b"b-0:",
    ]
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


# -- Redis lost, and back --------------------------------------------------------------


def test_after_an_outage_no_broadcast_is_lost_to_the_publishers_own_members(redis_server, process, logs):
    with member_on_each_side(redis_server, process, "live") as (local, remote):
        process.broker.publish("live", "before", None)
        assert local.wait_for(1) == ["before"] and remote.wait_for(1) == ["before"]

        redis_server.stop()
        process.broker.publish("live", "during", None)  # local delivery goes on
        time.sleep(3.0)
        redis_server.start()
        # The listener is still waiting to reconnect (its backoff): these succeed
        # in Redis, and used to reach no member of this process.
        sent = [f"after {n}" for n in range(20)]
        for message in sent:
            process.broker.publish("live", message, None)
            time.sleep(0.05)
        assert local.wait_for(22) == ["before", "during", *sent]
        local.nothing_more(22, wait=1.0)  # exactly once: none comes back through Redis too
        # Once the listener is subscribed again, broadcasts go through Redis as before.
        wait_until(lambda: redis.Redis.from_url(redis_server.url).pubsub_numsub("dwebsocket:group:live")[0][1] == 2,
                   what="both subscriptions again")
        process.broker.publish("live", "through Redis", None)
        assert local.wait_for(23)[-1] == "through Redis"
        # What the outage kept reaches the other process too, late, in order, once, before the newer one.
        assert remote.wait_for(23, timeout=20) == ["before", "during", *sent, "through Redis"]
        remote.nothing_more(23)
        local.nothing_more(23)
    assert logs.count("lost Redis") == 2  # one line per broker, not one per attempt
    assert logs.count("' is back.") == 2
    assert logs.count("published 22 broadcast(s) kept while Redis was unreachable; dropped 0") == 1  # "through Redis" too: it came within _DRAIN_DELAY


@pytest.mark.parametrize("history", [100, 0], ids=["history", "no-history"])
def test_the_outbox_publishes_an_outage_late_in_order_and_its_bound_drops_the_oldest(
    redis_server, process, logs, settings, history
):
    settings.WEBSOCKET_OUTAGE_BUFFER = 5
    settings.WEBSOCKET_HISTORY_SIZE = history
    with member_on_each_side(redis_server, process, "box") as (local, remote):
        before = process.broker.position("box")
        redis_server.stop()
        sent = [f"during {n}" for n in range(8)]
        for message in sent:
            process.broker.publish("box", message, None)
        assert local.wait_for(8) == sent  # at once, without Redis
        redis_server.start()
        # The other process gets the last 5 (the bound), late, in order, once; ours none again.
        assert remote.wait_for(5, timeout=20) == sent[3:]
        remote.nothing_more(5)
        local.nothing_more(8)
        wait_until(lambda: logs.count("kept while Redis was unreachable") == 1, what="the log line")
        assert logs.count(
            "published 5 broadcast(s) kept while Redis was unreachable; dropped 3 (WEBSOCKET_OUTAGE_BUFFER full)"
        ) == 1
        if history:  # each got a position: the group history gives them back
            assert before is not None
            current = process.broker.position("box")
            assert current is not None and current.seq == 5  # Redis restarted empty: a new history
            recovered = process.broker.since("box", type(current)(current.epoch, 0))
            assert recovered is not None and recovered.complete
            assert [e.message for e in recovered.entries] == sent[3:]
            assert [e.position.seq for e in recovered.entries] == [1, 2, 3, 4, 5]
        else:
            assert process.broker.position("box") is None


def test_an_outbox_of_0_keeps_nothing_and_old_broadcasts_are_dropped(redis_server, process, logs, settings):
    settings.WEBSOCKET_OUTAGE_BUFFER = 0
    with member_on_each_side(redis_server, process, "none") as (local, remote):
        redis_server.stop()
        process.broker.publish("none", "lost", None)
        assert local.wait_for(1) == ["lost"]
        settings.WEBSOCKET_OUTAGE_BUFFER = 10
        settings.WEBSOCKET_HISTORY_TTL = 1.0
        process.broker.publish("none", "too old", None)
        time.sleep(1.5)
        process.broker.publish("none", "kept", None)  # keeping it drops the one older than the TTL
        settings.WEBSOCKET_HISTORY_TTL = 60.0  # "kept" outlives the wait after Redis is back
        redis_server.start()
        assert remote.wait_for(1, timeout=20) == ["kept"]
        remote.nothing_more(1, wait=1.0)
        assert local.wait_for(3) == ["lost", "too old", "kept"]
        assert logs.count("published 1 broadcast(s) kept while Redis was unreachable; dropped 0 "
                          "(WEBSOCKET_OUTAGE_BUFFER full) and 1 (older than WEBSOCKET_HISTORY_TTL)") == 1


def test_redis_is_back_is_logged_only_after_it_answered(logs):
    from ..servers import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    unreachable = Process(url)
    try:
        time.sleep(1.5)  # several reconnection attempts
        assert logs.count("cannot reach Redis") == 1
        assert logs.count("' is back.") == 0
    finally:
        unreachable.broker.stop()


def test_the_reconnection_backoff_never_waits_more_than_its_documented_2_seconds():
    from dwebsocket.groups.brokers.redis import _Backoff

    backoff = _Backoff()
    delays = [backoff.next() for _ in range(200)]
    assert 0.05 <= delays[0] <= 0.1  # the first attempt is soon
    assert max(delays) <= 2.0
    assert max(delays) >= 1.0  # and it does back off
    backoff.reset()
    assert backoff.next() <= 0.1


# -- a hung Redis ----------------------------------------------------------------------


def within(seconds: float, function, *args):
    """What *function* returns, which must take less than *seconds* (a hang fails, not blocks the run)."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(function(*args)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"{function.__name__} still runs after {seconds} s"
    return result[0]


def test_a_hung_redis_costs_one_short_timeout_then_broadcasts_fail_fast(redis_server, process, logs):
    from dwebsocket import _redis

    member = Member("m")
    process.join("hung", member)
    wait_until(lambda: subscribed(redis_server.url, "dwebsocket:group:hung"), what="the subscription")
    redis_server.pause()  # accepts connections, answers nothing
    try:
        def calls():
            started = time.monotonic()
            for n in range(20):
                process.broker.publish("hung", f"m{n}", None)
            sizes = [process.broker.size("hung") for _ in range(5)]
            members = process.broker.members("hung")
            return time.monotonic() - started, sizes, members

        elapsed, sizes, members = within(10, calls)
        # The first PUBLISH waits PUBLISH_TIMEOUT; then the breaker is open and
        # nothing waits for Redis (it used to be 5 s for each call).
        assert elapsed < _redis.PUBLISH_TIMEOUT + 1.5
        assert member.wait_for(20) == [f"m{n}" for n in range(20)]  # local members still served
        assert sizes == [1] * 5 and [m.id for m in members] == ["m"]
    finally:
        redis_server.resume()
    # Redis answers again: within the backoff's 5 s (and a probe), broadcasts go through it.
    raw = redis.Redis.from_url(redis_server.url).pubsub(ignore_subscribe_messages=True)
    raw.subscribe("dwebsocket:group:hung")
    raw.get_message(timeout=1)

    def reached_redis():
        process.broker.publish("hung", "again", None)
        return raw.get_message(timeout=0.2) is not None

    wait_until(reached_redis, timeout=10, what="broadcasts through Redis again")
    raw.close()
    count = len(member.wait_for(21))
    assert member.got[20:] == ["again"] * (count - 20)  # each exactly once, none lost
    assert logs.count("lost Redis") == 1 and logs.count("' is back.") == 1

"""Group history in one process: MemoryHistory, the memory broker's positions, the helper and the tag."""

from __future__ import annotations

import threading

import pytest
from django.template import Context, Template
from django.test import override_settings

from dwebsocket.groups.brokers.memory import MemoryBroker
from dwebsocket.groups.history import META_TTL, Entry, MemoryHistory, Position, Recovery
from dwebsocket.groups.registry import Registry
from dwebsocket.messages import Frame


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def seqs(recovery: Recovery) -> list[int]:
    return [entry.position.seq for entry in recovery.entries]


# -- Position --------------------------------------------------------------------------


def test_a_position_reads_back_what_it_writes():
    position = Position("3f2a9c", 42)
    assert str(position) == "3f2a9c:42"
    assert Position.parse("3f2a9c:42") == position
    assert Position.parse("ab:0") == Position("ab", 0)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("3f2a9c", "no ':'"),
        (":42", "epoch"),
        ("XYZ:1", "epoch"),
        ("3F2A:1", "epoch"),
        ("a" * 65 + ":1", "epoch"),
        ("3f2a:", "seq"),
        ("3f2a:-1", "seq"),
        ("3f2a:1.5", "seq"),
        ("3f2a:1:2", "seq"),
        ("3f2a: 1", "seq"),
        ("3f2a:" + "9" * 20, "seq"),
    ],
)
def test_a_malformed_position_is_refused_with_its_problem(text, problem):
    with pytest.raises(ValueError, match=problem):
        Position.parse(text)


def test_a_position_that_is_no_string_is_a_value_error():
    with pytest.raises(ValueError, match="not int"):
        Position.parse(42)  # type: ignore[arg-type]


# -- MemoryHistory ---------------------------------------------------------------------


def test_positions_count_each_group_from_1():
    history = MemoryHistory(10, 60)
    start = history.position("a")
    assert start.seq == 0
    assert [history.append("a", f"m{n}", None).seq for n in range(3)] == [1, 2, 3]
    assert history.append("b", "other", None).seq == 1
    assert history.position("a") == Position(start.epoch, 3)
    assert history.position("b").epoch != start.epoch  # each counter its own history


def test_a_new_history_has_new_epochs():
    # A restarted process: no position of the old one may pass for one of the new.
    first, second = MemoryHistory(10, 60), MemoryHistory(10, 60)
    first.append("g", "x", None)
    second.append("g", "x", None)
    assert first.position("g").epoch != second.position("g").epoch
    recovery = second.since("g", Position(first.position("g").epoch, 0))
    assert recovery == Recovery([], second.position("g"), False)


def test_the_ring_keeps_the_last_size_broadcasts():
    history = MemoryHistory(3, 60)
    epoch = history.position("g").epoch
    for n in range(1, 6):
        history.append("g", f"m{n}", "x" if n == 4 else None)
    everything = history.since("g", Position(epoch, 0))
    assert seqs(everything) == [3, 4, 5] and not everything.complete
    assert everything.entries[1] == Entry(Position(epoch, 4), "m4", "x")
    assert history.since("g", Position(epoch, 1)).complete is False  # 2 was trimmed
    tail = history.since("g", Position(epoch, 2))
    assert seqs(tail) == [3, 4, 5] and tail.complete
    assert tail.position == Position(epoch, 5)


def test_broadcasts_older_than_the_ttl_are_gone():
    clock = Clock()
    history = MemoryHistory(100, 10.0, clock)
    epoch = history.position("g").epoch
    history.append("g", "old", None)
    clock.now += 6
    history.append("g", "newer", None)
    clock.now += 5  # "old" is 11 s old, "newer" 5 s
    recovery = history.since("g", Position(epoch, 0))
    assert seqs(recovery) == [2] and not recovery.complete
    assert history.since("g", Position(epoch, 1)).complete
    clock.now += 100
    gone = history.since("g", Position(epoch, 1))
    assert gone == Recovery([], Position(epoch, 2), False)  # expired, not "nothing missed"


def test_nothing_missed_stays_complete_after_the_messages_expired():
    clock = Clock()
    history = MemoryHistory(100, 10.0, clock)
    position = history.append("g", "m", None)
    clock.now += 3600  # the message expired an hour ago; the counter is kept for a day
    history.append("other", "sweeps expired rings", None)
    assert history.since("g", position) == Recovery([], position, True)


def test_an_idle_group_s_counter_is_dropped_after_a_day_and_comes_back_with_a_new_epoch():
    clock = Clock()
    history = MemoryHistory(100, 10.0, clock)
    position = history.append("g", "m", None)
    clock.now += META_TTL + 1
    history.append("other", "sweeps expired counters", None)
    assert len(history._groups) == 1  # the idle group's counter is gone: memory is bounded
    recovery = history.since("g", position)
    assert recovery.position.epoch != position.epoch and recovery.position.seq == 0
    assert recovery.complete is False


def test_since_an_unknown_or_ahead_position_recovers_nothing():
    history = MemoryHistory(10, 60)
    current = history.append("g", "m", None)
    assert history.since("g", Position("0123", 1)) == Recovery([], current, False)  # another epoch
    assert history.since("g", Position(current.epoch, 7)) == Recovery([], current, False)  # ahead
    assert history.since("g", current) == Recovery([], current, True)  # nothing missed


def test_expired_rings_are_swept_by_appends_to_other_groups():
    clock = Clock()
    history = MemoryHistory(100, 10.0, clock)
    for n in range(50):
        history.append(f"g{n}", "m" * 1000, None)
    clock.now += 11
    history.append("new", "m", None)
    assert sum(len(g.ring) for g in history._groups.values()) == 1
    assert list(history._fresh) == ["new"]


# -- the memory broker -----------------------------------------------------------------


class Member:
    """What the registry needs of a member (a Link): an id, and offer(); it keeps the frames."""

    def __init__(self, id: str) -> None:
        self.id = id
        self.user_id = None
        self.frames: list[Frame] = []

    def offer(self, frame: Frame) -> bool:
        self.frames.append(frame)  # list.append is atomic: concurrent broadcasts may call it
        return True


def joined(registry: Registry, group: str, member: Member) -> Member:
    with registry.lock:
        registry.add(group, member)  # type: ignore[arg-type]
    return member


def test_the_memory_broker_delivers_each_broadcast_with_its_position():
    registry = Registry()
    broker = MemoryBroker(registry)
    member = joined(registry, "g", Member("m"))
    start = broker.position("g")
    assert start is not None and start.seq == 0
    broker.publish("g", "one", None)
    broker.publish("g", b"two", "m")
    broker.publish("g", "three", None)
    assert [(f.message, f.group, f.position) for f in member.frames] == [
        ("one", "g", Position(start.epoch, 1)), ("three", "g", Position(start.epoch, 3)),
    ]
    recovery = broker.since("g", start)
    assert recovery is not None and recovery.complete
    assert [(e.message, e.exclude) for e in recovery.entries] == [("one", None), (b"two", "m"), ("three", None)]


def test_concurrent_broadcasts_reach_members_in_position_order():
    registry = Registry()
    broker = MemoryBroker(registry)
    member = joined(registry, "g", Member("m"))
    threads, per_thread = 8, 200
    barrier = threading.Barrier(threads)

    def publish() -> None:
        barrier.wait()
        for n in range(per_thread):
            broker.publish("g", str(n), None)

    workers = [threading.Thread(target=publish) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert [f.position.seq for f in member.frames] == list(range(1, threads * per_thread + 1))  # type: ignore[union-attr]


@override_settings(WEBSOCKET_HISTORY_SIZE=0)
def test_history_off_means_no_positions():
    registry = Registry()
    broker = MemoryBroker(registry)
    member = joined(registry, "g", Member("m"))
    broker.publish("g", "plain", None)
    assert [(f.message, f.group, f.position) for f in member.frames] == [("plain", "g", None)]
    assert broker.position("g") is None
    assert broker.since("g", Position("ab", 0)) is None


def test_the_history_settings_size_the_ring():
    broker = MemoryBroker(Registry())
    with override_settings(WEBSOCKET_HISTORY_SIZE=2):
        start = broker.position("g")
        assert start is not None
        for n in range(4):
            broker.publish("g", str(n), None)
        recovery = broker.since("g", start)
        assert recovery is not None and [e.message for e in recovery.entries] == ["2", "3"]


# -- the helper and the template tag ---------------------------------------------------


def test_the_position_helper_and_tag_render_the_group_s_current_position():
    from dwebsocket.groups import broadcast, position

    before = position("units-history-tag")
    assert before is not None and before.endswith(":0")
    broadcast("units-history-tag", "hello")
    after = Position.parse(position("units-history-tag") or "")
    assert str(after) == before[:-1] + "1"
    rendered = Template("{% load dwebsocket %}[{% websocket_position 'units-history-tag' %}]").render(Context())
    assert rendered == f"[{after}]"
    with override_settings(WEBSOCKET_HISTORY_SIZE=0):
        assert position("units-history-tag") is None
        assert Template("{% load dwebsocket %}[{% websocket_position 'units-history-tag' %}]").render(Context()) == "[]"


def test_counters_made_by_reads_only_are_dropped_too():
    clock = Clock()
    history = MemoryHistory(100, 10.0, clock)
    for n in range(100):
        history.position(f"asked-{n}")
    clock.now += META_TTL + 1
    history.position("another")
    assert list(history._groups) == ["another"]

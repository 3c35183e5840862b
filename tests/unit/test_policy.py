"""What every transport must agree on: limits and the slow-client policy."""

from __future__ import annotations

import threading

from django.test import override_settings

from dwebsocket.conf import DEFAULTS
from dwebsocket.transports import policy
from dwebsocket.transports.policy import BURST_FACTOR, STALL_SECONDS, Limits, Outbox, offer_verdict, too_big


def test_limits_come_from_the_settings_with_the_documented_defaults():
    assert Limits().max_message_size == DEFAULTS["WEBSOCKET_MAX_MESSAGE_SIZE"] == 1024 * 1024
    assert Limits().broadcast_queue == DEFAULTS["WEBSOCKET_BROADCAST_QUEUE"] == 256
    with override_settings(WEBSOCKET_MAX_MESSAGE_SIZE=10, WEBSOCKET_BROADCAST_OVERFLOW="drop"):
        limits = Limits.from_settings()
    assert (limits.max_message_size, limits.broadcast_overflow) == (10, "drop")


def test_too_big_counts_utf8_bytes_and_none_is_no_limit():
    assert not too_big("é" * 5, Limits(max_message_size=10))
    assert too_big("é" * 6, Limits(max_message_size=10))
    assert not too_big(b"x" * 10**7, Limits(max_message_size=None))


def test_a_full_queue_is_slowness_only_once_the_client_stalls():
    limits = Limits(broadcast_queue=3)
    assert offer_verdict(2, 60.0, limits) == "queued"
    assert offer_verdict(3, 0.0, limits) == "queued"  # a burst: the client is reading
    assert offer_verdict(3, STALL_SECONDS, limits) == "overflow"
    assert offer_verdict(3, STALL_SECONDS, Limits(broadcast_queue=3, broadcast_overflow="drop")) == "dropped"


def test_a_burst_is_bounded_however_fast_the_client_reads():
    limits = Limits(broadcast_queue=3)
    assert offer_verdict(BURST_FACTOR * 3 - 1, 0.0, limits) == "queued"
    assert offer_verdict(BURST_FACTOR * 3, 0.0, limits) == "overflow"


def test_outbox_overflows_when_the_reader_stalls_not_when_it_is_full(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(policy.time, "monotonic", lambda: clock[0])
    outbox: Outbox[str] = Outbox(Limits(broadcast_queue=2))
    assert [outbox.offer("a"), outbox.offer("b"), outbox.offer("c")] == ["queued"] * 3
    clock[0] += STALL_SECONDS / 2
    assert outbox.take() == "a"  # progress
    clock[0] += STALL_SECONDS * 0.9
    assert outbox.offer("d") == "queued"
    assert not outbox.overflowed()
    clock[0] += STALL_SECONDS * 0.2
    assert outbox.overflowed()  # the clock tells, without another broadcast
    assert outbox.offer("e") == "overflow"
    assert outbox.take_all() == ["b", "c", "d"]


def test_outbox_offers_never_wait_and_puts_wait_for_room():
    outbox: Outbox[str] = Outbox(Limits(broadcast_queue=2))
    assert [outbox.offer("a"), outbox.offer("b")] == ["queued", "queued"]
    done = []
    putter = threading.Thread(target=lambda: done.append(outbox.put("d")))
    putter.start()
    putter.join(0.1)
    assert putter.is_alive()  # a view's send waits for the client
    assert outbox.take() == "a"
    putter.join(2)
    assert done == [True] and outbox.take_all() == ["b", "d"]


def test_a_partly_written_item_stays_first_whatever_the_policy():
    outbox: Outbox[bytes] = Outbox(Limits(broadcast_queue=1))
    outbox.offer(b"frame2")
    outbox.push_front(b"ame1")  # the rest of a frame partly on the wire
    assert outbox.peek() == b"ame1"
    outbox.replace_head(b"1")
    assert outbox.take_all() == [b"1", b"frame2"]


def test_a_closed_outbox_takes_nothing_and_wakes_waiters():
    outbox: Outbox[str] = Outbox(Limits(broadcast_queue=1))
    outbox.offer("a")
    results = []
    putter = threading.Thread(target=lambda: results.append(outbox.put("b")))
    putter.start()
    outbox.close()
    putter.join(2)
    assert results == [False]
    assert outbox.offer("c") == "dropped"
    assert outbox.peek() == "a"
    assert outbox.wait(0) is True

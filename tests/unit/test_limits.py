"""The limits of docs/security.md, piece by piece: settings, checks, byte budgets, the
connection count, the rate limit, and memory freed at close."""

from __future__ import annotations

import gc
import socket
import threading
import time
import weakref

import pytest
from django.core.checks import run_checks
from django.test import override_settings
from wsproto.frame_protocol import FrameProtocol

from dwebsocket.conf import DEFAULTS
from dwebsocket.connection import Connection
from dwebsocket.transports import policy
from dwebsocket.transports.policy import (
    MESSAGE_OVERHEAD, Limits, Outbox, RateMeter, offer_verdict, parse_rate, queued_size,
)

from .test_wsgi_transport import open_transport


def dwebsocket_messages():
    return sorted((m.id, m.msg) for m in run_checks() if m.id and m.id.startswith("dwebsocket."))


# -- settings and checks -------------------------------------------------------------------------


def test_the_new_limits_have_safe_defaults():
    assert DEFAULTS["WEBSOCKET_MAX_QUEUE_BYTES"] == Limits().max_queue_bytes == 4 * 1024 * 1024
    assert DEFAULTS["WEBSOCKET_MAX_CONNECTIONS"] == 1000
    assert DEFAULTS["WEBSOCKET_MAX_GROUPS"] == Limits().max_groups == 100
    assert DEFAULTS["WEBSOCKET_RATE_LIMIT"] is None and Limits().rate_limit is None
    with override_settings(WEBSOCKET_RATE_LIMIT="50/s", WEBSOCKET_MAX_QUEUE_BYTES=1000, WEBSOCKET_MAX_GROUPS=3):
        limits = Limits.from_settings()
    assert (limits.rate_limit, limits.max_queue_bytes, limits.max_groups) == ((50, 1.0), 1000, 3)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("WEBSOCKET_MAX_QUEUE_BYTES", 0),
        ("WEBSOCKET_MAX_QUEUE_BYTES", "4MB"),
        ("WEBSOCKET_MAX_CONNECTIONS", -1),
        ("WEBSOCKET_MAX_CONNECTIONS", 10.5),
        ("WEBSOCKET_MAX_GROUPS", 0),
    ],
)
def test_wrong_limit_values_are_reported(setting, value):
    with override_settings(**{setting: value}):
        messages = dwebsocket_messages()
    assert [m[0] for m in messages] == ["dwebsocket.E001"]
    assert messages[0][1].startswith(f"{setting} must be a positive integer or None")


@pytest.mark.parametrize("setting", ["WEBSOCKET_MAX_QUEUE_BYTES", "WEBSOCKET_MAX_CONNECTIONS", "WEBSOCKET_MAX_GROUPS"])
def test_none_turns_a_new_limit_off(setting):
    with override_settings(**{setting: None}):
        assert dwebsocket_messages() == []


@pytest.mark.parametrize("value", ["50", "50/x", "0/s", "-1/s", "50/0s", 50, ["50/s"], "fast"])
def test_a_bad_rate_limit_is_a_clear_error(value):
    with override_settings(WEBSOCKET_RATE_LIMIT=value):
        messages = dwebsocket_messages()
    assert [m[0] for m in messages] == ["dwebsocket.E006"]
    assert 'such as "50/s"' in messages[0][1] and repr(value) in messages[0][1]


def test_rates_parse_as_messages_per_period():
    assert parse_rate(None) is None
    assert parse_rate("50/s") == (50, 1.0)
    assert parse_rate("600/10s") == (600, 10.0)
    assert parse_rate(" 1000 / m ") == (1000, 60.0)
    assert parse_rate("5/2min") == (5, 120.0)
    with override_settings(WEBSOCKET_RATE_LIMIT="600/10s"):
        assert dwebsocket_messages() == []


def test_the_rate_meter_allows_a_burst_of_the_limit_then_the_pace():
    meter = RateMeter(Limits(rate_limit=(5, 0.5)))  # 5 at once, then 10 a second
    assert all(meter.allow() for _ in range(5))
    assert not meter.allow()
    time.sleep(0.25)  # 2.5 messages' worth
    assert meter.allow() and meter.allow()
    assert not meter.allow()
    unlimited = RateMeter(Limits())
    assert all(unlimited.allow() for _ in range(10_000))


# -- byte budgets ----------------------------------------------------------------------------------


def test_the_view_queue_is_bounded_in_bytes_and_an_empty_queue_takes_any_one_message():
    conn = Connection(Limits(max_queue=100, max_queue_bytes=10_000))
    link = conn._link
    link.opened(None)  # type: ignore[arg-type]
    assert link.deliver_nowait(b"x" * 50_000)  # alone: larger than the budget, still taken
    assert not link.deliver_nowait(b"y")  # nothing more until the view reads it
    assert conn.read() == b"x" * 50_000
    size = 4000 - MESSAGE_OVERHEAD
    assert link.deliver_nowait(b"a" * size) and link.deliver_nowait(b"b" * size)
    assert not link.deliver_nowait(b"c" * size)  # 12,000 bytes would be over 10,000
    assert link.load() == (2, 2 * queued_size(b"a" * size))
    assert not link.deliver_all_nowait([b"d" * 500] * 4)  # none of a batch that does not fit
    assert link.queued() == 2
    conn.read()
    assert link.deliver_nowait(b"c" * size)


def test_tiny_messages_count_their_overhead():
    conn = Connection(Limits(max_queue=10**6, max_queue_bytes=64 * 1024))
    conn._link.opened(None)  # type: ignore[arg-type]
    taken = 0
    while conn._link.deliver_nowait(b""):
        taken += 1
    assert taken == 64 * 1024 // MESSAGE_OVERHEAD  # a flood of empty messages is bounded too


def test_waiting_broadcast_bytes_make_a_client_slow():
    limits = Limits(broadcast_queue=1000, max_queue_bytes=1000)
    assert offer_verdict(1, 60.0, limits, waiting_bytes=999) == "queued"
    assert offer_verdict(1, 0.0, limits, waiting_bytes=1000) == "queued"  # a burst, the client reads
    assert offer_verdict(1, policy.STALL_SECONDS, limits, waiting_bytes=1000) == "overflow"
    assert offer_verdict(1, 0.0, limits, waiting_bytes=policy.BURST_BYTES_FACTOR * 1000) == "overflow"
    assert offer_verdict(1, 60.0, Limits(broadcast_queue=1000, max_queue_bytes=None), 10**9) == "queued"


def test_a_views_sends_wait_for_room_in_bytes():
    outbox: Outbox[bytes] = Outbox(Limits(broadcast_queue=100, max_queue_bytes=1000), len)
    assert outbox.put(b"x" * 5000, timeout=0)  # an empty outbox takes any one item
    assert not outbox.put(b"y", timeout=0.05)
    assert outbox.take() == b"x" * 5000 and outbox.bytes == 0
    assert outbox.put(b"a" * 600, timeout=0) and not outbox.put(b"b" * 600, timeout=0)
    assert outbox.bytes == 600


# -- WEBSOCKET_MAX_CONNECTIONS -----------------------------------------------------------------------


def test_a_place_is_taken_once_and_given_back_exactly_once():
    start = policy.connections.open
    first, second, third = Connection(), Connection(), Connection()
    assert first.admit(start + 2) and first.admit(start + 2)  # idempotent: one place
    assert second.admit(start + 2)
    assert not third.admit(start + 2)
    assert policy.connections.open == start + 2
    first._link.closed_with(1000)
    first._link.closed_with(1006)  # closed twice, given back once
    assert policy.connections.open == start + 1
    assert not first.admit(None)  # a closed connection takes no place
    assert third.admit(start + 2)
    second.abandon()
    third.abandon()
    assert policy.connections.open == start


# -- memory after close -------------------------------------------------------------------------------


def test_a_closed_connection_and_what_it_queued_are_freed_at_once_without_the_gc():
    limits = Limits(ping_interval=None, max_queue=4, close_timeout=0.2)
    gc.collect()
    gc.disable()  # only reference counting: a cycle would keep them alive
    try:
        transport, client, connection = open_transport(limits)
        frames = FrameProtocol(client=True, extensions=[])
        data = b"".join(bytes(frames.send_data(b"x" * 100_000, True)) for _ in range(12))
        # More than the socket takes while the view reads nothing: sent from a thread of its own.
        sender = threading.Thread(target=lambda: _send_quietly(client, data), daemon=True)
        sender.start()
        deadline = time.monotonic() + 5
        while not transport._pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert connection._link.queued() == 4 and len(transport._pending) == 1
        # Reading stopped: what the last read brought waits unfed (or in the parser's buffer).
        assert len(transport._unparsed) + len(transport._protocol.reader.buffer) <= 65536
        client.shutdown(socket.SHUT_RDWR)
        sender.join(5)
        client.close()
        transport.finish()  # what the view's return does: close, wait, shut down
        connection._link.closed_with(1006)
        connection._discard()
        assert not transport._pending
        gone = weakref.ref(connection), weakref.ref(transport)
        del connection, transport
        assert gone[0]() is None
        # The hub's thread may hold the transport for the rest of its current tick.
        deadline = time.monotonic() + 2
        while gone[1]() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gone[1]() is None
    finally:
        gc.enable()


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:  # the test shut the socket down: the rest is never sent
        pass

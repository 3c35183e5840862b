"""The connection: its queue, its state and the Link transports drive it through."""

from __future__ import annotations

import threading
import time

import pytest

from dwebsocket.connection import CLOSED, Connection
from dwebsocket.transports.policy import Limits


class RecordingTransport:
    def __init__(self):
        self.sent = []
        self.closes = []

    def send(self, message):
        self.sent.append(message)
        return True

    def close(self, code, reason):
        self.closes.append((code, reason))

    def offer(self, frame):
        self.sent.append(frame.message)
        return True


def open_connection(max_queue=64):
    connection = Connection(Limits(max_queue=max_queue))
    transport = RecordingTransport()
    connection._link.opened(transport)
    return connection, transport


def test_queue_order_and_counts():
    connection, _ = open_connection()
    assert connection.read() is None and not connection.has_messages()
    connection._link.deliver("a")
    connection._link.deliver(b"b")
    assert connection.count_messages() == 2 and connection.has_messages()
    assert connection.wait() == "a"
    assert connection.read() == b"b"
    assert connection.count_messages() == 0


def test_messages_received_before_the_close_are_still_read():
    connection, _ = open_connection()
    connection._link.deliver("last words")
    connection._link.closed_with(1000, "bye")
    assert not connection.connected and connection.closed and connection.is_closed()
    assert list(connection) == ["last words"]
    assert connection.wait() is None
    assert (connection.close_code, connection.close_reason) == (1000, "bye")


def test_wait_timeout_returns_none_while_connected():
    connection, _ = open_connection()
    started = time.monotonic()
    assert connection.wait(timeout=0.1) is None
    assert time.monotonic() - started >= 0.1
    assert connection.connected


def test_full_queue_blocks_the_producer_until_the_view_reads():
    connection, _ = open_connection(max_queue=2)
    connection._link.deliver("1")
    connection._link.deliver("2")
    producer = threading.Thread(target=connection._link.deliver, args=("3",))
    producer.start()
    producer.join(0.2)
    assert producer.is_alive()  # backpressure
    assert connection.wait() == "1"
    producer.join(2)
    assert not producer.is_alive()
    assert [connection.read(), connection.read()] == ["2", "3"]


def test_close_releases_a_blocked_producer_and_is_idempotent():
    connection, transport = open_connection(max_queue=1)
    connection._link.deliver("1")
    producer = threading.Thread(target=connection._link.deliver, args=("dropped",))
    producer.start()
    connection.close(4000, "done")
    connection.close(4001, "ignored")
    producer.join(2)
    assert not producer.is_alive()
    assert transport.closes == [(4000, "done")]
    assert connection.send("late") is False and transport.sent == []
    assert connection.read() == "1" and connection.read() is None


def test_send_types():
    connection, transport = open_connection()
    assert connection.send("text") and connection.send(b"bin") and connection.send(bytearray(b"ba"))
    assert transport.sent == ["text", b"bin", b"ba"]
    with pytest.raises(TypeError, match="json.dumps"):
        connection.send({"not": "serialized"})



def test_closed_connection_state():
    connection, _ = open_connection()
    connection._link.closed_with(1006)
    assert connection.wait() is None and connection.read() is None
    assert connection._state == CLOSED and connection.close_code == 1006



def test_a_link_offers_broadcasts_to_its_transport_only_while_the_connection_is_open():
    from dwebsocket.messages import Frame

    connection = Connection(Limits())
    transport = RecordingTransport()
    assert connection._link.offer(Frame("before the open")) is False
    connection._link.opened(transport)
    assert connection._link.offer(Frame("open"))
    connection._link.closed_with(1006)
    assert connection._link.offer(Frame("after the close")) is False
    assert transport.sent == ["open"]


def test_a_dwebsocket_v1_connection_offers_broadcasts_through_its_session():
    from dwebsocket.messages import Frame
    from dwebsocket.session import Session

    connection = Connection(Limits())
    connection._session = Session(connection.id, None)  # set before the transport, as the handshake does
    transport = RecordingTransport()
    connection._link.opened(transport)
    assert connection._link.offer(Frame("hi", "lobby", None))
    assert len(transport.sent) == 1 and transport.sent[0].endswith("hi") and transport.sent[0] != "hi"  # enveloped


def test_close_hooks_run_once_after_the_close_and_not_for_a_closed_connection():
    connection, _ = open_connection()
    link = connection._link
    seen = []
    assert link.on_close(seen.append)
    assert link.on_close(seen.append)  # the same hook once
    link.closed_with(1006)
    link.closed_with(1000)
    assert seen == [link]
    assert not link.on_close(seen.append)  # closed: the hook would never run
    assert seen == [link]


def test_deliver_nowait_refuses_a_full_queue_and_takes_nothing_after_the_close():
    connection, _ = open_connection(max_queue=1)
    link = connection._link
    assert link.deliver_nowait("1")
    assert not link.deliver_nowait("2")
    link.closed_with(1000)
    assert link.deliver_nowait("3")  # taken (nothing to wait for), but dropped
    assert [connection.read(), connection.read()] == ["1", None]

"""The WSGI socket transport's write path, on a real socket pair: direct writes,
partial writes, the outbox, and the hub that drains it."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from django.test import RequestFactory

from dwebsocket.connection import Connection
from dwebsocket.handshake import Handshake
from dwebsocket.messages import Frame
from dwebsocket.transports.policy import Limits
from dwebsocket.transports.wsgi.protocol import server_protocol
from dwebsocket.transports.wsgi.transport import SocketTransport


def open_transport(limits: Limits, compression: bool = False) -> tuple[SocketTransport, socket.socket, Connection]:
    """A transport on a socket pair with small buffers (with *compression*: the client offered permessage-deflate)."""
    server, client = socket.socketpair()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    offer = {"HTTP_SEC_WEBSOCKET_EXTENSIONS": "permessage-deflate"} if compression else {}
    request = RequestFactory().get(
        "/", HTTP_UPGRADE="websocket", HTTP_CONNECTION="Upgrade", HTTP_HOST="testserver",
        HTTP_SEC_WEBSOCKET_KEY="dGhlIHNhbXBsZSBub25jZQ==", HTTP_SEC_WEBSOCKET_VERSION="13", **offer,
    )
    handshake = Handshake(request)
    handshake.accept(None, compression=compression)
    assert (handshake.deflate is not None) == compression
    connection = Connection(limits)
    transport = SocketTransport(server, server_protocol(handshake.deflate, limits.max_message_size), connection._link)
    connection._link.opened(transport)
    transport.start()
    return transport, client, connection


def read_exactly(sock: socket.socket, size: int, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the server closed the socket"
        data += chunk
    return bytes(data)


@pytest.fixture
def opened():
    made = []

    def make(**limits):
        made.append(open_transport(Limits(ping_interval=None, **limits)))
        return made[-1]

    yield make
    for transport, client, connection in made:
        client.close()
        transport.finish()


def test_broadcasts_a_full_socket_cannot_take_wait_and_arrive_whole_and_in_order(opened):
    transport, client, connection = opened()
    frames = [Frame(f"{n:04d} " + "x" * 3000) for n in range(200)]  # ~600 kB: far more than the buffers
    started = time.monotonic()
    assert all(transport.offer(frame) for frame in frames)
    assert time.monotonic() - started < 1.0  # the broadcaster never waited for the client
    assert len(transport._outbox) > 0  # the rest waits, the first of it maybe in part
    expected = b"".join(frame.data for frame in frames)
    assert read_exactly(client, len(expected)) == expected  # the hub wrote the rest as room came
    deadline = time.monotonic() + 2  # the hub takes an item off once its write returned
    while not transport._outbox.is_empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert transport._outbox.is_empty() and connection.connected


def test_a_views_send_goes_after_what_waits(opened):
    transport, client, connection = opened()
    frames = [Frame("b" * 5000) for _ in range(50)]
    for frame in frames:
        transport.offer(frame)
    reader_bytes = b"".join(frame.data for frame in frames) + Frame("last").data
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(read_exactly(client, len(reader_bytes))))
    reader.start()
    assert connection.send("last")  # waits for the socket, after the queued broadcasts
    reader.join(10)
    assert received == [reader_bytes]


def test_a_client_that_reads_nothing_is_cut_once_it_stalls(opened):
    transport, client, connection = opened(broadcast_queue=4)
    for n in range(40):
        transport.offer(Frame(f"{n} " + "y" * 4000))
    assert connection.connected  # a burst: not cut yet
    deadline = time.monotonic() + 5
    while connection.connected and time.monotonic() < deadline:
        time.sleep(0.05)  # the hub's clock finds it stalled, with no further broadcast
    assert connection.closed and connection.close_code == 1013
    assert transport.offer(Frame("after")) is False


def read_compressed(sock: socket.socket, until: int, timeout: float = 10.0) -> tuple[list[str], int | None]:
    """What a client with permessage-deflate reads: the text messages, and the close code, if any."""
    from websockets.extensions.permessage_deflate import PerMessageDeflate
    from websockets.frames import Opcode
    from websockets.protocol import Protocol, Side

    protocol = Protocol(Side.CLIENT)
    protocol.extensions = [PerMessageDeflate(False, False, 15, 15)]
    sock.settimeout(timeout)
    messages: list[str] = []
    while len(messages) < until and protocol.close_rcvd is None:
        data = sock.recv(65536)
        if not data:
            break
        protocol.receive_data(data)
        messages += [frame.data.decode() for frame in protocol.events_received() if frame.opcode is Opcode.TEXT]
    return messages, None if protocol.close_rcvd is None else protocol.close_rcvd.code


def _queue_incompressible_broadcasts(transport: SocketTransport) -> list[str]:
    import os

    sent = [os.urandom(3000).hex() for _ in range(150)]  # about 450 kB deflated: far more than the buffers
    for message in sent:
        assert transport.offer(Frame(message))
    assert not transport._outbox.is_empty()
    return sent


def test_a_views_send_goes_after_what_waits_on_a_compressed_connection():
    transport, client, connection = open_transport(Limits(ping_interval=None), compression=True)
    try:
        sent = _queue_incompressible_broadcasts(transport)
        received: list[tuple[list[str], int | None]] = []
        reader = threading.Thread(target=lambda: received.append(read_compressed(client, len(sent) + 1)))
        reader.start()
        assert connection.send("last")
        reader.join(10)
        assert received and received[0][0] == [*sent, "last"]
    finally:
        client.close()
        transport.finish()


def test_closing_a_compressed_connection_sends_what_waits_then_the_close_frame():
    transport, client, connection = open_transport(Limits(ping_interval=None, close_timeout=1.0), compression=True)
    try:
        sent = _queue_incompressible_broadcasts(transport)
        received: list[tuple[list[str], int | None]] = []
        reader = threading.Thread(target=lambda: received.append(read_compressed(client, len(sent) + 1)))
        reader.start()
        connection.close(1000)
        reader.join(10)
        assert received and received[0] == (sent, 1000)
    finally:
        client.close()
        transport.finish()


def test_the_protocols_open_flag_follows_its_state():
    """A broadcast asks ``is_open`` of every member; it must agree with websockets' state in every version."""
    from websockets.frames import Close, Frame as WireFrame, Opcode
    from websockets.protocol import State

    protocol = server_protocol(None, None)
    assert protocol.state is State.OPEN and protocol.is_open
    protocol.send_close(1000, "bye")
    assert protocol.state is State.CLOSING and not protocol.is_open

    answered = server_protocol(None, None)  # the client closes first
    answered.receive_data(WireFrame(Opcode.CLOSE, Close(1001, "").serialize()).serialize(mask=True))
    assert answered.state is not State.OPEN and not answered.is_open

    failed = server_protocol(None, None)  # a protocol error: an unmasked client frame
    failed.receive_data(WireFrame(Opcode.TEXT, b"x").serialize(mask=False))
    assert failed.state is not State.OPEN and not failed.is_open


def test_a_closing_connection_refuses_broadcasts_at_its_link(opened):
    transport, client, connection = opened()
    assert connection._link.offer(Frame("before"))
    assert read_exactly(client, len(Frame("before").data)) == Frame("before").data
    connection.close()  # begin_close: the link stops offering before the close frame goes out
    assert connection._link.offer(Frame("after")) is False
    assert transport.offer(Frame("after")) is False  # and the transport refuses it too

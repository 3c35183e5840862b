"""Who reads a connection's socket: the view while it waits, someone else while it does not.

Under a WSGI server a connection costs one thread, the view's: the view reads
its own socket while it waits for a message, and the process's hub reads for
it while it is busy elsewhere, so pings are answered and a client that leaves
is noticed whatever the view does.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid

import pytest
from websockets.exceptions import ConnectionClosed

from .client import result, ws_connect
from .servers import process_tree, start_server


def threads_of_tree(root_pid: int) -> int:
    """Threads of *root_pid* and of every process below it."""
    total = 0
    for pid in process_tree(root_pid):
        try:
            total += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue
    return total


@pytest.mark.parametrize("kind", ["runserver", "gthread", "uwsgi-threads"])
def test_a_connection_costs_one_thread(kind):
    with start_server(kind) as server, contextlib.ExitStack() as stack:
        def open_echoes(count):
            clients = [stack.enter_context(ws_connect(server, "/echo/")) for _ in range(count)]
            for n, ws in enumerate(clients):
                ws.send(f"m{n}")
                assert ws.recv(timeout=10) == f"m{n}"
            time.sleep(0.3)  # let any thread a connection starts show up
            return threads_of_tree(server.process.pid)

        before = open_echoes(2)
        after = open_echoes(20)
        # Each connection: its view's thread, nothing else (a reader thread would make it 40).
        assert after - before <= 22, (before, after)


@pytest.mark.parametrize("first", ["", "read"])
def test_a_busy_view_still_answers_pings_and_gets_every_message(server, first):
    # With first=read the view has read its socket itself before it turns busy:
    # the hub must take the socket back (within a tick, at most a second).
    with ws_connect(server, f"/busy-echo/?busy=3&first={first}") as ws:
        if first:
            ws.send("first")
            assert ws.recv(timeout=5) == "first"
        for payload in (b"a", b"b"):
            assert ws.ping(payload).wait(2)  # answered while the view sleeps
        for n in range(100):
            ws.send(f"m{n}")
        assert [ws.recv(timeout=10) for _ in range(100)] == [f"m{n}" for n in range(100)]


def test_a_view_that_returns_with_messages_unread_closes_at_once(server):
    # The messages the view left in its queue must not keep the server from
    # reading the client's answer to its close frame (WEBSOCKET_CLOSE_TIMEOUT
    # is 2 s in the tests' settings: waiting it out would take that long).
    with ws_connect(server, "/leaves-unread/") as ws:
        assert ws.recv(timeout=5) == "ready"
        started = time.monotonic()
        for n in range(200):
            ws.send(f"unread {n}")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert time.monotonic() - started < 1.5
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000


@pytest.mark.parametrize(
    "kind", ["runserver", "gthread", "gevent", "uwsgi-threads", "uwsgi-gevent", "uvicorn", "daphne", "hypercorn"]
)
def test_a_client_that_leaves_while_its_view_is_behind_is_noticed(kind):
    # The view reads nothing; the client fills its queue (64 in the tests'
    # settings) and more, then vanishes without a close frame.
    key = uuid.uuid4().hex
    with start_server(kind) as server:
        with ws_connect(server, f"/ignores/?id={key}&for=15") as ws:
            for n in range(300):
                ws.send(f"message {n}")
            time.sleep(0.5)
            ws.socket.shutdown(socket.SHUT_RDWR)
        started = time.monotonic()
        seen = result(server, key)
        assert seen["connected"] is False, seen
        # WSGI: 1006. ASGI servers report what they like for a lost connection: uvicorn 1005.
        assert seen["close_code"] == 1006 or (kind == "uvicorn" and seen["close_code"] == 1005)
        assert time.monotonic() - started < 10

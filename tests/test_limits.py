"""The limits that keep one client, or many, from using up a server (docs/security.md).

Each test runs real servers with the limit set low, and real clients.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
import uuid

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .client import ws_connect
from .servers import process_tree, start_server
from .test_polling import PollClient
from .test_reading import threads_of_tree

MiB = 1024 * 1024


def rss_of_tree(root_pid: int) -> int:
    """Resident memory, in bytes, of *root_pid* and every process below it."""
    total = 0
    for pid in process_tree(root_pid):
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def post(server, path: str, body: dict, timeout: float) -> int:
    """POST *body* as JSON with a short timeout; the status (a hang fails the test)."""
    request = urllib.request.Request(
        server.http + path, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Origin": server.http},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


# -- WEBSOCKET_MAX_CONNECTIONS ----------------------------------------------------------------


def test_polling_opens_beyond_max_connections_get_503_and_start_no_thread():
    # Before: every anonymous open started a view thread, however many there were.
    with start_server("gthread", env={"DWS_TEST_MAX_CONNECTIONS": "10"}) as server:
        before = threads_of_tree(server.process.pid)
        clients = [PollClient(server, f"/ignores/?for=30&id={uuid.uuid4().hex}") for _ in range(25)]
        statuses = [client.open()[0] for client in clients]
        assert statuses.count(200) == 10 and statuses.count(503) == 15, statuses
        time.sleep(0.3)
        # 10 view threads, plus what a process starts on first use (the polling
        # reaper, a pool thread or two for the requests); one per open would be 25+.
        assert threads_of_tree(server.process.pid) - before <= 15
        # A session that ends gives its place back (once): one more open gets in, no more.
        opened = [client for client, status in zip(clients, statuses) if status == 200]
        assert opened[0].close() == 204
        deadline = time.monotonic() + 10
        while (status := PollClient(server, "/ignores/?for=30").open()[0]) == 503:
            assert time.monotonic() < deadline, "the closed session kept its place"
            time.sleep(0.1)
        assert status == 200
        assert PollClient(server, "/ignores/?for=30").open()[0] == 503


@pytest.mark.parametrize("kind", ["gthread", "uvicorn"])
def test_handshakes_beyond_max_connections_get_503(kind):
    with start_server(kind, env={"DWS_TEST_MAX_CONNECTIONS": "3"}) as server, contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(ws_connect(server, "/echo/")) for _ in range(3)]
        for ws in sockets:
            ws.send("hi")
            assert ws.recv(timeout=5) == "hi"
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(server, "/echo/")
        assert refused.value.response.status_code == 503
        sockets[0].close()
        deadline = time.monotonic() + 10
        while True:  # its place is given back once the view has seen the close
            try:
                with ws_connect(server, "/echo/") as ws:
                    ws.send("again")
                    assert ws.recv(timeout=5) == "again"
                break
            except InvalidStatus:
                assert time.monotonic() < deadline, "the closed connection kept its place"
                time.sleep(0.1)
        # Given back once, not twice: with two still open, one more fits and a second does not.
        time.sleep(0.5)
        with ws_connect(server, "/echo/"):
            with pytest.raises(InvalidStatus):
                ws_connect(server, "/echo/")
        assert "Traceback" not in server.log_text()


# -- polling send: never hold a request thread -------------------------------------------------


@pytest.mark.parametrize("kind", ["gthread", "uvicorn"])
def test_a_polling_send_to_a_view_that_never_reads_answers_429_at_once(kind):
    # Before: each send past the view's queue (64) waited for the view, holding a
    # server thread (gthread) or a default-executor thread (uvicorn) for good.
    with start_server(kind) as server:
        client = PollClient(server, f"/ignores/?for=30&id={uuid.uuid4().hex}")
        assert client.open()[0] == 200
        path = f"/ignores/?for=30&dwebsocket=send&sid={client.sid}"
        statuses = [post(server, path, {"messages": [{"text": f"m{n}"}]}, timeout=5) for n in range(80)]
        assert statuses[:64] == [204] * 64
        assert statuses[64:] == [429] * 16
        assert server.get("/health/")[0] == 200


# -- WEBSOCKET_MAX_QUEUE_BYTES ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gthread", "uvicorn"])
def test_compressed_floods_hold_no_more_than_the_queue_bytes(kind):
    # 64 messages of 1 MiB of zeros deflate to about 1 KiB each. Before, each
    # connection inflated and queued all of them for a view that reads nothing.
    connections, count = 4, 64
    with start_server(kind) as server, contextlib.ExitStack() as stack:
        warm = [stack.enter_context(ws_connect(server, "/ignores/?for=60")) for _ in range(connections)]
        warm[0].send(b"warm")
        time.sleep(1)
        before = rss_of_tree(server.process.pid)
        clients = [stack.enter_context(ws_connect(server, "/ignores/?for=60", compression="deflate"))
                   for _ in range(connections)]
        payload = bytes(MiB)
        for ws in clients:
            for _ in range(count):
                ws.send(payload)
        time.sleep(3)
        grown = rss_of_tree(server.process.pid) - before
        print(f"{kind}: {connections} connections x {count} MiB compressed: RSS +{grown / MiB:.1f} MiB")
        # Per connection at most about 6 MiB under WSGI (the queue's 4 MiB, one
        # message waiting, one being assembled) and 10 MiB under ASGI (what is
        # received while the queue is full, too; docs/security.md), with room
        # for the allocator. It was about 260 MiB.
        bound = 48 if kind == "gthread" else 96
        assert grown < bound * MiB, f"RSS grew by {grown / MiB:.0f} MiB"


# -- WEBSOCKET_RATE_LIMIT -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gthread", "uvicorn"])
def test_a_client_over_the_rate_limit_is_closed_with_1008(kind):
    with start_server(kind, env={"DWS_TEST_RATE_LIMIT": "20/s"}) as server:
        with ws_connect(server, "/echo/") as ws:
            for n in range(20):  # a burst up to the limit is fine
                ws.send(f"m{n}")
                assert ws.recv(timeout=5) == f"m{n}"
            with pytest.raises(ConnectionClosed) as closed:
                for n in range(200):
                    ws.send(f"x{n}")
                while True:
                    ws.recv(timeout=5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


# -- WEBSOCKET_MAX_GROUPS -----------------------------------------------------------------------


def test_joining_more_groups_than_max_groups_raises_a_clear_error():
    with start_server("gthread", env={"DWS_TEST_MAX_GROUPS": "5"}) as server:
        with ws_connect(server, "/join-many/?n=5") as ws:
            assert ws.recv(timeout=5) == "joined 5"
        with ws_connect(server, "/join-many/?n=6") as ws:
            answer = ws.recv(timeout=5)
        assert answer.startswith("refused after 5: This connection is in 5 groups already"), answer
        assert "WEBSOCKET_MAX_GROUPS (5)" in answer

"""The chat example, served as the README's first command serves it, and by every server."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import threading

import pytest

from .client import ws_connect
from .servers import SERVERS, start_redis, start_server


def next_of_type(client, kind, timeout=5):
    while True:
        data = json.loads(client.recv(timeout=timeout))
        if data["type"] == kind:
            return data


def chat(server_a, server_b=None):
    server_b = server_b or server_a
    with contextlib.ExitStack() as stack:
        alice = stack.enter_context(ws_connect(server_a, "/ws/chat/?name=alice"))
        assert next_of_type(alice, "presence") == {"type": "presence", "text": "alice joined", "members": 1}
        bob = stack.enter_context(ws_connect(server_b, "/ws/chat/?name=bob"))
        assert next_of_type(bob, "presence") == {"type": "presence", "text": "bob joined", "members": 2}
        assert next_of_type(alice, "presence")["members"] == 2
        alice.send("hi bob")
        assert next_of_type(bob, "message") == {"type": "message", "user": "alice", "text": "hi bob"}
        bob.send("hi alice ✓")
        assert next_of_type(alice, "message") == {"type": "message", "user": "bob", "text": "hi alice ✓"}
        with pytest.raises(TimeoutError):
            next_of_type(alice, "message", timeout=0.3)  # never its own message
        bob.close()
        assert next_of_type(alice, "presence") == {"type": "presence", "text": "bob left", "members": 1}


@pytest.mark.parametrize("kind", list(SERVERS))
def test_chat_page_and_room_on_one_url(kind):
    with start_server(kind, project="chat") as server:
        status, page = server.get("/ws/chat/")
        assert status == 200
        assert "<h1>Simple Chat</h1>" in page and "new DWebSocket(ws_path)" in page
        chat(server)
        assert "Traceback" not in server.log_text()


def test_chat_across_two_processes_through_redis():
    with start_redis() as redis_server:
        env = {"CHAT_REDIS_URL": redis_server.url}
        with start_server("gthread", env=env, project="chat") as a, start_server("uvicorn", env=env, project="chat") as b:
            chat(a, b)


@pytest.mark.parametrize("kind", ["runserver", "uvicorn"])
def test_member_count_settles_on_the_true_count_when_many_join_at_once(kind):
    # Every page shows the count of the newest presence message it got. When
    # members join at the same moment, the last one each page gets must be the
    # full count, not one taken before the others had joined.
    members = 16
    with start_server(kind, project="chat") as server, contextlib.ExitStack() as stack:
        barrier = threading.Barrier(members)

        def join(index):
            barrier.wait()
            return stack.enter_context(ws_connect(server, f"/ws/chat/?name=m{index}"))

        with concurrent.futures.ThreadPoolExecutor(members) as pool:
            clients = list(pool.map(join, range(members)))
        quiet = 2.0  # the first page waits for the announcements to stop, the rest have theirs
        for client in clients:
            last = None
            with contextlib.suppress(TimeoutError):
                while True:
                    last = next_of_type(client, "presence", timeout=quiet)
            quiet = 0.2
            assert last is not None and last["members"] == members, last

"""What ASGI adds: async views everywhere, sessions and users, many connections at once."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid

import pytest
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .client import result, ws_connect
from .servers import limited, start_server
from .test_servers import handshake_bytes, raw_exchange, refused_status, sent_code


ASYNC_SERVERS = ("runserver", "gthread", "uwsgi-threads", "uvicorn", "daphne", "hypercorn")  # not gevent: see below


@pytest.mark.servers(*ASYNC_SERVERS)
def test_async_echo(server):
    key = uuid.uuid4().hex
    with ws_connect(server, f"/async-echo/?id={key}") as ws:
        for message in ("text ✓", b"\x00\xffbinary", "x" * 100_000):
            ws.send(message)
            assert ws.recv(timeout=5) == message
        ws.close(4005, "async client leaves")
    seen = result(server, key)
    assert seen["kind"] == "AsyncWebSocket"
    assert (seen["closed"], seen["connected"]) == (True, False)
    if not limited(server.kind, "no_client_close_code"):
        assert seen["close_code"] == 4005


@pytest.mark.servers(*ASYNC_SERVERS)
def test_async_broadcast(server):
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(ws_connect(server, "/async-broadcast/")) for _ in range(3)]
        for client in clients:
            assert client.recv(timeout=5) == "joined"
        time.sleep(0.1)  # "joined" is sent just before the view adds itself to the list
        clients[0].send("to all async")
        assert clients[1].recv(timeout=5) == "to all async"
        assert clients[2].recv(timeout=5) == "to all async"
        with pytest.raises(TimeoutError):
            clients[0].recv(timeout=0.3)


@pytest.mark.servers(*ASYNC_SERVERS)
def test_async_connection_members(server):
    key = uuid.uuid4().hex
    with ws_connect(server, f"/async-members/?id={key}") as ws:
        assert ws.recv(timeout=5) == "timeout=None connected=True waited=True"
        for text in ("one", "two", "three"):
            ws.send(text)
        assert ws.recv(timeout=5) == "first='one' count=2 has=True read='two','three',None"
        assert ws.recv(timeout=5) == b"\x00binary"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd.code == sent_code(server, 4003)
    seen = result(server, key)
    assert seen == {"after": None, "send_after": False, "closed": True, "finished": True}


@pytest.mark.servers("gevent", "uwsgi-gevent")
def test_async_views_under_gevent_get_a_clear_error(server):
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(server, "/async-echo/")
    assert refused.value.response.status_code == 501
    assert b"-k gthread or an ASGI server" in refused.value.response.body


def test_failing_middleware_refuses_the_handshake_and_the_server_goes_on(server):
    server.watch.allow("this middleware fails on purpose")
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(server, "/middleware-raises/")
    assert refused.value.response.status_code == refused_status(server, 500)
    time.sleep(0.2)
    assert server.watch.text().count("this middleware fails on purpose") >= 1
    with ws_connect(server, "/echo/") as ws:
        ws.send("still serving")
        assert ws.recv(timeout=5) == "still serving"


@pytest.mark.parametrize("kind", ["uvicorn", "daphne", "gthread"])
def test_logged_in_user_reaches_the_view(kind):
    with start_server(kind, migrate=True) as running:
        received = raw_exchange(running, handshake_bytes("/whoami/"))
        assert received.startswith(f"HTTP/1.1 {refused_status(running, 302)}".encode())
        with __import__("urllib.request").request.urlopen(f"{running.http}/login-as/alice/") as response:
            cookies = response.headers.get_all("Set-Cookie")
        session = next(c.split(";")[0] for c in cookies if c.startswith("sessionid="))
        with ws_connect(running, "/whoami/", additional_headers={"Cookie": session}) as ws:
            assert ws.recv(timeout=5) == "alice"
        assert "Traceback" not in running.log_text()


async def _echo_many(port: int, path: str, count: int) -> list[str]:
    """Open *count* connections at once, then make each echo one message."""
    uri = f"ws://127.0.0.1:{port}{path}"
    clients = await asyncio.gather(*(async_connect(uri, open_timeout=60) for _ in range(count)))
    try:
        async def one(index, client):
            await client.send(f"message {index}")
            return await asyncio.wait_for(client.recv(), 120)

        return await asyncio.gather(*(one(i, c) for i, c in enumerate(clients)))
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def test_200_sync_views_hold_their_connections_at_once_under_uvicorn():
    # Each echo holds its view's thread for 0.5 s: run one after another they
    # would need 100 s; each in a thread of its own, they finish together.
    with start_server("uvicorn") as running:
        started = time.monotonic()
        replies = asyncio.run(_echo_many(running.port, "/sleepy-echo/", 200))
        took = time.monotonic() - started
        assert replies == [f"message {i}" for i in range(200)]
        assert took < 30, f"200 sync connections took {took:.1f} s"
        assert "Traceback" not in running.log_text()


def test_2000_async_views_at_once_under_uvicorn():
    # More than WEBSOCKET_MAX_CONNECTIONS allows by default (1000 per process).
    with start_server("uvicorn", env={"DWS_TEST_MAX_CONNECTIONS": "2500"}) as running:
        replies = asyncio.run(_echo_many(running.port, "/async-echo/", 2000))
        assert replies == [f"message {i}" for i in range(2000)]
        log = running.log_text()
        assert "Traceback" not in log
        assert len(re.findall(r"\[accepted\]", log)) >= 2000


def test_async_views_behind_a_sync_only_middleware_still_run_side_by_side():
    env = {"DJANGO_SETTINGS_MODULE": "tests.project.settings_syncmiddleware"}
    with start_server("uvicorn", env=env) as running:
        assert "SyncOnlyMiddleware cannot run asynchronously" in running.log_text()
        replies = asyncio.run(_echo_many(running.port, "/async-echo/", 20))
        assert replies == [f"message {i}" for i in range(20)]

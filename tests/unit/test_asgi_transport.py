"""The ASGI transport's send path for broadcasts made on the loop: a send that completes at
once, a send the server makes wait (a slow client), and a send the server refuses."""

from __future__ import annotations

import asyncio

import pytest

from dwebsocket import groups
from dwebsocket.connection import Connection
from dwebsocket.transports import restart
from dwebsocket.transports.asgi.transport import AsgiOpener
from dwebsocket.transports.policy import Limits

from .test_handshake import handshake_request


class Server:
    """One connection's server side: ``send`` records events, waits while ``gate`` is set, or raises."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.gate: asyncio.Future[None] | None = None
        self.gone = False
        self.events: asyncio.Queue[dict[str, object]] = asyncio.Queue()

    async def receive(self) -> dict[str, object]:
        return await self.events.get()

    async def send(self, message: dict[str, object]) -> None:
        if self.gone:
            raise OSError("the client is gone")
        if self.gate is not None and message["type"] == "websocket.send":
            await self.gate
        self.sent.append(str(message.get("text", message["type"])))


async def _member(server: Server, group: str) -> Connection:
    opener = AsgiOpener({"type": "websocket", "http_version": "1.1"}, server.receive, server.send,
                        asyncio.get_running_loop())
    opener.prepare(handshake_request())
    connection = Connection(Limits(ping_interval=None, broadcast_queue=1000))
    assert await opener.aopen(connection._link, None) is not None
    groups.join(connection._link, group)
    return connection


@pytest.fixture(autouse=True)
def no_signal_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(restart, "register", lambda transport: None)
    monkeypatch.setattr(restart, "unregister", lambda transport: None)


def test_broadcasts_behind_a_send_that_waits_go_out_after_it_in_order_and_others_are_not_held_up():
    async def run() -> tuple[list[str], list[str], list[str]]:
        slow, fast, gone = Server(), Server(), Server()
        members = [await _member(server, "asgi-send-path") for server in (slow, fast, gone)]
        slow.gate = asyncio.get_running_loop().create_future()
        gone.gone = True
        groups.broadcast("asgi-send-path", "1")  # slow's send waits on its gate
        groups.broadcast("asgi-send-path", "2")  # queued behind it
        assert members[0].send("3")  # a view's own send (sync code on the loop): queued after both
        await asyncio.sleep(0.05)
        assert slow.sent == ["websocket.accept"] and fast.sent == ["websocket.accept", "1", "2"]
        slow.gate.set_result(None)
        for _ in range(100):
            if len(slow.sent) >= 4:
                break
            await asyncio.sleep(0.01)
        for connection in members:
            connection._link.closed_with(1000)  # leaves the group
        return slow.sent, fast.sent, gone.sent

    slow, fast, gone = asyncio.run(run())
    assert slow[:4] == ["websocket.accept", "1", "2", "3"]
    assert fast[:3] == ["websocket.accept", "1", "2"]
    assert gone == ["websocket.accept"]  # refused sends: the broadcast went on to the others

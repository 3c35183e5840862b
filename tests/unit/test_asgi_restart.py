"""Under ASGI, a connection the server closes for a stop reads as the stop to the view."""

from __future__ import annotations

import asyncio

import pytest

from dwebsocket.connection import Connection
from dwebsocket.transports import restart
from dwebsocket.transports.asgi.transport import AsgiOpener
from dwebsocket.transports.policy import Limits

from .test_handshake import handshake_request


async def _closed_by_the_server(code: int) -> tuple[int | None, str | None]:
    events: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return await events.get()

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    opener = AsgiOpener({"type": "websocket", "http_version": "1.1"}, receive, send, asyncio.get_running_loop())
    opener.prepare(handshake_request())
    connection = Connection(Limits(ping_interval=None))
    transport = await opener.aopen(connection._link, None)
    assert transport is not None and sent[0]["type"] == "websocket.accept"
    await events.put({"type": "websocket.disconnect", "code": code})
    for _ in range(100):
        if connection.close_code is not None:
            break
        await asyncio.sleep(0.01)
    return connection.close_code, connection.close_reason


@pytest.fixture
def no_signal_handler(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """restart.py without its SIGTERM handler and closer thread (this is pytest's process)."""
    monkeypatch.setattr(restart, "register", lambda transport: None)
    monkeypatch.setattr(restart, "unregister", lambda transport: None)
    return monkeypatch


def test_a_disconnect_from_a_stopping_server_reads_as_service_restart(no_signal_handler):
    # uvicorn closes its connections with 1012 and no reason when it stops; if
    # that reaches the transport before restart.py's closer does, the view saw
    # reason "" (tests/test_deploys.py failed on it, now and then).
    no_signal_handler.setattr(restart, "_stopping", True)
    assert asyncio.run(_closed_by_the_server(1012)) == restart.RESTART_CLOSE


def test_a_disconnect_while_running_keeps_its_code(no_signal_handler):
    assert asyncio.run(_closed_by_the_server(1001)) == (1001, "")

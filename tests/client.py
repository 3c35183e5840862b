"""A real WebSocket client for the tests: the `websockets` library's sync client."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from websockets.sync.client import ClientConnection, connect

from .servers import RunningServer


def ws_connect(server: RunningServer, path: str, **kwargs: Any) -> ClientConnection:
    kwargs.setdefault("open_timeout", 10)
    kwargs.setdefault("close_timeout", 5)
    kwargs.setdefault("max_size", 16 * 1024 * 1024)
    return connect(server.ws + path, **kwargs)


def result(server: RunningServer, key: str) -> dict[str, Any]:
    """What the view of the connection with ?id=key recorded when it finished."""
    with urllib.request.urlopen(f"{server.http}/result/{key}/", timeout=30) as response:
        return json.loads(response.read())

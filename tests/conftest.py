"""Fixtures: real servers on 127.0.0.1, and a real WebSocket client."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator

import django
import pytest

from .servers import SERVERS, SRC, RunningServer, start_server

sys.path.insert(0, str(SRC))  # the code beside these tests, whatever the virtualenv has installed

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.project.settings")
django.setup()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "servers(*kinds): run the test only on these servers")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop the instances of a @pytest.mark.servers test that are for other servers."""
    kept, dropped = [], []
    for item in items:
        marker = item.get_closest_marker("servers")
        params = getattr(getattr(item, "callspec", None), "params", {})
        kind = params.get("running_server")
        if kind is None and "polling_server" in params:  # "gthread+redis": the server's kind
            kind = params["polling_server"].partition("+")[0]
        (dropped if marker and kind and kind not in marker.args else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session", params=list(SERVERS))
def running_server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    with start_server(request.param) as server:
        yield server


class LogWatch:
    """The part of a server's log written during one test."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.start = len(server.log_text())
        self.allowed: list[str] = []

    def allow(self, text: str) -> None:
        """Let the log show a traceback or error containing *text* in this test."""
        self.allowed.append(text)

    def text(self) -> str:
        return self.server.log_text()[self.start :]


@pytest.fixture
def server(running_server: RunningServer) -> Iterator[RunningServer]:
    """A running server of each kind; the test fails if the server logs a traceback."""
    watch = LogWatch(running_server)
    running_server.watch = watch  # type: ignore[attr-defined]
    yield running_server
    time.sleep(0.1)
    text = watch.text()
    for marker in ("Traceback", "Bad file descriptor", "Exception in thread", "[ERROR]"):
        if marker in text and not any(allowed in text for allowed in watch.allowed):
            pytest.fail(f"{running_server.kind} logged {marker!r}:\n{text}")

"""Fixtures: real servers on 127.0.0.1, and a real WebSocket client."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator

import django
import pytest

from .servers import SERVERS, SRC, UNSUPPORTED, VARIANTS, RunningServer, start_server

sys.path.insert(0, str(SRC))  # the code beside these tests, whatever the virtualenv has installed

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.project.settings")
django.setup()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "servers(*kinds): run the test only on these servers")


#: Every server kind a test may be parametrized with.
_KINDS = {*SERVERS, *UNSUPPORTED, *VARIANTS}


def _only_servers() -> set[str] | None:
    """``DWS_SERVERS`` (kinds, comma-separated): run the server tests on these only.

    scripts/test.sh sets it for the Django versions at the ends of the matrix,
    whose server tests then run on one server of each family; the middle
    version runs every server. Unset: every server.
    """
    value = os.environ.get("DWS_SERVERS", "").strip()
    if not value:
        return None
    kinds = {kind.strip() for kind in value.split(",") if kind.strip()}
    unknown = kinds - _KINDS
    if unknown:
        raise pytest.UsageError(f"DWS_SERVERS names unknown server kinds: {', '.join(sorted(unknown))}")
    return kinds


def _kinds_in(params: dict[str, object]) -> set[str]:
    """The server kinds a test instance's parameters name ("gthread+redis", ("gthread", "uvicorn"), ...)."""
    found = set()
    for value in params.values():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for one in values:
            if isinstance(one, str):
                found.update(token for token in one.split("+") if token in _KINDS)
    return found


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop the instances of a @pytest.mark.servers test that are for other servers,
    and those for servers ``DWS_SERVERS`` leaves out."""
    only = _only_servers()
    kept, dropped = [], []
    for item in items:
        marker = item.get_closest_marker("servers")
        params = getattr(getattr(item, "callspec", None), "params", {})
        kind = params.get("running_server")
        if kind is None and "polling_server" in params:  # "gthread+redis": the server's kind
            kind = params["polling_server"].partition("+")[0]
        drop = bool(marker and kind and kind not in marker.args)
        if only is not None and not _kinds_in(params) <= only:
            drop = True
        (dropped if drop else kept).append(item)
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

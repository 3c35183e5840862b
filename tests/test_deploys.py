"""Deploys: a server told to stop (SIGTERM) closes its connections with 1012 and exits promptly.

Each test starts a real server, opens real WebSocket connections (to a sync
view and, where the server runs them, an async one) and a long-polling
session with a poll in flight, as dwebsocket.js keeps one, then sends SIGTERM
the way a deploy does: to the server's main process (gunicorn's master,
manage.py's autoreloader, hypercorn's parent), or to its whole process group
(systemd's default). Every client must get a close frame 1012, every view's
``wait()`` must return ``None`` with ``close_code`` 1012 (the views print it:
a stopped server's log is all there is to read), and the server must be gone
within ``WEBSOCKET_CLOSE_TIMEOUT`` (2 s in the test project) and a second.

gunicorn runs here with its default graceful timeout (30 s): the views must
return by themselves, not be cut by gunicorn.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .client import ws_connect
from .servers import RunningServer, process_tree, start_server
from .test_polling import PollClient

CLOSE_TIMEOUT = 2.0  # WEBSOCKET_CLOSE_TIMEOUT in tests/project/settings.py
BOUND = CLOSE_TIMEOUT + 1.0  # how long a stop may take, from SIGTERM to the process gone

# The servers that run async views in WSGI mode too (not gevent: 501 there).
ASYNC_VIEWS = {"gthread", "runserver", "uvicorn", "daphne", "hypercorn"}
# gunicorn with its default graceful timeout (the test servers use 2 s).
DEFAULT_GRACE = ("--graceful-timeout", "30")


def _stop_and_time(server: RunningServer, group: bool) -> float:
    """SIGTERM the server (its main process, or its group); seconds until its main process is gone."""
    pid = server.main_pid
    started = time.monotonic()
    if group:
        # Every process of the server once, as systemd's control-group stop does;
        # not the test's `timeout` wrapper, which would pass a second SIGTERM to
        # the main process (hypercorn's parent deadlocks on a second SIGTERM that
        # lands inside its handler: docs/reliability.md).
        for member in process_tree(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGTERM)
    else:
        os.kill(pid, signal.SIGTERM)
    return started


def _close_code(ws: Any, timeout: float) -> int | None:
    """The code of the close frame *ws* receives within *timeout* s; None if it gets none (1006)."""
    try:
        while True:
            ws.recv(timeout)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None
    except TimeoutError:
        return -1  # still open


def _views_saw(server: RunningServer) -> dict[str, str]:
    """What each deploy view printed when its connection ended, by its ?id=."""
    return {
        m.group(1): m.group(2)
        for m in re.finditer(r"deploy-view id=(\S+) (.*)", server.log_text())
    }


CASES = [
    ("gthread", False), ("gthread", True),
    ("gevent", False),
    ("uvicorn", False),
    ("hypercorn", False), ("hypercorn", True),
    ("runserver", False),
]


@pytest.mark.parametrize(("kind", "group"), CASES, ids=[f"{k}-{'group' if g else 'main'}" for k, g in CASES])
def test_sigterm_closes_connections_with_1012_and_the_server_exits(kind: str, group: bool) -> None:
    env = {"DWS_TEST_POLL_TIMEOUT": "20"}  # a poll in flight would hold the server this long
    args = DEFAULT_GRACE if kind in ("gthread", "gevent") else ()
    with start_server(kind, env=env, args=args, max_seconds=120) as server, contextlib.ExitStack() as stack:
        sockets = {"sync": stack.enter_context(ws_connect(server, "/deploy-echo/?id=sync"))}
        if kind in ASYNC_VIEWS:
            sockets["async"] = stack.enter_context(ws_connect(server, "/async-deploy-echo/?id=async"))
        for name, ws in sockets.items():
            ws.send(f"hello {name}")
            assert ws.recv(10) == f"hello {name}"
        polling = PollClient(server, "/deploy-echo/?id=polling")
        assert polling.open()[0] == 200
        assert polling.send("hello polling") == 204
        assert polling.receive(1) == ["hello polling"]
        poll: dict[str, Any] = {}

        def poll_in_flight() -> None:  # as dwebsocket.js always has one
            try:
                poll["answer"] = polling.poll()
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                poll["answer"] = exc
            poll["at"] = time.monotonic()

        poller = threading.Thread(target=poll_in_flight, daemon=True)
        poller.start()
        time.sleep(0.3)  # the poll waits on the server

        started = _stop_and_time(server, group)
        codes = {name: _close_code(ws, BOUND) for name, ws in sockets.items()}
        closed_after = time.monotonic() - started
        poller.join(BOUND)
        try:
            server.process.wait(BOUND)
        except Exception:  # noqa: BLE001 - reported by the assertion below
            pass
        exited_after = time.monotonic() - started
        print(f"{kind} ({'group' if group else 'main process'}): clients closed after "
              f"{closed_after:.2f} s, server gone after {exited_after:.2f} s")

        assert codes == {name: 1012 for name in sockets}, server.log_text()
        assert "answer" in poll, "the poll in flight got no answer"
        assert isinstance(poll["answer"], tuple), (poll["answer"], server.log_text())
        messages, close = poll["answer"]
        assert close == {"code": 1012, "reason": "service restart"}
        assert poll["at"] - started < BOUND
        assert server.process.poll() is not None, f"{kind} still runs {BOUND} s after SIGTERM"
        assert exited_after < BOUND
        saw = _views_saw(server)
        expected = "wait=None connected=False close_code=1012 reason='service restart'"
        assert saw == {name: expected for name in [*sockets, "polling"]}, server.log_text()
        assert "Traceback" not in server.log_text()


def test_daphne_cannot_send_1012_its_connections_drop_and_it_exits() -> None:
    """daphne (autobahn) sends only 1000 and 3000-4999: dwebsocket sends no close it
    would refuse, and above all no 1000, which would tell dwebsocket.js not to come
    back. The connection drops (1006) as daphne stops, and the client reconnects."""
    with start_server("daphne", max_seconds=120) as server:
        with ws_connect(server, "/deploy-echo/?id=sync") as ws:
            ws.send("hello")
            assert ws.recv(10) == "hello"
            started = _stop_and_time(server, group=False)
            assert _close_code(ws, BOUND) is None  # no close frame: 1006
            server.process.wait(BOUND)
            print(f"daphne: server gone after {time.monotonic() - started:.2f} s")
        assert "Traceback" not in server.log_text()



@pytest.mark.parametrize("kind", ["uwsgi-threads", "uwsgi-gevent"])
def test_uwsgi_stops_its_workers_at_once_and_connections_drop(kind):
    """uWSGI stops a worker with a signal handled in C (SIGINT from the master, on
    SIGTERM with --die-on-term, SIGINT or SIGQUIT), which ends the process before
    any Python code runs: no close frame (1006), and dwebsocket.js reconnects.
    docs/servers/uwsgi.md says so; the server is gone within seconds."""
    with start_server(kind, max_seconds=120) as server:
        with ws_connect(server, "/deploy-echo/?id=sync") as ws:
            ws.send("hello")
            assert ws.recv(10) == "hello"
            started = _stop_and_time(server, group=False)
            assert _close_code(ws, BOUND) is None  # no close frame: 1006
            server.process.wait(BOUND + 2)  # the master buries its worker after a second
            print(f"{kind}: server gone after {time.monotonic() - started:.2f} s")
        assert "Traceback" not in server.log_text()


@pytest.mark.parametrize("kind", ["uwsgi-gevent", "uwsgi-threads"])
def test_uwsgi_graceful_reload(kind):
    """SIGHUP to uWSGI's master reloads its workers gracefully. In gevent mode the
    worker's SIGHUP reaches dwebsocket (a gevent signal watcher beside uWSGI's):
    connections close with 1012 and the worker is replaced within a second or
    two. In threaded mode uWSGI handles it in C: the worker waits for its
    requests until --worker-reload-mercy (2 s here), then is killed (1006)."""
    mercy = 2
    with start_server(kind, max_seconds=120, args=("--worker-reload-mercy", str(mercy))) as server:
        with ws_connect(server, "/deploy-echo/?id=sync") as ws:
            ws.send("hello")
            assert ws.recv(10) == "hello"
            started = time.monotonic()
            os.kill(server.main_pid, signal.SIGHUP)
            code = _close_code(ws, mercy + BOUND)
            closed_after = time.monotonic() - started
        print(f"{kind}: closed with {code} after {closed_after:.2f} s")
        if kind == "uwsgi-gevent":
            assert code == 1012 and closed_after < BOUND
            saw = "wait=None connected=False close_code=1012 reason='service restart'"
            deadline = time.monotonic() + BOUND
            while not _views_saw(server) and time.monotonic() < deadline:
                time.sleep(0.1)  # the view prints once it returned
            assert _views_saw(server) == {"sync": saw}, server.log_text()
        else:
            assert code is None and mercy - 0.5 < closed_after < mercy + BOUND
        deadline = time.monotonic() + 10
        while True:  # the new worker serves
            try:
                with ws_connect(server, "/echo/") as again:
                    again.send("back")
                    assert again.recv(10) == "back"
                break
            except (OSError, InvalidStatus):
                assert time.monotonic() < deadline, server.log_text()
                time.sleep(0.2)
        assert "Traceback" not in server.log_text()

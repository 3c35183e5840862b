"""Prometheus metrics and manage.py websocket_status, against real servers, clients and redis-server."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus

from .client import ws_connect
from .servers import ROOT, free_port, python_path, start_redis, start_server
from .test_groups import join_without_reading, joined, presence, wait_for
from .test_polling import PollClient


def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the server's /metrics: (name, sorted labels) -> value."""
    status, text = server.get("/metrics")
    assert status == 200, text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def eventually(server, check, timeout=10.0):
    """Scrape until *check(samples)* holds (a worker flushes its tallies every second)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        try:
            check(samples)
            return samples
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


WS_GTHREAD = {"transport": "websocket", "server": "wsgi-thread"}
WS_ASGI = {"transport": "websocket", "server": "asgi"}


# -- one process ---------------------------------------------------------------------


WSGI_LABELS = {"gthread": "wsgi-thread", "gevent": "wsgi-gevent", "runserver": "runserver"}


@pytest.mark.parametrize("kind", list(WSGI_LABELS))
def test_wsgi_servers_count_connections_messages_bytes_broadcasts_and_refusals(kind):
    labels = {"transport": "websocket", "server": WSGI_LABELS[kind]}
    with start_server(kind) as running, contextlib.ExitStack() as stack:
        before = scrape(running)
        assert value(before, "dwebsocket_connections", **labels) == 0
        echo = stack.enter_context(ws_connect(running, "/echo/"))
        for text in ("one", "twö", "three"):
            echo.send(text)
            assert echo.recv(timeout=10) == text
        members = [stack.enter_context(ws_connect(running, "/group/metrics/")) for _ in range(3)]
        for member in members:
            joined(member)
        members[0].send("hello")
        assert members[1].recv(timeout=10) == "hello"
        assert members[2].recv(timeout=10) == "hello"
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(running, "/echo/", origin="http://evil.example")
        assert refused.value.response.status_code == 403

        samples = scrape(running)
        assert value(samples, "dwebsocket_connections", **labels) == 4
        assert value(samples, "dwebsocket_connections_opened_total", **labels) == 4
        # In: 3 echoes and the group message; out: 3 echoes, 3 "joined", 2 deliveries.
        assert value(samples, "dwebsocket_messages_received_total") == 4
        assert value(samples, "dwebsocket_received_bytes_total") == len("one") + len("twö".encode()) + 5 + 5
        assert value(samples, "dwebsocket_messages_sent_total") == 8
        joined_bytes = sum(len(f"joined {'x' * 32}") for _ in range(3))
        assert value(samples, "dwebsocket_sent_bytes_total") == 3 + 4 + 5 + joined_bytes + 2 * 5
        assert value(samples, "dwebsocket_broadcasts_total") == 1
        assert value(samples, "dwebsocket_broadcast_deliveries_total") == 2
        assert value(samples, "dwebsocket_broadcast_lag_seconds_count") == 1
        assert 0 < value(samples, "dwebsocket_broadcast_lag_seconds_sum") < 1
        assert value(samples, "dwebsocket_handshakes_refused_total", reason="origin") == 1
        assert value(samples, "dwebsocket_handshakes_refused_total", reason="full") == 0

        stack.close()
        eventually(running, lambda s: _assert_equal(value(s, "dwebsocket_connections", **labels), 0))
        assert "Traceback" not in running.log_text()


def _assert_equal(found, expected):
    assert found == expected, (found, expected)


def test_uvicorn_counts_async_views_polling_sessions_and_a_full_server():
    env = {"DWS_TEST_MAX_CONNECTIONS": "3", "DWS_TEST_POLL_TIMEOUT": "2"}
    with start_server("uvicorn", env=env) as running, contextlib.ExitStack() as stack:
        echo = stack.enter_context(ws_connect(running, "/async-echo/"))
        echo.send("ping")
        echo.recv(timeout=10)
        member = stack.enter_context(ws_connect(running, "/async-group/room/"))
        joined(member)
        polling = PollClient(running, "/echo/")
        assert polling.open()[0] == 200
        assert polling.send("by poll") == 204
        assert polling.receive(1) == ["by poll"]
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(running, "/echo/")  # a fourth connection: WEBSOCKET_MAX_CONNECTIONS is 3
        assert refused.value.response.status_code == 503
        assert running.get("/broadcast/room/?n=2")[0] == 200
        assert member.recv(timeout=10).startswith("msg 0")
        assert member.recv(timeout=10).startswith("msg 1")

        samples = scrape(running)
        assert value(samples, "dwebsocket_connections", **WS_ASGI) == 2
        assert value(samples, "dwebsocket_connections", transport="polling", server="asgi") == 1
        assert value(samples, "dwebsocket_connections_opened_total", transport="polling", server="asgi") == 1
        assert value(samples, "dwebsocket_handshakes_refused_total", reason="full") == 1
        assert value(samples, "dwebsocket_messages_received_total") == 2  # "ping" and "by poll"
        assert value(samples, "dwebsocket_broadcasts_total") == 2
        assert value(samples, "dwebsocket_broadcast_deliveries_total") == 2
        # The broadcasts were made in a thread (a sync view) and written on the loop.
        assert value(samples, "dwebsocket_broadcast_lag_seconds_count") == 2

        assert polling.close() == 204
        stack.close()
        eventually(running, lambda s: _assert_equal(
            value(s, "dwebsocket_connections", **WS_ASGI)
            + value(s, "dwebsocket_connections", transport="polling", server="asgi"), 0))
        assert "Traceback" not in running.log_text()


def test_a_member_too_slow_for_the_broadcasts_is_counted_as_closed():
    group = "flood"
    with start_server("gthread", env={"DWS_TEST_BROADCAST_QUEUE": "4"}) as running, \
            contextlib.ExitStack() as stack:
        fast = stack.enter_context(ws_connect(running, f"/group/{group}/"))
        joined(fast)
        join_without_reading(stack, running, group)
        wait_for(lambda: presence(running, group)["size"] == 2, what="2 members")
        for _ in range(10):
            assert running.get(f"/broadcast/{group}/?n=20&size=50000")[0] == 200
            for _ in range(20):
                fast.recv(timeout=10)
            if presence(running, group)["size"] == 1:
                break
        wait_for(lambda: presence(running, group)["size"] == 1, what="the slow member closed")
        samples = scrape(running)
        assert value(samples, "dwebsocket_outbound_overflows_total", action="closed") == 1
        assert value(samples, "dwebsocket_outbound_overflows_total", action="dropped") == 0


# -- gunicorn with two workers: multiprocess mode ------------------------------------------


def test_two_gunicorn_workers_are_summed_in_multiprocess_mode():
    with tempfile.TemporaryDirectory(prefix="dws-prom-") as directory, \
            start_server("gthread", env={"PROMETHEUS_MULTIPROC_DIR": directory},
                         args=("--workers", "2", "--reuse-port")) as running, \
            contextlib.ExitStack() as stack:
        clients = []
        for _ in range(12):  # SO_REUSEPORT spreads them over both workers (by the client's port)
            client = stack.enter_context(ws_connect(running, "/echo/"))
            client.send("x")
            assert client.recv(timeout=10) == "x"
            clients.append(client)
        per_worker = _open_per_worker(Path(directory))
        assert len([n for n in per_worker.values() if n]) == 2, per_worker  # both workers hold some
        assert sum(per_worker.values()) == 12
        samples = eventually(running, lambda s: _assert_equal(
            value(s, "dwebsocket_messages_received_total"), 12))
        assert value(samples, "dwebsocket_connections", **WS_GTHREAD) == 12
        assert value(samples, "dwebsocket_messages_sent_total") == 12
        assert value(samples, "dwebsocket_connections_opened_total", **WS_GTHREAD) == 12
        stack.close()
        eventually(running, lambda s: _assert_equal(value(s, "dwebsocket_connections", **WS_GTHREAD), 0))


def _open_per_worker(directory: Path) -> dict[str, float]:
    """dwebsocket_connections in each worker's own file of the multiprocess directory."""
    found = {}
    for path in directory.glob("gauge_livesum_*.db"):
        found[path.stem.rsplit("_", 1)[1]] = sum(
            item[1] for item in MmapedDict.read_all_values_from_file(str(path))  # (key, value, ...)
            if json.loads(item[0])[0] == "dwebsocket_connections"
        )
    return found


# -- metrics off, or prometheus_client missing ---------------------------------------------


def test_metrics_off_answer_404_with_the_reason_and_connections_still_work():
    with start_server("gthread", env={"DWS_TEST_METRICS": "0"}) as running:
        status, text = running.get("/metrics")
        assert status == 404
        assert "dwebsocket metrics are off: WEBSOCKET_METRICS is False" in text
        with ws_connect(running, "/echo/") as client:
            client.send("still works")
            assert client.recv(timeout=10) == "still works"


def test_without_prometheus_client_the_view_says_how_to_install_it(tmp_path):
    hidden = _without_prometheus_client(tmp_path)
    with start_server("uvicorn", env={"PYTHONPATH": python_path(ROOT, hidden)}) as running:
        status, text = running.get("/metrics")
        assert status == 404
        assert "prometheus_client is not installed: pip install 'dwebsocket[metrics]'" in text
        with ws_connect(running, "/async-echo/") as client:
            client.send("still works")
            assert client.recv(timeout=10) == "still works"
        assert "Traceback" not in running.log_text()


def _without_prometheus_client(tmp_path: Path) -> Path:
    """A directory that, first on sys.path, makes ``import prometheus_client`` fail as if it were not installed."""
    package = tmp_path / "hide" / "prometheus_client"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise ImportError("No module named \'prometheus_client\'")\n')
    return package.parent


# -- manage.py websocket_status --------------------------------------------------------


def status_command(env, *args):
    return subprocess.run(
        [sys.executable, "tests/project/manage.py", "websocket_status", *args],
        env={**os.environ, "PYTHONPATH": python_path(ROOT), "DJANGO_SETTINGS_MODULE": "tests.project.settings",
             **env},
        cwd=ROOT, timeout=60, capture_output=True, text=True,
    )


def test_status_shows_every_process_sharing_redis_as_a_table_and_as_json():
    with start_redis() as redis_server, contextlib.ExitStack() as stack:
        env = {"DWS_TEST_BROKER": redis_server.url}
        first = stack.enter_context(start_server("gthread", env=env))
        second = stack.enter_context(start_server("uvicorn", env=env))
        for _ in range(2):
            joined(stack.enter_context(ws_connect(first, "/group/lobby/")))
        joined(stack.enter_context(ws_connect(second, "/async-group/lobby/")))
        joined(stack.enter_context(ws_connect(second, "/async-group/news/")))
        stack.enter_context(ws_connect(second, "/async-echo/"))

        def complete():
            done = status_command(env, "--json")
            assert done.returncode == 0, done.stderr
            found = json.loads(done.stdout)
            return found if found["totals"]["connections"] == 5 and found["groups"] == {"lobby": 3, "news": 1} \
                else None

        deadline = time.monotonic() + 15
        while (found := complete()) is None:
            assert time.monotonic() < deadline, "the status records did not show 5 connections"
            time.sleep(0.5)
        servers = {p["server"]: p for p in found["processes"]}
        assert set(servers) == {"wsgi-thread", "asgi"}
        assert servers["wsgi-thread"]["by_transport"] == {"websocket/wsgi-thread": 2}
        assert servers["asgi"]["by_transport"] == {"websocket/asgi": 3}
        assert servers["wsgi-thread"]["pid"] != servers["asgi"]["pid"]
        assert found["broker"]["kind"] == "redis" and found["broker"]["reachable"]
        assert found["totals"] == {"processes": 2, "connections": 5, "groups": 2, "members": 4}

        table = status_command(env)
        assert table.returncode == 0, table.stderr
        assert "Broker: Redis" in table.stdout
        for process in found["processes"]:
            assert str(process["pid"]) in table.stdout
        assert "Total: 5 connection(s) in 2 process(es); 2 group(s), 4 member(s)." in table.stdout
        assert [line.split() for line in table.stdout.splitlines() if line.startswith(("lobby", "news"))] == [
            ["lobby", "3"], ["news", "1"],
        ]


def test_status_with_redis_unreachable_is_a_clean_error():
    done = status_command({"DWS_TEST_BROKER": f"redis://127.0.0.1:{free_port()}/0"})
    assert done.returncode == 1
    assert "Cannot reach Redis at WEBSOCKET_BROKER" in done.stderr
    assert "Traceback" not in done.stderr


def test_status_with_the_memory_broker_says_it_sees_only_its_own_process():
    done = status_command({"DWS_TEST_BROKER": "memory"})
    assert done.returncode == 0, done.stderr
    assert "it shows its own process only" in done.stdout
    found = json.loads(status_command({"DWS_TEST_BROKER": "memory"}, "--json").stdout)
    assert found["scope"] == "this process only"
    assert [p["pid"] for p in found["processes"]] != []


# -- recoveries, and the Redis broker's faults ---------------------------------------------


def test_recoveries_are_counted_recovered_or_not():
    from .test_delivery import SessionClient, http_broadcast

    with start_server("gthread", env={"DWS_TEST_HISTORY_SIZE": "3"}) as running:
        member = SessionClient(running, "/group/room/").connect()  # no position yet: no recovery asked
        member.until_joined("room")
        member.close()
        http_broadcast(running, "room", 2, "away")
        member.connect()  # 2 missed, 3 kept: recovered
        assert member.until_joined("room")[1]["r"] is True
        member.close()
        http_broadcast(running, "room", 5, "away")
        member.connect()  # 5 missed, 3 kept: not recovered
        assert member.until_joined("room")[1]["r"] is False
        member.close()
        samples = scrape(running)
        assert value(samples, "dwebsocket_recoveries_total", result="recovered") == 1
        assert value(samples, "dwebsocket_recoveries_total", result="not_recovered") == 1


def test_redis_lost_counts_publish_errors_and_its_return_a_reconnect():
    with start_redis() as redis_server, \
            start_server("gthread", env={"DWS_TEST_BROKER": redis_server.url}) as running, \
            ws_connect(running, "/group/room/") as member:
        joined(member)
        assert value(scrape(running), "dwebsocket_broker_publish_errors_total") == 0
        redis_server.stop()
        assert running.get("/broadcast/room/?n=3")[0] == 200
        for _ in range(3):
            assert member.recv(timeout=10).startswith("msg ")  # this process's members still get them
        assert value(scrape(running), "dwebsocket_broker_publish_errors_total") == 3
        assert value(scrape(running), "dwebsocket_broker_reconnects_total") == 0
        assert value(scrape(running), "dwebsocket_broker_outbox_total", outcome="published") == 0
        redis_server.start()
        eventually(running, lambda s: _assert_equal(value(s, "dwebsocket_broker_reconnects_total"), 1), timeout=20)
        # the outbox publishes the three once Redis is back (docs/reliability.md)
        eventually(running, lambda s: _assert_equal(
            value(s, "dwebsocket_broker_outbox_total", outcome="published"), 3), timeout=20)

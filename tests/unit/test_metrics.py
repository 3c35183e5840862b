"""dwebsocket.metrics: the no-op path (metrics off, prometheus_client missing), the tallies, the checks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
from django.core.checks import run_checks
from django.test import override_settings

from dwebsocket import metrics

from ..servers import ROOT, python_path


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run *code* in a fresh interpreter with the test project's settings (and *env*)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONPATH": python_path(ROOT), "DJANGO_SETTINGS_MODULE": "tests.project.settings", **env},
        cwd=ROOT, timeout=60, capture_output=True, text=True,
    )


# What both no-op cases check: nothing is recorded, nothing is started, the view says why.
_NO_OP = """
    import threading
    import django
    {prelude}
    django.setup()
    from django.test import RequestFactory
    from dwebsocket import metrics
    from dwebsocket.connection import Connection
    from dwebsocket.groups import join, broadcast
    from dwebsocket.messages import Frame

    assert not metrics.enabled()
    for name in ("received", "sent", "published", "delivered", "written", "frame_freed"):
        assert getattr(metrics, name) is metrics._nothing, name
    assert metrics.frame_made is metrics._zero

    # A connection that receives, sends, joins and gets a broadcast records nothing.
    c = Connection()
    link = c._link
    class T:
        def send(self, m): return True
        def offer(self, frame): return True
    link.opened(T())
    assert link.deliver_nowait("in")
    assert c.read() == "in"
    assert c.send("out")
    join(link, "g")
    broadcast("g", "to all")
    frame = Frame("x", "g")
    assert frame.born == 0.0 and frame.written_at == 0.0
    metrics.flush()
    assert metrics._tallies == {{}} and metrics._metrics == {{}} and metrics._flusher_pid == 0
    assert not [t for t in threading.enumerate() if t.name == "dwebsocket-metrics"]
    assert not any(name.startswith("dwebsocket_") for name in {registry_names})

    response = metrics.view(RequestFactory().get("/metrics"))
    assert response.status_code == 404, response.status_code
    print(response.content.decode().strip())
"""


def test_metrics_off_by_setting_record_nothing_and_the_view_answers_404():
    done = run_python(_NO_OP.format(
        prelude="", registry_names="__import__('prometheus_client').REGISTRY._names_to_collectors",
    ), DWS_TEST_METRICS="0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "dwebsocket metrics are off: WEBSOCKET_METRICS is False."


def test_without_prometheus_client_metrics_record_nothing_and_the_view_says_how_to_install():
    done = run_python(_NO_OP.format(
        prelude="import sys; sys.modules['prometheus_client'] = None  # import fails, as if not installed",
        registry_names="()",
    ))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "dwebsocket metrics are off: prometheus_client is not installed: pip install 'dwebsocket[metrics]'."
    )


def test_the_default_turns_metrics_on_when_prometheus_client_is_installed():
    # The test settings leave WEBSOCKET_METRICS at None, and this virtualenv has prometheus_client.
    assert metrics.enabled()
    assert metrics.received is not metrics._nothing


def test_every_thread_counts_in_its_own_tally_and_nothing_is_lost_when_it_ends():
    received = metrics._metrics["dwebsocket_messages_received_total"]
    received_bytes = metrics._metrics["dwebsocket_received_bytes_total"]
    metrics.flush()
    before, before_bytes = received._value.get(), received_bytes._value.get()

    def count():
        for _ in range(10_000):
            metrics.received("abc")
        metrics.received("é")  # 2 bytes in UTF-8

    threads = [threading.Thread(target=count) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    tallies = len(metrics._tallies)
    del thread, threads
    metrics.flush()
    assert received._value.get() - before == 4 * 10_001
    assert received_bytes._value.get() - before_bytes == 4 * (30_000 + 2)
    assert len(metrics._tallies) <= tallies - 4  # the ended threads' tallies are folded and dropped


def test_a_frame_reports_its_lag_once_when_it_is_freed():
    from dwebsocket.messages import Frame

    lag = metrics._metrics["dwebsocket_broadcast_lag_seconds"]
    metrics.flush()
    before = _histogram_count(lag)
    frame = Frame("x", "g")
    assert frame.born > 0
    metrics.delivered(frame, 0)  # nobody took it: no write, no lag
    unwritten = Frame("y", "g")
    metrics.delivered(frame, 3)
    del frame, unwritten
    metrics.flush()
    assert _histogram_count(lag) - before == 1


def _histogram_count(histogram) -> float:
    for family in histogram.collect():
        for sample in family.samples:
            if sample.name.endswith("_count"):
                return sample.value
    raise AssertionError("no _count sample")


def test_open_connections_are_counted_by_transport_and_server_whatever_the_setting():
    class AsgiTransport:
        pass

    class PollingSession:
        pass

    a, p = AsgiTransport(), PollingSession()
    metrics.connection_opened(a)
    metrics.connection_opened(p)
    try:
        found = metrics.open_connections()
        assert found.get("websocket/asgi", 0) >= 1
        assert found.get(f"polling/{metrics.server_kind()}", 0) >= 1
    finally:
        metrics.connection_closed(a)
        metrics.connection_closed(p)


# -- the system checks ------------------------------------------------------------------


def dwebsocket_messages():
    return sorted((m.id, m.msg) for m in run_checks() if m.id and m.id.startswith("dwebsocket."))


@pytest.mark.parametrize("value", ["yes", 1, 0])
def test_websocket_metrics_must_be_none_true_or_false(value):
    with override_settings(WEBSOCKET_METRICS=value):
        assert dwebsocket_messages() == [
            ("dwebsocket.E007", f"WEBSOCKET_METRICS must be None, True or False; it is {value!r}."),
        ]


def test_websocket_metrics_true_needs_prometheus_client(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails, as if not installed
    with override_settings(WEBSOCKET_METRICS=True):
        assert dwebsocket_messages() == [
            ("dwebsocket.E008", "WEBSOCKET_METRICS is True, but prometheus_client is not installed."),
        ]
    with override_settings(WEBSOCKET_METRICS=None):
        assert dwebsocket_messages() == []


def test_a_multiprocess_directory_that_does_not_exist_is_reported(monkeypatch, tmp_path):
    missing = str(tmp_path / "missing")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", missing)
    assert [m[0] for m in dwebsocket_messages()] == ["dwebsocket.W003"]
    with override_settings(WEBSOCKET_METRICS=False):
        assert dwebsocket_messages() == []
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert dwebsocket_messages() == []


def test_a_missing_multiprocess_directory_leaves_metrics_off_with_a_log_line(tmp_path):
    done = run_python("""
        import django
        django.setup()
        from dwebsocket import metrics
        assert not metrics.enabled()
        assert metrics.received is metrics._nothing
    """, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "missing"))
    assert done.returncode == 0, done.stderr
    assert "metrics are off: PROMETHEUS_MULTIPROC_DIR is" in done.stderr

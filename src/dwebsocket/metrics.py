"""Prometheus metrics of this process's connections, messages and broadcasts.

Optional: with ``prometheus_client`` installed (``pip install
dwebsocket[metrics]``) and ``WEBSOCKET_METRICS`` not ``False``, the app
(``AppConfig.ready()``) calls :func:`configure`, which defines every metric
(:data:`SPECS`, the one list of them) in ``prometheus_client``'s default
registry, where django-prometheus's ``/metrics`` view finds them too, and
swaps the recording functions below for real ones. Until then, and for good
when metrics are off or the package is missing, each recording function is a
no-op: the cost of metrics off is one function call on the paths that record.

Serve them with :func:`view` (``path("metrics", dwebsocket.metrics.view)``,
or ``include("dwebsocket.urls")``); under gunicorn with several workers, set
``PROMETHEUS_MULTIPROC_DIR`` and the view sums every worker
(prometheus_client's ``MultiProcessCollector``). See docs/metrics.md.

**Cost on the hot paths.** A message received or sent, a broadcast and its
deliveries are counted in *tallies*, plain integers, never in a
``prometheus_client`` value directly (each of those takes a lock, and in
multiprocess mode writes a memory-mapped file: a few of them per message
would cost more than 5 % of an echo round trip). Each thread adds to a tally
of its own (a ``threading.local``), so no lock is taken and no increment is
lost; under gevent, where greenlets never switch inside an increment, one
tally serves the process (a tally per greenlet would cost memory per
connection). A flusher (a daemon thread, started with the process's first
tally) adds what the tallies gained to the ``prometheus_client`` counters
every :data:`FLUSH_SECONDS`, and the view flushes before it answers. The
delivery lag histogram is fed the same way: a frame records when it was made
and when it was last written (``messages.Frame``), and when it is freed it
appends the difference to a ``deque`` (atomic, lock-free) that the flusher
observes. Rare events (a connection opening, a refused handshake, an
overflow, a broker reconnect) go to ``prometheus_client`` at once.

Concurrency: each thread's tally is written by that thread only and read by
the flusher; ``_flush_lock`` guards ``_tallies``' bookkeeping (what each
tally had at the last flush) and the flusher's start, so that the flusher
thread and a scrape flushing at once do not count a gain twice. ``_open``
(connections open per transport and server kind, kept whether metrics are
on or not: ``websocket_status`` reports it) is guarded by the caller's lock,
``transports.restart._lock``.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

from . import conf

__all__ = [
    "FLUSH_SECONDS",
    "LAG_BUCKETS",
    "SPECS",
    "Spec",
    "available",
    "broker_reconnected",
    "configure",
    "connection_closed",
    "connection_opened",
    "delivered",
    "enabled",
    "flush",
    "frame_freed",
    "frame_made",
    "open_connections",
    "outbox",
    "overflowed",
    "published",
    "publish_failed",
    "received",
    "recovery",
    "refused",
    "sent",
    "server_kind",
    "serving",
    "view",
    "written",
]

logger = logging.getLogger("dwebsocket")

#: Seconds between two flushes of the tallies into the ``prometheus_client`` counters.
FLUSH_SECONDS = 1.0

#: The buckets of ``dwebsocket_broadcast_lag_seconds``.
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Spec(NamedTuple):
    """One metric: its name, kind (counter, gauge, histogram), help text and labels."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()


#: Every metric dwebsocket exports, in one place (docs/metrics.md lists them too).
SPECS: tuple[Spec, ...] = (
    Spec("dwebsocket_connections", "gauge",
         "Connections open now (WebSocket connections and long-polling sessions).", ("transport", "server")),
    Spec("dwebsocket_connections_opened_total", "counter",
         "Connections opened (WebSocket handshakes answered, long-polling sessions accepted).",
         ("transport", "server")),
    Spec("dwebsocket_handshakes_refused_total", "counter",
         "Handshakes refused before the view ran, by reason: origin (403), invalid (400, 426), "
         "server (501: this server cannot hold WebSockets), full (503: WEBSOCKET_MAX_CONNECTIONS).",
         ("reason",)),
    Spec("dwebsocket_messages_received_total", "counter", "Messages received from clients, queued for views."),
    Spec("dwebsocket_received_bytes_total", "counter", "Bytes of the messages received (payload, UTF-8 for text)."),
    Spec("dwebsocket_messages_sent_total", "counter",
         "Messages sent to clients: each send() of a view, and each broadcast delivery."),
    Spec("dwebsocket_sent_bytes_total", "counter", "Bytes of the messages sent (payload, UTF-8 for text)."),
    Spec("dwebsocket_broadcasts_total", "counter", "broadcast() calls made in this process."),
    Spec("dwebsocket_broadcast_deliveries_total", "counter",
         "Broadcasts taken by a member of this process (written, or queued for it)."),
    Spec("dwebsocket_outbound_overflows_total", "counter",
         "Clients too slow for the broadcasts (WEBSOCKET_BROADCAST_OVERFLOW): closed with 1013, "
         "or a broadcast dropped for them.", ("action",)),
    Spec("dwebsocket_recoveries_total", "counter",
         "Reconnecting dwebsocket.js clients that asked for what they missed in a group: "
         "recovered (all of it) or not_recovered.", ("result",)),
    Spec("dwebsocket_broker_reconnects_total", "counter", "Times the Redis broker got Redis back after losing it."),
    Spec("dwebsocket_broker_publish_errors_total", "counter",
         "Broadcasts Redis did not take (only this process's members got them)."),
    Spec("dwebsocket_broker_outbox_total", "counter",
         "Broadcasts kept while Redis was unreachable (WEBSOCKET_OUTAGE_BUFFER): published once it "
         "was back, or dropped (full: the bound; expired: older than WEBSOCKET_HISTORY_TTL).", ("outcome",)),
    Spec("dwebsocket_broadcast_lag_seconds", "histogram",
         "Seconds from a broadcast reaching this process (its broadcast() call, or its arrival from "
         "Redis) until it was written to its last member here."),
)

# Slots of a tally (see the module's docstring).
_IN, _IN_BYTES, _OUT, _OUT_BYTES, _BROADCASTS, _DELIVERIES = range(6)
_TALLIED = (
    "dwebsocket_messages_received_total", "dwebsocket_received_bytes_total",
    "dwebsocket_messages_sent_total", "dwebsocket_sent_bytes_total",
    "dwebsocket_broadcasts_total", "dwebsocket_broadcast_deliveries_total",
)

_REFUSALS = {403: "origin", 501: "server", 503: "full"}

# -- state ---------------------------------------------------------------------

_enabled = False
_metrics: dict[str, Any] = {}  # name -> prometheus_client metric, once configured
_local = threading.local()
_shared: list[int] | None = None  # the one tally under gevent
# id(tally) -> [the thread's weak reference (None under gevent), tally, its values at the last flush]
_tallies: dict[int, list[Any]] = {}
_flush_lock = threading.Lock()
_flusher_pid = 0  # the process the flusher runs in (0: none yet); guarded by _flush_lock
_lags: deque[float] = deque(maxlen=100_000)  # delivery lags not observed yet (append/popleft are atomic)

# Connections open by (transport, server); guarded by transports.restart._lock (see the docstring).
_open: dict[tuple[str, str], int] = {}
_server: str | None = None  # the process's server kind, once a server said so (serving())
_kinds: dict[type, tuple[str, str]] = {}  # transport class -> its labels; rebuilt when _server changes
_gauges: dict[tuple[str, str], tuple[Any, Any]] = {}  # labels -> (open gauge, opened counter)


def available() -> bool:
    """Whether ``prometheus_client`` can be imported."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def enabled() -> bool:
    """Whether metrics are being recorded in this process."""
    return _enabled


# -- the recording functions: no-ops until configure() ------------------------------


def _nothing(*args: object) -> None:
    """A recording function while metrics are off."""


def _zero() -> float:
    return 0.0


#: A message from a client was queued for its view (``Connection``).
received: Callable[[Any], None] = _nothing
#: A view sent a message (``Connection.send``, ``AsyncWebSocket.send``).
sent: Callable[[Any], None] = _nothing
#: ``broadcast()`` was called in this process.
published: Callable[[], None] = _nothing
#: A broadcast's frame was offered to this process's members; *count* took it (``Registry.deliver``).
delivered: Callable[[Any, int], None] = _nothing
#: A queued broadcast frame was written to a member (a transport's writer); bytes (the rest of a frame) are skipped.
written: Callable[[Any], None] = _nothing
#: When a frame is made: the clock, or 0.0 with metrics off (``messages.Frame``).
frame_made: Callable[[], float] = _zero
#: A frame made at *born* and last written at *last* is freed (``messages.Frame.__del__``).
frame_freed: Callable[[float, float], None] = _nothing


def refused(status: int) -> None:
    """A handshake was refused with HTTP *status* before its view ran."""
    if _enabled:
        _metrics["dwebsocket_handshakes_refused_total"].labels(_REFUSALS.get(status, "invalid")).inc()


def overflowed(verdict: str) -> None:
    """The slow-client rule said *verdict* (``"overflow"``: closed, ``"dropped"``) for a broadcast."""
    if _enabled:
        action = "closed" if verdict == "overflow" else "dropped"
        _metrics["dwebsocket_outbound_overflows_total"].labels(action).inc()


def recovery(asked: object, complete: bool | None) -> None:
    """A rejoining client asked for what it missed (*asked* not ``None``); *complete*: whether it got it all."""
    if _enabled and asked is not None:
        _metrics["dwebsocket_recoveries_total"].labels("recovered" if complete else "not_recovered").inc()


def broker_reconnected() -> None:
    """The Redis broker got Redis back after losing it."""
    if _enabled:
        _metrics["dwebsocket_broker_reconnects_total"].inc()


def outbox(outcome: str) -> None:
    """A kept broadcast was ``"published"``, or dropped (``"full"``, ``"expired"``)."""
    if _enabled:
        _metrics["dwebsocket_broker_outbox_total"].labels(outcome).inc()


def publish_failed() -> None:
    """Redis did not take a broadcast."""
    if _enabled:
        _metrics["dwebsocket_broker_publish_errors_total"].inc()


# -- open connections (kept whether metrics are on or not) --------------------------


def serving(kind: str) -> None:
    """This process is a server of *kind* (``"asgi"``, ``"runserver"``); called by that server's hook."""
    global _server
    if _server != kind:
        _server = kind
        _kinds.clear()


def server_kind() -> str:
    """This process's server kind: ``asgi``, ``runserver``, ``wsgi-gevent`` or ``wsgi-thread``."""
    if _server is not None:
        return _server
    gevent_monkey = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None and gevent_monkey.is_module_patched("socket"):
        return "wsgi-gevent"
    return "wsgi-thread"


def _labels(transport: object) -> tuple[str, str]:
    """(transport, server) for a transport object, by its class: the ASGI, polling or WSGI socket one."""
    cls = type(transport)
    found = _kinds.get(cls)
    if found is None:
        name = cls.__name__
        if name.startswith("Asgi"):
            found = ("websocket", "asgi")
        elif name.startswith("Polling"):
            found = ("polling", server_kind())
        else:
            server = server_kind()
            found = ("websocket", "wsgi-thread" if server == "asgi" else server)
        _kinds[cls] = found
    return found


def connection_opened(transport: object) -> None:
    """*transport*'s connection opened; call with ``transports.restart._lock`` held."""
    labels = _labels(transport)
    _open[labels] = _open.get(labels, 0) + 1
    if _enabled:
        gauge, opened = _gauges.get(labels) or _bind(labels)
        gauge.inc()
        opened.inc()
        if _flusher_pid != os.getpid():
            _start_flusher()


def connection_closed(transport: object) -> None:
    """*transport*'s connection is over; call with ``transports.restart._lock`` held, once per open."""
    labels = _labels(transport)
    _open[labels] = _open.get(labels, 1) - 1
    if _enabled:
        gauge, _ = _gauges.get(labels) or _bind(labels)
        gauge.dec()


def _bind(labels: tuple[str, str]) -> tuple[Any, Any]:
    found = _gauges[labels] = (
        _metrics["dwebsocket_connections"].labels(*labels),
        _metrics["dwebsocket_connections_opened_total"].labels(*labels),
    )
    return found


def open_connections() -> dict[str, int]:
    """This process's open connections, ``"<transport>/<server>"`` -> count (a snapshot)."""
    return {f"{t}/{s}": n for (t, s), n in list(_open.items()) if n}


# -- the real recording functions -------------------------------------------------


def _size(message: Any) -> int:
    if isinstance(message, str):
        return len(message) if message.isascii() else len(message.encode("utf-8"))
    return len(message)


def _tally() -> list[int]:
    """This thread's tally (see the module's docstring), made on first use."""
    shared = _shared
    if shared is not None:  # gevent: no per-greenlet state (it would cost memory per connection)
        return shared
    try:
        return _local.tally  # type: ignore[no-any-return]
    except AttributeError:
        pass
    tally = [0] * len(_TALLIED)
    _tallies[id(tally)] = [weakref.ref(threading.current_thread()), tally, [0] * len(_TALLIED)]
    _local.tally = tally
    if _flusher_pid != os.getpid():
        _start_flusher()
    return tally


def _received(message: Any) -> None:
    tally = _tally()
    tally[_IN] += 1
    tally[_IN_BYTES] += _size(message)


def _sent(message: Any) -> None:
    tally = _tally()
    tally[_OUT] += 1
    tally[_OUT_BYTES] += _size(message)


def _published() -> None:
    _tally()[_BROADCASTS] += 1


def _delivered(frame: Any, count: int) -> None:
    if count:
        tally = _tally()
        tally[_DELIVERIES] += count
        tally[_OUT] += count
        tally[_OUT_BYTES] += count * frame.size
        frame.written_at = time.monotonic()  # the members that took it at once have it now


def _written(item: Any) -> None:
    if not isinstance(item, (bytes, bytearray, memoryview, type(None))):  # the rest of a frame: not a Frame
        item.written_at = time.monotonic()


def _freed(born: float, last: float) -> None:
    if last and born:
        _lags.append(last - born)


# -- flushing ---------------------------------------------------------------------


def flush() -> None:
    """Add what the tallies and the lag queue gained to the ``prometheus_client`` metrics."""
    if not _enabled:
        return
    counters = [_metrics[name] for name in _TALLIED]
    with _flush_lock:
        gains = [0] * len(_TALLIED)
        for key, entry in list(_tallies.items()):
            ref, tally, last = entry
            dead = ref is not None and ref() is None  # before the snapshot: a dead thread adds nothing after it
            now = list(tally)  # a snapshot: its owner may be adding meanwhile
            for i, value in enumerate(now):
                gains[i] += value - last[i]
            entry[2] = now
            if dead:
                del _tallies[key]
        lag = _metrics["dwebsocket_broadcast_lag_seconds"]
        while True:
            try:
                value = _lags.popleft()
            except IndexError:
                break
            lag.observe(value)
    for counter, gain in zip(counters, gains):
        if gain:
            counter.inc(gain)


def _flush_forever(pid: int) -> None:
    while _flusher_pid == pid:
        time.sleep(FLUSH_SECONDS)
        try:
            flush()
        except Exception:  # pragma: no cover - never let a metrics bug end the flusher
            pass


def _start_flusher() -> None:
    """Start this process's flusher (again in a forked child, where the parent's thread is gone)."""
    global _flusher_pid
    with _flush_lock:
        pid = os.getpid()
        if _flusher_pid == pid:
            return
        _flusher_pid = pid
    threading.Thread(target=_flush_forever, args=(pid,), name="dwebsocket-metrics", daemon=True).start()


# -- configuration -------------------------------------------------------------------


def _gevent() -> bool:
    gevent_monkey = sys.modules.get("gevent.monkey")
    return bool(gevent_monkey is not None and gevent_monkey.is_module_patched("threading"))


def configure() -> bool:
    """Turn metrics on if ``WEBSOCKET_METRICS`` asks (or is ``None``) and ``prometheus_client`` is there.

    Called by the app when it is ready; idempotent. Returns whether metrics are on.
    """
    global _enabled, _shared, received, sent, published, delivered, written, frame_made, frame_freed
    setting = conf.get("WEBSOCKET_METRICS")
    if _enabled or setting is False or not available():
        return _enabled
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and not os.path.isdir(directory):
        # prometheus_client would fail at the first metric, and the app with it.
        logger.error(
            "dwebsocket: metrics are off: PROMETHEUS_MULTIPROC_DIR is %r, which is not a directory. "
            "Create it (empty) before the server starts; see docs/metrics.md.", directory,
        )
        return False
    import prometheus_client

    kinds = {
        "counter": prometheus_client.Counter,
        "gauge": prometheus_client.Gauge,
        "histogram": prometheus_client.Histogram,
    }
    for spec in SPECS:
        existing = prometheus_client.REGISTRY._names_to_collectors.get(spec.name)
        if existing is not None:  # defined by an earlier configure() (a test's settings change)
            _metrics[spec.name] = existing
            continue
        options: dict[str, Any] = {"labelnames": spec.labels}
        if spec.kind == "gauge":
            options["multiprocess_mode"] = "livesum"  # the open connections of the live workers, summed
        if spec.kind == "histogram":
            options["buckets"] = LAG_BUCKETS
        _metrics[spec.name] = kinds[spec.kind](spec.name, spec.help, **options)
    # Every known label value from the start, at 0, so that rate() sees the first event.
    for reason in ("origin", "invalid", "server", "full"):
        _metrics["dwebsocket_handshakes_refused_total"].labels(reason)
    for action in ("closed", "dropped"):
        _metrics["dwebsocket_outbound_overflows_total"].labels(action)
    for result in ("recovered", "not_recovered"):
        _metrics["dwebsocket_recoveries_total"].labels(result)
    if _gevent():
        _shared = [0] * len(_TALLIED)
        _tallies[id(_shared)] = [None, _shared, [0] * len(_TALLIED)]
    received, sent, published, delivered = _received, _sent, _published, _delivered
    written, frame_made, frame_freed = _written, time.monotonic, _freed
    _enabled = True
    atexit.register(flush)  # what the last second gained, before a worker exits
    return True


def view(request: Any) -> Any:
    """The Prometheus text exposition of this process's metrics, or of every worker's in multiprocess mode.

    404 with a message naming the fix when metrics are off or
    ``prometheus_client`` is missing. Protect the URL as you would
    django-prometheus's (docs/metrics.md).
    """
    from django.http import HttpResponse

    if not _enabled:
        if not available():
            why = "prometheus_client is not installed: pip install 'dwebsocket[metrics]'"
        else:
            why = "WEBSOCKET_METRICS is False"
        return HttpResponse(
            f"dwebsocket metrics are off: {why}.\n", status=404, content_type="text/plain; charset=utf-8"
        )
    import prometheus_client
    from prometheus_client import multiprocess

    flush()
    registry: Any = prometheus_client.REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return HttpResponse(prometheus_client.generate_latest(registry), content_type=prometheus_client.CONTENT_TYPE_LATEST)

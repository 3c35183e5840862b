"""Echo benchmark: dwebsocket views against flask-sock and Django Channels, in the same run.

    python -m bench.echo [--clients 100] [--duration 10] [--warmup 2] [--rounds 3] [--threads N] [--metrics]

``--clients`` connections, held by one client process (picows on uvloop,
the same load generator as bench/fanout.py; no permessage-deflate), each do
sequential round trips: send a 32-byte text message, wait for it to come back, send the next.
After ``--warmup`` seconds, the round trips completed in the next
``--duration`` seconds are counted and timed.

Configurations, all on 127.0.0.1:

- dwebsocket, sync view (``for message in request.websocket: send``), gunicorn ``-k gthread``
- flask-sock (bench/flask_echo.py), gunicorn ``-k gthread``, the same ``--threads``
- dwebsocket, async view (``async for message in ws: await ws.send``), uvicorn ``--ws wsproto``
- Django Channels, an ``AsyncWebsocketConsumer`` echo, uvicorn ``--ws wsproto``
- dwebsocket, the same sync view under uvicorn (a thread per connection)
- a bare ASGI app (bench/asgi_echo.py) that sends back each `receive()`, on the same uvicorn: the ceiling

gunicorn gets ``--threads`` = clients + 16 (a connection holds a thread).
Every server is started once; the rounds then go round the configurations in
turn, so a change in the machine's other load falls on all of them alike.

Reported per configuration (median of ``--rounds``): round trips per second in
total, p50 and p99 round-trip latency, the resident memory of the server
(with every client connected, minus the idle server's before any connected)
per connection, and the tracebacks the server logged. Ratios are
dwebsocket gthread / flask-sock gthread and dwebsocket uvicorn async /
Channels uvicorn. The client shares the 2-core machine with the servers, so
absolute figures are a floor; the ratios are the result.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import platform
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fanout import cpu_seconds, rss_kib  # noqa: E402
from tests.servers import PROJECTS, SERVERS, Project, RunningServer, no_control_socket, start_server  # noqa: E402

from bench.fanout import run_client  # noqa: E402  (uvloop when installed)
from picows import WSCloseCode, WSListener, WSMsgType, ws_connect  # noqa: E402

MESSAGE_BYTES = 32
REPLY_TIMEOUT = 30  # seconds a round trip may still take once the window closed


@dataclass(frozen=True)
class Config:
    """One server serving one echo."""

    key: str
    stack: str
    view: str
    server: str
    kind: str  # a start_server kind
    path: str
    project: str = "bench"
    env: dict[str, str] = field(default_factory=dict)


CONFIGS = [
    Config("dws-gthread", "dwebsocket", "sync view", "gunicorn gthread", "gthread-echo", "/echo/sync/"),
    Config("flask-sock", "flask-sock", "sync route", "gunicorn gthread", "gthread-echo", "/echo", project="flask-echo"),
    Config("dws-uvicorn-async", "dwebsocket", "async view", "uvicorn", "echo-uvicorn", "/echo/async/"),
    Config("channels", "Channels", "AsyncWebsocketConsumer", "uvicorn", "echo-uvicorn", "/echo/channels/",
           env={"BENCH_STACK": "channels"}),
    Config("dws-uvicorn-sync", "dwebsocket", "sync view", "uvicorn", "echo-uvicorn", "/echo/sync/"),
    Config("asgi", "bare ASGI app", "`await send` of each `receive()`", "uvicorn", "echo-asgi", "/"),
]
#: ``--metrics``: dwebsocket's two main configurations, with Prometheus metrics off (as every
#: configuration above: bench/project/settings.py) and on (WEBSOCKET_METRICS), round-robin.
METRICS_CONFIGS = [
    Config("dws-gthread", "dwebsocket", "sync view, metrics off", "gunicorn gthread", "gthread-echo", "/echo/sync/"),
    Config("dws-gthread-metrics", "dwebsocket", "sync view, metrics on", "gunicorn gthread", "gthread-echo",
           "/echo/sync/", env={"BENCH_METRICS": "1"}),
    Config("dws-uvicorn-async", "dwebsocket", "async view, metrics off", "uvicorn", "echo-uvicorn", "/echo/async/"),
    Config("dws-uvicorn-async-metrics", "dwebsocket", "async view, metrics on", "uvicorn", "echo-uvicorn",
           "/echo/async/", env={"BENCH_METRICS": "1"}),
]
METRICS_RATIOS = [
    ("metrics on / off, gthread", "dws-gthread-metrics", "dws-gthread"),
    ("metrics on / off, uvicorn async", "dws-uvicorn-async-metrics", "dws-uvicorn-async"),
]
RATIOS = [
    ("dwebsocket gthread / flask-sock gthread", "dws-gthread", "flask-sock"),
    ("dwebsocket uvicorn async / Channels uvicorn", "dws-uvicorn-async", "channels"),
    ("dwebsocket uvicorn async / bare ASGI uvicorn", "dws-uvicorn-async", "asgi"),
]


def register_servers(threads: int, server_cpu: int | None) -> None:
    """Teach tests.servers.start_server gunicorn gthread with *threads* threads, uvicorn on asyncio, the Flask app.

    With *server_cpu*, every server runs pinned to that core (``taskset``).
    """
    extra = no_control_socket()
    pinned = ["taskset", "-c", str(server_cpu)] if server_cpu is not None else []
    SERVERS["gthread-echo"] = lambda port, p: [
        *pinned, sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", str(threads),
        "-b", f"127.0.0.1:{port}", "--graceful-timeout", "2", *extra, p.wsgi,
    ]
    # The tests' uvicorn, on asyncio's loop even though the bench venv has uvloop (for bench/fanout.py's client).
    uvicorn = SERVERS["uvicorn"]
    SERVERS["echo-uvicorn"] = lambda port, p: [*pinned, *uvicorn(port, p), "--loop", "asyncio"]
    SERVERS["echo-asgi"] = lambda port, p: [*pinned, *uvicorn(port, p)[:-1], "--loop", "asyncio", "bench.asgi_echo:app"]
    PROJECTS["flask-echo"] = Project("bench/flask_echo.py", "bench.flask_echo:app", ROOT, "bench.project.settings")


@dataclass
class Window:
    """Whether round trips completing now are counted, and whether the clients should stop."""

    measuring: bool = False
    done: bool = False
    latencies: list[float] = field(default_factory=list)


@dataclass
class Round:
    rate: float
    latencies: list[float]
    loaded_kib: int
    client_errors: int
    cpu_ms_per_1000: float  # server CPU time per 1000 round trips, all its threads


def payload(index: int) -> str:
    return f"echo {index:05d} ".ljust(MESSAGE_BYTES, ".")


class EchoClient(WSListener):
    """One connection doing sequential round trips: each echo received sends the next message."""

    def __init__(self, message: bytes, window: Window) -> None:
        super().__init__()
        self.message = message
        self.window = window
        self.transport = None
        self.sent_at = 0.0
        self.mismatches = 0
        self.stopped = asyncio.get_running_loop().create_future()  # done once it stopped sending

    def on_ws_connected(self, transport) -> None:
        self.transport = transport

    def send(self) -> None:
        self.sent_at = time.perf_counter()
        self.transport.send(WSMsgType.TEXT, self.message)

    def on_ws_frame(self, transport, frame) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            if frame.msg_type == WSMsgType.CLOSE:
                transport.disconnect()
            return
        elapsed = time.perf_counter() - self.sent_at
        if frame.get_payload_as_bytes() != self.message:
            self.mismatches += 1
        window = self.window
        if window.measuring:
            window.latencies.append(elapsed)
        if window.done:
            if not self.stopped.done():
                self.stopped.set_result(None)
            return
        self.send()

    def on_ws_disconnected(self, transport) -> None:
        if not self.stopped.done():
            self.stopped.set_exception(ConnectionError("disconnected"))


async def connect_all(uri: str, count: int, window: Window) -> list[EchoClient]:
    """Connect in batches of 20, as bench/fanout.py does."""
    clients: list[EchoClient] = []
    for start in range(0, count, 20):
        batch = await asyncio.gather(*(
            ws_connect(lambda i=i: EchoClient(payload(i).encode(), window), uri, websocket_handshake_timeout=60)
            for i in range(start, min(start + 20, count))
        ))
        clients.extend(client for _transport, client in batch)
    return clients


async def run_round(server: RunningServer, path: str, clients: int, warmup: float, duration: float) -> Round:
    window = Window()
    conns = await connect_all(server.ws + path, clients, window)
    try:
        for conn in conns:
            conn.send()
        await asyncio.sleep(warmup)
        loaded = rss_kib(server.process.pid)
        cpu_before = cpu_seconds(server.process.pid)
        window.measuring = True
        started = time.perf_counter()
        await asyncio.sleep(duration)
        window.measuring = False
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(server.process.pid) - cpu_before
        window.done = True
        finished, pending = await asyncio.wait([c.stopped for c in conns], timeout=REPLY_TIMEOUT)
        errors = len(pending) + sum(1 for f in finished if f.exception() is not None)
        errors += sum(c.mismatches for c in conns)
        trips = len(window.latencies)
        return Round(trips / elapsed, window.latencies, loaded, errors, cpu * 1e6 / max(trips, 1))
    finally:
        for conn in conns:
            if conn.transport is not None:
                conn.transport.send_close(WSCloseCode.OK)
                conn.transport.disconnect()
        await asyncio.sleep(0.2)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * fraction), len(ordered) - 1)]


def summarise(rounds: list[Round], idle_kib: int, clients: int, tracebacks: int) -> dict[str, float]:
    return {
        "rate": statistics.median(r.rate for r in rounds),
        "p50": statistics.median(percentile(r.latencies, 0.50) * 1000 for r in rounds),
        "p99": statistics.median(percentile(r.latencies, 0.99) * 1000 for r in rounds),
        "kib": statistics.median((r.loaded_kib - idle_kib) / clients for r in rounds),
        "cpu": statistics.median(r.cpu_ms_per_1000 for r in rounds),
        "tracebacks": tracebacks,
        "client_errors": sum(r.client_errors for r in rounds),
    }


def measure_all(args: argparse.Namespace) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Start every server, run the rounds round-robin, stop them; results and failures by key."""
    per_round = args.warmup + args.duration + REPLY_TIMEOUT
    max_seconds = int(len(CONFIGS) * args.rounds * per_round + 120)
    servers: dict[str, RunningServer] = {}
    idle: dict[str, int] = {}
    rounds: dict[str, list[Round]] = {c.key: [] for c in CONFIGS}
    failures: dict[str, str] = {}
    with ExitStack() as stack:
        for config in CONFIGS:
            try:
                servers[config.key] = stack.enter_context(start_server(
                    config.kind, env=config.env, project=config.project, max_seconds=max_seconds))
            except RuntimeError as exc:
                failures[config.key] = f"did not start: {str(exc).splitlines()[0]}"
                continue
            idle[config.key] = rss_kib(servers[config.key].process.pid)
        for number in range(1, args.rounds + 1):
            for config in CONFIGS:
                if config.key in failures:
                    continue
                try:
                    result = run_client(run_round(
                        servers[config.key], config.path, args.clients, args.warmup, args.duration))
                except Exception as exc:  # a configuration that fails is reported, not fatal
                    failures[config.key] = f"round {number}: {exc!r}"
                    continue
                rounds[config.key].append(result)
                print(f"  round {number} {config.key}: {result.rate:,.0f} round trips/s, "
                      f"{result.cpu_ms_per_1000:.0f} server CPU ms per 1000", file=sys.stderr, flush=True)
    results = {}
    for config in CONFIGS:
        if config.key in failures:
            continue
        server = servers[config.key]
        tracebacks = server.log_text().count("Traceback")  # after stopping: shutdown counts too
        if tracebacks:
            print(f"  {config.key}: {tracebacks} tracebacks in {server.log_path}", file=sys.stderr)
        results[config.key] = summarise(rounds[config.key], idle[config.key], args.clients, tracebacks)
    return results, failures


def versions() -> str:
    names = ["Django", "uvicorn", "gunicorn", "wsproto", "channels", "flask", "flask-sock", "simple-websocket",
             "websockets", "picows"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    return f"Python {platform.python_version()}, " + ", ".join(found)


def print_table(results: dict[str, dict[str, float]], failures: dict[str, str]) -> None:
    print("| stack | view | server | round trips/s | server CPU ms per 1000 round trips | p50 ms | p99 ms "
          "| server KiB per connection | server tracebacks |")
    print("|---|---|---|---|---|---|---|---|---|")
    for config in CONFIGS:
        start = f"| {config.stack} | {config.view} | {config.server} |"
        if config.key in failures:
            print(f"{start} failed: {failures[config.key]} | | | | | |")
            continue
        r = results[config.key]
        print(f"{start} {r['rate']:,.0f} | {r['cpu']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['kib']:.1f} "
              f"| {r['tracebacks']} |")
    for label, mine, theirs in RATIOS:
        if mine in results and theirs in results:
            d, o = results[mine], results[theirs]
            print(f"| **ratio** | {label} | | **{d['rate'] / o['rate']:.2f}x** | {d['cpu'] / o['cpu']:.2f} "
                  f"| {d['p50'] / o['p50']:.2f} "
                  f"| {d['p99'] / o['p99']:.2f} | {d['kib'] / o['kib']:.2f} | |")
    for config in CONFIGS:
        errors = results.get(config.key, {}).get("client_errors")
        if errors:
            print(f"\n{config.stack} {config.view} {config.server}: {errors} client connections failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per round")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="gunicorn --threads (default: clients + 16)")
    parser.add_argument("--server-cpu", type=int, default=0, help="core the servers are pinned to")
    parser.add_argument("--client-cpu", type=int, default=1, help="core the clients are pinned to")
    parser.add_argument("--no-pin", action="store_true", help="pin nothing")
    parser.add_argument("--metrics", action="store_true",
                        help="instead: dwebsocket with Prometheus metrics on vs off (what they cost)")
    args = parser.parse_args()
    if args.metrics:
        global CONFIGS, RATIOS
        CONFIGS, RATIOS = METRICS_CONFIGS, METRICS_RATIOS
    threads = args.threads or args.clients + 16
    pin = not args.no_pin and shutil.which("taskset") is not None and (
        {args.server_cpu, args.client_cpu} <= os.sched_getaffinity(0)
    )
    register_servers(threads, args.server_cpu if pin else None)
    if pin:
        os.sched_setaffinity(0, {args.client_cpu})
    print(f"Echo, {args.clients} clients, {MESSAGE_BYTES}-byte text messages, {args.duration:g} s after "
          f"{args.warmup:g} s warm-up, median of {args.rounds} rounds (gunicorn --threads {threads})")
    print(f"servers pinned to CPU {args.server_cpu}, the clients to CPU {args.client_cpu}" if pin else "nothing pinned")
    print(versions())
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n", flush=True)
    results, failures = measure_all(args)
    print_table(results, failures)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fan-out benchmark: a broadcast to N members in one process, dwebsocket side by side with the alternatives.

    python -m bench.fanout [--members 1000] [--messages 20] [--rate 20] [--duration 10]
                           [--burst 2000] [--rounds 3] [--configs gthread,flask-gthread,...]

Configurations (``--configs``, comma-separated keys; ``default`` = the seven
one-process ones, ``all`` adds the two-process Redis pair):

=================  ==========================================================================
gthread            dwebsocket, sync view (``ws.join("bench"); ws.wait()``), ``broadcast()``
                   from an HTTP request; gunicorn ``-k gthread --threads members+16``
gevent             the same view, gunicorn ``-k gevent``
uvicorn            dwebsocket, async view (``await ws.join("bench"); await ws.wait()``),
                   uvicorn ``--ws wsproto --loop asyncio`` (as in bench/echo.py)
flask-gthread      flask-sock (bench/flask_fanout.py): members in a list, the broadcast a plain
                   ``for ws in list(clients): ws.send(msg)`` loop; gunicorn gthread, same threads
flask-gevent       the same Flask app, gunicorn gevent
raw-gthread        the floor of a Python fan-out: flask-sock's members, the broadcast a frame
                   built once and one bare ``sock.send()`` per member (no lock, check or queue)
raw-uvicorn        the same floor on uvicorn, in dwebsocket's own process: its members, the
                   broadcast (an async view) a bare ``await send(...)`` loop over their server's
                   ``send``: what a broadcast costs there without dwebsocket's code
asgi               a bare ASGI app (bench/asgi_fanout.py) looping ``await send(...)`` over its
                   members, on the same uvicorn: the ceiling for any ASGI stack
channels           Django Channels, an ``AsyncWebsocketConsumer`` in group "bench",
                   ``group_send`` from an HTTP request, InMemoryChannelLayer, uvicorn
redis              dwebsocket async view, 2 uvicorn processes sharing a redis-server
                   (dwebsocket's Redis broker), members split evenly
channels-redis     Channels, the same 2 processes with channels-redis
*-nohistory        gthread, uvicorn-async and redis with group history off
                   (``WEBSOCKET_HISTORY_SIZE = 0``): what keeping it costs
*-metrics          gthread, gevent and uvicorn-async with Prometheus metrics on
                   (``WEBSOCKET_METRICS``; every other configuration has them off): what
                   they cost; ``--configs metrics`` runs the three pairs
=================  ==========================================================================

Every server process is pinned to one core (``taskset -c --server-cpu``, its
redis-server too) and this process, the load generator, to another
(``--client-cpu``), so the figures measure the server; each figure comes
with the server's CPU % (user + system time of its processes, every thread,
over the measured window; 100 % = the whole core). The load generator holds
every member connection in one event loop (uvloop when installed) with picows; members connect
``--batch`` at a time, and a refused or failed handshake is tried again and
counted. Every message is "<number> <time sent>", the time taken by the server
just before it broadcasts the message.

Measured per configuration, on one server (members connected once). The
servers of every configuration run side by side, members connected, and the
rounds go round them (round 1 of each, then round 2 of each, ...): a change
in the machine's speed during the run weighs on every configuration alike.

(a) throughput: one HTTP request broadcasts ``--messages`` messages;
    deliveries per second from the request to the last delivery, p50 and p99
    latency (delivery minus the message's send time); median of ``--rounds``.
(b) steady rate: a paced driver (a coroutine of the load generator) sends
    ``--rate`` HTTP requests a second for ``--duration`` seconds, each
    broadcasting one message, whether or not the earlier ones were answered;
    p99 latency from the moment each request was sent (so time spent queued
    in the server counts), and deliveries lost: of broadcasts x members, those
    not delivered within ``--drain`` seconds of the last answer (a lost one
    counts as infinitely late in the p99); median of ``--rounds``.
(c) burst: on a fresh server with each library's *default* slow-member policy
    (the other two measurements size the queues out of the way), one request
    broadcasts ``--burst`` messages in a loop; how many members received all
    of them in order, and how many the server disconnected.

With (a) and (b) comes the server's CPU time per delivery (its CPU seconds over
the window divided by the deliveries): what a delivery costs the server whether
or not the load generator kept up, and the ratios are given on it too.

Also reported: the server's resident memory per member connection (with every
member connected, minus the idle server's), the handshakes tried again, and
the tracebacks the servers logged. Ratios compare each dwebsocket
configuration with its alternative on the same server.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import (  # noqa: E402
    PROJECTS, SERVERS, Project, RunningServer, no_control_socket, start_redis, start_server,
)

from picows import WSCloseCode, WSError, WSListener, WSMsgType, ws_connect  # noqa: E402

try:
    import uvloop  # the load generator's loop, if installed: fewer of its cycles per delivery
except ImportError:  # pragma: no cover
    uvloop = None


CLIENT_LOOP = {"name": "uvloop" if uvloop is not None else "asyncio"}


def run_client(coroutine):
    """Run the load generator's *coroutine* (on uvloop when installed, unless --client-loop asyncio)."""
    return uvloop.run(coroutine) if CLIENT_LOOP["name"] == "uvloop" else asyncio.run(coroutine)


# -- the server's resources ---------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident memory of *pid* and its children (the server runs in the child of `timeout`)."""
    total = 0
    for candidate in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{candidate}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by *pid* and its children, every thread counted."""
    ticks = 0
    for candidate in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{candidate}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of *pid* and of its children to *cpu* (for redis-server, started unpinned)."""
    for candidate in [pid, *_children(pid)]:
        try:
            threads = [int(t) for t in os.listdir(f"/proc/{candidate}/task")]
        except OSError:
            continue
        for thread in threads:
            try:
                os.sched_setaffinity(thread, {cpu})
            except OSError:
                pass


class CpuMeter:
    """Server CPU % (of one core) between start() and stop(); the load generator's in ``client``."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def _now(self) -> tuple[float, float, float]:
        return time.perf_counter(), sum(cpu_seconds(pid) for pid in self.pids), time.process_time()

    def start(self) -> None:
        self.wall, self.cpu, self.own = self._now()

    def stop(self) -> float:
        wall, cpu, own = self._now()
        self.seconds = max(wall - self.wall, 1e-9)
        self.client = 100 * (own - self.own) / self.seconds
        return 100 * (cpu - self.cpu) / self.seconds


# -- configurations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One stack on one server: where members connect, and where a broadcast is asked for."""

    key: str
    stack: str
    view: str
    server: str
    kind: str  # a tests.servers.start_server kind (registered by register_servers)
    member: str  # WebSocket path of a member
    fanout: str  # HTTP path that broadcasts ?n= messages numbered from ?start=
    project: str = "bench"
    env: dict[str, str] = field(default_factory=dict)
    processes: int = 1  # more than one: that many servers share a redis-server


CONFIGS = [
    Config("gthread", "dwebsocket", "sync view", "gunicorn gthread", "fanout-gthread",
           "/member/sync/", "/fanout/dwebsocket/"),
    Config("gevent", "dwebsocket", "sync view", "gunicorn gevent", "fanout-gevent",
           "/member/sync/", "/fanout/dwebsocket/"),
    Config("uvicorn", "dwebsocket", "async view, broadcast from a sync view", "uvicorn", "fanout-uvicorn",
           "/member/", "/fanout/dwebsocket/"),
    Config("uvicorn-async", "dwebsocket", "async view, broadcast from an async view", "uvicorn", "fanout-uvicorn",
           "/member/", "/fanout/dwebsocket/async/"),
    Config("flask-gthread", "flask-sock", "plain loop", "gunicorn gthread", "fanout-gthread",
           "/member", "/fanout", project="flask-fanout"),
    Config("flask-gevent", "flask-sock", "plain loop", "gunicorn gevent", "fanout-gevent",
           "/member", "/fanout", project="flask-fanout"),
    Config("asgi", "bare ASGI app", "`await send` loop", "uvicorn", "fanout-asgi", "/member", "/fanout"),
    # The floor of a Python fan-out on gunicorn gthread: a frame built once, one bare send() per member.
    Config("raw-gthread", "raw send loop", "frame once, `sock.send()` each", "gunicorn gthread", "fanout-gthread",
           "/member", "/fanout-raw", project="flask-fanout"),
    # The same floor on uvicorn, in dwebsocket's own process: its members, a bare `await send` loop.
    Config("raw-uvicorn", "raw send loop", "dwebsocket's members, `await send` each", "uvicorn", "fanout-uvicorn",
           "/member/", "/fanout/raw-asgi/"),
    Config("channels", "Channels", "AsyncWebsocketConsumer", "uvicorn", "fanout-uvicorn",
           "/member/", "/fanout/channels/", env={"BENCH_STACK": "channels"}),
    Config("redis", "dwebsocket", "async view, Redis broker", "2 × uvicorn", "fanout-uvicorn",
           "/member/", "/fanout/dwebsocket/", processes=2),
    Config("channels-redis", "Channels", "AsyncWebsocketConsumer, channels-redis", "2 × uvicorn",
           "fanout-uvicorn", "/member/", "/fanout/channels/", env={"BENCH_STACK": "channels"}, processes=2),
    # Group history off (WEBSOCKET_HISTORY_SIZE = 0): what keeping it costs the configurations above.
    Config("gthread-nohistory", "dwebsocket", "sync view, history off", "gunicorn gthread", "fanout-gthread",
           "/member/sync/", "/fanout/dwebsocket/", env={"BENCH_HISTORY_SIZE": "0"}),
    Config("uvicorn-async-nohistory", "dwebsocket", "async view, async broadcast, history off", "uvicorn",
           "fanout-uvicorn", "/member/", "/fanout/dwebsocket/async/", env={"BENCH_HISTORY_SIZE": "0"}),
    Config("redis-nohistory", "dwebsocket", "async view, Redis broker, history off", "2 × uvicorn",
           "fanout-uvicorn", "/member/", "/fanout/dwebsocket/", env={"BENCH_HISTORY_SIZE": "0"}, processes=2),
    # Prometheus metrics on (WEBSOCKET_METRICS; off in every configuration above): what they cost.
    Config("gthread-metrics", "dwebsocket", "sync view, metrics on", "gunicorn gthread", "fanout-gthread",
           "/member/sync/", "/fanout/dwebsocket/", env={"BENCH_METRICS": "1"}),
    Config("gevent-metrics", "dwebsocket", "sync view, metrics on", "gunicorn gevent", "fanout-gevent",
           "/member/sync/", "/fanout/dwebsocket/", env={"BENCH_METRICS": "1"}),
    Config("uvicorn-async-metrics", "dwebsocket", "async view, async broadcast, metrics on", "uvicorn",
           "fanout-uvicorn", "/member/", "/fanout/dwebsocket/async/", env={"BENCH_METRICS": "1"}),
]
BY_KEY = {config.key: config for config in CONFIGS}
#: ``--configs metrics``: each metrics-on configuration beside its metrics-off twin.
METRICS_KEYS = ["gthread", "gthread-metrics", "gevent", "gevent-metrics", "uvicorn-async", "uvicorn-async-metrics"]
DEFAULT_KEYS = ["gthread", "gevent", "uvicorn", "uvicorn-async", "flask-gthread", "flask-gevent", "asgi", "channels"]
RATIOS = [
    ("dwebsocket gthread / flask-sock gthread", "gthread", "flask-gthread"),
    ("dwebsocket gthread / raw send loop gthread (the floor)", "gthread", "raw-gthread"),
    ("flask-sock gthread / raw send loop gthread (the floor)", "flask-gthread", "raw-gthread"),
    ("dwebsocket gevent / flask-sock gevent", "gevent", "flask-gevent"),
    ("dwebsocket uvicorn / bare ASGI uvicorn", "uvicorn", "asgi"),
    ("dwebsocket uvicorn, async broadcast / bare ASGI uvicorn", "uvicorn-async", "asgi"),
    ("dwebsocket uvicorn, async broadcast / raw send loop in its process", "uvicorn-async", "raw-uvicorn"),
    ("dwebsocket uvicorn / Channels uvicorn", "uvicorn", "channels"),
    ("dwebsocket / Channels, 2 processes, Redis", "redis", "channels-redis"),
    ("history on / off, gthread", "gthread", "gthread-nohistory"),
    ("history on / off, uvicorn async", "uvicorn-async", "uvicorn-async-nohistory"),
    ("history on / off, 2 processes, Redis", "redis", "redis-nohistory"),
    ("metrics on / off, gthread", "gthread-metrics", "gthread"),
    ("metrics on / off, gevent", "gevent-metrics", "gevent"),
    ("metrics on / off, uvicorn async", "uvicorn-async-metrics", "uvicorn-async"),
]


def register_servers(members: int, server_cpu: int | None) -> tuple[int, int]:
    """Teach tests.servers.start_server this benchmark's servers, pinned to *server_cpu*.

    Returns gunicorn's --threads and --worker-connections.
    """
    pinned = ["taskset", "-c", str(server_cpu)] if server_cpu is not None else []
    threads = members + 16  # a member holds a thread; the broadcast requests get the rest
    connections = members + 100  # gunicorn's default (1000) would refuse the 1001st
    gunicorn = [*pinned, sys.executable, "-m", "gunicorn", "--graceful-timeout", "2", *no_control_socket()]
    # --loop asyncio: uvloop is installed for the load generator, and uvicorn would pick it.
    uvicorn = [*pinned, sys.executable, "-m", "uvicorn", "--ws", "wsproto", "--loop", "asyncio",
               "--host", "127.0.0.1", "--no-access-log"]
    SERVERS["fanout-gthread"] = lambda port, p: [
        *gunicorn, "-k", "gthread", "--threads", str(threads), "--worker-connections", str(connections),
        "-b", f"127.0.0.1:{port}", p.wsgi,
    ]
    SERVERS["fanout-gevent"] = lambda port, p: [
        *gunicorn, "-k", "gevent", "--worker-connections", str(connections), "-b", f"127.0.0.1:{port}", p.wsgi,
    ]
    SERVERS["fanout-uvicorn"] = lambda port, p: [*uvicorn, "--port", str(port), p.asgi]
    SERVERS["fanout-asgi"] = lambda port, p: [*uvicorn, "--port", str(port), "bench.asgi_fanout:app"]
    PROJECTS["flask-fanout"] = Project(
        "bench/flask_fanout.py", "bench.flask_fanout:app", ROOT, "bench.project.settings")
    return threads, connections


# -- the load generator ---------------------------------------------------------------------------


class Phase:
    """What deliveries count for now: messages numbered base .. base + count - 1."""

    def __init__(self, members: list[Member], base: int = 0, count: int = 0, latencies: bool = True,
                 sent_at: dict[int, float] | None = None) -> None:
        self.base, self.count = base, count
        self.keep_latencies = latencies
        self.sent_at = sent_at  # message number -> when its request was sent (steady rate)
        self.latencies: list[float] = []
        self.delivered = 0
        self.last = 0.0
        self.finished = 0  # members that got every message, or were disconnected
        self.members = len(members)
        self.done = asyncio.get_running_loop().create_future()
        for member in members:
            member.reset()
            if member.disconnected:  # cut in an earlier phase
                self.finished += 1
        if self.finished == self.members or not count:
            self.done.set_result(None)

    def deliver(self, member: Member, text: str, now: float) -> None:
        number_text, sent = text.split(" ", 1)
        number = int(number_text) - self.base
        if not 0 <= number < self.count:
            return  # late, from an earlier phase
        if number != member.next:
            member.in_order = False
        member.next = number + 1
        member.count += 1
        self.delivered += 1
        self.last = now
        if self.keep_latencies:
            self.latencies.append(now - (float(sent) if self.sent_at is None else self.sent_at[number]))
        if member.count == self.count:
            self._finish()

    def disconnected(self, member: Member) -> None:
        if member.count < self.count:
            self._finish()

    def _finish(self) -> None:
        self.finished += 1
        if self.finished == self.members and not self.done.done():
            self.done.set_result(None)

    async def wait(self, timeout: float, idle: float | None = None) -> bool:
        """Wait until every member has every message (True), *timeout* passes, or none arrives for *idle* s."""
        deadline = time.monotonic() + timeout
        seen, since = -1, time.monotonic()
        while not self.done.done():
            now = time.monotonic()
            if now >= deadline:
                return False
            if self.delivered != seen:
                seen, since = self.delivered, now
            elif idle is not None and now - since >= idle:
                return False
            await asyncio.wait([self.done], timeout=min(0.2, deadline - now))
        return True


class Member(WSListener):
    """One member connection: records what arrives for the current phase."""

    def __init__(self, run: Run) -> None:
        super().__init__()
        self.run = run
        self.joined = asyncio.get_running_loop().create_future()
        self.closing = False  # closed by the load generator
        self.disconnected = False
        self.close_code: int | None = None
        self.reset()

    def reset(self) -> None:
        self.count, self.next, self.in_order = 0, 0, True

    def on_ws_frame(self, transport, frame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.TEXT:
            now = time.time()
            text = frame.get_payload_as_utf8_text()
            if self.joined.done():
                self.run.phase.deliver(self, text, now)
            elif text == "joined":
                self.joined.set_result(None)
        elif kind == WSMsgType.CLOSE:
            payload = frame.get_payload_as_bytes()
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()

    def on_ws_disconnected(self, transport) -> None:
        self.disconnected = True
        if not self.joined.done():
            self.joined.set_exception(ConnectionError(f"closed before joining (close code {self.close_code})"))
        elif not self.closing:
            self.run.phase.disconnected(self)


class Run:
    """The load generator's state for one server (or group of servers)."""

    def __init__(self, ports: list[int], config: Config, args: argparse.Namespace) -> None:
        self.ports = ports
        self.config = config
        self.args = args
        self.members: list[Member] = []
        self.transports: list = []
        self.retried = 0
        self.phase = Phase([], 0, 0)
        self.next_base = 1_000_000  # each phase numbers its messages from a base of its own

    def new_phase(self, count: int, **kwargs) -> Phase:
        self.phase = Phase(self.members, self.next_base, count, **kwargs)
        self.next_base += 1_000_000
        return self.phase

    async def _connect(self, url: str, attempts: int = 10) -> None:
        """Connect and wait for "joined"; a refused or failed handshake is counted and tried again."""
        for attempt in range(attempts):
            transport = None
            try:
                transport, member = await ws_connect(
                    lambda: Member(self), url, websocket_handshake_timeout=60, max_frame_size=1 << 20)
                await asyncio.wait_for(asyncio.shield(member.joined), 60)
            except (WSError, OSError, ConnectionError, asyncio.TimeoutError):
                if transport is not None:
                    transport.disconnect(graceful=False)
                if attempt == attempts - 1:
                    raise
                self.retried += 1
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            self.transports.append(transport)
            self.members.append(member)
            return

    async def connect_all(self) -> None:
        members, batch = self.args.members, self.args.batch
        urls = [f"ws://127.0.0.1:{self.ports[i % len(self.ports)]}{self.config.member}" for i in range(members)]
        for start in range(0, members, batch):
            await asyncio.gather(*(self._connect(url) for url in urls[start:start + batch]))

    async def close_all(self) -> None:
        for member, transport in zip(self.members, self.transports):
            member.closing = True
            if not member.disconnected:
                transport.send_close(WSCloseCode.OK)

        async def closed(transport) -> None:
            try:
                await asyncio.wait_for(transport.wait_disconnected(), 10)
            except Exception:
                transport.disconnect(graceful=False)

        await asyncio.gather(*(closed(t) for t in self.transports), return_exceptions=True)

    async def request(self, count: int, start: int, timeout: float) -> None:
        """GET the configuration's broadcast URL on the first server; raise unless it answers 200."""
        status = await http_get(self.ports[0], f"{self.config.fanout}?n={count}&start={start}", timeout)
        if status != 200:
            raise RuntimeError(f"broadcast request answered {status}")


async def http_get(port: int, path: str, timeout: float) -> int:
    """A plain HTTP/1.1 GET on a connection of its own; returns the status."""
    return (await http_get_response(port, path, timeout))[0]


async def http_get_response(port: int, path: str, timeout: float) -> tuple[int, bytes]:
    """A plain HTTP/1.1 GET on a connection of its own; returns the status and the body."""
    async def get() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
            data = await reader.read()
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body

    return await asyncio.wait_for(get(), timeout)


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return math.inf
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * fraction), len(ordered) - 1)]


async def throughput(run: Run, meter: CpuMeter) -> dict[str, float]:
    """(a) One request broadcasts --messages messages."""
    args = run.args
    phase = run.new_phase(args.messages)
    meter.start()
    started = time.time()
    await run.request(args.messages, phase.base, args.timeout)
    complete = await phase.wait(args.timeout)
    cpu = meter.stop()
    missing = len(run.members) * args.messages - phase.delivered
    elapsed = (phase.last or time.time()) - started
    return {
        "rate": phase.delivered / elapsed, "p50": percentile(phase.latencies, 0.50) * 1000,
        "p99": percentile(phase.latencies, 0.99) * 1000, "cpu": cpu, "missing": missing if not complete else 0,
        "window": meter.seconds, "client_cpu": meter.client, "us": cpu_us(cpu, meter, phase.delivered),
    }


def cpu_us(cpu: float, meter: CpuMeter, delivered: int) -> float:
    """The server's CPU time per delivery, in µs, over the window *meter* measured (*cpu* % of a core):
    what a delivery costs the server whether or not the load generator kept up."""
    return cpu / 100 * meter.seconds / max(delivered, 1) * 1e6


async def steady(run: Run, meter: CpuMeter) -> dict[str, float]:
    """(b) --rate requests a second for --duration seconds, each broadcasting one message."""
    args = run.args
    count = max(1, round(args.rate * args.duration))
    sent_at: dict[int, float] = {}
    phase = run.new_phase(count, sent_at=sent_at)
    loop = asyncio.get_running_loop()
    failed = 0

    async def one(index: int) -> None:
        nonlocal failed
        try:
            await run.request(1, phase.base + index, args.duration + args.drain + 30)
        except Exception:
            failed += 1

    meter.start()
    begin = loop.time()
    requests = []
    for index in range(count):
        delay = begin + index / args.rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        sent_at[index] = time.time()
        requests.append(asyncio.create_task(one(index)))
    await asyncio.gather(*requests)
    await phase.wait(args.drain)
    cpu = meter.stop()
    expected = count * len(run.members)
    lost = expected - phase.delivered
    latencies = phase.latencies + [math.inf] * lost
    return {"p99": percentile(latencies, 0.99) * 1000, "lost": lost, "expected": expected, "cpu": cpu,
            "failed_requests": failed, "client_cpu": meter.client, "us": cpu_us(cpu, meter, phase.delivered)}


async def burst(run: Run, meter: CpuMeter) -> dict[str, float]:
    """(c) One request broadcasts --burst messages in a loop."""
    args = run.args
    phase = run.new_phase(args.burst, latencies=False)
    meter.start()
    started = time.time()
    request = asyncio.create_task(run.request(args.burst, phase.base, args.burst_timeout))
    await phase.wait(args.burst_timeout, idle=args.burst_idle)
    cpu = meter.stop()
    try:
        await asyncio.wait_for(request, 10)
        answered = True
    except Exception:
        answered = False
    members = run.members
    cut = [m for m in members if m.disconnected]
    codes: dict[str, int] = {}
    for member in cut:
        code = "no close frame" if member.close_code is None else str(member.close_code)
        codes[code] = codes.get(code, 0) + 1
    return {
        "complete": sum(1 for m in members if m.count == args.burst and m.in_order and not m.disconnected),
        "cut": len(cut), "codes": codes, "delivered": phase.delivered, "expected": len(members) * args.burst,
        "out_of_order": sum(1 for m in members if not m.in_order),
        "rate": phase.delivered / max((phase.last or time.time()) - started, 1e-9), "cpu": cpu,
        "answered": answered, "client_cpu": meter.client,
    }


async def session(runs: dict[str, tuple[list[RunningServer], Config]], args: argparse.Namespace,
                  idle_kib: dict[str, int], do_burst: bool) -> dict[str, dict]:
    """Connect every member of every configuration, run the measurements, close; the results by key.

    The rounds of (a), then of (b), go round the configurations (round 1 of
    each, then round 2 of each, ...), so that a change in the machine's speed
    during the run (other virtual machines on the host) weighs on every
    configuration alike rather than on the one measured at that moment.
    """
    measured = {key: (Run([s.port for s in servers], config, args), CpuMeter([s.process.pid for s in servers]))
                for key, (servers, config) in runs.items()}
    results: dict[str, dict] = {key: {} for key in runs}
    try:
        for key, (run, _) in measured.items():
            await run.connect_all()
        await asyncio.sleep(1)
        for key, (servers, _) in runs.items():
            results[key]["kib"] = (sum(rss_kib(s.process.pid) for s in servers) - idle_kib[key]) / args.members
        if do_burst:
            for key, (run, meter) in measured.items():
                results[key]["burst"] = await burst(run, meter)
            return results
        for what, measurement in (("throughput", throughput), ("steady", steady)):
            for key in measured:
                results[key][what] = []
            for number in range(args.rounds):
                for key, (run, meter) in measured.items():
                    results[key][what].append(await measurement(run, meter))
                    report(run.config, f"{what} round {number + 1}", results[key][what][-1])
                    await asyncio.sleep(0.5)
    finally:
        for key, (run, _) in measured.items():
            results[key]["retried"] = run.retried
            await run.close_all()
    return results


def report(config: Config, what: str, values: dict) -> None:
    shown = ", ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
    print(f"  {config.key} {what}: {shown}", file=sys.stderr, flush=True)


# -- running the servers ---------------------------------------------------------------------------


def start_servers(stack: ExitStack, config: Config, args: argparse.Namespace, env: dict[str, str],
                  max_seconds: int) -> list[RunningServer]:
    env = {**config.env, **env}
    if config.processes > 1:
        redis = stack.enter_context(start_redis())
        if args.server_cpu is not None:
            pin(redis.process.pid, args.server_cpu)
        env["BENCH_REDIS_URL"] = redis.url
    return [
        stack.enter_context(start_server(config.kind, env=env, project=config.project, max_seconds=max_seconds))
        for _ in range(config.processes)
    ]


def measure(configs: list[Config], args: argparse.Namespace) -> dict[str, dict]:
    """Every measurement of *configs*, by key: (a) and (b) with every configuration's server up
    (their rounds interleaved, see :func:`session`), (c) on a fresh server each, one at a time."""
    per_round = args.timeout + args.duration + args.drain + args.duration + 30
    max_seconds = int(300 + args.rounds * per_round * len(configs))
    results: dict[str, dict] = {}
    with ExitStack() as stack:
        runs = {config.key: (start_servers(stack, config, args, {}, max_seconds), config) for config in configs}
        idle = {key: sum(rss_kib(s.process.pid) for s in servers) for key, (servers, _) in runs.items()}
        for key, (servers, config) in runs.items():
            print(f"  {key}: {config.stack}, {config.view}, {config.server}", file=sys.stderr, flush=True)
        results = run_client(session(runs, args, idle, do_burst=False))
    for key, (servers, _) in runs.items():  # after stopping
        results[key]["tracebacks"] = sum(s.log_text().count("Traceback") for s in servers)
        results[key]["logs"] = [str(s.log_path) for s in servers]
    for config in configs if args.burst else []:
        result, servers = results[config.key], []
        try:
            with ExitStack() as stack:
                servers = start_servers(stack, config, args, {"BENCH_DEFAULTS": "1"},
                                        int(300 + args.burst_timeout))
                idle = {config.key: sum(rss_kib(s.process.pid) for s in servers)}
                burst_result = run_client(session({config.key: (servers, config)}, args, idle, do_burst=True))
                report(config, "burst", burst_result[config.key]["burst"])
            result["burst"] = burst_result[config.key]["burst"]
            result["retried"] += burst_result[config.key]["retried"]
        except Exception as exc:  # (a) and (b) still count
            result["burst"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            print(f"  {config.key} burst failed: {exc!r}", file=sys.stderr, flush=True)
        result["tracebacks"] += sum(s.log_text().count("Traceback") for s in servers)
        result["logs"] += [str(s.log_path) for s in servers]
    for key, result in results.items():
        if result["tracebacks"]:
            print(f"  {key}: {result['tracebacks']} tracebacks in {' '.join(result['logs'])}", file=sys.stderr)
    return results


# -- the report ------------------------------------------------------------------------------------


def summarise(result: dict) -> dict:
    t, s = result["throughput"], result["steady"]
    summary = {
        "rate": statistics.median(r["rate"] for r in t),
        "p50": statistics.median(r["p50"] for r in t),
        "p99": statistics.median(r["p99"] for r in t),
        "cpu": statistics.median(r["cpu"] for r in t),
        "us": statistics.median(r["us"] for r in t),
        "steady_us": statistics.median(r["us"] for r in s),
        "window": min(r["window"] for r in t),
        "client_cpu": max(r["client_cpu"] for r in [*t, *s, *([result["burst"]] if "burst" in result else [])]),
        "missing": sum(r["missing"] for r in t),
        "steady_p99": statistics.median(r["p99"] for r in s),
        "steady_lost": statistics.median(r["lost"] for r in s),
        "steady_expected": s[0]["expected"],
        "steady_cpu": statistics.median(r["cpu"] for r in s),
        "failed_requests": sum(r["failed_requests"] for r in s),
        "kib": result["kib"],
        "retried": result["retried"],
        "tracebacks": result["tracebacks"],
        "burst": result.get("burst"),
    }
    return summary


def ms(value: float) -> str:
    if math.isinf(value):
        return "∞"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def burst_cells(burst: dict | None, members: int) -> tuple[str, str]:
    if burst is None:
        return "", ""
    if "error" in burst:
        return f"failed: {burst['error']}", ""
    complete = f"{burst['complete']:,} / {members:,}"
    notes = []
    if burst["delivered"] < burst["expected"]:
        notes.append(f"{burst['delivered']:,} of {burst['expected']:,} delivered")
    if burst["out_of_order"]:
        notes.append(f"{burst['out_of_order']:,} out of order")
    if not burst["answered"]:
        notes.append("request unanswered")
    if notes:
        complete += f" ({'; '.join(notes)})"
    cut = f"{burst['cut']:,}"
    if burst["codes"]:
        cut += " (" + ", ".join(f"{code}: {n}" for code, n in sorted(burst["codes"].items())) + ")"
    return complete, cut


def print_table(args: argparse.Namespace, keys: list[str], results: dict[str, dict], failures: dict[str, str],
                threads: int) -> None:
    rate = f"{args.rate:g}/s"
    expected = max(1, round(args.rate * args.duration)) * args.members
    print(f"| stack | view | server | deliveries/s | p50 ms | p99 ms | server CPU % | server CPU µs per delivery "
          f"| {rate}: p99 ms | {rate}: lost of {expected:,} "
          f"| {rate}: server CPU % | {rate}: server CPU µs per delivery | burst {args.burst}: members with all, in order | burst: members cut "
          "| server KiB per member | handshakes retried | server tracebacks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key in keys:
        config = BY_KEY[key]
        server = config.server
        if "gthread" in server:
            server += f" ({threads:,} threads)"
        start = f"| {config.stack} | {config.view} | {server} |"
        if key in failures:
            print(f"{start} failed: {failures[key]} |" + " |" * 13)
            continue
        r = results[key]
        complete, cut = burst_cells(r["burst"], args.members)
        missing = f" ({r['missing']:,} missing)" if r["missing"] else ""
        print(f"{start} {r['rate']:,.0f}{missing} | {ms(r['p50'])} | {ms(r['p99'])} | {r['cpu']:.0f} "
              f"| {r['us']:.1f} | {ms(r['steady_p99'])} | {r['steady_lost']:,.0f} | {r['steady_cpu']:.0f} "
              f"| {r['steady_us']:.1f} | {complete} | {cut} "
              f"| {r['kib']:.1f} | {r['retried']} | {r['tracebacks']} |")
    ratios = [(label, a, b) for label, a, b in RATIOS if a in results and b in results]
    if ratios:
        print(f"\n| ratio | deliveries/s | deliveries per server CPU second (a) | {rate}: the same (b) | p99 ms "
              f"| {rate}: p99 ms | server KiB per member |")
        print("|---|---|---|---|---|---|---|")
        for label, mine, theirs in ratios:
            d, o = results[mine], results[theirs]
            print(f"| {label} | **{div(d['rate'], o['rate'])}** | {div(o['us'], d['us'])} "
                  f"| {div(o['steady_us'], d['steady_us'])} | {div(d['p99'], o['p99'])} "
                  f"| {div(d['steady_p99'], o['steady_p99'])} | {div(d['kib'], o['kib'])} |")
    notes = []
    for key in keys:
        r = results.get(key)
        if r and r["failed_requests"]:
            notes.append(f"{key}: {r['failed_requests']} steady-rate broadcast requests failed")
    busy = [key for key in keys if key in results and results[key]["client_cpu"] > 80]
    if busy:
        notes.append(f"The load generator used over 80 % of its core in a window of {', '.join(busy)}: "
                     "there, it may have been the bottleneck.")
    short = [key for key in keys if key in results and results[key]["window"] < 2]
    if short:
        ticks = 1000 // os.sysconf("SC_CLK_TCK")
        notes.append(f"Server CPU % of (a) is coarse for {', '.join(short)}: measured over less than 2 s, "
                     f"and the kernel counts CPU time in {ticks} ms ticks.")
    for note in notes:
        print(f"\n{note}")


def div(mine: float, theirs: float) -> str:
    if theirs == 0 or math.isinf(theirs) or math.isinf(mine):
        return "n/a"
    return f"{mine / theirs:.2f}×"


def versions() -> str:
    names = ["Django", "gunicorn", "gevent", "uvicorn", "wsproto", "channels", "channels-redis", "flask",
             "flask-sock", "simple-websocket", "picows"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    return f"Python {platform.python_version()}, " + ", ".join(found)


def parse_keys(text: str) -> list[str]:
    keys: list[str] = []
    for part in text.split(","):
        part = part.strip()
        names = {"default": DEFAULT_KEYS, "all": [c.key for c in CONFIGS], "metrics": METRICS_KEYS}.get(part, [part])
        for name in names:
            if name not in BY_KEY:
                raise SystemExit(f"unknown configuration {name!r}; known: {', '.join(BY_KEY)}, default, all, metrics")
            if name not in keys:
                keys.append(name)
    return keys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=20, help="(a) messages one request broadcasts")
    parser.add_argument("--rate", type=float, default=20, help="(b) broadcasts per second")
    parser.add_argument("--duration", type=float, default=10, help="(b) seconds of steady rate")
    parser.add_argument("--drain", type=float, default=5, help="(b) seconds deliveries may take after the last answer")
    parser.add_argument("--burst", type=int, default=2000, help="(c) messages of the burst; 0 skips it")
    parser.add_argument("--burst-timeout", type=float, default=300, help="(c) seconds the burst may take")
    parser.add_argument("--burst-idle", type=float, default=15,
                        help="(c) the burst is over when no delivery arrived for this long")
    parser.add_argument("--rounds", type=int, default=3, help="(a) and (b): median of this many")
    parser.add_argument("--timeout", type=float, default=120, help="(a) seconds the deliveries may take")
    parser.add_argument("--batch", type=int, default=20, help="members connecting at once")
    parser.add_argument("--configs", default="default",
                        help=f"comma-separated: {', '.join(BY_KEY)}; 'default' = {','.join(DEFAULT_KEYS)}; "
                             "'all' adds the Redis pair")
    parser.add_argument("--server-cpu", type=int, default=0, help="core the servers are pinned to")
    parser.add_argument("--client-cpu", type=int, default=1, help="core the load generator is pinned to")
    parser.add_argument("--no-pin", action="store_true", help="pin nothing")
    parser.add_argument("--client-loop", choices=["uvloop", "asyncio"], default=CLIENT_LOOP["name"],
                        help="the load generator's event loop")
    args = parser.parse_args()
    if args.client_loop == "uvloop" and uvloop is None:
        raise SystemExit("--client-loop uvloop: uvloop is not installed")
    CLIENT_LOOP["name"] = args.client_loop
    keys = parse_keys(args.configs)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the servers inherit it
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.no_pin or not shutil.which("taskset") or {args.server_cpu, args.client_cpu} - os.sched_getaffinity(0):
        pinning = "nothing pinned: the load generator shares the cores with the servers"
        args.server_cpu = None
    else:
        os.sched_setaffinity(0, {args.client_cpu})
        pinning = f"servers pinned to CPU {args.server_cpu}, the load generator to CPU {args.client_cpu}"
    threads, connections = register_servers(args.members, args.server_cpu)

    burst = f"(c) a burst of {args.burst} broadcasts from one loop, each library's defaults" if args.burst else ""
    print(f"Fan-out to {args.members:,} members: (a) one request broadcasting {args.messages} messages, median "
          f"of {args.rounds}; (b) {args.rate:g} broadcasts/s for {args.duration:g} s, median of {args.rounds}; {burst}")
    print(f"\n```bash\nscripts/bench.sh fanout {shlex.join(sys.argv[1:])}\n```\n")
    print(f"{pinning}; gunicorn --threads {threads} --worker-connections {connections}; "
          "uvicorn --ws wsproto --loop asyncio; "
          f"load generator: picows on {args.client_loop}")
    print(versions())
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n", flush=True)

    results: dict[str, dict] = {}
    failures: dict[str, str] = {}
    try:
        results = {key: summarise(result) for key, result in measure([BY_KEY[key] for key in keys], args).items()}
    except Exception as exc:  # reported, with whatever the table can still show
        failures = {key: f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}" for key in keys}
        print(f"  failed: {exc!r}", file=sys.stderr, flush=True)
    print_table(args, keys, results, failures, threads)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

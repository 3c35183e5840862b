"""Reconnect storm: N ``dwebsocket.v1`` members of one group cut at once while broadcasts go on.

    python -m bench.storm [--members 1000] [--rate 20] [--steady 3] [--after 3] [--down 0]
                          [--configs uvicorn,redis,...] [--history-size N]

The claim measured: every member of a group loses its connection at the same
moment (a network drop), all reconnect at once with their resume, and every
one recovers what it missed: each broadcast exactly once, in order, with
nothing lost; and how long until the last of them is whole again.

Configurations (``--configs``, comma-separated keys; ``default`` = uvicorn,redis,
``all`` = every one):

===================  ========================================================================
uvicorn              one uvicorn process, memory broker, async member view (bench/project
                     ``/member/``: ``await ws.join("bench"); await ws.wait()``); the broadcasts
                     from the async view ``/fanout/dwebsocket/async/``
redis                2 uvicorn processes sharing a redis-server (dwebsocket's Redis broker),
                     members split evenly; on reconnect each member goes to the *other*
                     process, so recovery crosses processes; the broadcasts alternate
                     between the two processes
gthread              one gunicorn gthread process, memory broker, sync member view
                     (``/member/sync/``), broadcasts from the sync view
*-nohistory          the same with group history off (``BENCH_HISTORY_SIZE=0``): what members
                     lose without recovery (the contrast: lost must be > 0)
===================  ========================================================================

``--history-size N`` sets ``WEBSOCKET_HISTORY_SIZE`` (``BENCH_HISTORY_SIZE``) for
every configuration that does not turn it off (default: the project's, 100).

How: every server process is pinned to one core (``taskset -c --server-cpu``,
its redis-server too) and this process, the load generator, to another
(``--client-cpu``), as bench/fanout.py does. The load generator holds every
member in one event loop (uvloop when installed) with picows; a member speaks
``dwebsocket.v1`` as ``dwebsocket.js`` does (tests/test_delivery.py's
``SessionClient`` is the model): it offers the subprotocol, splits each message
into its header and payload, keeps its connection ids from the welcomes and,
per group, the position of the last broadcast (``{"g", "p"}`` headers) or
``joined``; on reconnect it sends ``?dwebsocket.v1=<{"p": positions, "x": ids}>``.

A paced broadcaster (a coroutine of the load generator) sends ``--rate`` HTTP
requests a second to the project's broadcast view, each broadcasting one
numbered message to group "bench", from before the cut until the end,
whether or not the earlier requests were answered (so the server may make
them in another order than their numbers: order is checked by position).
Its requests go to the same servers as the members, so while the storm
keeps a server busy they wait in its queue like the handshakes: the slowest
request is reported. Timeline:

1. members connect ``--batch`` at a time, each waits for its ``joined``;
2. the broadcaster starts; ``--steady`` seconds of steady broadcasting;
3. the cut: every member's TCP connection is aborted at once (no close frame,
   no FIN handshake wait: a network drop), and every member reconnects
   after a random delay of up to ``--jitter`` s (dwebsocket.js: 250 ms),
   plus ``--down`` s (default 0: at once) for a longer outage;
   a failed handshake is tried again (counted);
4. a member is *whole* again once it got its ``joined`` and holds, without a
   gap, every broadcast up to the last whose request (and every earlier one)
   had been answered when the ``joined`` arrived, and it then loses nothing
   to the end; measured from the cut (p50, p99, max over the members; a
   member never whole counts as ∞);
5. ``--after`` seconds more of broadcasting once the last member is whole
   (or ``--recover-timeout`` passed), then the broadcaster stops, ``--drain``
   seconds for the last deliveries, and each member's record is checked: every
   broadcast number from the first (the broadcaster starts once every member
   has joined) to the last made, exactly once, and in position order (a
   broadcast whose position's seq is not above the one before it is out of
   order; without history there are no positions, and nothing to check):
   lost, duplicated and out of order are counted over all members, and lost
   again for the members whose reconnect's ``joined`` said ``r: true`` (the
   guarantee: must be 0 whatever the history size).

Also reported: the ``r`` of each reconnect's ``joined`` (recovered true / false /
null), the broadcasts replayed before it, broadcasts lost at a later position
than the first one a reconnect got (must be 0: what a member told ``r: false``
loses is the oldest of what it missed), the server CPU % (user + system of its processes, redis-server
included, 100 % = one core) over the recovery window (from the cut to the last
member whole) and over the steady window before it, handshakes tried again,
broadcast requests that failed, and tracebacks in the server logs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shlex
import shutil
import sys
import time
import traceback
import urllib.parse
from contextlib import ExitStack
from dataclasses import dataclass, field

from .fanout import CLIENT_LOOP, CpuMeter, http_get, percentile, pin, register_servers, run_client, uvloop
from tests.servers import RunningServer, start_redis, start_server

from picows import WSCloseCode, WSError, WSListener, WSMsgType, ws_connect  # noqa: E402

PROTOCOL = "dwebsocket.v1"
GROUP = "bench"


@dataclass(frozen=True)
class Config:
    key: str
    description: str
    kind: str  # a tests.servers.start_server kind (registered by bench.fanout.register_servers)
    member: str  # WebSocket path of a member
    broadcast: str  # HTTP path that broadcasts ?n= messages numbered from ?start=
    processes: int = 1  # more than one: that many servers share a redis-server
    env: dict[str, str] = field(default_factory=dict)


OFF = {"BENCH_HISTORY_SIZE": "0"}
CONFIGS = [
    Config("uvicorn", "1 × uvicorn, memory broker, async view", "fanout-uvicorn", "/member/",
           "/fanout/dwebsocket/async/"),
    Config("redis", "2 × uvicorn + redis-server, async view, reconnect to the other process", "fanout-uvicorn",
           "/member/", "/fanout/dwebsocket/async/", processes=2),
    Config("gthread", "1 × gunicorn gthread, memory broker, sync view", "fanout-gthread", "/member/sync/",
           "/fanout/dwebsocket/"),
    Config("uvicorn-nohistory", "1 × uvicorn, memory broker, history off", "fanout-uvicorn", "/member/",
           "/fanout/dwebsocket/async/", env=OFF),
    Config("redis-nohistory", "2 × uvicorn + redis-server, history off", "fanout-uvicorn", "/member/",
           "/fanout/dwebsocket/async/", processes=2, env=OFF),
    Config("gthread-nohistory", "1 × gunicorn gthread, history off", "fanout-gthread", "/member/sync/",
           "/fanout/dwebsocket/", env=OFF),
]
BY_KEY = {c.key: c for c in CONFIGS}
DEFAULT_KEYS = ["uvicorn", "redis"]


# -- a dwebsocket.v1 member -------------------------------------------------------------------------


def split(text: str) -> tuple[dict | None, str]:
    """A dwebsocket.v1 message: (its header, or None when empty; its payload)."""
    newline = text.index("\n")
    header = text[:newline]
    return (json.loads(header) if header else None), text[newline + 1:]


class Member:
    """One page: its record of broadcasts over every connection it makes, and what dwebsocket.js keeps."""

    def __init__(self, storm: Storm, index: int) -> None:
        self.storm, self.index = storm, index
        self.positions: dict[str, str] = {}
        self.ids: list[str] = []
        self.transport = None
        self.listener: Listener | None = None
        self.connection = 0  # how many connections it opened
        self.got: set[int] = set()
        self.replayed = 0  # broadcasts the reconnect got before its joined: the history's
        self.first_after: int | None = None  # the first broadcast number the reconnect got
        self.last_seq = -1  # seq of the last broadcast position it got
        self.duplicated = self.out_of_order = self.unexpected = 0
        self.contiguous = -1  # every broadcast from number 0 to this one arrived
        self.target: int | None = None  # after the reconnect's joined: it is whole once contiguous >= this
        self.welcome_at: float | None = None  # reconnect's welcome, seconds after the cut
        self.joined_at: float | None = None  # reconnect's joined, seconds after the cut
        self.whole_at: float | None = None  # seconds after the cut
        self.recovered: object = "none"  # the reconnect's joined "r"
        self.joined = asyncio.get_running_loop().create_future()

    def url(self, server: int) -> str:
        resume = {k: v for k, v in (("p", self.positions), ("x", self.ids[-5:])) if v}
        query = "?" + urllib.parse.urlencode({PROTOCOL: json.dumps(resume)}) if resume else ""
        return f"ws://127.0.0.1:{self.storm.ports[server]}{self.storm.config.member}{query}"

    # what arrives on the current connection

    def on_message(self, text: str) -> None:
        header, payload = split(text)
        if header is None:
            return  # the view's own plain "joined"
        kind = header.get("t")
        if kind == "welcome":
            self.ids.append(header["id"])
            if self.connection > 1 and self.welcome_at is None:
                self.welcome_at = self.storm.since_cut()
        elif kind == "joined" and header.get("g") == GROUP:
            if header.get("p"):
                self.positions[GROUP] = header["p"]
            if self.connection == 1:
                if not self.joined.done():
                    self.joined.set_result(None)
            elif self.joined_at is None:
                self.joined_at = self.storm.since_cut()
                self.recovered = header.get("r")
                self.target = self.storm.broadcaster.made_up_to()
                self._check_whole()
        elif kind == "left":
            self.positions.pop(header.get("g"), None)
        elif kind is None and header.get("g") == GROUP:
            if header.get("p"):
                self.positions[GROUP] = header["p"]
            self.deliver(int(payload.split(" ", 1)[0]), header.get("p"))

    def deliver(self, number: int, position: str | None) -> None:
        if not self.joined.done():
            self.unexpected += 1  # a broadcast before the first joined: cannot happen
            return
        if number in self.got:
            self.duplicated += 1
            return
        if position is not None:
            seq = int(position.rpartition(":")[2])
            if self.storm.seqs.setdefault(number, seq) != seq:
                self.storm.conflicts += 1  # two members got one broadcast at different positions
            if seq <= self.last_seq:
                self.out_of_order += 1
            self.last_seq = seq
        self.got.add(number)
        if self.connection > 1:
            if self.first_after is None:
                self.first_after = number
            if self.joined_at is None:
                self.replayed += 1
        failed = self.storm.broadcaster.failed  # a failed request may not have broadcast: not waited for
        while self.contiguous + 1 in self.got or self.contiguous + 1 in failed:
            self.contiguous += 1
        self._check_whole()

    def _check_whole(self) -> None:
        if self.whole_at is None and self.target is not None and self.contiguous >= self.target:
            self.whole_at = self.storm.since_cut()
            self.storm.one_whole()

    # connecting

    async def connect(self, server: int, attempts: int = 10) -> None:
        """Open a connection to *server* (its index) with the resume; a failed handshake is tried again."""
        for attempt in range(attempts):
            self.connection += 1
            transport = None
            try:
                transport, listener = await ws_connect(
                    lambda: Listener(self), self.url(server), websocket_handshake_timeout=60,
                    max_frame_size=1 << 20, extra_headers={"Sec-WebSocket-Protocol": PROTOCOL})
                agreed = transport.response.headers.get("sec-websocket-protocol")
                if agreed != PROTOCOL:
                    raise RuntimeError(f"the server answered subprotocol {agreed!r}, not {PROTOCOL}")
                self.transport, self.listener = transport, listener
                return
            except (WSError, OSError, ConnectionError, asyncio.TimeoutError):
                if transport is not None:
                    listener.cut = True
                    transport.disconnect(graceful=False)
                if attempt == attempts - 1:
                    raise
                self.connection -= 1
                self.storm.retried += 1
                await asyncio.sleep(min(0.25 * 2 ** attempt, 4) * random.random())

    def cut(self) -> None:
        """The network drop: abort the TCP connection (no close frame); what it still had is not read."""
        self.listener.cut = True
        self.transport.disconnect(graceful=False)

    def holes(self, last: int, failed: set[int]) -> int:
        """Lost broadcasts at a later position than the first one the reconnect got: a gap within what it
        was sent (must be 0: what a member told ``r: false`` may lose is the oldest of what it missed).
        By position, as other members got them; with history off there are none, and this is 0."""
        seqs = self.storm.seqs
        if self.first_after is None or self.first_after not in seqs:
            return 0
        after = seqs[self.first_after]
        return sum(1 for n in range(last + 1)
                   if n not in self.got and n not in failed and seqs.get(n, -1) > after)

    def lost(self, last: int, failed: set[int]) -> int:
        """Broadcasts 0 .. *last* it never got (the broadcaster starts once every member has joined)."""
        return sum(1 for n in range(last + 1) if n not in self.got and n not in failed)


class Listener(WSListener):
    """One connection of a member: hands its text messages on, unless the member cut it."""

    def __init__(self, member: Member) -> None:
        super().__init__()
        self.member = member
        self.cut = False
        self.close_code: int | None = None

    def on_ws_frame(self, transport, frame) -> None:
        if self.cut:
            return
        if frame.msg_type == WSMsgType.TEXT:
            self.member.on_message(frame.get_payload_as_utf8_text())
        elif frame.msg_type == WSMsgType.CLOSE:
            payload = frame.get_payload_as_bytes()
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()

    def on_ws_disconnected(self, transport) -> None:
        member = self.member
        if not self.cut and not member.storm.closing:
            member.storm.dropped += 1  # closed by the server: not part of the plan
            if not member.joined.done():
                member.joined.set_exception(ConnectionError(f"closed before joining ({self.close_code})"))


# -- the broadcaster --------------------------------------------------------------------------------


class Broadcaster:
    """--rate HTTP requests a second, each broadcasting the next number, whether or not the earlier ones
    were answered (so they can be made in another order than their numbers: order is checked by position);
    alternates between the servers."""

    def __init__(self, storm: Storm, rate: float) -> None:
        self.storm, self.rate = storm, rate
        self.next = 0
        self.over: set[int] = set()
        self.failed: set[int] = set()
        self.made = -1  # every request up to this number is over (answered, or failed)
        self.slowest = 0.0  # the longest request, s
        self.stopping = False
        self.requests: list[asyncio.Task] = []

    def made_up_to(self) -> int:
        """The highest number such that every broadcast up to it was made."""
        return self.made

    async def _one(self, number: int) -> None:
        ports, loop = self.storm.ports, asyncio.get_running_loop()
        sent = loop.time()
        try:
            status = await http_get(ports[number % len(ports)], f"{self.storm.config.broadcast}?n=1&start={number}", 30)
            if status != 200:
                raise RuntimeError(status)
        except Exception:
            self.failed.add(number)
        self.slowest = max(self.slowest, loop.time() - sent)
        self.over.add(number)
        while self.made + 1 in self.over:
            self.made += 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        begin = loop.time()
        while not self.stopping:
            delay = begin + self.next / self.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.requests.append(asyncio.create_task(self._one(self.next)))
            self.next += 1
        await asyncio.gather(*self.requests)


# -- one storm --------------------------------------------------------------------------------------


class Storm:
    def __init__(self, ports: list[int], config: Config, args: argparse.Namespace) -> None:
        self.ports, self.config, self.args = ports, config, args
        self.members: list[Member] = []
        self.seqs: dict[int, int] = {}  # broadcast number -> the seq of its position
        self.conflicts = 0
        self.retried = self.dropped = 0
        self.closing = False
        self.cut_at = 0.0
        self.whole = 0
        self.all_whole = asyncio.get_running_loop().create_future()
        self.broadcaster = Broadcaster(self, args.rate)

    def since_cut(self) -> float:
        return time.perf_counter() - self.cut_at

    def one_whole(self) -> None:
        self.whole += 1
        if self.whole == len(self.members) and not self.all_whole.done():
            self.all_whole.set_result(None)

    async def wait_whole(self, timeout: float, idle: float) -> None:
        """Until every member is whole again, *timeout* passes, or every one got its joined and
        none became whole for *idle* seconds (history off: the rest never will)."""
        deadline = time.perf_counter() + timeout
        seen, since = -1, time.perf_counter()
        while not self.all_whole.done() and time.perf_counter() < deadline:
            now = time.perf_counter()
            if self.whole != seen:
                seen, since = self.whole, now
            elif now - since >= idle and all(m.joined_at is not None for m in self.members):
                return
            await asyncio.wait([self.all_whole], timeout=0.1)

    async def connect_all(self) -> None:
        n = len(self.ports)
        self.members = [Member(self, i) for i in range(self.args.members)]
        for start in range(0, len(self.members), self.args.batch):
            batch = self.members[start:start + self.args.batch]
            await asyncio.gather(*(m.connect(m.index % n) for m in batch))
            await asyncio.wait_for(asyncio.gather(*(m.joined for m in batch)), 60)

    async def reconnect_all(self) -> None:
        n = len(self.ports)

        async def one(member: Member) -> None:
            await asyncio.sleep(self.args.down + random.uniform(0, self.args.jitter))
            await member.connect((member.index + 1) % n)  # the other process, when there are two

        results = await asyncio.gather(*(one(m) for m in self.members), return_exceptions=True)
        self.reconnect_failed = sum(1 for r in results if isinstance(r, BaseException))

    async def close_all(self) -> None:
        self.closing = True
        transports = [m.transport for m in self.members if m.transport is not None]
        for transport in transports:
            if not transport.is_disconnected:
                try:
                    transport.send_close(WSCloseCode.OK)
                except Exception:
                    pass

        async def closed(transport) -> None:
            try:
                await asyncio.wait_for(transport.wait_disconnected(), 10)
            except Exception:
                transport.disconnect(graceful=False)

        await asyncio.gather(*(closed(t) for t in transports), return_exceptions=True)


async def storm_session(servers: list[RunningServer], config: Config, args: argparse.Namespace,
                        server_pids: list[int]) -> dict:
    storm = Storm([s.port for s in servers], config, args)
    meter = CpuMeter(server_pids)
    result: dict = {}
    broadcasting = None
    try:
        started = time.perf_counter()
        await storm.connect_all()
        result["connect_s"] = time.perf_counter() - started
        print(f"  {config.key}: {len(storm.members)} members joined in {result['connect_s']:.1f} s",
              file=sys.stderr, flush=True)
        broadcasting = asyncio.create_task(storm.broadcaster.run())
        meter.start()
        await asyncio.sleep(args.steady)
        result["steady_cpu"] = meter.stop()
        if not storm.seqs and config.env.get("BENCH_HISTORY_SIZE") != "0" and args.history_size != 0:
            print(f"  {config.key}: no positions seen before the cut", file=sys.stderr, flush=True)

        # the cut: every connection aborted in the same loop iteration
        meter.start()
        storm.cut_at = time.perf_counter()
        for member in storm.members:
            member.cut()
        before = storm.broadcaster.made_up_to()
        reconnecting = asyncio.create_task(storm.reconnect_all())
        await storm.wait_whole(args.recover_timeout, idle=5)
        result["recovery_cpu"] = meter.stop()
        result["recovery_window"] = meter.seconds
        result["client_cpu"] = meter.client
        await reconnecting
        await asyncio.sleep(args.after)
        storm.broadcaster.stopping = True
        await broadcasting
        broadcasting = None
        await asyncio.sleep(args.drain)
        result["broadcasts_at_cut"] = before + 1
    finally:
        if broadcasting is not None:
            storm.broadcaster.stopping = True
            await asyncio.gather(broadcasting, return_exceptions=True)
        await storm.close_all()

    b = storm.broadcaster
    last = b.next - 1
    members = storm.members
    # Whole: from its reconnect's joined on, it had every broadcast made before, and then lost none:
    # a member that lost one is never whole (history off: the broadcasts made while it was away).
    whole = [m.whole_at if m.whole_at is not None and not m.lost(last, b.failed) and not m.duplicated
             else float("inf") for m in members]
    welcomed = [m.welcome_at for m in members if m.welcome_at is not None]
    joined = [m.joined_at for m in members if m.joined_at is not None]
    result.update({
        "members": len(members),
        "broadcasts": b.next,
        "failed_requests": len(b.failed),
        "slowest_request": b.slowest,
        "whole": sum(1 for w in whole if w != float("inf")),
        "replayed": sum(m.replayed for m in members),
        "replayed_max": max(m.replayed for m in members),
        "whole_p50": percentile(whole, 0.50), "whole_p99": percentile(whole, 0.99), "whole_max": max(whole),
        "welcome_max": max(welcomed) if welcomed else float("inf"),
        "joined_max": max(joined) if joined else float("inf"),
        "lost": sum(m.lost(last, b.failed) for m in members),
        "members_losing": sum(1 for m in members if m.lost(last, b.failed)),
        # the guarantee: a member whose joined said r: true lost nothing
        "lost_told_recovered": sum(m.lost(last, b.failed) for m in members if m.recovered is True),
        "duplicated": sum(m.duplicated for m in members),
        "holes": sum(m.holes(last, b.failed) for m in members),
        "out_of_order": sum(m.out_of_order for m in members),
        "unexpected": sum(m.unexpected for m in members),
        "recovered_true": sum(1 for m in members if m.recovered is True),
        "recovered_false": sum(1 for m in members if m.recovered is False),
        "recovered_null": sum(1 for m in members if m.recovered is None),
        "no_joined": sum(1 for m in members if m.recovered == "none"),
        "conflicts": storm.conflicts,
        "positions": bool(storm.seqs),
        "retried": storm.retried,
        "dropped": storm.dropped,
        "reconnect_failed": storm.reconnect_failed,
    })
    return result


# -- running it -------------------------------------------------------------------------------------


def measure(config: Config, args: argparse.Namespace) -> dict:
    env = dict(config.env)
    if args.history_size is not None and env.get("BENCH_HISTORY_SIZE") != "0":
        env["BENCH_HISTORY_SIZE"] = str(args.history_size)
    max_seconds = int(120 + args.members / 10 + args.steady + args.recover_timeout + args.after + args.drain)
    with ExitStack() as stack:
        pids: list[int] = []
        if config.processes > 1:
            redis = stack.enter_context(start_redis())
            if args.server_cpu is not None:
                pin(redis.process.pid, args.server_cpu)
            env["BENCH_REDIS_URL"] = redis.url
            pids.append(redis.process.pid)
        servers = [stack.enter_context(start_server(config.kind, env=env, project="bench", max_seconds=max_seconds))
                   for _ in range(config.processes)]
        pids += [s.process.pid for s in servers]
        result = run_client(storm_session(servers, config, args, pids))
    result["tracebacks"] = sum(s.log_text().count("Traceback") for s in servers)
    if result["tracebacks"]:
        print(f"  {config.key}: {result['tracebacks']} tracebacks in {' '.join(str(s.log_path) for s in servers)}",
              file=sys.stderr)
    result["history"] = env.get("BENCH_HISTORY_SIZE", "100")
    return result


def seconds(value: float) -> str:
    return "∞" if value == float("inf") else f"{value:.2f}"


def print_table(keys: list[str], results: dict[str, dict], failures: dict[str, str]) -> None:
    print("| configuration | history | members | broadcasts | whole again: p50 s | p99 s | max s "
          "| lost | of which by members told r: true | duplicated | out of order | recovered true / false "
          "| server CPU %: steady / recovery "
          "| handshakes retried | tracebacks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key in keys:
        config = BY_KEY[key]
        if key in failures:
            print(f"| {config.key}: {config.description} | | failed: {failures[key]} |" + " |" * 12)
            continue
        r = results[key]
        never = r["members"] - r["whole"]
        whole_max = seconds(r["whole_max"]) + (f" ({never:,} never)" if never else "")
        lost = f"{r['lost']:,}" + (f" ({r['members_losing']:,} members)" if r["lost"] else "")
        recovered = f"{r['recovered_true']:,} / {r['recovered_false']:,}"
        if r["recovered_null"]:
            recovered += f" ({r['recovered_null']:,} null)"
        if r["no_joined"]:
            recovered += f" ({r['no_joined']:,} no joined)"
        print(f"| {config.key}: {config.description} | {r['history']} | {r['members']:,} | {r['broadcasts']:,} "
              f"| {seconds(r['whole_p50'])} | {seconds(r['whole_p99'])} | {whole_max} | {lost} "
              f"| {r['lost_told_recovered']:,} "
              f"| {r['duplicated']:,} | {r['out_of_order']:,} | {recovered} "
              f"| {r['steady_cpu']:.0f} / {r['recovery_cpu']:.0f} | {r['retried']:,} | {r['tracebacks']} |")
    for key in keys:
        r = results.get(key)
        if not r:
            continue
        notes = [f"connect {r['connect_s']:.1f} s", f"{r['broadcasts_at_cut']} broadcasts made before the cut", f"last welcome {seconds(r['welcome_max'])} s",
                 f"last joined {seconds(r['joined_max'])} s after the cut",
                 f"recovery window {r['recovery_window']:.1f} s", f"load generator CPU {r['client_cpu']:.0f} %"]
        notes.append(f"broadcasts replayed before joined {r['replayed']:,} (at most {r['replayed_max']} to one member)")
        notes.append(f"slowest broadcast request {r['slowest_request']:.2f} s")
        if r["failed_requests"]:
            notes.append(f"{r['failed_requests']} broadcast requests failed")
        if r["dropped"]:
            notes.append(f"{r['dropped']} connections closed by the server")
        if r["reconnect_failed"]:
            notes.append(f"{r['reconnect_failed']} members could not reconnect")
        if r["unexpected"]:
            notes.append(f"{r['unexpected']} broadcasts before a first joined")
        if r["positions"]:
            notes.append(f"lost at a later position than the reconnect's first broadcast {r['holes']:,}")
        if r["conflicts"]:
            notes.append(f"{r['conflicts']} broadcasts came to members at different positions")
        print(f"\n{key}: " + "; ".join(notes))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20, help="broadcasts per second, for the whole run")
    parser.add_argument("--steady", type=float, default=3, help="seconds of broadcasting before the cut")
    parser.add_argument("--jitter", type=float, default=0.25, help="each member reconnects within this many s")
    parser.add_argument("--down", type=float, default=0,
                        help="seconds every member stays cut before its jitter (a longer outage)")
    parser.add_argument("--recover-timeout", type=float, default=60, help="seconds the members may take to be whole")
    parser.add_argument("--after", type=float, default=3, help="seconds of broadcasting after the last is whole")
    parser.add_argument("--drain", type=float, default=3, help="seconds for the last deliveries")
    parser.add_argument("--batch", type=int, default=50, help="members connecting at once")
    parser.add_argument("--history-size", type=int, default=None,
                        help="WEBSOCKET_HISTORY_SIZE for the configurations with history (default 100)")
    parser.add_argument("--configs", default="default",
                        help=f"comma-separated: {', '.join(BY_KEY)}; 'default' = {','.join(DEFAULT_KEYS)}; "
                             "'all' = every one")
    parser.add_argument("--server-cpu", type=int, default=0, help="core the servers are pinned to")
    parser.add_argument("--client-cpu", type=int, default=1, help="core the load generator is pinned to")
    parser.add_argument("--no-pin", action="store_true", help="pin nothing")
    parser.add_argument("--client-loop", choices=["uvloop", "asyncio"], default=CLIENT_LOOP["name"])
    parser.add_argument("--seed", type=int, default=None, help="seed of the reconnect jitter")
    args = parser.parse_args()
    if args.client_loop == "uvloop" and uvloop is None:
        raise SystemExit("--client-loop uvloop: uvloop is not installed")
    CLIENT_LOOP["name"] = args.client_loop
    random.seed(args.seed)
    keys: list[str] = []
    for part in args.configs.split(","):
        for name in {"default": DEFAULT_KEYS, "all": list(BY_KEY)}.get(part.strip(), [part.strip()]):
            if name not in BY_KEY:
                raise SystemExit(f"unknown configuration {name!r}; known: {', '.join(BY_KEY)}, default, all")
            if name not in keys:
                keys.append(name)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.no_pin or not shutil.which("taskset") or {args.server_cpu, args.client_cpu} - os.sched_getaffinity(0):
        pinning = "nothing pinned: the load generator shares the cores with the servers"
        args.server_cpu = None
    else:
        os.sched_setaffinity(0, {args.client_cpu})
        pinning = (f"servers (and redis-server) pinned to CPU {args.server_cpu}, "
                   f"the load generator to CPU {args.client_cpu}")
    # Threads for twice the members: the cut connections' threads are freed only once the server notices.
    threads, _ = register_servers(2 * args.members, args.server_cpu)

    down = f"{args.down:g} s + " if args.down else ""
    print(f"Reconnect storm: {args.members:,} dwebsocket.v1 members of group {GROUP!r} cut at once after "
          f"{args.steady:g} s of {args.rate:g} broadcasts/s; all reconnect within {down}"
          f"{args.jitter * 1000:.0f} ms with their resume")
    print(f"\n```bash\nscripts/bench.sh storm {shlex.join(sys.argv[1:])}\n```\n")
    print(f"{pinning}; {os.cpu_count()} cores; gunicorn --threads {threads}; uvicorn --ws wsproto --loop asyncio; "
          f"load generator: picows on {args.client_loop}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n", flush=True)

    results: dict[str, dict] = {}
    failures: dict[str, str] = {}
    for key in keys:
        config = BY_KEY[key]
        print(f"  {key}: {config.description}", file=sys.stderr, flush=True)
        try:
            results[key] = measure(config, args)
            r = results[key]
            print(f"  {key}: whole max {seconds(r['whole_max'])} s, lost {r['lost']}, duplicated {r['duplicated']}, "
                  f"recovered {r['recovered_true']}/{r['recovered_false']}", file=sys.stderr, flush=True)
        except Exception as exc:
            traceback.print_exc()
            failures[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"  {key} failed: {exc!r}", file=sys.stderr, flush=True)
    print_table(keys, results, failures)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

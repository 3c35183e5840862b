"""Fan-out benchmark: dwebsocket groups against Django Channels, in the same run.

    python -m bench.fanout [--members 1000] [--messages 20] [--rounds 3]

Each configuration serves the same project under uvicorn (bench/project):
members join group "bench" and listen; one HTTP request broadcasts
``--messages`` messages, each carrying the time it was sent. A client process
holds every member connection and records when each message arrives.

Configurations: one process (dwebsocket memory broker / Channels
InMemoryChannelLayer) and two processes sharing one redis-server
(dwebsocket Redis broker / channels-redis), members split evenly.

Reported per configuration (median of ``--rounds``): deliveries per second
(from the broadcast request to the last delivery), p50 and p99 latency, the
resident memory of the server processes per member connection, and the
tracebacks the servers logged. Ratios are
dwebsocket / Channels. The client shares the 2-core machine with the servers,
so absolute figures are a floor; the ratios are the result.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import start_redis, start_server  # noqa: E402

import websockets  # noqa: E402


def rss_kib(pid: int) -> int:
    """Resident memory of *pid* and its children (uvicorn runs in the child of `timeout`)."""
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


#: Handshakes a server refused (HTTP 5xx) and the client tried again, by run.
refusals = {"count": 0}


async def _connect(uri: str, attempts: int = 10):
    """Connect; a refused handshake is counted and tried again (channels-redis refuses bursts)."""
    for attempt in range(attempts):
        try:
            return await websockets.connect(uri, open_timeout=60, max_queue=None)
        except websockets.InvalidStatus:
            if attempt == attempts - 1:
                raise
            refusals["count"] += 1
            await asyncio.sleep(0.2 * (attempt + 1))


async def connect_all(uris: list[str]) -> list:
    """Connect in batches of 20 (channels-redis's default pool refuses bigger bursts)."""
    clients = []
    for start in range(0, len(uris), 20):
        clients.extend(await asyncio.gather(*(_connect(u) for u in uris[start:start + 20])))
    return clients


async def run_round(ports: list[int], stack: str, members: int, messages: int) -> tuple[float, list[float]]:
    uris = [f"ws://127.0.0.1:{ports[i % len(ports)]}/member/" for i in range(members)]
    clients = await connect_all(uris)
    try:
        await asyncio.gather(*(c.recv() for c in clients))  # "joined"
        await asyncio.sleep(0.5)
        latencies: list[float] = []
        last = 0.0

        async def listen(client):
            nonlocal last
            for _ in range(messages):
                text = await asyncio.wait_for(client.recv(), 120)
                now = time.time()
                latencies.append(now - float(text.split()[1]))
                last = max(last, now)

        listeners = [asyncio.create_task(listen(c)) for c in clients]
        started = time.time()
        url = f"http://127.0.0.1:{ports[0]}/fanout/{stack}/?n={messages}"
        await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=120).read())
        await asyncio.gather(*listeners)
        return members * messages / (last - started), latencies
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


def measure(stack: str, processes: int, members: int, messages: int, rounds: int) -> dict[str, float]:
    with ExitStack() as exit_stack:
        env = {"BENCH_STACK": stack}
        if processes > 1:
            env["BENCH_REDIS_URL"] = exit_stack.enter_context(start_redis()).url
        servers = [
            exit_stack.enter_context(start_server("uvicorn", env=env, project="bench"))
            for _ in range(processes)
        ]
        ports = [s.port for s in servers]
        refusals["count"] = 0
        idle = sum(rss_kib(s.process.pid) for s in servers)
        rates, p50s, p99s, per_member = [], [], [], []
        for _ in range(rounds):
            rate, latencies = asyncio.run(run_round(ports, stack, members, messages))
            latencies.sort()
            rates.append(rate)
            p50s.append(latencies[len(latencies) // 2] * 1000)
            p99s.append(latencies[int(len(latencies) * 0.99)] * 1000)
        # Memory with every member connected.
        async def hold():
            conns = await connect_all([f"ws://127.0.0.1:{ports[i % len(ports)]}/member/" for i in range(members)])
            await asyncio.gather(*(c.recv() for c in conns))
            await asyncio.sleep(1)
            loaded = sum(rss_kib(s.process.pid) for s in servers)
            await asyncio.gather(*(c.close() for c in conns))
            return loaded
        loaded = asyncio.run(hold())
        per_member.append((loaded - idle) / members)
        errors = sum(server.log_text().count("Traceback") for server in servers)
    return {
        "errors": errors,
        "refused": refusals["count"],
        "rate": statistics.median(rates),
        "p50": statistics.median(p50s),
        "p99": statistics.median(p99s),
        "kib": per_member[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"Fan-out to {args.members} members, {args.messages} broadcasts, median of {args.rounds} rounds (uvicorn)\n")
    print("| configuration | stack | deliveries/s | p50 ms | p99 ms | server KiB per member | server tracebacks "
          "| handshakes refused and retried |")
    print("|---|---|---|---|---|---|---|---|")
    for processes, label in ((1, "1 process, in memory"), (2, "2 processes, Redis")):
        results = {}
        for stack in ("dwebsocket", "channels"):
            results[stack] = r = measure(stack, processes, args.members, args.messages, args.rounds)
            print(
                f"| {label} | {stack} | {r['rate']:,.0f} | {r['p50']:.1f} | {r['p99']:.1f} "
                f"| {r['kib']:.1f} | {r['errors']} | {r['refused']} |",
                flush=True,
            )
        d, c = results["dwebsocket"], results["channels"]
        print(
            f"| {label} | **ratio** | **{d['rate'] / c['rate']:.2f}x** | {d['p50'] / c['p50']:.2f} | "
            f"{d['p99'] / c['p99']:.2f} | {d['kib'] / c['kib']:.2f} | | |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

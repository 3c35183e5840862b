"""Idle connections: how many one process holds, what each costs, and whether all still answer.

    python -m bench.idle [--members 10000] [--configs gevent,uvicorn,flask-gevent,asgi,channels]

The same servers and member views as bench/fanout.py (see there), pinned the
same way (server on ``--server-cpu``, this load generator on ``--client-cpu``).
For each configuration, on a fresh server:

1. ``--members`` members connect (``--batch`` at a time) and each waits for
   its "joined"; the time it took and the handshakes tried again are reported.
2. After a second, the server's resident memory per member (minus the idle
   server's), then its CPU % over ``--idle-seconds`` of holding every
   connection with no traffic (keepalive timers and the like).
3. One broadcast of one message to all of them: how many members got it
   (all must: every connection still answers) and how long the last took.

A member is a real WebSocket connection held open by picows in one event
loop; the server's view has joined it to a group and waits in ``wait()``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shlex
import shutil
import sys
import time
from contextlib import ExitStack

from .fanout import BY_KEY, CLIENT_LOOP, CpuMeter, Run, register_servers, rss_kib, run_client, start_servers, versions

DEFAULT_KEYS = ["gevent", "uvicorn", "flask-gevent", "asgi", "channels"]
RATIOS = [
    ("dwebsocket gevent / flask-sock gevent", "gevent", "flask-gevent"),
    ("dwebsocket uvicorn / bare ASGI uvicorn", "uvicorn", "asgi"),
    ("dwebsocket uvicorn / Channels uvicorn", "uvicorn", "channels"),
    ("dwebsocket gthread / flask-sock gthread", "gthread", "flask-gthread"),
]


async def session(servers, config, args, idle_kib: int) -> dict:
    run = Run([s.port for s in servers], config, args)
    meter = CpuMeter([s.process.pid for s in servers])
    result: dict = {}
    try:
        started = time.monotonic()
        await run.connect_all()
        result["connect_s"] = time.monotonic() - started
        await asyncio.sleep(1)
        result["kib"] = (sum(rss_kib(s.process.pid) for s in servers) - idle_kib) / args.members
        meter.start()
        await asyncio.sleep(args.idle_seconds)
        result["idle_cpu"] = meter.stop()
        phase = run.new_phase(1, latencies=True)
        await run.request(1, phase.base, args.timeout)
        await phase.wait(args.timeout)
        result["answered"] = sum(1 for m in run.members if m.count == 1)
        result["last_ms"] = 1000 * max(phase.latencies) if phase.latencies else float("nan")
    finally:
        result["retried"] = run.retried
        await run.close_all()
    return result


def measure(config, args) -> dict:
    with ExitStack() as stack:
        servers = start_servers(stack, config, args, {}, int(600 + args.timeout))
        idle = sum(rss_kib(s.process.pid) for s in servers)
        result = run_client(session(servers, config, args, idle))
    result["tracebacks"] = sum(s.log_text().count("Traceback") for s in servers)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=10000)
    parser.add_argument("--idle-seconds", type=float, default=5)
    parser.add_argument("--timeout", type=float, default=60, help="seconds the one broadcast may take")
    parser.add_argument("--batch", type=int, default=100, help="members connecting at once")
    parser.add_argument("--configs", default=",".join(DEFAULT_KEYS), help=f"comma-separated: {', '.join(BY_KEY)}")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args()
    keys = [k.strip() for k in args.configs.split(",")]
    for key in keys:
        if key not in BY_KEY or BY_KEY[key].processes != 1:
            raise SystemExit(f"unknown or multi-process configuration {key!r}")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the servers inherit it
    if hard < args.members + 1000:
        raise SystemExit(f"the open-files limit ({hard}) is below --members + 1000")
    if args.no_pin or not shutil.which("taskset") or {args.server_cpu, args.client_cpu} - os.sched_getaffinity(0):
        pinning, args.server_cpu = "nothing pinned", None
    else:
        os.sched_setaffinity(0, {args.client_cpu})
        pinning = f"servers pinned to CPU {args.server_cpu}, the load generator to CPU {args.client_cpu}"
    register_servers(args.members, args.server_cpu)
    print(f"{args.members:,} idle connections in one process\n\n```bash\nscripts/bench.sh idle "
          f"{shlex.join(sys.argv[1:])}\n```\n\n{pinning}; load generator: picows on {CLIENT_LOOP['name']}")
    print(versions() + "\n", flush=True)

    results, failures = {}, {}
    for key in keys:
        config = BY_KEY[key]
        print(f"  {key}: {config.stack}, {config.view}, {config.server}", file=sys.stderr, flush=True)
        try:
            results[key] = measure(config, args)
            print(f"  {key}: {results[key]}", file=sys.stderr, flush=True)
        except Exception as exc:
            failures[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"  {key} failed: {exc!r}", file=sys.stderr, flush=True)
    print("| stack | server | members connected in s | server KiB per member | idle server CPU % "
          "| members answering one broadcast | last delivery ms | handshakes retried | server tracebacks |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in keys:
        config = BY_KEY[key]
        start = f"| {config.stack} | {config.server} |"
        if key in failures:
            print(f"{start} failed: {failures[key]} |" + " |" * 6)
            continue
        r = results[key]
        print(f"{start} {r['connect_s']:.1f} | {r['kib']:.1f} | {r['idle_cpu']:.1f} "
              f"| {r['answered']:,} / {args.members:,} | {r['last_ms']:,.0f} | {r['retried']} | {r['tracebacks']} |")
    ratios = [(label, a, b) for label, a, b in RATIOS if a in results and b in results]
    if ratios:
        print("\n| ratio | server KiB per member |\n|---|---|")
        for label, mine, theirs in ratios:
            print(f"| {label} | **{results[mine]['kib'] / results[theirs]['kib']:.2f}×** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

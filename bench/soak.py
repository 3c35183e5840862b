"""Soak: a chat of N members on 2 processes sharing Redis, broadcasting for a minute.

    python -m bench.soak [--members 1000] [--duration 60] [--rate 20]
                         [--scenarios steady,redis-restart,worker-kill]

Two uvicorn processes serve dwebsocket's async member view (bench/project:
join a group, wait) with the Redis broker and a redis-server of their own;
this process holds every member (picows, one event loop), half on each
server. A paced driver sends ``--rate`` HTTP requests a second, alternating
between the two servers, each broadcasting one numbered message to the
group. Every member records what it got; after the run:

- **delivered exactly once**: per member, messages missing and duplicated;
- **memory**: the servers' resident memory at the end against right after
  the warm-up (must stay within 10 %);
- **threads and descriptors** of the server processes once every member has
  disconnected, against before any connected (after 40 members came and went
  and 60 broadcasts were made, so that pools made on first use count in both).

Scenarios, each on fresh servers:

``steady``         nothing happens: nothing may be lost.
``redis-restart``  halfway through, redis-server stops and starts again 2 s
                   later on the same port. Redis pub/sub is at-most-once:
                   broadcasts made while a process is cut off from Redis do not
                   reach the *other* process's members; each process's own
                   members get its broadcasts (docs/reliability.md).
``worker-kill``    halfway through, the second server is killed (SIGKILL). Its
                   members are cut (1006) and stop counting; the first
                   server's members must lose nothing, including the
                   broadcasts the driver still sends to the dead server
                   (those requests fail and are counted, not expected).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import sys
import time
from contextlib import ExitStack

from .fanout import BY_KEY, CpuMeter, Member, Run, _children, http_get, register_servers, rss_kib, run_client
from tests.servers import start_redis, start_server

SCENARIOS = ["steady", "redis-restart", "worker-kill"]


class Tally:
    """What every member got: a phase for fanout's Member, counting duplicates."""

    def __init__(self, members: list[Member]) -> None:
        self.got: dict[int, set[int]] = {id(m): set() for m in members}
        self.duplicates: dict[int, int] = {id(m): 0 for m in members}

    def deliver(self, member: Member, text: str, now: float) -> None:
        number = int(text.split(" ", 1)[0])
        seen = self.got.setdefault(id(member), set())
        if number in seen:
            self.duplicates[id(member)] = self.duplicates.get(id(member), 0) + 1
        seen.add(number)

    def disconnected(self, member: Member) -> None:
        """A member cut (worker-kill) stops counting; fanout's Member calls this."""


def _port(transport) -> int | None:
    """The server port a member's picows transport is connected to."""
    try:
        return transport.underlying_transport.get_extra_info("peername")[1]
    except Exception:
        return None


def process_stats(pid: int) -> tuple[int, int]:
    """Threads and open descriptors of the processes below *pid* (the servers under `timeout`)."""
    threads = fds = 0
    for child in _children(pid):
        try:
            threads += len(os.listdir(f"/proc/{child}/task"))
            fds += len(os.listdir(f"/proc/{child}/fd"))
        except OSError:
            pass
    return threads, fds


async def run_scenario(scenario: str, servers, redis, args) -> dict:
    config = BY_KEY["redis"]
    run = Run([s.port for s in servers], config, args)
    # The servers' lazily made resources (the executor's threads, Redis
    # connections, the broker's listener) first: "before" is a server that
    # has served, with nobody connected.
    for _ in range(3):
        await asyncio.gather(*(http_get(s.port, f"{config.fanout}?n=1&start=0", 30) for s in servers for _ in range(10)))
    primer = Run([s.port for s in servers], config, argparse.Namespace(members=40, batch=40))
    await primer.connect_all()
    await primer.close_all()
    await asyncio.sleep(2)
    before = [process_stats(s.process.pid) for s in servers]
    await run.connect_all()
    tally = Tally(run.members)
    run.phase = tally  # type: ignore[assignment]
    second = servers[1].port
    on_second = {id(m): _port(t) == second for m, t in zip(run.members, run.transports)}
    sent: dict[int, float] = {}  # number -> when its request was sent, for requests answered 200
    failed: list[int] = []
    loop = asyncio.get_running_loop()
    number = 0
    event_at = args.warmup + args.duration / 2
    event_done = False
    meter = CpuMeter([s.process.pid for s in servers])
    rss_warm: list[int] | None = None
    begin = loop.time()
    tasks = []

    async def broadcast(n: int, port: int) -> None:
        try:
            status = await http_get(port, f"{config.fanout}?n=1&start={n}", 30)
        except Exception:
            status = 0
        (sent.__setitem__(n, time.monotonic()) if status == 200 else failed.append(n))

    total = args.warmup + args.duration
    while loop.time() - begin < total:
        elapsed = loop.time() - begin
        if rss_warm is None and elapsed >= args.warmup:
            rss_warm = [rss_kib(s.process.pid) for s in servers]
            meter.start()
        if not event_done and elapsed >= event_at:
            event_done = True
            if scenario == "redis-restart":
                redis.stop()
                await asyncio.sleep(2)
                redis.start()
            elif scenario == "worker-kill":
                for child in _children(servers[1].process.pid):
                    os.kill(child, signal.SIGKILL)
        port = servers[number % 2].port
        tasks.append(asyncio.create_task(broadcast(number, port)))
        number += 1
        await asyncio.sleep(max(0.0, begin + number / args.rate - loop.time()))
    await asyncio.gather(*tasks)
    await asyncio.sleep(args.drain)
    cpu = meter.stop()
    alive = [i for i, s in enumerate(servers) if _children(s.process.pid)]
    assert rss_warm is not None
    rss_warm_alive = sum(rss_warm[i] for i in alive)  # a killed server is left out of both figures
    rss_end = sum(rss_kib(servers[i].process.pid) for i in alive)
    expected = set(sent)
    result = {"members": len(run.members), "broadcasts": number, "answered": len(sent), "failed": len(failed)}
    missing_total = dup_total = members_missing = 0
    missing_other = 0  # redis-restart: lost only by the other process's members
    for member in run.members:
        key = id(member)
        if scenario == "worker-kill" and on_second[key]:
            continue  # cut with their server
        got = tally.got.get(key, set())
        missing = expected - got
        if missing:
            members_missing += 1
        missing_total += len(missing)
        dup_total += tally.duplicates.get(key, 0)
        if scenario == "redis-restart":
            own_port_second = on_second[key]
            missing_other += sum(1 for n in missing if (n % 2 == 1) != own_port_second)
    counted = sum(1 for m in run.members if not (scenario == "worker-kill" and on_second[id(m)]))
    result.update({
        "members_counted": counted, "missing": missing_total, "members_missing": members_missing,
        "missing_from_other_process": missing_other, "duplicates": dup_total,
        "cut": sum(1 for m in run.members if m.disconnected), "rss_warm_kib": rss_warm_alive, "rss_end_kib": rss_end,
        "server_cpu": cpu,
    })
    await run.close_all()
    await asyncio.sleep(3)
    after = [process_stats(s.process.pid) if _children(s.process.pid) else None for s in servers]
    result["threads_fds_before"] = before
    result["threads_fds_after"] = after
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--drain", type=float, default=5)
    parser.add_argument("--rate", type=float, default=20)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args()
    scenarios = [s.strip() for s in args.scenarios.split(",")]
    for scenario in scenarios:
        if scenario not in SCENARIOS:
            raise SystemExit(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    register_servers(args.members, None)
    print(f"Soak: {args.members:,} members on 2 uvicorn processes sharing a redis-server, {args.rate:g} "
          f"broadcasts/s for {args.duration:g} s after {args.warmup:g} s of warm-up\n")
    print(f"```bash\nscripts/soak.sh {' '.join(sys.argv[1:])}\n```\n", flush=True)
    rows = []
    for scenario in scenarios:
        config = BY_KEY["redis"]
        with ExitStack() as stack:
            redis = stack.enter_context(start_redis())
            env = {**config.env, "BENCH_REDIS_URL": redis.url}
            max_seconds = int(120 + args.warmup + args.duration + args.drain)
            servers = [stack.enter_context(start_server(config.kind, env=env, project=config.project,
                                                        max_seconds=max_seconds)) for _ in range(2)]
            result = run_client(run_scenario(scenario, servers, redis, args))
        result["tracebacks"] = sum(s.log_text().count("Traceback") for s in servers)
        print(f"  {scenario}: {result}", file=sys.stderr, flush=True)
        rows.append((scenario, result))
    print("| scenario | broadcasts answered (failed) | members counted | missing deliveries (members) "
          "| of them from the other process | duplicates | members cut | RSS after warm-up → end, KiB "
          "| threads, fds before → after | server tracebacks |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for scenario, r in rows:
        growth = (r["rss_end_kib"] - r["rss_warm_kib"]) / max(1, r["rss_warm_kib"]) * 100
        before = " + ".join(f"{t}, {f}" for t, f in r["threads_fds_before"])
        after = " + ".join("killed" if x is None else f"{x[0]}, {x[1]}" for x in r["threads_fds_after"])
        print(f"| {scenario} | {r['answered']:,} ({r['failed']}) | {r['members_counted']:,} "
              f"| {r['missing']:,} ({r['members_missing']:,}) | {r['missing_from_other_process']:,} "
              f"| {r['duplicates']:,} | {r['cut']:,} | {r['rss_warm_kib']:,} → {r['rss_end_kib']:,} ({growth:+.1f} %) "
              f"| {before} → {after} | {r['tracebacks']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shard-scaling benchmark: broadcast throughput across 2 processes, on a 1-shard and a 3-shard Redis Cluster.

    python -m bench.shards [--groups 120] [--messages 20] [--publishers 36] [--shards 1,3]
                           [--shard-cpu 0.05] [--rounds 3]

For each cluster size (``--shards``; 1 = one master holding every slot, 3 =
three masters made by ``redis-cli --cluster create``, no replicas), two
server processes of the test project share the cluster through
``WEBSOCKET_BROKER = "redis+cluster://..."``: gunicorn gthread publishes,
uvicorn holds the members. ``--groups`` groups, one member each (a
WebSocket client of this process, on uvicorn); ``--publishers`` HTTP clients
at once ask gunicorn to broadcast ``--messages`` messages to a group (the
test project's ``/broadcast/<group>/?n=``), every group once. Each broadcast
runs the publish script (history on: XADD + SPUBLISH) on the group's shard,
and reaches the member through the uvicorn process's sharded subscription.

Each shard stands for a host of its own: every redis-server runs in a CPU
cgroup of its own with a CFS quota of ``--shard-cpu`` of a core (cgroup v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` under ``/sys/fs/cgroup/cpu``, or
cgroup v2 ``cpu.max``; needs root). So a shard has a fixed slice of CPU,
however many cores this machine has and whatever the servers use, and one
shard is the bottleneck, as a single Redis host is in production once the
server processes are spread over many machines. ``--shard-cpu 0`` turns the
quota off (every process competes for the machine's cores, as before).

Reported per size: deliveries per second (all messages of all groups, from
the first request to the last delivery; the median round of ``--rounds``),
and for that round each shard's CPU % (time on a CPU of its redis-server's
threads over the window, ``/proc/PID/task/*/schedstat``; 100 % = one core),
the share of its 100 ms CFS periods in which the quota throttled it, how
many of the groups it serves (a group's slot is the CRC16 of its name, so
the spread is uneven), and the two server processes' CPU % (every process
and thread of each). Then the ratio of the largest cluster's figure to the
1-shard one's, beside the most it can be while the shards are the
bottleneck: all groups over the busiest shard's groups (3 for an even
spread).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import _redis_cli, process_tree, start_redis_cluster, start_server  # noqa: E402

from redis.crc import key_slot  # noqa: E402

from websockets.asyncio.client import connect  # noqa: E402

__all__ = ["main"]

CGROUP_V1 = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")
PERIOD_US = 100_000
TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system time of process *pid* (all its threads); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def _run_seconds(pid: int) -> float:
    """Time on a CPU of every thread of *pid*, in ns from ``/proc/PID/task/*/schedstat`` (finer than ticks)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as stat:
                total += int(stat.read().split()[0])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


def _groups_per_shard(ports: list[int], groups: list[str]) -> list[int]:
    """How many of *groups* each master (by port) serves: its slots, from ``CLUSTER NODES``."""
    ranges: list[list[tuple[int, int]]] = []
    for port in ports:
        mine = next(line for line in _redis_cli(port, "CLUSTER", "NODES").splitlines() if "myself" in line)
        ranges.append([
            (int(r.split("-")[0]), int(r.split("-")[-1])) for r in mine.split()[8:] if not r.startswith("[")
        ])
    counts = [0] * len(ports)
    for group in groups:
        slot = key_slot(f"dwebsocket:{{{group}}}:group".encode())
        counts[next(i for i, rs in enumerate(ranges) if any(a <= slot <= b for a, b in rs))] += 1
    return counts


def _child(pid: int) -> int:
    """The first child of *pid* (the redis-server under its ``timeout``)."""
    deadline = time.monotonic() + 5
    while True:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            found = children.read().split()
        if found:
            return int(found[0])
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {pid} has no child")
        time.sleep(0.05)


class CpuQuota:
    """A CPU cgroup of its own, holding *pid*, capped at *fraction* of a core (cgroup v1 or v2)."""

    def __init__(self, name: str, pid: int, fraction: float) -> None:
        if (CGROUP_V2 / "cgroup.controllers").exists():
            self.version, parent = 2, CGROUP_V2
            if "cpu" not in (parent / "cgroup.subtree_control").read_text().split():
                try:
                    (parent / "cgroup.subtree_control").write_text("+cpu")
                except OSError as exc:
                    raise RuntimeError(f"cannot enable the cpu controller in {parent}/cgroup.subtree_control "
                                       f"({exc}); run with --shard-cpu 0 for no quota") from exc
        elif (CGROUP_V1 / "cpu.cfs_quota_us").exists():
            self.version, parent = 1, CGROUP_V1
        else:
            raise RuntimeError(f"no CPU cgroup: neither {CGROUP_V1}/cpu.cfs_quota_us (cgroup v1) nor "
                               f"{CGROUP_V2}/cgroup.controllers (cgroup v2); run with --shard-cpu 0 for no quota")
        self.path = parent / name
        quota = max(1000, round(fraction * PERIOD_US))
        try:
            self.path.mkdir()
            if self.version == 1:
                (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (self.path / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                (self.path / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            (self.path / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            self.remove()
            raise RuntimeError(f"cannot set up the CPU cgroup {self.path} ({exc}: needs root and a writable "
                               f"cgroup fs); run with --shard-cpu 0 for no quota") from exc

    def throttled(self) -> tuple[int, int]:
        """(periods, throttled periods) so far."""
        try:
            stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        except OSError:
            return 0, 0
        return int(stat.get("nr_periods", 0)), int(stat.get("nr_throttled", 0))

    def remove(self) -> None:
        """Remove the cgroup (its process exited: tried for a few seconds)."""
        deadline = time.monotonic() + 5
        while self.path.exists():
            try:
                self.path.rmdir()
            except OSError:
                if time.monotonic() > deadline:
                    print(f"warning: could not remove {self.path}", file=sys.stderr)
                    return
                time.sleep(0.1)


def _broadcast(url: str) -> None:
    with urllib.request.urlopen(url, timeout=120) as answer:
        answer.read()


async def _round(first: str, second: str, groups: list[str], messages: int, publishers: int, sample) -> dict:
    """One round: every group gets *messages* broadcasts; deliveries/s and the CPU figures."""
    members = [await connect(f"{second}/group/{g}/", max_queue=None) for g in groups]
    try:
        for member in members:
            greeting = await member.recv()
            assert str(greeting).startswith("joined "), greeting
        await asyncio.sleep(1.0)  # the uvicorn process's subscriptions confirmed

        async def drain(member) -> None:
            for _ in range(messages):
                await member.recv()

        loop = asyncio.get_running_loop()
        before = sample()
        started = time.perf_counter()
        with ThreadPoolExecutor(publishers) as pool:
            requests = [
                loop.run_in_executor(pool, _broadcast, f"{first}/broadcast/{g}/?n={messages}") for g in groups
            ]
            await asyncio.wait_for(asyncio.gather(*(drain(m) for m in members), *requests), 300)
        elapsed = time.perf_counter() - started
        after = sample()
        return {
            "rate": len(groups) * messages / elapsed,
            "shards": [100 * (a - b) / elapsed for a, b in zip(after["shards"], before["shards"])],
            "throttled": [
                (a[1] - b[1]) / max(1, a[0] - b[0]) for a, b in zip(after["periods"], before["periods"])
            ],
            "servers": [100 * (a - b) / elapsed for a, b in zip(after["servers"], before["servers"])],
        }
    finally:
        for member in members:
            await member.close()


def measure(shards: int, groups: int, messages: int, publishers: int, rounds: int, shard_cpu: float) -> dict:
    """The median round on a cluster of *shards* masters, each capped at *shard_cpu* of a core."""
    made: list[CpuQuota] = []
    try:
        with start_redis_cluster(masters=shards, replicas=0) as cluster:
            redis_pids = [_child(p.pid) for p in cluster.processes]
            for pid in redis_pids if shard_cpu > 0 else ():
                made.append(CpuQuota(f"dws-shard-{os.getpid()}-{pid}", pid, shard_cpu))
            env = {"DWS_TEST_BROKER": cluster.url, "DWS_TEST_BROADCAST_QUEUE": str(messages * 2)}
            with start_server("gthread", env=env) as first, start_server("uvicorn", env=env) as second:
                server_roots = [first.main_pid, second.main_pid]

                def sample() -> dict:
                    return {
                        "shards": [_run_seconds(pid) for pid in redis_pids],
                        "periods": [q.throttled() for q in made] or [(0, 0)] * len(redis_pids),
                        "servers": [sum(_cpu_seconds(p) for p in process_tree(r)) for r in server_roots],
                    }

                figures = []
                for index in range(rounds):
                    names = [f"r{index}g{n}" for n in range(groups)]  # new groups: fresh histories
                    figures.append(asyncio.run(_round(first.http, second.ws, names, messages, publishers, sample)))
                    figures[-1]["groups"] = _groups_per_shard(cluster.ports, names)
                    print(f"  {shards} shard(s), round {index + 1}: {figures[-1]['rate']:,.0f} deliveries/s",
                          flush=True)
                figures.sort(key=lambda f: f["rate"])
                return figures[len(figures) // 2]
    finally:
        for quota in made:  # the redis-servers exited with the cluster
            quota.remove()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=120)
    parser.add_argument("--messages", type=int, default=20, help="broadcasts per group and round")
    parser.add_argument("--publishers", type=int, default=36, help="HTTP requests at once")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shards", default="1,3", help="cluster sizes, comma-separated")
    parser.add_argument("--shard-cpu", type=float, default=0.05,
                        help="CPU quota of each redis-server, a fraction of one core (0: none)")
    args = parser.parse_args(argv)
    quota = f"{args.shard_cpu:.0%} of a core per shard" if args.shard_cpu > 0 else "no CPU quota"
    print(f"{args.groups} groups x {args.messages} broadcasts, {args.publishers} publishers, 2 processes, "
          f"{quota}; median of {args.rounds} round(s)", flush=True)
    results = {}
    for shards in (int(s) for s in args.shards.split(",")):
        result = results[shards] = measure(shards, args.groups, args.messages, args.publishers, args.rounds,
                                           args.shard_cpu)
        shard_cpu = " ".join(f"{c:.0f}%" for c in result["shards"])
        throttled = " ".join(f"{t:.0%}" for t in result["throttled"])
        print(f"{shards} shard(s): {result['rate']:,.0f} deliveries/s; shard CPU {shard_cpu} "
              f"(periods throttled {throttled}; groups {'/'.join(map(str, result['groups']))}); servers CPU gthread {result['servers'][0]:.0f}% "
              f"uvicorn {result['servers'][1]:.0f}%", flush=True)
    if len(results) > 1:
        low, high = min(results), max(results)
        spread = results[high]["groups"]
        print(f"ratio {high} shards / {low} shard(s): {results[high]['rate'] / results[low]['rate']:.2f} "
              f"(the busiest shard holds {max(spread)}/{sum(spread)} of the groups: about "
              f"{sum(spread) / max(spread) / (sum(results[low]['groups']) / max(results[low]['groups'])):.2f} at most "
              f"while the shards are the bottleneck)")


if __name__ == "__main__":
    main()

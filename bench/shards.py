"""Shard-scaling benchmark: broadcast throughput across 2 processes, on a 1-shard and a 3-shard Redis Cluster.

    python -m bench.shards [--groups 60] [--messages 100] [--publishers 12] [--shards 1,3]

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

Reported per size: deliveries per second (all messages of all groups, from
the first request to the last delivery; median of ``--rounds``), and the ratio
of the largest cluster's figure to the 1-shard one's. Everything runs on
this machine: with fewer cores than processes, the servers and Redis compete
for them, and the ratio says how much of the broadcast path Redis was.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import start_redis_cluster, start_server  # noqa: E402

from websockets.asyncio.client import connect  # noqa: E402

__all__ = ["main"]


def _broadcast(url: str) -> None:
    with urllib.request.urlopen(url, timeout=120) as answer:
        answer.read()


async def _round(first: str, second: str, groups: list[str], messages: int, publishers: int) -> float:
    """Deliveries per second of one round: every group gets *messages* broadcasts."""
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
        started = time.perf_counter()
        with ThreadPoolExecutor(publishers) as pool:
            requests = [
                loop.run_in_executor(pool, _broadcast, f"{first}/broadcast/{g}/?n={messages}") for g in groups
            ]
            await asyncio.wait_for(asyncio.gather(*(drain(m) for m in members), *requests), 300)
        return len(groups) * messages / (time.perf_counter() - started)
    finally:
        for member in members:
            await member.close()


def measure(shards: int, groups: int, messages: int, publishers: int, rounds: int) -> float:
    """The median deliveries per second on a cluster of *shards* masters."""
    with start_redis_cluster(masters=shards, replicas=0) as cluster:
        env = {"DWS_TEST_BROKER": cluster.url, "DWS_TEST_BROADCAST_QUEUE": str(messages * 2)}
        with start_server("gthread", env=env) as first, start_server("uvicorn", env=env) as second:
            figures = []
            for index in range(rounds):
                names = [f"r{index}g{n}" for n in range(groups)]  # new groups: fresh histories
                figures.append(asyncio.run(_round(first.http, second.ws, names, messages, publishers)))
            return statistics.median(figures)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=60)
    parser.add_argument("--messages", type=int, default=100, help="broadcasts per group and round")
    parser.add_argument("--publishers", type=int, default=12, help="HTTP requests at once")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shards", default="1,3", help="cluster sizes, comma-separated")
    args = parser.parse_args(argv)
    results = {}
    for shards in (int(s) for s in args.shards.split(",")):
        results[shards] = measure(shards, args.groups, args.messages, args.publishers, args.rounds)
        print(f"{shards} shard(s): {results[shards]:,.0f} deliveries/s "
              f"({args.groups} groups x {args.messages} broadcasts, 2 processes)", flush=True)
    if len(results) > 1:
        low, high = min(results), max(results)
        print(f"ratio {high} shards / {low} shard(s): {results[high] / results[low]:.2f}")


if __name__ == "__main__":
    main()

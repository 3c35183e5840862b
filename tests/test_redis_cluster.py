"""dwebsocket on a Redis Cluster and on a Sentinel set: the real things, on loopback ports.

A 3-master + 3-replica cluster (``redis-cli --cluster create``) serves two
server processes (gunicorn gthread and uvicorn) for the whole module: groups
on each shard, history, presence and long-polling through it. A master, its
replica and three sentinels serve two more: the master is killed mid-stream,
and the broker, presence and polling sessions follow the new master.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
import redis
import redis.cluster

from .client import ws_connect
from .servers import (
    RedisCluster, RedisSentinels, RunningServer, start_redis_cluster, start_redis_sentinels, start_server,
)
from .test_delivery import SessionClient, http_broadcast, recovers_on_another_process
from .test_groups import joined, presence, wait_for
from .test_polling import PollClient

SITE = "https://trusted.example"  # an origin both processes trust (CSRF_TRUSTED_ORIGINS)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with start_redis_cluster(masters=3, replicas=1) as running:
        yield running


@pytest.fixture(scope="module")
def cluster_client(cluster: RedisCluster) -> Iterator[redis.cluster.RedisCluster]:
    """The test's own view of the cluster: where keys live, what they hold."""
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    yield client
    client.close()


@pytest.fixture(scope="module")
def on_cluster(cluster: RedisCluster) -> Iterator[tuple[RunningServer, RunningServer]]:
    env = {"DWS_TEST_BROKER": cluster.url, "DWS_TEST_POLL_TIMEOUT": "1"}
    with start_server("gthread", env=env) as first, start_server("uvicorn", env=env) as second:
        yield first, second


def groups_on_every_master(client: redis.cluster.RedisCluster, stem: str) -> dict[str, str]:
    """One group per master (group -> that master's name), by the slot of the group's hash tag."""
    found: dict[str, str] = {}
    for n in range(1000):
        group = f"{stem}{n}"
        node = client.get_node_from_key(f"dwebsocket:{{{group}}}:history").name
        if node not in found.values():
            found[group] = node
        if len(found) == len(client.get_primaries()):
            return found
    raise AssertionError("no group name found for some master")


def test_broadcasts_cross_processes_in_order_on_every_shard_with_presence(
    on_cluster: tuple[RunningServer, RunningServer], cluster_client: redis.cluster.RedisCluster,
) -> None:
    first, second = on_cluster
    groups = groups_on_every_master(cluster_client, "shard")
    assert len(groups) == 3
    with contextlib.ExitStack() as stack:
        members = {}
        for group in groups:
            sender = stack.enter_context(ws_connect(first, f"/group/{group}/"))
            on_first = stack.enter_context(ws_connect(first, f"/group/{group}/"))
            on_second = stack.enter_context(ws_connect(second, f"/async-group/{group}/"))
            for client in (sender, on_first, on_second):
                joined(client)
            members[group] = (sender, on_first, on_second)
        for group in groups:
            # Presence through the cluster: each process counts the other's members.
            wait_for(lambda: presence(second, group)["size"] == 3, what=f"3 members of {group}")
            assert presence(first, group)["size"] == 3
            node = cluster_client.get_node_from_key(f"dwebsocket:{{{group}}}:presence")
            assert node.name == groups[group]  # the group's keys share one shard
            assert cluster_client.zcard(f"dwebsocket:{{{group}}}:presence") == 3
        for n in range(30):
            for group in groups:
                members[group][0].send(f"{group} m{n}")
        for group, (sender, *receivers) in members.items():
            for receiver in receivers:
                assert [receiver.recv(timeout=10) for _ in range(30)] == [f"{group} m{n}" for n in range(30)]
                with pytest.raises(TimeoutError):
                    receiver.recv(timeout=0.2)  # exactly once, and nothing of the other groups
            # Each group's history on its own master, in one slot with its counter.
            assert cluster_client.xlen(f"dwebsocket:{{{group}}}:history") == 30
            assert cluster_client.hget(f"dwebsocket:{{{group}}}:meta", "s") == b"30"
        members[next(iter(groups))][2].close()
        group = next(iter(groups))
        wait_for(lambda: presence(first, group)["size"] == 2, what="a member leaving")
    for server in (first, second):
        assert "Traceback" not in server.log_text()


def test_a_group_with_braces_in_its_name_keeps_its_keys_on_one_shard(
    on_cluster: tuple[RunningServer, RunningServer], cluster_client: redis.cluster.RedisCluster,
) -> None:
    first, second = on_cluster
    with ws_connect(first, "/group/a%7Bb%7Dc/") as sender, ws_connect(second, "/group/a%7Bb%7Dc/") as receiver:
        joined(sender)
        joined(receiver)
        wait_for(lambda: presence(first, "a{b}c")["size"] == 2, what="2 members")
        sender.send("braced")
        assert receiver.recv(timeout=10) == "braced"
    tag = "#" + hashlib.sha256(b"a{b}c").hexdigest()
    assert cluster_client.xlen(f"dwebsocket:{{{tag}}}:history") == 1  # kept: the script ran on one shard


def test_check_deploy_reaches_the_cluster_and_names_one_it_cannot(cluster: RedisCluster) -> None:
    from django.core.checks import run_checks
    from django.test import override_settings

    def deploy_errors() -> list[str]:
        return [m.msg for m in run_checks(include_deployment_checks=True) if m.id == "dwebsocket.E005"]

    with override_settings(WEBSOCKET_BROKER=cluster.url):
        assert deploy_errors() == []
    url = "redis+cluster://127.0.0.1:1"  # nothing listens there
    with override_settings(WEBSOCKET_BROKER=url):
        assert [m for m in deploy_errors() if url in m] != []


def test_history_recovers_across_processes_through_the_cluster(
    on_cluster: tuple[RunningServer, RunningServer],
) -> None:
    recovers_on_another_process(*on_cluster, "hist", away=5)


def test_long_polling_sessions_live_in_the_cluster(
    on_cluster: tuple[RunningServer, RunningServer], cluster_client: redis.cluster.RedisCluster,
) -> None:
    first, second = on_cluster
    client = PollClient(first, f"/echo/?id={uuid.uuid4().hex}", origin=SITE)
    assert client.open()[0] == 200
    base = f"dwebsocket:poll:{{{client.sid}}}"
    assert cluster_client.hget(base, "owner") is not None  # under its own hash tag
    for n in range(4):
        client.server = (first, second)[n % 2]
        assert client.send(f"message {n}") == 204
        client.server = (second, first)[n % 2]
        assert poll_once(client) == [f"message {n}"]
    assert client.close() == 204
    # A polling member and a WebSocket member of one group, one per process.
    with ws_connect(first, "/group/mixed/") as ws:
        assert ws.recv(timeout=5).startswith("joined ")
        poller = PollClient(second, "/group/mixed/", origin=SITE)
        assert poller.open()[0] == 200
        assert poll_once(poller)[0].startswith("joined ")
        poller.server = first
        assert poller.send("from polling") == 204
        assert ws.recv(timeout=10) == "from polling"
        ws.send("from websocket")
        poller.server = second
        assert poll_once(poller) == ["from websocket"]
        poller.close()


def test_a_cluster_master_killed_its_groups_resume_on_the_promoted_replica() -> None:
    with start_redis_cluster(masters=3, replicas=1) as cluster:
        env = {"DWS_TEST_BROKER": cluster.url}
        client = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
        try:
            group = "failing"
            node = client.get_node_from_key(f"dwebsocket:{{{group}}}:group")
        finally:
            client.close()
        with start_server("gthread", env=env) as first, start_server("uvicorn", env=env) as second, \
                ws_connect(second, f"/group/{group}/") as member:
            joined(member)
            wait_for(lambda: presence(first, group)["size"] == 1, what="the member in the cluster")
            http_broadcast(first, group, 1, "before")
            assert member.recv(timeout=10) == "before 0"
            cluster.kill(node.port)
            killed_at = time.monotonic()
            got = None
            while got is None:
                assert time.monotonic() < killed_at + 20, "broadcasts did not resume within 20 s"
                http_broadcast(first, group, 1, "after")
                with contextlib.suppress(TimeoutError):
                    got = member.recv(timeout=0.5)
            print(f"\ncluster failover: broadcasts resumed {time.monotonic() - killed_at:.1f} s after the kill")
            assert got == "after 0"
            wait_for(lambda: presence(first, group)["size"] == 1, timeout=15, what="presence after the failover")
            for server in (first, second):
                assert "Traceback" not in server.log_text()


# -- Sentinel: the master killed mid-stream ---------------------------------------------


def poll_once(client: PollClient, within: float = 15.0) -> list[object]:
    """What the first poll that brings anything brings, within *within* seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        messages, close = client.poll()
        assert close is None, close
        if messages:
            return messages
    raise AssertionError(f"nothing came within {within} s")


def test_sentinel_failover_mid_stream() -> None:
    """Broadcasts resume within 10 s of the master's death (plus the outbox's delay across processes);
    history gives back all of them, the window included."""
    with start_redis_sentinels() as sentinels:
        # The polling session waits unpolled across the failover and the outbox's delay.
        env = {"DWS_TEST_BROKER": sentinels.url, "DWS_TEST_POLL_TIMEOUT": "1", "DWS_TEST_POLL_EXPIRY": "60"}
        with start_server("gthread", env=env) as first, start_server("uvicorn", env=env) as second:
            check_failover(sentinels, first, second)


def check_failover(sentinels: RedisSentinels, first: RunningServer, second: RunningServer) -> None:
    member = SessionClient(second, "/group/fo/").connect()  # live all along
    member.until_joined("fo")
    assert member.recv()[1].startswith("joined ")
    away = SessionClient(second, "/group/fo/").connect()  # away across the failover, then back
    away.until_joined("fo")
    assert away.recv()[1].startswith("joined ")
    wait_for(lambda: presence(first, "fo")["size"] == 2, what="the members in Redis")
    poller = PollClient(first, f"/echo/?id={uuid.uuid4().hex}", origin=SITE)
    assert poller.open()[0] == 200

    sent: list[tuple[float, int]] = []  # (when, number), appended by the broadcaster thread only
    stop = threading.Event()

    def broadcaster() -> None:  # one broadcast every 50 ms from the first process, over HTTP
        number = 0
        while not stop.is_set():
            started = time.monotonic()
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{first.http}/broadcast/fo/?m=b{number}", timeout=10) as answer:
                    if answer.status == 200:
                        sent.append((started, number))
            number += 1
            stop.wait(0.05)

    def number_of(payload: str) -> int:
        return int(payload.split()[0][1:])

    thread = threading.Thread(target=broadcaster)
    thread.start()
    live: dict[int, float] = {}  # number -> when the live member got it
    resumed_at = stop_after = None
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # a steady stream first
            live[number_of(member.recv(timeout=5)[1])] = time.monotonic()
        away.close()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            live[number_of(member.recv(timeout=5)[1])] = time.monotonic()
        epoch = member.positions["fo"].split(":")[0]
        old = sentinels.master()
        killed_at = time.monotonic()
        sentinels.kill(old)
        deadline = killed_at + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                number = number_of(member.recv(timeout=1)[1])
                live[number] = time.monotonic()
                sent_at = dict((n, t) for t, n in sent).get(number, killed_at)
                if resumed_at is None and sent_at > killed_at + 0.2:
                    resumed_at = live[number]
                    stop_after = resumed_at + 1.0  # one more second of live traffic
            if stop_after is not None and time.monotonic() > stop_after:
                break
    finally:
        stop.set()
        thread.join(15)
    assert resumed_at is not None, "broadcasts did not resume within 20 s"
    new = sentinels.master()
    assert new != old, "the sentinels did not fail over"
    print(f"\nfailover: broadcasts resumed {resumed_at - killed_at:.1f} s after the kill")
    # Across processes, within the 10 s: the first process publishes what it
    # kept in the window _DRAIN_DELAY after its new master answers, its newer
    # broadcasts after them.
    assert resumed_at - killed_at < 10.0
    with contextlib.suppress(TimeoutError):  # the last ones in flight
        while True:
            live[number_of(member.recv(timeout=1)[1])] = time.monotonic()
    numbers = [n for _, n in sent]
    missed_live = [n for n in numbers if n not in live]
    print(f"failover: {len(numbers)} broadcasts, {len(missed_live)} missed by the live member: {missed_live}")
    before = [n for t, n in sent if t < killed_at - 0.5]  # replicated long before the kill
    after = [n for t, n in sent if t > resumed_at]
    assert set(before) | set(after) <= set(live)  # everything outside the window reached it live

    # Presence came back: the listeners wrote it again, to the new master.
    wait_for(lambda: presence(first, "fo")["size"] == 1, timeout=15, what="presence after the failover")
    # The polling session came back: the new master had it from the replica's copy.
    poller.server = second
    assert poller.send("after failover") == 204
    poller.server = first
    assert poll_once(poller) == ["after failover"]
    poller.close()

    # A dwebsocket.v1 client away across the failover gets back what the
    # group's history kept: the same history (epoch) on the new master.
    away.connect()
    missed, confirmation = away.until_joined("fo")
    recovered = [number_of(p) for _, p in missed]
    assert recovered == sorted(set(recovered)), "out of order, or twice"
    assert confirmation["p"].split(":")[0] == epoch, "the history did not survive the failover"
    seen_before = max(n for n in live if live[n] < killed_at - 1.0) if live else -1
    assert {n for n in before if n > seen_before + 30} <= set(recovered)
    assert set(after) <= set(recovered)
    window = [n for n in numbers if n not in recovered and n > min(recovered, default=0)]
    print(f"failover: the returning client recovered {len(recovered)} from history; "
          f"{len(window)} missing from it: {window}")
    # The window too: what the first process broadcast while it had no master
    # waited in its outbox (far below its bound), then got positions on the new one.
    assert not window, "broadcasts of the failover window are missing from the history"
    assert not missed_live, "broadcasts of the failover window never reached the other process"
    away.close()
    member.close()
    for server in (first, second):
        assert "Traceback" not in server.log_text()


def test_websocket_status_sees_both_processes_through_the_cluster(
    on_cluster: tuple[RunningServer, RunningServer], cluster: RedisCluster,
) -> None:
    from .test_metrics import status_command

    first, second = on_cluster
    env = {"DWS_TEST_BROKER": cluster.url}
    with ws_connect(first, "/group/status-a/") as a, ws_connect(second, "/async-group/status-b/") as b:
        joined(a)
        joined(b)
        deadline = time.monotonic() + 20
        while True:
            done = status_command(env, "--json")
            assert done.returncode == 0, done.stderr
            found = json.loads(done.stdout)
            groups = found["groups"]
            if groups.get("status-a") == 1 and groups.get("status-b") == 1:
                break
            assert time.monotonic() < deadline, f"the status records did not show both processes: {found}"
            time.sleep(0.5)
        assert {p["server"] for p in found["processes"]} >= {"wsgi-thread", "asgi"}
        assert found["broker"]["reachable"] and found["broker"]["redis_version"]
        table = status_command(env)
        assert table.returncode == 0, table.stderr
        assert "Traceback" not in table.stderr

"""``manage.py websocket_status [--json]``: the deployment's connections, groups and broker, now.

With a Redis ``WEBSOCKET_BROKER`` every serving process keeps a status
record in Redis (``dwebsocket.groups.status``, refreshed every 10 s and gone
30 s after its process stops): this command reads them all and shows each
process (host, pid, server kind, open connections by transport, groups,
whether it reaches Redis), then the groups across the deployment with their
members, then Redis itself. With the memory broker nothing leaves a server's
process, so only this command's own process can be shown: it says so.

Exits with 1 and a one-line message (no traceback) when Redis cannot be reached.
"""

from __future__ import annotations

import json
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from dwebsocket import _redis, conf
from dwebsocket.groups import registry
from dwebsocket.groups.status import KEY_PREFIX, record, redact

_TIMEOUT = 2.0  # seconds each Redis call may take


class Command(BaseCommand):
    help = (
        "Show the open WebSocket connections of every server process, the groups and their members, "
        "and the broker's health (every process needs a Redis WEBSOCKET_BROKER; with the memory broker "
        "only this command's own process is visible)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", dest="as_json", help="print one JSON object instead of tables")

    def handle(self, *args: Any, as_json: bool = False, **options: Any) -> None:
        url = conf.get("WEBSOCKET_BROKER")
        if conf.is_redis_url(url):
            status = _deployment(url)
        else:
            status = {
                "broker": {"url": str(url), "kind": "memory", "reachable": True},
                "scope": "this process only",
                "note": (
                    f"WEBSOCKET_BROKER is {url!r}: connections and groups live in each server process's "
                    "memory, which this command cannot see; it shows its own process only. With a Redis "
                    "WEBSOCKET_BROKER every server process publishes its status and this command shows them all."
                ),
                "processes": [record(registry, str(url), True)],
            }
        status["groups"] = _groups(status["processes"])
        status["totals"] = {
            "processes": len(status["processes"]),
            "connections": sum(p.get("connections", 0) for p in status["processes"]),
            "groups": len(status["groups"]),
            "members": sum(status["groups"].values()),
        }
        if as_json:
            self.stdout.write(json.dumps(status, indent=2, sort_keys=True))
        else:
            self.stdout.write(_tables(status))



def _deployment(url: str) -> dict[str, Any]:
    """Every live process's record, and Redis's health; :class:`CommandError` if Redis does not answer."""
    client = _redis.client(url, _TIMEOUT)
    cluster = _redis.is_cluster(url)
    try:
        started = time.monotonic()
        client.ping()
        latency = time.monotonic() - started
        info = client.info("server")
        if cluster and "redis_version" not in info:  # one answer per node: any of them says the version
            info = next((found for found in info.values() if isinstance(found, dict)), {})
        keys = sorted(client.scan_iter(match=f"{KEY_PREFIX}*", count=1000))
        # The records of a cluster live on every shard: one MGET per slot there.
        values = (client.mget_nonatomic(keys) if cluster else client.mget(keys)) if keys else []
    except _redis.ERRORS as exc:
        raise CommandError(
            f"Cannot reach Redis at WEBSOCKET_BROKER = {redact(url)!r}: {str(exc).rstrip('.')}. "
            "Start Redis or fix the setting."
        ) from None
    processes = []
    for key, value in zip(keys, values):
        if value is None:  # expired between SCAN and MGET
            continue
        try:
            found = json.loads(value)
        except ValueError:
            continue
        if isinstance(found, dict):
            found["id"] = key.decode("utf-8", "replace")[len(KEY_PREFIX):] if isinstance(key, bytes) else key
            processes.append(found)
    processes.sort(key=lambda p: (str(p.get("host")), int(p.get("pid") or 0)))
    return {
        "broker": {
            "url": redact(url),
            "kind": "redis",
            "reachable": True,
            "latency_ms": round(latency * 1000, 2),
            "redis_version": info.get("redis_version"),
        },
        "scope": "every process that published its status in the last 30 s",
        "processes": processes,
    }


def _groups(processes: list[dict[str, Any]]) -> dict[str, int]:
    """Members of each group across *processes* (the biggest first)."""
    sizes: dict[str, int] = {}
    for process in processes:
        for group, count in (process.get("groups") or {}).items():
            sizes[group] = sizes.get(group, 0) + int(count)
    return dict(sorted(sizes.items(), key=lambda item: (-item[1], item[0])))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _tables(status: dict[str, Any]) -> str:
    out = []
    broker = status["broker"]
    if broker["kind"] == "redis":
        out.append(
            f"Broker: Redis {broker.get('redis_version')} at {broker['url']}, reachable "
            f"({broker['latency_ms']} ms round trip)."
        )
    else:
        out.append(status["note"])
    out.append("")
    now = time.time()
    rows = [
        [
            str(p.get("host")), str(p.get("pid")), str(p.get("server")), str(p.get("connections", 0)),
            ", ".join(f"{k} {v}" for k, v in sorted((p.get("by_transport") or {}).items())) or "-",
            str(p.get("groups_total", 0)), str(p.get("members", 0)),
            "yes" if p.get("reachable") else "NO", f"{max(0.0, now - float(p.get('updated') or now)):.0f}s ago",
        ]
        for p in status["processes"]
    ]
    out.append(f"Processes ({status['scope']}):")
    out.append(_table(
        ["host", "pid", "server", "connections", "by transport", "groups", "members", "broker ok", "updated"], rows
    ))
    out.append("")
    groups = status["groups"]
    out.append(f"Groups ({len(groups)}):")
    out.append(_table(["group", "members"], [[g, str(n)] for g, n in list(groups.items())[:100]]))
    if len(groups) > 100:
        out.append(f"... and {len(groups) - 100} more (--json lists them all)")
    totals = status["totals"]
    out.append("")
    out.append(
        f"Total: {totals['connections']} connection(s) in {totals['processes']} process(es); "
        f"{totals['groups']} group(s), {totals['members']} member(s)."
    )
    return "\n".join(out) + "\n"

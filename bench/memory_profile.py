"""What one idle connection holds in the server, by tracemalloc: the top allocation sites per connection.

    python -m bench.memory_profile [--members 500] [--configs uvicorn,gevent,gthread] [--top 30] [--by lineno]

For each configuration (the member views and servers of bench/fanout.py), a
fresh server starts with ``PYTHONTRACEMALLOC`` set; ``GET /debug/memory/``
(bench/project/views.py) takes a baseline snapshot in the server,
``--members`` members connect (each joins the group and waits in its view),
and a second ``GET /debug/memory/`` lists the lines that allocated the
difference, biggest first, divided here by the number of members: what one
connection costs, by file and line, in bytes. Tracemalloc sees Python's
allocations only (not a thread's C stack, nor the memory allocator's own
slack), so the total is below the resident memory bench/idle.py reports; it
says *where* a connection's memory goes, and how that moves with a change.

The ``--by traceback`` view groups by the whole allocating stack (8 frames,
``PYTHONTRACEMALLOC=8``) to tell which caller made a generic allocation.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from contextlib import ExitStack

from .fanout import BY_KEY, Run, http_get_response, register_servers, rss_kib, run_client, start_servers


async def http_get_text(port: int, path: str, timeout: float) -> str:
    """A plain HTTP/1.1 GET on a connection of its own; returns the body (raises unless 200)."""
    status, body = await http_get_response(port, path, timeout)
    if status != 200:
        raise RuntimeError(f"GET {path}: {status} {body[:300]!r}")
    return body.decode()


async def session(servers, config, args) -> tuple[str, float]:
    port = servers[0].port
    await http_get_text(port, "/debug/memory/", 30)  # the baseline, before any connection
    before = rss_kib(servers[0].process.pid)
    run = Run([port], config, args)
    try:
        await run.connect_all()
        await asyncio.sleep(1)
        after = rss_kib(servers[0].process.pid)
        text = await http_get_text(port, f"/debug/memory/?top={args.top}&by={args.by}", 60)
    finally:
        await run.close_all()
    return text, (after - before) / args.members


_LINE = re.compile(r"^\s*(-?[\d.]+) KiB\s+(-?\d+) (.*)$")


def per_member(text: str, members: int) -> list[str]:
    """The server's listing (KiB and count per site, all connections) as bytes and count per connection."""
    rows, total = [], 0.0
    for line in text.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        kib, count, where = float(match.group(1)), int(match.group(2)), match.group(3)
        total += kib
        rows.append(f"{kib * 1024 / members:9.0f} B {count / members:7.2f}  {where}")
    rows.append(f"{total * 1024 / members:9.0f} B           in all of the sites listed")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=500)
    parser.add_argument("--configs", default="uvicorn,gevent,gthread")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--by", default="lineno", choices=["lineno", "filename", "traceback"])
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()
    args.server_cpu = None  # nothing pinned: memory is what is measured
    register_servers(args.members, None)
    for key in (k.strip() for k in args.configs.split(",")):
        config = BY_KEY[key]
        with ExitStack() as stack:
            servers = start_servers(stack, config, args, {"PYTHONTRACEMALLOC": "8"}, 600)
            text, rss = run_client(session(servers, config, args))
        print(f"\n## {key}: {config.stack}, {config.view}, {config.server}; {args.members} members")
        print(f"resident memory per member (with tracemalloc's own overhead): {rss:.1f} KiB")
        print("bytes and allocations per member, by site (innermost frame last):")
        print("\n".join(per_member(text, args.members)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The views the benchmarks compare, in dwebsocket and in Channels.

Fan-out (bench/fanout.py): members join group "bench"; an HTTP request broadcasts
``?n=`` messages, numbered from ``?start=`` (default 0), each "<number> <time sent>".
Echo (bench/echo.py): every message is sent back as it is.
"""

import time

from asgiref.sync import async_to_sync
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.http import HttpResponse

from dwebsocket import broadcast, require_websocket

GROUP = "bench"


def health(request):
    return HttpResponse("ok")


@require_websocket
async def member(request):
    """dwebsocket, async view: a member that only listens."""
    ws = request.websocket
    await ws.join(GROUP)
    await ws.send("joined")
    await ws.wait()


@require_websocket
def member_sync(request):
    """dwebsocket, sync view: the same member (gunicorn gthread or gevent)."""
    ws = request.websocket
    ws.join(GROUP)
    ws.send("joined")
    while ws.wait() is not None:  # the client sends nothing: returns at close
        pass


def _numbers(request) -> range:
    start = int(request.GET.get("start", "0"))
    return range(start, start + int(request.GET.get("n", "1")))


def dwebsocket_fanout(request):
    """dwebsocket: broadcasts from a plain (sync) view, the usual Django view."""
    for number in _numbers(request):
        broadcast(GROUP, f"{number} {time.time()!r}")
    return HttpResponse("ok")


async def dwebsocket_fanout_async(request):
    """dwebsocket: the same broadcasts from an async view (on the event loop, as the bare ASGI app)."""
    for number in _numbers(request):
        broadcast(GROUP, f"{number} {time.time()!r}")
    return HttpResponse("ok")


async def raw_asgi_fanout(request):
    """The ASGI floor in this process: dwebsocket's members, the broadcast a bare ``await send(...)``
    loop over their server's ``send`` (no group, frame, history or queue): what a broadcast costs
    here without dwebsocket's code, beside ``dwebsocket_fanout_async``."""
    from dwebsocket.groups import registry

    sends = [link._target._send for link in registry.local(GROUP) if link._target is not None]
    for number in _numbers(request):
        event = {"type": "websocket.send", "text": f"{number} {time.time()!r}"}
        for send in sends:
            await send(event)
    return HttpResponse("ok")


class Member(AsyncWebsocketConsumer):
    """Channels: the same member, as a consumer."""

    async def connect(self):
        await self.channel_layer.group_add(GROUP, self.channel_name)
        await self.accept()
        await self.send(text_data="joined")

    async def disconnect(self, code):
        await self.channel_layer.group_discard(GROUP, self.channel_name)

    async def bench_message(self, event):
        await self.send(text_data=event["text"])


def channels_fanout(request):
    layer = get_channel_layer()
    for number in _numbers(request):
        async_to_sync(layer.group_send)(GROUP, {"type": "bench.message", "text": f"{number} {time.time()!r}"})
    return HttpResponse("ok")


@require_websocket
def echo_sync(request):
    """dwebsocket, sync view: send every message back."""
    for message in request.websocket:
        request.websocket.send(message)


@require_websocket
async def echo_async(request):
    """dwebsocket, async view: send every message back."""
    ws = request.websocket
    async for message in ws:
        await ws.send(message)


class Echo(AsyncWebsocketConsumer):
    """Channels: the same echo, as a consumer (connect() accepts)."""

    async def receive(self, text_data=None, bytes_data=None):
        await self.send(text_data=text_data, bytes_data=bytes_data)


_baseline = []  # the first snapshot taken by memory(): what later ones are compared with


def memory(request):
    """Where the memory went since the first call (only with PYTHONTRACEMALLOC set): top allocation sites.

    GET /debug/memory/ once before the connections open, once after; the
    second answer lists the lines that allocated the difference, biggest first.
    """
    import tracemalloc

    if not tracemalloc.is_tracing():
        return HttpResponse("start the server with PYTHONTRACEMALLOC=10\n", status=404, content_type="text/plain")
    snapshot = tracemalloc.take_snapshot()
    if not _baseline:
        _baseline.append(snapshot)
        return HttpResponse("baseline taken\n", content_type="text/plain")
    key = request.GET.get("by", "lineno")
    stats = snapshot.compare_to(_baseline[0], key)[: int(request.GET.get("top", "40"))]
    lines = [f"{s.size_diff / 1024:10.1f} KiB {s.count_diff:8d} "
             + " < ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in list(s.traceback)[::-1][:8])
             for s in stats]
    return HttpResponse("\n".join(lines) + "\n", content_type="text/plain")

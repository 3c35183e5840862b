"""Views that exercise each member of request.websocket, for the tests."""

import asyncio
import json
import os
import threading
import time

from django.contrib.auth.decorators import login_required
from django.http import HttpResponse, HttpResponseForbidden, JsonResponse

from dwebsocket import TooManyGroups, accept_websocket, broadcast, group_members, group_size, require_websocket

# Close codes and reasons that views saw, by the ?id= of the connection.
# Guarded by _results_lock: views write from their own threads.
_results: dict[str, dict] = {}
_results_lock = threading.Lock()


def _record(request, **values):
    key = request.GET.get("id")
    if key:
        with _results_lock:
            _results.setdefault(key, {}).update(values)


def health(request):
    return HttpResponse("ok")


def result(request, key):
    """What the WebSocket view with ?id=key recorded, once it has finished."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with _results_lock:
            found = _results.get(key)
            if found and found.get("finished"):
                return JsonResponse(found)
        time.sleep(0.02)
    return JsonResponse({"error": "no result"}, status=404)


@require_websocket
def echo(request):
    ws = request.websocket
    for message in ws:
        ws.send(message)
    _record(request, close_code=ws.close_code, close_reason=ws.close_reason,
            closed=ws.closed, connected=ws.connected, finished=True)


@accept_websocket
def page_or_socket(request):
    if not request.is_websocket():
        return HttpResponse("plain http")
    for message in request.websocket:
        request.websocket.send(f"ws:{message}")


def plain(request):
    return HttpResponse(f"plain view, is_websocket={request.is_websocket()}")


@require_websocket
def wait_timeout(request):
    ws = request.websocket
    started = time.monotonic()
    message = ws.wait(timeout=0.3)
    waited = time.monotonic() - started
    ws.send(f"timeout message={message!r} connected={ws.connected} waited={waited >= 0.25}")
    for message in ws:
        ws.send(message)


@require_websocket
def queue(request):
    """Reports the queue after the client sent three messages."""
    ws = request.websocket
    first = ws.read()
    deadline = time.monotonic() + 5
    while ws.count_messages() + (first is not None) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    ws.send(f"first={first!r} count={ws.count_messages()} has={ws.has_messages()}")
    got = [ws.read() for _ in range(4)]
    ws.send(f"read={got!r} has={ws.has_messages()}")
    ws.wait()


@require_websocket
def server_close(request):
    ws = request.websocket
    message = ws.wait()
    code = int(request.GET.get("code", "1000"))
    ws.close(code, f"bye {message}")
    ws.close(code, "second close is ignored")
    after = ws.wait()
    _record(request, after=after, close_code=ws.close_code, closed=ws.closed,
            connected=ws.connected, send_after=ws.send("late"), finished=True)


@require_websocket
def disconnect(request):
    request.websocket.disconnect()
    request.websocket.disconnect()


@require_websocket
def query(request):
    """Says what query string the view sees, then echoes."""
    ws = request.websocket
    ws.send(json.dumps({"query": request.META.get("QUERY_STRING", ""), "GET": sorted(request.GET.items())}))
    for message in ws:
        ws.send(message)


@require_websocket(subprotocols=["chat.v2", "chat.v1"])
def subprotocol(request):
    ws = request.websocket
    ws.send(f"subprotocol={ws.subprotocol} protocol={ws.protocol}")
    ws.wait()


@require_websocket
def send_types(request):
    ws = request.websocket
    ws.send("text")
    ws.send(b"\x00\x01binary")
    ws.send(bytearray(b"bytearray"))
    try:
        ws.send(123)
    except TypeError as exc:
        ws.send(f"TypeError: {exc}")
    ws.wait()


@require_websocket
def raises(request):
    request.websocket.send("about to fail")
    raise RuntimeError("this view fails on purpose")


@require_websocket
def refuses(request):
    return HttpResponseForbidden("no entry\n")


@require_websocket
def noop(request):
    return None


@require_websocket
def big(request):
    """Sends a message of ?size= bytes, then echoes."""
    ws = request.websocket
    ws.send(b"x" * int(request.GET.get("size", "0")))
    for message in ws:
        ws.send(message)


@login_required
@require_websocket
def whoami(request):
    request.websocket.send(request.user.get_username())
    request.websocket.wait()


@require_websocket
def flood(request):
    """Sends 64 KiB messages until the connection is gone (a client that reads nothing)."""
    ws = request.websocket
    sent = 0
    while ws.send(b"x" * 65536):
        sent += 1
    _record(request, close_code=ws.close_code, close_reason=ws.close_reason, sent=sent, finished=True)


@require_websocket
def signup(request):
    """Creates a user per message; the count after two (dwebsocket.testing's tests)."""
    from django.contrib.auth.models import User

    for count, name in enumerate(request.websocket, start=1):
        User.objects.create_user(name)
        if count == 2:
            request.websocket.send(f"{count} signed up")


@require_websocket
def concurrent_send(request):
    """Sends from many threads at once: frames must never interleave."""
    ws = request.websocket
    threads_count = int(request.GET.get("threads", "8"))
    count = int(request.GET.get("count", "100"))

    def sender(n):
        for i in range(count):
            ws.send(f"{n}:{i}:" + "y" * (i % 50) * 100)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ws.send("done")
    ws.wait()


def undecorated_echo(request):
    """No decorator: only reachable over WebSocket with WEBSOCKET_ACCEPT_ALL."""
    if not request.is_websocket():
        return HttpResponse("plain")
    for message in request.websocket:
        request.websocket.send(message)


@require_websocket
async def async_echo(request):
    ws = request.websocket
    async for message in ws:
        await ws.send(message)
    _record(request, close_code=ws.close_code, closed=ws.closed, connected=ws.connected,
            kind=type(ws).__name__, finished=True, thread=threading.current_thread().name)


# Async broadcast: the AsyncWebSocket objects of every open connection.
# Guarded by running on one event loop per server process (ASGI), or by
# _async_clients_lock where views run on event loops of their own (WSGI).
async_clients = []
_async_clients_lock = threading.Lock()


@require_websocket
async def async_broadcast(request):
    ws = request.websocket
    await ws.send("joined")
    with _async_clients_lock:
        async_clients.append(ws)
    try:
        while (message := await ws.wait()) is not None:
            with _async_clients_lock:
                others = [client for client in async_clients if client is not ws]
            for client in others:
                await client.send(message)
    finally:
        with _async_clients_lock:
            async_clients.remove(ws)


@require_websocket
async def async_members(request):
    """Exercises the async connection's members."""
    ws = request.websocket
    assert ws.connected  # before the handshake is answered
    started = time.monotonic()
    timed_out = await ws.wait(timeout=0.2)
    await ws.send(f"timeout={timed_out!r} connected={ws.connected} waited={time.monotonic() - started >= 0.15}")
    first = await ws.wait()
    deadline = time.monotonic() + 5
    while ws.count_messages() < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await ws.send(f"first={first!r} count={ws.count_messages()} has={ws.has_messages()} "
                  f"read={await ws.read()!r},{await ws.read()!r},{await ws.read()!r}")
    await ws.send(b"\x00binary")
    await ws.close(4003, "async bye")
    await ws.close(4004, "ignored")
    _record(request, after=await ws.wait(), send_after=await ws.send("late"), closed=ws.closed,
            finished=True)


def middleware_raises(request):
    """Reached only through ExplodingMiddleware, which raises first."""
    raise AssertionError("unreachable")


@require_websocket
def sleepy_echo(request):
    """Echoes after holding its thread a while: proves views do not share one thread."""
    ws = request.websocket
    for message in ws:
        time.sleep(0.5)
        ws.send(message)


@require_websocket
def ignores(request):
    """Never reads: records whether it noticed that its client left (``connected``)."""
    ws = request.websocket
    deadline = time.monotonic() + float(request.GET.get("for", "15"))
    while ws.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    _record(request, connected=ws.connected, close_code=ws.close_code, finished=True)


@require_websocket
def leaves_unread(request):
    """Returns soon after the client starts sending, its messages unread."""
    ws = request.websocket
    ws.send("ready")
    time.sleep(0.5)


@require_websocket
def busy_echo(request):
    """Busy elsewhere for ?busy= seconds (after one echo with ?first=read), then echoes."""
    ws = request.websocket
    if request.GET.get("first") == "read":  # read (and echo) one message before the busy spell
        ws.send(ws.wait())
    time.sleep(float(request.GET.get("busy", "1")))
    for message in ws:
        ws.send(message)


@require_websocket
def late_accept(request):
    """Accepts ?delay= seconds late: after a polling open may have given up waiting."""
    time.sleep(float(request.GET.get("delay", "0")))
    ws = request.websocket
    ws.join("late-accept")
    _record(request, message=ws.wait(timeout=30), connected=ws.connected, close_code=ws.close_code,
            finished=True)


@require_websocket
def stalled_handshake(request):
    """Echoes, naming the transport; a WebSocket handshake is held ?stall= seconds first."""
    transport = "websocket" if request.META.get("HTTP_UPGRADE", "").lower() == "websocket" else "polling"
    if transport == "websocket":
        time.sleep(float(request.GET.get("stall", "0")))
    for message in request.websocket:
        request.websocket.send(f"{transport}:{message}")


_CLIENT_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>dwebsocket.js</title></head>
<body><script src="/static/dwebsocket/dwebsocket.js"></script></body></html>
"""


def client_page(request):
    """A blank page with dwebsocket.js, for browser tests that script the client."""
    return HttpResponse(_CLIENT_PAGE)


def login_as(request, username):
    """Logs the client in as *username* (created on first use): test project only."""
    from django.contrib.auth import get_user_model, login

    user, _ = get_user_model().objects.get_or_create(username=username)
    login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    return HttpResponse(f"logged in as {username}")


# -- groups ---------------------------------------------------------------------


@require_websocket
def group_chat(request, name):
    """Joins group *name* and broadcasts what the client sends to the others."""
    ws = request.websocket
    ws.join(name)
    ws.send(f"joined {ws.id}")
    for message in ws:
        broadcast(name, message, exclude=ws)


@require_websocket
def join_many(request):
    """Joins ?n= groups, then says how many it is in, or why join() refused one."""
    ws = request.websocket
    joined = 0
    try:
        for index in range(int(request.GET.get("n", "1"))):
            ws.join(f"many-{ws.id}-{index}")
            joined += 1
    except TooManyGroups as exc:
        ws.send(f"refused after {joined}: {exc}")
    else:
        ws.send(f"joined {joined}")
    ws.wait()


# The event loop of the server's async views, once one ran (ASGI servers only).
_server_loop: list[asyncio.AbstractEventLoop] = []


@require_websocket
async def async_group_chat(request, name):
    _server_loop[:] = [asyncio.get_running_loop()]
    ws = request.websocket
    await ws.join(name)
    await ws.send(f"joined {ws.id}")
    async for message in ws:
        broadcast(name, message, exclude=ws)


@require_websocket
def recover_chat(request):
    """Joins group ?group=, broadcasts what the client sends to the others, and
    answers the sender "sent <message>" once the broadcast is made (then
    sleeps ?pause= seconds, if given)."""
    ws = request.websocket
    name = request.GET["group"]
    pause = float(request.GET.get("pause", "0"))  # seconds after each message: a slow view
    ws.join(name)
    for message in ws:
        broadcast(name, message, exclude=ws)
        ws.send(f"sent {message if isinstance(message, str) else message.hex()}")
        if pause:
            time.sleep(pause)


def recover_page(request):
    """A page with dwebsocket.js and group ?group='s position pinned by {% websocket_position %}."""
    from django.shortcuts import render

    return render(request, "recover.html", {"group": request.GET["group"]})


def presence(request, name):
    return JsonResponse({
        "size": group_size(name),
        "members": sorted(m.id for m in group_members(name)),
        "users": sorted(str(m.user) for m in group_members(name)),
    })


def http_broadcast(request, name):
    """Broadcasts ?n= numbered messages of ?size= bytes from a plain HTTP view."""
    count = int(request.GET.get("n", "1"))
    padding = "p" * int(request.GET.get("size", "0"))
    for index in range(count):
        broadcast(name, f"{request.GET.get('m', 'msg')} {index} {padding}".rstrip())
    return HttpResponse(f"sent {count}")


def busy_broadcast(request, name):
    """Broadcasts numbered messages to group *name* for ?seconds=, one every ?every= seconds,
    waiting between them without I/O (a CPU-bound loop: under gevent nothing else runs
    unless the broadcast itself gives the hub a turn)."""
    seconds, every = float(request.GET["seconds"]), float(request.GET["every"])
    end, count = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        broadcast(name, f"busy {count}")
        count += 1
        pause = time.monotonic() + every
        while time.monotonic() < pause:
            pass
    return HttpResponse(f"sent {count}")


def stall_loop_broadcast(request, name):
    """Holds up the server's event loop for ?stall= seconds (as an async view
    that calls blocking code does) and meanwhile broadcasts ?n= numbered
    messages to group *name*, spread over ?spread= seconds, from this thread."""
    count, stall, spread = int(request.GET["n"]), float(request.GET["stall"]), float(request.GET["spread"])
    _server_loop[0].call_soon_threadsafe(time.sleep, stall)
    time.sleep(0.2)  # the loop is asleep now
    for index in range(count):
        broadcast(name, f"stalled {index}")
        time.sleep(spread / count)
    return HttpResponse(f"sent {count}")


# -- text that UTF-8 cannot carry -----------------------------------------------------


def bad_text_broadcast(request, name):
    """Broadcasts a lone surrogate to group *name* and reports what the call said."""
    try:
        broadcast(name, "\ud800")
    except (TypeError, ValueError) as exc:
        return HttpResponse(f"refused: {exc}", status=400)
    return HttpResponse("sent")


@require_websocket
def bad_text_send(request):
    """Tries to send a lone surrogate, reports what send() said, then echoes."""
    ws = request.websocket
    try:
        ws.send("\ud800")
    except (TypeError, ValueError) as exc:
        ws.send(f"refused: {exc}")
    else:
        ws.send("sent")
    for message in ws:
        ws.send(message)


def _report_end(request, ws, last):
    """Print what a view saw when its connection ended: the server's log is all a
    test can read once the server has stopped (tests/test_deploys.py)."""
    line = (
        f"deploy-view id={request.GET.get('id')} wait={last!r} connected={ws.connected} "
        f"close_code={ws.close_code} reason={ws.close_reason!r}\n"
    )
    os.write(1, line.encode())  # one write: lines of views ending together do not mix


@require_websocket
def deploy_echo(request):
    """Echoes until the connection ends, then reports how it ended (a server restart)."""
    ws = request.websocket
    while True:
        message = ws.wait()
        if message is None:
            break
        ws.send(message)
    _report_end(request, ws, message)


@require_websocket
async def async_deploy_echo(request):
    """:func:`deploy_echo` as an ``async def`` view."""
    ws = request.websocket
    while True:
        message = await ws.wait()
        if message is None:
            break
        await ws.send(message)
    _report_end(request, ws, message)

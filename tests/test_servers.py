"""request.websocket under every server: runserver, gunicorn gthread and gevent
(WSGI), uvicorn, daphne and hypercorn (ASGI).

Each test runs once per server (see the ``server`` fixture), against the
running server, with the `websockets` library as the client. Where an ASGI
server cannot pass something through (see ``LIMITS`` in servers.py), the test
asserts what that server does instead.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
import uuid

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .client import result, ws_connect
from .servers import WSGI_SERVERS, limited, start_server


def new_id() -> str:
    return uuid.uuid4().hex


def sent_code(server, code: int) -> int:
    """The close code the client receives when the view closes with *code*."""
    if limited(server.kind, "close_codes_1000_and_3000_only") and not 3000 <= code <= 4999:
        return 1000
    return code


def refused_status(server, status: int) -> int:
    """The status the client receives when the view refuses with *status*."""
    return 403 if limited(server.kind, "no_denial_response") else status


# -- the seed guide's views, verbatim ---------------------------------------


def test_seed_echo_answers_you_said(server):
    with ws_connect(server, "/seed/echo/") as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "You said: hello"
        ws.send("héllo wörld ✓ 🚀")
        reply = ws.recv(timeout=5)
        assert reply == "You said: héllo wörld ✓ 🚀"
        assert isinstance(reply, str)
    assert "Received message: hello" in server.watch.text()


def test_seed_echo_refuses_plain_http_with_400(server):
    status, body = server.get("/seed/echo/")
    assert status == 400
    assert "WebSocket" in body


def test_seed_broadcast_reaches_every_other_client(server):
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(ws_connect(server, "/seed/broadcast/")) for _ in range(3)]
        deadline = time.monotonic() + 5
        while server.watch.text().count("New client connected") < 3:
            assert time.monotonic() < deadline, server.watch.text()
            time.sleep(0.02)
        sender, *others = clients
        sender.send("hi everyone")
        for other in others:
            assert other.recv(timeout=5) == "hi everyone"
        others[0].send("and back")
        assert sender.recv(timeout=5) == "and back"
        assert others[1].recv(timeout=5) == "and back"
        with pytest.raises(TimeoutError):
            sender.recv(timeout=0.5)  # the sender never gets its own message back
    deadline = time.monotonic() + 5
    while "Total clients: 0" not in server.watch.text():
        assert time.monotonic() < deadline, server.watch.text()
        time.sleep(0.02)


# -- messages ----------------------------------------------------------------


def test_text_binary_and_fragmented_messages(server):
    with ws_connect(server, "/echo/") as ws:
        ws.send("plain text")
        assert ws.recv(timeout=5) == "plain text"
        ws.send(b"\x00\xffbinary")
        reply = ws.recv(timeout=5)
        assert reply == b"\x00\xffbinary" and isinstance(reply, bytes)
        ws.send(["frag", "mén", "ted"])
        assert ws.recv(timeout=5) == "fragménted"
        ws.send([b"a", b"b", b"c"])
        assert ws.recv(timeout=5) == b"abc"
        if not limited(server.kind, "no_empty_message"):
            ws.send("")
            assert ws.recv(timeout=5) == ""


@pytest.mark.parametrize("compression", ["deflate", None])
def test_one_mebibyte_messages_both_ways(server, compression):
    size = 1024 * 1024
    with ws_connect(server, f"/big/?size={size}", compression=compression) as ws:
        assert ws.recv(timeout=10) == b"x" * size
        text = "é" * (size // 2)  # 1 MiB of UTF-8
        ws.send(text)
        assert ws.recv(timeout=10) == text
        binary = bytes(range(256)) * (size // 256)
        ws.send(binary)
        assert ws.recv(timeout=10) == binary


def test_message_over_the_limit_closes_with_1009(server):
    key = new_id()
    with ws_connect(server, f"/echo/?id={key}") as ws:
        ws.send(b"x" * (1024 * 1024 + 1))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        if limited(server.kind, "drops_messages_over_1mib"):
            assert closed.value.rcvd is None
        else:
            assert closed.value.rcvd.code == sent_code(server, 1009)
    assert result(server, key)["closed"] is True


# Where dwebsocket does the framing (WSGI) it inflates only up to the limit. Of
# the ASGI servers, which inflate themselves, uvicorn answers 1009 at once;
# hypercorn stalls the connection for 20 s, daphne drops it (docs/servers.md).
@pytest.mark.servers("runserver", "gthread", "gevent", "uvicorn")
def test_a_deflate_bomb_closes_with_1009(server):
    key = new_id()
    with ws_connect(server, f"/echo/?id={key}", compression="deflate") as ws:
        ws.send(bytes(64 * 1024 * 1024))  # 64 MiB of zeros: 64 KiB on the wire
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1009
    assert result(server, key)["closed"] is True


def test_ping_is_answered(server):
    with ws_connect(server, "/echo/") as ws:
        for payload in (b"", b"abc", b"x" * 125):
            assert ws.ping(payload).wait(5)
        ws.send("still open")
        assert ws.recv(timeout=5) == "still open"


def test_sends_from_many_threads_never_interleave(server):
    with ws_connect(server, "/concurrent-send/?threads=8&count=100") as ws:
        seen = set()
        while (message := ws.recv(timeout=10)) != "done":
            sender, index, padding = message.split(":")
            assert padding == "y" * (int(index) % 50) * 100
            seen.add((sender, index))
        assert len(seen) == 800


def test_send_types(server):
    with ws_connect(server, "/send-types/") as ws:
        assert ws.recv(timeout=5) == "text"
        assert ws.recv(timeout=5) == b"\x00\x01binary"
        assert ws.recv(timeout=5) == b"bytearray"
        error = ws.recv(timeout=5)
        assert error.startswith("TypeError: send() takes str (a text frame) or bytes")


# -- the connection object's members -------------------------------------------


def test_wait_timeout_is_told_apart_from_close(server):
    with ws_connect(server, "/wait-timeout/") as ws:
        assert ws.recv(timeout=5) == "timeout message=None connected=True waited=True"
        ws.send("after")
        assert ws.recv(timeout=5) == "after"


def test_read_count_messages_and_has_messages(server):
    with ws_connect(server, "/queue/") as ws:
        for text in ("one", "two", "three"):
            ws.send(text)
        # read() before anything arrived may return None or "one", depending on timing.
        report = ws.recv(timeout=5)
        if report.startswith("first=None"):
            assert report == "first=None count=3 has=True"
            assert ws.recv(timeout=5) == "read=['one', 'two', 'three', None] has=False"
        else:
            assert report == "first='one' count=2 has=True"
            assert ws.recv(timeout=5) == "read=['two', 'three', None, None] has=False"


def test_client_close_code_and_reason_reach_the_view(server):
    key = new_id()
    with ws_connect(server, f"/echo/?id={key}") as ws:
        ws.send("x")
        ws.recv(timeout=5)
        ws.close(4001, "client leaves")
    seen = result(server, key)
    assert (seen["closed"], seen["connected"]) == (True, False)
    if not limited(server.kind, "no_client_close_code"):
        assert seen["close_code"] == 4001
    if not limited(server.kind, "no_client_close_reason"):
        assert seen["close_reason"] == "client leaves"


@pytest.mark.parametrize("code", [1000, 1001, 1011, 4002])
def test_server_close_code_and_reason_reach_the_client(server, code):
    key = new_id()
    with ws_connect(server, f"/server-close/?code={code}&id={key}") as ws:
        ws.send("now")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd.code == sent_code(server, code)
        if not limited(server.kind, "close_codes_1000_and_3000_only"):
            assert closed.value.rcvd.reason == "bye now"
    seen = result(server, key)
    assert seen["after"] is None and seen["closed"] is True and seen["connected"] is False
    assert seen["send_after"] is False
    if not limited(server.kind, "no_client_close_code"):
        assert seen["close_code"] == sent_code(server, code)  # the client echoed it back


def test_disconnect_closes_normally(server):
    with ws_connect(server, "/disconnect/") as ws:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd.code == 1000


def test_client_vanishing_without_close_frame(server):
    key = new_id()
    with ws_connect(server, f"/echo/?id={key}") as ws:
        ws.send("x")
        assert ws.recv(timeout=5) == "x"
        ws.socket.shutdown(socket.SHUT_RDWR)
    seen = result(server, key)
    assert seen["closed"] is True
    # WSGI: 1006. ASGI servers report what they like: uvicorn 1005, hypercorn 1006.
    assert seen["close_code"] == (1006 if server.kind in WSGI_SERVERS else seen["close_code"])
    assert seen["close_code"] in (1005, 1006)


def test_subprotocol_negotiation(server):
    with ws_connect(server, "/subprotocol/", subprotocols=["chat.v1", "chat.v2"]) as ws:
        assert ws.subprotocol == "chat.v1"
        assert ws.recv(timeout=5) == "subprotocol=chat.v1 protocol=chat.v1"
    with ws_connect(server, "/subprotocol/", subprotocols=["other", "chat.v2"]) as ws:
        assert ws.subprotocol == "chat.v2"
        assert ws.recv(timeout=5) == "subprotocol=chat.v2 protocol=chat.v2"
    with ws_connect(server, "/subprotocol/") as ws:
        assert ws.subprotocol is None
        assert ws.recv(timeout=5) == "subprotocol=None protocol=None"


# -- views that fail, refuse or do nothing -------------------------------------


def test_view_that_raises_closes_with_1011_and_logs_once(server):
    server.watch.allow("this view fails on purpose")
    with ws_connect(server, "/raises/") as ws:
        assert ws.recv(timeout=5) == "about to fail"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd.code == sent_code(server, 1011)
    time.sleep(0.2)
    log = server.watch.text()
    assert log.count("Traceback") == 1
    assert "error in WebSocket view" in log
    with ws_connect(server, "/echo/") as ws:  # the process keeps serving
        ws.send("alive")
        assert ws.recv(timeout=5) == "alive"


def test_view_that_returns_a_response_refuses_the_handshake(server):
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(server, "/refuses/")
    assert refused.value.response.status_code == 403


def test_view_that_returns_without_touching_the_socket_closes_normally(server):
    with ws_connect(server, "/noop/") as ws:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd.code == 1000


def test_login_required_redirects_an_anonymous_handshake(server):
    received = raw_exchange(server, handshake_bytes("/whoami/"))
    if limited(server.kind, "no_denial_response"):
        assert received.startswith(b"HTTP/1.1 403")
    else:
        assert received.startswith(b"HTTP/1.1 302")
        assert re.search(rb"(?i)location: /accounts/login/\?next=/whoami/", received)


# -- routing: decorated, undecorated, plain HTTP --------------------------------


def test_accept_websocket_serves_http_and_websocket_on_one_url(server):
    assert server.get("/page-or-socket/") == (200, "plain http")
    with ws_connect(server, "/page-or-socket/") as ws:
        ws.send("x")
        assert ws.recv(timeout=5) == "ws:x"


def test_undecorated_view_refuses_websocket_with_400(server):
    assert server.get("/plain/") == (200, "plain view, is_websocket=False")
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(server, "/plain/")
    assert refused.value.response.status_code == refused_status(server, 400)
    if not limited(server.kind, "no_denial_response"):
        assert b"@accept_websocket" in refused.value.response.body


# -- the wire: Origin, bad handshakes, nothing but frames after the view -------


def raw_exchange(server, request: bytes, then: bytes = b"") -> bytes:
    """Send raw bytes and return all the server sent: until it closed the
    connection, or, for a refused handshake, until the end of the response."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk
            head, found, body = received.partition(b"\r\n\r\n")
            if not found:
                continue
            if not head.startswith(b"HTTP/1.1 101"):
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                if length and len(body) >= int(length.group(1)):
                    return received
            elif then:
                sock.sendall(then)
                then = b""


def handshake_bytes(path: str, extra: str = "", key: str = "dGhlIHNhbXBsZSBub25jZQ==") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


# A masked close frame with code 1000, as a client sends it.
_MASK = b"\x01\x02\x03\x04"
CLOSE_1000 = b"\x88\x82" + _MASK + bytes(b ^ _MASK[i % 4] for i, b in enumerate(b"\x03\xe8"))


@pytest.mark.servers(*WSGI_SERVERS)  # ASGI servers write the frames themselves
def test_only_websocket_frames_follow_the_handshake(server):
    assert_only_frames_follow(server)


def assert_only_frames_follow(server) -> None:
    """After the 101, the server writes the close frame that answers the client's, and nothing else."""
    received = raw_exchange(server, handshake_bytes("/echo/"), then=CLOSE_1000)
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")  # wsproto 1.2 writes no reason phrase
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    assert rest == b"\x88\x02\x03\xe8"  # exactly one close frame, then the server closed


@pytest.mark.servers(*WSGI_SERVERS)  # ASGI servers validate handshakes themselves
def test_invalid_handshake_gets_400(server):
    received = raw_exchange(server, handshake_bytes("/echo/").replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"))
    assert received.startswith(b"HTTP/1.1 426")
    received = raw_exchange(
        server,
        b"GET /echo/ HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n",
    )
    assert received.startswith(b"HTTP/1.1 400")
    assert b"Sec-WebSocket-Key" in received


def status_of(received: bytes) -> int:
    assert received.startswith(b"HTTP/1."), received[:200]
    return int(received.split(b" ", 2)[1])


def test_a_malformed_deflate_offer_is_declined_or_refused_never_a_500(server):
    # wsproto raised ValueError for client_max_window_bits=abc inside the view's
    # first use of request.websocket: a 500 with a traceback. RFC 7692 says to
    # decline the offer (dwebsocket does under WSGI); an ASGI server negotiates
    # itself, so dwebsocket refuses such an offer with 400 before it accepts.
    for offer in ("permessage-deflate; client_max_window_bits=abc", "permessage-deflate; server_max_window_bits="):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(handshake_bytes("/echo/", f"Sec-WebSocket-Extensions: {offer}\r\n"))
            head = sock.recv(65536).partition(b"\r\n\r\n")[0]
        if limited(server.kind, "drops_malformed_deflate_offer") and head == b"":
            continue  # the server's own doing; the fixture checks it logged no traceback
        if server.kind in WSGI_SERVERS or status_of(head) == 101:  # declined (RFC 7692 section 5)
            assert status_of(head) == 101, head
            assert b"permessage-deflate" not in head.lower()
        else:  # refused by dwebsocket (the offer is in the scope) or by the server
            assert status_of(head) in (400, refused_status(server, 400)), head
    with ws_connect(server, "/echo/") as ws:  # a good offer still compresses, and the server goes on
        ws.send("after")
        assert ws.recv(timeout=5) == "after"


@pytest.mark.parametrize("key", ["", "YWJj", "dGhlIHNhbXBsZSBub25jZQ", "!!!!!!!!!!!!!!!!!!!!!!==", "dGhlIHNhbXBsZSBub25jZSE="])
def test_a_key_that_is_not_16_bytes_of_base64_is_refused_with_400(server, key):
    # RFC 6455 4.2.1; wsproto (so runserver, gunicorn, and uvicorn's and
    # hypercorn's wsproto front ends) only checked that the header was there.
    # (daphne's own validation answers before dwebsocket sees the request.)
    received = raw_exchange(server, handshake_bytes("/echo/", key=key))
    assert status_of(received) == 400, received[:300]
    assert b"Sec-WebSocket-Key" in received


@pytest.mark.servers(*WSGI_SERVERS)  # an ASGI server says the version in the scope: tests/unit
def test_an_http_1_0_handshake_is_refused_with_400(server):
    received = raw_exchange(server, handshake_bytes("/echo/").replace(b"HTTP/1.1\r\n", b"HTTP/1.0\r\n", 1))
    assert status_of(received) == 400, received[:300]
    assert b"HTTP/1.1 or later" in received


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://127.0.0.1:{port}", True),  # the page's own origin
        ("http://localhost:{port}", False),  # in ALLOWED_HOSTS, but another origin
        ("https://127.0.0.1:{port}", False),  # another scheme
        ("https://trusted.example", True),  # CSRF_TRUSTED_ORIGINS
        ("https://evil.example", False),
        ("null", False),
    ],
)
def test_origin_is_checked(server, origin, allowed):
    origin = origin.format(port=server.port)
    if allowed:
        with ws_connect(server, "/echo/", origin=origin) as ws:
            ws.send("ok")
            assert ws.recv(timeout=5) == "ok"
    else:
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(server, "/echo/", origin=origin)
        assert refused.value.response.status_code == 403
        if not limited(server.kind, "no_denial_response"):
            assert b"WEBSOCKET_ALLOWED_ORIGINS" in refused.value.response.body


def test_no_origin_header_is_allowed(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(handshake_bytes("/echo/"))
        assert sock.recv(4096).startswith(b"HTTP/1.1 101")


# -- settings and keepalive, each on a server of its own -------------------------


@pytest.mark.parametrize("kind", ["runserver", "gthread", "gevent"])
def test_keepalive_closes_a_peer_that_stopped_answering(kind):
    env = {"DWS_TEST_PING_INTERVAL": "0.3", "DWS_TEST_PING_TIMEOUT": "0.5"}
    with start_server(kind, env=env) as running:
        # A live client answers the pings and stays connected.
        with ws_connect(running, "/echo/") as ws:
            time.sleep(2)
            ws.send("still here")
            assert ws.recv(timeout=5) == "still here"
        # A silent peer: a raw socket that completes the handshake and then never reads.
        key = new_id()
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
            sock.sendall(handshake_bytes(f"/echo/?id={key}"))
            assert sock.recv(4096).startswith(b"HTTP/1.1 101")
            started = time.monotonic()
            seen = result(running, key)
            assert seen["close_code"] == 1006
            assert time.monotonic() - started < 5
        assert "Traceback" not in running.log_text()


@pytest.mark.parametrize("kind", ["runserver", "gthread", "gevent"])
def test_keepalive_frees_a_view_stuck_sending_to_a_client_that_reads_nothing(kind):
    # The view's send() blocks once the socket's buffers are full; the client
    # says nothing either, so after the ping interval and timeout the
    # connection is cut and send() returns False.
    env = {"DWS_TEST_PING_INTERVAL": "0.3", "DWS_TEST_PING_TIMEOUT": "0.5"}
    with start_server(kind, env=env) as running:
        key = new_id()
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(handshake_bytes(f"/flood/?id={key}"))
            started = time.monotonic()
            seen = result(running, key)
            assert (seen["close_code"], seen["close_reason"]) == (1006, "no answer to the keepalive ping")
            assert seen["sent"] > 0
            assert time.monotonic() - started < 5
        assert "Traceback" not in running.log_text()


@pytest.mark.parametrize("kind", ["runserver", "gthread", "gevent"])
def test_keepalive_spares_a_client_whose_view_is_slow_to_read(kind):
    # The view takes 0.5 s a message and reads one at a time (queue of 1): the
    # server stops reading the socket, so the client's pongs wait unread for
    # seconds. That is the view's slowness, not a dead client.
    env = {"DWS_TEST_PING_INTERVAL": "0.3", "DWS_TEST_PING_TIMEOUT": "0.5", "DWS_TEST_MAX_QUEUE": "1"}
    with start_server(kind, env=env) as running:
        with ws_connect(running, "/sleepy-echo/") as ws:
            sent = [f"m{n}" for n in range(6)]
            for message in sent:
                ws.send(message)
            assert [ws.recv(timeout=10) for _ in sent] == sent


@pytest.mark.parametrize("kind", ["runserver", "gthread", "uvicorn"])
def test_accept_all_lets_undecorated_views_take_websockets(kind):
    with start_server(kind, env={"DJANGO_SETTINGS_MODULE": "tests.project.settings_acceptall"}) as running:
        with ws_connect(running, "/undecorated-echo/") as ws:
            ws.send("x")
            assert ws.recv(timeout=5) == "x"
        assert running.get("/undecorated-echo/") == (200, "plain")


@pytest.mark.parametrize("kind", ["runserver", "gevent", "daphne"])
def test_decorators_work_without_the_middleware(kind):
    env = {"DJANGO_SETTINGS_MODULE": "tests.project.settings_nomiddleware"}
    with start_server(kind, env=env) as running:
        with ws_connect(running, "/seed/echo/") as ws:
            ws.send("x")
            assert ws.recv(timeout=5) == "You said: x"
        assert running.get("/seed/echo/")[0] == 400
        with pytest.raises(InvalidStatus):
            ws_connect(running, "/health/")  # undecorated: Django answers 200, not 101
        assert "Traceback" not in running.log_text()


def test_gunicorn_sync_worker_is_refused_with_a_clear_error():
    with start_server("gunicorn-sync") as running:
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(running, "/echo/")
        assert refused.value.response.status_code == 501
        assert b"-k gthread" in refused.value.response.body
        assert "sync worker cannot hold WebSocket connections" in running.log_text()


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("uwsgi-processes", b"Run uwsgi with --threads N"),
        ("uwsgi-late-gevent", b"Use --gevent-early-monkey-patch instead"),
        ("uwsgi-router-without-websockets", b"add --http-websockets"),
    ],
)
def test_uwsgi_modes_that_cannot_hold_connections_are_refused_with_a_clear_error(kind, says):
    with start_server(kind) as running:
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(running, "/echo/")
        assert refused.value.response.status_code == 501
        assert says in refused.value.response.body
        assert running.get("/health/") == (200, "ok")  # the worker goes on serving


def test_uwsgi_http_router_with_http_websockets():
    """``--http`` (a router process in front of the workers) works with ``--http-websockets``."""
    with start_server("uwsgi-router") as running:
        with ws_connect(running, "/echo/") as ws:
            for message in ("through the router", b"\x00binary", "x" * 300_000):
                ws.send(message)
                assert ws.recv(timeout=5) == message
        assert_only_frames_follow(running)
        assert "Traceback" not in running.log_text()
